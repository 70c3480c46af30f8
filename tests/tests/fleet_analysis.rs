//! The fleet's evidence from Prometheus: three nodes, a real three-member
//! etcd cluster and a real Prometheus (in etcd's network) scraping every
//! agent. The leader judges the sum over all nodes: it rolls back a canary
//! that no single node has seen enough of, and holds the plan while
//! Prometheus is down.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, EtcdNet, FleetLab};
use canary_tests::{canaryctl_ok, etcd::EtcdCluster, load::drive, prometheus::Prometheus};

const VIP: &str = "10.96.0.10:80";
const ETCD_REACHABLE: &str = "fleet: etcd reachable";
/// Where Prometheus listens, in etcd's network namespace.
const PROMETHEUS_PORT: u16 = 9090;

fn vip() -> SocketAddrV4 {
    VIP.parse().expect("VIP")
}

fn prometheus_addr() -> String {
    format!("{}:{PROMETHEUS_PORT}", EtcdNet::member_ip(0))
}

/// The agents' metrics, as Prometheus in etcd's network reaches them.
fn targets(lab: &FleetLab) -> Vec<String> {
    lab.nodes()
        .iter()
        .map(|n| format!("{}:9477", n.etcd_ip()))
        .collect()
}

/// etcd, the lab (stable-1 and canary-1 with `canary`), three agents with
/// `[analysis]` and `plan` (a `[service.rollout]` body).
fn start(canary: Behavior, plan: &str) -> (EtcdCluster, FleetLab, Vec<AgentProcess>) {
    canary_tests::require_root();
    let etcd = EtcdCluster::start(3, false);
    let lab = canary_tests::fleet(
        3,
        &[
            (
                "stable-1",
                Behavior::FirstByteDelay(Duration::from_millis(2)),
            ),
            ("canary-1", canary),
        ],
        32,
        &etcd,
    );
    let mut agents = canary_tests::start_fleet_agents(&lab, |node| {
        format!(
            "[agent]\ninterfaces = [\"{}\"]\nmetrics_addr = \"0.0.0.0:9477\"\n\n{}summary_interval = \"500ms\"\n\
             lease_ttl = \"3s\"\n\n[analysis]\nprometheus = \"http://{}\"\nquery_timeout = \"1s\"\n\
             min_window = \"5s\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{}\"]\n\
             canary = [\"{}\"]\ncohort = \"per-connection\"\nrelease = \"r1\"\n[service.rollout]\n\
             interval = \"250ms\"\n{plan}\n",
            node.iface(),
            etcd.fleet_section(&format!("n{}", node.index()), "/canary"),
            prometheus_addr(),
            lab.backend_addr(0),
            lab.backend_addr(1),
        )
    });
    for (k, agent) in agents.iter_mut().enumerate() {
        agent
            .wait_for(ETCD_REACHABLE, 0, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("node {k} never reached etcd: {e:#}"));
    }
    (etcd, lab, agents)
}

fn status(agent: &AgentProcess) -> serde_json::Value {
    let out = canaryctl_ok(&agent.control_socket(), &["status", "--json", "web"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    v["services"][0].clone()
}

/// Every node's (state, step).
fn states(agents: &[AgentProcess]) -> Vec<(String, String)> {
    agents
        .iter()
        .map(|a| {
            let s = status(a);
            (
                s["state"].as_str().unwrap_or_default().to_string(),
                s["step"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_leader_rolls_back_a_slow_canary_on_the_fleets_sum_that_no_node_saw_enough_of() {
    // 2 ms stable, 4 ms canary: twice as slow to first byte. Each node's
    // judge needs 300 connections per cohort; no node gets there.
    let (etcd, lab, agents) = start(
        Behavior::FirstByteDelay(Duration::from_millis(4)),
        "steps = [{ weight = \"50%\", hold = \"1h\" }]\n[service.rollout.judge]\nmin_samples = 300\n",
    );
    let targets = targets(&lab);
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let prom = Prometheus::start_on(lab_etcd_ns(&etcd), &prometheus_addr(), &targets);
    scraping(&prom);
    let start = Instant::now();
    let mut per_node = [0u64; 3];
    loop {
        let now = states(&agents);
        if now.iter().all(|(s, _)| s == "rolled-back") || start.elapsed() > Duration::from_secs(40)
        {
            break;
        }
        for (k, node) in lab.nodes().iter().enumerate() {
            // At most 250 canary connections per node in all: below the
            // node judge's 300.
            if per_node[k] < 250 {
                per_node[k] += drive(node, vip(), node.client_addrs(), 40).canary();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let took = start.elapsed();
    for q in [
        "count(up == 1)",
        "sum(canary_connections_total{service=\"web\",cohort=\"canary\"})",
        "sum(increase(canary_connections_total{service=\"web\",cohort=\"canary\"}[60s]))",
        "sum(increase(canary_first_byte_seconds_count{service=\"web\",cohort=\"canary\"}[60s]))",
    ] {
        eprintln!("{q} = {:?}", prom.query(q));
    }
    let verdicts: Vec<String> = agents
        .iter()
        .map(|a| {
            status(a)["last_verdict"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    eprintln!(
        "fleet rollback {:.1} s after Prometheus scraped every agent; canary connections per node {per_node:?}; {}",
        took.as_secs_f64(),
        verdicts[0]
    );
    assert!(
        states(&agents).iter().all(|(s, _)| s == "rolled-back"),
        "every node rolled back: {:?}\n{verdicts:?}",
        states(&agents)
    );
    for v in &verdicts {
        assert!(
            v.starts_with("rolled back by the fleet's judge: fail (latency)")
                && v.contains("fleet (Prometheus, all nodes)"),
            "the fleet's judge decided, on the fleet's sum: {v}"
        );
    }
    assert!(
        per_node.iter().all(|&n| n < 300),
        "no node saw min_samples canary connections: {per_node:?}"
    );
}

#[test]
fn a_prometheus_that_is_down_holds_the_fleet_and_its_pass_moves_it_on() {
    let (etcd, lab, agents) = start(
        Behavior::FirstByteDelay(Duration::from_millis(2)),
        "steps = [{ weight = \"20%\", hold = \"1s\" }, { weight = \"50%\", hold = \"1s\" }]\n\
         [service.rollout.judge]\nmin_samples = 20\n",
    );
    // Prometheus down: the leader's fleet evidence is inconclusive, so the
    // first step holds though its hold is long over.
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(6) {
        for node in lab.nodes() {
            drive(node, vip(), node.client_addrs(), 40);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let now = states(&agents);
    assert!(
        now.iter()
            .all(|(s, step)| s == "progressing" && step.starts_with("1/2")),
        "held at step 1 without Prometheus: {now:?}"
    );
    let targets = targets(&lab);
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let prom = Prometheus::start_on(lab_etcd_ns(&etcd), &prometheus_addr(), &targets);
    scraping(&prom);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(40)
        && !states(&agents).iter().all(|(s, _)| s == "promoted")
    {
        for node in lab.nodes() {
            drive(node, vip(), node.client_addrs(), 40);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let now = states(&agents);
    let passed: Vec<String> = agents
        .iter()
        .flat_map(AgentProcess::log)
        .filter(|l| l.contains("step 1 passed"))
        .take(1)
        .collect();
    eprintln!(
        "held 6 s without Prometheus; promoted {:.1} s after it scraped every agent: {passed:?}",
        start.elapsed().as_secs_f64()
    );
    assert!(now.iter().all(|(s, _)| s == "promoted"), "{now:?}");
    assert!(
        passed
            .first()
            .is_some_and(|l| l.contains("pass: fleet (Prometheus, all nodes)")),
        "the step passed on the fleet's Prometheus verdict: {passed:?}"
    );
}

/// Waits until Prometheus has scraped all three agents (it applies a new
/// scrape config up to 5 s after it is ready).
fn scraping(prom: &Prometheus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while prom.query("count(up == 1)") != Some(3.0) {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the three agents"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lab_etcd_ns(etcd: &EtcdCluster) -> &canary_lab::Netns {
    etcd.net().ns()
}

#[test]
fn checks_inconclusive_on_a_node_pause_the_whole_fleet() {
    // No Prometheus at all: every check evaluation is inconclusive.
    let (_etcd, _lab, mut agents) = start(
        Behavior::FirstByteDelay(Duration::from_millis(2)),
        "steps = [{ weight = \"20%\", hold = \"1h\" }]\n\
         [[service.rollout.checks]]\nname = \"errors\"\n\
         query = 'sum(rate(http_requests_total{version=\"{{cohort}}\",node=\"{{node}}\"}[{{window}}]))'\n\
         max = 1.0\n",
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20)
        && !states(&agents).iter().all(|(s, _)| s == "paused")
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let now = states(&agents);
    // Each node's state change line (status's last verdict moves on with
    // the judge, which keeps judging a paused plan).
    let verdicts: Vec<String> = agents
        .iter_mut()
        .map(|a| {
            a.wait_for("to=\"paused\"", 0, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    eprintln!(
        "fleet paused {:.1} s after the agents were up: {}",
        start.elapsed().as_secs_f64(),
        verdicts[0]
    );
    assert!(
        now.iter()
            .all(|(s, step)| s == "paused" && step.starts_with("1/1")),
        "every node paused: {now:?}"
    );
    for v in &verdicts {
        assert!(
            v.contains("paused by the checks: check \"errors\": inconclusive, canary: cannot connect to Prometheus")
                && v.contains("by the checks)"),
            "one pause for the fleet, decided by one node's checks: {v}"
        );
    }
}

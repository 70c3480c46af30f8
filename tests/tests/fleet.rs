//! One rollout across a fleet: three nodes (router namespaces, each with
//! its own agent and clients, sharing backends) coordinated through a real
//! three-member etcd cluster. A plan advances in lockstep; a canary that
//! fails on one node is rolled back on all three within 100 ms of that
//! node's decision; `canaryctl` on one node acts on the others; and the
//! failure cases: etcd down (fail static), etcd's leader killed, a node
//! partitioned from etcd, a node restarted, two operators racing.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, FleetLab, Netns, Stop};
use canary_tests::{
    canaryctl, canaryctl_ok,
    etcd::EtcdCluster,
    load::{Outcome, drive},
};

const VIP: &str = "10.96.0.10:80";
/// Log line of every rollout state change.
const STATE_CHANGE: &str = "event=\"rollout-state\"";
const ETCD_REACHABLE: &str = "fleet: etcd reachable";
/// In a state change line: to rolled back.
const ROLLED_BACK: &str = "to=\"rolled-back\"";

/// How many times `agent` has logged a change to rolled back.
fn rollbacks(agent: &AgentProcess) -> usize {
    agent
        .log()
        .iter()
        .filter(|l| l.contains(STATE_CHANGE) && l.contains(ROLLED_BACK))
        .count()
}

/// A three-node fleet, its etcd and its agents.
struct Fleet {
    agents: Vec<AgentProcess>,
    lab: FleetLab,
    etcd: EtcdCluster,
}

/// Starts etcd (`tls`), the lab (stable-1, canary-1, `clients` per node)
/// and one agent per node with `plan` (a `[service.rollout]` body), and
/// waits until every agent has read the fleet's records.
fn start(tls: bool, plan: &str, clients: u32) -> Fleet {
    canary_tests::require_root();
    let etcd = EtcdCluster::start(3, tls);
    let lab = canary_tests::fleet(
        3,
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        clients,
        &etcd,
    );
    let mut agents = canary_tests::start_fleet_agents(&lab, |node| {
        format!(
            "[agent]\ninterfaces = [\"{}\"]\n\n{}summary_interval = \"500ms\"\nlease_ttl = \"3s\"\n\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\n\
             cohort = \"per-connection\"\nrelease = \"r1\"\n[service.rollout]\ninterval = \"250ms\"\n{plan}\n",
            node.iface(),
            etcd.fleet_section(&format!("n{}", node.index()), "/canary"),
            lab.backend_addr(0),
            lab.backend_addr(1),
        )
    });
    for (k, agent) in agents.iter_mut().enumerate() {
        agent
            .wait_for(ETCD_REACHABLE, 0, Duration::from_secs(15))
            .unwrap_or_else(|e| {
                panic!(
                    "node {k} never reached etcd: {e:#}\n{}",
                    agent.log().join("\n")
                )
            });
    }
    Fleet { agents, lab, etcd }
}

fn vip() -> SocketAddrV4 {
    VIP.parse().expect("VIP")
}

impl Fleet {
    fn ctl(&self, k: usize, args: &[&str]) -> std::process::Output {
        canaryctl(&self.agents[k].control_socket(), args)
    }

    fn ctl_ok(&self, k: usize, args: &[&str]) -> String {
        canaryctl_ok(&self.agents[k].control_socket(), args)
    }

    /// Node `k`'s (state, weight in force) of `web`.
    fn state(&self, k: usize) -> (String, String) {
        let json: serde_json::Value =
            serde_json::from_str(&self.ctl_ok(k, &["status", "--json", "web"]))
                .expect("status JSON");
        let svc = &json["services"][0];
        (
            svc["state"].as_str().unwrap_or_default().to_string(),
            svc["effective_weight"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    /// Waits until every node in `nodes` is in `state` at `weight`.
    fn wait_all(&self, nodes: &[usize], state: &str, weight: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now: Vec<(String, String)> = nodes.iter().map(|&k| self.state(k)).collect();
            if now.iter().all(|(s, w)| s == state && w == weight) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {nodes:?} did not all reach {state} at {weight} within {timeout:?}: {now:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every agent's rollout state changes, for failure messages.
    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(k, a)| {
                let lines: Vec<String> = a
                    .log()
                    .into_iter()
                    .filter(|l| l.contains("fleet") || l.contains(STATE_CHANGE))
                    .collect();
                format!("--- node {k}:\n{}", lines.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Drives `n` connections from node `k`'s clients.
    fn drive(&self, k: usize, n: usize) -> Outcome {
        let node = self.lab.node(k);
        drive(node, vip(), node.client_addrs(), n)
    }

    /// Makes the canary refuse node `k`'s clients only: node `k`'s router
    /// answers a SYN to the canary backend with a RST (the other nodes
    /// reach it as before).
    fn break_canary_on(&self, k: usize, broken: bool) {
        let canary = self.lab.backend_addr(1);
        let rule = [
            "FORWARD",
            "-p",
            "tcp",
            "-d",
            &canary.ip().to_string(),
            "--dport",
            &canary.port().to_string(),
            "--syn",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ];
        let op = if broken { "-I" } else { "-D" };
        ip_netns_exec(
            self.lab.node(k).router(),
            "iptables",
            &[&[op][..], &rule[..]].concat(),
        );
    }
}

fn ip_netns_exec(ns: &Netns, cmd: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), cmd])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "{cmd} {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Seconds of the day of a log line's timestamp (`2026-11-29T16:34:50.168395Z …`).
fn at(line: &str) -> f64 {
    let t = line
        .split_whitespace()
        .next()
        .and_then(|ts| ts.split('T').nth(1))
        .and_then(|t| t.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let mut parts = t.split(':');
    let mut field = || -> f64 {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad timestamp in {line:?}"))
    };
    field() * 3600.0 + field() * 60.0 + field()
}

/// Node `k`'s `n`-th (from 0) state change log line containing `needle`.
fn change(agent: &mut AgentProcess, needle: &str, n: usize, timeout: Duration) -> String {
    let lines: Vec<String> = agent.log();
    if let Some(l) = lines
        .iter()
        .filter(|l| l.contains(STATE_CHANGE) && l.contains(needle))
        .nth(n)
    {
        return l.clone();
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = agent
            .log()
            .into_iter()
            .filter(|l| l.contains(STATE_CHANGE) && l.contains(needle))
            .nth(n)
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no state change #{n} with {needle:?} within {timeout:?}:\n{}",
            agent.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "small index"
    )]
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A plan advances on all three nodes at once (over mutual TLS), decided
/// by the leader from every node's summary; a manual gate waits for one
/// `approve` anywhere; `promote` on node 0 takes effect on node 2's
/// clients and `rollback` on node 1 on node 0's.
#[test]
fn a_plan_advances_in_lockstep_and_a_command_on_one_node_acts_on_all() {
    let f = start(
        true,
        "steps = [{ weight = \"10%\", hold = \"6s\" }, { weight = \"30%\", hold = \"3s\" }, \
         { weight = \"60%\", gate = \"manual\" }]",
        32,
    );
    let all = [0, 1, 2];
    f.wait_all(&all, "awaiting-approval", "30%", Duration::from_secs(20));
    let mut f = f;
    for step in ["step 1 passed", "step 2 passed"] {
        let times: Vec<f64> = (0..3)
            .map(|k| at(&change(&mut f.agents[k], step, 0, Duration::from_secs(1))))
            .collect();
        let spread = times.iter().copied().fold(f64::MIN, f64::max)
            - times.iter().copied().fold(f64::MAX, f64::min);
        eprintln!(
            "{step}: applied on the three nodes within {:.1} ms of each other",
            spread * 1e3
        );
        assert!(
            spread < 0.25,
            "{step} applied {:.0} ms apart:\n{}",
            spread * 1e3,
            f.logs()
        );
        // The leader decided it from the fleet's summaries.
        let line = change(&mut f.agents[0], step, 0, Duration::ZERO);
        assert!(
            line.contains("by the fleet's leader") && line.contains("node(s)"),
            "{line}"
        );
    }
    // The gate: approve on node 1, every node enters step 3.
    f.ctl_ok(1, &["approve", "web"]);
    f.wait_all(&all, "progressing", "60%", Duration::from_secs(2));
    // Promote on node 0: node 2's clients all reach canary.
    let t = Instant::now();
    f.ctl_ok(0, &["promote", "web"]);
    f.wait_all(&[2], "promoted", "100%", Duration::from_secs(2));
    eprintln!(
        "promote on node 0 applied on node 2 after {:.1} ms (as canaryctl sees it)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let out = f.drive(2, 60);
    out.assert_no_errors("node 2 after promote");
    assert_eq!(out.canary(), 60, "node 2 promoted: {:?}", out.by_backend);
    // Roll back on node 1: node 0's clients all reach stable.
    f.ctl_ok(1, &["rollback", "web"]);
    f.wait_all(&all, "rolled-back", "0%", Duration::from_secs(2));
    let out = f.drive(0, 60);
    out.assert_no_errors("node 0 after rollback");
    assert_eq!(out.canary(), 0, "node 0 rolled back: {:?}", out.by_backend);
    // status shows the fleet: every node, the leader.
    let status: serde_json::Value =
        serde_json::from_str(&f.ctl_ok(2, &["status", "--json"])).expect("JSON");
    let fleet = &status["fleet"];
    assert_eq!(fleet["etcd"], "connected", "{fleet}");
    assert!(
        fleet["leader"]
            .as_str()
            .is_some_and(|l| ["n0", "n1", "n2"].contains(&l)),
        "{fleet}"
    );
    let nodes: Vec<&str> = fleet["nodes"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(nodes, ["n0", "n1", "n2"], "{fleet}");
    let table = f.ctl_ok(2, &["status"]);
    assert!(
        table.contains("FLEET (this node: n2") && table.contains("release: r1"),
        "{table}"
    );
}

/// A canary that fails on one node only (its router refuses the canary to
/// its clients) trips that node's breaker; the rollback reaches the other
/// two within 100 ms of that node's decision (p99 over 20 trials). Then
/// two operators race (`promote` on node 0, `rollback` on node 1 at once):
/// every node ends in the same state, the one etcd holds.
#[test]
fn a_rollback_on_one_node_reaches_all_within_100ms_and_racing_operators_agree() {
    let mut f = start(false, "steps = [{ weight = \"50%\", hold = \"1h\" }]", 32);
    let all = [0, 1, 2];
    f.wait_all(&all, "progressing", "50%", Duration::from_secs(10));
    let mut delays = Vec::new();
    for trial in 0..20 {
        let k = trial % 3;
        let before: Vec<usize> = f.agents.iter().map(rollbacks).collect();
        f.break_canary_on(k, true);
        // Half of them go to canary and are refused: the breaker trips
        // after 3 in a row.
        let out = f.drive(k, 24);
        assert!(
            !out.errors.is_empty(),
            "trial {trial}: no canary refusal on node {k}: {:?}",
            out.by_backend
        );
        let line = change(
            &mut f.agents[k],
            ROLLED_BACK,
            before[k],
            Duration::from_secs(3),
        );
        assert!(
            line.contains("by=\"the breaker\""),
            "trial {trial}: node {k}: {line}"
        );
        let decided = at(&line);
        f.break_canary_on(k, false);
        let mut slowest = 0.0f64;
        for j in all.iter().copied().filter(|&j| j != k) {
            let line = change(
                &mut f.agents[j],
                ROLLED_BACK,
                before[j],
                Duration::from_secs(3),
            );
            assert!(
                line.contains(&format!("on n{k}, by the breaker")),
                "trial {trial}: node {j}: {line}"
            );
            slowest = slowest.max(at(&line) - decided);
        }
        delays.push(slowest * 1e3);
        f.ctl_ok(0, &["resume", "web"]);
        f.wait_all(&all, "progressing", "50%", Duration::from_secs(2));
    }
    let mut sorted = delays.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
    eprintln!(
        "breaker rollback on one node → applied on the other two: p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms over {} trials",
        sorted[sorted.len() - 1],
        sorted.len()
    );
    assert!(p99 <= 100.0, "p99 {p99:.1} ms > 100 ms: {delays:?}");

    // Two operators racing, five times.
    for round in 0..5 {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| f.ctl(0, &["promote", "web"]));
            let b = s.spawn(|| f.ctl(1, &["rollback", "web"]));
            (a.join().expect("promote"), b.join().expect("rollback"))
        });
        // Each either applied or was refused on the state the other made.
        for (what, out) in [("promote", &a), ("rollback", &b)] {
            assert!(
                out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already"),
                "round {round}: {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let record = f
            .etcd
            .etcdctl(&["get", "/canary/rollouts/web/r1", "--print-value-only"]);
        let record: serde_json::Value =
            serde_json::from_slice(&record.stdout).expect("record JSON");
        let in_etcd = record["state"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let weight = if in_etcd == "promoted" { "100%" } else { "0%" };
        f.wait_all(&all, &in_etcd, weight, Duration::from_secs(2));
        eprintln!(
            "race {round}: promote {} / rollback {} → all three {in_etcd}",
            a.status, b.status
        );
        f.ctl_ok(2, &["resume", "web"]);
        f.wait_all(&all, "progressing", "50%", Duration::from_secs(2));
    }
}

/// etcd down: every node keeps its weight (fail static) and steers; only
/// a rollback can still be decided, on its own node, and it reaches the
/// others when etcd returns; other commands are refused. etcd's raft
/// leader killed mid-rollout: commands right after land everywhere.
#[test]
fn etcd_down_is_fail_static_and_its_leader_dying_loses_no_decision() {
    let mut f = start(false, "steps = [{ weight = \"20%\", hold = \"1h\" }]", 32);
    let all = [0, 1, 2];
    f.wait_all(&all, "progressing", "20%", Duration::from_secs(10));

    // etcd's leader killed, then a pause and a resume at once.
    let leader = f.etcd.leader();
    f.etcd.kill(leader);
    let t = Instant::now();
    f.ctl_ok(1, &["pause", "web"]);
    f.wait_all(&all, "paused", "20%", Duration::from_secs(5));
    eprintln!(
        "etcd leader (member {leader}) killed: pause on node 1 applied everywhere after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    f.ctl_ok(2, &["resume", "web"]);
    f.wait_all(&all, "progressing", "20%", Duration::from_secs(5));
    f.etcd.restart(leader);

    // etcd gone entirely.
    for m in 0..3 {
        f.etcd.kill(m);
    }
    std::thread::sleep(Duration::from_millis(500));
    let out = f.drive(2, 200);
    out.assert_no_errors("node 2 with etcd down");
    let canary = out.canary();
    assert!(
        (15..=75).contains(&canary),
        "node 2 steers 20 % with etcd down: {:?}",
        out.by_backend
    );
    let refused = f.ctl(1, &["promote", "web"]);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && why.contains("etcd unavailable")
            && why.contains("nothing changed"),
        "{why}"
    );
    f.wait_all(&all, "progressing", "20%", Duration::ZERO);
    // Node 0's canary fails: its kernel breaker cuts it off there at once.
    f.break_canary_on(0, true);
    let out = f.drive(0, 40);
    assert!(!out.errors.is_empty(), "no refusal on node 0");
    f.break_canary_on(0, false);
    f.wait_all(&[0], "rolled-back", "0%", Duration::from_secs(3));
    let out = f.drive(0, 40);
    out.assert_no_errors("node 0 rolled back");
    assert_eq!(
        out.canary(),
        0,
        "node 0 rolled back locally: {:?}",
        out.by_backend
    );
    f.wait_all(&[1, 2], "progressing", "20%", Duration::ZERO);
    let status: serde_json::Value =
        serde_json::from_str(&f.ctl_ok(0, &["status", "--json"])).expect("JSON");
    assert_eq!(
        status["fleet"]["unpublished"],
        serde_json::json!(["web"]),
        "{status}"
    );
    // etcd back: the rollback is published and applied everywhere.
    let t = Instant::now();
    f.etcd.restart_all(&[0, 1, 2]);
    f.wait_all(&all, "rolled-back", "0%", Duration::from_secs(15));
    eprintln!(
        "etcd back: node 0's rollback reached nodes 1 and 2 {:.0} ms after the restarts began",
        t.elapsed().as_secs_f64() * 1e3
    );
    let line = change(&mut f.agents[2], ROLLED_BACK, 0, Duration::ZERO);
    assert!(line.contains("on n0, by the breaker"), "{line}");
}

/// A node cut off from etcd stays at its step while the others move on
/// (it never promotes on its own, and refuses to be promoted), then
/// catches up when healed. A node restarted (killed) mid-rollout comes
/// back at the fleet's step.
#[test]
fn a_partitioned_node_never_promotes_and_a_restarted_one_resumes_at_the_fleets_step() {
    let plan = "steps = [{ weight = \"10%\", hold = \"5s\" }, { weight = \"30%\", hold = \"3s\" }, \
                { weight = \"60%\", hold = \"3s\" }]";
    let mut f = start(false, plan, 8);
    let all = [0, 1, 2];
    f.lab.partition(2).expect("partition node 2");
    let cut_off = f.state(2);
    assert_eq!(cut_off.0, "progressing", "{cut_off:?}");
    f.wait_all(&[0, 1], "promoted", "100%", Duration::from_secs(20));
    assert_eq!(
        f.state(2),
        cut_off,
        "node 2 moved while cut off:\n{}",
        f.logs()
    );
    // Status on the cut-off node answers at once, from what it knows (it
    // never holds the agent's loop waiting for etcd).
    let t = Instant::now();
    let status: serde_json::Value =
        serde_json::from_str(&f.ctl_ok(2, &["status", "--json"])).expect("JSON");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "status on a partitioned node took {took:?}"
    );
    assert!(
        status["fleet"]["etcd"]
            .as_str()
            .is_some_and(|e| e.starts_with("unreachable")),
        "{}",
        status["fleet"]
    );
    let refused = f.ctl(2, &["promote", "web"]);
    assert!(
        !refused.status.success(),
        "promote on a partitioned node: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    assert_eq!(f.state(2).0, "progressing");
    f.lab.heal(2).expect("heal node 2");
    let t = Instant::now();
    f.wait_all(&[2], "promoted", "100%", Duration::from_secs(15));
    eprintln!(
        "partitioned node caught up {:.0} ms after heal",
        t.elapsed().as_secs_f64() * 1e3
    );

    // A restart mid-rollout.
    f.ctl_ok(0, &["resume", "web"]);
    f.wait_all(&all, "progressing", "10%", Duration::from_secs(3));
    f.agents[1].end(Stop::Kill).expect("kill node 1's agent");
    f.wait_all(&[0, 2], "progressing", "30%", Duration::from_secs(10));
    f.agents[1]
        .relaunch(None, None)
        .expect("node 1's agent restarts");
    let t = Instant::now();
    let fleet_now = f.state(0);
    f.wait_all(&[1], &fleet_now.0, &fleet_now.1, Duration::from_secs(5));
    eprintln!(
        "restarted node at the fleet's step ({fleet_now:?}) {:.0} ms after it was ready",
        t.elapsed().as_secs_f64() * 1e3
    );
}

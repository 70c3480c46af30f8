//! The data plane outlives the agent: SIGTERM, SIGKILL, an upgrade and a
//! capacity change each end one agent and start the next while 50
//! long-lived connections exchange data every 10 ms and new connections
//! keep arriving. None may break or move, and the new ones keep their
//! split. Also: a breaker trip while no agent runs, interfaces that come
//! back, and `canary-agent uninstall`.
//!
//! Statistical bounds are two-sided 99.9 % binomial intervals
//! (z = 3.2905), normal approximation.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::unwrap_used,
    reason = "the helpers here are test code too: a failed step panics, which fails the test"
)]
#![expect(
    clippy::float_cmp,
    reason = "metric values compared are counts: exact in f64"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Conn, Lab, Stop};
use canary_tests::{
    attached_to,
    load::{self, Attempt, TIMEOUT},
};

const VIP: &str = "10.96.0.10:80";
const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;
const Z999: f64 = 3.2905;
/// Long-lived connections held across each restart.
const LONG_LIVED: usize = 50;

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

fn lab() -> Lab {
    canary_tests::lab(
        &[
            ("stable-1", Behavior::Reply),
            ("stable-2", Behavior::Reply),
            ("canary-1", Behavior::Reply),
        ],
        16,
    )
}

/// One service at 20 % per connection, with `agent` extra agent keys.
fn config(lab: &Lab, agent: &str) -> String {
    format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n{agent}\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\", \"{}\"]\ncanary = [\"{}\"]\nweight = \"20%\"\ncohort = \"per-connection\"\n",
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(2),
    )
}

/// What the long-lived connections saw.
#[derive(Debug, Default)]
struct Held {
    /// Ping rounds over all connections.
    rounds: u64,
    /// Connections that failed: (index, error).
    broken: Vec<(usize, String)>,
    /// Connections answered by another backend than at first:
    /// (index, first, now).
    moved: Vec<(usize, String, String)>,
}

/// `LONG_LIVED` connections from the client namespace, each pinged every
/// 10 ms until `stop` is set (120 s at most).
fn hold_connections(
    lab: &Lab,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<std::io::Result<Held>> {
    let sources: Vec<Ipv4Addr> = lab.client_addrs().to_vec();
    lab.client().spawn(move || {
        let mut conns: Vec<Option<(Conn, String)>> = (0..LONG_LIVED)
            .map(|i| {
                let mut c = Conn::open(sources[i % sources.len()], vip(), TIMEOUT)
                    .expect("open a long-lived connection");
                let first = c.ping().expect("first ping");
                Some((c, first))
            })
            .collect();
        let mut held = Held::default();
        let deadline = Instant::now() + Duration::from_mins(2);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let round = Instant::now();
            for (i, slot) in conns.iter_mut().enumerate() {
                let Some((c, first)) = slot else { continue };
                match c.ping() {
                    Ok(now) if now == *first => {}
                    Ok(now) => held.moved.push((i, first.clone(), now)),
                    Err(e) => {
                        held.broken.push((i, e.to_string()));
                        *slot = None;
                    }
                }
            }
            held.rounds += 1;
            if let Some(rest) = Duration::from_millis(10).checked_sub(round.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        held
    })
}

/// Runs `change` (which ends the agent and starts the next) while the
/// long-lived connections are held and 800 new connections arrive at 200/s;
/// asserts 0 broken, 0 moved, no failed new connection and the 20 % split.
fn survives(
    name: &str,
    agent_keys: &str,
    migrates: bool,
    change: impl FnOnce(&Lab, &mut AgentProcess),
) {
    const NEW: usize = 800;
    let lab = lab();
    let mut agent = AgentProcess::start_pinned(lab.router(), &config(&lab, agent_keys), false)
        .expect("agent starts");
    let stop = Arc::new(AtomicBool::new(false));
    let held = hold_connections(&lab, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));
    let paced = load::spawn_timed(&lab, vip(), lab.client_addrs(), NEW, 200.0);
    std::thread::sleep(Duration::from_millis(500));
    let ready_before = agent.count(canary_lab::READY);
    let changed_at = Instant::now();
    change(&lab, &mut agent);
    let gap = changed_at.elapsed();
    let attempts: Vec<Attempt> = load::join_timed(paced);
    // Some rounds after the new agent took over, too.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let held = held
        .join()
        .expect("long-lived thread")
        .expect("enter client namespace");

    let log = agent.log();
    assert_eq!(
        agent.count(canary_lab::READY),
        ready_before + 1,
        "{name}: a new agent must have started"
    );
    let adopted = log
        .iter()
        .find(|l| l.contains("adopting the pinned data plane"))
        .unwrap_or_else(|| {
            panic!(
                "{name}: the new agent did not adopt; log:\n{}",
                log.join("\n")
            )
        });
    let errors: Vec<_> = attempts.iter().filter(|a| a.result.is_err()).collect();
    let canary = attempts
        .iter()
        .filter(|a| a.result.as_ref().is_ok_and(|n| n.starts_with("canary")))
        .count() as f64;
    let n = attempts.len() as f64;
    let bound = Z999 * (n * 0.2 * 0.8).sqrt();
    eprintln!(
        "{name}: agent gap {:.0} ms; {} rounds of {LONG_LIVED} pings, {} broken, {} moved; \
         {} new connections, {} failed, {canary} to canary (expected {:.0} ± {bound:.0}); {adopted}",
        gap.as_secs_f64() * 1e3,
        held.rounds,
        held.broken.len(),
        held.moved.len(),
        attempts.len(),
        errors.len(),
        n * 0.2,
    );
    assert!(
        held.rounds >= 50,
        "{name}: only {} ping rounds: the long-lived load did not run through the change",
        held.rounds
    );
    assert!(
        held.broken.is_empty(),
        "{name}: {} of {LONG_LIVED} long-lived connections broke, first: {:?}",
        held.broken.len(),
        held.broken.first()
    );
    assert!(
        held.moved.is_empty(),
        "{name}: {} long-lived pings were answered by another backend, first: {:?}",
        held.moved.len(),
        held.moved.first()
    );
    assert_eq!(attempts.len(), NEW, "{name}: every new connection ran");
    assert!(
        errors.is_empty(),
        "{name}: {} of {NEW} new connections failed, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        (canary - n * 0.2).abs() <= bound,
        "{name}: {canary} of {n} new connections to canary, outside 20 % ± {bound:.0}"
    );
    // The counters carried over: every connection of the run is counted,
    // those before the change included.
    let counted = canary_tests::metrics::scrape(lab.router())
        .sum("canary_connections_total", &[("service", "web")]);
    let expected = (LONG_LIVED + NEW) as f64;
    if migrates {
        // Counts the old programs make between the copy of STATS and the
        // switch of the links go to the old map (README: a migration's
        // hand-over window); a reset would lose hundreds.
        assert!(
            counted <= expected && counted >= expected - 10.0,
            "{name}: canary_connections_total {counted}, expected {expected} (at most 10 lost in the hand-over)"
        );
    } else {
        assert_eq!(
            counted, expected,
            "{name}: canary_connections_total lost the counts from before the change"
        );
    }
    drop(agent);
    assert!(
        attached_to(lab.router(), IFACE).is_empty(),
        "{name}: dropping the agent uninstalls the data plane"
    );
}

#[test]
fn a_sigterm_restart_breaks_and_moves_no_connection() {
    survives("SIGTERM + start", "", false, |_, agent| {
        agent.restart(Stop::Term, None, None).expect("restart");
    });
}

#[test]
fn a_sigkill_restart_breaks_and_moves_no_connection() {
    survives("SIGKILL + start", "", false, |_, agent| {
        agent.restart(Stop::Kill, None, None).expect("restart");
    });
}

/// (id, tag) of every program attached with TCX to the client-facing
/// interface.
fn tcx_programs(lab: &Lab) -> Vec<(u32, u64)> {
    use aya::programs::{SchedClassifier, TcAttachType};
    lab.router()
        .spawn(|| {
            [TcAttachType::Ingress, TcAttachType::Egress]
                .into_iter()
                .flat_map(|t| {
                    let (_, progs) = SchedClassifier::query_tcx(IFACE, t).expect("query TCX");
                    progs.into_iter().map(|p| (p.id(), p.tag()))
                })
                .collect()
        })
        .join()
        .expect("TCX query thread")
        .expect("enter the router namespace")
}

#[test]
fn an_upgrade_to_different_programs_breaks_and_moves_no_connection() {
    // Built by `cargo xtask test`: the same data plane with different code.
    let variant = std::env::var_os("CANARY_EBPF_UPGRADE_TEST")
        .map(std::path::PathBuf::from)
        .expect("CANARY_EBPF_UPGRADE_TEST names the upgrade-test object (run `cargo xtask test`)");
    assert!(variant.exists(), "{} missing", variant.display());
    survives("upgrade to other programs", "", false, |lab, agent| {
        let before = tcx_programs(lab);
        agent.set_env("CANARY_EBPF_OBJECT", &variant);
        agent
            .restart(Stop::Term, None, None)
            .expect("the upgraded agent starts");
        let after = tcx_programs(lab);
        assert_eq!(before.len(), 2, "ingress and egress before: {before:?}");
        assert_eq!(after.len(), 2, "ingress and egress after: {after:?}");
        for ((id0, tag0), (id1, tag1)) in before.iter().zip(&after) {
            assert_ne!(id0, id1, "the program on the link was replaced");
            assert_ne!(tag0, tag1, "the new program's code differs");
        }
        assert!(
            agent
                .log()
                .iter()
                .any(|l| l.contains("starts empty") && l.contains("PENDING")),
            "the variant's PENDING has another capacity: it must be recreated, not refused; log:\n{}",
            agent.log().join("\n")
        );
        assert!(
            agent
                .log()
                .iter()
                .any(|l| l.contains("migrated the pinned map") && l.contains("COUNTERS")),
            "the variant counts one more event: COUNTERS must be migrated; log:\n{}",
            agent.log().join("\n")
        );
    });
}

#[test]
fn capacity_changes_migrate_the_maps_and_break_no_connection() {
    let sizes = "conntrack_capacity = 131072\nmax_services = 64\nmax_backends = 64";
    survives(
        "conntrack_capacity, max_services and max_backends changed",
        "",
        true,
        |lab, agent| {
            agent
                .restart(Stop::Term, None, Some(&config(lab, sizes)))
                .expect("restart with other capacities");
            let log = agent.log();
            for map in [
                "CONNTRACK",
                "SERVICES",
                "BREAKER",
                "HISTOGRAMS",
                "STATS",
                "TIMEOUTS",
            ] {
                assert!(
                    log.iter()
                        .any(|l| l.contains("migrated the pinned map") && l.contains(map)),
                    "{map} was not migrated; log:\n{}",
                    log.join("\n")
                );
            }
        },
    );
}

#[test]
fn a_breaker_trip_while_no_agent_runs_is_cut_off_in_the_kernel_and_persisted_by_the_next_agent() {
    let mut lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        32,
    );
    let text = format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"20%\"\ncohort = \"per-connection\"\n",
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let mut agent = AgentProcess::start_pinned(lab.router(), &text, false).expect("agent starts");
    agent.end(Stop::Kill).expect("SIGKILL");
    // No agent runs. The canary dies; the kernel's breaker must cut it off.
    lab.stop_backend(1);
    let out = load::drive_paced(&lab, vip(), lab.client_addrs(), 600, Some(300.0));
    let failed = out.errors.len();
    let late = load::drive(&lab, vip(), lab.client_addrs(), 300);
    eprintln!(
        "breaker without an agent: {failed} of 600 connections failed before the cut-off; \
         after it {} of 300 failed, {} reached canary",
        late.errors.len(),
        late.canary()
    );
    assert!(failed > 0, "the dead canary was never steered to");
    assert!(
        failed <= 50,
        "{failed} failed connections: the kernel breaker did not cut the canary off"
    );
    late.assert_no_errors("after the kernel cut the canary off with no agent running");
    assert_eq!(late.canary(), 0);

    agent.relaunch(None, None).expect("the next agent starts");
    let state = std::fs::read_to_string(agent.dir().join("state/web.json"))
        .expect("the next agent persisted the rollback");
    assert!(
        state.contains("rolled-back") && state.contains("breaker"),
        "{state}"
    );
    assert!(
        agent.log().iter().any(|l| l.contains("rollout-state")
            && l.contains("rolled-back")
            && l.contains("breaker")),
        "no rollout-state line for the trip; log:\n{}",
        agent.log().join("\n")
    );
    let out = load::drive(&lab, vip(), lab.client_addrs(), 300);
    out.assert_no_errors("with the rollback in force");
    assert_eq!(out.canary(), 0, "the next agent re-raised the canary");
}

#[test]
fn a_recreated_interface_is_attached_again() {
    let lab = lab();
    let agent = AgentProcess::start(lab.router(), &config(&lab, ""), false).expect("agent starts");
    // The same name with a new index: a veth recreated. A second veth
    // stands in for the client-facing one here, so the lab keeps working.
    let extra = "canary-x0";
    let add_veth = || {
        lab.router()
            .ip(&[
                "link",
                "add",
                extra,
                "type",
                "veth",
                "peer",
                "name",
                "canary-x1",
            ])
            .expect("add a veth pair");
        lab.router()
            .ip(&["link", "set", extra, "up"])
            .expect("set it up");
    };
    add_veth();
    let mut agent = agent;
    agent
        .reload(&config(&lab, "").replace(
            &format!("interfaces = [\"{IFACE}\"]"),
            &format!("interfaces = [\"{IFACE}\", \"{extra}\"]"),
        ))
        .expect("reload with the extra interface");
    assert_eq!(attached_to(lab.router(), extra).len(), 2, "attached");
    lab.router().ip(&["link", "del", extra]).expect("delete it");
    agent
        .wait_for("interface disappeared", 0, Duration::from_secs(5))
        .expect("the agent notices");
    add_veth();
    agent
        .wait_for("interface is back; re-attached", 0, Duration::from_secs(5))
        .expect("the agent re-attaches");
    assert_eq!(
        attached_to(lab.router(), extra).len(),
        2,
        "ingress and egress on the new interface"
    );
    let out = load::drive(&lab, vip(), lab.client_addrs(), 200);
    out.assert_no_errors("steering still works");
    let (status, _) = agent.stop().expect("agent stops");
    assert!(status.success());
    assert!(attached_to(lab.router(), IFACE).is_empty());
    assert!(attached_to(lab.router(), extra).is_empty());
}

#[test]
fn uninstall_removes_every_link_and_pin() {
    let lab = lab();
    let mut agent =
        AgentProcess::start_pinned(lab.router(), &config(&lab, ""), false).expect("agent starts");
    let dir = agent.bpffs_dir().to_path_buf();
    let uninstall = || {
        lab.router()
            .command(canary_lab::agent_binary())
            .args(["uninstall", "--bpffs-dir"])
            .arg(&dir)
            .output()
            .expect("run canary-agent uninstall")
    };
    // Never from under a running agent.
    let refused = uninstall();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && why.contains("a canary-agent is running on it")
            && why.contains("nothing was removed"),
        "uninstall while the agent runs: {why}"
    );
    assert!(dir.join("maps/CONNTRACK").exists(), "nothing removed");
    assert_eq!(
        attached_to(lab.router(), IFACE).len(),
        2,
        "nothing detached"
    );
    agent.end(Stop::Kill).expect("SIGKILL");
    assert_eq!(
        attached_to(lab.router(), IFACE).len(),
        2,
        "the killed agent's data plane keeps running"
    );
    let out = load::drive(&lab, vip(), lab.client_addrs(), 200);
    out.assert_no_errors("steered with no agent");
    assert!(dir.join("maps/CONNTRACK").exists());
    let done = uninstall();
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success() && said.contains("removed"), "{said}");
    // Detached before uninstall returned (each link by BPF_LINK_DETACH, not
    // left to the kernel's work queue that frees an unlinked pin).
    assert!(
        attached_to(lab.router(), IFACE).is_empty(),
        "uninstall detached everything before it returned: {:?}",
        attached_to(lab.router(), IFACE)
    );
    assert!(!dir.exists(), "uninstall removed {}", dir.display());
}

/// Two agents never run on one pinned data plane: the second waits for
/// the first to let go of the directory's lock (a rolling update that
/// starts the new agent while the old one is stopping), then adopts it.
#[test]
fn a_second_agent_on_the_same_pins_waits_for_the_first_to_exit() {
    let lab = lab();
    let mut first =
        AgentProcess::start_pinned(lab.router(), &config(&lab, ""), false).expect("agent starts");
    let dir = first.bpffs_dir().to_path_buf();
    let second_config = config(
        &lab,
        &format!(
            "bpffs_dir = \"{}\"\nmetrics_addr = \"127.0.0.1:9479\"",
            dir.display()
        ),
    );
    let router = lab.router();
    let (second, waited) = std::thread::scope(|s| {
        let second = s.spawn(|| {
            let start = std::time::Instant::now();
            let agent = AgentProcess::start_pinned(router, &second_config, false);
            (agent, start.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_secs(2));
        assert!(!second.is_finished(), "the second agent did not wait");
        first.end(Stop::Term).expect("the first agent stops");
        second.join().expect("second agent thread")
    });
    let second = second.expect("the second agent starts once the first is gone");
    let log = second.log();
    eprintln!("the second agent was ready {waited:?} after its start");
    assert!(
        log.iter()
            .any(|l| l.contains("another canary-agent holds the pinned data plane; waiting")),
        "it said it waits: {}",
        log.join("\n")
    );
    assert!(
        log.iter()
            .any(|l| l.contains("adopting the pinned data plane")),
        "it adopted the first one's data plane"
    );
    assert!(waited >= std::time::Duration::from_secs(2), "{waited:?}");
    load::drive(&lab, vip(), lab.client_addrs(), 100).assert_no_errors("steered by the second");
    drop(second);
    drop(first);
}

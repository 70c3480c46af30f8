//! Network-namespace integration: the real `canary-agent` binary in a router
//! namespace between a client namespace and backend namespaces running real
//! TCP servers. Every connection is a real handshake through the kernel.
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

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use canary_agent::config::default_salt;
use canary_common::cohort::{bucket, is_canary, sticky_hash};
use canary_lab::{AgentProcess, Behavior, Conn, Lab};
use canary_tests::{
    attached_to,
    load::{self, Outcome, TIMEOUT},
};

const VIP: &str = "10.96.0.10:80";
const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;
const CANARY_NAME: &str = "canary-1";
const Z999: f64 = 3.2905;

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// stable-1, stable-2, canary-1, and `n_clients` client addresses.
fn lab(n_clients: u32) -> Lab {
    let reply = Behavior::Reply;
    canary_tests::lab(
        &[
            ("stable-1", reply),
            ("stable-2", reply),
            (CANARY_NAME, reply),
        ],
        n_clients,
    )
}

/// Agent config for the lab's one service, with extra service keys.
fn config(lab: &Lab, extra: &str) -> String {
    format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\", \"{}\"]\ncanary = [\"{}\"]\n{extra}\n",
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(2),
    )
}

fn start(lab: &Lab, extra: &str) -> AgentProcess {
    AgentProcess::start(lab.router(), &config(lab, extra), false).expect("agent starts")
}

fn drive(lab: &Lab, sources: &[Ipv4Addr], n: usize) -> Outcome {
    load::drive(lab, vip(), sources, n)
}

fn assert_no_errors(out: &Outcome, what: &str) {
    out.assert_no_errors(what);
}

fn stop_and_assert_detached(lab: &Lab, agent: AgentProcess) {
    let (status, log) = agent.stop().expect("agent stops on SIGTERM");
    assert!(
        status.success(),
        "agent exit status {status}; log:\n{}",
        log.join("\n")
    );
    let left = attached_to(lab.router(), IFACE);
    assert!(
        left.is_empty(),
        "after shutdown, still attached to {IFACE}: {left:?}"
    );
}

#[test]
fn five_percent_of_20000_connections_lands_in_the_binomial_interval() {
    let lab = lab(16);
    let agent = start(&lab, "weight = \"5%\"\ncohort = \"per-connection\"");
    assert!(
        !attached_to(lab.router(), IFACE).is_empty(),
        "agent ready but nothing attached"
    );

    let n = 20_000;
    let started = Instant::now();
    let out = drive(&lab, lab.client_addrs(), n);
    let secs = started.elapsed().as_secs_f64();
    assert_no_errors(&out, "5% run");
    assert_eq!(out.total(), n as u64);
    let p = 0.05;
    let mean = n as f64 * p;
    let half = Z999 * (n as f64 * p * (1.0 - p)).sqrt();
    let canary = out.canary() as f64;
    eprintln!(
        "5% of {n}: canary {canary} ({:.3}%), 99.9% interval [{:.0}, {:.0}], {:.0} conn/s, backends {:?}",
        canary / n as f64 * 100.0,
        mean - half,
        mean + half,
        n as f64 / secs,
        out.by_backend
    );
    assert!(
        (canary - mean).abs() <= half,
        "canary connections {canary} outside the 99.9% interval {mean} ± {half:.1}: {:?}",
        out.by_backend
    );
    // Both stable backends are used, evenly (same interval, p = 1/2).
    let stable = n as f64 - canary;
    let s1 = out.by_backend.get("stable-1").copied().unwrap_or(0) as f64;
    let half_s = Z999 * (stable * 0.25).sqrt();
    assert!(
        (s1 - stable / 2.0).abs() <= half_s,
        "stable split uneven: {:?}",
        out.by_backend
    );
    stop_and_assert_detached(&lab, agent);
}

#[test]
fn zero_weight_sends_nothing_to_canary_and_full_weight_everything() {
    let lab = lab(16);
    let mut agent = start(&lab, "weight = \"0%\"\ncohort = \"per-connection\"");
    let out = drive(&lab, lab.client_addrs(), 2000);
    assert_no_errors(&out, "0%");
    assert_eq!(
        out.canary(),
        0,
        "at 0% some connections reached canary: {:?}",
        out.by_backend
    );

    agent
        .reload(&config(
            &lab,
            "weight = \"100%\"\ncohort = \"per-connection\"",
        ))
        .expect("reload to 100%");
    let out = drive(&lab, lab.client_addrs(), 2000);
    assert_no_errors(&out, "100%");
    assert_eq!(
        out.canary(),
        2000,
        "at 100% some connections stayed stable: {:?}",
        out.by_backend
    );
    stop_and_assert_detached(&lab, agent);
}

#[test]
fn sticky_clients_keep_their_cohort_and_rising_weight_only_adds_canary_clients() {
    let lab = lab(1000);
    let clients = lab.client_addrs().to_vec();
    let salt = default_salt("web");
    let mut agent = start(&lab, "weight = \"5%\"");
    let mut previous: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (weight, ppm) in [("5%", 50_000u32), ("25%", 250_000), ("50%", 500_000)] {
        if weight != "5%" {
            agent
                .reload(&config(&lab, &format!("weight = \"{weight}\"")))
                .expect("weight step");
        }
        // Three connections per client address.
        let out = drive(&lab, &clients, clients.len() * 3);
        assert_no_errors(&out, weight);
        for (src, names) in &out.by_source {
            assert_eq!(
                names.len(),
                1,
                "at {weight}, client {src} was split across {names:?}"
            );
        }
        let canary = out.canary_sources();
        // The kernel's choice is exactly the host-side bucket function's.
        let predicted: BTreeSet<Ipv4Addr> = clients
            .iter()
            .copied()
            .filter(|a| {
                is_canary(
                    bucket(sticky_hash(u32::from_ne_bytes(a.octets()), salt)),
                    ppm,
                )
            })
            .collect();
        assert_eq!(
            canary, predicted,
            "at {weight}: canary clients differ from the bucket function"
        );
        let moved_back: Vec<_> = previous.difference(&canary).collect();
        assert!(
            moved_back.is_empty(),
            "raising the weight to {weight} moved canary clients back: {moved_back:?}"
        );
        let (n, p) = (clients.len() as f64, f64::from(ppm) / 1e6);
        let half = Z999 * (n * p * (1.0 - p)).sqrt();
        eprintln!(
            "sticky {weight}: {} of {} clients canary (expected {:.0} ± {half:.0})",
            canary.len(),
            clients.len(),
            n * p
        );
        assert!(
            (canary.len() as f64 - n * p).abs() <= half,
            "at {weight}: {} canary clients, outside {:.0} ± {half:.1}",
            canary.len(),
            n * p
        );
        previous = canary;
    }
    stop_and_assert_detached(&lab, agent);
}

#[test]
fn always_and_never_canary_prefixes_override_the_weight() {
    // Client addresses are 10.201.0.1 upwards; .1–.15 are in 10.201.0.0/28.
    let lab = lab(48);
    let clients = lab.client_addrs().to_vec();
    let in_prefix =
        |a: &Ipv4Addr, base: u8| a.octets()[2] == 0 && (base..base + 16).contains(&a.octets()[3]);
    let mut agent = start(&lab, "weight = \"0%\"\nalways_canary = [\"10.201.0.0/28\"]");
    let out = drive(&lab, &clients, clients.len() * 4);
    assert_no_errors(&out, "always_canary at 0%");
    for (src, names) in &out.by_source {
        let expected = if in_prefix(src, 0) {
            CANARY_NAME
        } else {
            "stable"
        };
        assert!(
            names.iter().all(|n| n.starts_with(expected)),
            "always_canary at 0%: client {src} reached {names:?}, expected {expected}"
        );
    }

    agent
        .reload(&config(
            &lab,
            "weight = \"100%\"\nnever_canary = [\"10.201.0.16/28\"]",
        ))
        .expect("reload");
    let out = drive(&lab, &clients, clients.len() * 4);
    assert_no_errors(&out, "never_canary at 100%");
    for (src, names) in &out.by_source {
        let expected = if in_prefix(src, 16) {
            "stable"
        } else {
            CANARY_NAME
        };
        assert!(
            names.iter().all(|n| n.starts_with(expected)),
            "never_canary at 100%: client {src} reached {names:?}, expected {expected}"
        );
    }
    stop_and_assert_detached(&lab, agent);
}

/// One long-lived connection's history.
struct LongLived {
    first: String,
    pings: u64,
    moved: Vec<String>,
    errors: Vec<String>,
}

#[test]
fn long_lived_connections_survive_weight_changes_on_their_first_backend() {
    const CONNS: usize = 50;
    const THREADS: usize = 5;
    let lab = lab(u32::try_from(CONNS).unwrap());
    let mut agent = start(&lab, "weight = \"5%\"\ncohort = \"per-connection\"");
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<LongLived>>> = Arc::default();
    let clients = lab.client_addrs().to_vec();

    // Each thread opens its connections at 5 %, then pings each every 10 ms.
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, results) = (Arc::clone(&stop), Arc::clone(&results));
            let mine: Vec<Ipv4Addr> = clients.iter().copied().skip(t).step_by(THREADS).collect();
            lab.client().spawn(move || {
                let mut conns: Vec<(Conn, LongLived)> = mine
                    .iter()
                    .map(|src| {
                        let mut c =
                            Conn::open(*src, vip(), TIMEOUT).expect("open long-lived connection");
                        let first = c.ping().expect("first ping");
                        (
                            c,
                            LongLived {
                                first,
                                pings: 1,
                                moved: vec![],
                                errors: vec![],
                            },
                        )
                    })
                    .collect();
                let deadline = Instant::now() + Duration::from_mins(1);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for (c, h) in &mut conns {
                        match c.ping() {
                            Ok(name) if name == h.first => h.pings += 1,
                            Ok(name) => h.moved.push(name),
                            Err(e) => h.errors.push(e.to_string()),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                results
                    .lock()
                    .unwrap()
                    .extend(conns.into_iter().map(|(_, h)| h));
            })
        })
        .collect();

    // Give every thread time to open its connections before moving weights.
    std::thread::sleep(Duration::from_secs(1));
    let probe_sources: Vec<Ipv4Addr> = clients.clone();
    for (weight, expect_canary) in [("50%", None), ("100%", Some(true)), ("0%", Some(false))] {
        agent
            .reload(&config(
                &lab,
                &format!("weight = \"{weight}\"\ncohort = \"per-connection\""),
            ))
            .expect("weight change");
        // New connections follow the new weight (proof the change applied).
        let out = drive(&lab, &probe_sources, 100);
        assert_no_errors(&out, weight);
        match expect_canary {
            Some(true) => assert_eq!(
                out.canary(),
                100,
                "new connections at {weight}: {:?}",
                out.by_backend
            ),
            Some(false) => assert_eq!(
                out.canary(),
                0,
                "new connections at {weight}: {:?}",
                out.by_backend
            ),
            None => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .expect("pinger thread")
            .expect("enter client namespace");
    }

    let results = results.lock().unwrap();
    assert_eq!(results.len(), CONNS, "every long-lived connection reports");
    let broken: Vec<_> = results
        .iter()
        .filter(|h| !h.errors.is_empty())
        .map(|h| &h.errors[0])
        .collect();
    let moved: Vec<_> = results
        .iter()
        .filter(|h| !h.moved.is_empty())
        .map(|h| (&h.first, &h.moved[0]))
        .collect();
    let pings: u64 = results.iter().map(|h| h.pings).sum();
    let canary = results.iter().filter(|h| h.first == CANARY_NAME).count();
    eprintln!(
        "long-lived: {CONNS} connections ({canary} canary at 5%), {pings} pings across 5% → 50% → 100% → 0%, \
         {} broken, {} moved",
        broken.len(),
        moved.len()
    );
    assert!(
        broken.is_empty(),
        "{} long-lived connections broke: {broken:?}",
        broken.len()
    );
    assert!(
        moved.is_empty(),
        "{} long-lived connections changed backend: {moved:?}",
        moved.len()
    );
    let min_pings = results.iter().map(|h| h.pings).min().unwrap_or(0);
    assert!(
        min_pings >= 100,
        "a connection was pinged only {min_pings} times: the test did not exercise it"
    );
    stop_and_assert_detached(&lab, agent);
}

#[test]
fn an_invalid_config_is_rejected_and_nothing_is_attached() {
    let lab = lab(1);
    for (extra, message) in [
        (
            "weight = \"150%\"",
            "service \"web\": weight = \"150%\": more than 100%",
        ),
        ("weight = \"5%\"\nbogus = 1", "unknown field `bogus`"),
    ] {
        let (status, log) =
            AgentProcess::run_to_exit(lab.router(), &config(&lab, extra)).expect("agent runs");
        assert!(
            !status.success(),
            "agent accepted an invalid config ({extra})"
        );
        let log = log.join("\n");
        assert!(
            log.contains(message),
            "error for {extra:?} should contain {message:?}; log:\n{log}"
        );
        assert!(
            log.contains("nothing was attached"),
            "log should say nothing was attached:\n{log}"
        );
        let left = attached_to(lab.router(), IFACE);
        assert!(
            left.is_empty(),
            "after a rejected config, attached: {left:?}"
        );
    }
    // A missing interface: named in the error, nothing attached anywhere.
    let text = config(&lab, "").replace(
        &format!("[\"{IFACE}\"]"),
        &format!("[\"{IFACE}\", \"nope0\"]"),
    );
    let (status, log) = AgentProcess::run_to_exit(lab.router(), &text).expect("agent runs");
    assert!(!status.success());
    let log = log.join("\n");
    assert!(
        log.contains("interfaces = \"nope0\": no such network interface"),
        "log:\n{log}"
    );
    assert!(attached_to(lab.router(), IFACE).is_empty());
}

#[test]
fn a_rejected_reload_keeps_the_running_config() {
    let lab = lab(8);
    let mut agent = start(&lab, "weight = \"100%\"\ncohort = \"per-connection\"");
    for bad in [
        config(
            &lab,
            "weight = \"0%\"\ncohort = \"per-connection\"\nnever_canary = [\"10.201.0.1/8\"]",
        ),
        config(&lab, "weight = \"5%\"").replace("[[service]]", "[[services]]"),
        "not toml at all [".to_string(),
    ] {
        let err = agent
            .reload(&bad)
            .expect_err("a bad reload must be rejected");
        assert!(err.to_string().contains("reload rejected"), "{err:#}");
        let out = drive(&lab, lab.client_addrs(), 200);
        assert_no_errors(&out, "after a rejected reload");
        assert_eq!(
            out.canary(),
            200,
            "the old 100% config must stay in force: {:?}",
            out.by_backend
        );
    }
    assert_eq!(
        attached_to(lab.router(), IFACE).len(),
        2,
        "still attached (ingress + egress)"
    );
    stop_and_assert_detached(&lab, agent);
}

/// Client packets at XDP, replies at TC egress.
fn hooks(lab: &Lab) -> (bool, bool, bool) {
    let found = attached_to(lab.router(), IFACE);
    let has = |prefix: &str| found.iter().any(|l| l.starts_with(prefix));
    (has("xdp:"), has("tcx Ingress"), has("tcx Egress"))
}

#[test]
fn xdp_mode_steers_like_tc_and_reloads_switch_modes_without_breaking_connections() {
    let lab = lab(32);
    let xdp = |lab: &Lab| {
        config(lab, "weight = \"50%\"\ncohort = \"per-connection\"").replace(
            &format!("interfaces = [\"{IFACE}\"]"),
            &format!("interfaces = [{{ name = \"{IFACE}\", mode = \"xdp\" }}]"),
        )
    };
    let mut agent = AgentProcess::start(lab.router(), &xdp(&lab), false).expect("agent starts");
    assert_eq!(
        hooks(&lab),
        (true, false, true),
        "xdp mode: XDP and TC egress"
    );

    // 50 % over 2000 connections: 99.9 % interval 1000 ± 74.
    let out = drive(&lab, lab.client_addrs(), 2000);
    assert_no_errors(&out, "xdp mode");
    let canary = out.canary();
    assert!(
        (926..=1074).contains(&canary),
        "xdp mode at 50%: {canary} of 2000 to canary, outside [926, 1074]"
    );

    // Long-lived connections across both switches keep their backend.
    let mut conns: Vec<(Conn, String)> = lab
        .client()
        .spawn(|| {
            (0..20)
                .map(|_| {
                    let mut c = Conn::open(Lab::CLIENT_IP, vip(), TIMEOUT).expect("open");
                    let first = c.ping().expect("first ping");
                    (c, first)
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
        .unwrap();
    let tc = config(&lab, "weight = \"50%\"\ncohort = \"per-connection\"");
    for (mode, text, expected) in [
        ("tc", tc, (false, true, true)),
        ("xdp", xdp(&lab), (true, false, true)),
    ] {
        agent.reload(&text).expect("reload switches the mode");
        assert_eq!(hooks(&lab), expected, "after switching to {mode}");
        conns = lab
            .client()
            .spawn(move || {
                for (c, first) in &mut conns {
                    let now = c
                        .ping()
                        .expect("a long-lived connection broke on the mode switch");
                    assert_eq!(
                        &now, first,
                        "a long-lived connection moved on the mode switch"
                    );
                }
                conns
            })
            .join()
            .unwrap()
            .unwrap();
        assert_no_errors(&drive(&lab, lab.client_addrs(), 300), mode);
    }
    drop(conns);
    stop_and_assert_detached(&lab, agent);
}

const VIP6: &str = "[fd00:96::10]:80";

/// Replies by backend name, and the errors.
type Replies = (std::collections::BTreeMap<String, u64>, Vec<String>);

/// `n` one-request connections to `vip` from `sources` (IPv6 or IPv4),
/// eight threads in the client namespace: replies by backend name, and
/// the errors.
fn drive_any(
    lab: &Lab,
    vip: std::net::SocketAddr,
    sources: &[std::net::IpAddr],
    n: usize,
) -> Replies {
    const THREADS: usize = 8;
    let replies: Arc<Mutex<Replies>> = Arc::default();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let replies = Arc::clone(&replies);
            let sources = sources.to_vec();
            lab.client().spawn(move || {
                for k in (t..n).step_by(THREADS) {
                    let src = sources[k % sources.len()];
                    let reply = canary_lab::request_once(src, vip, TIMEOUT);
                    let mut r = replies.lock().unwrap();
                    match reply {
                        Ok(name) => *r.0.entry(name).or_default() += 1,
                        Err(e) => r.1.push(format!("{src}: {e}")),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .expect("client thread")
            .expect("enter client namespace");
    }
    let r = replies.lock().unwrap();
    (r.0.clone(), r.1.clone())
}

/// The IPv6 service over the lab's IPv6 backends, with extra keys.
fn config6(lab: &Lab, extra: &str) -> String {
    format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\n\
         stable = [\"{}\", \"{}\"]\ncanary = [\"{}\"]\n{extra}\n",
        lab.backend_addr6(0),
        lab.backend_addr6(1),
        lab.backend_addr6(2),
    )
}

#[test]
fn ipv6_clients_split_in_the_binomial_interval_and_long_lived_ones_never_move() {
    let reply = Behavior::Reply;
    let lab = canary_tests::lab_dual_stack(
        &[
            ("stable-1", reply),
            ("stable-2", reply),
            (CANARY_NAME, reply),
        ],
        0,
        16,
    );
    let per_conn = "cohort = \"per-connection\"";
    let mut agent = AgentProcess::start(
        lab.router(),
        &config6(&lab, &format!("weight = \"20%\"\n{per_conn}")),
        false,
    )
    .expect("agent starts with an IPv6 service");
    let vip6: std::net::SocketAddr = VIP6.parse().unwrap();
    let sources: Vec<std::net::IpAddr> = lab.client_addrs6().iter().map(|a| (*a).into()).collect();

    // Long-lived IPv6 connections, opened at 20 %.
    let mut conns: Vec<(Conn, String)> = lab
        .client()
        .spawn({
            let sources = sources.clone();
            move || {
                sources
                    .iter()
                    .map(|src| {
                        let mut c = Conn::open(*src, vip6, TIMEOUT).expect("open over IPv6");
                        let first = c.ping().expect("first ping over IPv6");
                        (c, first)
                    })
                    .collect::<Vec<_>>()
            }
        })
        .join()
        .expect("client thread")
        .expect("enter client namespace");

    let n = 2000;
    let (by_backend, errors) = drive_any(&lab, vip6, &sources, n);
    assert!(
        errors.is_empty(),
        "{} IPv6 requests failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let total: u64 = by_backend.values().sum();
    assert_eq!(
        total, n as u64,
        "every IPv6 request answered: {by_backend:?}"
    );
    let p = 0.2;
    let (mean, half) = (n as f64 * p, Z999 * (n as f64 * p * (1.0 - p)).sqrt());
    let canary = by_backend.get(CANARY_NAME).copied().unwrap_or(0) as f64;
    eprintln!(
        "IPv6 20% of {n}: canary {canary}, 99.9% interval [{:.0}, {:.0}], backends {by_backend:?}",
        mean - half,
        mean + half
    );
    assert!(
        (canary - mean).abs() <= half,
        "IPv6 canary count {canary} outside {mean} ± {half:.0}: {by_backend:?}"
    );

    // Weight changes move no long-lived connection.
    let mut pings = 0;
    for weight in ["100%", "0%", "50%"] {
        agent
            .reload(&config6(
                &lab,
                &format!("weight = \"{weight}\"\n{per_conn}"),
            ))
            .expect("weight change");
        conns = lab
            .client()
            .spawn(move || {
                for (c, first) in &mut conns {
                    for _ in 0..10 {
                        let now = c.ping().expect("a long-lived IPv6 connection broke");
                        assert_eq!(
                            &now, first,
                            "a long-lived IPv6 connection moved at {weight}"
                        );
                    }
                }
                conns
            })
            .join()
            .expect("client thread")
            .expect("enter client namespace");
        pings += 10 * conns.len();
    }
    eprintln!(
        "IPv6 long-lived: {} connections, {pings} pings across 100% → 0% → 50%, 0 broken, 0 moved",
        conns.len()
    );
    assert_eq!(conns.len(), 16);
    drop(conns);
    stop_and_assert_detached(&lab, agent);
}

//! UDP through the real `canary-agent` in a lab: real sockets in the client
//! namespace, real UDP servers in the backends, the router steering them.
//! Every test shows from the agent's own metrics that its load went
//! through the UDP path.
//!
//! Statistical bounds are two-sided 99.9 % binomial intervals
//! (z = 3.2905), normal approximation, as in netns.rs.
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
    reason = "the values compared are counts: exact in f64"
)]

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Lab, UdpConn};
use canary_tests::{
    load::{self, TIMEOUT},
    metrics::{Exposition, scrape},
};

const VIP: &str = "10.96.0.53:53";
const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;
const Z999: f64 = 3.2905;
const CANARY: usize = 2;

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
            ("canary-1", reply),
        ],
        n_clients,
    )
}

/// Agent config with the lab's UDP service `dns`, with extra keys.
fn config(lab: &Lab, extra: &str) -> String {
    format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"dns\"\nvip = \"{VIP}\"\n\
         protocol = \"udp\"\nstable = [\"{}\", \"{}\"]\ncanary = [\"{}\"]\n\
         cohort = \"per-connection\"\n{extra}\n",
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(CANARY),
    )
}

fn start(lab: &Lab, extra: &str) -> AgentProcess {
    AgentProcess::start(lab.router(), &config(lab, extra), false).expect("agent starts")
}

/// `name` of service `dns`, cohort `cohort`, with extra labels.
fn metric(m: &Exposition, name: &str, cohort: &str, extra: &[(&str, &str)]) -> f64 {
    let mut want = vec![("service", "dns"), ("cohort", cohort)];
    want.extend_from_slice(extra);
    m.sum(name, &want)
}

#[test]
fn five_percent_of_10000_udp_flows_land_in_the_binomial_interval_and_in_the_metrics() {
    let lab = lab(16);
    let agent = start(&lab, "weight = \"5%\"");
    let n = 10_000;
    let started = Instant::now();
    let out = load::drive_udp(&lab, vip(), lab.client_addrs(), n);
    let secs = started.elapsed().as_secs_f64();
    out.assert_no_errors("5% UDP run");
    assert_eq!(out.total(), n as u64);
    let p = 0.05;
    let mean = n as f64 * p;
    let half = Z999 * (n as f64 * p * (1.0 - p)).sqrt();
    let canary = out.canary() as f64;
    eprintln!(
        "UDP 5% of {n} flows: canary {canary} ({:.3}%), 99.9% interval [{:.0}, {:.0}], {:.0} flows/s, backends {:?}",
        canary / n as f64 * 100.0,
        mean - half,
        mean + half,
        n as f64 / secs,
        out.by_backend
    );
    assert!(
        (canary - mean).abs() <= half,
        "canary flows {canary} outside the 99.9% interval {mean} ± {half:.1}: {:?}",
        out.by_backend
    );

    // Every datagram went through the UDP path, in its cohort: one request
    // and one reply each.
    let m = scrape(lab.router());
    for (cohort, count) in [("canary", canary), ("stable", n as f64 - canary)] {
        for direction in ["from_client", "from_backend"] {
            assert_eq!(
                metric(
                    &m,
                    "canary_packets_total",
                    cohort,
                    &[("direction", direction)]
                ),
                count,
                "{cohort} datagrams {direction}"
            );
        }
        // A reused source port within the idle timeout is the same flow:
        // flows are at most the requests, and nearly all of them.
        let flows = metric(&m, "canary_connections_total", cohort, &[]);
        assert!(
            flows <= count && flows >= count * 0.97,
            "{cohort}: {flows} flows for {count} requests"
        );
        assert!(
            metric(&m, "canary_first_byte_seconds_count", cohort, &[]) >= flows * 0.97,
            "{cohort}: response times recorded"
        );
    }
    assert_eq!(
        metric(&m, "canary_connections_failed_total", "canary", &[]),
        0.0
    );
    let (status, _) = agent.stop().expect("agent stops");
    assert!(status.success());
}

/// One long-lived flow's history.
struct LongLived {
    first: String,
    pings: u64,
    moved: Vec<String>,
    errors: Vec<String>,
}

#[test]
fn long_lived_udp_flows_keep_their_backend_across_weight_changes() {
    const FLOWS: usize = 40;
    const THREADS: usize = 4;
    let lab = lab(u32::try_from(FLOWS).unwrap());
    let mut agent = start(&lab, "weight = \"5%\"");
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<LongLived>>> = Arc::default();
    let clients = lab.client_addrs().to_vec();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, results) = (Arc::clone(&stop), Arc::clone(&results));
            let mine: Vec<Ipv4Addr> = clients.iter().copied().skip(t).step_by(THREADS).collect();
            lab.client().spawn(move || {
                let mut flows: Vec<(UdpConn, LongLived)> = mine
                    .iter()
                    .map(|src| {
                        let mut c = UdpConn::open(*src, vip(), TIMEOUT).expect("open a flow");
                        let first = c.ping().expect("first ping");
                        let h = LongLived {
                            first,
                            pings: 1,
                            moved: vec![],
                            errors: vec![],
                        };
                        (c, h)
                    })
                    .collect();
                let deadline = Instant::now() + Duration::from_mins(1);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for (c, h) in &mut flows {
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
                    .extend(flows.into_iter().map(|(_, h)| h));
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(1));
    for (weight, expect_canary) in [("50%", None), ("100%", Some(100)), ("0%", Some(0))] {
        agent
            .reload(&config(&lab, &format!("weight = \"{weight}\"")))
            .expect("weight change");
        // New flows follow the new weight (proof the change applied).
        let out = load::drive_udp(&lab, vip(), lab.client_addrs(), 100);
        out.assert_no_errors(weight);
        if let Some(expected) = expect_canary {
            assert_eq!(
                out.canary(),
                expected,
                "new flows at {weight}: {:?}",
                out.by_backend
            );
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
    assert_eq!(results.len(), FLOWS, "every long-lived flow reports");
    let broken: Vec<_> = results.iter().filter_map(|h| h.errors.first()).collect();
    let moved: Vec<_> = results
        .iter()
        .filter_map(|h| h.moved.first().map(|m| (&h.first, m)))
        .collect();
    let pings: u64 = results.iter().map(|h| h.pings).sum();
    let canary = results
        .iter()
        .filter(|h| h.first.starts_with("canary"))
        .count();
    eprintln!(
        "long-lived UDP: {FLOWS} flows ({canary} canary at 5%), {pings} pings across 5% → 50% → 100% → 0%, \
         {} broken, {} moved",
        broken.len(),
        moved.len()
    );
    assert!(
        broken.is_empty(),
        "{} flows broke: {broken:?}",
        broken.len()
    );
    assert!(
        moved.is_empty(),
        "{} flows changed backend: {moved:?}",
        moved.len()
    );
    let min_pings = results.iter().map(|h| h.pings).min().unwrap_or(0);
    assert!(min_pings >= 100, "a flow was pinged only {min_pings} times");
    // The pings went through the data plane: every one in a cohort's count.
    let m = scrape(lab.router());
    let through: f64 = ["stable", "canary"]
        .iter()
        .map(|c| {
            metric(
                &m,
                "canary_packets_total",
                c,
                &[("direction", "from_backend")],
            )
        })
        .sum();
    assert!(
        through >= pings as f64,
        "{through} replies counted, {pings} pings answered"
    );
    agent.stop().expect("agent stops");
}

/// Flows of one DNS-like request each (a fresh socket; a resend on the
/// same socket after `wait`, twice in all), `n` from the lab's client
/// addresses, four threads: (answering backend per flow or the error).
fn dns_like_flows(lab: &Lab, n: usize, wait: Duration) -> Vec<Result<String, ErrorKind>> {
    let sources = lab.client_addrs().to_vec();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let sources = sources.clone();
            lab.client().spawn(move || {
                (t..n)
                    .step_by(4)
                    .map(|i| {
                        UdpConn::open(sources[i % sources.len()], vip(), wait)
                            .and_then(|mut c| c.ping_retrying(2))
                            .map_err(|e| e.kind())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| {
            h.join()
                .expect("client thread")
                .expect("enter client namespace")
        })
        .collect()
}

/// What the breaker tests check once the canary has failed: it tripped in
/// the kernel (the service has no rollout plan, so no judge could act), the
/// agent reported it, and no new flow reaches the canary any more.
fn assert_cut_off(lab: &Lab, agent: &AgentProcess, reason: &str) {
    let m = scrape(lab.router());
    assert_eq!(
        m.sum(
            "canary_rollbacks_total",
            &[("service", "dns"), ("reason", "breaker")]
        ),
        1.0,
        "the breaker's trip was reported"
    );
    let failures = metric(
        &m,
        "canary_failed_connections_total",
        "canary",
        &[("reason", reason)],
    );
    assert!(
        failures >= 3.0,
        "{failures} canary failures ({reason}) before the trip"
    );
    let after = load::drive_udp(lab, vip(), lab.client_addrs(), 300);
    after.assert_no_errors("after the trip");
    assert_eq!(
        after.canary(),
        0,
        "new flows still reach the canary: {:?}",
        after.by_backend
    );
    assert!(
        agent
            .log()
            .iter()
            .any(|l| l.contains("rolled-back") && l.contains("breaker")),
        "no rollback line in the agent's log"
    );
}

#[test]
fn a_udp_canary_that_stops_answering_is_cut_off_by_the_kernel_breaker() {
    let lab = lab(32);
    let agent = start(&lab, "weight = \"50%\"\nudp_response_timeout = \"150ms\"");
    let warm = load::drive_udp(&lab, vip(), lab.client_addrs(), 200);
    warm.assert_no_errors("before");
    assert!(
        warm.canary() > 0,
        "the canary answered before: {:?}",
        warm.by_backend
    );

    // The canary process hangs: it reads datagrams and answers none (no
    // ICMP either). Clients resend once after 300 ms, like a DNS stub; the
    // kernel sees the resend past the 150 ms response timeout.
    lab.silence_udp_backend(CANARY);
    let results = dns_like_flows(&lab, 60, Duration::from_millis(300));
    let failed = results.iter().filter(|r| r.is_err()).count();
    let answered_by_canary = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|n| n.starts_with("canary")))
        .count();
    eprintln!(
        "silent UDP canary: {} flows, {failed} unanswered before the cut-off",
        results.len()
    );
    assert!(
        failed >= 3,
        "the silent canary failed {failed} flows: was it steered to?"
    );
    assert!(
        failed <= 12,
        "{failed} flows failed: the breaker acted late"
    );
    assert_eq!(answered_by_canary, 0, "a silent canary answered");
    assert_cut_off(&lab, &agent, "timeout");
    agent.stop().expect("agent stops");
}

#[test]
fn a_stopped_udp_canary_refuses_through_the_nat_and_is_cut_off_by_the_kernel_breaker() {
    let mut lab = lab(32);
    let agent = start(&lab, "weight = \"50%\"");
    let warm = load::drive_udp(&lab, vip(), lab.client_addrs(), 200);
    warm.assert_no_errors("before");
    assert!(
        warm.canary() > 0,
        "the canary answered before: {:?}",
        warm.by_backend
    );

    // The canary process dies: its kernel answers with ICMP port
    // unreachable. The client's connected socket reports it (a refusal)
    // only if the error was rewritten to speak of the VIP it sent to.
    lab.stop_backend(CANARY);
    let results = dns_like_flows(&lab, 60, Duration::from_millis(500));
    let refused = results
        .iter()
        .filter(|r| **r == Err(ErrorKind::ConnectionRefused))
        .count();
    let other: Vec<_> = results
        .iter()
        .filter(|r| r.is_err() && **r != Err(ErrorKind::ConnectionRefused))
        .collect();
    eprintln!(
        "stopped UDP canary: {} flows, {refused} refused (ICMP through the NAT) before the cut-off",
        results.len()
    );
    assert!(
        refused >= 3,
        "{refused} refusals reached the clients: {other:?}"
    );
    assert!(other.is_empty(), "flows failed otherwise: {other:?}");
    assert!(
        refused <= 12,
        "{refused} flows refused: the breaker acted late"
    );
    assert_cut_off(&lab, &agent, "refused");
    let m = scrape(lab.router());
    assert!(
        m.sum(
            "canary_dataplane_events_total",
            &[("event", "icmp_error_natted")]
        ) >= refused as f64,
        "every refusal the clients saw was an ICMP error the data plane rewrote"
    );
    agent.stop().expect("agent stops");
}

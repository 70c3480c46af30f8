//! Hostile or unlucky packets, end to end: the real agent in a lab, and
//! segments no local socket sent, injected from the client namespace
//! through a raw socket (a spoofer, a duplicating network, stray packets).
//! None of them may roll a healthy canary back, and none may break or move
//! an established connection.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::float_cmp,
    reason = "the values compared are counts, or shares of all or none (0 or 1): exact in f64"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use canary_agent::config::default_salt;
use canary_common::cohort::{bucket, is_canary, sticky_hash};
use canary_lab::{AgentProcess, Behavior, Conn, Lab};
use canary_tests::{
    load::{self, TIMEOUT},
    metrics::{Exposition, scrape},
    packet::{ACK, RST, RawSender, SYN, Tcp},
    scenarios::status,
};

const VIP: &str = "10.96.0.10:80";
const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;

fn vip() -> SocketAddrV4 {
    VIP.parse().expect("VIP")
}

/// A sequence of pseudo-random numbers, seeded from the clock (xorshift):
/// sequence numbers a spoofer would guess.
struct Random(u64);

impl Random {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "any 64 bits of the clock make a seed"
    )]
    fn new() -> Random {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Random(nanos | 1)
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "xorshift output: the middle 32 bits of the state"
    )]
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}

/// Sends `segments` from the client namespace through a raw socket, one
/// every `gap`.
fn inject(lab: &Lab, segments: Vec<Vec<Tcp>>, gap: Duration) {
    lab.client()
        .spawn(move || {
            let raw = RawSender::new().expect("raw socket in the client namespace");
            for burst in segments {
                // A burst goes out back to back: identical copies.
                for seg in &burst {
                    raw.send(seg).expect("raw send");
                }
                std::thread::sleep(gap);
            }
        })
        .join()
        .expect("injector thread")
        .expect("enter the client namespace");
}

/// `canary_dataplane_events_total{event}`.
fn event(m: &Exposition, name: &str) -> f64 {
    m.sum("canary_dataplane_events_total", &[("event", name)])
}

/// Waits up to 5 s for `done` to hold on a fresh scrape; returns the last.
fn scrape_until(lab: &Lab, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(lab.router());
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn duplicate_syns_and_bare_acks_from_canary_clients_leave_a_healthy_canary_alone() {
    const PAIRS: u16 = 60;
    const ACKS: u16 = 60;
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        200,
    );
    // Sticky at 20 %: the clients whose address hashes into the canary
    // share, as the data plane computes it.
    let salt = default_salt("web");
    let canary_clients: Vec<Ipv4Addr> = lab
        .client_addrs()
        .iter()
        .copied()
        .filter(|a| {
            is_canary(
                bucket(sticky_hash(u32::from_ne_bytes(a.octets()), salt)),
                200_000,
            )
        })
        .collect();
    assert!(
        canary_clients.len() >= 10,
        "only {} of 200 clients in the canary share",
        canary_clients.len()
    );
    let config = format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\nhandshake_timeout = \"500ms\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\n\
         weight = \"20%\"\ncohort = \"sticky\"\n",
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");

    let mut random = Random::new();
    let client = |i: u16| canary_clients[usize::from(i) % canary_clients.len()];
    // Pairs of identical SYNs from ports no socket owns. From the client's
    // own addresses, its kernel resets the SYN-ACK; in this lab that round
    // trip completes before the copy is sent, so the copy opens a new
    // connection. From addresses in the canary share that no host here
    // owns (a spoofer, or a SYN-ACK lost on the way back), the SYN-ACK
    // dies and the copy meets its flow: a duplicate.
    let spoofed: Vec<Ipv4Addr> = (1..=254u8)
        .map(|h| Ipv4Addr::new(10, 201, 4, h))
        .filter(|a| {
            is_canary(
                bucket(sticky_hash(u32::from_ne_bytes(a.octets()), salt)),
                200_000,
            )
        })
        .collect();
    assert!(
        !spoofed.is_empty(),
        "no spoofed address in the canary share"
    );
    let mut pairs: Vec<Vec<Tcp>> = Vec::new();
    for i in 0..PAIRS {
        for src in [client(i), spoofed[usize::from(i) % spoofed.len()]] {
            let syn = Tcp {
                seq: random.next(),
                ..Tcp::new(SocketAddrV4::new(src, 20_000 + i), vip(), SYN)
            };
            pairs.push(vec![syn.clone(), syn]);
        }
    }
    inject(&lab, pairs, Duration::from_millis(2));
    // Bare ACKs from fresh ports: the backend has no such connection.
    let acks: Vec<Vec<Tcp>> = (0..ACKS)
        .map(|i| {
            vec![Tcp {
                seq: random.next(),
                ack: random.next(),
                ..Tcp::new(SocketAddrV4::new(client(i), 30_000 + i), vip(), ACK)
            }]
        })
        .collect();
    inject(&lab, acks, Duration::from_millis(2));

    // Every backend RST to a stray ACK seen, and past the handshake
    // timeout (500 ms) plus a sweep, so a timeout would have shown.
    let m = scrape_until(&lab, |m| event(m, "reopen_reset") >= f64::from(ACKS));
    std::thread::sleep(Duration::from_millis(1500));
    let m_late = scrape(lab.router());
    let canary = [("service", "web"), ("cohort", "canary")];
    let (dups, retransmits, misses, resets) = (
        event(&m, "syn_duplicate"),
        event(&m, "syn_retransmit"),
        event(&m, "ct_miss"),
        event(&m, "reopen_reset"),
    );
    let connections = m.sum("canary_connections_total", &canary);
    let failed = m_late.sum("canary_failed_connections_total", &canary);
    eprintln!(
        "hostile: {PAIRS} duplicate-SYN pairs from {} canary clients and {PAIRS} from {} spoofed canary \
         addresses, {ACKS} bare ACKs: \
         {connections} canary connections, {retransmits} SYNs on tracked flows ({dups} duplicates), \
         {misses} conntrack misses, {resets} backend RSTs to re-resolved flows, {failed} canary failures",
        canary_clients.len(),
        spoofed.len()
    );
    // The packets reached the path they attack.
    assert!(
        connections >= f64::from(2 * PAIRS),
        "the first SYN of each pair is a canary connection: {connections}"
    );
    assert!(
        dups >= f64::from(PAIRS),
        "the spoofed pairs' second SYNs are duplicates: {dups}"
    );
    assert!(
        misses >= f64::from(ACKS),
        "bare ACKs missed conntrack: {misses}"
    );
    assert_eq!(
        resets,
        f64::from(ACKS),
        "the canary reset every stray ACK's re-resolved flow"
    );
    // And did nothing to the canary's record.
    assert_eq!(
        failed,
        0.0,
        "canary failures by reason: refused {}, syn_retry {}, timeout {}",
        m_late.sum(
            "canary_failed_connections_total",
            &[("cohort", "canary"), ("reason", "refused")]
        ),
        m_late.sum(
            "canary_failed_connections_total",
            &[("cohort", "canary"), ("reason", "syn_retry")]
        ),
        m_late.sum(
            "canary_failed_connections_total",
            &[("cohort", "canary"), ("reason", "timeout")]
        ),
    );
    assert_eq!(
        m_late.sum(
            "canary_rollbacks_total",
            &[("service", "web"), ("reason", "breaker")]
        ),
        0.0,
        "the breaker tripped"
    );
    let state = status(&agent.control_socket(), "web")["state"].clone();
    assert_eq!(state, "idle", "rollout state after the hostile packets");
    assert!(
        std::fs::read_dir(agent.dir().join("state")).map_or(0, std::iter::Iterator::count) == 0,
        "a rollout state was persisted"
    );

    // The canary still gets its share: the canary clients reach it.
    let out = load::drive(&lab, vip(), &canary_clients, 100);
    out.assert_no_errors("after the hostile packets");
    assert_eq!(
        out.canary(),
        100,
        "canary clients after the hostile packets: {:?}",
        out.by_backend
    );
    let (status, _) = agent.stop().expect("agent stops");
    assert!(status.success());
}

/// What one connection's pings got after the forged RST: answers from its
/// first backend, answers from another, and errors.
#[derive(Debug, Default)]
struct Pings {
    ok: u64,
    moved: Vec<String>,
    errors: Vec<String>,
}

#[test]
fn forged_rsts_then_a_weight_change_break_no_connection() {
    const CONNS: usize = 20;
    let lab = canary_tests::lab(
        &[
            ("stable-1", Behavior::Reply),
            ("stable-2", Behavior::Reply),
            ("canary-1", Behavior::Reply),
        ],
        u32::try_from(CONNS).unwrap(),
    );
    let config = format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\", \"{}\"]\ncanary = [\"{}\"]\nweight = \"50%\"\ncohort = \"per-connection\"\n",
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(2),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    let sources = lab.client_addrs().to_vec();

    // 20 long-lived connections, each with its first backend and port.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    let pinger = lab.client().spawn(move || {
        let mut conns: Vec<(Conn, String, SocketAddrV4)> = sources
            .iter()
            .map(|src| {
                let mut c = Conn::open(*src, vip(), TIMEOUT).expect("open a connection");
                let first = c.ping().expect("first ping");
                let local = match c.local_addr().expect("local address") {
                    std::net::SocketAddr::V4(a) => a,
                    std::net::SocketAddr::V6(other) => panic!("IPv4 expected, got {other}"),
                };
                (c, first, local)
            })
            .collect();
        report_tx
            .send(
                conns
                    .iter()
                    .map(|(_, first, local)| (first.clone(), *local))
                    .collect::<Vec<_>>(),
            )
            .expect("report connections");
        // Wait until the RSTs and the weight change are in.
        rx.recv().expect("go");
        let mut pings: Vec<Pings> = (0..conns.len()).map(|_| Pings::default()).collect();
        for _ in 0..20 {
            for ((c, first, _), p) in conns.iter_mut().zip(&mut pings) {
                match c.ping() {
                    Ok(name) if name == *first => p.ok += 1,
                    Ok(name) => p.moved.push(name),
                    Err(e) => p.errors.push(e.to_string()),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let firsts: Vec<String> = conns.iter().map(|(_, f, _)| f.clone()).collect();
        // Reported before the connections close.
        (firsts, pings, conns)
    });
    let opened = report_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("connections opened");
    let on_canary = opened
        .iter()
        .filter(|(f, _)| f.starts_with("canary"))
        .count();

    // One forged RST per connection: the right 4-tuple, a random sequence
    // number. The backends drop them (RFC 5961).
    let mut random = Random::new();
    let rsts: Vec<Vec<Tcp>> = opened
        .iter()
        .map(|(_, local)| {
            vec![Tcp {
                seq: random.next(),
                ..Tcp::new(*local, vip(), RST)
            }]
        })
        .collect();
    inject(&lab, rsts, Duration::ZERO);
    let after_rst = scrape_until(&lab, |m| event(m, "rst_closed") >= CONNS as f64);
    let closed_by_rst = event(&after_rst, "rst_closed");

    // The weight changes before the connections' next packets.
    canary_tests::canaryctl_ok(&agent.control_socket(), &["set-weight", "web", "100%"]);
    tx.send(()).expect("pinger waits");
    let (firsts, pings, conns) = pinger
        .join()
        .expect("pinger thread")
        .expect("enter the client namespace");
    let m = scrape(lab.router());
    let ignored = event(&m, "rst_ignored");
    let active = m.sum("canary_active_connections", &[("service", "web")]);
    drop(conns);
    // The weight did change: every new connection goes to canary.
    let fresh = load::drive(&lab, vip(), lab.client_addrs(), 20);
    fresh.assert_no_errors("new connections at 100%");
    assert_eq!(
        fresh.canary(),
        20,
        "new connections at 100%: {:?}",
        fresh.by_backend
    );

    let broken: Vec<_> = pings.iter().filter(|p| !p.errors.is_empty()).collect();
    let moved: Vec<_> = firsts
        .iter()
        .zip(&pings)
        .filter(|(_, p)| !p.moved.is_empty())
        .map(|(f, p)| (f, &p.moved[0]))
        .collect();
    let ok: u64 = pings.iter().map(|p| p.ok).sum();
    eprintln!(
        "forged RSTs: {CONNS} connections ({on_canary} canary at 50%), {closed_by_rst} closed by the RSTs, \
         weight 100%, {ok} pings after: {} broken, {} moved; {ignored} RSTs shown ignored, {active} active",
        broken.len(),
        moved.len()
    );
    assert_eq!(
        closed_by_rst, CONNS as f64,
        "every forged RST reached its flow"
    );
    assert!(
        on_canary > 0 && on_canary < CONNS,
        "both cohorts must be at stake, {on_canary} of {CONNS} on canary"
    );
    assert!(broken.is_empty(), "broken connections: {broken:?}");
    assert!(moved.is_empty(), "moved connections: {moved:?}");
    assert_eq!(ok, 20 * CONNS as u64, "every ping answered");
    assert_eq!(
        ignored, CONNS as f64,
        "each connection's backend answered after its forged RST"
    );
    assert_eq!(
        active, CONNS as f64,
        "the revived connections count as active again"
    );
    let (status, _) = agent.stop().expect("agent stops");
    assert!(status.success());
}

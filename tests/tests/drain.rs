//! The drain deadline after a rollback: canary connections still open
//! when it passes are reset on both sides (the backend's socket by a RST
//! the data plane makes of the client's next segment, the client by the
//! backend's answer to the one after), counted and logged; stable
//! connections and a service without a deadline are left alone.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Conn, Lab, Netns, UdpConn};
use canary_tests::{
    canaryctl_ok,
    cgroup::{HeldClient, Reply, TestCgroup},
    metrics::scrape,
};

const VIP: &str = "10.96.0.10:80";

/// Established TCP connections to port 8080 in `ns` (the backend's side).
fn established(ns: &Netns) -> usize {
    let out = ns
        .command("ss")
        .args(["-Htn", "state", "established", "( sport = :8080 )"])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn canary_connections_past_the_drain_deadline_are_reset_on_both_sides() {
    tcp_drain("tc");
}

/// The same at XDP, whose ingress shares the TC program's code but
/// rewrites the segment through its own context.
#[test]
fn canary_connections_past_the_drain_deadline_are_reset_on_both_sides_at_xdp() {
    tcp_drain("xdp");
}

fn tcp_drain(mode: &str) {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        40,
    );
    let config = format!(
        "[agent]\ninterfaces = [{{ name = \"{}\", mode = \"{mode}\" }}]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{}\"]\n\
         canary = [\"{}\"]\nweight = \"50%\"\ncohort = \"per-connection\"\ndrain_deadline = \"2s\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    let attached = canary_tests::attached_to(lab.router(), Lab::ROUTER_CLIENT_IFACE);
    assert_eq!(
        attached.iter().any(|a| a.starts_with("xdp:")),
        mode == "xdp",
        "{mode}: the ingress program runs in that mode: {attached:?}"
    );
    let vip: SocketAddrV4 = VIP.parse().expect("VIP");
    let addrs = lab.client_addrs().to_vec();
    let outcome = lab.client().spawn(move || {
        let mut conns: Vec<(Conn, String)> = addrs
            .iter()
            .map(|&src| {
                let mut c = Conn::open(src, vip, Duration::from_secs(3)).expect("connect");
                let name = c.ping().expect("first ping");
                (c, name)
            })
            .collect();
        let canary = conns.iter().filter(|(_, n)| n == "canary-1").count();
        // Held open across the rollback, pinged after the deadline.
        std::thread::sleep(Duration::from_secs(5));
        let mut reset = 0;
        let mut alive = 0;
        for (c, name) in &mut conns {
            match c.ping() {
                Ok(now) => {
                    assert_eq!(&now, name, "a connection moved");
                    alive += 1;
                }
                Err(e) => {
                    assert_eq!(name, "canary-1", "a stable connection broke: {e}");
                    assert!(
                        matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                        ),
                        "a canary connection ended otherwise: {e}"
                    );
                    reset += 1;
                }
            }
        }
        (canary, reset, alive)
    });
    // Meanwhile: the canary is rolled back; the backend still holds its
    // connections until the deadline.
    std::thread::sleep(Duration::from_millis(1500));
    let before = established(lab.backend_ns(1));
    let t = Instant::now();
    canaryctl_ok(&agent.control_socket(), &["rollback", "web"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        established(lab.backend_ns(1)),
        before,
        "nothing reset before the deadline"
    );
    let explain = canaryctl_ok(&agent.control_socket(), &["explain", "web"]);
    assert!(
        explain.contains("drain: canary connections still open are reset in")
            && explain.contains("drain_deadline 2s"),
        "explain tells when the drain comes:\n{explain}"
    );
    let (canary, reset, alive) = outcome.join().expect("client").expect("client namespace");
    eprintln!(
        "{mode}: {canary} of 40 on canary; {reset} reset, {alive} alive; backend side: {before} established before, {} after ({:.1} s after the rollback)",
        established(lab.backend_ns(1)),
        t.elapsed().as_secs_f64()
    );
    assert!(
        canary >= 5,
        "too few canary connections to say anything: {canary}"
    );
    assert_eq!(
        reset, canary,
        "every canary connection was reset on the client's side"
    );
    assert_eq!(alive, 40 - canary, "every stable connection lives");
    assert_eq!(
        before, canary,
        "the canary backend held every canary connection"
    );
    assert_eq!(
        established(lab.backend_ns(1)),
        0,
        "the backend's sides were reset"
    );
    let m = scrape(lab.router());
    let resets = m.sum("canary_dataplane_events_total", &[("event", "drain_reset")]);
    assert!(resets >= canary as f64, "drain_reset {resets} < {canary}");
    let line = agent
        .log()
        .into_iter()
        .find(|l| l.contains("drain deadline passed"))
        .expect("the drain is logged");
    assert!(line.contains(&format!("connections={canary}")), "{line}");
    let explain = canaryctl_ok(&agent.control_socket(), &["explain", "web"]);
    assert!(
        explain.contains("drain: deadline passed")
            && explain.contains(&format!("{canary} TCP connections marked for reset")),
        "explain tells what the drain did:\n{explain}"
    );
    agent.stop().expect("agent stops");
}

/// UDP flows at TC: past the deadline the agent ends the rolled-back
/// service's canary flows (the sweep program counts each as
/// `drain_reset`), so each client's next datagram is a new flow, which the
/// weight in force sends to stable; stable flows carry on untouched.
#[test]
fn canary_udp_flows_past_the_drain_deadline_end_and_their_next_datagrams_go_to_stable() {
    const UDP_VIP: &str = "10.96.0.53:53";
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        40,
    );
    let config = format!(
        "[agent]\ninterfaces = [\"{}\"]\n\n[[service]]\nname = \"dns\"\nvip = \"{UDP_VIP}\"\n\
         protocol = \"udp\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"50%\"\n\
         cohort = \"per-connection\"\ndrain_deadline = \"2s\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    let vip: SocketAddrV4 = UDP_VIP.parse().expect("VIP");
    let addrs = lab.client_addrs().to_vec();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let outcome = lab.client().spawn(move || {
        let mut flows: Vec<(UdpConn, String)> = addrs
            .iter()
            .map(|&src| {
                let mut f = UdpConn::open(src, vip, Duration::from_secs(2)).expect("open");
                let name = f.ping_retrying(3).expect("first reply");
                (f, name)
            })
            .collect();
        // Once rolled back, before the deadline: every flow keeps its
        // backend.
        rx.recv().expect("rolled back");
        let kept = flows
            .iter_mut()
            .map(|(f, name)| f.ping_retrying(3).is_ok_and(|n| n == *name))
            .filter(|&same| same)
            .count();
        // Past the deadline (and the agent's once-a-second check).
        std::thread::sleep(Duration::from_secs(3));
        let after: Vec<(String, String)> = flows
            .iter_mut()
            .map(|(f, name)| {
                let now = f.ping_retrying(3).unwrap_or_else(|e| format!("error: {e}"));
                (name.clone(), now)
            })
            .collect();
        (kept, after)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let drained_before =
        scrape(lab.router()).sum("canary_dataplane_events_total", &[("event", "drain_reset")]);
    canaryctl_ok(&agent.control_socket(), &["rollback", "dns"]);
    tx.send(()).expect("tell the client");
    let (kept, after) = outcome.join().expect("client").expect("client namespace");
    let canary = after
        .iter()
        .filter(|(before, _)| before == "canary-1")
        .count();
    let moved = after
        .iter()
        .filter(|(before, now)| before == "canary-1" && now == "stable-1")
        .count();
    let stable_kept = after
        .iter()
        .filter(|(before, now)| before == "stable-1" && now == "stable-1")
        .count();
    eprintln!(
        "UDP: {canary} of 40 flows on canary; {kept} kept their backend before the deadline; after it {moved} went to stable, {stable_kept} stable flows carried on; {after:?}"
    );
    assert!(
        canary >= 5,
        "too few canary flows to say anything: {canary}"
    );
    assert_eq!(kept, 40, "nothing changed before the deadline");
    assert_eq!(moved, canary, "every canary flow ended and went to stable");
    assert_eq!(stable_kept, 40 - canary, "every stable flow carried on");
    let drained = scrape(lab.router())
        .sum("canary_dataplane_events_total", &[("event", "drain_reset")])
        - drained_before;
    assert!(
        (drained - canary as f64).abs() < 0.5,
        "each canary flow ended counts once: drain_reset +{drained}, {canary} flows"
    );
    let line = agent
        .log()
        .into_iter()
        .find(|l| l.contains("drain deadline passed"))
        .expect("the drain is logged");
    assert!(line.contains(&format!("udp_flows={canary}")), "{line}");
    agent.stop().expect("agent stops");
}

/// Local clients steered at the socket (`socket_lb`): past the deadline
/// the agent aborts the canary TCP connections and connected UDP sockets
/// (found through `sock_diag` in the client's network namespace and
/// recognised by their cookie; the canary backend's side is reset), and
/// marks the flows of unconnected UDP sockets, whose next datagrams go to
/// stable. Stable sockets carry on.
#[test]
fn socket_steered_canary_connections_and_flows_end_past_the_drain_deadline() {
    const UDP_VIP: &str = "10.96.0.53:53";
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        1,
    );
    let cg = TestCgroup::create();
    let service = |name: &str, vip: &str, extra: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\n\
             weight = \"50%\"\ncohort = \"per-connection\"\ndrain_deadline = \"2s\"\n{extra}\n",
            lab.backend_addr(0),
            lab.backend_addr(1),
        )
    };
    let config = format!(
        "[agent]\ninterfaces = [\"{}\"]\nsocket_lb = true\ncgroup = \"{}\"\n\n{}{}",
        Lab::ROUTER_CLIENT_IFACE,
        cg.path().display(),
        service("web", VIP, ""),
        service("dns", UDP_VIP, "protocol = \"udp\""),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    let ns = lab.client().name().to_string();
    let (tcp, tcp_first) = HeldClient::start(&cg, &ns, &["--connect", VIP, "--count", "30"]);
    let (udp, udp_first) =
        HeldClient::start(&cg, &ns, &["--udp", "--connect", UDP_VIP, "--count", "30"]);
    let (conn_udp, conn_udp_first) = HeldClient::start(
        &cg,
        &ns,
        &[
            "--udp",
            "--connected",
            "--connect",
            UDP_VIP,
            "--count",
            "30",
        ],
    );
    // Dialled to the canary backend's own address: not steered, so not
    // the drain's business.
    let canary_addr = lab.backend_addr(1).to_string();
    let (direct, direct_first) =
        HeldClient::start(&cg, &ns, &["--connect", &canary_addr, "--count", "5"]);
    let on_canary = |first: &[Reply]| {
        assert!(
            first.iter().all(|r| r.result.is_ok()),
            "every socket answered: {first:?}"
        );
        first
            .iter()
            .filter(|r| r.result.as_deref() == Ok("canary-1"))
            .count()
    };
    let (tcp_canary, udp_canary, conn_udp_canary) = (
        on_canary(&tcp_first),
        on_canary(&udp_first),
        on_canary(&conn_udp_first),
    );
    assert_eq!(on_canary(&direct_first), 5);
    assert_eq!(
        established(lab.backend_ns(1)),
        tcp_canary + 5,
        "the canary backend holds the canary connections and the direct ones"
    );
    let drained_before =
        scrape(lab.router()).sum("canary_dataplane_events_total", &[("event", "drain_reset")]);
    canaryctl_ok(&agent.control_socket(), &["rollback", "web"]);
    canaryctl_ok(&agent.control_socket(), &["rollback", "dns"]);
    // The deadline (2 s) and the agent's once-a-second check.
    std::thread::sleep(Duration::from_secs(4));
    let backend_after = established(lab.backend_ns(1));
    let (tcp_again, udp_again, conn_udp_again) =
        (tcp.ping_again(), udp.ping_again(), conn_udp.ping_again());
    let direct_again = direct.ping_again();
    eprintln!(
        "socket LB: on canary {tcp_canary}/30 TCP, {udp_canary}/30 unconnected UDP, {conn_udp_canary}/30 connected UDP; \
         canary backend's TCP connections after the deadline: {backend_after}\n\
         TCP after: {tcp_again:?}\nUDP after: {udp_again:?}\nconnected UDP after: {conn_udp_again:?}"
    );
    for (what, n) in [
        ("TCP", tcp_canary),
        ("unconnected UDP", udp_canary),
        ("connected UDP", conn_udp_canary),
    ] {
        assert!(
            n >= 3,
            "too few {what} sockets on canary to say anything: {n}"
        );
    }
    // Aborted sockets fail; stable ones carry on with their backend.
    for (what, first, again) in [
        ("TCP", &tcp_first, &tcp_again),
        ("connected UDP", &conn_udp_first, &conn_udp_again),
    ] {
        for (a, b) in first.iter().zip(again) {
            if a.result.as_deref() == Ok("canary-1") {
                assert!(b.result.is_err(), "{what}: a canary socket lives on: {b:?}");
            } else {
                assert_eq!(b.result, a.result, "{what}: a stable socket changed");
            }
        }
    }
    // Unconnected UDP: canary flows start again, on stable.
    for (a, b) in udp_first.iter().zip(&udp_again) {
        assert_eq!(
            b.result.as_deref(),
            Ok("stable-1"),
            "every unconnected flow is on stable now (was {:?})",
            a.result
        );
    }
    assert_eq!(
        backend_after, 5,
        "the canary backend's sides of the steered connections were reset, the direct ones kept"
    );
    assert_eq!(
        direct_again, direct_first,
        "connections dialled to the backend's own address live on"
    );
    let drained = scrape(lab.router())
        .sum("canary_dataplane_events_total", &[("event", "drain_reset")])
        - drained_before;
    assert!(
        (drained - udp_canary as f64).abs() < 0.5,
        "each unconnected canary flow ended counts once: drain_reset +{drained}, {udp_canary} flows"
    );
    let log = agent.log();
    let line = |service: &str| {
        log.iter()
            .find(|l| {
                l.contains("drain deadline passed") && l.contains(&format!("service={service}"))
            })
            .unwrap_or_else(|| panic!("the drain of {service} is logged"))
            .clone()
    };
    let web = line("web");
    assert!(
        web.contains(&format!("sockets_aborted={tcp_canary}")),
        "{web}"
    );
    let dns = line("dns");
    assert!(
        dns.contains(&format!("sockets_aborted={conn_udp_canary}"))
            && dns.contains(&format!("socket_udp_flows={udp_canary}")),
        "{dns}"
    );
    agent.stop().expect("agent stops");
}

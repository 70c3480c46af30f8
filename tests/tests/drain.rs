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

use canary_lab::{AgentProcess, Behavior, Conn, Lab, Netns};
use canary_tests::{canaryctl_ok, metrics::scrape};

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
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        40,
    );
    let config = format!(
        "[agent]\ninterfaces = [\"{}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{}\"]\n\
         canary = [\"{}\"]\nweight = \"50%\"\ncohort = \"per-connection\"\ndrain_deadline = \"2s\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
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
    let (canary, reset, alive) = outcome.join().expect("client").expect("client namespace");
    eprintln!(
        "{canary} of 40 on canary; {reset} reset, {alive} alive; backend side: {before} established before, {} after ({:.1} s after the rollback)",
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
    agent.stop().expect("agent stops");
}

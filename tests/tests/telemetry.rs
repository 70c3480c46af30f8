//! Per-cohort signals end to end: real backends that are slow, reset or
//! refuse, the real agent measuring them in the kernel, and its `/metrics`
//! read as Prometheus reads it (and by a real Prometheus server).
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::float_cmp,
    reason = "the values compared are counts, or shares of all or none (0 or 1): exact in f64"
)]

use std::{
    io::ErrorKind,
    net::SocketAddrV4,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Conn, Lab};
use canary_tests::{
    lab,
    load::{TIMEOUT, drive, drive_paced},
    metrics::{Exposition, http_get, http_get_accept, scrape},
    prometheus::Prometheus,
};

const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;

/// One `[[service]]` block.
fn service(
    name: &str,
    vip: &str,
    stable: SocketAddrV4,
    canary: SocketAddrV4,
    extra: &str,
) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nstable = [\"{stable}\"]\ncanary = [\"{canary}\"]\n\
         cohort = \"per-connection\"\n{extra}\n"
    )
}

fn agent(lab: &Lab, agent_extra: &str, services: &str) -> AgentProcess {
    let config = format!("[agent]\ninterfaces = [\"{IFACE}\"]\n{agent_extra}\n\n{services}");
    AgentProcess::start(lab.router(), &config, false).expect("agent starts")
}

/// The VIP of [`web`].
const WEB_VIP: &str = "10.96.0.10:80";

/// An agent steering one service, `web` at [`WEB_VIP`], to the lab's
/// backend 0 (stable) and 1 (canary), with `service_extra` in its block.
fn web(lab: &Lab, agent_extra: &str, service_extra: &str) -> AgentProcess {
    let services = service(
        "web",
        WEB_VIP,
        lab.backend_addr(0),
        lab.backend_addr(1),
        service_extra,
    );
    agent(lab, agent_extra, &services)
}

fn labels<'a>(service: &'a str, cohort: &'a str) -> [(&'a str, &'a str); 2] {
    [("service", service), ("cohort", cohort)]
}

#[test]
fn a_canary_slow_to_first_byte_shows_in_its_cohort_only() {
    let lab = lab(
        &[
            ("stable-1", Behavior::Reply),
            (
                "canary-1",
                Behavior::FirstByteDelay(Duration::from_millis(50)),
            ),
        ],
        16,
    );
    let vip = WEB_VIP;
    let agent = web(&lab, "", "weight = \"50%\"");
    let out = drive(&lab, vip.parse().unwrap(), lab.client_addrs(), 400);
    out.assert_no_errors("50 ms canary");
    assert!(
        out.canary() > 100 && out.total() - out.canary() > 100,
        "both cohorts need samples: {:?}",
        out.by_backend
    );

    let m = scrape(lab.router());
    let q = |cohort, q| {
        m.quantile("canary_first_byte_seconds", &labels("web", cohort), q)
            .unwrap()
    };
    let (c50, c99, s50, s99) = (
        q("canary", 0.5),
        q("canary", 0.99),
        q("stable", 0.5),
        q("stable", 0.99),
    );
    let hs = |cohort, q| {
        m.quantile("canary_handshake_seconds", &labels("web", cohort), q)
            .unwrap()
    };
    eprintln!(
        "first byte from /metrics: canary p50 {:.2} ms p99 {:.2} ms; stable p50 {:.3} ms p99 {:.3} ms; \
         handshake p50 canary {:.3} ms stable {:.3} ms",
        c50 * 1e3,
        c99 * 1e3,
        s50 * 1e3,
        s99 * 1e3,
        hs("canary", 0.5) * 1e3,
        hs("stable", 0.5) * 1e3
    );
    assert!(
        c50 >= 0.045,
        "canary first-byte p50 {c50} s, expected >= 45 ms"
    );
    assert!(
        s50 < 0.010,
        "stable first-byte p50 {s50} s, expected < 10 ms"
    );
    // Every connection was timed once, in its own cohort.
    let count = |c| m.sum("canary_first_byte_seconds_count", &labels("web", c));
    assert_eq!(
        count("canary"),
        out.canary() as f64,
        "canary first-byte samples"
    );
    assert_eq!(
        count("stable"),
        (out.total() - out.canary()) as f64,
        "stable first-byte samples"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn backend_resets_and_refusals_count_for_the_canary_only() {
    // The breaker would cut these canaries off after 3 failures; this test
    // is about counting, so it is off (tests/breaker.rs covers it).
    let lab = lab(
        &[
            ("stable-1", Behavior::Reply),
            ("canary-rst", Behavior::Reset),
            ("canary-off", Behavior::Closed),
        ],
        16,
    );
    let (resets_vip, refused_vip) = ("10.96.0.20:80", "10.96.0.21:80");
    let services = service(
        "resets",
        resets_vip,
        lab.backend_addr(0),
        lab.backend_addr(1),
        "weight = \"30%\"\n[service.breaker]\nenabled = false",
    ) + &service(
        "refusals",
        refused_vip,
        lab.backend_addr(0),
        lab.backend_addr(2),
        "weight = \"30%\"\n[service.breaker]\nenabled = false",
    );
    let agent = agent(&lab, "", &services);

    let reset = drive(&lab, resets_vip.parse().unwrap(), lab.client_addrs(), 300);
    let refused = drive(&lab, refused_vip.parse().unwrap(), lab.client_addrs(), 300);
    let resets_seen =
        reset.errors_of(ErrorKind::ConnectionReset) + reset.errors_of(ErrorKind::UnexpectedEof);
    let refusals_seen = refused.errors_of(ErrorKind::ConnectionRefused);
    assert_eq!(
        reset.errors.len() as u64,
        resets_seen,
        "only resets expected: {:?}",
        &reset.errors[..3.min(reset.errors.len())]
    );
    assert_eq!(
        refused.errors.len() as u64,
        refusals_seen,
        "only refusals expected"
    );
    assert!(
        resets_seen > 30 && refusals_seen > 30,
        "too few failures to judge: {resets_seen}, {refusals_seen}"
    );

    let m = scrape(lab.router());
    let get = |svc, cohort, name, extra: (&str, &str)| {
        m.sum(name, &[("service", svc), ("cohort", cohort), extra])
    };
    let from_backend = ("direction", "from_backend");
    let refused_reason = ("reason", "refused");
    assert_eq!(
        get("resets", "canary", "canary_resets_total", from_backend),
        resets_seen as f64,
        "canary resets"
    );
    assert_eq!(
        get("resets", "stable", "canary_resets_total", from_backend),
        0.0,
        "stable resets"
    );
    assert_eq!(
        get(
            "resets",
            "canary",
            "canary_failed_connections_total",
            refused_reason
        ),
        0.0,
        "a reset is not a refusal"
    );
    assert_eq!(
        get(
            "refusals",
            "canary",
            "canary_failed_connections_total",
            refused_reason
        ),
        refusals_seen as f64,
        "canary refusals"
    );
    assert_eq!(
        get(
            "refusals",
            "stable",
            "canary_failed_connections_total",
            refused_reason
        ),
        0.0,
        "stable refusals"
    );
    assert_eq!(
        get("refusals", "canary", "canary_resets_total", from_backend),
        0.0,
        "a refusal is not a reset"
    );
    // Resets and refusals are both failed connections, each once.
    assert_eq!(
        m.sum(
            "canary_connections_failed_total",
            &[("service", "resets"), ("cohort", "canary")]
        ),
        resets_seen as f64,
        "reset connections failed"
    );
    assert_eq!(
        m.sum(
            "canary_connections_failed_total",
            &[("service", "refusals"), ("cohort", "canary")]
        ),
        refusals_seen as f64,
        "refused connections failed"
    );
    // Every failed connection is closed: nothing stays active.
    for svc in ["resets", "refusals"] {
        assert_eq!(
            m.sum("canary_active_connections", &[("service", svc)]),
            0.0,
            "{svc}: active connections left"
        );
    }
    agent.stop().expect("agent stops");
}

#[test]
fn bytes_are_counted_exactly_and_active_connections_return_to_zero() {
    let lab = lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        8,
    );
    let vip = WEB_VIP;
    let agent = web(&lab, "", "weight = \"50%\"");
    // 20 long-lived connections, 7 pings each, left open for a scrape.
    let sources = lab.client_addrs().to_vec();
    let (conns, replies) = lab
        .client()
        .spawn(move || {
            let mut conns = Vec::new();
            let mut replies: Vec<String> = Vec::new();
            for i in 0..20 {
                let mut c = Conn::open(
                    sources[i % sources.len()],
                    vip.parse::<std::net::SocketAddr>().unwrap(),
                    TIMEOUT,
                )
                .expect("open");
                for _ in 0..7 {
                    replies.push(c.ping().expect("ping"));
                }
                conns.push(c);
            }
            (conns, replies)
        })
        .join()
        .unwrap()
        .unwrap();
    let m = scrape(lab.router());
    assert_eq!(
        m.sum("canary_active_connections", &[("service", "web")]),
        20.0,
        "20 connections open"
    );
    drop(conns);
    // Plus 100 one-request connections.
    let out = drive(&lab, vip.parse().unwrap(), lab.client_addrs(), 100);
    out.assert_no_errors("one-shot requests");

    let sent = f64::from(20 * 7 + 100) * b"hello\n".len() as f64;
    let received: usize = replies.iter().map(|r| r.len() + 1).sum::<usize>()
        + out
            .by_backend
            .iter()
            .map(|(name, n)| (name.len() + 1) * usize::try_from(*n).unwrap())
            .sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = scrape(lab.router());
        if m.sum("canary_active_connections", &[("service", "web")]) == 0.0
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let bytes = |dir| {
        m.sum(
            "canary_bytes_total",
            &[("service", "web"), ("direction", dir)],
        )
    };
    eprintln!(
        "bytes: from_client {} (sent {sent}), from_backend {} (received {received})",
        bytes("from_client"),
        bytes("from_backend")
    );
    assert_eq!(bytes("from_client"), sent, "bytes from clients");
    assert_eq!(
        bytes("from_backend"),
        received as f64,
        "bytes from backends"
    );
    assert_eq!(
        m.sum("canary_active_connections", &[("service", "web")]),
        0.0,
        "active connections after all closed"
    );
    assert_eq!(
        m.sum("canary_connections_total", &[("service", "web")]),
        120.0,
        "connections"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn handshakes_that_never_complete_count_as_timeouts() {
    let lab = lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        4,
    );
    let vip = WEB_VIP;
    let agent = web(&lab, "handshake_timeout = \"500ms\"", "weight = \"100%\"");
    // The canary's link goes down: SYNs are forwarded and never answered.
    lab.backend_ns(1)
        .ip(&["link", "set", "eth0", "down"])
        .expect("link down");
    let out = canary_tests::load::drive(&lab, vip.parse().unwrap(), &lab.client_addrs()[..1], 4);
    assert_eq!(
        out.errors.len(),
        4,
        "connections to a dead canary must fail: {:?}",
        out.by_backend
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = scrape(lab.router());
        let timeouts = m.sum(
            "canary_failed_connections_total",
            &[
                ("service", "web"),
                ("cohort", "canary"),
                ("reason", "timeout"),
            ],
        );
        if timeouts >= 4.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let labels = [("service", "web"), ("cohort", "canary")];
    assert_eq!(
        m.sum(
            "canary_failed_connections_total",
            &[labels[0], labels[1], ("reason", "timeout")]
        ),
        4.0,
        "timeouts"
    );
    assert!(
        m.sum(
            "canary_failed_connections_total",
            &[labels[0], labels[1], ("reason", "syn_retry")]
        ) >= 4.0,
        "each connection retried its SYN"
    );
    assert_eq!(
        m.sum("canary_connections_failed_total", &labels),
        4.0,
        "retried and timed out, each connection failed once"
    );
    assert_eq!(
        m.sum("canary_active_connections", &labels),
        0.0,
        "timed-out connections are not active"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn the_exposition_passes_promtool_and_prometheus_answers_the_canary_rate() {
    let lab = lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        8,
    );
    let vip = WEB_VIP;
    let agent = web(&lab, "", "weight = \"100%\"");
    drive(&lab, vip.parse().unwrap(), lab.client_addrs(), 20).assert_no_errors("warm-up");

    // promtool lints the exposition as Prometheus will parse it.
    let (status, body) = http_get(lab.router(), "127.0.0.1:9477".parse().unwrap(), "/metrics");
    assert!(status.contains("200"));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by `cargo xtask test`)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // Scrapers that ask for OpenMetrics (Prometheus does) get it.
    let (head, om) = http_get_accept(
        lab.router(),
        "127.0.0.1:9477".parse().unwrap(),
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(
        om.contains("# TYPE canary_connections counter\n"),
        "OpenMetrics counter family"
    );

    // A real server scrapes every second while clients open 40 conn/s.
    let prom = Prometheus::start(lab.router(), "127.0.0.1:9477");
    let rate = 40.0;
    let out = drive_paced(
        &lab,
        vip.parse().unwrap(),
        lab.client_addrs(),
        480,
        Some(rate),
    );
    out.assert_no_errors("paced load");
    let measured = prom
        .query("sum(rate(canary_connections_total{service=\"web\",cohort=\"canary\"}[5s]))")
        .expect("a value for the canary connection rate");
    eprintln!("Prometheus: canary connection rate {measured:.2}/s (driven at {rate}/s)");
    if (measured - rate).abs() > rate * 0.15 {
        let m = scrape(lab.router());
        for l in m.text.lines().filter(|l| {
            l.contains("rollback")
                || l.contains("failed_conn")
                || l.contains("resets_total")
                || l.contains("rollout_state")
                || l.contains("connections_total")
        }) {
            eprintln!("  {l}");
        }
        for l in agent.log() {
            eprintln!("  agent | {l}");
        }
    }
    assert!(
        (measured - rate).abs() <= rate * 0.15,
        "canary connection rate {measured}/s, expected {rate} ± 15%"
    );
    let stable =
        prom.query("sum(rate(canary_connections_total{service=\"web\",cohort=\"stable\"}[5s]))");
    assert_eq!(stable, Some(0.0), "no stable connections at 100%");
    drop(prom);
    agent.stop().expect("agent stops");
}

#[test]
fn scraping_1000_services_is_complete_and_timed() {
    let lab = lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        4,
    );
    let services: String = (0..1000)
        .map(|i| {
            let vip = format!("10.96.{}.{}:80", i / 250, i % 250 + 1);
            service(
                &format!("svc{i}"),
                &vip,
                lab.backend_addr(0),
                lab.backend_addr(1),
                "weight = \"5%\"",
            )
        })
        .collect();
    let agent = agent(&lab, "", &services);
    // Traffic through a tenth of them, so histograms are exported too.
    for i in (0..1000).step_by(10) {
        let vip: SocketAddrV4 = format!("10.96.{}.{}:80", i / 250, i % 250 + 1)
            .parse()
            .unwrap();
        drive(&lab, vip, lab.client_addrs(), 8).assert_no_errors("traffic");
    }
    // Timed: the request as Prometheus makes it, not the parse below.
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (status, text) = http_get(lab.router(), "127.0.0.1:9477".parse().unwrap(), "/metrics");
        times.push(t.elapsed());
        assert!(status.contains("200"), "{status}");
        body = text;
    }
    times.sort();
    let m = Exposition::parse(&body);
    let services = m.matching("canary_weight_ratio", &[]).count();
    eprintln!(
        "scrape with 1000 services: median {:.1} ms (min {:.1}, max {:.1}), {} lines, {} bytes",
        times[2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[4].as_secs_f64() * 1e3,
        m.samples.len(),
        m.text.len()
    );
    // Prometheus gives a scrape 10 s by default (scrape_timeout); a scrape
    // of 1000 services must fit well inside that even on a small (2-core)
    // machine running a debug build, so each one gets half of it.
    let bound = Duration::from_secs(5);
    assert!(
        times[4] <= bound,
        "slowest of 5 scrapes of 1000 services took {:?}, bound {bound:?} (all: {times:?})",
        times[4]
    );
    assert_eq!(services, 1000, "every service is exported");
    assert_eq!(
        m.sum("canary_connections_total", &[]),
        800.0,
        "every connection is counted once"
    );
    agent.stop().expect("agent stops");
}

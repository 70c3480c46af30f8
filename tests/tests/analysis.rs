//! The team's own PromQL checks against a real Prometheus (Debian's
//! package) scraping a real exporter of application metrics, and shadow
//! mode, end to end through the agent.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::unwrap_used,
    reason = "the helpers here are test code too: a failed step panics, which fails the test"
)]

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::{
    app_metrics::AppMetrics,
    load::{CANARY_PREFIX, drive},
    prometheus::{ADDR as PROMETHEUS, Prometheus},
    scenarios::status,
};
use serde_json::Value;

const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;
/// The application metrics exporter, in the router's namespace.
const APP: &str = "127.0.0.1:9478";

const CHECK: &str = "[[service.rollout.checks]]\nname = \"http-5xx\"\n\
    query = 'sum(rate(http_requests_total{version=\"{{cohort}}\",code=\"500\"}[{{window}}])) / \
    sum(rate(http_requests_total{version=\"{{cohort}}\"}[{{window}}]))'\nmax_increase = 0.05\n";

fn vip() -> SocketAddrV4 {
    "10.96.0.10:80".parse().unwrap()
}

fn lab(canary: Behavior) -> Lab {
    canary_tests::lab(&[("stable-1", Behavior::Reply), ("canary-1", canary)], 32)
}

/// One service with `rollout` (its `[service.rollout]` and below), and
/// `[analysis]` pointing at the lab's Prometheus.
fn config(lab: &Lab, service_extra: &str, rollout: &str, max_inconclusive: u32) -> String {
    format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[analysis]\nprometheus = \"http://{PROMETHEUS}\"\n\
         query_timeout = \"500ms\"\nmin_window = \"3s\"\nmax_inconclusive = {max_inconclusive}\n\n\
         [[service]]\nname = \"web\"\nvip = \"{}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\n\
         cohort = \"per-connection\"\n{service_extra}\n{rollout}",
        vip(),
        lab.backend_addr(0),
        lab.backend_addr(1),
    )
}

/// Drives `n` connections and counts their answers as HTTP requests: the
/// canary's answer with code `canary_code`, stable's with 200.
fn traffic(lab: &Lab, app: &AppMetrics, n: usize, canary_code: u16) {
    let out = drive(lab, vip(), lab.client_addrs(), n);
    out.assert_no_errors("traffic");
    for (backend, count) in &out.by_backend {
        if backend.starts_with(CANARY_PREFIX) {
            app.record("canary", canary_code, *count);
        } else {
            app.record("stable", 200, *count);
        }
    }
}

/// Polls `status` while `tick` runs, until `done` or `timeout`.
fn until(
    sock: &std::path::Path,
    timeout: Duration,
    mut tick: impl FnMut(),
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let s = status(sock, "web");
        if done(&s) || start.elapsed() > timeout {
            return (s, start.elapsed());
        }
        tick();
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn checks(s: &Value) -> String {
    s["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[test]
fn a_canary_answering_500s_is_rolled_back_by_the_check_with_both_values() {
    let lab = lab(Behavior::Reply);
    let app = AppMetrics::start(lab.router(), APP.parse().unwrap());
    let prom = Prometheus::start_scraping(lab.router(), &[APP]);
    let rollout = format!(
        "[service.rollout]\ninterval = \"500ms\"\nsteps = [{{ weight = \"50%\", hold = \"1h\" }}]\n{CHECK}"
    );
    let agent = AgentProcess::start(lab.router(), &config(&lab, "", &rollout, 3), false)
        .expect("agent starts");
    let sock = agent.control_socket();
    let start = Instant::now();
    let (s, _) = until(
        &sock,
        Duration::from_secs(40),
        || traffic(&lab, &app, 100, 500),
        |s| s["state"] == "rolled-back",
    );
    let verdict = s["last_verdict"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "rolled back {:.1} s after the start: {verdict}; Prometheus saw canary 500s = {:?}",
        start.elapsed().as_secs_f64(),
        prom.query("sum(http_requests_total{version=\"canary\",code=\"500\"})")
    );
    assert_eq!(s["state"], "rolled-back", "the check must roll back: {s}");
    assert!(
        verdict.starts_with("rolled back by the checks: check \"http-5xx\": canary 1 vs stable 0 (max_increase 0.05)"),
        "the verdict names the check and both values: {verdict}"
    );
    assert!(app.count("canary", 500) > 0, "the canary answered");
    // Rolled back: no new connection reaches the canary.
    let out = drive(&lab, vip(), lab.client_addrs(), 200);
    assert_eq!(out.canary(), 0, "after the rollback");
    agent.stop().expect("agent stops");
}

#[test]
fn a_healthy_canary_passes_its_checks_and_the_plan_advances() {
    let lab = lab(Behavior::Reply);
    let app = AppMetrics::start(lab.router(), APP.parse().unwrap());
    let _prom = Prometheus::start_scraping(lab.router(), &[APP]);
    let rollout = format!(
        "[service.rollout]\ninterval = \"500ms\"\nsteps = [{{ weight = \"20%\", hold = \"3s\" }}, \
         {{ weight = \"50%\", hold = \"3s\" }}]\n[service.rollout.judge]\nmin_samples = 10\n{CHECK}"
    );
    let mut agent = AgentProcess::start(lab.router(), &config(&lab, "", &rollout, 100), false)
        .expect("agent starts");
    let sock = agent.control_socket();
    let mut passes = Vec::new();
    let (s, took) = until(
        &sock,
        Duration::from_mins(1),
        || traffic(&lab, &app, 100, 200),
        |s| s["state"] == "promoted" || s["state"] == "rolled-back" || s["state"] == "paused",
    );
    assert_eq!(s["state"], "promoted", "a healthy canary is promoted: {s}");
    for n in 0..2 {
        passes.push(
            agent
                .wait_for("passed", n, Duration::from_secs(1))
                .expect("each step passed"),
        );
    }
    eprintln!(
        "promoted in {:.1} s; {}",
        took.as_secs_f64(),
        passes.join(" | ")
    );
    agent.stop().expect("agent stops");
}

#[test]
fn prometheus_down_holds_the_step_then_pauses_it_with_the_reason() {
    let lab = lab(Behavior::Reply);
    let app = AppMetrics::start(lab.router(), APP.parse().unwrap());
    let prom = Prometheus::start_scraping(lab.router(), &[APP]);
    let rollout = format!(
        "[service.rollout]\ninterval = \"500ms\"\nsteps = [{{ weight = \"20%\", hold = \"1s\" }}, \
         {{ weight = \"50%\", hold = \"1h\" }}]\n[service.rollout.judge]\nmin_samples = 10\n{CHECK}"
    );
    // Long enough a streak limit (10 s at 500 ms) to see the step held
    // first.
    let mut agent = AgentProcess::start(lab.router(), &config(&lab, "", &rollout, 20), false)
        .expect("agent starts");
    let sock = agent.control_socket();
    // No traffic yet: 0 ÷ 0 is NaN, which is inconclusive.
    let (s, _) = until(
        &sock,
        Duration::from_secs(20),
        || {},
        |s| checks(s).contains("NaN"),
    );
    assert!(
        checks(&s).contains("inconclusive, canary: the value is NaN"),
        "no traffic: NaN is inconclusive: {s}"
    );
    assert_eq!(s["state"], "progressing", "{s}");
    // Prometheus stops: every evaluation is inconclusive. Traffic enough
    // for the judge to pass the step.
    drop(prom);
    let stopped = Instant::now();
    traffic(&lab, &app, 200, 200);
    let (held, _) = until(
        &sock,
        Duration::from_secs(20),
        || {},
        |s| {
            checks(s).contains("cannot connect to Prometheus")
                && s["last_verdict"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("judge: pass"))
        },
    );
    eprintln!("held: {}", checks(&held));
    assert_eq!(
        (held["state"].as_str(), held["step"].as_str()),
        (Some("progressing"), Some("1/2 (20%)")),
        "inconclusive holds the step though its 1 s hold is over and the judge passes: {held}"
    );
    assert!(
        held["last_verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("judge: pass")),
        "{held}"
    );
    let (s, _) = until(
        &sock,
        Duration::from_secs(30),
        || {},
        |s| s["state"] != "progressing",
    );
    // The state change's line (the judge keeps judging a paused plan, so
    // status's last verdict moves on; its checks lines keep the reason).
    let verdict = agent
        .wait_for("paused by the checks", 0, Duration::from_secs(1))
        .expect("the pause is logged with its reason");
    eprintln!(
        "paused {:.1} s after Prometheus stopped: {verdict}",
        stopped.elapsed().as_secs_f64()
    );
    // Paused, the checks go on (afresh): status shows why.
    let (paused, _) = until(
        &sock,
        Duration::from_secs(5),
        || {},
        |s| checks(s).contains("cannot connect to Prometheus"),
    );
    assert!(
        checks(&paused).contains("cannot connect to Prometheus"),
        "status shows why: {paused}"
    );
    assert_eq!(
        (s["state"].as_str(), s["step"].as_str()),
        (Some("paused"), Some("1/2 (20%)")),
        "{s}"
    );
    assert!(
        verdict.contains("paused by the checks: check \"http-5xx\": inconclusive, canary: cannot connect to Prometheus")
            && verdict.contains("(20 evaluations in a row, max_inconclusive 20)"),
        "the pause says why: {verdict}"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn shadow_mode_reports_the_rollback_but_the_failing_canary_keeps_its_weight() {
    // The canary resets every connection: the breaker and the judge would
    // cut it off within a second.
    let lab = lab(Behavior::Reset);
    let rollout = "[service.rollout]\nmode = \"shadow\"\ninterval = \"500ms\"\n\
                   steps = [{ weight = \"20%\", hold = \"1h\" }]\n[service.rollout.judge]\nmin_samples = 10\n";
    let text = format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{}\"\n\
         stable = [\"{}\"]\ncanary = [\"{}\"]\ncohort = \"per-connection\"\nweight = \"50%\"\n{rollout}",
        vip(),
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let mut agent = AgentProcess::start(lab.router(), &text, false).expect("agent starts");
    let sock = agent.control_socket();
    let (s, took) = until(
        &sock,
        Duration::from_secs(20),
        || {
            drive(&lab, vip(), lab.client_addrs(), 200);
        },
        |s| s["state"] == "rolled-back",
    );
    let line = agent
        .wait_for("would have rolled back", 0, Duration::from_secs(1))
        .expect("the log says it would have rolled back");
    eprintln!("shadow: {:.1} s; {line}", took.as_secs_f64());
    let verdict = s["last_verdict"].as_str().unwrap_or_default();
    // The breaker's window (read from the count-only kernel breaker) or
    // the judge, whichever sees it first.
    assert!(
        verdict.starts_with(
            "shadow mode, not enforced (the weight stays): would have rolled back by the breaker"
        ) || verdict.starts_with(
            "shadow mode, not enforced (the weight stays): would have rolled back by the judge"
        ),
        "{verdict}"
    );
    assert_eq!(
        (s["mode"].as_str(), s["effective_weight"].as_str()),
        (Some("shadow"), Some("50%")),
        "{s}"
    );
    // The failing canary still gets its share: ~50 % of 400 connections
    // (binomial, 400 trials at p = 0.5: below 120 has probability < 1e-15).
    let out = drive(&lab, vip(), lab.client_addrs(), 400);
    let canary = out.errors.len() as u64 + out.canary();
    assert!(
        canary >= 120,
        "shadow mode must keep steering to the canary: {canary} of 400 reached it"
    );
    let enforced: Vec<String> = agent
        .log()
        .into_iter()
        .filter(|l| l.contains("rolled back by") && !l.contains("shadow mode, not enforced"))
        .collect();
    assert!(
        enforced.is_empty(),
        "no rollback may be enforced: {enforced:?}"
    );
    agent.stop().expect("agent stops");
}

/// `[analysis]` over https with basic authentication, against a real
/// Prometheus serving TLS only and refusing anonymous queries: the checks
/// pass with the right CA and password; a wrong password and an untrusted
/// CA are inconclusive with the reason, never a pass.
#[test]
fn checks_reach_a_prometheus_over_https_with_basic_auth() {
    let lab = lab(Behavior::Reply);
    let app = AppMetrics::start(lab.router(), APP.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("canary-prom-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tls = dir.join("tls");
    let files = canary_tests::tls::make_tls(&tls, "canary test Prometheus CA", "prometheus", &[]);
    let other_ca = canary_tests::tls::make_tls(&dir.join("other"), "another CA", "x", &[]).ca;
    let _prom =
        Prometheus::start_secured(lab.router(), PROMETHEUS, &[APP], &tls, "canary", "s3cret");
    let password = dir.join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "guess\n").unwrap();
    let rollout = format!(
        "[service.rollout]\ninterval = \"500ms\"\nsteps = [{{ weight = \"50%\", hold = \"1h\" }}]\n{CHECK}"
    );
    let secured = |ca: &std::path::Path, password_file: &std::path::Path| {
        config(&lab, "", &rollout, 1000).replace(
            &format!("prometheus = \"http://{PROMETHEUS}\"\n"),
            &format!(
                "prometheus = \"https://{PROMETHEUS}\"\nca = \"{}\"\nusername = \"canary\"\npassword_file = \"{}\"\n",
                ca.display(),
                password_file.display()
            ),
        )
    };
    let text = secured(&files.ca, &password);
    assert!(text.contains("https://"), "{text}");
    let mut agent = AgentProcess::start(lab.router(), &text, false).expect("agent starts");
    let sock = agent.control_socket();
    let (s, took) = until(
        &sock,
        Duration::from_secs(40),
        || traffic(&lab, &app, 100, 200),
        |s| checks(s).starts_with("pass: "),
    );
    eprintln!(
        "https + basic auth: {} after {:.1} s",
        checks(&s),
        took.as_secs_f64()
    );
    assert!(
        checks(&s).starts_with("pass: "),
        "the check passes over https: {s}"
    );
    let evaluations = |outcome: &str| {
        canary_tests::metrics::scrape(lab.router()).sum(
            "canary_check_evaluations_total",
            &[
                ("service", "web"),
                ("check", "http-5xx"),
                ("outcome", outcome),
            ],
        )
    };
    assert!(evaluations("pass") >= 1.0, "passes are counted");
    let inconclusive_before = evaluations("inconclusive");
    for (what, text, why) in [
        (
            "a wrong password",
            secured(&files.ca, &wrong),
            "Prometheus answered 401",
        ),
        (
            "an untrusted CA",
            secured(&other_ca, &password),
            "cannot connect to Prometheus",
        ),
    ] {
        agent.reload(&text).expect("reload");
        let (s, _) = until(
            &sock,
            Duration::from_secs(20),
            || traffic(&lab, &app, 50, 200),
            |s| checks(s).contains(why),
        );
        eprintln!("{what}: {}", checks(&s));
        assert!(
            checks(&s).contains("inconclusive") && checks(&s).contains(why),
            "{what}: inconclusive with the reason: {s}"
        );
        assert_eq!(
            s["state"], "progressing",
            "{what}: never a pass, never a move: {s}"
        );
    }
    assert!(
        evaluations("inconclusive") >= inconclusive_before + 2.0,
        "inconclusive evaluations are counted"
    );
    agent.stop().expect("agent stops");
    let _ = std::fs::remove_dir_all(&dir);
}

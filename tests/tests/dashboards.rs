//! The Grafana dashboard (`deploy/grafana/`) and the alert rules
//! (`deploy/prometheus/alerts.yaml`): every query in both runs against a
//! real Prometheus scraping a real agent, in a scenario that makes each
//! alert's condition true, and must return series; `promtool check rules`
//! passes.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::{
    canaryctl_ok,
    load::drive,
    packet::{ACK, RawSender, Tcp},
    prometheus::{ADDR as PROMETHEUS, Prometheus},
};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every `expr:` of the rules file (folded `>-` scalars or one line).
fn rule_exprs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert: ") {
            alert = name.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("expr:") {
            let indent = line.len() - t.len();
            let mut expr = String::new();
            if rest.trim() == ">-" {
                while let Some(next) = lines.peek() {
                    let nt = next.trim_start();
                    if nt.is_empty() || next.len() - nt.len() <= indent {
                        break;
                    }
                    expr.push_str(nt);
                    expr.push(' ');
                    lines.next();
                }
            } else {
                expr = rest.trim().to_string();
            }
            out.push((alert.clone(), expr.trim().to_string()));
        }
    }
    out
}

/// Every target query of the dashboard (panels and annotations), and the
/// service variable's query as PromQL.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push((
                panel["title"].as_str().unwrap_or("?").to_string(),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for a in dash["annotations"]["list"].as_array().expect("annotations") {
        out.push((
            format!("annotation {}", a["name"]),
            a["expr"].as_str().expect("expr").to_string(),
        ));
    }
    let var = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["name"] == "service")
        .expect("a service variable");
    let def = var["definition"].as_str().expect("definition");
    let metric = def
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(", service)"))
        .expect("label_values(METRIC, service)");
    out.push((
        "variable service".into(),
        format!("count by (service) ({metric})"),
    ));
    out
}

#[test]
fn every_dashboard_and_alert_query_returns_series_from_a_real_prometheus() {
    let promtool = Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yaml"))
        .output()
        .expect("run promtool (installed by `cargo xtask test`)");
    assert!(
        promtool.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    let rules =
        rule_exprs(&std::fs::read_to_string(deploy("prometheus/alerts.yaml")).expect("rules"));
    assert_eq!(rules.len(), 5, "{rules:?}");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/canary-rollout.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries = dashboard_exprs(&dash);
    let mut ids: Vec<u64> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ids.dedup();
    assert_eq!(
        ids.len(),
        dash["panels"].as_array().map_or(0, Vec::len),
        "panel ids are unique"
    );

    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        64,
    );
    // A second interface, deleted later: the detached alert's condition.
    lab.router()
        .ip(&[
            "link", "add", "dmy0", "type", "veth", "peer", "name", "dmy1",
        ])
        .expect("add dmy0");
    lab.router()
        .ip(&["link", "set", "dmy0", "up"])
        .expect("dmy0 up");
    lab.router()
        .ip(&["link", "set", "dmy1", "up"])
        .expect("dmy1 up");
    // web's check is NaN (inconclusive) until traffic flows, then passes:
    // the check panel and CanaryChecksInconclusive have both to show.
    // max_inconclusive is out of reach, so it never pauses web.
    let config = format!(
        "[agent]\ninterfaces = [\"{}\", \"dmy0\"]\n\n\
         [analysis]\nprometheus = \"http://{PROMETHEUS}\"\nmax_inconclusive = 100000\nmin_window = \"3s\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"{s}\"]\ncanary = [\"{c}\"]\n\
         cohort = \"per-connection\"\n[service.rollout]\ninterval = \"250ms\"\nsteps = [{{ weight = \"50%\", hold = \"1h\" }}]\n\
         [[service.rollout.checks]]\nname = \"failures\"\n\
         query = 'sum(rate(canary_connections_failed_total{{service=\"{{{{service}}}}\",cohort=\"{{{{cohort}}}}\"}}[{{{{window}}}}])) / \
         sum(rate(canary_connections_total{{service=\"{{{{service}}}}\",cohort=\"{{{{cohort}}}}\"}}[{{{{window}}}}]))'\n\
         max_increase = 0.5\n\n\
         [[service]]\nname = \"api\"\nvip = \"10.96.0.11:80\"\nstable = [\"{s}\"]\ncanary = [\"{c}\"]\n\
         [service.rollout]\nsteps = [{{ weight = \"10%\", hold = \"1h\" }}]\n",
        Lab::ROUTER_CLIENT_IFACE,
        s = lab.backend_addr(0),
        c = lab.backend_addr(1),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    let prom = Prometheus::start(lab.router(), "127.0.0.1:9477");
    // Counters' starting values scraped first, so increases show.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom
        .query("count_over_time(canary_build_info[1m])")
        .is_none_or(|n| n < 2.0)
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the agent twice"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let vip: SocketAddrV4 = "10.96.0.10:80".parse().expect("VIP");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        drive(&lab, vip, lab.client_addrs(), 60).assert_no_errors("web traffic");
    }
    // Stray ACKs: packets of flows the conntrack does not know.
    let src = lab.client_addrs()[0];
    lab.client()
        .spawn(move || {
            let raw = RawSender::new().expect("raw socket");
            for port in 0..20u16 {
                let seg = Tcp::new(
                    SocketAddrV4::new(src, 40_000 + port),
                    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80),
                    ACK,
                );
                raw.send(&seg).expect("raw send");
            }
        })
        .join()
        .expect("sender")
        .expect("client namespace");
    // The rolled-back alert's condition. The service may already be rolled
    // back (a breaker or judge decision under load): say why, go on.
    let rollback = canary_tests::canaryctl(&agent.control_socket(), &["rollback", "web"]);
    if !rollback.status.success() {
        let why = String::from_utf8_lossy(&rollback.stderr);
        assert!(
            why.contains("already rolled back"),
            "rollback failed: {why}"
        );
        eprintln!(
            "web was already rolled back: {}",
            canaryctl_ok(&agent.control_socket(), &["status", "web"])
        );
    }
    lab.router()
        .ip(&["link", "del", "dmy0"])
        .expect("delete dmy0");
    // A few scrapes of the final state.
    std::thread::sleep(Duration::from_secs(4));

    let mut empty = Vec::new();
    for (what, expr) in queries.iter().chain(&rules) {
        let promql = expr
            .replace("$service", "web")
            .replace("$__rate_interval", "30s");
        let series = prom.series(&promql);
        eprintln!("{what}: {} series  ({promql})", series.len());
        if series.is_empty() {
            empty.push(format!("{what}: {promql}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries that returned no series:\n{}",
        empty.join("\n")
    );
    drop(prom);
    agent.stop().expect("agent stops");
}

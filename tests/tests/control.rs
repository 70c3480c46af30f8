//! The control socket and `canaryctl`, end to end with the real agent.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::float_cmp,
    reason = "the values compared are counts, or shares of all or none (0 or 1): exact in f64"
)]
#![expect(
    clippy::unwrap_used,
    reason = "the helpers here are test code too: a failed step panics, which fails the test"
)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::Path,
    process::Command,
};

use canary_lab::{AgentProcess, Behavior, Lab, canaryctl_binary};
use canary_tests::load::drive;
use serde_json::Value;

const VIP: &str = "10.96.0.10:80";

fn config(lab: &Lab, agent_extra: &str) -> String {
    format!(
        "[agent]\ninterfaces = [\"{}\"]\n{agent_extra}\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"5%\"\ncohort = \"per-connection\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    )
}

use canary_tests::{canaryctl as ctl, canaryctl_ok as ok};

fn fails(socket: &Path, args: &[&str], expected: &str) {
    let out = ctl(socket, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "canaryctl {args:?} should fail with 1: {stderr}"
    );
    assert!(
        stderr.contains(expected),
        "canaryctl {args:?}: expected {expected:?} in {stderr:?}"
    );
}

fn status(socket: &Path) -> Value {
    serde_json::from_str(&ok(socket, &["status", "web", "--json"])).expect("status --json is JSON")
}

fn canary_share(lab: &Lab, n: usize) -> f64 {
    let out = drive(lab, VIP.parse().unwrap(), lab.client_addrs(), n);
    out.assert_no_errors("traffic");
    out.canary() as f64 / n as f64
}

#[test]
fn canaryctl_moves_the_canary_and_a_rollback_survives_a_restart() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        16,
    );
    let state_dir =
        std::env::temp_dir().join(format!("canary-control-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let extra = format!("state_dir = \"{}\"", state_dir.display());
    let agent =
        AgentProcess::start(lab.router(), &config(&lab, &extra), false).expect("agent starts");
    let sock = agent.control_socket();
    let mode = std::fs::metadata(&sock)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "control socket mode");

    let s = status(&sock);
    let svc = &s["services"][0];
    assert_eq!(
        (svc["name"].as_str(), svc["state"].as_str()),
        (Some("web"), Some("idle")),
        "{s}"
    );
    assert_eq!(svc["effective_weight"], "5%");
    let table = ok(&sock, &["status"]);
    assert!(
        table.contains("SERVICE") && table.contains("web") && table.contains("canary"),
        "{table}"
    );

    ok(&sock, &["set-weight", "web", "100%"]);
    assert_eq!(canary_share(&lab, 200), 1.0, "set-weight 100%");
    let s = status(&sock);
    assert_eq!(s["services"][0]["effective_weight"], "100%");
    assert_eq!(s["services"][0]["configured_weight"], "5%");

    ok(&sock, &["rollback", "web"]);
    assert_eq!(canary_share(&lab, 200), 0.0, "after rollback");
    let s = status(&sock);
    assert_eq!(s["services"][0]["state"], "rolled-back");
    assert!(
        s["services"][0]["last_verdict"]
            .as_str()
            .unwrap_or("")
            .contains("rolled back"),
        "{s}"
    );
    fails(
        &sock,
        &["set-weight", "web", "50%"],
        "it is rolled back; `canaryctl resume` it first",
    );
    fails(&sock, &["rollback", "web"], "already rolled back");

    // A restart keeps the rollback.
    agent.stop().expect("agent stops");
    let agent =
        AgentProcess::start(lab.router(), &config(&lab, &extra), false).expect("agent restarts");
    let sock = agent.control_socket();
    assert_eq!(
        status(&sock)["services"][0]["state"],
        "rolled-back",
        "restart re-raised the canary"
    );
    assert_eq!(canary_share(&lab, 200), 0.0, "after restart");

    ok(&sock, &["resume", "web"]);
    assert_eq!(status(&sock)["services"][0]["state"], "idle");
    ok(&sock, &["promote", "web"]);
    assert_eq!(status(&sock)["services"][0]["state"], "promoted");
    assert_eq!(canary_share(&lab, 200), 1.0, "promoted");
    let s = status(&sock);
    let canary = &s["services"][0]["cohorts"][1];
    assert!(canary["connections"].as_u64().unwrap() >= 200, "{s}");
    assert!(
        canary["first_byte_p50_ms"].as_f64().is_some(),
        "p50 reported: {s}"
    );

    // Errors name what is wrong and exit 1.
    fails(&sock, &["promote", "nope"], "no service \"nope\"");
    fails(&sock, &["set-weight", "web", "150%"], "more than 100%");
    fails(
        &sock,
        &["pause", "web"],
        "pause holds a progressing rollout; it is promoted",
    );
    fails(&sock, &["approve", "web"], "nothing awaits approval");
    ok(&sock, &["reload"]);
    agent.stop().expect("agent stops");
    fails(&sock, &["status"], "no agent at");
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// One raw line to the socket; the agent's parsed answer.
fn raw(sock: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("answer {reply:?} is not JSON: {e}"))
}

#[test]
fn the_socket_refuses_other_users_and_survives_bad_messages() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        16,
    );
    let agent = AgentProcess::start(lab.router(), &config(&lab, ""), false).expect("agent starts");
    let sock = agent.control_socket();
    // The directory must be passable for the unprivileged user to reach
    // the socket's own permission check.
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let nobody = |args: &[&str]| {
        Command::new(canaryctl_binary())
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = nobody(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    // Even with the file opened to everyone, the peer-credential check holds.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = nobody(&["rollback", "web"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("uid 65534 may not use this socket") && stderr.contains("(unauthorized)"),
        "{stderr}"
    );

    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_string();
    assert_eq!(code(&raw(&sock, b"this is not json\n")), "malformed");
    assert_eq!(
        code(&raw(&sock, b"{\"v\":1,\"cmd\":\"explode\"}\n")),
        "unknown-command"
    );
    assert_eq!(
        code(&raw(&sock, b"{\"v\":9,\"cmd\":\"status\"}\n")),
        "unsupported-version"
    );
    assert_eq!(
        code(&raw(&sock, b"{\"v\":1,\"cmd\":\"status\",\"x\":1}\n")),
        "malformed"
    );
    assert_eq!(code(&raw(&sock, b"\xff\xfe\x00garbage\n")), "malformed");
    let mut huge = vec![b'a'; 100 * 1024];
    huge.push(b'\n');
    assert_eq!(code(&raw(&sock, &huge)), "too-large");
    // A client that connects and says nothing, or hangs up mid-line.
    drop(UnixStream::connect(&sock).unwrap());
    UnixStream::connect(&sock)
        .unwrap()
        .write_all(b"{\"v\":1,")
        .unwrap();

    // The agent and the data plane carry on.
    assert_eq!(raw(&sock, b"{\"v\":1,\"cmd\":\"status\"}\n")["ok"], true);
    let out = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 200);
    out.assert_no_errors("after bad messages");
    assert_eq!(
        status(&sock)["services"][0]["state"],
        "idle",
        "nobody's rollback must not have happened"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn state_changes_reach_the_webhook_with_retries() {
    use std::{
        io::Read,
        net::TcpListener,
        time::{Duration, Instant},
    };
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        16,
    );
    // A receiver on the router's loopback (where the agent runs): the first
    // POST gets a 500, the second a 200.
    let listener = lab
        .router()
        .spawn(|| {
            let l = TcpListener::bind("127.0.0.1:19999").expect("bind the webhook receiver");
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap()
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while bodies.len() < 2 && Instant::now() < deadline {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head, then Content-Length bytes of body.
            let body = loop {
                let n = s.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break String::new();
                }
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break body.to_string();
                    }
                }
            };
            let status = if bodies.is_empty() {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = s.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            bodies.push(body);
        }
        bodies
    });
    let agent = AgentProcess::start(
        lab.router(),
        &config(&lab, "webhook_url = \"http://127.0.0.1:19999/hook\""),
        false,
    )
    .expect("agent starts");
    ok(&agent.control_socket(), &["rollback", "web"]);
    let bodies = receiver.join().unwrap();
    assert_eq!(
        bodies.len(),
        2,
        "one failed delivery and its retry: {bodies:?}"
    );
    assert_eq!(bodies[0], bodies[1], "the retry carries the same event");
    let event: Value = serde_json::from_str(&bodies[1]).expect("the event is JSON");
    assert_eq!(
        (
            event["event"].as_str(),
            event["service"].as_str(),
            event["from"].as_str(),
            event["to"].as_str(),
            event["by"].as_str()
        ),
        (
            Some("rollout-state"),
            Some("web"),
            Some("idle"),
            Some("rolled-back"),
            Some("canaryctl")
        ),
        "{event}"
    );
    assert!(
        event["node"].as_str().is_some_and(|n| !n.is_empty())
            && event["at_unix"].as_u64().is_some(),
        "{event}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent
        .log()
        .iter()
        .any(|l| l.contains("webhook delivered") && l.contains("attempt=2"))
    {
        assert!(
            Instant::now() < deadline,
            "no 'webhook delivered attempt=2' log line"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.stop().expect("agent stops");
}

/// `history` lists every state change with who and why, also after a
/// restart; `explain` says where a plan is and what its step waits for.
#[test]
fn history_and_explain_say_what_happened_and_what_the_step_waits_for() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        8,
    );
    let cfg = format!(
        "[agent]\ninterfaces = [\"{}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{}\"]\n\
         canary = [\"{}\"]\nrelease = \"v7\"\n[service.rollout]\nsteps = [{{ weight = \"5%\", hold = \"1h\", min_connections = 500 }}, \
         {{ weight = \"50%\", gate = \"manual\" }}]\n",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let mut agent = AgentProcess::start_pinned(lab.router(), &cfg, false).expect("agent starts");
    let sock = agent.control_socket();
    let explain = ok(&sock, &["explain", "web"]);
    for needle in [
        "web is progressing at canary weight 5% (release v7)",
        "plan: step 1 of 2 (5% → 50%)",
        "next: step 2 (50%) after `canaryctl approve`: the judge moves it on after the 3600s hold",
        "of 500 canary connections",
    ] {
        assert!(
            explain.contains(needle),
            "explain lacks {needle:?}:\n{explain}"
        );
    }
    ok(&sock, &["pause", "web"]);
    ok(&sock, &["rollback", "web"]);
    agent
        .restart(canary_lab::Stop::Term, None, None)
        .expect("agent restarts");
    let history = ok(&agent.control_socket(), &["history", "web"]);
    let rows: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "plan start, pause, rollback:\n{history}");
    assert!(
        rows[0].contains("idle")
            && rows[0].contains("progressing")
            && rows[0].contains("the config"),
        "{history}"
    );
    assert!(
        rows[1].contains("paused") && rows[1].contains("canaryctl"),
        "{history}"
    );
    assert!(
        rows[2].contains("rolled-back") && rows[2].contains("0%") && rows[2].contains("canaryctl"),
        "{history}"
    );
    let json: Value =
        serde_json::from_str(&ok(&agent.control_socket(), &["history", "web", "--json"]))
            .expect("JSON");
    assert_eq!(json["changes"].as_array().map(Vec::len), Some(3), "{json}");
    let explain = ok(&agent.control_socket(), &["explain", "web"]);
    assert!(
        explain.contains("rolled back by operator: canaryctl rollback"),
        "{explain}"
    );
    let status = ok(&agent.control_socket(), &["status"]);
    assert!(status.contains("plan [■□] step 1/2"), "{status}");
    fails(
        &agent.control_socket(),
        &["history", "nope"],
        "no service \"nope\"",
    );
}

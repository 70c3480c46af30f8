//! Production hardening, end to end with the real agent: bad configs are
//! refused by `--check` and by SIGHUP while the agent keeps serving, idle
//! clients cannot keep `canaryctl` or a scrape out, and a damaged or
//! hostile state file stops the start with an error naming it.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Lab, agent_binary};
use canary_tests::metrics::http_get;
use serde_json::Value;

const VIP: &str = "10.96.0.10:80";

use canary_tests::{canaryctl as ctl, canaryctl_ok};

fn status(socket: &Path) -> Value {
    serde_json::from_str(&canaryctl_ok(socket, &["status", "web", "--json"]))
        .expect("status --json is JSON")
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("canary-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One bad config: what it is, the text, and what the error must contain:
/// the key as `section: key = ` (or serde's naming of it) and the reason.
struct Row {
    config: String,
    key: String,
    reason: &'static str,
}

#[test]
fn bad_configs_are_refused_by_check_and_by_sighup_and_the_agent_keeps_serving() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        4,
    );
    let scratch = Scratch::new("bad-configs");
    let iface = Lab::ROUTER_CLIENT_IFACE;
    let (stable, canary) = (lab.backend_addr(0), lab.backend_addr(1));
    // The socket LB stays off (it would attach at the host's cgroup root)
    // unless a row sets it itself.
    let doc = |agent: &str, service: &str, tail: &str| {
        let socket_lb = if agent.contains("socket_lb") {
            ""
        } else {
            "socket_lb = false\n"
        };
        format!(
            "[agent]\ninterfaces = [\"{iface}\"]\n{socket_lb}{agent}\n\n[[service]]\nname = \"web\"\n\
             vip = \"{VIP}\"\nstable = [\"{stable}\"]\ncanary = [\"{canary}\"]\n{service}\n{tail}"
        )
    };
    let mut agent = AgentProcess::start(lab.router(), &doc("", "weight = \"5%\"", ""), false)
        .expect("agent starts");
    let sock = agent.control_socket();
    let state = agent.dir().join("state");
    // Every row names the running agent's socket and state directory, so
    // the reload would change nothing else.
    let paths = format!(
        "control_socket = \"{}\"\nstate_dir = \"{}\"\n",
        sock.display(),
        state.display()
    );
    let precious = scratch.0.join("precious.txt");
    std::fs::write(&precious, "an operator's file").unwrap();

    let agent_row = |line: &str| doc(&format!("{paths}{line}"), "weight = \"5%\"", "");
    let service_row = |lines: &str| doc(&paths, lines, "");
    let breaker_row = |line: &str| {
        doc(
            &paths,
            "weight = \"5%\"",
            &format!("[service.breaker]\n{line}"),
        )
    };
    let plan = |rollout: &str, steps: &str, judge: &str| {
        doc(
            &paths,
            "",
            &format!(
                "[service.rollout]\nsteps = [{steps}]\n{rollout}\n[service.rollout.judge]\n{judge}"
            ),
        )
    };
    let steps = "{ weight = \"1%\" }, { weight = \"5%\" }";
    let row = |config: String, key: &str, reason: &'static str| Row {
        config,
        key: key.to_string(),
        reason,
    };
    let rows = vec![
        row(
            agent_row("handshake_timeout = \"1e20s\""),
            "[agent]: handshake_timeout = ",
            "must be a duration between 100ms and 120s",
        ),
        row(
            agent_row("handshake_timeout = \"NaNs\""),
            "[agent]: handshake_timeout = ",
            "not a duration",
        ),
        row(
            agent_row("handshake_timeout = \"10ms\""),
            "[agent]: handshake_timeout = ",
            "must be a duration between 100ms and 120s",
        ),
        row(
            agent_row("conntrack_capacity = -1"),
            "[agent]: conntrack_capacity = ",
            "must be between 1024 and 67108864",
        ),
        row(
            agent_row("conntrack_capacity = 9223372036854775807"),
            "[agent]: conntrack_capacity = ",
            "must be between 1024 and 67108864",
        ),
        row(
            agent_row("udp_conntrack_capacity = -1"),
            "[agent]: udp_conntrack_capacity = ",
            "must be between 1024 and 67108864",
        ),
        row(
            service_row("weight = \"5%\"\nprotocol = \"udp\"\nudp_idle_timeout = \"1e20s\""),
            "service \"web\": udp_idle_timeout = ",
            "must be a duration between 2s and 1d",
        ),
        row(
            service_row("weight = \"5%\"\nudp_response_timeout = \"1s\""),
            "service \"web\": udp_response_timeout = ",
            "applies to UDP services only",
        ),
        row(
            agent_row("max_services = 0"),
            "[agent]: max_services = ",
            "must be between 1 and 1048576",
        ),
        row(
            agent_row("max_backends = 4294967297"),
            "[agent]: max_backends = ",
            "must be between 1 and 4194304",
        ),
        row(
            agent_row("metrics_buckets_per_octave = 3"),
            "[agent]: metrics_buckets_per_octave = ",
            "must be 1, 2, 4, 8 or 16",
        ),
        row(
            agent_row("metrics_addr = \"localhost\""),
            "[agent]: metrics_addr = ",
            "not an address:port",
        ),
        row(
            agent_row("control_group = \"no-such-group-canary\""),
            "[agent]: control_group = ",
            "no such group on this host",
        ),
        row(
            agent_row("webhook_url = \"https://bot:pw@x/h\""),
            "[agent]: webhook_url = ",
            "must not carry credentials",
        ),
        row(
            agent_row("webhook_url = \"http://x/\\r\\nX-Injected: 1\""),
            "[agent]: webhook_url = ",
            "must be printable ASCII",
        ),
        row(
            agent_row("").replace(&format!("interfaces = [\"{iface}\"]"), "interfaces = []"),
            "[agent]: interfaces = ",
            "name at least one client-facing interface",
        ),
        row(
            agent_row("").replace(
                &format!("interfaces = [\"{iface}\"]"),
                "interfaces = [\"an-interface-name-too-long\"]",
            ),
            "[agent]: interfaces = ",
            "at most 15",
        ),
        row(
            agent_row("").replace(
                &format!("interfaces = [\"{iface}\"]"),
                "interfaces = [\"nope0\"]",
            ),
            "[agent]: interfaces = ",
            "no such network interface",
        ),
        row(
            agent_row("").replace(
                &format!("interfaces = [\"{iface}\"]"),
                "interfaces = [\"cgroup\"]",
            ),
            "[agent]: interfaces = ",
            "this name is reserved",
        ),
        row(
            agent_row("socket_lb = true\ncgroup = \"sys/fs/cgroup\""),
            "[agent]: cgroup = ",
            "must be an absolute path",
        ),
        row(
            agent_row("socket_lb = true\ncgroup = \"/proc\""),
            "[agent]: cgroup = ",
            "not on a cgroup v2 file system",
        ),
        row(
            agent_row("socket_lb = false\ncgroup = \"/run\""),
            "[agent]: cgroup = ",
            "only used with socket_lb = true",
        ),
        row(
            agent_row("socket_lb = \"on\""),
            "socket_lb",
            "expected a boolean",
        ),
        row(
            doc(
                &format!(
                    "state_dir = \"{}\"\ncontrol_socket = \"{}\"",
                    state.display(),
                    precious.display()
                ),
                "weight = \"5%\"",
                "",
            ),
            "[agent]: control_socket = ",
            "a regular file already exists there and is not a socket",
        ),
        row(
            doc(
                &format!(
                    "state_dir = \"{}\"\ncontrol_socket = \"/run/{}.sock\"",
                    state.display(),
                    "s".repeat(200)
                ),
                "weight = \"5%\"",
                "",
            ),
            "[agent]: control_socket = ",
            "at most 107",
        ),
        row(
            doc(
                &format!(
                    "control_socket = \"{}\"\nstate_dir = \"{}\"",
                    sock.display(),
                    precious.display()
                ),
                "weight = \"5%\"",
                "",
            ),
            "[agent]: state_dir = ",
            "state_dir must be a directory",
        ),
        row(
            service_row("weight = \"5%\"")
                .replace("name = \"web\"", &format!("name = \"{}\"", "a".repeat(300))),
            "service #1: name = ",
            "300 characters long; at most 64",
        ),
        row(
            service_row("weight = \"5%\"").replace("name = \"web\"", "name = \"web/../x\""),
            "service #1: name = ",
            "use letters, digits",
        ),
        row(
            service_row("weight = \"5%\"")
                .replace(&format!("vip = \"{VIP}\""), "vip = \"10.96.0.10\""),
            "service \"web\": vip = ",
            "not an address:port",
        ),
        row(
            service_row("weight = \"150%\""),
            "service \"web\": weight = ",
            "more than 100%",
        ),
        row(
            service_row("weight = 5"),
            "service \"web\": weight = ",
            "a bare number is ambiguous",
        ),
        row(
            service_row("weight = \"5%\"\ncohort = \"random\""),
            "service \"web\": cohort = ",
            "must be \"sticky\" or \"per-connection\"",
        ),
        row(
            service_row("weight = \"5%\"\nsalt = -1"),
            "service \"web\": salt = ",
            "must be between 0 and 4294967295",
        ),
        row(
            service_row("weight = \"5%\"")
                .replace(&format!("stable = [\"{stable}\"]"), "stable = []"),
            "service \"web\": stable = ",
            "at least one stable backend",
        ),
        row(
            service_row("weight = \"5%\"\nalways_canary = [\"10.0.0.0/33\"]"),
            "service \"web\": always_canary = ",
            "the prefix length must be 0 to 32",
        ),
        row(
            service_row("wieght = \"5%\""),
            "unknown field `wieght`",
            "is not a valid canary config",
        ),
        row(
            breaker_row("window = \"1e20s\""),
            "service \"web\": breaker.window = ",
            "must be a duration between 10ms and 60s",
        ),
        row(
            breaker_row("min_failures = 0"),
            "service \"web\": breaker.min_failures = ",
            "must be at least 1",
        ),
        row(
            breaker_row("min_failures = 70000"),
            "service \"web\": breaker.min_failures = ",
            "must be between 1 and 65535",
        ),
        row(
            breaker_row("failure_ratio = \"200%\""),
            "service \"web\": breaker.failure_ratio = ",
            "more than 100%",
        ),
        row(
            plan("interval = \"1e20s\"", steps, ""),
            "service \"web\": rollout.interval = ",
            "must be a duration between 100ms and 10m",
        ),
        row(
            plan(
                "",
                "{ weight = \"1%\" }, { weight = \"5%\", hold = \"1e20s\" }",
                "",
            ),
            "service \"web\": rollout.steps[2].hold = ",
            "must be a duration between 0s and 30d",
        ),
        row(
            plan("", "{ weight = \"5%\" }, { weight = \"1%\" }", ""),
            "service \"web\": rollout.steps[2].weight = ",
            "weights must rise from step to step",
        ),
        row(
            plan("", "", ""),
            "service \"web\": rollout.steps = ",
            "a plan needs at least one step",
        ),
        row(
            plan("fail_after = 2", steps, ""),
            "service \"web\": rollout.fail_after = ",
            "removed: the judge's alpha now bounds false rollbacks over the whole rollout; delete fail_after",
        ),
        row(
            plan("", steps, "min_latency_increase = \"1e20s\""),
            "service \"web\": rollout.judge.min_latency_increase = ",
            "must be a duration between 0s and 60s",
        ),
        row(
            plan("", steps, "alpha = nan"),
            "service \"web\": rollout.judge.alpha = ",
            "must be between 0 and 0.5",
        ),
        row(
            plan("", steps, "max_p99_ratio = inf"),
            "service \"web\": rollout.judge.max_p99_ratio = ",
            "must be a ratio between 1.0 and 1000",
        ),
        row(
            plan("", steps, "min_samples = -5"),
            "service \"web\": rollout.judge.min_samples = ",
            "must be between 1 and",
        ),
        row(
            plan("", steps, "").replace("[service.rollout]", "weight = \"5%\"\n[service.rollout]"),
            "service \"web\": weight = ",
            "a [service.rollout] plan sets the weight",
        ),
    ];
    assert!(rows.len() >= 30, "the table holds {} rows", rows.len());

    let started = Instant::now();
    let mut checked = 0;
    for (i, row) in rows.iter().enumerate() {
        let file = scratch.0.join(format!("row-{i}.toml"));
        std::fs::write(&file, &row.config).unwrap();
        let what = format!("row {i} ({} … {})", row.key, row.reason);

        // --check refuses it: exit 1, the key and the reason named.
        let out = lab
            .router()
            .command(agent_binary())
            .arg("--check")
            .arg("--config")
            .arg(&file)
            .output()
            .expect("run canary-agent --check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: --check should exit 1; stderr: {stderr}"
        );
        assert!(
            stderr.contains(&row.key) && stderr.contains(row.reason),
            "{what}: --check's error lacks the key or reason: {stderr}"
        );

        // SIGHUP with the same file: rejected with the same error…
        agent
            .reload(&row.config)
            .expect_err(&format!("{what}: the agent applied a bad config"));
        // The rejection line and what follows it: TOML's errors span lines.
        let log = agent.log();
        let at = log
            .iter()
            .rposition(|l| l.contains(canary_lab::RELOAD_REJECTED))
            .expect("the rejection is logged");
        let err = log[at..].join("\n");
        assert!(
            err.contains(&row.key) && err.contains(row.reason),
            "{what}: the reload error lacks the key or reason: {err}"
        );
        // …and the agent still serves, on the old config.
        let s = status(&sock);
        assert_eq!(
            (
                s["services"][0]["name"].as_str(),
                s["services"][0]["configured_weight"].as_str()
            ),
            (Some("web"), Some("5%")),
            "{what}: the old config is no longer in force: {s}"
        );
        checked += 1;
    }
    eprintln!(
        "{checked} bad configs refused by --check and SIGHUP in {:.1?}",
        started.elapsed()
    );
    assert_eq!(checked, rows.len());
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "an operator's file",
        "a control_socket naming a regular file must never delete it"
    );
    // A good config still applies after all that.
    agent
        .reload(&doc(&paths, "weight = \"10%\"", ""))
        .expect("a good reload applies");
    assert_eq!(status(&sock)["services"][0]["configured_weight"], "10%");
    agent.stop().expect("agent stops");
}

/// Raises this process's soft open-file limit: the test holds 4000
/// client sockets.
fn raise_nofile_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    assert_eq!(rc, 0);
    if lim.rlim_cur >= want {
        return;
    }
    lim.rlim_cur = want;
    lim.rlim_max = lim.rlim_max.max(want);
    // SAFETY: `lim` is a valid rlimit; as root the hard limit may rise.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    assert_eq!(
        rc,
        0,
        "cannot raise RLIMIT_NOFILE to {want}: {}",
        std::io::Error::last_os_error()
    );
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or_else(
        |e| panic!("read /proc/{pid}/fd: {e}"),
        std::iter::Iterator::count,
    )
}

#[test]
fn two_thousand_idle_connections_keep_neither_canaryctl_nor_a_scrape_out() {
    const IDLE: usize = 2000;
    raise_nofile_limit(16_384);
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        4,
    );
    let config = format!(
        "[agent]\ninterfaces = [\"{}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"5%\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    let sock = agent.control_socket();
    let fds_before = open_fds(agent.pid());

    // Idle clients: connected, never sending a byte, never closing.
    let started = Instant::now();
    let tcp: Vec<TcpStream> = lab
        .router()
        .spawn(|| {
            (0..IDLE)
                .map(|i| {
                    TcpStream::connect("127.0.0.1:9477")
                        .unwrap_or_else(|e| panic!("idle metrics connection {i}: {e}"))
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("connecting thread")
        .expect("enter the router namespace");
    let tcp_opened = started.elapsed();
    let unix: Vec<UnixStream> = (0..IDLE)
        .map(|i| {
            UnixStream::connect(&sock)
                .unwrap_or_else(|e| panic!("idle control connection {i}: {e}"))
        })
        .collect();
    assert_eq!((tcp.len(), unix.len()), (IDLE, IDLE));
    eprintln!(
        "{IDLE} idle metrics connections opened in {tcp_opened:.1?}, {IDLE} idle control \
         connections in {:.1?}",
        started.elapsed().saturating_sub(tcp_opened)
    );
    // Let the agent accept them all.
    std::thread::sleep(Duration::from_millis(300));
    let fds_held = open_fds(agent.pid());
    let cap = canary_agent::http::MAX_CONNECTIONS + canary_agent::control::MAX_CONNECTIONS;
    assert!(
        fds_held <= fds_before + cap + 8,
        "the agent holds {fds_held} descriptors (was {fds_before}): more than its caps of {cap} \
         connections allow"
    );

    // An operator's rollback answers at once…
    let t = Instant::now();
    let out = ctl(&sock, &["rollback", "web"]);
    let rollback = t.elapsed();
    assert!(
        out.status.success(),
        "canaryctl rollback failed behind {IDLE} idle connections: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rollback < Duration::from_secs(1),
        "canaryctl rollback took {rollback:?} behind {IDLE} idle connections"
    );
    // …and so does a scrape, which sees it.
    let t = Instant::now();
    let (status_line, body) = http_get(lab.router(), "127.0.0.1:9477".parse().unwrap(), "/metrics");
    let scrape = t.elapsed();
    assert!(status_line.contains("200"), "scrape: {status_line}");
    assert!(
        body.lines().any(|l| l.starts_with("canary_rollout_state{")
            && l.contains("state=\"rolled-back\"")
            && l.ends_with(" 1")),
        "the scrape does not show the rollback"
    );
    eprintln!(
        "behind {IDLE}+{IDLE} idle connections: canaryctl rollback {rollback:.1?}, scrape {scrape:.1?} \
         ({} bytes); agent descriptors {fds_before} before, {fds_held} while held",
        body.len()
    );
    assert!(
        scrape < Duration::from_secs(2),
        "the scrape took {scrape:?} behind {IDLE} idle connections"
    );
    assert_eq!(status(&sock)["services"][0]["state"], "rolled-back");
    drop((tcp, unix));
    agent.stop().expect("agent stops");
}

#[test]
fn truncated_or_hostile_state_files_stop_the_start_naming_the_file() {
    type Plant = Box<dyn Fn(&Path)>;
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        4,
    );
    let scratch = Scratch::new("state-files");
    let state = scratch.0.join("state");
    let config = format!(
        "[agent]\ninterfaces = [\"{}\"]\nstate_dir = \"{}\"\n\n[[service]]\nname = \"web\"\n\
         vip = \"{VIP}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"5%\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        state.display(),
        lab.backend_addr(0),
        lab.backend_addr(1),
    );
    let file = state.join("web.json");
    let target = scratch.0.join("elsewhere.json");
    std::fs::write(&target, "{\"state\":\"idle\"}").unwrap();
    let cases: Vec<(&str, Plant, &str)> = vec![
        (
            "truncated",
            Box::new(|f| {
                std::fs::write(
                    f,
                    "{\"state\":\"rolled-back\",\"reason\":\"breaker\",\"at_unix\":17",
                )
                .unwrap();
            }),
            "is not valid (truncated or edited?)",
        ),
        (
            "a symlink",
            Box::new(move |f| std::os::unix::fs::symlink(&target, f).unwrap()),
            "is a symbolic link, which the agent does not follow",
        ),
        (
            "huge",
            Box::new(|f| std::fs::File::create(f).unwrap().set_len(1 << 30).unwrap()),
            "is 1073741824 bytes, more than the 65536",
        ),
    ];
    for (what, plant, reason) in &cases {
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        plant(&file);
        let (exit, log) = AgentProcess::run_to_exit(lab.router(), &config)
            .unwrap_or_else(|e| panic!("{what} state file: {e}"));
        let log = log.join("\n");
        assert_eq!(
            exit.code(),
            Some(1),
            "{what} state file: the start should fail with 1; log:\n{log}"
        );
        let named = format!("state file {}", file.display());
        assert!(
            log.contains(&named) && log.contains(reason) && log.contains("delete it to reset"),
            "{what} state file: the error must name {} and the fix; log:\n{log}",
            file.display()
        );
        assert!(
            !log.contains(canary_lab::READY),
            "{what} state file: the agent became ready"
        );
    }
    // Without the file the same config starts: the file was the reason.
    std::fs::remove_file(&file).unwrap();
    let agent = AgentProcess::start(lab.router(), &config, false).expect("agent starts");
    agent.stop().expect("agent stops");
}

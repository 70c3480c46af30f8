//! Tests of whole config files, and the fixtures the section tests share.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use canary_common::flow::CT_DEFAULT_CAPACITY;

use super::*;

pub(super) const GOOD: &str = r#"
[agent]
interfaces = ["lo"]
control_socket = "/run/canary/control.sock"
metrics_addr = "127.0.0.1:9477"

[[service]]
name = "web"
vip = "10.96.0.10:80"
stable = ["10.0.1.10:8080", "10.0.1.11:8080"]
canary = ["10.0.2.10:8080"]
weight = "5%"
cohort = "sticky"
always_canary = ["192.168.10.0/24"]
never_canary = []
"#;

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("agent.toml"), &[])
}

/// The full message, with sources, as the agent prints it.
pub(super) fn error_text(text: &str) -> String {
    let err = parse(text).expect_err("config should be rejected");
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

pub(super) fn with_service(lines: &str) -> String {
    format!("[agent]\ninterfaces = [\"lo\"]\n\n[[service]]\n{lines}\n")
}

/// An interface in TC mode.
pub(super) fn tc(name: &str) -> InterfaceConfig {
    InterfaceConfig {
        name: name.to_string(),
        mode: IngressMode::Tc,
    }
}

#[test]
fn the_design_example_parses() {
    let c = parse(GOOD).expect("example config is valid");
    assert_eq!(c.agent.interfaces, [tc("lo")]);
    assert_eq!(c.agent.conntrack_capacity, CT_DEFAULT_CAPACITY);
    let s = &c.services[0];
    assert_eq!(s.name, "web");
    assert_eq!(s.vip, "10.96.0.10:80".parse().unwrap());
    assert_eq!(s.stable.len(), 2);
    assert_eq!(s.weight.ppm(), 50_000);
    assert_eq!(s.cohort, CohortMode::Sticky);
    assert_eq!(s.always_canary[0].to_string(), "192.168.10.0/24");
    assert_eq!(s.salt, default_salt("web"));
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let text = GOOD.replace(
        "cohort = \"sticky\"",
        "cohort = \"sticky\"\nwieght = \"5%\"",
    );
    let msg = error_text(&text);
    assert!(
        msg.contains("agent.toml is not a valid canary config"),
        "{msg}"
    );
    assert!(msg.contains("unknown field `wieght`"), "{msg}");
    assert!(
        msg.contains("line 14"),
        "error should point at the line: {msg}"
    );
}

#[test]
fn service_and_backend_capacities_are_checked_against_the_services() {
    let msg = error_text(&GOOD.replace("[agent]", "[agent]\nmax_services = 0"));
    assert!(
        msg.contains("[agent]: max_services = 0: must be between 1 and"),
        "{msg}"
    );
    let two = format!(
        "{GOOD}\n[[service]]\nname = \"api\"\nvip = \"10.96.0.11:80\"\nstable = [\"10.0.1.10:8080\"]\n"
    );
    let msg = error_text(&two.replace("[agent]", "[agent]\nmax_services = 1"));
    assert!(
        msg.contains("[agent]: max_services = 1: 2 services are configured; raise max_services"),
        "{msg}"
    );
    // GOOD has 2 stable + 1 canary backends.
    let msg = error_text(&GOOD.replace("[agent]", "[agent]\nmax_backends = 2"));
    assert!(
        msg.contains("[agent]: max_backends = 2: the services list 3 backends"),
        "{msg}"
    );
    let c = parse(&GOOD.replace("[agent]", "[agent]\nmax_backends = 3\nmax_services = 1")).unwrap();
    assert_eq!((c.agent.max_services, c.agent.max_backends), (1, 3));
}

#[test]
fn defaults_are_documented_values() {
    let c = parse("[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"a\"\nvip = \"10.96.0.1:80\"\nstable = [\"10.0.0.1:80\"]\n").unwrap();
    assert_eq!(
        c.agent.control_socket,
        PathBuf::from(DEFAULT_CONTROL_SOCKET)
    );
    assert_eq!(c.agent.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
    assert_eq!(c.agent.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    assert_eq!(
        c.agent.metrics_buckets_per_octave,
        DEFAULT_BUCKETS_PER_OCTAVE
    );
    let s = &c.services[0];
    assert_eq!(s.weight.ppm(), 0);
    assert_eq!(s.cohort, CohortMode::Sticky);
    assert!(s.canary.is_empty() && s.always_canary.is_empty());
}

#[test]
fn a_config_without_services_is_valid() {
    let c = parse("[agent]\ninterfaces = [\"lo\"]\n").unwrap();
    assert!(c.services.is_empty());
}

/// Each value out of range, too large to convert, negative, NaN or
/// infinite gets an error naming the key and its range; none panics.
#[test]
fn every_number_and_duration_is_range_checked_before_conversion() {
    let plan = GOOD.replace("weight = \"5%\"\n", "").replace(
        "never_canary = []",
        "never_canary = []\n[service.rollout]\nsteps = [{ weight = \"1%\" }, { weight = \"2%\" }]\nINTERVAL\n[service.rollout.judge]\nJUDGE\n[service.breaker]\nBREAKER",
    );
    let with = |interval: &str, judge: &str, breaker: &str| {
        plan.replace("INTERVAL", interval)
            .replace("JUDGE", judge)
            .replace("BREAKER", breaker)
    };
    parse(&with("", "", "")).expect("the plan without extras is valid");
    let agent = |line: &str| GOOD.replace("[agent]", &format!("[agent]\n{line}"));
    let cases: Vec<(String, &str)> = vec![
        (
            agent("handshake_timeout = \"1e20s\""),
            "[agent]: handshake_timeout = \"1e20s\": must be a duration between 100ms and 120s",
        ),
        (
            agent("handshake_timeout = \"1e308d\""),
            "handshake_timeout = \"1e308d\": must be a duration between",
        ),
        (
            agent("handshake_timeout = \"NaNs\""),
            "handshake_timeout = \"NaNs\": not a duration",
        ),
        (
            agent("handshake_timeout = \"-1s\""),
            "handshake_timeout = \"-1s\": not a duration",
        ),
        (
            agent("conntrack_capacity = -1"),
            "[agent]: conntrack_capacity = -1: must be between 1024 and 67108864 entries",
        ),
        (
            agent("conntrack_capacity = 9223372036854775807"),
            "conntrack_capacity = 9223372036854775807: must be between",
        ),
        (
            agent("max_backends = 4294967297"),
            "[agent]: max_backends = 4294967297: must be between 1 and 4194304",
        ),
        (
            agent("metrics_buckets_per_octave = -16"),
            "metrics_buckets_per_octave = -16: must be 1, 2, 4, 8 or 16",
        ),
        (
            with("interval = \"1e20s\"", "", ""),
            "service \"web\": rollout.interval = \"1e20s\": must be a duration between 100ms and 10m",
        ),
        (
            with("", "", "").replace(
                "{ weight = \"2%\" }",
                "{ weight = \"2%\", hold = \"1e20s\" }",
            ),
            "service \"web\": rollout.steps[2].hold = \"1e20s\": must be a duration between 0s and 30d",
        ),
        (
            with("", "", "").replace(
                "{ weight = \"2%\" }",
                "{ weight = \"2%\", min_connections = -1 }",
            ),
            "rollout.steps[2].min_connections = -1: must be between 0 and",
        ),
        (
            with("fail_after = 0", "", ""),
            "rollout.fail_after = 0: removed: the judge's alpha now bounds false rollbacks over the whole rollout; delete fail_after",
        ),
        (
            with("", "min_latency_increase = \"1e20s\"", ""),
            "rollout.judge.min_latency_increase = \"1e20s\": must be a duration between 0s and 60s",
        ),
        (
            with("", "min_p99_increase = \"infs\"", ""),
            "rollout.judge.min_p99_increase = \"infs\": not a duration",
        ),
        (
            with("", "min_samples = 0", ""),
            "rollout.judge.min_samples = 0: must be between 1 and",
        ),
        (
            with("", "alpha = nan", ""),
            "rollout.judge.alpha = NaN: must be between 0 and 0.5",
        ),
        (
            with("", "max_p99_ratio = inf", ""),
            "rollout.judge.max_p99_ratio = inf: must be a ratio between 1.0 and 1000",
        ),
        (
            with("", "", "window = \"1e20s\""),
            "breaker.window = \"1e20s\": must be a duration between 10ms and 60s",
        ),
        (
            with("", "", "min_failures = 65536"),
            "breaker.min_failures = 65536: must be between 1 and 65535 failures",
        ),
        (
            GOOD.replace("cohort = \"sticky\"", "cohort = \"sticky\"\nsalt = -1"),
            "service \"web\": salt = -1: must be between 0 and 4294967295",
        ),
    ];
    for (text, expected) in cases {
        let msg = error_text(&text);
        assert!(
            msg.contains(expected),
            "expected {expected:?}\n got      {msg:?}"
        );
    }
}

#[test]
fn names_and_paths_are_bounded() {
    let long = "a".repeat(300);
    let msg = error_text(&GOOD.replace("name = \"web\"", &format!("name = \"{long}\"")));
    assert!(
        msg.contains("service #1: name = \"aaaa")
            && msg.contains("aaa\"…:")
            && msg.contains("300 characters long; at most 64 (it names the service's state file)"),
        "{msg}"
    );
    let name64 = "a".repeat(MAX_SERVICE_NAME);
    parse(&GOOD.replace("name = \"web\"", &format!("name = \"{name64}\"")))
        .expect("64 characters is the limit");
    let msg = error_text(&GOOD.replace("[\"lo\"]", "[\"an-interface-name-too-long\"]"));
    assert!(
        msg.contains("[agent]: interfaces = \"an-interface-name-too-long\"")
            && msg.contains("at most 15"),
        "{msg}"
    );
    let msg = error_text(&GOOD.replace(
        "/run/canary/control.sock",
        &format!("/run/{}.sock", "s".repeat(200)),
    ));
    assert!(
        msg.contains("[agent]: control_socket = ") && msg.contains("at most 107"),
        "{msg}"
    );
    let msg = error_text(&GOOD.replace(
        "[agent]",
        "[agent]\nwebhook_url = \"http://relay/x\\r\\nX-Injected: 1\"",
    ));
    assert!(
        msg.contains("[agent]: webhook_url = ") && msg.contains("printable ASCII"),
        "{msg}"
    );
}

#[test]
fn an_oversized_config_file_is_refused_unread() {
    let err = Config::load(Path::new("/dev/zero"), &[]).expect_err("/dev/zero is no config");
    assert!(
        err.to_string()
            .contains("cannot read config file /dev/zero"),
        "{err}"
    );
}

#[test]
fn a_config_that_never_arrives_times_out_instead_of_stopping_the_agent() {
    let dir = std::env::temp_dir().join(format!("canary-cfg-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("agent.toml");
    let c = std::ffi::CString::new(fifo.clone().into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = rt
        .block_on(load_within(&fifo, &[], Duration::from_millis(200)))
        .expect_err("nobody writes the FIFO");
    assert!(started.elapsed() < Duration::from_secs(2));
    let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        msg.contains("cannot read config file") && msg.contains("took longer than 0.2s"),
        "{msg}"
    );
    // Release the blocked reader: a writer that opens and closes.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo));
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(dir);
}

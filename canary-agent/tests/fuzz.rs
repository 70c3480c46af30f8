//! Generated-input tests of the two parsers that read what outsiders
//! write: the config (`Config::parse`, run by `--check`, at start and on
//! SIGHUP) and the control protocol (`control::parse_request`, for every
//! line a client sends). No input may panic, and every answer must be
//! well-formed.
//!
//! Inputs come from a small deterministic generator (fixed seeds, so a
//! failure reproduces): structure-aware ones that put hostile values
//! (extreme and negative numbers, NaN, infinities, huge and unicode
//! strings, deep nesting) into valid documents, byte-level mutations of
//! valid documents, and random text. Each test counts what it ran and
//! asserts the count, so it cannot pass by running nothing.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    time::Instant,
};

use canary_agent::{
    config::{Config, ConfigError, MAX_SERVICE_NAME},
    control::{Request, Response, parse_request},
};

/// Inputs per parser; together well over a million.
const CONFIG_INPUTS: u64 = 400_000;
const REQUEST_INPUTS: u64 = 700_000;

/// splitmix64: tiny, fast, and good enough to spread inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "a remainder modulo a usize fits usize"
    )]
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.below(items.len())]
    }
}

/// Values that have broken parsers before: extremes, NaN, wrong types.
const INTS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "16",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967295",
    "4294967296",
    "65535",
    "65536",
    "1024",
    "1023",
    "67108864",
    "67108865",
    "1048577",
    "1000000000001",
];
const FLOATS: &[&str] = &[
    "nan",
    "+inf",
    "-inf",
    "-0.0",
    "0.0",
    "1e308",
    "5e-324",
    "0.5",
    "0.4999999",
    "1.0",
    "1000.0",
    "1000.1",
    "1",
];
const STRINGS: &[&str] = &[
    "\"\"",
    "\"1e20s\"",
    "\"1e308d\"",
    "\"NaNs\"",
    "\"infs\"",
    "\"-1s\"",
    "\"0s\"",
    "\"1e-320ms\"",
    "\"18446744073709551616s\"",
    "\"99ms\"",
    "\"100ms\"",
    "\"120s\"",
    "\"120.001s\"",
    "\"10m\"",
    "\"30d\"",
    "\"30.000001d\"",
    "\"s\"",
    "\"ms\"",
    "\" 3s \"",
    "\"３s\"",
    "\"150%\"",
    "\"0.00001%\"",
    "\"1000001ppm\"",
    "\"99999999999999999999999ppm\"",
    "\"-1%\"",
    "\"1e2%\"",
    "\"100.0000%\"",
    "\"5%\"",
    "\"2500ppm\"",
    "\"lo\"",
    "\"lo:xdp\"",
    "\"10.96.0.10:80\"",
    "\"10.96.0.10:0\"",
    "\"255.255.255.255:80\"",
    "\"[::1]:80\"",
    "\"10.0.0.0/33\"",
    "\"0.0.0.0/0\"",
    "\"web/../../etc/passwd\"",
    "\"ünïcødé-名前\"",
    "\"a\\u0000b\"",
    "\"a\\nb\"",
    "\"http://127.0.0.1:1/x\"",
    "\"http://x/\\r\\nX: y\"",
    "\"https://x\"",
    "\"http://\"",
    "\"/dev/null\"",
    "\"/proc/self/fd/0\"",
    "\"/tmp\"",
    "\"root\"",
    "\"no-such-group-canary-fuzz\"",
    "\"manual\"",
    "\"per-connection\"",
];
const OTHERS: &[&str] = &[
    "true",
    "[]",
    "[[]]",
    "{}",
    "{ name = \"lo\", mode = \"xdp\" }",
    "[{ name = \"lo\", mode = \"dpdk\" }]",
    "[1, \"x\"]",
    "1979-05-27T07:32:00Z",
];

/// A hostile value for a key whose valid value is `good`: mostly of the
/// same TOML type (so it reaches validation), now and then any type.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "exponents in -20..20, and random bits read as an i64 on purpose"
)]
fn hostile_value(rng: &mut Rng, good: &str) -> String {
    if rng.chance(200) {
        // Rare, because large inputs are slow to generate and parse.
        return match rng.below(3) {
            0 => format!("\"{}\"", "a".repeat(rng.below(5000))),
            1 => {
                let depth = rng.below(300);
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            }
            _ => format!(
                "[{}]",
                (0..rng.below(40))
                    .map(|i| format!("\"10.0.{}.{}:80\"", i / 250, i % 250 + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    let pool = match good.as_bytes().first() {
        _ if rng.chance(8) => [INTS, FLOATS, STRINGS, OTHERS][rng.below(4)],
        Some(b'"') => STRINGS,
        Some(b'[') => return format!("[{}]", rng.pick(STRINGS)),
        Some(b't') => OTHERS,
        _ if good.contains('.') => FLOATS,
        _ => INTS,
    };
    match rng.below(8) {
        0 if std::ptr::eq(pool, STRINGS) => format!(
            "\"{}{}\"",
            rng.next() as f64 * 10f64.powi(rng.below(40) as i32 - 20),
            ["s", "ms", "m", "h", "d", "%", "ppm"][rng.below(7)]
        ),
        0 if std::ptr::eq(pool, INTS) => format!("{}", rng.next() as i64 >> rng.below(64)),
        _ => rng.pick(pool).to_string(),
    }
}

/// (table, key, a valid value) of every config key.
const AGENT_KEYS: &[(&str, &str)] = &[
    ("interfaces", "[\"lo\"]"),
    ("control_socket", "\"/run/canary-fuzz/none/control.sock\""),
    ("control_group", "\"root\""),
    ("metrics_addr", "\"127.0.0.1:9477\""),
    ("metrics_buckets_per_octave", "4"),
    ("conntrack_capacity", "262144"),
    ("udp_conntrack_capacity", "65536"),
    ("max_services", "16384"),
    ("max_backends", "16383"),
    ("handshake_timeout", "\"3s\""),
    ("state_dir", "\"/run/canary-fuzz/none/state\""),
    ("webhook_url", "\"http://127.0.0.1:9/hook\""),
];
const SERVICE_KEYS: &[(&str, &str)] = &[
    ("vip", "\"10.96.0.10:80\""),
    ("stable", "[\"10.0.1.10:8080\"]"),
    ("canary", "[\"10.0.2.10:8080\"]"),
    ("weight", "\"5%\""),
    ("cohort", "\"sticky\""),
    ("always_canary", "[\"192.168.10.0/24\"]"),
    ("never_canary", "[]"),
    ("salt", "7"),
    ("protocol", "\"udp\""),
    ("udp_idle_timeout", "\"30s\""),
    ("udp_response_timeout", "\"3s\""),
];
const ROLLOUT_KEYS: &[(&str, &str)] = &[("interval", "\"1s\"")];
const STEP_KEYS: &[(&str, &str)] = &[
    ("weight", "\"1%\""),
    ("hold", "\"10m\""),
    ("min_connections", "100"),
    ("gate", "\"manual\""),
];
const JUDGE_KEYS: &[(&str, &str)] = &[
    ("min_samples", "50"),
    ("alpha", "0.001"),
    ("min_failure_increase", "\"1%\""),
    ("min_latency_ratio", "1.2"),
    ("min_latency_increase", "\"1ms\""),
    ("max_p99_ratio", "2.0"),
    ("min_p99_increase", "\"10ms\""),
    ("hard_max_failure_ratio", "\"50%\""),
];
const BREAKER_KEYS: &[(&str, &str)] = &[
    ("enabled", "true"),
    ("min_failures", "3"),
    ("failure_ratio", "\"50%\""),
    ("window", "\"1s\""),
];

/// Key lines of one table: each key left out (unless `required`), valid,
/// or hostile, and now and then an unknown key.
fn table(rng: &mut Rng, keys: &[(&str, &str)], hostility: usize, required: &[&str]) -> String {
    let mut out = String::new();
    for (key, good) in keys {
        match rng.below(10) {
            0..=2 if !required.contains(key) || rng.chance(20) => {}
            n if n < 3 + hostility => {
                out.push_str(&format!("{key} = {}\n", hostile_value(rng, good)));
            }
            _ => out.push_str(&format!("{key} = {good}\n")),
        }
    }
    if rng.chance(30) {
        out.push_str(&format!("surprise = {}\n", hostile_value(rng, "1")));
    }
    out
}

/// A config document with hostile values in valid structure.
fn structured_config(rng: &mut Rng) -> String {
    let hostility = rng.below(4);
    let mut text = String::from("[agent]\ninterfaces = [\"lo\"]\n");
    text.push_str(&table(rng, &AGENT_KEYS[1..], hostility, &[]));
    for i in 0..rng.below(4) {
        text.push_str("[[service]]\n");
        let name = match rng.below(8) {
            0 => hostile_value(rng, "\"\""),
            1 => format!("\"{}\"", "n".repeat(MAX_SERVICE_NAME - 2 + rng.below(5))),
            _ => format!("\"svc-{i}\""),
        };
        text.push_str(&format!("name = {name}\n"));
        text.push_str(&table(rng, SERVICE_KEYS, hostility, &["vip", "stable"]));
        if rng.chance(2) {
            text.push_str("[service.rollout]\n");
            text.push_str(&table(rng, ROLLOUT_KEYS, hostility, &[]));
            let steps: Vec<String> = (0..rng.below(5))
                .map(|_| {
                    let body = table(rng, STEP_KEYS, hostility, &["weight"])
                        .trim_end()
                        .replace('\n', ", ");
                    format!("{{ {body} }}")
                })
                .collect();
            text.push_str(&format!("steps = [{}]\n", steps.join(", ")));
            if rng.chance(2) {
                text.push_str("[service.rollout.judge]\n");
                text.push_str(&table(rng, JUDGE_KEYS, hostility, &[]));
            }
        }
        if rng.chance(2) {
            text.push_str("[service.breaker]\n");
            text.push_str(&table(rng, BREAKER_KEYS, hostility, &[]));
        }
    }
    text
}

/// A valid document, then damaged at the byte level.
#[expect(
    clippy::cast_possible_truncation,
    reason = "a random byte is the low 8 bits of the generator"
)]
fn mutated(rng: &mut Rng, valid: &str) -> String {
    const TOKENS: &[&str] = &[
        "[",
        "]",
        "[[",
        "]]",
        "=",
        "\"",
        "'",
        "{",
        "}",
        ",",
        ".",
        "#",
        "\n",
        "\\",
        "\\u",
        "\0",
        "[[service]]\n",
        "[agent]\n",
        "\"\"\"",
        "1e999",
        "-",
        "é",
        "\u{feff}",
    ];
    let mut bytes = valid.as_bytes().to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 => bytes.insert(at, rng.next() as u8),
            2 => {
                let end = (at + rng.below(20)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let token = rng.pick(TOKENS).as_bytes().to_vec();
                bytes.splice(at..at, token);
            }
            _ => bytes.truncate(at),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Random text from an alphabet heavy in TOML and JSON syntax.
#[expect(
    clippy::cast_possible_truncation,
    reason = "a random code point from the low 32 bits of the generator"
)]
fn random_text(rng: &mut Rng) -> String {
    const ALPHABET: &[u8] = b"[]{}=\",.:#\n\\ 0123456789abcdeflmnorstuvwxyz-+_%eE";
    (0..rng.below(200))
        .map(|_| {
            if rng.chance(20) {
                char::from_u32(rng.next() as u32 % 0x11_0000).unwrap_or('?')
            } else {
                char::from(ALPHABET[rng.below(ALPHABET.len())])
            }
        })
        .collect()
}

/// Runs `f(input)`; a panic fails the test with the input that caused it.
fn no_panic<T>(what: &str, input: &str, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| panic!("{what} panicked on input {input:?}"))
}

#[test]
fn the_config_parser_survives_generated_configs() {
    let started = Instant::now();
    let mut rng = Rng(0x00c0_ffee);
    let valid = "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                 stable = [\"10.0.1.10:8080\"]\ncanary = [\"10.0.2.10:8080\"]\n[service.rollout]\n\
                 steps = [{ weight = \"1%\", hold = \"10m\" }, { weight = \"5%\", gate = \"manual\" }]\n\
                 [service.rollout.judge]\nalpha = 0.001\n[service.breaker]\nwindow = \"1s\"\n";
    let (mut ran, mut accepted, mut invalid) = (0u64, 0u64, 0u64);
    let path = Path::new("fuzz.toml");
    while ran < CONFIG_INPUTS {
        let text = match rng.below(10) {
            0..=5 => structured_config(&mut rng),
            6..=8 => mutated(&mut rng, valid),
            _ => random_text(&mut rng),
        };
        let flags: &[String] = if rng.chance(50) {
            &["lo:xdp".to_string()]
        } else {
            &[]
        };
        let result = no_panic("Config::parse", &text, || Config::parse(&text, path, flags));
        ran += 1;
        match result {
            Ok(c) => {
                accepted += 1;
                for s in &c.services {
                    assert!(
                        !s.name.is_empty() && s.name.len() <= MAX_SERVICE_NAME,
                        "accepted a service name that cannot name a state file: {text:?}"
                    );
                    if let Some(plan) = &s.rollout {
                        assert!(
                            plan.steps.windows(2).all(|w| w[0].weight < w[1].weight),
                            "accepted falling step weights: {text:?}"
                        );
                    }
                }
                assert!(
                    c.agent.handshake_timeout.as_millis() >= 100
                        && c.agent.handshake_timeout.as_secs() <= 120,
                    "accepted handshake_timeout {:?}",
                    c.agent.handshake_timeout
                );
            }
            Err(ConfigError::Invalid { key, .. }) => {
                invalid += 1;
                assert!(!key.is_empty(), "an error without a key for {text:?}");
            }
            Err(_) => {}
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "config parser: {ran} inputs in {elapsed:.1?} ({accepted} accepted, {invalid} rejected by \
         validation, the rest by TOML)"
    );
    assert_eq!(ran, CONFIG_INPUTS);
    // The generator reaches validation, not only the TOML parser.
    assert!(
        accepted > CONFIG_INPUTS / 100 && invalid > CONFIG_INPUTS / 10,
        "the generator is too hostile to reach validation: {accepted} accepted, {invalid} invalid"
    );
}

/// A request line with hostile fields in valid JSON structure.
fn structured_request(rng: &mut Rng) -> String {
    const CMDS: &[&str] = &[
        "\"status\"",
        "\"set-weight\"",
        "\"pause\"",
        "\"resume\"",
        "\"approve\"",
        "\"promote\"",
        "\"rollback\"",
        "\"reload\"",
        "\"explode\"",
        "\"\"",
        "\"STATUS\"",
        "\"status\\u0000\"",
    ];
    const VALUES: &[&str] = &[
        "null",
        "true",
        "0",
        "1",
        "-1",
        "4294967296",
        "1e400",
        "-0",
        "1.0",
        "\"\"",
        "\"web\"",
        "\"5%\"",
        "\"150%\"",
        "\"99999999999999999999ppm\"",
        "\"0.00001%\"",
        "\"\\ud800\"",
        "\"ünïcødé\"",
        "[]",
        "{}",
        "{\"v\":1}",
    ];
    let mut fields: Vec<String> = Vec::new();
    let value = |rng: &mut Rng| -> String {
        match rng.below(8) {
            // Rare: large inputs are slow to generate and parse.
            _ if rng.chance(100) => format!("\"{}\"", "w".repeat(rng.below(70_000))),
            _ if rng.chance(100) => {
                let depth = rng.below(400);
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            }
            0 => format!("{}", rng.next()),
            _ => rng.pick(VALUES).to_string(),
        }
    };
    if !rng.chance(10) {
        let v = if rng.chance(4) {
            value(rng)
        } else {
            "1".to_string()
        };
        fields.push(format!("\"v\":{v}"));
    }
    if !rng.chance(10) {
        let cmd = if rng.chance(4) {
            value(rng)
        } else {
            rng.pick(CMDS).to_string()
        };
        fields.push(format!("\"cmd\":{cmd}"));
    }
    for key in ["service", "weight", "extra"] {
        if rng.chance(2) {
            let v = value(rng);
            fields.push(format!("\"{key}\":{v}"));
        }
    }
    if rng.chance(20) {
        // Duplicate keys.
        fields.push("\"v\":1".to_string());
    }
    format!("{{{}}}", fields.join(","))
}

#[test]
fn the_control_decoder_survives_generated_requests() {
    let started = Instant::now();
    let mut rng = Rng(0x5eed_0001);
    let valid = r#"{"v":1,"cmd":"set-weight","service":"web","weight":"0.25%"}"#;
    let (mut ran, mut commands) = (0u64, 0u64);
    while ran < REQUEST_INPUTS {
        let line = match rng.below(10) {
            0..=5 => structured_request(&mut rng),
            6..=8 => mutated(&mut rng, valid),
            _ => random_text(&mut rng),
        };
        let result = no_panic("parse_request", &line, || parse_request(&line));
        ran += 1;
        match result {
            Ok(cmd) => {
                commands += 1;
                if let Request::SetWeight { weight, .. } = cmd {
                    assert!(weight.ppm() <= 1_000_000, "weight above 100% from {line:?}");
                }
            }
            Err(resp) => {
                let Response::Error(error) = &resp else {
                    panic!("a success answer as the error for {line:?}: {resp:?}");
                };
                assert!(
                    !error.message.is_empty(),
                    "an error answer without a message for {line:?}: {resp:?}"
                );
                no_panic("serialising the answer", &line, || {
                    serde_json::to_string(&resp).expect("an answer serialises")
                });
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!("control decoder: {ran} inputs in {elapsed:.1?} ({commands} valid commands)");
    assert_eq!(ran, REQUEST_INPUTS);
    assert!(
        commands > REQUEST_INPUTS / 100,
        "the generator never reaches a valid command: {commands}"
    );
}

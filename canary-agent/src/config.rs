//! The agent's TOML config: parsing, and validation of everything before
//! anything touches the kernel.
//!
//! Parsing (`Raw*`, serde, unknown keys rejected) and validation (into
//! [`Config`]) are separate so that every semantic error can name the
//! service, the key, the value and the fix.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use canary_common::{
    flow::CT_DEFAULT_CAPACITY,
    service::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, MAX_BACKENDS, MAX_RULES},
};
use serde::Deserialize;

pub use crate::units::{Weight, WeightError};
use crate::units::{duration_secs, show_duration};

/// Default path of the control socket (`canaryctl`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/canary/control.sock";
/// Default Prometheus listen address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// Default time a SYN may wait for its SYN-ACK before the connection counts
/// as failed (`reason="timeout"`). The client's first SYN retry comes at 1 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default directory of the agent's persisted state (rollbacks).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/canary";
/// Default bpffs directory of the pinned maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/canary";
/// Default breaker: this many canary failures in one window…
pub const DEFAULT_BREAKER_MIN_FAILURES: u16 = 3;
/// …that are at least this share of the window's canary attempts…
pub const DEFAULT_BREAKER_FAILURE_RATIO: &str = "50%";
/// …trip it. Windows restart every this long.
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(1);

/// Default exported histogram resolution (buckets per doubling).
pub const DEFAULT_BUCKETS_PER_OCTAVE: u32 = 4;
/// Conntrack capacity bounds (entries; two per flow).
pub const MIN_CONNTRACK_CAPACITY: u32 = 1024;
/// See [`MIN_CONNTRACK_CAPACITY`].
pub const MAX_CONNTRACK_CAPACITY: u32 = 1 << 26;
/// Upper bound of `[agent] max_services`.
pub const MAX_MAX_SERVICES: u32 = 1 << 20;
/// Upper bound of `[agent] max_backends`.
pub const MAX_MAX_BACKENDS: u32 = 1 << 22;
/// Longest service name. State files are `<name>.json` beside a temporary
/// `.<name>.json.tmp`, so with this bound every name fits a file name
/// (NAME_MAX is 255 bytes) and a metric label stays readable.
pub const MAX_SERVICE_NAME: usize = 64;
/// Longest interface name (the kernel's IFNAMSIZ is 16 with the NUL).
pub const MAX_INTERFACE_NAME: usize = 15;
/// Most interfaces in `[agent] interfaces`.
pub const MAX_INTERFACES: usize = 256;
/// Longest `control_socket` path: a Unix socket address holds 108 bytes
/// with the NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest `state_dir` path, so that every state file path under it stays
/// far below PATH_MAX.
pub const MAX_STATE_DIR: usize = 1024;
/// Longest `webhook_url` or `control_group`.
pub const MAX_TEXT: usize = 2048;
/// Most steps of a rollout plan.
pub const MAX_STEPS: usize = 100;
/// Longest `hold` of a rollout step.
pub const MAX_HOLD: Duration = Duration::from_secs(30 * 86_400);
/// Upper bound of the connection and sample counts in a plan
/// (`min_connections`, `judge.min_samples`): a trillion.
pub const MAX_COUNT: i64 = 1_000_000_000_000;
/// Upper bound of the judge's latency ratios.
pub const MAX_RATIO: f64 = 1000.0;
/// Longest the agent waits for its config to be read and validated.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest config file read: far beyond any real config, small enough that
/// `--config /dev/zero` cannot exhaust memory.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// A config error. `Display` says what is wrong and how to fix it; the
/// underlying cause, if any, is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{path} is not a valid canary config")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A value that parses but is not acceptable.
    #[error("{section}: {key} = {value}: {problem}")]
    Invalid {
        /// `[agent]` or `service "NAME"`.
        section: String,
        /// The key, with its table path and index where needed
        /// (`breaker.window`, `rollout.steps[2].hold`).
        key: String,
        /// The offending value, quoted as in the file.
        value: String,
        /// What is wrong, and the fix.
        problem: String,
    },
}

/// How a service assigns clients to cohorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CohortMode {
    /// Keyed on the client address: a client stays in its cohort, and
    /// raising the weight only adds clients to canary.
    #[default]
    Sticky,
    /// Keyed on the 5-tuple: each connection draws anew.
    PerConnection,
}

impl fmt::Display for CohortMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CohortMode::Sticky => "sticky",
            CohortMode::PerConnection => "per-connection",
        })
    }
}

/// An IPv4 prefix such as `192.168.10.0/24`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Prefix {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            if addr.contains(':') {
                "IPv6 prefixes are not supported yet (IPv4 only)".to_string()
            } else {
                "not an IPv4 prefix; write it like \"192.168.10.0/24\"".to_string()
            }
        })?;
        let len: u8 = match len {
            None => 32,
            Some(l) => match l.parse() {
                Ok(l) if l <= 32 => l,
                _ => return Err("the prefix length must be 0 to 32".to_string()),
            },
        };
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(format!(
                "host bits are set; did you mean \"{network}/{len}\"?"
            ));
        }
        Ok(Ipv4Prefix { addr, len })
    }
}

/// Validated agent settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Client-facing interfaces where the programs are attached, and how.
    pub interfaces: Vec<InterfaceConfig>,
    /// Control socket path (`canaryctl --socket`).
    pub control_socket: PathBuf,
    /// Group whose members may use the control socket (root and the
    /// agent's own user always may).
    pub control_group: Option<String>,
    /// Prometheus listen address (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    /// Exported histogram buckets per doubling: 1, 2, 4, 8 or 16.
    pub metrics_buckets_per_octave: u32,
    /// Conntrack capacity in entries (two per flow).
    pub conntrack_capacity: u32,
    /// Most services the maps hold.
    pub max_services: u32,
    /// Most backends across all services (each service × cohort × backend
    /// has its own counters).
    pub max_backends: u32,
    /// A handshake not completed within this counts as failed.
    pub handshake_timeout: Duration,
    /// Where rollbacks are persisted, so a restart never re-raises a
    /// rolled-back canary.
    pub state_dir: PathBuf,
    /// Where rollout state changes are POSTed as JSON, if anywhere.
    pub webhook: Option<crate::events::Webhook>,
    /// The bpffs directory where maps and links are pinned, so the data
    /// plane outlives the agent.
    pub bpffs_dir: PathBuf,
}

/// Where client packets enter the data plane on an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IngressMode {
    /// TC ingress (works on every interface and every checksum state).
    #[default]
    Tc,
    /// XDP, before the kernel allocates an skb. Replies still go through TC
    /// egress.
    Xdp,
}

impl IngressMode {
    /// The name used in config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            IngressMode::Tc => "tc",
            IngressMode::Xdp => "xdp",
        }
    }

    /// The mode named `name` in config, if any.
    fn parse(name: &str) -> Option<IngressMode> {
        [IngressMode::Tc, IngressMode::Xdp]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// One client-facing interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Interface name, as `ip link` shows it.
    pub name: String,
    /// Where client packets are steered on it.
    pub mode: IngressMode,
}

/// Whether a rollout step waits for an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Enter the step when the previous one passed.
    Auto,
    /// Wait in `awaiting-approval` for `canaryctl approve`.
    Manual,
}

/// One step of a rollout plan.
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    /// Canary weight during the step.
    pub weight: Weight,
    /// At least this long at the step…
    pub hold: Duration,
    /// …with at least this many canary connections judged, before the next.
    pub min_connections: u64,
    /// Whether entering the step waits for an operator.
    pub gate: Gate,
}

/// A plan-driven rollout: the judge compares canary with stable every
/// `interval`; a step passes after its hold with enough connections; the
/// last passed step promotes (100 %); a failing judgement rolls back.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutConfig {
    /// Steps, in order.
    pub steps: Vec<StepConfig>,
    /// Judgement interval.
    pub interval: Duration,
    /// Failing judgements in a row that roll back.
    pub fail_after: u32,
    /// The judge's thresholds.
    pub judge: crate::judge::JudgeConfig,
}

/// The line-rate breaker of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Off: the data plane never cuts the canary off by itself.
    pub enabled: bool,
    /// Canary failures in one window that trip it…
    pub min_failures: u16,
    /// …if they are also at least this share of the window's canary
    /// connection attempts.
    pub failure_ratio: Weight,
    /// Window length.
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            min_failures: DEFAULT_BREAKER_MIN_FAILURES,
            failure_ratio: DEFAULT_BREAKER_FAILURE_RATIO
                .parse()
                .unwrap_or(Weight::from_ppm_clamped(500_000)),
            window: DEFAULT_BREAKER_WINDOW,
        }
    }
}

/// One validated service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    /// Unique name (a metric label later).
    pub name: String,
    /// Where clients connect.
    pub vip: SocketAddrV4,
    /// Stable backends, in order.
    pub stable: Vec<SocketAddrV4>,
    /// Canary backends, in order.
    pub canary: Vec<SocketAddrV4>,
    /// Share of new connections (or clients, in sticky mode) sent to canary.
    pub weight: Weight,
    /// How cohorts are assigned.
    pub cohort: CohortMode,
    /// Sources always sent to canary.
    pub always_canary: Vec<Ipv4Prefix>,
    /// Sources never sent to canary.
    pub never_canary: Vec<Ipv4Prefix>,
    /// Hash salt: decides which clients fall in the canary share.
    pub salt: u32,
    /// The data plane's own cut-off.
    pub breaker: BreakerConfig,
    /// The plan that drives the weight, if any.
    pub rollout: Option<RolloutConfig>,
}

/// A validated config: every value in range, every reference resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[agent]`.
    pub agent: AgentConfig,
    /// `[[service]]` entries, in file order.
    pub services: Vec<ServiceConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: RawAgent,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    interfaces: Vec<RawInterface>,
    control_socket: Option<PathBuf>,
    control_group: Option<String>,
    metrics_addr: Option<String>,
    // Integers are read as TOML's own i64 and range-checked before any
    // conversion, so a negative or huge value gets an error naming the key
    // and its range rather than serde's "expected u32".
    metrics_buckets_per_octave: Option<i64>,
    conntrack_capacity: Option<i64>,
    max_services: Option<i64>,
    max_backends: Option<i64>,
    handshake_timeout: Option<String>,
    state_dir: Option<PathBuf>,
    webhook_url: Option<String>,
    bpffs_dir: Option<PathBuf>,
}

/// An `interfaces` entry: `"eth0"` (TC) or `{ name = "eth0", mode = "xdp" }`.
struct RawInterface {
    name: String,
    mode: Option<String>,
}

impl RawInterface {
    /// `NAME` or `NAME:MODE`, the command-line form (`:` cannot occur in an
    /// interface name).
    fn from_flag(flag: &str) -> RawInterface {
        match flag.split_once(':') {
            Some((name, mode)) => RawInterface {
                name: name.to_string(),
                mode: Some(mode.to_string()),
            },
            None => RawInterface {
                name: flag.to_string(),
                mode: None,
            },
        }
    }
}

impl<'de> Deserialize<'de> for RawInterface {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            name: String,
            mode: Option<String>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawInterface;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"an interface name like "eth0", or a table like { name = "eth0", mode = "xdp" }"#)
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<RawInterface, E> {
                Ok(RawInterface {
                    name: name.to_string(),
                    mode: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawInterface, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawInterface {
                    name: t.name,
                    mode: t.mode,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    stable: Vec<String>,
    #[serde(default)]
    canary: Vec<String>,
    #[serde(default)]
    weight: Option<RawWeight>,
    #[serde(default)]
    cohort: Option<String>,
    #[serde(default)]
    always_canary: Vec<String>,
    #[serde(default)]
    never_canary: Vec<String>,
    salt: Option<i64>,
    #[serde(default)]
    breaker: Option<RawBreaker>,
    #[serde(default)]
    rollout: Option<RawRollout>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    steps: Vec<RawStep>,
    interval: Option<String>,
    fail_after: Option<i64>,
    judge: Option<RawJudge>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    weight: String,
    hold: Option<String>,
    min_connections: Option<i64>,
    gate: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJudge {
    min_samples: Option<i64>,
    alpha: Option<f64>,
    min_failure_increase: Option<String>,
    min_latency_ratio: Option<f64>,
    min_latency_increase: Option<String>,
    max_p99_ratio: Option<f64>,
    min_p99_increase: Option<String>,
    hard_max_failure_ratio: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: Option<bool>,
    min_failures: Option<i64>,
    failure_ratio: Option<String>,
    window: Option<String>,
}

/// A weight as written: a string, or a bare number we refuse with a hint.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawWeight {
    Text(String),
    Number(f64),
}

impl Config {
    /// Reads and validates `path`. `interfaces` (from the command line), if
    /// not empty, replaces `[agent] interfaces`.
    pub fn load(path: &Path, interfaces: &[String]) -> Result<Config, ConfigError> {
        use std::io::Read as _;
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read_err(std::io::Error::other(format!(
                "larger than {MAX_CONFIG_BYTES} bytes; is it the right file?"
            ))));
        }
        Config::parse(&text, path, interfaces)
    }

    /// [`Config::load`] on a blocking thread, for the agent's runtime:
    /// validation resolves `control_group` through NSS, which may block on
    /// the network (LDAP, sssd), and reads files.
    ///
    /// Gives up after [`LOAD_TIMEOUT`]: the agent's loop waits for the
    /// result, and a config path that turned into a FIFO without a writer,
    /// a hung network file system or a hung NSS server must not stop it.
    pub async fn load_off_thread(
        path: &Path,
        interfaces: &[String],
    ) -> Result<Config, ConfigError> {
        load_within(path, interfaces, LOAD_TIMEOUT).await
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path, interfaces: &[String]) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if !interfaces.is_empty() {
            raw.agent.interfaces = interfaces
                .iter()
                .map(|i| RawInterface::from_flag(i))
                .collect();
        }
        let agent = validate_agent(raw.agent)?;
        let services = validate_services(raw.services)?;
        if services.len() > agent.max_services as usize {
            return Err(invalid(
                "[agent]",
                "max_services",
                agent.max_services,
                format!(
                    "{} services are configured; raise max_services (restart needed)",
                    services.len()
                ),
            ));
        }
        let backends: usize = services
            .iter()
            .map(|s| s.stable.len() + s.canary.len())
            .sum();
        if backends > agent.max_backends as usize {
            return Err(invalid(
                "[agent]",
                "max_backends",
                agent.max_backends,
                format!(
                    "the services list {backends} backends (counted per service and cohort); \
                     raise max_backends (restart needed)"
                ),
            ));
        }
        Ok(Config { agent, services })
    }
}

/// See [`Config::load_off_thread`].
async fn load_within(
    path: &Path,
    interfaces: &[String],
    timeout: Duration,
) -> Result<Config, ConfigError> {
    let (owned, flags) = (path.to_owned(), interfaces.to_vec());
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let load = tokio::task::spawn_blocking(move || Config::load(&owned, &flags));
    match tokio::time::timeout(timeout, load).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(read_err(std::io::Error::other(e))),
        Err(_) => Err(read_err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "reading and validating it took longer than {}s (a FIFO, a hung network file \
                 system, or a hung group look-up?)",
                timeout.as_secs_f64()
            ),
        ))),
    }
}

fn invalid(
    section: &str,
    key: impl Into<String>,
    value: impl fmt::Display,
    problem: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        section: section.to_string(),
        key: key.into(),
        value: value.to_string(),
        problem: problem.into(),
    }
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// `value` if it lies in `min..=max`, converted; otherwise an error naming
/// the key and the range. Checked on the i64 TOML gives us, before any
/// conversion can wrap or truncate.
fn int_in<T: TryFrom<i64>>(
    section: &str,
    key: impl Into<String>,
    value: i64,
    min: i64,
    max: i64,
    unit: &str,
) -> Result<T, ConfigError> {
    let key = key.into();
    let out_of_range = || {
        invalid(
            section,
            key.clone(),
            value,
            format!("must be between {min} and {max}{unit}"),
        )
    };
    if !(min..=max).contains(&value) {
        return Err(out_of_range());
    }
    T::try_from(value).map_err(|_| out_of_range())
}

/// A duration key: parsed, then checked against `min..=max` while still a
/// float, so "1e20s" or "1e308d" is an error naming the key, not a panic in
/// `Duration::from_secs_f64`.
fn duration_in(
    section: &str,
    key: impl Into<String>,
    text: &str,
    (min, max): (Duration, Duration),
    example: &str,
) -> Result<Duration, ConfigError> {
    let key = key.into();
    let range = format!("between {} and {}", show_duration(min), show_duration(max));
    let Some(secs) = duration_secs(text) else {
        return Err(invalid(
            section,
            key,
            quoted(text),
            format!("not a duration; write it like \"{example}\" ({range})"),
        ));
    };
    let out_of_range = || {
        invalid(
            section,
            key.clone(),
            quoted(text),
            format!("must be a duration {range}, e.g. \"{example}\""),
        )
    };
    if secs < min.as_secs_f64() || secs > max.as_secs_f64() {
        return Err(out_of_range());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| out_of_range())
}

/// A string key's length in bytes, bounded.
fn length_in(
    section: &str,
    key: &str,
    text: &str,
    max: usize,
    what: &str,
) -> Result<(), ConfigError> {
    if text.is_empty() {
        return Err(invalid(
            section,
            key,
            quoted(text),
            format!("{what} is empty"),
        ));
    }
    if text.len() > max {
        return Err(invalid(
            section,
            key,
            shown(text),
            format!("{what} is {} bytes long; at most {max}", text.len()),
        ));
    }
    Ok(())
}

/// `text` quoted, cut to 40 characters and an ellipsis if longer: a huge
/// value would drown the message.
fn shown(text: &str) -> String {
    let short = truncated(text, 40);
    if short.len() < text.len() {
        format!("{}…", quoted(short))
    } else {
        quoted(text)
    }
}

/// The first `n` characters of `text`, for quoting a huge value.
fn truncated(text: &str, n: usize) -> &str {
    match text.char_indices().nth(n) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

fn validate_agent(raw: RawAgent) -> Result<AgentConfig, ConfigError> {
    const S: &str = "[agent]";
    if raw.interfaces.is_empty() {
        return Err(invalid(
            S,
            "interfaces",
            "[]",
            "name at least one client-facing interface, e.g. [\"eth0\"]",
        ));
    }
    if raw.interfaces.len() > MAX_INTERFACES {
        return Err(invalid(
            S,
            "interfaces",
            format!("{} interfaces", raw.interfaces.len()),
            format!("at most {MAX_INTERFACES} interfaces"),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut interfaces = Vec::with_capacity(raw.interfaces.len());
    for iface in raw.interfaces {
        let mode = match iface.mode.as_deref() {
            None => IngressMode::default(),
            Some(name) => IngressMode::parse(name).ok_or_else(|| {
                invalid(
                    S,
                    "interfaces",
                    format!("{}:{}", iface.name, quoted(name)),
                    "mode must be \"tc\" (the default) or \"xdp\"",
                )
            })?,
        };
        length_in(
            S,
            "interfaces",
            &iface.name,
            MAX_INTERFACE_NAME,
            "an interface name",
        )?;
        if !seen.insert(iface.name.clone()) {
            return Err(invalid(
                S,
                "interfaces",
                quoted(&iface.name),
                "listed twice; list each interface once",
            ));
        }
        if !interface_exists(&iface.name) {
            return Err(invalid(
                S,
                "interfaces",
                quoted(&iface.name),
                "no such network interface in this network namespace; `ip link` lists the names",
            ));
        }
        interfaces.push(InterfaceConfig {
            name: iface.name,
            mode,
        });
    }
    let metrics_addr = raw.metrics_addr.as_deref().unwrap_or(DEFAULT_METRICS_ADDR);
    let metrics_addr: SocketAddr = metrics_addr.parse().map_err(|_| {
        invalid(
            S,
            "metrics_addr",
            quoted(truncated(metrics_addr, 60)),
            "not an address:port; write it like \"127.0.0.1:9477\"",
        )
    })?;
    let conntrack_capacity = match raw.conntrack_capacity {
        None => CT_DEFAULT_CAPACITY,
        Some(n) => int_in(
            S,
            "conntrack_capacity",
            n,
            MIN_CONNTRACK_CAPACITY.into(),
            MAX_CONNTRACK_CAPACITY.into(),
            " entries (two per tracked connection)",
        )?,
    };
    let max_services = match raw.max_services {
        None => DEFAULT_MAX_SERVICES,
        Some(n) => int_in(S, "max_services", n, 1, MAX_MAX_SERVICES.into(), "")?,
    };
    let max_backends = match raw.max_backends {
        None => DEFAULT_MAX_BACKENDS,
        Some(n) => int_in(S, "max_backends", n, 1, MAX_MAX_BACKENDS.into(), "")?,
    };
    let webhook = match &raw.webhook_url {
        None => None,
        Some(url) => {
            length_in(S, "webhook_url", url, MAX_TEXT, "the URL")?;
            // It goes into an HTTP request line as is.
            if !url.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    S,
                    "webhook_url",
                    quoted(truncated(url, 60)),
                    "must be printable ASCII without spaces; percent-encode the rest",
                ));
            }
            Some(
                crate::events::Webhook::parse(url)
                    .map_err(|e| invalid(S, "webhook_url", quoted(url), e))?,
            )
        }
    };
    let control_group = raw.control_group;
    if let Some(name) = &control_group {
        length_in(S, "control_group", name, MAX_TEXT, "the group name")?;
        // May block on NSS (LDAP and the like): the agent loads configs
        // off its runtime thread (see agent.rs).
        if crate::sys::group_id(name).is_none() {
            return Err(invalid(
                S,
                "control_group",
                quoted(truncated(name, 60)),
                "no such group on this host; create it (groupadd) or leave control_group out",
            ));
        }
    }
    let metrics_buckets_per_octave = match raw.metrics_buckets_per_octave {
        None => DEFAULT_BUCKETS_PER_OCTAVE,
        Some(n) => match u32::try_from(n) {
            Ok(n @ (1 | 2 | 4 | 8 | 16)) => n,
            _ => {
                return Err(invalid(
                    S,
                    "metrics_buckets_per_octave",
                    n,
                    "must be 1, 2, 4, 8 or 16 (exported histogram buckets per doubling)",
                ));
            }
        },
    };
    let handshake_timeout = match raw.handshake_timeout.as_deref() {
        None => DEFAULT_HANDSHAKE_TIMEOUT,
        Some(text) => duration_in(
            S,
            "handshake_timeout",
            text,
            (Duration::from_millis(100), Duration::from_secs(120)),
            "3s",
        )?,
    };
    let control_socket = raw
        .control_socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
    validate_control_socket(&control_socket)?;
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    validate_state_dir(&state_dir)?;
    let bpffs_dir = raw
        .bpffs_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR));
    length_in(
        S,
        "bpffs_dir",
        &bpffs_dir.to_string_lossy(),
        MAX_STATE_DIR,
        "the path",
    )?;
    if !bpffs_dir.is_absolute() {
        return Err(invalid(
            S,
            "bpffs_dir",
            quoted(&bpffs_dir.display().to_string()),
            "must be an absolute path, e.g. \"/sys/fs/bpf/canary\"",
        ));
    }
    Ok(AgentConfig {
        interfaces,
        control_socket,
        control_group,
        metrics_addr,
        metrics_buckets_per_octave,
        conntrack_capacity,
        max_services,
        max_backends,
        handshake_timeout,
        state_dir,
        webhook,
        bpffs_dir,
    })
}

/// A socket path fits a Unix socket address, and names either nothing or
/// a socket: the agent replaces a stale socket at start, and must never
/// delete a regular file (or anything else) that a typo pointed at.
fn validate_control_socket(path: &Path) -> Result<(), ConfigError> {
    const S: &str = "[agent]";
    let text = path.to_string_lossy();
    length_in(S, "control_socket", &text, MAX_SOCKET_PATH, "the path")?;
    if text.contains('\0') {
        return Err(invalid(
            S,
            "control_socket",
            quoted(&text),
            "contains a NUL byte",
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt as _;
            if !meta.file_type().is_socket() {
                return Err(invalid(
                    S,
                    "control_socket",
                    quoted(&text),
                    format!(
                        "{} already exists there and is not a socket; the agent only replaces \
                         a stale socket, so choose another path or remove it yourself",
                        file_kind(&meta)
                    ),
                ));
            }
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// The state directory's path is bounded and, if it exists, is a directory.
fn validate_state_dir(path: &Path) -> Result<(), ConfigError> {
    const S: &str = "[agent]";
    let text = path.to_string_lossy();
    length_in(S, "state_dir", &text, MAX_STATE_DIR, "the path")?;
    if text.contains('\0') {
        return Err(invalid(
            S,
            "state_dir",
            quoted(&text),
            "contains a NUL byte",
        ));
    }
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => Err(invalid(
            S,
            "state_dir",
            quoted(&text),
            format!(
                "{} already exists there; state_dir must be a directory",
                file_kind(&meta)
            ),
        )),
        _ => Ok(()),
    }
}

/// "a regular file", "a directory", … for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

/// Whether `name` is a network interface in this network namespace.
fn interface_exists(name: &str) -> bool {
    crate::sys::ifindex(name) != 0
}

fn validate_services(raw: Vec<RawService>) -> Result<Vec<ServiceConfig>, ConfigError> {
    let mut names = BTreeSet::new();
    let mut vips: BTreeMap<SocketAddrV4, String> = BTreeMap::new();
    let mut total_rules = 0usize;
    let mut services = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let svc = validate_service(i, raw)?;
        let section = format!("service {:?}", svc.name);
        if !names.insert(svc.name.clone()) {
            return Err(invalid(
                &section,
                "name",
                quoted(&svc.name),
                "used by an earlier service; names must be unique",
            ));
        }
        if let Some(other) = vips.insert(svc.vip, svc.name.clone()) {
            return Err(invalid(
                &section,
                "vip",
                quoted(&svc.vip.to_string()),
                format!("already used by service {other:?}; each VIP:port belongs to one service"),
            ));
        }
        total_rules += svc.always_canary.len() + svc.never_canary.len();
        services.push(svc);
    }
    // A reload writes the new rule sets beside the old ones before switching.
    if total_rules > MAX_RULES as usize / 2 {
        return Err(invalid(
            "[[service]]",
            "always_canary/never_canary",
            format!("{total_rules} prefixes in all"),
            format!("at most {} prefixes across all services", MAX_RULES / 2),
        ));
    }
    Ok(services)
}

fn validate_service(index: usize, raw: RawService) -> Result<ServiceConfig, ConfigError> {
    let name = raw.name.trim().to_string();
    let unnamed = format!("service #{}", index + 1);
    if name.len() > MAX_SERVICE_NAME {
        return Err(invalid(
            &unnamed,
            "name",
            shown(&name),
            format!(
                "{} characters long; at most {MAX_SERVICE_NAME} (it names the service's state file)",
                name.len()
            ),
        ));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            &unnamed,
            "name",
            quoted(truncated(&raw.name, 60)),
            "use letters, digits, '-', '_' or '.' (it becomes a metric label)",
        ));
    }
    let section = format!("service {name:?}");
    let s = section.as_str();

    let vip = parse_endpoint(s, "vip", &raw.vip)?;
    let stable = parse_backends(s, "stable", &raw.stable)?;
    let canary = parse_backends(s, "canary", &raw.canary)?;
    if stable.is_empty() {
        return Err(invalid(
            s,
            "stable",
            "[]",
            "a service needs at least one stable backend",
        ));
    }
    if let Some(both) = stable.iter().find(|b| canary.contains(b)) {
        return Err(invalid(
            s,
            "canary",
            quoted(&both.to_string()),
            "also listed in stable; a backend belongs to one cohort",
        ));
    }

    let has_weight = raw.weight.is_some();
    let weight = match raw.weight {
        None => Weight::default(),
        Some(RawWeight::Text(t)) => t
            .parse::<Weight>()
            .map_err(|e| invalid(s, "weight", quoted(&t), e.to_string()))?,
        Some(RawWeight::Number(n)) => {
            return Err(invalid(
                s,
                "weight",
                n,
                "a bare number is ambiguous; quote it with a unit, e.g. \"5%\" or \"2500ppm\"",
            ));
        }
    };
    if weight.ppm() > 0 && canary.is_empty() {
        return Err(invalid(
            s,
            "weight",
            quoted(&weight.to_string()),
            "no canary backends to send traffic to; add `canary = [...]` or set weight = \"0%\"",
        ));
    }

    let cohort = match raw.cohort.as_deref() {
        None | Some("sticky") => CohortMode::Sticky,
        Some("per-connection") => CohortMode::PerConnection,
        Some(other) => {
            return Err(invalid(
                s,
                "cohort",
                quoted(other),
                "must be \"sticky\" or \"per-connection\"",
            ));
        }
    };

    let always_canary = parse_prefixes(s, "always_canary", &raw.always_canary)?;
    let never_canary = parse_prefixes(s, "never_canary", &raw.never_canary)?;
    if !always_canary.is_empty() && canary.is_empty() {
        return Err(invalid(
            s,
            "always_canary",
            quoted(&always_canary[0].to_string()),
            "no canary backends to send these clients to; add `canary = [...]`",
        ));
    }
    if let Some(p) = always_canary.iter().find(|p| never_canary.contains(p)) {
        return Err(invalid(
            s,
            "never_canary",
            quoted(&p.to_string()),
            "also in always_canary; a prefix can only be in one list",
        ));
    }

    let breaker = validate_breaker(s, raw.breaker)?;
    let rollout = match raw.rollout {
        None => None,
        Some(r) => {
            if has_weight {
                return Err(invalid(
                    s,
                    "weight",
                    quoted(&weight.to_string()),
                    "a [service.rollout] plan sets the weight; remove weight or the plan",
                ));
            }
            if canary.is_empty() {
                return Err(invalid(
                    s,
                    "rollout.steps",
                    "[...]",
                    "a rollout plan needs canary backends",
                ));
            }
            Some(validate_rollout(s, r)?)
        }
    };
    Ok(ServiceConfig {
        rollout,
        breaker,
        salt: match raw.salt {
            None => default_salt(&name),
            Some(n) => int_in(s, "salt", n, 0, u32::MAX.into(), "")?,
        },
        name,
        vip,
        stable,
        canary,
        weight,
        cohort,
        always_canary,
        never_canary,
    })
}

fn validate_rollout(section: &str, raw: RawRollout) -> Result<RolloutConfig, ConfigError> {
    if raw.steps.is_empty() {
        return Err(invalid(
            section,
            "rollout.steps",
            "[]",
            "a plan needs at least one step, e.g. { weight = \"5%\", hold = \"10m\" }",
        ));
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(invalid(
            section,
            "rollout.steps",
            format!("{} steps", raw.steps.len()),
            format!("at most {MAX_STEPS} steps"),
        ));
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    let mut last = 0u32;
    for (i, step) in raw.steps.into_iter().enumerate() {
        // Steps are numbered from 1 in messages, as people count them.
        let key = |field: &str| format!("rollout.steps[{}].{field}", i + 1);
        let weight: Weight = step.weight.parse().map_err(|e: WeightError| {
            invalid(section, key("weight"), quoted(&step.weight), e.to_string())
        })?;
        if weight.ppm() <= last {
            return Err(invalid(
                section,
                key("weight"),
                quoted(&step.weight),
                "weights must rise from step to step",
            ));
        }
        last = weight.ppm();
        let hold = match step.hold.as_deref() {
            None => Duration::ZERO,
            Some(text) => duration_in(
                section,
                key("hold"),
                text,
                (Duration::ZERO, MAX_HOLD),
                "10m",
            )?,
        };
        let gate = match step.gate.as_deref() {
            None | Some("auto") => Gate::Auto,
            Some("manual") => Gate::Manual,
            Some(other) => {
                return Err(invalid(
                    section,
                    key("gate"),
                    quoted(truncated(other, 60)),
                    "gate must be \"auto\" or \"manual\"",
                ));
            }
        };
        let min_connections = match step.min_connections {
            None => 0,
            Some(n) => int_in(section, key("min_connections"), n, 0, MAX_COUNT, "")?,
        };
        steps.push(StepConfig {
            weight,
            hold,
            min_connections,
            gate,
        });
    }
    let interval = match raw.interval.as_deref() {
        None => Duration::from_secs(1),
        Some(text) => duration_in(
            section,
            "rollout.interval",
            text,
            (Duration::from_millis(100), Duration::from_secs(600)),
            "1s",
        )?,
    };
    let fail_after = match raw.fail_after {
        None => 2,
        Some(n) => int_in(section, "rollout.fail_after", n, 1, 1000, " judgements")?,
    };
    let mut judge = crate::judge::JudgeConfig::default();
    if let Some(j) = raw.judge {
        let ratio = |key: &'static str, text: Option<String>, into: &mut f64| {
            if let Some(text) = text {
                let w: Weight = text.parse().map_err(|e: WeightError| {
                    invalid(section, key, quoted(&text), e.to_string())
                })?;
                *into = f64::from(w.ppm()) / 1e6;
            }
            Ok::<(), ConfigError>(())
        };
        ratio(
            "rollout.judge.min_failure_increase",
            j.min_failure_increase,
            &mut judge.min_failure_increase,
        )?;
        ratio(
            "rollout.judge.hard_max_failure_ratio",
            j.hard_max_failure_ratio,
            &mut judge.hard_max_failure_ratio,
        )?;
        for (key, text, into) in [
            (
                "rollout.judge.min_latency_increase",
                j.min_latency_increase,
                &mut judge.min_latency_increase_ns,
            ),
            (
                "rollout.judge.min_p99_increase",
                j.min_p99_increase,
                &mut judge.min_p99_increase_ns,
            ),
        ] {
            if let Some(text) = text {
                let d = duration_in(
                    section,
                    key,
                    &text,
                    (Duration::ZERO, Duration::from_secs(60)),
                    "1ms",
                )?;
                // At most 6e10 ns: exact in an f64.
                *into = d.as_nanos() as f64;
            }
        }
        if let Some(n) = j.min_samples {
            judge.min_samples = int_in(section, "rollout.judge.min_samples", n, 1, MAX_COUNT, "")?;
        }
        if let Some(a) = j.alpha {
            // Also false for NaN.
            if !(a > 0.0 && a < 0.5) {
                return Err(invalid(
                    section,
                    "rollout.judge.alpha",
                    a,
                    "must be between 0 and 0.5 (both excluded), e.g. 0.0001",
                ));
            }
            judge.alpha = a;
        }
        for (key, value, into) in [
            (
                "rollout.judge.min_latency_ratio",
                j.min_latency_ratio,
                &mut judge.min_latency_ratio,
            ),
            (
                "rollout.judge.max_p99_ratio",
                j.max_p99_ratio,
                &mut judge.max_p99_ratio,
            ),
        ] {
            if let Some(v) = value {
                // Also false for NaN and infinities.
                if !(1.0..=MAX_RATIO).contains(&v) {
                    return Err(invalid(
                        section,
                        key,
                        v,
                        format!("must be a ratio between 1.0 and {MAX_RATIO}, e.g. 1.2"),
                    ));
                }
                *into = v;
            }
        }
    }
    Ok(RolloutConfig {
        steps,
        interval,
        fail_after,
        judge,
    })
}

fn validate_breaker(section: &str, raw: Option<RawBreaker>) -> Result<BreakerConfig, ConfigError> {
    let mut b = BreakerConfig::default();
    let Some(raw) = raw else { return Ok(b) };
    if let Some(enabled) = raw.enabled {
        b.enabled = enabled;
    }
    if let Some(n) = raw.min_failures {
        if n < 1 {
            return Err(invalid(
                section,
                "breaker.min_failures",
                n,
                "must be at least 1; to turn the breaker off set breaker.enabled = false",
            ));
        }
        // The data plane counts in 16 bits.
        b.min_failures = int_in(
            section,
            "breaker.min_failures",
            n,
            1,
            u16::MAX.into(),
            " failures",
        )?;
    }
    if let Some(text) = raw.failure_ratio {
        b.failure_ratio = text.parse().map_err(|e: WeightError| {
            invalid(
                section,
                "breaker.failure_ratio",
                quoted(&text),
                e.to_string(),
            )
        })?;
    }
    if let Some(text) = raw.window {
        b.window = duration_in(
            section,
            "breaker.window",
            &text,
            (Duration::from_millis(10), Duration::from_secs(60)),
            "1s",
        )?;
    }
    Ok(b)
}

/// The salt of a service without an explicit `salt`: a hash of its name, so
/// every node of a fleet (and every restart) puts a client in the same
/// cohort.
pub fn default_salt(name: &str) -> u32 {
    // FNV-1a, 32 bit.
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn parse_endpoint(
    section: &str,
    key: &'static str,
    text: &str,
) -> Result<SocketAddrV4, ConfigError> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        invalid(
            section,
            key,
            quoted(text),
            "not an address:port; write it like \"10.96.0.10:80\"",
        )
    })?;
    let SocketAddr::V4(addr) = addr else {
        return Err(invalid(
            section,
            key,
            quoted(text),
            "IPv6 is not supported yet (IPv4 only)",
        ));
    };
    if addr.port() == 0 {
        return Err(invalid(
            section,
            key,
            quoted(text),
            "port 0 is not a valid service port",
        ));
    }
    if addr.ip().is_unspecified() || addr.ip().is_broadcast() || addr.ip().is_multicast() {
        return Err(invalid(
            section,
            key,
            quoted(text),
            "must be a unicast address",
        ));
    }
    Ok(addr)
}

fn parse_backends(
    section: &str,
    key: &'static str,
    list: &[String],
) -> Result<Vec<SocketAddrV4>, ConfigError> {
    if list.len() > MAX_BACKENDS {
        return Err(invalid(
            section,
            key,
            format!("{} backends", list.len()),
            format!("at most {MAX_BACKENDS} backends per cohort"),
        ));
    }
    let mut out: Vec<SocketAddrV4> = Vec::with_capacity(list.len());
    for text in list {
        let addr = parse_endpoint(section, key, text)?;
        if out.contains(&addr) {
            return Err(invalid(
                section,
                key,
                quoted(text),
                "listed twice; list each backend once",
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

fn parse_prefixes(
    section: &str,
    key: &'static str,
    list: &[String],
) -> Result<Vec<Ipv4Prefix>, ConfigError> {
    let mut out: Vec<Ipv4Prefix> = Vec::with_capacity(list.len());
    for text in list {
        let p: Ipv4Prefix = text
            .parse()
            .map_err(|e: String| invalid(section, key, quoted(text), e))?;
        if out.contains(&p) {
            return Err(invalid(section, key, quoted(text), "listed twice"));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
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

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("agent.toml"), &[])
    }

    /// The full message, with sources, as the agent prints it.
    fn error_text(text: &str) -> String {
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

    fn with_service(lines: &str) -> String {
        format!("[agent]\ninterfaces = [\"lo\"]\n\n[[service]]\n{lines}\n")
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
    fn each_semantic_error_names_the_key_value_and_fix() {
        let base = "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"10.0.1.10:8080\"]\ncanary = [\"10.0.2.10:8080\"]";
        let cases: &[(&str, &str)] = &[
            (
                "weight = \"150%\"",
                "service \"web\": weight = \"150%\": more than 100%; write a percentage or parts per million",
            ),
            (
                "weight = 5",
                "service \"web\": weight = 5: a bare number is ambiguous",
            ),
            (
                "cohort = \"random\"",
                "service \"web\": cohort = \"random\": must be \"sticky\" or \"per-connection\"",
            ),
            (
                "always_canary = [\"192.168.10.1/24\"]",
                "service \"web\": always_canary = \"192.168.10.1/24\": host bits are set; did you mean \"192.168.10.0/24\"?",
            ),
            (
                "always_canary = [\"10.1.0.0/16\"]\nnever_canary = [\"10.1.0.0/16\"]",
                "service \"web\": never_canary = \"10.1.0.0/16\": also in always_canary",
            ),
            (
                "never_canary = [\"fd00::/8\"]",
                "never_canary = \"fd00::/8\": IPv6 prefixes are not supported yet",
            ),
        ];
        for (extra, expected) in cases {
            let msg = error_text(&with_service(&format!("{base}\n{extra}")));
            assert!(
                msg.contains(expected),
                "for {extra:?}:\n expected {expected:?}\n got      {msg:?}"
            );
        }
    }

    #[test]
    fn bad_addresses_are_rejected() {
        let cases: &[(&str, &str)] = &[
            (
                "vip = \"10.96.0.10\"\nstable = [\"10.0.1.10:8080\"]",
                "vip = \"10.96.0.10\": not an address:port; write it like \"10.96.0.10:80\"",
            ),
            (
                "vip = \"[::1]:80\"\nstable = [\"10.0.1.10:8080\"]",
                "vip = \"[::1]:80\": IPv6 is not supported yet",
            ),
            (
                "vip = \"10.96.0.10:0\"\nstable = [\"10.0.1.10:8080\"]",
                "port 0 is not a valid service port",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.300:8080\"]",
                "stable = \"10.0.1.300:8080\": not an address:port",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.1:1\", \"10.0.1.1:1\"]",
                "stable = \"10.0.1.1:1\": listed twice",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = []",
                "stable = []: a service needs at least one stable backend",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.1:1\"]\ncanary = [\"10.0.1.1:1\"]",
                "canary = \"10.0.1.1:1\": also listed in stable",
            ),
        ];
        for (lines, expected) in cases {
            let msg = error_text(&with_service(&format!("name = \"web\"\n{lines}")));
            assert!(
                msg.contains(expected),
                "for {lines:?}:\n expected {expected:?}\n got      {msg:?}"
            );
        }
    }

    #[test]
    fn a_nonzero_weight_needs_canary_backends() {
        let msg = error_text(&with_service(
            "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"10.0.1.10:8080\"]\nweight = \"5%\"",
        ));
        assert_eq!(
            msg,
            "service \"web\": weight = \"5%\": no canary backends to send traffic to; \
             add `canary = [...]` or set weight = \"0%\""
        );
        let msg = error_text(&with_service(
            "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"10.0.1.10:8080\"]\nalways_canary = [\"10.0.0.0/8\"]",
        ));
        assert!(
            msg.contains("always_canary = \"10.0.0.0/8\": no canary backends"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_vips_and_names_are_rejected() {
        let svc = |name: &str, vip: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nstable = [\"10.0.1.10:8080\"]\n"
            )
        };
        let head = "[agent]\ninterfaces = [\"lo\"]\n";
        let msg = error_text(&format!(
            "{head}{}{}",
            svc("a", "10.96.0.10:80"),
            svc("b", "10.96.0.10:80")
        ));
        assert_eq!(
            msg,
            "service \"b\": vip = \"10.96.0.10:80\": already used by service \"a\"; each VIP:port belongs to one service"
        );
        let msg = error_text(&format!(
            "{head}{}{}",
            svc("a", "10.96.0.10:80"),
            svc("a", "10.96.0.11:80")
        ));
        assert!(
            msg.contains("service \"a\": name = \"a\": used by an earlier service"),
            "{msg}"
        );
        // Same address, other port: a different service.
        parse(&format!(
            "{head}{}{}",
            svc("a", "10.96.0.10:80"),
            svc("b", "10.96.0.10:443")
        ))
        .expect("distinct ports");
    }

    #[test]
    fn missing_interfaces_are_named() {
        let msg = error_text(&GOOD.replace("[\"lo\"]", "[\"lo\", \"canary-nope0\"]"));
        assert_eq!(
            msg,
            "[agent]: interfaces = \"canary-nope0\": no such network interface in this network \
             namespace; `ip link` lists the names"
        );
        let msg = error_text(&GOOD.replace("[\"lo\"]", "[]"));
        assert!(
            msg.contains("[agent]: interfaces = []: name at least one"),
            "{msg}"
        );
    }

    fn tc(name: &str) -> InterfaceConfig {
        InterfaceConfig {
            name: name.to_string(),
            mode: IngressMode::Tc,
        }
    }

    #[test]
    fn command_line_interfaces_replace_the_file() {
        let c = Config::parse(GOOD, Path::new("x"), &["lo".to_string()]).unwrap();
        assert_eq!(c.agent.interfaces, [tc("lo")]);
        let c = Config::parse(GOOD, Path::new("x"), &["lo:xdp".to_string()]).unwrap();
        assert_eq!(c.agent.interfaces[0].mode, IngressMode::Xdp);
        let err = Config::parse(GOOD, Path::new("x"), &["canary-nope1".to_string()]).unwrap_err();
        assert!(err.to_string().contains("canary-nope1"), "{err}");
    }

    #[test]
    fn interfaces_take_a_mode_as_a_table() {
        let c = parse(&GOOD.replace("[\"lo\"]", "[{ name = \"lo\", mode = \"xdp\" }]"))
            .expect("table form is valid");
        assert_eq!(
            c.agent.interfaces,
            [InterfaceConfig {
                name: "lo".to_string(),
                mode: IngressMode::Xdp
            }]
        );
        let c = parse(&GOOD.replace("[\"lo\"]", "[{ name = \"lo\" }]")).unwrap();
        assert_eq!(c.agent.interfaces, [tc("lo")]);

        let msg = error_text(&GOOD.replace("[\"lo\"]", "[{ name = \"lo\", mode = \"dpdk\" }]"));
        assert!(
            msg.contains(r#"interfaces = lo:"dpdk": mode must be "tc" (the default) or "xdp""#),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace("[\"lo\"]", "[{ name = \"lo\", mod = \"xdp\" }]"));
        assert!(msg.contains("unknown field `mod`"), "{msg}");
        let msg = error_text(&GOOD.replace("[\"lo\"]", "[7]"));
        assert!(msg.contains("an interface name like"), "{msg}");
    }

    #[test]
    fn too_many_backends_are_rejected() {
        let many: Vec<String> = (1..=MAX_BACKENDS + 1)
            .map(|i| format!("\"10.0.1.{i}:80\""))
            .collect();
        let msg = error_text(&with_service(&format!(
            "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [{}]",
            many.join(", ")
        )));
        assert!(
            msg.contains("stable = 33 backends: at most 32 backends per cohort"),
            "{msg}"
        );
    }

    #[test]
    fn handshake_timeout_and_bucket_resolution_are_validated() {
        let c = parse(&GOOD.replace(
            "[agent]",
            "[agent]\nhandshake_timeout = \"500ms\"\nmetrics_buckets_per_octave = 16",
        ))
        .unwrap();
        assert_eq!(c.agent.handshake_timeout, Duration::from_millis(500));
        assert_eq!(c.agent.metrics_buckets_per_octave, 16);
        let msg =
            error_text(&GOOD.replace("[agent]", "[agent]\nhandshake_timeout = \"3 minutes\""));
        assert!(
            msg.contains(
                "[agent]: handshake_timeout = \"3 minutes\": not a duration; write it like \"3s\""
            ),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace("[agent]", "[agent]\nhandshake_timeout = \"10ms\""));
        assert!(
            msg.contains("must be a duration between 100ms and 120s"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace("[agent]", "[agent]\nmetrics_buckets_per_octave = 3"));
        assert!(
            msg.contains("[agent]: metrics_buckets_per_octave = 3: must be 1, 2, 4, 8 or 16"),
            "{msg}"
        );
    }

    #[test]
    fn the_breaker_is_on_by_default_and_configurable() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.services[0].breaker, BreakerConfig::default());
        assert!(c.services[0].breaker.enabled);
        let c = parse(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nmin_failures = 10\nfailure_ratio = \"20%\"\nwindow = \"250ms\"",
        ))
        .unwrap();
        let b = c.services[0].breaker;
        assert_eq!(
            (b.min_failures, b.failure_ratio.ppm(), b.window),
            (10, 200_000, Duration::from_millis(250))
        );
        let msg = error_text(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nmin_failures = 0",
        ));
        assert!(
            msg.contains("service \"web\": breaker.min_failures = 0: must be at least 1"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nwindow = \"1h\"",
        ));
        assert!(
            msg.contains("breaker.window = \"1h\": must be a duration between 10ms and 60s"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nlimit = 3",
        ));
        assert!(msg.contains("unknown field `limit`"), "{msg}");
    }

    #[test]
    fn webhook_urls_are_validated() {
        let c = parse(&GOOD.replace(
            "[agent]",
            "[agent]\nwebhook_url = \"http://127.0.0.1:9999/h\"",
        ))
        .unwrap();
        assert_eq!(c.agent.webhook.unwrap().authority, "127.0.0.1:9999");
        let msg = error_text(&GOOD.replace(
            "[agent]",
            "[agent]\nwebhook_url = \"https://chat.example/h\"",
        ));
        assert!(
            msg.contains(
                "[agent]: webhook_url = \"https://chat.example/h\": https is not supported yet"
            ),
            "{msg}"
        );
    }

    #[test]
    fn the_control_group_must_exist() {
        let c = parse(&GOOD.replace("[agent]", "[agent]\ncontrol_group = \"root\"")).unwrap();
        assert_eq!(c.agent.control_group.as_deref(), Some("root"));
        let msg = error_text(&GOOD.replace(
            "[agent]",
            "[agent]\ncontrol_group = \"no-such-group-canary\"",
        ));
        assert!(
            msg.contains(
                "[agent]: control_group = \"no-such-group-canary\": no such group on this host"
            ),
            "{msg}"
        );
    }

    #[test]
    fn rollout_plans_parse_and_bad_ones_are_named() {
        let plan = GOOD.replace("weight = \"5%\"\n", "").replace(
            "never_canary = []",
            "never_canary = []\n[service.rollout]\nsteps = [\n  { weight = \"1%\", hold = \"10m\", min_connections = 100 },\n  \
             { weight = \"5%\", hold = \"1h\", gate = \"manual\" },\n]\n[service.rollout.judge]\nalpha = 0.001",
        );
        let c = parse(&plan).unwrap();
        let r = c.services[0].rollout.as_ref().expect("plan");
        assert_eq!(r.steps.len(), 2);
        assert_eq!(
            (
                r.steps[0].weight.ppm(),
                r.steps[0].hold,
                r.steps[0].min_connections
            ),
            (10_000, Duration::from_secs(600), 100)
        );
        assert_eq!(
            (r.steps[1].gate, r.steps[1].hold),
            (Gate::Manual, Duration::from_secs(3600))
        );
        assert_eq!(
            (r.interval, r.fail_after, r.judge.alpha),
            (Duration::from_secs(1), 2, 0.001)
        );

        let msg = error_text(&plan.replace(
            "weight = \"5%\", hold = \"1h\"",
            "weight = \"1%\", hold = \"1h\"",
        ));
        assert!(
            msg.contains(
                "service \"web\": rollout.steps[2].weight = \"1%\": weights must rise from step to step"
            ),
            "{msg}"
        );
        let msg = error_text(&plan.replace("gate = \"manual\"", "gate = \"maybe\""));
        assert!(
            msg.contains("rollout.steps[2].gate = \"maybe\": gate must be \"auto\" or \"manual\""),
            "{msg}"
        );
        let msg = error_text(&plan.replace(
            "cohort = \"sticky\"",
            "cohort = \"sticky\"\nweight = \"5%\"",
        ));
        assert!(
            msg.contains("a [service.rollout] plan sets the weight; remove weight or the plan"),
            "{msg}"
        );
        let msg = error_text(&plan.replace("alpha = 0.001", "alpha = 2.0"));
        assert!(
            msg.contains("rollout.judge.alpha = 2: must be between 0 and 0.5"),
            "{msg}"
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
            msg.contains(
                "[agent]: max_services = 1: 2 services are configured; raise max_services"
            ),
            "{msg}"
        );
        // GOOD has 2 stable + 1 canary backends.
        let msg = error_text(&GOOD.replace("[agent]", "[agent]\nmax_backends = 2"));
        assert!(
            msg.contains("[agent]: max_backends = 2: the services list 3 backends"),
            "{msg}"
        );
        let c =
            parse(&GOOD.replace("[agent]", "[agent]\nmax_backends = 3\nmax_services = 1")).unwrap();
        assert_eq!((c.agent.max_services, c.agent.max_backends), (1, 3));
    }

    #[test]
    fn conntrack_capacity_is_bounded() {
        let msg = error_text(&GOOD.replace("[agent]", "[agent]\nconntrack_capacity = 10"));
        assert!(
            msg.contains("[agent]: conntrack_capacity = 10: must be between 1024"),
            "{msg}"
        );
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
                "rollout.fail_after = 0: must be between 1 and 1000",
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
                && msg.contains(
                    "300 characters long; at most 64 (it names the service's state file)"
                ),
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
    fn a_control_socket_path_naming_a_regular_file_is_refused_not_deleted() {
        let dir = std::env::temp_dir().join(format!("canary-cfg-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious.txt");
        std::fs::write(&file, "keep me").unwrap();
        let msg =
            error_text(&GOOD.replace("/run/canary/control.sock", &file.display().to_string()));
        assert!(
            msg.contains("[agent]: control_socket = ")
                && msg.contains("a regular file already exists there and is not a socket"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace(
            "[agent]",
            &format!("[agent]\nstate_dir = \"{}\"", file.display()),
        ));
        assert!(
            msg.contains("[agent]: state_dir = ")
                && msg
                    .contains("a regular file already exists there; state_dir must be a directory"),
            "{msg}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        let _ = std::fs::remove_dir_all(dir);
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
}

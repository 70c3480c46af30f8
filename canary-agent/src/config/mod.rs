//! The agent's TOML config: parsing, and validation of everything before
//! anything touches the kernel.
//!
//! Parsing (`raw.rs`: serde, unknown keys rejected) and validation (into
//! [`Config`]) are separate so that every semantic error can name the
//! service, the key, the value and the fix. Validation is split by
//! section: `agent.rs` (`[agent]`), `service.rs` (a `[[service]]`),
//! `plan.rs` (its `[service.rollout]` plan and judge thresholds) and
//! `breaker.rs` (its `[service.breaker]`); `check.rs` holds the range and
//! length checks they share. This file holds the defaults and bounds, the
//! error type and the entry points.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

mod agent;
mod analysis;
mod breaker;
mod check;
mod fleet;
mod plan;
mod raw;
mod service;
#[cfg(test)]
mod tests;

use agent::validate_agent;
pub use agent::{AgentConfig, IngressMode, InterfaceConfig};
pub use analysis::{
    AnalysisConfig, Bound, CheckConfig, DEFAULT_MAX_INCONCLUSIVE, DEFAULT_MIN_WINDOW,
    DEFAULT_QUERY_TIMEOUT, Mode,
};
pub use breaker::BreakerConfig;
pub use fleet::{FleetConfig, FleetTls, check_node_name};
pub use plan::{Gate, RolloutConfig, StepConfig};
use service::validate_services;
pub use service::{CohortMode, IpPrefix, Protocol, ServiceConfig, UdpTimeouts, default_salt};

pub use crate::units::{Weight, WeightError};
use check::invalid;
use raw::{RawConfig, RawInterface};

/// Default path of the control socket (`canaryctl`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/canary/control.sock";
/// Default Prometheus listen address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// Default time a SYN may wait for its SYN-ACK before the connection counts
/// as failed (`reason="timeout"`). The client's first SYN retry comes at 1 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default idle timeout of a UDP flow (`udp_idle_timeout`): 30 s, as
/// Linux's `nf_conntrack_udp_timeout`. A flow with no datagram either way
/// for this long is over; the client's next datagram is a new flow.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a UDP flow may wait for its backend's first reply before it
/// counts as failed (`udp_response_timeout`, `reason="timeout"`), as
/// `handshake_timeout` for TCP.
pub const DEFAULT_UDP_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
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
/// (`NAME_MAX` is 255 bytes) and a metric label stays readable.
pub const MAX_SERVICE_NAME: usize = 64;
/// Longest interface name (the kernel's IFNAMSIZ is 16 with the NUL).
pub const MAX_INTERFACE_NAME: usize = 15;
/// Most interfaces in `[agent] interfaces`.
pub const MAX_INTERFACES: usize = 256;
/// Longest `control_socket` path: a Unix socket address holds 108 bytes
/// with the NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest `state_dir` path, so that every state file path under it stays
/// far below `PATH_MAX`.
pub const MAX_STATE_DIR: usize = 1024;
/// Longest `webhook_url` or `control_group`.
pub const MAX_TEXT: usize = 2048;
/// Most steps of a rollout plan.
pub const MAX_STEPS: usize = 100;
/// Longest `hold` of a rollout step.
pub const MAX_HOLD: Duration = Duration::from_hours(30 * 24);
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

/// A validated config: every value in range, every reference resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[agent]`.
    pub agent: AgentConfig,
    /// `[[service]]` entries, in file order.
    pub services: Vec<ServiceConfig>,
    /// `[fleet]`: rollouts shared through etcd; `None` runs single-node.
    pub fleet: Option<FleetConfig>,
    /// `[analysis]`: the Prometheus for checks and fleet evidence.
    pub analysis: Option<AnalysisConfig>,
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
        let fleet = raw
            .fleet
            .map(|f| fleet::validate_fleet(f, &crate::sys::hostname()))
            .transpose()?;
        let analysis = raw
            .analysis
            .as_ref()
            .map(analysis::validate_analysis)
            .transpose()?;
        if analysis.is_none()
            && let Some(svc) = services.iter().find(|s| !s.checks.is_empty())
        {
            return Err(invalid(
                &format!("service {:?}", svc.name),
                "rollout.checks",
                format!("{} checks", svc.checks.len()),
                "checks query Prometheus; add [analysis] prometheus = \"http://host:port\"",
            ));
        }
        Ok(Config {
            agent,
            services,
            fleet,
            analysis,
        })
    }

    /// The config with `[fleet] node` replaced by `node` (`--node`, e.g.
    /// the Kubernetes node name from the downward API). Without `[fleet]`
    /// there is no node name to set: an error, so a DaemonSet whose config
    /// lost its `[fleet]` section does not silently run single-node.
    pub fn with_node(mut self, node: Option<&str>) -> Result<Config, ConfigError> {
        let Some(node) = node else { return Ok(self) };
        check_node_name(node)?;
        match &mut self.fleet {
            Some(f) => f.node = node.to_string(),
            None => {
                return Err(invalid(
                    "[fleet]",
                    "node",
                    format!("{node:?} (from --node)"),
                    "--node names this node in a fleet, and the config has no [fleet] section; \
                     add one or drop --node",
                ));
            }
        }
        Ok(self)
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

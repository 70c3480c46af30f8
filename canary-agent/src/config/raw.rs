//! The config as written: serde structs that reject unknown keys and
//! take numbers as TOML's own i64 (range-checked later, in validation).
//! Nothing here is checked beyond its TOML type.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) agent: RawAgent,
    #[serde(default, rename = "service")]
    pub(super) services: Vec<RawService>,
    #[serde(default)]
    pub(super) fleet: Option<RawFleet>,
    #[serde(default)]
    pub(super) analysis: Option<RawAnalysis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnalysis {
    pub(super) prometheus: String,
    pub(super) ca: Option<std::path::PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<std::path::PathBuf>,
    pub(super) bearer_token_file: Option<std::path::PathBuf>,
    pub(super) query_timeout: Option<String>,
    pub(super) max_inconclusive: Option<i64>,
    pub(super) min_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    pub(super) name: String,
    pub(super) query: String,
    pub(super) max: Option<f64>,
    pub(super) min: Option<f64>,
    pub(super) max_increase: Option<f64>,
    pub(super) max_ratio: Option<f64>,
    pub(super) interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) etcd: Vec<String>,
    pub(super) node: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) ca: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) lease_ttl: Option<String>,
    pub(super) summary_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    #[serde(default)]
    pub(super) interfaces: Vec<RawInterface>,
    pub(super) control_socket: Option<PathBuf>,
    pub(super) control_group: Option<String>,
    pub(super) metrics_addr: Option<String>,
    // Integers are read as TOML's own i64 and range-checked before any
    // conversion, so a negative or huge value gets an error naming the key
    // and its range rather than serde's "expected u32".
    pub(super) metrics_buckets_per_octave: Option<i64>,
    pub(super) conntrack_capacity: Option<i64>,
    pub(super) udp_conntrack_capacity: Option<i64>,
    pub(super) max_services: Option<i64>,
    pub(super) max_backends: Option<i64>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) webhook_url: Option<String>,
    pub(super) bpffs_dir: Option<PathBuf>,
    pub(super) socket_lb: Option<bool>,
    pub(super) cgroup: Option<PathBuf>,
}

/// An `interfaces` entry: `"eth0"` (TC) or `{ name = "eth0", mode = "xdp" }`.
pub(super) struct RawInterface {
    pub(super) name: String,
    pub(super) mode: Option<String>,
}

impl RawInterface {
    /// `NAME` or `NAME:MODE`, the command-line form (`:` cannot occur in an
    /// interface name).
    pub(super) fn from_flag(flag: &str) -> RawInterface {
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
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) vip: String,
    pub(super) stable: Vec<String>,
    #[serde(default)]
    pub(super) canary: Vec<String>,
    #[serde(default)]
    pub(super) weight: Option<RawWeight>,
    #[serde(default)]
    pub(super) cohort: Option<String>,
    #[serde(default)]
    pub(super) always_canary: Vec<String>,
    #[serde(default)]
    pub(super) never_canary: Vec<String>,
    pub(super) salt: Option<i64>,
    #[serde(default)]
    pub(super) protocol: Option<String>,
    #[serde(default)]
    pub(super) udp_idle_timeout: Option<String>,
    #[serde(default)]
    pub(super) udp_response_timeout: Option<String>,
    #[serde(default)]
    pub(super) breaker: Option<RawBreaker>,
    #[serde(default)]
    pub(super) rollout: Option<RawRollout>,
    #[serde(default)]
    pub(super) release: Option<String>,
    #[serde(default)]
    pub(super) drain_deadline: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollout {
    pub(super) steps: Vec<RawStep>,
    pub(super) interval: Option<String>,
    pub(super) fail_after: Option<i64>,
    pub(super) judge: Option<RawJudge>,

    // Validated in analysis.rs, beside the plan.
    #[serde(default)]
    pub(super) checks: Vec<RawCheck>,
    pub(super) mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStep {
    pub(super) weight: String,
    pub(super) hold: Option<String>,
    pub(super) min_connections: Option<i64>,
    pub(super) gate: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJudge {
    pub(super) min_samples: Option<i64>,
    pub(super) alpha: Option<f64>,
    pub(super) min_failure_increase: Option<String>,
    pub(super) min_latency_ratio: Option<f64>,
    pub(super) min_latency_increase: Option<String>,
    pub(super) max_p99_ratio: Option<f64>,
    pub(super) min_p99_increase: Option<String>,
    pub(super) hard_max_failure_ratio: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) enabled: Option<bool>,
    pub(super) min_failures: Option<i64>,
    pub(super) failure_ratio: Option<String>,
    pub(super) window: Option<String>,
}

/// A weight as written: a string, or a bare number we refuse with a hint.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawWeight {
    Text(String),
    Number(f64),
}

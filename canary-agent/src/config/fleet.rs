//! `[fleet]`: the etcd cluster a fleet of agents shares its rollouts
//! through, this node's name in it, and the TLS client identity.

use std::{path::PathBuf, time::Duration};

use super::{
    ConfigError, MAX_STATE_DIR, MAX_TEXT,
    check::{duration_in, invalid, length_in, quoted, shown},
    raw::RawFleet,
};

const S: &str = "[fleet]";

/// Default key prefix in etcd.
pub const DEFAULT_PREFIX: &str = "/canary";
/// Default lease TTL: how long a dead node's summary (or a dead leader)
/// lingers.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);
/// Default interval between a node's summaries.
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(2);
/// Longest node name.
pub const MAX_NODE_NAME: usize = 64;
/// Most etcd endpoints.
pub const MAX_ENDPOINTS: usize = 16;

/// The validated `[fleet]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// etcd client URLs (`http://` or `https://`).
    pub etcd: Vec<String>,
    /// This node's name in the fleet (default: the host name).
    pub node: String,
    /// Every key lives under it; no trailing `/`.
    pub prefix: String,
    /// TLS: the CA that signed etcd's certificates, and this node's client
    /// certificate and key (PEM files).
    pub tls: Option<FleetTls>,
    /// TTL of this node's lease (its summaries and its leadership).
    pub lease_ttl: Duration,
    /// How often this node publishes its summary.
    pub summary_interval: Duration,
}

/// PEM files for etcd over TLS.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetTls {
    /// The CA certificate etcd's server certificates are checked against.
    pub ca: PathBuf,
    /// This node's client certificate and key (etcd's
    /// `--client-cert-auth`), if given.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Checks a node name: it is a key segment in etcd and a label value.
pub fn check_node_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        return Ok(());
    }
    Err(invalid(
        S,
        "node",
        shown(name),
        format!(
            "1 to {MAX_NODE_NAME} letters, digits, '-', '_' or '.' (it names the node's keys in etcd); \
             set [fleet] node or --node"
        ),
    ))
}

pub(super) fn validate_fleet(raw: RawFleet, hostname: &str) -> Result<FleetConfig, ConfigError> {
    if raw.etcd.is_empty() || raw.etcd.len() > MAX_ENDPOINTS {
        return Err(invalid(
            S,
            "etcd",
            format!("{} endpoints", raw.etcd.len()),
            format!(
                "list 1 to {MAX_ENDPOINTS} etcd client URLs, e.g. [\"https://10.0.0.5:2379\"] \
                 (leave [fleet] out for a single node)"
            ),
        ));
    }
    let mut https = None;
    for url in &raw.etcd {
        length_in(S, "etcd", url, MAX_TEXT, "an endpoint")?;
        let secure = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(invalid(
                S,
                "etcd",
                shown(url),
                "an etcd client URL starts with http:// or https://, e.g. \"https://10.0.0.5:2379\"",
            ));
        };
        let (secure, rest) = secure;
        let hostport = rest.trim_end_matches('/');
        let port_ok = hostport.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || hostport.contains('/') {
            return Err(invalid(
                S,
                "etcd",
                shown(url),
                "write scheme://host:port, e.g. \"https://10.0.0.5:2379\"",
            ));
        }
        if https.is_some_and(|h| h != secure) {
            return Err(invalid(
                S,
                "etcd",
                shown(url),
                "mixes http:// and https:// endpoints; a cluster is reached one way",
            ));
        }
        https = Some(secure);
    }
    let node = match raw.node {
        Some(n) => n,
        None => hostname.to_string(),
    };
    check_node_name(&node)?;
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let prefix_ok = prefix.starts_with('/')
        && prefix.len() > 1
        && prefix.len() <= 128
        && !prefix.ends_with('/')
        && !prefix.contains("//")
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b));
    if !prefix_ok {
        return Err(invalid(
            S,
            "prefix",
            shown(&prefix),
            "an etcd key prefix like \"/canary\": starts with '/', no trailing '/', \
             letters, digits, '/', '-', '_' or '.', at most 128 bytes",
        ));
    }
    let file = |key: &str, p: Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
        let Some(p) = p else { return Ok(None) };
        let text = p.to_string_lossy();
        length_in(S, key, &text, MAX_STATE_DIR, "the path")?;
        if !p.is_absolute() {
            return Err(invalid(S, key, quoted(&text), "must be an absolute path"));
        }
        Ok(Some(p))
    };
    let ca = file("ca", raw.ca)?;
    let cert = file("cert", raw.cert)?;
    let key = file("key", raw.key)?;
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(c), None) => {
            return Err(invalid(
                S,
                "cert",
                quoted(&c.to_string_lossy()),
                "a client certificate needs its key: set key too",
            ));
        }
        (None, Some(k)) => {
            return Err(invalid(
                S,
                "key",
                quoted(&k.to_string_lossy()),
                "a client key needs its certificate: set cert too",
            ));
        }
    };
    let tls = match (https == Some(true), ca) {
        (true, Some(ca)) => Some(FleetTls { ca, identity }),
        (true, None) => {
            return Err(invalid(
                S,
                "ca",
                "(unset)",
                "https:// endpoints need the CA certificate that signed etcd's: set ca = \"/path/ca.pem\"",
            ));
        }
        (false, Some(ca)) => {
            return Err(invalid(
                S,
                "ca",
                quoted(&ca.to_string_lossy()),
                "TLS settings with http:// endpoints; use https:// URLs or remove ca, cert and key",
            ));
        }
        (false, None) if identity.is_some() => {
            return Err(invalid(
                S,
                "cert",
                "(set)",
                "TLS settings with http:// endpoints; use https:// URLs or remove cert and key",
            ));
        }
        (false, None) => None,
    };
    let lease_ttl = match raw.lease_ttl {
        None => DEFAULT_LEASE_TTL,
        Some(t) => duration_in(
            S,
            "lease_ttl",
            &t,
            (Duration::from_secs(2), Duration::from_mins(5)),
            "6s",
        )?,
    };
    let summary_interval = match raw.summary_interval {
        None => DEFAULT_SUMMARY_INTERVAL,
        Some(t) => duration_in(
            S,
            "summary_interval",
            &t,
            (Duration::from_millis(100), Duration::from_mins(1)),
            "2s",
        )?,
    };
    if summary_interval >= lease_ttl {
        return Err(invalid(
            S,
            "summary_interval",
            quoted(&format!("{}s", summary_interval.as_secs_f64())),
            format!(
                "must be shorter than lease_ttl ({}s), or a live node's summary would expire",
                lease_ttl.as_secs_f64()
            ),
        ));
    }
    Ok(FleetConfig {
        etcd: raw.etcd,
        node,
        prefix,
        tls,
        lease_ttl,
        summary_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GOOD, error_text, parse};

    fn with_fleet(lines: &str) -> String {
        format!("{GOOD}\n[fleet]\n{lines}\n")
    }

    #[test]
    fn a_fleet_section_parses_with_its_defaults() {
        let c = parse(&with_fleet(
            "etcd = [\"http://10.0.0.5:2379\"]\nnode = \"node-7\"",
        ))
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.node, "node-7");
        assert_eq!(f.prefix, "/canary");
        assert_eq!(f.tls, None);
        assert_eq!(f.lease_ttl, super::DEFAULT_LEASE_TTL);
        assert!(
            parse(GOOD).unwrap().fleet.is_none(),
            "no [fleet]: single node"
        );
        let tls = parse(&with_fleet(
            "etcd = [\"https://a:2379\", \"https://b:2379\"]\nca = \"/e/ca.pem\"\ncert = \"/e/c.pem\"\nkey = \"/e/k.pem\"",
        ))
        .unwrap()
        .fleet
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(tls.ca.to_str(), Some("/e/ca.pem"));
        assert!(tls.identity.is_some());
    }

    #[test]
    fn bad_fleet_settings_name_the_key_and_the_fix() {
        for (lines, expected) in [
            (
                "etcd = []",
                "[fleet]: etcd = 0 endpoints: list 1 to 16 etcd client URLs",
            ),
            (
                "etcd = [\"10.0.0.5:2379\"]",
                "starts with http:// or https://",
            ),
            ("etcd = [\"http://10.0.0.5\"]", "write scheme://host:port"),
            (
                "etcd = [\"http://a:1\", \"https://b:2\"]",
                "mixes http:// and https://",
            ),
            (
                "etcd = [\"https://a:1\"]",
                "[fleet]: ca = (unset): https:// endpoints need the CA",
            ),
            (
                "etcd = [\"http://a:1\"]\nca = \"/ca.pem\"",
                "TLS settings with http:// endpoints",
            ),
            (
                "etcd = [\"https://a:1\"]\nca = \"/ca\"\ncert = \"/c\"",
                "a client certificate needs its key",
            ),
            (
                "etcd = [\"https://a:1\"]\nca = \"ca.pem\"",
                "must be an absolute path",
            ),
            (
                "etcd = [\"http://a:1\"]\nnode = \"node 7\"",
                "[fleet]: node = \"node 7\": 1 to 64 letters",
            ),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"canary/\"",
                "[fleet]: prefix = \"canary/\"",
            ),
            (
                "etcd = [\"http://a:1\"]\nsummary_interval = \"10s\"",
                "must be shorter than lease_ttl (6s)",
            ),
            (
                "etcd = [\"http://a:1\"]\nlease_ttl = \"1s\"",
                "lease_ttl = \"1s\": must be a duration between 2s and",
            ),
            (
                "etcd = [\"http://a:1\"]\nzone = \"eu\"",
                "unknown field `zone`",
            ),
        ] {
            let err = error_text(&with_fleet(lines));
            assert!(err.contains(expected), "{lines}: {err}");
        }
    }

    #[test]
    fn the_node_flag_replaces_the_name_and_needs_a_fleet() {
        let c = parse(&with_fleet("etcd = [\"http://a:1\"]\nnode = \"x\""))
            .unwrap()
            .with_node(Some("k8s-node-3"))
            .unwrap();
        assert_eq!(c.fleet.unwrap().node, "k8s-node-3");
        let err = parse(GOOD)
            .unwrap()
            .with_node(Some("n1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no [fleet] section; add one or drop --node"),
            "{err}"
        );
        let err = parse(&with_fleet("etcd = [\"http://a:1\"]"))
            .unwrap()
            .with_node(Some("bad/name"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("node = \"bad/name\""), "{err}");
    }
}

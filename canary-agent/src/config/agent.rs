//! The `[agent]` section: interfaces, sockets, paths, capacities.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use canary_common::{
    flow::{CT_DEFAULT_CAPACITY, CT_UDP_DEFAULT_CAPACITY},
    service::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES},
};

use super::{
    ConfigError, DEFAULT_BPFFS_DIR, DEFAULT_BUCKETS_PER_OCTAVE, DEFAULT_CONTROL_SOCKET,
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_METRICS_ADDR, DEFAULT_STATE_DIR, MAX_CONNTRACK_CAPACITY,
    MAX_INTERFACE_NAME, MAX_INTERFACES, MAX_MAX_BACKENDS, MAX_MAX_SERVICES, MAX_SOCKET_PATH,
    MAX_STATE_DIR, MAX_TEXT, MIN_CONNTRACK_CAPACITY,
    check::{duration_in, int_in, invalid, length_in, quoted, truncated},
    raw::RawAgent,
};

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
    /// UDP conntrack capacity in entries (two per flow), a table of its
    /// own so that UDP flows never evict TCP connections.
    pub udp_conntrack_capacity: u32,
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
    /// Where rollout state changes are sent as JSON (HTTP POST), if anywhere.
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

/// Validates `[agent]`; also checks that the interfaces and the
/// `control_group` exist on this host.
pub(super) fn validate_agent(raw: RawAgent) -> Result<AgentConfig, ConfigError> {
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
    let udp_conntrack_capacity = match raw.udp_conntrack_capacity {
        None => CT_UDP_DEFAULT_CAPACITY,
        Some(n) => int_in(
            S,
            "udp_conntrack_capacity",
            n,
            MIN_CONNTRACK_CAPACITY.into(),
            MAX_CONNTRACK_CAPACITY.into(),
            " entries (two per UDP flow)",
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
            (Duration::from_millis(100), Duration::from_mins(2)),
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
        udp_conntrack_capacity,
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
                        crate::file_kind(&meta)
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
                crate::file_kind(&meta)
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether `name` is a network interface in this network namespace.
fn interface_exists(name: &str) -> bool {
    crate::sys::ifindex(name) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Config,
        tests::{GOOD, error_text, parse, tc},
    };

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
    fn conntrack_capacity_is_bounded() {
        let msg = error_text(&GOOD.replace("[agent]", "[agent]\nconntrack_capacity = 10"));
        assert!(
            msg.contains("[agent]: conntrack_capacity = 10: must be between 1024"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace("[agent]", "[agent]\nudp_conntrack_capacity = 0"));
        assert!(
            msg.contains("[agent]: udp_conntrack_capacity = 0: must be between 1024"),
            "{msg}"
        );
        let c = parse(&GOOD.replace("[agent]", "[agent]\nudp_conntrack_capacity = 4096")).unwrap();
        assert_eq!(c.agent.udp_conntrack_capacity, 4096);
        assert_eq!(
            parse(GOOD).unwrap().agent.udp_conntrack_capacity,
            CT_UDP_DEFAULT_CAPACITY,
            "default: its own table of 65536 entries"
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
}

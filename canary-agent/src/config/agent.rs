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
    /// The cgroup v2 directory where socket-level steering is attached
    /// (`[agent] cgroup`); `None` when `socket_lb = false`. Every process
    /// in it or below it is a client steered at `connect()`.
    pub socket_lb: Option<PathBuf>,
}

/// Names of the link-pin directories the socket LB uses under
/// `<bpffs_dir>/links/`, beside one directory per interface: interfaces
/// cannot have these names.
pub const RESERVED_LINK_DIRS: [&str; 2] = ["cgroup", "tracing"];

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
    let socket_lb = validate_socket_lb(raw.socket_lb, raw.cgroup)?;
    if raw.interfaces.is_empty() && socket_lb.is_none() {
        return Err(invalid(
            S,
            "interfaces",
            "[]",
            "name at least one client-facing interface, e.g. [\"eth0\"], or set \
             socket_lb = true to steer the clients on this node",
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
        if RESERVED_LINK_DIRS.contains(&iface.name.as_str()) {
            return Err(invalid(
                S,
                "interfaces",
                quoted(&iface.name),
                "this name is reserved: the socket LB pins its links in \
                 <bpffs_dir>/links/cgroup and links/tracing; rename the interface",
            ));
        }
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
        socket_lb,
    })
}

/// `socket_lb` (default on) and `cgroup` (default: the cgroup v2 mount):
/// the cgroup to attach the socket LB at, or `None`.
fn validate_socket_lb(
    socket_lb: Option<bool>,
    cgroup: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    const S: &str = "[agent]";
    if socket_lb == Some(false) {
        if let Some(path) = cgroup {
            return Err(invalid(
                S,
                "cgroup",
                quoted(&path.display().to_string()),
                "only used with socket_lb = true; remove it, or set socket_lb = true",
            ));
        }
        return Ok(None);
    }
    let Some(path) = cgroup else {
        return default_cgroup().map(Some).ok_or_else(|| {
            invalid(
                S,
                "cgroup",
                "(unset)",
                "no cgroup v2 file system is mounted (/proc/self/mountinfo lists none), so \
                 socket_lb has nowhere to attach; mount one (mount -t cgroup2 none \
                 /sys/fs/cgroup) and set cgroup, or set socket_lb = false",
            )
        });
    };
    let text = path.display().to_string();
    length_in(S, "cgroup", &text, MAX_STATE_DIR, "the path")?;
    if !path.is_absolute() {
        return Err(invalid(
            S,
            "cgroup",
            quoted(&text),
            "must be an absolute path, e.g. \"/sys/fs/cgroup\"",
        ));
    }
    if !path.is_dir() {
        return Err(invalid(
            S,
            "cgroup",
            quoted(&text),
            "no such directory; name a cgroup v2 directory (its mount point covers every \
             process on the node), or set socket_lb = false",
        ));
    }
    match crate::sys::is_cgroup2(&path) {
        Ok(true) => Ok(Some(path)),
        Ok(false) => Err(invalid(
            S,
            "cgroup",
            quoted(&text),
            "not on a cgroup v2 file system (cgroup v1 has no socket hooks); \
             `grep cgroup2 /proc/self/mountinfo` shows where v2 is mounted",
        )),
        Err(e) => Err(invalid(
            S,
            "cgroup",
            quoted(&text),
            format!("cannot inspect it: {e}"),
        )),
    }
}

/// The first cgroup v2 mount point in this process's mount table. Read
/// once per process: `socket_lb` and `cgroup` take effect at start only.
fn default_cgroup() -> Option<PathBuf> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|table| cgroup2_mount(&table))
        })
        .clone()
}

/// The mount point of the first `cgroup2` file system in a
/// `/proc/self/mountinfo` table (`proc(5)`: the fifth field is the mount
/// point, with space, tab, newline and backslash escaped in octal; the
/// file-system type follows the ` - ` separator).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, rest) = line.split_once(" - ")?;
        let fstype = rest.split(' ').next()?;
        let point = mount.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(point)))
    })
}

/// `\040`-style octal escapes of mountinfo, decoded.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn the_cgroup2_mount_point_is_found_in_mountinfo() {
        let table = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_mount(table),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let escaped = "40 30 0:50 / /run/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount(escaped),
            Some(PathBuf::from("/run/my cgroups"))
        );
        assert_eq!(cgroup2_mount(&table.replace("cgroup2", "cgroup")), None);
        assert_eq!(cgroup2_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn socket_lb_is_on_by_default_at_the_cgroup2_mount_and_can_replace_interfaces() {
        let Some(mount) = default_cgroup() else {
            // Nothing to attach to on this machine: the error says so.
            let msg = error_text(GOOD);
            assert!(
                msg.contains("[agent]: cgroup = (unset): no cgroup v2"),
                "{msg}"
            );
            return;
        };
        let c = parse(GOOD).unwrap();
        assert_eq!(c.agent.socket_lb, Some(mount.clone()));
        let c = parse(&GOOD.replace("[\"lo\"]", "[]")).expect("socket LB alone is enough");
        assert!(c.agent.interfaces.is_empty());
        let c =
            parse(&GOOD.replace("interfaces = [\"lo\"]", "")).expect("interfaces may be left out");
        assert!(c.agent.interfaces.is_empty());
        let c = parse(&GOOD.replace(
            "[agent]",
            &format!("[agent]\ncgroup = \"{}\"", mount.display()),
        ))
        .unwrap();
        assert_eq!(c.agent.socket_lb, Some(mount));
        let c = parse(&GOOD.replace("[agent]", "[agent]\nsocket_lb = false")).unwrap();
        assert_eq!(c.agent.socket_lb, None);
    }

    #[test]
    fn socket_lb_settings_are_validated() {
        let msg = error_text(
            &GOOD
                .replace("[\"lo\"]", "[]")
                .replace("[agent]", "[agent]\nsocket_lb = false"),
        );
        assert!(
            msg.contains("[agent]: interfaces = []: name at least one client-facing interface")
                && msg.contains("or set socket_lb = true"),
            "{msg}"
        );
        let agent = |line: &str| GOOD.replace("[agent]", &format!("[agent]\n{line}"));
        for (line, expected) in [
            (
                "cgroup = \"sys/fs/cgroup\"",
                "[agent]: cgroup = \"sys/fs/cgroup\": must be an absolute path",
            ),
            (
                "cgroup = \"/nonexistent/canary-cgroup\"",
                "[agent]: cgroup = \"/nonexistent/canary-cgroup\": no such directory",
            ),
            (
                "cgroup = \"/proc\"",
                "[agent]: cgroup = \"/proc\": not on a cgroup v2 file system",
            ),
            (
                "socket_lb = false\ncgroup = \"/sys/fs/cgroup\"",
                "[agent]: cgroup = \"/sys/fs/cgroup\": only used with socket_lb = true",
            ),
            (
                "socket_lb = \"yes\"",
                "invalid type: string \"yes\", expected a boolean",
            ),
        ] {
            let msg = error_text(&agent(line));
            assert!(
                msg.contains(expected),
                "{line}: expected {expected:?}\n got {msg:?}"
            );
        }
        let msg = error_text(&GOOD.replace("[\"lo\"]", "[\"cgroup\"]"));
        assert!(
            msg.contains("[agent]: interfaces = \"cgroup\": this name is reserved"),
            "{msg}"
        );
    }

    #[test]
    fn missing_interfaces_are_named() {
        let msg = error_text(&GOOD.replace("[\"lo\"]", "[\"lo\", \"canary-nope0\"]"));
        assert_eq!(
            msg,
            "[agent]: interfaces = \"canary-nope0\": no such network interface in this network \
             namespace; `ip link` lists the names"
        );
        let msg = error_text(
            &GOOD
                .replace("[\"lo\"]", "[]")
                .replace("[agent]", "[agent]\nsocket_lb = false"),
        );
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
        assert_eq!(c.agent.webhook.unwrap().url.authority, "127.0.0.1:9999");
        let msg = error_text(&GOOD.replace(
            "[agent]",
            "[agent]\nwebhook_url = \"https://bot:pw@chat.example/h\"",
        ));
        assert!(
            msg.contains("[agent]: webhook_url = \"https://bot:pw@chat.example/h\": must not carry credentials"),
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

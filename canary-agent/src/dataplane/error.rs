//! The data plane's one error type: each variant names what was being
//! done.

use std::path::PathBuf;

use aya::{maps::MapError, programs::ProgramError};

/// A data-plane failure. Each variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object could not be loaded (maps created, relocations).
    #[error("cannot load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program or map the object must contain is missing.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// The kernel refused a program (verifier) or an operation on it.
    #[error("program {name}: {action}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching to an interface failed.
    #[error("cannot attach {name} to {hook} of interface {interface}")]
    Attach {
        name: &'static str,
        hook: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// The number of possible CPUs could not be read.
    #[error("cannot read the number of possible CPUs")]
    Cpus(#[source] std::io::Error),
    /// More backends across all services than `STATS` has slots.
    #[error(
        "{wanted} backend stats slots needed, {available} available; raise [agent] max_backends (restart needed)"
    )]
    SlotsExhausted { wanted: usize, available: usize },
    /// The bpffs directory could not be prepared.
    #[error("bpffs directory {dir}: cannot {action} (set [agent] bpffs_dir)", dir = dir.display())]
    Bpffs {
        dir: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// The object file named by `CANARY_EBPF_OBJECT` could not be read.
    #[error("cannot read the eBPF object {path} (from CANARY_EBPF_OBJECT)", path = path.display())]
    ObjectFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The embedded object could not be parsed.
    #[error("cannot parse the embedded eBPF object: {0}")]
    Object(String),
    /// An IPv6 service on a kernel whose checksum helper cannot NAT IPv6.
    #[error(
        "service {service:?} has an IPv6 VIP, but this kernel's bpf_l4_csum_replace does not take BPF_F_IPV6 (Linux 6.16 or later): IPv6 cannot be NATed at TC here; upgrade the kernel or remove the service"
    )]
    Ipv6Unsupported { service: String },
    /// A pinned map that this agent cannot use or migrate.
    #[error(
        "pinned map {map} in {dir} cannot be adopted: {reason}; `canary-agent uninstall --bpffs-dir {dir}` removes the old data plane (its connections through the VIPs break) so the agent can start fresh",
        dir = dir.display()
    )]
    Incompatible {
        map: &'static str,
        dir: PathBuf,
        reason: String,
    },
    /// A link could not be taken, converted or pinned.
    #[error("program {name} on interface {interface}: cannot {action}")]
    Link {
        name: &'static str,
        interface: String,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A pinned link could not be adopted or created.
    #[error("link pin {path}: cannot {action}", path = path.display())]
    LinkPin {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's BTF (needed by the socket LB's tracepoint programs)
    /// could not be read.
    #[error(
        "cannot read the kernel's BTF (/sys/kernel/btf/vmlinux), which the socket LB needs; set [agent] socket_lb = false on a kernel without it"
    )]
    Btf(#[source] Box<aya::BtfError>),
    /// The socket LB's cgroup could not be used.
    #[error("cgroup {path} ([agent] cgroup): cannot {action}", path = path.display())]
    Cgroup {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Another agent runs on the same pinned data plane (it holds the
    /// directory's lock) and did not exit within the wait.
    #[error(
        "{dir} is in use by another running canary-agent (it holds the directory's lock); stop it first, or give this agent its own [agent] bpffs_dir"
    )]
    Busy { dir: PathBuf },
    /// A map operation failed.
    #[error("map {map}: {action}")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: Box<MapError>,
    },
}

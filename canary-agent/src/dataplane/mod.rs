//! Loads the eBPF programs, attaches them to interfaces and (the socket
//! LB) to a cgroup, and is the only writer of the `SERVICES` and `RULES`
//! maps.
//!
//! A config is applied all or nothing: new rule sets are written beside the
//! old ones, each service value (weight, salt, rule set, both backend lists)
//! is replaced in one map update, and if any step fails every step before it
//! is undone, so the data plane keeps the previous config whole.

mod adopt;
mod apply;
mod attach;
mod cgroup;
mod drain;
mod encode;
pub mod pins;
mod probe;
mod sweep;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, RingBuf},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use canary_common::{
    breaker::BreakerState,
    counters::Counter,
    flow::{CtEntry, FlowKey, SynRecord, UdpConfig},
    layout, names,
    service::Cohort,
    service::{RuleKey, ServiceKey, ServiceValue},
    sock::{SockRevKey, SockRevValue, SockUdpFlow},
};
use tracing::warn;

pub use self::{
    adopt::Adopted,
    apply::ApplyReport,
    cgroup::SockProgram,
    drain::Drained,
    encode::{decode_breaker_event, flow_key, flow_key_of, service_key, service_value, udp_config},
    sweep::UdpSwept,
};
use self::{
    apply::Installed,
    attach::Attached,
    cgroup::SocketLb,
    pins::{MapAction, Pins},
};
use crate::{
    config::IngressMode,
    telemetry::{Snapshot, StatsSource},
};

/// The compiled eBPF object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/canary"));

/// Environment variable naming an object file the agent loads instead of
/// [`EBPF_OBJECT`]: for trying a new data-plane build on a running data
/// plane before shipping it (the upgrade test does).
pub const OBJECT_ENV: &str = "CANARY_EBPF_OBJECT";

/// The object the agent runs: the file `$CANARY_EBPF_OBJECT` if set, else
/// the embedded one.
fn agent_object() -> Result<std::borrow::Cow<'static, [u8]>, DataplaneError> {
    let Some(path) = std::env::var_os(OBJECT_ENV) else {
        return Ok(std::borrow::Cow::Borrowed(EBPF_OBJECT));
    };
    let bytes = std::fs::read(&path).map_err(|source| DataplaneError::ObjectFile {
        path: PathBuf::from(&path),
        source,
    })?;
    warn!(path = %Path::new(&path).display(), "loading the data plane from {OBJECT_ENV}, not the built-in object");
    Ok(std::borrow::Cow::Owned(bytes))
}

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
    /// A map operation failed.
    #[error("map {map}: {action}")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: Box<MapError>,
    },
}

/// Map sizes, fixed at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Conntrack entries (two per flow).
    pub conntrack: u32,
    /// UDP conntrack entries (two per flow).
    pub udp_conntrack: u32,
    /// Services.
    pub services: u32,
    /// Backends across all services, counted per service and cohort.
    pub backends: u32,
}

impl Default for Capacity {
    fn default() -> Capacity {
        Capacity {
            conntrack: canary_common::flow::CT_DEFAULT_CAPACITY,
            udp_conntrack: canary_common::flow::CT_UDP_DEFAULT_CAPACITY,
            services: canary_common::service::DEFAULT_MAX_SERVICES,
            backends: canary_common::service::DEFAULT_MAX_BACKENDS,
        }
    }
}

impl Capacity {
    /// `max_entries` of each resized map.
    ///
    /// The service and backend maps hold twice the configured maximum: an
    /// apply writes the new entries beside the old ones before it removes
    /// what is gone, so a reload that replaces every service (new VIPs,
    /// new names) or every backend at the limit still fits. The service
    /// maps allocate entries only when used; `STATS`, a per-CPU array, is
    /// allocated whole.
    pub fn by_map(&self) -> BTreeMap<&'static str, u32> {
        BTreeMap::from([
            (names::CONNTRACK, self.conntrack),
            (names::CT_UDP, self.udp_conntrack),
            (names::SERVICES, 2 * self.services),
            (names::UDP_CONFIG, 2 * self.services),
            (names::BREAKER, 2 * self.services),
            (names::HISTOGRAMS, 4 * self.services),
            (names::STATS, self.stats_slots() + 1),
            (names::TIMEOUTS, self.stats_slots() + 1),
            (names::SOCK_TIMEOUTS, self.stats_slots() + 1),
            (names::UDP_TIMEOUTS, self.stats_slots() + 1),
        ])
    }

    /// Stats slots (slot 0 is reserved for flows no slot claims).
    fn stats_slots(&self) -> u32 {
        2 * self.backends
    }
}

impl From<&crate::config::AgentConfig> for Capacity {
    /// The map sizes a config asks for.
    fn from(agent: &crate::config::AgentConfig) -> Capacity {
        Capacity {
            conntrack: agent.conntrack_capacity,
            udp_conntrack: agent.udp_conntrack_capacity,
            services: agent.max_services,
            backends: agent.max_backends,
        }
    }
}

/// The programs in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Client → VIP at TC ingress of a client-facing interface.
    TcIngress,
    /// Client → VIP at XDP of a client-facing interface (`mode = "xdp"`).
    XdpIngress,
    /// Backend → client at TC egress of the same interface.
    TcEgress,
    /// Kernel probe for the IPv6 checksum flag (test-run once, never
    /// attached).
    ProbeIpv6Csum,
    /// The UDP sweep of one flow (test-run by the agent's sweep, never
    /// attached).
    UdpSweep,
    /// Empty TC program, the benchmark's baseline (loaded on request).
    BenchTcEmpty,
    /// Empty XDP program, the benchmark's baseline (loaded on request).
    BenchXdpEmpty,
}

impl Program {
    /// What the agent loads.
    const DATAPLANE: [Program; 5] = [
        Program::TcIngress,
        Program::XdpIngress,
        Program::TcEgress,
        Program::ProbeIpv6Csum,
        Program::UdpSweep,
    ];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Program::TcIngress => names::PROG_TC_INGRESS,
            Program::XdpIngress => names::PROG_XDP_INGRESS,
            Program::TcEgress => names::PROG_TC_EGRESS,
            Program::ProbeIpv6Csum => names::PROG_PROBE_IPV6_CSUM,
            Program::UdpSweep => names::PROG_UDP_SWEEP,
            Program::BenchTcEmpty => names::PROG_BENCH_TC_EMPTY,
            Program::BenchXdpEmpty => names::PROG_BENCH_XDP_EMPTY,
        }
    }

    fn is_xdp(self) -> bool {
        matches!(self, Program::XdpIngress | Program::BenchXdpEmpty)
    }

    /// The program that takes client packets in `mode`.
    pub fn ingress(mode: IngressMode) -> Program {
        match mode {
            IngressMode::Tc => Program::TcIngress,
            IngressMode::Xdp => Program::XdpIngress,
        }
    }

    /// The file name of the program's link pin on an interface.
    fn pin_name(self) -> &'static str {
        match self {
            Program::TcIngress => "tc_ingress",
            Program::XdpIngress => "xdp",
            Program::TcEgress => "tc_egress",
            Program::ProbeIpv6Csum => "probe_ipv6_csum",
            Program::UdpSweep => "udp_sweep",
            Program::BenchTcEmpty => "bench_tc",
            Program::BenchXdpEmpty => "bench_xdp",
        }
    }

    fn hook(self) -> &'static str {
        match self {
            Program::TcIngress => "TC ingress",
            Program::XdpIngress | Program::BenchXdpEmpty => "XDP",
            Program::TcEgress => "TC egress",
            Program::BenchTcEmpty | Program::ProbeIpv6Csum | Program::UdpSweep => "TC",
        }
    }
}

/// Whose counters a stats slot holds: a backend of one cohort of one
/// service (the same address in both cohorts, or in two services, gets two
/// slots).
type SlotKey = (String, Cohort, SocketAddr);

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    rules: LpmTrie<MapData, RuleKey, u32>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    /// UDP flows (`CT_UDP`); the sweep walks it.
    ct_udp: HashMap<MapData, FlowKey, CtEntry>,
    /// Unconnected UDP sockets' flows steered at the socket (`SOCK_UDP`);
    /// the drain deadline marks a service's canary flows.
    sock_udp: HashMap<MapData, SockRevKey, SockUdpFlow>,
    /// Steered sockets' {cookie, backend} → VIP and service
    /// (`SOCK_REVNAT`); the drain deadline finds a socket's service here.
    sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    /// UDP services' timeouts (`UDP_CONFIG`), by service id.
    udp_config: HashMap<MapData, u32, UdpConfig>,
    /// The ring of recent SYNs (`PENDING`) the handshake sweep reads.
    pending: Array<MapData, SynRecord>,
    /// The number of the next SYN the handshake sweep reads (`None`: not
    /// swept yet; the first sweep starts a whole ring back).
    pending_next: Option<u64>,
    breaker: HashMap<MapData, u32, BreakerState>,
    /// Breaker trips; taken by the agent's event loop.
    events: Option<RingBuf<MapData>>,
    /// Stats maps and labels, shared with the exporter.
    stats: Arc<Mutex<StatsSource>>,
    /// Stats slot of each (service, cohort, backend), stable while the
    /// backend stays configured.
    slots: BTreeMap<SlotKey, u32>,
    /// Released slots, reused oldest first (late reuse keeps draining flows'
    /// counts with their old backend as long as possible).
    free_slots: VecDeque<u32>,
    next_slot: u32,
    /// One past the highest slot `STATS` has.
    slot_limit: u32,
    /// Possible CPUs: the length of every per-CPU value.
    ncpus: usize,
    links: BTreeMap<String, Attached>,
    /// The socket LB's links, if attached.
    socket_lb: Option<SocketLb>,
    /// Whether the socket LB's programs are loaded (on first attach).
    socket_programs_loaded: bool,
    /// `SOCK_ACTIVE`: which object's socket tracepoint programs count.
    sock_active: Array<MapData, u32>,
    /// This object's `SOCK_GENERATION`.
    generation: u32,
    /// What the last apply wrote for each service: its key (to remove it),
    /// its rule set (to reuse or free it) and its stats slots. Not a second
    /// opinion on the weights: the next apply compares with the kernel's
    /// values, and the rollout states decide what is wanted.
    installed: BTreeMap<String, Installed>,
    svc_ids: BTreeMap<String, u32>,
    next_svc_id: u32,
    next_rule_set: u32,
    /// Where maps and links are pinned; `None` for a private data plane
    /// (packet fixtures, benchmarks) that ends with this value.
    pins: Option<Pins>,
    /// Maps created to replace a pin of another capacity: their pins are
    /// replaced once the new programs run (see [`Dataplane::finish_migration`]).
    migrating: Vec<&'static str>,
    /// The maps of `migrating` whose entries are converted from an older
    /// layout rather than copied.
    converting: Vec<&'static str>,
    /// The layout versions of the pinned maps; the versions of migrating
    /// maps are written once their pins are replaced.
    layout: Array<MapData, u32>,
    /// Whether the kernel's checksum helper takes `BPF_F_IPV6` (probed at
    /// load): without it IPv6 services cannot be rewritten at TC.
    ipv6_nat: bool,
    /// Whether this agent created the pinned data plane (nothing was
    /// pinned before): a failed start then removes it again.
    fresh: bool,
}

impl Dataplane {
    /// Loads the object and every program (the verifier runs here) without
    /// attaching anything, with fresh maps sized by `capacity` that live as
    /// long as this value: for packet fixtures and benchmarks.
    pub fn load(capacity: Capacity) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_with(capacity, None, EBPF_OBJECT)
    }

    /// Loads the object with its maps pinned under `bpffs_dir`, adopting
    /// the maps a previous agent pinned there: compatible pins are reused
    /// (conntrack, counters and breaker windows carry over), pins of
    /// another capacity are migrated into new maps, and anything else is
    /// refused. Call [`Dataplane::adopt`] before the first apply, and
    /// [`Dataplane::finish_migration`] once attached.
    pub fn open(capacity: Capacity, bpffs_dir: &Path) -> Result<Dataplane, DataplaneError> {
        let object = agent_object()?;
        let pins = Pins::prepare(bpffs_dir)?;
        let plan = pins.plan(&object, &capacity.by_map())?;
        let fresh = plan.values().all(|a| *a == MapAction::Create);
        match Dataplane::load_with(capacity, Some((pins, plan)), &object) {
            Err(e) if fresh => {
                // Maps the loader created and pinned before it failed.
                if let Err(undo) = Pins::uninstall(bpffs_dir) {
                    warn!(error = %undo, "cannot remove the pins of the failed load");
                }
                Err(e)
            }
            result => result,
        }
    }

    fn load_with(
        capacity: Capacity,
        pinned: Option<(Pins, BTreeMap<&'static str, MapAction>)>,
        object: &[u8],
    ) -> Result<Dataplane, DataplaneError> {
        // Distinct for every load, so this object's socket tracepoint
        // programs can be told from the previous agent's (cgroup.rs).
        let generation = sock_generation();
        let mut loader = EbpfLoader::new();
        loader.override_global(names::SOCK_GENERATION, &generation, true);
        for (name, entries) in capacity.by_map() {
            loader.map_max_entries(name, entries);
        }
        let mut migrating = Vec::new();
        let mut converting = Vec::new();
        if let Some((pins, plan)) = &pinned {
            for (&name, &action) in plan {
                match action {
                    // The loader opens the pin if there is one, else creates
                    // the map and pins it.
                    MapAction::Create | MapAction::Reuse => {
                        loader.map_pin_path(name, pins.map_path(name));
                    }
                    MapAction::Migrate | MapAction::Recreate => migrating.push(name),
                    MapAction::Convert => {
                        migrating.push(name);
                        converting.push(name);
                    }
                }
            }
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        if let Some((pins, _)) = &pinned {
            // Pinned beside the old map now, swapped in by
            // finish_migration: a crash before that leaves the old pin.
            for &name in &migrating {
                let staged = pins.staged_map_path(name);
                let map = ebpf
                    .map(name)
                    .ok_or(DataplaneError::Missing { kind: "map", name })?;
                map.pin(&staged).map_err(|e| DataplaneError::Bpffs {
                    dir: pins.root().to_path_buf(),
                    action: format!("pin the new {name} at {}", staged.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
        }
        for program in Program::DATAPLANE {
            load_program(&mut ebpf, program)?;
        }
        let mut layout_map: Array<MapData, u32> = take_map(&mut ebpf, names::LAYOUT)?;
        // A migrating map's pin keeps the old layout until it is replaced:
        // recorded then, so a crash in between leaves a true record.
        record_layout(&mut layout_map, |name| !migrating.contains(&name))?;
        let stats = StatsSource {
            stats: take_map(&mut ebpf, names::STATS)?,
            histograms: take_map(&mut ebpf, names::HISTOGRAMS)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            view: Vec::new(),
            timeouts: take_map(&mut ebpf, names::TIMEOUTS)?,
            sock_timeouts: take_map(&mut ebpf, names::SOCK_TIMEOUTS)?,
            udp_timeouts: take_map(&mut ebpf, names::UDP_TIMEOUTS)?,
            rollout: StdHashMap::new(),
            attached: std::collections::BTreeMap::new(),
        };
        let sock_active = take_map(&mut ebpf, names::SOCK_ACTIVE)?;
        let mut dp = Dataplane {
            services: take_map(&mut ebpf, names::SERVICES)?,
            rules: take_map(&mut ebpf, names::RULES)?,
            conntrack: take_map(&mut ebpf, names::CONNTRACK)?,
            ct_udp: take_map(&mut ebpf, names::CT_UDP)?,
            sock_udp: take_map(&mut ebpf, names::SOCK_UDP)?,
            sock_revnat: take_map(&mut ebpf, names::SOCK_REVNAT)?,
            udp_config: take_map(&mut ebpf, names::UDP_CONFIG)?,
            pending: take_map(&mut ebpf, names::PENDING)?,
            pending_next: None,
            breaker: take_map(&mut ebpf, names::BREAKER)?,
            events: Some(take_map(&mut ebpf, names::EVENTS)?),
            stats: Arc::new(Mutex::new(stats)),
            slots: BTreeMap::new(),
            free_slots: VecDeque::new(),
            next_slot: 1,
            slot_limit: capacity.stats_slots() + 1,
            ncpus: aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?,
            ebpf,
            links: BTreeMap::new(),
            socket_lb: None,
            socket_programs_loaded: false,
            sock_active,
            generation,
            installed: BTreeMap::new(),
            svc_ids: BTreeMap::new(),
            next_svc_id: 1,
            next_rule_set: 1,
            fresh: pinned
                .as_ref()
                .is_some_and(|(_, plan)| plan.values().all(|a| *a == MapAction::Create)),
            pins: pinned.map(|(pins, _)| pins),
            migrating,
            converting,
            layout: layout_map,
            ipv6_nat: false,
        };
        dp.copy_migrating()?;
        dp.ipv6_nat = dp.probe_ipv6_csum()?;
        Ok(dp)
    }

    /// Whether this agent created the pinned data plane rather than
    /// adopting one.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The data-plane counters summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DataplaneError> {
        lock(&self.stats)
            .dataplane_counters()
            .map_err(|source| map_error(names::COUNTERS, "read".to_string(), source))
    }

    /// The bpffs directory of a pinned data plane.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(Pins::root)
    }

    /// Starts `service`'s breaker afresh: no window, not tripped.
    pub fn reset_breaker(&mut self, service: &str) -> Result<(), DataplaneError> {
        let Some(installed) = self.installed.get(service) else {
            return Ok(());
        };
        self.breaker
            .insert(installed.value.svc_id, BreakerState::default(), 0)
            .map_err(|source| {
                map_error(
                    names::BREAKER,
                    format!("reset the breaker of service {service}"),
                    source,
                )
            })
    }

    /// The breaker-trip ring buffer, once (the agent's event loop owns it).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The name of the service with id `svc_id`.
    pub fn service_name(&self, svc_id: u32) -> Option<&str> {
        self.installed
            .iter()
            .find(|(_, s)| s.value.svc_id == svc_id)
            .map(|(n, _)| n.as_str())
    }

    /// The breaker window of `service`, if it has one.
    pub fn breaker_state(&self, service: &str) -> Option<BreakerState> {
        let id = self.installed.get(service)?.value.svc_id;
        self.breaker.get(&id, 0).ok()
    }

    /// The stats maps and labels, for the exporter.
    pub fn stats_source(&self) -> Arc<Mutex<StatsSource>> {
        Arc::clone(&self.stats)
    }

    /// Every counter and histogram now.
    pub fn snapshot(&self) -> Result<Snapshot, DataplaneError> {
        self.snapshot_where(|_| true)
    }

    /// Counters and histograms of the services `keep` accepts.
    pub fn snapshot_where(&self, keep: impl Fn(&str) -> bool) -> Result<Snapshot, DataplaneError> {
        lock(&self.stats)
            .snapshot_where(keep)
            .map_err(|source| map_error(names::STATS, "read".to_string(), source))
    }
}

/// The program `name` of the object, as a `T` (`what` names the type in
/// the error).
fn typed_program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    what: &'static str,
) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Missing {
        kind: "program",
        name,
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name,
            action: what,
            source: Box::new(source),
        })
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    typed_program(ebpf, name, "is not a TC classifier")
}

fn load_program(ebpf: &mut Ebpf, program: Program) -> Result<(), DataplaneError> {
    let result = if program.is_xdp() {
        xdp(ebpf, program.name())?.load()
    } else {
        classifier(ebpf, program.name())?.load()
    };
    result.map_err(|source| DataplaneError::Program {
        name: program.name(),
        action: "rejected by the kernel at load",
        source: Box::new(source),
    })
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    typed_program(ebpf, name, "is not an XDP program")
}

impl Dataplane {
    /// Runs the `BPF_F_IPV6` probe program once on an Ethernet/IPv6/TCP
    /// frame: whether the kernel accepted the flag.
    fn probe_ipv6_csum(&mut self) -> Result<bool, DataplaneError> {
        let mut frame = vec![0u8; 14 + 40 + 20];
        frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        frame[14] = 0x60;
        frame[14 + 5] = 20; // payload length
        frame[14 + 6] = canary_common::IPPROTO_TCP;
        frame[14 + 40 + 12] = 0x50;
        let (verdict, _) = self.test_run(Program::ProbeIpv6Csum, &frame)?;
        Ok(verdict == 0)
    }

    /// Whether IPv6 services can be steered here (see `ipv6_nat`).
    pub fn supports_ipv6(&self) -> bool {
        self.ipv6_nat
    }
}

/// Writes this build's layout version of every map `which` selects into
/// `LAYOUT`.
fn record_layout(
    layout_map: &mut Array<MapData, u32>,
    which: impl Fn(&'static str) -> bool,
) -> Result<(), DataplaneError> {
    for (index, map) in (0u32..).zip(layout::MAPS) {
        if !which(map.name) {
            continue;
        }
        layout_map.set(index, map.version, 0).map_err(|source| {
            map_error(
                names::LAYOUT,
                "record the layout versions".to_string(),
                source,
            )
        })?;
    }
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| map_error(name, "open".to_string(), source))
}

fn map_error(map: &'static str, action: String, source: MapError) -> DataplaneError {
    DataplaneError::Map {
        map,
        action,
        source: Box::new(source),
    }
}

fn lock(stats: &Mutex<StatsSource>) -> MutexGuard<'_, StatsSource> {
    // A panic while holding the lock cannot leave the maps inconsistent
    // (they live in the kernel), so a poisoned lock is still usable.
    stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A `SOCK_GENERATION` for this load: non-zero (a fresh `SOCK_ACTIVE`
/// holds 0, which no object counts under) and, with the clock and the pid
/// mixed in, different from the previous agent's.
fn sock_generation() -> u32 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            d.as_secs() ^ u64::from(d.subsec_nanos()).rotate_left(32)
        });
    let mixed = canary_common::cohort::mix64((u64::from(std::process::id()) << 32) ^ clock);
    #[expect(clippy::cast_possible_truncation, reason = "any 32 bits of the mix")]
    let generation = mixed as u32;
    generation | 1
}

/// Map update flag: only add a new element.
const BPF_NOEXIST: u64 = 1;
/// Map update flag: only replace an existing element.
const BPF_EXIST: u64 = 2;

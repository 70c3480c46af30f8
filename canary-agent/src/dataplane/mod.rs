//! Loads the eBPF programs, attaches them to interfaces, and is the only
//! writer of the `SERVICES` and `RULES` maps.
//!
//! A config is applied all or nothing: new rule sets are written beside the
//! old ones, each service value (weight, salt, rule set, both backend lists)
//! is replaced in one map update, and if any step fails every step before it
//! is undone, so the data plane keeps the previous config whole.

mod adopt;
pub mod pins;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuValues, RingBuf, lpm_trie::Key},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use canary_common::{
    IPPROTO_TCP,
    breaker::BreakerState,
    counters::Counter,
    flow::{CtEntry, FlowKey, PendingSyn, ST_CLOSED, ST_FAILED},
    layout, names,
    service::{
        Backend, COHORT_CANARY, COHORT_STABLE, Cohort, FLAG_CANARY_OFF, MAX_BACKENDS,
        MODE_PER_CONNECTION, MODE_STICKY, RULE_ALWAYS_CANARY, RULE_NEVER_CANARY, RULE_SET_BITS,
        RuleKey, ServiceKey, ServiceValue,
    },
    stats::{BackendCounters, CohortHistograms, HandshakeTimeouts, histogram_key},
};
use tracing::{info, warn};

pub use self::adopt::Adopted;
use self::pins::{MapAction, Pins};
use crate::{
    config::{CohortMode, IngressMode, ServiceConfig},
    sys,
    telemetry::{BackendView, ServiceView, Snapshot, StatsSource},
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
    /// Services.
    pub services: u32,
    /// Backends across all services, counted per service and cohort.
    pub backends: u32,
}

impl Default for Capacity {
    fn default() -> Capacity {
        Capacity {
            conntrack: canary_common::flow::CT_DEFAULT_CAPACITY,
            services: canary_common::service::DEFAULT_MAX_SERVICES,
            backends: canary_common::service::DEFAULT_MAX_BACKENDS,
        }
    }
}

impl Capacity {
    /// max_entries of each resized map.
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
            (names::SERVICES, 2 * self.services),
            (names::BREAKER, 2 * self.services),
            (names::HISTOGRAMS, 4 * self.services),
            (names::STATS, self.stats_slots() + 1),
            (names::TIMEOUTS, self.stats_slots() + 1),
        ])
    }

    /// Stats slots (slot 0 is reserved for flows no slot claims).
    fn stats_slots(&self) -> u32 {
        2 * self.backends
    }
}

impl crate::config::AgentConfig {
    /// The map sizes this config asks for.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            conntrack: self.conntrack_capacity,
            services: self.max_services,
            backends: self.max_backends,
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
    /// Empty TC program, the benchmark's baseline (loaded on request).
    BenchTcEmpty,
    /// Empty XDP program, the benchmark's baseline (loaded on request).
    BenchXdpEmpty,
}

impl Program {
    /// What the agent loads.
    const DATAPLANE: [Program; 3] = [Program::TcIngress, Program::XdpIngress, Program::TcEgress];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Program::TcIngress => names::PROG_TC_INGRESS,
            Program::XdpIngress => names::PROG_XDP_INGRESS,
            Program::TcEgress => names::PROG_TC_EGRESS,
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
            Program::BenchTcEmpty => "bench_tc",
            Program::BenchXdpEmpty => "bench_xdp",
        }
    }

    fn hook(self) -> &'static str {
        match self {
            Program::TcIngress => "TC ingress",
            Program::XdpIngress | Program::BenchXdpEmpty => "XDP",
            Program::TcEgress => "TC egress",
            Program::BenchTcEmpty => "TC",
        }
    }
}

/// An attachment. Pinned, it stays attached when the agent exits, until
/// the pin is removed; unpinned, it ends when the link is dropped.
struct OwnedLink {
    link: FdLink,
    pin: Option<PathBuf>,
}

impl OwnedLink {
    /// Detaches: removes the pin, then drops the last descriptor.
    fn detach(self) -> std::io::Result<()> {
        if let Some(pin) = &self.pin {
            match std::fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        drop(self.link);
        Ok(())
    }
}

/// What is attached to one interface.
struct Attached {
    mode: IngressMode,
    /// The interface's index when attached: a different one now means the
    /// interface was deleted (and maybe recreated), so the links are dead.
    ifindex: u32,
    ingress: OwnedLink,
    egress: OwnedLink,
}

/// What is in `SERVICES`/`RULES` for one service name.
#[derive(Clone)]
struct Installed {
    key: ServiceKey,
    value: ServiceValue,
    rules: Vec<(Key<RuleKey>, u32)>,
}

/// One undoable step of an apply.
enum Undo {
    RemoveRule(Key<RuleKey>),
    RemoveHistograms(u32),
    RemoveBreaker(u32),
    RestoreService(ServiceKey, Option<Box<ServiceValue>>),
}

/// Summary of one apply, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Services that did not exist before.
    pub added: Vec<String>,
    /// Services whose value or rules changed.
    pub changed: Vec<String>,
    /// Services that were removed.
    pub removed: Vec<String>,
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    rules: LpmTrie<MapData, RuleKey, u32>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pending: HashMap<MapData, FlowKey, PendingSyn>,
    breaker: HashMap<MapData, u32, BreakerState>,
    /// Breaker trips; taken by the agent's event loop.
    events: Option<RingBuf<MapData>>,
    /// Stats maps and labels, shared with the exporter.
    stats: Arc<Mutex<StatsSource>>,
    /// Stats slot of each (service, cohort, backend), stable while the
    /// backend stays configured.
    slots: BTreeMap<(String, u8, SocketAddrV4), u32>,
    /// Released slots, reused oldest first (late reuse keeps draining flows'
    /// counts with their old backend as long as possible).
    free_slots: VecDeque<u32>,
    next_slot: u32,
    /// One past the highest slot `STATS` has.
    slot_limit: u32,
    /// Possible CPUs: the length of every per-CPU value.
    ncpus: usize,
    links: BTreeMap<String, Attached>,
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
        let mut loader = EbpfLoader::new();
        for (name, entries) in capacity.by_map() {
            loader.map_max_entries(name, entries);
        }
        let mut migrating = Vec::new();
        if let Some((pins, plan)) = &pinned {
            for (&name, &action) in plan {
                match action {
                    // The loader opens the pin if there is one, else creates
                    // the map and pins it.
                    MapAction::Create | MapAction::Reuse => {
                        loader.map_pin_path(name, pins.map_path(name));
                    }
                    MapAction::Migrate => migrating.push(name),
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
        for (index, map) in (0u32..).zip(layout::MAPS) {
            layout_map.set(index, map.version, 0).map_err(|source| {
                map_error(
                    names::LAYOUT,
                    "record the layout versions".to_string(),
                    source,
                )
            })?;
        }
        let stats = StatsSource {
            stats: take_map(&mut ebpf, names::STATS)?,
            histograms: take_map(&mut ebpf, names::HISTOGRAMS)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            view: Vec::new(),
            timeouts: take_map(&mut ebpf, names::TIMEOUTS)?,
            rollout: StdHashMap::new(),
        };
        let mut dp = Dataplane {
            services: take_map(&mut ebpf, names::SERVICES)?,
            rules: take_map(&mut ebpf, names::RULES)?,
            conntrack: take_map(&mut ebpf, names::CONNTRACK)?,
            pending: take_map(&mut ebpf, names::PENDING)?,
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
            installed: BTreeMap::new(),
            svc_ids: BTreeMap::new(),
            next_svc_id: 1,
            next_rule_set: 1,
            fresh: pinned
                .as_ref()
                .is_some_and(|(_, plan)| plan.values().all(|a| *a == MapAction::Create)),
            pins: pinned.map(|(pins, _)| pins),
            migrating,
        };
        dp.copy_migrating()?;
        Ok(dp)
    }

    /// Whether this agent created the pinned data plane rather than
    /// adopting one.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The bpffs directory of a pinned data plane.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(Pins::root)
    }

    /// Attaches to `interface`: client packets in `mode`, replies at TC
    /// egress. Either everything is attached or nothing. A pinned data plane
    /// pins each link, and takes over a link a previous agent pinned on the
    /// same interface by replacing its program atomically
    /// (`bpf_link_update`): no packet goes unsteered during an upgrade.
    ///
    /// On an interface already attached in another mode, the new ingress
    /// program is attached before the old one is detached. While both run,
    /// the first to see a packet steers it and the second sees a packet to a
    /// backend, not a VIP, and lets it pass: no packet is lost or steered
    /// twice. Returns the mode the interface had before, if any.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: IngressMode,
    ) -> Result<Option<IngressMode>, DataplaneError> {
        if let Some(old) = self.links.get(interface).map(|a| a.mode) {
            if old != mode {
                let ingress = self.attach_one(Program::ingress(mode), interface)?;
                let attached = self.links.get_mut(interface).expect("checked above");
                let old_link = std::mem::replace(&mut attached.ingress, ingress);
                attached.mode = mode;
                detach_link(Program::ingress(old), interface, old_link);
            }
            return Ok(Some(old));
        }
        let ifindex = sys::ifindex(interface);
        let ingress = self.attach_one(Program::ingress(mode), interface)?;
        let egress = match self.attach_one(Program::TcEgress, interface) {
            Ok(link) => link,
            Err(e) => {
                detach_link(Program::ingress(mode), interface, ingress);
                return Err(e);
            }
        };
        self.links.insert(
            interface.to_string(),
            Attached {
                mode,
                ifindex,
                ingress,
                egress,
            },
        );
        Ok(None)
    }

    fn attach_one(
        &mut self,
        program: Program,
        interface: &str,
    ) -> Result<OwnedLink, DataplaneError> {
        let attach_failed = |source| DataplaneError::Attach {
            name: program.name(),
            hook: program.hook(),
            interface: interface.to_string(),
            source: Box::new(source),
        };
        let link_failed = |action, source| DataplaneError::Link {
            name: program.name(),
            interface: interface.to_string(),
            action,
            source,
        };
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.link_path(interface, program.pin_name()));
        if let Some(path) = &pin
            && let Some(link) = self.adopt_link(program, interface, path)?
        {
            return Ok(OwnedLink {
                link,
                pin: Some(path.clone()),
            });
        }
        let link: FdLink = match program {
            // Driver mode: generic (skb) XDP would be slower than TC, so a
            // driver without native XDP is an error, not a silent fallback.
            Program::XdpIngress | Program::BenchXdpEmpty => {
                let prog = xdp(&mut self.ebpf, program.name())?;
                let id = prog
                    .attach(interface, XdpMode::Driver)
                    .map_err(attach_failed)?;
                let link = prog.take_link(id).map_err(attach_failed)?;
                FdLink::try_from(link).map_err(|e| link_failed("take the new link", e.into()))?
            }
            Program::TcIngress | Program::TcEgress | Program::BenchTcEmpty => {
                let direction = if program == Program::TcEgress {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                };
                let prog = classifier(&mut self.ebpf, program.name())?;
                let id = prog.attach(interface, direction).map_err(attach_failed)?;
                let link = prog.take_link(id).map_err(attach_failed)?;
                FdLink::try_from(link).map_err(|e| link_failed("take the new link", e.into()))?
            }
        };
        let Some(path) = pin else {
            return Ok(OwnedLink { link, pin: None });
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::LinkPin {
                path: path.clone(),
                action: "create its directory",
                source,
            })?;
        }
        let pinned = link.pin(&path).map_err(|e| DataplaneError::LinkPin {
            path: path.clone(),
            action: "pin the link",
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(OwnedLink {
            link: FdLink::from(pinned),
            pin: Some(path),
        })
    }

    /// Takes over the link pinned at `path` if it is still attached to
    /// `interface` at the right hook: the program is replaced in place.
    /// A pin of a link whose interface is gone (or was recreated) is
    /// removed, and `None` says to attach anew.
    fn adopt_link(
        &mut self,
        program: Program,
        interface: &str,
        path: &Path,
    ) -> Result<Option<FdLink>, DataplaneError> {
        let target = match sys::pinned_link_target(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DataplaneError::LinkPin {
                    path: path.to_path_buf(),
                    action: "read the pinned link",
                    source,
                });
            }
        };
        let (link_type, attach_type) = match program {
            Program::XdpIngress | Program::BenchXdpEmpty => (sys::BPF_LINK_TYPE_XDP, 0),
            Program::TcEgress => (sys::BPF_LINK_TYPE_TCX, sys::BPF_TCX_EGRESS),
            Program::TcIngress | Program::BenchTcEmpty => {
                (sys::BPF_LINK_TYPE_TCX, sys::BPF_TCX_INGRESS)
            }
        };
        let live = target.ifindex != 0 && target.ifindex == sys::ifindex(interface);
        if !live || target.link_type != link_type || target.attach_type != attach_type {
            std::fs::remove_file(path).map_err(|source| DataplaneError::LinkPin {
                path: path.to_path_buf(),
                action: "remove the stale pin",
                source,
            })?;
            info!(
                interface,
                hook = program.hook(),
                "removed the pin of a link whose interface is gone"
            );
            return Ok(None);
        }
        let update_failed =
            |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
                name: program.name(),
                interface: interface.to_string(),
                action: "replace the program on the pinned link (bpf_link_update)",
                source,
            };
        let pinned = PinnedLink::from_pin(path).map_err(|e| update_failed(e.into()))?;
        let link = FdLink::from(pinned);
        let link = match program {
            Program::XdpIngress | Program::BenchXdpEmpty => {
                let prog = xdp(&mut self.ebpf, program.name())?;
                let link = XdpLink::try_from(link).map_err(|e| update_failed(e.into()))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| update_failed(e.into()))?;
                let link = prog.take_link(id).map_err(|e| update_failed(e.into()))?;
                FdLink::try_from(link).map_err(|e| update_failed(e.into()))?
            }
            Program::TcIngress | Program::TcEgress | Program::BenchTcEmpty => {
                let prog = classifier(&mut self.ebpf, program.name())?;
                let link =
                    SchedClassifierLink::try_from(link).map_err(|e| update_failed(e.into()))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| update_failed(e.into()))?;
                let link = prog.take_link(id).map_err(|e| update_failed(e.into()))?;
                FdLink::try_from(link).map_err(|e| update_failed(e.into()))?
            }
        };
        Ok(Some(link))
    }

    /// Detaches everything from `interface`, if attached.
    pub fn detach(&mut self, interface: &str) {
        if let Some(attached) = self.links.remove(interface) {
            detach_link(Program::ingress(attached.mode), interface, attached.ingress);
            detach_link(Program::TcEgress, interface, attached.egress);
            if let Some(pins) = &self.pins {
                // Empty once both pins are gone; a leftover is harmless.
                let _ = std::fs::remove_dir(pins.link_dir(interface));
            }
        }
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) {
        let interfaces: Vec<String> = self.links.keys().cloned().collect();
        for interface in interfaces {
            self.detach(&interface);
        }
    }

    /// Removes link pins this data plane does not hold: interfaces (or
    /// modes) a previous agent attached that the config no longer names.
    /// Returns (interface, hook) of each.
    pub fn prune_links(&mut self) -> Vec<(String, String)> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let held: BTreeSet<&Path> = self
            .links
            .values()
            .flat_map(|a| [&a.ingress, &a.egress])
            .filter_map(|l| l.pin.as_deref())
            .collect();
        let mut pruned = Vec::new();
        for (interface, hook, path) in pins.pinned_links() {
            if held.contains(path.as_path()) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    if let Some(dir) = path.parent() {
                        let _ = std::fs::remove_dir(dir);
                    }
                    pruned.push((interface, hook));
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot remove a stale link pin")
                }
            }
        }
        pruned
    }

    /// Interfaces whose links died since they were attached: the interface
    /// was deleted (its index is gone) or deleted and created again (a new
    /// index). Returns (name, mode, whether it exists now).
    pub fn dead_links(&self) -> Vec<(String, IngressMode, bool)> {
        self.links
            .iter()
            .filter_map(|(name, a)| {
                let now = sys::ifindex(name);
                (now != a.ifindex).then(|| (name.clone(), a.mode, now != 0))
            })
            .collect()
    }

    /// Detaches from every interface and removes every pin: the data plane
    /// ends when this agent exits (`--detach-on-exit`).
    pub fn uninstall(&mut self) -> Result<usize, DataplaneError> {
        self.detach_all();
        let Some(pins) = self.pins.take() else {
            return Ok(0);
        };
        Pins::uninstall(pins.root()).map_err(|source| DataplaneError::Bpffs {
            dir: pins.root().to_path_buf(),
            action: "remove the pins".to_string(),
            source,
        })
    }

    /// Interfaces the programs are attached to, and their modes.
    pub fn attached(&self) -> impl Iterator<Item = (&str, IngressMode)> {
        self.links.iter().map(|(name, a)| (name.as_str(), a.mode))
    }

    /// Makes the maps hold exactly `services`, all or nothing.
    ///
    /// Established flows are untouched (conntrack is not written here); only
    /// new flows see the new weights, rules and backends.
    ///
    /// `canary_off` names the services whose canary gets no new connection
    /// (rolled back): their flag goes in with the rest, so a failed apply
    /// leaves it as it was too. A flag the kernel's breaker set stays until
    /// [`Dataplane::reset_breaker`].
    pub fn apply(
        &mut self,
        services: &[ServiceConfig],
        canary_off: &BTreeSet<String>,
    ) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport::default();
        let slots = self.assign_slots(services)?;
        let mut wanted: BTreeMap<String, Installed> = BTreeMap::new();
        let mut next_svc_id = self.next_svc_id;
        let mut next_rule_set = self.next_rule_set;
        let mut new_ids = Vec::new();
        for svc in services {
            let svc_id = match self.svc_ids.get(&svc.name) {
                Some(&id) => id,
                None => {
                    let id = next_svc_id;
                    next_svc_id += 1;
                    new_ids.push((svc.name.clone(), id));
                    id
                }
            };
            let old = self.installed.get(&svc.name);
            let rule_list = rule_list(svc);
            // Reuse the installed rule set when its rules are unchanged.
            let rule_set = match old {
                _ if rule_list.is_empty() => 0,
                Some(old) if same_rules(&old.rules, &rule_list) => old.value.rule_set,
                _ => {
                    let id = next_rule_set;
                    next_rule_set = next_rule_set.checked_add(1).unwrap_or(1).max(1);
                    id
                }
            };
            let rules = rule_list
                .into_iter()
                .map(|(prefix_len, addr, action)| (rule_key(rule_set, prefix_len, addr), action))
                .collect();
            let installed = Installed {
                key: service_key(svc.vip),
                value: service_value(
                    svc,
                    svc_id,
                    rule_set,
                    canary_off.contains(&svc.name),
                    |cohort, addr| {
                        slots
                            .get(&(svc.name.clone(), cohort, addr))
                            .copied()
                            .unwrap_or(0)
                    },
                ),
                rules,
            };
            match old {
                None => report.added.push(svc.name.clone()),
                Some(old) if old.key != installed.key || old.value != installed.value => {
                    report.changed.push(svc.name.clone())
                }
                Some(_) => {}
            }
            wanted.insert(svc.name.clone(), installed);
        }
        report.removed = self
            .installed
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();

        let mut journal = Vec::new();
        if let Err(e) = self.write(&mut wanted, &slots, &mut journal) {
            self.undo(journal);
            return Err(e);
        }
        self.commit_stats(services, &wanted, slots);

        // Committed: forget rule sets nothing points at any more.
        let live: BTreeSet<u32> = wanted.values().map(|s| s.value.rule_set).collect();
        for old in self.installed.values() {
            if old.value.rule_set != 0 && !live.contains(&old.value.rule_set) {
                for (key, _) in &old.rules {
                    if let Err(e) = self.rules.remove(key) {
                        warn!(rule_set = old.value.rule_set, error = %e, "stale rule not removed");
                    }
                }
            }
        }
        self.installed = wanted;
        self.svc_ids.extend(new_ids);
        self.next_svc_id = next_svc_id;
        self.next_rule_set = next_rule_set;
        Ok(report)
    }

    /// Writes `wanted` over the installed state, journaling each step.
    fn write(
        &mut self,
        wanted: &mut BTreeMap<String, Installed>,
        slots: &BTreeMap<(String, u8, SocketAddrV4), u32>,
        journal: &mut Vec<Undo>,
    ) -> Result<(), DataplaneError> {
        // 0. Zeroed counters in newly assigned slots (a reused slot must not
        //    carry its previous backend's counts) and histograms for new
        //    services, before any service value points at them.
        {
            let mut stats = lock(&self.stats);
            let held: BTreeSet<u32> = self.slots.values().copied().collect();
            for &slot in slots.values().filter(|s| !held.contains(s)) {
                let zeros = PerCpuValues::try_from(vec![BackendCounters::default(); self.ncpus])
                    .map_err(|e| {
                        map_error(
                            names::STATS,
                            "zero a slot".to_string(),
                            MapError::IoError(e),
                        )
                    })?;
                stats.stats.set(slot, zeros, 0).map_err(|source| {
                    map_error(names::STATS, format!("zero slot {slot}"), source)
                })?;
                stats
                    .timeouts
                    .set(slot, HandshakeTimeouts::default(), 0)
                    .map_err(|source| {
                        map_error(names::TIMEOUTS, format!("zero slot {slot}"), source)
                    })?;
            }
            for (name, svc) in wanted.iter() {
                let id = svc.value.svc_id;
                if self.breaker.get(&id, 0).is_err() {
                    self.breaker
                        .insert(id, BreakerState::default(), 0)
                        .map_err(|source| {
                            map_error(
                                names::BREAKER,
                                format!("create the breaker of service {name}"),
                                source,
                            )
                        })?;
                    journal.push(Undo::RemoveBreaker(id));
                }
                for cohort in [COHORT_STABLE, COHORT_CANARY] {
                    let key = histogram_key(svc.value.svc_id, cohort);
                    if stats.histograms.get(&key, 0).is_ok() {
                        continue;
                    }
                    stats
                        .histograms
                        .insert(key, CohortHistograms::default(), 0)
                        .map_err(|source| {
                            map_error(
                                names::HISTOGRAMS,
                                format!("create histograms of service {name}"),
                                source,
                            )
                        })?;
                    journal.push(Undo::RemoveHistograms(key));
                }
            }
        }
        // 1. New rule sets, beside the old ones (nothing points at them yet).
        for (name, svc) in wanted.iter() {
            let reused = self
                .installed
                .get(name)
                .is_some_and(|old| old.value.rule_set == svc.value.rule_set);
            if reused {
                continue;
            }
            for (key, action) in &svc.rules {
                self.rules.insert(key, action, 0).map_err(|source| {
                    map_error(
                        names::RULES,
                        format!("insert rule for service {name}"),
                        source,
                    )
                })?;
                journal.push(Undo::RemoveRule(*key));
            }
        }
        // 2. Services: one whole-value update each (weight, rules, backends),
        //    compared with what the kernel holds, which is the truth: the
        //    breaker sets its flag there.
        for (name, svc) in wanted.iter_mut() {
            let before = self.services.get(&svc.key, 0).ok();
            // A tripped breaker's cut-off stands until the breaker is reset
            // (`resume`), whatever else changes: the agent may not have
            // read the trip yet.
            if let Some(b) = before
                && b.flags & FLAG_CANARY_OFF != 0
                && self
                    .breaker
                    .get(&svc.value.svc_id, 0)
                    .is_ok_and(|state| state.tripped != 0)
            {
                svc.value.flags |= FLAG_CANARY_OFF;
            }
            if before == Some(svc.value) {
                continue;
            }
            let before = before.map(Box::new);
            self.services
                .insert(svc.key, svc.value, 0)
                .map_err(|source| {
                    map_error(names::SERVICES, format!("write service {name}"), source)
                })?;
            journal.push(Undo::RestoreService(svc.key, before));
        }
        // 3. Services that are gone, or whose VIP moved.
        let wanted_keys: std::collections::HashSet<ServiceKey> =
            wanted.values().map(|s| s.key).collect();
        let stale: Vec<(String, Installed)> = self
            .installed
            .iter()
            .filter(|(_, s)| !wanted_keys.contains(&s.key))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, old) in stale {
            self.services.remove(&old.key).map_err(|source| {
                map_error(names::SERVICES, format!("remove service {name}"), source)
            })?;
            journal.push(Undo::RestoreService(old.key, Some(Box::new(old.value))));
        }
        Ok(())
    }

    fn undo(&mut self, journal: Vec<Undo>) {
        for step in journal.into_iter().rev() {
            let result = match step {
                Undo::RemoveRule(key) => self.rules.remove(&key),
                Undo::RemoveHistograms(key) => lock(&self.stats).histograms.remove(&key),
                Undo::RemoveBreaker(id) => self.breaker.remove(&id),
                Undo::RestoreService(key, Some(value)) => self.services.insert(key, *value, 0),
                Undo::RestoreService(key, None) => self.services.remove(&key),
            };
            if let Err(e) = result {
                warn!(error = %e, "undo step failed; the data plane may differ from the previous config");
            }
        }
    }

    /// The data-plane counters summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DataplaneError> {
        lock(&self.stats)
            .dataplane_counters()
            .map_err(|source| map_error(names::COUNTERS, "read".to_string(), source))
    }

    /// Slots for every backend of `services`: a backend keeps its slot;
    /// new ones come from the free list, then from unused indices. Nothing is
    /// recorded until the apply commits.
    fn assign_slots(
        &self,
        services: &[ServiceConfig],
    ) -> Result<BTreeMap<(String, u8, SocketAddrV4), u32>, DataplaneError> {
        let mut assigned = BTreeMap::new();
        let mut free = self.free_slots.clone();
        let mut next = self.next_slot;
        let total: usize = services
            .iter()
            .map(|s| s.stable.len() + s.canary.len())
            .sum();
        for svc in services {
            for (cohort, list) in [(COHORT_STABLE, &svc.stable), (COHORT_CANARY, &svc.canary)] {
                for addr in list {
                    let key = (svc.name.clone(), cohort, *addr);
                    let slot = match self.slots.get(&key) {
                        Some(&slot) => slot,
                        None => match free.pop_front() {
                            Some(slot) => slot,
                            None if next < self.slot_limit => {
                                next += 1;
                                next - 1
                            }
                            None => {
                                return Err(DataplaneError::SlotsExhausted {
                                    wanted: total,
                                    available: self.slot_limit as usize - 1,
                                });
                            }
                        },
                    };
                    assigned.insert(key, slot);
                }
            }
        }
        Ok(assigned)
    }

    /// After a successful write: record slot ownership, release the slots
    /// and histograms of what is gone, and publish the labels.
    fn commit_stats(
        &mut self,
        services: &[ServiceConfig],
        wanted: &BTreeMap<String, Installed>,
        slots: BTreeMap<(String, u8, SocketAddrV4), u32>,
    ) {
        let in_use: BTreeSet<u32> = slots.values().copied().collect();
        self.free_slots.retain(|s| !in_use.contains(s));
        for (key, slot) in &self.slots {
            if !slots.contains_key(key) && !in_use.contains(slot) {
                self.free_slots.push_back(*slot);
            }
        }
        if let Some(max) = in_use.iter().max() {
            self.next_slot = self.next_slot.max(max + 1);
        }
        self.slots = slots;

        let view = services
            .iter()
            .map(|svc| {
                let backends = [(Cohort::Stable, &svc.stable), (Cohort::Canary, &svc.canary)]
                    .into_iter()
                    .flat_map(|(cohort, list)| list.iter().map(move |addr| (cohort, *addr)))
                    .map(|(cohort, addr)| BackendView {
                        cohort,
                        addr,
                        slot: self
                            .slots
                            .get(&(svc.name.clone(), cohort.as_u8(), addr))
                            .copied()
                            .unwrap_or(0),
                    })
                    .collect();
                ServiceView {
                    name: svc.name.clone(),
                    svc_id: wanted.get(&svc.name).map(|i| i.value.svc_id).unwrap_or(0),
                    weight_ratio: f64::from(svc.weight.ppm()) / 1e6,
                    backends,
                }
            })
            .collect();
        let mut stats = lock(&self.stats);
        stats.view = view;
        // Histograms of removed services go; flows still draining count as
        // `unattributed` from here on.
        for (name, old) in &self.installed {
            if !wanted.contains_key(name) {
                for cohort in [COHORT_STABLE, COHORT_CANARY] {
                    let _ = stats
                        .histograms
                        .remove(&histogram_key(old.value.svc_id, cohort));
                }
            }
        }
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

    /// Counts handshakes older than `timeout` as failed (`timeout`) and marks
    /// their flows closed, so they stop counting as active. The conntrack
    /// entries stay: a later SYN retransmission of the same connection is
    /// still a retry, not a new connection. Returns how many timed out.
    pub fn sweep_pending(&mut self, timeout: Duration) -> Result<u64, DataplaneError> {
        let now = monotonic_ns();
        let limit = timeout.as_nanos() as u64;
        let keys: Vec<FlowKey> = self.pending.keys().filter_map(Result::ok).collect();
        let mut expired = 0;
        for key in keys {
            let Ok(p) = self.pending.get(&key, 0) else {
                continue;
            };
            if now.saturating_sub(p.syn_ns) < limit {
                continue;
            }
            // If the kernel removed it meanwhile (the SYN-ACK just came),
            // the handshake completed: not a timeout.
            if self.pending.remove(&key).is_err() {
                continue;
            }
            // A SYN-retried connection already failed: its timeout is
            // counted as a timeout, not as a second failure.
            let mut first_failure = true;
            if let Ok(mut fwd) = self.conntrack.get(&key, 0) {
                // Not atomic with the kernel's ORs: a bit it sets in between
                // is lost. The flow is stalled, so at worst a SYN retry of
                // it is counted twice.
                first_failure = fwd.state & ST_FAILED == 0;
                fwd.state |= ST_CLOSED | ST_FAILED;
                let _ = self.conntrack.insert(key, fwd, BPF_EXIST);
            }
            let mut stats = lock(&self.stats);
            let mut count = stats.timeouts.get(&p.stats_slot, 0).unwrap_or_default();
            count.timeouts += 1;
            count.failed += u64::from(first_failure);
            // Only this sweep writes TIMEOUTS: no lost update.
            if let Err(e) = stats.timeouts.set(p.stats_slot, count, 0) {
                warn!(slot = p.stats_slot, error = %e, "cannot count a handshake timeout");
            }
            expired += 1;
        }
        Ok(expired)
    }

    /// The conntrack entry for `key`, if any.
    pub fn conntrack_entry(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack.get(key, 0).ok()
    }

    /// Number of conntrack entries (walks the map; for tests and tools).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Loads the benchmark's empty baseline programs (the agent never does).
    pub fn load_baselines(&mut self) -> Result<(), DataplaneError> {
        for program in [Program::BenchTcEmpty, Program::BenchXdpEmpty] {
            load_program(&mut self.ebpf, program)?;
        }
        Ok(())
    }

    /// Writes one conntrack entry as the programs would (for tools: the
    /// benchmark fills the table and builds steady-state flows with it).
    pub fn conntrack_insert(&mut self, key: FlowKey, entry: CtEntry) -> Result<(), DataplaneError> {
        self.conntrack
            .insert(key, entry, 0)
            .map_err(|source| map_error(names::CONNTRACK, "insert".to_string(), source))
    }

    /// Runs `program` once on `packet` through `BPF_PROG_TEST_RUN`; returns
    /// the verdict and the packet as the program left it.
    pub fn test_run(
        &mut self,
        program: Program,
        packet: &[u8],
    ) -> Result<(i32, Vec<u8>), DataplaneError> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.test_run_repeat(program, packet, 1, Some(&mut out))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// Runs `program` `repeat` times on one copy of `packet` (a rewrite by
    /// one run is what the next run sees); the result's duration is the
    /// kernel's mean per run.
    pub fn test_run_repeat(
        &mut self,
        program: Program,
        packet: &[u8],
        repeat: u32,
        out: Option<&mut [u8]>,
    ) -> Result<aya::programs::TestRunResult, DataplaneError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = out;
        opts.repeat = repeat;
        let result = if program.is_xdp() {
            xdp(&mut self.ebpf, program.name())?.test_run(opts)
        } else {
            classifier(&mut self.ebpf, program.name())?.test_run(opts)
        };
        result.map_err(|source| DataplaneError::Program {
            name: program.name(),
            action: "BPF_PROG_TEST_RUN",
            source: Box::new(source),
        })
    }
}

/// Detaches `link` (the `program` on `interface`), logging a failure: the
/// caller goes on with the rest.
fn detach_link(program: Program, interface: &str, link: OwnedLink) {
    if let Err(e) = link.detach() {
        warn!(interface, hook = program.hook(), error = %e, "detach failed: cannot remove the link pin");
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

/// `err` and its sources, joined by ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A breaker-trip record from the `EVENTS` ring buffer; `None` if it is too
/// short to be one.
pub fn decode_breaker_event(record: &[u8]) -> Option<canary_common::breaker::BreakerEvent> {
    if record.len() < std::mem::size_of::<canary_common::breaker::BreakerEvent>() {
        return None;
    }
    // SAFETY: the record holds at least a whole BreakerEvent (checked), a
    // plain-integer repr(C) type for which any bytes are valid; ring records
    // are only 8-aligned by contract, hence the unaligned read.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

/// The `SERVICES` key of a VIP.
pub fn service_key(vip: SocketAddrV4) -> ServiceKey {
    ServiceKey {
        vip: be_addr(*vip.ip()),
        port: vip.port().to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

/// The `SERVICES` value of a service.
pub fn service_value(
    svc: &ServiceConfig,
    svc_id: u32,
    rule_set: u32,
    canary_off: bool,
    slot_of: impl Fn(u8, SocketAddrV4) -> u32,
) -> ServiceValue {
    let b = &svc.breaker;
    let mut value = ServiceValue {
        svc_id,
        weight_ppm: svc.weight.ppm(),
        salt: svc.salt,
        rule_set,
        mode: match svc.cohort {
            CohortMode::Sticky => MODE_STICKY,
            CohortMode::PerConnection => MODE_PER_CONNECTION,
        },
        flags: if canary_off { FLAG_CANARY_OFF } else { 0 },
        breaker_window_ms: b.window.as_millis().min(u128::from(u32::MAX)) as u32,
        breaker_min_failures: if b.enabled { b.min_failures } else { 0 },
        // ppm → permille, rounded up so "0.01%" is not 0.
        breaker_ratio_permille: b.failure_ratio.ppm().div_ceil(1000) as u16,
        // Config validation caps both lists at MAX_BACKENDS (<= u8::MAX).
        n_stable: svc.stable.len().min(MAX_BACKENDS) as u8,
        n_canary: svc.canary.len().min(MAX_BACKENDS) as u8,
        stable: [Backend::default(); MAX_BACKENDS],
        canary: [Backend::default(); MAX_BACKENDS],
    };
    for (entry, addr) in value.stable.iter_mut().zip(&svc.stable) {
        *entry = backend(*addr, slot_of(COHORT_STABLE, *addr));
    }
    for (entry, addr) in value.canary.iter_mut().zip(&svc.canary) {
        *entry = backend(*addr, slot_of(COHORT_CANARY, *addr));
    }
    value
}

fn backend(addr: SocketAddrV4, stats_slot: u32) -> Backend {
    Backend {
        addr: be_addr(*addr.ip()),
        port: addr.port().to_be(),
        _pad: 0,
        stats_slot,
    }
}

fn lock(stats: &Mutex<StatsSource>) -> MutexGuard<'_, StatsSource> {
    // A panic while holding the lock cannot leave the maps inconsistent
    // (they live in the kernel), so a poisoned lock is still usable.
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

/// Map update flag: only add a new element.
const BPF_NOEXIST: u64 = 1;
/// Map update flag: only replace an existing element.
const BPF_EXIST: u64 = 2;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An address as the data plane reads it from a packet (network order).
pub fn be_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The conntrack key of a TCP packet from `src` to `dst`.
pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4) -> FlowKey {
    FlowKey {
        src_addr: be_addr(*src.ip()),
        dst_addr: be_addr(*dst.ip()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// (prefix length, network-order address, action) of a service's rules.
fn rule_list(svc: &ServiceConfig) -> Vec<(u8, u32, u32)> {
    let always = svc
        .always_canary
        .iter()
        .map(|p| (p.len, be_addr(p.addr), RULE_ALWAYS_CANARY));
    let never = svc
        .never_canary
        .iter()
        .map(|p| (p.len, be_addr(p.addr), RULE_NEVER_CANARY));
    always.chain(never).collect()
}

fn same_rules(installed: &[(Key<RuleKey>, u32)], wanted: &[(u8, u32, u32)]) -> bool {
    // Order-insensitive: rules read back from the kernel come in trie order.
    let have: BTreeSet<(u32, u32, u32)> = installed
        .iter()
        .map(|(key, action)| (key.prefix_len(), key.data().addr, *action))
        .collect();
    let want: BTreeSet<(u32, u32, u32)> = wanted
        .iter()
        .map(|(len, addr, action)| (RULE_SET_BITS + u32::from(*len), *addr, *action))
        .collect();
    installed.len() == wanted.len() && have == want
}

fn rule_key(rule_set: u32, prefix_len: u8, addr: u32) -> Key<RuleKey> {
    Key::new(
        RULE_SET_BITS + u32::from(prefix_len),
        RuleKey {
            rule_set_be: rule_set.to_be(),
            addr,
        },
    )
}

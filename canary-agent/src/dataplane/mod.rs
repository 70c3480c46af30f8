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
mod error;
mod load;
pub mod pins;
mod probe;
mod sweep;

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

pub use self::{
    adopt::Adopted,
    apply::ApplyReport,
    cgroup::SockProgram,
    drain::Drained,
    encode::{decode_breaker_event, flow_key, flow_key_of, service_key, service_value, udp_config},
    error::DataplaneError,
    sweep::UdpSwept,
};
use self::{apply::Installed, attach::Attached, cgroup::SocketLb, pins::Pins};
use crate::{
    config::IngressMode,
    telemetry::{Snapshot, StatsSource},
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, RingBuf},
};
use canary_common::{
    breaker::BreakerState,
    counters::Counter,
    flow::{CtEntry, FlowKey, SynRecord, UdpConfig},
    names,
    service::Cohort,
    service::{RuleKey, ServiceKey, ServiceValue},
    sock::{SockRevKey, SockRevValue, SockUdpFlow},
};

/// The compiled eBPF object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/canary"));

/// Environment variable naming an object file the agent loads instead of
/// [`EBPF_OBJECT`]: for trying a new data-plane build on a running data
/// plane before shipping it (the upgrade test does).
pub const OBJECT_ENV: &str = "CANARY_EBPF_OBJECT";

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
    /// Sockets steered by `connect4/6`: {cookie, backend} → VIP and service
    /// (`SOCK_STEERED`); the drain deadline finds a socket's service here.
    sock_steered: HashMap<MapData, SockRevKey, SockRevValue>,
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

/// Map update flag: only add a new element.
const BPF_NOEXIST: u64 = 1;
/// Map update flag: only replace an existing element.
const BPF_EXIST: u64 = 2;

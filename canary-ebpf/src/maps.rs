//! The maps. Capacities are defaults; the agent may resize before loading.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use canary_common::{
    breaker::{BreakerState, EVENTS_BYTES},
    counters::Counter,
    flow::{
        CT_DEFAULT_CAPACITY, CT_UDP_DEFAULT_CAPACITY, CtEntry, FlowKey, PENDING_CAPACITY,
        SynRecord, UNCONFIRMED_CAPACITY, UdpConfig,
    },
    layout::LAYOUT_ENTRIES,
    service::{
        DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, MAX_RULES, RuleKey, ServiceKey, ServiceValue,
    },
    sock::{
        SOCK_REVNAT_CAPACITY, SOCK_STEERED_CAPACITY, SOCK_UDP_CAPACITY, SockRevKey, SockRevValue,
        SockTag, SockUdpFlow,
    },
    stats::{BackendCounters, CohortHistograms, HandshakeTimeouts},
};

/// VIP → service. Written by the agent (one whole-value update per change)
/// and by the breaker, which sets `FLAG_CANARY_OFF` in place when it trips
/// (the agent keeps that flag until it resets the breaker); read for every
/// new flow. Not preallocated, so a replaced value is freed only after
/// readers are done (RCU): a reader sees old or new, whole.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

/// {rule set, source prefix} → `RULE_*` action. Written by the agent, read on
/// new flows of services that have rules.
#[map(name = "RULES")]
pub static RULES: LpmTrie<RuleKey, u32> = LpmTrie::with_max_entries(MAX_RULES, 0);

/// 5-tuple → flow state, both directions. Written by the programs; the agent
/// marks flows whose handshake timed out closed and failed (its sweep), and
/// copies every entry into a map of a new capacity (a migration).
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(CT_DEFAULT_CAPACITY, 0);

/// Flows re-resolved after a conntrack miss that their backend has not
/// answered yet, both directions, keyed and valued like `CONNTRACK`
/// (`CT_REOPENED` set). Written by the programs: ingress inserts on a miss,
/// egress moves the flow into `CONNTRACK` when the backend answers, or
/// drops it when the backend answers with a RST. Separate from `CONNTRACK`
/// so that stray packets can never evict tracked flows.
#[map(name = "UNCONFIRMED")]
pub static UNCONFIRMED: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(UNCONFIRMED_CAPACITY, 0);

/// Per-CPU counters indexed by [`Counter`]. Written by the programs, summed
/// by the agent.
#[cfg(not(feature = "upgrade-test"))]
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// The upgrade-test build's `COUNTERS`: one spare entry, as a version that
/// counts a new event would have, so the upgrade test also migrates it.
#[cfg(feature = "upgrade-test")]
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT + 1, 0);

/// Per-CPU counters per backend slot (service × cohort × backend), bumped on
/// every packet. Slots are assigned by the agent; summed at scrape time.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<BackendCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS + 1, 0);

/// `histogram_key(svc, cohort)` → latency histograms. Entries are created
/// by the agent per configured service; the programs add to them with
/// atomic increments once per connection event (not per packet). Shared
/// rather than per-CPU: 8.5 KB × services × cohorts × CPUs would not fit.
#[map(name = "HISTOGRAMS")]
pub static HISTOGRAMS: HashMap<u32, CohortHistograms> =
    HashMap::with_max_entries(2 * DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

/// The ring of the latest new flows' SYNs (element 0: the head, a count
/// of SYNs; see `SynRecord`). Appended to by ingress on every new flow,
/// never removed from; read by the agent's sweep, which counts the
/// handshakes that did not complete within the timeout.
#[cfg(not(feature = "upgrade-test"))]
#[map(name = "PENDING")]
pub static PENDING: Array<SynRecord> = Array::with_max_entries(PENDING_CAPACITY + 1, 0);

/// The upgrade-test build's `PENDING`: another capacity (the ring uses
/// the first `PENDING_CAPACITY + 1` elements), so the upgrade
/// test also takes the path where a transient map's layout changed.
#[cfg(feature = "upgrade-test")]
#[map(name = "PENDING")]
pub static PENDING: Array<SynRecord> = Array::with_max_entries(2 * PENDING_CAPACITY + 1, 0);

/// Service id → breaker window. Created by the agent per service and reset
/// by it only on `resume`; updated by the programs on canary attempts and
/// failures (each failed connection once).
#[map(name = "BREAKER")]
pub static BREAKER: HashMap<u32, BreakerState> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Breaker trips, read by the agent.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Stats slot → handshakes that timed out (no SYN-ACK within
/// `handshake_timeout`). Written only by the agent's sweep, never by the
/// programs; a map rather than agent memory so the count outlives the
/// agent like every other counter. Sized like `STATS` by the agent.
#[map(name = "TIMEOUTS")]
pub static TIMEOUTS: Array<HandshakeTimeouts> =
    Array::with_max_entries(DEFAULT_MAX_BACKENDS + 1, 0);

/// Layout version of every map, indexed as `canary_common::layout::MAPS`.
/// Written by the agent that creates the maps, checked by every agent that
/// adopts them; never read by the programs.
#[map(name = "LAYOUT")]
pub static LAYOUT: Array<u32> = Array::with_max_entries(LAYOUT_ENTRIES, 0);

/// {socket cookie, backend} → the VIP its application dialled, for sockets
/// that talk to a VIP without connecting to it (unconnected UDP): written
/// by `sendmsg4/6`, read by `recvmsg4/6`. Connected sockets keep this in
/// their tag (`SOCK_TAGS`) instead.
#[map(name = "SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(SOCK_REVNAT_CAPACITY, 0);

/// {socket cookie, backend} → the VIP and service of every socket
/// `connect4/6` steered: removed at a TCP socket's close, read by the agent
/// only, which finds a socket's service here when the drain deadline
/// aborts it (the socket's tag, `SOCK_TAGS`, is readable from user space
/// only through the socket itself).
#[map(name = "SOCK_STEERED")]
pub static SOCK_STEERED: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(SOCK_STEERED_CAPACITY, 0);

/// Socket storage: the tag of every socket steered by `connect4/6`
/// (service, cohort, stats slot, timestamps, once-only bits), freed with
/// the socket. Written by `connect4/6`; the socket tracepoint programs
/// count only sockets that have one. A BTF map (socket storage needs BTF);
/// its name is the static's.
#[btf_map]
pub static SOCK_TAGS: SkStorage<SockTag> = SkStorage::new();

/// Stats slot → handshake timeouts of socket-steered connections, per
/// CPU: counted by the programs when a socket leaves `SYN_SENT` without an
/// answer. The agent adds them to the sweep's `TIMEOUTS` (a separate map:
/// the sweep's read-modify-write of `TIMEOUTS` would lose concurrent
/// kernel increments). Sized like `STATS` by the agent.
#[map(name = "SOCK_TIMEOUTS")]
pub static SOCK_TIMEOUTS: PerCpuArray<HandshakeTimeouts> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS + 1, 0);

/// Index 0: the generation (`SOCK_GENERATION` of an object) whose socket
/// tracepoint programs count. Written by the agent once its own are
/// attached; read by those programs for every tagged socket's event.
#[map(name = "SOCK_ACTIVE")]
pub static SOCK_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// UDP 5-tuple → flow state, both directions, like `CONNTRACK` for TCP but
/// a table of its own, so a burst of UDP flows never evicts a TCP
/// connection. Written by the programs (a flow's first datagram inserts,
/// each direction refreshes its entry's last-seen time); expired flows
/// are closed and removed by the `canary_udp_sweep` program, which the
/// agent's sweep runs. Sized by the agent (`udp_conntrack_capacity`).
#[map(name = "CT_UDP")]
pub static CT_UDP: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(CT_UDP_DEFAULT_CAPACITY, 0);

/// Service id → UDP timeouts of a UDP service. Written by the agent with
/// the service; read by the programs when a UDP flow begins (its idle
/// timeout is copied into the flow) and while a flow waits for its first
/// reply.
#[map(name = "UDP_CONFIG")]
pub static UDP_CONFIG: HashMap<u32, UdpConfig> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Stats slot → UDP flows whose backend did not reply within the
/// service's `udp_response_timeout`, per CPU: counted by the programs
/// (whichever sees the deadline pass first: the client's next datagram,
/// a late reply, the sweep program). The agent adds them to the exported
/// timeouts. Sized like `STATS` by the agent.
#[map(name = "UDP_TIMEOUTS")]
pub static UDP_TIMEOUTS: PerCpuArray<HandshakeTimeouts> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS + 1, 0);

/// {socket cookie, VIP} → the unconnected UDP flow of that socket to that
/// VIP: its backend, chosen on its first datagram by `sendmsg4/6` and kept
/// until idle for the service's `udp_idle_timeout`; its first-reply time
/// and timeout bits, set by `recvmsg4/6` and `sendmsg4/6`.
#[map(name = "SOCK_UDP")]
pub static SOCK_UDP: LruHashMap<SockRevKey, SockUdpFlow> =
    LruHashMap::with_max_entries(SOCK_UDP_CAPACITY, 0);

//! The maps. Capacities are defaults; the agent may resize before loading.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use canary_common::{
    counters::Counter,
    flow::{CtEntry, FlowKey},
    service::{RuleKey, ServiceKey, ServiceValue},
};

/// VIP → service. Written by the agent (one whole-value update per change),
/// read on every packet to a VIP. Not preallocated, so a replaced value is
/// freed only after readers are done (RCU): a reader sees old or new, whole.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(canary_common::service::MAX_SERVICES, BPF_F_NO_PREALLOC);

/// {rule set, source prefix} → `RULE_*` action. Written by the agent, read on
/// new flows of services that have rules.
#[map(name = "RULES")]
pub static RULES: LpmTrie<RuleKey, u32> =
    LpmTrie::with_max_entries(canary_common::service::MAX_RULES, 0);

/// 5-tuple → flow state, both directions. Written by the programs only.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(canary_common::flow::CT_DEFAULT_CAPACITY, 0);

/// Per-CPU counters indexed by [`Counter`]. Written by the programs, summed
/// by the agent.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

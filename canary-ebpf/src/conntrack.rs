//! Flow state: creation on the first packet, updates on FIN, removal on RST.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use canary_common::{
    counters::Counter,
    flow::{CT_REVERSE, CtEntry, FlowKey},
};

use crate::{maps::CONNTRACK, stats::count, steer::Choice};

/// The flow state for `key`, if tracked.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// Records a new flow `fwd` (client → VIP) steered by `choice`: the forward
/// entry and the reverse one for replies. A failed insert is counted; the
/// flow still works because every later packet re-resolves the same way.
#[inline(always)]
pub fn create(fwd: &FlowKey, svc_id: u32, choice: &Choice) {
    let now = ktime_ns();
    let forward = CtEntry {
        nat_addr: choice.backend.addr,
        nat_port: choice.backend.port,
        cohort: choice.cohort,
        flags: 0,
        svc_id,
        backend_idx: choice.backend_idx,
        created_ns: now,
    };
    let reverse_key = FlowKey {
        src_addr: choice.backend.addr,
        dst_addr: fwd.src_addr,
        src_port: choice.backend.port,
        dst_port: fwd.src_port,
        proto: fwd.proto,
        _pad: [0; 3],
    };
    let reverse = CtEntry {
        nat_addr: fwd.dst_addr,
        nat_port: fwd.dst_port,
        flags: CT_REVERSE,
        ..forward
    };
    if CONNTRACK.insert(fwd, &forward, BPF_ANY as u64).is_err()
        || CONNTRACK
            .insert(&reverse_key, &reverse, BPF_ANY as u64)
            .is_err()
    {
        count(Counter::CtInsertFailed);
    }
}

/// Removes both halves of the flow whose forward key is `fwd` and whose
/// backend is `backend_addr:backend_port`.
#[inline(always)]
pub fn remove(fwd: &FlowKey, backend_addr: u32, backend_port: u16) {
    let reverse_key = FlowKey {
        src_addr: backend_addr,
        dst_addr: fwd.src_addr,
        src_port: backend_port,
        dst_port: fwd.src_port,
        proto: fwd.proto,
        _pad: [0; 3],
    };
    // A missing half (already evicted or removed) is not an error.
    let _ = CONNTRACK.remove(fwd);
    let _ = CONNTRACK.remove(&reverse_key);
}

/// Sets `flag` on a tracked entry.
#[inline(always)]
pub fn mark(entry: *mut CtEntry, flag: u8) {
    // SAFETY: `entry` came from a successful lookup in this program run; the
    // LRU map keeps the element alive for the rest of the run (RCU). A racing
    // writer on another CPU can only set other flag bits.
    unsafe { (*entry).flags |= flag };
}

/// Reads a tracked entry.
#[inline(always)]
pub fn read(entry: *mut CtEntry) -> CtEntry {
    // SAFETY: as in `mark`: a live element from this run's lookup.
    unsafe { *entry }
}

#[inline(always)]
fn ktime_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

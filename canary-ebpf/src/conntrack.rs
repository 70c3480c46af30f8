//! Flow state: creation on the first packet, atomic state bits, and the
//! once-per-flow close.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use canary_common::{
    counters::Counter,
    flow::{CT_REOPENED, CT_REVERSE, CtEntry, FlowKey, PendingSyn, ST_CLOSED},
};

use crate::{
    maps::{CONNTRACK, PENDING},
    stats::{self, Latency, count},
    steer::Choice,
};

/// A tracked entry: a live element of `CONNTRACK` for this program run.
#[derive(Clone, Copy)]
pub struct Entry(*mut CtEntry);

impl Entry {
    /// A copy of the entry's fields.
    #[inline(always)]
    pub fn read(self) -> CtEntry {
        // SAFETY: a live element from this run's lookup (the LRU map frees
        // elements only after an RCU grace period).
        unsafe { *self.0 }
    }

    /// Atomically sets `bits` in the state; returns the state before.
    #[inline(always)]
    pub fn set_state(self, bits: u64) -> u64 {
        // SAFETY: as in `read`; `state` is an 8-aligned u64 of the value and
        // every writer on every CPU uses atomics on it.
        unsafe { crate::atomic::or(core::ptr::addr_of_mut!((*self.0).state), bits) }
    }

    /// Records the time of the first client payload.
    #[inline(always)]
    pub fn set_request_ns(self, ns: u64) {
        // SAFETY: as in `read`; only the ingress program writes this field,
        // once per flow (guarded by the ST_REQUEST bit).
        unsafe { (*self.0).request_ns = ns };
    }
}

/// The flow state for `key`, if tracked.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Entry> {
    CONNTRACK.get_ptr_mut(key).map(Entry)
}

/// `bpf_ktime_get_ns`. Called only where a timestamp is used, never once per
/// packet: in a VM a clock read is a sizeable part of an established
/// packet's cost (see BENCHMARKS.md).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The reverse (reply) key of forward flow `fwd` served by `addr:port`.
#[inline(always)]
pub fn reverse_key(fwd: &FlowKey, backend_addr: u32, backend_port: u16) -> FlowKey {
    FlowKey {
        src_addr: backend_addr,
        dst_addr: fwd.src_addr,
        src_port: backend_port,
        dst_port: fwd.src_port,
        proto: fwd.proto,
        _pad: [0; 3],
    }
}

/// Records a new flow `fwd` (client → VIP) steered by `choice`: the forward
/// entry and the reverse one for replies, and for a SYN the pending
/// handshake. A failed insert is counted; the flow still works because every
/// later packet re-resolves the same way.
#[inline(always)]
pub fn create(fwd: &FlowKey, svc_id: u32, choice: &Choice, syn: bool, now: u64) {
    let slot = choice.backend.stats_slot;
    let forward = CtEntry {
        nat_addr: choice.backend.addr,
        nat_port: choice.backend.port,
        cohort: choice.cohort,
        flags: if syn { 0 } else { CT_REOPENED },
        svc_id,
        stats_slot: slot,
        created_ns: now,
        request_ns: 0,
        state: 0,
    };
    let reverse = CtEntry {
        nat_addr: fwd.dst_addr,
        nat_port: fwd.dst_port,
        flags: forward.flags | CT_REVERSE,
        ..forward
    };
    let reverse_key = reverse_key(fwd, choice.backend.addr, choice.backend.port);
    if CONNTRACK.insert(fwd, &forward, BPF_ANY as u64).is_err()
        || CONNTRACK
            .insert(&reverse_key, &reverse, BPF_ANY as u64)
            .is_err()
    {
        count(Counter::CtInsertFailed);
    }
    if syn {
        let pending = PendingSyn {
            syn_ns: now,
            stats_slot: slot,
            _pad: 0,
        };
        // Best effort: a full table only undercounts handshake timeouts.
        let _ = PENDING.insert(fwd, &pending, BPF_ANY as u64);
    }
}

/// Counts the close of the flow whose forward entry is `fwd`, once: the
/// first caller to set ST_CLOSED wins. `duration` records open → close
/// (not for refused connections, which never opened).
#[inline(always)]
pub fn close(fwd: Entry, duration: bool, now: u64) {
    if fwd.set_state(ST_CLOSED) & ST_CLOSED != 0 {
        return;
    }
    let ct = fwd.read();
    if let Some(c) = stats::backend(ct.stats_slot) {
        c.closed += 1;
    }
    if duration && ct.flags & CT_REOPENED == 0 {
        stats::observe(
            ct.svc_id,
            ct.cohort,
            Latency::Duration,
            (now - ct.created_ns) / 1000,
        );
    }
}

/// Removes both halves of the flow whose forward key is `fwd` and whose
/// backend is `backend_addr:backend_port`, and its pending handshake.
#[inline(always)]
pub fn remove(fwd: &FlowKey, backend_addr: u32, backend_port: u16) {
    // A missing half (already evicted or removed) is not an error.
    let _ = CONNTRACK.remove(fwd);
    let _ = CONNTRACK.remove(&reverse_key(fwd, backend_addr, backend_port));
    let _ = PENDING.remove(fwd);
}

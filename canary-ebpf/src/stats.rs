//! Counters, histograms, and the verdict of each error.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action};
use canary_common::{
    counters::Counter,
    stats::{BackendCounters, HIST_BUCKETS, Histogram, hist_bucket, histogram_key},
};

use crate::maps::{COUNTERS, HISTOGRAMS, STATS};

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs
        // run with preemption disabled.
        unsafe { *slot += 1 };
    }
}

/// This CPU's counters of a backend slot, if the slot exists.
#[inline(always)]
pub fn backend(slot: u32) -> Option<&'static mut BackendCounters> {
    match STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, only this CPU touches it while the program
        // runs (preemption disabled); the array element lives for the map.
        Some(p) => Some(unsafe { &mut *p }),
        None => {
            count(Counter::Unattributed);
            None
        }
    }
}

/// Which histogram of a cohort.
#[derive(Clone, Copy)]
pub enum Latency {
    /// Nanoseconds.
    Handshake,
    /// Nanoseconds.
    FirstByte,
    /// Microseconds.
    Duration,
}

/// Records `value` in the `which` histogram of `svc_id` × `cohort`.
#[inline(always)]
pub fn observe(svc_id: u32, cohort: u8, which: Latency, value: u64) {
    let Some(h) = HISTOGRAMS.get_ptr_mut(histogram_key(svc_id, cohort)) else {
        count(Counter::Unattributed);
        return;
    };
    // SAFETY: `h` is a live HISTOGRAMS element for this run (not
    // preallocated: freed only after readers finish); only field addresses
    // are formed here, and every write below is atomic.
    let hist: *mut Histogram = unsafe {
        match which {
            Latency::Handshake => core::ptr::addr_of_mut!((*h).handshake_ns),
            Latency::FirstByte => core::ptr::addr_of_mut!((*h).first_byte_ns),
            Latency::Duration => core::ptr::addr_of_mut!((*h).duration_us),
        }
    };
    let i = hist_bucket(value);
    if i >= HIST_BUCKETS {
        return;
    }
    // SAFETY: `i < HIST_BUCKETS` keeps the bucket pointer inside the value;
    // u64 fields of a map value are 8-aligned; other CPUs update the same
    // words only through atomics.
    unsafe {
        let bucket = core::ptr::addr_of_mut!((*hist).buckets)
            .cast::<u64>()
            .add(i);
        crate::atomic::add(bucket, 1);
        crate::atomic::add(core::ptr::addr_of_mut!((*hist).sum), value);
    }
}

/// What a handler decided for a packet, whatever the hook.
#[derive(Clone, Copy)]
pub enum Action {
    /// Not ours: the next program or the stack decides.
    Ignore,
    /// Ours, rewritten: deliver it.
    Forward,
}

/// What an error does to the packet.
#[derive(Clone, Copy)]
enum Fate {
    /// Not provably ours: the stack decides (and drops it if it is garbage).
    Stack,
    /// Ours but not steerable correctly: dropped rather than delivered to
    /// the wrong place or leaked un-NATed.
    Drop,
}

/// Counts the error, if there is one, and says what becomes of the packet.
#[inline(always)]
fn settle(result: Result<Action, Counter>) -> Result<Action, Fate> {
    result.map_err(|counter| {
        count(counter);
        match counter {
            Counter::TruncatedEth
            | Counter::BadIpHeader
            | Counter::BadTcpHeader
            | Counter::Ipv6ExtHeader => Fate::Stack,
            _ => Fate::Drop,
        }
    })
}

/// A handler's result as a TC return code.
#[inline(always)]
pub fn tc_verdict(result: Result<Action, Counter>) -> i32 {
    match settle(result) {
        Ok(Action::Forward) => TC_ACT_OK,
        Ok(Action::Ignore) | Err(Fate::Stack) => TC_ACT_UNSPEC,
        Err(Fate::Drop) => TC_ACT_SHOT as i32,
    }
}

/// A handler's result as an XDP return code. XDP has no "next program"
/// verdict: whatever is not dropped goes on up to TC and the stack.
#[inline(always)]
pub fn xdp_verdict(result: Result<Action, Counter>) -> u32 {
    match settle(result) {
        Ok(_) | Err(Fate::Stack) => xdp_action::XDP_PASS,
        Err(Fate::Drop) => xdp_action::XDP_DROP,
    }
}

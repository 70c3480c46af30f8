//! Counters and the verdict of each error.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use canary_common::counters::Counter;

use crate::maps::COUNTERS;

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs
        // run with preemption disabled.
        unsafe { *slot += 1 };
    }
}

/// Turns a handler's result into the program's return code, counting the
/// error if there is one.
#[inline(always)]
pub fn verdict(result: Result<i32, Counter>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(counter) => {
            count(counter);
            error_verdict(counter)
        }
    }
}

/// The deliberate verdict of each error.
///
/// A packet too broken to be matched to a service is not provably ours:
/// the stack decides (and drops it if it is garbage). A packet for one of
/// our services that cannot be steered correctly is dropped here rather
/// than delivered to the wrong place or leaked un-NATed.
#[inline(always)]
fn error_verdict(counter: Counter) -> i32 {
    match counter {
        Counter::TruncatedEth | Counter::BadIpHeader | Counter::BadTcpHeader => TC_ACT_UNSPEC,
        _ => TC_ACT_SHOT as i32,
    }
}

//! The line-rate breaker: when a service's canary fails hard, stop sending
//! it new connections from here, within the packet that tipped it, and
//! tell the agent. No user-space round trip.

use canary_common::{
    breaker::{BreakerEvent, BreakerState, trips},
    service::{FLAG_CANARY_OFF, ServiceKey, ServiceValue},
};

use crate::maps::{BREAKER, EVENTS, SERVICES};

/// Whether a flow that chose canary may go there. A new connection (a
/// SYN, `attempt`) counts as a canary attempt; a re-resolved flow does not.
#[inline(always)]
pub fn allow_canary(svc: &ServiceValue, now: u64, attempt: bool) -> bool {
    if svc.flags & FLAG_CANARY_OFF != 0 {
        return false;
    }
    let Some(b) = BREAKER.get_ptr_mut(&svc.svc_id) else {
        // No window (the agent creates one per service): nothing to judge by.
        return true;
    };
    // SAFETY: a live BREAKER element for this run; counters change only
    // through atomics, the window fields by idempotent stores.
    unsafe {
        if (*b).tripped != 0 {
            return false;
        }
        if attempt {
            roll_window(b, now, svc.breaker_window_ms);
            crate::atomic::add(core::ptr::addr_of_mut!((*b).attempts), 1);
        }
    }
    true
}

/// Counts a canary failure of the flow steered for `svc_id` through the
/// service at `key` and trips the breaker when the window crosses the
/// service's limit.
#[inline(always)]
pub fn failure(key: &ServiceKey, svc_id: u32, now: u64) {
    let Some(svc) = SERVICES.get_ptr_mut(key) else {
        return;
    };
    let Some(b) = BREAKER.get_ptr_mut(&svc_id) else {
        return;
    };
    // SAFETY: `svc` and `b` are live elements for this run. The service's
    // flag byte is only ever set (idempotent); the breaker counters change
    // through atomics.
    let (failures, attempts) = unsafe {
        if (*svc).svc_id != svc_id || (*b).tripped != 0 {
            return;
        }
        roll_window(b, now, (*svc).breaker_window_ms);
        crate::atomic::add(core::ptr::addr_of_mut!((*b).failures), 1);
        crate::atomic::add(core::ptr::addr_of_mut!((*b).consecutive), 1);
        let (consecutive, failures, attempts) = ((*b).consecutive, (*b).failures, (*b).attempts);
        let (min, ratio) = ((*svc).breaker_min_failures, (*svc).breaker_ratio_permille);
        if !trips(consecutive, failures, attempts, min, ratio) {
            return;
        }
        // Exactly one CPU wins the trip and reports it.
        if crate::atomic::or(core::ptr::addr_of_mut!((*b).tripped), 1) != 0 {
            return;
        }
        (*b).tripped_ns = now;
        (*svc).flags |= FLAG_CANARY_OFF;
        (failures, attempts)
    };
    let event = BreakerEvent {
        svc_id,
        _pad: 0,
        at_ns: now,
        failures,
        attempts,
    };
    // A full ring only delays the agent's record: the cut-off has happened.
    let _ = EVENTS.output::<BreakerEvent>(&event, 0);
}

/// The canary of `svc_id` answered a request: a run of failures is over.
#[inline(always)]
pub fn success(svc_id: u32) {
    if let Some(b) = BREAKER.get_ptr_mut(&svc_id) {
        // SAFETY: a live BREAKER element; a plain store racing an atomic add
        // at worst loses one failure from the run.
        unsafe {
            if (*b).consecutive != 0 {
                (*b).consecutive = 0;
            }
        }
    }
}

/// Starts a new window if the current one is over.
///
/// # Safety
/// `b` must be a live BREAKER element.
#[inline(always)]
unsafe fn roll_window(b: *mut BreakerState, now: u64, window_ms: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if now.wrapping_sub((*b).window_start_ns) >= u64::from(window_ms) * 1_000_000 {
            (*b).window_start_ns = now;
            (*b).attempts = 0;
            (*b).failures = 0;
        }
    }
}

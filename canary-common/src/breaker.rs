//! The line-rate breaker: per service, the data plane counts canary
//! connection attempts and failures in fixed windows and, when failures
//! cross the service's limit, stops sending new connections to canary by
//! itself and tells the agent through a ring buffer.

/// `BREAKER` value, per service id. Created by the agent; the programs
/// update it with atomic adds (attempts, failures) and an atomic OR
/// (tripped), and restart the window with plain stores (a race there only
/// blurs one window's counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerState {
    /// `bpf_ktime_get_ns` when the current window started.
    pub window_start_ns: u64,
    /// Canary connection attempts (SYNs steered to canary) this window.
    pub attempts: u64,
    /// Canary failures this window: refused, reset by the backend, SYN
    /// retransmitted.
    pub failures: u64,
    /// Non-zero once tripped; stays until the agent recreates the entry.
    pub tripped: u64,
    /// `bpf_ktime_get_ns` of the trip.
    pub tripped_ns: u64,
    /// Canary failures since the canary last answered a request (a
    /// response byte): a canary that fails everything trips on this within
    /// `min_failures` connections, whatever the window held before.
    pub consecutive: u64,
}
const _: () = assert!(core::mem::size_of::<BreakerState>() == 48);

/// `EVENTS` record: the breaker of `svc_id` tripped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerEvent {
    pub svc_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the trip (`CLOCK_MONOTONIC`).
    pub at_ns: u64,
    /// Failures in the window that tripped.
    pub failures: u64,
    /// Canary attempts in that window.
    pub attempts: u64,
}
const _: () = assert!(core::mem::size_of::<BreakerEvent>() == 32);

/// Size of the `EVENTS` ring buffer (a power of two, a multiple of the page
/// size): room for thousands of trips between two agent reads.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Whether the breaker trips: `min_failures` failures in a row with no
/// canary response between them, or `min_failures` failures in the window
/// that are also at least `ratio_permille` thousandths of its attempts.
/// `min_failures == 0` disables the breaker.
#[inline(always)]
pub const fn trips(
    consecutive: u64,
    failures: u64,
    attempts: u64,
    min_failures: u16,
    ratio_permille: u16,
) -> bool {
    let min = min_failures as u64;
    min_failures != 0
        && (consecutive >= min
            || (failures >= min && failures * 1000 >= ratio_permille as u64 * attempts))
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), u64 fields only.
    unsafe impl aya::Pod for super::BreakerState {}
    // SAFETY: repr(C), explicit padding, integers only.
    unsafe impl aya::Pod for super::BreakerEvent {}
}

#[cfg(test)]
mod tests {
    use super::trips;

    #[test]
    fn the_breaker_trips_on_a_run_of_failures_or_a_high_enough_share() {
        // (consecutive, failures, attempts, min_failures, ratio_permille)
        assert!(!trips(1, 2, 2, 3, 500), "below min_failures");
        assert!(trips(3, 3, 3, 3, 500), "3 of 3 at a 50% limit");
        assert!(trips(1, 3, 6, 3, 500), "exactly 50% of the window");
        assert!(!trips(1, 3, 7, 3, 500), "3 of 7 is under 50%, no run");
        assert!(
            trips(3, 3, 200, 3, 500),
            "3 in a row trips however many attempts the window had"
        );
        assert!(
            trips(0, 3, 0, 3, 500),
            "failures without attempts (SYN retries of older flows)"
        );
        assert!(!trips(1000, 1000, 1000, 0, 0), "min_failures 0 disables");
    }
}

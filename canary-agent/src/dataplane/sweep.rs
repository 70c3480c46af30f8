//! The handshake-timeout sweep: a SYN the backend never answered is a
//! failure no packet announces, so the agent finds it by age, once a
//! second.

use std::time::Duration;

use canary_common::flow::{FlowKey, ST_CLOSED, ST_FAILED};
use tracing::warn;

use super::{BPF_EXIST, Dataplane, DataplaneError, lock};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[expect(clippy::cast_sign_loss, reason = "CLOCK_MONOTONIC is never negative")]
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Dataplane {
    /// Counts handshakes older than `timeout` as failed (`timeout`) and marks
    /// their flows closed, so they stop counting as active. The conntrack
    /// entries stay: a later SYN retransmission of the same connection is
    /// still a retry, not a new connection. Returns how many timed out.
    pub fn sweep_pending(&mut self, timeout: Duration) -> Result<u64, DataplaneError> {
        let now = monotonic_ns();
        let limit = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
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
}

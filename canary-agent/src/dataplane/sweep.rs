//! The sweeps, once a second: a SYN the backend never answered is a
//! failure no packet announces, and so are a UDP flow that went quiet and
//! one whose backend never replied; the agent finds them by age.

use std::{collections::BTreeMap, os::fd::AsFd, time::Duration};

use aya::maps::IterableMap;

use canary_common::{
    flow::{
        CT_REVERSE, CT_UNTIMED, CtEntry, FlowKey, PENDING_CAPACITY, ST_CLOSED, ST_DRAIN, ST_FAILED,
        ST_REFUSED, ST_RESPONSE, ST_TIMED_OUT, SynRecord, pending, sweep, udp_expired,
    },
    names,
};
use tracing::warn;

use super::{BPF_EXIST, Dataplane, DataplaneError, Program, lock, map_error};

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
    ///
    /// Reads the `PENDING` ring of recent SYNs from where the last sweep
    /// stopped up to the first record younger than `timeout` (or not
    /// written yet), and asks each older one's forward entry whether the
    /// handshake ended ([`pending::timed_out`]).
    pub fn sweep_pending(&mut self, timeout: Duration) -> Result<u64, DataplaneError> {
        let now = monotonic_ns();
        let limit = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let head = self
            .pending
            .get(&pending::HEAD, 0)
            .map_err(|e| map_error(names::PENDING, "read the head".to_string(), e))?
            .seq;
        let (mut seq, mut lost) = pending::start(self.pending_next, head);
        let mut expired = 0;
        'ring: while seq < head {
            let records = self.pending_records(seq, head - seq);
            if records.is_empty() {
                break;
            }
            for rec in records {
                match pending::classify(&rec, seq, now, limit) {
                    pending::Slot::Unwritten | pending::Slot::Young => break 'ring,
                    pending::Slot::Overwritten => lost += 1,
                    pending::Slot::Due => expired += u64::from(self.time_out(&rec)),
                }
                seq += 1;
            }
        }
        self.pending_next = Some(seq);
        if lost > 0 {
            warn!(
                lost,
                capacity = PENDING_CAPACITY,
                "SYN records overwritten before the handshake sweep read them: their timeouts are not counted"
            );
        }
        Ok(expired)
    }

    /// Counts the handshake of the due record `rec` as timed out if its
    /// flow says so; true if it did.
    fn time_out(&mut self, rec: &SynRecord) -> bool {
        let mut fwd = self.conntrack.get(&rec.key, 0).ok();
        let Some(first_failure) = pending::timed_out(rec, fwd.as_ref()) else {
            return false;
        };
        if let Some(fwd) = fwd.as_mut() {
            // Not atomic with the kernel's ORs: a bit it sets in between
            // is lost. The flow is stalled, so at worst a SYN retry of
            // it is counted twice.
            fwd.state |= ST_CLOSED | ST_FAILED;
            let _ = self.conntrack.insert(rec.key, *fwd, BPF_EXIST);
        }
        let mut stats = lock(&self.stats);
        let mut count = stats.timeouts.get(&rec.stats_slot, 0).unwrap_or_default();
        count.timeouts += 1;
        count.failed += u64::from(first_failure);
        // Only this sweep writes TIMEOUTS: no lost update.
        if let Err(e) = stats.timeouts.set(rec.stats_slot, count, 0) {
            warn!(slot = rec.stats_slot, error = %e, "cannot count a handshake timeout");
        }
        true
    }

    /// Up to `want` records of the `PENDING` ring from SYN number `seq` on,
    /// as far as its array runs without wrapping: one batch look-up; one
    /// look-up per record where the kernel has none.
    fn pending_records(&self, seq: u64, want: u64) -> Vec<SynRecord> {
        const BATCH: u32 = 4096;
        let index = pending::index(seq);
        let n = u32::try_from(want)
            .unwrap_or(u32::MAX)
            .min(PENDING_CAPACITY + 1 - index)
            .min(BATCH) as usize;
        let mut keys = vec![0u32; n];
        let mut values = vec![SynRecord::default(); n];
        let fd = self.pending.map().fd().as_fd();
        // An array's batch position is the index read last.
        match crate::sys::map_lookup_batch(fd, Some(index - 1), &mut keys, &mut values) {
            Ok((read, _)) => {
                values.truncate(read);
                values
            }
            Err(_) => (index..)
                .take(n)
                .map_while(|i| self.pending.get(&i, 0).ok())
                .collect(),
        }
    }
}

/// What one UDP sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSwept {
    /// Flows closed (idle past their `udp_idle_timeout`) and removed, and
    /// reverse halves left behind by a flow that moved, removed.
    pub expired: u64,
    /// Flows counted as unanswered (`udp_response_timeout` passed).
    pub timed_out: u64,
}

impl Dataplane {
    /// Ends UDP flows idle past their idle timeout (and flows the drain
    /// deadline marked, if its own run missed them) and counts flows whose
    /// backend has not replied within their service's response timeout.
    ///
    /// The agent only picks the candidates; they are handed to the
    /// `canary_udp_sweep` program (one `BPF_PROG_TEST_RUN` per 32 flows), which
    /// re-checks it and does the counting with the programs' own atomics
    /// and per-CPU counters: the close, its duration and the timeout land
    /// in the maps the datagram path also writes, each once, and no
    /// read-modify-write from here can lose a concurrent kernel update.
    pub fn sweep_udp(&mut self) -> Result<UdpSwept, DataplaneError> {
        let now = monotonic_ns();
        let entries = self.udp_flows();
        let mut response_ms: BTreeMap<u32, u32> = BTreeMap::new();
        let mut swept = UdpSwept::default();
        let mut due_keys = Vec::new();
        for (key, ct) in entries {
            let idle = udp_expired(ct.request_ns, now, ct.idle_ms);
            let drain = ct.flags & CT_REVERSE == 0 && ct.state & ST_DRAIN != 0;
            let due = ct.flags & (CT_REVERSE | CT_UNTIMED) == 0
                && ct.state & (ST_RESPONSE | ST_TIMED_OUT | ST_REFUSED) == 0
                && {
                    let ms = *response_ms.entry(ct.svc_id).or_insert_with(|| {
                        self.udp_config
                            .get(&ct.svc_id, 0)
                            .map_or(0, |c| c.response_ms)
                    });
                    ms != 0 && now.saturating_sub(ct.created_ns) >= u64::from(ms) * 1_000_000
                };
            if idle || due || drain {
                due_keys.push(key);
            }
        }
        for batch in due_keys.chunks(sweep::BATCH) {
            let (ret, _) = self.test_run(Program::UdpSweep, &sweep_frame(batch))?;
            let (expired, timed_out) = sweep::counts(ret);
            swept.expired += u64::from(expired);
            swept.timed_out += u64::from(timed_out);
        }
        Ok(swept)
    }
}

impl Dataplane {
    /// Every entry of `CT_UDP`, read in batches (thousands of entries per
    /// system call); entry by entry where the kernel has no batch
    /// look-ups.
    pub(super) fn udp_flows(&self) -> Vec<(FlowKey, CtEntry)> {
        const BATCH: usize = 4096;
        let fd = self.ct_udp.map().fd().as_fd();
        let mut out = Vec::new();
        let mut keys = vec![FlowKey::default(); BATCH];
        let mut values = vec![CtEntry::default(); BATCH];
        let mut from = None;
        loop {
            match crate::sys::map_lookup_batch(fd, from, &mut keys, &mut values) {
                Ok((n, next)) => {
                    out.extend(keys.iter().copied().zip(values.iter().copied()).take(n));
                    match next {
                        Some(next) => from = Some(next),
                        None => return out,
                    }
                }
                // Entries may have been read already: start over the slow way.
                Err(_) => return self.ct_udp.iter().filter_map(Result::ok).collect(),
            }
        }
    }
}

/// The frame `canary_udp_sweep` reads: an Ethernet header's worth of
/// zeros (`BPF_PROG_TEST_RUN` wants one), then the flows' keys.
pub(super) fn sweep_frame(keys: &[FlowKey]) -> Vec<u8> {
    let mut frame = vec![0u8; sweep::KEY_OFFSET];
    // SAFETY: FlowKey is repr(C) with explicit padding (no uninitialised
    // bytes), so the slice's memory is `size_of_val` initialised bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(keys.as_ptr().cast::<u8>(), std::mem::size_of_val(keys))
    };
    frame.extend_from_slice(bytes);
    frame
}

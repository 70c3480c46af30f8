//! Per-cohort measurements: the counters kept per backend (per-CPU, bumped
//! on the packet path) and the latency histograms kept per service × cohort
//! (shared, bumped with atomic adds once per connection event).

/// Counters of one backend slot (a service × cohort × backend), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// SYNs steered here (new connections).
    pub connections: u64,
    /// Flows counted open again without a SYN: re-resolved here after a
    /// conntrack miss and confirmed by the backend's answer, or revived
    /// after a RST the backend ignored (whose close is taken back). Only
    /// `active` uses it; these are never new connections.
    pub reopened: u64,
    /// Closes counted (FIN both ways, or the flow's first RST). A flow
    /// revived after an ignored RST is closed again later.
    pub closed: u64,
    /// RSTs sent by the backend on an established connection.
    pub resets_from_backend: u64,
    /// RSTs sent by the client.
    pub resets_from_client: u64,
    /// Connections refused: a RST answering the SYN.
    pub refused: u64,
    /// Connections whose SYN had to be retransmitted.
    pub syn_retried: u64,
    /// TCP payload bytes client → backend.
    pub bytes_from_client: u64,
    /// TCP payload bytes backend → client.
    pub bytes_from_backend: u64,
    /// Packets client → backend.
    pub packets_from_client: u64,
    /// Packets backend → client.
    pub packets_from_backend: u64,
    /// Connections that failed, each counted once: refused, SYN retried,
    /// or reset by the backend. With the agent's handshake timeouts that
    /// were a connection's first failure, this is the one definition of a
    /// failed connection (see the README's table).
    pub failed: u64,
}
const _: () = assert!(core::mem::size_of::<BackendCounters>() == 12 * 8);

/// `TIMEOUTS` value per stats slot: handshakes that got no SYN-ACK within
/// `handshake_timeout`. Written only by the agent's sweep.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeTimeouts {
    /// Every timed-out handshake (`reason="timeout"`).
    pub timeouts: u64,
    /// Those that were their connection's first failure (not SYN-retried
    /// before): they add to [`BackendCounters::failed`].
    pub failed: u64,
}
const _: () = assert!(core::mem::size_of::<HandshakeTimeouts>() == 16);

impl BackendCounters {
    /// Adds `other` into `self` (summing CPUs).
    pub fn add(&mut self, o: &BackendCounters) {
        self.connections += o.connections;
        self.reopened += o.reopened;
        self.closed += o.closed;
        self.resets_from_backend += o.resets_from_backend;
        self.resets_from_client += o.resets_from_client;
        self.refused += o.refused;
        self.syn_retried += o.syn_retried;
        self.bytes_from_client += o.bytes_from_client;
        self.bytes_from_backend += o.bytes_from_backend;
        self.packets_from_client += o.packets_from_client;
        self.packets_from_backend += o.packets_from_backend;
        self.failed += o.failed;
    }

    /// Connections open now: opened minus closed.
    pub fn active(&self) -> u64 {
        (self.connections + self.reopened).saturating_sub(self.closed)
    }
}

/// Sub-buckets per power of two: 16, so a bucket spans at most 1/16 of its
/// lower bound (6.25 %) and its midpoint is within 3.2 % of any value in it.
pub const HIST_SUB_BITS: u32 = 4;
const SUBS: u64 = 1 << HIST_SUB_BITS;
/// First octave with its own buckets: values below 2^12 units share bucket 0.
pub const HIST_MIN_OCTAVE: u32 = 12;
/// Values of 2^34 units or more share the last bucket.
pub const HIST_MAX_OCTAVE: u32 = 34;
/// Buckets per histogram: underflow, 16 per octave, overflow.
#[expect(clippy::cast_possible_truncation, reason = "22 octaves of 16 buckets")]
pub const HIST_BUCKETS: usize = 2 + ((HIST_MAX_OCTAVE - HIST_MIN_OCTAVE) as usize) * SUBS as usize;

/// A log-linear histogram. In nanoseconds, the fine range is 4.1 µs to
/// 17.2 s (handshake and first-byte times); in microseconds, 4.1 ms to
/// 4.8 h (connection durations).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Counts per bucket, see [`hist_bucket`].
    pub buckets: [u64; HIST_BUCKETS],
    /// Sum of all recorded values, in the histogram's unit.
    pub sum: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; HIST_BUCKETS],
            sum: 0,
        }
    }
}

/// The three latency histograms of one service × cohort.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CohortHistograms {
    /// SYN forwarded → SYN-ACK back, nanoseconds.
    pub handshake_ns: Histogram,
    /// First client payload → first backend payload, nanoseconds.
    pub first_byte_ns: Histogram,
    /// Open → close, microseconds.
    pub duration_us: Histogram,
}

/// `HISTOGRAMS` key of a service × cohort.
#[inline(always)]
pub const fn histogram_key(svc_id: u32, cohort: u8) -> u32 {
    svc_id * 2 + cohort as u32
}

/// floor(log2(v)) for v > 0, without a loop (the verifier likes it short).
#[inline(always)]
const fn log2_floor(mut v: u64) -> u32 {
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// The bucket of `v`: 0 below `2^MIN_OCTAVE`, then 16 per octave, the last
/// from `2^MAX_OCTAVE` on. Always `< HIST_BUCKETS`.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "octave offsets below 22 and sub-buckets below 16"
)]
pub const fn hist_bucket(v: u64) -> usize {
    if v < 1 << HIST_MIN_OCTAVE {
        return 0;
    }
    let octave = log2_floor(v);
    if octave >= HIST_MAX_OCTAVE {
        return HIST_BUCKETS - 1;
    }
    let sub = (v >> (octave - HIST_SUB_BITS)) & (SUBS - 1);
    1 + ((octave - HIST_MIN_OCTAVE) as usize) * SUBS as usize + sub as usize
}

/// The value range `[lo, hi)` of bucket `i` (the last bucket's `hi` is
/// `u64::MAX`).
#[expect(
    clippy::cast_possible_truncation,
    reason = "`i` is below HIST_BUCKETS here, so its octave and sub-bucket are small"
)]
pub const fn hist_bucket_range(i: usize) -> (u64, u64) {
    if i == 0 {
        return (0, 1 << HIST_MIN_OCTAVE);
    }
    if i >= HIST_BUCKETS - 1 {
        return (1 << HIST_MAX_OCTAVE, u64::MAX);
    }
    let octave = HIST_MIN_OCTAVE + ((i - 1) / SUBS as usize) as u32;
    let sub = ((i - 1) % SUBS as usize) as u64;
    let step = 1u64 << (octave - HIST_SUB_BITS);
    let lo = (1u64 << octave) + sub * step;
    (lo, lo + step)
}

/// The `q`-quantile (0 < q <= 1) of a histogram, in its unit: the bucket
/// holding the rank-`ceil(q·n)` value, interpolated linearly inside it.
/// `None` if the histogram is empty.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "`exact` is in 0..=total, a u64"
)]
pub fn quantile(buckets: &[u64; HIST_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let exact = q.clamp(0.0, 1.0) * total as f64;
    let mut rank = exact as u64;
    if (rank as f64) < exact {
        rank += 1;
    }
    let rank = rank.max(1);
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if seen + n >= rank {
            let (lo, hi) = hist_bucket_range(i);
            // The overflow bucket has no upper bound: report its start.
            let hi = if i == HIST_BUCKETS - 1 { lo } else { hi };
            // The k-th of n values in a bucket sits at (k - 0.5) / n of it.
            let frac = ((rank - seen) as f64 - 0.5) / n as f64;
            return Some(lo as f64 + frac * (hi - lo) as f64);
        }
        seen += n;
    }
    None
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), u64 fields only, no padding.
    unsafe impl aya::Pod for super::BackendCounters {}
    // SAFETY: repr(C), u64 fields only.
    unsafe impl aya::Pod for super::HandshakeTimeouts {}
    // SAFETY: repr(C), u64 arrays and fields only, no padding.
    unsafe impl aya::Pod for super::CohortHistograms {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn every_value_falls_inside_its_buckets_range() {
        let mut v = 1u64;
        while v < 1 << 40 {
            for probe in [v - 1, v, v + 1, v + v / 3] {
                let i = hist_bucket(probe);
                let (lo, hi) = hist_bucket_range(i);
                assert!(i < HIST_BUCKETS, "{probe} → bucket {i} out of range");
                assert!(
                    lo <= probe && probe < hi,
                    "{probe} → bucket {i} = [{lo}, {hi})"
                );
            }
            v = v * 9 / 8 + 1;
        }
    }

    #[test]
    fn buckets_are_contiguous_and_increasing() {
        for i in 1..HIST_BUCKETS {
            assert_eq!(
                hist_bucket_range(i - 1).1,
                hist_bucket_range(i).0,
                "gap before bucket {i}"
            );
        }
    }

    /// Deterministic samples spread over `[lo, hi)` with a skewed density.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "samples lie in [lo, hi), positive and far below u64::MAX"
    )]
    fn samples(lo: f64, hi: f64, n: usize, seed: u64) -> std::vec::Vec<u64> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                // Log-uniform squared: many small values, a long tail.
                (lo * (hi / lo).powf(u * u)) as u64
            })
            .collect()
    }

    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the rank is in 1..=len"
    )]
    fn true_quantile(sorted: &[u64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1] as f64
    }

    /// p50 and p99 from the buckets are within 5 % of the exact sample
    /// quantiles for distributions anywhere between 50 µs and 10 s.
    #[test]
    fn p50_and_p99_are_within_5_percent_between_50us_and_10s() {
        let ranges = [
            (50e3, 200e3),
            (50e3, 10e9),
            (1e6, 3e6),
            (45e6, 60e6),
            (100e6, 10e9),
            (9e9, 10e9),
        ];
        for (r, (lo, hi)) in ranges.iter().enumerate() {
            for n in [200usize, 5_000, 100_000] {
                let mut xs = samples(*lo, *hi, n, 0x9e37_79b9 + r as u64 * 7 + n as u64);
                let mut h = [0u64; HIST_BUCKETS];
                for &x in &xs {
                    h[hist_bucket(x)] += 1;
                }
                xs.sort_unstable();
                for q in [0.5, 0.99] {
                    let truth = true_quantile(&xs, q);
                    let est = quantile(&h, q).unwrap();
                    let err = (est - truth).abs() / truth;
                    assert!(
                        err <= 0.05,
                        "range {lo:.0}..{hi:.0} ns, n={n}, q={q}: estimate {est:.0} vs true {truth:.0} ({:.2}% off)",
                        err * 100.0
                    );
                }
            }
        }
        assert_eq!(quantile(&[0; HIST_BUCKETS], 0.5), None);
    }

    /// Between 50 µs and 10 s no bucket is wider than 1/16 of its lower
    /// bound, so a midpoint estimate is within 3.2 % of any value in it.
    #[test]
    fn buckets_are_fine_enough_between_50us_and_10s() {
        for i in hist_bucket(50_000)..=hist_bucket(10_000_000_000) {
            let (lo, hi) = hist_bucket_range(i);
            let width = (hi - lo) as f64 / lo as f64;
            assert!(
                width <= 1.0 / 16.0 + 1e-12,
                "bucket {i} [{lo}, {hi}) is {:.2}% wide",
                width * 100.0
            );
        }
    }
}

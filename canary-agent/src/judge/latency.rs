//! First-byte latency: is a sample's cohort independent of whether it is
//! slower than a threshold, for thresholds every half octave?

use canary_common::stats::HIST_BUCKETS;

use super::evidence::{Average, Split, ln_mixture, ln_null, ln_pooled};

/// Thresholds sit at every `STEP`-th bucket boundary: every half octave
/// (×1.41). A shift of the bulk moves the share above every threshold
/// inside it, so finer steps add little power and cost time (and dilute
/// the average).
const STEP: usize = 8;

#[cfg(test)]
/// How many thresholds the evidence is averaged over (45).
pub const THRESHOLDS: usize = (HIST_BUCKETS - 2) / STEP + 1;

/// `ln` of the e-value against "canary first-byte times are no slower than
/// stable's": the average, over fixed thresholds, of the evidence that
/// samples above the threshold are canary more often than those below. Costs one pass over the buckets plus one term per threshold that
/// splits the samples.
pub fn ln_e(canary: &[u64; HIST_BUCKETS], stable: &[u64; HIST_BUCKETS]) -> f64 {
    let total = Split {
        canary: canary.iter().sum(),
        stable: stable.iter().sum(),
    };
    // Where the canary is over-represented above a threshold, the
    // denominator is the same for every threshold: the pooled share's.
    let pooled = ln_pooled(total, Split::default());
    let mut avg = Average::new();
    // Thresholds with every sample on one side all give the same value.
    let mut unsplit = 0u64;
    let mut above = Split::default();
    // From the top: the overflow bucket, then one threshold per STEP
    // buckets (the lowest at bucket 1; bucket 0 is never above one).
    let mut hi = HIST_BUCKETS;
    while hi > 1 {
        let lo = 1 + (hi - 2) / STEP * STEP;
        for i in lo..hi {
            above.canary += canary[i];
            above.stable += stable[i];
        }
        hi = lo;
        let below = Split {
            canary: total.canary - above.canary,
            stable: total.stable - above.stable,
        };
        if above == Split::default() || below == Split::default() {
            unsplit += 1;
        } else {
            let null = if above.over_represented_against(below) {
                pooled
            } else {
                ln_null(above, below)
            };
            avg.add(
                ln_mixture(above.canary, above.stable) + ln_mixture(below.canary, below.stable)
                    - null,
                1,
            );
        }
    }
    avg.add(ln_mixture(total.canary, total.stable) - pooled, unsplit);
    avg.ln_mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_threshold_is_counted() {
        let mut c = [0u64; HIST_BUCKETS];
        let mut s = [0u64; HIST_BUCKETS];
        c[100] = 10;
        s[100] = 40;
        // All samples in one bucket: every threshold is unsplit, and the
        // evidence is that of the cohort shares alone (none).
        let e = ln_e(&c, &s);
        assert!(e < 0.0, "{e}");
        assert_eq!(THRESHOLDS, 45);
        c[200] = 30;
        // Above the split, 30 canary samples and no stable one (share 3/7).
        assert!(ln_e(&c, &s) > 10.0, "{}", ln_e(&c, &s));
    }
}

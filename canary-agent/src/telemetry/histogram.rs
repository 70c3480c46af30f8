//! A kernel histogram as Prometheus sees it: the fine log-linear buckets
//! of `canary_common::stats` summed into coarser exported ones.

use canary_common::stats::{HIST_BUCKETS, Histogram, hist_bucket_range};
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// A kernel histogram as exported: every `export_every`-th bucket boundary
/// (exact sums of the fine buckets below it), scaled to seconds.
#[derive(Debug)]
pub(super) struct ExportHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl ExportHistogram {
    pub(super) fn new(h: &Histogram, scale: f64, export_every: usize) -> ExportHistogram {
        let mut buckets = Vec::with_capacity(HIST_BUCKETS / export_every + 2);
        let mut acc = 0u64;
        for (i, &n) in h.buckets.iter().enumerate() {
            acc += n;
            let last = i == HIST_BUCKETS - 1;
            // Boundaries: the end of the underflow bucket, then every
            // export_every-th fine bucket, then +Inf.
            let boundary = i == 0 || (!last && i % export_every == 0);
            if last {
                buckets.push((f64::INFINITY, acc));
            } else if boundary {
                buckets.push((hist_bucket_range(i).1 as f64 * scale, acc));
                acc = 0;
            }
        }
        ExportHistogram {
            sum: h.sum as f64 * scale,
            count: h.buckets.iter().sum(),
            buckets,
        }
    }
}

impl TypedMetric for ExportHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ExportHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use canary_common::stats::hist_bucket;

    use super::*;

    #[test]
    #[expect(clippy::float_cmp, reason = "the last bound is exactly +Inf")]
    fn exported_buckets_sum_the_fine_ones_exactly() {
        let mut h = Histogram::default();
        for v in [
            1_000u64,
            5_000,
            50_000,
            50_001,
            49_000_000,
            50_100_000,
            9_000_000_000,
            1 << 40,
        ] {
            h.buckets[hist_bucket(v)] += 1;
            h.sum += v;
        }
        for every in [1usize, 4, 16] {
            let e = ExportHistogram::new(&h, 1e-9, every);
            assert_eq!(e.count, 8);
            assert_eq!(
                e.buckets.iter().map(|b| b.1).sum::<u64>(),
                8,
                "every {every}: counts lost"
            );
            assert_eq!(e.buckets.last().unwrap().0, f64::INFINITY);
            assert!(
                e.buckets.windows(2).all(|w| w[0].0 < w[1].0),
                "bounds increase"
            );
            // Each value sits in the first exported bucket whose bound is above it.
            for v in [5_000u64, 50_000, 49_000_000] {
                let (bound, _) = e
                    .buckets
                    .iter()
                    .find(|(b, _)| *b > v as f64 * 1e-9)
                    .unwrap();
                let below: u64 = e
                    .buckets
                    .iter()
                    .filter(|(b, _)| b <= bound)
                    .map(|b| b.1)
                    .sum();
                assert!(below >= 1, "{v} ns not under {bound}");
            }
        }
        // 16 fine buckets per octave exported 4 per octave: 22 octaves.
        let e = ExportHistogram::new(&h, 1e-9, 4);
        assert_eq!(e.buckets.len(), 1 + 22 * 4 + 1);
    }
}

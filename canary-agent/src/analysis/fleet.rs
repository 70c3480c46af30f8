//! The fleet's evidence: every node's counters and first-byte histograms,
//! summed by Prometheus over the step's window, turned back into the
//! judge's [`CohortWindow`]s so the leader judges the whole fleet with the
//! same statistics a node uses on its own traffic.
//!
//! The exported histogram has every few kernel buckets' boundaries
//! (`metrics_buckets_per_octave`); each exported bucket's count goes into
//! the kernel bucket that ends at its `le`, so both cohorts are compared on
//! the same, coarser buckets.

use std::time::Duration;

use canary_common::stats::{HIST_BUCKETS, hist_bucket};

use super::{
    checks::promql_duration,
    prometheus::{Endpoint, QueryError, Series, query},
};
use crate::judge::{CohortWindow, JudgeConfig, Verdict, judge};

/// The three queries for `service` over `window`: connections, failed
/// connections, first-byte buckets, each summed over nodes by cohort.
pub fn queries(service: &str, window: Duration) -> [String; 3] {
    let w = promql_duration(window);
    let svc = service.replace('\\', "\\\\").replace('"', "\\\"");
    [
        format!("sum by (cohort) (increase(canary_connections_total{{service=\"{svc}\"}}[{w}]))"),
        format!(
            "sum by (cohort) (increase(canary_connections_failed_total{{service=\"{svc}\"}}[{w}]))"
        ),
        format!(
            "sum by (le, cohort) (increase(canary_first_byte_seconds_bucket{{service=\"{svc}\"}}[{w}]))"
        ),
    ]
}

/// A count from an `increase()`: extrapolated, so fractional; rounded.
fn count(v: f64) -> Result<u64, String> {
    if !v.is_finite() || v < 0.0 {
        return Err(format!("a count is {v}"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "finite, non-negative, and clamped below 2^63"
    )]
    Ok(v.round().min(9.2e18) as u64)
}

fn cohort_of(s: &Series) -> Option<usize> {
    match s.labels.get("cohort").map(String::as_str) {
        Some("stable") => Some(0),
        Some("canary") => Some(1),
        _ => None,
    }
}

/// Builds [stable, canary] windows from the three answers of [`queries`].
/// A cohort with no series has seen nothing (zero); a malformed `le` or a
/// NaN count makes the whole evidence inconclusive.
pub fn windows(
    connections: &[Series],
    failures: &[Series],
    buckets: &[Series],
) -> Result<[CohortWindow; 2], String> {
    let mut out = [0, 1].map(|_| CohortWindow {
        connections: 0,
        failures: 0,
        first_byte: Box::new([0; HIST_BUCKETS]),
    });
    for s in connections {
        if let Some(c) = cohort_of(s) {
            out[c].connections += count(s.value)?;
        }
    }
    for s in failures {
        if let Some(c) = cohort_of(s) {
            out[c].failures += count(s.value)?;
        }
    }
    // Cumulative per cohort: sorted by le, then differenced.
    for (c, window) in out.iter_mut().enumerate() {
        let mut cumulative: Vec<(f64, f64)> = Vec::new();
        for s in buckets.iter().filter(|s| cohort_of(s) == Some(c)) {
            let le = match s.labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(t) => t.parse::<f64>().map_err(|_| format!("bucket le={t:?}"))?,
                None => return Err("a bucket without le".into()),
            };
            cumulative.push((le, s.value));
        }
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut below = 0.0;
        for (le, total) in cumulative {
            let n = count((total - below).max(0.0))?;
            below = total.max(below);
            let bucket = if le.is_infinite() {
                HIST_BUCKETS - 1
            } else {
                // The kernel bucket whose upper bound is `le` (in ns).
                let ns = count((le * 1e9).max(1.0))?;
                hist_bucket(ns.saturating_sub(1))
            };
            window.first_byte[bucket] += n;
        }
    }
    Ok(out)
}

/// The fleet's verdict on `service` over `window`: the judge on the summed
/// windows; anything missing (Prometheus down, slow, an error) is
/// insufficient data, which holds the step.
pub async fn verdict(
    endpoint: &Endpoint,
    timeout: Duration,
    cfg: &JudgeConfig,
    service: &str,
    window: Duration,
) -> Verdict {
    let [c, f, b] = queries(service, window);
    let (c, f, b) = tokio::join!(
        query(endpoint, &c, timeout),
        query(endpoint, &f, timeout),
        query(endpoint, &b, timeout)
    );
    let inconclusive = |why: String| Verdict::InsufficientData {
        detail: format!("fleet evidence from Prometheus inconclusive: {why}"),
    };
    let all = (|| -> Result<_, QueryError> { Ok((c?, f?, b?)) })();
    match all {
        Err(e) => inconclusive(crate::error_chain(&e)),
        Ok((c, f, b)) => match windows(&c, &f, &b) {
            Err(why) => inconclusive(why),
            Ok([stable, canary]) => match judge(cfg, &stable, &canary) {
                Verdict::Pass { detail } => Verdict::Pass {
                    detail: format!("fleet (Prometheus, all nodes): {detail}"),
                },
                Verdict::Fail { reason, detail } => Verdict::Fail {
                    reason,
                    detail: format!("fleet (Prometheus, all nodes): {detail}"),
                },
                Verdict::InsufficientData { detail } => Verdict::InsufficientData {
                    detail: format!("fleet (Prometheus, all nodes): {detail}"),
                },
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn series(labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>(),
            value,
        }
    }

    #[test]
    fn promql_sums_become_the_judges_cohort_windows() {
        let conns = [
            series(&[("cohort", "stable")], 900.4),
            series(&[("cohort", "canary")], 100.0),
        ];
        let fails = [series(&[("cohort", "canary")], 7.0)];
        // Cumulative, out of order, as Prometheus may list them.
        let le = |s: f64| format!("{s}");
        let (a, b) = (le(0.001_048_576), le(0.002_097_152));
        let buckets = [
            series(&[("cohort", "canary"), ("le", "+Inf")], 100.0),
            series(&[("cohort", "canary"), ("le", &a)], 40.0),
            series(&[("cohort", "canary"), ("le", &b)], 90.0),
            series(&[("cohort", "stable"), ("le", &a)], 800.0),
            series(&[("cohort", "stable"), ("le", "+Inf")], 900.0),
        ];
        let [stable, canary] = windows(&conns, &fails, &buckets).unwrap();
        assert_eq!((stable.connections, stable.failures), (900, 0));
        assert_eq!((canary.connections, canary.failures), (100, 7));
        let ia = hist_bucket(1_048_576 - 1);
        let ib = hist_bucket(2_097_152 - 1);
        assert_eq!(
            (
                canary.first_byte[ia],
                canary.first_byte[ib],
                canary.first_byte[HIST_BUCKETS - 1]
            ),
            (40, 50, 10)
        );
        assert_eq!(canary.first_byte.iter().sum::<u64>(), 100);
        assert_eq!(
            (stable.first_byte[ia], stable.first_byte[HIST_BUCKETS - 1]),
            (800, 100)
        );
        let e = windows(&[series(&[("cohort", "canary")], f64::NAN)], &[], &[]).unwrap_err();
        assert!(e.contains("NaN"), "{e}");
    }

    #[test]
    fn the_queries_sum_over_nodes_by_cohort() {
        let [c, f, b] = queries("web", Duration::from_secs(90));
        assert_eq!(
            c,
            "sum by (cohort) (increase(canary_connections_total{service=\"web\"}[90s]))"
        );
        assert!(f.contains("canary_connections_failed_total"), "{f}");
        assert!(
            b.starts_with("sum by (le, cohort) (increase(canary_first_byte_seconds_bucket"),
            "{b}"
        );
    }

    #[tokio::test]
    async fn prometheus_down_is_insufficient_data_never_a_pass() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Endpoint::plain(&listener.local_addr().unwrap().to_string());
        drop(listener);
        let v = verdict(
            &ep,
            Duration::from_secs(1),
            &JudgeConfig::default(),
            "web",
            Duration::from_mins(1),
        )
        .await;
        assert!(
            matches!(&v, Verdict::InsufficientData { detail } if detail.contains("inconclusive: cannot connect")),
            "{v:?}"
        );
    }
}

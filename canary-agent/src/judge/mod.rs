//! The judge: canary against stable, same node, same step.
//!
//! Sequential, anytime-valid statistics over what the kernel counted since
//! the step began (counter and histogram deltas), so the probability that
//! a canary no worse than stable is *ever* rolled back during a rollout is
//! bounded by `alpha` per test, however often it is judged and for however
//! long (`evidence.rs` has the method and its references):
//! - failures: an e-process against "canary connections fail no more often
//!   than stable's", i.e. the canary is not over-represented among failed
//!   connections (`failures.rs`); it rolls back once it reaches
//!   `windows/alpha` and the canary's failure ratio is at least
//!   `min_failure_increase` above stable's;
//! - latency: the average over half-octave thresholds of e-processes
//!   against "the canary is not over-represented among first bytes later
//!   than the threshold" (`latency.rs`); it rolls back once it reaches
//!   `windows/alpha` and the median (or p99) is slower by at least the
//!   practical floors;
//! - a hard guard on the canary failure ratio that needs no statistics;
//! - too few samples: `insufficient-data`, which holds the step.
//!
//! `simulation.rs` (tests) judges 10^6 simulated looks of identical
//! cohorts and measures detection times.

mod evidence;
mod failures;
mod latency;
#[cfg(test)]
mod simulation;

use canary_common::stats::{HIST_BUCKETS, quantile};
use serde::{Deserialize, Serialize};

/// Thresholds of the judge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JudgeConfig {
    /// Fewer connections (or first-byte samples) than this in either
    /// cohort: insufficient data. The tests are valid with any number; the
    /// floors below compare medians and need a few.
    pub min_samples: u64,
    /// Probability, per test (failures, latency), that a canary no worse
    /// than stable is ever rolled back during the whole rollout.
    pub alpha: f64,
    /// Windows of evidence a rollout may go through, among which `alpha`
    /// is split evenly: one per step and one per manual gate (the judge
    /// restarts its window at every state change).
    pub windows: u32,
    /// Canary failure ratio must exceed stable's by at least this (absolute)
    /// before significant evidence fails the canary.
    pub min_failure_increase: f64,
    /// Canary median first-byte time must be at least this multiple of
    /// stable's…
    pub min_latency_ratio: f64,
    /// …and at least this much more, in nanoseconds, before significant
    /// evidence fails the canary: sub-millisecond shifts are scheduling
    /// noise at L4, not regressions.
    pub min_latency_increase_ns: f64,
    /// Alternatively, with significant evidence, canary p99 first-byte over
    /// stable p99 above this fails (with at least 100 samples in each
    /// cohort)…
    pub max_p99_ratio: f64,
    /// …if it is also at least this much more, in nanoseconds.
    pub min_p99_increase_ns: f64,
    /// A canary failure ratio above this fails at once.
    pub hard_max_failure_ratio: f64,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            min_samples: 50,
            alpha: 0.001,
            windows: 1,
            min_failure_increase: 0.01,
            min_latency_ratio: 1.2,
            min_latency_increase_ns: 1e6,
            max_p99_ratio: 2.0,
            min_p99_increase_ns: 10e6,
            hard_max_failure_ratio: 0.5,
        }
    }
}

impl JudgeConfig {
    /// `ln(1/α')`, where `α' = alpha / windows` is this window's share: the
    /// `ln` e-value at which a test's evidence is significant.
    pub fn ln_bar(&self) -> f64 {
        (f64::from(self.windows.max(1)) / self.alpha).ln()
    }
}

/// What the kernel counted for one cohort in the window.
#[derive(Clone, Debug, PartialEq)]
pub struct CohortWindow {
    /// New connections.
    pub connections: u64,
    /// Failed ones (refused, SYN retried, timed out, reset by the backend).
    pub failures: u64,
    /// First-byte histogram counts (nanosecond buckets).
    pub first_byte: Box<[u64; HIST_BUCKETS]>,
}

impl CohortWindow {
    fn samples(&self) -> u64 {
        self.first_byte.iter().sum()
    }

    fn failure_ratio(&self) -> f64 {
        if self.connections == 0 {
            0.0
        } else {
            self.failures as f64 / self.connections as f64
        }
    }
}

/// The outcome of one judgement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Verdict {
    /// No test fails.
    Pass { detail: String },
    /// A test fails; the canary should be rolled back.
    Fail { reason: String, detail: String },
    /// Not enough samples to judge: hold (whatever else is inconclusive
    /// holds the same way).
    InsufficientData { detail: String },
}

/// Every kind of verdict, as `canary_judgements_total{verdict}` names it.
pub const VERDICT_KINDS: [&str; 3] = ["pass", "fail", "insufficient-data"];

impl Verdict {
    /// Its kind, one of [`VERDICT_KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Pass { .. } => VERDICT_KINDS[0],
            Verdict::Fail { .. } => VERDICT_KINDS[1],
            Verdict::InsufficientData { .. } => VERDICT_KINDS[2],
        }
    }

    /// One line with the numbers.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Pass { detail } => format!("pass: {detail}"),
            Verdict::Fail { reason, detail } => format!("fail ({reason}): {detail}"),
            Verdict::InsufficientData { detail } => format!("insufficient-data: {detail}"),
        }
    }
}

/// Which rule decided a judgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finding {
    /// The canary failure ratio is above `hard_max_failure_ratio`.
    HardGuard,
    /// Too few connections or samples.
    Insufficient,
    /// Significant evidence of more failures, beyond the floor.
    Failures,
    /// Significant evidence of slower first bytes, median beyond the floors.
    Latency,
    /// Significant evidence of slower first bytes, p99 beyond the floors.
    P99,
    /// Nothing fails.
    Pass,
}

/// The numbers behind a judgement, computed no further than the decision
/// needs (the simulation calls this at every look).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Assessment {
    /// The decision.
    pub(crate) finding: Finding,
    /// `ln e` of the failure test, once computed.
    pub(crate) failures_ln_e: Option<f64>,
    /// `ln e` of the latency test, once computed.
    pub(crate) latency_ln_e: Option<f64>,
}

/// p50 and p99 of both cohorts' first-byte times, in nanoseconds.
struct Quantiles {
    c50: f64,
    s50: f64,
    c99: f64,
    s99: f64,
}

impl Quantiles {
    fn of(stable: &CohortWindow, canary: &CohortWindow) -> Quantiles {
        let q = |h: &[u64; HIST_BUCKETS], q| quantile(h, q).unwrap_or(0.0);
        Quantiles {
            c50: q(&canary.first_byte, 0.5),
            s50: q(&stable.first_byte, 0.5),
            c99: q(&canary.first_byte, 0.99),
            s99: q(&stable.first_byte, 0.99),
        }
    }

    fn median_ratio(&self) -> f64 {
        if self.s50 > 0.0 {
            self.c50 / self.s50
        } else {
            1.0
        }
    }
}

/// Decides, computing only what the decision needs.
pub(crate) fn assess(
    cfg: &JudgeConfig,
    stable: &CohortWindow,
    canary: &CohortWindow,
) -> Assessment {
    let mut a = Assessment {
        finding: Finding::Pass,
        failures_ln_e: None,
        latency_ln_e: None,
    };
    if canary.connections >= 10 && canary.failure_ratio() > cfg.hard_max_failure_ratio {
        a.finding = Finding::HardGuard;
        return a;
    }
    if canary.connections < cfg.min_samples || stable.connections < cfg.min_samples {
        a.finding = Finding::Insufficient;
        return a;
    }
    let bar = cfg.ln_bar();
    let f = failures::ln_e(stable, canary);
    a.failures_ln_e = Some(f);
    let increase = canary.failure_ratio() - stable.failure_ratio();
    if f >= bar && increase > 0.0 && increase >= cfg.min_failure_increase {
        a.finding = Finding::Failures;
        return a;
    }
    if canary.samples() < cfg.min_samples || stable.samples() < cfg.min_samples {
        a.finding = Finding::Insufficient;
        return a;
    }
    let l = latency::ln_e(&canary.first_byte, &stable.first_byte);
    a.latency_ln_e = Some(l);
    if l >= bar {
        let q = Quantiles::of(stable, canary);
        if slower_median(cfg, &q) {
            a.finding = Finding::Latency;
        } else if slower_tail(cfg, &q, stable, canary) {
            a.finding = Finding::P99;
        }
    }
    a
}

fn slower_median(cfg: &JudgeConfig, q: &Quantiles) -> bool {
    q.median_ratio() >= cfg.min_latency_ratio && q.c50 - q.s50 >= cfg.min_latency_increase_ns
}

fn slower_tail(
    cfg: &JudgeConfig,
    q: &Quantiles,
    stable: &CohortWindow,
    canary: &CohortWindow,
) -> bool {
    canary.samples() >= 100
        && stable.samples() >= 100
        && q.s99 > 0.0
        && q.c99 / q.s99 > cfg.max_p99_ratio
        && q.c99 - q.s99 >= cfg.min_p99_increase_ns
}

/// An e-value as people read it, from its `ln`: three significant digits.
fn e_value(ln_e: f64) -> String {
    let log10 = ln_e / std::f64::consts::LN_10;
    if (-3.0..6.0).contains(&log10) {
        let e = ln_e.exp();
        // No decimal from 100 up, one more per decade below.
        let decimals = [2.0, 1.0, 0.0, -1.0, -2.0]
            .iter()
            .position(|&d| log10 >= d)
            .unwrap_or(5);
        format!("{e:.decimals$}")
    } else {
        format!(
            "{:.2}e{:.0}",
            10f64.powf(log10 - log10.floor()),
            log10.floor()
        )
    }
}

/// Judges the canary against stable over the step's window so far.
pub fn judge(cfg: &JudgeConfig, stable: &CohortWindow, canary: &CohortWindow) -> Verdict {
    let a = assess(cfg, stable, canary);
    let (cf, sf) = (canary.failure_ratio(), stable.failure_ratio());
    let bar = e_value(cfg.ln_bar());
    let failures = |ln_e: f64| {
        format!(
            "failures canary {:.2}% ({}/{}) vs stable {:.2}% ({}/{}), e={} ({bar} needed)",
            cf * 100.0,
            canary.failures,
            canary.connections,
            sf * 100.0,
            stable.failures,
            stable.connections,
            e_value(ln_e),
        )
    };
    let (cn, sn) = (canary.samples(), stable.samples());
    let latency = |ln_e: f64| {
        let q = Quantiles::of(stable, canary);
        format!(
            "first byte p50 canary {:.3} ms vs stable {:.3} ms (x{:.2}), p99 {:.3} vs {:.3} ms, \
             e={} ({bar} needed) over {cn}/{sn} samples",
            q.c50 / 1e6,
            q.s50 / 1e6,
            q.median_ratio(),
            q.c99 / 1e6,
            q.s99 / 1e6,
            e_value(ln_e),
        )
    };
    let fails = |reason: &str, detail: String| Verdict::Fail {
        reason: reason.into(),
        detail,
    };
    match (a.finding, a.failures_ln_e, a.latency_ln_e) {
        (Finding::HardGuard, ..) => fails(
            "hard-guard",
            format!(
                "canary failure ratio {:.1}% > {:.1}% ({} of {})",
                cf * 100.0,
                cfg.hard_max_failure_ratio * 100.0,
                canary.failures,
                canary.connections
            ),
        ),
        (Finding::Failures, Some(f), _) => fails(
            "failures",
            format!(
                "{}; +{:.2}% >= floor {:.2}%",
                failures(f),
                (cf - sf) * 100.0,
                cfg.min_failure_increase * 100.0
            ),
        ),
        (Finding::Latency, Some(f), Some(l)) => fails(
            "latency",
            format!(
                "{}; {}; slower beyond x{} and +{:.3} ms",
                latency(l),
                failures(f),
                cfg.min_latency_ratio,
                cfg.min_latency_increase_ns / 1e6,
            ),
        ),
        (Finding::P99, Some(f), Some(l)) => fails(
            "p99",
            format!(
                "{}; {}; p99 beyond x{} and +{:.3} ms",
                latency(l),
                failures(f),
                cfg.max_p99_ratio,
                cfg.min_p99_increase_ns / 1e6,
            ),
        ),
        (Finding::Insufficient, f, _) => Verdict::InsufficientData {
            detail: format!(
                "{}{} canary and {} stable connections, {cn} and {sn} first-byte samples, {} of each needed",
                f.map(|f| format!("{}; ", failures(f))).unwrap_or_default(),
                canary.connections,
                stable.connections,
                cfg.min_samples
            ),
        },
        (_, f, l) => Verdict::Pass {
            detail: [f.map(failures), l.map(latency)]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; "),
        },
    }
}

#[cfg(test)]
mod tests {
    use canary_common::stats::hist_bucket;

    use super::*;

    fn window(
        connections: u64,
        failures: u64,
        first_byte_ns: impl IntoIterator<Item = u64>,
    ) -> CohortWindow {
        let mut h = Box::new([0u64; HIST_BUCKETS]);
        for v in first_byte_ns {
            h[hist_bucket(v)] += 1;
        }
        CohortWindow {
            connections,
            failures,
            first_byte: h,
        }
    }

    /// Deterministic spread around `center` (±20 %).
    fn around(center: u64, n: usize, seed: u64) -> Vec<u64> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                center * 8 / 10 + (s % (center * 4 / 10))
            })
            .collect()
    }

    #[test]
    fn e_values_read_with_three_significant_digits() {
        for (e, text) in [
            (1654.866, "1655"),
            (12.345, "12.3"),
            (0.046_12, "0.0461"),
            (1e-5, "1.00e-5"),
            (5.8e53, "5.80e53"),
        ] {
            assert_eq!(e_value(f64::ln(e)), text, "{e}");
        }
    }

    /// 22 failures of 1000 against none of 1000: e is several thousand,
    /// enough for one window's alpha, not for a hundredth of it.
    #[test]
    fn alpha_is_split_among_the_plans_windows() {
        let stable = window(1000, 0, around(1_000_000, 1000, 20));
        let canary = window(1000, 22, around(1_000_000, 978, 21));
        let one = JudgeConfig::default();
        let v = judge(&one, &stable, &canary);
        assert!(
            matches!(&v, Verdict::Fail { reason, .. } if reason == "failures"),
            "{}",
            v.describe()
        );
        let hundred = JudgeConfig {
            windows: 100,
            ..one
        };
        let v = judge(&hundred, &stable, &canary);
        assert!(
            matches!(&v, Verdict::Pass { .. }) && v.describe().contains("(100000 needed)"),
            "{}",
            v.describe()
        );
    }

    #[test]
    fn an_identical_canary_passes() {
        let stable = window(5000, 10, around(1_000_000, 5000, 1));
        let canary = window(500, 1, around(1_000_000, 500, 2));
        let v = judge(&JudgeConfig::default(), &stable, &canary);
        assert!(matches!(v, Verdict::Pass { .. }), "{}", v.describe());
    }

    #[test]
    fn a_canary_twice_as_slow_fails_on_latency() {
        let stable = window(2000, 0, around(2_000_000, 2000, 3));
        let canary = window(200, 0, around(4_000_000, 200, 4));
        let v = judge(&JudgeConfig::default(), &stable, &canary);
        assert!(
            matches!(&v, Verdict::Fail { reason, .. } if reason == "latency"),
            "{}",
            v.describe()
        );
    }

    #[test]
    fn a_canary_slower_by_less_than_the_minimum_effect_passes() {
        // 5 % slower: significant with this many samples, but below x1.2.
        let stable = window(20_000, 0, around(2_000_000, 20_000, 5));
        let canary = window(20_000, 0, around(2_100_000, 20_000, 6));
        let v = judge(&JudgeConfig::default(), &stable, &canary);
        assert!(matches!(v, Verdict::Pass { .. }), "{}", v.describe());
    }

    /// The lab failure that taught this: under CPU contention an identical
    /// canary showed p99 2.6 ms against 1.1 ms (x2.2) at p50 0.17 ms. Below
    /// the absolute floors that is noise; a 50 ms tail is not.
    #[test]
    fn sub_millisecond_tail_noise_passes_and_a_real_tail_regression_fails() {
        let stable = window(
            2000,
            0,
            around(170_000, 1980, 12)
                .into_iter()
                .chain(around(1_100_000, 20, 13)),
        );
        let noisy = window(
            500,
            0,
            around(170_000, 490, 14)
                .into_iter()
                .chain(around(2_600_000, 10, 15)),
        );
        let v = judge(&JudgeConfig::default(), &stable, &noisy);
        assert!(matches!(v, Verdict::Pass { .. }), "{}", v.describe());
        let tail = window(
            500,
            0,
            around(170_000, 480, 16)
                .into_iter()
                .chain(around(50_000_000, 20, 17)),
        );
        let v = judge(&JudgeConfig::default(), &stable, &tail);
        assert!(
            matches!(&v, Verdict::Fail { reason, .. } if reason == "p99"),
            "{}",
            v.describe()
        );
    }

    #[test]
    fn more_canary_failures_fail_and_a_little_more_does_not() {
        let fb = || around(1_000_000, 100, 7);
        let stable = window(10_000, 50, around(1_000_000, 1000, 8));
        let v = judge(&JudgeConfig::default(), &stable, &window(1000, 60, fb()));
        assert!(
            matches!(&v, Verdict::Fail { reason, .. } if reason == "failures"),
            "6% vs 0.5%: {}",
            v.describe()
        );
        let v = judge(&JudgeConfig::default(), &stable, &window(1000, 8, fb()));
        assert!(
            matches!(v, Verdict::Pass { .. }),
            "0.8% vs 0.5%: {}",
            v.describe()
        );
    }

    #[test]
    fn few_samples_hold_and_a_collapse_fails_at_once() {
        let stable = window(1000, 0, around(1_000_000, 1000, 9));
        let v = judge(
            &JudgeConfig::default(),
            &stable,
            &window(20, 0, around(1_000_000, 20, 10)),
        );
        assert!(
            matches!(v, Verdict::InsufficientData { .. }),
            "{}",
            v.describe()
        );
        let v = judge(
            &JudgeConfig::default(),
            &stable,
            &window(20, 15, around(1_000_000, 5, 11)),
        );
        assert!(
            matches!(&v, Verdict::Fail { reason, .. } if reason == "hard-guard"),
            "{}",
            v.describe()
        );
    }
}

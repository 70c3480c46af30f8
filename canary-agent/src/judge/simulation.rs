//! Simulated rollouts: identical cohorts judged at every look stay under
//! the bound, and real regressions are found within a few looks.
//!
//! Each look adds a batch of connections: the cohort is drawn per
//! connection (as the data plane does with `cohort = "per-connection"`),
//! the connection fails with its cohort's probability, and a connection
//! that did not fail adds a first-byte time to its cohort's histogram,
//! binned like the kernel's. The window is cumulative, like the daemon's.

use canary_common::stats::{HIST_BUCKETS, hist_bucket};

use super::{CohortWindow, Finding, JudgeConfig, assess, failures, latency};

/// splitmix64: small, fast, good enough for simulations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One cohort's behaviour.
#[derive(Clone, Copy)]
struct Backend {
    /// Probability that a connection fails.
    failure: f64,
    /// Median first-byte time, nanoseconds.
    median_ns: f64,
}

/// First-byte times: log-normal-ish around the median (σ ≈ 0.3 in logs,
/// from a sum of three uniforms), and 1 % of samples 5× slower.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "positive times far below u64::MAX"
)]
fn first_byte(rng: &mut Rng, median_ns: f64) -> u64 {
    let z = (rng.unit() + rng.unit() + rng.unit() - 1.5) * 2.0;
    let tail = if rng.unit() < 0.01 { 5.0 } else { 1.0 };
    (median_ns * (0.3 * z).exp() * tail) as u64
}

fn empty() -> CohortWindow {
    CohortWindow {
        connections: 0,
        failures: 0,
        first_byte: Box::new([0; HIST_BUCKETS]),
    }
}

/// One simulated step window.
struct Rollout {
    rng: Rng,
    /// Share of connections drawn to canary.
    share: f64,
    stable: Backend,
    canary: Backend,
    /// Connections per look.
    per_look: u32,
    windows: [CohortWindow; 2],
}

impl Rollout {
    fn new(seed: u64, share: f64, stable: Backend, canary: Backend, per_look: u32) -> Rollout {
        Rollout {
            rng: Rng(seed),
            share,
            stable,
            canary,
            per_look,
            windows: [empty(), empty()],
        }
    }

    /// The traffic between two looks.
    fn step(&mut self) {
        for _ in 0..self.per_look {
            let to_canary = self.rng.unit() < self.share;
            let (backend, w) = if to_canary {
                (self.canary, &mut self.windows[1])
            } else {
                (self.stable, &mut self.windows[0])
            };
            w.connections += 1;
            if self.rng.unit() < backend.failure {
                w.failures += 1;
            } else {
                w.first_byte[hist_bucket(first_byte(&mut self.rng, backend.median_ns))] += 1;
            }
        }
    }

    /// Looks until the judge fails the canary (at most `max_looks`).
    fn looks_to_rollback(&mut self, cfg: &JudgeConfig, max_looks: u32) -> Option<(u32, Finding)> {
        (1..=max_looks).find_map(|look| {
            self.step();
            let finding = assess(cfg, &self.windows[0], &self.windows[1]).finding;
            matches!(finding, Finding::Failures | Finding::Latency | Finding::P99)
                .then_some((look, finding))
        })
    }
}

const STABLE: Backend = Backend {
    failure: 0.005,
    median_ns: 2e6,
};

/// What one identical rollout's judge saw.
struct Outcome {
    /// Largest `ln e` of the failure test over all looks.
    failures_max: f64,
    /// Largest `ln e` of the latency test.
    latency_max: f64,
    /// Whether the judge (default config) failed the canary at some look.
    rolled_back: bool,
    /// Looks judged.
    looks: u64,
    /// Looks where the evidence reached the bar and the full judge ran.
    compared: u64,
}

/// Rollout `r` of the identical-cohort simulation: 25 connections per
/// look, canary share 5, 20 or 50 %, every look judged.
fn identical_rollout(cfg: &JudgeConfig, r: u32, looks: u32) -> Outcome {
    let share = [0.05, 0.2, 0.5][r as usize % 3];
    let mut sim = Rollout::new(0x5eed_0000 + u64::from(r), share, STABLE, STABLE, 25);
    let mut o = Outcome {
        failures_max: f64::NEG_INFINITY,
        latency_max: f64::NEG_INFINITY,
        rolled_back: false,
        looks: 0,
        compared: 0,
    };
    for _ in 0..looks {
        sim.step();
        o.looks += 1;
        let [stable, canary] = &sim.windows;
        let f = failures::ln_e(stable, canary);
        let l = latency::ln_e(&canary.first_byte, &stable.first_byte);
        o.failures_max = o.failures_max.max(f);
        o.latency_max = o.latency_max.max(l);
        // The judge can only fail on evidence at its bar (the hard guard
        // needs 50 % failures): look closer only then.
        if f.max(l) >= cfg.ln_bar() {
            o.compared += 1;
            o.rolled_back |= matches!(
                assess(cfg, stable, canary).finding,
                Finding::Failures | Finding::Latency | Finding::P99 | Finding::HardGuard
            );
        }
    }
    o
}

/// Rollouts × looks with identical cohorts: the fraction of rollouts whose
/// evidence ever reaches `1/α` stays within `α`, for each test and several
/// `α`, at every look from the first (no `min_samples` hold). Also counts
/// the judge's actual rollbacks with the default configuration.
#[test]
fn identical_cohorts_judged_a_million_times_stay_under_alpha() {
    const ROLLOUTS: u32 = 1000;
    const LOOKS: u32 = 1000;
    const ALPHAS: [f64; 3] = [0.001, 0.01, 0.05];
    let cfg = JudgeConfig::default();
    // Two threads (the machine's cores), each a fixed half of the rollouts.
    let halves: Vec<Vec<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = [0..ROLLOUTS / 2, ROLLOUTS / 2..ROLLOUTS]
            .into_iter()
            .map(|range| {
                scope.spawn(move || range.map(|r| identical_rollout(&cfg, r, LOOKS)).collect())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    let outcomes: Vec<Outcome> = halves.into_iter().flatten().collect();
    let max_fail: Vec<f64> = outcomes.iter().map(|o| o.failures_max).collect();
    let max_lat: Vec<f64> = outcomes.iter().map(|o| o.latency_max).collect();
    let rolled_back = outcomes.iter().filter(|o| o.rolled_back).count();
    let looks: u64 = outcomes.iter().map(|o| o.looks).sum();
    let compared: u64 = outcomes.iter().map(|o| o.compared).sum();
    assert_eq!(looks, u64::from(ROLLOUTS) * u64::from(LOOKS));
    let n = f64::from(ROLLOUTS);
    eprintln!(
        "{ROLLOUTS} identical rollouts x {LOOKS} looks = {looks} looks (25 connections each, canary share 5/20/50 %):"
    );
    for alpha in ALPHAS {
        let bar = (1.0 / alpha).ln();
        let count = |m: &[f64]| m.iter().filter(|&&x| x >= bar).count();
        let (f, l) = (count(&max_fail), count(&max_lat));
        let either = max_fail
            .iter()
            .zip(&max_lat)
            .filter(|(f, l)| f.max(**l) >= bar)
            .count();
        // Binomial margin: 3 standard deviations above α (one-sided
        // normal approximation: exceeded with probability about 0.1 % if
        // the true rate were α itself), plus one rollout.
        let margin = 3.0 * (alpha * (1.0 - alpha) / n).sqrt() + 1.0 / n;
        eprintln!(
            "  alpha {alpha}: ever significant: failures {f} ({:.3} %), latency {l} ({:.3} %), \
             either {either}; allowed per test {:.3} %",
            f as f64 / n * 100.0,
            l as f64 / n * 100.0,
            (alpha + margin) * 100.0
        );
        for (test, c) in [("failures", f), ("latency", l)] {
            assert!(
                c as f64 / n <= alpha + margin,
                "{test}: {c} of {ROLLOUTS} identical rollouts reached 1/{alpha}"
            );
        }
    }
    eprintln!(
        "  rolled back by the judge (default config, alpha {} per test): {rolled_back} of {ROLLOUTS}",
        cfg.alpha
    );
    assert!(
        rolled_back as f64 / n <= 2.0 * cfg.alpha + 3.0 * (2.0 * cfg.alpha / n).sqrt() + 1.0 / n,
        "{rolled_back} of {ROLLOUTS} identical rollouts rolled back ({compared} looks compared)"
    );
}

/// A canary *better* than stable (fewer failures, faster first bytes) is
/// inside the null of both one-sided tests: its evidence stays under the
/// bound too (200 rollouts × 1000 looks).
#[test]
fn a_better_canary_gathers_no_evidence_against_it() {
    const ROLLOUTS: u32 = 200;
    const ALPHA: f64 = 0.05;
    let better = Backend {
        failure: 0.001,
        median_ns: 1.5e6,
    };
    let mut reached = 0u32;
    for r in 0..ROLLOUTS {
        let mut sim = Rollout::new(0xbe77_0000 + u64::from(r), 0.2, STABLE, better, 25);
        let mut max = f64::NEG_INFINITY;
        for _ in 0..1000 {
            sim.step();
            let [stable, canary] = &sim.windows;
            max = max
                .max(failures::ln_e(stable, canary))
                .max(latency::ln_e(&canary.first_byte, &stable.first_byte));
        }
        reached += u32::from(max >= (1.0 / ALPHA).ln());
    }
    eprintln!("better canary: evidence reached 1/{ALPHA} in {reached} of {ROLLOUTS} rollouts");
    // Two tests at ALPHA each, with a 3σ binomial margin (as above).
    let n = f64::from(ROLLOUTS);
    let bound = 2.0 * ALPHA + 3.0 * (2.0 * ALPHA * (1.0 - 2.0 * ALPHA) / n).sqrt();
    assert!(
        f64::from(reached) / n <= bound,
        "{reached} of {ROLLOUTS} better canaries gathered evidence 1/{ALPHA} against them"
    );
}

/// Looks to detect a regression over `runs` rollouts: (median, max), and
/// how many were found within `max_looks`.
fn detection(
    stable: Backend,
    canary: Backend,
    share: f64,
    per_look: u32,
    want: Finding,
) -> (u32, u32, u32) {
    const RUNS: u32 = 50;
    const MAX_LOOKS: u32 = 400;
    let cfg = JudgeConfig::default();
    let mut looks = Vec::new();
    for run in 0..RUNS {
        let mut sim = Rollout::new(0xbad_0000 + u64::from(run), share, stable, canary, per_look);
        match sim.looks_to_rollback(&cfg, MAX_LOOKS) {
            Some((n, finding)) => {
                assert_eq!(
                    finding, want,
                    "run {run} failed for another reason at look {n}"
                );
                looks.push(n);
            }
            None => panic!("run {run}: not detected in {MAX_LOOKS} looks"),
        }
    }
    looks.sort_unstable();
    let found = u32::try_from(looks.len()).unwrap_or(u32::MAX);
    (looks[looks.len() / 2], looks[looks.len() - 1], found)
}

/// The lab's rate: 500 connections/s judged every 250 ms.
const PER_LOOK: u32 = 125;

#[test]
fn a_canary_twice_as_slow_is_found_within_a_few_looks() {
    let slow = Backend {
        median_ns: 4e6,
        ..STABLE
    };
    let (median, max, found) = detection(STABLE, slow, 0.2, PER_LOOK, Finding::Latency);
    eprintln!(
        "2x slower first byte at 20 % canary, {PER_LOOK} connections per look: found in {found} of 50, \
         median {median} looks, max {max} ({:.2} s / {:.2} s at 4 looks/s)",
        f64::from(median) / 4.0,
        f64::from(max) / 4.0
    );
    // min_samples (50 canary) takes 2 looks at this rate; a few more.
    assert!(max <= 4, "slowest detection took {max} looks");
}

#[test]
fn a_canary_failing_2_percent_more_is_found_within_seconds() {
    for (stable_failure, within) in [(0.0, 24), (0.005, 100)] {
        let stable = Backend {
            failure: stable_failure,
            ..STABLE
        };
        let failing = Backend {
            failure: stable_failure + 0.02,
            ..STABLE
        };
        let (median, max, found) = detection(stable, failing, 0.5, PER_LOOK, Finding::Failures);
        eprintln!(
            "+2 % failures ({:.1} % vs {:.1} %) at 50 % canary, {PER_LOOK} connections per look: found in {found} of 50, \
             median {median} looks, max {max} ({:.2} s / {:.2} s at 4 looks/s)",
            stable.failure * 100.0,
            failing.failure * 100.0,
            f64::from(median) / 4.0,
            f64::from(max) / 4.0
        );
        assert!(
            max <= within,
            "slowest detection took {max} looks, expected at most {within}"
        );
    }
}

//! The one sequential test both checks use: is the canary over-represented
//! in group `a` compared with group `b` (failed against not failed; first
//! byte after a threshold against before it)?
//!
//! Each connection is drawn to canary at random, independently of
//! everything else. Given which group each connection falls in, its cohort
//! is then Bernoulli(`q_a`) in group `a` and Bernoulli(`q_b`) in group `b`,
//! and a canary no worse than stable is exactly `q_a ≤ q_b` (for failures:
//! `q_a = w·p_c / (w·p_c + (1 − w)·p_s)`, at most `w` iff `p_c ≤ p_s`). The
//! evidence against that null is the e-value
//!
//! ```text
//!         m(a_c, a_s) · m(b_c, b_s)
//!   E = ──────────────────────────────,   m(x, y) = B(x + ½, y + ½) / B(½, ½)
//!        sup_{q_a ≤ q_b} L(q_a, q_b)
//! ```
//!
//! where `a`, `b` are the two groups' (canary, stable) counts, `L` is the
//! likelihood of the cohorts seen, and `m` is the Krichevsky–Trofimov
//! (Jeffreys Beta(½, ½)) mixture of the Bernoulli likelihood. The
//! denominator is `L` at the groups' own shares when `a`'s is not the
//! larger (then `E ≤ 1`), else at the pooled share `w = n_c / n`. For
//! every `(q_a, q_b)` of the null, `E` is at most the mixture's likelihood
//! ratio against it, a nonnegative martingale with mean 1 over
//! connections, so by Ville's inequality `P(sup_t E_t ≥ 1/α) ≤ α`: the
//! probability that `E` *ever* reaches `1/α`, however often it is looked at
//! and whenever the looks stop, is at most `α` (Robbins 1970; a maximum-
//! likelihood denominator over a composite null as in Wasserman, Ramdas and
//! Balakrishnan 2020, "Universal inference", and Ramdas, Grünwald, Vovk and
//! Shafer 2023, "Game-theoretic statistics and safe anytime-valid
//! inference"). Both the numerator and the denominator depend on counts
//! only, so looking at cumulative counts in batches loses nothing.
//!
//! Validity needs nothing about the latencies or failures themselves (they
//! may be correlated in time, heavy-tailed, bursty): only that the cohort is
//! drawn at random per connection, which the data plane does, and that a
//! connection's group is known when it is counted.

use std::sync::LazyLock;

/// Counts below this come from a table; above it from Stirling's series.
const TABLE: usize = 4096;

/// `ln Γ(k + ½)` and `ln Γ(k + 1)` for `k < TABLE`, by the recurrence
/// `Γ(x + 1) = x Γ(x)` from `Γ(½) = √π` and `Γ(1) = 1`.
static LN_GAMMA: LazyLock<(Vec<f64>, Vec<f64>)> = LazyLock::new(|| {
    let mut half = Vec::with_capacity(TABLE);
    let mut whole = Vec::with_capacity(TABLE);
    let (mut h, mut w) = (0.5 * std::f64::consts::PI.ln(), 0.0);
    for k in 0..TABLE {
        half.push(h);
        whole.push(w);
        h += (k as f64 + 0.5).ln();
        w += (k as f64 + 1.0).ln();
    }
    (half, whole)
});

/// `ln Γ(x)` for `x ≥ 8` (Stirling's series; error below 1e-11).
fn stirling(x: f64) -> f64 {
    let r = 1.0 / x;
    let r2 = r * r;
    (x - 0.5) * x.ln() - x
        + 0.5 * (2.0 * std::f64::consts::PI).ln()
        + r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 / 1260.0))
}

/// `ln m(x, y)`: the log probability the Krichevsky–Trofimov mixture gives
/// to one sequence of `x` canary and `y` stable labels,
/// `ln Γ(x + ½) + ln Γ(y + ½) − ln Γ(x + y + 1) − ln π`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "indices are checked against TABLE first"
)]
pub(super) fn ln_mixture(x: u64, y: u64) -> f64 {
    let (half, whole) = &*LN_GAMMA;
    let limit = TABLE as u64;
    let ln_gamma_half = |k: u64| {
        if k < limit {
            half[k as usize]
        } else {
            stirling(k as f64 + 0.5)
        }
    };
    let n = x + y;
    let ln_factorial = if n < limit {
        whole[n as usize]
    } else {
        stirling(n as f64 + 1.0)
    };
    ln_gamma_half(x) + ln_gamma_half(y) - ln_factorial - std::f64::consts::PI.ln()
}

/// `x ln(x / n)`, with `0 ln 0 = 0`.
fn x_ln_share(x: u64, n: u64) -> f64 {
    if x == 0 {
        0.0
    } else {
        x as f64 * (x as f64 / n as f64).ln()
    }
}

/// Canary and stable counts of one group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Canary connections (or samples) in the group.
    pub canary: u64,
    /// Stable ones.
    pub stable: u64,
}

impl Split {
    /// Whether the canary's share here is larger than in `other` (never
    /// for an empty group).
    pub fn over_represented_against(self, other: Split) -> bool {
        // a_c / a_n > b_c / b_n without division: a_c·b_s > b_c·a_s.
        u128::from(self.canary) * u128::from(other.stable)
            > u128::from(other.canary) * u128::from(self.stable)
    }
}

/// `ln E` for the two groups `a` and `b` (see the module's documentation).
pub fn ln_e_value(a: Split, b: Split) -> f64 {
    ln_mixture(a.canary, a.stable) + ln_mixture(b.canary, b.stable) - ln_null(a, b)
}

/// `ln sup L` over the null `q_a ≤ q_b`.
pub(super) fn ln_null(a: Split, b: Split) -> f64 {
    if a.over_represented_against(b) {
        ln_pooled(a, b)
    } else {
        ln_own(a) + ln_own(b)
    }
}

/// `ln sup_w w^n_c (1 − w)^n_s` over both groups: `L` at the pooled share.
pub(super) fn ln_pooled(a: Split, b: Split) -> f64 {
    ln_own(Split {
        canary: a.canary + b.canary,
        stable: a.stable + b.stable,
    })
}

/// `ln` of one group's likelihood at its own share.
fn ln_own(g: Split) -> f64 {
    let n = g.canary + g.stable;
    x_ln_share(g.canary, n) + x_ln_share(g.stable, n)
}

/// Evidence of several tests of the same null, averaged with equal weights
/// fixed in advance: an average of e-processes is one, so `ln` of the mean
/// keeps the guarantee (a test that alone would need `1/α` needs `k/α`
/// among `k`).
#[derive(Clone, Copy, Debug)]
pub struct Average {
    /// Running `ln Σ e`.
    ln_sum: f64,
    /// Tests added.
    count: u64,
}

impl Average {
    /// No test yet.
    pub fn new() -> Average {
        Average {
            ln_sum: f64::NEG_INFINITY,
            count: 0,
        }
    }

    /// Adds `times` tests whose `ln e` is `ln_e`.
    pub fn add(&mut self, ln_e: f64, times: u64) {
        if times == 0 {
            return;
        }
        let term = ln_e + (times as f64).ln();
        let (hi, lo) = if term > self.ln_sum {
            (term, self.ln_sum)
        } else {
            (self.ln_sum, term)
        };
        self.ln_sum = hi + (lo - hi).exp().ln_1p();
        self.count += times;
    }

    /// `ln` of the average e-value (0, i.e. e = 1, with no test).
    pub fn ln_mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.ln_sum - (self.count as f64).ln()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln_gamma_half(k: u64) -> f64 {
        LN_GAMMA.0[usize::try_from(k).unwrap()]
    }

    fn ln_factorial(k: u64) -> f64 {
        LN_GAMMA.1[usize::try_from(k).unwrap()]
    }

    #[test]
    fn the_gamma_table_and_stirling_agree() {
        for k in [8u64, 100, 4095] {
            let (h, f) = (ln_gamma_half(k), ln_factorial(k));
            let (sh, sf) = (stirling(k as f64 + 0.5), stirling(k as f64 + 1.0));
            assert!(
                (h - sh).abs() < 1e-9 * sh.abs().max(1.0)
                    && (f - sf).abs() < 1e-9 * sf.abs().max(1.0),
                "k = {k}: table {h}, {f}; Stirling {sh}, {sf}"
            );
        }
        // ln 10! = 15.104412573075516
        assert!((ln_factorial(10) - 15.104_412_573_075_516).abs() < 1e-12);
    }

    #[test]
    fn the_mixture_is_a_probability_over_sequences() {
        // Σ over sequences of length 6 = Σ_x C(6, x) m(x, 6 - x) = 1.
        let total: f64 = (0..=6u64)
            .map(|x| {
                let binom = (ln_factorial(6) - ln_factorial(x) - ln_factorial(6 - x)).exp();
                binom * ln_mixture(x, 6 - x).exp()
            })
            .sum();
        assert!((total - 1.0).abs() < 1e-12, "sums to {total}");
    }

    #[test]
    fn evidence_is_one_sided() {
        // The canary is under-represented among failures: a canary that
        // fails less never gathers evidence against it.
        let better = ln_e_value(
            Split {
                canary: 0,
                stable: 20,
            },
            Split {
                canary: 1000,
                stable: 980,
            },
        );
        assert!(better <= 0.0, "ln e = {better}");
        let worse = ln_e_value(
            Split {
                canary: 20,
                stable: 0,
            },
            Split {
                canary: 980,
                stable: 1000,
            },
        );
        assert!(worse > 5.0, "ln e = {worse}");
    }

    #[test]
    fn balanced_groups_give_no_evidence_and_a_lopsided_one_much() {
        let even = ln_e_value(
            Split {
                canary: 10,
                stable: 40,
            },
            Split {
                canary: 200,
                stable: 800,
            },
        );
        assert!(even < 0.0, "ln e = {even}");
        let lopsided = ln_e_value(
            Split {
                canary: 20,
                stable: 0,
            },
            Split {
                canary: 980,
                stable: 1000,
            },
        );
        assert!(lopsided > 1000f64.ln(), "ln e = {lopsided}");
    }

    #[test]
    fn an_average_of_equal_values_is_that_value() {
        let mut avg = Average::new();
        avg.add(2.0, 3);
        avg.add(2.0, 1);
        assert!((avg.ln_mean() - 2.0).abs() < 1e-12, "{}", avg.ln_mean());
        let mut avg = Average::new();
        avg.add(0.0, 1);
        avg.add(10f64.ln(), 1);
        assert!((avg.ln_mean() - 5.5f64.ln()).abs() < 1e-12);
    }
}

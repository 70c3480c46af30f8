//! A service's `[service.rollout]`: the steps of its plan, the judgement
//! interval, and the judge's thresholds (`[service.rollout.judge]`).

use std::time::Duration;

use super::{
    ConfigError, MAX_COUNT, MAX_HOLD, MAX_RATIO, MAX_STEPS, Weight, WeightError,
    check::{duration_in, int_in, invalid, quoted, truncated},
    raw::RawRollout,
};

/// Whether a rollout step waits for an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Enter the step when the previous one passed.
    Auto,
    /// Wait in `awaiting-approval` for `canaryctl approve`.
    Manual,
}

/// One step of a rollout plan.
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    /// Canary weight during the step.
    pub weight: Weight,
    /// At least this long at the step…
    pub hold: Duration,
    /// …with at least this many canary connections judged, before the next.
    pub min_connections: u64,
    /// Whether entering the step waits for an operator.
    pub gate: Gate,
}

/// A plan-driven rollout: the judge compares canary with stable every
/// `interval`; a step passes after its hold with enough connections; the
/// last passed step promotes (100 %); a failing judgement rolls back (the
/// judge's `alpha` bounds false rollbacks over the whole rollout).
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutConfig {
    /// Steps, in order.
    pub steps: Vec<StepConfig>,
    /// Judgement interval.
    pub interval: Duration,
    /// The judge's thresholds.
    pub judge: crate::judge::JudgeConfig,
}

/// Validates the `[service.rollout]` plan of `section`.
pub(super) fn validate_rollout(
    section: &str,
    raw: RawRollout,
) -> Result<RolloutConfig, ConfigError> {
    if raw.steps.is_empty() {
        return Err(invalid(
            section,
            "rollout.steps",
            "[]",
            "a plan needs at least one step, e.g. { weight = \"5%\", hold = \"10m\" }",
        ));
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(invalid(
            section,
            "rollout.steps",
            format!("{} steps", raw.steps.len()),
            format!("at most {MAX_STEPS} steps"),
        ));
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    let mut last = 0u32;
    for (i, step) in raw.steps.into_iter().enumerate() {
        // Steps are numbered from 1 in messages, as people count them.
        let key = |field: &str| format!("rollout.steps[{}].{field}", i + 1);
        let weight: Weight = step.weight.parse().map_err(|e: WeightError| {
            invalid(section, key("weight"), quoted(&step.weight), e.to_string())
        })?;
        if weight.ppm() <= last {
            return Err(invalid(
                section,
                key("weight"),
                quoted(&step.weight),
                "weights must rise from step to step",
            ));
        }
        last = weight.ppm();
        let hold = match step.hold.as_deref() {
            None => Duration::ZERO,
            Some(text) => duration_in(
                section,
                key("hold"),
                text,
                (Duration::ZERO, MAX_HOLD),
                "10m",
            )?,
        };
        let gate = match step.gate.as_deref() {
            None | Some("auto") => Gate::Auto,
            Some("manual") => Gate::Manual,
            Some(other) => {
                return Err(invalid(
                    section,
                    key("gate"),
                    quoted(truncated(other, 60)),
                    "gate must be \"auto\" or \"manual\"",
                ));
            }
        };
        let min_connections = match step.min_connections {
            None => 0,
            Some(n) => int_in(section, key("min_connections"), n, 0, MAX_COUNT, "")?,
        };
        steps.push(StepConfig {
            weight,
            hold,
            min_connections,
            gate,
        });
    }
    let interval = match raw.interval.as_deref() {
        None => Duration::from_secs(1),
        Some(text) => duration_in(
            section,
            "rollout.interval",
            text,
            (Duration::from_millis(100), Duration::from_mins(10)),
            "1s",
        )?,
    };
    if let Some(n) = raw.fail_after {
        return Err(invalid(
            section,
            "rollout.fail_after",
            n,
            "removed: the judge's alpha now bounds false rollbacks over the whole rollout; \
             delete fail_after",
        ));
    }
    // The judge's evidence starts afresh at every step and at every manual
    // gate (the weight stays at the previous step's while it waits): alpha
    // is split among these windows. The first step's gate is ignored.
    let gates = steps
        .iter()
        .skip(1)
        .filter(|s| s.gate == Gate::Manual)
        .count();
    let mut judge = crate::judge::JudgeConfig {
        // At most 2 × MAX_STEPS.
        windows: u32::try_from(steps.len() + gates).unwrap_or(u32::MAX),
        ..crate::judge::JudgeConfig::default()
    };
    if let Some(j) = raw.judge {
        let ratio = |key: &'static str, text: Option<String>, into: &mut f64| {
            if let Some(text) = text {
                let w: Weight = text.parse().map_err(|e: WeightError| {
                    invalid(section, key, quoted(&text), e.to_string())
                })?;
                *into = f64::from(w.ppm()) / 1e6;
            }
            Ok::<(), ConfigError>(())
        };
        ratio(
            "rollout.judge.min_failure_increase",
            j.min_failure_increase,
            &mut judge.min_failure_increase,
        )?;
        ratio(
            "rollout.judge.hard_max_failure_ratio",
            j.hard_max_failure_ratio,
            &mut judge.hard_max_failure_ratio,
        )?;
        for (key, text, into) in [
            (
                "rollout.judge.min_latency_increase",
                j.min_latency_increase,
                &mut judge.min_latency_increase_ns,
            ),
            (
                "rollout.judge.min_p99_increase",
                j.min_p99_increase,
                &mut judge.min_p99_increase_ns,
            ),
        ] {
            if let Some(text) = text {
                let d = duration_in(
                    section,
                    key,
                    &text,
                    (Duration::ZERO, Duration::from_mins(1)),
                    "1ms",
                )?;
                // At most 6e10 ns: exact in an f64.
                *into = d.as_nanos() as f64;
            }
        }
        if let Some(n) = j.min_samples {
            judge.min_samples = int_in(section, "rollout.judge.min_samples", n, 1, MAX_COUNT, "")?;
        }
        if let Some(a) = j.alpha {
            // Also false for NaN.
            if !(a > 0.0 && a < 0.5) {
                return Err(invalid(
                    section,
                    "rollout.judge.alpha",
                    a,
                    "must be between 0 and 0.5 (both excluded), e.g. 0.001",
                ));
            }
            judge.alpha = a;
        }
        for (key, value, into) in [
            (
                "rollout.judge.min_latency_ratio",
                j.min_latency_ratio,
                &mut judge.min_latency_ratio,
            ),
            (
                "rollout.judge.max_p99_ratio",
                j.max_p99_ratio,
                &mut judge.max_p99_ratio,
            ),
        ] {
            if let Some(v) = value {
                // Also false for NaN and infinities.
                if !(1.0..=MAX_RATIO).contains(&v) {
                    return Err(invalid(
                        section,
                        key,
                        v,
                        format!("must be a ratio between 1.0 and {MAX_RATIO}, e.g. 1.2"),
                    ));
                }
                *into = v;
            }
        }
    }
    Ok(RolloutConfig {
        steps,
        interval,
        judge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{GOOD, error_text, parse};

    #[test]
    fn rollout_plans_parse_and_bad_ones_are_named() {
        let plan = GOOD.replace("weight = \"5%\"\n", "").replace(
            "never_canary = []",
            "never_canary = []\n[service.rollout]\nsteps = [\n  { weight = \"1%\", hold = \"10m\", min_connections = 100 },\n  \
             { weight = \"5%\", hold = \"1h\", gate = \"manual\" },\n]\n[service.rollout.judge]\nalpha = 0.001",
        );
        let c = parse(&plan).unwrap();
        let r = c.services[0].rollout.as_ref().expect("plan");
        assert_eq!(r.steps.len(), 2);
        assert_eq!(
            (
                r.steps[0].weight.ppm(),
                r.steps[0].hold,
                r.steps[0].min_connections
            ),
            (10_000, Duration::from_mins(10), 100)
        );
        assert_eq!(
            (r.steps[1].gate, r.steps[1].hold),
            (Gate::Manual, Duration::from_hours(1))
        );
        assert_eq!(
            (r.interval, r.judge.alpha, r.judge.windows),
            (Duration::from_secs(1), 0.001, 3),
            "alpha is split among two steps and the wait at the second one's manual gate"
        );

        let msg = error_text(&plan.replace(
            "weight = \"5%\", hold = \"1h\"",
            "weight = \"1%\", hold = \"1h\"",
        ));
        assert!(
            msg.contains(
                "service \"web\": rollout.steps[2].weight = \"1%\": weights must rise from step to step"
            ),
            "{msg}"
        );
        let msg = error_text(&plan.replace("gate = \"manual\"", "gate = \"maybe\""));
        assert!(
            msg.contains("rollout.steps[2].gate = \"maybe\": gate must be \"auto\" or \"manual\""),
            "{msg}"
        );
        let msg = error_text(&plan.replace(
            "cohort = \"sticky\"",
            "cohort = \"sticky\"\nweight = \"5%\"",
        ));
        assert!(
            msg.contains("a [service.rollout] plan sets the weight; remove weight or the plan"),
            "{msg}"
        );
        let msg =
            error_text(&plan.replace("[service.rollout]\n", "[service.rollout]\nfail_after = 2\n"));
        assert!(
            msg.contains(
                "service \"web\": rollout.fail_after = 2: removed: the judge's alpha now bounds \
                 false rollbacks over the whole rollout; delete fail_after"
            ),
            "{msg}"
        );
        let msg = error_text(&plan.replace("alpha = 0.001", "alpha = 2.0"));
        assert!(
            msg.contains("rollout.judge.alpha = 2: must be between 0 and 0.5"),
            "{msg}"
        );
    }
}

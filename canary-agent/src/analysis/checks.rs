//! The team's own checks: a PromQL template per check, rendered once for
//! each cohort, and its bounds applied to the two values.
//!
//! A check *passes* when every bound holds, *fails* when one does not, and
//! is *inconclusive* when a value is missing: no series, several series
//! (ambiguous: which one?), NaN or infinite, or Prometheus down, slow or
//! refusing the query. Inconclusive holds the step; it never passes it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::prometheus::{Endpoint, QueryError, Series, query};
use crate::config::{Bound, CheckConfig};

/// The variables a query may use, as `{{name}}`.
pub const TEMPLATE_VARIABLES: [&str; 5] = ["service", "cohort", "release", "node", "window"];

/// What a query's variables stand for, but the cohort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vars {
    /// `{{service}}`: the service's name.
    pub service: String,
    /// `{{release}}`: its release.
    pub release: String,
    /// `{{node}}`: this node (`[fleet] node`, else the host name).
    pub node: String,
    /// `{{window}}`: the time since the step began, at least
    /// `[analysis] min_window`.
    pub window: Duration,
}

/// Every kind of outcome, as `canary_check_evaluations_total{outcome}` names it.
pub const OUTCOMES: [&str; 3] = ["pass", "fail", "inconclusive"];

/// A check's result at one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "kebab-case")]
pub enum Outcome {
    /// Every bound holds.
    Pass(String),
    /// A bound does not hold: the canary is worse.
    Fail(String),
    /// A value is missing: hold, never pass.
    Inconclusive(String),
}

impl Outcome {
    /// The line with the check's name and numbers.
    pub fn detail(&self) -> &str {
        match self {
            Outcome::Pass(d) | Outcome::Fail(d) | Outcome::Inconclusive(d) => d,
        }
    }

    /// `pass`, `fail` or `inconclusive`: one of [`OUTCOMES`].
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Pass(_) => OUTCOMES[0],
            Outcome::Fail(_) => OUTCOMES[1],
            Outcome::Inconclusive(_) => OUTCOMES[2],
        }
    }
}

/// One check's outcome, and how many evaluations in a row (this one
/// included) were inconclusive.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutcome {
    /// The check's name.
    pub name: String,
    /// Its outcome now.
    pub outcome: Outcome,
    /// Inconclusive evaluations in a row, this one included (0 when it
    /// passed or failed).
    pub inconclusive_in_a_row: u32,
}

/// A PromQL duration of whole seconds, at least `1s` (`90s`).
pub fn promql_duration(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// `query` with its variables filled in for `cohort` (`stable` or
/// `canary`).
pub fn render(query: &str, vars: &Vars, cohort: &str) -> String {
    query
        .replace("{{service}}", &vars.service)
        .replace("{{cohort}}", cohort)
        .replace("{{release}}", &vars.release)
        .replace("{{node}}", &vars.node)
        .replace("{{window}}", &promql_duration(vars.window))
}

/// The one finite value of a query's answer, or why there is none.
pub fn single_value(answer: Result<Vec<Series>, QueryError>) -> Result<f64, String> {
    let series = answer.map_err(|e| crate::error_chain(&e))?;
    match series.as_slice() {
        [] => Err("no series (no data yet, or a label matches nothing)".into()),
        [one] if one.value.is_finite() => Ok(one.value),
        [one] => Err(format!(
            "the value is {} (no traffic in the window, or a division by zero)",
            one.value
        )),
        many => Err(format!(
            "{} series, so the value is ambiguous; aggregate the query to one (e.g. sum(…))",
            many.len()
        )),
    }
}

/// A number as verdicts show it: four significant digits.
pub fn show(v: f64) -> String {
    if v == 0.0 || (1e-3..1e6).contains(&v.abs()) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{v:.3e}")
    }
}

/// Applies `check`'s bounds to the canary's value and, if a bound is
/// relative, the stable one's.
pub fn evaluate(
    check: &CheckConfig,
    canary: Result<f64, String>,
    stable: Option<Result<f64, String>>,
) -> Outcome {
    let name = &check.name;
    let inconclusive = |cohort: &str, why: String| {
        Outcome::Inconclusive(format!("check {name:?}: inconclusive, {cohort}: {why}"))
    };
    let c = match canary {
        Ok(v) => v,
        Err(why) => return inconclusive("canary", why),
    };
    let s = match stable {
        Some(Ok(v)) => Some(v),
        Some(Err(why)) => return inconclusive("stable", why),
        None => None,
    };
    let values = match s {
        Some(s) => format!("canary {} vs stable {}", show(c), show(s)),
        None => format!("canary {}", show(c)),
    };
    for bound in &check.bounds {
        let limit = bound.limit();
        let holds = match (*bound, s) {
            (Bound::Max(_), _) => c <= limit,
            (Bound::Min(_), _) => c >= limit,
            (Bound::MaxIncrease(_), Some(s)) => c - s <= limit,
            // A stable value of 0: any positive canary value is an
            // infinite ratio (fails), 0 is no change (passes).
            (Bound::MaxRatio(_), Some(s)) if s.abs() < f64::MIN_POSITIVE => c <= 0.0,
            (Bound::MaxRatio(_), Some(s)) => c / s <= limit,
            // Relative bounds always get a stable value (see run()).
            (Bound::MaxIncrease(_) | Bound::MaxRatio(_), None) => true,
        };
        if !holds {
            return Outcome::Fail(format!(
                "check {name:?}: {values} ({} {})",
                bound.key(),
                show(limit)
            ));
        }
    }
    let bounds: Vec<String> = check
        .bounds
        .iter()
        .map(|b| format!("{} {}", b.key(), show(b.limit())))
        .collect();
    Outcome::Pass(format!(
        "check {name:?}: {values} (within {})",
        bounds.join(", ")
    ))
}

/// Evaluates one check: its canary (and, if a bound needs it, stable)
/// query, concurrently, each within `timeout`.
pub async fn run(
    endpoint: &Endpoint,
    timeout: Duration,
    check: &CheckConfig,
    vars: &Vars,
) -> Outcome {
    let (canary_q, stable_q) = (
        render(&check.query, vars, "canary"),
        render(&check.query, vars, "stable"),
    );
    let canary = query(endpoint, &canary_q, timeout);
    if check.needs_stable() {
        let stable = query(endpoint, &stable_q, timeout);
        let (c, s) = tokio::join!(canary, stable);
        evaluate(check, single_value(c), Some(single_value(s)))
    } else {
        evaluate(check, single_value(canary.await), None)
    }
}

/// Evaluates every check of a service, concurrently.
pub async fn run_all(
    endpoint: &Endpoint,
    timeout: Duration,
    checks: &[CheckConfig],
    vars: &Vars,
) -> Vec<(String, Outcome)> {
    let mut set = tokio::task::JoinSet::new();
    for (i, check) in checks.iter().enumerate() {
        let (endpoint, check, vars) = (endpoint.clone(), check.clone(), vars.clone());
        set.spawn(async move { (i, run(&endpoint, timeout, &check, &vars).await) });
    }
    let mut out: Vec<Option<Outcome>> = vec![None; checks.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, outcome)) = done {
            out[i] = Some(outcome);
        }
    }
    checks
        .iter()
        .zip(out)
        .map(|(c, o)| {
            let o = o.unwrap_or_else(|| {
                Outcome::Inconclusive(format!("check {:?}: inconclusive, its task failed", c.name))
            });
            (c.name.clone(), o)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bounds: Vec<Bound>) -> CheckConfig {
        CheckConfig {
            name: "http-5xx".into(),
            query: "q".into(),
            bounds,
            interval: None,
        }
    }

    #[test]
    fn templates_fill_every_variable_and_the_window_is_whole_seconds() {
        let vars = Vars {
            service: "web".into(),
            release: "v2".into(),
            node: "n1".into(),
            window: Duration::from_millis(90_700),
        };
        assert_eq!(
            render(
                r#"sum(rate(x{service="{{service}}",version="{{cohort}}",release="{{release}}",node="{{node}}"}[{{window}}]))"#,
                &vars,
                "canary"
            ),
            r#"sum(rate(x{service="web",version="canary",release="v2",node="n1"}[90s]))"#
        );
        assert_eq!(promql_duration(Duration::from_millis(200)), "1s");
    }

    #[test]
    fn a_relative_bound_fails_with_both_values_in_the_verdict() {
        let c = check(vec![Bound::MaxIncrease(0.01)]);
        let o = evaluate(&c, Ok(0.031), Some(Ok(0.002)));
        assert_eq!(
            o,
            Outcome::Fail(
                "check \"http-5xx\": canary 0.031 vs stable 0.002 (max_increase 0.01)".into()
            )
        );
        let o = evaluate(&c, Ok(0.011), Some(Ok(0.002)));
        assert!(matches!(o, Outcome::Pass(_)), "{o:?}");
        let r = check(vec![Bound::MaxRatio(1.5)]);
        assert!(matches!(
            evaluate(&r, Ok(2.0), Some(Ok(1.0))),
            Outcome::Fail(_)
        ));
        assert!(matches!(
            evaluate(&r, Ok(1.4), Some(Ok(1.0))),
            Outcome::Pass(_)
        ));
        assert!(matches!(
            evaluate(&r, Ok(0.1), Some(Ok(0.0))),
            Outcome::Fail(_)
        ));
        assert!(matches!(
            evaluate(&r, Ok(0.0), Some(Ok(0.0))),
            Outcome::Pass(_)
        ));
    }

    #[test]
    fn absolute_bounds_need_no_stable_value() {
        let c = check(vec![Bound::Max(0.5), Bound::Min(0.1)]);
        assert!(matches!(evaluate(&c, Ok(0.3), None), Outcome::Pass(_)));
        let o = evaluate(&c, Ok(0.05), None);
        assert_eq!(
            o,
            Outcome::Fail("check \"http-5xx\": canary 0.05 (min 0.1)".into())
        );
    }

    #[test]
    fn missing_nan_and_ambiguous_values_are_inconclusive_never_a_pass() {
        let c = check(vec![Bound::MaxIncrease(0.01)]);
        let series = |v: f64| Series {
            labels: std::collections::BTreeMap::new(),
            value: v,
        };
        for (answer, says) in [
            (Ok(vec![]), "no series"),
            (Ok(vec![series(f64::NAN)]), "the value is NaN"),
            (
                Ok(vec![series(1.0), series(2.0)]),
                "2 series, so the value is ambiguous",
            ),
            (
                Err(QueryError::Timeout(Duration::from_secs(2))),
                "did not answer within 2s",
            ),
        ] {
            let o = evaluate(&c, single_value(answer), Some(Ok(0.0)));
            assert!(
                matches!(&o, Outcome::Inconclusive(d) if d.contains(says)),
                "expected inconclusive saying {says:?}, got {o:?}"
            );
        }
        let o = evaluate(
            &c,
            Ok(0.0),
            Some(single_value(Ok(vec![series(f64::INFINITY)]))),
        );
        assert!(
            matches!(&o, Outcome::Inconclusive(d) if d.contains("stable: the value is inf")),
            "{o:?}"
        );
    }
}

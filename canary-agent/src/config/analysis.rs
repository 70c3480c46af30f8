//! `[analysis]` (where Prometheus answers, how long a query may take, how
//! many inconclusive evaluations in a row pause a rollout) and a service's
//! `[[service.rollout.checks]]` (the team's own PromQL checks) and
//! `[service.rollout] mode` (enforce or shadow).

use std::time::Duration;

use super::{
    ConfigError,
    check::{duration_in, int_in, invalid, length_in, quoted, shown, truncated},
    raw::{RawAnalysis, RawCheck},
};
use crate::analysis::{Endpoint, TEMPLATE_VARIABLES};

/// Default `[analysis] max_inconclusive`.
pub const DEFAULT_MAX_INCONCLUSIVE: u32 = 3;
/// Default `[analysis] query_timeout`.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `[analysis] min_window`.
pub const DEFAULT_MIN_WINDOW: Duration = Duration::from_mins(1);
/// Most checks per service.
pub const MAX_CHECKS: usize = 32;
/// Longest check query, in bytes.
pub const MAX_QUERY: usize = 4096;
/// Longest check name, in bytes.
pub const MAX_CHECK_NAME: usize = 64;

/// `[analysis]`: the Prometheus the agent asks for checks and fleet
/// evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnalysisConfig {
    /// `prometheus = "http://host:port[/prefix]"` (plain http).
    pub prometheus: Endpoint,
    /// One query's connect-to-last-byte limit; a slower answer is
    /// inconclusive.
    pub query_timeout: Duration,
    /// A check inconclusive this many evaluations in a row pauses the
    /// rollout (for every service: one Prometheus serves them all).
    pub max_inconclusive: u32,
    /// `{{window}}` is the time since the step began, but at least this:
    /// `rate()` needs two scrapes in its range.
    pub min_window: Duration,
}

/// Whether a service's rollout acts on its decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The decisions change the weight (the default).
    #[default]
    Enforce,
    /// Judge, checks and plan decide and report; the weight in force stays
    /// the configured `weight` and the kernel breaker only counts.
    Shadow,
}

impl Mode {
    /// As written in the config and shown by `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// One bound of a check, in the query's own unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// The canary's value must be at most this.
    Max(f64),
    /// The canary's value must be at least this.
    Min(f64),
    /// Canary − stable must be at most this.
    MaxIncrease(f64),
    /// Canary ÷ stable must be at most this.
    MaxRatio(f64),
}

impl Bound {
    /// The key that sets it.
    pub fn key(self) -> &'static str {
        match self {
            Bound::Max(_) => "max",
            Bound::Min(_) => "min",
            Bound::MaxIncrease(_) => "max_increase",
            Bound::MaxRatio(_) => "max_ratio",
        }
    }

    /// Its limit.
    pub fn limit(self) -> f64 {
        match self {
            Bound::Max(v) | Bound::Min(v) | Bound::MaxIncrease(v) | Bound::MaxRatio(v) => v,
        }
    }

    /// Whether it compares canary with stable (and so needs the stable
    /// value).
    pub fn relative(self) -> bool {
        matches!(self, Bound::MaxIncrease(_) | Bound::MaxRatio(_))
    }
}

/// One `[[service.rollout.checks]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckConfig {
    /// Its name, in verdicts.
    pub name: String,
    /// The PromQL template (`{{service}}`, `{{cohort}}`, `{{release}}`,
    /// `{{node}}`, `{{window}}`).
    pub query: String,
    /// At least one bound; every one must hold.
    pub bounds: Vec<Bound>,
    /// How often it is evaluated; `None`: the plan's `interval`.
    pub interval: Option<Duration>,
}

impl CheckConfig {
    /// Whether any bound needs the stable cohort's value.
    pub fn needs_stable(&self) -> bool {
        self.bounds.iter().any(|b| b.relative())
    }
}

/// Validates `[analysis]`.
pub(super) fn validate_analysis(raw: &RawAnalysis) -> Result<AnalysisConfig, ConfigError> {
    const S: &str = "[analysis]";
    length_in(S, "prometheus", &raw.prometheus, super::MAX_TEXT, "the URL")?;
    let prometheus = Endpoint::parse(&raw.prometheus).map_err(|e| {
        invalid(
            S,
            "prometheus",
            shown(&raw.prometheus),
            format!("{e}, e.g. \"http://127.0.0.1:9090\""),
        )
    })?;
    let query_timeout = match raw.query_timeout.as_deref() {
        None => DEFAULT_QUERY_TIMEOUT,
        Some(t) => duration_in(
            S,
            "query_timeout",
            t,
            (Duration::from_millis(10), Duration::from_mins(1)),
            "2s",
        )?,
    };
    let min_window = match raw.min_window.as_deref() {
        None => DEFAULT_MIN_WINDOW,
        Some(t) => duration_in(
            S,
            "min_window",
            t,
            (Duration::from_secs(1), Duration::from_hours(24)),
            "1m",
        )?,
    };
    let max_inconclusive = match raw.max_inconclusive {
        None => DEFAULT_MAX_INCONCLUSIVE,
        Some(n) => int_in(S, "max_inconclusive", n, 1, 100_000, " evaluations")?,
    };
    Ok(AnalysisConfig {
        prometheus,
        query_timeout,
        max_inconclusive,
        min_window,
    })
}

/// Validates a `[service.rollout] mode`.
pub(super) fn validate_mode(section: &str, raw: Option<&str>) -> Result<Mode, ConfigError> {
    match raw {
        None | Some("enforce") => Ok(Mode::Enforce),
        Some("shadow") => Ok(Mode::Shadow),
        Some(other) => Err(invalid(
            section,
            "rollout.mode",
            quoted(truncated(other, 60)),
            "mode must be \"enforce\" (decisions change the weight) or \"shadow\" \
             (decisions are reported, the weight stays)",
        )),
    }
}

/// Validates a service's `[[service.rollout.checks]]`.
pub(super) fn validate_checks(
    section: &str,
    raw: Vec<RawCheck>,
) -> Result<Vec<CheckConfig>, ConfigError> {
    if raw.len() > MAX_CHECKS {
        return Err(invalid(
            section,
            "rollout.checks",
            format!("{} checks", raw.len()),
            format!("at most {MAX_CHECKS} checks per service"),
        ));
    }
    let mut out: Vec<CheckConfig> = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("rollout.checks[{}].{field}", i + 1);
        length_in(section, &key("name"), &c.name, MAX_CHECK_NAME, "the name")?;
        if out.iter().any(|o| o.name == c.name) {
            return Err(invalid(
                section,
                key("name"),
                quoted(&c.name),
                "used by an earlier check of this service; names must be unique",
            ));
        }
        length_in(section, &key("query"), &c.query, MAX_QUERY, "the query")?;
        if let Err(problem) = check_template(&c.query) {
            return Err(invalid(section, key("query"), shown(&c.query), problem));
        }
        let mut bounds = Vec::new();
        for (field, value, make) in [
            ("max", c.max, Bound::Max as fn(f64) -> Bound),
            ("min", c.min, Bound::Min),
            ("max_increase", c.max_increase, Bound::MaxIncrease),
            ("max_ratio", c.max_ratio, Bound::MaxRatio),
        ] {
            let Some(v) = value else { continue };
            if !v.is_finite() {
                return Err(invalid(
                    section,
                    key(field),
                    v,
                    "must be a finite number in the query's own unit, e.g. 0.01",
                ));
            }
            if field == "max_ratio" && v <= 0.0 {
                return Err(invalid(
                    section,
                    key(field),
                    v,
                    "a ratio canary ÷ stable must be above 0, e.g. 1.5",
                ));
            }
            bounds.push(make(v));
        }
        if bounds.is_empty() {
            return Err(invalid(
                section,
                key("query"),
                shown(&c.query),
                "a check needs at least one bound: max or min (on the canary's value), \
                 max_increase (canary − stable) or max_ratio (canary ÷ stable)",
            ));
        }
        if let (Some(min), Some(max)) = (c.min, c.max)
            && min > max
        {
            return Err(invalid(
                section,
                key("min"),
                min,
                format!("is above max = {max}; no value could pass"),
            ));
        }
        if bounds.iter().any(|b| b.relative()) && !c.query.contains("{{cohort}}") {
            return Err(invalid(
                section,
                key("query"),
                shown(&c.query),
                "max_increase and max_ratio compare canary with stable, and the query has no \
                 {{cohort}}: both would be the same number; select the cohort with {{cohort}}",
            ));
        }
        let interval = c
            .interval
            .as_deref()
            .map(|t| {
                duration_in(
                    section,
                    key("interval"),
                    t,
                    (Duration::from_millis(100), Duration::from_mins(10)),
                    "10s",
                )
            })
            .transpose()?;
        out.push(CheckConfig {
            name: c.name,
            query: c.query,
            bounds,
            interval,
        });
    }
    Ok(out)
}

/// Every `{{…}}` in `query` names a known variable.
fn check_template(query: &str) -> Result<(), String> {
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err("a {{ is never closed with }}".into());
        };
        let name = after[..end].trim();
        if !TEMPLATE_VARIABLES.contains(&name) {
            return Err(format!(
                "unknown template variable {{{{{}}}}}; known: {}",
                truncated(name, 40),
                TEMPLATE_VARIABLES
                    .iter()
                    .map(|v| format!("{{{{{v}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if after[..end] != *name {
            return Err(format!(
                "write {{{{{name}}}}} without spaces inside the braces"
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{GOOD, error_text, parse};

    fn with_checks(checks: &str) -> String {
        let plan = GOOD.replace("weight = \"5%\"\n", "").replace(
            "never_canary = []",
            &format!(
                "never_canary = []\n[service.rollout]\nsteps = [{{ weight = \"1%\" }}]\n{checks}"
            ),
        );
        format!("{plan}\n[analysis]\nprometheus = \"http://127.0.0.1:9090/prom\"\n")
    }

    const CHECK: &str = r#"[[service.rollout.checks]]
name = "http-5xx"
query = 'sum(rate(http_requests_total{version="{{cohort}}",code="500"}[{{window}}]))'
max_increase = 0.01
"#;

    #[test]
    fn checks_and_analysis_parse_with_their_defaults() {
        let c = parse(&with_checks(CHECK)).unwrap();
        let a = c.analysis.expect("[analysis]");
        assert_eq!(a.prometheus.authority, "127.0.0.1:9090");
        assert_eq!(a.prometheus.prefix, "/prom");
        assert_eq!(
            (a.max_inconclusive, a.query_timeout, a.min_window),
            (3, Duration::from_secs(2), Duration::from_mins(1))
        );
        let svc = &c.services[0];
        assert_eq!(svc.checks.len(), 1);
        assert_eq!(svc.checks[0].bounds, vec![Bound::MaxIncrease(0.01)]);
        assert_eq!(svc.checks[0].interval, None);
        let c = parse(&with_checks(&format!("{CHECK}interval = \"15s\"\n"))).unwrap();
        assert_eq!(
            c.services[0].checks[0].interval,
            Some(Duration::from_secs(15))
        );
        assert_eq!(svc.mode, Mode::Enforce);
    }

    #[test]
    fn bad_checks_are_named_with_the_fix() {
        let msg = error_text(&with_checks(&CHECK.replace("{{window}}", "{{windw}}")));
        assert!(
            msg.contains("rollout.checks[1].query")
                && msg.contains("unknown template variable {{windw}}; known: {{service}}"),
            "{msg}"
        );
        let msg = error_text(&with_checks(
            &CHECK.replace("max_increase = 0.01", "note = 1"),
        ));
        assert!(msg.contains("unknown field `note`"), "{msg}");
        let msg = error_text(&with_checks(&CHECK.replace("max_increase = 0.01\n", "")));
        assert!(msg.contains("a check needs at least one bound"), "{msg}");
        let msg = error_text(&with_checks(
            &CHECK.replace("max_increase = 0.01", "max_ratio = -1.0"),
        ));
        assert!(
            msg.contains(
                "rollout.checks[1].max_ratio = -1: a ratio canary ÷ stable must be above 0"
            ),
            "{msg}"
        );
        let msg = error_text(&with_checks(
            &CHECK.replace("max_increase = 0.01", "max = nan"),
        ));
        assert!(
            msg.contains("rollout.checks[1].max = NaN: must be a finite number"),
            "{msg}"
        );
        let msg = error_text(&with_checks(&CHECK.replace("{{cohort}}", "canary")));
        assert!(msg.contains("the query has no {{cohort}}"), "{msg}");
        let msg = error_text(&with_checks(CHECK).replace(
            "[analysis]\nprometheus = \"http://127.0.0.1:9090/prom\"\n",
            "",
        ));
        assert!(
            msg.contains("rollout.checks") && msg.contains("add [analysis] prometheus"),
            "{msg}"
        );
        let msg =
            error_text(&with_checks(CHECK).replace("http://127.0.0.1:9090/prom", "https://p"));
        assert!(
            msg.contains("[analysis]: prometheus = \"https://p\": https is not supported"),
            "{msg}"
        );
    }

    #[test]
    fn shadow_mode_keeps_the_configured_weight_beside_a_plan() {
        let text = with_checks("mode = \"shadow\"\n").replace(
            "cohort = \"sticky\"",
            "cohort = \"sticky\"\nweight = \"10%\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.services[0].mode, Mode::Shadow);
        assert_eq!(c.services[0].weight.ppm(), 100_000);
        let msg = error_text(&with_checks("mode = \"shadow\"\n"));
        assert!(
            msg.contains("shadow mode keeps the configured weight"),
            "{msg}"
        );
        let msg = error_text(&with_checks("mode = \"dry\"\n"));
        assert!(
            msg.contains("rollout.mode = \"dry\": mode must be \"enforce\""),
            "{msg}"
        );
    }
}

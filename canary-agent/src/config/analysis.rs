//! `[analysis]` (where Prometheus answers, how long a query may take, how
//! many inconclusive evaluations in a row pause a rollout) and a service's
//! `[[service.rollout.checks]]` (the team's own PromQL checks) and
//! `[service.rollout] mode` (enforce or shadow).

use std::{path::PathBuf, time::Duration};

use super::{
    ConfigError,
    check::{duration_in, int_in, invalid, length_in, quoted, shown, truncated},
    raw::{RawAnalysis, RawCheck},
};
use crate::{
    analysis::{Endpoint, TEMPLATE_VARIABLES},
    outbound::Auth,
};

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
    /// `prometheus = "http[s]://host:port[/prefix]"`, with its `ca` and
    /// credentials.
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
    let prometheus = validate_endpoint(raw)?;
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

/// Validates `[analysis] prometheus` and how the agent reaches it: `ca`
/// (https only; default: the system's bundle), and either `username` with
/// `password_file` or `bearer_token_file`. Files are read now, so
/// `--check` finds a missing one; secrets are read again at each query.
fn validate_endpoint(raw: &RawAnalysis) -> Result<Endpoint, ConfigError> {
    const S: &str = "[analysis]";
    let file = |key: &str, p: &Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
        let Some(p) = p else { return Ok(None) };
        let text = p.to_string_lossy();
        length_in(S, key, &text, super::MAX_TEXT, "the path")?;
        if !p.is_absolute() {
            return Err(invalid(S, key, quoted(&text), "must be an absolute path"));
        }
        Ok(Some(p.clone()))
    };
    let https = raw.prometheus.starts_with("https://");
    let ca = file("ca", &raw.ca)?;
    if let (Some(ca), false) = (&ca, https) {
        return Err(invalid(
            S,
            "ca",
            quoted(&ca.to_string_lossy()),
            "a CA with an http:// URL; use an https:// URL or remove ca",
        ));
    }
    let password_file = file("password_file", &raw.password_file)?;
    let token_file = file("bearer_token_file", &raw.bearer_token_file)?;
    let auth = match (&raw.username, password_file, token_file) {
        (None, None, None) => None,
        (Some(user), Some(password_file), None) => {
            length_in(S, "username", user, 256, "the user name")?;
            if user.is_empty() || user.contains(':') || !user.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    S,
                    "username",
                    shown(user),
                    "printable ASCII without ':' or spaces",
                ));
            }
            Some(Auth::Basic {
                username: user.clone(),
                password_file,
            })
        }
        (None, None, Some(token_file)) => Some(Auth::Bearer { token_file }),
        (Some(_), None, None) => {
            return Err(invalid(
                S,
                "password_file",
                "(unset)".to_string(),
                "username needs password_file = \"/path/to/password\" (basic authentication)",
            ));
        }
        (None, Some(p), None) => {
            return Err(invalid(
                S,
                "username",
                "(unset)".to_string(),
                format!(
                    "password_file = {} needs a username",
                    quoted(&p.to_string_lossy())
                ),
            ));
        }
        (_, _, Some(t)) => {
            return Err(invalid(
                S,
                "bearer_token_file",
                quoted(&t.to_string_lossy()),
                "either bearer_token_file or username with password_file, not both",
            ));
        }
    };
    if let Some(a) = &auth {
        let key = match a {
            Auth::Basic { .. } => "password_file",
            Auth::Bearer { .. } => "bearer_token_file",
        };
        a.header()
            .map_err(|e| invalid(S, key, "(read now)".to_string(), e))?;
        if !https {
            warn_plain_credentials();
        }
    }
    let bad_url = |e: String| {
        invalid(
            S,
            "prometheus",
            shown(&raw.prometheus),
            format!("{e}, e.g. \"http://127.0.0.1:9090\""),
        )
    };
    crate::outbound::Url::parse(&raw.prometheus).map_err(bad_url)?;
    let ca_shown = ca.as_ref().map(|c| quoted(&c.to_string_lossy()));
    Endpoint::new(&raw.prometheus, ca, auth).map_err(|e| match ca_shown {
        // The URL parsed: the TLS setup failed, on the CA file or the
        // system's bundle.
        Some(shown_ca) => invalid(S, "ca", shown_ca, e),
        None if https => invalid(S, "ca", "(unset)".to_string(), e),
        None => bad_url(e),
    })
}

/// Credentials over plain http are allowed (a loopback or in-cluster
/// Prometheus), but said.
fn warn_plain_credentials() {
    tracing::warn!(
        "[analysis]: credentials go to Prometheus over plain http; use an https:// URL off the host"
    );
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
        assert_eq!(a.prometheus.url.authority, "127.0.0.1:9090");
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
        let msg = error_text(&with_checks(CHECK).replace("http://127.0.0.1:9090/prom", "ftp://p"));
        assert!(
            msg.contains(
                "[analysis]: prometheus = \"ftp://p\": must start with http:// or https://"
            ),
            "{msg}"
        );
    }

    #[test]
    fn tls_and_credentials_are_checked_when_the_config_is_read() {
        let dir = std::env::temp_dir().join(format!("canary-analysis-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let with = |url: &str, keys: &str| {
            with_checks(CHECK).replace(
                "prometheus = \"http://127.0.0.1:9090/prom\"\n",
                &format!("prometheus = \"{url}\"\n{keys}"),
            )
        };
        let s = secret.display();
        // Good: https with the system's bundle and basic auth; a bearer
        // token over http.
        let c = parse(&with(
            "https://prom.example:9090",
            &format!("username = \"canary\"\npassword_file = \"{s}\"\n"),
        ))
        .unwrap();
        let p = c.analysis.unwrap().prometheus;
        assert!(p.url.tls && matches!(p.auth, Some(Auth::Basic { .. })));
        let c = parse(&with(
            "http://127.0.0.1:9090",
            &format!("bearer_token_file = \"{s}\"\n"),
        ))
        .unwrap();
        assert!(matches!(
            c.analysis.unwrap().prometheus.auth,
            Some(Auth::Bearer { .. })
        ));
        for (url, keys, want) in [
            (
                "http://p:9090",
                format!("ca = \"{}\"\n", junk.display()),
                "[analysis]: ca = ".to_string()
                    + "\""
                    + &junk.display().to_string()
                    + "\": a CA with an http:// URL",
            ),
            (
                "https://p:9090",
                format!("ca = \"{}\"\n", junk.display()),
                format!(
                    "[analysis]: ca = \"{}\": {} holds no certificate",
                    junk.display(),
                    junk.display()
                ),
            ),
            (
                "https://p:9090",
                "ca = \"relative.pem\"\n".to_string(),
                "[analysis]: ca = \"relative.pem\": must be an absolute path".to_string(),
            ),
            (
                "https://p:9090",
                "username = \"canary\"\n".to_string(),
                "[analysis]: password_file = (unset): username needs password_file".to_string(),
            ),
            (
                "https://p:9090",
                format!("password_file = \"{s}\"\n"),
                "[analysis]: username = (unset): password_file = ".to_string(),
            ),
            (
                "https://p:9090",
                format!("username = \"a:b\"\npassword_file = \"{s}\"\n"),
                "[analysis]: username = \"a:b\": printable ASCII without ':'".to_string(),
            ),
            (
                "https://p:9090",
                format!("username = \"u\"\npassword_file = \"{s}\"\nbearer_token_file = \"{s}\"\n"),
                "either bearer_token_file or username with password_file, not both".to_string(),
            ),
            (
                "https://p:9090",
                format!(
                    "bearer_token_file = \"{}\"\n",
                    dir.join("missing").display()
                ),
                "[analysis]: bearer_token_file = (read now): cannot read".to_string(),
            ),
            (
                "https://u:pw@p:9090",
                String::new(),
                "[analysis]: prometheus = \"https://u:pw@p:9090\": must not carry credentials"
                    .to_string(),
            ),
        ] {
            let msg = error_text(&with(url, &keys));
            assert!(
                msg.contains(&want),
                "{url} {keys}: want {want:?}, got {msg}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
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

//! A service's `[service.breaker]`: when the data plane cuts the canary
//! off by itself, with no agent in the loop.

use std::time::Duration;

use super::{
    ConfigError, DEFAULT_BREAKER_FAILURE_RATIO, DEFAULT_BREAKER_MIN_FAILURES,
    DEFAULT_BREAKER_WINDOW, Weight, WeightError,
    check::{duration_in, int_in, invalid, quoted},
    raw::RawBreaker,
};

/// The line-rate breaker of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Off: the data plane never cuts the canary off by itself.
    pub enabled: bool,
    /// Canary failures in one window that trip it…
    pub min_failures: u16,
    /// …if they are also at least this share of the window's canary
    /// connection attempts.
    pub failure_ratio: Weight,
    /// Window length.
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            min_failures: DEFAULT_BREAKER_MIN_FAILURES,
            failure_ratio: DEFAULT_BREAKER_FAILURE_RATIO
                .parse()
                .unwrap_or(Weight::from_ppm_clamped(500_000)),
            window: DEFAULT_BREAKER_WINDOW,
        }
    }
}

/// Validates a `[service.breaker]` of `section`; absent, the defaults.
pub(super) fn validate_breaker(
    section: &str,
    raw: Option<RawBreaker>,
) -> Result<BreakerConfig, ConfigError> {
    let mut b = BreakerConfig::default();
    let Some(raw) = raw else { return Ok(b) };
    if let Some(enabled) = raw.enabled {
        b.enabled = enabled;
    }
    if let Some(n) = raw.min_failures {
        if n < 1 {
            return Err(invalid(
                section,
                "breaker.min_failures",
                n,
                "must be at least 1; to turn the breaker off set breaker.enabled = false",
            ));
        }
        // The data plane counts in 16 bits.
        b.min_failures = int_in(
            section,
            "breaker.min_failures",
            n,
            1,
            u16::MAX.into(),
            " failures",
        )?;
    }
    if let Some(text) = raw.failure_ratio {
        b.failure_ratio = text.parse().map_err(|e: WeightError| {
            invalid(
                section,
                "breaker.failure_ratio",
                quoted(&text),
                e.to_string(),
            )
        })?;
    }
    if let Some(text) = raw.window {
        b.window = duration_in(
            section,
            "breaker.window",
            &text,
            (Duration::from_millis(10), Duration::from_mins(1)),
            "1s",
        )?;
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{GOOD, error_text, parse};

    #[test]
    fn the_breaker_is_on_by_default_and_configurable() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.services[0].breaker, BreakerConfig::default());
        assert!(c.services[0].breaker.enabled);
        let c = parse(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nmin_failures = 10\nfailure_ratio = \"20%\"\nwindow = \"250ms\"",
        ))
        .unwrap();
        let b = c.services[0].breaker;
        assert_eq!(
            (b.min_failures, b.failure_ratio.ppm(), b.window),
            (10, 200_000, Duration::from_millis(250))
        );
        let msg = error_text(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nmin_failures = 0",
        ));
        assert!(
            msg.contains("service \"web\": breaker.min_failures = 0: must be at least 1"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nwindow = \"1h\"",
        ));
        assert!(
            msg.contains("breaker.window = \"1h\": must be a duration between 10ms and 60s"),
            "{msg}"
        );
        let msg = error_text(&GOOD.replace(
            "never_canary = []",
            "never_canary = []\n[service.breaker]\nlimit = 3",
        ));
        assert!(msg.contains("unknown field `limit`"), "{msg}");
    }
}

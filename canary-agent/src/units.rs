//! Units that operators write by hand, in the config file and on the
//! control socket: canary weights (`"5%"`, `"0.25%"`, `"2500ppm"`) and
//! durations (`"500ms"`, `"3s"`, `"10m"`, `"1h"`, `"30d"`).
//!
//! Kept apart from `config` and `control` so that both can use them
//! without importing each other.

use std::{fmt, str::FromStr, time::Duration};

use canary_common::cohort::PPM;
use serde::{Deserialize, Serialize};

/// A canary share in parts per million, written `"5%"`, `"0.25%"` or
/// `"2500ppm"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Weight(u32);

impl Weight {
    /// The weight in parts per million (`0..=1_000_000`).
    pub const fn ppm(self) -> u32 {
        self.0
    }

    /// A weight from parts per million, if in range.
    pub const fn from_ppm(ppm: u32) -> Option<Weight> {
        if ppm <= PPM { Some(Weight(ppm)) } else { None }
    }

    /// Parses a weight an operator passed as an argument; the error quotes
    /// it (`weight "150%": more than 100%; …`), as the control protocol
    /// answers it.
    pub fn parse_argument(text: &str) -> Result<Weight, String> {
        text.parse().map_err(|e| format!("weight {text:?}: {e}"))
    }

    /// A weight from parts per million, at most 100 %.
    pub const fn from_ppm_clamped(ppm: u32) -> Weight {
        if ppm <= PPM { Weight(ppm) } else { Weight(PPM) }
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Exact: 1 ppm = 0.0001 %.
        let whole = self.0 / 10_000;
        let frac = self.0 % 10_000;
        if frac == 0 {
            write!(f, "{whole}%")
        } else {
            let frac = format!("{frac:04}");
            write!(f, "{whole}.{}%", frac.trim_end_matches('0'))
        }
    }
}

/// Why a weight string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0}; write a percentage or parts per million between 0 and 100%, \
     e.g. \"5%\", \"0.25%\" or \"2500ppm\""
)]
pub struct WeightError(&'static str);

impl FromStr for Weight {
    type Err = WeightError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let ppm = if let Some(n) = s.strip_suffix("ppm") {
            let n = n.trim();
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(WeightError("ppm takes a whole number"));
            }
            n.parse::<u64>()
                .map_err(|_| WeightError("the number is too large"))?
        } else if let Some(p) = s.strip_suffix('%') {
            parse_percent_as_ppm(p.trim())?
        } else {
            return Err(WeightError("missing unit (% or ppm)"));
        };
        u32::try_from(ppm)
            .ok()
            .and_then(Weight::from_ppm)
            .ok_or(WeightError("more than 100%"))
    }
}

/// "12.3456" → 123456 ppm; at most four decimals (1 ppm resolution).
fn parse_percent_as_ppm(p: &str) -> Result<u64, WeightError> {
    let (whole, frac) = p.split_once('.').unwrap_or((p, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) {
        return Err(WeightError("not a number"));
    }
    if p.ends_with('.') {
        return Err(WeightError("not a number"));
    }
    if frac.len() > 4 {
        return Err(WeightError("finer than 0.0001% (1 ppm)"));
    }
    if whole.len() > 3 {
        return Err(WeightError("more than 100%"));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| WeightError("not a number"))?
    };
    let frac_ppm: u64 = format!("{frac:0<4}")
        .parse()
        .map_err(|_| WeightError("not a number"))?;
    Ok(whole * 10_000 + frac_ppm)
}

/// On the wire a weight is the string an operator would write, so the
/// control protocol carries `"weight":"5%"`.
impl Serialize for Weight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Weight::parse_argument(&text).map_err(serde::de::Error::custom)
    }
}

/// "500ms", "3s", "1.5m", "2h", "30d" → seconds: finite and not negative,
/// but not range-checked (the caller knows the range and the key to name).
/// Kept a float so that "1e20s" can be refused before it is converted.
pub fn duration_secs(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, seconds) = if let Some(n) = text.strip_suffix("ms") {
        // Divided, not multiplied by 1e-3: "100ms" is then exactly the
        // float of 0.1 s, so range bounds hold exactly.
        (n, (|v: f64| v / 1000.0) as fn(f64) -> f64)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, (|v| v) as fn(f64) -> f64)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, (|v| v * 60.0) as fn(f64) -> f64)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, (|v| v * 3600.0) as fn(f64) -> f64)
    } else if let Some(n) = text.strip_suffix('d') {
        (n, (|v| v * 86_400.0) as fn(f64) -> f64)
    } else {
        return None;
    };
    let value: f64 = number.trim().parse().ok()?;
    // NaN and infinities parse as f64 but are no durations.
    (value.is_finite() && value >= 0.0).then(|| seconds(value))
}

/// A duration as written in messages, in the largest unit that shows it
/// exactly: "100ms", "120s", "10m", "30d".
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 && ms >= 3_600_000 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 && ms >= 600_000 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_in_percent_and_ppm() {
        for (text, ppm) in [
            ("5%", 50_000),
            ("0.25%", 2_500),
            ("2500ppm", 2_500),
            ("100%", 1_000_000),
            ("0%", 0),
            ("0.0001%", 1),
            (" 12.5 % ", 125_000),
            ("1000000ppm", 1_000_000),
        ] {
            assert_eq!(
                text.parse::<Weight>().map(Weight::ppm),
                Ok(ppm),
                "weight {text:?}"
            );
        }
    }

    #[test]
    fn weights_out_of_range_or_malformed_are_rejected() {
        for (text, why) in [
            ("101%", "more than 100%"),
            ("1000001ppm", "more than 100%"),
            ("99999999999ppm", "more than 100%"),
            ("-1%", "not a number"),
            ("5", "missing unit"),
            ("0.00001%", "finer than 0.0001%"),
            ("abc%", "not a number"),
            ("1.5ppm", "whole number"),
            ("%", "not a number"),
            ("5.%", "not a number"),
        ] {
            let err = text.parse::<Weight>().expect_err(text).to_string();
            assert!(
                err.contains(why),
                "weight {text:?}: expected {why:?} in {err:?}"
            );
            assert!(
                err.contains("\"2500ppm\""),
                "weight {text:?}: error lacks the fix: {err:?}"
            );
        }
    }

    #[test]
    fn weights_display_exactly() {
        for ppm in [0, 1, 2_500, 50_000, 123_456, 1_000_000] {
            let w = Weight::from_ppm(ppm).unwrap();
            assert_eq!(
                w.to_string().parse::<Weight>(),
                Ok(w),
                "round trip of {ppm} ppm via {w}"
            );
        }
        assert_eq!(Weight(2_500).to_string(), "0.25%");
        assert_eq!(Weight::from_ppm_clamped(2_000_000), Weight(PPM));
    }

    #[test]
    fn weights_travel_as_the_string_an_operator_writes() {
        let w: Weight = "0.25%".parse().unwrap();
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"0.25%\"");
        assert_eq!(serde_json::from_str::<Weight>("\"2500ppm\"").unwrap(), w);
        let err = serde_json::from_str::<Weight>("\"150%\"").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("weight \"150%\": more than 100%"),
            "{err}"
        );
    }

    #[test]
    fn durations_parse_in_every_unit_and_refuse_non_numbers() {
        for (text, secs) in [
            ("100ms", 0.1),
            ("3s", 3.0),
            (" 1.5m ", 90.0),
            ("2h", 7200.0),
            ("30d", 2_592_000.0),
        ] {
            assert_eq!(duration_secs(text), Some(secs), "{text:?}");
        }
        for text in ["3", "NaNs", "infs", "-1s", "3 minutes", "s", ""] {
            assert_eq!(duration_secs(text), None, "{text:?}");
        }
        assert_eq!(
            [100, 120_000, 600_000, 2_592_000_000, 0]
                .map(|ms| show_duration(Duration::from_millis(ms))),
            ["100ms", "120s", "10m", "30d", "0s"]
        );
    }
}

//! The checks every section validates with: errors that name the section,
//! the key, the value and the fix, and range checks done before any
//! conversion can wrap, truncate or panic.

use std::{fmt, time::Duration};

use super::ConfigError;
use crate::units::{duration_secs, show_duration};

/// The error for `key = value` in `section`, with what is wrong and the fix.
pub(super) fn invalid(
    section: &str,
    key: impl Into<String>,
    value: impl fmt::Display,
    problem: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        section: section.to_string(),
        key: key.into(),
        value: value.to_string(),
        problem: problem.into(),
    }
}

/// A string value as written in the file.
pub(super) fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// `value` if it lies in `min..=max`, converted; otherwise an error naming
/// the key and the range. Checked on the i64 TOML gives us, before any
/// conversion can wrap or truncate.
pub(super) fn int_in<T: TryFrom<i64>>(
    section: &str,
    key: impl Into<String>,
    value: i64,
    min: i64,
    max: i64,
    unit: &str,
) -> Result<T, ConfigError> {
    let key = key.into();
    let out_of_range = || {
        invalid(
            section,
            key.clone(),
            value,
            format!("must be between {min} and {max}{unit}"),
        )
    };
    if !(min..=max).contains(&value) {
        return Err(out_of_range());
    }
    T::try_from(value).map_err(|_| out_of_range())
}

/// A duration key: parsed, then checked against `min..=max` while still a
/// float, so "1e20s" or "1e308d" is an error naming the key, not a panic in
/// `Duration::from_secs_f64`.
pub(super) fn duration_in(
    section: &str,
    key: impl Into<String>,
    text: &str,
    (min, max): (Duration, Duration),
    example: &str,
) -> Result<Duration, ConfigError> {
    let key = key.into();
    let range = format!("between {} and {}", show_duration(min), show_duration(max));
    let Some(secs) = duration_secs(text) else {
        return Err(invalid(
            section,
            key,
            quoted(text),
            format!("not a duration; write it like \"{example}\" ({range})"),
        ));
    };
    let out_of_range = || {
        invalid(
            section,
            key.clone(),
            quoted(text),
            format!("must be a duration {range}, e.g. \"{example}\""),
        )
    };
    if secs < min.as_secs_f64() || secs > max.as_secs_f64() {
        return Err(out_of_range());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| out_of_range())
}

/// A string key's length in bytes, bounded.
pub(super) fn length_in(
    section: &str,
    key: &str,
    text: &str,
    max: usize,
    what: &str,
) -> Result<(), ConfigError> {
    if text.is_empty() {
        return Err(invalid(
            section,
            key,
            quoted(text),
            format!("{what} is empty"),
        ));
    }
    if text.len() > max {
        return Err(invalid(
            section,
            key,
            shown(text),
            format!("{what} is {} bytes long; at most {max}", text.len()),
        ));
    }
    Ok(())
}

/// `text` quoted, cut to 40 characters and an ellipsis if longer: a huge
/// value would drown the message.
pub(super) fn shown(text: &str) -> String {
    let short = truncated(text, 40);
    if short.len() < text.len() {
        format!("{}…", quoted(short))
    } else {
        quoted(text)
    }
}

/// The first `n` characters of `text`, for quoting a huge value.
pub(super) fn truncated(text: &str, n: usize) -> &str {
    match text.char_indices().nth(n) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

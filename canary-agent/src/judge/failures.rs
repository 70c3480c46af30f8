//! Failures: is a connection's cohort independent of whether it failed?

use super::{
    CohortWindow,
    evidence::{Split, ln_e_value},
};

/// `ln` of the e-value against "canary connections fail no more often than
/// stable ones", from the window's connection and failure counts. A
/// connection counts as not failed until it fails: exact for refusals and
/// resets (known within a round trip of the count), approximate for
/// handshake timeouts (known `handshake_timeout` later).
pub fn ln_e(stable: &CohortWindow, canary: &CohortWindow) -> f64 {
    // Failures of connections counted before the window (a handshake
    // timeout comes seconds after its SYN) can outnumber the window's
    // connections in its first moments.
    let failed = Split {
        canary: canary.failures.min(canary.connections),
        stable: stable.failures.min(stable.connections),
    };
    let fine = Split {
        canary: canary.connections - failed.canary,
        stable: stable.connections - failed.stable,
    };
    ln_e_value(failed, fine)
}

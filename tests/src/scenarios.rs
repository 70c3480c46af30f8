//! Reaction-time scenarios shared by the tests (which assert on them) and
//! `cargo xtask bench` (which reports them over several runs).

use std::{
    io::ErrorKind,
    net::SocketAddrV4,
    path::Path,
    time::{Duration, Instant},
};

use canary_lab::Lab;
use serde_json::Value;

use crate::load::{Attempt, CANARY_PREFIX, join_timed, spawn_timed};

/// `canaryctl status SERVICE --json` through the socket `sock`: the
/// service's entry.
pub fn status(sock: &Path, service: &str) -> Value {
    let out = crate::canaryctl_ok(sock, &["status", service, "--json"]);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v["services"][0].clone()
}

/// What the breaker scenario saw.
#[derive(Debug)]
pub struct BreakerRun {
    /// Every connection attempt, in start order.
    pub attempts: Vec<Attempt>,
    /// Client connections the dead canary failed.
    pub failed: usize,
    /// Failures of any other kind (there should be none).
    pub other_errors: Vec<Attempt>,
    /// Connections that reached the canary after it was stopped.
    pub canary_after: usize,
    /// From the first failed connection to the last one steered to the
    /// canary.
    pub cutoff: Duration,
    /// Connections per second achieved.
    pub rate: f64,
}

/// The breaker scenario: 1000 new connections/s to `vip` for 4 s with the
/// canary (backend 1) stopped after 1.5 s. The agent must already steer
/// `vip`.
pub fn breaker_cutoff(lab: &mut Lab, vip: SocketAddrV4) -> BreakerRun {
    let handles = spawn_timed(lab, vip, lab.client_addrs(), 4000, 1000.0);
    std::thread::sleep(Duration::from_millis(1500));
    let stopped_at = Instant::now();
    lab.stop_backend(1); // the canary process dies: its port refuses
    let attempts = join_timed(handles);

    // Refused by the dead port; reset (connections still queued in the
    // dying listener's backlog get a RST when it closes); or closed without
    // a reply (accepted just as the process stopped).
    let canary_failure = |a: &&Attempt| {
        matches!(
            a.result,
            Err(ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::UnexpectedEof)
        )
    };
    let failed: Vec<&Attempt> = attempts.iter().filter(canary_failure).collect();
    let other_errors = attempts
        .iter()
        .filter(|a| a.result.is_err() && !canary_failure(a))
        .cloned()
        .collect();
    let canary_after = attempts
        .iter()
        .filter(|a| {
            a.start > stopped_at
                && a.result
                    .as_ref()
                    .is_ok_and(|n| n.starts_with(CANARY_PREFIX))
        })
        .count();
    let first_failure = failed.iter().map(|a| a.end).min();
    let last_steered = failed.iter().map(|a| a.start).max();
    let cutoff = match (first_failure, last_steered) {
        (Some(first), Some(last)) => last.saturating_duration_since(first),
        _ => Duration::ZERO,
    };
    let elapsed = attempts
        .last()
        .map_or(Duration::ZERO, |l| l.start - attempts[0].start);
    let rate = attempts.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    let failed = failed.len();
    BreakerRun {
        attempts,
        failed,
        other_errors,
        canary_after,
        cutoff,
        rate,
    }
}

/// What the judge scenario saw.
#[derive(Debug)]
pub struct JudgeRun {
    /// From the start of traffic to the rollback, if it happened in 10 s.
    pub detected: Option<Duration>,
    /// Connections per second achieved.
    pub rate: f64,
    /// The judge's last verdict.
    pub verdict: String,
}

/// The judge scenario: `rate` new connections/s to the service `web` at
/// `vip` (agent control socket `sock`), whose canary is worse (slower, or
/// failing more); polls the rollout state every 50 ms for up to 10 s.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "10 s of a rate of a few hundred per second"
)]
pub fn judge_detection(lab: &Lab, sock: &Path, vip: SocketAddrV4, rate: f64) -> JudgeRun {
    let t0 = Instant::now();
    let load = spawn_timed(lab, vip, lab.client_addrs(), (rate * 10.0) as usize, rate);
    let mut detected = None;
    while t0.elapsed() < Duration::from_secs(10) {
        if status(sock, "web")["state"] == "rolled-back" {
            detected = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let attempts = join_timed(load);
    let rate =
        attempts.len() as f64 / (attempts.last().unwrap().start - attempts[0].start).as_secs_f64();
    let verdict = status(sock, "web")["last_verdict"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    JudgeRun {
        detected,
        rate,
        verdict,
    }
}

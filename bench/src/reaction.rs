//! Reaction times of the breaker and the judge, in the rollout tests'
//! scenarios (`canary_tests::scenarios`), each run in a fresh lab.

use std::time::Duration;

use anyhow::{Context, ensure};
use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::scenarios::{breaker_cutoff, judge_detection};
use serde::Serialize;

use crate::sample::median;

const VIP: &str = "10.96.0.10:80";

/// Breaker and judge, per run and summarised.
#[derive(Clone, Debug, Serialize)]
pub struct Reactions {
    /// Breaker cut-off per run, ms: first failed client connection to the
    /// last connection steered to the dead canary (1000 conn/s, 20 %).
    pub breaker_cutoff_ms: Vec<f64>,
    /// Failed client connections per breaker run.
    pub breaker_failed: Vec<usize>,
    /// Judge: start of traffic to rollback per run, s (canary 4 ms against
    /// 2 ms to first byte, 500 conn/s, 20 %, judged every 250 ms); NaN if not within 10 s.
    pub judge_detect_s: Vec<f64>,
}

impl Reactions {
    /// Median breaker cut-off, ms.
    pub fn breaker_median_ms(&self) -> f64 {
        median(&mut self.breaker_cutoff_ms.clone())
    }

    /// Median judge detection, s.
    pub fn judge_median_s(&self) -> f64 {
        median(&mut self.judge_detect_s.clone())
    }
}

fn lab(stable: Behavior, canary: Behavior) -> Lab {
    canary_tests::lab(&[("stable-1", stable), ("canary-1", canary)], 32)
}

/// The service at 20 % canary: by `weight`, or by `plan` if given.
fn config(lab: &Lab, plan: Option<&str>) -> String {
    let weight = match plan {
        Some(plan) => plan.to_string(),
        None => "weight = \"20%\"\n".to_string(),
    };
    format!(
        "[agent]\ninterfaces = [\"{}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\ncanary = [\"{}\"]\ncohort = \"per-connection\"\n{weight}",
        Lab::ROUTER_CLIENT_IFACE,
        lab.backend_addr(0),
        lab.backend_addr(1),
    )
}

/// `breakers` breaker runs and `judges` judge runs.
pub fn measure(breakers: usize, judges: usize) -> anyhow::Result<Reactions> {
    let mut r = Reactions {
        breaker_cutoff_ms: Vec::new(),
        breaker_failed: Vec::new(),
        judge_detect_s: Vec::new(),
    };
    for i in 0..breakers {
        let mut lab = lab(Behavior::Reply, Behavior::Reply);
        let agent = AgentProcess::start(lab.router(), &config(&lab, None), false)?;
        let run = breaker_cutoff(&mut lab, VIP.parse()?);
        ensure!(
            run.other_errors.is_empty() && run.canary_after == 0 && run.failed > 0,
            "breaker run {i}: {} other errors, {} connections to the dead canary, {} failed",
            run.other_errors.len(),
            run.canary_after,
            run.failed
        );
        eprintln!(
            "bench: breaker run {i}: cut-off {:.2} ms, {} failed connections at {:.0} conn/s",
            run.cutoff.as_secs_f64() * 1e3,
            run.failed,
            run.rate
        );
        r.breaker_cutoff_ms.push(run.cutoff.as_secs_f64() * 1e3);
        r.breaker_failed.push(run.failed);
        drop(agent);
    }
    for i in 0..judges {
        let lab = lab(
            Behavior::FirstByteDelay(Duration::from_millis(2)),
            Behavior::FirstByteDelay(Duration::from_millis(4)),
        );
        let plan = "[service.rollout]\ninterval = \"250ms\"\nsteps = [{ weight = \"20%\", hold = \"1h\" }]\n";
        let agent = AgentProcess::start(lab.router(), &config(&lab, Some(plan)), false)
            .context("agent for the judge run")?;
        let run = judge_detection(&lab, &agent.control_socket(), VIP.parse()?, 500.0);
        eprintln!(
            "bench: judge run {i}: {:?} at {:.0} conn/s; {}",
            run.detected, run.rate, run.verdict
        );
        r.judge_detect_s
            .push(run.detected.map_or(f64::NAN, |d| d.as_secs_f64()));
        drop(agent);
    }
    Ok(r)
}

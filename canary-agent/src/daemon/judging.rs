//! The judge's clock: which plan-driven services are due, the window each
//! is judged on, and the judgement fed to the engine.

use std::time::Duration;

use canary_common::service::Cohort;
use tracing::warn;

use super::Agent;
use crate::{
    config::ServiceConfig,
    error_chain,
    judge::{CohortWindow, judge},
    rollout::{
        ServiceState,
        engine::{Event, Judgement},
    },
    telemetry::ServiceSnapshot,
};

/// What the judge compares for one service: counts since the step began.
pub(super) struct StepWindow {
    /// When the step (or the agent's watch of it) began.
    pub(super) started: std::time::Instant,
    /// The service's counters and histograms then.
    pub(super) base: ServiceSnapshot,
    /// When the next judgement is due.
    pub(super) due: std::time::Instant,
}

/// What one cohort did between `base` and `now`.
pub(super) fn cohort_window(
    base: &ServiceSnapshot,
    now: &ServiceSnapshot,
    cohort: Cohort,
) -> CohortWindow {
    let (b, n) = (base.cohort_counters(cohort), now.cohort_counters(cohort));
    let failures = |s: &ServiceSnapshot| s.failed_connections(cohort);
    let mut first_byte = Box::new([0u64; canary_common::stats::HIST_BUCKETS]);
    if let Some(h) = &now.histograms[usize::from(cohort)] {
        let old = base.histograms[usize::from(cohort)].as_ref();
        for (i, slot) in first_byte.iter_mut().enumerate() {
            *slot = h.first_byte_ns.buckets[i]
                .saturating_sub(old.map_or(0, |o| o.first_byte_ns.buckets[i]));
        }
    }
    CohortWindow {
        connections: n.connections.saturating_sub(b.connections),
        failures: failures(now).saturating_sub(failures(base)),
        first_byte,
    }
}

impl Agent {
    /// Judges every plan-driven service whose interval is up, and moves its
    /// rollout on, back, or not at all.
    pub(super) fn judge_due(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<ServiceConfig> = self
            .config
            .services
            .iter()
            .filter(|s| s.rollout.is_some())
            .filter(|s| {
                matches!(
                    self.rollouts.get(&s.name).map(|r| &r.state),
                    Some(
                        ServiceState::Progressing { .. }
                            | ServiceState::AwaitingApproval { .. }
                            | ServiceState::Paused { .. }
                    )
                )
            })
            .filter(|s| self.windows.get(&s.name).is_none_or(|w| w.due <= now))
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        let snapshot = match self
            .dp
            .snapshot_where(|name| due.iter().any(|s| s.name == name))
        {
            Ok(s) => s,
            Err(e) => return warn!(error = %error_chain(&e), "judge: cannot read the data plane"),
        };
        for svc in due {
            let Some(plan) = svc.rollout.as_ref() else {
                continue;
            };
            let Some(current) = snapshot.service(&svc.name) else {
                continue;
            };
            // A step's hold counts from when the step began, as persisted, so
            // an agent restart does not start it over. The judge's sample
            // window does start anew: the counts at the step's start were
            // not kept.
            let step_age = match self.rollouts.get(&svc.name).map(|r| &r.state) {
                Some(ServiceState::Progressing { since_unix, .. }) => {
                    Duration::from_secs(crate::rollout::now_unix().saturating_sub(*since_unix))
                }
                _ => Duration::ZERO,
            };
            let window = self
                .windows
                .entry(svc.name.clone())
                .or_insert_with(|| StepWindow {
                    started: now.checked_sub(step_age).unwrap_or(now),
                    base: current.clone(),
                    due: now,
                });
            window.due = now + plan.interval;
            let stable = cohort_window(&window.base, current, Cohort::Stable);
            let canary = cohort_window(&window.base, current, Cohort::Canary);
            let judgement = Judgement {
                verdict: judge(&plan.judge, &stable, &canary),
                held: window.started.elapsed(),
                canary_connections: canary.connections,
                // In a fleet the leader moves plans on (fleet.rs); the
                // latest checks must have passed (analysis.rs).
                may_advance: self.fleet.is_none() && self.checks_passed(&svc),
            };
            if let Some(link) = self.fleet.as_mut() {
                let fails = matches!(judgement.verdict, crate::judge::Verdict::Fail { .. });
                link.judge_fails.insert(svc.name.clone(), fails);
            }
            self.dp
                .stats_source()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .count_judgement(&svc.name, judgement.verdict.kind());
            if let Err(e) = self.feed(&svc.name, Event::Judged(judgement)) {
                warn!(service = %svc.name, error = %e, "the judge's decision was not carried out");
            }
        }
    }
}

//! The judge's clock: which plan-driven services are due, the window each
//! is judged on, and the judgement fed to the engine.

use std::time::Duration;

use canary_common::service::Cohort;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

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
    /// The service's totals when the window began.
    pub(super) base: WindowBase,
    /// When the next judgement is due.
    pub(super) due: std::time::Instant,
}

/// One service's totals, cohort by cohort, at the start of
/// a judge window: what the kernel had counted since the data plane began.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct WindowBase {
    stable: CohortTotals,
    canary: CohortTotals,
}

/// One cohort's totals (the saved form of a [`CohortWindow`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CohortTotals {
    connections: u64,
    failures: u64,
    /// First-byte histogram counts, `HIST_BUCKETS` of them.
    first_byte: Vec<u64>,
}

impl CohortTotals {
    fn of(snapshot: &ServiceSnapshot, cohort: Cohort) -> CohortTotals {
        CohortTotals {
            connections: snapshot.cohort_counters(cohort).connections,
            failures: snapshot.failed_connections(cohort),
            first_byte: snapshot.histograms[usize::from(cohort)]
                .as_ref()
                .map_or_else(
                    || vec![0; canary_common::stats::HIST_BUCKETS],
                    |h| h.first_byte_ns.buckets.to_vec(),
                ),
        }
    }

    /// Whether every count of `later` is at least this one's: the kernel
    /// went on counting from here (its counters never go down unless the
    /// data plane was made anew or a backend, and its counts, went).
    fn continued_by(&self, later: &CohortTotals) -> bool {
        self.connections <= later.connections
            && self.failures <= later.failures
            && self.first_byte.len() == later.first_byte.len()
            && self
                .first_byte
                .iter()
                .zip(&later.first_byte)
                .all(|(a, b)| a <= b)
    }
}

impl WindowBase {
    /// The totals in `snapshot`.
    pub(super) fn of(snapshot: &ServiceSnapshot) -> WindowBase {
        WindowBase {
            stable: CohortTotals::of(snapshot, Cohort::Stable),
            canary: CohortTotals::of(snapshot, Cohort::Canary),
        }
    }

    fn cohort(&self, cohort: Cohort) -> &CohortTotals {
        match cohort {
            Cohort::Stable => &self.stable,
            Cohort::Canary => &self.canary,
        }
    }

    /// Whether `later`'s totals continue these (see
    /// [`CohortTotals::continued_by`]).
    fn continued_by(&self, later: &WindowBase) -> bool {
        self.stable.continued_by(&later.stable) && self.canary.continued_by(&later.canary)
    }
}

/// A judge window as saved in `<state_dir>/<service>.window.json`: its
/// base, and the rollout it belongs to, so a restarted agent goes on with
/// the same evidence (the kernel's counters carried over) instead of
/// starting the window anew, which would spend the window's share of
/// `alpha` again.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SavedWindow {
    release: String,
    state: ServiceState,
    base: WindowBase,
}

/// What one cohort did between `base` and `now`.
pub(super) fn cohort_window(
    base: &WindowBase,
    now: &ServiceSnapshot,
    cohort: Cohort,
) -> CohortWindow {
    let (b, n) = (base.cohort(cohort), CohortTotals::of(now, cohort));
    let mut first_byte = Box::new([0u64; canary_common::stats::HIST_BUCKETS]);
    for (i, slot) in first_byte.iter_mut().enumerate() {
        let was = b.first_byte.get(i).copied().unwrap_or(0);
        *slot = n.first_byte[i].saturating_sub(was);
    }
    CohortWindow {
        connections: n.connections.saturating_sub(b.connections),
        failures: n.failures.saturating_sub(b.failures),
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
            // an agent restart does not start it over; nor does the judge's
            // window (see open_window).
            let step_age = match self.rollouts.get(&svc.name).map(|r| &r.state) {
                Some(ServiceState::Progressing { since_unix, .. }) => {
                    Duration::from_secs(crate::rollout::now_unix().saturating_sub(*since_unix))
                }
                _ => Duration::ZERO,
            };
            if !self.windows.contains_key(&svc.name) {
                let base = self.open_window(&svc, current);
                self.windows.insert(
                    svc.name.clone(),
                    StepWindow {
                        started: now.checked_sub(step_age).unwrap_or(now),
                        base,
                        due: now,
                    },
                );
            }
            let Some(window) = self.windows.get_mut(&svc.name) else {
                continue;
            };
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

    /// The base of a new judge window for `svc` at `current`: the saved one
    /// if it belongs to this rollout state and the kernel's counters went
    /// on from it (the agent restarted within the window), else `current`,
    /// saved for the next agent.
    fn open_window(&self, svc: &ServiceConfig, current: &ServiceSnapshot) -> WindowBase {
        let fresh = WindowBase::of(current);
        let Some(state) = self.rollouts.get(&svc.name).map(|r| r.state.clone()) else {
            return fresh;
        };
        match self.store.load_window::<SavedWindow>(&svc.name) {
            Ok(Some(saved)) if saved.release == svc.release && saved.state == state => {
                if saved.base.continued_by(&fresh) {
                    info!(service = %svc.name, "judge: going on with the window's evidence from before the restart (the kernel's counts carried over)");
                    return saved.base;
                }
                warn!(service = %svc.name, "judge: the saved window's counts are above the kernel's (the data plane or a backend's counters are new): the window starts anew");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(service = %svc.name, error = %error_chain(&e), "judge: the saved window is not usable; the window starts anew");
            }
        }
        let saved = SavedWindow {
            release: svc.release.clone(),
            state,
            base: fresh.clone(),
        };
        if let Err(e) = self.store.save_window(&svc.name, &saved) {
            warn!(service = %svc.name, error = %error_chain(&e), "judge: cannot save the window: a restart would start it anew");
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::{CohortTotals, WindowBase};

    fn totals(connections: u64, failures: u64, bucket: u64) -> CohortTotals {
        let mut first_byte = vec![0; canary_common::stats::HIST_BUCKETS];
        first_byte[3] = bucket;
        CohortTotals {
            connections,
            failures,
            first_byte,
        }
    }

    #[test]
    fn a_saved_base_is_kept_only_while_every_count_went_on_from_it() {
        let base = WindowBase {
            stable: totals(10, 1, 5),
            canary: totals(4, 0, 2),
        };
        let later = |s: CohortTotals, c: CohortTotals| WindowBase {
            stable: s,
            canary: c,
        };
        assert!(base.continued_by(&base));
        assert!(base.continued_by(&later(totals(20, 1, 9), totals(4, 3, 2))));
        // Any count lower: the data plane or a backend's counters are new.
        assert!(!base.continued_by(&later(totals(9, 1, 9), totals(4, 3, 2))));
        assert!(!base.continued_by(&later(totals(20, 0, 9), totals(4, 3, 2))));
        assert!(!base.continued_by(&later(totals(20, 1, 9), totals(4, 3, 1))));
        let mut short = totals(20, 1, 9);
        short.first_byte.pop();
        assert!(
            !base.continued_by(&later(short, totals(4, 3, 2))),
            "another histogram layout"
        );
    }
}

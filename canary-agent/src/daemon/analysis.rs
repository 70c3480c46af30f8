//! Evidence from Prometheus, off the main loop: the team's checks of each
//! plan-driven service and, on the fleet's leader, the fleet's summed
//! counts. Due evaluations are spawned as tasks (a query may take up to
//! `[analysis] query_timeout`); their results come back through a channel
//! into the loop, which feeds them to the engine.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Agent;
use crate::{
    analysis::{
        CheckOutcome, Outcome,
        checks::{Vars, run_all},
    },
    config::{CheckConfig, ServiceConfig},
    judge::Verdict,
    rollout::{
        ServiceState,
        engine::{CheckRound, Event},
    },
};

/// An evaluation finished.
#[derive(Debug)]
pub(super) enum Done {
    /// A service's checks, evaluated while it was in `state`.
    Checks {
        service: String,
        state: ServiceState,
        outcomes: Vec<(String, Outcome)>,
    },
    /// The fleet's evidence on a service's step `state`.
    Fleet {
        service: String,
        state: ServiceState,
        verdict: Verdict,
    },
}

/// A service's checks between evaluations.
#[derive(Debug, Default)]
pub(super) struct ServiceChecks {
    /// When each check's next evaluation is due (by name; absent: now).
    due: BTreeMap<String, Instant>,
    /// An evaluation is running.
    in_flight: bool,
    /// The latest outcome of each check evaluated at the current step, in
    /// config order (empty until the step's first evaluation is back).
    pub(super) latest: Vec<CheckOutcome>,
}

/// The leader's latest look at the fleet's evidence on a service's step.
#[derive(Debug, Default)]
pub(super) struct FleetLook {
    due: Option<Instant>,
    in_flight: bool,
    /// The step it was about, and the verdict.
    latest: Option<(ServiceState, Verdict)>,
}

/// The daemon's side of the analysis.
#[derive(Debug)]
pub(super) struct Analysis {
    tx: mpsc::Sender<Done>,
    /// Per service.
    pub(super) checks: BTreeMap<String, ServiceChecks>,
    /// Per service (on the leader).
    fleet: BTreeMap<String, FleetLook>,
}

impl Analysis {
    pub(super) fn new(tx: mpsc::Sender<Done>) -> Analysis {
        Analysis {
            tx,
            checks: BTreeMap::new(),
            fleet: BTreeMap::new(),
        }
    }

    /// A new step (or none): the checks start over.
    pub(super) fn restart(&mut self, service: &str) {
        self.checks.remove(service);
    }
}

/// Whether the plan's state is one the checks guard.
fn guarded(state: Option<&ServiceState>) -> bool {
    matches!(
        state,
        Some(
            ServiceState::Progressing { .. }
                | ServiceState::AwaitingApproval { .. }
                | ServiceState::Paused { .. }
        )
    )
}

impl Agent {
    /// Starts the evaluation of every service whose checks are due (and not
    /// still running).
    pub(super) fn checks_due(&mut self) {
        let Some(ac) = self.config.analysis.clone() else {
            return;
        };
        let now = Instant::now();
        for svc in &self.config.services {
            let Some(plan) = svc.rollout.as_ref() else {
                continue;
            };
            let state = self.rollouts.get(&svc.name).map(|r| &r.state);
            if svc.checks.is_empty() || !guarded(state) {
                continue;
            }
            let state = state.cloned().unwrap_or(ServiceState::IDLE);
            let entry = self.analysis.checks.entry(svc.name.clone()).or_default();
            if entry.in_flight {
                continue;
            }
            // Each check at its own interval, else the plan's.
            let checks: Vec<CheckConfig> = svc
                .checks
                .iter()
                .filter(|c| entry.due.get(&c.name).is_none_or(|d| *d <= now))
                .cloned()
                .collect();
            if checks.is_empty() {
                continue;
            }
            for c in &checks {
                entry
                    .due
                    .insert(c.name.clone(), now + c.interval.unwrap_or(plan.interval));
            }
            entry.in_flight = true;
            let age = self
                .windows
                .get(&svc.name)
                .map_or(Duration::ZERO, |w| w.started.elapsed());
            let vars = Vars {
                service: svc.name.clone(),
                release: svc.release.clone(),
                node: self.node.clone(),
                window: age.max(ac.min_window),
            };
            let (tx, service) = (self.analysis.tx.clone(), svc.name.clone());
            let (endpoint, timeout) = (ac.prometheus.clone(), ac.query_timeout);
            tokio::spawn(async move {
                let outcomes = run_all(&endpoint, timeout, &checks, &vars).await;
                let _ = tx
                    .send(Done::Checks {
                        service,
                        state,
                        outcomes,
                    })
                    .await;
            });
        }
    }

    /// An evaluation came back.
    pub(super) fn analysis_done(&mut self, done: Done) {
        match done {
            Done::Checks {
                service,
                state,
                outcomes,
            } => self.checks_done(&service, &state, outcomes),
            Done::Fleet {
                service,
                state,
                verdict,
            } => {
                let look = self.analysis.fleet.entry(service).or_default();
                look.in_flight = false;
                look.latest = Some((state, verdict));
            }
        }
    }

    fn checks_done(
        &mut self,
        service: &str,
        state: &ServiceState,
        outcomes: Vec<(String, Outcome)>,
    ) {
        let Some(ac) = self.config.analysis.as_ref() else {
            return;
        };
        let max_inconclusive = ac.max_inconclusive;
        let current = self.rollouts.get(service).map(|r| &r.state);
        let Some(entry) = self.analysis.checks.get_mut(service) else {
            // The step changed meanwhile: stale.
            return;
        };
        entry.in_flight = false;
        if current != Some(state) {
            entry.latest.clear();
            return;
        }
        let latest: Vec<CheckOutcome> = outcomes
            .into_iter()
            .map(|(name, outcome)| {
                let before = entry
                    .latest
                    .iter()
                    .find(|o| o.name == name)
                    .map_or(0, |o| o.inconclusive_in_a_row);
                let inconclusive_in_a_row = match outcome {
                    Outcome::Inconclusive(_) => before.saturating_add(1),
                    _ => 0,
                };
                CheckOutcome {
                    name,
                    outcome,
                    inconclusive_in_a_row,
                }
            })
            .collect();
        {
            let source = self.dp.stats_source();
            let mut source = source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for o in &latest {
                source.count_check(service, &o.name, o.outcome.name());
            }
        }
        for o in &latest {
            match &o.outcome {
                Outcome::Pass(d) => debug!(service, "{d}"),
                Outcome::Fail(d) => warn!(service, "{d}"),
                Outcome::Inconclusive(d) => {
                    warn!(
                        service,
                        in_a_row = o.inconclusive_in_a_row,
                        max_inconclusive,
                        "{d}; the step holds"
                    );
                }
            }
        }
        for o in &latest {
            match entry.latest.iter_mut().find(|l| l.name == o.name) {
                Some(l) => *l = o.clone(),
                None => entry.latest.push(o.clone()),
            }
        }
        if let Some(svc) = self.config.services.iter().find(|s| s.name == service) {
            // Config order, for status.
            entry
                .latest
                .sort_by_key(|o| svc.checks.iter().position(|c| c.name == o.name));
        }
        // The engine decides on the checks evaluated now.
        let round = CheckRound {
            outcomes: latest,
            max_inconclusive,
        };
        if self.fleet_pause(service, &round) {
            return;
        }
        if let Err(e) = self.feed(service, Event::Checked(round)) {
            warn!(service, error = %e, "the checks' decision was not carried out");
        }
    }

    /// In a fleet (etcd reachable), a pause the checks decide is the
    /// fleet's: compare-and-swapped into etcd like the leader's decisions,
    /// applied on every node (this one included) from the watch. A rollback
    /// goes the usual way (applied here at once, then published). Whether
    /// the round was handled here.
    fn fleet_pause(&mut self, service: &str, round: &CheckRound) -> bool {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return false;
        };
        let Some(current) = self.rollouts.get(service) else {
            return false;
        };
        if !self.fleet.as_ref().is_some_and(|l| l.connected) {
            return false;
        }
        let now = crate::rollout::now_unix();
        let Ok(decision) =
            crate::rollout::engine::decide(svc, current, Event::Checked(round.clone()), now)
        else {
            return false;
        };
        if !matches!(decision.to.state, ServiceState::Paused { .. }) {
            return false;
        }
        let verdict = decision
            .announced()
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        let key = (svc.name.clone(), svc.release.clone());
        let Some(link) = self.fleet.as_mut() else {
            return false;
        };
        let base = link.records.get(&key).map_or(0, |(_, rev)| *rev);
        let record = crate::fleet::Record {
            state: decision.to.state,
            node: link.fleet.config.node.clone(),
            by: crate::rollout::engine::Actor::Checks.as_str().to_string(),
            verdict: verdict.clone(),
            at_unix: now,
        };
        tracing::info!(service, "fleet: {verdict}");
        // Retried by the next inconclusive round if another change won.
        let _ = link.fleet.jobs.send(crate::fleet::Job::Cas {
            service: key.0,
            release: key.1,
            record,
            base,
            reply: None,
        });
        true
    }

    /// Whether `svc`'s step may pass on its checks: it has none, or the
    /// latest evaluation at this step passed every one.
    pub(super) fn checks_passed(&self, svc: &ServiceConfig) -> bool {
        // By name: a reload may have changed the set since the evaluation.
        svc.checks.iter().all(|check| {
            self.analysis.checks.get(&svc.name).is_some_and(|c| {
                c.latest
                    .iter()
                    .any(|o| o.name == check.name && matches!(o.outcome, Outcome::Pass(_)))
            })
        })
    }

    /// The check lines `status` shows for `service`.
    pub(super) fn check_lines(&self, service: &str) -> Vec<String> {
        self.analysis
            .checks
            .get(service)
            .map(|c| {
                c.latest
                    .iter()
                    .map(|o| match o.outcome {
                        Outcome::Inconclusive(_) => format!(
                            "{} ({} in a row)",
                            o.outcome.detail(),
                            o.inconclusive_in_a_row
                        ),
                        _ => format!("{}: {}", o.outcome.name(), o.outcome.detail()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// On the leader: the fleet's verdict from Prometheus on `svc`'s step
    /// `state` (begun at `since_unix`), starting a new look when one is
    /// due. `None` without `[analysis]`; insufficient data until a look
    /// at this step is back.
    pub(super) fn fleet_verdict(
        &mut self,
        svc: &ServiceConfig,
        state: &ServiceState,
        since_unix: u64,
    ) -> Option<Verdict> {
        let ac = self.config.analysis.clone()?;
        let plan = svc.rollout.as_ref()?;
        let now = Instant::now();
        let look = self.analysis.fleet.entry(svc.name.clone()).or_default();
        if !look.in_flight && look.due.is_none_or(|d| d <= now) {
            look.in_flight = true;
            look.due = Some(now + plan.interval);
            let age = Duration::from_secs(crate::rollout::now_unix().saturating_sub(since_unix));
            let (tx, service, step, judge) = (
                self.analysis.tx.clone(),
                svc.name.clone(),
                state.clone(),
                plan.judge,
            );
            tokio::spawn(async move {
                let verdict = crate::analysis::fleet::verdict(
                    &ac.prometheus,
                    ac.query_timeout,
                    &judge,
                    &service,
                    age.max(ac.min_window),
                )
                .await;
                let _ = tx
                    .send(Done::Fleet {
                        service,
                        state: step,
                        verdict,
                    })
                    .await;
            });
        }
        Some(match &look.latest {
            Some((at, verdict)) if at == state => verdict.clone(),
            _ => Verdict::InsufficientData {
                detail: "fleet evidence from Prometheus not in yet for this step".into(),
            },
        })
    }
}

impl Agent {
    /// Shadow mode: the kernel breaker of a shadow service only counts (its
    /// trip threshold is programmed off); this reads its window and
    /// reports the trip the configured breaker would have made, through
    /// the engine (a shadowed, unenforced rollback). Polled with the
    /// judge's 100 ms tick: a window shorter than that can be missed.
    pub(super) fn shadow_breakers(&mut self) {
        let due: Vec<ServiceConfig> = self
            .config
            .services
            .iter()
            .filter(|s| s.mode == crate::config::Mode::Shadow && s.breaker.enabled)
            .filter(|s| {
                self.rollouts
                    .get(&s.name)
                    .is_some_and(|r| r.state.canary_allowed())
            })
            .cloned()
            .collect();
        for svc in due {
            let Some(b) = self.dp.breaker_state(&svc.name) else {
                continue;
            };
            let ratio_permille =
                u16::try_from(svc.breaker.failure_ratio.ppm().div_ceil(1000)).unwrap_or(u16::MAX);
            if !canary_common::breaker::trips(
                b.consecutive,
                b.failures,
                b.attempts,
                svc.breaker.min_failures,
                ratio_permille,
            ) {
                continue;
            }
            let event = Event::BreakerTripped {
                failures: b.failures,
                attempts: b.attempts,
            };
            if let Err(e) = self.feed(&svc.name, event) {
                warn!(service = %svc.name, error = %e, "shadow mode: the breaker's would-be trip was not recorded");
            }
        }
    }
}

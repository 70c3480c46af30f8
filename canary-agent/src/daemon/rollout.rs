//! Where the daemon meets the rollout engine: events go in, and the
//! engine's effects (persist, reset the breaker, program, announce) are
//! carried out here, in order.

use tracing::{error, warn};

use super::{Agent, canary_off, effective, reload::Pending};
use crate::{
    config::ServiceConfig,
    control::{ErrorCode, Response},
    dataplane::DataplaneError,
    error_chain,
    events::Event as Notice,
    rollout::{
        ServiceState, StateError,
        engine::{self, Decision, Effect, Event, Refusal, Rollout},
    },
};

/// Verdicts kept per service for `explain`.
const RECENT_VERDICTS: usize = 5;

/// Why an event for a service was not carried out.
#[derive(Debug, thiserror::Error)]
pub(super) enum FeedError {
    #[error("no such service")]
    UnknownService,
    #[error(transparent)]
    Refused(Refusal),
    #[error("not persisted")]
    NotPersisted(#[source] StateError),
    #[error("not applied, the old state is back")]
    NotApplied(#[source] DataplaneError),
}

impl Agent {
    /// An operator's command for `service`: the engine decides, the
    /// answer is the service's status or why nothing changed.
    pub(super) fn command(&mut self, service: &str, command: engine::Command) -> Response {
        match self.feed(service, Event::Operator(command)) {
            Ok(()) => self.status(Some(service)),
            Err(FeedError::UnknownService) => {
                let names: Vec<&str> = self
                    .config
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                Response::error(
                    ErrorCode::UnknownService,
                    format!("no service {service:?}; configured: {names:?}"),
                )
            }
            Err(FeedError::Refused(why)) => Response::error(ErrorCode::Conflict, why.0),
            Err(FeedError::NotPersisted(e)) => Response::error(
                ErrorCode::Internal,
                format!("not changed: {}", error_chain(&e)),
            ),
            Err(FeedError::NotApplied(e)) => Response::error(
                ErrorCode::Internal,
                format!("not changed: {}", error_chain(&e)),
            ),
        }
    }

    /// Feeds `event` to the engine for `service` and carries out what it
    /// decides: persisted first, then applied; if applying fails, the old
    /// state is restored on disk and in the data plane.
    pub(super) fn feed(&mut self, service: &str, event: Event) -> Result<(), FeedError> {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .cloned()
            .ok_or(FeedError::UnknownService)?;
        let current = self
            .rollouts
            .get(service)
            .cloned()
            .unwrap_or_else(|| Rollout::new(ServiceState::IDLE));
        // Decided elsewhere: already the fleet's. Decided here: a rollback
        // goes to the fleet once applied.
        let here = !matches!(event, Event::Decided(_) | Event::FleetGate(_));
        let decision = engine::decide(&svc, &current, event, crate::rollout::now_unix())
            .map_err(FeedError::Refused)?;
        let announced = decision.announced().map(|(by, v)| (by, v.to_string()));
        let to = decision.to.state.clone();
        self.carry_out(&svc, &current, decision, false)?;
        if let (true, Some((by, verdict))) = (here, announced) {
            self.publish_local(&svc, &to, &verdict, by);
        }
        Ok(())
    }

    /// The engine's decision for a trip found at start, before the data
    /// plane is programmed (the start programs every service at once).
    pub(super) fn decide_pending(&mut self, service: &str, event: Event) -> Option<Pending> {
        let svc = self.config.services.iter().find(|s| s.name == service)?;
        let current = self.rollouts.get(service)?.clone();
        let decision = engine::decide(svc, &current, event, crate::rollout::now_unix()).ok()?;
        self.rollouts
            .insert(service.to_string(), decision.to.clone());
        Some(Pending {
            service: service.to_string(),
            from: current,
            decision,
        })
    }

    /// Carries out `decision` for `svc`, whose rollout was `current`, in
    /// the order the engine gave. `programmed`: the data plane already holds
    /// the decision (a start's or a reload's one apply), so `Program` has
    /// nothing left to do and a failed `Persist` can only be reported.
    /// Otherwise a failed `Persist` changes nothing, and a failed
    /// `Program` restores the old state on disk and in the data plane.
    pub(super) fn carry_out(
        &mut self,
        svc: &ServiceConfig,
        current: &Rollout,
        decision: Decision,
        programmed: bool,
    ) -> Result<(), FeedError> {
        let name = svc.name.clone();
        for effect in &decision.effects {
            match effect {
                Effect::Persist => {
                    if let Err(e) = self.store.save(&name, &svc.release, &decision.to.state) {
                        if !programmed {
                            return Err(FeedError::NotPersisted(e));
                        }
                        error!(service = %name, error = %error_chain(&e), "cannot persist the rollout state: a restart would not find it");
                    }
                }
                Effect::ResetBreaker => self.reset_breaker(&name),
                Effect::Program if programmed => {}
                Effect::Program => {
                    self.rollouts.insert(name.clone(), decision.to.clone());
                    if let Err(e) = self.program() {
                        self.rollouts.insert(name.clone(), current.clone());
                        let _ = self.store.save(&name, &svc.release, &current.state);
                        let _ = self.program();
                        return Err(FeedError::NotApplied(e));
                    }
                }
                Effect::RestartWindow => {
                    self.windows.remove(&name);
                    if let Err(e) = self.store.remove_window(&name) {
                        warn!(service = %name, error = %error_chain(&e), "cannot remove the ended judge window's file (the next window replaces it)");
                    }
                    self.analysis.restart(&name);
                }
                Effect::Announce { by, verdict } => {
                    self.announce(svc, &current.state, &decision.to.state, *by, verdict);
                }
                Effect::Verdict(line) => self.note_verdict(&name, line),
            }
        }
        self.rollouts.insert(name, decision.to);
        Ok(())
    }

    /// Programs the data plane from the configured services and their
    /// rollouts.
    fn program(&mut self) -> Result<(), DataplaneError> {
        self.dp
            .apply(
                &effective(&self.config, &self.rollouts),
                &canary_off(&self.config, &self.rollouts),
            )
            .map(drop)
    }

    /// Carries out decisions whose data plane is already programmed (by the
    /// start's or a reload's one apply).
    pub(super) fn carry_out_programmed(&mut self, pending: Vec<Pending>) {
        let mut reset = false;
        for p in pending {
            let Some(svc) = self
                .config
                .services
                .iter()
                .find(|s| s.name == p.service)
                .cloned()
            else {
                continue;
            };
            reset |= p.decision.effects.contains(&Effect::ResetBreaker);
            // Cannot fail when programmed: a failed save is reported.
            let _ = self.carry_out(&svc, &p.from, p.decision, true);
        }
        // The apply kept a tripped breaker's cut-off; with the breaker
        // reset, the canary the state lets in is let in now.
        if reset && let Err(e) = self.program() {
            error!(error = %error_chain(&e), "cannot let the resumed canary back in; `canaryctl resume` it");
        }
    }

    pub(super) fn reset_breaker(&mut self, service: &str) {
        if let Err(e) = self.dp.reset_breaker(service) {
            warn!(service = %service, error = %error_chain(&e), "cannot reset the breaker");
        }
    }

    /// A state change, told everywhere: metrics, the log, the webhook and
    /// `status`.
    pub(super) fn announce(
        &mut self,
        svc: &ServiceConfig,
        from: &ServiceState,
        to: &ServiceState,
        by: engine::Actor,
        verdict: &str,
    ) {
        let rollback = match to {
            ServiceState::RolledBack { reason, .. } => Some(reason.as_str()),
            _ => None,
        };
        self.publish_state(&svc.name, to, rollback);
        let weight = crate::rollout::enforced(svc, to).0;
        warn!(event = "rollout-state", service = %svc.name, from = from.name(), to = to.name(), weight = %weight, by = by.as_str(), "{verdict}");
        self.events.send(Notice {
            event: "rollout-state",
            node: self.node.clone(),
            service: svc.name.clone(),
            from: from.name().to_string(),
            to: to.name().to_string(),
            weight: weight.to_string(),
            by: by.as_str().to_string(),
            detail: verdict.to_string(),
            at_unix: crate::rollout::now_unix(),
        });
        self.note_verdict(&svc.name, verdict);
        self.history.record(
            &svc.name,
            crate::rollout::history::Change {
                at_unix: crate::rollout::now_unix(),
                from: from.name().to_string(),
                to: to.name().to_string(),
                weight: weight.to_string(),
                by: by.as_str().to_string(),
                detail: verdict.to_string(),
            },
        );
    }

    /// Records `line` as `service`'s latest verdict (the last
    /// [`RECENT_VERDICTS`] are kept).
    pub(super) fn note_verdict(&mut self, service: &str, line: &str) {
        let recent = self.verdicts.entry(service.to_string()).or_default();
        recent.push_back((crate::rollout::now_unix(), line.to_string()));
        if recent.len() > RECENT_VERDICTS {
            recent.pop_front();
        }
    }

    /// `service`'s latest verdict.
    pub(super) fn last_verdict(&self, service: &str) -> Option<&str> {
        self.verdicts
            .get(service)
            .and_then(|r| r.back())
            .map(|(_, line)| line.as_str())
    }

    /// Exports every service's rollout state, and declares its checks.
    pub(super) fn publish_states(&self) {
        for (name, rollout) in &self.rollouts {
            self.publish_state(name, &rollout.state, None);
        }
        let source = self.dp.stats_source();
        let mut source = source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for svc in &self.config.services {
            source.declare_checks(&svc.name, svc.checks.iter().map(|c| c.name.as_str()));
        }
    }

    pub(super) fn publish_state(
        &self,
        name: &str,
        state: &ServiceState,
        rollback: Option<&'static str>,
    ) {
        let source = self.dp.stats_source();
        let mut source = source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        source.set_rollout(name, state.name(), rollback);
    }
}

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
        let decision = engine::decide(&svc, &current, event, crate::rollout::now_unix())
            .map_err(FeedError::Refused)?;
        self.carry_out(&svc, &current, decision)
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
            from: current.state,
            decision,
        })
    }

    /// Carries out `decision` for `svc`, whose rollout was `current`.
    pub(super) fn carry_out(
        &mut self,
        svc: &ServiceConfig,
        current: &Rollout,
        decision: Decision,
    ) -> Result<(), FeedError> {
        let name = svc.name.clone();
        for effect in &decision.effects {
            match effect {
                Effect::Persist => self
                    .store
                    .save(&name, &decision.to.state)
                    .map_err(FeedError::NotPersisted)?,
                Effect::ResetBreaker => self.reset_breaker(&name),
                Effect::Program => {
                    self.rollouts.insert(name.clone(), decision.to.clone());
                    let applied = self.dp.apply(
                        &effective(&self.config, &self.rollouts),
                        &canary_off(&self.rollouts),
                    );
                    if let Err(e) = applied {
                        self.rollouts.insert(name.clone(), current.clone());
                        let _ = self.store.save(&name, &current.state);
                        let _ = self.dp.apply(
                            &effective(&self.config, &self.rollouts),
                            &canary_off(&self.rollouts),
                        );
                        return Err(FeedError::NotApplied(e));
                    }
                }
                Effect::RestartWindow => {
                    self.windows.remove(&name);
                }
                Effect::Announce { by, verdict } => {
                    self.announce_change(svc, &current.state, &decision.to.state, *by, verdict);
                }
                Effect::Verdict(line) => {
                    self.verdicts.insert(name.clone(), line.clone());
                }
            }
        }
        self.rollouts.insert(name, decision.to);
        Ok(())
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
            for effect in &p.decision.effects {
                match effect {
                    Effect::Persist => {
                        if let Err(e) = self.store.save(&p.service, &p.decision.to.state) {
                            error!(service = %p.service, error = %error_chain(&e), "cannot persist the rollout state: a restart would not find it");
                        }
                    }
                    Effect::ResetBreaker => {
                        self.reset_breaker(&p.service);
                        reset = true;
                    }
                    Effect::Program => {}
                    Effect::RestartWindow => {
                        self.windows.remove(&p.service);
                    }
                    Effect::Announce { by, verdict } => {
                        self.announce_change(&svc, &p.from, &p.decision.to.state, *by, verdict);
                    }
                    Effect::Verdict(line) => {
                        self.verdicts.insert(p.service.clone(), line.clone());
                    }
                }
            }
        }
        // The apply kept a tripped breaker's cut-off; with the breaker
        // reset, the canary the state lets in is let in now.
        if reset
            && let Err(e) = self.dp.apply(
                &effective(&self.config, &self.rollouts),
                &canary_off(&self.rollouts),
            )
        {
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
    pub(super) fn announce_change(
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
        let weight = to.effective_weight(svc);
        warn!(event = "rollout-state", service = %svc.name, from = from.name(), to = to.name(), weight = %weight, by = by.as_str(), "{verdict}");
        self.announce(
            &svc.name,
            from,
            to,
            &weight.to_string(),
            by.as_str(),
            verdict,
        );
        self.verdicts.insert(svc.name.clone(), verdict.to_string());
    }

    /// Tells people: one event per state change (the log line is written
    /// by the caller).
    pub(super) fn announce(
        &self,
        service: &str,
        from: &ServiceState,
        to: &ServiceState,
        weight: &str,
        by: &str,
        detail: &str,
    ) {
        self.events.send(Notice {
            event: "rollout-state",
            node: self.node.clone(),
            service: service.to_string(),
            from: from.name().to_string(),
            to: to.name().to_string(),
            weight: weight.to_string(),
            by: by.to_string(),
            detail: detail.to_string(),
            at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
    }

    /// Exports every service's rollout state.
    pub(super) fn publish_states(&self) {
        for (name, rollout) in &self.rollouts {
            self.publish_state(name, &rollout.state, None);
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

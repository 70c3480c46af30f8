//! The rollout engine: every decision about a service's rollout, as a pure
//! function of (its config, its rollout, an event) → (its new rollout, the
//! effects to carry out). No I/O here: the daemon feeds events in (operator
//! commands, judgements, breaker trips, config loads) and carries the
//! effects out (persist, program the data plane, reset the breaker,
//! announce), in that order.
//!
//! Where is rollback decided? In [`decide`]: `Rollback` from an operator,
//! a failing judgement (the judge's sequential tests bound false rollbacks
//! over the whole rollout, so one failing verdict is enough), and a
//! breaker trip (which the kernel has already enforced; the engine makes
//! it the service's state).
//! In a fleet, a state decided on another node (or by the fleet's leader)
//! arrives as one more event, [`Event::Decided`].
//!
//! The team's own PromQL checks arrive as [`Event::Checked`]: a failing
//! check rolls back, one inconclusive `max_inconclusive` times in a row
//! pauses. The fleet's verdict from Prometheus comes with the leader's
//! [`Event::FleetGate`]: a fail rolls the fleet back.
//!
//! In shadow mode (`[service.rollout] mode = "shadow"`) every decision is
//! taken and recorded the same way, its announcement says it was not
//! enforced, and the daemon keeps the configured weight
//! ([`super::enforced`]).

use std::time::Duration;

use super::{RollbackReason, Saved, ServiceState};
use crate::{
    analysis::{CheckOutcome, Outcome},
    config::{Gate, Mode, ServiceConfig, Weight},
    judge::Verdict,
};

/// What an operator asks for (`canaryctl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// A fixed canary weight, kept until `resume`; stops a running plan.
    SetWeight(Weight),
    /// Every new connection to canary.
    Promote,
    /// No new connection to canary.
    Rollback,
    /// Go on: a paused plan continues; after a rollback or promotion a plan
    /// starts over, a service without one returns to its configured weight.
    Resume,
    /// Hold a progressing plan at its step.
    Pause,
    /// Pass a manual gate.
    Approve,
}

/// One judgement of a plan-driven service.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    /// The judge's verdict on the step's window.
    pub verdict: Verdict,
    /// How long the service has been at its step.
    pub held: Duration,
    /// Canary connections the step's window has seen.
    pub canary_connections: u64,
    /// Whether a pass may move the plan on. In a fleet only the leader
    /// moves it on, on the fleet's evidence ([`Event::FleetGate`]); a
    /// node's own judge can only hold it or roll it back.
    pub may_advance: bool,
}

/// The fleet's evidence on a service's current step, gathered by the
/// leader from every node's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetEvidence {
    /// How long the fleet has been at the step.
    pub held: Duration,
    /// Canary connections all nodes at the step have seen in it.
    pub canary_connections: u64,
    /// Nodes reporting on the step.
    pub nodes: usize,
    /// Nodes whose judge fails the canary (each holds the step).
    pub failing: Vec<String>,
    /// The judge on every node's counts summed by Prometheus (with
    /// `[analysis]`): a fail rolls the fleet back, insufficient data
    /// (Prometheus down or slow included) holds the step. `None` without
    /// `[analysis]`.
    pub fleet_verdict: Option<Verdict>,
}

/// One evaluation of a service's checks (`[[service.rollout.checks]]`).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRound {
    /// Every check's outcome, in config order.
    pub outcomes: Vec<CheckOutcome>,
    /// `[analysis] max_inconclusive`: a check inconclusive this many times
    /// in a row pauses a progressing plan.
    pub max_inconclusive: u32,
}

/// A state decided elsewhere in the fleet, as etcd holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Remote {
    /// The service's state for the config's release.
    pub state: ServiceState,
    /// The node that decided.
    pub node: String,
    /// What decided there, as people read it ("canaryctl", "the judge"…).
    pub by: String,
    /// The verdict line it gave.
    pub verdict: String,
}

/// Something that happened to a service.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// An operator's command.
    Operator(Command),
    /// The judge's verdict on the current step.
    Judged(Judgement),
    /// The data plane's breaker cut the canary off.
    BreakerTripped {
        /// Canary failures in the window that tripped.
        failures: u64,
        /// Canary attempts in that window.
        attempts: u64,
    },
    /// The config was (re)loaded, with the state its state file holds now
    /// (the file wins over memory: deleting it is how an operator resets a
    /// service by hand). A state of another release starts the config's
    /// release afresh.
    Configured {
        /// What the state file says.
        saved: Saved,
    },
    /// The fleet's state for this release changed (another node, an
    /// operator elsewhere, the leader): it is taken as it is.
    Decided(Remote),
    /// The leader's look at the fleet's evidence on the current step.
    FleetGate(FleetEvidence),
    /// The service's PromQL checks were evaluated.
    Checked(CheckRound),
}

impl Decision {
    /// The verdict line it announces, if it changes the state.
    pub fn announced(&self) -> Option<(Actor, &str)> {
        self.effects.iter().find_map(|e| match e {
            Effect::Announce { by, verdict } => Some((*by, verdict.as_str())),
            _ => None,
        })
    }
}

/// Who decided, as people read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// `canaryctl`.
    Operator,
    /// The statistical judge.
    Judge,
    /// The data plane's breaker.
    Breaker,
    /// The config (or the state file) as loaded.
    Config,
    /// Another node of the fleet, or the fleet's leader.
    Fleet,
    /// The team's PromQL checks.
    Checks,
}

impl Actor {
    /// As logs, events and `status` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Operator => "canaryctl",
            Actor::Judge => "the judge",
            Actor::Breaker => "the breaker",
            Actor::Config => "the config",
            Actor::Fleet => "the fleet",
            Actor::Checks => "the checks",
        }
    }
}

/// A service's rollout as the engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// The persisted state.
    pub state: ServiceState,
}

impl Rollout {
    /// A rollout in `state`.
    pub fn new(state: ServiceState) -> Rollout {
        Rollout { state }
    }
}

/// What the daemon must do after a decision, in this order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Write the new state to its state file (before anything else: if
    /// that fails, nothing changes).
    Persist,
    /// Start the service's breaker afresh (only when a rolled-back canary
    /// is let back in).
    ResetBreaker,
    /// Program the data plane from the new state: the weight in force and
    /// whether the canary is cut off.
    Program,
    /// The judge's window starts anew (a new step, or none).
    RestartWindow,
    /// A state change, for the log, the webhook, metrics and `status`.
    Announce {
        /// Who decided.
        by: Actor,
        /// The line `status` shows as the last verdict.
        verdict: String,
    },
    /// No state change, but a new last verdict for `status`.
    Verdict(String),
}

/// A decision: the rollout after the event and what to do about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The rollout after the event.
    pub to: Rollout,
    /// What to carry out, in order.
    pub effects: Vec<Effect>,
}

/// Why an event was refused; nothing changes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Decides what `event` does to `current`, the rollout of `svc`, at
/// `now_unix` (wall-clock seconds, recorded in the new state).
pub fn decide(
    svc: &ServiceConfig,
    current: &Rollout,
    event: Event,
    now_unix: u64,
) -> Result<Decision, Refusal> {
    let operator = matches!(event, Event::Operator(_));
    let decision = decide_enforced(svc, current, event, now_unix)?;
    Ok(if svc.mode == Mode::Shadow && !operator {
        shadowed(decision)
    } else {
        decision
    })
}

/// In shadow mode an automatic decision is taken and recorded the same
/// way, and says that it was not enforced: the daemon keeps the
/// configured weight and the breaker only counts ([`super::enforced`]).
fn shadowed(mut decision: Decision) -> Decision {
    for effect in &mut decision.effects {
        if let Effect::Announce { verdict, .. } = effect {
            *verdict =
                format!("shadow mode, not enforced (the weight stays): would have {verdict}");
        }
    }
    decision
}

fn decide_enforced(
    svc: &ServiceConfig,
    current: &Rollout,
    event: Event,
    now_unix: u64,
) -> Result<Decision, Refusal> {
    match event {
        Event::Operator(command) => operator(svc, &current.state, command, now_unix),
        Event::Judged(judgement) => Ok(judged(svc, current, &judgement, now_unix)),
        Event::BreakerTripped { failures, attempts } => {
            Ok(breaker(current, failures, attempts, now_unix))
        }
        Event::Configured { saved } => configured(svc, current, &saved, now_unix),
        Event::Decided(remote) => Ok(decided(svc, current, remote)),
        Event::FleetGate(evidence) => Ok(fleet_gate(svc, current, &evidence, now_unix)),
        Event::Checked(round) => Ok(checked(svc, current, &round, now_unix)),
    }
}

/// A change of state with the usual effects.
fn change(
    from: &ServiceState,
    to: ServiceState,
    svc: &ServiceConfig,
    by: Actor,
    verdict: Option<String>,
) -> Decision {
    let mut effects = vec![Effect::Persist];
    if !from.canary_allowed() && to.canary_allowed() {
        effects.push(Effect::ResetBreaker);
    }
    let verdict = verdict.unwrap_or_else(|| {
        format!(
            "{} by {}: {} → {} (canary weight {})",
            verb(&to),
            by.as_str(),
            from.name(),
            to.name(),
            to.effective_weight(svc)
        )
    });
    effects.extend([
        Effect::Program,
        Effect::RestartWindow,
        Effect::Announce { by, verdict },
    ]);
    Decision {
        to: Rollout::new(to),
        effects,
    }
}

fn progressing(step: u32, now: u64) -> ServiceState {
    ServiceState::Progressing {
        step,
        since_unix: now,
    }
}

/// How a change to `state` is described.
fn verb(state: &ServiceState) -> &'static str {
    match state {
        ServiceState::Idle {
            weight_ppm: Some(_),
        } => "weight set",
        ServiceState::Idle { weight_ppm: None } => "resumed",
        ServiceState::Progressing { .. } => "step entered",
        ServiceState::AwaitingApproval { .. } => "gate reached",
        ServiceState::Paused { .. } => "paused",
        ServiceState::Promoted { .. } => "promoted",
        ServiceState::RolledBack { .. } => "rolled back",
    }
}

mod automatic;
mod configured;
mod fleet;
mod operator;

use self::{
    automatic::{breaker, checked, judged},
    configured::configured,
    fleet::{decided, fleet_gate},
    operator::operator,
};

#[cfg(test)]
mod tests;

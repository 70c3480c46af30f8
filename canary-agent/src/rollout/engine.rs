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

fn operator(
    svc: &ServiceConfig,
    state: &ServiceState,
    command: Command,
    now: u64,
) -> Result<Decision, Refusal> {
    let refuse = |why: String| Err(Refusal(format!("service {:?}: {why}", svc.name)));
    let plan = svc.rollout.as_ref();
    let to = match command {
        Command::SetWeight(_) if matches!(state, ServiceState::RolledBack { .. }) => {
            return refuse("it is rolled back; `canaryctl resume` it first".into());
        }
        Command::SetWeight(w) if w.ppm() > 0 && svc.canary.is_empty() => {
            return refuse("it has no canary backends".into());
        }
        Command::SetWeight(w) => ServiceState::Idle {
            weight_ppm: Some(w.ppm()),
        },
        Command::Promote if svc.canary.is_empty() => {
            return refuse("it has no canary backends to promote".into());
        }
        Command::Promote => ServiceState::Promoted { at_unix: now },
        Command::Rollback if matches!(state, ServiceState::RolledBack { .. }) => {
            return refuse("it is already rolled back".into());
        }
        Command::Rollback => ServiceState::RolledBack {
            reason: RollbackReason::Operator,
            at_unix: now,
            detail: "canaryctl rollback".into(),
        },
        Command::Resume => match (state, plan) {
            (ServiceState::Paused { step, .. }, Some(_)) => progressing(*step, now),
            (ServiceState::Progressing { .. } | ServiceState::AwaitingApproval { .. }, Some(_)) => {
                return refuse(format!("its rollout is already {}", state.name()));
            }
            // A plan starts over; without one, the configured weight.
            (_, Some(_)) => progressing(0, now),
            (_, None) => ServiceState::IDLE,
        },
        Command::Pause => match state {
            ServiceState::Progressing { step, .. } => ServiceState::Paused {
                step: *step,
                weight_ppm: state.effective_weight(svc).ppm(),
            },
            _ => {
                return refuse(format!(
                    "pause holds a progressing rollout; it is {}",
                    state.name()
                ));
            }
        },
        Command::Approve => match state {
            ServiceState::AwaitingApproval { step } => progressing(*step, now),
            _ => return refuse(format!("nothing awaits approval; it is {}", state.name())),
        },
    };
    Ok(change(state, to, svc, Actor::Operator, None))
}

fn judged(svc: &ServiceConfig, current: &Rollout, judgement: &Judgement, now: u64) -> Decision {
    let state = &current.state;
    let in_plan = matches!(
        state,
        ServiceState::Progressing { .. }
            | ServiceState::AwaitingApproval { .. }
            | ServiceState::Paused { .. }
    );
    if svc.rollout.is_none() || !in_plan {
        // Judged after it left the plan (a command came first): stale.
        return Decision {
            to: current.clone(),
            effects: Vec::new(),
        };
    }
    let line = judgement.verdict.describe();
    // The judge guards every state of a plan, paused and gated included.
    if matches!(judgement.verdict, Verdict::Fail { .. }) {
        return judge_rollback(svc, state, &line, Actor::Judge, now);
    }
    // A step at 100 % leaves stable no connection to compare with: it
    // passes on its hold and connections unless the judge fails it.
    let all_canary = state.effective_weight(svc).ppm() >= canary_common::cohort::PPM;
    let passed = judgement.may_advance
        && (matches!(judgement.verdict, Verdict::Pass { .. }) || all_canary)
        && step_done(svc, state, judgement.held, judgement.canary_connections);
    match next_state(svc, state, now) {
        Some((step, to)) if passed => change(
            state,
            to,
            svc,
            Actor::Judge,
            Some(format!("step {step} passed: {line}")),
        ),
        _ => Decision {
            to: current.clone(),
            effects: vec![Effect::Verdict(format!("judge: {line}"))],
        },
    }
}

/// A rollback by a judge's failing verdict `line`: this node's judge
/// (`Actor::Judge`) or the fleet leader's on the fleet's sum (`Actor::Fleet`).
fn judge_rollback(
    svc: &ServiceConfig,
    state: &ServiceState,
    line: &str,
    by: Actor,
    now: u64,
) -> Decision {
    let to = ServiceState::RolledBack {
        reason: RollbackReason::Judge,
        at_unix: now,
        detail: line.to_string(),
    };
    let who = if by == Actor::Fleet {
        "the fleet's judge"
    } else {
        "the judge"
    };
    change(
        state,
        to,
        svc,
        by,
        Some(format!("rolled back by {who}: {line}")),
    )
}

/// Whether a progressing plan's step has been held long enough and seen
/// enough canary connections.
fn step_done(svc: &ServiceConfig, state: &ServiceState, held: Duration, canary: u64) -> bool {
    let (Some(plan), ServiceState::Progressing { step, .. }) = (svc.rollout.as_ref(), state) else {
        return false;
    };
    let at = &plan.steps[(*step as usize).min(plan.steps.len() - 1)];
    held >= at.hold && canary >= at.min_connections
}

/// The state after a progressing plan's current step passes, and that
/// step's number (from 1).
fn next_state(
    svc: &ServiceConfig,
    state: &ServiceState,
    now: u64,
) -> Option<(usize, ServiceState)> {
    let (Some(plan), ServiceState::Progressing { step, .. }) = (svc.rollout.as_ref(), state) else {
        return None;
    };
    let next = step.saturating_add(1);
    let to = match plan.steps.get(next as usize) {
        None => ServiceState::Promoted { at_unix: now },
        Some(s) if s.gate == Gate::Manual => ServiceState::AwaitingApproval { step: next },
        Some(_) => progressing(next, now),
    };
    Some((*step as usize + 1, to))
}

/// The leader's gate: the step passes when it has been held long enough,
/// the fleet's canary connections at it reach `min_connections`, and no
/// node's judge fails the canary.
fn fleet_gate(
    svc: &ServiceConfig,
    current: &Rollout,
    evidence: &FleetEvidence,
    now: u64,
) -> Decision {
    let state = &current.state;
    let line = format!(
        "fleet: {} canary connections on {} node(s) in {}s{}",
        evidence.canary_connections,
        evidence.nodes,
        evidence.held.as_secs(),
        match evidence.failing.as_slice() {
            [] => String::new(),
            nodes => format!(", the judge fails the canary on {}", nodes.join(", ")),
        }
    );
    // The fleet's sum fails the canary: a fleet rollback.
    if let Some(verdict @ Verdict::Fail { .. }) = &evidence.fleet_verdict
        && matches!(state, ServiceState::Progressing { .. })
    {
        return judge_rollback(svc, state, &verdict.describe(), Actor::Fleet, now);
    }
    let fleet_holds = matches!(
        evidence.fleet_verdict,
        Some(Verdict::InsufficientData { .. } | Verdict::Fail { .. })
    );
    let line = match &evidence.fleet_verdict {
        Some(v) => format!("{line}; {}", v.describe()),
        None => line,
    };
    let passed = evidence.failing.is_empty()
        && !fleet_holds
        && step_done(svc, state, evidence.held, evidence.canary_connections);
    match next_state(svc, state, now) {
        Some((step, to)) if passed => change(
            state,
            to,
            svc,
            Actor::Fleet,
            Some(format!("step {step} passed: {line}")),
        ),
        _ => Decision {
            to: current.clone(),
            effects: Vec::new(),
        },
    }
}

/// The checks' verdict: a failing check rolls back (whatever the plan's
/// state, like the judge); a check inconclusive `max_inconclusive` times in
/// a row pauses a progressing plan, for a person to look at. A round that
/// passes changes nothing here: whether a step may advance on it is the
/// daemon's (the latest round must have passed, `Judgement::may_advance`).
fn checked(svc: &ServiceConfig, current: &Rollout, round: &CheckRound, now: u64) -> Decision {
    let state = &current.state;
    let stay = Decision {
        to: current.clone(),
        effects: Vec::new(),
    };
    if svc.rollout.is_none()
        || !matches!(
            state,
            ServiceState::Progressing { .. }
                | ServiceState::AwaitingApproval { .. }
                | ServiceState::Paused { .. }
        )
    {
        // Evaluated after it left the plan: stale.
        return stay;
    }
    if let Some(failed) = round
        .outcomes
        .iter()
        .find(|o| matches!(o.outcome, Outcome::Fail(_)))
    {
        let line = failed.outcome.detail().to_string();
        let to = ServiceState::RolledBack {
            reason: RollbackReason::Check,
            at_unix: now,
            detail: line.clone(),
        };
        return change(
            state,
            to,
            svc,
            Actor::Checks,
            Some(format!("rolled back by the checks: {line}")),
        );
    }
    let stuck = round.outcomes.iter().find(|o| {
        matches!(o.outcome, Outcome::Inconclusive(_))
            && o.inconclusive_in_a_row >= round.max_inconclusive
    });
    match (stuck, state) {
        (Some(o), ServiceState::Progressing { step, .. }) => {
            let to = ServiceState::Paused {
                step: *step,
                weight_ppm: state.effective_weight(svc).ppm(),
            };
            change(
                state,
                to,
                svc,
                Actor::Checks,
                Some(format!(
                    "paused by the checks: {} ({} evaluations in a row, max_inconclusive {}); \
                     `canaryctl resume` once the evidence is back",
                    o.outcome.detail(),
                    o.inconclusive_in_a_row,
                    round.max_inconclusive
                )),
            )
        }
        _ => stay,
    }
}

/// A state the fleet decided: taken as it is (the node that decided
/// checked it against the same release's config), with this node's effects.
fn decided(svc: &ServiceConfig, current: &Rollout, remote: Remote) -> Decision {
    if remote.state == current.state {
        return Decision {
            to: current.clone(),
            effects: Vec::new(),
        };
    }
    let verdict = format!("{} (on {}, by {})", remote.verdict, remote.node, remote.by);
    change(
        &current.state,
        remote.state,
        svc,
        Actor::Fleet,
        Some(verdict),
    )
}

fn breaker(current: &Rollout, failures: u64, attempts: u64, now: u64) -> Decision {
    if !current.state.canary_allowed() {
        // Already off (a trip right after a rollback, or read twice).
        return Decision {
            to: current.clone(),
            effects: Vec::new(),
        };
    }
    let detail = format!("{failures} canary failures of {attempts} attempts in one breaker window");
    let to = ServiceState::RolledBack {
        reason: RollbackReason::Breaker,
        at_unix: now,
        detail: detail.clone(),
    };
    Decision {
        to: Rollout::new(to),
        effects: vec![
            Effect::Persist,
            Effect::Program,
            Effect::RestartWindow,
            Effect::Announce {
                by: Actor::Breaker,
                verdict: format!("rolled back by the breaker: {detail}"),
            },
        ],
    }
}

/// Whether a saved state still fits `svc`: a state that would send new
/// connections to canary backends the config no longer has ends the
/// rollout (rather than dropping them as `no_backend`), and so does a plan
/// step of a service without a plan; a step the new plan does not have is
/// refused.
fn fits(svc: &ServiceConfig, state: &ServiceState) -> Result<Option<&'static str>, String> {
    match state {
        ServiceState::Progressing { step, .. }
        | ServiceState::Paused { step, .. }
        | ServiceState::AwaitingApproval { step } => match &svc.rollout {
            None => Ok(Some("the config has no rollout plan for it any more")),
            Some(plan) if *step as usize >= plan.steps.len() => Err(format!(
                "it is at step {} of its plan and the config's plan has {} steps; \
                 `canaryctl rollback` or `canaryctl promote` it first, or delete its state file \
                 to start the plan over",
                step + 1,
                plan.steps.len()
            )),
            Some(_) => Ok(None),
        },
        _ if svc.canary.is_empty() && state.effective_weight(svc).ppm() > 0 => {
            Ok(Some("the config has no canary backends for it any more"))
        }
        _ => Ok(None),
    }
}

fn configured(
    svc: &ServiceConfig,
    current: &Rollout,
    saved: &Saved,
    now: u64,
) -> Result<Decision, Refusal> {
    // Another release's state says nothing about this one: a new release
    // starts afresh (and a rolled-back one, deployed again, finds its own).
    if let Some(old) = saved.release.as_deref().filter(|r| *r != svc.release) {
        let (to, why) = match svc.rollout {
            // No canary left (the usual end of a promotion) is no release.
            None if svc.canary.is_empty() => (
                ServiceState::IDLE,
                "the config has no canary backends for it any more".to_string(),
            ),
            Some(_) => (progressing(0, now), String::new()),
            None => (ServiceState::IDLE, String::new()),
        };
        let why = if why.is_empty() {
            format!(
                "new release {:?} (the saved state was release {old:?}'s); its rollout starts afresh",
                svc.release
            )
        } else {
            why
        };
        return Ok(change(
            &current.state,
            to,
            svc,
            Actor::Config,
            Some(format!("rollout state changed by the config: {why}")),
        ));
    }
    let saved = &saved.rollout;
    let ended = fits(svc, saved).map_err(|detail| {
        Refusal(format!(
            "service {:?}: its saved rollout state ({}) does not fit the config: {detail}",
            svc.name,
            saved.name()
        ))
    })?;
    let (to, why) = match ended {
        Some(why) => (ServiceState::IDLE, Some(why)),
        None => (saved.clone(), None),
    };
    // A plan with no state yet starts at its first step.
    let (to, why) = if svc.rollout.is_some() && to == ServiceState::IDLE {
        (
            progressing(0, now),
            Some(why.unwrap_or("rollout plan started")),
        )
    } else {
        (to, why)
    };
    match why {
        // The config forced a change: persisted and announced like any.
        Some(why) => Ok(change(
            &current.state,
            to,
            svc,
            Actor::Config,
            Some(format!("rollout state changed by the config: {why}")),
        )),
        None if to != current.state => {
            // The state file says something else than memory (edited or
            // deleted by hand): it wins, without being written back.
            let mut decision = change(
                &current.state,
                to,
                svc,
                Actor::Config,
                Some("rollout state changed by its state file".into()),
            );
            decision.effects.retain(|e| *e != Effect::Persist);
            Ok(decision)
        }
        None => Ok(Decision {
            to: Rollout::new(to),
            effects: Vec::new(),
        }),
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

#[cfg(test)]
mod tests;

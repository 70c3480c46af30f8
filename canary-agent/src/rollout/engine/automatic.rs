//! Decisions nobody asked for: the judge's verdicts, the team's checks and
//! the data plane's breaker.

use super::{
    Actor, CheckRound, Decision, Duration, Effect, Gate, Judgement, Outcome, RollbackReason,
    Rollout, ServiceConfig, ServiceState, Verdict, change, progressing,
};

pub(super) fn judged(
    svc: &ServiceConfig,
    current: &Rollout,
    judgement: &Judgement,
    now: u64,
) -> Decision {
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
pub(super) fn judge_rollback(
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
pub(super) fn step_done(
    svc: &ServiceConfig,
    state: &ServiceState,
    held: Duration,
    canary: u64,
) -> bool {
    let (Some(plan), ServiceState::Progressing { step, .. }) = (svc.rollout.as_ref(), state) else {
        return false;
    };
    let at = &plan.steps[(*step as usize).min(plan.steps.len() - 1)];
    held >= at.hold && canary >= at.min_connections
}

/// The state after a progressing plan's current step passes, and that
/// step's number (from 1).
pub(super) fn next_state(
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

/// The checks' verdict: a failing check rolls back (whatever the plan's
/// state, like the judge); a check inconclusive `max_inconclusive` times in
/// a row pauses a progressing plan, for a person to look at. A round that
/// passes changes nothing here: whether a step may advance on it is the
/// daemon's (the latest round must have passed, `Judgement::may_advance`).
pub(super) fn checked(
    svc: &ServiceConfig,
    current: &Rollout,
    round: &CheckRound,
    now: u64,
) -> Decision {
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

pub(super) fn breaker(current: &Rollout, failures: u64, attempts: u64, now: u64) -> Decision {
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

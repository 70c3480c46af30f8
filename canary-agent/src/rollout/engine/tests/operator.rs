//! Operator commands: every command from every state, and the refusals'
//! text.

use super::*;

// --- set-weight ---

#[test]
fn set_weight_from_idle_fixes_the_weight() {
    let d = op(&plain(), ServiceState::IDLE, Command::SetWeight(pct("2%"))).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Idle {
            weight_ppm: Some(20_000)
        }
    );
    is_change(&d, Actor::Operator);
    assert!(
        !resets_breaker(&d),
        "a weight change never resets the breaker"
    );
}

#[test]
fn set_weight_stops_a_running_plan() {
    let s = to(op(
        &planned(),
        progressing(1),
        Command::SetWeight(pct("3%")),
    ));
    assert_eq!(
        s,
        ServiceState::Idle {
            weight_ppm: Some(30_000)
        }
    );
}

#[test]
fn set_weight_after_a_promotion_is_allowed() {
    let s = to(op(
        &plain(),
        ServiceState::Promoted { at_unix: 1 },
        Command::SetWeight(pct("50%")),
    ));
    assert_eq!(s.name(), "idle");
}

#[test]
fn set_weight_while_rolled_back_is_refused() {
    let why = refused(op(&plain(), rolled_back(), Command::SetWeight(pct("1%"))));
    assert_eq!(
        why,
        "service \"web\": it is rolled back; `canaryctl resume` it first"
    );
}

#[test]
fn set_weight_above_zero_without_canary_backends_is_refused() {
    let why = refused(op(
        &bare(),
        ServiceState::IDLE,
        Command::SetWeight(pct("1%")),
    ));
    assert_eq!(why, "service \"web\": it has no canary backends");
}

#[test]
fn set_weight_zero_without_canary_backends_is_allowed() {
    let s = to(op(
        &bare(),
        ServiceState::IDLE,
        Command::SetWeight(pct("0%")),
    ));
    assert_eq!(
        s,
        ServiceState::Idle {
            weight_ppm: Some(0)
        }
    );
}

// --- promote ---

#[test]
fn promote_from_idle_sends_everything_to_canary() {
    let d = op(&plain(), ServiceState::IDLE, Command::Promote).unwrap();
    assert_eq!(d.to.state, ServiceState::Promoted { at_unix: NOW });
    assert_eq!(d.to.state.effective_weight(&plain()).ppm(), 1_000_000);
    is_change(&d, Actor::Operator);
}

#[test]
fn promote_skips_the_rest_of_a_plan() {
    assert_eq!(
        to(op(&planned(), progressing(0), Command::Promote)).name(),
        "promoted"
    );
}

#[test]
fn promote_while_rolled_back_lets_the_canary_in_and_resets_the_breaker() {
    let d = op(&plain(), rolled_back(), Command::Promote).unwrap();
    assert_eq!(d.to.state.name(), "promoted");
    assert!(resets_breaker(&d));
}

#[test]
fn promote_without_canary_backends_is_refused() {
    let why = refused(op(&bare(), ServiceState::IDLE, Command::Promote));
    assert_eq!(why, "service \"web\": it has no canary backends to promote");
}

// --- rollback ---

#[test]
fn rollback_from_idle_is_an_operator_rollback() {
    let d = op(&plain(), ServiceState::IDLE, Command::Rollback).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::RolledBack {
            reason: RollbackReason::Operator,
            at_unix: NOW,
            detail: "canaryctl rollback".into()
        }
    );
    assert!(!d.to.state.canary_allowed());
    assert_eq!(d.to.state.effective_weight(&plain()).ppm(), 0);
    is_change(&d, Actor::Operator);
}

#[test]
fn rollback_of_a_progressing_plan() {
    assert_eq!(
        to(op(&planned(), progressing(2), Command::Rollback)).name(),
        "rolled-back"
    );
}

#[test]
fn rollback_of_a_promotion() {
    let s = to(op(
        &plain(),
        ServiceState::Promoted { at_unix: 1 },
        Command::Rollback,
    ));
    assert_eq!(s.name(), "rolled-back");
}

#[test]
fn rollback_twice_is_refused() {
    let why = refused(op(&plain(), rolled_back(), Command::Rollback));
    assert_eq!(why, "service \"web\": it is already rolled back");
}

#[test]
fn rollback_needs_no_canary_backends() {
    assert_eq!(
        to(op(&bare(), ServiceState::IDLE, Command::Rollback)).name(),
        "rolled-back"
    );
}

// --- resume ---

#[test]
fn resume_after_a_rollback_without_a_plan_returns_to_the_configured_weight() {
    let d = op(&plain(), rolled_back(), Command::Resume).unwrap();
    assert_eq!(d.to.state, ServiceState::IDLE);
    assert_eq!(d.to.state.effective_weight(&plain()).ppm(), 50_000);
    assert!(resets_breaker(&d), "resume is where the breaker is reset");
    let reset = d.effects.iter().position(|e| *e == Effect::ResetBreaker);
    let program = d.effects.iter().position(|e| *e == Effect::Program);
    assert!(reset < program, "reset before the canary is let back in");
}

#[test]
fn resume_after_a_rollback_starts_a_plan_over() {
    let d = op(&planned(), rolled_back(), Command::Resume).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 0,
            since_unix: NOW
        }
    );
    assert!(resets_breaker(&d));
}

#[test]
fn resume_of_a_paused_plan_goes_on_at_its_step() {
    let paused = ServiceState::Paused {
        step: 2,
        weight_ppm: 250_000,
    };
    let d = op(&planned(), paused, Command::Resume).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 2,
            since_unix: NOW
        }
    );
    assert!(
        !resets_breaker(&d),
        "only a rolled-back canary resets its breaker"
    );
}

#[test]
fn resume_after_a_promotion_starts_a_plan_over() {
    let s = to(op(
        &planned(),
        ServiceState::Promoted { at_unix: 1 },
        Command::Resume,
    ));
    assert_eq!(
        s,
        ServiceState::Progressing {
            step: 0,
            since_unix: NOW
        }
    );
}

#[test]
fn resume_clears_an_operators_weight() {
    let manual = ServiceState::Idle {
        weight_ppm: Some(7),
    };
    assert_eq!(
        to(op(&plain(), manual, Command::Resume)),
        ServiceState::IDLE
    );
}

#[test]
fn resume_of_a_progressing_plan_is_refused() {
    let why = refused(op(&planned(), progressing(0), Command::Resume));
    assert_eq!(why, "service \"web\": its rollout is already progressing");
}

#[test]
fn resume_of_a_gated_plan_is_refused() {
    let why = refused(op(
        &planned(),
        ServiceState::AwaitingApproval { step: 1 },
        Command::Resume,
    ));
    assert_eq!(
        why,
        "service \"web\": its rollout is already awaiting-approval"
    );
}

// --- pause ---

#[test]
fn pause_holds_a_progressing_plan_at_its_weight() {
    let d = op(&planned(), progressing(0), Command::Pause).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Paused {
            step: 0,
            weight_ppm: 10_000
        }
    );
    is_change(&d, Actor::Operator);
}

#[test]
fn pause_of_an_idle_service_is_refused() {
    let why = refused(op(&plain(), ServiceState::IDLE, Command::Pause));
    assert_eq!(
        why,
        "service \"web\": pause holds a progressing rollout; it is idle"
    );
}

#[test]
fn pause_twice_is_refused() {
    let paused = ServiceState::Paused {
        step: 0,
        weight_ppm: 1,
    };
    let why = refused(op(&planned(), paused, Command::Pause));
    assert_eq!(
        why,
        "service \"web\": pause holds a progressing rollout; it is paused"
    );
}

#[test]
fn pause_of_a_gated_plan_is_refused() {
    let why = refused(op(
        &planned(),
        ServiceState::AwaitingApproval { step: 1 },
        Command::Pause,
    ));
    assert!(why.ends_with("it is awaiting-approval"), "{why}");
}

// --- approve ---

#[test]
fn approve_enters_the_gated_step() {
    let d = op(
        &planned(),
        ServiceState::AwaitingApproval { step: 1 },
        Command::Approve,
    )
    .unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 1,
            since_unix: NOW
        }
    );
    assert_eq!(d.to.state.effective_weight(&planned()).ppm(), 50_000);
}

#[test]
fn approve_with_nothing_gated_is_refused() {
    let why = refused(op(&planned(), progressing(0), Command::Approve));
    assert_eq!(
        why,
        "service \"web\": nothing awaits approval; it is progressing"
    );
}

#[test]
fn approve_of_a_rolled_back_service_is_refused() {
    let why = refused(op(&planned(), rolled_back(), Command::Approve));
    assert_eq!(
        why,
        "service \"web\": nothing awaits approval; it is rolled-back"
    );
}

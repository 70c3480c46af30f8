//! What happens without an operator: judgements, breaker trips and config
//! loads.

use super::*;

// --- the judge ---

#[test]
fn a_passing_judgement_before_the_hold_holds_the_step() {
    let d = decide(
        &planned(),
        &at(progressing(0)),
        judged(pass(), 60, 1000),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, progressing(0));
    assert_eq!(d.effects, vec![Effect::Verdict("judge: pass: ok".into())]);
}

#[test]
fn a_passing_judgement_without_enough_connections_holds_the_step() {
    let d = decide(
        &planned(),
        &at(progressing(0)),
        judged(pass(), 900, 99),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, progressing(0));
}

#[test]
fn a_passing_judgement_after_hold_and_connections_reaches_the_gate() {
    let d = decide(
        &planned(),
        &at(progressing(0)),
        judged(pass(), 600, 100),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, ServiceState::AwaitingApproval { step: 1 });
    is_change(&d, Actor::Judge);
    assert!(d.effects.contains(&Effect::Announce {
        by: Actor::Judge,
        verdict: "step 1 passed: pass: ok".into()
    }));
}

#[test]
fn a_passed_ungated_step_enters_the_next() {
    let d = decide(&planned(), &at(progressing(1)), judged(pass(), 0, 0), NOW).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 2,
            since_unix: NOW
        }
    );
}

#[test]
fn the_last_passed_step_promotes() {
    let d = decide(&planned(), &at(progressing(2)), judged(pass(), 0, 0), NOW).unwrap();
    assert_eq!(d.to.state, ServiceState::Promoted { at_unix: NOW });
}

#[test]
fn insufficient_data_holds_the_step() {
    let d = decide(
        &planned(),
        &at(progressing(0)),
        judged(insufficient(), 900, 1000),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to, at(progressing(0)));
    assert_eq!(d.effects.len(), 1, "only the verdict: {:?}", d.effects);
}

#[test]
fn one_failing_judgement_rolls_back_at_once() {
    // The judge's sequential tests bound false rollbacks over the whole
    // rollout: there is no count of failures in a row any more.
    let d = decide(
        &planned(),
        &at(progressing(1)),
        judged(fail(), 900, 1000),
        NOW,
    )
    .unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::RolledBack {
            reason: RollbackReason::Judge,
            at_unix: NOW,
            detail: "fail (failures): worse".into()
        }
    );
    is_change(&d, Actor::Judge);
    assert!(d.effects.contains(&Effect::Announce {
        by: Actor::Judge,
        verdict: "rolled back by the judge: fail (failures): worse".into()
    }));
}

#[test]
fn the_judge_still_guards_a_paused_plan() {
    let paused = ServiceState::Paused {
        step: 1,
        weight_ppm: 50_000,
    };
    let d = decide(&planned(), &at(paused), judged(fail(), 0, 0), NOW).unwrap();
    assert_eq!(d.to.state.name(), "rolled-back");
}

#[test]
fn a_paused_plan_does_not_advance_on_a_pass() {
    let paused = ServiceState::Paused {
        step: 0,
        weight_ppm: 10_000,
    };
    let d = decide(
        &planned(),
        &at(paused.clone()),
        judged(pass(), 9999, 9999),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, paused);
}

#[test]
fn a_gated_plan_does_not_advance_on_a_pass() {
    let gated = ServiceState::AwaitingApproval { step: 1 };
    let d = decide(
        &planned(),
        &at(gated.clone()),
        judged(pass(), 9999, 9999),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, gated);
}

#[test]
fn a_judgement_of_a_service_that_left_its_plan_changes_nothing() {
    for state in [
        ServiceState::IDLE,
        rolled_back(),
        ServiceState::Promoted { at_unix: 1 },
    ] {
        let d = decide(&planned(), &at(state.clone()), judged(fail(), 0, 0), NOW).unwrap();
        assert_eq!(d.to.state, state);
        assert!(d.effects.is_empty());
    }
}

// --- the breaker ---

#[test]
fn a_breaker_trip_rolls_back_and_never_resets_the_breaker() {
    let d = decide(
        &plain(),
        &at(ServiceState::IDLE),
        Event::BreakerTripped {
            failures: 3,
            attempts: 4,
        },
        NOW,
    )
    .unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::RolledBack {
            reason: RollbackReason::Breaker,
            at_unix: NOW,
            detail: "3 canary failures of 4 attempts in one breaker window".into()
        }
    );
    is_change(&d, Actor::Breaker);
    assert!(!resets_breaker(&d));
}

#[test]
fn a_breaker_trip_rolls_back_a_progressing_plan() {
    let d = decide(
        &planned(),
        &at(progressing(2)),
        Event::BreakerTripped {
            failures: 9,
            attempts: 9,
        },
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state.name(), "rolled-back");
}

#[test]
fn a_breaker_trip_of_a_rolled_back_service_changes_nothing() {
    let d = decide(
        &plain(),
        &at(rolled_back()),
        Event::BreakerTripped {
            failures: 3,
            attempts: 3,
        },
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, rolled_back());
    assert!(
        d.effects.is_empty(),
        "not rolled back twice: {:?}",
        d.effects
    );
}

// --- config loads ---

pub(super) fn configured(
    svc: &ServiceConfig,
    current: ServiceState,
    saved: ServiceState,
) -> Result<Decision, Refusal> {
    let saved = Saved {
        release: None,
        rollout: saved,
    };
    decide(svc, &at(current), Event::Configured { saved }, NOW)
}

#[test]
fn a_plan_with_no_state_starts_at_its_first_step() {
    let d = configured(&planned(), ServiceState::IDLE, ServiceState::IDLE).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 0,
            since_unix: NOW
        }
    );
    is_change(&d, Actor::Config);
}

#[test]
fn a_saved_state_that_fits_is_kept_without_effects() {
    let d = configured(&planned(), progressing(1), progressing(1)).unwrap();
    assert_eq!(d.to.state, progressing(1));
    assert!(d.effects.is_empty());
}

#[test]
fn a_promotion_whose_canary_list_was_removed_ends_the_rollout() {
    let promoted = ServiceState::Promoted { at_unix: 1 };
    let d = configured(&bare(), promoted.clone(), promoted).unwrap();
    assert_eq!(d.to.state, ServiceState::IDLE);
    is_change(&d, Actor::Config);
    assert!(d.effects.contains(&Effect::Announce {
        by: Actor::Config,
        verdict: "rollout state changed by the config: the config has no canary backends for it any more".into()
    }));
}

#[test]
fn an_operators_weight_whose_canary_list_was_removed_ends_the_rollout() {
    let manual = ServiceState::Idle {
        weight_ppm: Some(50_000),
    };
    assert_eq!(
        to(configured(&bare(), manual.clone(), manual)),
        ServiceState::IDLE
    );
}

#[test]
fn a_rollback_whose_canary_list_was_removed_stays() {
    let d = configured(&bare(), rolled_back(), rolled_back()).unwrap();
    assert_eq!(
        d.to.state,
        rolled_back(),
        "weight 0 fits a service without canary"
    );
}

#[test]
fn a_plan_step_of_a_service_that_lost_its_plan_ends_the_rollout() {
    let d = configured(&plain(), progressing(1), progressing(1)).unwrap();
    assert_eq!(d.to.state, ServiceState::IDLE);
}

#[test]
fn a_plan_step_the_new_plan_lacks_is_refused() {
    let why = refused(configured(&planned(), progressing(5), progressing(5)));
    assert_eq!(
        why,
        "service \"web\": its saved rollout state (progressing) does not fit the config: it is at \
         step 6 of its plan and the config's plan has 3 steps; `canaryctl rollback` or \
         `canaryctl promote` it first, or delete its state file to start the plan over"
    );
}

#[test]
fn a_deleted_state_file_lets_a_rolled_back_canary_in_and_resets_the_breaker() {
    let d = configured(&plain(), rolled_back(), ServiceState::IDLE).unwrap();
    assert_eq!(d.to.state, ServiceState::IDLE);
    assert!(resets_breaker(&d));
    assert!(
        !d.effects.contains(&Effect::Persist),
        "the file is the source: not rewritten"
    );
}

#[test]
fn a_state_file_written_by_hand_wins_over_memory() {
    let d = configured(&planned(), progressing(0), progressing(2)).unwrap();
    assert_eq!(d.to.state, progressing(2));
    assert!(d.effects.contains(&Effect::Program));
}

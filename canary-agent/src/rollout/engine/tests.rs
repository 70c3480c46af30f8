//! Every transition of the rollout state machine, legal and illegal, with
//! the refusals' text. No root, no I/O.

use std::time::Duration;

use super::*;
use crate::{config::Config, judge::Verdict};

const NOW: u64 = 1_700_000_000;

/// A service from config text: `extra` is added to `[[service]]`.
fn service(extra: &str) -> ServiceConfig {
    let text = format!(
        "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\n\
         stable = [\"10.0.0.1:80\"]\n{extra}\n"
    );
    Config::parse(&text, std::path::Path::new("t.toml"), &[])
        .expect("test config parses")
        .services
        .remove(0)
}

/// With a canary and a three-step plan whose second step is gated.
fn planned() -> ServiceConfig {
    service(
        "canary = [\"10.0.0.2:80\"]\n[service.rollout]\nfail_after = 2\nsteps = [\
         { weight = \"1%\", hold = \"10m\", min_connections = 100 }, \
         { weight = \"5%\", gate = \"manual\" }, { weight = \"25%\" }]",
    )
}

/// With a canary, no plan.
fn plain() -> ServiceConfig {
    service("canary = [\"10.0.0.2:80\"]\nweight = \"5%\"")
}

/// Stable only.
fn bare() -> ServiceConfig {
    service("")
}

fn at(state: ServiceState) -> Rollout {
    Rollout::new(state)
}

fn progressing(step: u32) -> ServiceState {
    ServiceState::Progressing {
        step,
        since_unix: NOW - 60,
    }
}

fn rolled_back() -> ServiceState {
    ServiceState::RolledBack {
        reason: RollbackReason::Breaker,
        at_unix: NOW - 60,
        detail: "x".into(),
    }
}

fn op(svc: &ServiceConfig, state: ServiceState, c: Command) -> Result<Decision, Refusal> {
    decide(svc, &at(state), Event::Operator(c), NOW)
}

fn refused(result: Result<Decision, Refusal>) -> String {
    result.expect_err("must be refused").0
}

fn to(result: Result<Decision, Refusal>) -> ServiceState {
    result.expect("must be allowed").to.state
}

fn pct(p: &str) -> Weight {
    p.parse().expect("weight")
}

fn pass() -> Verdict {
    Verdict::Pass {
        detail: "ok".into(),
    }
}

fn fail() -> Verdict {
    Verdict::Fail {
        reason: "failures".into(),
        detail: "worse".into(),
    }
}

fn insufficient() -> Verdict {
    Verdict::InsufficientData {
        detail: "few".into(),
    }
}

fn judged(verdict: Verdict, held_s: u64, conns: u64) -> Event {
    Event::Judged(Judgement {
        verdict,
        held: Duration::from_secs(held_s),
        canary_connections: conns,
    })
}

/// The usual effects of a change by `by`.
fn is_change(d: &Decision, by: Actor) {
    assert_eq!(d.effects[0], Effect::Persist, "{:?}", d.effects);
    assert!(d.effects.contains(&Effect::Program), "{:?}", d.effects);
    assert!(
        d.effects.contains(&Effect::RestartWindow),
        "{:?}",
        d.effects
    );
    assert!(
        d.effects
            .iter()
            .any(|e| matches!(e, Effect::Announce { by: b, .. } if *b == by)),
        "{:?}",
        d.effects
    );
}

fn resets_breaker(d: &Decision) -> bool {
    d.effects.contains(&Effect::ResetBreaker)
}

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
fn insufficient_data_holds_and_clears_the_failure_count() {
    let current = Rollout {
        state: progressing(0),
        failing: 1,
    };
    let d = decide(&planned(), &current, judged(insufficient(), 900, 1000), NOW).unwrap();
    assert_eq!(
        d.to,
        Rollout {
            state: progressing(0),
            failing: 0
        }
    );
}

#[test]
fn one_failing_judgement_below_fail_after_only_counts() {
    let d = decide(
        &planned(),
        &at(progressing(1)),
        judged(fail(), 900, 1000),
        NOW,
    )
    .unwrap();
    assert_eq!(
        d.to,
        Rollout {
            state: progressing(1),
            failing: 1
        }
    );
    assert_eq!(
        d.effects,
        vec![Effect::Verdict("judge: fail (failures): worse".into())]
    );
}

#[test]
fn fail_after_failing_judgements_in_a_row_roll_back() {
    let current = Rollout {
        state: progressing(1),
        failing: 1,
    };
    let d = decide(&planned(), &current, judged(fail(), 900, 1000), NOW).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::RolledBack {
            reason: RollbackReason::Judge,
            at_unix: NOW,
            detail: "fail (failures): worse (2 judgements in a row)".into()
        }
    );
    is_change(&d, Actor::Judge);
}

#[test]
fn a_pass_between_failures_starts_the_count_over() {
    let current = Rollout {
        state: progressing(0),
        failing: 1,
    };
    let d = decide(&planned(), &current, judged(pass(), 0, 0), NOW).unwrap();
    assert_eq!(d.to.failing, 0);
    let d = decide(&planned(), &d.to, judged(fail(), 0, 0), NOW).unwrap();
    assert_eq!(
        d.to.state,
        progressing(0),
        "one failure after a pass is not two in a row"
    );
}

#[test]
fn the_judge_still_guards_a_paused_plan() {
    let paused = ServiceState::Paused {
        step: 1,
        weight_ppm: 50_000,
    };
    let current = Rollout {
        state: paused,
        failing: 1,
    };
    let d = decide(&planned(), &current, judged(fail(), 0, 0), NOW).unwrap();
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

fn configured(
    svc: &ServiceConfig,
    current: ServiceState,
    saved: ServiceState,
) -> Result<Decision, Refusal> {
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

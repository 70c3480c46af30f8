//! The team's checks, the fleet's evidence from Prometheus, and shadow
//! mode.

use std::time::Duration;

use super::*;
use crate::analysis::{CheckOutcome, Outcome};

const ANALYSIS: &str = "\n[analysis]\nprometheus = \"http://127.0.0.1:9090\"\n";

const CHECK: &str = "[[service.rollout.checks]]\nname = \"http-5xx\"\n\
     query = 'sum(rate(x{version=\"{{cohort}}\"}[{{window}}]))'\nmax_increase = 0.01\n";

/// A two-step plan with one check.
fn checked_plan(mode: &str) -> ServiceConfig {
    service(&format!(
        "canary = [\"10.0.0.2:80\"]\n{mode}[service.rollout]\nsteps = [{{ weight = \"1%\" }}, \
         {{ weight = \"5%\" }}]\n{}{CHECK}{ANALYSIS}",
        if mode.is_empty() {
            ""
        } else {
            "mode = \"shadow\"\n"
        }
    ))
}

fn round(outcome: Outcome, in_a_row: u32) -> Event {
    Event::Checked(CheckRound {
        outcomes: vec![CheckOutcome {
            name: "http-5xx".into(),
            outcome,
            inconclusive_in_a_row: in_a_row,
        }],
        max_inconclusive: 3,
    })
}

fn announced(d: &Decision) -> &str {
    d.effects
        .iter()
        .find_map(|e| match e {
            Effect::Announce { verdict, .. } => Some(verdict.as_str()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("expected an announcement, got {:?}", d.effects))
}

#[test]
fn a_failing_check_rolls_back_naming_the_check_and_both_values() {
    let svc = checked_plan("");
    let line = "check \"http-5xx\": canary 0.031 vs stable 0.002 (max_increase 0.01)";
    let d = decide(
        &svc,
        &at(progressing(0)),
        round(Outcome::Fail(line.into()), 0),
        NOW,
    )
    .unwrap();
    is_change(&d, Actor::Checks);
    assert_eq!(
        d.to.state,
        ServiceState::RolledBack {
            reason: RollbackReason::Check,
            at_unix: NOW,
            detail: line.into()
        }
    );
    assert_eq!(announced(&d), format!("rolled back by the checks: {line}"));
    // Gated and paused plans are guarded too.
    for state in [
        ServiceState::AwaitingApproval { step: 1 },
        ServiceState::Paused {
            step: 0,
            weight_ppm: 10_000,
        },
    ] {
        let d = decide(&svc, &at(state), round(Outcome::Fail(line.into()), 0), NOW).unwrap();
        assert_eq!(d.to.state.name(), "rolled-back");
    }
}

#[test]
fn inconclusive_checks_hold_then_pause_after_max_inconclusive() {
    let svc = checked_plan("");
    let why = "check \"http-5xx\": inconclusive, canary: cannot connect to Prometheus";
    for n in 1..3 {
        let d = decide(
            &svc,
            &at(progressing(0)),
            round(Outcome::Inconclusive(why.into()), n),
            NOW,
        )
        .unwrap();
        assert!(d.effects.is_empty(), "{n} in a row holds: {:?}", d.effects);
        assert_eq!(d.to.state, progressing(0));
    }
    let d = decide(
        &svc,
        &at(progressing(0)),
        round(Outcome::Inconclusive(why.into()), 3),
        NOW,
    )
    .unwrap();
    is_change(&d, Actor::Checks);
    assert_eq!(
        d.to.state,
        ServiceState::Paused {
            step: 0,
            weight_ppm: 10_000
        }
    );
    assert_eq!(
        announced(&d),
        format!(
            "paused by the checks: {why} (3 evaluations in a row, max_inconclusive 3); \
             `canaryctl resume` once the evidence is back"
        )
    );
    // Already paused: stays, no new announcement.
    let paused = d.to.state;
    let d = decide(
        &svc,
        &at(paused.clone()),
        round(Outcome::Inconclusive(why.into()), 9),
        NOW,
    )
    .unwrap();
    assert_eq!((d.to.state, d.effects.len()), (paused, 0));
}

#[test]
fn passing_checks_change_nothing_and_stale_rounds_are_ignored() {
    let svc = checked_plan("");
    let d = decide(
        &svc,
        &at(progressing(0)),
        round(Outcome::Pass("ok".into()), 0),
        NOW,
    )
    .unwrap();
    assert_eq!((d.to.state, d.effects.len()), (progressing(0), 0));
    let d = decide(
        &svc,
        &at(rolled_back()),
        round(Outcome::Fail("x".into()), 0),
        NOW,
    )
    .unwrap();
    assert!(d.effects.is_empty(), "already rolled back: stale");
}

fn gate_with(verdict: Verdict) -> Event {
    Event::FleetGate(FleetEvidence {
        held: Duration::from_hours(1),
        canary_connections: 1000,
        nodes: 3,
        failing: Vec::new(),
        fleet_verdict: Some(verdict),
    })
}

#[test]
fn the_fleets_prometheus_verdict_rolls_back_holds_or_lets_the_step_pass() {
    let svc = checked_plan("");
    let d = decide(&svc, &at(progressing(0)), gate_with(fail()), NOW).unwrap();
    is_change(&d, Actor::Fleet);
    assert_eq!(d.to.state.name(), "rolled-back");
    assert_eq!(
        announced(&d),
        "rolled back by the fleet's judge: fail (failures): worse"
    );
    let d = decide(&svc, &at(progressing(0)), gate_with(insufficient()), NOW).unwrap();
    assert!(d.effects.is_empty(), "inconclusive holds: {:?}", d.effects);
    let d = decide(&svc, &at(progressing(0)), gate_with(pass()), NOW).unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 1,
            since_unix: NOW
        }
    );
}

#[test]
fn shadow_mode_decides_and_says_it_did_not_enforce() {
    let svc = service(&format!(
        "canary = [\"10.0.0.2:80\"]\nweight = \"10%\"\n[service.rollout]\nmode = \"shadow\"\n\
         steps = [{{ weight = \"1%\" }}, {{ weight = \"5%\" }}]\n{CHECK}{ANALYSIS}"
    ));
    let line = "check \"http-5xx\": canary 0.5 vs stable 0 (max_increase 0.01)";
    let d = decide(
        &svc,
        &at(progressing(0)),
        round(Outcome::Fail(line.into()), 0),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state.name(), "rolled-back", "the decision is taken…");
    assert_eq!(
        announced(&d),
        format!(
            "shadow mode, not enforced (the weight stays): would have rolled back by the checks: {line}"
        )
    );
    // …and not enforced: the configured weight stays, the canary is not
    // cut off.
    assert_eq!(
        crate::rollout::enforced(&svc, &d.to.state),
        (pct("10%"), false)
    );
    assert_eq!(
        crate::rollout::enforced(&svc, &progressing(1)),
        (pct("10%"), false)
    );
    // An operator's rollback and weight act in shadow mode too.
    let d = op(&svc, progressing(0), Command::Rollback).unwrap();
    assert!(!announced(&d).contains("shadow"), "{}", announced(&d));
    assert_eq!(
        crate::rollout::enforced(&svc, &d.to.state),
        (pct("0%"), true)
    );
    let d = op(&svc, progressing(0), Command::SetWeight(pct("2%"))).unwrap();
    assert_eq!(
        crate::rollout::enforced(&svc, &d.to.state),
        (pct("2%"), false)
    );
    // Enforce mode enforces the same rollback.
    let enforcing = checked_plan("");
    let d = decide(
        &enforcing,
        &at(progressing(0)),
        round(Outcome::Fail(line.into()), 0),
        NOW,
    )
    .unwrap();
    assert_eq!(
        crate::rollout::enforced(&enforcing, &d.to.state),
        (pct("0%"), true)
    );
}

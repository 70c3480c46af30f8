//! Releases and the fleet: a new release starts afresh, states decided
//! elsewhere are taken, only the leader's gate moves a fleet's plan on.

use super::*;

fn saved(release: Option<&str>, state: ServiceState) -> Event {
    Event::Configured {
        saved: Saved {
            release: release.map(str::to_string),
            rollout: state,
        },
    }
}

#[test]
fn a_new_release_starts_its_rollout_afresh_and_a_rolled_back_one_stays_back() {
    let svc = planned();
    // The derived release of canary = ["10.0.0.2:80"].
    let ours = svc.release.clone();
    assert!(ours.starts_with("canary-"), "{ours}");
    let d = decide(
        &svc,
        &at(rolled_back()),
        saved(Some("v1"), rolled_back()),
        NOW,
    )
    .unwrap();
    assert_eq!(
        d.to.state,
        ServiceState::Progressing {
            step: 0,
            since_unix: NOW
        }
    );
    is_change(&d, Actor::Config);
    assert!(resets_breaker(&d), "the new release gets a fresh breaker");
    let Some(Effect::Announce { verdict, .. }) = d.effects.last() else {
        panic!("{:?}", d.effects)
    };
    assert!(
        verdict.contains(&format!("new release {ours:?}")) && verdict.contains("release \"v1\"'s"),
        "{verdict}"
    );
    // The same release stays rolled back (also from a file that predates
    // release identity).
    for release in [Some(ours.as_str()), None] {
        let d = decide(&svc, &at(rolled_back()), saved(release, rolled_back()), NOW).unwrap();
        assert_eq!(d.to.state, rolled_back());
        assert!(d.effects.is_empty(), "{:?}", d.effects);
    }
    // Without a plan, a new release goes back to the configured weight.
    let d = decide(
        &plain(),
        &at(rolled_back()),
        saved(Some("v1"), rolled_back()),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, ServiceState::IDLE);
}

#[test]
fn an_explicit_release_names_the_rollout_and_new_canary_backends_derive_a_new_one() {
    let named = service("canary = [\"10.0.0.2:80\"]\nrelease = \"v2.4.1\"");
    assert_eq!(named.release, "v2.4.1");
    let a = service("canary = [\"10.0.0.2:80\", \"10.0.0.3:80\"]").release;
    let b = service("canary = [\"10.0.0.3:80\", \"10.0.0.2:80\"]").release;
    let c = service("canary = [\"10.0.0.4:80\"]").release;
    assert_eq!(a, b, "the order of the list does not matter");
    assert_ne!(a, c, "other backends are another release");
    let err = Config::parse(
        "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\n\
         stable = [\"10.0.0.1:80\"]\nrelease = \"v2 final\"\n",
        std::path::Path::new("t.toml"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("release") && err.contains("v2 final") && err.contains("e.g. \"v2.4.1\""),
        "{err}"
    );
}

fn remote(state: ServiceState) -> Event {
    Event::Decided(Remote {
        state,
        node: "node-b".into(),
        by: "the judge".into(),
        verdict: "rolled back by the judge: canary worse".into(),
    })
}

#[test]
fn a_state_decided_elsewhere_is_taken_with_this_nodes_effects() {
    let svc = planned();
    let d = decide(&svc, &at(progressing(0)), remote(rolled_back()), NOW).unwrap();
    assert_eq!(d.to.state, rolled_back());
    is_change(&d, Actor::Fleet);
    let Some(Effect::Announce { verdict, .. }) = d.effects.last() else {
        panic!("{:?}", d.effects)
    };
    assert_eq!(
        verdict,
        "rolled back by the judge: canary worse (on node-b, by the judge)"
    );
    // Let back in: a fresh breaker here too.
    let d = decide(&svc, &at(rolled_back()), remote(progressing(0)), NOW).unwrap();
    assert!(resets_breaker(&d));
    // What this node already has changes nothing.
    let d = decide(&svc, &at(progressing(1)), remote(progressing(1)), NOW).unwrap();
    assert!(d.effects.is_empty());
}

fn gate(held_s: u64, conns: u64, failing: &[&str]) -> Event {
    Event::FleetGate(FleetEvidence {
        held: Duration::from_secs(held_s),
        canary_connections: conns,
        nodes: 3,
        failing: failing.iter().map(ToString::to_string).collect(),
        fleet_verdict: None,
    })
}

#[test]
fn only_the_fleet_gate_moves_a_fleet_plan_on() {
    let svc = planned();
    // A node's own judge passes, but in a fleet it may not advance.
    let mut ev = judged(pass(), 3600, 1000);
    if let Event::Judged(j) = &mut ev {
        j.may_advance = false;
    }
    let d = decide(&svc, &at(progressing(0)), ev, NOW).unwrap();
    assert_eq!(d.to.state, progressing(0));
    // …but it still rolls back.
    let mut ev = judged(fail(), 0, 10);
    if let Event::Judged(j) = &mut ev {
        j.may_advance = false;
    }
    let d = decide(&svc, &at(progressing(0)), ev, NOW).unwrap();
    assert_eq!(d.to.state.name(), "rolled-back");
    // The gate: hold (10 min) and min_connections (100) over the fleet.
    let d = decide(&svc, &at(progressing(0)), gate(599, 1000, &[]), NOW).unwrap();
    assert!(d.effects.is_empty(), "hold not over");
    let d = decide(&svc, &at(progressing(0)), gate(600, 99, &[]), NOW).unwrap();
    assert!(d.effects.is_empty(), "too few connections");
    let d = decide(&svc, &at(progressing(0)), gate(600, 100, &["node-c"]), NOW).unwrap();
    assert!(d.effects.is_empty(), "a node's judge fails");
    let d = decide(&svc, &at(progressing(0)), gate(600, 100, &[]), NOW).unwrap();
    // Step 2 is gated.
    assert_eq!(d.to.state, ServiceState::AwaitingApproval { step: 1 });
    is_change(&d, Actor::Fleet);
    let Some(Effect::Announce { verdict, .. }) = d.effects.last() else {
        panic!("{:?}", d.effects)
    };
    assert_eq!(
        verdict,
        "step 1 passed: fleet: 100 canary connections on 3 node(s) in 600s"
    );
    // Nothing to move on outside a progressing step.
    let d = decide(&svc, &at(rolled_back()), gate(600, 100, &[]), NOW).unwrap();
    assert!(d.effects.is_empty());
}

#[test]
fn a_step_at_100_percent_passes_without_stable_to_compare_with() {
    let svc = service(
        "canary = [\"10.0.0.2:80\"]\n[service.rollout]\nsteps = [{ weight = \"50%\", hold = \"1s\" }, \
         { weight = \"100%\", hold = \"10s\" }]",
    );
    // At 50 % the judge must pass.
    let d = decide(
        &svc,
        &at(progressing(0)),
        judged(insufficient(), 60, 100),
        NOW,
    )
    .unwrap();
    assert!(
        d.effects.iter().all(|e| matches!(e, Effect::Verdict(_))),
        "{:?}",
        d.effects
    );
    // At 100 % stable has nothing: the hold decides (a failure still rolls back).
    let d = decide(
        &svc,
        &at(progressing(1)),
        judged(insufficient(), 5, 100),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, progressing(1), "the hold first");
    let d = decide(
        &svc,
        &at(progressing(1)),
        judged(insufficient(), 10, 100),
        NOW,
    )
    .unwrap();
    assert_eq!(d.to.state, ServiceState::Promoted { at_unix: NOW });
    let d = decide(&svc, &at(progressing(1)), judged(fail(), 10, 100), NOW).unwrap();
    assert_eq!(d.to.state.name(), "rolled-back");
}

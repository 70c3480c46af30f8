//! Every transition of the rollout state machine, legal and illegal, with
//! the refusals' text. No root, no I/O.

use std::time::Duration;

use super::*;
use crate::{config::Config, judge::Verdict};

mod analysis;
mod automatic;
mod fleet;
mod operator;

pub(super) const NOW: u64 = 1_700_000_000;

/// A service from config text: `extra` is added to `[[service]]`.
pub(super) fn service(extra: &str) -> ServiceConfig {
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
pub(super) fn planned() -> ServiceConfig {
    service(
        "canary = [\"10.0.0.2:80\"]\n[service.rollout]\nsteps = [\
         { weight = \"1%\", hold = \"10m\", min_connections = 100 }, \
         { weight = \"5%\", gate = \"manual\" }, { weight = \"25%\" }]",
    )
}

/// With a canary, no plan.
pub(super) fn plain() -> ServiceConfig {
    service("canary = [\"10.0.0.2:80\"]\nweight = \"5%\"")
}

/// Stable only.
pub(super) fn bare() -> ServiceConfig {
    service("")
}

pub(super) fn at(state: ServiceState) -> Rollout {
    Rollout::new(state)
}

pub(super) fn progressing(step: u32) -> ServiceState {
    ServiceState::Progressing {
        step,
        since_unix: NOW - 60,
    }
}

pub(super) fn rolled_back() -> ServiceState {
    ServiceState::RolledBack {
        reason: RollbackReason::Breaker,
        at_unix: NOW - 60,
        detail: "x".into(),
    }
}

pub(super) fn op(
    svc: &ServiceConfig,
    state: ServiceState,
    c: Command,
) -> Result<Decision, Refusal> {
    decide(svc, &at(state), Event::Operator(c), NOW)
}

pub(super) fn refused(result: Result<Decision, Refusal>) -> String {
    result.expect_err("must be refused").0
}

pub(super) fn to(result: Result<Decision, Refusal>) -> ServiceState {
    result.expect("must be allowed").to.state
}

pub(super) fn pct(p: &str) -> Weight {
    p.parse().expect("weight")
}

pub(super) fn pass() -> Verdict {
    Verdict::Pass {
        detail: "ok".into(),
    }
}

pub(super) fn fail() -> Verdict {
    Verdict::Fail {
        reason: "failures".into(),
        detail: "worse".into(),
    }
}

pub(super) fn insufficient() -> Verdict {
    Verdict::InsufficientData {
        detail: "few".into(),
    }
}

pub(super) fn judged(verdict: Verdict, held_s: u64, conns: u64) -> Event {
    Event::Judged(Judgement {
        verdict,
        held: Duration::from_secs(held_s),
        canary_connections: conns,
        may_advance: true,
    })
}

/// The usual effects of a change by `by`.
pub(super) fn is_change(d: &Decision, by: Actor) {
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

pub(super) fn resets_breaker(d: &Decision) -> bool {
    d.effects.contains(&Effect::ResetBreaker)
}

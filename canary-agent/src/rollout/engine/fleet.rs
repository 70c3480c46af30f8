//! The fleet: a state decided elsewhere, and the leader's gate on every
//! node's evidence.

use super::automatic::{judge_rollback, next_state, step_done};
use super::{
    Actor, Decision, FleetEvidence, Remote, Rollout, ServiceConfig, ServiceState, Verdict, change,
};

/// The leader's gate: the step passes when it has been held long enough,
/// the fleet's canary connections at it reach `min_connections`, and no
/// node's judge fails the canary.
pub(super) fn fleet_gate(
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

/// A state the fleet decided: taken as it is (the node that decided
/// checked it against the same release's config), with this node's effects.
pub(super) fn decided(svc: &ServiceConfig, current: &Rollout, remote: Remote) -> Decision {
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

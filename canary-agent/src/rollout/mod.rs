//! Rollout state per service, persisted under `state_dir` so that an agent
//! restart never silently re-raises a rolled-back canary.
//!
//! - `idle`: the configured weight applies, or an operator's `set-weight`;
//! - `progressing(step)`: a rollout plan holds the canary at a step's weight
//!   while the judge compares it with stable, and moves on when the step
//!   passes;
//! - `awaiting-approval(step)`: the next step has a manual gate: the weight
//!   stays at the previous step's until `canaryctl approve`;
//! - `paused(step)`: an operator holds the plan (`pause`; `resume` goes on);
//! - `promoted`: every new connection goes to canary (the plan's end, or
//!   `promote`);
//! - `rolled-back`: no new connection goes to canary, decided by the
//!   breaker, the judge or an operator.

pub mod engine;
pub mod history;
mod store;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use self::store::{MAX_STATE_FILE, StateError, StateStore};
use crate::config::{ServiceConfig, Weight};

/// Rollout states, as exported in `canary_rollout_state{state}`.
pub const STATES: [&str; 6] = [
    "idle",
    "progressing",
    "awaiting-approval",
    "paused",
    "promoted",
    "rolled-back",
];

/// Why a canary was rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackReason {
    /// The data plane's line-rate breaker tripped.
    Breaker,
    /// An operator said so (`canaryctl rollback`).
    Operator,
    /// The judge found the canary worse than stable.
    Judge,
    /// A team's PromQL check failed (`[[service.rollout.checks]]`).
    Check,
}

impl RollbackReason {
    /// Every reason, for exporting zero counts.
    pub const ALL: [RollbackReason; 4] = [
        RollbackReason::Breaker,
        RollbackReason::Operator,
        RollbackReason::Judge,
        RollbackReason::Check,
    ];

    /// Label value of `canary_rollbacks_total{reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::Breaker => "breaker",
            RollbackReason::Operator => "operator",
            RollbackReason::Judge => "judge",
            RollbackReason::Check => "check",
        }
    }
}

/// The persisted state of one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ServiceState {
    /// The configured weight applies, unless an operator set one.
    Idle {
        /// `canaryctl set-weight`, in ppm; `None` = the configured weight.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight_ppm: Option<u32>,
    },
    /// A plan holds the canary at `step` while the judge watches.
    Progressing {
        /// Index into the plan's steps.
        step: u32,
        /// Wall-clock time the step started, seconds since the Unix epoch.
        since_unix: u64,
    },
    /// Waiting for `canaryctl approve` to enter `step`.
    AwaitingApproval {
        /// The gated step.
        step: u32,
    },
    /// Held by an operator at `step`, at `weight_ppm`.
    Paused {
        /// The step to go on with.
        step: u32,
        /// The weight held meanwhile.
        weight_ppm: u32,
    },
    /// Every new connection goes to canary.
    Promoted {
        /// Wall-clock time of the promotion, seconds since the Unix epoch.
        at_unix: u64,
    },
    /// No new connection goes to canary until an operator clears it.
    RolledBack {
        /// What decided.
        reason: RollbackReason,
        /// Wall-clock time of the decision, seconds since the Unix epoch.
        at_unix: u64,
        /// The numbers behind the decision, for people.
        detail: String,
    },
}

impl ServiceState {
    /// The configured weight and no override: nothing to persist.
    pub const IDLE: ServiceState = ServiceState::Idle { weight_ppm: None };

    /// Name of the state (one of [`STATES`]).
    pub fn name(&self) -> &'static str {
        match self {
            ServiceState::Idle { .. } => "idle",
            ServiceState::Progressing { .. } => "progressing",
            ServiceState::AwaitingApproval { .. } => "awaiting-approval",
            ServiceState::Paused { .. } => "paused",
            ServiceState::Promoted { .. } => "promoted",
            ServiceState::RolledBack { .. } => "rolled-back",
        }
    }

    /// Whether new connections may go to canary.
    pub fn canary_allowed(&self) -> bool {
        !matches!(self, ServiceState::RolledBack { .. })
    }

    /// The weight in force for `svc` (its configured weight, or its plan's).
    pub fn effective_weight(&self, svc: &ServiceConfig) -> Weight {
        let full = Weight::from_ppm(canary_common::cohort::PPM).unwrap_or(svc.weight);
        let step_weight = |step: u32| {
            let steps = svc
                .rollout
                .as_ref()
                .map(|r| r.steps.as_slice())
                .unwrap_or_default();
            match steps.len() {
                0 => svc.weight,
                n => steps[(step as usize).min(n - 1)].weight,
            }
        };
        match self {
            ServiceState::Idle {
                weight_ppm: Some(ppm),
            } => Weight::from_ppm(*ppm).unwrap_or(svc.weight),
            ServiceState::Idle { weight_ppm: None } => svc.weight,
            ServiceState::Progressing { step, .. } => step_weight(*step),
            // Held at the step before the gate (none before the first).
            ServiceState::AwaitingApproval { step } if *step == 0 => Weight::default(),
            ServiceState::AwaitingApproval { step } => step_weight(step - 1),
            ServiceState::Paused { weight_ppm, .. } => {
                Weight::from_ppm(*weight_ppm).unwrap_or(svc.weight)
            }
            ServiceState::Promoted { .. } => full,
            // Nothing new goes to canary (the canary-off flag enforces it).
            ServiceState::RolledBack { .. } => Weight::default(),
        }
    }
}

/// What the data plane enforces for `svc` in `state`: the canary weight
/// and whether the canary is cut off.
///
/// In enforce mode, the state's weight and cut-off. In shadow mode the
/// plan, the judge, the checks and the breaker decide and are recorded but
/// not enforced: the configured weight stays and the canary is never cut
/// off, except by an operator (`canaryctl set-weight` and `rollback` act
/// in either mode).
pub fn enforced(svc: &ServiceConfig, state: &ServiceState) -> (Weight, bool) {
    if svc.mode == crate::config::Mode::Enforce {
        return (state.effective_weight(svc), !state.canary_allowed());
    }
    match state {
        ServiceState::Idle {
            weight_ppm: Some(_),
        } => (state.effective_weight(svc), false),
        ServiceState::RolledBack {
            reason: RollbackReason::Operator,
            ..
        } => (Weight::default(), true),
        _ => (svc.weight, false),
    }
}

/// What a state file holds: a service's state and the release it belongs
/// to. A state saved for another release than the config's is not that
/// release's: the engine starts the new release's rollout afresh.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    /// The release the state belongs to; `None` in files an agent before
    /// release identity wrote (taken as the config's release, so an upgrade
    /// changes no rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The state.
    pub rollout: ServiceState,
}

impl Saved {
    /// No file: plain idle, of no particular release.
    pub const NONE: Saved = Saved {
        release: None,
        rollout: ServiceState::IDLE,
    };

    /// `state`, saved for `release`.
    pub fn of(release: &str, state: ServiceState) -> Saved {
        Saved {
            release: Some(release.to_string()),
            rollout: state,
        }
    }
}

/// Wall-clock seconds since the Unix epoch (what states record).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn test_service() -> ServiceConfig {
        let text = "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\n\
                    stable = [\"10.0.0.1:80\"]\ncanary = [\"10.0.0.2:80\"]\n[service.rollout]\n\
                    steps = [{ weight = \"1%\" }, { weight = \"5%\", gate = \"manual\" }]\n";
        crate::config::Config::parse(text, std::path::Path::new("t.toml"), &[])
            .unwrap()
            .services
            .remove(0)
    }

    #[test]
    fn plan_states_put_the_right_weight_in_force() {
        let svc = test_service();
        let w = |s: ServiceState| s.effective_weight(&svc).ppm();
        assert_eq!(
            w(ServiceState::Progressing {
                step: 0,
                since_unix: 0
            }),
            10_000
        );
        assert_eq!(
            w(ServiceState::Progressing {
                step: 1,
                since_unix: 0
            }),
            50_000
        );
        assert_eq!(
            w(ServiceState::Progressing {
                step: 9,
                since_unix: 0
            }),
            50_000,
            "past the end: the last step"
        );
        assert_eq!(
            w(ServiceState::AwaitingApproval { step: 1 }),
            10_000,
            "held at the step before the gate"
        );
        assert_eq!(w(ServiceState::AwaitingApproval { step: 0 }), 0);
        assert_eq!(
            w(ServiceState::Paused {
                step: 1,
                weight_ppm: 7
            }),
            7
        );
    }
}

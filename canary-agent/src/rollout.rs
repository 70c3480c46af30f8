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

use std::{
    io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

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
}

impl RollbackReason {
    /// Every reason, for exporting zero counts.
    pub const ALL: [RollbackReason; 3] = [
        RollbackReason::Breaker,
        RollbackReason::Operator,
        RollbackReason::Judge,
    ];

    /// Label value of `canary_rollbacks_total{reason}`.
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackReason::Breaker => "breaker",
            RollbackReason::Operator => "operator",
            RollbackReason::Judge => "judge",
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

    /// The start of a plan, or of step `step` of it.
    pub fn progressing(step: u32) -> ServiceState {
        ServiceState::Progressing {
            step,
            since_unix: now_unix(),
        }
    }

    /// A rollback decided now.
    pub fn rolled_back(reason: RollbackReason, detail: String) -> ServiceState {
        ServiceState::RolledBack {
            reason,
            at_unix: now_unix(),
            detail,
        }
    }

    /// A promotion decided now.
    pub fn promoted() -> ServiceState {
        ServiceState::Promoted {
            at_unix: now_unix(),
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or renaming failed.
    #[error("state file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a state this agent understands. Refusing it keeps a
    /// rolled-back canary from coming back by accident.
    #[error("state file {path} is not valid; fix or remove it (removing clears the rollback)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The directory of state files, one `<service>.json` each.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, service: &str) -> PathBuf {
        // Service names are [A-Za-z0-9._-]+ (validated), so safe as file names.
        self.dir.join(format!("{service}.json"))
    }

    /// The state of `service`: `Idle` if it has no file.
    pub fn load(&self, service: &str) -> Result<ServiceState, StateError> {
        let path = self.path(service);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ServiceState::IDLE),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Persists `state` atomically (write a temporary file, fsync, rename);
    /// plain `idle` removes the file.
    pub fn save(&self, service: &str, state: &ServiceState) -> Result<(), StateError> {
        let path = self.path(service);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        if *state == ServiceState::IDLE {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
                _ => Ok(()),
            };
        }
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp = self.dir.join(format!(".{service}.json.tmp"));
        let json =
            serde_json::to_vec_pretty(state).map_err(|e| io_err(&tmp)(io::Error::other(e)))?;
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&json).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (StateStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "canary-state-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (StateStore::new(&dir), dir)
    }

    #[test]
    fn a_rollback_survives_a_round_trip_and_idle_removes_the_file() {
        let (store, dir) = store();
        assert_eq!(
            store.load("web").unwrap(),
            ServiceState::IDLE,
            "no file is idle"
        );
        let state =
            ServiceState::rolled_back(RollbackReason::Breaker, "3 failures of 4 attempts".into());
        store.save("web", &state).unwrap();
        assert_eq!(store.load("web").unwrap(), state);
        let text = std::fs::read_to_string(dir.join("web.json")).unwrap();
        assert!(
            text.contains("\"state\": \"rolled-back\"") && text.contains("\"reason\": \"breaker\""),
            "{text}"
        );
        store.save("web", &ServiceState::IDLE).unwrap();
        assert!(!dir.join("web.json").exists());
        assert_eq!(store.load("web").unwrap(), ServiceState::IDLE);
        // An operator's weight and a promotion persist too.
        let manual = ServiceState::Idle {
            weight_ppm: Some(2_500),
        };
        store.save("web", &manual).unwrap();
        assert_eq!(store.load("web").unwrap(), manual);
        let svc = test_service();
        assert_eq!(manual.effective_weight(&svc).ppm(), 2_500);
        let promoted = ServiceState::promoted();
        store.save("web", &promoted).unwrap();
        assert_eq!(store.load("web").unwrap(), promoted);
        assert_eq!(promoted.effective_weight(&svc).ppm(), 1_000_000);
        // A file holding plain idle (as an earlier release wrote) still reads.
        std::fs::write(dir.join("old.json"), "{\"state\":\"idle\"}").unwrap();
        assert_eq!(store.load("old").unwrap(), ServiceState::IDLE);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn test_service() -> ServiceConfig {
        let text = "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\n\
                    stable = [\"10.0.0.1:80\"]\ncanary = [\"10.0.0.2:80\"]\n[service.rollout]\n\
                    steps = [{ weight = \"1%\" }, { weight = \"5%\", gate = \"manual\" }]\n";
        crate::config::Config::parse(text, Path::new("t.toml"), &[])
            .unwrap()
            .services
            .remove(0)
    }

    #[test]
    fn plan_states_put_the_right_weight_in_force() {
        let svc = test_service();
        let w = |s: ServiceState| s.effective_weight(&svc).ppm();
        assert_eq!(w(ServiceState::progressing(0)), 10_000);
        assert_eq!(w(ServiceState::progressing(1)), 50_000);
        assert_eq!(
            w(ServiceState::progressing(9)),
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

    #[test]
    fn a_corrupt_state_file_is_an_error_not_idle() {
        let (store, dir) = store();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.json"), "{\"state\":\"rolled-back\"").unwrap();
        let err = store.load("web").unwrap_err();
        assert!(
            err.to_string().contains("is not valid; fix or remove it"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

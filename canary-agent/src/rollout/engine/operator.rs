//! Operator commands (`canaryctl`): what each does from each state, and
//! what it refuses.

use super::{
    Actor, Command, Decision, Refusal, RollbackReason, ServiceConfig, ServiceState, change,
    progressing,
};

pub(super) fn operator(
    svc: &ServiceConfig,
    state: &ServiceState,
    command: Command,
    now: u64,
) -> Result<Decision, Refusal> {
    let refuse = |why: String| Err(Refusal(format!("service {:?}: {why}", svc.name)));
    let plan = svc.rollout.as_ref();
    let to = match command {
        Command::SetWeight(_) if matches!(state, ServiceState::RolledBack { .. }) => {
            return refuse("it is rolled back; `canaryctl resume` it first".into());
        }
        Command::SetWeight(w) if w.ppm() > 0 && svc.canary.is_empty() => {
            return refuse("it has no canary backends".into());
        }
        Command::SetWeight(w) => ServiceState::Idle {
            weight_ppm: Some(w.ppm()),
        },
        Command::Promote if svc.canary.is_empty() => {
            return refuse("it has no canary backends to promote".into());
        }
        Command::Promote => ServiceState::Promoted { at_unix: now },
        Command::Rollback if matches!(state, ServiceState::RolledBack { .. }) => {
            return refuse("it is already rolled back".into());
        }
        Command::Rollback => ServiceState::RolledBack {
            reason: RollbackReason::Operator,
            at_unix: now,
            detail: "canaryctl rollback".into(),
        },
        Command::Resume => match (state, plan) {
            (ServiceState::Paused { step, .. }, Some(_)) => progressing(*step, now),
            (ServiceState::Progressing { .. } | ServiceState::AwaitingApproval { .. }, Some(_)) => {
                return refuse(format!("its rollout is already {}", state.name()));
            }
            // A plan starts over; without one, the configured weight.
            (_, Some(_)) => progressing(0, now),
            (_, None) => ServiceState::IDLE,
        },
        Command::Pause => match state {
            ServiceState::Progressing { step, .. } => ServiceState::Paused {
                step: *step,
                weight_ppm: state.effective_weight(svc).ppm(),
            },
            _ => {
                return refuse(format!(
                    "pause holds a progressing rollout; it is {}",
                    state.name()
                ));
            }
        },
        Command::Approve => match state {
            ServiceState::AwaitingApproval { step } => progressing(*step, now),
            _ => return refuse(format!("nothing awaits approval; it is {}", state.name())),
        },
    };
    Ok(change(state, to, svc, Actor::Operator, None))
}

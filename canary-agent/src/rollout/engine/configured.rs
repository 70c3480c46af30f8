//! A config load: the state file's state against the config (release,
//! plan, canary backends).

use super::{
    Actor, Decision, Effect, Refusal, Rollout, Saved, ServiceConfig, ServiceState, change,
    progressing,
};

/// Whether a saved state still fits `svc`: a state that would send new
/// connections to canary backends the config no longer has ends the
/// rollout (rather than dropping them as `no_backend`), and so does a plan
/// step of a service without a plan; a step the new plan does not have is
/// refused.
pub(super) fn fits(
    svc: &ServiceConfig,
    state: &ServiceState,
) -> Result<Option<&'static str>, String> {
    match state {
        ServiceState::Progressing { step, .. }
        | ServiceState::Paused { step, .. }
        | ServiceState::AwaitingApproval { step } => match &svc.rollout {
            None => Ok(Some("the config has no rollout plan for it any more")),
            Some(plan) if *step as usize >= plan.steps.len() => Err(format!(
                "it is at step {} of its plan and the config's plan has {} steps; \
                 `canaryctl rollback` or `canaryctl promote` it first, or delete its state file \
                 to start the plan over",
                step + 1,
                plan.steps.len()
            )),
            Some(_) => Ok(None),
        },
        _ if svc.canary.is_empty() && state.effective_weight(svc).ppm() > 0 => {
            Ok(Some("the config has no canary backends for it any more"))
        }
        _ => Ok(None),
    }
}

pub(super) fn configured(
    svc: &ServiceConfig,
    current: &Rollout,
    saved: &Saved,
    now: u64,
) -> Result<Decision, Refusal> {
    // Another release's state says nothing about this one: a new release
    // starts afresh (and a rolled-back one, deployed again, finds its own).
    if let Some(old) = saved.release.as_deref().filter(|r| *r != svc.release) {
        let (to, why) = match svc.rollout {
            // No canary left (the usual end of a promotion) is no release.
            None if svc.canary.is_empty() => (
                ServiceState::IDLE,
                "the config has no canary backends for it any more".to_string(),
            ),
            Some(_) => (progressing(0, now), String::new()),
            None => (ServiceState::IDLE, String::new()),
        };
        let why = if why.is_empty() {
            format!(
                "new release {:?} (the saved state was release {old:?}'s); its rollout starts afresh",
                svc.release
            )
        } else {
            why
        };
        return Ok(change(
            &current.state,
            to,
            svc,
            Actor::Config,
            Some(format!("rollout state changed by the config: {why}")),
        ));
    }
    let saved = &saved.rollout;
    let ended = fits(svc, saved).map_err(|detail| {
        Refusal(format!(
            "service {:?}: its saved rollout state ({}) does not fit the config: {detail}",
            svc.name,
            saved.name()
        ))
    })?;
    let (to, why) = match ended {
        Some(why) => (ServiceState::IDLE, Some(why)),
        None => (saved.clone(), None),
    };
    // A plan with no state yet starts at its first step.
    let (to, why) = if svc.rollout.is_some() && to == ServiceState::IDLE {
        (
            progressing(0, now),
            Some(why.unwrap_or("rollout plan started")),
        )
    } else {
        (to, why)
    };
    match why {
        // The config forced a change: persisted and announced like any.
        Some(why) => Ok(change(
            &current.state,
            to,
            svc,
            Actor::Config,
            Some(format!("rollout state changed by the config: {why}")),
        )),
        None if to != current.state => {
            // The state file says something else than memory (edited or
            // deleted by hand): it wins, without being written back.
            let mut decision = change(
                &current.state,
                to,
                svc,
                Actor::Config,
                Some("rollout state changed by its state file".into()),
            );
            decision.effects.retain(|e| *e != Effect::Persist);
            Ok(decision)
        }
        None => Ok(Decision {
            to: Rollout::new(to),
            effects: Vec::new(),
        }),
    }
}

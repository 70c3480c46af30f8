//! The answer to `canaryctl status`: rollout state, weights, per-cohort
//! counts from the kernel and the last verdict.

use canary_common::{service::Cohort, stats::quantile};

use super::Agent;
use crate::{
    config::ServiceConfig,
    control::{ErrorCode, Response},
    error_chain,
    rollout::ServiceState,
    status::{CohortStatus, FleetStatus, ServiceStatus, StatusReport},
};

/// "2/4 (5%)" for a plan-driven service.
pub(super) fn plan_step(svc: &ServiceConfig, state: &ServiceState) -> Option<String> {
    let steps = &svc.rollout.as_ref()?.steps;
    let step = match state {
        ServiceState::Progressing { step, .. }
        | ServiceState::AwaitingApproval { step }
        | ServiceState::Paused { step, .. } => *step as usize,
        _ => return None,
    };
    let i = step.min(steps.len() - 1);
    Some(format!("{}/{} ({})", i + 1, steps.len(), steps[i].weight))
}

impl Agent {
    /// The `status` answer.
    pub(super) fn status(&self, only: Option<&str>) -> Response {
        self.status_with(only, None)
    }

    /// The `status` answer, with the fleet's part if there is one.
    pub(super) fn status_with(&self, only: Option<&str>, fleet: Option<FleetStatus>) -> Response {
        if let Some(name) = only
            && !self.config.services.iter().any(|s| s.name == name)
        {
            return Response::error(ErrorCode::UnknownService, format!("no service {name:?}"));
        }
        let snapshot = match self
            .dp
            .snapshot_where(|name| only.is_none_or(|o| o == name))
        {
            Ok(s) => s,
            Err(e) => return Response::error(ErrorCode::Internal, error_chain(&e)),
        };
        let mut services = Vec::new();
        for svc in self
            .config
            .services
            .iter()
            .filter(|s| only.is_none_or(|n| n == s.name))
        {
            let state = self
                .rollouts
                .get(&svc.name)
                .map_or(ServiceState::IDLE, |r| r.state.clone());
            let Some(snap) = snapshot.service(&svc.name) else {
                continue;
            };
            let cohorts = Cohort::ALL.map(|cohort| {
                let c = snap.cohort_counters(cohort);
                let failed = snap.failed_connections(cohort);
                let hist = snap.histograms[usize::from(cohort)].as_ref();
                let ms = |q| {
                    hist.and_then(|h| quantile(&h.first_byte_ns.buckets, q))
                        .map(|ns| ns / 1e6)
                };
                CohortStatus {
                    cohort: cohort.as_str().to_string(),
                    connections: c.connections,
                    active: c.active(),
                    failed,
                    resets_from_backend: c.resets_from_backend,
                    failure_ratio: if c.connections == 0 {
                        0.0
                    } else {
                        failed as f64 / c.connections as f64
                    },
                    first_byte_p50_ms: ms(0.5),
                    first_byte_p99_ms: ms(0.99),
                }
            });
            let total = cohorts[0].connections + cohorts[1].connections;
            services.push(ServiceStatus {
                name: svc.name.clone(),
                release: svc.release.clone(),
                state: state.name().to_string(),
                configured_weight: svc.weight.to_string(),
                effective_weight: crate::rollout::enforced(svc, &state).0.to_string(),
                mode: svc.mode.as_str().to_string(),
                checks: self.check_lines(&svc.name),
                step: plan_step(svc, &state),
                observed_canary_share: (total > 0)
                    .then(|| cohorts[1].connections as f64 / total as f64),
                cohorts: cohorts.to_vec(),
                last_verdict: self
                    .verdicts
                    .get(&svc.name)
                    .cloned()
                    .or_else(|| match &state {
                        ServiceState::RolledBack { reason, detail, .. } => {
                            Some(format!("rolled back ({}): {detail}", reason.as_str()))
                        }
                        _ => None,
                    }),
                judgements: self.judgements.get(&svc.name).copied().unwrap_or(0),
            });
        }
        match serde_json::to_value(StatusReport { fleet, services }) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }
}

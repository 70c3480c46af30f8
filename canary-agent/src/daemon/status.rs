//! The answer to `canaryctl status`: rollout state, weights, per-cohort
//! counts from the kernel and the last verdict.

use canary_common::{service::Cohort, stats::quantile};

use super::Agent;
use crate::{
    config::ServiceConfig,
    control::{ErrorCode, Response},
    error_chain,
    rollout::ServiceState,
    status::{
        CohortStatus, Explanation, FleetStatus, HistoryReport, PlanProgress, ServiceStatus,
        StatusReport,
    },
};

/// Where a plan-driven service is in its plan, and what moves it on.
pub(super) fn plan_progress(
    svc: &ServiceConfig,
    state: &ServiceState,
    canary_connections: u64,
    fleet: bool,
) -> Option<PlanProgress> {
    let plan = svc.rollout.as_ref()?;
    let n = plan.steps.len();
    let (step, in_step) = match state {
        ServiceState::Progressing { step, since_unix } => (
            *step as usize,
            Some(crate::rollout::now_unix().saturating_sub(*since_unix)),
        ),
        ServiceState::AwaitingApproval { step } | ServiceState::Paused { step, .. } => {
            (*step as usize, None)
        }
        ServiceState::Promoted { .. } => (n - 1, None),
        _ => (0, None),
    };
    let i = step.min(n - 1);
    let at = &plan.steps[i];
    let hold = at.hold.as_secs();
    let who = if fleet {
        "the fleet's leader moves it on"
    } else {
        "the judge moves it on"
    };
    let next = match state {
        ServiceState::Progressing { .. } => {
            let left = hold.saturating_sub(in_step.unwrap_or(0));
            let then = match plan.steps.get(i + 1) {
                None => "promoted".to_string(),
                Some(s) if s.gate == crate::config::Gate::Manual => {
                    format!("step {} ({}) after `canaryctl approve`", i + 2, s.weight)
                }
                Some(s) => format!("step {} ({})", i + 2, s.weight),
            };
            let judge = match (fleet, svc.checks.is_empty()) {
                (true, true) => "no node's judge failing",
                (true, false) => "no node's judge failing and every check passing",
                (false, true) => "a passing judgement",
                (false, false) => "a passing judgement and every check passing",
            };
            let connections = if at.min_connections == 0 {
                String::new()
            } else {
                format!(
                    ", {canary_connections} of {} canary connections{}",
                    at.min_connections,
                    if fleet { " (fleet-wide)" } else { "" }
                )
            };
            format!("{then}: {who} after the {hold}s hold ({left}s left){connections}, and {judge}")
        }
        ServiceState::AwaitingApproval { .. } => {
            format!(
                "step {} ({}) waits for `canaryctl approve`",
                i + 1,
                at.weight
            )
        }
        ServiceState::Paused { .. } => "paused: `canaryctl resume` goes on".to_string(),
        ServiceState::Promoted { .. } => "promoted: the plan is over".to_string(),
        ServiceState::RolledBack { .. } => {
            "rolled back: `canaryctl resume` starts the plan over; a new release starts afresh"
                .to_string()
        }
        ServiceState::Idle { .. } => {
            "a manual weight holds: `canaryctl resume` starts the plan over".to_string()
        }
    };
    Some(PlanProgress {
        #[expect(clippy::cast_possible_truncation, reason = "at most 100 steps")]
        step: (i + 1) as u32,
        #[expect(clippy::cast_possible_truncation, reason = "at most 100 steps")]
        steps: n as u32,
        weights: plan.steps.iter().map(|s| s.weight.to_string()).collect(),
        in_step_secs: in_step,
        hold_secs: hold,
        min_connections: at.min_connections,
        canary_connections,
        next,
    })
}

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
                    .last_verdict(&svc.name)
                    .map(str::to_string)
                    .or_else(|| match &state {
                        ServiceState::RolledBack { reason, detail, .. } => {
                            Some(format!("rolled back ({}): {detail}", reason.as_str()))
                        }
                        _ => None,
                    }),
                // The exporter's count (`canary_judgements_total`), summed.
                judgements: snap.rollout.judgements.values().sum(),
                plan: plan_progress(
                    svc,
                    &state,
                    self.windows.get(&svc.name).map_or(0, |w| {
                        super::judging::cohort_window(&w.base, snap, Cohort::Canary).connections
                    }),
                    self.fleet.is_some(),
                ),
            });
        }
        match serde_json::to_value(StatusReport { fleet, services }) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }
}

impl Agent {
    /// The `history` answer.
    pub(super) fn history_of(&self, service: &str) -> Response {
        if !self.config.services.iter().any(|s| s.name == service) {
            return Response::error(ErrorCode::UnknownService, format!("no service {service:?}"));
        }
        let report = HistoryReport {
            service: service.to_string(),
            changes: self.history.of(service),
        };
        match serde_json::to_value(report) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }

    /// The `explain` answer: the state, what the step waits for, the last
    /// verdicts and the last change.
    /// What becomes of the canary connections still open after the
    /// rollback at `at_unix`.
    fn drain_line(&self, svc: &crate::config::ServiceConfig, at_unix: u64) -> String {
        let Some(deadline) = svc.drain_deadline else {
            return "drain: canary connections still open finish on their own (no drain_deadline)"
                .to_string();
        };
        let due = at_unix.saturating_add(deadline.as_secs());
        let now = crate::rollout::now_unix();
        match self.drained.get(&svc.name) {
            Some((at, done)) if *at == at_unix => {
                format!(
                    "drain: deadline passed {}s ago: {done}",
                    now.saturating_sub(due)
                )
            }
            _ if now < due => format!(
                "drain: canary connections still open are reset in {}s (drain_deadline {})",
                due - now,
                crate::units::show_duration(deadline)
            ),
            _ => "drain: deadline passed; the agent ends them within a second".to_string(),
        }
    }

    pub(super) fn explain(&self, service: &str) -> Response {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            return Response::error(ErrorCode::UnknownService, format!("no service {service:?}"));
        };
        let state = self
            .rollouts
            .get(service)
            .map_or(ServiceState::IDLE, |r| r.state.clone());
        let mut lines = vec![format!(
            "{service} is {} at canary weight {} (release {})",
            state.name(),
            crate::rollout::enforced(svc, &state).0,
            svc.release
        )];
        if svc.mode == crate::config::Mode::Shadow {
            lines.push(
                "shadow mode: decisions are reported, not enforced; the configured weight stays"
                    .into(),
            );
        }
        let canary = self
            .dp
            .snapshot_where(|n| n == service)
            .ok()
            .and_then(|snap| {
                let now = snap.service(service)?.clone();
                let w = self.windows.get(service)?;
                Some(super::judging::cohort_window(&w.base, &now, Cohort::Canary).connections)
            });
        match plan_progress(svc, &state, canary.unwrap_or(0), self.fleet.is_some()) {
            Some(p) => {
                lines.push(format!(
                    "plan: step {} of {} ({}){}",
                    p.step,
                    p.steps,
                    p.weights.join(" → "),
                    p.in_step_secs
                        .map(|s| format!(", {s}s in this step"))
                        .unwrap_or_default()
                ));
                lines.push(format!("next: {}", p.next));
                lines.extend(
                    self.check_lines(service)
                        .into_iter()
                        .map(|c| format!("check: {c}")),
                );
            }
            None => lines.push(format!(
                "no plan: the weight is {} ({})",
                crate::rollout::enforced(svc, &state).0,
                match &state {
                    ServiceState::Idle {
                        weight_ppm: Some(_),
                    } => "set by canaryctl",
                    ServiceState::Idle { weight_ppm: None } => "configured",
                    _ => "its state's",
                }
            )),
        }
        if let ServiceState::RolledBack {
            reason,
            detail,
            at_unix,
        } = &state
        {
            lines.push(format!("rolled back by {}: {detail}", reason.as_str()));
            lines.push(self.drain_line(svc, *at_unix));
        }
        if let Some(last) = self.history.of(service).last() {
            lines.push(format!(
                "last change: {} → {} by {}, {}s ago: {}",
                last.from,
                last.to,
                last.by,
                crate::rollout::now_unix().saturating_sub(last.at_unix),
                last.detail
            ));
        }
        let recent = self.verdicts.get(service);
        match recent {
            Some(r) if !r.is_empty() => {
                lines.push("last verdicts (newest last):".to_string());
                for (at, line) in r {
                    lines.push(format!(
                        "  {}s ago: {line}",
                        crate::rollout::now_unix().saturating_sub(*at)
                    ));
                }
            }
            _ => lines.push("no verdict yet".to_string()),
        }
        if let Some(link) = &self.fleet {
            lines.push(format!(
                "fleet: this node is {} ({}); etcd {}",
                link.fleet.config.node,
                if link.leader {
                    "the leader"
                } else {
                    "a follower"
                },
                if link.connected {
                    "connected"
                } else {
                    "unreachable: fail static"
                }
            ));
        }
        match serde_json::to_value(Explanation {
            service: service.to_string(),
            lines,
        }) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }
}

//! Where the daemon meets the fleet: records from etcd go into the engine
//! as [`Event::Decided`], decisions taken here go out (operator commands by
//! compare-and-swap before they apply, rollbacks after they apply), and
//! the leader's gate moves plans on from every node's summary.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{Agent, rollout::FeedError};
use crate::{
    config::ServiceConfig,
    control::{ErrorCode, Response},
    fleet::{CasError, Change, Counts, Fleet, FleetEvent, Job, Record, Summary},
    rollout::{
        ServiceState,
        engine::{self, Event, FleetEvidence, Remote, Rollout},
    },
    status::{FleetStatus, NodeRow},
};

/// The daemon's view of the fleet.
pub(super) struct FleetLink {
    pub(super) fleet: Fleet,
    /// Whether the watch has a current listing (etcd reachable).
    pub(super) connected: bool,
    /// Whether this node leads.
    pub(super) leader: bool,
    /// Every record seen, by (service, release), with its revision.
    pub(super) records: BTreeMap<(String, String), (Record, i64)>,
    /// Services with a rollback decided here that etcd has not taken yet:
    /// the fleet's other states are not applied over it meanwhile.
    pub(super) unpublished: BTreeSet<String>,
    /// Per service: the last judgement failed the canary.
    pub(super) judge_fails: BTreeMap<String, bool>,
    /// When this node's summaries were last refreshed.
    pub(super) summarized: Option<std::time::Instant>,
}

/// How long `status` waits for etcd's rows.
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// How long an operator's command waits for etcd.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

impl FleetLink {
    pub(super) fn new(fleet: Fleet) -> FleetLink {
        FleetLink {
            fleet,
            connected: false,
            leader: false,
            records: BTreeMap::new(),
            unpublished: BTreeSet::new(),
            judge_fails: BTreeMap::new(),
            summarized: None,
        }
    }

    fn node(&self) -> &str {
        &self.fleet.config.node
    }
}

impl Agent {
    fn service(&self, name: &str) -> Option<ServiceConfig> {
        self.config
            .services
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    fn state_of(&self, name: &str) -> ServiceState {
        self.rollouts
            .get(name)
            .map_or(ServiceState::IDLE, |r| r.state.clone())
    }

    /// Something the fleet's tasks reported.
    pub(super) fn fleet_event(&mut self, event: FleetEvent) {
        let Some(link) = self.fleet.as_mut() else {
            return;
        };
        match event {
            FleetEvent::Records { snapshot, changes } => {
                if snapshot {
                    link.records.clear();
                    if !link.connected {
                        info!("fleet: etcd reachable; the fleet's states apply");
                    }
                    link.connected = true;
                }
                let touched: BTreeSet<String> = changes.iter().map(|c| c.service.clone()).collect();
                for Change {
                    service,
                    release,
                    record,
                    revision,
                } in changes
                {
                    match record {
                        Some(r) => {
                            link.records.insert((service, release), (r, revision));
                        }
                        None => {
                            link.records.remove(&(service, release));
                        }
                    }
                }
                if snapshot {
                    self.fleet_sync();
                } else {
                    for service in touched {
                        self.apply_record(&service);
                    }
                }
            }
            FleetEvent::Disconnected(_) => link.connected = false,
            FleetEvent::Leader(leads) => {
                if link.leader != leads {
                    info!(node = %link.node(), leads, "fleet: leadership changed");
                }
                link.leader = leads;
            }
            FleetEvent::Summaries(all) => self.fleet_gate(&all),
            FleetEvent::Published { service, .. } => {
                link.unpublished.remove(&service);
            }
        }
    }

    /// Every configured service takes its release's record, and a release
    /// without one gets this node's state as its first record.
    pub(super) fn fleet_sync(&mut self) {
        let names: Vec<String> = self
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        for name in names {
            self.apply_record(&name);
        }
    }

    /// Applies the fleet's record of `service`'s configured release (or
    /// offers this node's state as the first one).
    fn apply_record(&mut self, service: &str) {
        let Some(svc) = self.service(service) else {
            return;
        };
        let state = self.state_of(service);
        let Some(link) = self.fleet.as_mut() else {
            return;
        };
        let key = (svc.name.clone(), svc.release.clone());
        let Some((record, _)) = link.records.get(&key).cloned() else {
            if link.connected && !link.unpublished.contains(service) {
                let record = Record {
                    state,
                    node: link.node().to_string(),
                    by: "the config".into(),
                    verdict: format!("release {} first seen here", svc.release),
                    at_unix: crate::rollout::now_unix(),
                };
                let _ = link.fleet.jobs.send(Job::Create {
                    service: key.0,
                    release: key.1,
                    record,
                });
            }
            return;
        };
        if link.unpublished.contains(service) && record.state.canary_allowed() {
            debug!(
                service,
                "fleet: a rollback decided here is not published yet; the fleet's state waits"
            );
            return;
        }
        // A rollback decided here after the fleet's last decision that
        // etcd never got (the breaker tripped while no agent ran, or etcd
        // was unreachable when this agent stopped): it goes out now.
        if let ServiceState::RolledBack {
            at_unix,
            detail,
            reason,
        } = &state
            && record.state.canary_allowed()
            && *at_unix > record.at_unix
        {
            let by = match reason {
                crate::rollout::RollbackReason::Breaker => engine::Actor::Breaker,
                crate::rollout::RollbackReason::Judge => engine::Actor::Judge,
                crate::rollout::RollbackReason::Operator => engine::Actor::Operator,
                crate::rollout::RollbackReason::Check => engine::Actor::Checks,
            };
            let verdict = format!("rolled back by {}: {detail}", by.as_str());
            info!(
                service,
                "fleet: publishing a rollback this node decided after the fleet's last decision"
            );
            self.publish_local(&svc, &state, &verdict, by);
            return;
        }
        let remote = Remote {
            state: record.state,
            node: record.node,
            by: record.by,
            verdict: record.verdict,
        };
        if let Err(e) = self.feed(service, Event::Decided(remote)) {
            warn!(service, error = %e, "fleet: the fleet's state could not be applied here");
        }
    }

    /// After a decision taken on this node (breaker, judge, config): a
    /// rollback goes to the fleet (retried until etcd takes it).
    pub(super) fn publish_local(
        &mut self,
        svc: &ServiceConfig,
        to: &ServiceState,
        verdict: &str,
        by: engine::Actor,
    ) {
        let Some(link) = self.fleet.as_mut() else {
            return;
        };
        if to.canary_allowed() {
            return;
        }
        link.unpublished.insert(svc.name.clone());
        let record = Record {
            state: to.clone(),
            node: link.node().to_string(),
            by: by.as_str().to_string(),
            verdict: verdict.to_string(),
            at_unix: crate::rollout::now_unix(),
        };
        let _ = link.fleet.jobs.send(Job::Rollback {
            service: svc.name.clone(),
            release: svc.release.clone(),
            record,
        });
    }

    /// An operator's command in a fleet: compare-and-swapped into etcd
    /// first, applied here once etcd took it (every other node applies it
    /// from its watch). A rollback with etcd unreachable is applied here at
    /// once and published later; any other command needs etcd.
    pub(super) async fn fleet_command(
        &mut self,
        service: &str,
        command: engine::Command,
    ) -> Response {
        let Some(svc) = self.service(service) else {
            return self.command(service, command);
        };
        for _ in 0..3 {
            let current = self
                .rollouts
                .get(service)
                .cloned()
                .unwrap_or_else(|| Rollout::new(ServiceState::IDLE));
            let decision = match engine::decide(
                &svc,
                &current,
                Event::Operator(command),
                crate::rollout::now_unix(),
            ) {
                Ok(d) => d,
                Err(why) => return Response::error(ErrorCode::Conflict, why.0),
            };
            let verdict = decision
                .announced()
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            let Some(link) = self.fleet.as_mut() else {
                return self.command(service, command);
            };
            let key = (svc.name.clone(), svc.release.clone());
            let base = link.records.get(&key).map_or(0, |(_, rev)| *rev);
            let record = Record {
                state: decision.to.state.clone(),
                node: link.node().to_string(),
                by: engine::Actor::Operator.as_str().to_string(),
                verdict,
                at_unix: crate::rollout::now_unix(),
            };
            let (reply, answer) = oneshot::channel();
            let _ = link.fleet.jobs.send(Job::Cas {
                service: key.0.clone(),
                release: key.1.clone(),
                record: record.clone(),
                base,
                reply: Some(reply),
            });
            let outcome = match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
                Ok(Ok(o)) => o,
                _ => Err(CasError::Unavailable(format!(
                    "no answer within {}s",
                    COMMAND_TIMEOUT.as_secs()
                ))),
            };
            match outcome {
                Ok(rev) => {
                    link.records.insert(key, (record, rev));
                    return match self.carry_out(&svc, &current, decision, false) {
                        Ok(()) => self.status(Some(service)),
                        Err(e) => Response::error(
                            ErrorCode::Internal,
                            format!(
                                "in etcd for the fleet, but not applied on this node: {}",
                                crate::error_chain(&e)
                            ),
                        ),
                    };
                }
                Err(CasError::Conflict(found, rev)) => {
                    // Someone else decided first: take theirs, decide again.
                    match found {
                        Some(r) => link.records.insert(key, (r, rev)),
                        None => link.records.remove(&key),
                    };
                    self.apply_record(service);
                }
                Err(CasError::Unavailable(why)) if command == engine::Command::Rollback => {
                    if let Err(e) = self.feed(service, Event::Operator(command)) {
                        return feed_error(&e);
                    }
                    return Response::error(
                        ErrorCode::Internal,
                        format!(
                            "etcd unavailable ({why}): rolled back on this node only; the rollback is published to the fleet when etcd answers"
                        ),
                    );
                }
                Err(CasError::Unavailable(why)) => {
                    return Response::error(
                        ErrorCode::Internal,
                        format!(
                            "etcd unavailable ({why}): fleet-wide commands need etcd; nothing changed \
                             (a rollback still works on this node alone)"
                        ),
                    );
                }
            }
        }
        Response::error(
            ErrorCode::Conflict,
            format!(
                "service {service:?}: its fleet state kept changing under the command; look at `canaryctl status` and retry"
            ),
        )
    }

    /// The leader's gate: each plan's current step, judged on every node's
    /// summary at that step.
    fn fleet_gate(&mut self, all: &[Summary]) {
        let Some(link) = self.fleet.as_ref() else {
            return;
        };
        if !link.leader || !link.connected {
            return;
        }
        let now = crate::rollout::now_unix();
        for svc in self.config.services.clone() {
            if svc.rollout.is_none() {
                continue;
            }
            let Some(link) = self.fleet.as_ref() else {
                return;
            };
            let key = (svc.name.clone(), svc.release.clone());
            let Some((record, base)) = link.records.get(&key).cloned() else {
                continue;
            };
            let ServiceState::Progressing { since_unix, .. } = record.state else {
                continue;
            };
            // The leader's own checks hold the fleet's step until they pass.
            if !self.checks_passed(&svc) {
                continue;
            }
            let fleet_verdict = self.fleet_verdict(&svc, &record.state, since_unix);
            let Some(link) = self.fleet.as_ref() else {
                return;
            };
            let ours: Vec<&Summary> = all
                .iter()
                .filter(|s| s.service == svc.name && s.release == svc.release)
                .collect();
            let at_step: Vec<&&Summary> = ours.iter().filter(|s| s.state == record.state).collect();
            let evidence = FleetEvidence {
                held: Duration::from_secs(now.saturating_sub(since_unix)),
                canary_connections: at_step.iter().map(|s| s.canary.connections).sum(),
                nodes: at_step.len(),
                failing: ours
                    .iter()
                    .filter(|s| s.judge_fails)
                    .map(|s| s.node.clone())
                    .collect(),
                fleet_verdict,
            };
            let current = Rollout::new(record.state.clone());
            let Ok(decision) = engine::decide(&svc, &current, Event::FleetGate(evidence), now)
            else {
                continue;
            };
            if decision.to.state == current.state {
                continue;
            }
            let verdict = decision
                .announced()
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            info!(service = %svc.name, "fleet: {verdict}");
            let record = Record {
                state: decision.to.state,
                node: link.node().to_string(),
                by: "the fleet's leader".into(),
                verdict,
                at_unix: now,
            };
            // Applied everywhere (here too) when the watch brings it back.
            let _ = link.fleet.jobs.send(Job::Cas {
                service: key.0,
                release: key.1,
                record,
                base,
                reply: None,
            });
        }
    }

    /// Refreshes this node's summaries (published by the session task),
    /// once per `summary_interval`: each refresh reads every service's
    /// counters, as a scrape does.
    pub(super) fn refresh_summaries(&mut self) {
        let Some(link) = self.fleet.as_mut() else {
            return;
        };
        let now = std::time::Instant::now();
        if link
            .summarized
            .is_some_and(|at| now.duration_since(at) < link.fleet.config.summary_interval)
        {
            return;
        }
        link.summarized = Some(now);
        let Some(link) = self.fleet.as_ref() else {
            return;
        };
        let snapshot = match self.dp.snapshot_where(|_| true) {
            Ok(s) => s,
            Err(e) => {
                return warn!(error = %crate::error_chain(&e), "fleet: cannot read the data plane for the summary");
            }
        };
        let attached = self.dp.attached().next().is_some() || self.config.agent.socket_lb.is_some();
        let mut out = BTreeMap::new();
        for svc in &self.config.services {
            let Some(now) = snapshot.service(&svc.name) else {
                continue;
            };
            let base = self.windows.get(&svc.name).map(|w| &w.base);
            // At the step for a judged plan; since the start otherwise.
            let counts = |cohort| match base {
                Some(b) => {
                    let w = super::judging::cohort_window(b, now, cohort);
                    Counts {
                        connections: w.connections,
                        failures: w.failures,
                    }
                }
                None => Counts {
                    connections: now.cohort_counters(cohort).connections,
                    failures: now.failed_connections(cohort),
                },
            };
            let state = self.state_of(&svc.name);
            out.insert(
                svc.name.clone(),
                Summary {
                    service: svc.name.clone(),
                    node: link.node().to_string(),
                    release: svc.release.clone(),
                    weight_ppm: crate::rollout::enforced(svc, &state).0.ppm(),
                    state,
                    stable: counts(canary_common::service::Cohort::Stable),
                    canary: counts(canary_common::service::Cohort::Canary),
                    verdict: self.last_verdict(&svc.name).map(str::to_string),
                    judge_fails: link.judge_fails.get(&svc.name).copied().unwrap_or(false),
                    attached,
                    at_unix: crate::rollout::now_unix(),
                },
            );
        }
        *link
            .fleet
            .summaries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = out;
    }

    /// The fleet part of `status`: etcd's reachability, the leader and one
    /// row per node and service (read from etcd now, bounded in time).
    pub(super) async fn fleet_status(&mut self, only: Option<&str>) -> Option<FleetStatus> {
        let link = self.fleet.as_mut()?;
        let mut client = link.fleet.client.clone();
        let keys = link.fleet.keys.clone();
        // The agent's loop waits for this answer: with the watch down it
        // does not ask etcd at all, and otherwise it asks for at most
        // STATUS_TIMEOUT, so `status --watch` on a cut-off node never
        // stalls the loop (judge, sweeps, breaker records).
        let read = async {
            let all = crate::fleet::get_summaries(&mut client, &keys).await?;
            let leader = crate::fleet::leader(&mut client, &keys)
                .await
                .ok()
                .flatten();
            Ok::<_, crate::fleet::EtcdError>((all, leader))
        };
        let answer = if link.connected {
            tokio::time::timeout(STATUS_TIMEOUT, read)
                .await
                .unwrap_or(Err(crate::fleet::EtcdError::Timeout))
        } else {
            Err(crate::fleet::EtcdError::Lost(format!(
                "the watch on {} is down",
                keys.rollouts()
            )))
        };
        let (rows, leader, etcd) = match answer {
            Ok((all, leader)) => (all, leader, "connected".to_string()),
            Err(e) => (
                Vec::new(),
                None,
                format!("unreachable ({e}); showing this node's last known states"),
            ),
        };
        let now = crate::rollout::now_unix();
        let nodes = rows
            .into_iter()
            .filter(|s| only.is_none_or(|o| o == s.service))
            .map(|s| NodeRow {
                service: s.service,
                node: s.node,
                release: s.release,
                state: s.state.name().to_string(),
                weight: crate::config::Weight::from_ppm(s.weight_ppm)
                    .map_or_else(|| "?".into(), |w| w.to_string()),
                connections: s.stable.connections + s.canary.connections,
                canary_connections: s.canary.connections,
                failures: s.stable.failures + s.canary.failures,
                canary_failures: s.canary.failures,
                verdict: s.verdict,
                attached: s.attached,
                heard_secs_ago: now.saturating_sub(s.at_unix),
            })
            .collect();
        Some(FleetStatus {
            node: link.node().to_string(),
            etcd,
            leader,
            this_node_leads: link.leader,
            unpublished: link.unpublished.iter().cloned().collect(),
            nodes,
        })
    }
}

fn feed_error(e: &FeedError) -> Response {
    Response::error(ErrorCode::Internal, format!("not changed: {e}"))
}

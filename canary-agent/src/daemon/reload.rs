//! Reloading the config (SIGHUP, `canaryctl reload`): every saved state is
//! fed to the engine with the new config, and the data plane takes the
//! result all or nothing.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::{Agent, canary_off, effective};
use crate::{
    config::{Config, ConfigError, IngressMode, InterfaceConfig},
    dataplane::{ApplyReport, Capacity, DataplaneError},
    error_chain,
    rollout::{
        ServiceState, StateError, StateStore,
        engine::{self, Decision, Event, Refusal, Rollout},
    },
};

/// Why a reload (or a control command) was rejected; nothing changed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ChangeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("applying it failed and was rolled back")]
    Dataplane(#[from] DataplaneError),
}

/// A decision whose data-plane programming is done by one apply for all
/// services (at start and on reload); the rest of its effects follow it.
pub(super) struct Pending {
    pub(super) service: String,
    pub(super) from: Rollout,
    pub(super) decision: Decision,
}

/// The rollout of every service of `config` as its state file (fed to the
/// engine as [`Event::Configured`]) and the config decide, with the
/// decisions that changed something. Nothing is written; a state the
/// config cannot take refuses the whole config.
pub(super) fn configure(
    store: &StateStore,
    config: &Config,
    current: &BTreeMap<String, Rollout>,
) -> Result<(BTreeMap<String, Rollout>, Vec<Pending>), ChangeError> {
    let now = crate::rollout::now_unix();
    let mut rollouts = BTreeMap::new();
    let mut pending = Vec::new();
    for svc in &config.services {
        let saved = store.load(&svc.name)?;
        let before = current
            .get(&svc.name)
            .cloned()
            .unwrap_or_else(|| Rollout::new(saved.rollout.clone()));
        let decision = engine::decide(svc, &before, Event::Configured { saved }, now)?;
        if let ServiceState::RolledBack { reason, detail, .. } = &decision.to.state {
            warn!(service = %svc.name, reason = reason.as_str(), detail = %detail,
                "service is rolled back: no new connection goes to canary");
        }
        rollouts.insert(svc.name.clone(), decision.to.clone());
        if !decision.effects.is_empty() {
            pending.push(Pending {
                service: svc.name.clone(),
                from: before,
                decision,
            });
        }
    }
    Ok((rollouts, pending))
}

impl Agent {
    /// Applies the config file anew: services first (all or nothing), then
    /// interface changes (new ones attached before removed ones are
    /// detached). State files are read anew too: removing one resets that
    /// service to its configured weight.
    ///
    /// `new` is the config file as read (off the runtime thread) and
    /// validated, or why it was not.
    pub(super) fn reload(&mut self, new: Result<Config, ConfigError>) -> Result<(), ChangeError> {
        let new = new?;
        let (new_rollouts, pending) = configure(&self.store, &new, &self.rollouts)?;
        let old = &self.config;
        // New interfaces, and interfaces whose mode changed.
        let added: Vec<InterfaceConfig> = new
            .agent
            .interfaces
            .iter()
            .filter(|i| !old.agent.interfaces.contains(i))
            .cloned()
            .collect();
        // What each attach replaced, to undo it if the reload fails.
        let mut attached: Vec<(InterfaceConfig, Option<IngressMode>)> = Vec::new();
        let result = (|| -> Result<ApplyReport, DataplaneError> {
            for iface in &added {
                let before = self.dp.attach(&iface.name, iface.mode)?;
                attached.push((iface.clone(), before));
            }
            // The canary-off flags go in with the services, all or nothing.
            self.dp.apply(
                &effective(&new, &new_rollouts),
                &canary_off(&new, &new_rollouts),
            )
        })();
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                // The maps were restored by the apply's own undo; now the
                // attachments.
                for (iface, before) in attached.into_iter().rev() {
                    match before {
                        None => self.dp.detach(&iface.name),
                        Some(mode) => {
                            if let Err(undo) = self.dp.attach(&iface.name, mode) {
                                warn!(interface = %iface.name, error = %error_chain(&undo), "cannot restore the previous mode");
                            }
                        }
                    }
                }
                return Err(e.into());
            }
        };
        for (iface, before) in &attached {
            match before {
                None => info!(interface = %iface.name, mode = iface.mode.as_str(), "attached"),
                Some(old) => {
                    info!(interface = %iface.name, from = old.as_str(), to = iface.mode.as_str(), "ingress mode changed");
                }
            }
        }
        for iface in self
            .config
            .agent
            .interfaces
            .iter()
            .filter(|i| !new.agent.interfaces.iter().any(|n| n.name == i.name))
        {
            self.dp.detach(&iface.name);
            info!(interface = %iface.name, "detached");
        }
        // Interfaces and handshake_timeout apply now; the rest is bound at
        // start.
        let restart_only = |c: &Config| {
            (
                c.agent.control_socket.clone(),
                c.agent.control_group.clone(),
                c.agent.metrics_addr,
                c.agent.metrics_buckets_per_octave,
                Capacity::from(&c.agent),
                c.agent.state_dir.clone(),
                c.agent.bpffs_dir.clone(),
                c.agent.socket_lb.clone(),
                c.fleet.clone(),
            )
        };
        if restart_only(&self.config) != restart_only(&new) {
            warn!(
                "control_socket, control_group, metrics_addr, metrics_buckets_per_octave, conntrack_capacity, \
                 max_services, max_backends, state_dir, \
                 bpffs_dir, socket_lb, cgroup and [fleet] changes take effect at the next restart"
            );
        }
        self.lost_interfaces
            .retain(|name, _| new.agent.interfaces.iter().any(|i| i.name == *name));
        // Applied: the states the config or the state files changed are
        // persisted and announced (a canary that a deleted state file lets
        // back in gets a fresh breaker: the deletion is a `resume`).
        self.config = new;
        self.rollouts = new_rollouts;
        self.carry_out_programmed(pending);
        // A new release takes (or starts) its record in the fleet.
        self.fleet_sync();
        self.publish_states();
        self.log_services(&report);
        info!(added = ?report.added, changed = ?report.changed, removed = ?report.removed, "config reloaded");
        Ok(())
    }
}

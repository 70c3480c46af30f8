//! Applying a config: the maps are made to hold exactly the configured
//! services, all or nothing (an undo journal restores every step on
//! failure), with stats slots assigned and released as backends come and
//! go.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use canary_common::{
    breaker::BreakerState,
    names,
    service::Cohort,
    service::{FLAG_CANARY_OFF, RuleKey, ServiceKey, ServiceValue},
    stats::{BackendCounters, CohortHistograms, HandshakeTimeouts, histogram_key},
};
use tracing::warn;

use super::{
    Dataplane, DataplaneError, SlotKey,
    encode::{rule_key, rule_list, same_rules, service_key, service_value},
    lock, map_error,
};
use crate::{
    config::ServiceConfig,
    telemetry::{BackendView, ServiceView},
};

/// What is in `SERVICES`/`RULES` for one service name.
#[derive(Clone)]
pub(super) struct Installed {
    pub(super) key: ServiceKey,
    pub(super) value: ServiceValue,
    pub(super) rules: Vec<(Key<RuleKey>, u32)>,
}

/// One undoable step of an apply.
enum Undo {
    RemoveRule(Key<RuleKey>),
    RemoveHistograms(u32),
    RemoveBreaker(u32),
    RestoreService(ServiceKey, Option<Box<ServiceValue>>),
}

/// Summary of one apply, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Services that did not exist before.
    pub added: Vec<String>,
    /// Services whose value or rules changed.
    pub changed: Vec<String>,
    /// Services that were removed.
    pub removed: Vec<String>,
}

impl Dataplane {
    /// Makes the maps hold exactly `services`, all or nothing.
    ///
    /// Established flows are untouched (conntrack is not written here); only
    /// new flows see the new weights, rules and backends.
    ///
    /// `canary_off` names the services whose canary gets no new connection
    /// (rolled back): their flag goes in with the rest, so a failed apply
    /// leaves it as it was too. A flag the kernel's breaker set stays until
    /// [`Dataplane::reset_breaker`].
    pub fn apply(
        &mut self,
        services: &[ServiceConfig],
        canary_off: &BTreeSet<String>,
    ) -> Result<ApplyReport, DataplaneError> {
        if !self.ipv6_nat
            && let Some(svc) = services.iter().find(|s| s.vip.is_ipv6())
        {
            return Err(DataplaneError::Ipv6Unsupported {
                service: svc.name.clone(),
            });
        }
        let mut report = ApplyReport::default();
        let slots = self.assign_slots(services)?;
        let mut wanted: BTreeMap<String, Installed> = BTreeMap::new();
        let mut next_svc_id = self.next_svc_id;
        let mut next_rule_set = self.next_rule_set;
        let mut new_ids = Vec::new();
        for svc in services {
            let svc_id = if let Some(&id) = self.svc_ids.get(&svc.name) {
                id
            } else {
                let id = next_svc_id;
                next_svc_id += 1;
                new_ids.push((svc.name.clone(), id));
                id
            };
            let old = self.installed.get(&svc.name);
            let rule_list = rule_list(svc);
            // Reuse the installed rule set when its rules are unchanged.
            let rule_set = match old {
                _ if rule_list.is_empty() => 0,
                Some(old) if same_rules(&old.rules, &rule_list) => old.value.rule_set,
                _ => {
                    let id = next_rule_set;
                    next_rule_set = next_rule_set.checked_add(1).unwrap_or(1).max(1);
                    id
                }
            };
            let rules = rule_list
                .into_iter()
                .map(|(prefix_len, addr, action)| (rule_key(rule_set, prefix_len, addr), action))
                .collect();
            let installed = Installed {
                key: service_key(svc.vip),
                value: service_value(
                    svc,
                    svc_id,
                    rule_set,
                    canary_off.contains(&svc.name),
                    |cohort, addr| {
                        slots
                            .get(&(svc.name.clone(), cohort, addr))
                            .copied()
                            .unwrap_or(0)
                    },
                ),
                rules,
            };
            match old {
                None => report.added.push(svc.name.clone()),
                Some(old) if old.key != installed.key || old.value != installed.value => {
                    report.changed.push(svc.name.clone());
                }
                Some(_) => {}
            }
            wanted.insert(svc.name.clone(), installed);
        }
        report.removed = self
            .installed
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();

        let mut journal = Vec::new();
        if let Err(e) = self.write(&mut wanted, &slots, &mut journal) {
            self.undo(journal);
            return Err(e);
        }
        self.commit_stats(services, &wanted, slots);

        // Committed: forget rule sets nothing points at any more.
        let live: BTreeSet<u32> = wanted.values().map(|s| s.value.rule_set).collect();
        for old in self.installed.values() {
            if old.value.rule_set != 0 && !live.contains(&old.value.rule_set) {
                for (key, _) in &old.rules {
                    if let Err(e) = self.rules.remove(key) {
                        warn!(rule_set = old.value.rule_set, error = %e, "stale rule not removed");
                    }
                }
            }
        }
        self.installed = wanted;
        self.svc_ids.extend(new_ids);
        self.next_svc_id = next_svc_id;
        self.next_rule_set = next_rule_set;
        Ok(report)
    }

    /// Writes `wanted` over the installed state, journaling each step.
    fn write(
        &mut self,
        wanted: &mut BTreeMap<String, Installed>,
        slots: &BTreeMap<SlotKey, u32>,
        journal: &mut Vec<Undo>,
    ) -> Result<(), DataplaneError> {
        // 0. Zeroed counters in newly assigned slots (a reused slot must not
        //    carry its previous backend's counts) and histograms for new
        //    services, before any service value points at them.
        {
            let mut stats = lock(&self.stats);
            let held: BTreeSet<u32> = self.slots.values().copied().collect();
            for &slot in slots.values().filter(|s| !held.contains(s)) {
                let zeros = PerCpuValues::try_from(vec![BackendCounters::default(); self.ncpus])
                    .map_err(|e| {
                        map_error(
                            names::STATS,
                            "zero a slot".to_string(),
                            MapError::IoError(e),
                        )
                    })?;
                stats.stats.set(slot, zeros, 0).map_err(|source| {
                    map_error(names::STATS, format!("zero slot {slot}"), source)
                })?;
                stats
                    .timeouts
                    .set(slot, HandshakeTimeouts::default(), 0)
                    .map_err(|source| {
                        map_error(names::TIMEOUTS, format!("zero slot {slot}"), source)
                    })?;
            }
            for (name, svc) in wanted.iter() {
                let id = svc.value.svc_id;
                if self.breaker.get(&id, 0).is_err() {
                    self.breaker
                        .insert(id, BreakerState::default(), 0)
                        .map_err(|source| {
                            map_error(
                                names::BREAKER,
                                format!("create the breaker of service {name}"),
                                source,
                            )
                        })?;
                    journal.push(Undo::RemoveBreaker(id));
                }
                for cohort in Cohort::ALL {
                    let key = histogram_key(svc.value.svc_id, cohort.as_u8());
                    if stats.histograms.get(&key, 0).is_ok() {
                        continue;
                    }
                    stats
                        .histograms
                        .insert(key, CohortHistograms::default(), 0)
                        .map_err(|source| {
                            map_error(
                                names::HISTOGRAMS,
                                format!("create histograms of service {name}"),
                                source,
                            )
                        })?;
                    journal.push(Undo::RemoveHistograms(key));
                }
            }
        }
        // 1. New rule sets, beside the old ones (nothing points at them yet).
        for (name, svc) in wanted.iter() {
            let reused = self
                .installed
                .get(name)
                .is_some_and(|old| old.value.rule_set == svc.value.rule_set);
            if reused {
                continue;
            }
            for (key, action) in &svc.rules {
                self.rules.insert(key, action, 0).map_err(|source| {
                    map_error(
                        names::RULES,
                        format!("insert rule for service {name}"),
                        source,
                    )
                })?;
                journal.push(Undo::RemoveRule(*key));
            }
        }
        // 2. Services: one whole-value update each (weight, rules, backends),
        //    compared with what the kernel holds, which is the truth: the
        //    breaker sets its flag there.
        for (name, svc) in wanted.iter_mut() {
            let before = self.services.get(&svc.key, 0).ok();
            // A tripped breaker's cut-off stands until the breaker is reset
            // (`resume`), whatever else changes: the agent may not have
            // read the trip yet.
            if let Some(b) = before
                && b.flags & FLAG_CANARY_OFF != 0
                && self
                    .breaker
                    .get(&svc.value.svc_id, 0)
                    .is_ok_and(|state| state.tripped != 0)
            {
                svc.value.flags |= FLAG_CANARY_OFF;
            }
            if before == Some(svc.value) {
                continue;
            }
            let before = before.map(Box::new);
            self.services
                .insert(svc.key, svc.value, 0)
                .map_err(|source| {
                    map_error(names::SERVICES, format!("write service {name}"), source)
                })?;
            journal.push(Undo::RestoreService(svc.key, before));
        }
        // 3. Services that are gone, or whose VIP moved.
        let wanted_keys: std::collections::HashSet<ServiceKey> =
            wanted.values().map(|s| s.key).collect();
        let stale: Vec<(String, Installed)> = self
            .installed
            .iter()
            .filter(|(_, s)| !wanted_keys.contains(&s.key))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, old) in stale {
            self.services.remove(&old.key).map_err(|source| {
                map_error(names::SERVICES, format!("remove service {name}"), source)
            })?;
            journal.push(Undo::RestoreService(old.key, Some(Box::new(old.value))));
        }
        Ok(())
    }

    fn undo(&mut self, journal: Vec<Undo>) {
        for step in journal.into_iter().rev() {
            let result = match step {
                Undo::RemoveRule(key) => self.rules.remove(&key),
                Undo::RemoveHistograms(key) => lock(&self.stats).histograms.remove(&key),
                Undo::RemoveBreaker(id) => self.breaker.remove(&id),
                Undo::RestoreService(key, Some(value)) => self.services.insert(key, *value, 0),
                Undo::RestoreService(key, None) => self.services.remove(&key),
            };
            if let Err(e) = result {
                warn!(error = %e, "undo step failed; the data plane may differ from the previous config");
            }
        }
    }

    /// Slots for every backend of `services`: a backend keeps its slot;
    /// new ones come from the free list, then from unused indices. Nothing is
    /// recorded until the apply commits.
    fn assign_slots(
        &self,
        services: &[ServiceConfig],
    ) -> Result<BTreeMap<SlotKey, u32>, DataplaneError> {
        let mut assigned = BTreeMap::new();
        let mut free = self.free_slots.clone();
        let mut next = self.next_slot;
        let total: usize = services
            .iter()
            .map(|s| s.stable.len() + s.canary.len())
            .sum();
        for svc in services {
            for (cohort, list) in [(Cohort::Stable, &svc.stable), (Cohort::Canary, &svc.canary)] {
                for addr in list {
                    let key = (svc.name.clone(), cohort, *addr);
                    let slot = match self.slots.get(&key) {
                        Some(&slot) => slot,
                        None => match free.pop_front() {
                            Some(slot) => slot,
                            None if next < self.slot_limit => {
                                next += 1;
                                next - 1
                            }
                            None => {
                                return Err(DataplaneError::SlotsExhausted {
                                    wanted: total,
                                    available: self.slot_limit as usize - 1,
                                });
                            }
                        },
                    };
                    assigned.insert(key, slot);
                }
            }
        }
        Ok(assigned)
    }

    /// After a successful write: record slot ownership, release the slots
    /// and histograms of what is gone, and publish the labels.
    fn commit_stats(
        &mut self,
        services: &[ServiceConfig],
        wanted: &BTreeMap<String, Installed>,
        slots: BTreeMap<SlotKey, u32>,
    ) {
        let in_use: BTreeSet<u32> = slots.values().copied().collect();
        self.free_slots.retain(|s| !in_use.contains(s));
        for (key, slot) in &self.slots {
            if !slots.contains_key(key) && !in_use.contains(slot) {
                self.free_slots.push_back(*slot);
            }
        }
        if let Some(max) = in_use.iter().max() {
            self.next_slot = self.next_slot.max(max + 1);
        }
        self.slots = slots;

        let view = services
            .iter()
            .map(|svc| {
                let backends = [(Cohort::Stable, &svc.stable), (Cohort::Canary, &svc.canary)]
                    .into_iter()
                    .flat_map(|(cohort, list)| list.iter().map(move |addr| (cohort, *addr)))
                    .map(|(cohort, addr)| BackendView {
                        cohort,
                        addr,
                        slot: self
                            .slots
                            .get(&(svc.name.clone(), cohort, addr))
                            .copied()
                            .unwrap_or(0),
                    })
                    .collect();
                ServiceView {
                    name: svc.name.clone(),
                    svc_id: wanted.get(&svc.name).map_or(0, |i| i.value.svc_id),
                    weight_ratio: f64::from(svc.weight.ppm()) / 1e6,
                    backends,
                }
            })
            .collect();
        let mut stats = lock(&self.stats);
        stats.view = view;
        // Histograms of removed services go; flows still draining count as
        // `unattributed` from here on.
        for (name, old) in &self.installed {
            if !wanted.contains_key(name) {
                for cohort in Cohort::ALL {
                    let _ = stats
                        .histograms
                        .remove(&histogram_key(old.value.svc_id, cohort.as_u8()));
                }
            }
        }
    }
}

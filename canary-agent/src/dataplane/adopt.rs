//! Taking over a data plane a previous agent left pinned: its bookkeeping
//! (service ids, stats slots, rule sets) is read back from the maps, which
//! are the one source of truth, and maps whose capacity changed are copied
//! into their replacements.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key};
use canary_common::{
    breaker::BreakerState,
    flow::{CtEntry, FlowKey, UdpConfig},
    layout::v1,
    names,
    service::{Backend, Cohort, ServiceKey, ServiceValue},
    stats::{BackendCounters, CohortHistograms, HandshakeTimeouts},
};
use tracing::info;

use super::{BPF_NOEXIST, Dataplane, DataplaneError, Installed, lock, map_error, pins};
use crate::config::ServiceConfig;

/// What an agent found when it took over a pinned data plane.
#[derive(Debug, Default)]
pub struct Adopted {
    /// Services that were in `SERVICES`.
    pub services: usize,
    /// Conntrack entries carried over (two per flow).
    pub flows: usize,
    /// Configured services whose breaker tripped, with its window: the
    /// kernel cut their canary off, possibly while no agent ran.
    pub tripped: Vec<(String, BreakerState)>,
}

impl Dataplane {
    /// Reads back what a previous agent programmed, so the next apply
    /// changes only what differs: kernel entries are matched to `services`
    /// by VIP, keep their service id, stats slots and rule set, and so their
    /// counters, histograms and breaker windows. Entries no service claims
    /// any more are removed by the next apply. Call once, before it.
    pub fn adopt(&mut self, services: &[ServiceConfig]) -> Result<Adopted, DataplaneError> {
        let by_key: std::collections::HashMap<ServiceKey, &str> = services
            .iter()
            .map(|s| (super::service_key(s.vip, s.protocol), s.name.as_str()))
            .collect();
        let entries: Vec<(ServiceKey, ServiceValue)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| map_error(names::SERVICES, "read".to_string(), source))?;
        let mut rules: BTreeMap<u32, Vec<(Key<canary_common::service::RuleKey>, u32)>> =
            BTreeMap::new();
        for entry in &self.rules {
            let (key, action) =
                entry.map_err(|source| map_error(names::RULES, "read".to_string(), source))?;
            rules
                .entry(u32::from_be(key.data().rule_set_be))
                .or_default()
                .push((key, action));
        }
        let mut adopted = Adopted {
            services: entries.len(),
            flows: self.conntrack.keys().flatten().count() + self.ct_udp.keys().flatten().count(),
            tripped: Vec::new(),
        };
        let mut max_id = 0;
        for (key, value) in entries {
            // A service no config names keeps a name no config can use
            // (names have no ':'), so the apply removes it.
            let name = match by_key.get(&key) {
                Some(name) => (*name).to_string(),
                // With the protocol: a TCP and a UDP service of one VIP:port
                // are two entries.
                None => format!(
                    "{}/{}",
                    SocketAddr::new(IpAddr::from(key.vip), u16::from_be(key.port)),
                    key.proto
                ),
            };
            for (cohort, list, n) in [
                (Cohort::Stable, &value.stable, value.n_stable),
                (Cohort::Canary, &value.canary, value.n_canary),
            ] {
                for b in list.iter().take(usize::from(n)) {
                    self.slots
                        .insert((name.clone(), cohort, backend_addr(b)), b.stats_slot);
                }
            }
            if by_key.contains_key(&key)
                && let Ok(state) = self.breaker.get(&value.svc_id, 0)
                && state.tripped != 0
            {
                adopted.tripped.push((name.clone(), state));
            }
            max_id = max_id.max(value.svc_id);
            self.next_rule_set = self.next_rule_set.max(value.rule_set.saturating_add(1));
            self.svc_ids.insert(name.clone(), value.svc_id);
            self.installed.insert(
                name,
                Installed {
                    key,
                    value,
                    rules: rules.remove(&value.rule_set).unwrap_or_default(),
                    udp: self.udp_config.get(&value.svc_id, 0).ok(),
                },
            );
        }
        // Ids of removed services may still own a breaker window or
        // histograms: never hand them out again.
        for id in self.breaker.keys().flatten() {
            max_id = max_id.max(id);
        }
        self.next_svc_id = self.next_svc_id.max(max_id + 1);
        // Rule sets nobody points at (a crash mid-apply) are dropped.
        for (_, orphans) in rules {
            for (key, _) in orphans {
                let _ = self.rules.remove(&key);
            }
        }
        let used: BTreeSet<u32> = self.slots.values().copied().collect();
        if let Some(max) = used.iter().max() {
            self.next_slot = max + 1;
        }
        self.free_slots = (1..self.next_slot).filter(|s| !used.contains(s)).collect();
        Ok(adopted)
    }

    /// Copies every migrating map's pinned entries into its replacement,
    /// before any program uses the replacement (a recreated map starts
    /// empty).
    pub(super) fn copy_migrating(&mut self) -> Result<(), DataplaneError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        for &name in &self.migrating.clone() {
            let path = pins.map_path(name);
            if self.converting.contains(&name) {
                let converted = self.convert(name, &path, 0).map_err(|source| {
                    map_error(
                        name,
                        "convert the entries of the pinned map into the new layout".to_string(),
                        source,
                    )
                })?;
                info!(
                    map = name,
                    entries = converted,
                    "converted the pinned map's entries into the new layout"
                );
                continue;
            }
            let copied = match name {
                names::CONNTRACK => {
                    let old: HashMap<MapData, FlowKey, CtEntry> = pins::open_pinned(&path, name)?;
                    copy_hash(&old, &mut self.conntrack, 0)
                }
                names::CT_UDP => {
                    let old: HashMap<MapData, FlowKey, CtEntry> = pins::open_pinned(&path, name)?;
                    copy_hash(&old, &mut self.ct_udp, 0)
                }
                names::UDP_CONFIG => {
                    let old: HashMap<MapData, u32, UdpConfig> = pins::open_pinned(&path, name)?;
                    copy_hash(&old, &mut self.udp_config, 0)
                }
                names::UDP_TIMEOUTS => {
                    let old: PerCpuArray<MapData, HandshakeTimeouts> =
                        pins::open_pinned(&path, name)?;
                    let mut stats = lock(&self.stats);
                    let n = old.len().min(stats.udp_timeouts.len());
                    copy_indices(n, |i| stats.udp_timeouts.set(i, old.get(&i, 0)?, 0))
                }
                names::SERVICES => {
                    let old: HashMap<MapData, ServiceKey, ServiceValue> =
                        pins::open_pinned(&path, name)?;
                    copy_hash(&old, &mut self.services, 0)
                }
                names::BREAKER => {
                    let old: HashMap<MapData, u32, BreakerState> = pins::open_pinned(&path, name)?;
                    copy_hash(&old, &mut self.breaker, 0)
                }
                names::HISTOGRAMS => {
                    let old: HashMap<MapData, u32, CohortHistograms> =
                        pins::open_pinned(&path, name)?;
                    copy_hash(&old, &mut lock(&self.stats).histograms, 0)
                }
                names::STATS => {
                    let old: PerCpuArray<MapData, BackendCounters> =
                        pins::open_pinned(&path, name)?;
                    let mut stats = lock(&self.stats);
                    let n = old.len().min(stats.stats.len());
                    copy_indices(n, |i| stats.stats.set(i, old.get(&i, 0)?, 0))
                }
                names::COUNTERS => {
                    let old: PerCpuArray<MapData, u64> = pins::open_pinned(&path, name)?;
                    let mut stats = lock(&self.stats);
                    let n = old.len().min(stats.counters.len());
                    copy_indices(n, |i| stats.counters.set(i, old.get(&i, 0)?, 0))
                }
                names::TIMEOUTS => {
                    let old: Array<MapData, HandshakeTimeouts> = pins::open_pinned(&path, name)?;
                    let mut stats = lock(&self.stats);
                    let n = old.len().min(stats.timeouts.len());
                    copy_indices(n, |i| stats.timeouts.set(i, old.get(&i, 0)?, 0))
                }
                names::SOCK_TIMEOUTS => {
                    let old: PerCpuArray<MapData, HandshakeTimeouts> =
                        pins::open_pinned(&path, name)?;
                    let mut stats = lock(&self.stats);
                    let n = old.len().min(stats.sock_timeouts.len());
                    copy_indices(n, |i| stats.sock_timeouts.set(i, old.get(&i, 0)?, 0))
                }
                // Recreated empty (a transient map in a new layout): nothing
                // to copy.
                _ => continue,
            }
            .map_err(|source| {
                map_error(
                    name,
                    "copy the entries of the pinned map into one of the new capacity (if it shrank below what it holds, raise the knob back: [agent] conntrack_capacity, max_services or max_backends)"
                        .to_string(),
                    source,
                )
            })?;
            info!(
                map = name,
                entries = copied,
                "migrated the pinned map's entries into a map of the new capacity"
            );
        }
        Ok(())
    }

    /// Copies the conntrack entries the old programs created since the
    /// last copy, without overwriting what the new programs wrote. Called
    /// right before the new programs take over the links and right after,
    /// so a flow that starts during the hand-over is known to both.
    pub fn catch_up_migration(&mut self) -> Result<usize, DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(0);
        };
        let mut late = 0;
        if self.migrating.contains(&names::CT_UDP) {
            let path = pins.map_path(names::CT_UDP);
            let old: HashMap<MapData, FlowKey, CtEntry> = pins::open_pinned(&path, names::CT_UDP)?;
            late += copy_hash(&old, &mut self.ct_udp, BPF_NOEXIST).map_err(|source| {
                map_error(names::CT_UDP, "copy late entries".to_string(), source)
            })?;
        }
        if !self.migrating.contains(&names::CONNTRACK) {
            return Ok(late);
        }
        let path = pins.map_path(names::CONNTRACK);
        if self.converting.contains(&names::CONNTRACK) {
            return self
                .convert(names::CONNTRACK, &path, BPF_NOEXIST)
                .map(|n| n + late)
                .map_err(|source| {
                    map_error(names::CONNTRACK, "convert late entries".to_string(), source)
                });
        }
        let old: HashMap<MapData, FlowKey, CtEntry> = pins::open_pinned(&path, names::CONNTRACK)?;
        copy_hash(&old, &mut self.conntrack, BPF_NOEXIST)
            .map(|n| n + late)
            .map_err(|source| map_error(names::CONNTRACK, "copy late entries".to_string(), source))
    }

    /// Converts the entries of `name`, pinned at `path` in an older layout
    /// (see `layout::CONVERTIBLE`), into this build's map, with update
    /// `flags`. Returns how many were written.
    fn convert(
        &mut self,
        name: &'static str,
        path: &std::path::Path,
        flags: u64,
    ) -> Result<usize, MapError> {
        let data = MapData::from_pin(path)?;
        let map = aya::maps::Map::from_map_data(data)?;
        match name {
            names::CONNTRACK => {
                let old: HashMap<MapData, v1::FlowKey, v1::CtEntry> = map.try_into()?;
                convert_hash(&old, &mut self.conntrack, flags)
            }
            names::SERVICES => {
                let old: HashMap<MapData, v1::ServiceKey, v1::ServiceValue> = map.try_into()?;
                convert_hash(&old, &mut self.services, flags)
            }
            names::RULES => {
                let old: LpmTrie<MapData, v1::RuleKey, u32> = map.try_into()?;
                let mut converted = 0;
                for entry in &old {
                    let Ok((key, action)) = entry else { continue };
                    let (len, data) = v1::rule(key.prefix_len(), key.data());
                    self.rules.insert(&Key::new(len, data), action, flags)?;
                    converted += 1;
                }
                Ok(converted)
            }
            _ => Ok(0),
        }
    }

    /// Once the new programs run on every link: a last catch-up copy, then
    /// the new maps take the place of the old pins. The old maps are freed
    /// with their last user.
    pub fn finish_migration(&mut self) -> Result<(), DataplaneError> {
        let late = self.catch_up_migration()?;
        if late > 0 {
            info!(
                entries = late,
                "conntrack entries created during the hand-over copied too"
            );
        }
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        self.converting.clear();
        for name in std::mem::take(&mut self.migrating) {
            std::fs::rename(pins.staged_map_path(name), pins.map_path(name)).map_err(|source| {
                DataplaneError::Bpffs {
                    dir: pins.root().to_path_buf(),
                    action: format!("replace the pin of {name}"),
                    source,
                }
            })?;
        }
        super::load::record_layout(&mut self.layout, |_| true)
    }
}

/// Converts every entry of `from` (an older layout) into `to` with update
/// `flags`; an entry that exists already is skipped under `BPF_NOEXIST`.
/// Returns how many were written.
fn convert_hash<K, V, K2, V2>(
    from: &HashMap<MapData, K, V>,
    to: &mut HashMap<MapData, K2, V2>,
    flags: u64,
) -> Result<usize, MapError>
where
    K: aya::Pod,
    V: aya::Pod,
    K2: aya::Pod + From<K>,
    V2: aya::Pod + From<V>,
{
    let mut converted = 0;
    for entry in from {
        let Ok((key, value)) = entry else { continue };
        match to.insert(K2::from(key), V2::from(value), flags) {
            Ok(()) => converted += 1,
            Err(_) if flags == BPF_NOEXIST => {}
            Err(e) => return Err(e),
        }
    }
    Ok(converted)
}

/// Runs `copy` for the array indices below `n`; returns how many were
/// copied (all of them, or the first error).
fn copy_indices(
    n: u32,
    mut copy: impl FnMut(u32) -> Result<(), MapError>,
) -> Result<usize, MapError> {
    for i in 0..n {
        copy(i)?;
    }
    Ok(n as usize)
}

/// Copies every entry of `from` into `to` with update `flags`; an entry
/// that exists already is skipped under `BPF_NOEXIST`. Returns how many
/// were written.
fn copy_hash<K: aya::Pod, V: aya::Pod>(
    from: &HashMap<MapData, K, V>,
    to: &mut HashMap<MapData, K, V>,
    flags: u64,
) -> Result<usize, MapError> {
    let mut copied = 0;
    for entry in from {
        // An entry deleted while we walk is simply not copied.
        let Ok((key, value)) = entry else { continue };
        match to.insert(key, value, flags) {
            Ok(()) => copied += 1,
            Err(_) if flags == BPF_NOEXIST => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(IpAddr::from(b.addr), u16::from_be(b.port))
}

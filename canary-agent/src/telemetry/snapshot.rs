//! Reading the data plane's measurement maps into plain snapshots: per
//! backend counters (`STATS`, summed over CPUs), handshake timeouts
//! (`TIMEOUTS` from the sweep, `SOCK_TIMEOUTS` from the socket path), per service × cohort histograms (`HISTOGRAMS`) and the
//! data-plane counters (`COUNTERS`). The exporter, the judge and `status`
//! all read through here, so they see the same numbers.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::SocketAddr,
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use canary_common::{
    counters::Counter,
    service::Cohort,
    stats::{BackendCounters, CohortHistograms, HandshakeTimeouts, histogram_key},
};

/// A backend as the exporter labels it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    /// Which cohort's list the backend is in.
    pub cohort: Cohort,
    /// The backend's address, the `backend` label.
    pub addr: SocketAddr,
    /// Its `STATS` slot.
    pub slot: u32,
}

/// A service as the exporter labels it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    /// The `service` label.
    pub name: String,
    /// Key of its histograms (with the cohort).
    pub svc_id: u32,
    /// Configured canary share, 0..=1.
    pub weight_ratio: f64,
    /// Every configured backend of both cohorts.
    pub backends: Vec<BackendView>,
}

/// The maps and labels a scrape reads, shared between the data plane (which
/// keeps them current) and the exporter.
pub struct StatsSource {
    /// Per backend slot counters (`STATS`).
    pub(crate) stats: PerCpuArray<MapData, BackendCounters>,
    /// Per service × cohort histograms (`HISTOGRAMS`).
    pub(crate) histograms: HashMap<MapData, u32, CohortHistograms>,
    /// Data-plane counters (`COUNTERS`).
    pub(crate) counters: PerCpuArray<MapData, u64>,
    /// The services and backends to read, as the data plane last applied
    /// them.
    pub(crate) view: Vec<ServiceView>,
    /// Handshake timeouts per `STATS` slot (`TIMEOUTS`), counted by the
    /// agent's sweep.
    pub(crate) timeouts: Array<MapData, HandshakeTimeouts>,
    /// Handshake timeouts of socket-steered connections per `STATS` slot
    /// and CPU (`SOCK_TIMEOUTS`), counted by the programs; exported as
    /// part of the same `timeouts`.
    pub(crate) sock_timeouts: PerCpuArray<MapData, HandshakeTimeouts>,
    /// Unanswered UDP flows per `STATS` slot (`UDP_TIMEOUTS`, per CPU),
    /// counted by the programs.
    pub(crate) udp_timeouts: PerCpuArray<MapData, HandshakeTimeouts>,
    /// Rollout state and rollbacks per service name, for the exporter,
    /// which runs on other tasks. A copy: the daemon's rollouts are the
    /// truth, and `daemon/rollout.rs` republishes the state on every change
    /// it announces (and all of them after a start or reload).
    pub(crate) rollout: StdHashMap<String, RolloutView>,
    /// Whether each data-plane link the config asks for is attached: a
    /// client-facing interface by name, and `socket-lb`. Set by the
    /// daemon at start, on reload and by its once-a-second check.
    pub(crate) attached: BTreeMap<String, bool>,
}

/// What the exporter says of a service's rollout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutView {
    /// One of [`crate::rollout::STATES`].
    pub state: &'static str,
    /// Rollbacks since the agent started, by reason.
    pub rollbacks: BTreeMap<&'static str, u64>,
    /// The judge's verdicts since the agent started, by kind (`pass`,
    /// `fail`, `insufficient-data`).
    pub judgements: BTreeMap<&'static str, u64>,
    /// Each configured check's evaluations since the agent started, by
    /// outcome (in `analysis::checks::OUTCOMES` order).
    pub checks: BTreeMap<String, [u64; 3]>,
}

impl StatsSource {
    /// The data-plane counters summed over CPUs, in `Counter::ALL` order.
    pub fn dataplane_counters(&self) -> Result<Vec<(Counter, u64)>, MapError> {
        Counter::ALL
            .iter()
            .map(|&c| Ok((c, self.counters.get(&(c as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Records the rollout state of `service`, and a rollback if `reason`.
    pub fn set_rollout(
        &mut self,
        service: &str,
        state: &'static str,
        rollback: Option<&'static str>,
    ) {
        let view = self.rollout.entry(service.to_string()).or_default();
        view.state = state;
        if let Some(reason) = rollback {
            *view.rollbacks.entry(reason).or_default() += 1;
        }
    }

    /// Counts one verdict of the judge on `service`.
    pub fn count_judgement(&mut self, service: &str, kind: &'static str) {
        let view = self.rollout.entry(service.to_string()).or_default();
        *view.judgements.entry(kind).or_default() += 1;
    }

    /// Counts one evaluation of `service`'s check `check` with `outcome`
    /// (one of `analysis::checks::OUTCOMES`).
    pub fn count_check(&mut self, service: &str, check: &str, outcome: &str) {
        let view = self.rollout.entry(service.to_string()).or_default();
        let counts = view.checks.entry(check.to_string()).or_default();
        if let Some(i) = crate::analysis::checks::OUTCOMES
            .iter()
            .position(|o| *o == outcome)
        {
            counts[i] += 1;
        }
    }

    /// Declares `service`'s configured checks (their counts start at 0 and
    /// are exported from the start); checks no longer configured go.
    pub fn declare_checks<'a>(&mut self, service: &str, checks: impl IntoIterator<Item = &'a str>) {
        let view = self.rollout.entry(service.to_string()).or_default();
        let names: std::collections::BTreeSet<&str> = checks.into_iter().collect();
        view.checks.retain(|name, _| names.contains(name.as_str()));
        for name in names {
            view.checks.entry(name.to_string()).or_default();
        }
    }

    /// Records which data-plane links are attached (every configured one,
    /// replacing the last record).
    pub fn set_attached(&mut self, links: impl IntoIterator<Item = (String, bool)>) {
        self.attached = links.into_iter().collect();
    }

    /// Reads every counter and the histograms of cohorts that have seen a
    /// connection.
    pub fn snapshot(&self) -> Result<Snapshot, MapError> {
        self.snapshot_where(|_| true)
    }

    /// As [`StatsSource::snapshot`], for the services `keep` accepts only:
    /// the judge and `status SERVICE` need a few, not all.
    pub fn snapshot_where(&self, keep: impl Fn(&str) -> bool) -> Result<Snapshot, MapError> {
        let mut services = Vec::new();
        for svc in self.view.iter().filter(|s| keep(&s.name)) {
            let mut backends = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let mut counters = BackendCounters::default();
                for cpu in self.stats.get(&b.slot, 0)?.iter() {
                    counters.add(cpu);
                }
                let mut timeouts = self.timeouts.get(&b.slot, 0).unwrap_or_default();
                if let Ok(per_cpu) = self.sock_timeouts.get(&b.slot, 0) {
                    for cpu in per_cpu.iter() {
                        timeouts.timeouts += cpu.timeouts;
                        timeouts.failed += cpu.failed;
                    }
                }
                let mut response_timeouts = HandshakeTimeouts::default();
                if let Ok(per_cpu) = self.udp_timeouts.get(&b.slot, 0) {
                    for cpu in per_cpu.iter() {
                        response_timeouts.timeouts += cpu.timeouts;
                        response_timeouts.failed += cpu.failed;
                    }
                }
                backends.push(BackendSnapshot {
                    cohort: b.cohort,
                    addr: b.addr,
                    counters,
                    timeouts,
                    response_timeouts,
                });
            }
            let mut histograms = [None, None];
            for cohort in Cohort::ALL {
                let seen = backends.iter().any(|b| {
                    b.cohort == cohort && b.counters.connections + b.counters.reopened > 0
                });
                if seen {
                    // A missing entry (not yet created) reads as no data.
                    histograms[usize::from(cohort)] = self
                        .histograms
                        .get(&histogram_key(svc.svc_id, cohort.as_u8()), 0)
                        .ok()
                        .map(Box::new);
                }
            }
            services.push(ServiceSnapshot {
                name: svc.name.clone(),
                weight_ratio: svc.weight_ratio,
                backends,
                histograms,
                rollout: self.rollout.get(&svc.name).cloned().unwrap_or(RolloutView {
                    state: "idle",
                    ..RolloutView::default()
                }),
            });
        }
        let dataplane = self.dataplane_counters()?;
        Ok(Snapshot {
            services,
            dataplane,
            attached: self.attached.clone().into_iter().collect(),
        })
    }
}

// `Debug` for the shared source, required by `Collector`.
impl std::fmt::Debug for StatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsSource")
            .field("services", &self.view.len())
            .finish_non_exhaustive()
    }
}

/// Counters of one backend at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSnapshot {
    /// Which cohort's list the backend is in.
    pub cohort: Cohort,
    /// The backend.
    pub addr: SocketAddr,
    /// Kernel counters summed over CPUs.
    pub counters: BackendCounters,
    /// Handshakes that never completed within the timeout.
    pub timeouts: HandshakeTimeouts,
    /// UDP flows with no reply within `udp_response_timeout`.
    pub response_timeouts: HandshakeTimeouts,
}

impl BackendSnapshot {
    /// Connections open now. A flow whose handshake timed out is marked
    /// closed without the kernel counting a close, so it is subtracted
    /// here. (An unanswered UDP flow stays open until it is idle; the
    /// kernel counts that close.)
    pub fn active(&self) -> u64 {
        self.counters
            .active()
            .saturating_sub(self.timeouts.timeouts)
    }

    /// Every `reason="timeout"` event: TCP handshakes and UDP flows whose
    /// backend did not answer in time.
    pub fn all_timeouts(&self) -> u64 {
        self.timeouts.timeouts + self.response_timeouts.timeouts
    }

    /// Failed connections (TCP) and flows (UDP), each once: the kernel's
    /// count, plus timeouts that were a connection's first failure.
    pub fn failed(&self) -> u64 {
        self.counters.failed + self.timeouts.failed + self.response_timeouts.failed
    }
}

/// One service at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSnapshot {
    /// Service name.
    pub name: String,
    /// Configured canary share, 0..=1.
    pub weight_ratio: f64,
    /// Per backend, both cohorts.
    pub backends: Vec<BackendSnapshot>,
    /// Histograms of [stable, canary] (index with `usize::from(cohort)`, or
    /// use [`ServiceSnapshot::histograms_of`]); `None` while the cohort has
    /// had no connection (nothing to export).
    pub histograms: [Option<Box<CohortHistograms>>; 2],
    /// Rollout state and rollbacks.
    pub rollout: RolloutView,
}

impl ServiceSnapshot {
    /// The counters of one cohort, summed over its backends.
    pub fn cohort_counters(&self, cohort: Cohort) -> BackendCounters {
        let mut sum = BackendCounters::default();
        for b in self.backends.iter().filter(|b| b.cohort == cohort) {
            sum.add(&b.counters);
        }
        sum
    }

    /// Timeouts of one cohort (TCP handshakes, unanswered UDP flows).
    pub fn cohort_timeouts(&self, cohort: Cohort) -> u64 {
        self.backends
            .iter()
            .filter(|b| b.cohort == cohort)
            .map(BackendSnapshot::all_timeouts)
            .sum()
    }

    /// Failed connections of one cohort: THE definition, used by the
    /// judge, `canaryctl status` and `canary_connections_failed_total`. A
    /// connection failed if it was refused, its SYN was retried, its
    /// handshake timed out or the backend reset it; a UDP flow failed if
    /// its backend refused it (ICMP port unreachable) or did not reply
    /// within `udp_response_timeout`; each counts once, whatever else went
    /// wrong with it. The kernel counts the kinds it sees
    /// (`BackendCounters::failed`, `UDP_TIMEOUTS`); TCP handshake
    /// timeouts, which no packet announces, are added by the agent's sweep.
    pub fn failed_connections(&self, cohort: Cohort) -> u64 {
        self.backends
            .iter()
            .filter(|b| b.cohort == cohort)
            .map(BackendSnapshot::failed)
            .sum()
    }

    /// The histograms of one cohort, if it has had a connection.
    pub fn histograms_of(&self, cohort: Cohort) -> Option<&CohortHistograms> {
        self.histograms[usize::from(cohort)].as_deref()
    }
}

/// Everything a scrape exports.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Per configured service.
    pub services: Vec<ServiceSnapshot>,
    /// Data-plane counters, in `Counter::ALL` order.
    pub dataplane: Vec<(Counter, u64)>,
    /// Each configured data-plane link and whether it is attached.
    pub attached: Vec<(String, bool)>,
}

impl Snapshot {
    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceSnapshot> {
        self.services.iter().find(|s| s.name == name)
    }
}

//! Reads the data plane's measurements and exports them to Prometheus.
//!
//! Kernel counters are read at scrape time (a prometheus-client
//! [`Collector`]), never copied on a timer: a scrape sees the maps as they
//! are, and nothing runs between scrapes. Per-CPU counters are summed here.

use std::{
    collections::HashMap as StdHashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use canary_common::{
    counters::Counter,
    service::{COHORT_CANARY, COHORT_STABLE},
    stats::{
        BackendCounters, CohortHistograms, HIST_BUCKETS, HIST_SUB_BITS, Histogram,
        hist_bucket_range, histogram_key,
    },
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

/// A backend as the exporter labels it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    /// `COHORT_STABLE` or `COHORT_CANARY`.
    pub cohort: u8,
    /// The backend's address, the `backend` label.
    pub addr: SocketAddrV4,
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
    pub(crate) stats: PerCpuArray<MapData, BackendCounters>,
    pub(crate) histograms: HashMap<MapData, u32, CohortHistograms>,
    pub(crate) counters: PerCpuArray<MapData, u64>,
    pub(crate) view: Vec<ServiceView>,
    /// Handshake timeouts per `STATS` slot (`TIMEOUTS`), counted by the
    /// agent's sweep.
    pub(crate) timeouts: Array<MapData, u64>,
    /// Rollout state and rollbacks per service name, kept by the agent.
    pub(crate) rollout: StdHashMap<String, RolloutView>,
}

/// What the exporter says of a service's rollout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutView {
    /// One of [`crate::rollout::STATES`].
    pub state: &'static str,
    /// Rollbacks since the agent started, by reason.
    pub rollbacks: std::collections::BTreeMap<&'static str, u64>,
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
}

/// Counters of one backend at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSnapshot {
    /// `COHORT_STABLE` or `COHORT_CANARY`.
    pub cohort: u8,
    /// The backend.
    pub addr: SocketAddrV4,
    /// Kernel counters summed over CPUs.
    pub counters: BackendCounters,
    /// Handshakes that never completed within the timeout.
    pub timeouts: u64,
}

impl BackendSnapshot {
    /// Connections open now. A flow whose handshake timed out is marked
    /// closed without the kernel counting a close, so it is subtracted here.
    pub fn active(&self) -> u64 {
        self.counters.active().saturating_sub(self.timeouts)
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
    /// Histograms of [stable, canary]; `None` while the cohort has had no
    /// connection (nothing to export).
    pub histograms: [Option<Box<CohortHistograms>>; 2],
    /// Rollout state and rollbacks.
    pub rollout: RolloutView,
}

impl ServiceSnapshot {
    /// The counters of one cohort, summed over its backends.
    pub fn cohort_counters(&self, cohort: u8) -> BackendCounters {
        let mut sum = BackendCounters::default();
        for b in self.backends.iter().filter(|b| b.cohort == cohort) {
            sum.add(&b.counters);
        }
        sum
    }

    /// Handshake timeouts of one cohort.
    pub fn cohort_timeouts(&self, cohort: u8) -> u64 {
        self.backends
            .iter()
            .filter(|b| b.cohort == cohort)
            .map(|b| b.timeouts)
            .sum()
    }
}

/// Everything a scrape exports.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Per configured service.
    pub services: Vec<ServiceSnapshot>,
    /// Data-plane counters, in `Counter::ALL` order.
    pub dataplane: Vec<(Counter, u64)>,
}

impl Snapshot {
    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceSnapshot> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl StatsSource {
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
                backends.push(BackendSnapshot {
                    cohort: b.cohort,
                    addr: b.addr,
                    counters,
                    timeouts: self.timeouts.get(&b.slot, 0).unwrap_or(0),
                });
            }
            let mut histograms = [None, None];
            for cohort in [COHORT_STABLE, COHORT_CANARY] {
                let seen = backends.iter().any(|b| {
                    b.cohort == cohort && b.counters.connections + b.counters.reopened > 0
                });
                if seen {
                    // A missing entry (not yet created) reads as no data.
                    histograms[usize::from(cohort)] = self
                        .histograms
                        .get(&histogram_key(svc.svc_id, cohort), 0)
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
                    rollbacks: Default::default(),
                }),
            });
        }
        let dataplane = self.dataplane_counters()?;
        Ok(Snapshot {
            services,
            dataplane,
        })
    }
}

/// The exporter: a registry whose one collector reads the maps at scrape
/// time.
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    /// An exporter over `source`, with `buckets_per_octave` (1, 2, 4, 8 or
    /// 16) exported histogram buckets per doubling.
    pub fn new(source: Arc<Mutex<StatsSource>>, buckets_per_octave: u32) -> Exporter {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector {
            source,
            export_every: (1 << HIST_SUB_BITS)
                / buckets_per_octave.clamp(1, 1 << HIST_SUB_BITS) as usize,
        }));
        Exporter { registry }
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(64 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => out,
            Format::Text => openmetrics_to_text(&out),
        })
    }
}

/// Exposition formats, chosen by the scraper's `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (what Prometheus asks for).
    OpenMetrics,
    /// Prometheus text 0.0.4 (for `curl | promtool check metrics` and older
    /// scrapers).
    Text,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: &str) -> Format {
        if accept.contains("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The `Content-Type` of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics → Prometheus text 0.0.4: counter families are named with
/// their `_total` suffix, and `# UNIT` / `# EOF` lines go. Samples, label
/// escaping and histogram series are the same in both.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held until the TYPE line says whether the name needs _total.
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map(|(_, t)| t).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct StatsCollector {
    source: Arc<Mutex<StatsSource>>,
    /// Export every n-th kernel bucket boundary.
    export_every: usize,
}

// `Debug` for the shared source, required by `Collector`.
impl std::fmt::Debug for StatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsSource")
            .field("services", &self.view.len())
            .finish()
    }
}

fn cohort_name(cohort: u8) -> &'static str {
    if cohort == COHORT_CANARY {
        "canary"
    } else {
        "stable"
    }
}

/// Writes one metric family: a descriptor, then one sample per label set.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    M: EncodeMetric,
{
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let metric_type = first.metric_type();
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = {
            let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
            // A failed map read fails the scrape rather than exporting zeros.
            source.snapshot().map_err(|_| std::fmt::Error)?
        };
        let e = &mut encoder;
        let backends = || {
            snapshot.services.iter().flat_map(|s| {
                s.backends.iter().map(move |b| {
                    (
                        s.name.as_str(),
                        cohort_name(b.cohort),
                        b.addr.to_string(),
                        b,
                    )
                })
            })
        };

        family(
            e,
            "canary_connections",
            "New connections (SYNs) steered to the backend.",
            None,
            backends().map(|(s, c, a, b)| {
                (
                    [("service", s), ("cohort", c), ("backend", &*a)].map(own),
                    ConstCounter::new(b.counters.connections),
                )
            }),
        )?;
        family(
            e,
            "canary_active_connections",
            "Connections open now: opened minus closed (FIN both ways, RST, or handshake timeout).",
            None,
            backends().map(|(s, c, a, b)| {
                (
                    [("service", s), ("cohort", c), ("backend", &*a)].map(own),
                    ConstGauge::new(b.active() as i64),
                )
            }),
        )?;
        family(
            e,
            "canary_resets",
            "RSTs on established connections, by who sent them.",
            None,
            split(&snapshot, "direction", |b| {
                [
                    ("from_backend", b.counters.resets_from_backend),
                    ("from_client", b.counters.resets_from_client),
                ]
            }),
        )?;
        family(
            e,
            "canary_failed_connections",
            "Connections that failed: refused (RST answering the SYN), syn_retry (SYN retransmitted), timeout (no SYN-ACK within handshake_timeout).",
            None,
            split(&snapshot, "reason", |b| {
                [
                    ("refused", b.counters.refused),
                    ("syn_retry", b.counters.syn_retried),
                    ("timeout", b.timeouts),
                ]
            }),
        )?;
        family(
            e,
            "canary_bytes",
            "TCP payload bytes, by who sent them (retransmissions included).",
            None,
            split(&snapshot, "direction", |b| {
                [
                    ("from_client", b.counters.bytes_from_client),
                    ("from_backend", b.counters.bytes_from_backend),
                ]
            }),
        )?;
        family(
            e,
            "canary_packets",
            "TCP packets, by who sent them.",
            None,
            split(&snapshot, "direction", |b| {
                [
                    ("from_client", b.counters.packets_from_client),
                    ("from_backend", b.counters.packets_from_backend),
                ]
            }),
        )?;

        let hists = |pick: fn(&CohortHistograms) -> &Histogram, scale: f64| {
            snapshot.services.iter().flat_map(move |s| {
                [COHORT_STABLE, COHORT_CANARY]
                    .into_iter()
                    .filter_map(move |c| {
                        let h = s.histograms[usize::from(c)].as_ref()?;
                        Some((
                            [("service", s.name.as_str()), ("cohort", cohort_name(c))].map(own),
                            ExportHistogram::new(pick(h), scale, self.export_every),
                        ))
                    })
            })
        };
        family(
            e,
            "canary_handshake",
            "SYN forwarded to the backend → its SYN-ACK back, at the node.",
            Some(&Unit::Seconds),
            hists(|h| &h.handshake_ns, 1e-9),
        )?;
        family(
            e,
            "canary_first_byte",
            "First client payload → first backend payload after it, at the node.",
            Some(&Unit::Seconds),
            hists(|h| &h.first_byte_ns, 1e-9),
        )?;
        family(
            e,
            "canary_connection_duration",
            "Connection open (SYN) → close (FIN both ways or RST).",
            Some(&Unit::Seconds),
            hists(|h| &h.duration_us, 1e-6),
        )?;

        family(
            e,
            "canary_weight_ratio",
            "Configured canary share of new connections (0 to 1).",
            None,
            snapshot.services.iter().map(|s| {
                (
                    [("service", s.name.as_str())].map(own),
                    ConstGauge::new(s.weight_ratio),
                )
            }),
        )?;
        family(
            e,
            "canary_rollout_state",
            "1 for the service's current rollout state, 0 for the others.",
            None,
            snapshot.services.iter().flat_map(|s| {
                crate::rollout::STATES.map(|st| {
                    (
                        [("service", s.name.as_str()), ("state", st)].map(own),
                        ConstGauge::new(i64::from(s.rollout.state == st)),
                    )
                })
            }),
        )?;
        family(
            e,
            "canary_rollbacks",
            "Rollbacks since the agent started, by what decided: breaker (the data plane's line-rate breaker) or operator.",
            None,
            snapshot.services.iter().flat_map(|s| {
                crate::rollout::RollbackReason::ALL
                    .map(|r| r.as_str())
                    .map(|reason| {
                        (
                            [("service", s.name.as_str()), ("reason", reason)].map(own),
                            ConstCounter::new(
                                s.rollout.rollbacks.get(reason).copied().unwrap_or(0),
                            ),
                        )
                    })
            }),
        )?;
        family(
            e,
            "canary_dataplane_events",
            "Data-plane events (new flows, conntrack misses, SYN retransmits and duplicates, RST closes and ignored RSTs, re-resolved flows confirmed or reset, unattributed measurements).",
            None,
            snapshot
                .dataplane
                .iter()
                .filter(|(c, _)| !c.is_error())
                .map(|(c, v)| ([("event", c.name())].map(own), ConstCounter::new(*v))),
        )?;
        family(
            e,
            "canary_dataplane_errors",
            "Data-plane error paths taken, by reason; each has a deliberate verdict.",
            None,
            snapshot
                .dataplane
                .iter()
                .filter(|(c, _)| c.is_error())
                .map(|(c, v)| ([("reason", c.name())].map(own), ConstCounter::new(*v))),
        )?;
        family(
            e,
            "canary_build_info",
            "Build of the running agent.",
            None,
            [(
                [("version", env!("CARGO_PKG_VERSION"))].map(own),
                ConstGauge::new(1i64),
            )],
        )?;
        Ok(())
    }
}

/// One counter per backend and value of `key` (a direction, a reason),
/// labelled service, cohort, backend and `key`.
fn split<'a, const N: usize>(
    snapshot: &'a Snapshot,
    key: &'static str,
    values: fn(&BackendSnapshot) -> [(&'static str, u64); N],
) -> impl Iterator<Item = ([(&'static str, String); 4], ConstCounter<u64>)> + 'a {
    snapshot.services.iter().flat_map(move |s| {
        s.backends.iter().flat_map(move |b| {
            let addr = b.addr.to_string();
            values(b).map(move |(v, n)| {
                (
                    [
                        ("service", s.name.as_str()),
                        ("cohort", cohort_name(b.cohort)),
                        ("backend", &*addr),
                        (key, v),
                    ]
                    .map(own),
                    ConstCounter::new(n),
                )
            })
        })
    })
}

/// A label pair with owned strings (label values outlive the iterators).
fn own((k, v): (&'static str, &str)) -> (&'static str, String) {
    (k, v.to_string())
}

/// A kernel histogram as exported: every `export_every`-th bucket boundary
/// (exact sums of the fine buckets below it), scaled to seconds.
#[derive(Debug)]
struct ExportHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl ExportHistogram {
    fn new(h: &Histogram, scale: f64, export_every: usize) -> ExportHistogram {
        let mut buckets = Vec::with_capacity(HIST_BUCKETS / export_every + 2);
        let mut acc = 0u64;
        for (i, &n) in h.buckets.iter().enumerate() {
            acc += n;
            let last = i == HIST_BUCKETS - 1;
            // Boundaries: the end of the underflow bucket, then every
            // export_every-th fine bucket, then +Inf.
            let boundary = i == 0 || (!last && i % export_every == 0);
            if last {
                buckets.push((f64::INFINITY, acc));
            } else if boundary {
                buckets.push((hist_bucket_range(i).1 as f64 * scale, acc));
                acc = 0;
            }
        }
        ExportHistogram {
            sum: h.sum as f64 * scale,
            count: h.buckets.iter().sum(),
            buckets,
        }
    }
}

impl prometheus_client::metrics::TypedMetric for ExportHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ExportHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use canary_common::stats::hist_bucket;

    use super::*;

    #[test]
    fn text_format_names_counter_families_with_total_and_drops_openmetrics_lines() {
        let om = "# HELP canary_connections New connections.\n# TYPE canary_connections counter\n\
                  canary_connections_total{service=\"web\"} 3\n\
                  # HELP canary_handshake_seconds SYN.\n# TYPE canary_handshake_seconds histogram\n\
                  # UNIT canary_handshake_seconds seconds\ncanary_handshake_seconds_count 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP canary_connections_total New connections.\n# TYPE canary_connections_total counter\n\
             canary_connections_total{service=\"web\"} 3\n\
             # HELP canary_handshake_seconds SYN.\n# TYPE canary_handshake_seconds histogram\n\
             canary_handshake_seconds_count 1\n"
        );
        assert_eq!(
            Format::from_accept("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept("*/*"), Format::Text);
    }

    #[test]
    fn exported_buckets_sum_the_fine_ones_exactly() {
        let mut h = Histogram::default();
        for v in [
            1_000u64,
            5_000,
            50_000,
            50_001,
            49_000_000,
            50_100_000,
            9_000_000_000,
            1 << 40,
        ] {
            h.buckets[hist_bucket(v)] += 1;
            h.sum += v;
        }
        for every in [1usize, 4, 16] {
            let e = ExportHistogram::new(&h, 1e-9, every);
            assert_eq!(e.count, 8);
            assert_eq!(
                e.buckets.iter().map(|b| b.1).sum::<u64>(),
                8,
                "every {every}: counts lost"
            );
            assert_eq!(e.buckets.last().unwrap().0, f64::INFINITY);
            assert!(
                e.buckets.windows(2).all(|w| w[0].0 < w[1].0),
                "bounds increase"
            );
            // Each value sits in the first exported bucket whose bound is above it.
            for v in [5_000u64, 50_000, 49_000_000] {
                let (bound, _) = e
                    .buckets
                    .iter()
                    .find(|(b, _)| *b > v as f64 * 1e-9)
                    .unwrap();
                let below: u64 = e
                    .buckets
                    .iter()
                    .filter(|(b, _)| b <= bound)
                    .map(|b| b.1)
                    .sum();
                assert!(below >= 1, "{v} ns not under {bound}");
            }
        }
        // 16 fine buckets per octave exported 4 per octave: 22 octaves.
        let e = ExportHistogram::new(&h, 1e-9, 4);
        assert_eq!(e.buckets.len(), 1 + 22 * 4 + 1);
    }
}

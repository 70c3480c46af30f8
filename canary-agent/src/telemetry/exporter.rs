//! The Prometheus side: a prometheus-client [`Collector`] that reads a
//! [`Snapshot`] of the maps at scrape time and encodes it, with typed label
//! sets, in OpenMetrics or Prometheus text.
//!
//! Kernel counters are read at scrape time, never copied on a timer: a
//! scrape sees the maps as they are, and nothing runs between scrapes.

use std::sync::{Arc, Mutex};

use canary_common::{
    service::Cohort,
    stats::{CohortHistograms, HIST_SUB_BITS, Histogram},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{
    histogram::ExportHistogram,
    labels::{
        BackendLabels, BuildLabels, CheckLabels, CohortLabel, CohortLabels, CounterLabel,
        Direction, DirectionLabels, ErrorLabels, EventLabels, FailureLabels, FailureReason,
        LinkLabels, RollbackLabels, RolloutState, ServiceLabels, StateLabels, VerdictLabels,
    },
    snapshot::{BackendSnapshot, Snapshot, StatsSource},
};
use crate::rollout::RollbackReason;

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
            export_every: export_every(buckets_per_octave),
        }));
        Exporter { registry }
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        encode_registry(&self.registry, format)
    }
}

/// Kernel buckets per exported bucket for `buckets_per_octave`.
fn export_every(buckets_per_octave: u32) -> usize {
    ((1u32 << HIST_SUB_BITS) / buckets_per_octave.clamp(1, 1 << HIST_SUB_BITS)) as usize
}

fn encode_registry(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(64 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(match format {
        Format::OpenMetrics => out,
        Format::Text => openmetrics_to_text(&out),
    })
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
                let text = h.split_once(' ').map_or("", |(_, t)| t);
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

impl Collector for StatsCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = {
            let source = self
                .source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A failed map read fails the scrape rather than exporting zeros.
            source.snapshot().map_err(|_| std::fmt::Error)?
        };
        encode_snapshot(&snapshot, self.export_every, encoder)
    }
}

/// Writes one metric family: a descriptor, then one sample per label set.
/// A family with no sample is left out.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet,
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

/// Every backend of every service with its labels.
fn backends(snapshot: &Snapshot) -> impl Iterator<Item = (BackendLabels, &BackendSnapshot)> {
    snapshot.services.iter().flat_map(|s| {
        s.backends
            .iter()
            .map(move |b| (BackendLabels::new(s, b), b))
    })
}

/// One counter per backend and value of a split label (a direction, a
/// reason), in the order `values` gives them.
fn split<'a, V: Copy + 'a, L: 'a, const N: usize>(
    snapshot: &'a Snapshot,
    values: fn(&BackendSnapshot) -> [(V, u64); N],
    labels: fn(BackendLabels, V) -> L,
) -> impl Iterator<Item = (L, ConstCounter<u64>)> + 'a {
    backends(snapshot).flat_map(move |(base, b)| {
        values(b).map(|(v, n)| (labels(base.clone(), v), ConstCounter::new(n)))
    })
}

/// Encodes every family of `snapshot`, histograms with every
/// `export_every`-th kernel bucket boundary.
fn encode_snapshot(
    snapshot: &Snapshot,
    export_every: usize,
    mut encoder: DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let e = &mut encoder;
    family(
        e,
        "canary_connections",
        "New connections steered to the backend: TCP SYNs; UDP flows (a 5-tuple's first datagram, or its first after udp_idle_timeout).",
        None,
        backends(snapshot).map(|(l, b)| (l, ConstCounter::new(b.counters.connections))),
    )?;
    family(
        e,
        "canary_active_connections",
        "Connections open now: opened minus closed (TCP: FIN both ways, RST, or handshake timeout; UDP: idle for udp_idle_timeout, or refused).",
        None,
        backends(snapshot).map(|(l, b)| {
            (
                l,
                ConstGauge::new(i64::try_from(b.active()).unwrap_or(i64::MAX)),
            )
        }),
    )?;
    let by_direction = |backend, direction| DirectionLabels { backend, direction };
    family(
        e,
        "canary_resets",
        "RSTs on established TCP connections, by who sent them.",
        None,
        split(
            snapshot,
            |b| {
                [
                    (Direction::FromBackend, b.counters.resets_from_backend),
                    (Direction::FromClient, b.counters.resets_from_client),
                ]
            },
            by_direction,
        ),
    )?;
    family(
        e,
        "canary_connections_failed",
        "Connections that failed, each once: TCP refused, SYN retried, handshake timed out or reset by the backend; UDP refused (ICMP port unreachable) or unanswered within udp_response_timeout (the judge's and canaryctl status's definition).",
        None,
        backends(snapshot).map(|(l, b)| (l, ConstCounter::new(b.failed()))),
    )?;
    family(
        e,
        "canary_failed_connections",
        "Failure events by reason: refused (TCP: RST answering the SYN; UDP: ICMP port unreachable from the backend), syn_retry (TCP SYN retransmitted), timeout (TCP: no SYN-ACK within handshake_timeout; UDP: no reply within udp_response_timeout). A connection can count under several.",
        None,
        split(
            snapshot,
            |b| {
                [
                    (FailureReason::Refused, b.counters.refused),
                    (FailureReason::SynRetry, b.counters.syn_retried),
                    (FailureReason::Timeout, b.all_timeouts()),
                ]
            },
            |backend, reason| FailureLabels { backend, reason },
        ),
    )?;
    family(
        e,
        "canary_bytes",
        "Payload bytes (TCP payload, retransmissions included; UDP payload), by who sent them.",
        None,
        split(
            snapshot,
            |b| {
                [
                    (Direction::FromClient, b.counters.bytes_from_client),
                    (Direction::FromBackend, b.counters.bytes_from_backend),
                ]
            },
            by_direction,
        ),
    )?;
    family(
        e,
        "canary_packets",
        "TCP segments and UDP datagrams, by who sent them.",
        None,
        split(
            snapshot,
            |b| {
                [
                    (Direction::FromClient, b.counters.packets_from_client),
                    (Direction::FromBackend, b.counters.packets_from_backend),
                ]
            },
            by_direction,
        ),
    )?;

    let hists = |pick: fn(&CohortHistograms) -> &Histogram, scale: f64| {
        snapshot.services.iter().flat_map(move |s| {
            Cohort::ALL.into_iter().filter_map(move |cohort| {
                let h = s.histograms_of(cohort)?;
                Some((
                    CohortLabels {
                        service: s.name.clone(),
                        cohort: CohortLabel(cohort),
                    },
                    ExportHistogram::new(pick(h), scale, export_every),
                ))
            })
        })
    };
    family(
        e,
        "canary_handshake",
        "TCP: SYN forwarded to the backend → its SYN-ACK back, at the node (UDP has none).",
        Some(&Unit::Seconds),
        hists(|h| &h.handshake_ns, 1e-9),
    )?;
    family(
        e,
        "canary_first_byte",
        "TCP: first client payload → first backend payload after it; UDP: a flow's first datagram → the backend's first reply; at the node.",
        Some(&Unit::Seconds),
        hists(|h| &h.first_byte_ns, 1e-9),
    )?;
    family(
        e,
        "canary_connection_duration",
        "TCP: connection open (SYN) → close (FIN both ways or RST); UDP: a flow's first datagram → its last, once idle for udp_idle_timeout.",
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
                ServiceLabels {
                    service: s.name.clone(),
                },
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
            crate::rollout::STATES.map(|state| {
                (
                    StateLabels {
                        service: s.name.clone(),
                        state: RolloutState(state),
                    },
                    ConstGauge::new(i64::from(s.rollout.state == state)),
                )
            })
        }),
    )?;
    family(
        e,
        "canary_rollbacks",
        "Rollbacks since the agent started, by what decided: breaker (the data plane's line-rate breaker), operator, judge or check (a team's PromQL check).",
        None,
        snapshot.services.iter().flat_map(|s| {
            RollbackReason::ALL.map(|reason| {
                (
                    RollbackLabels {
                        service: s.name.clone(),
                        reason,
                    },
                    ConstCounter::new(
                        s.rollout
                            .rollbacks
                            .get(reason.as_str())
                            .copied()
                            .unwrap_or(0),
                    ),
                )
            })
        }),
    )?;
    family(
        e,
        "canary_judgements",
        "The judge's verdicts since the agent started, by kind: pass, fail, insufficient-data (holds the step).",
        None,
        snapshot.services.iter().flat_map(|s| {
            crate::judge::VERDICT_KINDS.map(|verdict| {
                (
                    VerdictLabels {
                        service: s.name.clone(),
                        verdict,
                    },
                    ConstCounter::new(s.rollout.judgements.get(verdict).copied().unwrap_or(0)),
                )
            })
        }),
    )?;
    family(
        e,
        "canary_check_evaluations",
        "Evaluations of each PromQL check since the agent started, by outcome: pass, fail (rolls back), inconclusive (holds the step; max_inconclusive in a row pause the rollout).",
        None,
        snapshot.services.iter().flat_map(|s| {
            s.rollout.checks.iter().flat_map(move |(check, counts)| {
                crate::analysis::checks::OUTCOMES
                    .iter()
                    .zip(counts)
                    .map(move |(outcome, n)| {
                        (
                            CheckLabels {
                                service: s.name.clone(),
                                check: check.clone(),
                                outcome,
                            },
                            ConstCounter::new(*n),
                        )
                    })
            })
        }),
    )?;
    family(
        e,
        "canary_dataplane_attached",
        "1 if the data-plane link the config asks for is attached (a client-facing interface by name, or socket-lb), 0 if not (an interface that disappeared).",
        None,
        snapshot.attached.iter().map(|(link, up)| {
            (
                LinkLabels { link: link.clone() },
                ConstGauge::new(i64::from(*up)),
            )
        }),
    )?;
    family(
        e,
        "canary_dataplane_events",
        "Data-plane events (new flows, conntrack misses, SYN retransmits and duplicates, RST closes and ignored RSTs, re-resolved flows confirmed or reset, unattributed measurements, connections steered at the socket and those of them with no known source for the rules).",
        None,
        snapshot
            .dataplane
            .iter()
            .filter(|(c, _)| !c.is_error())
            .map(|&(c, v)| {
                (
                    EventLabels {
                        event: CounterLabel(c),
                    },
                    ConstCounter::new(v),
                )
            }),
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
            .map(|&(c, v)| {
                (
                    ErrorLabels {
                        reason: CounterLabel(c),
                    },
                    ConstCounter::new(v),
                )
            }),
    )?;
    family(
        e,
        "canary_build_info",
        "Build of the running agent.",
        None,
        [(
            BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            },
            ConstGauge::new(1i64),
        )],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use canary_common::{
        counters::Counter,
        stats::{BackendCounters, HandshakeTimeouts, hist_bucket},
    };

    use super::*;
    use crate::telemetry::{RolloutView, ServiceSnapshot};

    /// A snapshot with every kind of series: two services, several backends
    /// per cohort, histograms for one or both cohorts, rollbacks, every
    /// data-plane counter.
    fn fixture() -> Snapshot {
        let hist = |values: &[u64]| {
            let mut h = Histogram::default();
            for &v in values {
                h.buckets[hist_bucket(v)] += 1;
                h.sum += v;
            }
            h
        };
        let histograms = |k: u64| {
            Some(Box::new(CohortHistograms {
                handshake_ns: hist(&[50_000 * k, 120_000, 3_000_000 * k]),
                first_byte_ns: hist(&[1_000_000 * k, 2_500_000, 40_000_000]),
                duration_us: hist(&[10_000 * k, 2_000_000]),
            }))
        };
        let counters = |k: u64| BackendCounters {
            connections: 10 * k,
            reopened: k,
            closed: 9 * k,
            resets_from_backend: 2 * k,
            resets_from_client: 3 * k,
            refused: 4 * k,
            syn_retried: 5 * k,
            bytes_from_client: 600 * k,
            bytes_from_backend: 700 * k,
            packets_from_client: 8 * k,
            packets_from_backend: 9 * k + 1,
            failed: 6 * k,
        };
        let backend = |cohort, addr: &str, k, timeouts| BackendSnapshot {
            cohort,
            addr: addr.parse().expect("address"),
            counters: counters(k),
            timeouts: HandshakeTimeouts {
                timeouts,
                failed: timeouts / 2,
            },
            response_timeouts: HandshakeTimeouts {
                timeouts: timeouts * 3,
                failed: timeouts,
            },
        };
        let web = ServiceSnapshot {
            name: "web".to_string(),
            weight_ratio: 0.05,
            backends: vec![
                backend(Cohort::Stable, "10.0.1.10:8080", 3, 2),
                backend(Cohort::Stable, "10.0.1.11:8080", 5, 0),
                backend(Cohort::Canary, "10.0.2.10:8080", 1, 1),
            ],
            histograms: [histograms(1), histograms(3)],
            rollout: RolloutView {
                state: "progressing",
                rollbacks: [("breaker", 1), ("judge", 2)].into_iter().collect(),
                judgements: [("pass", 5), ("fail", 1)].into_iter().collect(),
                checks: [("http-5xx".to_string(), [3, 1, 2])].into_iter().collect(),
            },
        };
        let db = ServiceSnapshot {
            name: "db".to_string(),
            weight_ratio: 0.0,
            backends: vec![
                backend(Cohort::Stable, "10.0.3.10:5432", 2, 0),
                backend(Cohort::Canary, "10.0.4.10:5432", 0, 0),
            ],
            histograms: [histograms(2), None],
            rollout: RolloutView {
                state: "idle",
                ..RolloutView::default()
            },
        };
        Snapshot {
            services: vec![web, db],
            dataplane: Counter::ALL
                .iter()
                .zip(0u64..)
                .map(|(&c, i)| (c, i * 7))
                .collect(),
            attached: vec![("eth0".into(), true), ("socket-lb".into(), false)],
        }
    }

    /// A registry whose collector encodes a fixed snapshot.
    #[derive(Debug)]
    struct Fixed(Snapshot, usize);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_snapshot(&self.0, self.1, encoder)
        }
    }

    fn exposition(format: Format) -> String {
        let mut registry = Registry::default();
        // One exported bucket per octave keeps the expected text short.
        registry.register_collector(Box::new(Fixed(fixture(), 16)));
        encode_registry(&registry, format).expect("encode")
    }

    /// The exposition of a fixed snapshot, byte for byte. The expected
    /// texts were produced by the exporter before its label sets were
    /// typed (then `canary_connections_failed` was added, checked by hand
    /// against the fixture's counters); any change to a name, label, order
    /// or value shows here.
    #[test]
    fn exposition_of_a_snapshot_is_exactly_the_expected_text() {
        let cases = [
            (
                Format::OpenMetrics,
                include_str!("testdata/exposition.openmetrics"),
            ),
            (Format::Text, include_str!("testdata/exposition.txt")),
        ];
        for (format, expected) in cases {
            let got = exposition(format);
            if got != expected {
                let line = got
                    .lines()
                    .zip(expected.lines())
                    .position(|(g, e)| g != e)
                    .unwrap_or(got.lines().count().min(expected.lines().count()));
                panic!(
                    "{format:?} exposition differs from line {}: got {:?}, expected {:?}",
                    line + 1,
                    got.lines().nth(line),
                    expected.lines().nth(line)
                );
            }
        }
    }

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
}

//! Reads the data plane's measurements and exports them to Prometheus.
//!
//! - [`snapshot`]: the measurement maps (`STATS`, `TIMEOUTS`, `HISTOGRAMS`,
//!   `COUNTERS`) read into a [`Snapshot`], per-CPU counters summed. The
//!   judge and `status` read the same snapshots as a scrape.
//! - [`exporter`]: the prometheus-client collector that encodes a snapshot
//!   at scrape time as OpenMetrics or Prometheus text;
//!   `labels.rs` holds its typed label sets, `histogram.rs` the conversion
//!   of the kernel's fine buckets into exported ones.

pub mod exporter;
mod histogram;
mod labels;
pub mod snapshot;

pub use self::{
    exporter::{Exporter, Format},
    snapshot::{
        BackendSnapshot, BackendView, RolloutView, ServiceSnapshot, ServiceView, Snapshot,
        StatsSource,
    },
};

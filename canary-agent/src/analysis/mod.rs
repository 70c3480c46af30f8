//! Evidence from Prometheus: the team's own PromQL checks (`checks.rs`)
//! and the fleet's summed counters and histograms (`fleet.rs`), both over
//! one hand-written instant-query client (`prometheus.rs`).
//!
//! Everything that can go wrong with a query (Prometheus down or slow, an
//! error, no series, several series, NaN) is *inconclusive*: it holds a
//! step, and never passes one.

pub mod checks;
pub mod fleet;
pub mod prometheus;

pub use self::{
    checks::{CheckOutcome, Outcome, TEMPLATE_VARIABLES},
    prometheus::{Endpoint, QueryError, Series},
};

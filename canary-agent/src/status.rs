//! The `status` report: what the agent answers and `canaryctl` prints.

use serde::{Deserialize, Serialize};

/// Every service (or the one asked for).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The fleet, when the agent runs with `[fleet]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
    /// In config order.
    pub services: Vec<ServiceStatus>,
}

/// One service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// The release its canary backends run.
    #[serde(default)]
    pub release: String,
    /// Rollout state: idle, promoted, rolled-back (more with plans).
    pub state: String,
    /// Weight in the config file.
    pub configured_weight: String,
    /// Weight in force (a plan step's, an operator's, 100 % when promoted).
    pub effective_weight: String,
    /// For a plan-driven service: "step/steps (weight)".
    #[serde(default)]
    pub step: Option<String>,
    /// Canary share of new connections since the agent started.
    pub observed_canary_share: Option<f64>,
    /// Stable, then canary.
    pub cohorts: Vec<CohortStatus>,
    /// The last decision about this service, with its numbers.
    pub last_verdict: Option<String>,
    /// Verdicts the judge has given on this service since the agent
    /// started (pass, fail or insufficient data): how a soak, or an
    /// operator, tells a quiet judge from one that never ran.
    #[serde(default)]
    pub judgements: u64,
    /// `enforce`, or `shadow` (decisions reported, not enforced).
    #[serde(default)]
    pub mode: String,
    /// The latest outcome of each PromQL check at the current step.
    #[serde(default)]
    pub checks: Vec<String>,
    /// Where a plan-driven service is in its plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanProgress>,
}

/// A plan's progress, for `status --watch` and `explain`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanProgress {
    /// The current (or gated) step, from 1.
    pub step: u32,
    /// Steps in the plan.
    pub steps: u32,
    /// Each step's weight.
    pub weights: Vec<String>,
    /// Seconds at the current step, when progressing.
    pub in_step_secs: Option<u64>,
    /// The current step's hold, in seconds.
    pub hold_secs: u64,
    /// The current step's `min_connections`.
    pub min_connections: u64,
    /// Canary connections the judge's window has seen at the step.
    pub canary_connections: u64,
    /// What moves it on, in words.
    pub next: String,
}

/// The answer to `history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryReport {
    /// The service.
    pub service: String,
    /// Its changes, oldest first.
    pub changes: Vec<crate::rollout::history::Change>,
}

/// The answer to `explain`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The service.
    pub service: String,
    /// Lines for people.
    pub lines: Vec<String>,
}

/// One cohort of a service, since the agent started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CohortStatus {
    /// `stable` or `canary`.
    pub cohort: String,
    /// New connections.
    pub connections: u64,
    /// Open now.
    pub active: u64,
    /// Failed connections: refused, SYN retried, handshake timed out.
    pub failed: u64,
    /// Established connections reset by the backend.
    pub resets_from_backend: u64,
    /// `failed / connections`.
    pub failure_ratio: f64,
    /// First-byte time quantiles from the kernel's fine histogram.
    pub first_byte_p50_ms: Option<f64>,
    /// See `first_byte_p50_ms`.
    pub first_byte_p99_ms: Option<f64>,
}

/// The fleet as one node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// This node's name.
    pub node: String,
    /// "connected", or why etcd is unreachable.
    pub etcd: String,
    /// The node that leads (moves plans on), if known.
    pub leader: Option<String>,
    /// Whether this node leads.
    pub this_node_leads: bool,
    /// Services with a rollback decided here that etcd has not taken yet.
    #[serde(default)]
    pub unpublished: Vec<String>,
    /// One row per live node and service (from their summaries).
    pub nodes: Vec<NodeRow>,
}

/// One node's summary of one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    /// The service.
    pub service: String,
    /// The node.
    pub node: String,
    /// The release its config runs.
    pub release: String,
    /// The state in force there.
    pub state: String,
    /// The canary weight in force there.
    pub weight: String,
    /// Connections at the current step (both cohorts).
    pub connections: u64,
    /// Of which canary.
    pub canary_connections: u64,
    /// Failed connections at the step (both cohorts).
    pub failures: u64,
    /// Of which canary.
    pub canary_failures: u64,
    /// Its last verdict.
    pub verdict: Option<String>,
    /// Whether its data plane is attached.
    pub attached: bool,
    /// Seconds since its last summary.
    pub heard_secs_ago: u64,
}

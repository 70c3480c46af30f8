//! The exporter's label sets: derived `EncodeLabelSet` structs whose
//! bounded labels are enums, so that a series can only carry a label value
//! listed here and the label names and order are written once.

use canary_common::{counters::Counter, service::Cohort};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use super::snapshot::{BackendSnapshot, ServiceSnapshot};
use crate::rollout::RollbackReason;

// Label values. Each bounded label is an enum (or a closed set of names
// owned elsewhere), so a series can only carry a value this file lists.

/// The `cohort` label. A newtype because both the enum (canary-common) and
/// the trait (prometheus-client) live in other crates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct CohortLabel(pub(super) Cohort);

impl EncodeLabelValue for CohortLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_str(), encoder)
    }
}

/// The `direction` label: who sent the reset, bytes or packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Direction {
    /// Sent by the backend (towards the client).
    FromBackend,
    /// Sent by the client (towards the backend).
    FromClient,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = match self {
            Direction::FromBackend => "from_backend",
            Direction::FromClient => "from_client",
        };
        EncodeLabelValue::encode(&name, encoder)
    }
}

/// The `reason` label of `canary_failed_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum FailureReason {
    /// A RST answered the SYN.
    Refused,
    /// The SYN was retransmitted.
    SynRetry,
    /// No SYN-ACK within `handshake_timeout` (the agent's sweep).
    Timeout,
}

impl EncodeLabelValue for FailureReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = match self {
            FailureReason::Refused => "refused",
            FailureReason::SynRetry => "syn_retry",
            FailureReason::Timeout => "timeout",
        };
        EncodeLabelValue::encode(&name, encoder)
    }
}

// Implemented here rather than in `rollout` so that the rollout engine
// stays free of exporter types; the names are the reason's own.
impl EncodeLabelValue for RollbackReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The `state` label: one of [`crate::rollout::STATES`], the only values
/// the exporter ever builds it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct RolloutState(pub(super) &'static str);

impl EncodeLabelValue for RolloutState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0, encoder)
    }
}

/// The `event` or `reason` label of a data-plane counter: its
/// [`Counter::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CounterLabel(pub(super) Counter);

impl EncodeLabelValue for CounterLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.name(), encoder)
    }
}

// Label sets, in the order their labels appear in the exposition.

/// `{service}`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ServiceLabels {
    pub(super) service: String,
}

/// `{service, cohort}`: the histograms.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CohortLabels {
    pub(super) service: String,
    pub(super) cohort: CohortLabel,
}

/// `{service, cohort, backend}`: per-backend counters.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BackendLabels {
    pub(super) service: String,
    pub(super) cohort: CohortLabel,
    pub(super) backend: String,
}

/// `{service, cohort, backend, direction}`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DirectionLabels {
    #[prometheus(flatten)]
    pub(super) backend: BackendLabels,
    pub(super) direction: Direction,
}

/// `{service, cohort, backend, reason}`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FailureLabels {
    #[prometheus(flatten)]
    pub(super) backend: BackendLabels,
    pub(super) reason: FailureReason,
}

/// `{service, state}`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StateLabels {
    pub(super) service: String,
    pub(super) state: RolloutState,
}

/// `{service, reason}` of `canary_rollbacks_total`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RollbackLabels {
    pub(super) service: String,
    pub(super) reason: RollbackReason,
}

/// `{service, verdict}` of `canary_judgements_total`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct VerdictLabels {
    pub(super) service: String,
    pub(super) verdict: &'static str,
}

/// `{service, check, outcome}` of `canary_check_evaluations_total`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CheckLabels {
    pub(super) service: String,
    pub(super) check: String,
    pub(super) outcome: &'static str,
}

/// `{link}` of `canary_dataplane_attached`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct LinkLabels {
    pub(super) link: String,
}

/// `{event}`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct EventLabels {
    pub(super) event: CounterLabel,
}

/// `{reason}` of `canary_dataplane_errors_total`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ErrorLabels {
    pub(super) reason: CounterLabel,
}

/// `{version}`.
#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BuildLabels {
    pub(super) version: &'static str,
}

impl BackendLabels {
    pub(super) fn new(service: &ServiceSnapshot, backend: &BackendSnapshot) -> BackendLabels {
        BackendLabels {
            service: service.name.clone(),
            cohort: CohortLabel(backend.cohort),
            backend: backend.addr.to_string(),
        }
    }
}

//! The fleet: one rollout state per service and release, shared by every
//! node through etcd.
//!
//! Keys, under `[fleet] prefix`:
//! - `rollouts/<service>/<release>`: the [`Record`] every node applies,
//!   changed only by compare-and-swap on its revision;
//! - `nodes/<service>/<node>`: each node's [`Summary`] (counts and verdicts
//!   at the current step), on the node's lease, so a dead node drops out;
//! - `leader`: the etcd election whose winner moves plans on.
//!
//! The tasks here (`tasks.rs`) do the I/O and never touch the data plane:
//! the daemon feeds what they report into the rollout engine. etcd down
//! means fail static: nothing changes on a node but what it decides itself
//! (its breaker and judge may still roll back; those rollbacks are
//! published when etcd returns).

mod etcd;
mod tasks;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use self::etcd::{EtcdError, REQUEST_TIMEOUT, connect, get_summaries, leader};
pub use self::tasks::{publisher, session, watcher};
use crate::{config::FleetConfig, rollout::ServiceState, supervise::Supervisor};

/// Where a fleet's keys live.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (validated: starts with `/`, no trailing `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Prefix of every rollout record.
    pub fn rollouts(&self) -> String {
        format!("{}/rollouts/", self.prefix)
    }

    /// The record of `service`'s `release`.
    pub fn rollout(&self, service: &str, release: &str) -> String {
        format!("{}/rollouts/{service}/{release}", self.prefix)
    }

    /// (service, release) of a record key.
    pub fn parse_rollout(&self, key: &[u8]) -> Option<(String, String)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.rollouts())?;
        let (service, release) = rest.split_once('/')?;
        Some((service.to_string(), release.to_string()))
    }

    /// Prefix of every node summary.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `node`'s summary of `service`.
    pub fn node(&self, service: &str, node: &str) -> String {
        format!("{}/nodes/{service}/{node}", self.prefix)
    }

    /// The leader election's name.
    pub fn election(&self) -> String {
        format!("{}/leader", self.prefix)
    }
}

/// A service's rollout state for one release, as etcd holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The state every node applies.
    pub state: ServiceState,
    /// The node that decided it.
    pub node: String,
    /// What decided there ("canaryctl", "the judge", "the breaker"…).
    pub by: String,
    /// The decision's verdict line.
    pub verdict: String,
    /// Wall-clock seconds of the decision.
    pub at_unix: u64,
}

/// Counts of one cohort at a node's current step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Connections (or UDP flows) since the node entered the step.
    pub connections: u64,
    /// Of which failed.
    pub failures: u64,
}

/// What a node tells the fleet about one service, every
/// `summary_interval`, on its lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The service.
    pub service: String,
    /// The node.
    pub node: String,
    /// The release its config runs.
    pub release: String,
    /// The state in force on the node.
    pub state: ServiceState,
    /// The canary weight in force, ppm.
    pub weight_ppm: u32,
    /// Stable's counts at the step.
    pub stable: Counts,
    /// Canary's counts at the step.
    pub canary: Counts,
    /// The node's last verdict line.
    pub verdict: Option<String>,
    /// Whether the node's judge last failed the canary.
    pub judge_fails: bool,
    /// Whether the node's data plane is attached (an interface or the
    /// socket LB).
    pub attached: bool,
    /// Wall-clock seconds of the summary.
    pub at_unix: u64,
}

/// One record as the watch saw it.
#[derive(Clone, Debug)]
pub struct Change {
    /// The service.
    pub service: String,
    /// The release.
    pub release: String,
    /// The record; `None` when it was deleted.
    pub record: Option<Record>,
    /// Its modification revision (of the deletion, when deleted).
    pub revision: i64,
}

/// What the fleet's tasks report to the daemon.
#[derive(Debug)]
pub enum FleetEvent {
    /// Records: every one at (re)connection (`snapshot`), then each change.
    Records {
        /// A full listing after (re)connecting: records missing from it do
        /// not exist.
        snapshot: bool,
        /// The records.
        changes: Vec<Change>,
    },
    /// The watch lost etcd (fail static until the next snapshot).
    Disconnected(String),
    /// This node won (`true`) or lost the leader election.
    Leader(bool),
    /// Every node's summaries, for the leader's gate.
    Summaries(Vec<Summary>),
    /// A rollback decided here is in etcd now.
    Published {
        /// The service.
        service: String,
        /// The release.
        release: String,
    },
}

/// Why a compare-and-swap did not happen.
#[derive(Debug)]
pub enum CasError {
    /// The record changed since the given revision: here it is now.
    Conflict(Option<Record>, i64),
    /// etcd did not answer.
    Unavailable(String),
}

/// What the daemon asks the publisher to write.
#[derive(Debug)]
pub enum Job {
    /// A rollback decided on this node: written whatever the record says
    /// (unless it is already rolled back), retried until etcd takes it.
    Rollback {
        /// The service.
        service: String,
        /// The release.
        release: String,
        /// The rollback.
        record: Record,
    },
    /// The first record of a release, written only if none exists (another
    /// node's wins). Retried until etcd answers.
    Create {
        /// The service.
        service: String,
        /// The release.
        release: String,
        /// The state this node starts from.
        record: Record,
    },
    /// A decision taken on the record at `base`: written only if the
    /// record is still at that revision (0: absent).
    Cas {
        /// The service.
        service: String,
        /// The release.
        release: String,
        /// The new record.
        record: Record,
        /// The revision it was decided on.
        base: i64,
        /// Where the outcome goes (the new revision), if anyone waits.
        reply: Option<oneshot::Sender<Result<i64, CasError>>>,
    },
}

/// The daemon's end of the fleet: the jobs it sends, the events it gets
/// and this node's summaries.
pub struct Fleet {
    /// The validated `[fleet]` section.
    pub config: FleetConfig,
    /// Its keys.
    pub keys: Keys,
    /// Jobs for the publisher.
    pub jobs: mpsc::UnboundedSender<Job>,
    /// What the tasks report (taken by the daemon's loop).
    pub events: Option<mpsc::Receiver<FleetEvent>>,
    /// This node's summary per service, published by the session task.
    pub summaries: Arc<Mutex<BTreeMap<String, Summary>>>,
    /// A client for on-demand reads (`status`).
    pub client: etcd_client::Client,
}

impl Fleet {
    /// Starts the fleet's tasks (watch, session, publisher) under `tasks`.
    /// Connecting is lazy: an unreachable etcd is retried, never fatal.
    pub async fn start(config: FleetConfig, tasks: &mut Supervisor) -> Result<Fleet, EtcdError> {
        let keys = Keys::new(&config.prefix);
        let client = connect(&config).await?;
        let (events_tx, events) = mpsc::channel(1024);
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
        let summaries = Arc::new(Mutex::new(BTreeMap::new()));
        {
            let (config, keys, tx) = (config.clone(), keys.clone(), events_tx.clone());
            tasks.spawn("fleet watch", move || {
                watcher(config.clone(), keys.clone(), tx.clone())
            });
        }
        {
            let (config, keys, tx) = (config.clone(), keys.clone(), events_tx.clone());
            let summaries = summaries.clone();
            tasks.spawn("fleet session", move || {
                session(config.clone(), keys.clone(), summaries.clone(), tx.clone())
            });
        }
        {
            let (config, keys, tx) = (config.clone(), keys.clone(), events_tx);
            tasks.spawn("fleet publisher", move || {
                publisher(config.clone(), keys.clone(), jobs_rx.clone(), tx.clone())
            });
        }
        Ok(Fleet {
            config,
            keys,
            jobs,
            events: Some(events),
            summaries,
            client,
        })
    }
}

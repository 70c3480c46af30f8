//! The fleet's background tasks. Each loops for the agent's life: on any
//! etcd failure it says so, waits a moment and starts over, so an etcd
//! outage is never fatal (fail static).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    CasError, Change, FleetEvent, Job, Keys, Summary,
    etcd::{
        EtcdError, bounded, cas, connect, decode_record, get_record, get_summaries, put_summaries,
    },
};
use crate::{config::FleetConfig, error_chain};

/// Pause before reconnecting after a failure.
const RETRY: Duration = Duration::from_millis(250);
/// How long an operator's compare-and-swap is retried while etcd does not
/// answer (an election takes about a second).
pub const CAS_PATIENCE: Duration = Duration::from_secs(4);
/// How often the leader looks at the fleet's summaries.
pub const GATE_INTERVAL: Duration = Duration::from_millis(500);

/// Watches every rollout record: a snapshot at each (re)connection, then
/// each change, as [`FleetEvent::Records`].
pub async fn watcher(config: FleetConfig, keys: Keys, tx: mpsc::Sender<FleetEvent>) {
    let mut quiet = false;
    loop {
        let e = watch_once(&config, &keys, &tx).await;
        if matches!(e, EtcdError::Stopped) {
            return;
        }
        if !quiet {
            warn!(error = %error_chain(&e), "fleet: lost the watch on etcd; keeping the last known states (fail static) and retrying");
        }
        // One warning per outage, not one per retry.
        quiet = true;
        if tx
            .send(FleetEvent::Disconnected(e.to_string()))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(RETRY).await;
        quiet &= !matches!(e, EtcdError::Corrupt { .. });
    }
}

async fn watch_once(config: &FleetConfig, keys: &Keys, tx: &mpsc::Sender<FleetEvent>) -> EtcdError {
    let mut client = match connect(config).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let prefix = keys.rollouts();
    let listing =
        match bounded(client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix()))).await {
            Ok(r) => r,
            Err(e) => return e,
        };
    let revision = listing
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    let mut changes = Vec::new();
    for kv in listing.kvs() {
        let Some((service, release)) = keys.parse_rollout(kv.key()) else {
            continue;
        };
        match decode_record(kv.key(), kv.value()) {
            Ok(record) => changes.push(Change {
                service,
                release,
                record: Some(record),
                revision: kv.mod_revision(),
            }),
            Err(e) => warn!(error = %e, "fleet: ignoring a record canary cannot read"),
        }
    }
    let (_watcher, mut stream) = match bounded(
        client.watch(
            prefix.as_bytes(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await
    {
        Ok(w) => w,
        Err(e) => return e,
    };
    info!(
        records = changes.len(),
        revision, "fleet: watching the rollout records in etcd"
    );
    if tx
        .send(FleetEvent::Records {
            snapshot: true,
            changes,
        })
        .await
        .is_err()
    {
        return EtcdError::Stopped;
    }
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return EtcdError::Lost(format!("the watch on {prefix} ended"));
            }
            Err(e) => return e.into(),
        };
        if resp.canceled() {
            return EtcdError::Lost(format!(
                "the watch on {prefix} was cancelled: {}",
                resp.cancel_reason()
            ));
        }
        let mut changes = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some((service, release)) = keys.parse_rollout(kv.key()) else {
                continue;
            };
            let record = match ev.event_type() {
                EventType::Delete => None,
                EventType::Put => match decode_record(kv.key(), kv.value()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        warn!(error = %e, "fleet: ignoring a record canary cannot read");
                        continue;
                    }
                },
            };
            changes.push(Change {
                service,
                release,
                record,
                revision: kv.mod_revision(),
            });
        }
        if !changes.is_empty()
            && tx
                .send(FleetEvent::Records {
                    snapshot: false,
                    changes,
                })
                .await
                .is_err()
        {
            return EtcdError::Stopped;
        }
    }
}

/// This node's presence: a lease kept alive, the node's summaries
/// published on it, and a campaign for leadership. The leader also reads
/// every node's summaries for its gate.
pub async fn session(
    config: FleetConfig,
    keys: Keys,
    summaries: Arc<Mutex<BTreeMap<String, Summary>>>,
    tx: mpsc::Sender<FleetEvent>,
) {
    let mut quiet = false;
    loop {
        let (e, established) = session_once(&config, &keys, &summaries, &tx).await;
        if matches!(e, EtcdError::Stopped) {
            return;
        }
        if established || !quiet {
            warn!(error = %error_chain(&e), node = %config.node, "fleet: session with etcd ended (summaries stop; leadership, if held, is given up); retrying");
        }
        // One warning per outage, not one per retry.
        quiet = !established;
        if tx.send(FleetEvent::Leader(false)).await.is_err() {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn session_once(
    config: &FleetConfig,
    keys: &Keys,
    summaries: &Arc<Mutex<BTreeMap<String, Summary>>>,
    tx: &mpsc::Sender<FleetEvent>,
) -> (EtcdError, bool) {
    let mut client = match connect(config).await {
        Ok(c) => c,
        Err(e) => return (e, false),
    };
    #[expect(clippy::cast_possible_wrap, reason = "lease_ttl is at most 300 s")]
    let ttl = config.lease_ttl.as_secs() as i64;
    let lease = match bounded(client.lease_grant(ttl, None)).await {
        Ok(l) => l.id(),
        Err(e) => return (e, false),
    };
    let (mut keeper, mut acks) = match bounded(client.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return (e, false),
    };
    let mut election = client.election_client();
    let mut publisher = client.clone();
    let mut reader = client.clone();
    let node = config.node.clone();
    let campaign = election.campaign(keys.election(), node.as_bytes().to_vec(), lease);
    tokio::pin!(campaign);
    let mut leader = false;
    let mut keepalive = tokio::time::interval(config.lease_ttl / 3);
    let mut publish = tokio::time::interval(config.summary_interval);
    let mut gate = tokio::time::interval(GATE_INTERVAL);
    for t in [&mut keepalive, &mut publish, &mut gate] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let result = loop {
        tokio::select! {
            _ = keepalive.tick() => {
                match tokio::time::timeout(config.lease_ttl / 3, keeper.keep_alive()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break e.into(),
                    Err(_) => break EtcdError::Timeout,
                }
                match tokio::time::timeout(config.lease_ttl / 3, acks.message()).await {
                    Ok(Ok(Some(ack))) if ack.ttl() > 0 => {}
                    Ok(Ok(_)) => break EtcdError::Lost(format!("lease {lease:x} expired")),
                    Ok(Err(e)) => break e.into(),
                    Err(_) => break EtcdError::Timeout,
                }
            }
            _ = publish.tick() => {
                let mine: Vec<(String, Summary)> = summaries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if let Err(e) = put_summaries(&mut publisher, keys, &node, &mine, lease).await {
                    break e;
                }
            }
            won = &mut campaign, if !leader => {
                match won {
                    Ok(_) => {
                        leader = true;
                        info!(node = %node, "fleet: this node leads (it moves rollout plans on)");
                        if tx.send(FleetEvent::Leader(true)).await.is_err() {
                            break EtcdError::Stopped;
                        }
                    }
                    Err(e) => break e.into(),
                }
            }
            _ = gate.tick(), if leader => {
                match get_summaries(&mut reader, keys).await {
                    Ok(all) => {
                        if tx.send(FleetEvent::Summaries(all)).await.is_err() {
                            break EtcdError::Stopped;
                        }
                    }
                    Err(e) => break e,
                }
            }
        }
    };
    // Best effort: a revoked lease frees leadership at once instead of
    // after its TTL.
    let _ = tokio::time::timeout(Duration::from_millis(300), client.lease_revoke(lease)).await;
    (result, true)
}

/// Writes what the daemon decided: compare-and-swaps answered at once,
/// rollbacks and first records retried until etcd takes them.
pub async fn publisher(
    config: FleetConfig,
    keys: Keys,
    jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>,
    tx: mpsc::Sender<FleetEvent>,
) {
    let mut jobs = jobs.lock().await;
    let mut client = match connect(&config).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %error_chain(&e), "fleet: cannot set up the etcd client");
            return;
        }
    };
    // Rollbacks and creations etcd has not taken yet.
    let mut pending: Vec<(Job, bool)> = Vec::new();
    loop {
        let job = if pending.is_empty() {
            jobs.recv().await
        } else {
            tokio::select! {
                j = jobs.recv() => j,
                () = tokio::time::sleep(RETRY) => None,
            }
        };
        match job {
            Some(Job::Cas {
                service,
                release,
                record,
                base,
                reply,
            }) => {
                // An operator waits: retried while etcd elects a new
                // leader (a write needs one), within CAS_PATIENCE.
                let deadline = tokio::time::Instant::now() + CAS_PATIENCE;
                let out = loop {
                    match cas(&mut client, &keys, &service, &release, &record, base).await {
                        // An earlier attempt went through after all.
                        Err(CasError::Conflict(Some(found), rev)) if found == record => {
                            break Ok(rev);
                        }
                        Err(CasError::Unavailable(_))
                            if reply.is_some()
                                && tokio::time::Instant::now() + RETRY < deadline =>
                        {
                            tokio::time::sleep(RETRY).await;
                        }
                        other => break other,
                    }
                };
                if let Err(CasError::Unavailable(e)) = &out {
                    warn!(service = %service, error = %e, "fleet: decision not published, etcd unavailable");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(out);
                }
            }
            Some(other) => pending.push((other, false)),
            None if jobs.is_closed() && pending.is_empty() => return,
            None => {}
        }
        let mut still = Vec::new();
        for (job, told) in pending.drain(..) {
            match write(&mut client, &keys, &job).await {
                Ok(()) => {
                    if let Job::Rollback {
                        service, release, ..
                    } = job
                    {
                        info!(service = %service, release = %release, "fleet: rollback published");
                        let _ = tx.send(FleetEvent::Published { service, release }).await;
                    }
                }
                Err(e) => {
                    if !told {
                        warn!(error = %e, "fleet: a decision of this node is not published yet (etcd unavailable); retrying until it is");
                    }
                    still.push((job, true));
                }
            }
        }
        pending = still;
    }
}

/// One attempt at a rollback or a first record.
async fn write(client: &mut etcd_client::Client, keys: &Keys, job: &Job) -> Result<(), String> {
    match job {
        Job::Create {
            service,
            release,
            record,
        } => {
            match cas(client, keys, service, release, record, 0).await {
                // Another node's first record won: the watch brings it.
                Ok(_) | Err(CasError::Conflict(..)) => Ok(()),
                Err(CasError::Unavailable(e)) => Err(e),
            }
        }
        Job::Rollback {
            service,
            release,
            record,
        } => {
            // A rollback wins over whatever the record says, unless it is
            // already rolled back; a few rounds against concurrent writers.
            let (mut current, mut base) = get_record(client, keys, service, release)
                .await
                .map_err(|e| e.to_string())?;
            for _ in 0..5 {
                if current.as_ref().is_some_and(|r| !r.state.canary_allowed()) {
                    return Ok(());
                }
                match cas(client, keys, service, release, record, base).await {
                    Ok(_) => return Ok(()),
                    Err(CasError::Conflict(r, rev)) => (current, base) = (r, rev),
                    Err(CasError::Unavailable(e)) => return Err(e),
                }
            }
            Err("the record kept changing".into())
        }
        Job::Cas { .. } => Ok(()),
    }
}

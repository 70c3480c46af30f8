//! The etcd client: connection options (TLS, keepalive, timeouts) and the
//! few operations the fleet needs, each bounded in time.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{CasError, Keys, Record, Summary};
use crate::config::FleetConfig;

/// Longest any single etcd request may take before it counts as etcd
/// being unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Interval of HTTP/2 keepalive pings on a connection with a stream open.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);

/// An etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file could not be read.
    #[error("[fleet] {key} = {path}: cannot read it")]
    TlsFile {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The client reported an error.
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// No answer in time.
    #[error("etcd did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    /// A stream or lease ended under us (etcd restarted, the network
    /// went, a member lost its quorum).
    #[error("etcd: {0}")]
    Lost(String),
    /// The agent is stopping (its event loop is gone): not etcd's fault.
    #[error("the agent is stopping")]
    Stopped,
    /// A value in etcd is not what canary writes.
    #[error("etcd key {key} holds something canary did not write: {why}")]
    Corrupt { key: String, why: String },
}

/// A client for `config`'s cluster. Lazy: it does not fail when etcd is
/// down; requests do.
pub async fn connect(config: &FleetConfig) -> Result<Client, EtcdError> {
    // No per-request timeout here: a campaign waits as long as another
    // node leads, and a watch streams for hours. Each unary request is
    // bounded by [`bounded`] instead.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        // HTTP/2 pings: a partition breaks the watch within ~8 s instead of
        // leaving it waiting on a dead connection. Not more often than
        // etcd's default --grpc-keepalive-min-time (5 s), and not while no
        // stream is open (etcd refuses both and closes the connection).
        .with_keep_alive(KEEPALIVE_INTERVAL, Duration::from_secs(2))
        .with_keep_alive_while_idle(false)
        // A member cut off from its cluster's quorum refuses, so a
        // partitioned node never reads a stale state as current.
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let read = |key: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| EtcdError::TlsFile {
                key,
                path: path.display().to_string(),
                source,
            })
        };
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca", &tls.ca)?));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        options = options.with_tls(t);
    }
    Ok(Client::connect(&config.etcd, Some(options)).await?)
}

/// `fut`, or [`EtcdError::Timeout`].
pub async fn bounded<T>(
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(EtcdError::Timeout),
    }
}

/// Decodes a record.
pub fn decode_record(key: &[u8], value: &[u8]) -> Result<Record, EtcdError> {
    serde_json::from_slice(value).map_err(|e| EtcdError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}

/// Encodes a record.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain data structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The record of `service`/`release` and its revision (0: none).
pub async fn get_record(
    client: &mut Client,
    keys: &Keys,
    service: &str,
    release: &str,
) -> Result<(Option<Record>, i64), EtcdError> {
    let key = keys.rollout(service, release);
    let resp = bounded(client.get(key.as_bytes(), None)).await?;
    match resp.kvs().first() {
        None => Ok((None, 0)),
        Some(kv) => Ok((
            Some(decode_record(kv.key(), kv.value())?),
            kv.mod_revision(),
        )),
    }
}

/// Writes `record` if the key is still at revision `base` (0: absent);
/// returns the new revision, or what is there instead.
pub async fn cas(
    client: &mut Client,
    keys: &Keys,
    service: &str,
    release: &str,
    record: &Record,
    base: i64,
) -> Result<i64, CasError> {
    let key = keys.rollout(service, release);
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.as_bytes(),
            CompareOp::Equal,
            base,
        )])
        .and_then([TxnOp::put(key.as_bytes(), encode(record), None)])
        .or_else([TxnOp::get(key.as_bytes(), None)]);
    let resp = bounded(client.txn(txn))
        .await
        .map_err(|e| CasError::Unavailable(e.to_string()))?;
    if resp.succeeded() {
        return Ok(resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision));
    }
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            return Err(match get.kvs().first() {
                None => CasError::Conflict(None, 0),
                Some(kv) => match decode_record(kv.key(), kv.value()) {
                    Ok(r) => CasError::Conflict(Some(r), kv.mod_revision()),
                    Err(e) => CasError::Unavailable(e.to_string()),
                },
            });
        }
    }
    Err(CasError::Unavailable(
        "etcd's answer to a transaction lacked its read".into(),
    ))
}

/// Writes this node's summaries on `lease`, in one transaction.
pub async fn put_summaries(
    client: &mut Client,
    keys: &Keys,
    node: &str,
    summaries: &[(String, Summary)],
    lease: i64,
) -> Result<(), EtcdError> {
    if summaries.is_empty() {
        return Ok(());
    }
    let ops: Vec<TxnOp> = summaries
        .iter()
        .map(|(service, s)| {
            TxnOp::put(
                keys.node(service, node).as_bytes(),
                encode(s),
                Some(PutOptions::new().with_lease(lease)),
            )
        })
        .collect();
    bounded(client.txn(Txn::new().and_then(ops))).await?;
    Ok(())
}

/// Summaries per range request. etcd answers a range in one gRPC message
/// and the client refuses messages over 4 MiB: unpaged, the leader's read
/// failed from about 9 700 summaries (4 850 nodes with 2 services), and
/// with it the leader's session, over and over. A page of 1 000 is about
/// 0.4 MB.
const SUMMARY_PAGE: i64 = 1000;

/// Every node's summaries (of every service), read in pages of
/// [`SUMMARY_PAGE`] at one revision (a consistent listing).
pub async fn get_summaries(client: &mut Client, keys: &Keys) -> Result<Vec<Summary>, EtcdError> {
    let prefix = keys.nodes().into_bytes();
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(SUMMARY_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = bounded(client.get(from.clone(), Some(options))).await?;
        if revision == 0 {
            revision = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
        }
        for kv in resp.kvs() {
            // A malformed summary is one node's problem: skip it, loudly.
            match serde_json::from_slice::<Summary>(kv.value()) {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable node summary in etcd, ignored");
                }
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                // The next page starts just after the last key.
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

/// The name of the node that leads, if any.
pub async fn leader(client: &mut Client, keys: &Keys) -> Result<Option<String>, EtcdError> {
    match bounded(client.leader(keys.election().as_bytes())).await {
        Ok(resp) => Ok(resp
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
        // No leader: etcd answers "election: no leader".
        Err(EtcdError::Client(e)) if e.to_string().contains("no leader") => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/canary/nodes/"), b"/canary/nodes0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}

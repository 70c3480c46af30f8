//! Release events for people: every rollout state change as a JSON POST to
//! `webhook_url` (a chat relay, an incident tool), off the main loop,
//! retried with backoff, from a bounded queue. Every change is also one
//! structured log line (`event="rollout-state"`), whether or not a webhook
//! is set.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Mutex, mpsc},
};
use tracing::{info, warn};

use crate::outbound::{Connector, Url};

/// Events waiting for delivery at most; beyond, new ones are dropped (and
/// said so in the log) rather than slowing the agent.
pub const QUEUE: usize = 1000;
/// Delivery attempts per event.
pub const ATTEMPTS: u32 = 4;
/// Connect and response timeout of one attempt.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One rollout state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Always `rollout-state`.
    pub event: &'static str,
    /// The node (hostname) that decided.
    pub node: String,
    /// The service.
    pub service: String,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Canary weight now in force.
    pub weight: String,
    /// Who decided: the judge, the breaker, canaryctl.
    pub by: String,
    /// The decision with its numbers.
    pub detail: String,
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
}

/// Where events are posted: an `http://` or `https://` URL (verified
/// against the system's CA bundle), and the connector for it.
#[derive(Clone, Debug)]
pub struct Webhook {
    /// The URL.
    pub url: Url,
    connector: Connector,
}

impl PartialEq for Webhook {
    fn eq(&self, other: &Webhook) -> bool {
        // The connector is derived from the URL.
        self.url == other.url
    }
}

impl Eq for Webhook {}

impl Webhook {
    /// Parses a webhook URL and sets up TLS for an `https://` one.
    pub fn parse(url: &str) -> Result<Webhook, String> {
        let url = Url::parse(url)?;
        let connector = Connector::new(&url, None)?;
        Ok(Webhook { url, connector })
    }
}

/// Where events go: a queue drained by a delivery task.
#[derive(Clone, Debug)]
pub struct Events {
    tx: Option<mpsc::Sender<Event>>,
}

impl Events {
    /// Delivery to `hook` by a task under `tasks`, or nowhere (log only)
    /// without one.
    pub fn start(hook: Option<Webhook>, tasks: &mut crate::supervise::Supervisor) -> Events {
        let Some(hook) = hook else {
            return Events { tx: None };
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        // Shared so that a restarted delivery task drains the same queue.
        let rx = Arc::new(Mutex::new(rx));
        tasks.spawn("webhook delivery", move || {
            deliver(hook.clone(), Arc::clone(&rx))
        });
        Events { tx: Some(tx) }
    }

    /// Queues `event` for the webhook; never blocks.
    pub fn send(&self, event: Event) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(event)
        {
            warn!(error = %e, "webhook queue full: event dropped (the log line stands)");
        }
    }
}

async fn deliver(hook: Webhook, rx: Arc<Mutex<mpsc::Receiver<Event>>>) {
    let mut rx = rx.lock().await;
    while let Some(event) = rx.recv().await {
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "event not serialisable");
                continue;
            }
        };
        let mut delay = Duration::from_millis(250);
        for attempt in 1..=ATTEMPTS {
            match post(&hook, &body).await {
                Ok(()) => {
                    info!(service = %event.service, to = %event.to, attempt, "webhook delivered");
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    warn!(service = %event.service, attempt, error = %e, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "webhook failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    warn!(service = %event.service, attempts = ATTEMPTS, error = %e, "webhook failed; event dropped");
                }
            }
        }
    }
}

/// One POST; `Ok` on a 2xx answer.
async fn post(hook: &Webhook, body: &[u8]) -> Result<(), String> {
    let attempt = async {
        let mut s = hook
            .connector
            .connect(&hook.url)
            .await
            .map_err(|e| format!("connect {}: {e}", hook.url.authority))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             User-Agent: canary-agent\r\nConnection: close\r\n\r\n",
            hook.url.path,
            hook.url.authority,
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut status = [0u8; 12];
        s.read_exact(&mut status)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        // "HTTP/1.1 200"
        match &status[9..10] {
            b"2" => Ok(()),
            _ => Err(format!(
                "answered {}",
                String::from_utf8_lossy(&status[9..12])
            )),
        }
    };
    tokio::time::timeout(TIMEOUT, attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_parse_over_http_and_https() {
        let hook = Webhook::parse("http://127.0.0.1:9999/hooks/canary").unwrap();
        assert_eq!(
            (hook.url.authority.as_str(), hook.url.path.as_str()),
            ("127.0.0.1:9999", "/hooks/canary")
        );
        assert_eq!(
            Webhook::parse("http://relay.local").unwrap().url.authority,
            "relay.local:80"
        );
        assert!(
            Webhook::parse("ftp://x")
                .unwrap_err()
                .contains("must start with http:// or https://")
        );
    }
}

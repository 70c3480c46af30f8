//! A minimal HTTP/1.1 server for `GET /metrics`: one request per
//! connection, bounded request size and time, and a bounded number of
//! connections (see [`crate::slots`]). Prometheus needs nothing more, and
//! this keeps a web framework out of the agent.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::{
    slots::{Slot, Slots, acquire},
    telemetry::{Exporter, Format},
};

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request head. Meanwhile it is idle: when
/// all slots are taken, the client idle longest is closed for a newcomer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to read the whole answer (a large exposition is a
/// few MB; Prometheus reads it in milliseconds).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// The answer to a connection that finds every slot busy serving a scrape.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";

/// The metrics server: its listener, exporter and connection slots, kept
/// so that a supervisor can restart the accept loop.
pub struct MetricsServer {
    listener: Arc<TcpListener>,
    exporter: Arc<Exporter>,
    slots: Arc<Slots>,
}

impl MetricsServer {
    /// A server on `listener` (already bound).
    pub fn new(listener: TcpListener, exporter: Arc<Exporter>) -> MetricsServer {
        MetricsServer {
            listener: Arc::new(listener),
            exporter,
            slots: Arc::new(Slots::new(MAX_CONNECTIONS)),
        }
    }

    /// The accept loop; runs until dropped.
    pub fn serve(&self) -> impl Future<Output = ()> + Send + use<> {
        serve(
            Arc::clone(&self.listener),
            Arc::clone(&self.exporter),
            Arc::clone(&self.slots),
        )
    }
}

async fn serve(listener: Arc<TcpListener>, exporter: Arc<Exporter>, slots: Arc<Slots>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = acquire(&slots).await else {
                    // Every slot is writing a scrape: say so without
                    // waiting (a full socket buffer just loses the answer).
                    let _ = stream.try_write(BUSY);
                    debug!(%peer, "metrics connection refused: every slot busy");
                    continue;
                };
                let exporter = Arc::clone(&exporter);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &exporter, slot).await {
                        debug!(%peer, error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, exporter: &Exporter, slot: Slot) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = slot
        .idle(tokio::time::timeout(READ_TIMEOUT, async {
            let mut buf = [0u8; 1024];
            loop {
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    return Ok::<bool, std::io::Error>(true);
                }
                if head.len() > MAX_REQUEST {
                    return Ok(false);
                }
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok(false);
                }
                head.extend_from_slice(&buf[..n]);
            }
        }))
        .await;
    let Some(read) = read else {
        // Evicted for a newcomer while it had not sent its request.
        return Ok(());
    };
    let complete = read.unwrap_or(Ok(false))?;
    let response = if complete {
        route(&head, exporter)
    } else {
        reply(400, "text/plain", b"bad or incomplete request\n")
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow to read"))?
}

fn route(head: &[u8], exporter: &Exporter) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => {
            let format = Format::from_accept(&header(head, "accept").unwrap_or_default());
            match exporter.encode(format) {
                Ok(body) => reply(200, format.content_type(), body.as_bytes()),
                Err(_) => reply(
                    500,
                    "text/plain",
                    b"reading the data-plane maps failed; see the agent log\n",
                ),
            }
        }
        (b"GET", b"/") => reply(200, "text/plain", b"canary-agent: metrics at /metrics\n"),
        (b"GET", _) => reply(404, "text/plain", b"not found; metrics are at /metrics\n"),
        _ => reply(405, "text/plain", b"only GET is supported\n"),
    }
}

/// The value of header `name` (case-insensitive) in a request head.
fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head)
        .lines()
        .skip(1)
        .find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
}

fn reply(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

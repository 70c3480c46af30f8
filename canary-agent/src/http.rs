//! A minimal HTTP/1.1 server for `GET /metrics`: one request per
//! connection, bounded request size and time. Prometheus needs nothing more,
//! and this keeps a web framework out of the agent.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::telemetry::{Exporter, Format};

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let exporter = Arc::clone(&exporter);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &exporter).await {
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

async fn handle(mut stream: TcpStream, exporter: &Exporter) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
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
    })
    .await
    .unwrap_or(Ok(false))?;
    let response = if !complete {
        reply(400, "text/plain", b"bad or incomplete request\n".to_vec())
    } else {
        route(&head, exporter)
    };
    stream.write_all(&response).await?;
    stream.shutdown().await
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
                Ok(body) => reply(200, format.content_type(), body.into_bytes()),
                Err(_) => reply(
                    500,
                    "text/plain",
                    b"reading the data-plane maps failed; see the agent log\n".to_vec(),
                ),
            }
        }
        (b"GET", b"/") => reply(
            200,
            "text/plain",
            b"canary-agent: metrics at /metrics\n".to_vec(),
        ),
        (b"GET", _) => reply(
            404,
            "text/plain",
            b"not found; metrics are at /metrics\n".to_vec(),
        ),
        _ => reply(405, "text/plain", b"only GET is supported\n".to_vec()),
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

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Vec<u8> {
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
    out.extend_from_slice(&body);
    out
}

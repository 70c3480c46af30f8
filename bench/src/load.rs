//! Closed-loop TCP load in the lab backends' line protocol, shared by the
//! end-to-end section (clients in the client namespace) and the
//! local-client section (clients on the router, the "node").

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use canary_lab::{Conn, Netns, request_once};
use serde::{Deserialize, Serialize};

/// Closed-loop client threads.
pub const CLIENTS: usize = 4;
/// Per-request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// What a new-connection load saw.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Conns {
    /// Connections that were answered (one request each).
    pub ok: u64,
    /// Of those, answered by a backend named `canary…`.
    pub canary: u64,
    /// Failed connections (connect, request or reply).
    pub errors: u64,
    /// Wall time of the load, seconds.
    pub secs: f64,
}

/// What a keep-alive load saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeepAlive {
    /// Round trip of every answered request, µs.
    pub latencies_us: Vec<f64>,
    /// Failed requests, plus client threads that could not connect.
    pub errors: u64,
    /// Connections opened (one per thread, plus one after each failure).
    pub opened: u64,
    /// Wall time of the load, seconds.
    pub secs: f64,
}

/// One request per connection from [`CLIENTS`] threads in `ns` for
/// `secs`, thread `t` taking its sources round robin from `sources[t..]`
/// (`0.0.0.0` lets the kernel choose).
pub fn new_connections(ns: &Netns, sources: &[IpAddr], target: SocketAddr, secs: f64) -> Conns {
    let sources = Arc::new(sources.to_vec());
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let sources = Arc::clone(&sources);
            ns.spawn(move || {
                let mut out = Conns::default();
                let mut i = t;
                while Instant::now() < until {
                    match request_once(sources[i % sources.len()], target, TIMEOUT) {
                        Ok(name) => {
                            out.ok += 1;
                            out.canary += u64::from(name.starts_with("canary"));
                        }
                        Err(_) => out.errors += 1,
                    }
                    i += CLIENTS;
                }
                out
            })
        })
        .collect();
    let mut total = Conns::default();
    for h in handles {
        match h.join() {
            Ok(Ok(c)) => {
                total.ok += c.ok;
                total.canary += c.canary;
                total.errors += c.errors;
            }
            _ => total.errors += 1,
        }
    }
    total.secs = start.elapsed().as_secs_f64();
    total
}

/// Keep-alive requests on [`CLIENTS`] connections from threads in `ns` for
/// `secs`, one request in flight each; thread `t` connects from
/// `sources[t % len]`.
pub fn keepalive(ns: &Netns, sources: &[IpAddr], target: SocketAddr, secs: f64) -> KeepAlive {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let src = sources[t % sources.len()];
            ns.spawn(move || {
                let mut lat = Vec::new();
                let (mut err, mut opened) = (0u64, 1u64);
                let mut conn = Conn::open(src, target, TIMEOUT)?;
                while Instant::now() < until {
                    let t0 = Instant::now();
                    if conn.ping().is_ok() {
                        lat.push(t0.elapsed().as_secs_f64() * 1e6);
                    } else {
                        err += 1;
                        opened += 1;
                        conn = Conn::open(src, target, TIMEOUT)?;
                    }
                }
                Ok::<_, std::io::Error>((lat, err, opened))
            })
        })
        .collect();
    let mut out = KeepAlive::default();
    for h in handles {
        match h.join() {
            Ok(Ok(Ok((l, e, o)))) => {
                out.latencies_us.extend(l);
                out.errors += e;
                out.opened += o;
            }
            _ => out.errors += 1,
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    out
}

/// `addr` as an [`IpAddr`] list, for [`new_connections`] and [`keepalive`].
pub fn sources<A: Copy + Into<IpAddr>>(addrs: &[A]) -> Vec<IpAddr> {
    addrs.iter().map(|&a| a.into()).collect()
}

/// Gives `target` (from `ns`, `src`) up to 10 s to answer a request.
pub fn wait_listening(ns: &Netns, src: IpAddr, target: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = ns
            .spawn(move || request_once(src, target, Duration::from_millis(500)))
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??
            .is_ok();
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{target} did not answer within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! A team's own application metrics, as a real HTTP `/metrics` exporter in
//! the test process: `http_requests_total{version, code}`, counted from
//! the answers the test's clients get through the VIP (each backend names
//! itself; the test decides which answers count as HTTP 500). Prometheus
//! scrapes it like any exporter, and the agent's checks query Prometheus.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use canary_lab::Netns;

/// Requests by (version, code).
type Counts = BTreeMap<(String, u16), u64>;

/// A running exporter; stops on drop.
pub struct AppMetrics {
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<std::io::Result<()>>>>,
    /// Where it listens (inside the namespace).
    pub addr: SocketAddr,
}

impl AppMetrics {
    /// Serves `/metrics` on `addr` inside `ns`, with every (version, code)
    /// series present at 0 (so a query over no traffic is 0 ÷ 0 = NaN, not
    /// empty).
    pub fn start(ns: &Netns, addr: SocketAddr) -> AppMetrics {
        let mut counts = Counts::new();
        for version in ["stable", "canary"] {
            for code in [200, 500] {
                counts.insert((version.to_string(), code), 0);
            }
        }
        let counts = Arc::new(Mutex::new(counts));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || -> std::io::Result<()> {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            let _ = ready_tx.send(());
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false)?;
                        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut buf = [0u8; 4096];
                        let _ = conn.read(&mut buf);
                        let body = exposition(&c.lock().unwrap());
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("the app metrics exporter did not start listening");
        AppMetrics {
            counts,
            stop,
            thread: Some(thread),
            addr,
        }
    }

    /// Counts `n` requests answered by `version` with `code`.
    pub fn record(&self, version: &str, code: u16, n: u64) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry((version.to_string(), code))
            .or_default() += n;
    }

    /// The count of (version, code).
    pub fn count(&self, version: &str, code: u16) -> u64 {
        self.counts
            .lock()
            .unwrap()
            .get(&(version.to_string(), code))
            .copied()
            .unwrap_or(0)
    }
}

fn exposition(counts: &Counts) -> String {
    let mut out = String::from(
        "# HELP http_requests_total HTTP requests answered, by version and status code.\n\
         # TYPE http_requests_total counter\n",
    );
    for ((version, code), n) in counts {
        out.push_str(&format!(
            "http_requests_total{{version=\"{version}\",code=\"{code}\"}} {n}\n"
        ));
    }
    out
}

impl Drop for AppMetrics {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

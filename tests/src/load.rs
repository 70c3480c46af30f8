//! Bounded client load from inside a lab's (or a fleet node's) client
//! namespace.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use canary_lab::{ClientSide, request_once, udp_request_once};

/// One request to a VIP from a source address: a TCP connection or a UDP
/// flow (its first datagram), returning the answering backend's name.
pub type Request = fn(Ipv4Addr, SocketAddrV4, Duration) -> std::io::Result<String>;

/// Per-connection connect/read timeout.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// Name prefix of canary backends in the tests' labs.
pub const CANARY_PREFIX: &str = "canary";

/// What a batch of one-request connections saw.
#[derive(Default, Debug)]
pub struct Outcome {
    /// Replies per backend name.
    pub by_backend: BTreeMap<String, u64>,
    /// Backend names each source address reached.
    pub by_source: HashMap<Ipv4Addr, BTreeSet<String>>,
    /// Failed connections: (source, kind, message).
    pub errors: Vec<(Ipv4Addr, ErrorKind, String)>,
}

impl Outcome {
    /// Connections that got a reply.
    pub fn total(&self) -> u64 {
        self.by_backend.values().sum()
    }

    /// Replies from canary backends.
    pub fn canary(&self) -> u64 {
        self.by_backend
            .iter()
            .filter(|(n, _)| n.starts_with(CANARY_PREFIX))
            .map(|(_, c)| c)
            .sum()
    }

    /// Sources that reached a canary backend.
    pub fn canary_sources(&self) -> BTreeSet<Ipv4Addr> {
        self.by_source
            .iter()
            .filter(|(_, names)| names.iter().any(|n| n.starts_with(CANARY_PREFIX)))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Failed connections of one kind.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors.iter().filter(|(_, k, _)| *k == kind).count() as u64
    }

    /// Panics unless every connection got a reply.
    pub fn assert_no_errors(&self, what: &str) {
        assert!(
            self.errors.is_empty(),
            "{what}: {} of {} connections failed, first: {:?}",
            self.errors.len(),
            self.total() + self.errors.len() as u64,
            self.errors.iter().take(3).collect::<Vec<_>>()
        );
    }
}

/// `n` one-request connections to `vip`, cycling through `sources`, from
/// four threads in the client namespace. Bounded: at most 180 s.
pub fn drive(
    lab: &(impl ClientSide + ?Sized),
    vip: SocketAddrV4,
    sources: &[Ipv4Addr],
    n: usize,
) -> Outcome {
    drive_with(lab, vip, sources, n, None, request_once)
}

/// As [`drive`] over UDP: `n` flows of one request each (a fresh socket
/// per request, so a new source port: a new flow).
pub fn drive_udp(
    lab: &(impl ClientSide + ?Sized),
    vip: SocketAddrV4,
    sources: &[Ipv4Addr],
    n: usize,
) -> Outcome {
    drive_with(lab, vip, sources, n, None, udp_request_once)
}

/// As [`drive`], at most `rate` connections per second in all when given.
pub fn drive_paced(
    lab: &(impl ClientSide + ?Sized),
    vip: SocketAddrV4,
    sources: &[Ipv4Addr],
    n: usize,
    rate: Option<f64>,
) -> Outcome {
    drive_with(lab, vip, sources, n, rate, request_once)
}

/// [`drive_paced`] with `request` for each connection or flow.
pub fn drive_with(
    lab: &(impl ClientSide + ?Sized),
    vip: SocketAddrV4,
    sources: &[Ipv4Addr],
    n: usize,
    rate: Option<f64>,
    request: Request,
) -> Outcome {
    const THREADS: usize = 4;
    let sources = Arc::new(sources.to_vec());
    let start = Instant::now();
    let deadline = start + Duration::from_mins(3);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let sources = Arc::clone(&sources);
            lab.client().spawn(move || {
                let mut out = Outcome::default();
                for i in (t..n).step_by(THREADS) {
                    if let Some(rate) = rate {
                        // Connection i is due at i / rate seconds.
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    if Instant::now() > deadline {
                        out.errors.push((
                            Ipv4Addr::UNSPECIFIED,
                            ErrorKind::TimedOut,
                            "deadline of 180 s reached".into(),
                        ));
                        break;
                    }
                    let src = sources[i % sources.len()];
                    match request(src, vip, TIMEOUT) {
                        Ok(name) => {
                            *out.by_backend.entry(name.clone()).or_default() += 1;
                            out.by_source.entry(src).or_default().insert(name);
                        }
                        Err(e) => out.errors.push((src, e.kind(), e.to_string())),
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Outcome::default();
    for h in handles {
        let part = h
            .join()
            .expect("client thread")
            .expect("enter client namespace");
        for (k, v) in part.by_backend {
            *all.by_backend.entry(k).or_default() += v;
        }
        for (k, v) in part.by_source {
            all.by_source.entry(k).or_default().extend(v);
        }
        all.errors.extend(part.errors);
    }
    all
}

/// One timed connection attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// When `connect` was called.
    pub start: Instant,
    /// When the reply or the error arrived.
    pub end: Instant,
    /// The answering backend, or the error kind.
    pub result: Result<String, ErrorKind>,
}

/// Starts `n` paced one-request connections (`rate` per second in all, four
/// threads) in the background and returns the threads; each yields its
/// attempts with timestamps. Bounded: at most 180 s.
pub fn spawn_timed(
    lab: &(impl ClientSide + ?Sized),
    vip: SocketAddrV4,
    sources: &[Ipv4Addr],
    n: usize,
    rate: f64,
) -> Vec<std::thread::JoinHandle<std::io::Result<Vec<Attempt>>>> {
    spawn_timed_many(lab, &[vip], sources, n, rate)
}

/// [`spawn_timed`] over several VIPs: attempt `i` goes to `vips[i % len]`.
pub fn spawn_timed_many(
    lab: &(impl ClientSide + ?Sized),
    vips: &[SocketAddrV4],
    sources: &[Ipv4Addr],
    n: usize,
    rate: f64,
) -> Vec<std::thread::JoinHandle<std::io::Result<Vec<Attempt>>>> {
    const THREADS: usize = 4;
    let sources = Arc::new(sources.to_vec());
    let vips = Arc::new(vips.to_vec());
    let start = Instant::now();
    let deadline = start + Duration::from_mins(3);
    (0..THREADS)
        .map(|t| {
            let sources = Arc::clone(&sources);
            let vips = Arc::clone(&vips);
            lab.client().spawn(move || {
                let mut out = Vec::new();
                for i in (t..n).step_by(THREADS) {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if Instant::now() > deadline {
                        break;
                    }
                    let begin = Instant::now();
                    let result =
                        request_once(sources[i % sources.len()], vips[i % vips.len()], TIMEOUT)
                            .map_err(|e| e.kind());
                    out.push(Attempt {
                        start: begin,
                        end: Instant::now(),
                        result,
                    });
                }
                out
            })
        })
        .collect()
}

/// Joins [`spawn_timed`]'s threads; all attempts in start order.
pub fn join_timed(
    handles: Vec<std::thread::JoinHandle<std::io::Result<Vec<Attempt>>>>,
) -> Vec<Attempt> {
    let mut all: Vec<Attempt> = handles
        .into_iter()
        .flat_map(|h| {
            h.join()
                .expect("client thread")
                .expect("enter client namespace")
        })
        .collect();
    all.sort_by_key(|a| a.start);
    all
}

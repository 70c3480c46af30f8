//! The fleet, simulated: N node agents in one process, no data plane,
//! against a real 3-member etcd (`canary_tests::etcd::EtcdCluster`: its
//! own network namespace, data on tmpfs, 50 ms raft heartbeats); the
//! simulator runs in that namespace, so every connection stays on the
//! host's local path, as on loopback. Each simulated node runs the
//! agent's own tasks from `canary_agent::fleet` — `watcher` (its own
//! client, watching the rollout records) and `session` (its own client:
//! lease and keepalives, its summaries in one transaction every
//! `summary_interval`, the leader campaign, and the leader's read of every
//! summary every 500 ms) — and one node's `publisher` takes the decisions
//! as `Job::Cas`, as the daemon sends them. What etcd did is read from its
//! own metrics; CPU and memory from /proc.

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use canary_agent::{
    config::FleetConfig,
    fleet::{self, Counts, FleetEvent, Job, Keys, Record, Summary},
    rollout::ServiceState,
};
use etcd_client::{GetOptions, Txn, TxnOp};
use serde::Serialize;
use tokio::{runtime::Runtime, sync::mpsc, task::JoinHandle};

use canary_tests::etcd::EtcdCluster;

use crate::sample::{cpu_seconds, median, percentile, rss_mib};

/// Services each simulated node publishes a summary of.
const SERVICES: [&str; 2] = ["web", "api"];
/// The agent's default `lease_ttl` (keepalives every third of it).
const LEASE_TTL: Duration = Duration::from_secs(6);
/// Longest wait for one decision to reach every node.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);

/// One fleet size.
#[derive(Clone, Debug, Serialize)]
pub struct FleetRow {
    /// Simulated nodes.
    pub nodes: usize,
    /// Services per node (one summary key each).
    pub services: usize,
    /// `summary_interval`, s.
    pub summary_interval_s: f64,
    /// Decisions measured.
    pub decisions: usize,
    /// Decisions that reached every node within 10 s.
    pub complete: usize,
    /// Decision (`Job::Cas` sent) → the last node's `FleetEvent::Records`
    /// with its revision, ms, per decision.
    pub propagation_ms: Vec<f64>,
    /// Decision → the publisher's answer (committed), ms, median.
    pub commit_p50_ms: f64,
    /// Per-node receive times of the last decision, ms: p50, p99, max.
    pub one_decision_ms: [f64; 3],
    /// Steady-state window, s (no decisions in it).
    pub window_s: f64,
    /// Raft proposals committed per second (writes as etcd counts them:
    /// each transaction, lease grant or revoke is one).
    pub proposals_per_s: f64,
    /// Multi-op transactions applied per second (`etcd_mvcc_txn_total`).
    pub txns_per_s: f64,
    /// Keys put per second (`etcd_mvcc_put_total`).
    pub puts_per_s: f64,
    /// Lease keepalive messages per second, all members.
    pub keepalives_per_s: f64,
    /// Ranges served per second, all members (the leader's summary reads,
    /// one per page of 1 000).
    pub ranges_per_s: f64,
    /// gRPC bytes received by the members per node per minute.
    pub bytes_in_per_node_min: f64,
    /// gRPC bytes sent by the members per second (watch events, range
    /// answers, acknowledgements).
    pub bytes_out_per_s: f64,
    /// Bytes the members sent per decision beyond the steady rate (the
    /// watch events to every node, the commit's answer).
    pub fanout_bytes_per_decision: f64,
    /// Bytes of values put per second
    /// (`etcd_debugging_mvcc_total_put_size_in_bytes`): what the MVCC
    /// history grows by until etcd compacts it.
    pub put_bytes_per_s: f64,
    /// The database size at the end of the window, MB (every row so far).
    pub db_mb: f64,
    /// CPU of the three members together, % of one CPU.
    pub etcd_cpu_pct: f64,
    /// Largest member RSS at the end of the window, MiB.
    pub etcd_rss_mib: f64,
    /// CPU of this process (every simulated node), % of one CPU.
    pub bench_cpu_pct: f64,
    /// Open sockets of the three members together.
    pub etcd_sockets: usize,
    /// Summaries the leader read in its last gate.
    pub leader_saw: usize,
    /// The leader's gate reads during the window.
    pub leader_reads: usize,
    /// Watch restarts (`FleetEvent::Disconnected`) while the fleet
    /// started (before the window), then during the window and decisions.
    pub watch_restarts: [usize; 2],
    /// Session restarts (`FleetEvent::Leader(false)`), likewise.
    pub session_restarts: [usize; 2],
}

impl FleetRow {
    /// Median propagation, ms.
    pub fn p50_ms(&self) -> f64 {
        median(&mut self.propagation_ms.clone())
    }

    /// 99th percentile (nearest rank) of propagation, ms.
    pub fn p99_ms(&self) -> f64 {
        let mut v = self.propagation_ms.clone();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.99)
    }
}

/// The leader's read of every summary at a size no simulated fleet here
/// reaches: synthetic summaries, the agent's `fleet::get_summaries`.
#[derive(Clone, Debug, Serialize)]
pub struct LeaderRead {
    /// Summary keys in etcd.
    pub summaries: usize,
    /// Their values together, bytes.
    pub bytes: usize,
    /// Median of 3 reads, ms (NaN if every read failed).
    pub median_ms: f64,
    /// The error, if a read failed.
    pub error: Option<String>,
}

/// The fleet section.
#[derive(Clone, Debug, Serialize)]
pub struct Fleet {
    /// One row per fleet size and summary interval.
    pub rows: Vec<FleetRow>,
    /// The leader's read at growing sizes.
    pub leader_reads: Vec<LeaderRead>,
    /// Size of one decision's record (JSON) and of one summary, bytes.
    pub record_bytes: [usize; 2],
    /// The machine's 1-minute load average before and after the section
    /// (other work on the machine shows here).
    pub load_average: [f64; 2],
}

/// Sizes, decisions per size, steady-state window.
pub struct Plan {
    /// (nodes, summary interval) per row.
    pub sizes: Vec<(usize, Duration)>,
    /// Decisions per row.
    pub decisions: usize,
    /// Steady-state window per row.
    pub window: Duration,
    /// Summary counts for the leader's read.
    pub leader_reads: Vec<usize>,
}

/// The cluster as the simulator sees it.
struct Etcd {
    /// Client URLs.
    endpoints: Vec<String>,
    /// Members' process ids.
    pids: Vec<u32>,
}

impl Etcd {
    fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }
}

/// Runs every row of `plan` against one fresh 3-member cluster
/// (`canary_tests::etcd::EtcdCluster`), the simulator in its network
/// namespace.
pub fn measure(plan: Plan) -> anyhow::Result<Fleet> {
    let load_before = load_average();
    let etcd = EtcdCluster::start(3, false);
    let cluster = Etcd {
        endpoints: etcd.endpoints(),
        pids: (0..3).filter_map(|i| etcd.pid(i)).collect(),
    };
    let run = etcd.net().ns().spawn(move || simulate(&cluster, &plan));
    let out = run
        .join()
        .map_err(|_| anyhow::anyhow!("the fleet simulation panicked"))?
        .context("entering the etcd namespace")?;
    drop(etcd);
    let mut fleet = out?;
    fleet.load_average = [load_before, load_average()];
    Ok(fleet)
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs every row of `plan` (on a thread in the cluster's namespace).
fn simulate(cluster: &Etcd, plan: &Plan) -> anyhow::Result<Fleet> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for &(nodes, interval) in &plan.sizes {
        let row = run_row(&rt, cluster, nodes, interval, plan)?;
        eprintln!(
            "bench: fleet {nodes} nodes, summaries every {:?}: decision → all nodes p50 {:.1} ms, p99 {:.1} ms ({}/{} complete); {:.0} proposals/s, {:.0} B/node/min in; etcd {:.0} % CPU",
            interval,
            row.p50_ms(),
            row.p99_ms(),
            row.complete,
            row.decisions,
            row.proposals_per_s,
            row.bytes_in_per_node_min,
            row.etcd_cpu_pct
        );
        rows.push(row);
    }
    let leader_reads = rt.block_on(leader_reads(cluster, &plan.leader_reads))?;
    drop(rt);
    let size = |v: serde_json::Result<Vec<u8>>| v.map_or(0, |v| v.len());
    Ok(Fleet {
        rows,
        leader_reads,
        record_bytes: [
            size(serde_json::to_vec(&record(1))),
            size(serde_json::to_vec(&summary(SERVICES[0], "node-00000"))),
        ],
        load_average: [f64::NAN; 2],
    })
}

/// What the simulated nodes' event drains saw.
#[derive(Default)]
struct Probe {
    /// Watchers that delivered their first snapshot.
    ready: AtomicUsize,
    watch_restarts: AtomicUsize,
    session_restarts: AtomicUsize,
    leader_reads: AtomicUsize,
    leader_saw: AtomicUsize,
    /// Why the first watch ended, if one did.
    first_restart: Mutex<Option<String>>,
}

fn config(cluster: &Etcd, prefix: &str, node: String, interval: Duration) -> FleetConfig {
    FleetConfig {
        etcd: cluster.endpoints(),
        node,
        prefix: prefix.to_string(),
        tls: None,
        lease_ttl: LEASE_TTL,
        summary_interval: interval,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A summary the size of a real one (a plan at step 1, counts, a verdict).
fn summary(service: &str, node: &str) -> Summary {
    Summary {
        service: service.to_string(),
        node: node.to_string(),
        release: "v2.4.1".into(),
        state: ServiceState::Progressing {
            step: 1,
            since_unix: now_unix(),
        },
        weight_ppm: 50_000,
        stable: Counts {
            connections: 1_234_567,
            failures: 123,
        },
        canary: Counts {
            connections: 65_432,
            failures: 7,
        },
        verdict: Some(
            "step 1: canary 0.011 % failed against stable 0.010 % (e-value 0.4): holds".into(),
        ),
        judge_fails: false,
        attached: true,
        at_unix: now_unix(),
    }
}

fn record(i: usize) -> Record {
    Record {
        state: ServiceState::Progressing {
            step: u32::try_from(i).unwrap_or(u32::MAX),
            since_unix: now_unix(),
        },
        node: "node-00000".into(),
        by: "the fleet's leader".into(),
        verdict: format!("bench decision {i}: step {i} held long enough"),
        at_unix: now_unix(),
    }
}

/// Reports what node `i`'s tasks send: arrivals of records by revision,
/// and the rest counted in `probe`.
async fn drain(
    i: usize,
    mut rx: mpsc::Receiver<FleetEvent>,
    probe: Arc<Probe>,
    arrivals: mpsc::UnboundedSender<(usize, i64, Instant)>,
) {
    let mut ready = false;
    while let Some(ev) = rx.recv().await {
        match ev {
            FleetEvent::Records { snapshot: true, .. } => {
                if !ready {
                    ready = true;
                    probe.ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            FleetEvent::Records { changes, .. } => {
                let at = Instant::now();
                for c in changes {
                    let _ = arrivals.send((i, c.revision, at));
                }
            }
            FleetEvent::Disconnected(why) => {
                probe.watch_restarts.fetch_add(1, Ordering::Relaxed);
                probe
                    .first_restart
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(why);
            }
            FleetEvent::Leader(false) => {
                probe.session_restarts.fetch_add(1, Ordering::Relaxed);
            }
            FleetEvent::Summaries(all) => {
                probe.leader_reads.fetch_add(1, Ordering::Relaxed);
                probe.leader_saw.store(all.len(), Ordering::Relaxed);
            }
            FleetEvent::Leader(true) | FleetEvent::Published { .. } => {}
        }
    }
}

/// Counters of the cluster at one moment.
#[derive(Clone, Copy, Default)]
struct Counters {
    proposals: f64,
    txns: f64,
    puts: f64,
    put_bytes: f64,
    keepalives: f64,
    ranges: f64,
    db_bytes: f64,
    bytes_in: f64,
    bytes_out: f64,
    cpu_s: f64,
    at: Option<Instant>,
}

fn counters(cluster: &Etcd) -> anyhow::Result<Counters> {
    let mut c = Counters::default();
    for (&pid, endpoint) in cluster.pids.iter().zip(&cluster.endpoints) {
        let text = http_get(endpoint, "/metrics")?;
        let mut keepalives = 0.0;
        let mut get = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name.starts_with("grpc_server_msg_received_total{")
                && name.contains("grpc_method=\"LeaseKeepAlive\"")
            {
                keepalives += value;
            }
            get.insert(name.to_string(), value);
        }
        let v = |name: &str| get.get(name).copied().unwrap_or(0.0);
        // Applied on every member alike: one member's count is the cluster's.
        c.proposals = c.proposals.max(v("etcd_server_proposals_committed_total"));
        c.txns = c.txns.max(v("etcd_mvcc_txn_total"));
        c.puts = c.puts.max(v("etcd_mvcc_put_total"));
        c.put_bytes = c
            .put_bytes
            .max(v("etcd_debugging_mvcc_total_put_size_in_bytes"));
        c.db_bytes = c.db_bytes.max(v("etcd_mvcc_db_total_size_in_bytes"));
        // Served by the member the client asked: summed.
        c.keepalives += keepalives;
        c.ranges += v("etcd_mvcc_range_total");
        c.bytes_in += v("etcd_network_client_grpc_received_bytes_total");
        c.bytes_out += v("etcd_network_client_grpc_sent_bytes_total");
        c.cpu_s += cpu_seconds(pid);
    }
    c.at = Some(Instant::now());
    Ok(c)
}

/// A fleet of `nodes` simulated agents under `/bench-<nodes>-<ms>`,
/// measured, then stopped (tasks aborted, leases revoked).
fn run_row(
    rt: &Runtime,
    cluster: &Etcd,
    nodes: usize,
    interval: Duration,
    plan: &Plan,
) -> anyhow::Result<FleetRow> {
    let prefix = format!("/bench-{nodes}-{}", interval.as_millis());
    let keys = Keys::new(&prefix);
    let probe = Arc::new(Probe::default());
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    // The decider: node 0's publisher, as the daemon's leader or operator
    // command uses it.
    let (jobs, jobs_rx) = mpsc::unbounded_channel::<Job>();
    {
        let (tx, rx) = mpsc::channel(1024);
        let cfg = config(cluster, &prefix, "node-00000".into(), interval);
        tasks.push(rt.spawn(fleet::publisher(
            cfg,
            keys.clone(),
            Arc::new(tokio::sync::Mutex::new(jobs_rx)),
            tx,
        )));
        tasks.push(rt.spawn(async move {
            let mut rx = rx;
            while rx.recv().await.is_some() {}
        }));
    }
    // Started over about a second (a DaemonSet rollout is staggered far
    // more): the first requests of each node are not what is measured.
    let stagger = Duration::from_secs(1).div_f64(nodes as f64);
    for i in 0..nodes {
        let node = format!("node-{i:05}");
        let cfg = config(cluster, &prefix, node.clone(), interval);
        let (tx, rx) = mpsc::channel(1024);
        let mine = SERVICES
            .iter()
            .map(|s| ((*s).to_string(), summary(s, &node)))
            .collect();
        let mine = Arc::new(Mutex::new(mine));
        tasks.push(rt.spawn(drain(i, rx, probe.clone(), arrivals_tx.clone())));
        tasks.push(rt.spawn(fleet::watcher(cfg.clone(), keys.clone(), tx.clone())));
        tasks.push(rt.spawn(fleet::session(cfg, keys.clone(), mine, tx)));
        std::thread::sleep(stagger);
    }
    drop(arrivals_tx);
    let outcome = rt.block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None).await?;
        // Every watcher has its snapshot and every session its summaries
        // in etcd: the fleet is up.
        let deadline = Instant::now() + Duration::from_mins(1);
        let want = nodes * SERVICES.len();
        loop {
            let count = client
                .get(
                    keys.nodes(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?
                .count();
            let ready = probe.ready.load(Ordering::Relaxed);
            if ready == nodes && usize::try_from(count).is_ok_and(|c| c == want) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "fleet of {nodes}: after 60 s, {ready} watchers ready and {count} of {want} summaries in etcd"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Settle: every timer has fired at least once.
        tokio::time::sleep(LEASE_TTL / 2).await;
        anyhow::Ok(())
    });
    if let Err(e) = outcome {
        stop(rt, cluster, &tasks);
        return Err(e);
    }
    let leader_before = probe.leader_reads.load(Ordering::Relaxed);
    let restarts_before = (
        probe.watch_restarts.load(Ordering::Relaxed),
        probe.session_restarts.load(Ordering::Relaxed),
    );
    let before = counters(cluster)?;
    let bench_before = cpu_seconds(std::process::id());
    std::thread::sleep(plan.window);
    let after = counters(cluster)?;
    let bench_after = cpu_seconds(std::process::id());
    let leader_reads = probe.leader_reads.load(Ordering::Relaxed) - leader_before;
    let etcd_rss_mib = cluster.pids.iter().map(|&p| rss_mib(p)).fold(0.0, f64::max);
    let etcd_sockets = cluster.pids.iter().map(|&p| sockets(p)).sum();
    let window = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => plan.window.as_secs_f64(),
    };
    let rate = |f: fn(&Counters) -> f64| (f(&after) - f(&before)) / window;

    // Decisions, one after the other, each waited for at every node.
    let before_decisions = counters(cluster)?;
    let decided = rt.block_on(async {
        let mut arrived: HashMap<i64, Vec<(usize, Instant)>> = HashMap::new();
        let mut out = Vec::new();
        let mut base = 0;
        for i in 0..=plan.decisions {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let t0 = Instant::now();
            let _ = jobs.send(Job::Cas {
                service: SERVICES[0].into(),
                release: "v2.4.1".into(),
                record: record(i),
                base,
                reply: Some(reply),
            });
            let rev = match tokio::time::timeout(Duration::from_secs(5), answer).await {
                Ok(Ok(Ok(rev))) => rev,
                other => bail!("decision {i}: the publisher answered {other:?}"),
            };
            let committed = t0.elapsed();
            base = rev;
            let deadline = t0 + PROPAGATION_TIMEOUT;
            let mut seen: BTreeSet<usize> = BTreeSet::new();
            let mut last = t0;
            for (node, at) in arrived.remove(&rev).unwrap_or_default() {
                seen.insert(node);
                last = last.max(at);
            }
            while seen.len() < nodes {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, arrivals.recv()).await {
                    Ok(Some((node, r, at))) if r == rev => {
                        seen.insert(node);
                        last = last.max(at);
                    }
                    Ok(Some((node, r, at))) => arrived.entry(r).or_default().push((node, at)),
                    Ok(None) | Err(_) => break,
                }
            }
            // Decision 0 creates the record (first of its release): not
            // counted.
            if i > 0 {
                out.push((committed, seen.len() == nodes, last.duration_since(t0), t0));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok((out, base))
    });
    let after_decisions = counters(cluster)?;
    // What the members sent beyond the steady window's rate, per decision
    // (decision 0, the record's creation, included): the watch fan-out.
    let fanout_bytes = match (before_decisions.at, after_decisions.at) {
        (Some(a), Some(b)) => {
            let extra = after_decisions.bytes_out
                - before_decisions.bytes_out
                - rate(|c| c.bytes_out) * b.duration_since(a).as_secs_f64();
            extra / (plan.decisions + 1) as f64
        }
        _ => f64::NAN,
    };
    // The per-node spread needs the individual arrivals: one more decision,
    // recorded node by node.
    let spread = rt.block_on(async {
        let base = match &decided {
            Ok((_, base)) => *base,
            Err(_) => return anyhow::Ok(Vec::new()),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let t0 = Instant::now();
        let _ = jobs.send(Job::Cas {
            service: SERVICES[0].into(),
            release: "v2.4.1".into(),
            record: record(plan.decisions + 1),
            base,
            reply: Some(reply),
        });
        let rev = match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(Ok(rev))) => rev,
            other => bail!("the last decision: the publisher answered {other:?}"),
        };
        let mut per_node: HashMap<usize, f64> = HashMap::new();
        let deadline = t0 + PROPAGATION_TIMEOUT;
        while per_node.len() < nodes {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, arrivals.recv()).await {
                Ok(Some((node, r, at))) if r == rev => {
                    per_node.insert(node, at.duration_since(t0).as_secs_f64() * 1e3);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let mut v: Vec<f64> = per_node.into_values().collect();
        v.sort_by(f64::total_cmp);
        anyhow::Ok(v)
    });
    let restarts = (
        probe.watch_restarts.load(Ordering::Relaxed),
        probe.session_restarts.load(Ordering::Relaxed),
        probe.leader_saw.load(Ordering::Relaxed),
    );
    if let Some(why) = &*probe
        .first_restart
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        eprintln!("bench: fleet of {nodes}: a watch ended: {why}");
    }
    stop(rt, cluster, &tasks);
    let (decided, _) = decided?;
    let spread = spread?;
    ensure!(
        spread.len() == nodes,
        "fleet of {nodes}: the last decision reached {} nodes in {PROPAGATION_TIMEOUT:?}",
        spread.len()
    );
    let mut commits: Vec<f64> = decided.iter().map(|d| d.0.as_secs_f64() * 1e3).collect();
    Ok(FleetRow {
        nodes,
        services: SERVICES.len(),
        summary_interval_s: interval.as_secs_f64(),
        decisions: decided.len(),
        complete: decided.iter().filter(|d| d.1).count(),
        propagation_ms: decided.iter().map(|d| d.2.as_secs_f64() * 1e3).collect(),
        commit_p50_ms: median(&mut commits),
        one_decision_ms: [
            percentile(&spread, 0.5),
            percentile(&spread, 0.99),
            spread.last().copied().unwrap_or(f64::NAN),
        ],
        window_s: window,
        proposals_per_s: rate(|c| c.proposals),
        txns_per_s: rate(|c| c.txns),
        puts_per_s: rate(|c| c.puts),
        keepalives_per_s: rate(|c| c.keepalives),
        ranges_per_s: rate(|c| c.ranges),
        bytes_in_per_node_min: rate(|c| c.bytes_in) * 60.0 / nodes as f64,
        bytes_out_per_s: rate(|c| c.bytes_out),
        put_bytes_per_s: rate(|c| c.put_bytes),
        fanout_bytes_per_decision: fanout_bytes,
        db_mb: after.db_bytes / 1e6,
        etcd_cpu_pct: rate(|c| c.cpu_s) * 100.0,
        etcd_rss_mib,
        bench_cpu_pct: (bench_after - bench_before) / window * 100.0,
        etcd_sockets,
        leader_saw: restarts.2,
        leader_reads,
        watch_restarts: [restarts_before.0, restarts.0 - restarts_before.0],
        session_restarts: [restarts_before.1, restarts.1 - restarts_before.1],
    })
}

/// Aborts a fleet's tasks and revokes every lease (its summaries and
/// campaign keys go with them), so the next fleet starts on a quiet
/// cluster.
fn stop(rt: &Runtime, cluster: &Etcd, tasks: &[JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
    let revoked = rt.block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None).await?;
        let leases = client.leases().await?;
        let mut handles = Vec::new();
        for chunk in leases.leases().chunks(64) {
            let ids: Vec<i64> = chunk.iter().map(etcd_client::LeaseStatus::id).collect();
            let mut c = client.clone();
            handles.push(tokio::spawn(async move {
                for id in ids {
                    let _ = c.lease_revoke(id).await;
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        anyhow::Ok(())
    });
    if let Err(e) = revoked {
        eprintln!("bench: fleet: revoking the simulated nodes' leases: {e:#}");
    }
}

/// Synthetic summaries written up to each of `sizes`, each time read with
/// the agent's `get_summaries` (what the leader does every 500 ms).
async fn leader_reads(cluster: &Etcd, sizes: &[usize]) -> anyhow::Result<Vec<LeaderRead>> {
    let prefix = "/bench-leader-read";
    let keys = Keys::new(prefix);
    let cfg = config(cluster, prefix, "reader".into(), Duration::from_secs(2));
    let mut reader = fleet::connect(&cfg).await?;
    let mut writer = etcd_client::Client::connect(cluster.endpoints(), None).await?;
    let mut written = 0;
    let mut bytes = 0;
    let mut out = Vec::new();
    for &size in sizes {
        while written < size {
            // etcd's default limit is 128 operations per transaction.
            let n = (size - written).min(100);
            let ops: Vec<TxnOp> = (written..written + n)
                .map(|i| {
                    let node = format!("node-{:05}", i / SERVICES.len());
                    let service = SERVICES[i % SERVICES.len()];
                    let value = serde_json::to_vec(&summary(service, &node)).unwrap_or_default();
                    bytes += value.len();
                    TxnOp::put(keys.node(service, &node), value, None)
                })
                .collect();
            writer.txn(Txn::new().and_then(ops)).await?;
            written += n;
        }
        let mut times = Vec::new();
        let mut error = None;
        for _ in 0..3 {
            let t0 = Instant::now();
            match fleet::get_summaries(&mut reader, &keys).await {
                Ok(all) if all.len() == size => times.push(t0.elapsed().as_secs_f64() * 1e3),
                Ok(all) => error = Some(format!("read {} of {size} summaries", all.len())),
                Err(e) => error = Some(canary_agent::error_chain(&e)),
            }
        }
        eprintln!(
            "bench: fleet leader read of {size} summaries ({:.1} MB): {:.1} ms{}",
            bytes as f64 / 1e6,
            median(&mut times.clone()),
            error
                .as_ref()
                .map_or(String::new(), |e| format!(", failed: {e}"))
        );
        out.push(LeaderRead {
            summaries: size,
            bytes,
            median_ms: median(&mut times),
            error,
        });
    }
    writer
        .delete(
            prefix,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    Ok(out)
}

/// Open sockets of `pid`.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

/// `GET path` from a member's client URL (`http://host:port`), the body.
fn http_get(endpoint: &str, path: &str) -> anyhow::Result<String> {
    let host = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("{endpoint}: not an http:// URL"))?;
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (_, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {endpoint}{path}: no body"))?;
    Ok(body.to_string())
}

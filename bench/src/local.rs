//! A client on the node itself: a process in the lab's router namespace
//! (the "node"), inside a cgroup v2 directory of the bench's own,
//! connecting to a VIP steered by each contender in turn: nothing (straight
//! to one backend), iptables DNAT in `nat OUTPUT` (kube-proxy's path for
//! local clients), and canary's socket LB attached at that cgroup.
//!
//! The load runs in a child process, this binary with `--local-client`,
//! that joins the cgroup before it execs: a socket belongs to the cgroup of
//! the process that creates it, and in cgroup v2 every thread of a process
//! is in the process's cgroup, so the client cannot be threads of the
//! harness. The harness, the backends' servers and the agent stay outside,
//! and both sides check it. As in the end-to-end section, every
//! measurement gets a fresh lab, rounds interleave the contenders, and
//! medians are reported.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Stdio,
};

use anyhow::{Context, bail, ensure};
use canary_lab::{AgentProcess, Behavior, Lab, Netns};
use canary_tests::{cgroup::TestCgroup, metrics::Exposition};
use serde::{Deserialize, Serialize};

use crate::{
    e2e::{VIP, iptables_dnat},
    load::{Conns, keepalive, new_connections, wait_listening},
    sample::{median, percentile},
};

/// Who steers the VIP for the local client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LocalContender {
    /// No VIP: the client connects straight to one stable backend.
    Direct,
    /// iptables `statistic --mode random` DNAT in `nat OUTPUT`.
    Iptables,
    /// canary's socket LB (`cgroup/connect4`) at the client's cgroup.
    SocketLb,
}

impl LocalContender {
    /// In report order.
    pub const ALL: [LocalContender; 3] = [
        LocalContender::Direct,
        LocalContender::Iptables,
        LocalContender::SocketLb,
    ];

    /// Human name.
    pub fn label(self) -> &'static str {
        match self {
            LocalContender::Direct => "direct (no VIP)",
            LocalContender::Iptables => "iptables DNAT, nat OUTPUT",
            LocalContender::SocketLb => "canary socket LB",
        }
    }
}

/// One contender's medians.
#[derive(Clone, Debug, Serialize)]
pub struct LocalRow {
    /// Who steered.
    pub contender: LocalContender,
    /// New connections per second, one request each.
    pub conns_per_s: f64,
    /// Keep-alive requests per second.
    pub requests_per_s: f64,
    /// Keep-alive request latency, median, µs.
    pub p50_us: f64,
    /// Keep-alive request latency, 99th percentile, µs.
    pub p99_us: f64,
    /// Share of new connections the canary answered, % (none for direct).
    pub canary_pct: Option<f64>,
    /// Socket LB only: connections its `connect4` program steered
    /// (`sock_steered`), over all measured loads of all rounds.
    pub sock_steered: Option<u64>,
    /// Connections the client opened over all measured loads of all rounds.
    pub opened: u64,
    /// Failed requests over all rounds.
    pub errors: u64,
}

/// A ratio of two contenders measured in the same rounds: the median of
/// the per-round ratios and their range. Neighbours in time share the
/// machine's momentary load, so a same-round ratio varies less than the
/// ratio of the two medians.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Paired {
    /// Median of the per-round ratios.
    pub median: f64,
    /// Smallest per-round ratio.
    pub min: f64,
    /// Largest per-round ratio.
    pub max: f64,
}

impl Paired {
    fn of(a: &[Sample], b: &[Sample], f: fn(&Sample) -> f64) -> Paired {
        let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| f(a) / f(b)).collect();
        // Sorts `r` too.
        let median = median(&mut r);
        Paired {
            median,
            min: r.first().copied().unwrap_or(f64::NAN),
            max: r.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The section's results.
#[derive(Clone, Debug, Serialize)]
pub struct Local {
    /// Rounds per contender.
    pub rounds: usize,
    /// Seconds per load.
    pub secs: f64,
    /// One row per contender, in [`LocalContender::ALL`] order.
    pub rows: Vec<LocalRow>,
    /// Socket LB against iptables, new connections/s (target ≥ 1.3).
    pub conns_vs_iptables: Paired,
    /// Socket LB against direct, keep-alive requests/s (target ≥ 0.98).
    pub keepalive_vs_direct: Paired,
}

/// What the harness asks of one client process.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    /// The router namespace.
    netns: String,
    /// The cgroup the client must be in, as `/proc/self/cgroup` names it.
    cgroup: String,
    /// Where to connect.
    target: SocketAddr,
    /// Which load.
    phase: Phase,
    /// For how long, seconds.
    secs: f64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Phase {
    /// Until the target answers, then 0.3 s of new connections (ARP, the
    /// servers' first threads, the agent's first steering).
    Warmup,
    /// One request per connection.
    Conns,
    /// Requests on long-lived connections.
    KeepAlive,
}

/// What a client process reports, one JSON line on stdout.
#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Warm,
    Conns(Conns),
    KeepAlive(Requests),
}

/// A keep-alive load, summarised in the client (its latencies stay there).
#[derive(Debug, Serialize, Deserialize)]
struct Requests {
    answered: u64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    opened: u64,
    secs: f64,
}

/// What one measurement of one contender saw.
struct Sample {
    conns_per_s: f64,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    canary: u64,
    total: u64,
    steered: Option<u64>,
    opened: u64,
    errors: u64,
}

/// The client process: `canary-bench --local-client SPEC`, started by
/// [`measure`] inside the cgroup. Checks its cgroup, runs the load from the
/// router namespace and prints the [`Outcome`].
pub fn client_main(spec: &str) -> anyhow::Result<()> {
    let spec: ClientSpec =
        serde_json::from_str(spec).context("--local-client takes the harness's JSON spec")?;
    let own = cgroup_of("self")?;
    ensure!(
        own == spec.cgroup,
        "the local client runs in cgroup {own}, not {}: its sockets would not be the ones steered",
        spec.cgroup
    );
    let ns = Netns::attach(&spec.netns)?;
    // Unbound, as an application dials: the kernel picks the source
    // address by route and the port at connect().
    let any = [IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
    let outcome = match spec.phase {
        Phase::Warmup => {
            wait_listening(&ns, any[0], spec.target)?;
            new_connections(&ns, &any, spec.target, 0.3);
            Outcome::Warm
        }
        Phase::Conns => Outcome::Conns(new_connections(&ns, &any, spec.target, spec.secs)),
        Phase::KeepAlive => {
            let mut ka = keepalive(&ns, &any, spec.target, spec.secs);
            ensure!(
                !ka.latencies_us.is_empty(),
                "no keep-alive request to {} was answered ({} errors)",
                spec.target,
                ka.errors
            );
            ka.latencies_us.sort_by(f64::total_cmp);
            Outcome::KeepAlive(Requests {
                answered: ka.latencies_us.len() as u64,
                p50_us: percentile(&ka.latencies_us, 0.5),
                p99_us: percentile(&ka.latencies_us, 0.99),
                errors: ka.errors,
                opened: ka.opened,
                secs: ka.secs,
            })
        }
    };
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// Runs one client process in `cgroup` and returns its outcome.
fn run_client(cgroup: &TestCgroup, spec: &ClientSpec) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe().context("the bench binary's own path")?;
    let out = cgroup
        .command(exe)
        .arg("--local-client")
        .arg(serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .output()
        .context("running the local client")?;
    ensure!(
        out.status.success(),
        "the local client ({:?} to {}) failed: {}",
        spec.phase,
        spec.target,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the local client's report: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The cgroup v2 path of process `pid` (`self` for this one), from the
/// `0::` line of `/proc/PID/cgroup`.
fn cgroup_of(pid: &str) -> anyhow::Result<String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .with_context(|| format!("{path} names no cgroup v2 path:\n{text}"))
}

/// Fails if process `pid` (`what`) is in `cgroup`: only the client may be,
/// or the socket LB would steer (and the measurement count) its sockets.
fn ensure_outside(cgroup: &str, pid: &str, what: &str) -> anyhow::Result<()> {
    let own = cgroup_of(pid)?;
    ensure!(
        own != cgroup,
        "{what} (pid {pid}) is in the client's cgroup {cgroup}"
    );
    Ok(())
}

/// The router as a node: many short connections from one address (a wide
/// port range and `TIME_WAIT` reuse, as in the lab's client namespace), and
/// a route for the VIP range that leads nowhere (a veth whose peer is
/// down), as a node's default route would: a connection to the VIP that no
/// contender steered times out instead of being answered, and iptables
/// needs some route for the VIP before its `OUTPUT` DNAT runs.
fn prepare_node(router: &Netns) -> anyhow::Result<()> {
    router.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=10000 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ])?;
    router.ip_batch(&format!(
        "link add vip0 type veth peer name vip1\n\
         link set vip0 up\n\
         route add {}/{} dev vip0\n",
        Lab::VIP_NET,
        Lab::VIP_PREFIX_LEN
    ))
}

/// The socket LB's `sock_steered` counter, from the agent's `/metrics`.
fn sock_steered(lab: &Lab) -> anyhow::Result<u64> {
    let (head, body) = canary_tests::metrics::try_http_get(
        lab.router(),
        "127.0.0.1:9477".parse()?,
        "/metrics",
        "*/*",
    )
    .context("GET /metrics")?;
    ensure!(head.contains("200"), "GET /metrics: {head}");
    let m = Exposition::parse(&body);
    let values: Vec<f64> = m
        .matching(
            "canary_dataplane_events_total",
            &[("event", "sock_steered")],
        )
        .map(|s| s.value)
        .collect();
    ensure!(
        values.len() == 1,
        "canary_dataplane_events_total{{event=\"sock_steered\"}}: {values:?}"
    );
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter, an integer far below 2^53"
    )]
    Ok(values[0] as u64)
}

/// Sets `c` up in `lab` for clients in `cgroup`: the agent (socket LB
/// only) and the address the client dials.
fn setup(
    lab: &Lab,
    cgroup: &TestCgroup,
    c: LocalContender,
) -> anyhow::Result<(Option<AgentProcess>, SocketAddrV4)> {
    let (s1, s2, c1) = (
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(2),
    );
    Ok(match c {
        LocalContender::Direct => (None, s1),
        LocalContender::Iptables => {
            iptables_dnat(lab.router(), "OUTPUT", [c1, s1, s2])?;
            (None, VIP)
        }
        LocalContender::SocketLb => {
            let config = format!(
                "[agent]\ninterfaces = []\nsocket_lb = true\ncgroup = \"{}\"\n\n\
                 [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{s1}\", \"{s2}\"]\n\
                 canary = [\"{c1}\"]\nweight = \"5%\"\ncohort = \"per-connection\"\n",
                cgroup.path().display()
            );
            (
                Some(AgentProcess::start(lab.router(), &config, false)?),
                VIP,
            )
        }
    })
}

fn measure_once(c: LocalContender, secs: f64) -> anyhow::Result<Sample> {
    let reply = Behavior::Reply;
    let lab = canary_tests::lab(
        &[
            ("stable-1", reply),
            ("stable-2", reply),
            ("canary-1", reply),
        ],
        0,
    );
    prepare_node(lab.router())?;
    let cg = TestCgroup::create();
    // The bench creates it right under the cgroup v2 root.
    let cgroup = format!(
        "/{}",
        cg.path()
            .file_name()
            .context("the cgroup's name")?
            .to_string_lossy()
    );
    let (agent, target) = setup(&lab, &cg, c)?;
    ensure_outside(&cgroup, "self", "the bench harness")?;
    if let Some(agent) = &agent {
        ensure_outside(&cgroup, &agent.pid().to_string(), "the agent")?;
    }
    let spec = |phase, secs| ClientSpec {
        netns: lab.router().name().to_string(),
        cgroup: cgroup.clone(),
        target: target.into(),
        phase,
        secs,
    };
    run_client(&cg, &spec(Phase::Warmup, 0.0))?;
    let steered0 = agent.as_ref().map(|_| sock_steered(&lab)).transpose()?;
    let Outcome::Conns(conns) = run_client(&cg, &spec(Phase::Conns, secs))? else {
        bail!("the client answered the new-connection load with another report");
    };
    let Outcome::KeepAlive(ka) = run_client(&cg, &spec(Phase::KeepAlive, secs))? else {
        bail!("the client answered the keep-alive load with another report");
    };
    let steered1 = agent.as_ref().map(|_| sock_steered(&lab)).transpose()?;
    let steered = steered0.zip(steered1).map(|(a, b)| b.saturating_sub(a));
    drop(agent);
    drop(cg);
    let opened = conns.ok + conns.errors + ka.opened;
    // Proof that the contender steered: connections to the VIP that were
    // not steered time out on the route to nowhere, so answers from the
    // canary and from a stable backend show the split (at 5 %, none of n
    // connections from the canary has probability 0.95^n, below 1e-6 from
    // n = 270; a round makes thousands);
    // the socket LB's own counter must cover every answered connection.
    if c != LocalContender::Direct {
        ensure!(
            conns.canary > 0 && conns.canary < conns.ok,
            "{}: {} of {} connections answered by the canary: the VIP was not split",
            c.label(),
            conns.canary,
            conns.ok
        );
    }
    if let Some(steered) = steered {
        ensure!(
            (conns.ok..=opened).contains(&steered),
            "the socket LB steered {steered} connections; the client opened {opened}, {} answered",
            conns.ok
        );
    }
    Ok(Sample {
        conns_per_s: conns.ok as f64 / conns.secs,
        requests_per_s: ka.answered as f64 / ka.secs,
        p50_us: ka.p50_us,
        p99_us: ka.p99_us,
        canary: conns.canary,
        total: conns.ok,
        steered,
        opened,
        errors: conns.errors + ka.errors,
    })
}

/// `rounds` interleaved rounds of every contender, `secs` per load.
pub fn measure(rounds: usize, secs: f64) -> anyhow::Result<Local> {
    let mut samples: Vec<Vec<Sample>> = LocalContender::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, &c) in LocalContender::ALL.iter().enumerate() {
            let s =
                measure_once(c, secs).with_context(|| format!("{} round {round}", c.label()))?;
            eprintln!(
                "bench: local round {round}: {:<26} {:>8.0} conn/s {:>8.0} req/s p50 {:>6.0} µs p99 {:>6.0} µs, {} errors{}",
                c.label(),
                s.conns_per_s,
                s.requests_per_s,
                s.p50_us,
                s.p99_us,
                s.errors,
                s.steered
                    .map(|n| format!(", {n} of {} steered at the socket", s.opened))
                    .unwrap_or_default(),
            );
            samples[i].push(s);
        }
    }
    let of = |c| {
        &samples[LocalContender::ALL
            .iter()
            .position(|&x| x == c)
            .unwrap_or(0)][..]
    };
    let (direct, iptables, socket) = (
        of(LocalContender::Direct),
        of(LocalContender::Iptables),
        of(LocalContender::SocketLb),
    );
    let conns_vs_iptables = Paired::of(socket, iptables, |s| s.conns_per_s);
    let keepalive_vs_direct = Paired::of(socket, direct, |s| s.requests_per_s);
    let rows = LocalContender::ALL
        .iter()
        .zip(&samples)
        .map(|(&c, s)| {
            let med = |f: &dyn Fn(&Sample) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
            let (canary, total) = s
                .iter()
                .fold((0, 0), |a, s| (a.0 + s.canary, a.1 + s.total));
            LocalRow {
                contender: c,
                conns_per_s: med(&|s| s.conns_per_s),
                requests_per_s: med(&|s| s.requests_per_s),
                p50_us: med(&|s| s.p50_us),
                p99_us: med(&|s| s.p99_us),
                canary_pct: (c != LocalContender::Direct)
                    .then(|| canary as f64 * 100.0 / total.max(1) as f64),
                sock_steered: s.iter().map(|s| s.steered).sum(),
                opened: s.iter().map(|s| s.opened).sum(),
                errors: s.iter().map(|s| s.errors).sum(),
            }
        })
        .collect();
    Ok(Local {
        rounds,
        secs,
        rows,
        conns_vs_iptables,
        keepalive_vs_direct,
    })
}

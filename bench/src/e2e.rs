//! End to end in network namespaces: the same lab topology (client →
//! router → backends) with the router steering by each contender in turn.
//!
//! Every measurement gets a fresh lab, so nothing one contender leaves
//! behind (conntrack, NAT tables, a proxy's sockets) is paid by the next;
//! rounds interleave the contenders and medians are reported.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Stdio},
};

use anyhow::Context;
use canary_lab::{AgentProcess, Behavior, Lab, Netns};
use serde::Serialize;

use crate::{
    load::{self, keepalive, new_connections, wait_listening},
    sample::{cpu_seconds, median, percentile, rss_mib},
};

/// The VIP clients connect to.
pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

/// Who steers the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Contender {
    /// No VIP: clients connect straight to one stable backend.
    Direct,
    /// canary-agent, TC ingress.
    CanaryTc,
    /// canary-agent, XDP ingress.
    CanaryXdp,
    /// iptables `statistic --mode random` DNAT (what kube-proxy does).
    Iptables,
    /// HAProxy in TCP mode with weighted servers.
    Haproxy,
}

impl Contender {
    /// In report order.
    pub const ALL: [Contender; 5] = [
        Contender::Direct,
        Contender::CanaryTc,
        Contender::CanaryXdp,
        Contender::Iptables,
        Contender::Haproxy,
    ];

    /// Human name.
    pub fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct (no steering)",
            Contender::CanaryTc => "canary, TC",
            Contender::CanaryXdp => "canary, XDP",
            Contender::Iptables => "iptables statistic DNAT",
            Contender::Haproxy => "HAProxy weighted TCP",
        }
    }
}

/// One contender's medians.
#[derive(Clone, Debug, Serialize)]
pub struct E2eRow {
    /// Who steered.
    pub contender: Contender,
    /// New connections per second, one request each.
    pub conns_per_s: f64,
    /// Keep-alive requests per second.
    pub requests_per_s: f64,
    /// Keep-alive request latency, median, µs.
    pub p50_us: f64,
    /// Keep-alive request latency, 99th percentile, µs.
    pub p99_us: f64,
    /// Share of new connections the canary answered, %.
    pub canary_pct: f64,
    /// Failed requests over all rounds.
    pub errors: u64,
}

/// The agent's cost while steering under load (canary TC rounds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentLoad {
    /// Agent CPU during the new-connection load, % of one CPU.
    pub cpu_pct_conns: f64,
    /// Agent CPU during the keep-alive load, % of one CPU.
    pub cpu_pct_keepalive: f64,
    /// Agent resident memory at the end, MiB.
    pub rss_mib: f64,
}

/// What one measurement of one contender saw.
struct Sample {
    conns_per_s: f64,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    canary: u64,
    total: u64,
    errors: u64,
    agent_cpu: Option<(f64, f64)>,
    agent_rss: Option<f64>,
}

/// The steering set up in a lab; dropping it stops it.
enum Steering {
    None,
    Agent(AgentProcess),
    /// The proxy, and its config and log files.
    Haproxy(Child, [PathBuf; 2]),
    Iptables,
}

impl Drop for Steering {
    fn drop(&mut self) {
        if let Steering::Haproxy(child, files) = self {
            let _ = child.kill();
            let _ = child.wait();
            for file in files {
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

fn lab() -> Lab {
    let reply = Behavior::Reply;
    canary_tests::lab(
        &[
            ("stable-1", reply),
            ("stable-2", reply),
            ("canary-1", reply),
        ],
        32,
    )
}

fn setup(lab: &Lab, c: Contender) -> anyhow::Result<(Steering, SocketAddrV4)> {
    let (s1, s2, c1) = (
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(2),
    );
    let router = lab.router();
    Ok(match c {
        Contender::Direct => (Steering::None, s1),
        Contender::CanaryTc | Contender::CanaryXdp => {
            let mode = if c == Contender::CanaryXdp {
                "xdp"
            } else {
                "tc"
            };
            let config = format!(
                "[agent]\ninterfaces = [{{ name = \"{}\", mode = \"{mode}\" }}]\n\n\
                 [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nstable = [\"{s1}\", \"{s2}\"]\n\
                 canary = [\"{c1}\"]\nweight = \"5%\"\ncohort = \"per-connection\"\n",
                Lab::ROUTER_CLIENT_IFACE
            );
            (
                Steering::Agent(AgentProcess::start(router, &config, false)?),
                VIP,
            )
        }
        Contender::Iptables => {
            iptables_dnat(router, "PREROUTING", [c1, s1, s2])?;
            (Steering::Iptables, VIP)
        }
        Contender::Haproxy => {
            router.ip(&["addr", "add", &format!("{}/32", VIP.ip()), "dev", "lo"])?;
            let cfg = std::env::temp_dir()
                .join(format!("canary-bench-haproxy-{}.cfg", std::process::id()));
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 5000\n\ndefaults\n  mode tcp\n  timeout connect 3s\n  \
                     timeout client 30s\n  timeout server 30s\n\nfrontend vip\n  bind {VIP}\n  \
                     default_backend pool\n\nbackend pool\n  balance roundrobin\n  \
                     server stable1 {s1} weight 95\n  server stable2 {s2} weight 95\n  \
                     server canary1 {c1} weight 10\n"
                ),
            )?;
            let log = cfg.with_extension("log");
            let child = router
                .command("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("starting haproxy (install it: cargo xtask bench does)")?;
            let steering = Steering::Haproxy(child, [cfg, log.clone()]);
            let src = lab.client_addrs()[0].into();
            wait_listening(lab.client(), src, VIP.into()).with_context(|| {
                format!(
                    "haproxy: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })?;
            (steering, VIP)
        }
    })
}

/// Steers [`VIP`] in `router`'s `nat` table, chain `chain`, as kube-proxy
/// writes the rules: 5 % to `canary`, then half of the rest to each stable
/// backend (each rule takes its share of what the rules before it left).
/// The rules live in the namespace and go with it.
pub fn iptables_dnat(
    router: &Netns,
    chain: &str,
    [canary, s1, s2]: [SocketAddrV4; 3],
) -> anyhow::Result<()> {
    let rule = |extra: &str, to: SocketAddrV4| {
        format!(
            "-t nat -A {chain} -d {} -p tcp --dport {} {extra} -j DNAT --to-destination {to}",
            VIP.ip(),
            VIP.port()
        )
    };
    for r in [
        rule("-m statistic --mode random --probability 0.05", canary),
        rule("-m statistic --mode random --probability 0.5", s1),
        rule("", s2),
    ] {
        let args: Vec<&str> = std::iter::once("iptables")
            .chain(r.split_whitespace())
            .collect();
        router
            .exec(&args)
            .context("iptables (install it: cargo xtask bench does)")?;
    }
    Ok(())
}

fn measure_once(c: Contender, secs: f64) -> anyhow::Result<Sample> {
    let lab = lab();
    let (steering, target) = setup(&lab, c)?;
    let (client, sources) = (lab.client(), load::sources(lab.client_addrs()));
    let target = target.into();
    // Warm-up: ARP, the servers' first threads, the agent's first scrape.
    wait_listening(client, sources[0], target)?;
    new_connections(client, &sources, target, 0.3);
    let agent_pid = match &steering {
        Steering::Agent(a) => Some(a.pid()),
        _ => None,
    };
    let cpu0 = agent_pid.map(cpu_seconds);
    let conns = new_connections(client, &sources, target, secs);
    let cpu1 = agent_pid.map(cpu_seconds);
    let ka = keepalive(client, &sources, target, secs);
    let cpu2 = agent_pid.map(cpu_seconds);
    let (el1, el2) = (conns.secs, ka.secs);
    let mut lat = ka.latencies_us;
    lat.sort_by(f64::total_cmp);
    let agent_cpu = match (cpu0, cpu1, cpu2) {
        (Some(a), Some(b), Some(c)) => Some(((b - a) / el1 * 100.0, (c - b) / el2 * 100.0)),
        _ => None,
    };
    let agent_rss = agent_pid.map(rss_mib);
    drop(steering);
    Ok(Sample {
        conns_per_s: conns.ok as f64 / el1,
        requests_per_s: lat.len() as f64 / el2,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        canary: conns.canary,
        total: conns.ok,
        errors: conns.errors + ka.errors,
        agent_cpu,
        agent_rss,
    })
}

/// `rounds` interleaved rounds of every contender, `secs` per load.
pub fn measure(rounds: usize, secs: f64) -> anyhow::Result<(Vec<E2eRow>, AgentLoad)> {
    let mut samples: Vec<Vec<Sample>> = Contender::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, &c) in Contender::ALL.iter().enumerate() {
            let s =
                measure_once(c, secs).with_context(|| format!("{} round {round}", c.label()))?;
            eprintln!(
                "bench: e2e round {round}: {:<24} {:>8.0} conn/s {:>8.0} req/s p50 {:>6.0} µs p99 {:>6.0} µs, {} errors",
                c.label(),
                s.conns_per_s,
                s.requests_per_s,
                s.p50_us,
                s.p99_us,
                s.errors
            );
            samples[i].push(s);
        }
    }
    let mut load = AgentLoad::default();
    let rows = Contender::ALL
        .iter()
        .zip(&samples)
        .map(|(&c, s)| {
            let med = |f: &dyn Fn(&Sample) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
            if c == Contender::CanaryTc {
                load.cpu_pct_conns = med(&|s| s.agent_cpu.map_or(f64::NAN, |x| x.0));
                load.cpu_pct_keepalive = med(&|s| s.agent_cpu.map_or(f64::NAN, |x| x.1));
                load.rss_mib = med(&|s| s.agent_rss.unwrap_or(f64::NAN));
            }
            let (canary, total): (u64, u64) = s
                .iter()
                .map(|s| (s.canary, s.total))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            E2eRow {
                contender: c,
                conns_per_s: med(&|s| s.conns_per_s),
                requests_per_s: med(&|s| s.requests_per_s),
                p50_us: med(&|s| s.p50_us),
                p99_us: med(&|s| s.p99_us),
                canary_pct: canary as f64 * 100.0 / total.max(1) as f64,
                errors: s.iter().map(|s| s.errors).sum(),
            }
        })
        .collect();
    Ok((rows, load))
}

//! UDP end to end: the lab topology with the router steering a UDP VIP by
//! canary (TC or XDP) or by iptables DNAT (what kube-proxy does), against
//! clients talking to one backend directly. Fresh lab per measurement,
//! interleaved rounds, medians, as in e2e.rs.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use canary_lab::{AgentProcess, Behavior, Lab, UdpConn, udp_request_once};
use serde::Serialize;

use crate::sample::{median, percentile};

/// The UDP VIP.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53);
/// Closed-loop client threads.
const CLIENTS: usize = 4;
/// Per-request timeout: a datagram lost is an error, not a stall.
const TIMEOUT: Duration = Duration::from_secs(1);
/// `nf_conntrack_max` on the benchmark machine (iptables' flow table).
const NF_CONNTRACK_MAX: u32 = 262_144;

/// Who steers the UDP VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum UdpContender {
    /// No VIP: straight to one stable backend.
    Direct,
    /// canary-agent, TC ingress, its UDP table sized like this machine's
    /// `nf_conntrack_max` (262 144 flows).
    CanaryTc,
    /// canary-agent, XDP ingress, the same table.
    CanaryXdp,
    /// canary-agent, TC ingress, the default UDP table (65 536 entries,
    /// 32 768 flows): full within a second at these rates, so every new
    /// flow evicts one.
    CanaryTcSmallTable,
    /// iptables `statistic --mode random` DNAT of UDP (with `nf_conntrack`).
    Iptables,
}

impl UdpContender {
    /// In report order.
    pub const ALL: [UdpContender; 5] = [
        UdpContender::Direct,
        UdpContender::CanaryTc,
        UdpContender::CanaryXdp,
        UdpContender::CanaryTcSmallTable,
        UdpContender::Iptables,
    ];

    /// Human name.
    pub fn label(self) -> &'static str {
        match self {
            UdpContender::Direct => "direct (no steering)",
            UdpContender::CanaryTc => "canary, TC",
            UdpContender::CanaryXdp => "canary, XDP",
            UdpContender::CanaryTcSmallTable => "canary, TC, default UDP table",
            UdpContender::Iptables => "iptables statistic DNAT",
        }
    }
}

/// One contender's medians.
#[derive(Clone, Debug, Serialize)]
pub struct UdpRow {
    /// Who steered.
    pub contender: UdpContender,
    /// New flows per second: one request datagram and its reply on a
    /// fresh socket each.
    pub flows_per_s: f64,
    /// Request/reply pairs per second on long-lived flows (a datagram each
    /// way; so twice this many datagrams per second cross the router).
    pub requests_per_s: f64,
    /// Long-lived request latency, median, µs.
    pub p50_us: f64,
    /// Long-lived request latency, 99th percentile, µs.
    pub p99_us: f64,
    /// Share of new flows the canary answered, %.
    pub canary_pct: f64,
    /// Requests without a reply over all rounds.
    pub errors: u64,
}

struct Sample {
    flows_per_s: f64,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    canary: u64,
    total: u64,
    errors: u64,
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

/// Sets up `c` in `lab`: the agent (kept alive by the caller) and the
/// address clients send to.
fn setup(lab: &Lab, c: UdpContender) -> anyhow::Result<(Option<AgentProcess>, SocketAddrV4)> {
    let (s1, s2, c1) = (
        lab.backend_addr(0),
        lab.backend_addr(1),
        lab.backend_addr(2),
    );
    Ok(match c {
        UdpContender::Direct => (None, s1),
        UdpContender::CanaryTc | UdpContender::CanaryXdp | UdpContender::CanaryTcSmallTable => {
            let mode = if c == UdpContender::CanaryXdp {
                "xdp"
            } else {
                "tc"
            };
            // Two entries per flow: as many flows as nf_conntrack_max.
            let table = if c == UdpContender::CanaryTcSmallTable {
                String::new()
            } else {
                format!("udp_conntrack_capacity = {}\n", 2 * NF_CONNTRACK_MAX)
            };
            let config = format!(
                "[agent]\n{table}interfaces = [{{ name = \"{}\", mode = \"{mode}\" }}]\n\n\
                 [[service]]\nname = \"dns\"\nvip = \"{VIP}\"\nprotocol = \"udp\"\n\
                 stable = [\"{s1}\", \"{s2}\"]\ncanary = [\"{c1}\"]\nweight = \"5%\"\n\
                 cohort = \"per-connection\"\n",
                Lab::ROUTER_CLIENT_IFACE
            );
            (
                Some(AgentProcess::start(lab.router(), &config, false)?),
                VIP,
            )
        }
        UdpContender::Iptables => {
            let rule = |extra: &str, to: SocketAddrV4| {
                format!(
                    "-t nat -A PREROUTING -d {} -p udp --dport {} {extra} -j DNAT --to-destination {to}",
                    VIP.ip(),
                    VIP.port()
                )
            };
            for r in [
                rule("-m statistic --mode random --probability 0.05", c1),
                rule("-m statistic --mode random --probability 0.5", s1),
                rule("", s2),
            ] {
                let args: Vec<&str> = std::iter::once("iptables")
                    .chain(r.split_whitespace())
                    .collect();
                lab.router()
                    .exec(&args)
                    .context("iptables (install it: cargo xtask bench does)")?;
            }
            (None, VIP)
        }
    })
}

/// One request per fresh socket from `CLIENTS` threads for `secs`:
/// (answered, canary answers, errors, elapsed seconds).
fn new_flows(lab: &Lab, target: SocketAddrV4, secs: f64) -> (u64, u64, u64, f64) {
    let sources = Arc::new(lab.client_addrs().to_vec());
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let sources = Arc::clone(&sources);
            lab.client().spawn(move || {
                let (mut ok, mut canary, mut err) = (0u64, 0u64, 0u64);
                let mut i = t;
                while Instant::now() < until {
                    match udp_request_once(sources[i % sources.len()], target, TIMEOUT) {
                        Ok(name) => {
                            ok += 1;
                            canary += u64::from(name.starts_with("canary"));
                        }
                        Err(_) => err += 1,
                    }
                    i += CLIENTS;
                }
                (ok, canary, err)
            })
        })
        .collect();
    let mut total = (0, 0, 0);
    for h in handles {
        if let Ok(Ok((a, b, c))) = h.join() {
            total = (total.0 + a, total.1 + b, total.2 + c);
        }
    }
    (total.0, total.1, total.2, start.elapsed().as_secs_f64())
}

/// Requests on `CLIENTS` long-lived flows for `secs`: (latencies in µs,
/// errors, elapsed seconds).
fn long_lived(lab: &Lab, target: SocketAddrV4, secs: f64) -> (Vec<f64>, u64, f64) {
    let sources = lab.client_addrs().to_vec();
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let src = sources[t % sources.len()];
            lab.client().spawn(move || {
                let mut lat = Vec::new();
                let mut err = 0u64;
                let mut flow = UdpConn::open(src, target, TIMEOUT)?;
                while Instant::now() < until {
                    let t0 = Instant::now();
                    if flow.ping().is_ok() {
                        lat.push(t0.elapsed().as_secs_f64() * 1e6);
                    } else {
                        err += 1;
                        flow = UdpConn::open(src, target, TIMEOUT)?;
                    }
                }
                Ok::<_, std::io::Error>((lat, err))
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(Ok((l, e)))) => {
                lat.extend(l);
                errors += e;
            }
            _ => errors += 1,
        }
    }
    (lat, errors, start.elapsed().as_secs_f64())
}

fn measure_once(c: UdpContender, secs: f64) -> anyhow::Result<Sample> {
    let lab = lab();
    let (agent, target) = setup(&lab, c)?;
    // Warm-up: ARP, the servers' threads, the first flows.
    let (warm, ..) = new_flows(&lab, target, 0.3);
    anyhow::ensure!(
        warm > 0,
        "{}: nothing answered during the warm-up",
        c.label()
    );
    let (ok, canary, err1, el1) = new_flows(&lab, target, secs);
    let (mut lat, err2, el2) = long_lived(&lab, target, secs);
    lat.sort_by(f64::total_cmp);
    drop(agent);
    Ok(Sample {
        flows_per_s: ok as f64 / el1,
        requests_per_s: lat.len() as f64 / el2,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        canary,
        total: ok,
        errors: err1 + err2,
    })
}

/// `rounds` interleaved rounds of every contender, `secs` per load.
pub fn measure(rounds: usize, secs: f64) -> anyhow::Result<Vec<UdpRow>> {
    let mut samples: Vec<Vec<Sample>> = UdpContender::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, &c) in UdpContender::ALL.iter().enumerate() {
            let s = measure_once(c, secs)
                .with_context(|| format!("UDP {} round {round}", c.label()))?;
            eprintln!(
                "bench: udp round {round}: {:<24} {:>8.0} flows/s {:>8.0} req/s p50 {:>6.0} µs p99 {:>6.0} µs, {} errors",
                c.label(),
                s.flows_per_s,
                s.requests_per_s,
                s.p50_us,
                s.p99_us,
                s.errors
            );
            samples[i].push(s);
        }
    }
    Ok(UdpContender::ALL
        .iter()
        .zip(&samples)
        .map(|(&c, s)| {
            let med = |f: &dyn Fn(&Sample) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
            let (canary, total) = s
                .iter()
                .fold((0, 0), |a, s| (a.0 + s.canary, a.1 + s.total));
            UdpRow {
                contender: c,
                flows_per_s: med(&|s| s.flows_per_s),
                requests_per_s: med(&|s| s.requests_per_s),
                p50_us: med(&|s| s.p50_us),
                p99_us: med(&|s| s.p99_us),
                canary_pct: canary as f64 * 100.0 / total.max(1) as f64,
                errors: s.iter().map(|s| s.errors).sum(),
            }
        })
        .collect())
}

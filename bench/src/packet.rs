//! Per-packet cost through `BPF_PROG_TEST_RUN`, next to empty programs
//! measured in the same run.
//!
//! A test run repeats the program on one copy of the packet, so a rewrite
//! by one run is what the next run sees. Established data packets and
//! replies are therefore measured on a flow and its mirror: the real flow
//! client → VIP steered to backend B, and a second tracked flow client → B
//! whose backend is the VIP. Each run takes the full established path
//! (lookup, counting, DNAT with checksum updates) and flips the packet
//! between the two, so every one of a million repeats is a real
//! established packet. A new flow cannot repeat (its second run is a
//! retransmission), so new-flow SYNs are timed one run per call, each with
//! its own 5-tuple, next to the empty programs timed the same way.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::Instant,
};

use anyhow::{Context, ensure};
use canary_agent::{
    config::Config,
    dataplane::{Capacity, Dataplane, Program, flow_key},
};
use canary_common::flow::{CT_REVERSE, CtEntry};
use canary_tests::packet::{ACK, PSH, SYN, TC_ACT_OK, TC_ACT_UNSPEC, Tcp, XDP_PASS, parse};

use crate::sample::median;
use serde::Serialize;

/// Repeats per measurement in repeat mode.
const REPEAT: u32 = 200_000;
/// Measurements per case; the median is reported.
const ROUNDS: usize = 7;
/// New flows timed per program (one call each).
const NEW_FLOWS: u32 = 20_000;
/// The client of the measured flows.
const CLIENT: &str = "10.201.0.1:40000";
/// The client of the measured IPv6 flow.
const CLIENT6: &str = "[fd00:201::1]:40000";
/// The IPv6 service measured beside the IPv4 ones.
const VIP6: &str = "[fd00:96::1]:80";

/// One configuration's numbers, in ns per packet.
#[derive(Clone, Debug, Serialize)]
pub struct PacketRow {
    /// Services configured.
    pub services: u32,
    /// Flows in conntrack besides the measured ones.
    pub flows: u32,
    /// Empty TC program, repeat mode.
    pub tc_empty: f64,
    /// Empty XDP program, repeat mode.
    pub xdp_empty: f64,
    /// Empty TC program, one run per call (the new-flow baseline).
    pub tc_empty_single: f64,
    /// Empty XDP program, one run per call.
    pub xdp_empty_single: f64,
    /// Established data packet, TC ingress.
    pub tc_established: f64,
    /// Established data packet, XDP.
    pub xdp_established: f64,
    /// Reply reverse-NAT, TC egress.
    pub tc_reply: f64,
    /// Foreign packet (not to a VIP), TC ingress.
    pub tc_foreign: f64,
    /// Foreign packet, XDP.
    pub xdp_foreign: f64,
    /// New-flow SYN, TC ingress, one run per call (median).
    pub tc_new_flow: f64,
    /// New-flow SYN, XDP, one run per call (median).
    pub xdp_new_flow: f64,
    /// The same cases for an IPv6 flow through an IPv6 service.
    pub ipv6: FamilyRow,
}

/// The per-packet cases of one address family, in ns per packet.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FamilyRow {
    /// Established data packet, TC ingress.
    pub tc_established: f64,
    /// Established data packet, XDP.
    pub xdp_established: f64,
    /// Reply reverse-NAT, TC egress.
    pub tc_reply: f64,
    /// New-flow SYN, TC ingress, one run per call (median).
    pub tc_new_flow: f64,
    /// New-flow SYN, XDP, one run per call (median).
    pub xdp_new_flow: f64,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("bench address")
}

/// The config of `n` services; service 0 (10.96.0.1:80) is the measured
/// one. Every service has one stable and one canary backend, 5 % canary.
fn services(n: u32) -> anyhow::Result<Config> {
    let mut text = format!(
        "[agent]\ninterfaces = [\"lo\"]\nmax_services = {}\nmax_backends = {}\n",
        n + 1,
        2 * (n + 1)
    );
    for i in 0..n {
        let vip = std::net::Ipv4Addr::from(0x0a60_0001 + i);
        let stable = std::net::Ipv4Addr::from(0x0a40_0001 + i);
        let canary = std::net::Ipv4Addr::from(0x0a50_0001 + i);
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"{vip}:80\"\nstable = [\"{stable}:8080\"]\n\
             canary = [\"{canary}:8080\"]\nweight = \"5%\"\ncohort = \"per-connection\"\n"
        ));
    }
    text.push_str(&format!(
        "[[service]]\nname = \"v6\"\nvip = \"{VIP6}\"\nstable = [\"[fd00:64::1]:8080\"]\n\
         canary = [\"[fd00:65::1]:8080\"]\nweight = \"5%\"\ncohort = \"per-connection\"\n"
    ));
    Config::parse(&text, Path::new("bench.toml"), &[]).context("bench config")
}

/// A loaded data plane with `n` services, ready to measure.
struct Bench {
    dp: Dataplane,
    vip: SocketAddr,
    /// The backend the measured flow was steered to.
    backend: SocketAddr,
    /// The measured IPv6 flow: its VIP and backend.
    vip6: SocketAddr,
    backend6: SocketAddr,
}

impl Bench {
    fn new(n: u32, conntrack: u32) -> anyhow::Result<Bench> {
        let config = services(n)?;
        let mut dp = Dataplane::load(Capacity {
            conntrack,
            udp_conntrack: config.agent.udp_conntrack_capacity,
            services: config.agent.max_services,
            backends: config.agent.max_backends,
        })?;
        dp.apply(&config.services, &std::collections::BTreeSet::new())?;
        dp.load_baselines()?;
        let vip = config.services[0].vip;
        let backend = measured_flow(&mut dp, addr(CLIENT), vip)?;
        let vip6 = addr(VIP6);
        let backend6 = measured_flow(&mut dp, addr(CLIENT6), vip6)?;
        Ok(Bench {
            dp,
            vip,
            backend,
            vip6,
            backend6,
        })
    }
}

/// A real flow from `client` to `vip` through the programs (handshake,
/// request, response) and its mirror, so a repeated packet flips between
/// the two and ends where it started; returns the backend it was steered
/// to.
fn measured_flow(
    dp: &mut Dataplane,
    client: SocketAddr,
    vip: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let syn = dp.test_run(Program::TcIngress, &Tcp::new(client, vip, SYN).frame())?;
    let backend = parse(&syn.1).context("SYN output")?.dst;
    ensure!(backend != vip, "the bench SYN was not steered");
    for (program, seg) in [
        (Program::TcEgress, Tcp::new(backend, client, SYN | ACK)),
        (Program::TcIngress, Tcp::new(client, vip, ACK)),
        (
            Program::TcIngress,
            Tcp::new(client, vip, ACK | PSH).with_payload(&[b'q'; 64]),
        ),
        (
            Program::TcEgress,
            Tcp::new(backend, client, ACK | PSH).with_payload(&[b'r'; 64]),
        ),
    ] {
        dp.test_run(program, &seg.frame())?;
    }
    // Its mirror: client → backend tracked with the VIP as backend, and
    // VIP → client as the reply half to rewrite to the backend.
    let fwd = dp
        .conntrack_entry(&flow_key(client, vip))
        .context("forward entry of the bench flow")?;
    let rev = dp
        .conntrack_entry(&flow_key(backend, client))
        .context("reverse entry of the bench flow")?;
    ensure!(rev.flags & CT_REVERSE != 0, "reverse entry not marked");
    dp.conntrack_insert(
        flow_key(client, backend),
        CtEntry {
            nat_addr: vip.ip().into(),
            nat_port: vip.port().to_be(),
            ..fwd
        },
    )?;
    dp.conntrack_insert(
        flow_key(vip, client),
        CtEntry {
            nat_addr: backend.ip().into(),
            nat_port: backend.port().to_be(),
            ..rev
        },
    )?;
    Ok(backend)
}

impl Bench {
    /// Adds `flows` established flows (two entries each) that are not
    /// measured: the table the measured lookups search.
    fn fill(&mut self, flows: u32) -> anyhow::Result<()> {
        let template = self
            .dp
            .conntrack_entry(&flow_key(addr(CLIENT), self.vip))
            .context("template entry")?;
        for i in 0..flows {
            // 10.202.0.0/16 clients, 16 ports each: unique 5-tuples.
            let client =
                SocketAddrV4::new((0x0aca_0000 + (i >> 4)).into(), 20_000 + (i & 15) as u16);
            self.dp
                .conntrack_insert(flow_key(client, self.vip), template)?;
            self.dp.conntrack_insert(
                flow_key(self.backend, client),
                CtEntry {
                    nat_addr: self.vip.ip().into(),
                    nat_port: self.vip.port().to_be(),
                    flags: CT_REVERSE,
                    ..template
                },
            )?;
        }
        Ok(())
    }

    /// Mean ns per run over `REPEAT` runs of `program` on `frame`, checking
    /// the verdict.
    fn repeat(&mut self, program: Program, frame: &[u8], verdict: i32) -> anyhow::Result<f64> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .test_run_repeat(program, frame, REPEAT, Some(&mut out))?;
        check_verdict(program, r.return_value, verdict)?;
        // REPEAT is even: a flipping packet ends where it started.
        out.truncate(r.data_size_out as usize);
        ensure!(
            out == frame,
            "{program:?}: packet did not return to its start after an even number of runs"
        );
        Ok(r.duration.as_nanos() as f64)
    }

    /// Median kernel-timed ns of single runs, each on a fresh frame.
    fn single(
        &mut self,
        program: Program,
        frames: impl Iterator<Item = Vec<u8>>,
        verdict: i32,
    ) -> anyhow::Result<f64> {
        let mut times = Vec::new();
        for frame in frames {
            let r = self.dp.test_run_repeat(program, &frame, 1, None)?;
            check_verdict(program, r.return_value, verdict)?;
            times.push(r.duration.as_nanos() as f64);
        }
        Ok(median(&mut times))
    }
}

/// Fails unless `program` returned `verdict`.
fn check_verdict(program: Program, got: u32, verdict: i32) -> anyhow::Result<()> {
    ensure!(
        got.cast_signed() == verdict,
        "{program:?}: verdict {got} instead of {verdict}"
    );
    Ok(())
}

/// SYNs from distinct 5-tuples (10.203.0.0/16) to `vip`, `salt` keeping
/// series apart.
fn new_syns(vip: SocketAddr, salt: u32) -> impl Iterator<Item = Vec<u8>> {
    syns(vip, salt * NEW_FLOWS, NEW_FLOWS)
}

/// `count` SYNs to `vip` from distinct 5-tuples, the `first`-th on.
fn syns(vip: SocketAddr, first: u32, count: u32) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| {
        let n = first + i;
        let port = 30_000 + (n & 255) as u16;
        let src = if vip.is_ipv4() {
            SocketAddr::new(
                std::net::Ipv4Addr::from(0x0acb_0000 + (n >> 8)).into(),
                port,
            )
        } else {
            let host = 0xfd00_0203_u128 << 96 | u128::from(n >> 8);
            SocketAddr::new(std::net::Ipv6Addr::from(host).into(), port)
        };
        Tcp::new(src, vip, SYN).frame()
    })
}

/// Measures one configuration (`services`, then `flows` more flows).
pub fn measure(bench_services: u32, flows_list: &[u32]) -> anyhow::Result<Vec<PacketRow>> {
    let t = Instant::now();
    let mut b = Bench::new(bench_services, 4_194_304)?;
    eprintln!(
        "bench: packet: {bench_services} services loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let client = addr(CLIENT);
    let established = Tcp::new(client, b.vip, ACK | PSH)
        .with_payload(&[b'q'; 64])
        .frame();
    let reply = Tcp::new(b.backend, client, ACK | PSH)
        .with_payload(&[b'r'; 64])
        .frame();
    let foreign = Tcp::new(client, addr("10.95.0.1:80"), ACK | PSH)
        .with_payload(&[b'q'; 64])
        .frame();
    let client6 = addr(CLIENT6);
    let established6 = Tcp::new(client6, b.vip6, ACK | PSH)
        .with_payload(&[b'q'; 64])
        .frame();
    let reply6 = Tcp::new(b.backend6, client6, ACK | PSH)
        .with_payload(&[b'r'; 64])
        .frame();

    let mut rows = Vec::new();
    let mut filled = 0;
    for (series, &flows) in flows_list.iter().enumerate() {
        let t = Instant::now();
        b.fill(flows - filled)?;
        filled = flows;
        eprintln!(
            "bench: packet: conntrack holds {flows} more flows ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        // Rounds interleave the cases, so a slow moment hits all of them.
        let mut samples: [Vec<f64>; 10] = Default::default();
        for _ in 0..ROUNDS {
            let cases: [(Program, &[u8], i32); 10] = [
                (Program::BenchTcEmpty, &established, TC_ACT_UNSPEC),
                (Program::BenchXdpEmpty, &established, XDP_PASS),
                (Program::TcIngress, &established, TC_ACT_OK),
                (Program::XdpIngress, &established, XDP_PASS),
                (Program::TcEgress, &reply, TC_ACT_OK),
                (Program::TcIngress, &foreign, TC_ACT_UNSPEC),
                (Program::XdpIngress, &foreign, XDP_PASS),
                (Program::TcIngress, &established6, TC_ACT_OK),
                (Program::XdpIngress, &established6, XDP_PASS),
                (Program::TcEgress, &reply6, TC_ACT_OK),
            ];
            for (i, (program, frame, verdict)) in cases.into_iter().enumerate() {
                samples[i].push(b.repeat(program, frame, verdict)?);
            }
        }
        let salt = u32::try_from(series)? * 4;
        let tc_empty_single =
            b.single(Program::BenchTcEmpty, new_syns(b.vip, salt), TC_ACT_UNSPEC)?;
        let xdp_empty_single =
            b.single(Program::BenchXdpEmpty, new_syns(b.vip, salt + 1), XDP_PASS)?;
        let tc_new_flow = b.single(Program::TcIngress, new_syns(b.vip, salt + 2), TC_ACT_OK)?;
        let xdp_new_flow = b.single(Program::XdpIngress, new_syns(b.vip, salt + 3), XDP_PASS)?;
        let tc_new_flow6 = b.single(Program::TcIngress, new_syns(b.vip6, salt + 2), TC_ACT_OK)?;
        let xdp_new_flow6 = b.single(Program::XdpIngress, new_syns(b.vip6, salt + 3), XDP_PASS)?;
        let [
            tc_empty,
            xdp_empty,
            tc_established,
            xdp_established,
            tc_reply,
            tc_foreign,
            xdp_foreign,
            tc_established6,
            xdp_established6,
            tc_reply6,
        ] = samples.map(|mut s| median(&mut s));
        let row = PacketRow {
            services: bench_services,
            flows,
            tc_empty,
            xdp_empty,
            tc_empty_single,
            xdp_empty_single,
            tc_established,
            xdp_established,
            tc_reply,
            tc_foreign,
            xdp_foreign,
            tc_new_flow,
            xdp_new_flow,
            ipv6: FamilyRow {
                tc_established: tc_established6,
                xdp_established: xdp_established6,
                tc_reply: tc_reply6,
                tc_new_flow: tc_new_flow6,
                xdp_new_flow: xdp_new_flow6,
            },
        };
        eprintln!("bench: packet: {row:?}");
        rows.push(row);
    }
    Ok(rows)
}

/// Only new-flow SYNs through TC ingress, `count` of them one per call:
/// something to run under `perf record` (see BENCHMARKS.md).
pub fn profile_new_flows(count: u32) -> anyhow::Result<f64> {
    let mut b = Bench::new(1, 4_194_304)?;
    b.single(Program::TcIngress, syns(b.vip, 0, count), TC_ACT_OK)
}

//! The results: JSON for tools, Markdown for BENCHMARKS.md.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;
use serde::Serialize;

use crate::{
    agent::Scrape,
    e2e::{AgentLoad, Contender, E2eRow},
    fleet::Fleet,
    local::{Local, LocalContender, LocalRow, Paired},
    machine::Machine,
    packet::PacketRow,
    reaction::Reactions,
    udp::{UdpContender, UdpRow},
};

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Per-packet cost through `BPF_PROG_TEST_RUN`.
    Packet,
    /// End to end in network namespaces against the alternatives.
    E2e,
    /// A client on the node itself: socket LB against iptables and direct.
    Local,
    /// The agent's CPU, memory and scrape time.
    Agent,
    /// Breaker and judge reaction times.
    Reaction,
    /// UDP end to end against iptables DNAT.
    Udp,
    /// Simulated nodes sharing rollouts through a 3-member etcd.
    Fleet,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Seconds since the epoch at the start.
    pub started_unix: u64,
    /// `--quick`: smaller sizes, not for publication.
    pub quick: bool,
    /// Per-packet rows.
    pub packet: Vec<PacketRow>,
    /// End-to-end rows, one per contender.
    pub e2e: Vec<E2eRow>,
    /// UDP end-to-end rows, one per contender.
    pub udp: Vec<UdpRow>,
    /// The agent's cost during the canary TC rounds.
    pub agent_load: Option<AgentLoad>,
    /// The local client: socket LB against iptables and direct.
    pub local: Option<Local>,
    /// Scrape time.
    pub scrape: Option<Scrape>,
    /// Breaker and judge reaction times.
    pub reactions: Option<Reactions>,
    /// The simulated fleet.
    pub fleet: Option<Fleet>,
}

impl Report {
    /// An empty report for `machine`.
    pub fn new(machine: Machine, quick: bool) -> Report {
        Report {
            machine,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            quick,
            packet: Vec::new(),
            e2e: Vec::new(),
            udp: Vec::new(),
            agent_load: None,
            local: None,
            scrape: None,
            reactions: None,
            fleet: None,
        }
    }

    /// Writes `results.json` and `results.md` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("results.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let md = dir.join("results.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        eprintln!("bench: wrote {} and {}", json.display(), md.display());
        Ok(())
    }

    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Machine: {} × {}, {} GiB, Linux {}{}{}.\n",
            m.cpus,
            m.cpu,
            m.memory_gib,
            m.kernel,
            if m.virtualized {
                ", virtual machine"
            } else {
                ""
            },
            if self.quick {
                " **Quick run: reduced sizes, not for comparison.**"
            } else {
                ""
            },
        );
        if !self.packet.is_empty() {
            s.push_str(&packet_tables(&self.packet));
        }
        if !self.e2e.is_empty() {
            s.push_str(&e2e_table(&self.e2e));
        }
        if !self.udp.is_empty() {
            s.push_str(&udp_table(&self.udp));
        }
        if let Some(l) = &self.agent_load {
            let _ = writeln!(
                s,
                "\n### Agent under load (canary TC rounds, medians)\n\n\
                 | new connections | keep-alive requests | RSS |\n|---:|---:|---:|\n\
                 | {:.2} % of a CPU | {:.2} % of a CPU | {:.1} MiB |",
                l.cpu_pct_conns, l.cpu_pct_keepalive, l.rss_mib
            );
        }
        if let Some(local) = &self.local {
            s.push_str(&local_tables(local));
        }
        if let Some(sc) = &self.scrape {
            let _ = writeln!(
                s,
                "\n### Scrape\n\n| services | with traffic | GET /metrics median | max | size | agent RSS |\n\
                 |---:|---:|---:|---:|---:|---:|\n| {} | {} | {:.1} ms | {:.1} ms | {:.1} MB | {:.1} MiB |",
                sc.services,
                sc.with_traffic,
                sc.median_ms,
                sc.max_ms,
                sc.bytes as f64 / 1e6,
                sc.rss_mib
            );
        }
        if let Some(r) = &self.reactions {
            let list = |v: &[f64], digits: usize| {
                v.iter()
                    .map(|x| format!("{x:.digits$}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "\n### Reaction times\n\n| | median | runs |\n|---|---:|---|\n\
                 | breaker: first failed connection → last one steered to the dead canary (1000 conn/s, 20 %) | {:.1} ms | {} ms; failed connections: {:?} |\n\
                 | judge: start of traffic → rollback, canary 2× slower to first byte (500 conn/s, 20 %, judged every 250 ms) | {:.2} s | {} s |",
                r.breaker_median_ms(),
                list(&r.breaker_cutoff_ms, 1),
                r.breaker_failed,
                r.judge_median_s(),
                list(&r.judge_detect_s, 2),
            );
        }
        if let Some(f) = &self.fleet {
            s.push_str(&fleet_tables(f));
        }
        s
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

fn packet_tables(rows: &[PacketRow]) -> String {
    let mut s = String::new();
    s.push_str(
        "### Per packet (BPF_PROG_TEST_RUN, ns per packet, median of 7 × 200 000 runs)\n\n\
         | services | extra flows | empty TC | empty XDP | established TC | established XDP | reply TC egress | foreign TC | foreign XDP |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} ({}) | {:.1} ({}) | {:.1} ({}) | {:.1} ({}) | {:.1} ({}) |",
            r.services,
            r.flows,
            r.tc_empty,
            r.xdp_empty,
            r.tc_established,
            ratio(r.tc_established, r.tc_empty),
            r.xdp_established,
            ratio(r.xdp_established, r.xdp_empty),
            r.tc_reply,
            ratio(r.tc_reply, r.tc_empty),
            r.tc_foreign,
            ratio(r.tc_foreign, r.tc_empty),
            r.xdp_foreign,
            ratio(r.xdp_foreign, r.xdp_empty),
        );
    }
    s.push_str(
        "\n### New-flow SYN (one run per call, kernel-timed, median of 20 000 distinct SYNs)\n\n\
         | services | extra flows | empty TC | new flow TC | empty XDP | new flow XDP |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} ({}) | {:.0} | {:.0} ({}) |",
            r.services,
            r.flows,
            r.tc_empty_single,
            r.tc_new_flow,
            ratio(r.tc_new_flow, r.tc_empty_single),
            r.xdp_empty_single,
            r.xdp_new_flow,
            ratio(r.xdp_new_flow, r.xdp_empty_single),
        );
    }
    s.push_str(
        "\n### IPv6 against IPv4 (same runs, ns per packet; target: IPv6 within 10 % of IPv4)\n\n\
         | services | extra flows | established TC v4 / v6 | established XDP v4 / v6 | reply TC v4 / v6 | new flow TC v4 / v6 | new flow XDP v4 / v6 |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let pair = |v4: f64, v6: f64| format!("{v4:.0} / {v6:.0} ({})", ratio(v6, v4));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.services,
            r.flows,
            pair(r.tc_established, r.ipv6.tc_established),
            pair(r.xdp_established, r.ipv6.xdp_established),
            pair(r.tc_reply, r.ipv6.tc_reply),
            pair(r.tc_new_flow, r.ipv6.tc_new_flow),
            pair(r.xdp_new_flow, r.ipv6.xdp_new_flow),
        );
    }
    s
}

fn e2e_table(rows: &[E2eRow]) -> String {
    let direct = rows.iter().find(|r| r.contender == Contender::Direct);
    let rel = |v: f64, f: fn(&E2eRow) -> f64| {
        direct.map_or(String::new(), |d| format!(" ({})", ratio(v, f(d))))
    };
    let mut s = String::from(
        "\n### End to end (network namespaces, 5 % canary, medians of interleaved rounds; ratio to direct)\n\n\
         | steering | new conn/s | keep-alive req/s | p50 | p99 | canary share | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0}{} | {:.0}{} | {:.0} µs | {:.0} µs | {} | {} |",
            r.contender.label(),
            r.conns_per_s,
            rel(r.conns_per_s, |d| d.conns_per_s),
            r.requests_per_s,
            rel(r.requests_per_s, |d| d.requests_per_s),
            r.p50_us,
            r.p99_us,
            if r.contender == Contender::Direct {
                "–".to_string()
            } else {
                format!("{:.1} %", r.canary_pct)
            },
            r.errors,
        );
    }
    s
}

fn local_tables(local: &Local) -> String {
    let rows = &local.rows;
    let find = |c| rows.iter().find(|r| r.contender == c);
    let (direct, iptables) = (find(LocalContender::Direct), find(LocalContender::Iptables));
    let rel = |v: f64, to: Option<&LocalRow>, f: fn(&LocalRow) -> f64| {
        to.map_or(String::new(), |d| format!(" ({})", ratio(v, f(d))))
    };
    let mut s = format!(
        "\n### Local client (a process on the router namespace in a cgroup of its own, 5 % canary; medians of interleaved rounds: {}, {} s per load)\n\n\
         | steering | new conn/s (ratio to iptables) | keep-alive req/s (ratio to direct) | p50 | p99 | canary share | steered at the socket | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        local.rounds, local.secs
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0}{} | {:.0}{} | {:.0} µs | {:.0} µs | {} | {} | {} |",
            r.contender.label(),
            r.conns_per_s,
            rel(r.conns_per_s, iptables, |d| d.conns_per_s),
            r.requests_per_s,
            rel(r.requests_per_s, direct, |d| d.requests_per_s),
            r.p50_us,
            r.p99_us,
            r.canary_pct
                .map_or_else(|| "–".to_string(), |p| format!("{p:.1} %")),
            r.sock_steered
                .map_or_else(|| "–".to_string(), |n| format!("{n} of {}", r.opened)),
            r.errors,
        );
    }
    let target = |what: &str, p: &Paired, min: f64| {
        format!(
            "| socket LB {what} ≥ {min}× | {:.2}× (rounds {:.2}–{:.2}×) | {} |\n",
            p.median,
            p.min,
            p.max,
            if p.median >= min { "met" } else { "missed" }
        )
    };
    s.push_str("\n| target (median of the same-round ratios) | measured | |\n|---|---|---|\n");
    s.push_str(&target(
        "new connections/s against iptables DNAT",
        &local.conns_vs_iptables,
        1.3,
    ));
    s.push_str(&target(
        "keep-alive requests/s against direct",
        &local.keepalive_vs_direct,
        0.98,
    ));
    s
}

fn udp_table(rows: &[UdpRow]) -> String {
    let direct = rows.iter().find(|r| r.contender == UdpContender::Direct);
    let iptables = rows.iter().find(|r| r.contender == UdpContender::Iptables);
    let rel = |v: f64, f: fn(&UdpRow) -> f64| {
        let to = |r: Option<&UdpRow>| r.map_or("–".to_string(), |r| ratio(v, f(r)));
        format!(" ({} / {})", to(direct), to(iptables))
    };
    let mut s = String::from(
        "\n### UDP end to end (network namespaces, 5 % canary, medians of interleaved rounds; ratio to direct / to iptables; canary's UDP table holds as many flows as nf_conntrack_max unless it says default)\n\n\
         | steering | new flows/s | long-lived req/s | p50 | p99 | canary share | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0}{} | {:.0}{} | {:.0} µs | {:.0} µs | {} | {} |",
            r.contender.label(),
            r.flows_per_s,
            rel(r.flows_per_s, |d| d.flows_per_s),
            r.requests_per_s,
            rel(r.requests_per_s, |d| d.requests_per_s),
            r.p50_us,
            r.p99_us,
            if r.contender == UdpContender::Direct {
                "–".to_string()
            } else {
                format!("{:.1} %", r.canary_pct)
            },
            r.errors,
        );
    }
    s
}

fn fleet_tables(f: &Fleet) -> String {
    let mut s = format!(
        "\n### Fleet (simulated nodes in one process: the agent's watcher and session tasks, no data plane; 3-member etcd on tmpfs in a namespace of its own, the simulator in it; 2 services per node, lease TTL 6 s; a decision's record {} bytes, a summary {} bytes; 1-minute load average {:.1} before, {:.1} after)\n\n\
         | nodes | summary interval | decision → every node p50 | p99 | complete | CAS committed p50 | one decision, per node p50 / p99 / max | sent by etcd per decision |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        f.record_bytes[0], f.record_bytes[1], f.load_average[0], f.load_average[1],
    );
    for r in &f.rows {
        let _ = writeln!(
            s,
            "| {} | {} s | {:.1} ms | {:.1} ms | {} of {} | {:.1} ms | {:.1} / {:.1} / {:.1} ms | {:.0} kB |",
            r.nodes,
            r.summary_interval_s,
            r.p50_ms(),
            r.p99_ms(),
            r.complete,
            r.decisions,
            r.commit_p50_ms,
            r.one_decision_ms[0],
            r.one_decision_ms[1],
            r.one_decision_ms[2],
            r.fanout_bytes_per_decision / 1e3,
        );
    }
    s.push_str(
        "\n| nodes | summary interval | etcd writes/s (raft proposals) | txns/s | keys put/s | values put | keepalives/s | ranges/s | in per node per minute | out of etcd | etcd CPU (3 members) | largest member RSS | etcd sockets | simulator CPU | leader reads (summaries) | watch / session restarts (start-up + measured) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &f.rows {
        let _ = writeln!(
            s,
            "| {} | {} s | {:.0} | {:.0} | {:.0} | {:.0} kB/s | {:.0} | {:.1} | {:.1} kB | {:.0} kB/s | {:.0} % | {:.0} MiB | {} | {:.0} % | {} ({}) | {} + {} / {} + {} |",
            r.nodes,
            r.summary_interval_s,
            r.proposals_per_s,
            r.txns_per_s,
            r.puts_per_s,
            r.put_bytes_per_s / 1e3,
            r.keepalives_per_s,
            r.ranges_per_s,
            r.bytes_in_per_node_min / 1e3,
            r.bytes_out_per_s / 1e3,
            r.etcd_cpu_pct,
            r.etcd_rss_mib,
            r.etcd_sockets,
            r.bench_cpu_pct,
            r.leader_reads,
            r.leader_saw,
            r.watch_restarts[0],
            r.watch_restarts[1],
            r.session_restarts[0],
            r.session_restarts[1],
        );
    }
    if let Some(last) = f.rows.last() {
        let _ = writeln!(
            s,
            "\netcd's database after the last row: {:.0} MB (no compaction configured).",
            last.db_mb
        );
    }
    s.push_str(
        "\n| synthetic summaries | size | leader's `get_summaries`, median of 3 | |\n|---:|---:|---:|---|\n",
    );
    for l in &f.leader_reads {
        let _ = writeln!(
            s,
            "| {} | {:.1} MB | {:.1} ms | {} |",
            l.summaries,
            l.bytes as f64 / 1e6,
            l.median_ms,
            l.error.as_deref().unwrap_or("ok"),
        );
    }
    s
}

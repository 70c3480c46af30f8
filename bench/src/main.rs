//! `canary-bench`: the measurements behind BENCHMARKS.md. Run through
//! `cargo xtask bench`, which installs what it needs and builds in release
//! mode first.

mod agent;
mod e2e;
mod fleet;
mod load;
mod local;
mod machine;
mod packet;
mod reaction;
mod report;
mod sample;
mod udp;

use std::path::PathBuf;

use clap::Parser;

/// Measures canary and writes the results as JSON and Markdown.
#[expect(
    clippy::doc_markdown,
    reason = "doc comments here are the --help text, where backticks would show literally"
)]
#[derive(Parser)]
#[command(about, long_about)]
struct Cli {
    /// Directory for results.json and results.md.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Sections to run (default: all): packet, e2e, local, agent, reaction, udp, fleet.
    #[arg(long, value_delimiter = ',')]
    only: Vec<report::Section>,
    /// Smaller sizes and shorter runs, to check that everything works.
    #[arg(long)]
    quick: bool,
    /// Instead of the benchmark: send this many new-flow SYNs through TC
    /// ingress, one per BPF_PROG_TEST_RUN call, and print the median. Run
    /// under `perf record -g` to profile the new-flow path.
    #[arg(long, value_name = "COUNT")]
    profile_new_flows: Option<u32>,
    /// Internal: run as the local section's client process (started by the
    /// bench itself inside the client cgroup) with this JSON spec.
    #[arg(long, hide = true, value_name = "SPEC")]
    local_client: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(spec) = &cli.local_client {
        return local::client_main(spec);
    }
    if let Some(count) = cli.profile_new_flows {
        let ns = packet::profile_new_flows(count)?;
        println!("new-flow SYN through TC ingress: median {ns:.0} ns over {count}");
        return Ok(());
    }
    let run = |s: report::Section| cli.only.is_empty() || cli.only.contains(&s);
    let mut report = report::Report::new(machine::Machine::detect(), cli.quick);
    if run(report::Section::Packet) {
        let (counts, flows): (&[u32], &[u32]) = if cli.quick {
            (&[1, 1000], &[0, 10_000])
        } else {
            (&[1, 1000, 100_000], &[0, 1_000_000])
        };
        for &n in counts {
            report.packet.extend(packet::measure(n, flows)?);
        }
    }
    if run(report::Section::E2e) {
        let (rounds, secs) = if cli.quick { (1, 1.0) } else { (7, 4.0) };
        let (rows, load) = e2e::measure(rounds, secs)?;
        report.e2e = rows;
        report.agent_load = Some(load);
    }
    if run(report::Section::Local) {
        let (rounds, secs) = if cli.quick { (1, 1.0) } else { (7, 4.0) };
        report.local = Some(local::measure(rounds, secs)?);
    }
    if run(report::Section::Udp) {
        let (rounds, secs) = if cli.quick { (1, 1.0) } else { (5, 3.0) };
        report.udp = udp::measure(rounds, secs)?;
    }
    if run(report::Section::Agent) {
        let (services, traffic, scrapes) = if cli.quick {
            (100, 10, 5)
        } else {
            (1000, 100, 20)
        };
        report.scrape = Some(agent::scrape(services, traffic, scrapes)?);
    }
    if run(report::Section::Reaction) {
        let (breakers, judges) = if cli.quick { (1, 1) } else { (7, 5) };
        report.reactions = Some(reaction::measure(breakers, judges)?);
    }
    if run(report::Section::Fleet) {
        use std::time::Duration;
        let s = Duration::from_secs;
        let plan = if cli.quick {
            fleet::Plan {
                sizes: vec![(20, s(2)), (50, s(1))],
                decisions: 5,
                window: s(4),
                leader_reads: vec![500, 2_000],
            }
        } else {
            fleet::Plan {
                sizes: vec![(100, s(2)), (250, s(2)), (500, s(2)), (500, s(1))],
                decisions: 100,
                window: s(12),
                leader_reads: vec![2_000, 10_000, 20_000],
            }
        };
        report.fleet = Some(fleet::measure(plan)?);
    }
    report.write(&cli.out)?;
    Ok(())
}

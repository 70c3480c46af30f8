//! `canary-bench`: the measurements behind BENCHMARKS.md. Run through
//! `cargo xtask bench`, which installs what it needs and builds in release
//! mode first.

mod machine;
mod packet;
mod report;

use std::path::PathBuf;

use clap::Parser;

/// Measures canary and writes the results as JSON and Markdown.
#[derive(Parser)]
#[command(about, long_about)]
struct Cli {
    /// Directory for results.json and results.md.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Sections to run (default: all): packet, e2e, agent, reaction.
    #[arg(long, value_delimiter = ',')]
    only: Vec<report::Section>,
    /// Smaller sizes and shorter runs, to check that everything works.
    #[arg(long)]
    quick: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    report.write(&cli.out)?;
    Ok(())
}

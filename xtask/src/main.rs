//! `cargo xtask`: the project's commands. Each installs what it needs first.

mod bench;
mod demo;
mod fleet_demo;
mod prereqs;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// canary's build, test and demo commands. They need root (eBPF and network
/// namespaces) and install their own prerequisites.
#[derive(Parser)]
#[command(about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[expect(
    clippy::doc_markdown,
    reason = "doc comments here are the --help text, where backticks would show literally"
)]
#[derive(Subcommand)]
enum Cmd {
    /// Install the prerequisites (idempotent): rust-src for nightly, clippy
    /// for stable, bpf-linker 0.10.4, the Debian packages the tests use, and
    /// kubernetes-validate and yamllint (PyPI) in a venv at target/py.
    Prereqs,
    /// Build everything, run clippy (warnings fail) and every test: unit
    /// tests, packet fixtures through BPF_PROG_TEST_RUN, and
    /// network-namespace integration with the real agent. Arguments after `--` go to the test binaries (e.g. a
    /// test-name filter).
    Test {
        /// Passed to the test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the demo lab: a client, two stable backends and one canary backend
    /// in network namespaces, the real agent running a rollout plan
    /// (1 → 5 → 25 → 50 → 100 %) judged live, progress and verdicts printed
    /// every second (--scenario bad-canary: the canary breaks mid-rollout
    /// and is rolled back; --weight: a fixed split; --fleet: three nodes
    /// and etcd). Ctrl-C stops it and removes the lab.
    Demo(demo::Args),
    /// Run the benchmarks (about 11 minutes on 2 cores) and write
    /// target/bench/results.{json,md}: per-packet cost through
    /// BPF_PROG_TEST_RUN next to empty programs; end to end in network
    /// namespaces against direct routing, iptables and HAProxy; a client
    /// on the node itself, socket LB against iptables and direct; the agent's
    /// CPU, memory and scrape time; breaker and judge reaction times; up to
    /// 500 simulated fleet nodes against a 3-member etcd.
    /// Installs iptables and HAProxy. Arguments after `--` go to
    /// canary-bench (e.g. `-- --quick` or `-- --only packet,e2e`).
    Bench {
        /// Passed to canary-bench.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Prereqs => require_root().and_then(|()| prereqs::ensure()),
        Cmd::Test { args } => test::run(&args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench { args } => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Where cargo puts build output.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// eBPF and network namespaces need root; say so before doing anything.
fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this command loads eBPF programs and creates network namespaces: run it as root (sudo -E cargo xtask ...)"
        );
    }
    Ok(())
}

/// Runs `cmd`, failing with the command line if it fails.
fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// `cargo` with the workspace as working directory.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

/// Builds the agent (and with it the eBPF object); returns the binary.
fn build_agent() -> anyhow::Result<PathBuf> {
    exec(cargo().args(["build", "--package", "canary-agent", "--bins"]))?;
    Ok(target_dir().join("debug/canary-agent"))
}

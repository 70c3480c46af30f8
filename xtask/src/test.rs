//! `cargo xtask test`: every layer of tests, in one cargo invocation.

use crate::{build_agent, cargo, exec, prereqs, require_root};

/// Installs prerequisites, builds the agent, runs all tests.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    prereqs::ensure()?;
    let agent = build_agent()?;
    exec(
        cargo()
            // Every layer reports even when an earlier one fails.
            .args([
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "canary-ebpf",
                "--",
            ])
            // The namespace tests measure timing-sensitive behaviour (long-lived
            // connections pinging every 10 ms); on two cores they run one at a
            // time.
            .arg("--test-threads=1")
            .args(args)
            .env("CANARY_AGENT_BIN", agent),
    )
}

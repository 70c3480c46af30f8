//! `cargo xtask bench`: release builds, then canary-bench.

use crate::{cargo, exec, prereqs, require_root, target_dir, workspace};

/// Installs prerequisites (iptables and HAProxy too), builds the agent,
/// canaryctl and canary-bench in release mode, and runs the benchmarks.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    prereqs::ensure_with(prereqs::BENCH_DEBIAN)?;
    exec(cargo().args([
        "build",
        "--release",
        "--package",
        "canary-agent",
        "--bins",
        "--package",
        "canary-bench",
    ]))?;
    let release = target_dir().join("release");
    let out = target_dir().join("bench");
    exec(
        std::process::Command::new(release.join("canary-bench"))
            .current_dir(workspace())
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("CANARY_AGENT_BIN", release.join("canary-agent")),
    )?;
    eprintln!(
        "xtask: results in {}/results.md (and .json); BENCHMARKS.md explains them",
        out.display()
    );
    Ok(())
}

//! `cargo xtask test`: every layer of tests, in one cargo invocation.

use crate::{build_agent, cargo, exec, prereqs, require_root};

/// Installs prerequisites, builds the agent, runs clippy, runs all tests.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    prereqs::ensure()?;
    let agent = build_agent()?;
    clippy()?;
    let variant = build_upgrade_variant()?;
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
            .env("CANARY_AGENT_BIN", agent)
            .env(UPGRADE_VARIANT_ENV, variant),
    )
}

/// Clippy over every host crate and target under the workspace lints
/// (Cargo.toml); any warning fails the run. canary-ebpf is left out: its
/// code only exists for the BPF target.
fn clippy() -> anyhow::Result<()> {
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "canary-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .map_err(|e| e.context("clippy found warnings (workspace lints in Cargo.toml)"))
}

/// Where the tests find the upgrade-test object.
const UPGRADE_VARIANT_ENV: &str = "CANARY_EBPF_UPGRADE_TEST";

/// Builds the eBPF programs with the `upgrade-test` feature (same
/// behaviour, different code) the way the agent's build script builds the
/// real ones, in a target directory of its own; returns the object. The
/// lifecycle test upgrades a running data plane to it.
fn build_upgrade_variant() -> anyhow::Result<std::path::PathBuf> {
    let target_dir = crate::target_dir().join("ebpf-upgrade-test");
    let mut cmd = std::process::Command::new("rustup");
    cmd.current_dir(crate::workspace())
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "canary-ebpf",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--features", "upgrade-test", "--target-dir"])
        .arg(&target_dir)
        // As aya-build sets them for the real build.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
                std::env::consts::ARCH
            ),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    exec(&mut cmd)
        .map_err(|e| e.context("building the upgrade-test variant of the eBPF programs"))?;
    Ok(target_dir.join("bpfel-unknown-none/release/canary"))
}

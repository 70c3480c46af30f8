//! Prerequisites, installed idempotently: each is checked first and only
//! installed when missing, so a second run costs seconds.

use std::process::Command;

use anyhow::Context;

use crate::exec;

/// The bpf-linker version that matches the nightly's LLVM (see shared/DESIGN.md).
const BPF_LINKER: &str = "0.10.4";

/// Commands the tests and the demo run, and the Debian package of each.
/// prometheus/promtool: the telemetry tests lint the exposition and scrape
/// the agent with a real server (inside a test namespace, loopback only).
/// etcd/etcdctl: the fleet tests run a real etcd cluster in a namespace;
/// openssl makes its TLS certificates; protoc builds the `etcd-client`
/// crate's gRPC code.
const DEBIAN: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("openssl", "openssl"),
    // htpasswd hashes the test Prometheus's basic-auth password (bcrypt).
    ("htpasswd", "apache2-utils"),
    ("protoc", "protobuf-compiler"),
    // The deploy test: `systemd-analyze verify` on deploy/systemd, and the
    // Python tools below.
    ("systemd-analyze", "systemd"),
    ("python3", "python3"),
];

/// Python tools the deploy test runs, pinned, in a venv at
/// [`python_venv`] (tests/tests/deploy.rs looks for them there):
/// offline Kubernetes schema validation and a YAML linter.
const PYPI: &[(&str, &str)] = &[("kubernetes-validate", "1.37.0"), ("yamllint", "1.38.0")];

/// What the benchmark compares canary with, beyond what the tests need.
pub const BENCH_DEBIAN: &[(&str, &str)] = &[("iptables", "iptables"), ("haproxy", "haproxy")];

/// Installs whatever the tests and the demo need and is missing.
pub fn ensure() -> anyhow::Result<()> {
    ensure_with(&[])
}

/// As [`ensure`], plus the Debian packages `extra` (command, package).
pub fn ensure_with(extra: &[(&str, &str)]) -> anyhow::Result<()> {
    // rustup skips the download when the component is present.
    exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("rust-src for the nightly toolchain (builds core for the BPF target)")?;
    exec(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "stable"]))
        .context("clippy for the stable toolchain (`cargo xtask test` lints the workspace)")?;

    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if installed.as_deref() != Some(&format!("bpf-linker {BPF_LINKER}")) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER} (found: {installed:?})");
        exec(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
            "--force",
        ]))
        .context("installing bpf-linker")?;
    }

    let mut missing: Vec<&str> = DEBIAN
        .iter()
        .chain(extra)
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages {missing:?}");
        exec(Command::new("apt-get").arg("update").arg("-q")).context("apt-get update")?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("apt-get install")?;
    }
    ensure_python_tools()
}

/// The venv that holds [`PYPI`]: `target/py` (the deploy test finds it
/// the same way: `$CARGO_TARGET_DIR/py`, else the workspace's `target/py`).
fn python_venv() -> std::path::PathBuf {
    crate::target_dir().join("py")
}

/// Creates the venv if missing (installing Debian's `python3-venv` if
/// `python3 -m venv` cannot work) and installs [`PYPI`] with the venv's
/// own pip unless those exact versions are already there.
fn ensure_python_tools() -> anyhow::Result<()> {
    let venv = python_venv();
    let python = venv.join("bin/python");
    if !python.is_file() {
        let has_venv = Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_venv {
            eprintln!("xtask: installing Debian package python3-venv");
            exec(Command::new("apt-get").arg("update").arg("-q")).context("apt-get update")?;
            exec(
                Command::new("apt-get")
                    .args([
                        "install",
                        "-y",
                        "-q",
                        "--no-install-recommends",
                        "python3-venv",
                    ])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
            .context("apt-get install python3-venv")?;
        }
        exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .with_context(|| format!("creating the Python venv {}", venv.display()))?;
    }
    let wanted: Vec<String> = PYPI.iter().map(|(p, v)| format!("{p}=={v}")).collect();
    // Prints one `name==version` line per package, `name missing` if absent.
    let probe = r"
import sys, importlib.metadata as m
for p in sys.argv[1:]:
    try:
        print(p + '==' + m.version(p))
    except m.PackageNotFoundError:
        print(p + ' missing')
";
    let found = Command::new(&python)
        .args(["-c", probe])
        .args(PYPI.iter().map(|(p, _)| p))
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let found = String::from_utf8_lossy(&found.stdout);
    if found.lines().collect::<Vec<_>>() != wanted {
        eprintln!("xtask: installing {wanted:?} into {}", venv.display());
        exec(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(&wanted),
        )
        .context("pip install of the deploy test's Python tools")?;
    }
    Ok(())
}

/// Whether `cmd` is an executable on PATH (or in /sbin, /usr/sbin, which a
/// non-login root shell may lack).
fn on_path(cmd: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(cmd).is_file())
}

//! `canary-agent`: the per-node daemon.
#![expect(
    unused_crate_dependencies,
    reason = "a thin binary over the canary_agent library, which uses the rest of the package's dependencies"
)]

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use canary_agent::{
    daemon::{self, Options},
    error_chain,
};
use clap::Parser;

/// canary's node agent: steers a weighted share of new TCP connections for
/// each service VIP to its canary backends, in the kernel (eBPF TC programs
/// on the client-facing interfaces), and keeps every established connection
/// where it is.
///
/// The data plane outlives the agent: maps and links are pinned under
/// `[agent] bpffs_dir`, so a stop, crash or upgrade leaves steering,
/// conntrack, counting and the breaker running with the last weights, and
/// the next agent adopts them. `canary-agent uninstall` removes it all.
///
/// With a [fleet] section, every rollout is shared with the other nodes
/// through etcd: any node's breaker or judge rollback, and any canaryctl
/// command on any node, applies on all of them within milliseconds; one
/// elected node moves plans on. etcd down leaves every node at its last
/// weights (fail static).
///
/// Signals: SIGHUP re-reads the config and applies it all or nothing (a bad
/// config is rejected and the running one stays); SIGINT or SIGTERM stop
/// the agent (the data plane stays unless --detach-on-exit). Needs root (or
/// CAP_BPF + CAP_NET_ADMIN) and Linux >= 6.6 (TCX).
#[expect(
    clippy::doc_markdown,
    reason = "doc comments here are the --help text, where backticks would show literally"
)]
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,

    /// Path of the TOML config (see the README's config reference).
    #[arg(
        long,
        short,
        value_name = "PATH",
        default_value = "/etc/canary/agent.toml"
    )]
    config: PathBuf,

    /// Client-facing interface to attach to (repeatable), as NAME or
    /// NAME:MODE with MODE `tc` (default) or `xdp` (e.g. `eth0:xdp`);
    /// replaces `[agent] interfaces` from the config file.
    #[arg(long = "interface", short, value_name = "IFACE[:MODE]")]
    interfaces: Vec<String>,

    /// Only validate the config (including that the interfaces exist) and
    /// exit: 0 if valid, 1 with the error if not. Touches nothing.
    #[arg(long)]
    check: bool,

    /// On SIGINT/SIGTERM, detach from every interface and remove the pinned
    /// maps and links, so the data plane ends with the agent (for labs and
    /// tests; in production leave it off so restarts break nothing).
    #[arg(long)]
    detach_on_exit: bool,

    /// This node's name in the fleet; replaces `[fleet] node` (e.g. the
    /// Kubernetes node name from the downward API). Needs a [fleet] section.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,

    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Remove the data plane: detach every pinned link (traffic to the VIPs
    /// is no longer steered; established connections through them break)
    /// and remove every pinned map. Stop the agent first. The directory is
    /// `--bpffs-dir`, else `[agent] bpffs_dir` of --config, else
    /// /sys/fs/bpf/canary.
    Uninstall {
        /// The bpffs directory to clean.
        #[arg(long, value_name = "DIR")]
        bpffs_dir: Option<PathBuf>,
    },
}

/// Makes every panic abort the agent, after logging it.
///
/// A hook rather than `panic = "abort"` in a Cargo profile: profiles apply
/// to the whole workspace (xtask, the lab, the benchmark and its threads
/// would abort too), cannot be set per package, and `cargo test` builds
/// with unwinding anyway. The hook runs before any unwinding, in every
/// thread, so a panic inside a tokio task no longer ends just that task
/// (tokio would catch it and the task would be silently gone): the process
/// stops, its supervisor (systemd, the DaemonSet) restarts it, and a
/// pinned data plane keeps steering meanwhile.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        tracing::error!(panic = %info, "canary-agent panicked; aborting");
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    abort_on_panic();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("canary-agent: --log {:?}: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    if let Some(Sub::Uninstall { bpffs_dir }) = &cli.command {
        return uninstall(bpffs_dir.as_deref(), &cli.config, &cli.interfaces);
    }

    if cli.check {
        return match canary_agent::config::Config::load(&cli.config, &cli.interfaces)
            .and_then(|c| c.with_node(cli.node.as_deref()))
        {
            Ok(c) => {
                println!(
                    "{}: valid ({} services)",
                    cli.config.display(),
                    c.services.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("canary-agent: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }

    match canary_agent::sys::raise_nofile_limit() {
        Ok((from, to)) if to > from => tracing::info!(from, to, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("canary-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        config: cli.config,
        interfaces: cli.interfaces,
        detach_on_exit: cli.detach_on_exit,
        node: cli.node,
    };
    match runtime.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            eprintln!("canary-agent: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `canary-agent uninstall`: removes the pins under the chosen directory.
fn uninstall(flag: Option<&Path>, config: &Path, interfaces: &[String]) -> ExitCode {
    let dir = match flag {
        Some(dir) => dir.to_path_buf(),
        None if !config.exists() => PathBuf::from(canary_agent::config::DEFAULT_BPFFS_DIR),
        None => match canary_agent::config::Config::load(config, interfaces) {
            Ok(c) => c.agent.bpffs_dir,
            Err(e) => {
                eprintln!(
                    "canary-agent: uninstall: cannot tell the bpffs directory from {}: {}; pass --bpffs-dir DIR",
                    config.display(),
                    error_chain(&e)
                );
                return ExitCode::FAILURE;
            }
        },
    };
    // Never from under a running agent: it holds the directory's lock
    // (kept until this ends, so no agent starts on it meanwhile).
    let _lock = match canary_agent::sys::try_lock_dir(&dir) {
        Ok(Some(lock)) => Some(lock),
        Ok(None) => {
            eprintln!(
                "canary-agent: uninstall {}: a canary-agent is running on it (it holds the directory's lock); stop it first (systemctl stop canary-agent, or delete the node's pod), nothing was removed",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
        // Nothing there: nothing to uninstall, said below.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            eprintln!(
                "canary-agent: uninstall {}: cannot lock it: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match canary_agent::dataplane::pins::Pins::uninstall(&dir) {
        Ok(0) => {
            println!("{}: nothing pinned there", dir.display());
            ExitCode::SUCCESS
        }
        Ok(n) => {
            println!(
                "{}: removed {n} pins; the data plane is detached and its maps are freed",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("canary-agent: uninstall {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

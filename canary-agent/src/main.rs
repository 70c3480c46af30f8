//! `canary-agent`: the per-node daemon.

use std::{path::PathBuf, process::ExitCode};

use canary_agent::{
    agent::{self, Options},
    dataplane::error_chain,
};
use clap::Parser;

/// canary's node agent: steers a weighted share of new TCP connections for
/// each service VIP to its canary backends, in the kernel (eBPF TC programs
/// on the client-facing interfaces), and keeps every established connection
/// where it is.
///
/// Signals: SIGHUP re-reads the config and applies it all or nothing (a bad
/// config is rejected and the running one stays); SIGINT or SIGTERM detach
/// from every interface and exit. Needs root (or CAP_BPF + CAP_NET_ADMIN)
/// and Linux >= 6.6 (TCX).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
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

    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
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
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    if cli.check {
        return match canary_agent::config::Config::load(&cli.config, &cli.interfaces) {
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
    };
    match runtime.block_on(agent::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            eprintln!("canary-agent: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

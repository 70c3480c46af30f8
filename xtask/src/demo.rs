//! `cargo xtask demo`: the whole system on one machine, live.
//!
//! Builds a lab (client, router, stable-1, stable-2, canary-1 namespaces),
//! runs the real agent in the router on a built-in config, drives a bounded
//! rate of one-request connections to the VIP from the client namespace,
//! and prints which backend answered, second by second.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use canary_lab::{AgentProcess, BackendSpec, Behavior, Lab, LabSpec, request_once};

use crate::{build_agent, prereqs, require_root};

/// The service VIP the demo clients connect to.
pub(crate) const VIP: &str = "10.96.0.10:80";

/// Options of the demo.
#[derive(clap::Args)]
pub struct Args {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) duration: Option<u64>,
    /// Canary weight: "5%", "0.25%" or "2500ppm".
    #[arg(long, default_value = "5%")]
    weight: String,
    /// New connections per second the clients open (bounded: 1 to 2000).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub(crate) rate: u32,
    /// Cohort mode: "per-connection" (each connection draws) or "sticky"
    /// (each of the 256 client addresses stays in its cohort).
    #[arg(long, default_value = "per-connection")]
    cohort: String,
    /// Three nodes sharing one rollout through a real etcd cluster: a
    /// plan 1 → 5 → 25 → 50 → 100 % in lockstep on every node, driven by
    /// `canaryctl` on any of them (--weight and --cohort do not apply).
    #[arg(long)]
    fleet: bool,
    /// With --fleet: seconds each plan step holds.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) hold: u64,
}

pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the demo until `--duration` or Ctrl-C; always removes the lab.
pub fn run(args: &Args) -> anyhow::Result<()> {
    require_root()?;
    prereqs::ensure()?;
    build_agent()?;
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
    if args.fleet {
        return crate::fleet_demo::run(args);
    }

    println!("building the lab: client, router, stable-1, stable-2, canary-1 (network namespaces)");
    let lab = Lab::build(&LabSpec {
        backends: ["stable-1", "stable-2", "canary-1"]
            .iter()
            .map(|n| BackendSpec {
                name: n.to_string(),
                behavior: Behavior::Reply,
            })
            .collect(),
        n_client_addrs: 256,
        n_client_addrs6: 0,
    })?;
    let config = format!(
        "[agent]\ninterfaces = [\"{iface}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{s1}\", \"{s2}\"]\ncanary = [\"{c1}\"]\nweight = \"{w}\"\ncohort = \"{cohort}\"\n",
        iface = Lab::ROUTER_CLIENT_IFACE,
        s1 = lab.backend_addr(0),
        s2 = lab.backend_addr(1),
        c1 = lab.backend_addr(2),
        w = args.weight,
        cohort = args.cohort,
    );
    println!("agent config:\n{}", indent(&config));
    let agent = AgentProcess::start(lab.router(), &config, true).context("starting the agent")?;
    println!(
        "\nper-cohort metrics, from another terminal:\n    ip netns exec {} curl -s 127.0.0.1:9477/metrics | grep 'service=\"web\"'",
        lab.router().name()
    );
    let weight = weight_fraction(&args.weight)?;

    let result = drive(&lab, args, weight);
    STOP.store(true, Ordering::SeqCst);
    let stopped = agent.stop();
    drop(lab);
    println!("lab removed");
    let (status, _) = stopped?;
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    result
}

/// Per-backend reply counts and errors, shared by the client threads.
#[derive(Default)]
struct Tally {
    by_backend: Mutex<BTreeMap<String, u64>>,
    errors: AtomicU64,
}

fn drive(lab: &Lab, args: &Args, weight: f64) -> anyhow::Result<()> {
    const WORKERS: u32 = 4;
    let vip: SocketAddrV4 = VIP.parse()?;
    let tally = Arc::new(Tally::default());
    let addrs: Arc<Vec<Ipv4Addr>> = Arc::new(lab.client_addrs().to_vec());
    let per_worker = Duration::from_secs_f64(f64::from(WORKERS) / f64::from(args.rate));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (tally, addrs) = (Arc::clone(&tally), Arc::clone(&addrs));
            lab.client().spawn(move || {
                let mut next = Instant::now();
                let mut i = w as usize;
                while !STOP.load(Ordering::Relaxed) {
                    let src = addrs[i % addrs.len()];
                    i += WORKERS as usize;
                    match request_once(src, vip, Duration::from_secs(2)) {
                        Ok(name) => {
                            *tally
                                .by_backend
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .entry(name)
                                .or_default() += 1;
                        }
                        Err(_) => {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    next += per_worker;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        })
        .collect();

    println!(
        "\ndriving {} new connections/s to {VIP} from {} client addresses; Ctrl-C stops\n",
        args.rate,
        lab.client_addrs().len()
    );
    let start = Instant::now();
    let mut tick = start;
    loop {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        println!("{}", status_line(start.elapsed(), &tally, weight));
        if args
            .duration
            .is_some_and(|d| start.elapsed() >= Duration::from_secs(d))
        {
            break;
        }
    }
    STOP.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    println!("\nfinal: {}", status_line(start.elapsed(), &tally, weight));
    Ok(())
}

/// One line: counts per backend, the canary share and where it should be.
fn status_line(elapsed: Duration, tally: &Tally, weight: f64) -> String {
    let by = tally
        .by_backend
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let total: u64 = by.values().sum();
    let canary: u64 = by
        .iter()
        .filter(|(n, _)| n.starts_with("canary"))
        .map(|(_, c)| c)
        .sum();
    let counts: Vec<String> = by.iter().map(|(n, c)| format!("{n}={c}")).collect();
    let share = if total == 0 {
        0.0
    } else {
        canary as f64 / total as f64
    };
    // 99.9 % binomial interval around the target for this many connections.
    let half = 3.29 * (weight * (1.0 - weight) / total.max(1) as f64).sqrt();
    format!(
        "t={:>4}s  connections={total:<7} {}  canary share {:.2}% (target {:.2}%, 99.9% interval {:.2}–{:.2}%)  errors={}",
        elapsed.as_secs(),
        counts.join(" "),
        share * 100.0,
        weight * 100.0,
        (weight - half).max(0.0) * 100.0,
        (weight + half).min(1.0) * 100.0,
        tally.errors.load(Ordering::Relaxed)
    )
}

/// "5%" → 0.05, "2500ppm" → 0.0025 (the agent validates the exact syntax).
fn weight_fraction(w: &str) -> anyhow::Result<f64> {
    let w = w.trim();
    let parsed = if let Some(p) = w.strip_suffix('%') {
        p.trim().parse::<f64>().map(|v| v / 100.0)
    } else if let Some(p) = w.strip_suffix("ppm") {
        p.trim().parse::<f64>().map(|v| v / 1e6)
    } else {
        bail!("--weight {w:?}: write it like \"5%\", \"0.25%\" or \"2500ppm\"");
    };
    parsed
        .with_context(|| format!("--weight {w:?}: write it like \"5%\", \"0.25%\" or \"2500ppm\""))
}

pub(crate) fn indent(text: &str) -> String {
    text.lines().flat_map(|l| ["    ", l, "\n"]).collect()
}

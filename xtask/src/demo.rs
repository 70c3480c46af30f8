//! `cargo xtask demo`: the whole system on one machine, live.
//!
//! Builds a lab (client, router, stable-1, stable-2, canary-1 namespaces),
//! runs the real agent in the router on a built-in config, drives a bounded
//! rate of one-request connections to the VIP from the client namespace,
//! and prints, second by second, which backend answered and where the
//! rollout is: a plan 1 → 5 → 25 → 50 → 100 % judged live (the default),
//! with `--scenario bad-canary` a canary that breaks mid-rollout and is
//! rolled back, or with `--weight` a fixed split.

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
    /// A fixed canary weight ("5%", "0.25%" or "2500ppm") instead of the
    /// rollout plan.
    #[arg(long)]
    weight: Option<String>,
    /// What happens to the rollout: `healthy` (the plan runs to
    /// promotion) or `bad-canary` (the canary backend stops answering once
    /// the plan reaches 25 %: the breaker rolls it back).
    #[arg(long, default_value = "healthy", value_parser = ["healthy", "bad-canary"])]
    scenario: String,
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
    /// Seconds each plan step holds (at least; the judge must pass too).
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
    let rollout = match &args.weight {
        Some(w) => format!("weight = \"{w}\"\n"),
        None => format!(
            "release = \"v2\"\n[service.rollout]\ninterval = \"1s\"\nsteps = [{{ weight = \"1%\", hold = \"{h}s\" }}, \
             {{ weight = \"5%\", hold = \"{h}s\" }}, {{ weight = \"25%\", hold = \"{h}s\" }}, {{ weight = \"50%\", hold = \"{h}s\" }}, \
             {{ weight = \"100%\" }}]\n",
            h = args.hold
        ),
    };
    let config = format!(
        "[agent]\ninterfaces = [\"{iface}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{s1}\", \"{s2}\"]\ncanary = [\"{c1}\"]\ncohort = \"{cohort}\"\n{rollout}",
        iface = Lab::ROUTER_CLIENT_IFACE,
        s1 = lab.backend_addr(0),
        s2 = lab.backend_addr(1),
        c1 = lab.backend_addr(2),
        cohort = args.cohort,
    );
    println!("agent config:\n{}", indent(&config));
    let agent = AgentProcess::start(lab.router(), &config, true).context("starting the agent")?;
    println!(
        "\nper-cohort metrics, from another terminal:\n    ip netns exec {} curl -s 127.0.0.1:9477/metrics | grep 'service=\"web\"'",
        lab.router().name()
    );
    let weight = args.weight.as_deref().map(weight_fraction).transpose()?;
    println!(
        "\nwhile it runs, from another terminal:\n    canaryctl --socket {sock} status --watch\n    canaryctl --socket {sock} explain web\n    canaryctl --socket {sock} rollback web",
        sock = agent.control_socket().display()
    );

    let mut lab = lab;
    let result = drive(&mut lab, &agent, args, weight);
    if weight.is_none() {
        print_history(&agent);
    }
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

impl Tally {
    /// Replies per backend, all of them, and canary's.
    fn totals(&self) -> (BTreeMap<String, u64>, u64, u64) {
        let by = self
            .by_backend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let total = by.values().sum();
        let canary = by
            .iter()
            .filter(|(n, _)| n.starts_with("canary"))
            .map(|(_, c)| c)
            .sum();
        (by, total, canary)
    }
}

/// A client thread's loop: one-request connections to `vip` from
/// `addrs[first]`, `addrs[first + step]`, … one every `pace`, until the
/// demo stops; each reply (the backend's name) or error goes to `on`.
pub(crate) fn paced(
    addrs: Vec<Ipv4Addr>,
    first: usize,
    step: usize,
    vip: SocketAddrV4,
    pace: Duration,
    on: impl Fn(std::io::Result<String>) + Send + 'static,
) -> impl FnOnce() + Send + 'static {
    move || {
        let mut next = Instant::now();
        let mut i = first;
        while !STOP.load(Ordering::Relaxed) {
            on(request_once(
                addrs[i % addrs.len()],
                vip,
                Duration::from_secs(2),
            ));
            i += step;
            next += pace;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Whether a demo's loop ends now: 3 s after the rollout is `done`
/// (promoted or rolled back; `settled` remembers since when), or at
/// `--duration`.
pub(crate) fn ends(
    settled: &mut Option<Instant>,
    done: bool,
    start: Instant,
    duration: Option<u64>,
) -> bool {
    if done && settled.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(3) {
        return true;
    }
    duration.is_some_and(|d| start.elapsed() >= Duration::from_secs(d))
}

/// `canaryctl --socket (agent's) ARGS`, its output if it ran.
pub(crate) fn canaryctl(agent: &AgentProcess, args: &[&str]) -> Option<std::process::Output> {
    std::process::Command::new(canary_lab::canaryctl_binary())
        .arg("--socket")
        .arg(agent.control_socket())
        .args(args)
        .output()
        .ok()
}

fn drive(
    lab: &mut Lab,
    agent: &AgentProcess,
    args: &Args,
    weight: Option<f64>,
) -> anyhow::Result<()> {
    const WORKERS: u32 = 4;
    let vip: SocketAddrV4 = VIP.parse()?;
    let tally = Arc::new(Tally::default());
    let addrs: Arc<Vec<Ipv4Addr>> = Arc::new(lab.client_addrs().to_vec());
    let per_worker = Duration::from_secs_f64(f64::from(WORKERS) / f64::from(args.rate));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (tally, addrs) = (Arc::clone(&tally), Arc::clone(&addrs));
            lab.client().spawn(paced(
                (*addrs).clone(),
                w as usize,
                WORKERS as usize,
                vip,
                per_worker,
                move |reply| match reply {
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
                },
            ))
        })
        .collect();

    println!(
        "\ndriving {} new connections/s to {VIP} from {} client addresses; Ctrl-C stops\n",
        args.rate,
        lab.client_addrs().len()
    );
    let start = Instant::now();
    let mut tick = start;
    let mut broken = false;
    let mut settled: Option<Instant> = None;
    let mut last = (0u64, 0u64);
    loop {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let mut done = false;
        if let Some(w) = weight {
            println!("{}", status_line(start.elapsed(), &tally, w));
        } else {
            let (line, state, weight_now) = rollout_line(start.elapsed(), agent, &tally, &mut last);
            println!("{line}");
            if args.scenario == "bad-canary" && !broken && weight_now == "25%" {
                broken = true;
                lab.stop_backend(2);
                println!(
                    "\n>>> scenario bad-canary: canary-1 stops answering (connections refused)\n"
                );
            }
            done = state == "promoted" || state == "rolled-back";
        }
        if ends(&mut settled, done, start, args.duration) {
            break;
        }
    }
    STOP.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    if let Some(w) = weight {
        println!("\nfinal: {}", status_line(start.elapsed(), &tally, w));
    }
    Ok(())
}

/// One second of a plan-driven rollout: step, weight, the canary share
/// of that second's connections, and the last verdict. Also the state and
/// the weight in force.
fn rollout_line(
    elapsed: Duration,
    agent: &AgentProcess,
    tally: &Tally,
    last: &mut (u64, u64),
) -> (String, String, String) {
    let status = canaryctl(agent, &["status", "--json", "web"])
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .unwrap_or_default();
    let svc = &status["services"][0];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let (state, weight) = (text(&svc["state"]), text(&svc["effective_weight"]));
    let plan = &svc["plan"];
    let bar: String = match (plan["step"].as_u64(), plan["steps"].as_u64()) {
        (Some(step), Some(steps)) => (1..=steps)
            .map(|i| if i <= step { '■' } else { '□' })
            .collect(),
        _ => String::new(),
    };
    let (_, total, canary) = tally.totals();
    let (dt, dc) = (total - last.0, canary - last.1);
    *last = (total, canary);
    let share = if dt == 0 {
        0.0
    } else {
        dc as f64 * 100.0 / dt as f64
    };
    let verdict = svc["last_verdict"].as_str().unwrap_or("-");
    let verdict: String = verdict.chars().take(110).collect();
    (
        format!(
            "t={:>3}s  {state:<17} [{bar}] {weight:>4}  canary {share:>5.1}% of {dt:>3}/s  errors {:<4} {verdict}",
            elapsed.as_secs(),
            tally.errors.load(Ordering::Relaxed)
        ),
        state,
        weight,
    )
}

/// `canaryctl history web`, at the end of a plan-driven demo.
fn print_history(agent: &AgentProcess) {
    if let Some(out) = canaryctl(agent, &["history", "web"]) {
        println!(
            "\ncanaryctl history web:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// One line: counts per backend, the canary share and where it should be.
fn status_line(elapsed: Duration, tally: &Tally, weight: f64) -> String {
    let (by, total, canary) = tally.totals();
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

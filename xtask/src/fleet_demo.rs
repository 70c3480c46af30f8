//! `cargo xtask demo --fleet`: three nodes, one rollout.
//!
//! Starts a real three-member etcd cluster and a fleet lab (three router
//! namespaces, each with its own clients, sharing stable-1 and canary-1),
//! one real agent per node with a `[fleet]` section and a rollout plan
//! (1 → 5 → 25 → 50 → 100 %), drives a bounded rate of connections on every
//! node, and prints each node's state and observed canary share every
//! second, with the `canaryctl` commands to try on any node.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use canary_lab::{AgentProcess, Behavior, FleetLab};
use canary_tests::etcd::EtcdCluster;

use crate::demo::{Args, STOP, VIP, canaryctl, ends, indent, paced};

/// Per node: replies from stable and from canary, and errors.
#[derive(Default)]
struct Tally {
    stable: AtomicU64,
    canary: AtomicU64,
    errors: AtomicU64,
}

/// Runs the fleet demo until `--duration`, Ctrl-C, or a few seconds after
/// every node is promoted or rolled back; always removes what it built.
pub fn run(args: &Args) -> anyhow::Result<()> {
    println!(
        "starting a 3-member etcd cluster and 3 nodes (router + client namespaces) sharing stable-1 and canary-1"
    );
    let etcd = EtcdCluster::start(3, false);
    let lab = canary_tests::fleet(
        3,
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        64,
        &etcd,
    );
    let hold = args.hold;
    let config = |node: &canary_lab::FleetNode| {
        format!(
            "[agent]\ninterfaces = [\"{}\"]\n\n{}summary_interval = \"1s\"\n\n[[service]]\nname = \"web\"\n\
             vip = \"{VIP}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\ncohort = \"per-connection\"\nrelease = \"v2\"\n\
             [service.rollout]\nsteps = [{{ weight = \"1%\", hold = \"{hold}s\" }}, {{ weight = \"5%\", hold = \"{hold}s\" }}, \
             {{ weight = \"25%\", hold = \"{hold}s\" }}, {{ weight = \"50%\", hold = \"{hold}s\" }}, {{ weight = \"100%\" }}]\n",
            node.iface(),
            etcd.fleet_section(&format!("node-{}", node.index()), "/canary"),
            lab.backend_addr(0),
            lab.backend_addr(1),
        )
    };
    println!("agent config (node-0):\n{}", indent(&config(lab.node(0))));
    let agents = canary_tests::start_fleet_agents(&lab, config);
    println!("\nact on the fleet from any node while it runs, e.g.:");
    for (k, verb) in ["pause", "rollback", "resume"].iter().enumerate() {
        println!(
            "    canaryctl --socket {} {verb} web     # on node-{k}",
            agents[k].control_socket().display()
        );
    }
    println!(
        "    canaryctl --socket {} status         # the fleet, one row per node",
        agents[2].control_socket().display()
    );
    let result = drive(&lab, &agents, args);
    STOP.store(true, Ordering::SeqCst);
    for agent in agents {
        let _ = agent.stop();
    }
    drop(lab);
    drop(etcd);
    println!("fleet, agents and etcd removed");
    result
}

fn drive(lab: &FleetLab, agents: &[AgentProcess], args: &Args) -> anyhow::Result<()> {
    let vip: SocketAddrV4 = VIP.parse()?;
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
    // One worker per node at a third of the rate each.
    let pace = Duration::from_secs_f64(3.0 / f64::from(args.rate));
    let workers: Vec<_> = lab
        .nodes()
        .iter()
        .zip(&tallies)
        .map(|(node, tally)| {
            let (tally, addrs) = (Arc::clone(tally), node.client_addrs().to_vec());
            node.client()
                .spawn(paced(addrs, 0, 1, vip, pace, move |reply| {
                    match reply {
                        Ok(name) if name.starts_with("canary") => &tally.canary,
                        Ok(_) => &tally.stable,
                        Err(_) => &tally.errors,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }))
        })
        .collect();
    let start = Instant::now();
    let mut settled: Option<Instant> = None;
    let mut last = [(0u64, 0u64); 3];
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let mut line = format!("t={:>3}s", start.elapsed().as_secs());
        let mut done = true;
        for (k, agent) in agents.iter().enumerate() {
            let (state, weight) = state(agent).unwrap_or_else(|e| ("?".into(), e.to_string()));
            done &= state == "promoted" || state == "rolled-back";
            let (s, c) = (
                tallies[k].stable.load(Ordering::Relaxed),
                tallies[k].canary.load(Ordering::Relaxed),
            );
            let (ds, dc) = (s - last[k].0, c - last[k].1);
            last[k] = (s, c);
            let share = if ds + dc == 0 {
                0.0
            } else {
                dc as f64 * 100.0 / (ds + dc) as f64
            };
            line.push_str(&format!(
                " | node-{k} {state:<17} {weight:>5} canary {share:>5.1}% of {:>3}/s err {}",
                ds + dc,
                tallies[k].errors.load(Ordering::Relaxed)
            ));
        }
        println!("{line}");
        if ends(&mut settled, done, start, args.duration) {
            break;
        }
    }
    STOP.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let leader_view = canaryctl(&agents[0], &["status"]).context("canaryctl status")?;
    println!(
        "\nfinal status on node-0:\n{}",
        String::from_utf8_lossy(&leader_view.stdout)
    );
    Ok(())
}

/// An agent's (state, weight in force) of `web`, through canaryctl.
fn state(agent: &AgentProcess) -> anyhow::Result<(String, String)> {
    let out = canaryctl(agent, &["status", "--json", "web"]).context("run canaryctl")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status: {}", String::from_utf8_lossy(&out.stderr)))?;
    let svc = &json["services"][0];
    let field = |key: &str| svc[key].as_str().unwrap_or("?").to_string();
    Ok((field("state"), field("effective_weight")))
}

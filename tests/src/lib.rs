//! Helpers for canary's privileged tests: packet building and checking with
//! checksums computed independently of the data plane, and the privilege
//! precondition.
#![expect(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    reason = "test helpers: a failed precondition or setup step panics, which fails the calling test with its message"
)]
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "the unit tests here also get the dev-dependencies, which only the test files use"
    )
)]

// The socket-LB test client's dependency (src/bin/canary-sock-client.rs):
// cargo has no per-binary dependencies.
use socket2 as _;

pub mod app_metrics;
pub mod cgroup;
pub mod deploy;
pub mod etcd;
pub mod load;
pub mod metrics;
pub mod packet;
pub mod prometheus;
pub mod scenarios;
pub mod tls;

/// A lab with `backends` (name, behaviour) and `clients` client addresses;
/// fails the test unless it runs as root.
pub fn lab(backends: &[(&str, canary_lab::Behavior)], clients: u32) -> canary_lab::Lab {
    lab_dual_stack(backends, clients, 0)
}

/// [`lab`] with `clients6` extra IPv6 client addresses as well.
pub fn lab_dual_stack(
    backends: &[(&str, canary_lab::Behavior)],
    clients: u32,
    clients6: u32,
) -> canary_lab::Lab {
    require_root();
    canary_lab::Lab::build(&canary_lab::LabSpec {
        backends: backend_specs(backends),
        n_client_addrs: clients,
        n_client_addrs6: clients6,
    })
    .expect("lab builds")
}

/// A fleet of `nodes` nodes sharing `backends` (name, behaviour), with
/// `clients` client addresses per node, its routers linked to `etcd`'s
/// network; fails the test unless it runs as root.
pub fn fleet(
    nodes: usize,
    backends: &[(&str, canary_lab::Behavior)],
    clients: u32,
    etcd: &etcd::EtcdCluster,
) -> canary_lab::FleetLab {
    require_root();
    let spec = canary_lab::FleetSpec {
        nodes,
        backends: backend_specs(backends),
        n_client_addrs: clients,
    };
    canary_lab::FleetLab::build(&spec, Some(etcd.net())).expect("fleet lab builds")
}

/// Starts one agent per fleet node, side by side (each takes a few
/// seconds), on `config(node)`; returns them in node order once every one
/// is ready. Fails the test, with the agent's log, if one does not start.
pub fn start_fleet_agents(
    fleet: &canary_lab::FleetLab,
    config: impl Fn(&canary_lab::FleetNode) -> String + Sync,
) -> Vec<canary_lab::AgentProcess> {
    std::thread::scope(|scope| {
        let starting: Vec<_> = fleet
            .nodes()
            .iter()
            .map(|node| {
                let config = config(node);
                scope.spawn(move || canary_lab::AgentProcess::start(node.router(), &config, false))
            })
            .collect();
        starting
            .into_iter()
            .enumerate()
            .map(|(k, h)| {
                h.join()
                    .expect("agent start thread")
                    .unwrap_or_else(|e| panic!("agent on node {k} starts: {e:#}"))
            })
            .collect()
    })
}

fn backend_specs(backends: &[(&str, canary_lab::Behavior)]) -> Vec<canary_lab::BackendSpec> {
    backends
        .iter()
        .map(|(name, behavior)| canary_lab::BackendSpec {
            name: (*name).to_string(),
            behavior: *behavior,
        })
        .collect()
}

/// Runs `canaryctl --socket SOCKET args…` (the binary beside the agent's).
pub fn canaryctl(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(canary_lab::canaryctl_binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run canaryctl (built by `cargo xtask test`)")
}

/// [`canaryctl`], failing the test unless it succeeds; returns its stdout.
pub fn canaryctl_ok(socket: &std::path::Path, args: &[&str]) -> String {
    let out = canaryctl(socket, args);
    assert!(
        out.status.success(),
        "canaryctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test unless it runs as root: privileged tests never skip, in
/// CI or anywhere else (`cargo xtask test` is the way to run them).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test needs root (BPF and network namespaces); run `sudo cargo xtask test`"
    );
}

/// Names of the BPF programs attached with TCX to `iface` (ingress and
/// egress) inside `ns`, plus an XDP program, any legacy `tc` filters and
/// clsact qdisc, as one list: empty means nothing of ours (or anyone's) is
/// attached.
pub fn attached_to(ns: &canary_lab::Netns, iface: &'static str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut found: Vec<String> = ns
        .spawn(move || {
            [TcAttachType::Ingress, TcAttachType::Egress]
                .into_iter()
                .flat_map(|t| {
                    let (_, progs) = SchedClassifier::query_tcx(iface, t)
                        .unwrap_or_else(|e| panic!("query TCX {t:?} on {iface}: {e}"));
                    progs.into_iter().map(move |p| {
                        format!("tcx {t:?}: {}", p.name_as_str().unwrap_or("<unnamed>"))
                    })
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("TCX query thread")
        .expect("enter the namespace");
    for kind in ["ingress", "egress"] {
        let out = ns
            .exec(&["tc", "filter", "show", "dev", iface, kind])
            .expect("tc filter show");
        found.extend(
            out.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("tc filter {kind}: {l}")),
        );
    }
    let link = ns
        .exec(&["ip", "link", "show", "dev", iface])
        .expect("ip link show");
    found.extend(
        link.lines()
            .filter(|l| l.contains("prog/xdp"))
            .map(|l| format!("xdp: {}", l.trim())),
    );
    let qdiscs = ns
        .exec(&["tc", "qdisc", "show", "dev", iface])
        .expect("tc qdisc show");
    found.extend(
        qdiscs
            .lines()
            .filter(|l| l.contains("clsact"))
            .map(|l| format!("qdisc: {l}")),
    );
    found
}

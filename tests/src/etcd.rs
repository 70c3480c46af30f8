//! A real etcd cluster for the fleet tests: N members of `/usr/bin/etcd`
//! (Debian `etcd-server`) in an [`EtcdNet`] namespace, optionally serving
//! clients over mutual TLS, killed and restarted one by one.
//!
//! ```no_run
//! use canary_lab::{FleetLab, FleetSpec};
//! use canary_tests::etcd::EtcdCluster;
//!
//! let etcd = EtcdCluster::start(3, true);
//! let spec = FleetSpec { nodes: 3, ..FleetSpec::default() };
//! let fleet = FleetLab::build(&spec, Some(etcd.net())).expect("fleet builds");
//! // An agent in fleet.node(k).router() reaches etcd.endpoints() with
//! // etcd.tls_files(); `etcdctl` from there:
//! let out = etcd.etcdctl_in(fleet.node(0).router(), &["put", "k", "v"]);
//! assert!(out.status.success());
//! ```
//!
//! Members listen on 10.250.0.{11+i}: port 2379 for clients (`https` with
//! `--client-cert-auth` when TLS is on), 2380 for peers (always plain
//! http). Their data lives under `/dev/shm` (tmpfs: fsync is free, so raft
//! is fast on a loaded machine) in a directory removed on drop. Dropping
//! the cluster SIGKILLs every member; members left by a killed test run are
//! found by their data directory (which names the owning pid) and killed
//! at the next [`EtcdCluster::start`].

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use canary_lab::{EtcdNet, Netns};

pub use crate::tls::TlsFiles;
use crate::tls::make_tls;
use serde_json::Value;

/// The etcd server binary (Debian `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";
/// The etcd client CLI (Debian `etcd-client`).
pub const ETCDCTL: &str = "/usr/bin/etcdctl";
/// Client port of every member.
pub const CLIENT_PORT: u16 = 2379;
/// Peer port of every member.
pub const PEER_PORT: u16 = 2380;
/// Raft heartbeat, ms: 10 × faster than etcd's default.
pub const HEARTBEAT_MS: u32 = 50;
/// Raft election timeout, ms: a dead leader is replaced within about this.
pub const ELECTION_TIMEOUT_MS: u32 = 500;

/// Parent of the clusters' data directories (tmpfs).
const DATA_ROOT: &str = "/dev/shm";
/// Data directories are `{DATA_ROOT}/{DIR_PREFIX}{pid}-{seq}`.
const DIR_PREFIX: &str = "canary-etcd-";

/// One member's process, `None` while killed.
#[derive(Debug)]
struct Member {
    child: Option<Child>,
}

/// A running etcd cluster; see the module documentation.
#[derive(Debug)]
pub struct EtcdCluster {
    /// Declared first: killed before the namespace goes.
    members: Vec<Member>,
    dir: PathBuf,
    token: String,
    tls: Option<TlsFiles>,
    net: EtcdNet,
}

impl EtcdCluster {
    /// Starts `members` members with a static `--initial-cluster` and waits
    /// until every one answers `etcdctl endpoint health` (20 s at most).
    /// With `tls`, generates a CA, a server certificate (SAN: every member
    /// address, 127.0.0.1, localhost) and a client certificate with
    /// `openssl`, and serves clients over mutual TLS only.
    ///
    /// Fails the test unless it runs as root and every member comes up.
    pub fn start(members: usize, tls: bool) -> EtcdCluster {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        crate::require_root();
        for (cmd, package) in [(ETCD, "etcd-server"), (ETCDCTL, "etcd-client")] {
            assert!(
                Path::new(cmd).is_file(),
                "{cmd} missing: install Debian {package} (`cargo xtask test` does)"
            );
        }
        kill_stale();
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = Path::new(DATA_ROOT).join(format!("{DIR_PREFIX}{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let net = EtcdNet::create(members).expect("etcd network namespace");
        let mut cluster = EtcdCluster {
            members: (0..members).map(|_| Member { child: None }).collect(),
            tls: tls.then(|| {
                let sans: Vec<String> = (0..members)
                    .map(|i| format!("IP:{}", EtcdNet::member_ip(i)))
                    .collect();
                make_tls(&dir.join("tls"), "canary test etcd CA", "etcd", &sans)
            }),
            token: format!("canary-{tag}"),
            dir,
            net,
        };
        for i in 0..members {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy(Duration::from_secs(20));
        cluster
    }

    /// The network the members listen on, for [`canary_lab::FleetLab::build`].
    pub fn net(&self) -> &EtcdNet {
        &self.net
    }

    /// Whether clients must use TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Member `i`'s client URL, `http(s)://10.250.0.{11+i}:2379`.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", EtcdNet::member_ip(i))
    }

    /// Every member's client URL, in member order (killed members too).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client certificate, key and CA, if the cluster serves TLS.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        self.tls.clone()
    }

    /// Whether member `i` runs (was not [killed](EtcdCluster::kill)).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Member `i`'s process id, `None` while killed.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The directory of the members' data, logs and TLS files (removed on
    /// drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILLs member `i` and waits until it is gone. Panics if it is not
    /// running.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.members[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("etcd member {i} is not running"));
        child.kill().expect("SIGKILL an etcd member");
        child.wait().expect("reap an etcd member");
    }

    /// Starts killed member `i` again on its data directory
    /// (`--initial-cluster-state existing`) and waits until it answers
    /// health checks (20 s at most).
    pub fn restart(&mut self, i: usize) {
        self.restart_all(&[i]);
    }

    /// Starts the killed `members` again together (a quorum lost with all
    /// of them comes back only when enough run) and waits until they
    /// answer health checks (20 s at most).
    pub fn restart_all(&mut self, members: &[usize]) {
        for &i in members {
            assert!(!self.is_running(i), "etcd member {i} is still running");
            self.spawn(i, "existing");
        }
        self.wait_healthy(Duration::from_secs(20));
    }

    /// The raft leader's member index, as the running members report it
    /// (`etcdctl endpoint status -w json`): waits (10 s at most) until every
    /// running member names the same leader and that leader is running, so
    /// right after a kill it waits out the election.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let why = match self.try_leader() {
                Ok(leader) => return leader,
                Err(why) => why,
            };
            assert!(
                Instant::now() < deadline,
                "no agreed etcd leader within 10 s: {why}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_leader(&self) -> Result<usize, String> {
        let out = self.etcdctl_running(&["endpoint", "status", "-w", "json"]);
        if !out.status.success() {
            return Err(format!(
                "etcdctl endpoint status: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let statuses: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("endpoint status JSON: {e}"))?;
        let statuses = statuses.as_array().ok_or("endpoint status: not an array")?;
        let mut leader_id = None;
        let mut ids = Vec::new();
        for status in statuses {
            let endpoint = status["Endpoint"].as_str().ok_or("no Endpoint")?;
            let i = (0..self.members.len())
                .find(|&i| self.endpoint(i) == endpoint)
                .ok_or_else(|| format!("unknown endpoint {endpoint}"))?;
            let member = status["Status"]["header"]["member_id"]
                .as_u64()
                .ok_or("no member_id")?;
            let leader = status["Status"]["leader"].as_u64().ok_or("no leader")?;
            if leader == 0 || leader_id.is_some_and(|l| l != leader) {
                return Err(format!("members disagree or have no leader: {statuses:?}"));
            }
            leader_id = Some(leader);
            ids.push((member, i));
        }
        let leader_id = leader_id.ok_or("no running member")?;
        ids.iter()
            .find(|(member, _)| *member == leader_id)
            .map(|(_, i)| *i)
            .ok_or_else(|| format!("leader {leader_id:x} is not a running member"))
    }

    /// The running members' client URLs, comma-separated.
    fn running_endpoints(&self) -> String {
        (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl` flags for this cluster: every member's endpoint and, with
    /// TLS, the client certificate. (`--endpoints` is a list flag: a second
    /// one adds to it rather than replacing it.)
    pub fn etcdctl_flags(&self) -> Vec<String> {
        self.flags_for(&self.endpoints().join(","))
    }

    /// [`EtcdCluster::etcdctl_flags`] with `endpoints` (comma-separated).
    fn flags_for(&self, endpoints: &str) -> Vec<String> {
        let mut flags = vec![
            format!("--endpoints={endpoints}"),
            "--dial-timeout=2s".to_owned(),
            "--command-timeout=5s".to_owned(),
        ];
        if let Some(tls) = &self.tls {
            flags.push(format!("--cacert={}", tls.ca.display()));
            flags.push(format!("--cert={}", tls.cert.display()));
            flags.push(format!("--key={}", tls.key.display()));
        }
        flags
    }

    /// Runs `etcdctl FLAGS ARGS…` in the etcd namespace and returns its
    /// output, whatever the exit status.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_in(self.net.ns(), args)
    }

    /// `etcdctl ARGS…` against the running members only, in the etcd
    /// namespace.
    fn etcdctl_running(&self, args: &[&str]) -> Output {
        run_etcdctl(
            self.net.ns(),
            self.flags_for(&self.running_endpoints()),
            args,
        )
    }

    /// Runs `etcdctl FLAGS ARGS…` inside `ns` (a fleet router, say) and
    /// returns its output, whatever the exit status.
    pub fn etcdctl_in(&self, ns: &Netns, args: &[&str]) -> Output {
        run_etcdctl(ns, self.etcdctl_flags(), args)
    }

    /// A `[fleet]` config section for node `node` with this cluster's
    /// endpoints and, with TLS, the client certificate (keys as in the
    /// fleet issue: `etcd`, `node`, `prefix`, `ca`, `cert`, `key`).
    pub fn fleet_section(&self, node: &str, prefix: &str) -> String {
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let mut section = format!(
            "[fleet]\netcd = [{}]\nnode = \"{node}\"\nprefix = \"{prefix}\"\n",
            endpoints.join(", ")
        );
        if let Some(tls) = &self.tls {
            let _ = write!(
                section,
                "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display()
            );
        }
        section
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.etcdctl_running(&["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd members {} not healthy within {timeout:?}: {}{}\n{}",
                self.running_endpoints(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for i in 0..self.members.len() {
            let log = fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let _ = writeln!(all, "--- etcd m{i} (last lines):");
            for line in tail.iter().rev() {
                let _ = writeln!(all, "{line}");
            }
        }
        all
    }

    /// Starts member `i` with `--initial-cluster-state state`.
    fn spawn(&mut self, i: usize, state: &str) {
        let ip = EtcdNet::member_ip(i);
        let peer = |j: usize| format!("http://{}:{PEER_PORT}", EtcdNet::member_ip(j));
        let initial: Vec<String> = (0..self.members.len())
            .map(|j| format!("m{j}={}", peer(j)))
            .collect();
        let client = self.endpoint(i);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{i}.log")))
            .expect("open the etcd member log");
        let mut command = self.net.ns().command(ETCD);
        command
            .arg(format!("--name=m{i}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.join(format!("m{i}")).display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={}", peer(i)))
            .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_TIMEOUT_MS}"))
            // gRPC keepalive enforcement stays at etcd's default (clients
            // may ping at most every 5 s when idle), as in production, so a
            // client that pings too eagerly is caught here (GOAWAY
            // `too_many_pings`).
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        if let Some(tls) = &self.tls {
            let tls_dir = tls.ca.parent().expect("tls files live in a directory");
            command
                .arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg(format!(
                    "--cert-file={}",
                    tls_dir.join("server.crt").display()
                ))
                .arg(format!(
                    "--key-file={}",
                    tls_dir.join("server.key").display()
                ));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {ETCD} member m{i} ({ip}): {e}"));
        self.members[i].child = Some(child);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in self.members.iter_mut().filter_map(|m| m.child.as_mut()) {
            let _ = child.kill();
        }
        for child in self.members.iter_mut().filter_map(|m| m.child.as_mut()) {
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
        // `net` (the namespace) goes as the field drops.
    }
}

/// Runs `etcdctl FLAGS ARGS…` inside `ns`, whatever the exit status.
fn run_etcdctl(ns: &Netns, flags: Vec<String>, args: &[&str]) -> Output {
    ns.command(ETCDCTL)
        .args(flags)
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl")
}

/// Kills etcd members of test processes that are gone (their data
/// directory `/dev/shm/canary-etcd-{pid}-…` names a pid with no
/// `/proc/{pid}`), and removes those directories.
fn kill_stale() {
    let dead_owner = |path: &str| -> bool {
        let Some(rest) = path
            .strip_prefix(DATA_ROOT)
            .and_then(|p| p.strip_prefix('/'))
            .and_then(|p| p.strip_prefix(DIR_PREFIX))
        else {
            return false;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        pid.parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_etcd = args.first().is_some_and(|a| a.ends_with("etcd"));
        let stale = args
            .iter()
            .any(|a| a.strip_prefix("--data-dir=").is_some_and(dead_owner));
        if is_etcd && stale {
            eprintln!("canary-tests: killing stale etcd member (pid {pid}): {args:?}");
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for entry in fs::read_dir(DATA_ROOT).into_iter().flatten().flatten() {
        let path = entry.path();
        if dead_owner(&path.to_string_lossy()) {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

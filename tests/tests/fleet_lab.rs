//! The fleet test bed itself: a real etcd cluster reachable from every
//! router of a three-node fleet (plain and mutual TLS), surviving its
//! leader's death; a partition that really cuts one node off, established
//! connections included; and three single-node agents steering each node's
//! clients to the shared backends.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt as _,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use canary_lab::{Behavior, EtcdNet, FleetLab, Netns};
use canary_tests::{
    etcd::{CLIENT_PORT, EtcdCluster},
    load::drive,
};

const NODES: usize = 3;

fn fleet(etcd: &EtcdCluster, backends: &[(&str, Behavior)], clients: u32) -> FleetLab {
    canary_tests::fleet(NODES, backends, clients, etcd)
}

/// `etcdctl ARGS` from inside `ns`; its stdout, or a panic with stderr.
fn etcdctl_ok(etcd: &EtcdCluster, ns: &Netns, args: &[&str]) -> String {
    let out = etcd.etcdctl_in(ns, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?} in {}: expected success, got {}: {}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Puts `key` = `value` from `ns` and reads it back from every router.
fn put_and_read_everywhere(
    etcd: &EtcdCluster,
    fleet: &FleetLab,
    ns: &Netns,
    key: &str,
    value: &str,
) {
    put_and_read(etcd, fleet, ns, None, key, value);
}

/// Puts `key` = `value` from `ns` and reads it back from every router
/// except node `skip`'s.
fn put_and_read(
    etcd: &EtcdCluster,
    fleet: &FleetLab,
    ns: &Netns,
    skip: Option<usize>,
    key: &str,
    value: &str,
) {
    etcdctl_ok(etcd, ns, &["put", key, value]);
    for node in fleet.nodes().iter().filter(|n| Some(n.index()) != skip) {
        let got = etcdctl_ok(etcd, node.router(), &["get", key, "--print-value-only"]);
        assert_eq!(
            got.trim(),
            value,
            "node {} reads {key}: expected {value:?}, got {got:?}",
            node.index()
        );
    }
}

/// Every router reads and writes through the cluster; the cluster serves on
/// after its leader is killed (SIGKILL) and takes the member back on restart.
fn serves_every_router_and_survives_its_leader(etcd: &mut EtcdCluster, fleet: &FleetLab) {
    for node in fleet.nodes() {
        let key = format!("/canary/smoke/n{}", node.index());
        put_and_read_everywhere(
            etcd,
            fleet,
            node.router(),
            &key,
            &format!("v{}", node.index()),
        );
    }
    let leader = etcd.leader();
    let killed_at = Instant::now();
    etcd.kill(leader);
    let new_leader = etcd.leader();
    let elected = killed_at.elapsed();
    assert_ne!(new_leader, leader, "a killed member cannot lead");
    put_and_read_everywhere(
        etcd,
        fleet,
        fleet.node(1).router(),
        "/canary/smoke/after",
        "1",
    );
    let served = killed_at.elapsed();
    etcd.restart(leader);
    put_and_read_everywhere(
        etcd,
        fleet,
        fleet.node(2).router(),
        "/canary/smoke/back",
        "2",
    );
    eprintln!(
        "leader m{leader} killed: m{new_leader} leads after {:.0} ms, writes served after {:.0} ms; m{leader} restarted",
        elected.as_secs_f64() * 1e3,
        served.as_secs_f64() * 1e3
    );
}

#[test]
fn plain_etcd_serves_every_router_survives_its_leader_and_a_partition_cuts_one_node_off() {
    let start = Instant::now();
    let mut etcd = EtcdCluster::start(3, false);
    let fleet = fleet(&etcd, &[], 0);
    eprintln!(
        "3-member etcd and 3-node fleet up in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert!(etcd.endpoints().iter().all(|e| e.starts_with("http://")));
    serves_every_router_and_survives_its_leader(&mut etcd, &fleet);

    // An established connection from node 2's router to a member: one
    // HTTP/1.1 request on it is answered before the partition.
    let member: SocketAddr = SocketAddrV4::new(EtcdNet::member_ip(0), CLIENT_PORT).into();
    let mut conn = fleet
        .node(2)
        .router()
        .spawn(move || connect_with_user_timeout(member))
        .join()
        .expect("connect thread")
        .expect("enter the router namespace")
        .expect("node 2 connects to etcd before the partition");
    let version = http_version(&mut conn).expect("GET /version on the open connection");
    assert!(version.contains("etcdserver"), "GET /version: {version:?}");

    // And a gRPC watch stream from node 2 (etcdctl, as an agent would
    // watch), proven live by one event before the partition.
    let watch = Watch::start(&etcd, fleet.node(2).router(), "/canary/smoke/w");
    // (Put until seen: the watch may not be registered yet.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while !watch.seen("before") {
        assert!(
            Instant::now() < deadline,
            "the watch never saw a put: {:?}",
            watch.lines()
        );
        etcdctl_ok(
            &etcd,
            fleet.node(0).router(),
            &["put", "/canary/smoke/w", "before"],
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    fleet.partition(2).expect("partition node 2");
    etcdctl_ok(
        &etcd,
        fleet.node(0).router(),
        &["put", "/canary/smoke/w", "during"],
    );
    // The same connection now carries nothing: the request gets no answer,
    // and the kernel gives up after TCP_USER_TIMEOUT (1 s) with ETIMEDOUT,
    // which is what the agent's keepalive/user timeout will see.
    let cut_at = Instant::now();
    let after = http_version(&mut conn);
    let broke_after = cut_at.elapsed();
    assert!(
        matches!(&after, Err(e) if e.kind() == ErrorKind::TimedOut),
        "established connection across the partition: expected ETIMEDOUT, got {after:?}"
    );
    assert!(
        broke_after < Duration::from_secs(4),
        "the connection broke after {broke_after:?}"
    );
    // New requests from the partitioned node fail; the others carry on.
    let cut_off = etcd.etcdctl_in(
        fleet.node(2).router(),
        &[
            "get",
            "/canary/smoke/n0",
            "--dial-timeout=300ms",
            "--command-timeout=600ms",
        ],
    );
    assert!(
        !cut_off.status.success(),
        "a partitioned node reached etcd: {}",
        String::from_utf8_lossy(&cut_off.stdout)
    );
    put_and_read(
        &etcd,
        &fleet,
        fleet.node(0).router(),
        Some(2),
        "/canary/smoke/partitioned",
        "yes",
    );

    assert!(
        !watch.seen("during"),
        "node 2's watch saw an event across the partition: {:?}",
        watch.lines()
    );

    fleet.heal(2).expect("heal node 2");
    let healed_at = Instant::now();
    // The stalled stream resumes (TCP retransmits): no error ever reached
    // the client, so only a keepalive would have told it about the cut.
    watch.wait_for("during", Duration::from_secs(10));
    let resumed = healed_at.elapsed();
    put_and_read_everywhere(
        &etcd,
        &fleet,
        fleet.node(2).router(),
        "/canary/smoke/healed",
        "yes",
    );
    eprintln!(
        "partition: established connection broke after {:.0} ms (ETIMEDOUT), watch stalled; \
         after heal the watch resumed in {:.0} ms and node 2 read and wrote within {:.0} ms",
        broke_after.as_secs_f64() * 1e3,
        resumed.as_secs_f64() * 1e3,
        healed_at.elapsed().as_secs_f64() * 1e3
    );
    eprintln!("whole test {:.1} s", start.elapsed().as_secs_f64());
}

/// `etcdctl watch KEY` running in a namespace, its output collected.
struct Watch {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Watch {
    fn start(etcd: &EtcdCluster, ns: &Netns, key: &str) -> Watch {
        let mut command = ns.command(canary_tests::etcd::ETCDCTL);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        // It makes the watch die with this (test) thread, even when the test
        // process is killed, where `Drop` cannot run.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = command
            .args(etcd.etcdctl_flags())
            .args(["watch", key])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcdctl watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("watch lines").push(line);
            }
        });
        Watch { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("watch lines").clone()
    }

    fn seen(&self, value: &str) -> bool {
        self.lines().iter().any(|l| l == value)
    }

    fn wait_for(&self, value: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seen(value) {
            assert!(
                Instant::now() < deadline,
                "the watch did not see {value:?} within {timeout:?}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to `dst` whose unacknowledged data aborts it after 1 s.
fn connect_with_user_timeout(dst: SocketAddr) -> std::io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    socket2::SockRef::from(&conn).set_tcp_user_timeout(Some(Duration::from_secs(1)))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// `GET /version` on an open keep-alive connection; the response head and
/// body as far as the first read returns.
fn http_version(conn: &mut TcpStream) -> std::io::Result<String> {
    conn.write_all(b"GET /version HTTP/1.1\r\nHost: etcd\r\n\r\n")?;
    let mut buf = [0u8; 2048];
    let n = conn.read(&mut buf)?;
    if n == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn tls_etcd_serves_every_router_with_the_client_certificate_only() {
    let start = Instant::now();
    let mut etcd = EtcdCluster::start(3, true);
    let fleet = fleet(&etcd, &[], 0);
    eprintln!(
        "3-member TLS etcd and 3-node fleet up in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let tls = etcd.tls_files().expect("a TLS cluster has client files");
    for file in [&tls.ca, &tls.cert, &tls.key] {
        assert!(file.is_file(), "{} missing", file.display());
    }
    assert!(etcd.endpoints().iter().all(|e| e.starts_with("https://")));
    // Strict X.509 (as rustls, which the agent's gRPC client uses, checks):
    // the client certificate for client auth, the server's for serving.
    let server_crt = tls.ca.with_file_name("server.crt");
    for (purpose, cert) in [("sslclient", &tls.cert), ("sslserver", &server_crt)] {
        let out = std::process::Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(&tls.ca)
            .arg(cert)
            .output()
            .expect("run openssl verify");
        assert!(
            out.status.success(),
            "openssl verify -x509_strict -purpose {purpose} {}: {}{}",
            cert.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serves_every_router_and_survives_its_leader(&mut etcd, &fleet);
    // Without the client certificate the members refuse the handshake.
    let out = fleet
        .node(0)
        .router()
        .command(canary_tests::etcd::ETCDCTL)
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .arg(format!("--cacert={}", tls.ca.display()))
        .args([
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "get",
            "/canary/smoke/n0",
        ])
        .output()
        .expect("run etcdctl");
    assert!(
        !out.status.success(),
        "etcd served a client without a certificate: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Dropping the fleet and the cluster leaves nothing behind.
    let namespaces: Vec<String> = fleet
        .netns_names()
        .into_iter()
        .chain([etcd.net().ns().name().to_owned()])
        .collect();
    let pids: Vec<u32> = (0..3).filter_map(|i| etcd.pid(i)).collect();
    let dir = etcd.dir().to_path_buf();
    assert_eq!(pids.len(), 3, "every member runs");
    drop(fleet);
    drop(etcd);
    let listing = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    let left: Vec<&String> = namespaces
        .iter()
        .filter(|name| {
            listing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        })
        .collect();
    assert!(left.is_empty(), "namespaces left after drop: {left:?}");
    let alive: Vec<&u32> = pids
        .iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(alive.is_empty(), "etcd members alive after drop: {alive:?}");
    assert!(!dir.exists(), "{} left after drop", dir.display());
    eprintln!("whole test {:.1} s", start.elapsed().as_secs_f64());
}

/// Log line of a fleet agent whose watch on etcd is (re)established.
const ETCD_REACHABLE: &str = "fleet: etcd reachable";
/// Log line of a fleet agent that lost its watch on etcd.
const WATCH_LOST: &str = "fleet: lost the watch on etcd";

#[test]
fn three_fleet_agents_over_tls_steer_their_own_clients_and_a_partitioned_one_loses_etcd() {
    let start = Instant::now();
    let etcd = EtcdCluster::start(3, true);
    let fleet = fleet(
        &etcd,
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        16,
    );
    let vip: SocketAddrV4 = "10.96.0.10:80".parse().expect("VIP");
    let mut agents = canary_tests::start_fleet_agents(&fleet, |node| {
        format!(
            "[agent]\ninterfaces = [\"{}\"]\n\n{}\n[[service]]\nname = \"web\"\nvip = \"{vip}\"\n\
             stable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"50%\"\ncohort = \"per-connection\"\n",
            node.iface(),
            etcd.fleet_section(&format!("n{}", node.index()), "/canary"),
            fleet.backend_addr(0),
            fleet.backend_addr(1),
        )
    });
    for (k, agent) in agents.iter_mut().enumerate() {
        agent
            .wait_for(ETCD_REACHABLE, 0, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!(
                    "node {k}'s agent never reached etcd over TLS: {e:#}\n{}",
                    agent.log().join("\n")
                )
            });
    }
    eprintln!(
        "3-member TLS etcd, fleet and 3 fleet agents connected in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    // 200 connections at 50 %: P(canary count outside 60..=140) is about
    // 1.5e-8 (binomial, 5.7 standard deviations).
    for node in fleet.nodes() {
        let out = drive(node, vip, node.client_addrs(), 200);
        out.assert_no_errors(&format!("node {} traffic", node.index()));
        let stable = out.by_backend.get("stable-1").copied().unwrap_or(0);
        let canary = out.by_backend.get("canary-1").copied().unwrap_or(0);
        eprintln!("node {}: stable {stable}, canary {canary}", node.index());
        assert_eq!(
            stable + canary,
            200,
            "node {}: replies {:?}",
            node.index(),
            out.by_backend
        );
        assert!(
            (60..=140).contains(&canary),
            "node {}: expected about 100 of 200 to canary at 50 %, got {canary} ({:?})",
            node.index(),
            out.by_backend
        );
        // Every reply came from this node's own clients.
        assert!(
            out.by_source
                .keys()
                .all(|src| node.client_addrs().contains(src)),
            "node {}: replies to foreign sources",
            node.index()
        );
    }

    // Partitioned, node 2's agent notices (its gRPC keepalive fails) and
    // says so; the others keep their watch.
    fleet.partition(2).expect("partition node 2");
    let cut_at = Instant::now();
    agents[2]
        .wait_for(WATCH_LOST, 0, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("node 2's agent did not notice the partition: {e:#}"));
    let noticed = cut_at.elapsed();
    fleet.heal(2).expect("heal node 2");
    let healed_at = Instant::now();
    agents[2]
        .wait_for(ETCD_REACHABLE, 1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("node 2's agent did not reconnect after heal: {e:#}"));
    let reconnected = healed_at.elapsed();
    for (k, agent) in agents.iter().enumerate().take(2) {
        assert_eq!(
            agent.count(WATCH_LOST),
            0,
            "node {k} was not partitioned but lost its watch:\n{}",
            agent.log().join("\n")
        );
    }
    eprintln!(
        "partition: node 2's agent lost its watch after {:.0} ms; reconnected {:.0} ms after heal",
        noticed.as_secs_f64() * 1e3,
        reconnected.as_secs_f64() * 1e3
    );
    for agent in agents {
        agent.stop().expect("agent stops");
    }
    eprintln!("whole test {:.1} s", start.elapsed().as_secs_f64());
}

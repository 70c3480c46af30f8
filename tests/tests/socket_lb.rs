//! Socket-level steering with the real agent: clients on the node itself
//! (processes in the socket-LB cgroup) are steered once, at `connect()`,
//! and measured per socket under the packet path's metric names.
//!
//! Every test attaches the socket LB at a cgroup of its own (never at the
//! real root), runs its clients as separate processes inside it (in the
//! lab's client namespace) and keeps the backends outside. Statistical
//! bounds are two-sided 99.9 % binomial intervals (z = 3.2905), normal
//! approximation.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::unwrap_used,
    reason = "the helpers here are test code too: a failed step panics, which fails the test"
)]
#![expect(
    clippy::float_cmp,
    reason = "exported counters are integers carried in f64, exact far below 2^53"
)]

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use canary_agent::{config::default_salt, dataplane::pins::open_pinned, sys};
use canary_common::{
    cohort::{bucket, sticky_hash64},
    flow::{CtEntry, FlowKey, SynRecord, pending},
    names,
};
use canary_lab::{AgentProcess, Behavior, Lab, Stop, request_once};
use canary_tests::{
    canaryctl_ok,
    cgroup::{HeldClient, Reply, TestCgroup, run_client},
    metrics::{Exposition, scrape},
    require_root,
};

const VIP: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00::10]:80";
const V6_BACKEND: &str = "[::1]:18080";

/// A line server on a loopback address inside a namespace, answering
/// every line with its name; stopped on drop.
struct LoopbackServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackServer {
    fn start(ns: &canary_lab::Netns, addr: &str, name: &'static str) -> LoopbackServer {
        use std::io::{BufRead as _, Write as _};
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let listener = ns
            .spawn(move || std::net::TcpListener::bind(addr))
            .join()
            .unwrap()
            .unwrap()
            .unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                std::thread::spawn(move || {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut writer = stream.try_clone().unwrap();
                    for line in std::io::BufReader::new(stream).lines() {
                        if line.is_err() || writeln!(writer, "{name}").is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LoopbackServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
const Z999: f64 = 3.2905;

/// The agent config: TC on the router's client-facing interface and the
/// socket LB at `cgroup`, then `services` (`[[service]]` tables).
fn config(cgroup: &TestCgroup, services: &str) -> String {
    format!(
        "[agent]\ninterfaces = [\"{}\"]\nsocket_lb = true\ncgroup = \"{}\"\n\n{services}",
        Lab::ROUTER_CLIENT_IFACE,
        cgroup.path().display()
    )
}

/// A `[[service]]` table.
fn service(name: &str, vip: &str, stable: &[String], canary: &[String], extra: &str) -> String {
    let list = |l: &[String]| {
        l.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nstable = [{}]\ncanary = [{}]\n{extra}\n",
        list(stable),
        list(canary)
    )
}

fn addrs(lab: &Lab, backends: &[usize]) -> Vec<String> {
    backends
        .iter()
        .map(|&i| lab.backend_addr(i).to_string())
        .collect()
}

/// How many replies came from each backend (errors under `err:KIND`).
fn by_backend(replies: &[Reply]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in replies {
        let key = match &r.result {
            Ok(name) => name.clone(),
            Err(kind) => format!("err:{kind}"),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Ids of the programs at the cgroup's `attach_type` hook.
fn programs_at(cgroup: &Path, attach_type: u32) -> Vec<u32> {
    let dir = std::fs::File::open(cgroup).unwrap();
    sys::cgroup_programs(dir.as_fd(), attach_type)
        .unwrap_or_else(|e| panic!("BPF_PROG_QUERY at {}: {e}", cgroup.display()))
}

/// Waits (2 s at most) until no program runs at the cgroup's `connect4`
/// hook: the kernel frees a link whose pin went from a work queue, so
/// detachment follows the removal shortly.
fn assert_detached(cgroup: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !programs_at(cgroup, sys::BPF_CGROUP_INET4_CONNECT).is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = programs_at(cgroup, sys::BPF_CGROUP_INET4_CONNECT);
    assert!(
        left.is_empty(),
        "{what} within 2 s; still attached: {left:?}"
    );
}

/// Entries in the agent's pinned CONNTRACK, and SYNs recorded in its
/// PENDING ring (the head's count).
fn tracked(agent: &AgentProcess) -> (usize, u64) {
    let maps = agent.bpffs_dir().join("maps");
    let ct: HashMap<MapData, FlowKey, CtEntry> =
        open_pinned(&maps.join(names::CONNTRACK), names::CONNTRACK).unwrap();
    let ring: Array<MapData, SynRecord> =
        open_pinned(&maps.join(names::PENDING), names::PENDING).unwrap();
    let syns = ring.get(&pending::HEAD, 0).unwrap().seq;
    (ct.keys().count(), syns)
}

fn event(m: &Exposition, name: &str) -> f64 {
    m.sum("canary_dataplane_events_total", &[("event", name)])
}

/// Scrapes until `done` holds (connections close asynchronously after a
/// client exits: the last FIN, `TIME_WAIT`), at most 5 s; returns the last
/// scrape.
fn scrape_until(lab: &Lab, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(lab.router());
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what} within 5 s:\n{}", m.text);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn socket_lb_programs_pass_the_verifier() {
    require_root();
    let mut dp =
        canary_agent::dataplane::Dataplane::load(canary_agent::dataplane::Capacity::default())
            .expect("the data plane loads");
    if let Err(e) = dp.load_socket_programs() {
        panic!("{}", canary_agent::error_chain(&e));
    }
}

/// (a) the split, (b) `getpeername`, (d) never rewritten at TC while a client
/// outside the cgroup is, dual-stack sockets, (f) long-lived connections
/// across weight changes, and the per-socket signals counted exactly.
#[test]
fn a_local_client_is_steered_once_at_the_socket_and_never_nated_at_tc() {
    let lab = canary_tests::lab(
        &[
            ("stable-1", Behavior::Reply),
            ("stable-2", Behavior::Reply),
            ("canary-1", Behavior::Reply),
        ],
        2,
    );
    let cg = TestCgroup::create();
    let web = service(
        "web",
        VIP,
        &addrs(&lab, &[0, 1]),
        &addrs(&lab, &[2]),
        "weight = \"20%\"\ncohort = \"per-connection\"",
    );
    // An IPv6 service whose backend listens on the client namespace's
    // loopback: the socket LB needs no route to a VIP.
    let web6 = service("web6", VIP6, &[V6_BACKEND.to_string()], &[], "");
    let _v6_backend = LoopbackServer::start(lab.client(), V6_BACKEND, "v6-backend");
    let agent = AgentProcess::start(lab.router(), &config(&cg, &format!("{web}{web6}")), false)
        .expect("agent starts");
    assert_eq!(
        programs_at(cg.path(), sys::BPF_CGROUP_INET4_CONNECT).len(),
        1,
        "exactly our connect4 program runs at the test cgroup"
    );
    let client_ns = lab.client().name().to_string();

    // (a) 1000 connections, each drawing its cohort (per-connection: the
    // socket cookie).
    let n = 1000;
    let started = Instant::now();
    let replies = run_client(
        &cg,
        &client_ns,
        &["--connect", VIP, "--count", &n.to_string()],
    );
    let secs = started.elapsed().as_secs_f64();
    let counts = by_backend(&replies);
    assert_eq!(replies.len(), n, "one line per connection");
    assert!(
        replies.iter().all(|r| r.result.is_ok()),
        "every connection answered: {counts:?}"
    );
    // (b) The application sees the address it dialled.
    let peers: BTreeMap<&str, usize> = replies.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.peer.as_str()).or_default() += 1;
        m
    });
    assert_eq!(
        peers,
        BTreeMap::from([(VIP, n)]),
        "getpeername() must return the VIP"
    );
    let canary = counts.get("canary-1").copied().unwrap_or(0) as f64;
    let (p, nf) = (0.2, n as f64);
    let half = Z999 * (nf * p * (1.0 - p)).sqrt();
    eprintln!(
        "socket LB, 20% of {n}: canary {canary} ({:.1}%), 99.9% interval [{:.0}, {:.0}], {:.0} conn/s, {counts:?}",
        canary / nf * 100.0,
        nf * p - half,
        nf * p + half,
        nf / secs
    );
    assert!(
        (canary - nf * p).abs() <= half,
        "canary {canary} outside the 99.9% interval {:.0} ± {half:.0}",
        nf * p
    );

    // (d) Not one packet of these connections was NATed at TC.
    let m = scrape_until(&lab, "every socket-steered connection closed", |m| {
        m.sum(
            "canary_connection_duration_seconds_count",
            &[("service", "web")],
        ) >= nf
    });
    assert_eq!(event(&m, "sock_steered"), nf, "steered at the socket");
    assert_eq!(event(&m, "new_flow"), 0.0, "TC saw no new flow");
    assert_eq!(event(&m, "ct_miss"), 0.0, "TC saw no packet to a VIP");
    assert_eq!(
        tracked(&agent),
        (0, 0),
        "no CONNTRACK entry, no SYN in PENDING"
    );
    // The socket path's signals under the packet path's names, exactly.
    for (backend, i) in [("stable-1", 0), ("stable-2", 1), ("canary-1", 2)] {
        let label = lab.backend_addr(i).to_string();
        let want = counts.get(backend).copied().unwrap_or(0) as f64;
        let got = m.sum(
            "canary_connections_total",
            &[("service", "web"), ("backend", &label)],
        );
        assert_eq!(got, want, "canary_connections_total of {backend}");
        let reply_bytes = (backend.len() + 1) as f64;
        assert_eq!(
            m.sum(
                "canary_bytes_total",
                &[("backend", &label), ("direction", "from_client")]
            ),
            want * 6.0,
            "bytes from the client to {backend}: `hello\\n` per connection"
        );
        assert_eq!(
            m.sum(
                "canary_bytes_total",
                &[("backend", &label), ("direction", "from_backend")]
            ),
            want * reply_bytes,
            "bytes from {backend}: its name and a newline per connection"
        );
    }
    for h in [
        "canary_handshake_seconds_count",
        "canary_first_byte_seconds_count",
        "canary_connection_duration_seconds_count",
    ] {
        assert_eq!(m.sum(h, &[("service", "web")]), nf, "{h}");
    }
    assert_eq!(
        m.sum("canary_connections_failed_total", &[("service", "web")]),
        0.0
    );
    assert_eq!(
        m.sum("canary_active_connections", &[("service", "web")]),
        0.0
    );

    // Dual-stack sockets reach the IPv4 VIP through its v4-mapped address.
    let v6 = run_client(
        &cg,
        &client_ns,
        &["--connect", VIP, "--v6", "--count", "20"],
    );
    assert!(
        v6.iter()
            .all(|r| r.result.is_ok() && r.peer == "[::ffff:10.96.0.10]:80"),
        "v4-mapped connect6/getpeername6: {v6:?}"
    );

    // A real IPv6 VIP, through connect6 and getpeername6.
    let v6 = run_client(&cg, &client_ns, &["--connect", VIP6, "--count", "10"]);
    assert!(
        v6.iter()
            .all(|r| r.result.as_deref() == Ok("v6-backend") && r.peer == VIP6),
        "IPv6 VIP steered at the socket: {v6:?}"
    );
    let m = scrape(lab.router());
    assert_eq!(
        m.sum("canary_connections_total", &[("service", "web6")]),
        10.0
    );
    assert_eq!(event(&m, "sock_steered"), nf + 30.0);

    // A client outside the cgroup reaches the same VIP through TC.
    let client_ip = lab.client_addrs()[0];
    let vip: std::net::SocketAddr = VIP.parse().unwrap();
    let outside: Vec<_> = lab
        .client()
        .spawn(move || {
            (0..10)
                .map(|_| request_once(client_ip, vip, Duration::from_secs(2)))
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
        .unwrap();
    assert!(outside.iter().all(Result::is_ok), "TC path: {outside:?}");
    let m = scrape(lab.router());
    assert_eq!(event(&m, "new_flow"), 10.0, "TC steered the outside client");
    assert_eq!(event(&m, "sock_steered"), nf + 30.0);
    assert!(tracked(&agent).0 > 0, "TC tracks its flows");

    // (f) Long-lived socket-steered connections stay where they are while
    // the weight moves.
    let (held, before) = HeldClient::start(&cg, &client_ns, &["--connect", VIP, "--count", "30"]);
    assert!(before.iter().all(|r| r.result.is_ok()), "{before:?}");
    let sock = agent.control_socket();
    canaryctl_ok(&sock, &["set-weight", "web", "100%"]);
    let all_canary = run_client(&cg, &client_ns, &["--connect", VIP, "--count", "20"]);
    assert_eq!(
        by_backend(&all_canary),
        BTreeMap::from([("canary-1".to_string(), 20)]),
        "new connections follow the new weight"
    );
    canaryctl_ok(&sock, &["set-weight", "web", "0%"]);
    let after = held.ping_again();
    assert_eq!(
        before, after,
        "every long-lived connection answered by the same backend after two weight changes"
    );

    let (status, log) = agent.stop().expect("agent stops");
    assert!(status.success(), "{}", log.join("\n"));
    assert_detached(cg.path(), "--detach-on-exit leaves nothing at the cgroup");
}

/// `SO_NETNS_COOKIE` (asm-generic/socket.h).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of network namespace `ns`, as `bpf_get_netns_cookie` sees it.
fn netns_cookie(ns: &canary_lab::Netns) -> u64 {
    ns.spawn(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cookie = 0u64;
        let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap();
        // SAFETY: a valid socket; `cookie` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "SO_NETNS_COOKIE: {}",
            std::io::Error::last_os_error()
        );
        cookie
    })
    .join()
    .unwrap()
    .unwrap()
}

/// (c) Sticky mode at the socket: the client is its network namespace, so
/// it stays in its cohort however the weight rises, exactly where its
/// bucket says. Source rules apply when the socket is bound to an address
/// and send the connection to stable (counted) when it is not.
#[test]
fn a_sticky_namespace_stays_in_its_cohort_and_rules_need_a_known_source() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        2,
    );
    let cg = TestCgroup::create();
    let (s, c) = (addrs(&lab, &[0]), addrs(&lab, &[1]));
    let [included, excluded] = [lab.client_addrs()[0], lab.client_addrs()[1]];
    let services = format!(
        "{}{}",
        service("web", VIP, &s, &c, "weight = \"0%\"\ncohort = \"sticky\""),
        service(
            "ruled",
            "10.96.0.11:80",
            &s,
            &c,
            &format!(
                "weight = \"100%\"\ncohort = \"per-connection\"\nnever_canary = [\"{excluded}/32\"]"
            ),
        )
    );
    let agent =
        AgentProcess::start(lab.router(), &config(&cg, &services), false).expect("agent starts");
    let sock = agent.control_socket();
    let client_ns = lab.client().name().to_string();

    let b = bucket(sticky_hash64(
        netns_cookie(lab.client()),
        default_salt("web"),
    ));
    // Canary iff bucket < weight: below and at the bucket stable, above it
    // canary, and canary from then on.
    let steps = [b / 2, b, b + 1, (b + 1 + 1_000_000) / 2, 1_000_000];
    let mut seen = Vec::new();
    for w in steps {
        canaryctl_ok(&sock, &["set-weight", "web", &format!("{w}ppm")]);
        let replies = run_client(&cg, &client_ns, &["--connect", VIP, "--count", "10"]);
        let want = if b < w { "canary-1" } else { "stable-1" };
        assert_eq!(
            by_backend(&replies),
            BTreeMap::from([(want.to_string(), 10)]),
            "bucket {b}, weight {w} ppm: the namespace is one client in one cohort"
        );
        seen.push((w, want));
    }
    eprintln!("sticky namespace, bucket {b}: {seen:?}");

    // Rules: a known source that no rule excludes takes the weight (100 %),
    // an excluded one never canary, an unknown one stable and counted.
    let ruled = |extra: &[&str]| {
        let mut args = vec!["--connect", "10.96.0.11:80", "--count", "10"];
        args.extend_from_slice(extra);
        by_backend(&run_client(&cg, &client_ns, &args))
    };
    let incl = included.to_string();
    let excl = excluded.to_string();
    assert_eq!(
        ruled(&["--bind", &incl]),
        BTreeMap::from([("canary-1".to_string(), 10)])
    );
    assert_eq!(
        ruled(&["--bind", &excl]),
        BTreeMap::from([("stable-1".to_string(), 10)])
    );
    let before = event(&scrape(lab.router()), "sock_source_unknown");
    assert_eq!(ruled(&[]), BTreeMap::from([("stable-1".to_string(), 10)]));
    assert_eq!(
        event(&scrape(lab.router()), "sock_source_unknown") - before,
        10.0,
        "unknown sources counted"
    );

    // A second socket LB at the same cgroup is warned about.
    let second = AgentProcess::start(
        lab.router(),
        &config(&cg, &services).replace("[agent]", "[agent]\nmetrics_addr = \"127.0.0.1:9478\""),
        false,
    )
    .expect("a second agent starts");
    assert_eq!(
        second.count("other programs run at this cgroup's connect hook"),
        2,
        "one warning per connect hook (4 and 6); log:\n{}",
        second.log().join("\n")
    );
}

/// (e) Failures of socket-steered connections land in the canary cohort
/// under the packet path's names and reasons, and trip the breaker.
#[test]
fn socket_steered_failures_count_in_their_cohort_and_trip_the_breaker() {
    let lab = canary_tests::lab(
        &[
            ("stable-1", Behavior::Reply),
            ("canary-reset", Behavior::Reset),
            ("canary-closed", Behavior::Closed),
        ],
        0,
    );
    // A backend that never answers: the router drops its packets silently.
    lab.router()
        .ip(&["route", "add", "blackhole", "10.200.99.0/24"])
        .unwrap();
    let cg = TestCgroup::create();
    let s = addrs(&lab, &[0]);
    let off = "[service.breaker]\nenabled = false";
    let services = [
        service(
            "web",
            VIP,
            &s,
            &addrs(&lab, &[1, 2]),
            &format!("weight = \"50%\"\ncohort = \"per-connection\"\n{off}"),
        ),
        service(
            "api",
            "10.96.0.11:80",
            &s,
            &addrs(&lab, &[2]),
            "weight = \"50%\"\ncohort = \"per-connection\"",
        ),
        service(
            "slow",
            "10.96.0.12:80",
            &s,
            &["10.200.99.2:8080".to_string()],
            &format!("weight = \"100%\"\ncohort = \"per-connection\"\n{off}"),
        ),
    ]
    .concat();
    let agent =
        AgentProcess::start(lab.router(), &config(&cg, &services), false).expect("agent starts");
    let client_ns = lab.client().name().to_string();

    // One connection that gets no answer, while the others run: its SYN is
    // retried (1 s) and the client gives up (1.5 s), a timeout.
    let (slow, web) = std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            run_client(
                &cg,
                &client_ns,
                &["--connect", "10.96.0.12:80", "--timeout-ms", "1500"],
            )
        });
        let web = run_client(&cg, &client_ns, &["--connect", VIP, "--count", "200"]);
        (slow.join().unwrap(), web)
    });
    assert_eq!(slow.len(), 1);
    assert!(
        slow[0].result.is_err(),
        "the blackholed backend never answers: {slow:?}"
    );

    let counts = by_backend(&web);
    let ok = counts.get("stable-1").copied().unwrap_or(0) as f64;
    let refused = counts.get("err:ConnectionRefused").copied().unwrap_or(0) as f64;
    let reset = counts.get("err:ConnectionReset").copied().unwrap_or(0) as f64;
    assert_eq!(
        ok + refused + reset,
        200.0,
        "nothing else happened: {counts:?}"
    );
    assert!(
        refused > 0.0 && reset > 0.0,
        "both canaries were reached: {counts:?}"
    );
    let web_canary = [("service", "web"), ("cohort", "canary")];
    let m = scrape_until(&lab, "the failed connections closed", |m| {
        m.sum("canary_active_connections", &[("service", "web")]) == 0.0
            && m.sum(
                "canary_failed_connections_total",
                &[("service", "slow"), ("reason", "timeout")],
            ) == 1.0
    });
    eprintln!("socket LB failures: {counts:?}");
    let reason = |svc: &str, r: &str| {
        m.sum(
            "canary_failed_connections_total",
            &[("service", svc), ("cohort", "canary"), ("reason", r)],
        )
    };
    assert_eq!(
        reason("web", "refused"),
        refused,
        "refused = RST answering the SYN"
    );
    assert_eq!(
        m.sum(
            "canary_resets_total",
            &[
                ("service", "web"),
                ("cohort", "canary"),
                ("direction", "from_backend")
            ]
        ),
        reset,
        "resets by the canary backend"
    );
    assert_eq!(
        m.sum("canary_connections_failed_total", &web_canary),
        refused + reset,
        "each failed connection once"
    );
    assert_eq!(
        m.sum("canary_connections_total", &web_canary),
        refused + reset
    );
    assert_eq!(
        m.sum(
            "canary_connections_failed_total",
            &[("service", "web"), ("cohort", "stable")]
        ),
        0.0
    );
    assert_eq!(reason("slow", "syn_retry"), 1.0, "the SYN was retried");
    assert_eq!(reason("slow", "timeout"), 1.0, "then the client gave up");
    assert_eq!(
        m.sum(
            "canary_connections_failed_total",
            &[("service", "slow"), ("cohort", "canary")]
        ),
        1.0,
        "one connection, one failure"
    );
    assert_eq!(
        m.sum("canary_active_connections", &[("service", "slow")]),
        0.0
    );

    // The breaker: three refusals in a row cut the canary off, in the
    // kernel, before the third connect() returns.
    let api = run_client(
        &cg,
        &client_ns,
        &["--connect", "10.96.0.11:80", "--count", "40"],
    );
    let refusals: Vec<usize> = api
        .iter()
        .enumerate()
        .filter(|(_, r)| r.result.is_err())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        refusals.len(),
        3,
        "exactly min_failures (3) canary connections before the breaker cut it off: {:?}",
        by_backend(&api)
    );
    // The agent learns of the trip from the kernel's ring buffer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = canary_tests::scenarios::status(&agent.control_socket(), "api");
        if status["state"] == "rolled-back" {
            break;
        }
        assert!(Instant::now() < deadline, "no rollback recorded: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (g) The socket LB's links are pinned: steering goes on while no agent
/// runs, and the next agent takes the links over without a second copy.
#[test]
fn pinned_socket_lb_links_survive_an_agent_crash_and_are_taken_over() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        0,
    );
    let cg = TestCgroup::create();
    let web = service(
        "web",
        VIP,
        &addrs(&lab, &[0]),
        &addrs(&lab, &[1]),
        "weight = \"50%\"\ncohort = \"per-connection\"",
    );
    let cfg = config(&cg, &web);
    let mut agent = AgentProcess::start_pinned(lab.router(), &cfg, false).expect("agent starts");
    let client_ns = lab.client().name().to_string();
    let run = || run_client(&cg, &client_ns, &["--connect", VIP, "--count", "50"]);
    let steered = |replies: &[Reply], when: &str| {
        let counts = by_backend(replies);
        assert!(
            replies.iter().all(|r| r.result.is_ok() && r.peer == VIP) && counts.len() == 2,
            "{when}: every connection steered, both cohorts used: {counts:?}"
        );
    };
    steered(&run(), "first agent");
    let first = programs_at(cg.path(), sys::BPF_CGROUP_INET4_CONNECT);

    agent.end(Stop::Kill).unwrap();
    steered(&run(), "no agent running");
    assert_eq!(programs_at(cg.path(), sys::BPF_CGROUP_INET4_CONNECT), first);

    agent.relaunch(None, None).expect("the next agent starts");
    let second = programs_at(cg.path(), sys::BPF_CGROUP_INET4_CONNECT);
    assert_eq!(second.len(), 1, "the link was taken over, not doubled");
    assert_ne!(
        second, first,
        "the new agent's program runs on the pinned link"
    );
    steered(&run(), "second agent");
    // Every connection counted once, across the crash and the hand-over:
    // no tracepoint program runs twice.
    let m = scrape_until(&lab, "150 connections closed", |m| {
        m.sum(
            "canary_connection_duration_seconds_count",
            &[("service", "web")],
        ) >= 150.0
    });
    assert_eq!(
        m.sum("canary_connections_total", &[("service", "web")]),
        150.0
    );
    assert_eq!(
        m.sum(
            "canary_bytes_total",
            &[("service", "web"), ("direction", "from_client")]
        ),
        150.0 * 6.0,
        "bytes counted once"
    );
    drop(agent);
    assert_detached(cg.path(), "uninstall detaches the socket LB");
}

#[test]
fn unconnected_udp_from_a_local_client_is_steered_per_flow_and_answered_by_the_vip() {
    let lab = canary_tests::lab(
        &[
            ("stable-1", Behavior::Reply),
            ("stable-2", Behavior::Reply),
            ("canary-1", Behavior::Reply),
        ],
        2,
    );
    let cg = TestCgroup::create();
    let udp_service = |weight: &str| {
        service(
            "dns",
            VIP,
            &addrs(&lab, &[0, 1]),
            &addrs(&lab, &[2]),
            &format!("protocol = \"udp\"\nweight = \"{weight}\"\ncohort = \"per-connection\""),
        )
    };
    let mut agent = AgentProcess::start(lab.router(), &config(&cg, &udp_service("20%")), false)
        .expect("agent starts with a UDP service");
    assert_eq!(
        programs_at(cg.path(), sys::BPF_CGROUP_UDP4_SENDMSG).len(),
        1,
        "exactly our sendmsg4 program runs at the test cgroup"
    );
    let client_ns = lab.client().name().to_string();

    // 1000 flows, one fresh unconnected socket each: sendto(VIP), recvfrom.
    let n = 1000;
    let replies = run_client(
        &cg,
        &client_ns,
        &["--udp", "--connect", VIP, "--count", &n.to_string()],
    );
    let counts = by_backend(&replies);
    assert_eq!(replies.len(), n, "one line per flow");
    assert!(
        replies.iter().all(|r| r.result.is_ok()),
        "every datagram answered: {counts:?}"
    );
    let sources: BTreeMap<&str, usize> = replies.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.peer.as_str()).or_default() += 1;
        m
    });
    assert_eq!(
        sources,
        BTreeMap::from([(VIP, n)]),
        "recvfrom() must report the VIP as the source"
    );
    let canary = counts.get("canary-1").copied().unwrap_or(0) as f64;
    let (p, nf) = (0.2, n as f64);
    let half = Z999 * (nf * p * (1.0 - p)).sqrt();
    eprintln!(
        "socket LB, unconnected UDP, 20% of {n}: canary {canary}, 99.9% interval [{:.0}, {:.0}], {counts:?}",
        nf * p - half,
        nf * p + half
    );
    assert!(
        (canary - nf * p).abs() <= half,
        "canary {canary} outside the 99.9% interval {:.0} ± {half:.0}",
        nf * p
    );
    // Counted in the UDP service's cohorts under the usual names, and
    // never seen at TC.
    let m = scrape_until(&lab, "every UDP flow timed", |m| {
        m.sum("canary_first_byte_seconds_count", &[("service", "dns")]) >= nf
    });
    assert_eq!(event(&m, "sock_steered"), nf, "steered at the socket");
    assert_eq!(event(&m, "new_flow"), 0.0, "TC saw no new flow");
    let label = lab.backend_addr(2).to_string();
    assert_eq!(
        m.sum(
            "canary_connections_total",
            &[("service", "dns"), ("backend", &label)]
        ),
        canary,
        "canary flows counted in the canary cohort"
    );

    // Flows stay on their backend across weight changes.
    let (held, first) = HeldClient::start(
        &cg,
        &client_ns,
        &["--udp", "--hold", "--connect", VIP, "--count", "30"],
    );
    assert!(first.iter().all(|r| r.result.is_ok()), "{first:?}");
    agent
        .reload(&config(&cg, &udp_service("100%")))
        .expect("weight to 100%");
    let again = held.ping_again();
    assert_eq!(again.len(), first.len());
    let moved = first
        .iter()
        .zip(&again)
        .filter(|(a, b)| a.result != b.result)
        .count();
    let stable_before = first
        .iter()
        .filter(|r| r.result.as_deref() != Ok("canary-1"))
        .count();
    eprintln!(
        "socket LB, unconnected UDP: 30 held flows ({stable_before} stable) across 20% -> 100%: {moved} moved"
    );
    assert!(stable_before > 0, "some held flows must start on stable");
    assert_eq!(
        moved, 0,
        "a UDP flow kept its backend: {first:?} -> {again:?}"
    );
    // New flows follow the new weight.
    let replies = run_client(
        &cg,
        &client_ns,
        &["--udp", "--connect", VIP, "--count", "20"],
    );
    assert_eq!(
        by_backend(&replies),
        BTreeMap::from([("canary-1".to_string(), 20)]),
        "new flows at 100%"
    );
}

/// A local client's UDP flows to a hung canary (it reads and never
/// answers): each flow that sends again past `udp_response_timeout` fails
/// once, in the canary cohort, and three such failures trip the kernel
/// breaker, which the agent records as a rollback.
#[test]
fn unanswered_udp_flows_at_the_socket_fail_and_trip_the_breaker() {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        0,
    );
    lab.silence_udp_backend(1);
    let cg = TestCgroup::create();
    let dns = service(
        "dns",
        VIP,
        &addrs(&lab, &[0]),
        &addrs(&lab, &[1]),
        "protocol = \"udp\"\nweight = \"50%\"\ncohort = \"per-connection\"\n\
         udp_response_timeout = \"200ms\"",
    );
    let agent = AgentProcess::start(lab.router(), &config(&cg, &dns), false).expect("agent starts");
    let client_ns = lab.client().name().to_string();
    // 20 flows: the canary's get no answer within the client's 300 ms.
    let (held, first) = HeldClient::start(
        &cg,
        &client_ns,
        &[
            "--udp",
            "--hold",
            "--connect",
            VIP,
            "--count",
            "20",
            "--timeout-ms",
            "300",
        ],
    );
    let unanswered = first.iter().filter(|r| r.result.is_err()).count();
    assert!(
        unanswered >= 3,
        "at 50 %, at least 3 of 20 flows must reach the hung canary: {first:?}"
    );
    // Each sends again, past the 200 ms deadline: the canary flows fail.
    let again = held.ping_again();
    assert_eq!(again.len(), 20);
    let m = scrape_until(&lab, "the unanswered flows counted", |m| {
        m.sum(
            "canary_connections_failed_total",
            &[("service", "dns"), ("cohort", "canary")],
        ) >= 3.0
    });
    let failed = m.sum(
        "canary_connections_failed_total",
        &[("service", "dns"), ("cohort", "canary")],
    );
    assert!(
        failed <= unanswered as f64,
        "each unanswered flow fails once: {failed} failures for {unanswered} flows"
    );
    assert_eq!(
        m.sum(
            "canary_connections_failed_total",
            &[("service", "dns"), ("cohort", "stable")]
        ),
        0.0,
        "stable answered everything"
    );
    // The breaker tripped in the kernel: new flows all go to stable.
    let after = run_client(
        &cg,
        &client_ns,
        &["--udp", "--connect", VIP, "--count", "20"],
    );
    assert_eq!(
        by_backend(&after),
        BTreeMap::from([("stable-1".to_string(), 20)]),
        "after the trip every new flow goes to stable"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = canary_tests::scenarios::status(&agent.control_socket(), "dns");
        if status["state"] == "rolled-back" {
            break;
        }
        assert!(Instant::now() < deadline, "no rollback recorded: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "socket LB, hung UDP canary: {unanswered} of 20 flows unanswered, {failed} failed, breaker tripped, 20 of 20 new flows on stable"
    );
}

/// The judge works on socket-steered connections: their first-byte times
/// reach the same histograms, so a canary twice as slow is rolled back.
#[test]
fn the_judge_rolls_back_a_slow_canary_of_socket_steered_connections() {
    let lab = canary_tests::lab(
        &[
            (
                "stable-1",
                Behavior::FirstByteDelay(Duration::from_millis(2)),
            ),
            (
                "canary-1",
                Behavior::FirstByteDelay(Duration::from_millis(4)),
            ),
        ],
        0,
    );
    let cg = TestCgroup::create();
    let web = service(
        "web",
        VIP,
        &addrs(&lab, &[0]),
        &addrs(&lab, &[1]),
        "cohort = \"per-connection\"\n[service.rollout]\nsteps = [{ weight = \"20%\", hold = \"1h\" }]",
    );
    // The socket LB alone: no interface.
    let text = format!(
        "[agent]\ninterfaces = []\nsocket_lb = true\ncgroup = \"{}\"\n\n{web}",
        cg.path().display()
    );
    let agent = AgentProcess::start(lab.router(), &text, false).expect("agent starts");
    let sock = agent.control_socket();
    let client_ns = lab.client().name().to_string();
    let t0 = Instant::now();
    let mut detected = None;
    std::thread::scope(|s| {
        // Three clients in the cgroup, one connection at a time each.
        for _ in 0..3 {
            s.spawn(|| run_client(&cg, &client_ns, &["--connect", VIP, "--count", "1500"]));
        }
        while t0.elapsed() < Duration::from_secs(12) {
            if canary_tests::scenarios::status(&sock, "web")["state"] == "rolled-back" {
                detected = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let status = canary_tests::scenarios::status(&sock, "web");
    let verdict = status["last_verdict"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "socket LB judge: rolled back after {:?}; {verdict}",
        detected.map(|d| format!("{:.2} s", d.as_secs_f64()))
    );
    let detected = detected.expect("the judge did not roll back a 2x slower canary within 12 s");
    assert!(
        detected <= Duration::from_secs(8),
        "detection took {detected:?}"
    );
    assert!(
        verdict.contains("latency") || verdict.contains("p99"),
        "the verdict names the latency: {verdict}"
    );
    let after = run_client(&cg, &client_ns, &["--connect", VIP, "--count", "50"]);
    assert_eq!(
        by_backend(&after),
        BTreeMap::from([("stable-1".to_string(), 50)]),
        "rolled back: nothing new to canary"
    );
}

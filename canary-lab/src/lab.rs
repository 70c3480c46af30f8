//! The lab topology: router, client and backend namespaces joined by veths,
//! with one TCP and one UDP server per backend.
//!
//! ```text
//!  client ns                    router ns                  backend ns b{i}
//!  eth0 10.200.0.2/24  <--->  cli0 10.200.0.1/24
//!  + 10.201.x.y/32 ...          b{i} 10.200.{i+1}.1/24 <---> eth0 10.200.{i+1}.2/24
//!                                                            server on :8080
//! ```
//!
//! The client sends the VIP range (10.96.0.0/16) and the backend subnets to
//! the router, which sends 10.201.0.0/16 back via 10.200.0.2. The router forwards between its interfaces but has no default
//! route, so a VIP packet that nothing steered dies there.
//!
//! Every link is dual-stack: the same topology in IPv6 is `fd00:200::/64`
//! between client and router, `fd00:200:{i+1}::/64` to backend `i`, the
//! VIP range `fd00:96::/64` and extra client addresses `fd00:201::1`
//! upwards (all added `nodad`, so they work at once). Servers listen on `[::]:8080` for
//! both families.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, ensure};

use crate::Netns;
use crate::backends::{BACKEND_PORT, BackendSet, configure_backend_ns};
use crate::netns::run;
use crate::server::Behavior;

/// Every namespace a lab creates is named `cnry-{pid}-{seq}-{role}`.
const NETNS_PREFIX: &str = "cnry-";

/// Per-process lab counter: several labs in one process (parallel tests)
/// get distinct names.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct LabSpec {
    /// One namespace and server per entry; backend `i` is `b{i}`.
    pub backends: Vec<BackendSpec>,
    /// How many extra client source addresses (10.201.0.1 upwards) to add.
    pub n_client_addrs: u32,
    /// How many extra IPv6 client source addresses (`fd00:201::1` upwards).
    pub n_client_addrs6: u32,
}

/// One backend.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// What the server answers with; must not contain a newline.
    pub name: String,
    /// How the server treats connections.
    pub behavior: Behavior,
}

/// A built lab. Dropping it stops the servers and deletes every namespace
/// (and with them every veth) it created.
#[derive(Debug)]
pub struct Lab {
    /// Declared first: its servers stop before anything else goes.
    backends: BackendSet,
    client_addrs: Vec<Ipv4Addr>,
    client_addrs6: Vec<Ipv6Addr>,
    client: Netns,
    router: Netns,
}

impl Lab {
    /// The router's client-facing interface (where the data plane attaches).
    pub const ROUTER_CLIENT_IFACE: &str = "cli0";
    /// The router's address on [`Lab::ROUTER_CLIENT_IFACE`].
    pub const ROUTER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    /// The client's address on its only interface, `eth0`.
    pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    /// First of the extra client addresses ([`Lab::client_addrs`]).
    pub const FIRST_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
    /// The router's IPv6 address on [`Lab::ROUTER_CLIENT_IFACE`].
    pub const ROUTER_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
    /// The client's IPv6 address on `eth0`.
    pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
    /// First of the extra IPv6 client addresses ([`Lab::client_addrs6`]).
    pub const FIRST_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
    /// The IPv6 VIP range (a /64) the client routes to the router.
    pub const VIP6_NET: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0);
    /// Start of the VIP range the client routes to the router.
    pub const VIP_NET: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
    /// Prefix length of the VIP range.
    pub const VIP_PREFIX_LEN: u8 = 16;
    /// Port every backend server listens on, TCP and UDP.
    pub const BACKEND_PORT: u16 = BACKEND_PORT;
    /// Most backends a lab can have (one /24 each under 10.200.0.0/16).
    pub const MAX_BACKENDS: usize = 50;
    /// Most extra client addresses a lab can have.
    pub const MAX_CLIENT_ADDRS: u32 = 4000;

    /// Builds the topology and starts a TCP and a UDP server on
    /// 0.0.0.0:8080 in every backend namespace (none for
    /// [`Behavior::Closed`]).
    ///
    /// First removes namespaces left by dead processes ([`cleanup_stale`]).
    /// Needs root. On error, everything created so far is removed again.
    pub fn build(spec: &LabSpec) -> anyhow::Result<Lab> {
        BackendSet::validate(&spec.backends, Self::MAX_BACKENDS)?;
        ensure!(
            spec.n_client_addrs <= Self::MAX_CLIENT_ADDRS,
            "{} client addresses requested, at most {} are supported",
            spec.n_client_addrs,
            Self::MAX_CLIENT_ADDRS
        );
        ensure!(
            spec.n_client_addrs6 <= Self::MAX_CLIENT_ADDRS,
            "{} IPv6 client addresses requested, at most {} are supported",
            spec.n_client_addrs6,
            Self::MAX_CLIENT_ADDRS
        );
        cleanup_stale().context("removing stale lab namespaces")?;

        let prefix = new_prefix();
        // Each Netns deletes itself on drop, so an early `?` below cleans up.
        let router = Netns::create(&format!("{prefix}-router"))?;
        let client = Netns::create(&format!("{prefix}-client"))?;
        let mut backends = BackendSet::create(&prefix, &spec.backends)?;
        let client_addrs = client_range(Self::FIRST_CLIENT_ADDR, spec.n_client_addrs);
        let client_addrs6: Vec<Ipv6Addr> = (0..spec.n_client_addrs6)
            .map(|k| Ipv6Addr::from(u128::from(Self::FIRST_CLIENT_ADDR6) + u128::from(k)))
            .collect();
        configure_router(&router, &client, backends.namespaces())?;
        configure_client(&client, &client_addrs, &client_addrs6, &[])?;
        for (i, ns) in backends.namespaces().iter().enumerate() {
            configure_backend_ns(
                ns,
                &[
                    format!("{}/24", backend_ip(i, 2)),
                    format!("{}/64", backend_ip6(i, 2)),
                ],
                &[
                    format!("default via {}", backend_ip(i, 1)),
                    format!("default via {}", backend_ip6(i, 1)),
                ],
            )?;
        }
        backends.start_servers(&spec.backends)?;
        Ok(Lab {
            backends,
            client_addrs,
            client_addrs6,
            client,
            router,
        })
    }

    /// The router namespace (forwards; the data plane attaches here).
    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// The client namespace: run [`crate::request_once`] and [`crate::Conn`]
    /// on threads inside it.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// Backend `i`'s namespace. Panics if there is no backend `i`.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self.backends.namespaces()[i]
    }

    /// Backend `i`'s server address, 10.200.{i+1}.2:8080.
    ///
    /// # Panics
    ///
    /// If there is no backend `i`.
    pub fn backend_addr(&self, i: usize) -> SocketAddrV4 {
        self.backends.check(i);
        // i < MAX_BACKENDS (50), so i + 1 fits an octet.
        SocketAddrV4::new(backend_ip(i, 2), Self::BACKEND_PORT)
    }

    /// The extra client source addresses, 10.201.0.1 upwards.
    pub fn client_addrs(&self) -> &[Ipv4Addr] {
        &self.client_addrs
    }

    /// The extra IPv6 client source addresses, `fd00:201::1` upwards.
    pub fn client_addrs6(&self) -> &[Ipv6Addr] {
        &self.client_addrs6
    }

    /// Backend `i`'s server address over IPv6, `[fd00:200:{i+1}::2]:8080`.
    ///
    /// # Panics
    ///
    /// If there is no backend `i`.
    pub fn backend_addr6(&self, i: usize) -> SocketAddr {
        self.backends.check(i);
        SocketAddr::new(IpAddr::V6(backend_ip6(i, 2)), Self::BACKEND_PORT)
    }

    /// Stops backend `i`'s servers: its listener closes, so new connections
    /// are refused (RST answering the SYN) from here on, as when a canary
    /// process dies; connections already open finish on their own. Its UDP
    /// socket closes too: datagrams get ICMP port unreachable.
    pub fn stop_backend(&mut self, i: usize) {
        self.backends.stop(i);
    }

    /// Backend `i`'s UDP server goes on reading datagrams but answers none:
    /// a hung process (no reply, and no ICMP error either).
    pub fn silence_udp_backend(&self, i: usize) {
        self.backends.silence_udp(i);
    }

    /// The backend names, in backend order.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.names().to_vec()
    }

    /// The names of every namespace of this lab (router, client, backends).
    pub fn netns_names(&self) -> Vec<String> {
        [&self.router, &self.client]
            .into_iter()
            .chain(self.backends.namespaces())
            .map(|ns| ns.name().to_owned())
            .collect()
    }
}

/// A fresh namespace name prefix `cnry-{pid}-{seq}` (see [`cleanup_stale`]).
pub(crate) fn new_prefix() -> String {
    format!(
        "{NETNS_PREFIX}{}-{}",
        std::process::id(),
        NEXT_LAB.fetch_add(1, Ordering::Relaxed)
    )
}

/// `n` consecutive addresses from `first`.
pub(crate) fn client_range(first: Ipv4Addr, n: u32) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|k| Ipv4Addr::from(u32::from(first) + k))
        .collect()
}

/// Address `host` in backend `i`'s subnet 10.200.{i+1}.0/24.
fn backend_ip(i: usize, host: u8) -> Ipv4Addr {
    let octet = u8::try_from(i + 1).expect("at most MAX_BACKENDS backends");
    Ipv4Addr::new(10, 200, octet, host)
}

/// Address `host` in backend `i`'s IPv6 subnet `fd00:200:{i+1}::/64`.
fn backend_ip6(i: usize, host: u16) -> Ipv6Addr {
    let net = u16::try_from(i + 1).expect("at most MAX_BACKENDS backends");
    Ipv6Addr::new(0xfd00, 0x200, net, 0, 0, 0, 0, host)
}

/// Creates every veth from inside the router namespace (peers go straight
/// into their namespaces, nothing touches the root namespace), addresses the
/// router side, and turns on forwarding.
///
/// The client addresses are routed *via* the client's 10.200.0.2, not
/// on-link: on-link needs one ARP entry per client address, and the kernel's
/// ARP table is shared by all namespaces with a default limit
/// (`gc_thresh3`) of 1024 entries, so a few thousand client addresses
/// overflow it and connections time out.
fn configure_router(router: &Netns, client: &Netns, backends: &[Netns]) -> anyhow::Result<()> {
    let mut batch = router_client_batch(client);
    for (i, ns) in backends.iter().enumerate() {
        batch += &format!(
            "link add b{i} type veth peer name eth0 netns {ns}\n\
             addr add {ip}/24 dev b{i}\n\
             addr add {ip6}/64 dev b{i} nodad\n\
             link set b{i} up\n",
            ns = ns.name(),
            ip = backend_ip(i, 1),
            ip6 = backend_ip6(i, 1),
        );
    }
    router.ip_batch(&batch)?;
    enable_forwarding(router)
}

/// The `ip -batch` lines that link a router to its client namespace:
/// [`Lab::ROUTER_CLIENT_IFACE`] in the router, `eth0` in the client, both
/// families, and the routes to the client address ranges.
pub(crate) fn router_client_batch(client: &Netns) -> String {
    let iface = Lab::ROUTER_CLIENT_IFACE;
    format!(
        "link set lo up\n\
         link add {iface} type veth peer name eth0 netns {client}\n\
         addr add {ip}/24 dev {iface}\n\
         addr add {ip6}/64 dev {iface} nodad\n\
         link set {iface} up\n\
         route add 10.201.0.0/16 via {client_ip} dev {iface}\n\
         route add fd00:201::/64 via {client_ip6} dev {iface}\n",
        client = client.name(),
        ip = Lab::ROUTER_CLIENT_IP,
        ip6 = Lab::ROUTER_CLIENT_IP6,
        client_ip = Lab::CLIENT_IP,
        client_ip6 = Lab::CLIENT_IP6,
    )
}

/// Turns on forwarding in a router namespace, with `rp_filter` off:
/// replies to client addresses and translated VIP traffic legitimately arrive on
/// interfaces a strict check would reject.
pub(crate) fn enable_forwarding(router: &Netns) -> anyhow::Result<()> {
    sysctl(
        router,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ],
    )
}

/// Addresses the client side, adds the extra source addresses in one `ip`
/// process, and routes VIPs and backend subnets to the router (the lab's
/// 10.200.0.0/16 and `backend_nets`, each an `ADDR/LEN`).
pub(crate) fn configure_client(
    client: &Netns,
    addrs: &[Ipv4Addr],
    addrs6: &[Ipv6Addr],
    backend_nets: &[&str],
) -> anyhow::Result<()> {
    let mut batch = format!(
        "link set lo up\n\
         addr add {ip}/24 dev eth0\n\
         addr add {ip6}/64 dev eth0 nodad\n\
         link set eth0 up\n\
         route add {vip}/{len} via {gw}\n\
         route add 10.200.0.0/16 via {gw}\n\
         route add {vip6}/64 via {gw6}\n\
         route add fd00:200::/48 via {gw6}\n",
        ip = Lab::CLIENT_IP,
        ip6 = Lab::CLIENT_IP6,
        vip = Lab::VIP_NET,
        len = Lab::VIP_PREFIX_LEN,
        gw = Lab::ROUTER_CLIENT_IP,
        vip6 = Lab::VIP6_NET,
        gw6 = Lab::ROUTER_CLIENT_IP6,
    );
    for net in backend_nets {
        batch += &format!("route add {net} via {}\n", Lab::ROUTER_CLIENT_IP);
    }
    for addr in addrs {
        batch += &format!("addr add {addr}/32 dev eth0\n");
    }
    for addr in addrs6 {
        batch += &format!("addr add {addr}/128 dev eth0 nodad\n");
    }
    client.ip_batch(&batch)?;
    // Many short connections: a wide port range and TIME_WAIT reuse keep
    // the client from running out of ports.
    sysctl(
        client,
        &[
            "net.ipv4.ip_local_port_range=10000 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    )
}

/// Sets `key=value` sysctls inside `ns`.
pub(crate) fn sysctl(ns: &Netns, settings: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["sysctl", "-qw"];
    args.extend_from_slice(settings);
    ns.exec(&args).map(drop)
}

/// Deletes every `cnry-{pid}-...` namespace whose process is gone
/// (`/proc/{pid}` missing): leftovers of a run that was killed before its
/// labs dropped. Returns the names it deleted.
///
/// A namespace whose pid was since reused by another process is kept; it
/// goes once that process is gone too. Deletion failures (another process
/// cleaning up at the same time) are logged and skipped.
pub fn cleanup_stale() -> anyhow::Result<Vec<String>> {
    let listing = run(Command::new("ip").args(["netns", "list"]), None)?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let mut removed = Vec::new();
    // Lines look like `NAME` or `NAME (id: N)`.
    for name in listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(pid) = owner_pid(name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match run(Command::new("ip").args(["netns", "del", name]), None) {
            Ok(_) => removed.push(name.to_owned()),
            Err(error) => eprintln!("canary-lab: removing stale namespace: {error:#}"),
        }
    }
    Ok(removed)
}

/// The pid in a lab namespace name `cnry-{pid}-{seq}-{role}`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Conn, request_once};
    use std::io::ErrorKind;
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    /// How long a client in the tests waits for connect and reply.
    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// Every `Lab::build` runs `cleanup_stale`, so a build on a parallel test
    /// thread could delete the fake stale namespace before the cleanup test
    /// looks; that test and the builds take turns through this lock.
    static CLEANUP: Mutex<()> = Mutex::new(());

    fn cleanup_lock() -> MutexGuard<'static, ()> {
        // A panicking test poisons the lock; the () behind it is still fine.
        CLEANUP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn build(spec: &LabSpec) -> Lab {
        let _turn = cleanup_lock();
        Lab::build(spec).unwrap_or_else(|error| panic!("building a lab from {spec:?}: {error:#}"))
    }

    /// The tests create namespaces; without root they must fail, loudly.
    fn require_root() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "canary-lab tests create network namespaces and need root (euid 0), running as euid {euid}"
        );
    }

    fn netns_list() -> String {
        let output = run(Command::new("ip").args(["netns", "list"]), None).expect("ip netns list");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn listed(listing: &str, name: &str) -> bool {
        listing
            .lines()
            .any(|line| line.split_whitespace().next() == Some(name))
    }

    fn backend(name: &str, behavior: Behavior) -> BackendSpec {
        BackendSpec {
            name: name.to_owned(),
            behavior,
        }
    }

    #[test]
    fn owner_pid_parses_lab_names_only() {
        assert_eq!(owner_pid("cnry-123-4-router"), Some(123));
        assert_eq!(owner_pid("cnry-x-4-router"), None);
        assert_eq!(owner_pid("other-123-4-router"), None);
        assert_eq!(owner_pid("cnry-123"), None);
    }

    #[test]
    fn client_reaches_each_backend_directly_through_router() {
        require_root();
        let lab = build(&LabSpec {
            backends: vec![
                backend("stable", Behavior::Reply),
                backend("canary", Behavior::Reply),
            ],
            n_client_addrs: 3,
            n_client_addrs6: 0,
        });
        assert_eq!(
            lab.client_addrs(),
            [
                Ipv4Addr::new(10, 201, 0, 1),
                Ipv4Addr::new(10, 201, 0, 2),
                Ipv4Addr::new(10, 201, 0, 3)
            ]
        );
        for (i, expected) in lab.backend_names().into_iter().enumerate() {
            let src = lab.client_addrs()[i];
            let dst = lab.backend_addr(i);
            let reply = lab
                .client()
                .spawn(move || request_once(src, dst, TEST_TIMEOUT))
                .join()
                .expect("client thread panicked")
                .expect("entering the client namespace");
            assert_eq!(
                reply.as_ref().ok(),
                Some(&expected),
                "request from {src} to {dst}: expected reply {expected:?}, got {reply:?}"
            );
        }
    }

    #[test]
    fn behaviors_reply_delay_reset_and_refuse() {
        require_root();
        let delay = Duration::from_millis(300);
        let lab = build(&LabSpec {
            backends: vec![
                backend("reply", Behavior::Reply),
                backend("slow", Behavior::FirstByteDelay(delay)),
                backend("reset", Behavior::Reset),
                backend("closed", Behavior::Closed),
            ],
            n_client_addrs: 1,
            n_client_addrs6: 0,
        });
        let src = lab.client_addrs()[0];
        let dsts: Vec<_> = (0..4).map(|i| lab.backend_addr(i)).collect();
        let (pings, slow, reset, closed) = lab
            .client()
            .spawn(move || {
                let pings = Conn::open(src, dsts[0], TEST_TIMEOUT).and_then(|mut conn| {
                    (0..3)
                        .map(|_| conn.ping())
                        .collect::<std::io::Result<Vec<_>>>()
                });
                let start = Instant::now();
                let slow = request_once(src, dsts[1], TEST_TIMEOUT).map(|r| (r, start.elapsed()));
                let reset = request_once(src, dsts[2], TEST_TIMEOUT);
                let closed = request_once(src, dsts[3], TEST_TIMEOUT);
                (pings, slow, reset, closed)
            })
            .join()
            .expect("client thread panicked")
            .expect("entering the client namespace");
        assert_eq!(
            pings.as_deref().ok(),
            Some(&["reply".to_owned(), "reply".to_owned(), "reply".to_owned()][..]),
            "three pings on one connection: got {pings:?}"
        );
        let (name, elapsed) = slow.expect("request to the slow backend");
        assert_eq!(name, "slow");
        assert!(
            elapsed >= delay,
            "slow backend answered after {elapsed:?}, expected >= {delay:?}"
        );
        let reset_kind = reset.as_ref().map_err(std::io::Error::kind);
        assert_eq!(
            reset_kind,
            Err(ErrorKind::ConnectionReset),
            "reset backend: expected ConnectionReset, got {reset:?}"
        );
        let closed_kind = closed.as_ref().map_err(std::io::Error::kind);
        assert_eq!(
            closed_kind,
            Err(ErrorKind::ConnectionRefused),
            "closed backend: expected ConnectionRefused, got {closed:?}"
        );
    }

    #[test]
    fn udp_backends_answer_fall_silent_and_refuse_once_stopped() {
        require_root();
        let mut lab = build(&LabSpec {
            backends: vec![
                backend("one", Behavior::Reply),
                backend("two", Behavior::Reply),
            ],
            n_client_addrs: 1,
            n_client_addrs6: 0,
        });
        let src = lab.client_addrs()[0];
        let (one, two) = (lab.backend_addr(0), lab.backend_addr(1));
        let ask = |lab: &Lab, dst| {
            lab.client()
                .spawn(move || {
                    crate::UdpConn::open(src, dst, Duration::from_millis(300))
                        .and_then(|mut c| c.ping())
                        .map_err(|e| e.kind())
                })
                .join()
                .expect("client thread panicked")
                .expect("entering the client namespace")
        };
        assert_eq!(ask(&lab, one), Ok("one".to_owned()));
        assert_eq!(ask(&lab, two), Ok("two".to_owned()));
        lab.silence_udp_backend(0);
        assert!(
            matches!(
                ask(&lab, one),
                Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)
            ),
            "a silenced backend answers nothing"
        );
        lab.stop_backend(1);
        assert_eq!(
            ask(&lab, two),
            Err(ErrorKind::ConnectionRefused),
            "a stopped backend's port unreachable reaches the connected socket"
        );
    }

    #[test]
    fn dropping_lab_deletes_its_namespaces() {
        require_root();
        let lab = build(&LabSpec {
            backends: vec![
                backend("a", Behavior::Reply),
                backend("b", Behavior::Closed),
            ],
            n_client_addrs: 0,
            n_client_addrs6: 0,
        });
        let names = lab.netns_names();
        let before = netns_list();
        for name in &names {
            assert!(
                listed(&before, name),
                "{name} missing while the lab lives:\n{before}"
            );
        }
        drop(lab);
        let after = netns_list();
        let left: Vec<_> = names.iter().filter(|name| listed(&after, name)).collect();
        assert!(
            left.is_empty(),
            "namespaces left after drop: {left:?}\n{after}"
        );
    }

    #[test]
    fn cleanup_stale_removes_namespaces_of_dead_processes() {
        require_root();
        // No process has pid 999999999 (above the kernel's pid_max limit).
        let stale = "cnry-999999999-0-router";
        let _turn = cleanup_lock();
        if !listed(&netns_list(), stale) {
            run(Command::new("ip").args(["netns", "add", stale]), None)
                .expect("creating a stale namespace");
        }
        let removed = cleanup_stale().expect("cleanup_stale");
        assert!(
            removed.iter().any(|name| name == stale),
            "cleanup_stale should report {stale}, reported {removed:?}"
        );
        let after = netns_list();
        assert!(!listed(&after, stale), "{stale} still listed:\n{after}");
    }
}

//! A fleet of canary nodes: N router namespaces, each with its own client
//! namespace and client addresses, all reaching the same backends, and all
//! linked to one etcd network, from which any one node can be cut off.
//!
//! ```text
//!  node k (k = 0..N):
//!   client ns k                router ns k                  fabric ns (bridge br0)     backend ns b{i}
//!   eth0 10.200.0.2/24 <-----> cli0 10.200.0.1/24
//!   + 10.201.{16k}.1 ...       back0 10.202.0.{1+k}/24 <--> r{k} ─┐
//!                                                               br0 ── b{i} <--> eth0 10.202.0.{101+i}/24
//!                              etcd0 10.250.0.{101+k}/24 <-> n{k} ─┐                 server on :8080
//!                                                         etcd ns: br0, members 10.250.0.{11+j}
//! ```
//!
//! Each node is a [`crate::Lab`] router/client pair (same interface names
//! and addresses, built by the same code), so agent configs written for the
//! Lab work per node. Node k's clients own 10.201.{16k}.0/20, which the
//! backends route back through router k; the client's own `eth0` address
//! is the same on every node, so drive traffic from
//! [`FleetNode::client_addrs`]. The VIP range stays inside each node's
//! client/router pair. Nothing is added to the host namespace: the backend
//! fabric and the etcd network are namespaces of their own (`cnry-…`,
//! removed by [`crate::cleanup_stale`] if a run dies).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, ensure};

use crate::Netns;
use crate::backends::{BACKEND_PORT, BackendSet, configure_backend_ns};
use crate::lab::{
    BackendSpec, Lab, cleanup_stale, client_range, configure_client, enable_forwarding, new_prefix,
    router_client_batch,
};

/// The network etcd members listen on: a namespace with a bridge `br0`
/// holding every member's address. Routers of a [`FleetLab`] join the
/// bridge through a veth each (one fleet per etcd network). Deleted on drop;
/// whoever runs processes in it must end them first.
#[derive(Debug)]
pub struct EtcdNet {
    ns: Netns,
    members: usize,
}

impl EtcdNet {
    /// The etcd network, a /24.
    pub const NET: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 0);
    /// Prefix length of [`EtcdNet::NET`].
    pub const PREFIX_LEN: u8 = 24;
    /// The bridge in the etcd namespace.
    pub const BRIDGE: &str = "br0";
    /// Most members (addresses 10.250.0.11 to .90).
    pub const MAX_MEMBERS: usize = 80;

    /// Creates the namespace `cnry-{pid}-{seq}-etcd` with the bridge and
    /// the addresses of `members` members on it. First removes namespaces
    /// left by dead processes ([`cleanup_stale`]).
    pub fn create(members: usize) -> anyhow::Result<EtcdNet> {
        ensure!(
            (1..=Self::MAX_MEMBERS).contains(&members),
            "{members} etcd members requested, 1 to {} are supported",
            Self::MAX_MEMBERS
        );
        cleanup_stale().context("removing stale lab namespaces")?;
        let ns = Netns::create(&format!("{}-etcd", new_prefix()))?;
        let bridge = Self::BRIDGE;
        let mut batch = format!(
            "link set lo up\n\
             link add {bridge} type bridge\n\
             link set {bridge} up\n"
        );
        for i in 0..members {
            batch += &format!(
                "addr add {}/{} dev {bridge}\n",
                Self::member_ip(i),
                Self::PREFIX_LEN
            );
        }
        ns.ip_batch(&batch)?;
        Ok(EtcdNet { ns, members })
    }

    /// Member `i`'s address, 10.250.0.{11+i}.
    ///
    /// # Panics
    ///
    /// If `i` is not below [`EtcdNet::MAX_MEMBERS`].
    pub fn member_ip(i: usize) -> Ipv4Addr {
        assert!(i < Self::MAX_MEMBERS, "etcd member {i} out of range");
        Ipv4Addr::new(10, 250, 0, 11 + u8::try_from(i).expect("below MAX_MEMBERS"))
    }

    /// How many member addresses there are.
    pub fn members(&self) -> usize {
        self.members
    }

    /// The namespace the members run in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct FleetSpec {
    /// How many nodes (router and client namespace pairs).
    pub nodes: usize,
    /// Backends every node reaches; backend `i` is `b{i}`.
    pub backends: Vec<BackendSpec>,
    /// Client source addresses per node (10.201.{16k}.1 upwards on node k).
    pub n_client_addrs: u32,
}

/// One node of a [`FleetLab`]: a router (where its agent runs and
/// attaches) and its own client namespace.
#[derive(Debug)]
pub struct FleetNode {
    index: usize,
    client_addrs: Vec<Ipv4Addr>,
    client: Netns,
    router: Netns,
}

impl FleetNode {
    /// Which node this is.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The router namespace: run the node's agent here.
    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// The node's client namespace: run [`crate::request_once`] and
    /// [`crate::Conn`] on threads inside it.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The node's client source addresses, 10.201.{16k}.1 upwards.
    pub fn client_addrs(&self) -> &[Ipv4Addr] {
        &self.client_addrs
    }

    /// The router's client-facing interface, where the agent attaches
    /// (`cli0`, as in [`Lab`]).
    pub fn iface(&self) -> &'static str {
        Lab::ROUTER_CLIENT_IFACE
    }

    /// The router's address on the etcd network, 10.250.0.{101+k}
    /// (interface [`FleetLab::ROUTER_ETCD_IFACE`]).
    pub fn etcd_ip(&self) -> Ipv4Addr {
        FleetLab::router_etcd_ip(self.index)
    }

    /// The router's address on the backend fabric, 10.202.0.{1+k}.
    pub fn fabric_ip(&self) -> Ipv4Addr {
        FleetLab::router_fabric_ip(self.index)
    }
}

/// A built fleet. Dropping it stops the servers and deletes every namespace
/// it created (and with them every veth, including those in the etcd
/// network).
#[derive(Debug)]
pub struct FleetLab {
    /// Declared first: its servers stop before anything else goes.
    backends: BackendSet,
    nodes: Vec<FleetNode>,
    fabric: Netns,
    /// The etcd network the routers are linked to (not owned).
    etcd: Option<Netns>,
}

impl FleetLab {
    /// Most nodes (one 10.201.{16k}.0/20 client range each).
    pub const MAX_NODES: usize = 16;
    /// Most client addresses per node.
    pub const MAX_CLIENT_ADDRS: u32 = 4000;
    /// Most backends (10.202.0.101 to .150).
    pub const MAX_BACKENDS: usize = 50;
    /// The router's interface to the etcd network.
    pub const ROUTER_ETCD_IFACE: &str = "etcd0";
    /// The router's interface to the backend fabric.
    pub const ROUTER_FABRIC_IFACE: &str = "back0";
    /// The backend fabric, a /24 shared by all routers and backends.
    pub const FABRIC_NET: &str = "10.202.0.0/24";

    /// Builds `spec.nodes` nodes, the shared backends (a TCP and a UDP
    /// server on 0.0.0.0:8080 each, none for `Behavior::Closed`) and, if
    /// `etcd` is given, links every router to that etcd network.
    ///
    /// First removes namespaces left by dead processes. Needs root. On
    /// error, everything created so far is removed again.
    pub fn build(spec: &FleetSpec, etcd: Option<&EtcdNet>) -> anyhow::Result<FleetLab> {
        ensure!(
            (1..=Self::MAX_NODES).contains(&spec.nodes),
            "{} nodes requested, 1 to {} are supported",
            spec.nodes,
            Self::MAX_NODES
        );
        ensure!(
            spec.n_client_addrs <= Self::MAX_CLIENT_ADDRS,
            "{} client addresses per node requested, at most {} are supported",
            spec.n_client_addrs,
            Self::MAX_CLIENT_ADDRS
        );
        BackendSet::validate(&spec.backends, Self::MAX_BACKENDS)?;
        cleanup_stale().context("removing stale lab namespaces")?;

        let prefix = new_prefix();
        // Each Netns deletes itself on drop, so an early `?` cleans up.
        let fabric = Netns::create(&format!("{prefix}-fabric"))?;
        let mut backends = BackendSet::create(&prefix, &spec.backends)?;
        let nodes = (0..spec.nodes)
            .map(|k| {
                Ok(FleetNode {
                    index: k,
                    client_addrs: client_range(Self::first_client_addr(k), spec.n_client_addrs),
                    client: Netns::create(&format!("{prefix}-n{k}-client"))?,
                    router: Netns::create(&format!("{prefix}-n{k}-router"))?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let etcd = etcd.map(|net| Netns::attach(net.ns().name())).transpose()?;

        configure_fabric(&fabric, &nodes, backends.namespaces())?;
        for node in &nodes {
            configure_node(node, etcd.as_ref())?;
        }
        let back_routes: Vec<String> = nodes
            .iter()
            .map(|node| format!("{} via {}", Self::client_net(node.index), node.fabric_ip()))
            .collect();
        for (i, ns) in backends.namespaces().iter().enumerate() {
            configure_backend_ns(ns, &[format!("{}/24", Self::backend_ip(i))], &back_routes)?;
        }
        backends.start_servers(&spec.backends)?;
        Ok(FleetLab {
            backends,
            nodes,
            fabric,
            etcd,
        })
    }

    /// Node `k`. Panics if there is no node `k`.
    pub fn node(&self, k: usize) -> &FleetNode {
        &self.nodes[k]
    }

    /// Every node, in order.
    pub fn nodes(&self) -> &[FleetNode] {
        &self.nodes
    }

    /// Backend `i`'s server address, 10.202.0.{101+i}:8080, the same from
    /// every node.
    ///
    /// # Panics
    ///
    /// If there is no backend `i`.
    pub fn backend_addr(&self, i: usize) -> SocketAddrV4 {
        self.backends.check(i);
        SocketAddrV4::new(Self::backend_ip(i), BACKEND_PORT)
    }

    /// Backend `i`'s namespace. Panics if there is no backend `i`.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self.backends.namespaces()[i]
    }

    /// The backend names, in backend order.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends.names().to_vec()
    }

    /// Stops backend `i`'s servers, as [`Lab::stop_backend`].
    pub fn stop_backend(&mut self, i: usize) {
        self.backends.stop(i);
    }

    /// Backend `i`'s UDP server answers nothing, as
    /// [`Lab::silence_udp_backend`].
    pub fn silence_udp_backend(&self, i: usize) {
        self.backends.silence_udp(i);
    }

    /// Cuts node `k` off from etcd: its link into the etcd network's bridge
    /// goes down on the etcd side, so every packet between the node and
    /// any member is dropped, on new and established connections alike,
    /// silently (no RST, no ICMP: the node's TCP stack only notices through
    /// its own timeouts, as behind a real partition). The node's router,
    /// data plane and client traffic are untouched.
    pub fn partition(&self, k: usize) -> anyhow::Result<()> {
        self.set_etcd_link(k, "down")
    }

    /// Undoes [`FleetLab::partition`]: established connections that have not
    /// timed out carry on (TCP retransmits), new ones connect.
    pub fn heal(&self, k: usize) -> anyhow::Result<()> {
        self.set_etcd_link(k, "up")
    }

    fn set_etcd_link(&self, k: usize, state: &str) -> anyhow::Result<()> {
        ensure!(
            k < self.nodes.len(),
            "node {k} requested, the fleet has {}",
            self.nodes.len()
        );
        let etcd = self
            .etcd
            .as_ref()
            .context("this fleet was built without an etcd network")?;
        etcd.ip(&["link", "set", &format!("n{k}"), state])
    }

    /// The names of every namespace of this fleet (not the etcd network's).
    pub fn netns_names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|node| [&node.router, &node.client])
            .chain([&self.fabric])
            .chain(self.backends.namespaces())
            .map(|ns| ns.name().to_owned())
            .collect()
    }

    /// First client address of node `k`, 10.201.{16k}.1.
    fn first_client_addr(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, Self::node_octet(k) * 16, 1)
    }

    /// Node `k`'s client range, 10.201.{16k}.0/20.
    fn client_net(k: usize) -> String {
        format!("10.201.{}.0/20", Self::node_octet(k) * 16)
    }

    fn router_fabric_ip(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, 0, 1 + Self::node_octet(k))
    }

    fn router_etcd_ip(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, 0, 101 + Self::node_octet(k))
    }

    fn backend_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            202,
            0,
            101 + u8::try_from(i).expect("at most MAX_BACKENDS backends"),
        )
    }

    fn node_octet(k: usize) -> u8 {
        u8::try_from(k)
            .ok()
            .filter(|&k| usize::from(k) < Self::MAX_NODES)
            .expect("at most MAX_NODES nodes")
    }
}

/// The backend fabric: a bridge `br0` in `fabric` with one veth port per
/// router (`r{k}`, `back0` in the router) and per backend (`b{i}`, `eth0`
/// in the backend). Created from inside the fabric namespace, so nothing
/// touches the host namespace.
fn configure_fabric(fabric: &Netns, nodes: &[FleetNode], backends: &[Netns]) -> anyhow::Result<()> {
    let mut batch = String::from(
        "link set lo up\n\
         link add br0 type bridge\n\
         link set br0 up\n",
    );
    let ports = nodes
        .iter()
        .map(|node| {
            (
                format!("r{}", node.index),
                FleetLab::ROUTER_FABRIC_IFACE,
                &node.router,
            )
        })
        .chain(
            backends
                .iter()
                .enumerate()
                .map(|(i, ns)| (format!("b{i}"), "eth0", ns)),
        );
    for (port, peer, ns) in ports {
        batch += &format!(
            "link add {port} type veth peer name {peer} netns {ns}\n\
             link set {port} master br0\n\
             link set {port} up\n",
            ns = ns.name()
        );
    }
    fabric.ip_batch(&batch)
}

/// Links node's router to its client (as in a [`Lab`]), addresses its
/// fabric interface, and links it to the etcd network if there is one.
fn configure_node(node: &FleetNode, etcd: Option<&Netns>) -> anyhow::Result<()> {
    if let Some(etcd) = etcd {
        let port = format!("n{}", node.index);
        etcd.ip_batch(&format!(
            "link add {port} type veth peer name {peer} netns {router}\n\
             link set {port} master {bridge}\n\
             link set {port} up\n",
            peer = FleetLab::ROUTER_ETCD_IFACE,
            router = node.router.name(),
            bridge = EtcdNet::BRIDGE,
        ))?;
    }
    let mut batch = router_client_batch(&node.client);
    batch += &format!(
        "addr add {ip}/24 dev {iface}\n\
         link set {iface} up\n",
        ip = node.fabric_ip(),
        iface = FleetLab::ROUTER_FABRIC_IFACE,
    );
    if etcd.is_some() {
        batch += &format!(
            "addr add {ip}/{len} dev {iface}\n\
             link set {iface} up\n",
            ip = node.etcd_ip(),
            len = EtcdNet::PREFIX_LEN,
            iface = FleetLab::ROUTER_ETCD_IFACE,
        );
    }
    node.router.ip_batch(&batch)?;
    enable_forwarding(&node.router)?;
    configure_client(
        &node.client,
        &node.client_addrs,
        &[],
        &[FleetLab::FABRIC_NET],
    )
}

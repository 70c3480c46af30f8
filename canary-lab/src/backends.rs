//! The backend side every topology shares: one namespace per backend with a
//! TCP and a UDP server on port 8080, stopped and silenced on demand.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use anyhow::ensure;

use crate::Netns;
use crate::lab::{BackendSpec, sysctl};
use crate::server::{Behavior, Server};
use crate::udp::UdpServer;

/// Port every backend server listens on, TCP and UDP.
pub(crate) const BACKEND_PORT: u16 = 8080;

/// The backends of a lab: their namespaces and servers. Dropping it stops
/// every server (all signalled before any is waited for), then deletes the
/// namespaces.
#[derive(Debug)]
pub(crate) struct BackendSet {
    /// Declared first: dropped before the namespaces they live in.
    /// One per backend, `None` for `Behavior::Closed` or a stopped server.
    servers: Vec<Option<Server>>,
    /// The UDP servers on the same port, likewise.
    udp_servers: Vec<Option<UdpServer>>,
    namespaces: Vec<Netns>,
    names: Vec<String>,
}

impl BackendSet {
    /// Checks `specs` (at most `max`, names non-empty and one line).
    pub(crate) fn validate(specs: &[BackendSpec], max: usize) -> anyhow::Result<()> {
        ensure!(
            specs.len() <= max,
            "{} backends requested, at most {max} are supported",
            specs.len(),
        );
        for backend in specs {
            ensure!(
                !backend.name.is_empty() && !backend.name.contains('\n'),
                "backend name {:?} must be non-empty and one line (it is the reply line)",
                backend.name
            );
        }
        Ok(())
    }

    /// Creates namespace `{prefix}-b{i}` for every backend; no servers yet.
    /// On error, the namespaces created so far are deleted again.
    pub(crate) fn create(prefix: &str, specs: &[BackendSpec]) -> anyhow::Result<BackendSet> {
        Ok(BackendSet {
            servers: Vec::new(),
            udp_servers: Vec::new(),
            namespaces: (0..specs.len())
                .map(|i| Netns::create(&format!("{prefix}-b{i}")))
                .collect::<anyhow::Result<_>>()?,
            names: specs.iter().map(|b| b.name.clone()).collect(),
        })
    }

    /// Starts a TCP and a UDP server on `[::]:8080` in every backend
    /// namespace (none for [`Behavior::Closed`]); call once the namespaces
    /// are addressed.
    pub(crate) fn start_servers(&mut self, specs: &[BackendSpec]) -> anyhow::Result<()> {
        let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), BACKEND_PORT);
        for (ns, backend) in self.namespaces.iter().zip(specs) {
            if backend.behavior == Behavior::Closed {
                self.servers.push(None);
                self.udp_servers.push(None);
                continue;
            }
            self.servers.push(Some(Server::start(
                ns,
                addr,
                &backend.name,
                backend.behavior,
            )?));
            self.udp_servers.push(Some(UdpServer::start(
                ns,
                addr,
                &backend.name,
                backend.behavior,
            )?));
        }
        Ok(())
    }

    /// The backend namespaces, in backend order.
    pub(crate) fn namespaces(&self) -> &[Netns] {
        &self.namespaces
    }

    /// How many backends there are.
    pub(crate) fn len(&self) -> usize {
        self.namespaces.len()
    }

    /// Panics unless backend `i` exists.
    pub(crate) fn check(&self, i: usize) {
        assert!(
            i < self.len(),
            "backend {i} requested, the lab has {}",
            self.len()
        );
    }

    /// The backend names, in backend order.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// Stops backend `i`'s TCP and UDP servers (see `Lab::stop_backend`).
    pub(crate) fn stop(&mut self, i: usize) {
        if let Some(server) = self.servers.get_mut(i).and_then(Option::take) {
            drop(server);
        }
        if let Some(server) = self.udp_servers.get_mut(i).and_then(Option::take) {
            drop(server);
        }
    }

    /// Backend `i`'s UDP server reads on but answers nothing.
    pub(crate) fn silence_udp(&self, i: usize) {
        if let Some(Some(server)) = self.udp_servers.get(i) {
            server.silence();
        }
    }
}

impl Drop for BackendSet {
    fn drop(&mut self) {
        // Signal every server before waiting for any, so stopping takes one
        // poll interval rather than one per backend.
        for server in self.servers.iter().flatten() {
            server.signal_stop();
        }
        for server in self.udp_servers.iter().flatten() {
            server.signal_stop();
        }
        self.servers.clear();
        self.udp_servers.clear();
        // The Netns drops delete the namespaces (and log, never panic, on
        // error).
    }
}

/// Addresses a backend's only interface `eth0` with `addrs` (CIDR; IPv6
/// ones `nodad`, so they work at once), adds `routes` (`ip route add`
/// arguments), and turns off ICMP error rate limits: a stopped backend
/// answers every datagram to its closed port with a port unreachable, as a
/// test of refusals expects (the default limit lets a few through per
/// second and client address).
pub(crate) fn configure_backend_ns(
    ns: &Netns,
    addrs: &[String],
    routes: &[String],
) -> anyhow::Result<()> {
    let mut batch = String::from("link set lo up\n");
    for addr in addrs {
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        batch += &format!("addr add {addr} dev eth0{nodad}\n");
    }
    batch += "link set eth0 up\n";
    for route in routes {
        batch += &format!("route add {route}\n");
    }
    ns.ip_batch(&batch)?;
    sysctl(
        ns,
        &["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"],
    )
}

//! A network-namespace lab for canary: a router namespace between one
//! client namespace and N backend namespaces, real TCP and UDP servers in
//! the backends and client helpers to drive them. Used by `cargo xtask demo`
//! and by the privileged integration tests. Everything here needs root.
//!
//! ```no_run
//! use canary_lab::{BackendSpec, Behavior, Lab, LabSpec, request_once};
//! use std::time::Duration;
//!
//! let lab = Lab::build(&LabSpec {
//!     backends: vec![BackendSpec { name: "stable".into(), behavior: Behavior::Reply }],
//!     n_client_addrs: 10,
//!     n_client_addrs6: 0,
//! })?;
//! let (src, dst) = (lab.client_addrs()[0], lab.backend_addr(0));
//! // Client sockets must be created inside the client namespace.
//! let reply = lab.client().spawn(move || request_once(src, dst, Duration::from_secs(2))).join();
//! # anyhow::Ok(())
//! ```
//!
//! [`FleetLab`] builds several such router/client pairs ("nodes") sharing
//! one set of backends, linked to an [`EtcdNet`] that one node at a time
//! can be cut off from (`partition`/`heal`); see `fleet.rs`.
//!
//! No traffic leaves the lab: every interface lives in a namespace the lab
//! created, and client sockets are only ever created inside the client
//! namespace.

mod agent;
mod backends;
mod client;
mod fleet;
mod lab;
mod netns;
mod server;
mod udp;

pub use agent::{
    AgentProcess, READY, RELOAD_REJECTED, RELOADED, Stop, agent_binary, canaryctl_binary, lab_bpffs,
};
pub use client::{ClientSide, Conn, request_once};
pub use fleet::{EtcdNet, FleetLab, FleetNode, FleetSpec};
pub use lab::{BackendSpec, Lab, LabSpec, cleanup_stale};
pub use netns::Netns;
pub use server::Behavior;
pub use udp::{UdpConn, udp_request_once};

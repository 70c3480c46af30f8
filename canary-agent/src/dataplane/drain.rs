//! The drain deadline: after a rollback, the canary connections and flows
//! of a service still open once its `drain_deadline` has passed are ended,
//! each path the way it can be:
//!
//! - TCP at TC: the agent marks the connection (`ST_DRAIN`); the data plane
//!   turns its client's next segment into a RST to the backend, and the
//!   backend's answer to the client's next one resets the client.
//! - UDP at TC: the agent marks the flow and the sweep program ends it now;
//!   the client's next datagram is a new flow, steered by the weight in
//!   force (stable after a rollback).
//! - Unconnected UDP sockets steered at the socket: the agent marks the
//!   flow (`SU_DRAIN`); its next datagram starts a new flow.
//! - Connected sockets steered at the socket (TCP, connected UDP): no
//!   packet of theirs passes a hook of ours, so the agent aborts them
//!   through `sock_diag` (`SOCK_DESTROY`, like `ss -K`) in its own network
//!   namespace and in those of the socket-LB cgroup's processes, and
//!   recognises them by {cookie, backend} in `SOCK_STEERED`: a TCP
//!   peer gets a RST, the owner's next call fails with `ECONNABORTED`.
//!
//! The marks are not atomic with the kernel's ORs: a bit it sets in
//! between is lost, on a flow that is ending.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
};

use canary_common::{
    addr::Addr,
    flow::{CT_REVERSE, CtEntry, FlowKey, ST_CLOSED, ST_DRAIN, ST_RST, sweep},
    service::COHORT_CANARY,
    sock::{SU_DRAIN, SockRevKey},
};
use tracing::warn;

use super::{BPF_EXIST, Dataplane, DataplaneError, Program, sweep::sweep_frame};
use crate::{sockdiag, sys};

/// What the drain deadline did to one service's canary traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// TCP connections at TC marked: each is reset at its client's next
    /// segment (`drain_reset` counts them then).
    pub tcp_marked: u64,
    /// UDP flows at TC ended now (counted as `drain_reset`).
    pub udp_ended: u64,
    /// Flows of unconnected UDP sockets steered at the socket, marked: the
    /// socket's next datagram to the VIP starts a new flow (counted as
    /// `drain_reset` then).
    pub socket_udp_marked: u64,
    /// Connected sockets steered at the socket (TCP, connected UDP)
    /// aborted now.
    pub sockets_aborted: u64,
    /// Why some steered sockets could not be looked for or aborted (a
    /// network namespace the agent may not enter, say); empty if none.
    pub missed: Vec<String>,
}

impl std::fmt::Display for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} TCP connections marked for reset, {} UDP flows ended, {} socket UDP flows marked, {} sockets aborted",
            self.tcp_marked, self.udp_ended, self.socket_udp_marked, self.sockets_aborted
        )?;
        for m in &self.missed {
            write!(f, "; not aborted: {m}")?;
        }
        Ok(())
    }
}

impl Dataplane {
    /// Ends the canary traffic of the rolled-back `service` (canary backends
    /// `canary`) still open past its drain deadline (see the module's
    /// text). One walk of each map and one socket listing per network
    /// namespace, on the agent's thread, once per rollback: at the default
    /// capacities a fraction of a second.
    pub fn drain_canary(
        &mut self,
        service: &str,
        canary: &[SocketAddr],
    ) -> Result<Drained, DataplaneError> {
        let Some(svc_id) = self.installed.get(service).map(|s| s.value.svc_id) else {
            return Ok(Drained::default());
        };
        let open_canary = |ct: &CtEntry| {
            ct.svc_id == svc_id
                && ct.cohort == COHORT_CANARY
                && ct.flags & CT_REVERSE == 0
                && ct.state & (ST_CLOSED | ST_RST | ST_DRAIN) == 0
        };
        let mut drained = Drained::default();
        let keys: Vec<FlowKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for key in keys {
            let Ok(mut fwd) = self.conntrack.get(&key, 0) else {
                continue;
            };
            if !open_canary(&fwd) {
                continue;
            }
            fwd.state |= ST_DRAIN;
            if self.conntrack.insert(key, fwd, BPF_EXIST).is_ok() {
                drained.tcp_marked += 1;
            }
        }
        let mut udp = Vec::new();
        for (key, mut fwd) in self.udp_flows() {
            if !open_canary(&fwd) {
                continue;
            }
            fwd.state |= ST_DRAIN;
            if self.ct_udp.insert(key, fwd, BPF_EXIST).is_ok() {
                udp.push(key);
            }
        }
        // Ended now rather than at the next sweep (which would end them
        // too): the sweep program counts each close once.
        for batch in udp.chunks(sweep::BATCH) {
            let (ret, _) = self.test_run(Program::UdpSweep, &sweep_frame(batch))?;
            drained.udp_ended += u64::from(sweep::counts(ret).0);
        }
        let flows: Vec<SockRevKey> = self.sock_udp.keys().filter_map(Result::ok).collect();
        for key in flows {
            let Ok(mut flow) = self.sock_udp.get(&key, 0) else {
                continue;
            };
            if flow.svc_id != svc_id || flow.cohort != COHORT_CANARY || flow.state & SU_DRAIN != 0 {
                continue;
            }
            flow.state |= SU_DRAIN;
            if self.sock_udp.insert(key, flow, BPF_EXIST).is_ok() {
                drained.socket_udp_marked += 1;
            }
        }
        if self.socket_lb.is_some() {
            self.abort_steered_sockets(svc_id, canary, &mut drained);
        }
        Ok(drained)
    }

    /// Aborts the connected sockets the socket LB steered to one of
    /// `canary` for service `svc_id`: listed by `sock_diag`, recognised by
    /// their {cookie, peer} in `SOCK_STEERED` (a socket that dialled the
    /// backend's own address is left alone).
    fn abort_steered_sockets(&self, svc_id: u32, canary: &[SocketAddr], drained: &mut Drained) {
        let canary: BTreeSet<(Addr, u16)> = canary
            .iter()
            .map(|a| (Addr::from(a.ip()), a.port().to_be()))
            .collect();
        let steered: HashSet<(u64, Addr, u16)> = self
            .sock_steered
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.svc_id == svc_id && canary.contains(&(k.addr, k.port)))
            .map(|(k, _)| (k.cookie, k.addr, k.port))
            .collect();
        if steered.is_empty() {
            return;
        }
        let abort = || -> Result<u64, String> {
            let mut aborted = 0;
            for protocol in [libc::IPPROTO_TCP, libc::IPPROTO_UDP] {
                let protocol = u8::try_from(protocol).unwrap_or(0);
                let sockets = sockdiag::list(protocol).map_err(|e| format!("list sockets: {e}"))?;
                for s in sockets {
                    let peer = (s.cookie, Addr::from(s.peer.ip()), s.peer.port().to_be());
                    if !steered.contains(&peer) {
                        continue;
                    }
                    match sockdiag::destroy(&s) {
                        Ok(()) => aborted += 1,
                        // Closed meanwhile.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(format!("abort {} → {}: {e}", s.local, s.peer));
                        }
                    }
                }
            }
            Ok(aborted)
        };
        let mut tally = |place: String, result: Result<u64, String>| match result {
            Ok(n) => drained.sockets_aborted += n,
            Err(e) => drained.missed.push(format!("{place}: {e}")),
        };
        tally("the agent's network namespace".to_string(), abort());
        let Some(cgroup) = self.socket_lb() else {
            return;
        };
        match sys::foreign_netns_in_cgroup(cgroup) {
            Ok((pids, hidden)) => {
                if hidden > 0 {
                    tally(
                        format!("{hidden} processes of {}", cgroup.display()),
                        Err("outside the agent's PID namespace: their sockets in network namespaces other than the agent's were not looked for (run the agent in the host's PID namespace)".to_string()),
                    );
                }
                for pid in pids {
                    let place = format!("the network namespace of process {pid}");
                    match sys::in_netns_of(pid, abort) {
                        Ok(result) => tally(place, result),
                        Err(e) => tally(
                            place,
                            Err(format!(
                                "cannot enter it ({e}; entering a namespace takes CAP_SYS_ADMIN)"
                            )),
                        ),
                    }
                }
            }
            Err(e) => tally(
                format!("the processes of {}", cgroup.display()),
                Err(format!("cannot list their network namespaces: {e}")),
            ),
        }
        for m in &drained.missed {
            warn!(missed = %m, "some canary sockets past the drain deadline were not aborted");
        }
    }
}

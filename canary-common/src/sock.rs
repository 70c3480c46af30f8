//! Socket-level steering: what the cgroup programs (`connect4/6`,
//! `getpeername4/6`) and the socket tracepoints share with the agent.
//!
//! A connection from a process on the node is steered once, in `connect()`:
//! the destination the application dialled (a VIP) is replaced by the
//! chosen backend before the kernel sends anything, so no packet of it is
//! ever rewritten. The socket carries a [`SockTag`] (socket-local storage,
//! freed with the socket) naming its service, cohort and stats slot; the
//! tracepoint programs find it from the socket alone and count into the
//! same `STATS` slots and `HISTOGRAMS` entries as the packet path. A
//! [`SockRevKey`] → [`SockRevValue`] entry lets `getpeername()` return the
//! VIP the application dialled.
//!
//! Addresses are [`Addr`]s (16 bytes, IPv4 mapped) and families the
//! [`crate::addr`] family numbers, as in every other map.

use crate::{addr::Addr, flow::SYN_RETRY_MIN_NS};

/// `SOCK_TAGS` value (socket storage): what a steered socket is, written
/// once by `connect4/6` and then only changed in `state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTag {
    /// The VIP the application dialled.
    pub vip: Addr,
    /// The backend the connection went to.
    pub backend: Addr,
    /// The VIP's port, network byte order.
    pub vip_port: u16,
    /// The backend's port, network byte order.
    pub backend_port: u16,
    /// [`crate::service::COHORT_STABLE`] or [`crate::service::COHORT_CANARY`].
    pub cohort: u8,
    /// The service's family ([`crate::addr::FAMILY_V4`] or `FAMILY_V6`).
    pub family: u8,
    /// The socket's IP protocol (TCP or UDP).
    pub proto: u8,
    pub _pad: u8,
    /// The service the socket was steered for.
    pub svc_id: u32,
    /// The backend's `STATS` slot.
    pub stats_slot: u32,
    /// The socket's cookie (`SOCK_REVNAT` key).
    pub cookie: u64,
    /// `bpf_ktime_get_ns` at `connect()`.
    pub connect_ns: u64,
    /// `bpf_ktime_get_ns` of the first payload sent (`SK_REQUEST`).
    pub request_ns: u64,
    /// `SK_*` bits, set with atomic ORs: each event counts once per
    /// connection whichever program (or which of two programs running
    /// side by side while one replaces the other) sees it first.
    pub state: u64,
}
const _: () = assert!(core::mem::size_of::<SockTag>() == 80);

/// The socket entered `SYN_SENT`: its connection was counted.
pub const SK_OPENED: u64 = 1 << 0;
/// `SYN_SENT` → `ESTABLISHED`: the handshake completed and was timed.
pub const SK_ESTABLISHED: u64 = 1 << 1;
/// The client sent payload; `request_ns` is set.
pub const SK_REQUEST: u64 = 1 << 2;
/// The first payload received after a request was timed.
pub const SK_RESPONSE: u64 = 1 << 3;
/// A SYN was retransmitted (counted once per connection).
pub const SK_SYN_RETRIED: u64 = 1 << 4;
/// The backend's first RST was counted (refused or reset).
pub const SK_RST_FROM_BACKEND: u64 = 1 << 5;
/// The client's first RST was counted.
pub const SK_RST_FROM_CLIENT: u64 = 1 << 6;
/// The connection's first failure was counted: a connection fails once,
/// whatever else goes wrong with it (the packet path's `ST_FAILED`).
pub const SK_FAILED: u64 = 1 << 7;
/// The socket reached `CLOSE` and its end was counted.
pub const SK_CLOSED: u64 = 1 << 8;

/// How the end of a steered TCP socket (its move to `CLOSE`) counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEnd {
    /// It never reached `SYN_SENT` (a local error in `connect()`): it was
    /// never counted as a connection, so its end is not counted either.
    Uncounted,
    /// It left `SYN_SENT` with neither a SYN-ACK nor a RST, after at least
    /// [`SYN_RETRY_MIN_NS`]: the kernel gave up after its SYN retries, an
    /// ICMP error ended it, or the application stopped waiting. A
    /// handshake timeout, as the agent's sweep counts one on the packet
    /// path (`TIMEOUTS`, not `closed`).
    TimedOut,
    /// A close (`closed`), with a duration sample if it was established
    /// (a refused connection never opened).
    Closed {
        /// Record open → close in the duration histogram.
        duration: bool,
    },
}

/// How a socket whose tag holds `state` ends, `since_connect_ns` after
/// its `connect()`.
///
/// A connect abandoned sooner than [`SYN_RETRY_MIN_NS`] without an answer
/// (the loser of a Happy Eyeballs race, a client that gave up at once) is
/// closed, not timed out: no retransmission timer could have fired yet,
/// so the backend was never judged. Timeouts can be undercounted, never
/// invented, as on the packet path.
#[inline(always)]
pub const fn sock_end(state: u64, since_connect_ns: u64) -> SockEnd {
    if state & SK_OPENED == 0 {
        SockEnd::Uncounted
    } else if state & SK_ESTABLISHED != 0 {
        SockEnd::Closed { duration: true }
    } else if state & SK_RST_FROM_BACKEND != 0 || since_connect_ns < SYN_RETRY_MIN_NS {
        SockEnd::Closed { duration: false }
    } else {
        SockEnd::TimedOut
    }
}

/// `SOCK_REVNAT` key: a steered socket and the backend it talks to. The
/// backend is part of the key (as in Cilium's `lb4_reverse_sk`) so that an
/// unconnected UDP socket talking to several services can tell replies
/// apart; socket cookies are never reused, so a stale entry is harmless.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// The backend.
    pub addr: Addr,
    /// The backend's port, network byte order.
    pub port: u16,
    /// Its family ([`crate::addr::FAMILY_V4`] or `FAMILY_V6`).
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 32);

/// `SOCK_REVNAT` value: the VIP to show the application.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    /// The VIP.
    pub vip: Addr,
    /// The VIP's port, network byte order.
    pub port: u16,
    /// Its family ([`crate::addr::FAMILY_V4`] or `FAMILY_V6`).
    pub family: u8,
    pub _pad: u8,
    /// The service.
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 24);

/// `SOCK_UDP` value: one unconnected UDP socket's flow to one VIP (key: a
/// [`SockRevKey`] holding the socket's cookie and the VIP), chosen on its
/// first datagram and kept until idle for the service's idle timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockUdpFlow {
    /// The backend the flow's datagrams go to.
    pub backend: Addr,
    /// The backend's port, network byte order.
    pub backend_port: u16,
    /// [`crate::service::COHORT_STABLE`] or [`crate::service::COHORT_CANARY`].
    pub cohort: u8,
    pub _pad: u8,
    /// The service.
    pub svc_id: u32,
    /// The backend's `STATS` slot.
    pub stats_slot: u32,
    /// The service's `udp_idle_timeout` when the flow began.
    pub idle_ms: u32,
    /// The service's `udp_response_timeout` when the flow began (0: none).
    pub response_ms: u32,
    pub _pad2: u32,
    /// `bpf_ktime_get_ns` of the flow's first datagram.
    pub first_ns: u64,
    /// `bpf_ktime_get_ns` of a recent datagram (refreshed at most once a
    /// second, see [`crate::flow::UDP_REFRESH_NS`]).
    pub last_ns: u64,
    /// `SU_*` bits, set with atomic ORs.
    pub state: u64,
}
const _: () = assert!(core::mem::size_of::<SockUdpFlow>() == 64);

/// A reply reached the socket: the response time was recorded.
pub const SU_REPLIED: u64 = 1 << 0;
/// No reply came within the response timeout: the flow failed (once).
pub const SU_TIMED_OUT: u64 = 1 << 1;
/// Set by the agent: the flow's drain deadline after a rollback has
/// passed; the socket's next datagram to the VIP starts a new flow.
pub const SU_DRAIN: u64 = 1 << 2;
/// The first datagram after [`SU_DRAIN`] ended the flow (counted once).
pub const SU_DRAINED: u64 = 1 << 3;

/// Capacity of `SOCK_UDP`: unconnected UDP flows (socket × VIP) at once;
/// beyond it the least recently used are evicted, and an evicted flow's
/// next datagram is a new flow (a fresh choice).
pub const SOCK_UDP_CAPACITY: u32 = 65_536;

/// Capacity of `SOCK_REVNAT`: unconnected UDP flows (socket × backend) at
/// once; beyond this the least recently used are evicted and an evicted
/// flow's replies show the backend to `recvfrom()`.
pub const SOCK_REVNAT_CAPACITY: u32 = 65_536;

/// Capacity of `SOCK_STEERED`: sockets steered by `connect4/6` at once (a
/// TCP socket's entry goes when it closes; a connected UDP socket's stays
/// until evicted). Beyond it the least recently used are evicted, and the
/// drain deadline does not find an evicted socket. A map of its own, so
/// that a churn of connected sockets (a resolver's per-query UDP sockets)
/// never evicts the reverse NAT of unconnected flows (`SOCK_REVNAT`).
pub const SOCK_STEERED_CAPACITY: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::SockTag {}
    // SAFETY: repr(C), explicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::SockRevKey {}
    // SAFETY: repr(C), explicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::SockRevValue {}
    // SAFETY: repr(C), explicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::SockUdpFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_ends_as_its_state_says() {
        let s = 1_000_000_000;
        assert_eq!(sock_end(0, s), SockEnd::Uncounted);
        assert_eq!(sock_end(SK_FAILED, s), SockEnd::Uncounted);
        assert_eq!(
            sock_end(SK_OPENED | SK_ESTABLISHED | SK_RST_FROM_BACKEND, s),
            SockEnd::Closed { duration: true },
            "reset after the handshake: a close with a duration"
        );
        assert_eq!(
            sock_end(SK_OPENED | SK_RST_FROM_BACKEND | SK_FAILED, s),
            SockEnd::Closed { duration: false },
            "refused: closed, never opened"
        );
        assert_eq!(
            sock_end(SK_OPENED | SK_SYN_RETRIED | SK_FAILED, s),
            SockEnd::TimedOut,
            "no answer at all: a timeout"
        );
        assert_eq!(
            sock_end(SK_OPENED, SYN_RETRY_MIN_NS),
            SockEnd::TimedOut,
            "abandoned after the floor of a retry"
        );
        assert_eq!(
            sock_end(SK_OPENED, SYN_RETRY_MIN_NS - 1),
            SockEnd::Closed { duration: false },
            "abandoned at once (a Happy Eyeballs loser): closed, no failure"
        );
    }
}

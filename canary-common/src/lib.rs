//! Types and pure logic shared by canary's eBPF programs (`canary-ebpf`) and
//! its user-space agent (`canary-agent`).
//!
//! Everything that crosses the kernel/user boundary is defined here once:
//! map keys and values (`#[repr(C)]`, explicit padding, sizes asserted), map
//! and program names, and the functions both sides must agree on bit for bit
//! (the cohort bucket). Addresses and ports inside map types are stored in
//! network byte order, exactly as they appear in packets, so the data plane
//! never converts them.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "map types spell out their padding as `_pad` fields, which both sides must zero"
)]
#![expect(
    clippy::inline_always,
    reason = "the eBPF programs call these functions per packet; inlined, they cost no BPF-to-BPF call and the verifier sees the bounds in one function"
)]

pub mod addr;
pub mod breaker;
pub mod cohort;
pub mod counters;
pub mod csum;
pub mod flow;
pub mod layout;
pub mod service;
pub mod sock;
pub mod stats;

/// Names of the eBPF maps and programs, as they appear in the object file.
pub mod names {
    /// Service table, see [`crate::service::ServiceKey`].
    pub const SERVICES: &str = "SERVICES";
    /// Source-prefix rules, see [`crate::service::RuleKey`].
    pub const RULES: &str = "RULES";
    /// Connection tracking, see [`crate::flow::FlowKey`].
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Data-plane counters, see [`crate::counters::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-backend-slot counters, see [`crate::stats::BackendCounters`].
    pub const STATS: &str = "STATS";
    /// Per service × cohort histograms, see [`crate::stats::CohortHistograms`].
    pub const HISTOGRAMS: &str = "HISTOGRAMS";
    /// The ring of recent SYNs the handshake-timeout sweep reads, see
    /// [`crate::flow::SynRecord`].
    pub const PENDING: &str = "PENDING";
    /// Re-resolved flows awaiting their backend's answer, see
    /// [`crate::flow::UNCONFIRMED_CAPACITY`].
    pub const UNCONFIRMED: &str = "UNCONFIRMED";
    /// Breaker windows per service, see [`crate::breaker::BreakerState`].
    pub const BREAKER: &str = "BREAKER";
    /// Ring buffer of [`crate::breaker::BreakerEvent`]s.
    pub const EVENTS: &str = "EVENTS";
    /// Handshake timeouts per stats slot, counted by the agent's sweep.
    pub const TIMEOUTS: &str = "TIMEOUTS";
    /// Layout version of every pinned map, see [`crate::layout`].
    pub const LAYOUT: &str = "LAYOUT";
    /// Socket-steering reverse map, see [`crate::sock::SockRevKey`].
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// Sockets steered by `connect4/6`, by cookie and backend, for the
    /// drain deadline, see [`crate::sock::SOCK_STEERED_CAPACITY`].
    pub const SOCK_STEERED: &str = "SOCK_STEERED";
    /// Unconnected UDP flows steered at the socket, see
    /// [`crate::sock::SockUdpFlow`].
    pub const SOCK_UDP: &str = "SOCK_UDP";
    /// Socket storage of steered sockets, see [`crate::sock::SockTag`].
    pub const SOCK_TAGS: &str = "SOCK_TAGS";
    /// Handshake timeouts of socket-steered connections per stats slot,
    /// per CPU (counted by the programs; `TIMEOUTS` is the sweep's).
    pub const SOCK_TIMEOUTS: &str = "SOCK_TIMEOUTS";
    /// The generation of socket tracepoint programs that counts, see
    /// [`SOCK_GENERATION`].
    pub const SOCK_ACTIVE: &str = "SOCK_ACTIVE";
    /// Global variable of the object, set by the agent at load: its
    /// socket tracepoint programs count only while `SOCK_ACTIVE` holds
    /// this value, so an agent replacing them (tracing links cannot be
    /// updated in place) hands counting over in one map write.
    pub const SOCK_GENERATION: &str = "SOCK_GENERATION";
    /// UDP connection tracking, see [`crate::flow::CT_UDP_DEFAULT_CAPACITY`].
    pub const CT_UDP: &str = "CT_UDP";
    /// UDP timeouts per service, see [`crate::flow::UdpConfig`].
    pub const UDP_CONFIG: &str = "UDP_CONFIG";
    /// UDP flows that got no reply within their response timeout, per
    /// stats slot, per CPU (counted by the programs).
    pub const UDP_TIMEOUTS: &str = "UDP_TIMEOUTS";
    /// TC program for packets arriving from clients.
    pub const PROG_TC_INGRESS: &str = "canary_tc_ingress";
    /// TC program for replies leaving towards clients.
    pub const PROG_TC_EGRESS: &str = "canary_tc_egress";
    /// XDP program for packets arriving from clients on interfaces in `xdp`
    /// mode (instead of the TC ingress program).
    pub const PROG_XDP_INGRESS: &str = "canary_xdp_ingress";
    /// The UDP sweep, run by the agent through `BPF_PROG_TEST_RUN` on one
    /// flow at a time, never attached: see [`crate::flow::sweep`].
    pub const PROG_UDP_SWEEP: &str = "canary_udp_sweep";
    /// Kernel probe for `BPF_F_IPV6`, run by the agent, never attached.
    pub const PROG_PROBE_IPV6_CSUM: &str = "canary_probe_ipv6_csum";
    /// cgroup `connect4`: steers IPv4 `connect()` to a VIP.
    pub const PROG_CONNECT4: &str = "canary_connect4";
    /// cgroup `connect6`: steers IPv6 `connect()` (v4-mapped VIPs today).
    pub const PROG_CONNECT6: &str = "canary_connect6";
    /// cgroup `getpeername4`: shows the VIP instead of the backend.
    pub const PROG_GETPEERNAME4: &str = "canary_getpeername4";
    /// cgroup `getpeername6`: shows the VIP instead of the backend.
    pub const PROG_GETPEERNAME6: &str = "canary_getpeername6";
    /// cgroup `sendmsg4`: steers an unconnected IPv4 UDP datagram to a VIP.
    pub const PROG_SENDMSG4: &str = "canary_sendmsg4";
    /// cgroup `sendmsg6`: steers an unconnected IPv6 UDP datagram to a VIP.
    pub const PROG_SENDMSG6: &str = "canary_sendmsg6";
    /// cgroup `recvmsg4`: shows a steered UDP reply as coming from the VIP.
    pub const PROG_RECVMSG4: &str = "canary_recvmsg4";
    /// cgroup `recvmsg6`: shows a steered UDP reply as coming from the VIP.
    pub const PROG_RECVMSG6: &str = "canary_recvmsg6";
    /// BTF tracepoint `inet_sock_set_state`: connections, handshakes, closes and
    /// timeouts of steered sockets.
    pub const PROG_SOCK_STATE: &str = "canary_sock_state";
    /// BTF tracepoint `tcp_receive_reset`: refusals and resets by the backend.
    pub const PROG_SOCK_RST_RX: &str = "canary_sock_rst_rx";
    /// BTF tracepoint `tcp_send_reset`: resets by the client.
    pub const PROG_SOCK_RST_TX: &str = "canary_sock_rst_tx";
    /// BTF tracepoint `tcp_retransmit_skb`: SYN retries.
    pub const PROG_SOCK_RETRANSMIT: &str = "canary_sock_retransmit";
    /// BTF tracepoint `sock_send_length`: bytes sent and the first request.
    pub const PROG_SOCK_SEND: &str = "canary_sock_send";
    /// BTF tracepoint `sock_recv_length`: bytes received and the first response.
    pub const PROG_SOCK_RECV: &str = "canary_sock_recv";
    /// Empty TC program: the benchmark's baseline.
    pub const PROG_BENCH_TC_EMPTY: &str = "canary_bench_tc_empty";
    /// Empty XDP program: the benchmark's baseline.
    pub const PROG_BENCH_XDP_EMPTY: &str = "canary_bench_xdp_empty";
}

/// IANA protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IANA protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IANA protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

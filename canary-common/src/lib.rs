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
    /// SYNs awaiting their SYN-ACK, see [`crate::flow::PendingSyn`].
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

//! canary's eBPF programs. Entry points only; the logic lives in modules.
//!
//! - `canary_tc_ingress` (TC ingress of a client-facing interface): packets
//!   from clients to a VIP; picks cohort and backend on SYN, DNAT.
//! - `canary_xdp_ingress` (XDP of a client-facing interface, instead of TC
//!   ingress): the same handler, earlier, without an skb.
//! - `canary_tc_egress` (TC egress of the same interface): replies from
//!   backends; reverse NAT back to VIP:port, of ICMP errors too.
//! - `canary_udp_sweep`: run by the agent through `BPF_PROG_TEST_RUN`, one
//!   UDP flow at a time, never attached: ends idle flows and counts
//!   unanswered ones.
//! - `canary_connect4/6` (cgroup, the socket-LB cgroup): steer a
//!   `connect()` to a VIP once, by rewriting its destination; its packets
//!   are never NATed.
//! - `canary_getpeername4/6` (cgroup): a steered socket's peer is the VIP.
//! - `canary_sock_*` (BTF tracepoints): the signals of socket-steered
//!   connections, into the same counters and histograms as the TC path.
//! - `canary_bench_*_empty`: empty programs, the benchmark's baselines;
//!   never loaded by the agent.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic fetch-or and add on map memory, see atomic.rs.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Packet pointers loaded by an instruction of their own, see packet.rs.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

// The library target exists only for canary-agent's build dependency.
use canary_ebpf as _;

#[cfg(target_arch = "bpf")]
mod atomic;
#[cfg(target_arch = "bpf")]
mod breaker;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod steer;
#[cfg(target_arch = "bpf")]
mod udp;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{btf_tracepoint, cgroup_sock_addr, classifier, xdp},
        programs::{BtfTracePointContext, SockAddrContext, TcContext, XdpContext},
    };

    use crate::{
        egress, ingress,
        sock::{self, Hook},
        stats, udp,
    };

    /// Client → VIP packets: steer new flows, DNAT every packet of a flow.
    #[classifier]
    pub fn canary_tc_ingress(ctx: TcContext) -> i32 {
        upgrade_test_variant();
        stats::tc_verdict(ingress::handle(&ctx))
    }

    /// Client → VIP packets at XDP: what `canary_tc_ingress` does, before
    /// the kernel allocates an skb.
    #[xdp]
    pub fn canary_xdp_ingress(ctx: XdpContext) -> u32 {
        upgrade_test_variant();
        stats::xdp_verdict(ingress::handle(&ctx))
    }

    /// Backend → client replies: restore VIP:port as the source.
    #[classifier]
    pub fn canary_tc_egress(ctx: TcContext) -> i32 {
        upgrade_test_variant();
        stats::tc_verdict(egress::handle(&ctx))
    }

    /// The UDP sweep of up to `sweep::BATCH` flows: the frame carries
    /// `CT_UDP` keys after its Ethernet header (`canary_common::flow::sweep`);
    /// the return value counts what was done. Run by the agent's sweep,
    /// never attached.
    #[classifier]
    pub fn canary_udp_sweep(ctx: TcContext) -> i32 {
        use canary_common::flow::{FlowKey, sweep};
        let (mut expired, mut timed_out) = (0, 0);
        for i in 0..sweep::BATCH {
            let at = sweep::KEY_OFFSET + i * core::mem::size_of::<FlowKey>();
            let Some(key) = crate::packet::ptr_at::<FlowKey, _>(&ctx, at) else {
                break;
            };
            // SAFETY: bounds-checked against data_end by ptr_at; copied out
            // at once (the frame need not be aligned).
            let key = unsafe { key.read_unaligned() };
            if key.proto != canary_common::IPPROTO_UDP {
                continue;
            }
            let done = udp::sweep(&key);
            expired += done & sweep::EXPIRED;
            timed_out += (done & sweep::TIMED_OUT) >> 1;
        }
        sweep::result(expired, timed_out)
    }

    /// IPv4 `connect()` from the socket-LB cgroup: a VIP becomes a backend.
    /// Never refuses a connect (1 = proceed).
    #[cgroup_sock_addr(connect4)]
    pub fn canary_connect4(ctx: SockAddrContext) -> i32 {
        upgrade_test_variant();
        sock::connect(&ctx, Hook::V4);
        1
    }

    /// IPv6 `connect()`: v4-mapped VIPs of dual-stack sockets map to the
    /// IPv4 service.
    #[cgroup_sock_addr(connect6)]
    pub fn canary_connect6(ctx: SockAddrContext) -> i32 {
        upgrade_test_variant();
        sock::connect(&ctx, Hook::V6);
        1
    }

    /// IPv4 `getpeername()`: the VIP the application dialled. Must return 1.
    #[cgroup_sock_addr(getpeername4)]
    pub fn canary_getpeername4(ctx: SockAddrContext) -> i32 {
        sock::getpeername(&ctx, Hook::V4);
        1
    }

    /// IPv6 `getpeername()`: the (v4-mapped) VIP. Must return 1.
    #[cgroup_sock_addr(getpeername6)]
    pub fn canary_getpeername6(ctx: SockAddrContext) -> i32 {
        sock::getpeername(&ctx, Hook::V6);
        1
    }

    /// An IPv4 UDP datagram sent to an address (unconnected): a VIP becomes
    /// the flow's backend. Never refuses a send (1 = proceed).
    #[cgroup_sock_addr(sendmsg4)]
    pub fn canary_sendmsg4(ctx: SockAddrContext) -> i32 {
        sock::sendmsg(&ctx, Hook::V4);
        1
    }

    /// An IPv6 UDP datagram sent to an address (v4-mapped VIPs included).
    #[cgroup_sock_addr(sendmsg6)]
    pub fn canary_sendmsg6(ctx: SockAddrContext) -> i32 {
        sock::sendmsg(&ctx, Hook::V6);
        1
    }

    /// An IPv4 UDP datagram received with its source asked for: a steered
    /// backend's reply shows the VIP. Must return 1.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn canary_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::recvmsg(&ctx, Hook::V4);
        1
    }

    /// An IPv6 UDP datagram received with its source asked for. Must
    /// return 1.
    #[cgroup_sock_addr(recvmsg6)]
    pub fn canary_recvmsg6(ctx: SockAddrContext) -> i32 {
        sock::recvmsg(&ctx, Hook::V6);
        1
    }

    /// A TCP state change: connection counted, handshake timed, end counted.
    #[btf_tracepoint(function = "inet_sock_set_state")]
    pub fn canary_sock_state(ctx: BtfTracePointContext) -> i32 {
        sock::state(&ctx);
        0
    }

    /// A RST received: refused or reset by the backend.
    #[btf_tracepoint(function = "tcp_receive_reset")]
    pub fn canary_sock_rst_rx(ctx: BtfTracePointContext) -> i32 {
        sock::rst_from_backend(&ctx);
        0
    }

    /// A RST sent: reset by the client.
    #[btf_tracepoint(function = "tcp_send_reset")]
    pub fn canary_sock_rst_tx(ctx: BtfTracePointContext) -> i32 {
        sock::rst_from_client(&ctx);
        0
    }

    /// A retransmission: a SYN retry while connecting.
    #[btf_tracepoint(function = "tcp_retransmit_skb")]
    pub fn canary_sock_retransmit(ctx: BtfTracePointContext) -> i32 {
        sock::retransmit(&ctx);
        0
    }

    /// A `sendmsg` result: bytes from the client, its first request.
    #[btf_tracepoint(function = "sock_send_length")]
    pub fn canary_sock_send(ctx: BtfTracePointContext) -> i32 {
        sock::send(&ctx);
        0
    }

    /// A `recvmsg` result: bytes from the backend, its first response.
    #[btf_tracepoint(function = "sock_recv_length")]
    pub fn canary_sock_recv(ctx: BtfTracePointContext) -> i32 {
        sock::recv(&ctx);
        0
    }

    /// In the `upgrade-test` build only: a clock read whose result is
    /// dropped, so the programs' code (and tag) differs from the normal
    /// build while they behave the same.
    #[inline(always)]
    fn upgrade_test_variant() {
        #[cfg(feature = "upgrade-test")]
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let _ = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    }

    /// Kernel probe, run once by the agent through `BPF_PROG_TEST_RUN` on an
    /// IPv6/TCP frame, never attached: 0 if `bpf_l4_csum_replace` takes
    /// `BPF_F_IPV6` (Linux 6.16+), which the IPv6 NAT needs at TC.
    #[classifier]
    pub fn canary_probe_ipv6_csum(ctx: TcContext) -> i32 {
        // The TCP checksum of an Ethernet/IPv6/TCP frame, "changed" by 0.
        let flags = u64::from(aya_ebpf::bindings::BPF_F_PSEUDO_HDR) | crate::nat::BPF_F_IPV6;
        i32::from(ctx.l4_csum_replace(14 + 40 + 16, 0, 0, flags).is_err())
    }

    /// Baseline for `cargo xtask bench`: a TC program that does nothing.
    /// Never attached.
    #[classifier]
    pub fn canary_bench_tc_empty(_ctx: TcContext) -> i32 {
        aya_ebpf::bindings::TC_ACT_UNSPEC
    }

    /// Baseline for `cargo xtask bench`: an XDP program that does nothing.
    /// Never attached.
    #[xdp]
    pub fn canary_bench_xdp_empty(_ctx: XdpContext) -> u32 {
        aya_ebpf::bindings::xdp_action::XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any reachable panic path; this is never run.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// Host builds (`cargo check --workspace`) get an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

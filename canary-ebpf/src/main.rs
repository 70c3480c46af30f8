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
mod stats;
#[cfg(target_arch = "bpf")]
mod steer;
#[cfg(target_arch = "bpf")]
mod udp;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    use crate::{egress, ingress, stats, udp};

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

    /// The UDP sweep of one flow: the frame carries a `CT_UDP` key after
    /// its Ethernet header (`canary_common::flow::sweep`); the return value
    /// says what was done. Run by the agent's sweep, never attached.
    #[classifier]
    pub fn canary_udp_sweep(ctx: TcContext) -> i32 {
        use canary_common::flow::{FlowKey, sweep};
        let Some(key) = crate::packet::ptr_at::<FlowKey, _>(&ctx, sweep::KEY_OFFSET) else {
            return sweep::NOT_FOUND;
        };
        // SAFETY: bounds-checked against data_end by ptr_at; copied out at
        // once (the frame need not be aligned).
        let key = unsafe { key.read_unaligned() };
        if key.proto != canary_common::IPPROTO_UDP {
            return sweep::NOT_FOUND;
        }
        udp::sweep(&key)
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

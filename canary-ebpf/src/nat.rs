//! Address and port rewrites with incremental checksum updates.
//!
//! The csum helpers handle every `ip_summed` state (including
//! CHECKSUM_PARTIAL from a local sender over veth), which a hand-rolled
//! update would not.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use canary_common::counters::Counter;

use crate::packet::{IP_CSUM, IP_DADDR, IP_SADDR, TCP_CSUM, TCP_DPORT, TCP_SPORT, Tcp4};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Destination: DNAT of client packets to the backend.
    Dst,
    /// Source: reverse NAT of backend replies to the VIP.
    Src,
}

/// Rewrites `end` of `pkt` to `addr:port` (network byte order).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Tcp4, end: End, addr: u32, port: u16) -> Result<(), Counter> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Dst => (pkt.key.dst_addr, pkt.key.dst_port, IP_DADDR, TCP_DPORT),
        End::Src => (pkt.key.src_addr, pkt.key.src_port, IP_SADDR, TCP_SPORT),
    };
    let l4_csum = pkt.l4 + TCP_CSUM;
    if old_addr != addr {
        ctx.l4_csum_replace(
            l4_csum,
            old_addr as u64,
            addr as u64,
            (BPF_F_PSEUDO_HDR | 4) as u64,
        )
        .map_err(|_| Counter::RewriteFailed)?;
        ctx.l3_csum_replace(pkt.l3 + IP_CSUM, old_addr as u64, addr as u64, 4)
            .map_err(|_| Counter::RewriteFailed)?;
        ctx.store(pkt.l3 + addr_off, &addr, 0)
            .map_err(|_| Counter::RewriteFailed)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(l4_csum, old_port as u64, port as u64, 2)
            .map_err(|_| Counter::RewriteFailed)?;
        ctx.store(pkt.l4 + port_off, &port, 0)
            .map_err(|_| Counter::RewriteFailed)?;
    }
    Ok(())
}

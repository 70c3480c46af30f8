//! Address and port rewrites with incremental checksum updates.
//!
//! At TC the kernel's csum helpers handle every `ip_summed` state (including
//! CHECKSUM_PARTIAL from a local sender over veth), which a hand-rolled
//! update would not. XDP has no skb and no such state: the frame carries the
//! full checksums it had on the wire, updated here by RFC 1624 arithmetic.

use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    programs::{TcContext, XdpContext},
};
use canary_common::{counters::Counter, csum};

use crate::packet::{
    Frame, IP_CSUM, IP_DADDR, IP_SADDR, TCP_CSUM, TCP_DPORT, TCP_SPORT, Tcp4, ptr_at,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Destination: DNAT of client packets to the backend.
    Dst,
    /// Source: reverse NAT of backend replies to the VIP.
    Src,
}

/// The fields of `end`: old address and port, and their header offsets.
#[inline(always)]
fn fields(pkt: &Tcp4, end: End) -> (u32, u16, usize, usize) {
    match end {
        End::Dst => (pkt.key.dst_addr, pkt.key.dst_port, IP_DADDR, TCP_DPORT),
        End::Src => (pkt.key.src_addr, pkt.key.src_port, IP_SADDR, TCP_SPORT),
    }
}

/// A frame whose addresses can be rewritten.
pub trait Rewrite: Frame {
    /// Rewrites `end` of `pkt` to `addr:port` (network byte order), keeping
    /// both checksums valid.
    fn rewrite(&self, pkt: &Tcp4, end: End, addr: u32, port: u16) -> Result<(), Counter>;
}

impl Rewrite for TcContext {
    /// The fields are written directly (the verifier unclones the skb once
    /// for a program that writes packet data), which is cheaper than
    /// `bpf_skb_store_bytes`; the checksums go through the helpers.
    #[inline(always)]
    fn rewrite(&self, pkt: &Tcp4, end: End, addr: u32, port: u16) -> Result<(), Counter> {
        let (old_addr, old_port, addr_off, port_off) = fields(pkt, end);
        let l4_csum = pkt.l4 + TCP_CSUM;
        if old_addr != addr {
            let field = field::<u32, _>(self, pkt.l3 + addr_off)?;
            // SAFETY: bounds-checked against data_end just above; packet
            // fields need not be aligned.
            unsafe { field.write_unaligned(addr) };
            self.l4_csum_replace(
                l4_csum,
                old_addr as u64,
                addr as u64,
                (BPF_F_PSEUDO_HDR | 4) as u64,
            )
            .map_err(|_| Counter::RewriteFailed)?;
            self.l3_csum_replace(pkt.l3 + IP_CSUM, old_addr as u64, addr as u64, 4)
                .map_err(|_| Counter::RewriteFailed)?;
        }
        if old_port != port {
            // The csum helpers above may have moved the packet data: the
            // pointer is formed (and checked) afresh.
            let field = field::<u16, _>(self, pkt.l4 + port_off)?;
            // SAFETY: as above.
            unsafe { field.write_unaligned(port) };
            self.l4_csum_replace(l4_csum, old_port as u64, port as u64, 2)
                .map_err(|_| Counter::RewriteFailed)?;
        }
        Ok(())
    }
}

/// A pointer to the header field at `offset`, or the rewrite fails.
#[inline(always)]
fn field<T, F: Frame>(ctx: &F, offset: usize) -> Result<*mut T, Counter> {
    ptr_at(ctx, offset).ok_or(Counter::RewriteFailed)
}

impl Rewrite for XdpContext {
    #[inline(always)]
    fn rewrite(&self, pkt: &Tcp4, end: End, addr: u32, port: u16) -> Result<(), Counter> {
        let (old_addr, old_port, addr_off, port_off) = fields(pkt, end);
        if old_addr == addr && old_port == port {
            return Ok(());
        }
        let ip_csum = field::<u16, _>(self, pkt.l3 + IP_CSUM)?;
        let ip_addr = field::<u32, _>(self, pkt.l3 + addr_off)?;
        let tcp_csum = field::<u16, _>(self, pkt.l4 + TCP_CSUM)?;
        let tcp_port = field::<u16, _>(self, pkt.l4 + port_off)?;
        // SAFETY: each pointer was bounds-checked against data_end above;
        // packet fields need not be aligned, hence the unaligned accesses.
        unsafe {
            // The address is in the TCP pseudo-header as well as the IP header.
            let ip = csum::replace4(ip_csum.read_unaligned(), old_addr, addr);
            let tcp = csum::replace4(tcp_csum.read_unaligned(), old_addr, addr);
            let tcp = csum::replace2(tcp, old_port, port);
            ip_csum.write_unaligned(ip);
            ip_addr.write_unaligned(addr);
            tcp_csum.write_unaligned(tcp);
            tcp_port.write_unaligned(port);
        }
        Ok(())
    }
}

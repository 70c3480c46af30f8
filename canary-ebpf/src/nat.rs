//! Address and port rewrites with incremental checksum updates, one NAT
//! for both families: IPv4 updates the IP header checksum and the TCP
//! pseudo-header sum; IPv6 has no header checksum, so only the TCP one
//! changes, by the difference of the 16-byte addresses.
//!
//! At TC the kernel's csum helpers handle every `ip_summed` state (including
//! CHECKSUM_PARTIAL from a local sender over veth, and CHECKSUM_COMPLETE,
//! where `BPF_F_IPV6` tells the helper that an IPv6 address change leaves
//! `skb->csum` alone), which a hand-rolled update would not. XDP has no skb
//! and no such state: the frame carries the full checksums it had on the
//! wire, updated here by RFC 1624 arithmetic.

use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use canary_common::{addr::Addr, counters::Counter, csum};

use crate::packet::{Frame, IP_CSUM, Packet, TCP_CSUM, TCP_DPORT, TCP_SPORT, ptr_at};

/// `bpf_l4_csum_replace` flag (Linux 6.16): the pseudo-header change is an
/// IPv6 address change, so `skb->csum` of a CHECKSUM_COMPLETE packet must
/// not be adjusted. Missing from aya-ebpf's bindings; the agent probes the
/// kernel for it before it steers IPv6 at TC.
pub const BPF_F_IPV6: u64 = 1 << 7;

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
fn fields(pkt: &Packet, end: End) -> (Addr, u16, usize, usize) {
    match end {
        End::Dst => (
            pkt.key.dst_addr,
            pkt.key.dst_port,
            pkt.addr_offset(false),
            pkt.l4 + TCP_DPORT,
        ),
        End::Src => (
            pkt.key.src_addr,
            pkt.key.src_port,
            pkt.addr_offset(true),
            pkt.l4 + TCP_SPORT,
        ),
    }
}

/// A frame whose addresses can be rewritten.
pub trait Rewrite: Frame {
    /// Rewrites `end` of `pkt` to `addr:port` (network byte order, of the
    /// packet's family), keeping every checksum valid.
    fn rewrite(&self, pkt: &Packet, end: End, addr: Addr, port: u16) -> Result<(), Counter>;
}

impl Rewrite for TcContext {
    /// The fields are written directly (the verifier unclones the skb once
    /// for a program that writes packet data), which is cheaper than
    /// `bpf_skb_store_bytes`; the checksums go through the helpers.
    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, end: End, addr: Addr, port: u16) -> Result<(), Counter> {
        let (old_addr, old_port, addr_off, port_off) = fields(pkt, end);
        let l4_csum = pkt.l4 + TCP_CSUM;
        if old_addr != addr {
            if pkt.is_v6() {
                let field = field::<Addr, _>(self, addr_off)?;
                // SAFETY: bounds-checked against data_end just above;
                // packet fields need not be aligned.
                unsafe { field.write_unaligned(addr) };
                let mut from = old_addr.0;
                let mut to = addr.0;
                // SAFETY: both buffers are 16 readable stack bytes, as the
                // sizes passed say.
                let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
                if diff < 0 {
                    return Err(Counter::RewriteFailed);
                }
                // Size 0: `to` is a difference, not a field.
                self.l4_csum_replace(
                    l4_csum,
                    0,
                    diff as u64,
                    u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6,
                )
                .map_err(|_| Counter::RewriteFailed)?;
            } else {
                let (old, new) = (old_addr.v4(), addr.v4());
                let field = field::<u32, _>(self, addr_off)?;
                // SAFETY: as above.
                unsafe { field.write_unaligned(new) };
                self.l4_csum_replace(
                    l4_csum,
                    u64::from(old),
                    u64::from(new),
                    u64::from(BPF_F_PSEUDO_HDR | 4),
                )
                .map_err(|_| Counter::RewriteFailed)?;
                self.l3_csum_replace(pkt.l3 + IP_CSUM, u64::from(old), u64::from(new), 4)
                    .map_err(|_| Counter::RewriteFailed)?;
            }
        }
        if old_port != port {
            // The csum helpers above may have moved the packet data: the
            // pointer is formed (and checked) afresh.
            let field = field::<u16, _>(self, port_off)?;
            // SAFETY: as above.
            unsafe { field.write_unaligned(port) };
            self.l4_csum_replace(l4_csum, u64::from(old_port), u64::from(port), 2)
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
    fn rewrite(&self, pkt: &Packet, end: End, addr: Addr, port: u16) -> Result<(), Counter> {
        let (old_addr, old_port, addr_off, port_off) = fields(pkt, end);
        if old_addr == addr && old_port == port {
            return Ok(());
        }
        let tcp_csum = field::<u16, _>(self, pkt.l4 + TCP_CSUM)?;
        let tcp_port = field::<u16, _>(self, port_off)?;
        if pkt.is_v6() {
            let ip_addr = field::<Addr, _>(self, addr_off)?;
            // SAFETY: each pointer was bounds-checked against data_end
            // above; packet fields need not be aligned.
            unsafe {
                let tcp = csum::replace16(tcp_csum.read_unaligned(), &old_addr.0, &addr.0);
                let tcp = csum::replace2(tcp, old_port, port);
                ip_addr.write_unaligned(addr);
                tcp_csum.write_unaligned(tcp);
                tcp_port.write_unaligned(port);
            }
        } else {
            let ip_csum = field::<u16, _>(self, pkt.l3 + IP_CSUM)?;
            let ip_addr = field::<u32, _>(self, addr_off)?;
            let (old, new) = (old_addr.v4(), addr.v4());
            // SAFETY: as above.
            unsafe {
                // The address is in the TCP pseudo-header as well as the IP
                // header.
                let ip = csum::replace4(ip_csum.read_unaligned(), old, new);
                let tcp = csum::replace4(tcp_csum.read_unaligned(), old, new);
                let tcp = csum::replace2(tcp, old_port, port);
                ip_csum.write_unaligned(ip);
                ip_addr.write_unaligned(new);
                tcp_csum.write_unaligned(tcp);
                tcp_port.write_unaligned(port);
            }
        }
        Ok(())
    }
}

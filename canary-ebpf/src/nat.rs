//! Address and port rewrites with incremental checksum updates, one NAT
//! for both families and both transports: IPv4 updates the IP header
//! checksum and the transport pseudo-header sum; IPv6 has no header
//! checksum, so only the transport one changes, by the difference of the
//! 16-byte addresses. TCP and UDP differ only in where the checksum is and
//! in UDP's zero rule (`csum::udp`): 0 over IPv4 means "none" and stays 0,
//! and a result of 0 is written 0xFFFF.
//!
//! At TC the kernel's csum helpers handle every `ip_summed` state (including
//! CHECKSUM_PARTIAL from a local sender over veth, and CHECKSUM_COMPLETE,
//! where `BPF_F_IPV6` tells the helper that an IPv6 address change leaves
//! `skb->csum` alone), which a hand-rolled update would not. XDP has no skb
//! and no such state: the frame carries the full checksums it had on the
//! wire, updated here by RFC 1624 arithmetic.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use canary_common::{addr::Addr, counters::Counter, csum};

use crate::packet::{Frame, IP_CSUM, L3, L4_DPORT, L4_SPORT, Packet, ptr_at};

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
            pkt.l4 + L4_DPORT,
        ),
        End::Src => (
            pkt.key.src_addr,
            pkt.key.src_port,
            pkt.addr_offset(true),
            pkt.l4 + L4_SPORT,
        ),
    }
}

/// A frame whose addresses can be rewritten.
pub trait Rewrite: Frame {
    /// Rewrites `end` of `pkt` to `addr:port` (network byte order, of the
    /// packet's family), keeping every checksum valid.
    fn rewrite(&self, pkt: &Packet, end: End, addr: Addr, port: u16) -> Result<(), Counter>;

    /// Turns the TCP segment `pkt` into a RST (keeping ACK, clearing the
    /// other flags; the sequence number stays the sender's, which is what
    /// the receiver expects next), keeping the checksum valid. The payload
    /// stays: a receiver ignores data on a RST.
    fn reset(&self, pkt: &Packet) -> Result<(), Counter>;
}

/// Offset of the TCP header's data-offset and flags word.
const TCP_FLAGS_WORD: usize = 12;

/// The flags word of `old` (as stored) made a RST: the flags byte is the
/// word's second byte on the wire.
#[inline(always)]
fn reset_word(old: u16) -> u16 {
    let mut bytes = old.to_ne_bytes();
    bytes[1] = (bytes[1] & crate::packet::TCP_ACK) | crate::packet::TCP_RST;
    u16::from_ne_bytes(bytes)
}

impl Rewrite for TcContext {
    /// The fields are written directly (the verifier unclones the skb once
    /// for a program that writes packet data), which is cheaper than
    /// `bpf_skb_store_bytes`; the checksums go through the helpers.
    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, end: End, addr: Addr, port: u16) -> Result<(), Counter> {
        let (old_addr, old_port, addr_off, port_off) = fields(pkt, end);
        let l4_csum = pkt.csum;
        // UDP: the helper leaves a checksum of 0 alone and writes a result
        // of 0 as 0xFFFF (`csum::udp` at XDP).
        let mangled = if pkt.is_udp() {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        if old_addr != addr {
            if pkt.is_v6() {
                let field = field::<Addr, _>(self, addr_off)?;
                // SAFETY: bounds-checked against data_end just above;
                // packet fields need not be aligned.
                unsafe { field.write_unaligned(addr) };
                // Size 0: `to` is a difference, not a field. Computed here
                // rather than by `bpf_csum_diff`: one helper call less.
                self.l4_csum_replace(
                    l4_csum,
                    0,
                    u64::from(csum::diff16(&old_addr.0, &addr.0)),
                    u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6 | mangled,
                )
                .map_err(|_| Counter::RewriteFailed)?;
            } else {
                let (old, new) = (old_addr.v4(), addr.v4());
                let ip_csum = field::<u16, _>(self, L3 + IP_CSUM)?;
                let ip_addr = field::<u32, _>(self, addr_off)?;
                // SAFETY: as above. The IP header checksum is updated here
                // rather than by `bpf_l3_csum_replace`, which does the same
                // RFC 1624 update whatever the skb's checksum state (the
                // header is outside every partial or complete L4 sum), for
                // one helper call less per packet.
                unsafe {
                    ip_addr.write_unaligned(new);
                    ip_csum.write_unaligned(csum::replace4(ip_csum.read_unaligned(), old, new));
                }
                self.l4_csum_replace(
                    l4_csum,
                    u64::from(old),
                    u64::from(new),
                    u64::from(BPF_F_PSEUDO_HDR | 4) | mangled,
                )
                .map_err(|_| Counter::RewriteFailed)?;
            }
        }
        if old_port != port {
            // The csum helpers above may have moved the packet data: the
            // pointer is formed (and checked) afresh.
            let field = field::<u16, _>(self, port_off)?;
            // SAFETY: as above.
            unsafe { field.write_unaligned(port) };
            self.l4_csum_replace(l4_csum, u64::from(old_port), u64::from(port), 2 | mangled)
                .map_err(|_| Counter::RewriteFailed)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn reset(&self, pkt: &Packet) -> Result<(), Counter> {
        let word = field::<u16, _>(self, pkt.l4 + TCP_FLAGS_WORD)?;
        // SAFETY: bounds-checked against data_end by `field`.
        let old = unsafe { word.read_unaligned() };
        let new = reset_word(old);
        // SAFETY: as above.
        unsafe { word.write_unaligned(new) };
        self.l4_csum_replace(pkt.csum, u64::from(old), u64::from(new), 2)
            .map_err(|_| Counter::RewriteFailed)
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
        let l4_csum = field::<u16, _>(self, pkt.csum)?;
        let l4_port = field::<u16, _>(self, port_off)?;
        let udp = pkt.is_udp();
        if pkt.is_v6() {
            let ip_addr = field::<Addr, _>(self, addr_off)?;
            // SAFETY: each pointer was bounds-checked against data_end
            // above; packet fields need not be aligned.
            unsafe {
                let check = csum::replace16(l4_csum.read_unaligned(), &old_addr.0, &addr.0);
                let check = csum::replace2(check, old_port, port);
                ip_addr.write_unaligned(addr);
                // IPv6 UDP with checksum 0 never gets here (passed
                // unsteered), so a 0 is never kept.
                l4_csum.write_unaligned(if udp {
                    csum::udp::mangled(check)
                } else {
                    check
                });
                l4_port.write_unaligned(port);
            }
        } else {
            let ip_csum = field::<u16, _>(self, L3 + IP_CSUM)?;
            let ip_addr = field::<u32, _>(self, addr_off)?;
            let (old, new) = (old_addr.v4(), addr.v4());
            // SAFETY: as above.
            unsafe {
                // The address is in the transport pseudo-header as well as
                // the IP header.
                let ip = csum::replace4(ip_csum.read_unaligned(), old, new);
                let before = l4_csum.read_unaligned();
                ip_csum.write_unaligned(ip);
                ip_addr.write_unaligned(new);
                l4_port.write_unaligned(port);
                if !(udp && csum::udp::keep(before)) {
                    let check = csum::replace4(before, old, new);
                    let check = csum::replace2(check, old_port, port);
                    l4_csum.write_unaligned(if udp {
                        csum::udp::mangled(check)
                    } else {
                        check
                    });
                }
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn reset(&self, pkt: &Packet) -> Result<(), Counter> {
        let word = field::<u16, _>(self, pkt.l4 + TCP_FLAGS_WORD)?;
        let check = field::<u16, _>(self, pkt.csum)?;
        // SAFETY: both bounds-checked against data_end by `field`.
        unsafe {
            let old = word.read_unaligned();
            let new = reset_word(old);
            word.write_unaligned(new);
            check.write_unaligned(csum::replace2(check.read_unaligned(), old, new));
        }
        Ok(())
    }
}

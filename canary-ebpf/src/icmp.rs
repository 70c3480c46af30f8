//! ICMP errors about steered flows, on their way from a backend (or a
//! router on its path) to the client, at TC egress: the client sent to the
//! VIP, so the error must speak of the VIP, or the client's stack matches
//! it to no socket (port unreachable, PMTU "fragmentation needed" / "packet
//! too big", time exceeded for traceroute).
//!
//! Rewritten: the outer source if the backend itself sent the error (→
//! VIP), the quoted packet's destination address and port (→ VIP:port),
//! the quoted IPv4 header checksum, the quoted transport checksum when the
//! quote holds it, and every one of those changes folded into the outer
//! ICMP checksum (ICMPv6's also covers the outer addresses). A port
//! unreachable from the backend of a UDP flow refuses the flow.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use canary_common::{IPPROTO_UDP, addr::Addr, counters::Counter, csum, flow::CT_REVERSE};

use crate::{
    conntrack,
    nat::BPF_F_IPV6,
    packet::{self, ICMP_CSUM, IP_CSUM, L3, Packet, Quote, addr_offset, ptr_at, read},
    stats::{self, Action, Outcome, count},
    udp,
};

/// An ICMP or ICMPv6 message `pkt` leaving towards a client. A call of
/// its own (see ingress.rs).
#[inline(never)]
pub fn egress(ctx: &TcContext, pkt: &Packet) -> Outcome {
    stats::settle(error(ctx, pkt))
}

#[inline(always)]
fn error(ctx: &TcContext, pkt: &Packet) -> Result<Action, Counter> {
    let Some(q) = packet::icmp_error(ctx, pkt)? else {
        return Ok(Action::Ignore);
    };
    // The quoted packet went client → backend; its flow's reverse entry is
    // keyed backend → client and names the VIP.
    let rev_key = q.inner.reversed();
    let Some(rev_entry) = conntrack::lookup(&rev_key) else {
        return Ok(Action::Ignore);
    };
    let rev = rev_entry.read();
    if rev.flags & CT_REVERSE == 0 {
        return Ok(Action::Ignore);
    }
    let from_backend = pkt.key.src_addr == q.inner.dst_addr;
    if q.port_unreachable && from_backend && q.inner.proto == IPPROTO_UDP {
        let fwd = conntrack::forward_key(&rev_key, &rev);
        udp::refused(&fwd, q.inner.dst_addr, q.inner.dst_port);
    }
    rewrite(ctx, &q, rev.nat_addr, rev.nat_port, from_backend)?;
    count(Counter::IcmpErrorNatted);
    Ok(Action::Forward)
}

/// A pointer to the header field at `offset`, or the rewrite fails. Formed
/// afresh after every helper call (a csum helper may move packet data).
#[inline(always)]
fn field<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, Counter> {
    ptr_at(ctx, offset).ok_or(Counter::RewriteFailed)
}

/// Folds a change of one quoted field (`size` 2 or 4 bytes, from `from` to
/// `to`, loaded as stored) into the ICMP checksum at `at`: the field is
/// plain data to ICMP, so no pseudo-header flag.
#[inline(always)]
fn fold(ctx: &TcContext, at: usize, from: u32, to: u32, size: u64) -> Result<(), Counter> {
    ctx.l4_csum_replace(at, u64::from(from), u64::from(to), size)
        .map_err(|_| Counter::RewriteFailed)
}

/// Rewrites the error `q` to speak of `vip:vport` instead of the backend;
/// the outer source too if `outer_src` (the backend sent it).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    q: &Quote,
    vip: Addr,
    vport: u16,
    outer_src: bool,
) -> Result<(), Counter> {
    let at = q.icmp + ICMP_CSUM;
    let v6 = q.inner.family == canary_common::addr::FAMILY_V6;
    let backend = q.inner.dst_addr;
    let old_port = q.inner.dst_port;
    // The quoted transport checksum, before anything changes: its
    // pseudo-header holds the address being replaced.
    let inner_check: u16 = if q.inner_csum != 0 {
        read(ctx, q.inner_csum).ok_or(Counter::RewriteFailed)?
    } else {
        0
    };

    // 1. The quoted destination address (and the quoted IPv4 header
    //    checksum that covers it).
    let dst_at = addr_offset(q.inner_l3, v6, false);
    if v6 {
        let p = field::<Addr>(ctx, dst_at)?;
        // SAFETY: bounds-checked against data_end just above; packet
        // fields need not be aligned.
        unsafe { p.write_unaligned(vip) };
        // Size 0: `to` is a difference.
        let diff = u64::from(csum::diff16(&backend.0, &vip.0));
        ctx.l4_csum_replace(at, 0, diff, 0)
            .map_err(|_| Counter::RewriteFailed)?;
    } else {
        let (old, new) = (backend.v4(), vip.v4());
        let csum_at = q.inner_l3 + IP_CSUM;
        let p = field::<u32>(ctx, dst_at)?;
        let c = field::<u16>(ctx, csum_at)?;
        // SAFETY: as above.
        let (old_ip_csum, new_ip_csum) = unsafe {
            let old_ip_csum = c.read_unaligned();
            let new_ip_csum = csum::replace4(old_ip_csum, old, new);
            p.write_unaligned(new);
            c.write_unaligned(new_ip_csum);
            (old_ip_csum, new_ip_csum)
        };
        fold(ctx, at, old, new, 4)?;
        fold(ctx, at, u32::from(old_ip_csum), u32::from(new_ip_csum), 2)?;
    }

    // 2. The quoted destination port.
    if old_port != vport {
        let p = field::<u16>(ctx, q.inner_l4 + packet::L4_DPORT)?;
        // SAFETY: as above.
        unsafe { p.write_unaligned(vport) };
        fold(ctx, at, u32::from(old_port), u32::from(vport), 2)?;
    }

    // 3. The quoted transport checksum, if quoted: its pseudo-header held
    //    the backend's address, its header the backend's port. UDP's zero
    //    rule holds inside the quote too.
    let udp = q.inner.proto == IPPROTO_UDP;
    if q.inner_csum != 0 && !(udp && !v6 && csum::udp::keep(inner_check)) {
        let check = if v6 {
            csum::replace16(inner_check, &backend.0, &vip.0)
        } else {
            csum::replace4(inner_check, backend.v4(), vip.v4())
        };
        let check = csum::replace2(check, old_port, vport);
        let check = if udp {
            csum::udp::mangled(check)
        } else {
            check
        };
        let p = field::<u16>(ctx, q.inner_csum)?;
        // SAFETY: as above.
        unsafe { p.write_unaligned(check) };
        fold(ctx, at, u32::from(inner_check), u32::from(check), 2)?;
    }

    // 4. The outer source, if the backend sent the error: the IPv4 header
    //    checksum covers it; ICMPv4's checksum does not, ICMPv6's does
    //    (pseudo-header).
    if outer_src {
        let src_at = addr_offset(L3, v6, true);
        if v6 {
            let p = field::<Addr>(ctx, src_at)?;
            // SAFETY: as above.
            unsafe { p.write_unaligned(vip) };
            let diff = u64::from(csum::diff16(&backend.0, &vip.0));
            ctx.l4_csum_replace(at, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6)
                .map_err(|_| Counter::RewriteFailed)?;
        } else {
            let (old, new) = (backend.v4(), vip.v4());
            let p = field::<u32>(ctx, src_at)?;
            // SAFETY: as above.
            unsafe { p.write_unaligned(new) };
            ctx.l3_csum_replace(L3 + IP_CSUM, u64::from(old), u64::from(new), 4)
                .map_err(|_| Counter::RewriteFailed)?;
        }
    }
    Ok(())
}

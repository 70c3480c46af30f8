//! Header parsing with bounds-checked direct packet access.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};

use crate::stats::{self, Outcome};
use canary_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    addr::{Addr, FAMILY_V4, FAMILY_V6},
    counters::Counter,
    flow::FlowKey,
};

/// Ethernet header length; TC and XDP see packets from the MAC header on.
pub const ETH_HLEN: usize = 14;
/// Offset of the IP header: right after the Ethernet header (a packet of
/// another link layer, or with a VLAN tag left in the frame, is not IP to
/// the parser).
pub const L3: usize = ETH_HLEN;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// ICMP and ICMPv6 header: type, code, checksum, four bytes; then the
/// quoted packet of an error.
const ICMP_HLEN: usize = 8;

/// IPv4 header: checksum, source, destination.
pub const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
/// IPv6 header: source, destination.
const IP6_SADDR: usize = 8;
const IP6_DADDR: usize = 24;
/// Transport header, TCP and UDP alike: ports.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
/// Transport checksum: TCP, UDP, ICMP and ICMPv6.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
pub const ICMP_CSUM: usize = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the programs need of a TCP, UDP or ICMP packet over IPv4 or IPv6.
/// Filled in place by [`parse`] (start from [`Packet::EMPTY`]).
pub struct Packet {
    /// Offset of the TCP, UDP or ICMP header.
    pub l4: usize,
    /// Offset of the transport checksum.
    pub csum: usize,
    /// The 5-tuple in packet direction (network byte order, IPv4 mapped);
    /// its `proto` says TCP, UDP or ICMP (whose ports are 0).
    pub key: FlowKey,
    /// TCP flag byte (0 for UDP).
    pub flags: u8,
    /// Whether this is the first fragment of a fragmented datagram.
    pub first_fragment: bool,
    /// UDP: the checksum field is 0 ("none" over IPv4, invalid over IPv6).
    pub csum_zero: bool,
    /// Transport payload bytes (IP length minus every header).
    pub payload_len: u32,
}

impl Packet {
    /// A packet to parse into.
    pub const EMPTY: Packet = Packet {
        l4: 0,
        csum: 0,
        key: FlowKey {
            src_addr: Addr([0; 4]),
            dst_addr: Addr([0; 4]),
            src_port: 0,
            dst_port: 0,
            proto: 0,
            family: 0,
            _pad: 0,
        },
        flags: 0,
        first_fragment: false,
        csum_zero: false,
        payload_len: 0,
    };

    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A connection-opening SYN (not a SYN-ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.has(TCP_SYN) && !self.has(TCP_ACK)
    }

    /// Whether the packet is IPv6.
    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.key.family == FAMILY_V6
    }

    /// Whether the packet is UDP.
    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.key.proto == IPPROTO_UDP
    }

    /// Whether the packet is TCP.
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.key.proto == IPPROTO_TCP
    }

    /// Whether the packet is ICMP or ICMPv6 (no ports; see [`icmp_error`]).
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        self.key.proto == IPPROTO_ICMP || self.key.proto == IPPROTO_ICMPV6
    }

    /// Offset of the source (`src`) or destination address field.
    #[inline(always)]
    pub fn addr_offset(&self, src: bool) -> usize {
        addr_offset(L3, self.is_v6(), src)
    }
}

/// Offset of the source (`src`) or destination address of the IP header
/// at `l3`.
#[inline(always)]
pub fn addr_offset(l3: usize, v6: bool, src: bool) -> usize {
    l3 + match (v6, src) {
        (false, true) => IP_SADDR,
        (false, false) => IP_DADDR,
        (true, true) => IP6_SADDR,
        (true, false) => IP6_DADDR,
    }
}

/// A packet the programs parse in place: an skb at TC, or an XDP buffer.
pub trait Frame {
    /// Address of the first byte (the MAC header).
    fn data(&self) -> usize;
    /// One past the last directly readable byte.
    fn data_end(&self) -> usize;
    /// Length of the whole packet, readable or not.
    fn len(&self) -> usize;
    /// Makes the first `len` bytes directly readable; false if the packet
    /// is shorter.
    fn ensure_linear(&self, len: usize) -> bool;
}

/// `data` and `data_end` are loaded afresh at each use by an instruction
/// of their own. With plain field loads LLVM keeps a loaded pointer in a
/// register and later widens it from 32 bits with shifts, which the
/// verifier refuses ("pointer arithmetic on pkt_end prohibited"); a
/// 32-bit load already zero-extends, so the asm hands over the full
/// register and nothing is widened.
impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        let data: usize;
        // SAFETY: `skb` is the program's context pointer, valid for the
        // run; offset 76 is `__sk_buff.data`, read as the 32-bit field it
        // is (the verifier rewrites it into the real pointer load).
        unsafe {
            core::arch::asm!(
                "{0} = *(u32 *)({1} + 76)",
                out(reg) data,
                in(reg) self.skb.skb,
                options(readonly, nostack, preserves_flags)
            );
        }
        data
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        let data_end: usize;
        // SAFETY: as in `data`; offset 80 is `__sk_buff.data_end`.
        unsafe {
            core::arch::asm!(
                "{0} = *(u32 *)({1} + 80)",
                out(reg) data_end,
                in(reg) self.skb.skb,
                options(readonly, nostack, preserves_flags)
            );
        }
        data_end
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    /// An skb may keep headers in paged fragments; pull them in.
    #[inline(always)]
    fn ensure_linear(&self, len: usize) -> bool {
        // `Frame::` spelled out: the inherent methods of the same names
        // would win, and they are the plain loads this impl avoids.
        if Frame::data(self) + len <= Frame::data_end(self) {
            return true;
        }
        if Frame::len(self) < len {
            return false;
        }
        self.pull_data(len as u32).is_ok() && Frame::data(self) + len <= Frame::data_end(self)
    }
}

/// Programs are loaded without multi-buffer support, so an XDP buffer is
/// one linear run of bytes.
impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    /// Loaded afresh at each use. With a plain load LLVM sees that a read's
    /// bounds check repeats an earlier `ensure_linear` and drops it, but the
    /// verifier tracks the two variable-offset pointers separately and then
    /// rejects the read.
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: `ctx` is the program's context pointer, valid for the run;
        // a volatile load of one of its fields is an ordinary ctx access.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.ctx).data_end)) as usize }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn ensure_linear(&self, len: usize) -> bool {
        self.data() + len <= self.data_end()
    }
}

/// Reads a `T` at `offset` from the start of the packet, if it lies inside
/// the linear data.
#[inline(always)]
pub fn read<T: Copy, F: Frame>(ctx: &F, offset: usize) -> Option<T> {
    let ptr = ptr_at::<T, F>(ctx, offset)?;
    // SAFETY: `ptr_at` checked [ptr, ptr + size_of::<T>()) against data_end
    // (the verifier checks it again); packet fields need not be aligned,
    // hence read_unaligned.
    Some(unsafe { core::ptr::read_unaligned(ptr) })
}

/// A pointer to a `T` at `offset` from the start of the packet, if it lies
/// inside the linear data. Dereferencing it is up to the caller.
#[inline(always)]
pub fn ptr_at<T, F: Frame>(ctx: &F, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Parses an IPv4 or IPv6 packet carrying TCP, UDP or ICMP into `out`:
/// one parser for both families, which differ only up to the transport
/// header, and for both transports, which share the port fields.
///
/// `Ignore`: not IP, another protocol, or a non-first fragment (no ports
/// to match): not ours. `Stack`: malformed, counted. `Forward`: parsed.
// A call of its own, filling the caller's packet in place: inlined, its
// temporaries (and the registers it spills) would sit in every program's
// frame beside everything the program keeps after parsing.
#[inline(never)]
pub fn parse<F: Frame>(ctx: &F, out: &mut Packet) -> Outcome {
    match parse_into(ctx, out) {
        Ok(true) => Outcome::Forward,
        Ok(false) => Outcome::Ignore,
        Err(counter) => stats::settle(Err(counter)),
    }
}

#[inline(always)]
fn parse_into<F: Frame>(ctx: &F, out: &mut Packet) -> Result<bool, Counter> {
    if !ctx.ensure_linear(ETH_HLEN) {
        return Err(Counter::TruncatedEth);
    }
    let ethertype: u16 = read(ctx, 12).ok_or(Counter::TruncatedEth)?;
    let l4_len = match u16::from_be(ethertype) {
        ETH_P_IP => ipv4(ctx, out)?,
        ETH_P_IPV6 => ipv6(ctx, out)?,
        _ => None,
    };
    let Some(l4_len) = l4_len else {
        return Ok(false);
    };
    transport(ctx, out, l4_len)?;
    Ok(true)
}

/// Whether the IP header's protocol is one the programs look at: TCP and
/// UDP, and the family's ICMP (errors about steered flows).
#[inline(always)]
fn wanted(proto: u8, icmp: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == icmp
}

/// The IPv4 header at [`L3`], if it carries TCP, UDP or ICMP (and is no
/// later fragment): addresses, protocol and offsets into `out`; returns
/// the bytes from the transport header to the end of the IP payload.
#[inline(always)]
fn ipv4<F: Frame>(ctx: &F, out: &mut Packet) -> Result<Option<usize>, Counter> {
    let l3 = L3;
    if !ctx.ensure_linear(l3 + IPV4_MIN_HLEN) {
        return Err(Counter::BadIpHeader);
    }
    let ver_ihl: u8 = read(ctx, l3).ok_or(Counter::BadIpHeader)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Counter::BadIpHeader);
    }
    let proto: u8 = read(ctx, l3 + 9).ok_or(Counter::BadIpHeader)?;
    if !wanted(proto, IPPROTO_ICMP) {
        return Ok(None);
    }
    let frag: u16 = read(ctx, l3 + 6).ok_or(Counter::BadIpHeader)?;
    let frag = u16::from_be(frag);
    if frag & 0x1fff != 0 {
        // Later fragments carry no transport header.
        return Ok(None);
    }
    let l4 = l3 + ihl;
    if !ctx.ensure_linear(l4) {
        return Err(Counter::BadIpHeader);
    }
    let src: u32 = read(ctx, l3 + IP_SADDR).ok_or(Counter::BadIpHeader)?;
    let dst: u32 = read(ctx, l3 + IP_DADDR).ok_or(Counter::BadIpHeader)?;
    let total_len: u16 = read(ctx, l3 + 2).ok_or(Counter::BadIpHeader)?;
    // GSO packets may carry 0 here: the skb length counts instead.
    let total_len = match u16::from_be(total_len) as usize {
        0 => ctx.len() - l3,
        n => n,
    };
    out.l4 = l4;
    out.key.src_addr = Addr::from_v4(src);
    out.key.dst_addr = Addr::from_v4(dst);
    out.key.proto = proto;
    out.key.family = FAMILY_V4;
    out.first_fragment = frag & 0x2000 != 0;
    Ok(Some(total_len.saturating_sub(ihl)))
}

/// The IPv6 header at [`L3`], if TCP, UDP or ICMPv6 follows it
/// directly: as [`ipv4`].
#[inline(always)]
fn ipv6<F: Frame>(ctx: &F, out: &mut Packet) -> Result<Option<usize>, Counter> {
    let l3 = L3;
    if !ctx.ensure_linear(l3 + IPV6_HLEN) {
        return Err(Counter::BadIpHeader);
    }
    let ver: u8 = read(ctx, l3).ok_or(Counter::BadIpHeader)?;
    if ver >> 4 != 6 {
        return Err(Counter::BadIpHeader);
    }
    let payload_len: u16 = read(ctx, l3 + 4).ok_or(Counter::BadIpHeader)?;
    let next: u8 = read(ctx, l3 + 6).ok_or(Counter::BadIpHeader)?;
    if !wanted(next, IPPROTO_ICMPV6) {
        if matches!(next, 0 | 43 | 44 | 51 | 60) {
            // Extension headers are passed, counted, not walked: a walk
            // gives every later instruction a variable transport offset,
            // which multiplies the verifier's work on the whole program
            // (minutes per load at six headers). Traffic to a service with
            // extension headers (hop-by-hop options, fragments) is rare.
            return Err(Counter::Ipv6ExtHeader);
        }
        return Ok(None);
    }
    out.key.src_addr = read(ctx, l3 + IP6_SADDR).ok_or(Counter::BadIpHeader)?;
    out.key.dst_addr = read(ctx, l3 + IP6_DADDR).ok_or(Counter::BadIpHeader)?;
    let l4 = l3 + IPV6_HLEN;
    if !ctx.ensure_linear(l4) {
        return Err(Counter::BadIpHeader);
    }
    // A jumbogram (length 0) is counted from the packet length instead.
    let ip_len = match u16::from_be(payload_len) as usize {
        0 => ctx.len() - l3 - IPV6_HLEN,
        n => n,
    };
    out.l4 = l4;
    out.key.proto = next;
    out.key.family = FAMILY_V6;
    out.first_fragment = false;
    Ok(Some(ip_len))
}

/// The TCP or UDP header at `out.l4` (`l4_len` bytes to the end of the IP
/// payload): the ports are at the same offsets in both; the flags, the
/// checksum's place and the header length differ. ICMP gets no ports here
/// (see [`icmp_error`]).
#[inline(always)]
fn transport<F: Frame>(ctx: &F, out: &mut Packet, l4_len: usize) -> Result<(), Counter> {
    let l4 = out.l4;
    out.key._pad = 0;
    if !out.is_tcp() && !out.is_udp() {
        out.key.src_port = 0;
        out.key.dst_port = 0;
        out.csum = l4 + ICMP_CSUM;
        out.flags = 0;
        out.csum_zero = false;
        out.payload_len = 0;
        return Ok(());
    }
    let udp = out.is_udp();
    let (min, bad) = if udp {
        (UDP_HLEN, Counter::BadUdpHeader)
    } else {
        (TCP_MIN_HLEN, Counter::BadTcpHeader)
    };
    if !ctx.ensure_linear(l4 + min) {
        return Err(bad);
    }
    out.key.src_port = read(ctx, l4 + L4_SPORT).ok_or(bad)?;
    out.key.dst_port = read(ctx, l4 + L4_DPORT).ok_or(bad)?;
    let hlen = if udp {
        let len: u16 = read(ctx, l4 + 4).ok_or(bad)?;
        let check: u16 = read(ctx, l4 + UDP_CSUM).ok_or(bad)?;
        // GSO datagrams may carry a length of their own: only a length
        // that cannot hold the header is malformed.
        if (u16::from_be(len) as usize) < UDP_HLEN {
            return Err(bad);
        }
        out.flags = 0;
        out.csum = l4 + UDP_CSUM;
        out.csum_zero = check == 0;
        UDP_HLEN
    } else {
        let doff: u8 = read(ctx, l4 + 12).ok_or(bad)?;
        let doff = ((doff >> 4) as usize) * 4;
        if doff < TCP_MIN_HLEN {
            return Err(bad);
        }
        out.flags = read(ctx, l4 + 13).ok_or(bad)?;
        out.csum = l4 + TCP_CSUM;
        out.csum_zero = false;
        doff
    };
    out.payload_len = l4_len.saturating_sub(hlen) as u32;
    Ok(())
}

/// ICMPv4 "destination unreachable", and its "port unreachable" code.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// ICMPv6 "destination unreachable", and its "port unreachable" code.
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;

/// An ICMP error and the packet it quotes.
pub struct Quote {
    /// Offset of the outer ICMP header; its checksum is at `icmp + 2`.
    pub icmp: usize,
    /// Offset of the quoted IP header.
    pub inner_l3: usize,
    /// Offset of the quoted transport header.
    pub inner_l4: usize,
    /// Offset of the quoted transport checksum, 0 if the quote ends
    /// before it.
    pub inner_csum: usize,
    /// The quoted packet's 5-tuple as it travelled (client → backend,
    /// after DNAT).
    pub inner: FlowKey,
    /// The error is "port unreachable" (ICMP 3/3, ICMPv6 1/4).
    pub port_unreachable: bool,
}

/// The error inside ICMP message `pkt`, if it is one (ICMP 3, 11, 12;
/// ICMPv6 1–4) quoting a TCP or UDP packet of `pkt`'s family.
///
/// `Ok(None)`: no error, or it quotes something else. `Err`: a quote
/// canary cannot rewrite (counted, passed).
#[inline(always)]
pub fn icmp_error<F: Frame>(ctx: &F, pkt: &Packet) -> Result<Option<Quote>, Counter> {
    let icmp = pkt.l4;
    if !ctx.ensure_linear(icmp + ICMP_HLEN) {
        return Ok(None);
    }
    let kind: u8 = read(ctx, icmp).ok_or(Counter::IcmpQuoteUnsupported)?;
    let code: u8 = read(ctx, icmp + 1).ok_or(Counter::IcmpQuoteUnsupported)?;
    let v6 = pkt.is_v6();
    let error = if v6 {
        matches!(kind, 1..=4)
    } else {
        matches!(kind, 3 | 11 | 12)
    };
    if !error {
        return Ok(None);
    }
    let port_unreachable = if v6 {
        kind == ICMP6_DEST_UNREACH && code == ICMP6_PORT_UNREACH
    } else {
        kind == ICMP_DEST_UNREACH && code == ICMP_PORT_UNREACH
    };
    let inner_l3 = icmp + ICMP_HLEN;
    // The quoted header is read with fixed lengths (no IPv4 options, no
    // IPv6 extension headers): each variable part would multiply the
    // verifier's work on the whole program, and routers and hosts quote
    // such packets rarely. Others are passed and counted.
    let (hlen, proto_at) = if v6 {
        (IPV6_HLEN, 6)
    } else {
        (IPV4_MIN_HLEN, 9)
    };
    if !ctx.ensure_linear(inner_l3 + hlen + 4) {
        return Err(Counter::IcmpQuoteUnsupported);
    }
    let first: u8 = read(ctx, inner_l3).ok_or(Counter::IcmpQuoteUnsupported)?;
    let proto: u8 = read(ctx, inner_l3 + proto_at).ok_or(Counter::IcmpQuoteUnsupported)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(None);
    }
    let (src, dst) = if v6 {
        if first >> 4 != 6 {
            return Err(Counter::IcmpQuoteUnsupported);
        }
        let src: Addr = read(ctx, inner_l3 + IP6_SADDR).ok_or(Counter::IcmpQuoteUnsupported)?;
        let dst: Addr = read(ctx, inner_l3 + IP6_DADDR).ok_or(Counter::IcmpQuoteUnsupported)?;
        (src, dst)
    } else {
        if first != 0x45 {
            return Err(Counter::IcmpQuoteUnsupported);
        }
        let frag: u16 = read(ctx, inner_l3 + 6).ok_or(Counter::IcmpQuoteUnsupported)?;
        if u16::from_be(frag) & 0x1fff != 0 {
            return Ok(None);
        }
        let src: u32 = read(ctx, inner_l3 + IP_SADDR).ok_or(Counter::IcmpQuoteUnsupported)?;
        let dst: u32 = read(ctx, inner_l3 + IP_DADDR).ok_or(Counter::IcmpQuoteUnsupported)?;
        (Addr::from_v4(src), Addr::from_v4(dst))
    };
    let inner_l4 = inner_l3 + hlen;
    let src_port: u16 = read(ctx, inner_l4 + L4_SPORT).ok_or(Counter::IcmpQuoteUnsupported)?;
    let dst_port: u16 = read(ctx, inner_l4 + L4_DPORT).ok_or(Counter::IcmpQuoteUnsupported)?;
    let csum_at = inner_l4
        + if proto == IPPROTO_UDP {
            UDP_CSUM
        } else {
            TCP_CSUM
        };
    // The quote may end before the checksum (ICMPv4 promises 8 bytes of
    // the transport header only); then it is not rewritten.
    let inner_csum = if csum_at + 2 <= ctx.len() && ctx.ensure_linear(csum_at + 2) {
        csum_at
    } else {
        0
    };
    Ok(Some(Quote {
        icmp,
        inner_l3,
        inner_l4,
        inner_csum,
        inner: FlowKey {
            src_addr: src,
            dst_addr: dst,
            src_port,
            dst_port,
            proto,
            family: pkt.key.family,
            _pad: 0,
        },
        port_unreachable,
    }))
}

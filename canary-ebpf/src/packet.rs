//! Header parsing with bounds-checked direct packet access.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use canary_common::{
    IPPROTO_TCP,
    addr::{Addr, FAMILY_V4, FAMILY_V6},
    counters::Counter,
    flow::FlowKey,
};

/// Ethernet header length; TC and XDP see packets from the MAC header on.
pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;

/// IPv4 header: checksum, source, destination.
pub const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
/// IPv6 header: source, destination.
const IP6_SADDR: usize = 8;
const IP6_DADDR: usize = 24;
/// TCP header: ports, checksum.
pub const TCP_SPORT: usize = 0;
pub const TCP_DPORT: usize = 2;
pub const TCP_CSUM: usize = 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the programs need of an IPv4 or IPv6 TCP packet.
pub struct Packet {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// The 5-tuple in packet direction (network byte order, IPv4 mapped).
    pub key: FlowKey,
    /// TCP flag byte.
    pub flags: u8,
    /// Whether this is the first fragment of a fragmented datagram.
    pub first_fragment: bool,
    /// TCP payload bytes (IP length minus every header).
    pub payload_len: u32,
}

impl Packet {
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

    /// Offset of the source (`src`) or destination address field.
    #[inline(always)]
    pub fn addr_offset(&self, src: bool) -> usize {
        self.l3
            + match (self.is_v6(), src) {
                (false, true) => IP_SADDR,
                (false, false) => IP_DADDR,
                (true, true) => IP6_SADDR,
                (true, false) => IP6_DADDR,
            }
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
fn read<T: Copy, F: Frame>(ctx: &F, offset: usize) -> Option<T> {
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

/// Parses an IPv4 or IPv6 TCP packet: one parser for both families, which
/// differ only up to the transport header.
///
/// `Ok(None)`: not IP/TCP, or a non-first fragment (no ports to match):
/// not ours. `Err`: malformed in a way that is counted.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Result<Option<Packet>, Counter> {
    if !ctx.ensure_linear(ETH_HLEN) {
        return Err(Counter::TruncatedEth);
    }
    let ethertype: u16 = read(ctx, 12).ok_or(Counter::TruncatedEth)?;
    let l3 = ETH_HLEN;
    let ip = match u16::from_be(ethertype) {
        ETH_P_IP => ipv4(ctx, l3)?,
        ETH_P_IPV6 => ipv6(ctx, l3)?,
        _ => None,
    };
    let Some(ip) = ip else {
        return Ok(None);
    };
    tcp(ctx, l3, &ip)
}

/// What the network layer says about a TCP packet.
struct Ip {
    family: u8,
    src: Addr,
    dst: Addr,
    /// Offset of the transport header.
    l4: usize,
    /// Bytes from the transport header to the end of the IP payload.
    l4_len: usize,
    first_fragment: bool,
}

/// The IPv4 header at `l3`, if it carries TCP (and is no later fragment).
#[inline(always)]
fn ipv4<F: Frame>(ctx: &F, l3: usize) -> Result<Option<Ip>, Counter> {
    if !ctx.ensure_linear(l3 + IPV4_MIN_HLEN) {
        return Err(Counter::BadIpHeader);
    }
    let ver_ihl: u8 = read(ctx, l3).ok_or(Counter::BadIpHeader)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Counter::BadIpHeader);
    }
    let proto: u8 = read(ctx, l3 + 9).ok_or(Counter::BadIpHeader)?;
    if proto != IPPROTO_TCP {
        return Ok(None);
    }
    let frag: u16 = read(ctx, l3 + 6).ok_or(Counter::BadIpHeader)?;
    let frag = u16::from_be(frag);
    if frag & 0x1fff != 0 {
        // Later fragments carry no TCP header.
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
    Ok(Some(Ip {
        family: FAMILY_V4,
        src: Addr::from_v4(src),
        dst: Addr::from_v4(dst),
        l4,
        l4_len: total_len.saturating_sub(ihl),
        first_fragment: frag & 0x2000 != 0,
    }))
}

/// The IPv6 header at `l3`, if TCP follows it directly.
#[inline(always)]
fn ipv6<F: Frame>(ctx: &F, l3: usize) -> Result<Option<Ip>, Counter> {
    if !ctx.ensure_linear(l3 + IPV6_HLEN) {
        return Err(Counter::BadIpHeader);
    }
    let ver: u8 = read(ctx, l3).ok_or(Counter::BadIpHeader)?;
    if ver >> 4 != 6 {
        return Err(Counter::BadIpHeader);
    }
    let payload_len: u16 = read(ctx, l3 + 4).ok_or(Counter::BadIpHeader)?;
    let next: u8 = read(ctx, l3 + 6).ok_or(Counter::BadIpHeader)?;
    let src: Addr = read(ctx, l3 + IP6_SADDR).ok_or(Counter::BadIpHeader)?;
    let dst: Addr = read(ctx, l3 + IP6_DADDR).ok_or(Counter::BadIpHeader)?;
    if next != IPPROTO_TCP {
        if matches!(next, 0 | 43 | 44 | 51 | 60) {
            // Extension headers are passed, counted, not walked: a walk
            // gives every later instruction a variable transport offset,
            // which multiplies the verifier's work on the whole program
            // (minutes per load at six headers). TCP to a service with
            // extension headers (hop-by-hop options, fragments) is rare.
            return Err(Counter::Ipv6ExtHeader);
        }
        return Ok(None);
    }
    let l4 = l3 + IPV6_HLEN;
    if !ctx.ensure_linear(l4) {
        return Err(Counter::BadIpHeader);
    }
    // A jumbogram (length 0) is counted from the packet length instead.
    let ip_len = match u16::from_be(payload_len) as usize {
        0 => ctx.len() - l3 - IPV6_HLEN,
        n => n,
    };
    Ok(Some(Ip {
        family: FAMILY_V6,
        src,
        dst,
        l4,
        l4_len: ip_len,
        first_fragment: false,
    }))
}

/// The TCP header after `ip`.
#[inline(always)]
fn tcp<F: Frame>(ctx: &F, l3: usize, ip: &Ip) -> Result<Option<Packet>, Counter> {
    let l4 = ip.l4;
    if !ctx.ensure_linear(l4 + TCP_MIN_HLEN) {
        return Err(Counter::BadTcpHeader);
    }
    let src_port: u16 = read(ctx, l4 + TCP_SPORT).ok_or(Counter::BadTcpHeader)?;
    let dst_port: u16 = read(ctx, l4 + TCP_DPORT).ok_or(Counter::BadTcpHeader)?;
    let doff: u8 = read(ctx, l4 + 12).ok_or(Counter::BadTcpHeader)?;
    let doff = ((doff >> 4) as usize) * 4;
    if doff < TCP_MIN_HLEN {
        return Err(Counter::BadTcpHeader);
    }
    let flags: u8 = read(ctx, l4 + 13).ok_or(Counter::BadTcpHeader)?;
    Ok(Some(Packet {
        l3,
        l4,
        key: FlowKey {
            src_addr: ip.src,
            dst_addr: ip.dst,
            src_port,
            dst_port,
            proto: IPPROTO_TCP,
            family: ip.family,
            _pad: 0,
        },
        flags,
        first_fragment: ip.first_fragment,
        payload_len: ip.l4_len.saturating_sub(doff) as u32,
    }))
}

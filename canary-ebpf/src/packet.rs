//! Header parsing with bounds-checked direct packet access.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use canary_common::{IPPROTO_TCP, counters::Counter, flow::FlowKey};

/// Ethernet header length; TC and XDP see packets from the MAC header on.
pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;

/// Offsets inside the IPv4 header.
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// Offsets inside the TCP header.
pub const TCP_SPORT: usize = 0;
pub const TCP_DPORT: usize = 2;
pub const TCP_CSUM: usize = 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the programs need of an IPv4/TCP packet.
pub struct Tcp4 {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// The 5-tuple in packet direction (network byte order).
    pub key: FlowKey,
    /// TCP flag byte.
    pub flags: u8,
    /// Whether this is the first fragment of a fragmented datagram.
    pub first_fragment: bool,
    /// TCP payload bytes (IP total length minus both headers).
    pub payload_len: u32,
}

impl Tcp4 {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A connection-opening SYN (not a SYN-ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.has(TCP_SYN) && !self.has(TCP_ACK)
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

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    /// An skb may keep headers in paged fragments; pull them in.
    #[inline(always)]
    fn ensure_linear(&self, len: usize) -> bool {
        if self.data() + len <= self.data_end() {
            return true;
        }
        if Frame::len(self) < len {
            return false;
        }
        self.pull_data(len as u32).is_ok() && self.data() + len <= self.data_end()
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

/// Parses an IPv4/TCP packet.
///
/// `Ok(None)`: not IPv4/TCP, or a non-first fragment (no ports to match):
/// not ours. `Err`: malformed in a way that is counted.
#[inline(always)]
pub fn parse_tcp4<F: Frame>(ctx: &F) -> Result<Option<Tcp4>, Counter> {
    if !ctx.ensure_linear(ETH_HLEN) {
        return Err(Counter::TruncatedEth);
    }
    let ethertype: u16 = read(ctx, 12).ok_or(Counter::TruncatedEth)?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return Ok(None);
    }
    let l3 = ETH_HLEN;
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
    let first_fragment = frag & 0x2000 != 0;
    let l4 = l3 + ihl;
    if !ctx.ensure_linear(l4) {
        return Err(Counter::BadIpHeader);
    }
    if !ctx.ensure_linear(l4 + TCP_MIN_HLEN) {
        return Err(Counter::BadTcpHeader);
    }
    let src_addr: u32 = read(ctx, l3 + IP_SADDR).ok_or(Counter::BadIpHeader)?;
    let dst_addr: u32 = read(ctx, l3 + IP_DADDR).ok_or(Counter::BadIpHeader)?;
    let src_port: u16 = read(ctx, l4 + TCP_SPORT).ok_or(Counter::BadTcpHeader)?;
    let dst_port: u16 = read(ctx, l4 + TCP_DPORT).ok_or(Counter::BadTcpHeader)?;
    let doff: u8 = read(ctx, l4 + 12).ok_or(Counter::BadTcpHeader)?;
    if ((doff >> 4) as usize) * 4 < TCP_MIN_HLEN {
        return Err(Counter::BadTcpHeader);
    }
    let flags: u8 = read(ctx, l4 + 13).ok_or(Counter::BadTcpHeader)?;
    let total_len: u16 = read(ctx, l3 + 2).ok_or(Counter::BadIpHeader)?;
    let headers = ihl + ((doff >> 4) as usize) * 4;
    // A total length shorter than the headers is malformed; GSO packets
    // may carry 0 here and are counted from the skb length instead.
    let total_len = match u16::from_be(total_len) as usize {
        0 => ctx.len() - l3,
        n => n,
    };
    let payload_len = total_len.saturating_sub(headers) as u32;
    Ok(Some(Tcp4 {
        l3,
        l4,
        key: FlowKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        },
        flags,
        first_fragment,
        payload_len,
    }))
}

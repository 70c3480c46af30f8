//! Ethernet/IPv4 or IPv6 frames carrying TCP, UDP or an ICMP error for
//! `BPF_PROG_TEST_RUN`, and their inverse, every checksum computed (and
//! verified) from scratch; TCP segments sent through a raw socket for
//! namespace tests.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// TCP flag bits.
pub const FIN: u8 = 0x01;
/// See [`FIN`].
pub const SYN: u8 = 0x02;
/// See [`FIN`].
pub const RST: u8 = 0x04;
/// See [`FIN`].
pub const PSH: u8 = 0x08;
/// See [`FIN`].
pub const ACK: u8 = 0x10;

/// TC verdicts as the programs return them.
pub const TC_ACT_UNSPEC: i32 = -1;
/// See [`TC_ACT_UNSPEC`].
pub const TC_ACT_OK: i32 = 0;
/// See [`TC_ACT_UNSPEC`].
pub const TC_ACT_SHOT: i32 = 2;
/// XDP verdicts (`enum xdp_action`).
pub const XDP_DROP: i32 = 1;
/// See [`XDP_DROP`].
pub const XDP_PASS: i32 = 2;

const ETH_HLEN: usize = 14;

/// A TCP segment to build.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// IPv6 extension headers before the TCP header: (type, length in
    /// bytes, a multiple of 8).
    pub ext: Vec<(u8, usize)>,
}

/// IPv6 extension header types.
pub const EXT_HOP_BY_HOP: u8 = 0;
/// See [`EXT_HOP_BY_HOP`].
pub const EXT_ROUTING: u8 = 43;
/// See [`EXT_HOP_BY_HOP`]. Built as a first fragment with more to come.
pub const EXT_FRAGMENT: u8 = 44;
/// See [`EXT_HOP_BY_HOP`].
pub const EXT_DEST_OPTS: u8 = 60;

impl Tcp {
    /// A segment with no payload (both addresses of one family).
    pub fn new(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, flags: u8) -> Tcp {
        let (src, dst) = (src.into(), dst.into());
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "one family per segment: {src} -> {dst}"
        );
        Tcp {
            src,
            dst,
            flags,
            seq: 1000,
            ack: 0,
            payload: Vec::new(),
            ext: Vec::new(),
        }
    }

    /// The same IPv6 segment behind one more extension header.
    #[must_use]
    pub fn with_ext(mut self, kind: u8, len: usize) -> Tcp {
        assert!(
            len >= 8 && len.is_multiple_of(8) && self.src.is_ipv6(),
            "IPv6 only, length a multiple of 8"
        );
        self.ext.push((kind, len));
        self
    }

    /// The same segment with a payload.
    #[must_use]
    pub fn with_payload(mut self, payload: &[u8]) -> Tcp {
        self.payload = payload.to_vec();
        self
    }

    /// The full Ethernet frame with correct IP and TCP checksums.
    pub fn frame(&self) -> Vec<u8> {
        let tcp_len = 20 + self.payload.len();
        let mut f = Vec::with_capacity(ETH_HLEN + 80 + tcp_len);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let total = 20 + tcp_len;
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                // IPv4: version 4, IHL 5, DF, TTL 64, TCP.
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(
                    &u16::try_from(total)
                        .expect("an IPv4 packet is at most 65535 bytes")
                        .to_be_bytes(),
                );
                f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                let ip_csum = checksum(&f[ETH_HLEN..ETH_HLEN + 20], 0);
                f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ext_len: usize = self.ext.iter().map(|(_, len)| len).sum();
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(
                    &u16::try_from(ext_len + tcp_len)
                        .expect("no jumbograms")
                        .to_be_bytes(),
                );
                let first = self.ext.first().map_or(6, |(kind, _)| *kind);
                f.extend_from_slice(&[first, 64]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                for (i, (kind, len)) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(6, |(k, _)| *k);
                    let start = f.len();
                    f.resize(start + len, 0);
                    f[start] = next;
                    if *kind == EXT_FRAGMENT {
                        // Offset 0, more fragments: the first fragment.
                        f[start + 3] = 1;
                    } else {
                        f[start + 1] = u8::try_from(len / 8 - 1).expect("short header");
                    }
                }
            }
            _ => unreachable!("checked in Tcp::new"),
        }
        // TCP: data offset 5, window 64240.
        let l4 = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.extend_from_slice(&[0x50, self.flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        f.extend_from_slice(&self.payload);
        let csum = checksum(
            &f[l4..],
            pseudo_sum(self.src.ip(), self.dst.ip(), 6, tcp_len),
        );
        f[l4 + 16..l4 + 18].copy_from_slice(&csum.to_be_bytes());
        f
    }
}

/// Sends hand-built IPv4/TCP segments through a raw socket, as a spoofer,
/// a duplicating network or a stray sender would: the local TCP stack
/// knows nothing of them. Create and use it on a thread inside the
/// namespace the segments leave from (a lab's client namespace); the
/// source address may be any address, routing decides where they go.
#[derive(Debug)]
pub struct RawSender {
    fd: OwnedFd,
}

impl RawSender {
    /// An `IPPROTO_RAW` socket (needs `CAP_NET_RAW`): what is sent is the
    /// whole IP packet.
    pub fn new() -> io::Result<RawSender> {
        // SAFETY: socket has no memory preconditions.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor just created and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawSender { fd })
    }

    /// Sends `seg` (its IP packet, checksums included) towards `seg.dst`.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "AF_INET and the size of a sockaddr_in fit their C types"
    )]
    pub fn send(&self, seg: &Tcp) -> io::Result<()> {
        let IpAddr::V4(dst_ip) = seg.dst.ip() else {
            return Err(io::Error::other("the raw sender sends IPv4 only"));
        };
        let frame = seg.frame();
        let packet = &frame[ETH_HLEN..];
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst_ip.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the descriptor is open; `packet` and `dst` are live for
        // the call and their exact sizes are passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const dst).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        match usize::try_from(sent) {
            Ok(n) if n == packet.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "raw send: {n} of {} bytes",
                packet.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }
}

/// What a frame says, with checksums verified from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub flags: u8,
    pub payload: Vec<u8>,
    /// The IPv4 header checksum is correct (always true for IPv6, which
    /// has none).
    pub ip_csum_ok: bool,
    /// The TCP checksum (with pseudo-header) is correct.
    pub tcp_csum_ok: bool,
}

/// Parses an Ethernet/IPv4 or IPv6/TCP frame (IPv6 extension headers
/// walked); `None` if it is not one.
pub fn parse(f: &[u8]) -> Option<Parsed> {
    let ip = f.get(ETH_HLEN..)?;
    let (src_ip, dst_ip, ip_csum_ok, tcp): (IpAddr, IpAddr, bool, &[u8]) = match f.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 || ip.len() < total || total < ihl + 20 {
                return None;
            }
            (
                IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
                checksum(&ip[..ihl], 0) == 0,
                &ip[ihl..total],
            )
        }
        [0x86, 0xdd] => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let addr = |at: usize| -> Option<IpAddr> {
                let o: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            };
            let (src, dst) = (addr(8)?, addr(24)?);
            let mut next = *ip.get(6)?;
            let mut off = 40;
            while matches!(next, 0 | 43 | 44 | 60) {
                let len = if next == 44 {
                    8
                } else {
                    (usize::from(*ip.get(off + 1)?) + 1) * 8
                };
                next = *ip.get(off)?;
                off += len;
            }
            if next != 6 || ip.len() < 40 + payload || 40 + payload < off + 20 {
                return None;
            }
            (src, dst, true, &ip[off..40 + payload])
        }
        _ => return None,
    };
    let doff = usize::from(tcp[12] >> 4) * 4;
    Some(Parsed {
        src: SocketAddr::new(src_ip, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddr::new(dst_ip, u16::from_be_bytes([tcp[2], tcp[3]])),
        flags: tcp[13],
        payload: tcp[doff..].to_vec(),
        ip_csum_ok,
        tcp_csum_ok: checksum(tcp, pseudo_sum(src_ip, dst_ip, 6, tcp.len())) == 0,
    })
}

/// Sum of the pseudo-header of a `proto` transport (either family),
/// unfolded.
fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> u32 {
    let words = |a: IpAddr| -> u32 {
        let bytes = match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        bytes
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum()
    };
    words(src)
        + words(dst)
        + u32::from(proto)
        + u32::try_from(l4_len).expect("a transport segment is at most 65535 bytes")
}

/// IP protocol numbers.
pub const PROTO_UDP: u8 = 17;
/// See [`PROTO_UDP`].
pub const PROTO_ICMP: u8 = 1;
/// See [`PROTO_UDP`].
pub const PROTO_ICMPV6: u8 = 58;

/// An Ethernet frame: the IP header (IPv4 without options, IPv6 without
/// extension headers) for `proto` from `src` to `dst`, then `l4`. The IPv4
/// header checksum is computed; `l4`'s own checksum is the caller's.
fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + 40 + l4.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02]);
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let total =
                u16::try_from(20 + l4.len()).expect("an IPv4 packet is at most 65535 bytes");
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            let ip_csum = checksum(&f[ETH_HLEN..ETH_HLEN + 20], 0);
            f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            let len = u16::try_from(l4.len()).expect("no jumbograms");
            f.extend_from_slice(&len.to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
        }
        _ => panic!("one family per packet: {src} -> {dst}"),
    }
    f.extend_from_slice(l4);
    f
}

/// A UDP datagram to build.
#[derive(Clone, Debug)]
pub struct Udp {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
    /// The checksum field as sent: `None` computes it (a computed 0 is
    /// sent as 0xFFFF, RFC 768); `Some(c)` sends `c` (0: "none").
    pub checksum: Option<u16>,
}

impl Udp {
    /// A datagram with a computed checksum (both addresses of one family).
    pub fn new(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, payload: &[u8]) -> Udp {
        let (src, dst) = (src.into(), dst.into());
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "one family per datagram: {src} -> {dst}"
        );
        Udp {
            src,
            dst,
            payload: payload.to_vec(),
            checksum: None,
        }
    }

    /// The same datagram with checksum field `c` as sent (0: "none").
    #[must_use]
    pub fn with_checksum(mut self, c: u16) -> Udp {
        self.checksum = Some(c);
        self
    }

    /// The UDP header and payload, checksum as configured.
    pub fn segment(&self) -> Vec<u8> {
        let len = 8 + self.payload.len();
        let mut u = Vec::with_capacity(len);
        u.extend_from_slice(&self.src.port().to_be_bytes());
        u.extend_from_slice(&self.dst.port().to_be_bytes());
        u.extend_from_slice(
            &u16::try_from(len)
                .expect("a UDP datagram is at most 65535 bytes")
                .to_be_bytes(),
        );
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(&self.payload);
        let c = self.checksum.unwrap_or_else(|| {
            match checksum(&u, pseudo_sum(self.src.ip(), self.dst.ip(), PROTO_UDP, len)) {
                0 => 0xffff,
                c => c,
            }
        });
        u[6..8].copy_from_slice(&c.to_be_bytes());
        u
    }

    /// The full Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        ip_frame(self.src.ip(), self.dst.ip(), PROTO_UDP, &self.segment())
    }

    /// The IP packet (what an ICMP error quotes).
    pub fn ip_packet(&self) -> Vec<u8> {
        self.frame()[ETH_HLEN..].to_vec()
    }
}

/// What a UDP frame says, with checksums verified from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedUdp {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
    /// The IPv4 header checksum is correct (always true for IPv6).
    pub ip_csum_ok: bool,
    /// The checksum field as it is.
    pub checksum: u16,
    /// The checksum verifies (false for a 0: "none" verifies nothing).
    pub udp_csum_ok: bool,
}

/// The IP header of `ip` (no options or extension headers): source,
/// destination, protocol, header length, IPv4 checksum correct, and the
/// bytes after the header up to the IP length (or the end of `ip`, for a
/// quoted packet cut short).
fn ip_header(ip: &[u8]) -> Option<(IpAddr, IpAddr, u8, bool, &[u8])> {
    match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let end = total.min(ip.len());
            Some((
                IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                IpAddr::V4(Ipv4Addr::new(*ip.get(16)?, ip[17], ip[18], *ip.get(19)?)),
                ip[9],
                checksum(ip.get(..ihl)?, 0) == 0,
                ip.get(ihl..end)?,
            ))
        }
        6 => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let addr = |at: usize| -> Option<IpAddr> {
                let o: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            };
            let end = (40 + payload).min(ip.len());
            Some((addr(8)?, addr(24)?, ip[6], true, ip.get(40..end)?))
        }
        _ => None,
    }
}

/// Parses an Ethernet/IPv4 or IPv6/UDP frame; `None` if it is not one.
pub fn parse_udp(f: &[u8]) -> Option<ParsedUdp> {
    let (src, dst, proto, ip_csum_ok, udp) = ip_header(f.get(ETH_HLEN..)?)?;
    if proto != PROTO_UDP || udp.len() < 8 {
        return None;
    }
    let c = u16::from_be_bytes([udp[6], udp[7]]);
    Some(ParsedUdp {
        src: SocketAddr::new(src, u16::from_be_bytes([udp[0], udp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([udp[2], udp[3]])),
        payload: udp[8..].to_vec(),
        ip_csum_ok,
        checksum: c,
        udp_csum_ok: c != 0 && checksum(udp, pseudo_sum(src, dst, PROTO_UDP, udp.len())) == 0,
    })
}

/// An ICMP or ICMPv6 error to build: `kind`/`code` from `src` to `dst`,
/// quoting `quote` (an IP packet, possibly cut short).
#[derive(Clone, Debug)]
pub struct IcmpError {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub kind: u8,
    pub code: u8,
    pub quote: Vec<u8>,
}

impl IcmpError {
    /// "Port unreachable" (ICMP 3/3, ICMPv6 1/4) from `src` about the IP
    /// packet `quote`, sent back to its source.
    pub fn port_unreachable(src: IpAddr, quote: &[u8]) -> IcmpError {
        let (inner_src, ..) = ip_header(quote).expect("the quote is an IP packet");
        let (kind, code) = if src.is_ipv4() { (3, 3) } else { (1, 4) };
        IcmpError {
            src,
            dst: inner_src,
            kind,
            code,
            quote: quote.to_vec(),
        }
    }

    /// The full Ethernet frame with correct IP and ICMP checksums (ICMPv6:
    /// with its pseudo-header).
    pub fn frame(&self) -> Vec<u8> {
        let mut m = vec![self.kind, self.code, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&self.quote);
        let (proto, initial) = if self.src.is_ipv4() {
            (PROTO_ICMP, 0)
        } else {
            (
                PROTO_ICMPV6,
                pseudo_sum(self.src, self.dst, PROTO_ICMPV6, m.len()),
            )
        };
        let c = checksum(&m, initial);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        ip_frame(self.src, self.dst, proto, &m)
    }
}

/// What an ICMP error frame says, checksums verified from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIcmp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub kind: u8,
    pub code: u8,
    /// The outer IPv4 header checksum is correct (true for IPv6).
    pub ip_csum_ok: bool,
    /// The ICMP checksum (ICMPv6: with the pseudo-header) is correct.
    pub icmp_csum_ok: bool,
    /// The quoted packet.
    pub quote: Quoted,
}

/// A packet quoted by an ICMP error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// The quoted IPv4 header checksum is correct (true for IPv6).
    pub ip_csum_ok: bool,
    /// The quoted UDP or TCP checksum is correct, if the whole segment is
    /// quoted (`None` if cut short, or a UDP checksum of 0).
    pub l4_csum_ok: Option<bool>,
    /// The quoted transport checksum field, if quoted.
    pub l4_checksum: Option<u16>,
}

/// Parses an Ethernet/IP/ICMP(v6) error frame; `None` if it is not one.
pub fn parse_icmp(f: &[u8]) -> Option<ParsedIcmp> {
    let (src, dst, proto, ip_csum_ok, m) = ip_header(f.get(ETH_HLEN..)?)?;
    let initial = match proto {
        PROTO_ICMP => 0,
        PROTO_ICMPV6 => pseudo_sum(src, dst, PROTO_ICMPV6, m.len()),
        _ => return None,
    };
    let q = m.get(8..)?;
    let (isrc, idst, iproto, iip_ok, l4) = ip_header(q)?;
    let csum_at = if iproto == PROTO_UDP { 6 } else { 16 };
    let l4_checksum = l4
        .get(csum_at..csum_at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]));
    // Whole when the quote holds the segment's full length.
    let whole = if iproto == PROTO_UDP {
        l4.len() >= 8 && usize::from(u16::from_be_bytes([l4[4], l4[5]])) == l4.len()
    } else {
        false
    };
    let l4_csum_ok = match l4_checksum {
        Some(0) if iproto == PROTO_UDP => None,
        Some(_) if whole => Some(checksum(l4, pseudo_sum(isrc, idst, iproto, l4.len())) == 0),
        _ => None,
    };
    Some(ParsedIcmp {
        src,
        dst,
        kind: m[0],
        code: m[1],
        ip_csum_ok,
        icmp_csum_ok: checksum(m, initial) == 0,
        quote: Quoted {
            src: SocketAddr::new(isrc, u16::from_be_bytes([*l4.first()?, *l4.get(1)?])),
            dst: SocketAddr::new(idst, u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?])),
            proto: iproto,
            ip_csum_ok: iip_ok,
            l4_csum_ok,
            l4_checksum,
        },
    })
}

/// The Internet checksum of `data` plus `initial`; 0 when verifying a
/// region that contains a correct checksum.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the loop above folds the sum into 16 bits"
)]
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in data.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_and_icmp_frames_parse_back_with_valid_checksums() {
        for (client, server) in [
            ("10.201.0.1:5353", "10.96.0.10:53"),
            ("[fd00::2]:5353", "[fd00::10]:53"),
        ] {
            let client: SocketAddr = client.parse().unwrap();
            let server: SocketAddr = server.parse().unwrap();
            let datagram = Udp::new(client, server, b"query");
            let p = parse_udp(&datagram.frame()).expect("a UDP frame");
            assert_eq!(
                (p.src, p.dst, p.payload.as_slice()),
                (client, server, &b"query"[..])
            );
            assert!(p.ip_csum_ok && p.udp_csum_ok, "{p:?}");
            let zero = parse_udp(&datagram.clone().with_checksum(0).frame()).unwrap();
            assert_eq!((zero.checksum, zero.udp_csum_ok), (0, false));
            let error = IcmpError::port_unreachable(server.ip(), &datagram.ip_packet());
            let p = parse_icmp(&error.frame()).expect("an ICMP error");
            assert_eq!((p.src, p.dst), (server.ip(), client.ip()));
            assert!(p.ip_csum_ok && p.icmp_csum_ok, "{p:?}");
            assert_eq!(
                (p.quote.src, p.quote.dst, p.quote.proto),
                (client, server, PROTO_UDP)
            );
            assert_eq!((p.quote.ip_csum_ok, p.quote.l4_csum_ok), (true, Some(true)));
            let mut broken = error.frame();
            let last = broken.len() - 1;
            broken[last] ^= 1;
            assert!(
                !parse_icmp(&broken).unwrap().icmp_csum_ok,
                "a flipped quote bit breaks it"
            );
        }
    }

    #[test]
    fn ipv6_frames_with_extension_headers_parse_back_with_valid_checksums() {
        let t = Tcp::new(
            "[fd00::2]:1234".parse::<SocketAddr>().unwrap(),
            "[fd00::10]:80".parse::<SocketAddr>().unwrap(),
            SYN,
        )
        .with_ext(EXT_HOP_BY_HOP, 8)
        .with_ext(EXT_DEST_OPTS, 16)
        .with_payload(b"odd");
        let p = parse(&t.frame()).expect("a TCP frame");
        assert_eq!((p.src, p.dst, p.flags), (t.src, t.dst, SYN));
        assert!(p.tcp_csum_ok, "{p:?}");
        assert_eq!(p.payload, b"odd");
        let mut broken = t.frame();
        broken[ETH_HLEN + 24 + 15] ^= 1;
        assert!(
            !parse(&broken).unwrap().tcp_csum_ok,
            "a flipped address bit breaks it"
        );
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let t = Tcp::new(
            "10.0.0.1:1234".parse::<SocketAddr>().unwrap(),
            "10.96.0.10:80".parse::<SocketAddr>().unwrap(),
            SYN,
        )
        .with_payload(b"odd");
        let p = parse(&t.frame()).expect("a TCP frame");
        assert_eq!((p.src, p.dst, p.flags), (t.src, t.dst, SYN));
        assert!(p.ip_csum_ok && p.tcp_csum_ok, "{p:?}");
        assert_eq!(p.payload, b"odd");
        let mut broken = t.frame();
        broken[ETH_HLEN + 16] ^= 1;
        let p = parse(&broken).unwrap();
        assert!(
            !p.ip_csum_ok && !p.tcp_csum_ok,
            "a flipped address bit must break both: {p:?}"
        );
    }
}

//! Ethernet/IPv4 or IPv6/TCP frames for `BPF_PROG_TEST_RUN`, and their
//! inverse; the same segments sent through a raw socket for namespace
//! tests.

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
        let csum = checksum(&f[l4..], pseudo_sum(self.src.ip(), self.dst.ip(), tcp_len));
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
        tcp_csum_ok: checksum(tcp, pseudo_sum(src_ip, dst_ip, tcp.len())) == 0,
    })
}

/// Sum of the TCP pseudo-header (either family), unfolded.
fn pseudo_sum(src: IpAddr, dst: IpAddr, tcp_len: usize) -> u32 {
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
        + 6
        + u32::try_from(tcp_len).expect("a TCP segment is at most 65535 bytes")
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

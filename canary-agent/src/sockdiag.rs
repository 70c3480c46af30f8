//! Listing and aborting sockets through the kernel's `sock_diag` netlink
//! interface (what `ss -K` uses), in one network namespace: the drain
//! deadline aborts the canary connections steered at the socket, which no
//! packet of theirs passes a hook of ours to be reset.
//!
//! Aborting a TCP socket (`SOCK_DESTROY`, Linux 4.5+ with
//! `CONFIG_INET_DIAG_DESTROY`) sends its peer a RST and fails the owner's
//! next call with `ECONNABORTED`; a connected UDP socket's next call fails
//! the same way. Needs `CAP_NET_ADMIN` in the namespace's user namespace.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// `NETLINK_SOCK_DIAG` (`linux/netlink.h`).
const NETLINK_SOCK_DIAG: libc::c_int = 4;
/// Message types (`linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `nlmsghdr` flags and types (`linux/netlink.h`).
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

/// TCP states (`include/net/tcp_states.h`) of sockets with a peer to
/// abort: not listening, not already closed, not a time-wait or
/// request mini-socket.
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;
const OPEN_TCP_STATES: u32 = 1 << TCP_ESTABLISHED
    | 1 << TCP_SYN_SENT
    | 1 << TCP_FIN_WAIT1
    | 1 << TCP_FIN_WAIT2
    | 1 << TCP_CLOSE_WAIT
    | 1 << TCP_LAST_ACK
    | 1 << TCP_CLOSING;
/// A connected UDP socket is in `TCP_ESTABLISHED`; an unconnected one in
/// `TCP_CLOSE`.
const CONNECTED_UDP_STATES: u32 = 1 << TCP_ESTABLISHED;

/// `struct inet_diag_sockid` (`linux/inet_diag.h`): ports and addresses in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}
const SOCK_ID_LEN: usize = 48;
const _: () = assert!(std::mem::size_of::<SockId>() == SOCK_ID_LEN);

/// `struct inet_diag_req_v2`.
#[repr(C)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}
const REQUEST_LEN: usize = 56;
const _: () = assert!(std::mem::size_of::<Request>() == REQUEST_LEN);

/// `struct inet_diag_msg` starts with family, state, timer, retrans, then
/// the id.
const MSG_ID_OFFSET: usize = 4;

/// One socket the kernel listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// The socket's own address.
    pub local: SocketAddr,
    /// Its peer (an IPv4 peer of an IPv6 socket as IPv4).
    pub peer: SocketAddr,
    /// The kernel's socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    family: u8,
    id: SockId,
}

/// A netlink socket for `sock_diag` in the calling thread's network
/// namespace.
fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one netlink message of `kind` with `flags` and body `req`.
fn send(fd: &OwnedFd, kind: u16, flags: u16, req: &Request) -> io::Result<()> {
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + REQUEST_LEN);
    let len = u32::try_from(NLMSG_HDRLEN + REQUEST_LEN).map_err(io::Error::other)?;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // SAFETY: Request is repr(C) with no implicit padding (size asserted:
    // 4 bytes, a u32, then the 48-byte id of u16/u32 fields), so its
    // memory is REQUEST_LEN initialised bytes.
    let body =
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(req).cast::<u8>(), REQUEST_LEN) };
    msg.extend_from_slice(body);
    // SAFETY: `msg` is a readable buffer of its length; the kernel is the
    // default destination of a netlink socket.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The next datagram of netlink messages into `buf`; its length.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return usize::try_from(n).map_err(io::Error::other);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The id at the start of `b` (an `inet_diag_msg` past its first four
/// bytes).
fn parse_id(b: &[u8]) -> Option<SockId> {
    let word = |i: usize| u32_at(b, 4 + i * 4);
    Some(SockId {
        sport: u16_at(b, 0)?,
        dport: u16_at(b, 2)?,
        src: [word(0)?, word(1)?, word(2)?, word(3)?],
        dst: [word(4)?, word(5)?, word(6)?, word(7)?],
        interface: u32_at(b, 36)?,
        cookie: [u32_at(b, 40)?, u32_at(b, 44)?],
    })
}

/// The address of `words` (network byte order) in `family`; IPv4-mapped
/// IPv6 addresses as IPv4.
fn ip(family: u8, words: [u32; 4]) -> IpAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if i32::from(family) == libc::AF_INET {
        return IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]));
    }
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&bytes);
    let v6 = Ipv6Addr::from(octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Every socket of `protocol` (`IPPROTO_TCP`: open connections;
/// `IPPROTO_UDP`: connected sockets) of both families in the calling
/// thread's network namespace.
pub fn list(protocol: u8) -> io::Result<Vec<Socket>> {
    let states = if i32::from(protocol) == libc::IPPROTO_TCP {
        OPEN_TCP_STATES
    } else {
        CONNECTED_UDP_STATES
    };
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let family = u8::try_from(family).map_err(io::Error::other)?;
        let fd = open()?;
        let req = Request {
            family,
            protocol,
            ext: 0,
            pad: 0,
            states,
            id: SockId::default(),
        };
        send(&fd, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = recv(&fd, &mut buf)?;
            let mut at = 0;
            while at + NLMSG_HDRLEN <= n {
                let bad = || io::Error::other("sock_diag: a truncated netlink message");
                let len = u32_at(&buf, at).ok_or_else(bad)? as usize;
                let kind = u16_at(&buf, at + 4).ok_or_else(bad)?;
                if len < NLMSG_HDRLEN || at + len > n {
                    return Err(bad());
                }
                let body = &buf[at + NLMSG_HDRLEN..at + len];
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => {
                        let errno = i32_at(body, 0).ok_or_else(bad)?;
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ => {
                        let id = body
                            .get(MSG_ID_OFFSET..)
                            .and_then(parse_id)
                            .ok_or_else(bad)?;
                        out.push(Socket {
                            protocol,
                            local: SocketAddr::new(ip(family, id.src), u16::from_be(id.sport)),
                            peer: SocketAddr::new(ip(family, id.dst), u16::from_be(id.dport)),
                            cookie: u64::from(id.cookie[0]) | u64::from(id.cookie[1]) << 32,
                            family,
                            id,
                        });
                    }
                }
                // Messages are 4-byte aligned.
                at += (len + 3) & !3;
            }
        }
    }
    Ok(out)
}

/// Aborts `socket` (listed by [`list`] in the calling thread's network
/// namespace). A socket that closed meanwhile is `NotFound`.
pub fn destroy(socket: &Socket) -> io::Result<()> {
    let fd = open()?;
    let req = Request {
        family: socket.family,
        protocol: socket.protocol,
        ext: 0,
        pad: 0,
        states: u32::MAX,
        id: socket.id,
    };
    send(&fd, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    let mut buf = vec![0u8; 4096];
    let n = recv(&fd, &mut buf)?;
    let reply = buf.get(..n).unwrap_or_default();
    let errno = match u16_at(reply, 4) {
        Some(NLMSG_ERROR) => i32_at(reply, NLMSG_HDRLEN)
            .ok_or_else(|| io::Error::other("sock_diag: a truncated acknowledgement"))?,
        _ => return Err(io::Error::other("sock_diag: no acknowledgement")),
    };
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_the_kernel_lays_them_out() {
        let mut b = vec![0u8; SOCK_ID_LEN];
        b[0..2].copy_from_slice(&8080u16.to_be().to_ne_bytes());
        b[2..4].copy_from_slice(&80u16.to_be().to_ne_bytes());
        b[4..8].copy_from_slice(&[10, 0, 0, 1]);
        b[20..24].copy_from_slice(&[10, 0, 0, 2]);
        b[40..44].copy_from_slice(&7u32.to_ne_bytes());
        b[44..48].copy_from_slice(&1u32.to_ne_bytes());
        let id = parse_id(&b).expect("parses");
        assert_eq!(u16::from_be(id.sport), 8080);
        assert_eq!(u16::from_be(id.dport), 80);
        let v4 = u8::try_from(libc::AF_INET).expect("fits");
        assert_eq!(ip(v4, id.src), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(ip(v4, id.dst), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(id.cookie, [7, 1]);
        assert!(parse_id(&b[..47]).is_none(), "a short id is refused");
        let mapped: Ipv6Addr = "::ffff:10.0.0.3".parse().expect("address");
        let words: Vec<u32> = mapped
            .octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let v6 = u8::try_from(libc::AF_INET6).expect("fits");
        assert_eq!(
            ip(v6, [words[0], words[1], words[2], words[3]]),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)),
            "a v4-mapped peer of an IPv6 socket reads as IPv4"
        );
    }

    /// A real socket pair on loopback: listed with its cookie, aborted,
    /// and its peer reset.
    #[test]
    fn a_listed_connection_is_aborted_and_its_peer_reset() {
        use std::io::Read as _;
        assert_eq!(
            crate::sys::effective_uid(),
            0,
            "aborting a socket needs CAP_NET_ADMIN: run `sudo cargo xtask test`"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let local = client.local_addr().expect("addr");
        let tcp = u8::try_from(libc::IPPROTO_TCP).expect("fits");
        let found: Vec<Socket> = list(tcp)
            .expect("list")
            .into_iter()
            .filter(|s| s.local == local)
            .collect();
        assert_eq!(found.len(), 1, "the client's socket is listed once");
        assert_ne!(found[0].cookie, 0);
        destroy(&found[0]).expect("abort");
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let e = server.read(&mut buf).expect_err("the peer was reset");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        assert_eq!(
            destroy(&found[0]).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound),
            "an aborted socket is gone"
        );
    }
}

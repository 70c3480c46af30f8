//! Client helpers speaking the backends' line protocol.
//!
//! Everything here creates sockets, so it must run on a thread that is
//! inside the client namespace: `lab.client().spawn(...)`, or
//! `lab.client().enter()` first on a thread of your own. Called from
//! elsewhere, the source address does not exist and binding fails with
//! `AddrNotAvailable`.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::{FleetNode, Lab, Netns};

/// Whatever has a client namespace to drive traffic from: a [`Lab`], or one
/// node of a [`crate::FleetLab`]. Load helpers take it, so the same helper
/// drives either.
pub trait ClientSide {
    /// The namespace client sockets must be created in.
    fn client(&self) -> &Netns;
}

impl ClientSide for Lab {
    fn client(&self) -> &Netns {
        Lab::client(self)
    }
}

impl ClientSide for FleetNode {
    fn client(&self) -> &Netns {
        FleetNode::client(self)
    }
}

/// What the client sends for each request.
const REQUEST: &[u8] = b"hello\n";
/// Longest reply accepted (backend names are short).
const MAX_REPLY: u64 = 1024;

/// One request on a fresh connection from `src` to `dst`: connect (at most
/// `timeout`), write `hello\n`, read one reply line, close normally (FIN,
/// client first). Returns the reply without the newline: the name of the
/// backend that answered.
///
/// Must be called on a thread inside the client namespace (see the module
/// docs). Failures keep their `io::ErrorKind`: `ConnectionRefused` for a
/// closed port, `ConnectionReset` for a backend that resets, `TimedOut` /
/// `WouldBlock` for no answer within `timeout`.
pub fn request_once(
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<String> {
    Conn::open(src, dst, timeout)?.ping()
}

/// A long-lived connection: opened once, then any number of
/// [`ping`](Conn::ping)s. Dropping it closes normally (FIN).
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects from `src` (port chosen by the kernel) to `dst`, waiting at
    /// most `timeout`; later reads and writes time out after `timeout` too.
    ///
    /// Must be called on a thread inside the client namespace (see the
    /// module docs).
    pub fn open(
        src: impl Into<IpAddr>,
        dst: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let (src, dst) = (src.into(), dst.into());
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        socket.connect_timeout(&dst.into(), timeout)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.set_write_timeout(Some(timeout))?;
        // One small write per request: send it now, don't wait for an ACK.
        socket.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(socket.into()),
        })
    }

    /// Writes one request line and returns the reply line without its
    /// newline (the answering backend's name). A connection closed before a
    /// full reply is `UnexpectedEof`.
    pub fn ping(&mut self) -> io::Result<String> {
        self.reader.get_mut().write_all(REQUEST)?;
        let mut reply = Vec::new();
        (&mut self.reader)
            .take(MAX_REPLY)
            .read_until(b'\n', &mut reply)?;
        if reply.pop() != Some(b'\n') {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed before a full reply line",
            ));
        }
        String::from_utf8(reply).map_err(|error| io::Error::new(ErrorKind::InvalidData, error))
    }

    /// The local (source) address the kernel picked.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: `bind(src, 0)` then leaves the port
/// choice to `connect`, which only needs the full 4-tuple to be unique and
/// may reuse `TIME_WAIT` ports (`tcp_tw_reuse`). Without it every connection
/// from one source address holds a port of its own for the whole `TIME_WAIT`,
/// and a busy client runs out of ports. socket2 0.5 has no setter for it.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the size of a c_int fits socklen_t"
)]
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open (borrowed from `socket`), and the option
    // value points to a live c_int whose exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

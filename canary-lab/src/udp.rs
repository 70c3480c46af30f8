//! UDP beside TCP: every backend also answers datagrams on its port (an
//! echo of its name, like the TCP line protocol), and clients send one
//! request per fresh socket (a new flow each) or keep a connected socket
//! (a long-lived flow).

use std::{
    io::{self, ErrorKind},
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

use crate::{Behavior, Netns};

/// What the client sends for each request.
const REQUEST: &[u8] = b"hello\n";
/// How often the server thread looks at its flags.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;

/// A backend's UDP server; dropping it closes its socket (from then on the
/// kernel answers datagrams to the port with ICMP port unreachable).
#[derive(Debug)]
pub(crate) struct UdpServer {
    stop: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    /// Binds `addr` inside `ns` (`[::]` takes IPv4 too) and answers every
    /// datagram with `{name}\n` (after the delay of
    /// [`Behavior::FirstByteDelay`]).
    pub(crate) fn start(
        ns: &Netns,
        addr: SocketAddr,
        name: &str,
        behavior: Behavior,
    ) -> anyhow::Result<UdpServer> {
        let socket = ns
            .spawn(move || bind(addr))
            .join()
            .expect("UDP bind thread panicked")
            .and_then(|bound| bound)
            .with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
        socket.set_read_timeout(Some(POLL_INTERVAL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let reply = format!("{name}\n").into_bytes();
        let delay = match behavior {
            Behavior::FirstByteDelay(d) => Some(d),
            _ => None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("udp-{name}"))
            .spawn({
                let (stop, silent) = (stop.clone(), silent.clone());
                move || serve(&socket, &reply, delay, &stop, &silent)
            })
            .context("spawning the UDP server thread")?;
        Ok(UdpServer {
            stop,
            silent,
            thread: Some(thread),
        })
    }

    /// From now on, reads datagrams and answers none (a hung backend: no
    /// reply, no ICMP error).
    pub(crate) fn silence(&self) {
        self.silent.store(true, Ordering::Relaxed);
    }

    /// Asks the thread to stop without waiting; drop waits.
    pub(crate) fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("canary-lab: a UDP server thread panicked");
        }
    }
}

/// A UDP socket bound to `addr`; an IPv6 wildcard takes IPv4 too.
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Answers until stopped. Bounded per round by the read timeout.
fn serve(
    socket: &UdpSocket,
    reply: &[u8],
    delay: Option<Duration>,
    stop: &AtomicBool,
    silent: &AtomicBool,
) {
    let mut buf = [0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        let peer = match socket.recv_from(&mut buf) {
            Ok((_, peer)) => peer,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            // An ICMP error about an earlier reply, or an interrupted call.
            Err(_) => continue,
        };
        if silent.load(Ordering::Relaxed) {
            continue;
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        // A client that went away meanwhile is no error of ours.
        let _ = socket.send_to(reply, peer);
    }
}

/// A UDP flow from the client namespace: a socket bound to a source
/// address (port chosen by the kernel) and connected to its destination,
/// so the kernel reports an ICMP port unreachable about it as
/// `ConnectionRefused` on the next receive.
#[derive(Debug)]
pub struct UdpConn {
    socket: UdpSocket,
}

impl UdpConn {
    /// Opens a flow from `src` to `dst` (one family); each receive waits at
    /// most `timeout`. Must be called on a thread inside the client
    /// namespace.
    pub fn open(
        src: impl Into<IpAddr>,
        dst: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> io::Result<UdpConn> {
        let dst = dst.into();
        let socket = UdpSocket::bind(SocketAddr::new(src.into(), 0))?;
        socket.connect(dst)?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(UdpConn { socket })
    }

    /// Sends one request and returns the reply without its newline (the
    /// answering backend's name). No reply within the timeout is
    /// `WouldBlock` (or `TimedOut`); an ICMP port unreachable is
    /// `ConnectionRefused`.
    pub fn ping(&mut self) -> io::Result<String> {
        self.socket.send(REQUEST)?;
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = self.socket.recv(&mut buf)?;
        let reply = buf.get(..n).unwrap_or_default();
        let reply = reply.strip_suffix(b"\n").ok_or_else(|| {
            io::Error::new(ErrorKind::InvalidData, "a reply datagram without a newline")
        })?;
        String::from_utf8(reply.to_vec()).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))
    }

    /// [`UdpConn::ping`], sent again on the same flow after each timeout,
    /// `attempts` times in all, as a DNS stub resolver does.
    pub fn ping_retrying(&mut self, attempts: u32) -> io::Result<String> {
        let mut last = io::Error::new(ErrorKind::InvalidInput, "no attempt");
        for _ in 0..attempts {
            match self.ping() {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    last = e;
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// The local (source) address of the flow.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// One request on a fresh socket (a new flow) from `src` to `dst`: the
/// reply line without its newline (the backend's name). Must be called on
/// a thread inside the client namespace.
pub fn udp_request_once(
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<String> {
    UdpConn::open(src, dst, timeout)?.ping()
}

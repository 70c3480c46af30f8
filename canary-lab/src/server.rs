//! The backend TCP servers: one accept thread per backend, one thread per
//! connection, a line protocol that answers every line with the backend's
//! name.

use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::Netns;

/// How a backend server treats its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Answers every line with `{name}\n`.
    Reply,
    /// Like [`Behavior::Reply`], but waits this long before the first reply
    /// of each connection (a slow backend: raises first-byte time).
    FirstByteDelay(Duration),
    /// Reads the first line, then aborts the connection with an RST
    /// (`SO_LINGER` 0) without replying (a crashing backend).
    Reset,
    /// Like [`Behavior::Reply`], but every n-th connection accepted is
    /// treated like [`Behavior::Reset`] (a backend failing a fixed share,
    /// 1/n, of its connections).
    ResetEvery(u32),
    /// No listener at all: connections are refused (RST answering the SYN).
    Closed,
}

/// Backlog of every listener: large enough that bursts from many client
/// addresses are not dropped by the server before the router sees them.
const BACKLOG: i32 = 4096;
/// How often blocked threads look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A connection with no complete line for this long is closed, so a silent
/// peer cannot hold a thread forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest accepted request line; a peer sending more is cut off.
const MAX_LINE: usize = 4096;
/// How long stopping waits for connection threads to notice.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A running backend server; dropping it stops it.
#[derive(Debug)]
pub(crate) struct Server {
    stop: Arc<AtomicBool>,
    /// Connection threads still running.
    active: Arc<AtomicUsize>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` inside `ns` and serves with `behavior`, answering
    /// with `name`. `Behavior::Closed` must not get here.
    pub(crate) fn start(
        ns: &Netns,
        addr: SocketAddr,
        name: &str,
        behavior: Behavior,
    ) -> anyhow::Result<Server> {
        debug_assert_ne!(behavior, Behavior::Closed);
        // The listener is created on a thread inside the namespace and keeps
        // living there; accepting from our own thread is then fine.
        let listener = ns
            .spawn(move || listen(addr))
            .join()
            .expect("listener thread panicked")
            .and_then(|bound| bound)
            .with_context(|| format!("listening on {addr} in {}", ns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let handler = Handler {
            name: Arc::from(name),
            behavior,
            stop: stop.clone(),
            accepted: Arc::new(AtomicU64::new(0)),
        };
        let accept_thread = std::thread::Builder::new()
            .name(format!("accept-{name}"))
            .spawn({
                let active = active.clone();
                move || accept_loop(&listener, &handler, &active)
            })
            .context("spawning the accept thread")?;
        Ok(Server {
            stop,
            active,
            accept_thread: Some(accept_thread),
        })
    }

    /// Asks the server to stop without waiting; drop waits. Lets a lab
    /// signal all its servers before waiting for any.
    pub(crate) fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(thread) = self.accept_thread.take()
            && thread.join().is_err()
        {
            eprintln!("canary-lab: an accept thread panicked");
        }
        // Connection threads see the flag within POLL_INTERVAL (or after a
        // FirstByteDelay); waiting lets them close their sockets before the
        // namespace goes away. Bounded: a stuck thread is left to its
        // IDLE_TIMEOUT.
        let deadline = Instant::now() + STOP_GRACE;
        while self.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Binds a listening socket with `SO_REUSEADDR` and a large backlog; an
/// IPv6 address listens for both families (`IPV6_V6ONLY` off).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    // Non-blocking so that an accept after a spurious wake-up (the peer
    // reset before we got to it) cannot block past the stop flag.
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What every connection thread of one server needs.
#[derive(Clone, Debug)]
struct Handler {
    name: Arc<str>,
    behavior: Behavior,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far (for [`Behavior::ResetEvery`]).
    accepted: Arc<AtomicU64>,
}

/// Accepts until the stop flag is set. Waits in `poll` rather than sleeping
/// so a new connection is accepted at once: a sleep here would show up in the
/// first-byte times the data plane measures.
fn accept_loop(listener: &TcpListener, handler: &Handler, active: &Arc<AtomicUsize>) {
    while !handler.stop.load(Ordering::Relaxed) {
        if !wait_readable(listener, POLL_INTERVAL) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                active.fetch_add(1, Ordering::AcqRel);
                let handler = handler.clone();
                let conn_active = active.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("conn-{}", handler.name))
                    .spawn(move || {
                        if let Err(error) = serve(stream, &handler) {
                            // Peers resetting or vanishing is normal in a lab
                            // built to test failures.
                            if !matches!(
                                error.kind(),
                                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                            ) {
                                eprintln!("canary-lab: {}: {error}", handler.name);
                            }
                        }
                        conn_active.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(error) = spawned {
                    // The closure (and the stream) were dropped: undo the count.
                    active.fetch_sub(1, Ordering::AcqRel);
                    eprintln!("canary-lab: spawning a connection thread: {error}");
                }
            }
            // Another poll round; e.g. the peer reset before we accepted.
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Err(error) => {
                // Out of descriptors or memory: back off instead of spinning.
                eprintln!("canary-lab: {}: accept: {error}", handler.name);
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

/// Waits until `listener` has a connection to accept, at most `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fds` is one valid, writable pollfd and the count says one;
    // the descriptor stays open because `listener` is borrowed.
    let ready = unsafe { libc::poll(&raw mut fds, 1, timeout_ms) };
    ready > 0
}

/// Serves one connection until EOF, an error, idleness or stop.
#[expect(
    clippy::needless_pass_by_value,
    reason = "owns the connection: returning closes it, with a RST after linger 0 for Behavior::Reset"
)]
fn serve(stream: TcpStream, handler: &Handler) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    // Short read timeouts so the thread notices the stop flag.
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut first_reply = true;
    let nth = handler.accepted.fetch_add(1, Ordering::Relaxed) + 1;
    let reset = match handler.behavior {
        Behavior::Reset => true,
        Behavior::ResetEvery(n) => n > 0 && nth.is_multiple_of(u64::from(n)),
        _ => false,
    };
    while let Some(_line) = read_line(&mut reader, &handler.stop)? {
        match handler.behavior {
            _ if reset => {
                // Linger 0 makes close send RST and drop unsent data.
                SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
                return Ok(());
            }
            Behavior::FirstByteDelay(delay) if first_reply => {
                if !sleep_unless_stopped(delay, &handler.stop) {
                    return Ok(());
                }
            }
            Behavior::Reply
            | Behavior::FirstByteDelay(_)
            | Behavior::Reset
            | Behavior::ResetEvery(_)
            | Behavior::Closed => {}
        }
        first_reply = false;
        writer.write_all(format!("{}\n", handler.name).as_bytes())?;
    }
    // EOF (or stop): dropping the stream closes our side normally.
    Ok(())
}

/// Reads one `\n`-terminated line. `None` means EOF, stop, or
/// [`IDLE_TIMEOUT`] without a complete line.
fn read_line(reader: &mut BufReader<&TcpStream>, stop: &AtomicBool) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let idle_deadline = Instant::now() + IDLE_TIMEOUT;
    // Bounded: every round either returns or waits POLL_INTERVAL, and the
    // idle deadline ends the rounds.
    loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= idle_deadline {
            return Ok(None);
        }
        let limit = (MAX_LINE - line.len()) as u64;
        // `read_until` keeps what it read before a timeout in `line`, so a
        // line split across timeouts is not lost.
        match io::Read::take(&mut *reader, limit).read_until(b'\n', &mut line) {
            Ok(0) => return Ok(None),
            Ok(_) if line.ends_with(b"\n") => return Ok(Some(line)),
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "request line too long",
                ));
            }
            // Data without a newline and no more coming: EOF mid-line.
            Ok(_) => return Ok(None),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// Sleeps `duration` in short steps; false if stopped meanwhile.
fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(POLL_INTERVAL));
    }
}

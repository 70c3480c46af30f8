//! A client for the socket-LB tests, run as its own process so the test
//! can put it into a cgroup (the socket LB steers the sockets of processes
//! in its cgroup) without moving the test harness there.
//!
//! ```text
//! canary-sock-client --netns NAME --connect IP:PORT [--v6] [--bind IP]
//!                    [--count N] [--timeout-ms T] [--hold] [--udp [--connected]]
//! ```
//!
//! With `--udp`, each of the `N` requests is one datagram from a fresh,
//! unconnected UDP socket (`sendto`, then `recvfrom`): one flow each, and
//! PEER is the source `recvfrom` reports; with `--connected` each socket is
//! connected to the address (`send`, `recv`; PEER is what `getpeername()`
//! says). `--hold` keeps the sockets and sends again on each, as with TCP.
//!
//! It enters the network namespace `NAME`, then opens `N` connections to
//! `IP:PORT` (IPv4 or `[IPv6]:PORT`; an IPv4 one through an IPv6 socket to
//! the v4-mapped address with `--v6`), each from `--bind IP` if given, and on each writes `hello\n`
//! and reads one reply line (the lab backends answer with their name).
//! One line per connection on stdout: `ok PEER REPLY` (PEER is what
//! `getpeername()` says) or `err KIND PEER`. Without `--hold` each
//! connection is closed before the next; with it, all stay open, `ready`
//! is printed, and after a line on stdin each is pinged once more (its
//! lines follow) before `done`.
#![expect(
    unused_crate_dependencies,
    reason = "a helper binary of the test package, which uses only part of its dependencies"
)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

struct Args {
    netns: String,
    connect: SocketAddr,
    bind: Option<IpAddr>,
    count: usize,
    timeout: Duration,
    hold: bool,
    udp: bool,
    connected: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut netns, mut connect, mut bind) = (None, None, None);
    let (mut count, mut timeout_ms, mut hold, mut v6) = (1usize, 2000u64, false, false);
    let (mut udp, mut connected) = (false, false);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--netns" => netns = Some(value()?),
            "--connect" => {
                connect = Some(value()?.parse::<SocketAddr>().map_err(|e| e.to_string())?);
            }
            "--bind" => bind = Some(value()?.parse::<Ipv4Addr>().map_err(|e| e.to_string())?),
            "--count" => count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--timeout-ms" => {
                timeout_ms = value()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?;
            }
            "--hold" => hold = true,
            "--v6" => v6 = true,
            "--udp" => udp = true,
            "--connected" => connected = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let connect = connect.ok_or("--connect is required")?;
    let (connect, bind) = match connect {
        SocketAddr::V4(c) if v6 => (
            SocketAddr::new(IpAddr::V6(c.ip().to_ipv6_mapped()), c.port()),
            bind.map(|b| IpAddr::V6(b.to_ipv6_mapped())),
        ),
        c => (c, bind.map(IpAddr::V4)),
    };
    Ok(Args {
        netns: netns.ok_or("--netns is required")?,
        connect,
        bind,
        count,
        timeout: Duration::from_millis(timeout_ms),
        hold,
        udp,
        connected,
    })
}

fn enter(netns: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: the descriptor is open for the call; setns changes only this
    // (single-threaded) process's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open(args: &Args) -> std::io::Result<TcpStream> {
    let domain = if args.connect.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = args.bind {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect_timeout(&args.connect.into(), args.timeout)?;
    socket.set_read_timeout(Some(args.timeout))?;
    socket.set_write_timeout(Some(args.timeout))?;
    socket.set_nodelay(true)?;
    Ok(socket.into())
}

fn ping(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"hello\n")?;
    let mut reply = Vec::new();
    BufReader::new(stream.take(1024)).read_until(b'\n', &mut reply)?;
    if reply.pop() != Some(b'\n') {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// One request on `s`, as its output line.
fn report(s: &mut TcpStream) -> String {
    let peer = s
        .peer_addr()
        .map_or_else(|_| "-".to_string(), |p| p.to_string());
    match ping(s) {
        Ok(reply) => format!("ok {peer} {reply}"),
        Err(e) => format!("err {:?} {peer}", e.kind()),
    }
}

/// A fresh UDP socket (bound to `--bind`, or any address), connected to
/// the address with `--connected`.
fn open_udp(args: &Args) -> std::io::Result<UdpSocket> {
    let any: IpAddr = if args.connect.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(args.bind.unwrap_or(any), 0))?;
    socket.set_read_timeout(Some(args.timeout))?;
    if args.connected {
        socket.connect(args.connect)?;
    }
    Ok(socket)
}

/// One datagram to the VIP and its answer, as an output line: PEER is the
/// source `recvfrom` reports (a connected socket's: its peer).
fn report_udp(socket: &UdpSocket, to: SocketAddr) -> String {
    if let Ok(peer) = socket.peer_addr() {
        let mut buf = [0u8; 1024];
        return match socket.send(b"hello\n").and_then(|_| socket.recv(&mut buf)) {
            Ok(n) => format!(
                "ok {peer} {}",
                String::from_utf8_lossy(&buf[..n]).trim_end()
            ),
            Err(e) => format!("err {:?} {peer}", e.kind()),
        };
    }
    if let Err(e) = socket.send_to(b"hello\n", to) {
        return format!("err {:?} -", e.kind());
    }
    let mut buf = [0u8; 1024];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => {
            let reply = String::from_utf8_lossy(&buf[..n]);
            format!("ok {from} {}", reply.trim_end())
        }
        Err(e) => format!("err {:?} -", e.kind()),
    }
}

/// `--udp`: one fresh socket (one flow) per request.
fn main_udp(args: &Args) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let mut held = Vec::new();
    for _ in 0..args.count {
        let text = match open_udp(args) {
            Ok(s) => {
                let text = report_udp(&s, args.connect);
                if args.hold {
                    held.push(s);
                }
                text
            }
            Err(e) => format!("err {:?} -", e.kind()),
        };
        let _ = writeln!(out, "{text}");
    }
    if args.hold {
        let _ = writeln!(out, "ready");
        let _ = out.flush();
        let mut go = String::new();
        let _ = std::io::stdin().read_line(&mut go);
        for s in &held {
            let _ = writeln!(out, "{}", report_udp(s, args.connect));
        }
        let _ = writeln!(out, "done");
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("canary-sock-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = enter(&args.netns) {
        eprintln!("canary-sock-client: enter netns {}: {e}", args.netns);
        return ExitCode::FAILURE;
    }
    if args.udp {
        return main_udp(&args);
    }
    let mut out = std::io::stdout().lock();
    let mut held = Vec::new();
    for _ in 0..args.count {
        let text = match open(&args) {
            Ok(mut s) => {
                let text = report(&mut s);
                if args.hold {
                    held.push(s);
                }
                text
            }
            Err(e) => format!("err {:?} -", e.kind()),
        };
        let _ = writeln!(out, "{text}");
    }
    if !args.hold {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    for s in &mut held {
        let _ = writeln!(out, "{}", report(s));
    }
    let _ = writeln!(out, "done");
    ExitCode::SUCCESS
}

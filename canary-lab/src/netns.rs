//! A named network namespace (`/run/netns/NAME`, as `ip netns` manages them).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;

use anyhow::{Context, bail};

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace.
///
/// A namespace made by [`Netns::create`] is *owned*: dropping the value runs
/// `ip netns del`. One opened with [`Netns::attach`] is left alone on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates the namespace with `ip netns add NAME`; it is deleted on drop.
    ///
    /// Fails, with `ip`'s stderr in the message, if the name is taken.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]), None)?;
        Ok(Netns {
            name: name.to_owned(),
            owned: true,
        })
    }

    /// Refers to an existing namespace without taking ownership: drop does
    /// not delete it.
    pub fn attach(name: &str) -> anyhow::Result<Netns> {
        let path = format!("{NETNS_RUN_DIR}/{name}");
        if !std::path::Path::new(&path).exists() {
            bail!("network namespace {name} does not exist ({path} is missing)");
        }
        Ok(Netns {
            name: name.to_owned(),
            owned: false,
        })
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`; the error names the command and carries
    /// `ip`'s stderr.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args), None).map(drop)
    }

    /// Runs many `ip` commands in one process: `ip -n NAME -batch -` with
    /// `commands` (one `ip` command line per line, without the leading
    /// `ip`) on stdin. Stops at the first failing line; the error carries
    /// `ip`'s stderr, which names that line.
    pub fn ip_batch(&self, commands: &str) -> anyhow::Result<()> {
        run(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(commands),
        )
        .map(drop)
    }

    /// Runs `ip netns exec NAME ARGS...` and returns its stdout; the error
    /// carries the command line and stderr.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let Some((program, rest)) = args.split_first() else {
            bail!("exec in {}: no program given", self.name);
        };
        let output = run(self.command(program).args(rest), None)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec NAME program`), ready for `.args(...)` and `.spawn()`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Moves the *calling thread* into this namespace (`setns(CLONE_NEWNET)`).
    ///
    /// The network namespace is a per-thread attribute: other threads of the
    /// process stay where they are, and threads spawned later start in the
    /// namespace of their parent thread. A socket belongs to the namespace it
    /// was created in for its whole life, wherever it is used from later, so
    /// it is enough to *create* a socket in a thread that entered.
    pub fn enter(&self) -> std::io::Result<()> {
        let file = File::open(format!("{NETNS_RUN_DIR}/{}", self.name))?;
        // SAFETY: `file` is open for the whole call, so the descriptor is
        // valid; setns only changes the calling thread's network namespace
        // and touches no memory of ours.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread that first [enters](Netns::enter) this
    /// namespace. The handle yields the entering error if there was one,
    /// otherwise `f`'s result.
    ///
    /// # Panics
    ///
    /// If the system cannot create a thread.
    pub fn spawn<F, T>(&self, f: F) -> JoinHandle<std::io::Result<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        // The thread gets its own handle (not owned: it must never delete).
        let ns = Netns {
            name: self.name.clone(),
            owned: false,
        };
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                ns.enter()?;
                Ok(f())
            })
            .expect("spawning a thread failed")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Drop cannot fail; a namespace left behind is found again by
        // `cleanup_stale` once this process is gone.
        if let Err(error) = run(Command::new("ip").args(["netns", "del", &self.name]), None) {
            eprintln!(
                "canary-lab: deleting network namespace {}: {error:#}",
                self.name
            );
        }
    }
}

/// Runs `command` (feeding `stdin` if given) and fails unless it exits 0.
/// The error shows the command line and its stderr.
pub(crate) fn run(command: &mut Command, stdin: Option<&str>) -> anyhow::Result<Output> {
    let line = format!("{command:?}");
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {line}"))?;
    let mut write_error = None;
    if let Some(input) = stdin {
        // Taking stdin out of `child` closes it when written, so the child
        // sees end of input.
        let mut pipe = child.stdin.take().expect("stdin was piped");
        // A child that stops reading early (a failing `ip -batch` line)
        // breaks the pipe; its exit status and stderr below say why, so a
        // write error is only reported if the child claims success.
        write_error = pipe.write_all(input.as_bytes()).err();
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {line}"))?;
    if let (true, Some(error)) = (output.status.success(), write_error) {
        return Err(error).with_context(|| format!("writing the stdin of {line}"));
    }
    if !output.status.success() {
        bail!(
            "{line} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

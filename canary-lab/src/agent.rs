//! The real `canary-agent` binary, run inside a lab namespace: started on a
//! config, reloaded with SIGHUP, stopped with SIGTERM, its log collected so
//! callers can wait for what it says.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};

use crate::Netns;

/// Log line the agent prints once it is attached and serving.
pub const READY: &str = "canary-agent ready";
/// Log line of an applied reload.
pub const RELOADED: &str = "config reloaded";
/// Log line of a rejected reload.
pub const RELOAD_REJECTED: &str = "config reload rejected";

/// Path of the agent binary: `$CANARY_AGENT_BIN`, else the workspace's
/// debug build (what `cargo xtask test` builds).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("CANARY_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/canary-agent"),
        PathBuf::from,
    )
}

/// Path of `canaryctl`: beside the agent binary.
pub fn canaryctl_binary() -> PathBuf {
    agent_binary().with_file_name("canaryctl")
}

type Log = Arc<(Mutex<Vec<String>>, Condvar)>;

/// How to end an agent before starting the next one on the same data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, and wait for a clean exit (a rolling update's first half).
    Term,
    /// SIGKILL: no chance to clean up (a crash or an OOM kill).
    Kill,
}

/// A running agent.
///
/// Its data plane is pinned in a directory of its own on the lab's bpffs
/// (outside `/sys`, which `ip netns exec` remounts). Agents started with
/// [`AgentProcess::start`] run with `--detach-on-exit`; [`AgentProcess::start_pinned`]
/// ones leave the data plane behind when they stop, for the next agent to
/// adopt. Dropping an `AgentProcess` kills the agent and removes its data
/// plane (`canary-agent uninstall`), so a test leaves nothing behind.
pub struct AgentProcess {
    child: Child,
    log: Log,
    /// Copies the agent's stderr into `log`; ends when the agent exits.
    reader: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    config: PathBuf,
    bpffs_dir: PathBuf,
    detach_on_exit: bool,
    echo: bool,
    binary: PathBuf,
    /// The namespace the agent runs in (not owned: the lab deletes it).
    ns: Netns,
    /// Extra environment of the agents launched from here on.
    env: Vec<(String, PathBuf)>,
}

impl AgentProcess {
    /// Writes `config` to a fresh directory, starts the agent in `ns` and
    /// waits until it is ready. `echo` copies its log to stderr with a
    /// prefix. If the agent exits instead, the error carries its log.
    pub fn start(ns: &Netns, config: &str, echo: bool) -> anyhow::Result<AgentProcess> {
        let mut agent = AgentProcess::spawn(ns, config, echo, true)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Like [`AgentProcess::start`], but without `--detach-on-exit`: when
    /// the agent stops or dies the data plane keeps running, and
    /// [`AgentProcess::restart`] starts the next agent on it.
    pub fn start_pinned(ns: &Netns, config: &str, echo: bool) -> anyhow::Result<AgentProcess> {
        let mut agent = AgentProcess::spawn(ns, config, echo, false)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let seen = self.count(READY);
        self.wait_for(READY, seen, Duration::from_secs(20))
            .with_context(|| {
                format!(
                    "the agent did not become ready; its log:\n{}",
                    self.log().join("\n")
                )
            })?;
        Ok(())
    }

    /// Ends the agent `how`, then starts a new one on the same data plane,
    /// state and socket (see [`AgentProcess::relaunch`]).
    pub fn restart(
        &mut self,
        how: Stop,
        binary: Option<&Path>,
        config: Option<&str>,
    ) -> anyhow::Result<()> {
        self.end(how)?;
        self.relaunch(binary, config)
    }

    /// Ends the agent `how` and waits until it is gone; what it pinned
    /// stays (unless it runs with `--detach-on-exit` and `how` is
    /// [`Stop::Term`]).
    pub fn end(&mut self, how: Stop) -> anyhow::Result<()> {
        match how {
            Stop::Term => {
                self.signal(libc::SIGTERM)?;
                if self.wait_exit(Duration::from_secs(10))?.is_none() {
                    bail!("the agent did not exit within 10 s of SIGTERM");
                }
            }
            Stop::Kill => {
                self.child.kill()?;
                self.child.wait()?;
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
            }
        }
        Ok(())
    }

    /// Starts a new agent after [`AgentProcess::end`], on the same data
    /// plane, state and socket: `binary` replaces the agent binary (an
    /// upgrade) and `config` the config, where given. Returns once the new
    /// agent is ready; its log follows the old one's.
    pub fn relaunch(&mut self, binary: Option<&Path>, config: Option<&str>) -> anyhow::Result<()> {
        if let Some(binary) = binary {
            self.binary = binary.to_path_buf();
        }
        if let Some(config) = config {
            let config = self.with_private_paths(config);
            std::fs::write(&self.config, config)
                .with_context(|| format!("write {}", self.config.display()))?;
        }
        let (child, reader) = self.launch()?;
        self.child = child;
        self.reader = Some(reader);
        self.wait_ready()
    }

    /// Starts the agent and waits for it to exit by itself (for configs it
    /// must reject). Returns its exit status and log.
    pub fn run_to_exit(ns: &Netns, config: &str) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        let mut agent = AgentProcess::spawn(ns, config, false, true)?;
        match agent.wait_exit(Duration::from_secs(20))? {
            Some(status) => Ok((status, agent.log())),
            None => bail!(
                "the agent kept running on a config it should reject; log:\n{}",
                agent.log().join("\n")
            ),
        }
    }

    /// Waits up to `timeout` for the agent to exit; once it has, its whole
    /// log has been collected.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The pipe closed with the process: the reader ends.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(
        ns: &Netns,
        config: &str,
        echo: bool,
        detach_on_exit: bool,
    ) -> anyhow::Result<AgentProcess> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // Unique across processes too (PIDs are reused), and fresh: a
        // leftover rollback from an earlier run must not apply here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "canary-agent-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let binary = agent_binary();
        if !binary.exists() {
            bail!(
                "agent binary {} not found; build it with `cargo build -p canary-agent` or set CANARY_AGENT_BIN",
                binary.display()
            );
        }
        let config_path = dir.join("agent.toml");
        let bpffs_dir = lab_bpffs()?.join(&name);
        std::fs::write(&config_path, with_private_paths(config, &dir, &bpffs_dir))
            .with_context(|| format!("write {}", config_path.display()))?;
        let ns = Netns::attach(ns.name())?;
        let log: Log = Arc::default();
        let (child, reader) = launch(&ns, &binary, &config_path, detach_on_exit, echo, &log, &[])?;
        Ok(AgentProcess {
            child,
            log,
            reader: Some(reader),
            config: config_path,
            bpffs_dir,
            dir,
            detach_on_exit,
            echo,
            binary,
            ns,
            env: Vec::new(),
        })
    }

    /// Sets `key` in the environment of the agents launched from here on
    /// (e.g. `CANARY_EBPF_OBJECT` before an upgrade).
    pub fn set_env(&mut self, key: &str, value: &Path) {
        self.env.push((key.to_string(), value.to_path_buf()));
    }

    /// Starts this agent's binary again on its config.
    fn launch(&self) -> anyhow::Result<(Child, std::thread::JoinHandle<()>)> {
        launch(
            &self.ns,
            &self.binary,
            &self.config,
            self.detach_on_exit,
            self.echo,
            &self.log,
            &self.env,
        )
    }

    /// The config with this agent's private paths added where it names
    /// none.
    fn with_private_paths(&self, config: &str) -> String {
        with_private_paths(config, &self.dir, &self.bpffs_dir)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many log lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until more than `seen` log lines contain `needle`.
    pub fn wait_for(
        &mut self,
        needle: &str,
        seen: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.log;
        let mut guard = lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(line) = guard.iter().filter(|l| l.contains(needle)).nth(seen) {
                return Ok(line.clone());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}) before logging {needle:?}");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("the agent did not log {needle:?} within {timeout:?}");
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            guard = cv
                .wait_timeout(guard, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The control socket, where the config did not name one.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The directory of this agent's files (config, private state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where this agent's data plane is pinned.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Replaces the config file and sends SIGHUP. `Ok` once the agent says
    /// it applied the config; `Err` with its message if it rejected it.
    pub fn reload(&mut self, config: &str) -> anyhow::Result<()> {
        let (ok, rejected) = (self.count(RELOADED), self.count(RELOAD_REJECTED));
        let config = self.with_private_paths(config);
        std::fs::write(&self.config, config)
            .with_context(|| format!("write {}", self.config.display()))?;
        self.signal(libc::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.count(RELOADED) > ok {
                return Ok(());
            }
            if self.count(RELOAD_REJECTED) > rejected {
                let line = self.wait_for(RELOAD_REJECTED, rejected, Duration::ZERO)?;
                bail!("reload rejected: {line}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("the agent neither applied nor rejected the reload within 10 s")
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill has no memory preconditions; the pid is our child,
        // not yet reaped, so it cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// SIGTERM, then waits (10 s at most) for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        self.signal(libc::SIGTERM)?;
        match self.wait_exit(Duration::from_secs(10))? {
            Some(status) => Ok((status, self.log())),
            None => bail!("the agent did not exit within 10 s of SIGTERM"),
        }
    }

    /// SIGKILL, as a crash would: no chance to clean up.
    pub fn kill(mut self) -> anyhow::Result<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever the agent left pinned goes too (a no-op after a
        // --detach-on-exit stop).
        let _ = std::process::Command::new(&self.binary)
            .args(["uninstall", "--bpffs-dir"])
            .arg(&self.bpffs_dir)
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `binary` in `ns` on `config`, its stderr copied into `log` (and
/// to our stderr with a prefix if `echo`).
fn launch(
    ns: &Netns,
    binary: &Path,
    config: &Path,
    detach_on_exit: bool,
    echo: bool,
    log: &Log,
    env: &[(String, PathBuf)],
) -> anyhow::Result<(Child, std::thread::JoinHandle<()>)> {
    let mut command = ns.command(binary);
    command.arg("--config").arg(config);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    if detach_on_exit {
        command.arg("--detach-on-exit");
    }
    let mut child = command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {} in {}", binary.display(), ns.name()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    let sink = Arc::clone(log);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("  agent | {line}");
            }
            let (lines, cv) = &*sink;
            lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
            cv.notify_all();
        }
    });
    Ok((child, reader))
}

/// Where labs pin their agents' data planes: a bpffs mounted in this
/// process's mount namespace, outside `/sys`, so every agent started
/// through `ip netns exec` (which remounts `/sys` for its child) sees the
/// same pins as the agent before it. Mounted once, kept for later runs.
pub fn lab_bpffs() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from("/run/canary-lab/bpffs");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable for its size.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context("statfs /run/canary-lab/bpffs");
    }
    #[expect(clippy::cast_sign_loss, reason = "bit pattern comparison")]
    let is_bpffs = st.f_type as u64 & 0xffff_ffff == 0xcafe_4a11;
    if !is_bpffs {
        // SAFETY: every pointer is a NUL-terminated string alive for the
        // call; mount touches no memory of ours.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("mount bpffs at /run/canary-lab/bpffs");
        }
    }
    Ok(dir)
}

/// Gives an agent a state directory, a control socket and a bpffs
/// directory of its own (under `dir` and `bpffs`) unless the config names
/// them: rollbacks persist there, and one lab's must not leak into the next
/// (or into the host's `/var/lib/canary` and `/sys/fs/bpf/canary`). The
/// socket LB is off unless the config names `socket_lb`: on by default it
/// would attach at the host's cgroup v2 root and steer every process on
/// the machine (a socket-LB test names its own cgroup).
fn with_private_paths(config: &str, dir: &Path, bpffs: &Path) -> String {
    let mut config = config.to_string();
    for (key, value) in [
        ("state_dir", format!("\"{}\"", dir.join("state").display())),
        (
            "control_socket",
            format!("\"{}\"", dir.join("control.sock").display()),
        ),
        ("bpffs_dir", format!("\"{}\"", bpffs.display())),
        ("socket_lb", "false".to_string()),
    ] {
        if !config.contains(key) {
            let line = format!("{key} = {value}");
            config = config.replacen("[agent]", &format!("[agent]\n{line}"), 1);
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_get_private_paths_unless_the_config_names_them() {
        let dir = Path::new("/tmp/x");
        let bpf = Path::new("/run/b/x");
        let out = with_private_paths("[agent]\ninterfaces = [\"cli0\"]\n", dir, bpf);
        assert_eq!(
            out,
            "[agent]\nsocket_lb = false\nbpffs_dir = \"/run/b/x\"\ncontrol_socket = \"/tmp/x/control.sock\"\nstate_dir = \"/tmp/x/state\"\ninterfaces = [\"cli0\"]\n"
        );
        let own = "[agent]\nstate_dir = \"/s\"\ncontrol_socket = \"/c\"\nbpffs_dir = \"/b\"\nsocket_lb = true\n";
        assert_eq!(with_private_paths(own, dir, bpf), own);
    }
}

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
    std::env::var_os("CANARY_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/canary-agent")
        })
}

/// Path of `canaryctl`: beside the agent binary.
pub fn canaryctl_binary() -> PathBuf {
    agent_binary().with_file_name("canaryctl")
}

type Log = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A running agent.
pub struct AgentProcess {
    child: Child,
    log: Log,
    /// Copies the agent's stderr into `log`; ends when the agent exits.
    reader: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    config: PathBuf,
}

impl AgentProcess {
    /// Writes `config` to a fresh directory, starts the agent in `ns` and
    /// waits until it is ready. `echo` copies its log to stderr with a
    /// prefix. If the agent exits instead, the error carries its log.
    pub fn start(ns: &Netns, config: &str, echo: bool) -> anyhow::Result<AgentProcess> {
        let mut agent = AgentProcess::spawn(ns, config, echo)?;
        agent
            .wait_for(READY, 0, Duration::from_secs(20))
            .with_context(|| {
                format!(
                    "the agent did not become ready; its log:\n{}",
                    agent.log().join("\n")
                )
            })?;
        Ok(agent)
    }

    /// Starts the agent and waits for it to exit by itself (for configs it
    /// must reject). Returns its exit status and log.
    pub fn run_to_exit(ns: &Netns, config: &str) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        let mut agent = AgentProcess::spawn(ns, config, false)?;
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

    fn spawn(ns: &Netns, config: &str, echo: bool) -> anyhow::Result<AgentProcess> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // Unique across processes too (PIDs are reused), and fresh: a
        // leftover rollback from an earlier run must not apply here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "canary-agent-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let config_path = dir.join("agent.toml");
        let config = with_private_state_dir(config, &dir);
        std::fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let binary = agent_binary();
        if !binary.exists() {
            bail!(
                "agent binary {} not found; build it with `cargo build -p canary-agent` or set CANARY_AGENT_BIN",
                binary.display()
            );
        }
        let mut child = ns
            .command(&binary)
            .arg("--config")
            .arg(&config_path)
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
        let log: Log = Arc::default();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("  agent | {line}");
                }
                let (lines, cv) = &*sink;
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                cv.notify_all();
            }
        });
        Ok(AgentProcess {
            child,
            log,
            reader: Some(reader),
            dir,
            config: config_path,
        })
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        let mut guard = lines.lock().unwrap_or_else(|p| p.into_inner());
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
                .unwrap_or_else(|p| p.into_inner())
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

    /// Replaces the config file and sends SIGHUP. `Ok` once the agent says
    /// it applied the config; `Err` with its message if it rejected it.
    pub fn reload(&mut self, config: &str) -> anyhow::Result<()> {
        let (ok, rejected) = (self.count(RELOADED), self.count(RELOAD_REJECTED));
        let config = with_private_state_dir(config, &self.dir);
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Gives an agent a state directory of its own (under `dir`) unless the
/// config names one: rollbacks persist there, and one lab's must not leak
/// into the next (or into the host's `/var/lib/canary`).
fn with_private_state_dir(config: &str, dir: &Path) -> String {
    let mut config = config.to_string();
    // A control socket of its own too, for the same reason.
    for (key, path) in [
        ("state_dir", dir.join("state")),
        ("control_socket", dir.join("control.sock")),
    ] {
        if !config.contains(key) {
            let line = format!("{key} = \"{}\"", path.display());
            config = config.replacen("[agent]", &format!("[agent]\n{line}"), 1);
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_get_a_private_state_dir_and_socket_unless_the_config_names_them() {
        let dir = Path::new("/tmp/x");
        let out = with_private_state_dir("[agent]\ninterfaces = [\"cli0\"]\n", dir);
        assert_eq!(
            out,
            "[agent]\ncontrol_socket = \"/tmp/x/control.sock\"\nstate_dir = \"/tmp/x/state\"\ninterfaces = [\"cli0\"]\n"
        );
        let own = "[agent]\nstate_dir = \"/s\"\ncontrol_socket = \"/c\"\n";
        assert_eq!(with_private_state_dir(own, dir), own);
    }
}

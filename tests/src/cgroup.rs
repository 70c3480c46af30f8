//! Socket-LB test scaffolding: a cgroup of the test's own (the socket LB
//! is never attached at the real cgroup root in tests) and the client
//! processes that run in it.
//!
//! The cgroup lives on a cgroup v2 mount under `/run/canary-lab`, not
//! under `/sys/fs/cgroup`: the lab runs the agent through `ip netns exec`,
//! which remounts `/sys` for its child and would hide it.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Where the tests mount cgroup v2.
const MOUNT: &str = "/run/canary-lab/cgroup2";
/// `statfs.f_type` of cgroup v2.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// A cgroup v2 directory of this test, removed on drop (with any process
/// still in it killed first).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    /// `cgroup.procs`, opened before any fork: a child writes "0" to it to
    /// join.
    procs: File,
}

impl TestCgroup {
    /// Creates `/run/canary-lab/cgroup2/canary-test-<pid>-<n>` (mounting
    /// cgroup v2 there first if needed).
    pub fn create() -> TestCgroup {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        crate::require_root();
        mount_cgroup2();
        let path = Path::new(MOUNT).join(format!(
            "canary-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create the test cgroup {}: {e}", path.display()));
        let procs = File::options()
            .write(true)
            .open(path.join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", path.display()));
        TestCgroup { path, procs }
    }

    /// The cgroup's directory (what `[agent] cgroup` names).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program` as a command whose process joins this cgroup before it
    /// runs, so every socket it creates belongs to the cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let fd = self.procs.as_raw_fd();
        let mut command = Command::new(program);
        // SAFETY: the closure only calls write(2), async-signal-safe, on a
        // descriptor that stays open in the child until exec.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Pids in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: kill has no memory preconditions; these are the
            // test's own clients.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Mounts cgroup v2 at [`MOUNT`] unless it is mounted there already.
fn mount_cgroup2() {
    std::fs::create_dir_all(MOUNT).unwrap_or_else(|e| panic!("create {MOUNT}: {e}"));
    let c = std::ffi::CString::new(MOUNT).unwrap();
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable for its size.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    assert_eq!(rc, 0, "statfs {MOUNT}");
    #[expect(clippy::cast_sign_loss, reason = "bit pattern comparison")]
    if st.f_type as u64 & 0xffff_ffff == CGROUP2_SUPER_MAGIC {
        return;
    }
    // SAFETY: every pointer is a NUL-terminated string alive for the call.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount cgroup2 at {MOUNT}: {}",
        std::io::Error::last_os_error()
    );
}

/// Path of the test client binary: built with the test package, beside
/// the test executables' `deps/` directory.
pub fn client_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("canary-sock-client"))
        .expect("the test executable lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} not found; `cargo test -p canary-tests` (or `cargo xtask test`) builds it",
        path.display()
    );
    path
}

/// One connection as the client reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// What `getpeername()` said, or `-`.
    pub peer: String,
    /// The backend's name, or the error kind (`Err(kind)`).
    pub result: Result<String, String>,
}

impl Reply {
    fn parse(line: &str) -> Reply {
        let mut parts = line.splitn(3, ' ');
        let (status, x, y) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        match status {
            "ok" => Reply {
                peer: x.to_string(),
                result: Ok(y.to_string()),
            },
            _ => Reply {
                peer: y.to_string(),
                result: Err(x.to_string()),
            },
        }
    }
}

/// Runs the client in `cgroup` (in network namespace `netns`) with `args`
/// and returns one reply per connection.
pub fn run_client(cgroup: &TestCgroup, netns: &str, args: &[&str]) -> Vec<Reply> {
    let out = cgroup
        .command(client_binary())
        .args(["--netns", netns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the socket-LB test client");
    assert!(
        out.status.success(),
        "client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(Reply::parse)
        .collect()
}

/// A client holding its connections open (`--hold`).
#[derive(Debug)]
pub struct HeldClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl HeldClient {
    /// Starts the client in `cgroup` with `--hold` and waits until every
    /// connection is open and answered once; returns it and those replies.
    pub fn start(cgroup: &TestCgroup, netns: &str, args: &[&str]) -> (HeldClient, Vec<Reply>) {
        let mut child = cgroup
            .command(client_binary())
            .args(["--netns", netns, "--hold"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the socket-LB test client");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut held = HeldClient {
            child,
            stdin,
            stdout,
        };
        let replies = held.read_until("ready");
        (held, replies)
    }

    fn read_until(&mut self, end: &str) -> Vec<Reply> {
        let mut replies = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read the client");
            assert!(n > 0, "the client ended before {end:?}");
            let line = line.trim_end();
            if line == end {
                return replies;
            }
            replies.push(Reply::parse(line));
        }
    }

    /// Pings every held connection once more; returns the replies.
    pub fn ping_again(mut self) -> Vec<Reply> {
        let mut stdin = self.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("signal the client");
        drop(stdin);
        let replies = self.read_until("done");
        let _ = self.child.wait();
        replies
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

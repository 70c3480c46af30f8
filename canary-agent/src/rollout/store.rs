//! The state files: one `<service>.json` per service that is not plain
//! idle, written so that a crash never leaves a half-written one and read
//! so that a hostile one is refused, naming the file.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{Saved, ServiceState};

/// Largest state file read. The agent writes a few hundred bytes; anything
/// much larger was not written by it.
pub const MAX_STATE_FILE: u64 = 64 * 1024;

/// What every refusal of a state file tells the operator to do.
const FIX: &str = "delete it to reset the service to its configured weight \
                   (that clears a rollback: check the service first)";

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing, syncing or renaming failed.
    #[error("state file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a state this agent understands (truncated, edited).
    /// Refusing it keeps a rolled-back canary from coming back by accident.
    #[error("state file {path} is not valid (truncated or edited?); {FIX}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file is a symbolic link: never followed, so nobody can point the
    /// agent's reads or writes elsewhere.
    #[error("state file {path} is a symbolic link, which the agent does not follow; {FIX}")]
    Symlink { path: PathBuf },
    /// A FIFO, device, directory, socket… where a state file should be.
    #[error("state file {path} is {kind}, not a regular file; {FIX}")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// Far larger than any state the agent writes.
    #[error(
        "state file {path} is {size} bytes, more than the {MAX_STATE_FILE} a state can be; {FIX}"
    )]
    TooLarge { path: PathBuf, size: u64 },
    /// A saved judge window that cannot be used: the agent starts the
    /// window anew (spending its share of `alpha` again) and overwrites it.
    #[error("judge window file {path} cannot be used ({why}); the window starts anew")]
    Window { path: PathBuf, why: String },
    /// A service name that cannot name a file (config validation keeps
    /// these out; this guards the store itself).
    #[error("service name {0:?} cannot name a state file")]
    BadName(String),
}

/// The directory of state files, one `<service>.json` each.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, service: &str) -> Result<PathBuf, StateError> {
        self.file(service, "json")
    }

    /// `<dir>/<service>.<suffix>`, for a service name that is a plain file
    /// name.
    fn file(&self, service: &str, suffix: &str) -> Result<PathBuf, StateError> {
        // Config validation allows [A-Za-z0-9._-], 1 to 64 characters: a
        // plain file name, never a path.
        let plain = !service.is_empty()
            && service.len() <= crate::config::MAX_SERVICE_NAME
            && service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !plain {
            return Err(StateError::BadName(service.to_string()));
        }
        Ok(self.dir.join(format!("{service}.{suffix}")))
    }

    /// The state of `service` and its release: [`Saved::NONE`] if it has
    /// no file. A symlink, a non-regular file, an oversized or unparsable
    /// file is an error naming the file: guessing could re-raise a
    /// rolled-back canary.
    pub fn load(&self, service: &str) -> Result<Saved, StateError> {
        let path = self.path(service)?;
        let Some(bytes) = read_bounded(&path)? else {
            return Ok(Saved::NONE);
        };
        // Files from before release identity hold the bare state (its
        // `state` tag at the top).
        let legacy = serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|v| v.get("state").is_some());
        let parsed = if legacy {
            serde_json::from_slice::<ServiceState>(&bytes).map(|rollout| Saved {
                release: None,
                rollout,
            })
        } else {
            serde_json::from_slice::<Saved>(&bytes)
        };
        parsed.map_err(|source| StateError::Corrupt { path, source })
    }

    /// Persists `state` durably: a temporary file in the same directory,
    /// created exclusively and without following links, written and
    /// fsynced, renamed over the state file, then the directory fsynced so
    /// the rename itself survives a power cut. Plain `idle` removes the
    /// file (and fsyncs the directory): it is the state of every release.
    pub fn save(
        &self,
        service: &str,
        release: &str,
        state: &ServiceState,
    ) -> Result<(), StateError> {
        let path = self.path(service)?;
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        if *state == ServiceState::IDLE {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(&path)(e)),
                Ok(()) => self.sync_dir(),
            };
        }
        let json = serde_json::to_vec_pretty(&Saved::of(release, state.clone()))
            .map_err(|e| io_err(&path)(io::Error::other(e)))?;
        self.write_durably(&path, &json)
    }

    /// The judge window saved for `service`, if any (see
    /// `daemon/judging.rs`). Read with the state file's care.
    pub fn load_window<T: serde::de::DeserializeOwned>(
        &self,
        service: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.file(service, "window.json")?;
        let unusable = |why: String| StateError::Window {
            path: path.clone(),
            why,
        };
        let bytes = match read_bounded(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(StateError::Symlink { .. }) => return Err(unusable("a symbolic link".into())),
            Err(StateError::NotRegular { kind, .. }) => return Err(unusable(kind.to_string())),
            Err(StateError::TooLarge { size, .. }) => {
                return Err(unusable(format!("{size} bytes")));
            }
            Err(StateError::Io { source, .. }) => return Err(unusable(source.to_string())),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| unusable(format!("not a window this agent wrote: {e}")))
    }

    /// Saves the judge window of `service`, durably.
    pub fn save_window<T: serde::Serialize>(
        &self,
        service: &str,
        window: &T,
    ) -> Result<(), StateError> {
        let path = self.file(service, "window.json")?;
        let json = serde_json::to_vec(window).map_err(|e| StateError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        self.write_durably(&path, &json)
    }

    /// Removes the judge window of `service` (its window ended), if any.
    pub fn remove_window(&self, service: &str) -> Result<(), StateError> {
        let path = self.file(service, "window.json")?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
            Ok(()) => Ok(()),
        }
    }

    /// Writes `bytes` to `path` in this directory durably: a temporary
    /// file beside it, created exclusively and without following links,
    /// written and fsynced, renamed over `path`, then the directory fsynced
    /// so the rename itself survives a power cut.
    fn write_durably(&self, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self.dir.join(format!(".{name}.tmp"));
        // O_CREAT|O_EXCL (create_new) with O_NOFOLLOW: never writes through
        // a link or into a file someone else prepared.
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
        };
        let mut file = match create() {
            // Left over by a crash between create and rename: only this
            // agent writes here (one agent per control socket), so it is
            // ours to remove. Unlinking a planted symlink removes the link,
            // not its target.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp).map_err(io_err(&tmp))?;
                create().map_err(io_err(&tmp))?
            }
            other => other.map_err(io_err(&tmp))?,
        };
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_err(&tmp))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.sync_dir()
    }

    /// fsync of the directory: makes a rename or unlink in it durable.
    fn sync_dir(&self) -> Result<(), StateError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StateError::Io {
                path: self.dir.clone(),
                source,
            })
    }
}

/// The bytes of the file at `path`, `None` if there is none. A symlink, a
/// non-regular file or one larger than [`MAX_STATE_FILE`] is an error
/// naming the file.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let path = path.to_path_buf();
    // O_NOFOLLOW: a symlink fails with ELOOP instead of being read.
    // O_NONBLOCK: opening a FIFO planted there returns at once (it is
    // refused below) instead of hanging the agent.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StateError::Symlink { path });
        }
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(source) => return Err(StateError::Io { path, source }),
    };
    if !meta.is_file() {
        let kind = crate::file_kind(&meta);
        return Err(StateError::NotRegular { path, kind });
    }
    if meta.len() > MAX_STATE_FILE {
        let size = meta.len();
        return Err(StateError::TooLarge { path, size });
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows after the fstat.
    if let Err(source) = file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes) {
        return Err(StateError::Io { path, source });
    }
    if bytes.len() as u64 > MAX_STATE_FILE {
        let size = bytes.len() as u64;
        return Err(StateError::TooLarge { path, size });
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::RollbackReason;

    fn store() -> (StateStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "canary-state-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (StateStore::new(&dir), dir)
    }

    #[test]
    fn a_rollback_survives_a_round_trip_and_idle_removes_the_file() {
        let (store, dir) = store();
        assert_eq!(store.load("web").unwrap(), Saved::NONE, "no file is idle");
        let state = ServiceState::RolledBack {
            reason: RollbackReason::Breaker,
            at_unix: 1,
            detail: "3 failures of 4 attempts".into(),
        };
        store.save("web", "r1", &state).unwrap();
        assert_eq!(store.load("web").unwrap(), Saved::of("r1", state.clone()));
        let text = std::fs::read_to_string(dir.join("web.json")).unwrap();
        assert!(
            text.contains("\"state\": \"rolled-back\"")
                && text.contains("\"reason\": \"breaker\"")
                && text.contains("\"release\": \"r1\""),
            "{text}"
        );
        store.save("web", "r1", &ServiceState::IDLE).unwrap();
        assert!(!dir.join("web.json").exists());
        assert_eq!(store.load("web").unwrap(), Saved::NONE);
        // An operator's weight and a promotion persist too.
        let manual = ServiceState::Idle {
            weight_ppm: Some(2_500),
        };
        store.save("web", "r1", &manual).unwrap();
        assert_eq!(store.load("web").unwrap(), Saved::of("r1", manual.clone()));
        let svc = super::super::tests::test_service();
        assert_eq!(manual.effective_weight(&svc).ppm(), 2_500);
        let promoted = ServiceState::Promoted { at_unix: 1 };
        store.save("web", "r1", &promoted).unwrap();
        assert_eq!(
            store.load("web").unwrap(),
            Saved::of("r1", promoted.clone())
        );
        assert_eq!(promoted.effective_weight(&svc).ppm(), 1_000_000);
        // A file holding plain idle (as an earlier release wrote) still reads.
        std::fs::write(dir.join("old.json"), "{\"state\":\"idle\"}").unwrap();
        assert_eq!(store.load("old").unwrap(), Saved::NONE);
        // So does a rollback from before release identity: of no release.
        std::fs::write(
            dir.join("older.json"),
            "{\"state\":\"rolled-back\",\"reason\":\"judge\",\"at_unix\":5,\"detail\":\"x\"}",
        )
        .unwrap();
        let older = store.load("older").unwrap();
        assert_eq!(older.release, None);
        assert_eq!(older.rollout.name(), "rolled-back");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_idle() {
        let (store, dir) = store();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.json"), "{\"state\":\"rolled-back\"").unwrap();
        let err = store.load("web").unwrap_err();
        let path = dir.join("web.json");
        assert_eq!(
            err.to_string(),
            format!(
                "state file {} is not valid (truncated or edited?); delete it to reset the service \
                 to its configured weight (that clears a rollback: check the service first)",
                path.display()
            )
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hostile_state_files_are_refused_with_their_name() {
        let (store, dir) = store();
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, "{\"state\":\"idle\"}").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("link.json")).unwrap();
        let err = store.load("link").unwrap_err().to_string();
        assert!(
            err.contains(
                "link.json is a symbolic link, which the agent does not follow; delete it"
            ),
            "{err}"
        );
        // Sparse: the size is refused before anything is read.
        std::fs::File::create(dir.join("huge.json"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let err = store.load("huge").unwrap_err().to_string();
        assert!(
            err.contains("huge.json is 1073741824 bytes, more than the 65536"),
            "{err}"
        );
        std::fs::create_dir(dir.join("dir.json")).unwrap();
        let err = store.load("dir").unwrap_err().to_string();
        assert!(
            err.contains("dir.json is a directory, not a regular file"),
            "{err}"
        );
        let fifo =
            std::ffi::CString::new(dir.join("fifo.json").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path for the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let err = store.load("fifo").unwrap_err().to_string();
        assert!(
            err.contains("fifo.json is a FIFO, not a regular file"),
            "{err}"
        );
        assert!(matches!(
            store.load("../etc/passwd"),
            Err(StateError::BadName(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn saving_never_writes_through_a_planted_link_and_replaces_a_stale_temp_file() {
        let (store, dir) = store();
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        // A temporary file name taken by a symlink (a crash leftover or a
        // plant): the link goes, its target stays.
        std::os::unix::fs::symlink(&victim, dir.join(".web.json.tmp")).unwrap();
        let state = ServiceState::RolledBack {
            reason: RollbackReason::Operator,
            at_unix: 1,
            detail: "x".into(),
        };
        store.save("web", "r1", &state).unwrap();
        assert_eq!(store.load("web").unwrap(), Saved::of("r1", state.clone()));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(
            !dir.join(".web.json.tmp").exists(),
            "temp file renamed away"
        );
        // A symlink at the state file itself is replaced by the rename, not
        // written through.
        std::fs::remove_file(dir.join("web.json")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("web.json")).unwrap();
        store.save("web", "r1", &state).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(store.load("web").unwrap(), Saved::of("r1", state.clone()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_judge_window_round_trips_and_a_bad_one_is_refused_without_touching_the_state() {
        let (store, dir) = store();
        assert_eq!(store.load_window::<Vec<u64>>("web").unwrap(), None);
        store.save_window("web", &vec![1u64, 2, 3]).unwrap();
        assert_eq!(
            store.load_window::<Vec<u64>>("web").unwrap(),
            Some(vec![1, 2, 3])
        );
        assert!(dir.join("web.window.json").exists());
        // Unusable files name themselves and what the agent does, never
        // the state file's remedy.
        std::fs::write(dir.join("web.window.json"), "{ not json").unwrap();
        let e = store
            .load_window::<Vec<u64>>("web")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("web.window.json") && e.contains("starts anew") && !e.contains("delete"),
            "{e}"
        );
        std::fs::remove_file(dir.join("web.window.json")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("web.window.json")).unwrap();
        let e = store
            .load_window::<Vec<u64>>("web")
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // Replaced, not written through; then removed.
        store.save_window("web", &vec![4u64]).unwrap();
        assert_eq!(store.load_window::<Vec<u64>>("web").unwrap(), Some(vec![4]));
        store.remove_window("web").unwrap();
        store.remove_window("web").unwrap();
        assert_eq!(store.load_window::<Vec<u64>>("web").unwrap(), None);
        assert_eq!(
            store.load("web").unwrap(),
            Saved::NONE,
            "no state file made"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

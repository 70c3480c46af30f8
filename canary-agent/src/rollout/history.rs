//! Each service's state changes, who decided and why: kept in memory (the
//! latest [`KEEP`]) and appended to `<state_dir>/<service>.history.jsonl`,
//! so `canaryctl history` survives restarts. The file is a record for
//! people, not state: a line that cannot be read is skipped, a failed
//! append is logged and changes nothing.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Changes kept per service.
pub const KEEP: usize = 200;
/// Largest history file read back at start; it is rewritten with the
/// latest [`KEEP`] changes when it grows past this.
const MAX_FILE: u64 = 1 << 20;

/// One state change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Wall-clock seconds since the Unix epoch.
    pub at_unix: u64,
    /// The state before.
    pub from: String,
    /// The state after.
    pub to: String,
    /// The canary weight in force after.
    pub weight: String,
    /// What decided ("canaryctl", "the judge", "the breaker", "the
    /// config", "the fleet").
    pub by: String,
    /// The verdict line: why.
    pub detail: String,
}

/// The histories of every service.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    changes: BTreeMap<String, VecDeque<Change>>,
}

impl History {
    /// Empty, writing to `dir` (the state directory).
    pub fn new(dir: &Path) -> History {
        History {
            dir: dir.to_owned(),
            changes: BTreeMap::new(),
        }
    }

    fn path(&self, service: &str) -> PathBuf {
        // Service names are plain file names (config validation).
        self.dir.join(format!("{service}.history.jsonl"))
    }

    /// Reads `service`'s file back (at start), the latest [`KEEP`] lines.
    pub fn load(&mut self, service: &str) {
        let path = self.path(service);
        let Ok(file) = std::fs::File::open(&path) else {
            return;
        };
        if file
            .metadata()
            .is_ok_and(|m| !m.is_file() || m.len() > MAX_FILE * 2)
        {
            tracing::warn!(file = %path.display(), "history file not read: not a regular file or too large");
            return;
        }
        let mut kept = VecDeque::new();
        for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
            if let Ok(change) = serde_json::from_str::<Change>(&line) {
                kept.push_back(change);
                if kept.len() > KEEP {
                    kept.pop_front();
                }
            }
        }
        self.changes.insert(service.to_string(), kept);
    }

    /// Records a change of `service`.
    pub fn record(&mut self, service: &str, change: Change) {
        let line = serde_json::to_string(&change).unwrap_or_default();
        let kept = self.changes.entry(service.to_string()).or_default();
        kept.push_back(change);
        if kept.len() > KEEP {
            kept.pop_front();
        }
        if let Err(e) = self.append(service, &line) {
            tracing::warn!(service, error = %e, "cannot append to the history file; `canaryctl history` keeps it until the agent stops");
        }
    }

    fn append(&self, service: &str, line: &str) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(service);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() > MAX_FILE) {
            // Rewritten with what memory keeps.
            let text: String = self
                .changes
                .get(service)
                .into_iter()
                .flatten()
                .filter_map(|c| serde_json::to_string(c).ok())
                .map(|l| l + "\n")
                .collect();
            let tmp = self.dir.join(format!(".{service}.history.tmp"));
            let _ = std::fs::remove_file(&tmp);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?
                .write_all(text.as_bytes())?;
            return std::fs::rename(&tmp, &path);
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.write_all(format!("{line}\n").as_bytes())
    }

    /// `service`'s changes, oldest first.
    pub fn of(&self, service: &str) -> Vec<Change> {
        self.changes
            .get(service)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_a_restart_and_a_bad_line_is_skipped() {
        let dir = std::env::temp_dir().join(format!("canary-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut h = History::new(&dir);
        let change = |to: &str| Change {
            at_unix: 1,
            from: "progressing".into(),
            to: to.into(),
            weight: "0%".into(),
            by: "the judge".into(),
            detail: "x".into(),
        };
        h.record("web", change("rolled-back"));
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("web.history.jsonl"))
            .unwrap()
            .write_all(b"{not json\n")
            .unwrap();
        h.record("web", change("progressing"));
        let mut again = History::new(&dir);
        again.load("web");
        assert_eq!(
            again.of("web"),
            vec![change("rolled-back"), change("progressing")]
        );
        for _ in 0..(KEEP + 5) {
            again.record("web", change("paused"));
        }
        assert_eq!(again.of("web").len(), KEEP);
        let _ = std::fs::remove_dir_all(dir);
    }
}

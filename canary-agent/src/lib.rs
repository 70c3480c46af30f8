//! canary's node agent as a library. The `canary-agent` binary is a thin
//! shell around [`daemon::run`]; the privileged tests drive [`dataplane`]
//! directly with the same code the agent uses.

pub mod analysis;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod fleet;
pub mod http;
pub mod judge;
pub mod outbound;
pub mod rollout;
pub mod slots;
pub mod sockdiag;
pub mod status;
pub mod supervise;
pub mod sys;
pub mod telemetry;
pub mod units;

// Dependencies of the binaries only (command line and log output in
// `main.rs` and `bin/canaryctl.rs`): cargo has no per-binary dependencies,
// and `unused_crate_dependencies` checks each target on its own.
use clap as _;
use tracing_subscriber as _;

/// `err` and its sources, joined by ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// "a regular file", "a directory", "a FIFO", … for messages about a path
/// that holds the wrong kind of file.
pub(crate) fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

//! Helpers for canary's privileged tests: packet building and checking with
//! checksums computed independently of the data plane, and the privilege
//! precondition.

pub mod packet;

/// Fails the test unless it runs as root: privileged tests never skip, in
/// CI or anywhere else (`cargo xtask test` is the way to run them).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test needs root (BPF and network namespaces); run `sudo cargo xtask test`"
    );
}

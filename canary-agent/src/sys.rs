//! Process-wide settings made once at start.

/// Highest soft open-file limit asked for: the kernel refuses more than
/// `fs.nr_open` (1 048 576 by default), and an infinite hard limit cannot
/// be copied into the soft one.
const NOFILE_CEILING: libc::rlim_t = 1 << 20;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (at most 2^20): every
/// client connection is a descriptor on top of the BPF maps, programs and
/// links, and the usual soft limit of 1024 is reached by a burst of
/// clients long before the connection caps would matter. Returns the limit
/// before and after, or the error.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let want = lim.rlim_max.min(NOFILE_CEILING).max(before);
    if want > before {
        lim.rlim_cur = want;
        // SAFETY: `lim` is a valid rlimit; soft <= hard holds.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, want))
}

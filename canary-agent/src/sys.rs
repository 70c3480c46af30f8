//! The system calls the agent makes that neither aya nor the standard
//! library wrap: process limits, bpffs detection and mounting, reading a
//! pinned link's attachment, replacing or detaching a link's program, and
//! asking which programs run at a cgroup.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `statfs.f_type` of a bpf file system.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// `bpf()` commands used here (uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_PROG_QUERY` flag: the programs that run for the cgroup, its
/// ancestors' included, not only those attached at it.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// `statfs.f_type` of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// `bpf_link_type` values (uapi/linux/bpf.h).
pub const BPF_LINK_TYPE_XDP: u32 = 6;
/// A cgroup link (cgroup `sock_addr`, `sock_ops`, …).
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// A TCX link (Linux 6.6+).
pub const BPF_LINK_TYPE_TCX: u32 = 11;
/// `bpf_attach_type` of TCX ingress.
pub const BPF_TCX_INGRESS: u32 = 46;
/// `bpf_attach_type` of TCX egress.
pub const BPF_TCX_EGRESS: u32 = 47;
/// `bpf_attach_type` of cgroup `connect4`.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `bpf_attach_type` of cgroup `connect6`.
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
/// `bpf_attach_type` of cgroup `getpeername4`.
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
/// `bpf_attach_type` of cgroup `getpeername6`.
pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
/// `bpf_attach_type` of cgroup `sendmsg4` (UDP).
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
/// `bpf_attach_type` of cgroup `sendmsg6` (UDP).
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
/// `bpf_attach_type` of cgroup `recvmsg4` (UDP).
pub const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
/// `bpf_attach_type` of cgroup `recvmsg6` (UDP).
pub const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// The magic number of the file system `path` lies on.
fn fs_magic(path: &Path) -> io::Result<u64> {
    let c = c_path(path)?;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable for its size.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is a signed long; compare the magic's 32 bits whatever the
    // sign extension.
    #[expect(clippy::cast_sign_loss, reason = "bit pattern comparison")]
    Ok(st.f_type as u64 & 0xffff_ffff)
}

/// Whether `path` lies on a bpf file system.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(fs_magic(path)? == BPF_FS_MAGIC)
}

/// Mounts a fresh bpf file system at `target` (mode 0700).
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    let fstype = c"bpf";
    let data = c"mode=0700";
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call; mount touches no memory of ours.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_OBJ_GET`: a new descriptor for the object pinned at `path`.
pub fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the kernel refuses an attr whose bytes after the last
        // field it knows are not zero, and implicit padding is garbage.
        _pad: u32,
    }
    let c = c_path(path)?;
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET whose
    // pathname points at a NUL-terminated string alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("bpf() returned a bad fd"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a link is attached to, from `BPF_OBJ_GET_INFO_BY_FD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The interface of a TCX or XDP link; 0 once the interface is gone
    /// (the link is defunct), and for other link types.
    pub ifindex: u32,
    /// `BPF_TCX_*` for TCX links, `BPF_CGROUP_*` for cgroup links, 0
    /// otherwise.
    pub attach_type: u32,
    /// The cgroup of a cgroup link (the inode number of its directory on
    /// cgroup v2); 0 once the cgroup is gone, and for other link types.
    pub cgroup_id: u64,
}

/// The interface (and hook) the link pinned at `path` is attached to.
pub fn pinned_link_target(path: &Path) -> io::Result<LinkTarget> {
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd =
        bpf_obj_get(path).map_err(|e| io::Error::new(e.kind(), format!("BPF_OBJ_GET: {e}")))?;
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // (index 4) whose tcx and xdp members start with the ifindex (tcx:
    // then its attach type) and whose cgroup member is a u64 cgroup id
    // then the attach type. The rest of the buffer takes whatever else the
    // kernel writes.
    let mut info = [0u32; 32];
    let attr = GetInfo {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).map_err(io::Error::other)?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD;
    // `info` is writable for `info_len` bytes for the whole call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<GetInfo>(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("BPF_OBJ_GET_INFO_BY_FD: {e}"),
        ));
    }
    let link_type = info[0];
    Ok(match link_type {
        BPF_LINK_TYPE_CGROUP => LinkTarget {
            link_type,
            ifindex: 0,
            attach_type: info[6],
            cgroup_id: u64::from(info[4]) | (u64::from(info[5]) << 32),
        },
        _ => LinkTarget {
            link_type,
            ifindex: info[4],
            attach_type: if link_type == BPF_LINK_TYPE_TCX {
                info[5]
            } else {
                0
            },
            cgroup_id: 0,
        },
    })
}

/// `BPF_LINK_UPDATE`: the link `link` runs the program `prog` from now on,
/// atomically (no call sees neither). aya 0.14 offers this for TC and XDP
/// links only; cgroup links take it the same way.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let fd = |f: BorrowedFd<'_>| {
        u32::try_from(f.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))
    };
    let attr = LinkUpdate {
        link_fd: fd(link)?,
        new_prog_fd: fd(prog)?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_LINK_UPDATE; the
    // descriptors are borrowed, so open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_LINK_DETACH` on the link pinned at `path`: its program stops
/// running now, although the pin and other descriptors still hold the
/// link. Removing the last reference detaches too, but later: the kernel
/// frees a link whose pin is unlinked from a work queue, so an uninstall
/// that only unlinks returns while the program still runs. Returns
/// `false` for link types that cannot be detached early (tracepoint
/// links: they go when their last reference does) and for links already
/// defunct (their interface or cgroup is gone).
pub fn detach_pinned_link(path: &Path) -> io::Result<bool> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let link = bpf_obj_get(path)?;
    let attr = LinkDetach {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_LINK_DETACH; `link`
    // is open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const attr,
            std::mem::size_of::<LinkDetach>(),
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOLINK) => Ok(false),
        _ => Err(e),
    }
}

/// `BPF_MAP_LOOKUP_BATCH` on the hash map `map`: reads up to `keys.len()`
/// entries into `keys` and `values`, from the start (`from` = `None`) or
/// from where the previous call ended. Returns how many it read and where
/// the next call starts (`None` once the map is read to its end). One
/// system call for thousands of entries, where a walk with
/// `get_next_key` and a lookup takes two per entry.
///
/// `K` and `V` must be the map's key and value types (their sizes are the
/// map's).
///
/// # Panics
///
/// If `keys` and `values` differ in length.
pub fn map_lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    from: Option<u32>,
    keys: &mut [K],
    values: &mut [V],
) -> io::Result<(usize, Option<u32>)> {
    /// `bpf_attr.batch`, with the kernel's field names.
    #[repr(C)]
    #[expect(
        clippy::struct_field_names,
        reason = "the kernel's names for these fields"
    )]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    assert_eq!(keys.len(), values.len(), "one value per key");
    // Hash maps take a bucket index as the batch position.
    let start = from.unwrap_or(0);
    let mut next = 0u32;
    let mut attr = Batch {
        in_batch: if from.is_some() {
            (&raw const start) as u64
        } else {
            0
        },
        out_batch: (&raw mut next) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|_| io::Error::other("batch too large"))?,
        map_fd: u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_MAP_LOOKUP_BATCH;
    // its pointers name `start`, `next` and the two buffers, alive and
    // writable for the call, which write at most `count` keys and values of
    // the map's sizes (the caller's types); the descriptor is borrowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &raw mut attr,
            std::mem::size_of::<Batch>(),
        )
    };
    let read = attr.count as usize;
    if rc == 0 {
        return Ok((read, Some(next)));
    }
    let error = io::Error::last_os_error();
    // The end of the map: the last entries come with ENOENT.
    if error.raw_os_error() == Some(libc::ENOENT) {
        return Ok((read, None));
    }
    Err(error)
}

/// Ids of the programs that run for the cgroup `cgroup` (a directory
/// descriptor) at `attach_type`, its ancestors' included.
pub fn cgroup_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct ProgQuery {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    // A cgroup runs at most 64 programs per hook (BPF_CGROUP_MAX_PROGS).
    let mut ids = [0u32; 64];
    let mut attr = ProgQuery {
        target_fd: u32::try_from(cgroup.as_raw_fd())
            .map_err(|_| io::Error::other("negative fd"))?,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: u32::try_from(ids.len()).map_err(io::Error::other)?,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_PROG_QUERY whose
    // prog_ids points at `prog_cnt` writable u32s for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &raw mut attr,
            std::mem::size_of::<ProgQuery>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(attr.prog_cnt).map_or(ids.len(), |n| n.min(ids.len()));
    Ok(ids[..n].to_vec())
}

/// Whether `path` lies on a cgroup v2 file system.
pub fn is_cgroup2(path: &Path) -> io::Result<bool> {
    Ok(fs_magic(path)? == CGROUP2_SUPER_MAGIC)
}

/// The index of interface `name` in this network namespace; 0 if it does
/// not exist.
pub fn ifindex(name: &str) -> u32 {
    let Ok(c) = CString::new(name) else {
        return 0;
    };
    // SAFETY: `c` is NUL-terminated; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

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
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let want = lim.rlim_max.min(NOFILE_CEILING).max(before);
    if want > before {
        lim.rlim_cur = want;
        // SAFETY: `lim` is a valid rlimit; soft <= hard holds.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, want))
}

/// Size of the buffer NSS fills with a group or user entry's strings. An
/// entry that does not fit (ERANGE) counts as not found.
const NSS_BUFFER: usize = 16 * 1024;

/// The gid of the group called `name`, or `None` if there is no such
/// group. Goes through NSS, which may block on the network (LDAP, sssd):
/// call it off the runtime thread.
pub fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: libc::group is plain C data (pointers and integers); all
    // zeroes is a valid (empty) value that getgrnam_r overwrites.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; NSS_BUFFER];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &raw mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// Whether user `uid`, whose primary group is `primary_gid`, is a member
/// of group `gid` (as primary group or listed). Goes through NSS, which
/// may block: call it off the runtime thread.
pub fn user_in_group(uid: u32, primary_gid: u32, gid: u32) -> bool {
    if primary_gid == gid {
        return true;
    }
    // SAFETY: zeroed plain C data, overwritten by getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; NSS_BUFFER];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &raw mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return false;
    }
    let mut n: libc::c_int = 256;
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: pw_name points into buf (alive); groups has room for n.
    let rc = unsafe { libc::getgrouplist(pw.pw_name, pw.pw_gid, groups.as_mut_ptr(), &raw mut n) };
    rc >= 0 && groups[..usize::try_from(n).unwrap_or(0)].contains(&gid)
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Gives `path` to group `gid`, keeping its owner.
pub fn set_group(path: &Path, gid: u32) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated path; -1 keeps the owner.
    if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// This node's hostname.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The network namespaces of the processes in the cgroup tree at `cgroup`
/// other than this process's own: one process id in each (a way in), and
/// how many processes are outside this process's PID namespace (the
/// kernel lists them as 0: a container without the host's PID namespace
/// sees only its own). Processes that exit meanwhile are skipped.
pub fn foreign_netns_in_cgroup(cgroup: &Path) -> io::Result<(Vec<u32>, usize)> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
    let own = id(Path::new("/proc/self/ns/net"))?;
    let mut seen = std::collections::BTreeSet::from([own]);
    let mut found = Vec::new();
    let mut hidden = 0;
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            // Removed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if pid == 0 {
                hidden += 1;
                continue;
            }
            let Ok(ns) = id(&Path::new("/proc").join(pid.to_string()).join("ns/net")) else {
                continue;
            };
            if seen.insert(ns) {
                found.push(pid);
            }
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Ok((found, hidden))
}

/// Runs `f` on a thread of its own inside the network namespace of
/// process `pid` (entering one takes `CAP_SYS_ADMIN`).
pub fn in_netns_of<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = std::fs::File::open(Path::new("/proc").join(pid.to_string()).join("ns/net"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we hold open; it changes only
            // this thread's namespace, and the thread ends after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("the thread in the network namespace panicked"))?
    })
}

/// Takes an exclusive advisory lock (`flock`) on the directory `path`
/// without waiting: the open directory, which holds the lock until it is
/// closed (or the process ends, however it ends), or `None` if another
/// open file holds it.
pub fn try_lock_dir(path: &Path) -> io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: flock on a descriptor we hold open.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(dir));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

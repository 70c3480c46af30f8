//! The socket LB's attachments: the cgroup programs (`connect4/6`,
//! `getpeername4/6`) at the configured cgroup v2 directory, and the BTF
//! tracepoint programs that measure the connections they steer. All are
//! pinned under `<bpffs_dir>/links/{cgroup,tracing}/` so they outlive the
//! agent.
//!
//! The next agent takes a pinned cgroup link over by replacing its program
//! in place (`BPF_LINK_UPDATE`): no `connect()` goes unsteered. Tracing
//! links cannot be updated, so the new programs are attached beside the
//! old ones, counting is handed over in one write of `SOCK_ACTIVE` (each
//! object counts only while it holds its `SOCK_GENERATION`), and only then
//! are the old links' pins replaced. The kernel releases a link whose pin
//! went some milliseconds later (after an RCU grace period); in that
//! window the old programs still run but count nothing, so no event is
//! counted twice or not at all. Per-connection events are also decided by
//! an atomic bit in the socket's tag.

use std::{
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Btf,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use canary_common::names;
use tracing::{info, warn};

use super::{Dataplane, DataplaneError, attach::OwnedLink, load::typed_program, pins::Pins};
use crate::sys;

/// The socket LB's programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockProgram {
    /// cgroup `connect4`.
    Connect4,
    /// cgroup `connect6`.
    Connect6,
    /// cgroup `getpeername4`.
    Getpeername4,
    /// cgroup `getpeername6`.
    Getpeername6,
    /// cgroup `sendmsg4` (unconnected UDP).
    Sendmsg4,
    /// cgroup `sendmsg6` (unconnected UDP).
    Sendmsg6,
    /// cgroup `recvmsg4` (UDP).
    Recvmsg4,
    /// cgroup `recvmsg6` (UDP).
    Recvmsg6,
    /// BTF tracepoint `inet_sock_set_state`.
    State,
    /// BTF tracepoint `tcp_receive_reset`.
    RstRx,
    /// BTF tracepoint `tcp_send_reset`.
    RstTx,
    /// BTF tracepoint `tcp_retransmit_skb`.
    Retransmit,
    /// BTF tracepoint `sock_send_length`.
    Send,
    /// BTF tracepoint `sock_recv_length`.
    Recv,
}

impl SockProgram {
    /// The cgroup programs, in attach order.
    /// The hooks that show the VIP go first, so that by the time a
    /// connection or datagram is steered its answers are rewritten too.
    pub const CGROUP: [SockProgram; 8] = [
        SockProgram::Getpeername4,
        SockProgram::Getpeername6,
        SockProgram::Recvmsg4,
        SockProgram::Recvmsg6,
        SockProgram::Connect4,
        SockProgram::Connect6,
        SockProgram::Sendmsg4,
        SockProgram::Sendmsg6,
    ];
    /// The tracepoint programs.
    pub const TRACING: [SockProgram; 6] = [
        SockProgram::State,
        SockProgram::RstRx,
        SockProgram::RstTx,
        SockProgram::Retransmit,
        SockProgram::Send,
        SockProgram::Recv,
    ];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            SockProgram::Connect4 => names::PROG_CONNECT4,
            SockProgram::Connect6 => names::PROG_CONNECT6,
            SockProgram::Getpeername4 => names::PROG_GETPEERNAME4,
            SockProgram::Getpeername6 => names::PROG_GETPEERNAME6,
            SockProgram::Sendmsg4 => names::PROG_SENDMSG4,
            SockProgram::Sendmsg6 => names::PROG_SENDMSG6,
            SockProgram::Recvmsg4 => names::PROG_RECVMSG4,
            SockProgram::Recvmsg6 => names::PROG_RECVMSG6,
            SockProgram::State => names::PROG_SOCK_STATE,
            SockProgram::RstRx => names::PROG_SOCK_RST_RX,
            SockProgram::RstTx => names::PROG_SOCK_RST_TX,
            SockProgram::Retransmit => names::PROG_SOCK_RETRANSMIT,
            SockProgram::Send => names::PROG_SOCK_SEND,
            SockProgram::Recv => names::PROG_SOCK_RECV,
        }
    }

    /// The cgroup hook's `bpf_attach_type`, or the tracepoint's name.
    fn hook(self) -> Hook {
        match self {
            SockProgram::Connect4 => Hook::Cgroup(sys::BPF_CGROUP_INET4_CONNECT),
            SockProgram::Connect6 => Hook::Cgroup(sys::BPF_CGROUP_INET6_CONNECT),
            SockProgram::Getpeername4 => Hook::Cgroup(sys::BPF_CGROUP_INET4_GETPEERNAME),
            SockProgram::Getpeername6 => Hook::Cgroup(sys::BPF_CGROUP_INET6_GETPEERNAME),
            SockProgram::Sendmsg4 => Hook::Cgroup(sys::BPF_CGROUP_UDP4_SENDMSG),
            SockProgram::Sendmsg6 => Hook::Cgroup(sys::BPF_CGROUP_UDP6_SENDMSG),
            SockProgram::Recvmsg4 => Hook::Cgroup(sys::BPF_CGROUP_UDP4_RECVMSG),
            SockProgram::Recvmsg6 => Hook::Cgroup(sys::BPF_CGROUP_UDP6_RECVMSG),
            SockProgram::State => Hook::Tracepoint("inet_sock_set_state"),
            SockProgram::RstRx => Hook::Tracepoint("tcp_receive_reset"),
            SockProgram::RstTx => Hook::Tracepoint("tcp_send_reset"),
            SockProgram::Retransmit => Hook::Tracepoint("tcp_retransmit_skb"),
            SockProgram::Send => Hook::Tracepoint("sock_send_length"),
            SockProgram::Recv => Hook::Tracepoint("sock_recv_length"),
        }
    }

    /// Where the program's link is pinned: the program's name without the
    /// `canary_` prefix, in `links/cgroup/` or `links/tracing/`.
    fn pin_path(self, pins: &Pins) -> PathBuf {
        let file = self.name().trim_start_matches("canary_");
        match self.hook() {
            Hook::Cgroup(_) => pins.link_path(Pins::CGROUP_LINKS, file),
            Hook::Tracepoint(_) => pins.link_path(Pins::TRACING_LINKS, file),
        }
    }
}

/// Where a socket-LB program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// A cgroup hook, by `bpf_attach_type`.
    Cgroup(u32),
    /// A BTF tracepoint, by name.
    Tracepoint(&'static str),
}

/// The socket LB as attached by this agent.
pub(super) struct SocketLb {
    cgroup: PathBuf,
    links: Vec<(SockProgram, OwnedLink)>,
}

impl Dataplane {
    /// Loads the socket LB's programs (the verifier runs here), once.
    pub fn load_socket_programs(&mut self) -> Result<(), DataplaneError> {
        if self.socket_programs_loaded {
            return Ok(());
        }
        let btf = Btf::from_sys_fs().map_err(|e| DataplaneError::Btf(Box::new(e)))?;
        for program in SockProgram::TRACING.into_iter().chain(SockProgram::CGROUP) {
            let rejected = |source| DataplaneError::Program {
                name: program.name(),
                action: "rejected by the kernel at load",
                source: Box::new(source),
            };
            match program.hook() {
                Hook::Cgroup(_) => sock_addr(&mut self.ebpf, program)?
                    .load()
                    .map_err(rejected)?,
                Hook::Tracepoint(tp) => tracepoint(&mut self.ebpf, program)?
                    .load(tp, &btf)
                    .map_err(rejected)?,
            }
        }
        self.socket_programs_loaded = true;
        Ok(())
    }

    /// Attaches the socket LB at `cgroup` (a cgroup v2 directory): the
    /// tracepoint programs first, so every socket the connect hooks tag is
    /// measured from its first event, then the cgroup programs. Links a
    /// previous agent pinned are taken over (see the module docs).
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        self.load_socket_programs()?;
        let cgroup_failed = |action: &'static str, source| DataplaneError::Cgroup {
            path: cgroup.to_path_buf(),
            action,
            source,
        };
        let dir = File::open(cgroup).map_err(|e| cgroup_failed("open", e))?;
        let cgroup_id = dir.metadata().map_err(|e| cgroup_failed("stat", e))?.ino();
        // Unpinned links of a failed attach end when `links` drops; pinned
        // ones stay until the failed start removes the data plane it
        // created (or leaves the one it adopted running, as it was).
        let mut links = Vec::new();
        // 1. The tracepoint programs, pinned beside the previous agent's
        //    (which keep counting meanwhile; these do not yet).
        let mut staged = Vec::new();
        for program in SockProgram::TRACING {
            let link = self.attach_new(program, &dir)?;
            match self.pins.as_ref().map(|p| program.pin_path(p)) {
                Some(path) => {
                    let (link, beside) = pin_beside(program, link, &path)?;
                    staged.push((beside, path.clone()));
                    links.push((
                        program,
                        OwnedLink {
                            link,
                            pin: Some(path),
                        },
                    ));
                }
                None => links.push((program, OwnedLink { link, pin: None })),
            }
        }
        // 2. Counting passes to them in one write: from here the previous
        //    agent's programs, still attached until the kernel releases
        //    their links, count nothing.
        self.sock_active
            .set(0, self.generation, 0)
            .map_err(|source| {
                super::map_error(
                    names::SOCK_ACTIVE,
                    "hand counting over to the new programs".to_string(),
                    source,
                )
            })?;
        // 3. Their pins replace the previous ones (which detaches those).
        for (beside, path) in staged {
            std::fs::rename(&beside, &path).map_err(|source| DataplaneError::LinkPin {
                path,
                action: "replace the pinned link",
                source,
            })?;
        }
        // 4. The cgroup programs: a pinned link at this cgroup runs the new
        //    program from one call to the next (BPF_LINK_UPDATE).
        for program in SockProgram::CGROUP {
            let Hook::Cgroup(attach_type) = program.hook() else {
                continue;
            };
            let pin = self.pins.as_ref().map(|p| program.pin_path(p));
            if let Some(path) = &pin
                && let Some(link) =
                    self.take_over_cgroup_link(program, path, attach_type, cgroup_id)?
            {
                links.push((
                    program,
                    OwnedLink {
                        link,
                        pin: pin.clone(),
                    },
                ));
                continue;
            }
            let link = self.attach_new(program, &dir)?;
            let link = match &pin {
                Some(path) => {
                    // A link at another cgroup is replaced: the new one is
                    // pinned beside it and takes its name.
                    let (link, beside) = pin_beside(program, link, path)?;
                    std::fs::rename(&beside, path).map_err(|source| DataplaneError::LinkPin {
                        path: path.clone(),
                        action: "replace the pinned link",
                        source,
                    })?;
                    link
                }
                None => link,
            };
            links.push((program, OwnedLink { link, pin }));
        }
        self.warn_other_socket_programs(&dir);
        self.socket_lb = Some(SocketLb {
            cgroup: cgroup.to_path_buf(),
            links,
        });
        Ok(())
    }

    /// Attaches `program` anew (unpinned): at `cgroup`, or to its
    /// tracepoint.
    fn attach_new(
        &mut self,
        program: SockProgram,
        cgroup: &File,
    ) -> Result<FdLink, DataplaneError> {
        let link_failed =
            |action, source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
                name: program.name(),
                interface: "the socket LB".to_string(),
                action,
                source,
            };
        match program.hook() {
            Hook::Cgroup(_) => {
                let prog = sock_addr(&mut self.ebpf, program)?;
                // A link: `Single` is what bpf_link_create takes (links
                // always run beside other programs at the cgroup).
                let id = prog
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(|e| link_failed("attach to the cgroup", e.into()))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| link_failed("take the new link", e.into()))?;
                FdLink::try_from(link).map_err(|e| link_failed("take the new link", e.into()))
            }
            Hook::Tracepoint(_) => {
                let prog = tracepoint(&mut self.ebpf, program)?;
                let id = prog
                    .attach()
                    .map_err(|e| link_failed("attach to the tracepoint", e.into()))?;
                Ok(prog
                    .take_link(id)
                    .map_err(|e| link_failed("take the new link", e.into()))?
                    .into())
            }
        }
    }

    /// Takes over the cgroup link pinned at `path` if it is still attached
    /// at `cgroup_id` with `attach_type`: its program is replaced in place.
    /// `None` (attach anew) if there is no pin, or it is a link of another
    /// cgroup (or of a removed one: the kernel detached it).
    fn take_over_cgroup_link(
        &mut self,
        program: SockProgram,
        path: &Path,
        attach_type: u32,
        cgroup_id: u64,
    ) -> Result<Option<FdLink>, DataplaneError> {
        let pin_failed = |action, source| DataplaneError::LinkPin {
            path: path.to_path_buf(),
            action,
            source,
        };
        let target = match sys::pinned_link_target(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(pin_failed("read the pinned link", e)),
        };
        if target.link_type != sys::BPF_LINK_TYPE_CGROUP
            || target.attach_type != attach_type
            || target.cgroup_id != cgroup_id
        {
            info!(
                program = program.name(),
                pinned_cgroup_id = target.cgroup_id,
                cgroup_id,
                "the pinned link is not attached at the configured cgroup; attaching anew"
            );
            return Ok(None);
        }
        let link_fd = sys::bpf_obj_get(path).map_err(|e| pin_failed("open the pinned link", e))?;
        let prog = sock_addr(&mut self.ebpf, program)?;
        let prog_fd = prog.fd().map_err(|source| DataplaneError::Program {
            name: program.name(),
            action: "not loaded",
            source: Box::new(source),
        })?;
        sys::link_update(link_fd.as_fd(), prog_fd.as_fd()).map_err(|e| {
            pin_failed(
                "replace the program on the pinned link (BPF_LINK_UPDATE)",
                e,
            )
        })?;
        let pinned = PinnedLink::from_pin(path).map_err(|e| {
            pin_failed("open the pinned link", std::io::Error::other(e.to_string()))
        })?;
        Ok(Some(FdLink::from(pinned)))
    }

    /// Warns when programs other than ours run at the cgroup's `connect`
    /// hooks: a second socket load balancer (Cilium's, another canary)
    /// would translate connections twice.
    fn warn_other_socket_programs(&self, cgroup: &File) {
        for program in [SockProgram::Connect4, SockProgram::Connect6] {
            let Hook::Cgroup(attach_type) = program.hook() else {
                continue;
            };
            let ours = self
                .ebpf
                .program(program.name())
                .and_then(|p| p.info().ok())
                .map(|i| i.id());
            match sys::cgroup_programs(cgroup.as_fd(), attach_type) {
                Ok(ids) => {
                    let others: Vec<u32> = ids.into_iter().filter(|id| Some(*id) != ours).collect();
                    if !others.is_empty() {
                        warn!(
                            hook = program.name().trim_start_matches("canary_"),
                            program_ids = ?others,
                            "other programs run at this cgroup's connect hook; if one is a socket \
                             load balancer too, connections to its VIPs or ours are translated twice"
                        );
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot list the programs at the cgroup (BPF_PROG_QUERY)");
                }
            }
        }
    }

    /// Detaches the socket LB: this agent's links, and any a previous
    /// agent left pinned (`socket_lb = false` now). Returns how many links
    /// went.
    pub fn detach_socket_lb(&mut self) -> usize {
        let mut detached = 0;
        if let Some(lb) = self.socket_lb.take() {
            // Connect hooks first: nothing new is tagged while the
            // tracepoints still measure what was.
            for (program, link) in lb.links.into_iter().rev() {
                if let Err(e) = link.detach() {
                    warn!(program = program.name(), error = %e, "detach failed: cannot remove the link pin");
                }
                detached += 1;
            }
        }
        if let Some(pins) = &self.pins {
            for dir in [Pins::CGROUP_LINKS, Pins::TRACING_LINKS] {
                let dir = pins.link_dir(dir);
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for entry in entries.flatten() {
                        match std::fs::remove_file(entry.path()) {
                            Ok(()) => detached += 1,
                            Err(e) => {
                                warn!(path = %entry.path().display(), error = %e, "cannot remove a socket-LB link pin");
                            }
                        }
                    }
                }
                let _ = std::fs::remove_dir(dir);
            }
        }
        detached
    }

    /// The cgroup the socket LB is attached at, if it is.
    pub fn socket_lb(&self) -> Option<&Path> {
        self.socket_lb.as_ref().map(|lb| lb.cgroup.as_path())
    }
}

/// Pins `link` beside `path` (`<path>-new`; bpffs names take no dot),
/// for a rename over whatever is pinned at `path` once it may take over.
/// A leftover of an agent that died in between is replaced.
fn pin_beside(
    program: SockProgram,
    link: FdLink,
    path: &Path,
) -> Result<(FdLink, PathBuf), DataplaneError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push("-new");
    let beside = path.with_file_name(name);
    let failed = |action, source| DataplaneError::LinkPin {
        path: beside.clone(),
        action,
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed("create its directory", e))?;
    }
    match std::fs::remove_file(&beside) {
        Ok(()) => info!(
            program = program.name(),
            "removed a link pin an agent left mid-hand-over"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("remove the leftover pin", e)),
    }
    let pinned = link
        .pin(&beside)
        .map_err(|e| failed("pin the link", std::io::Error::other(e.to_string())))?;
    Ok((FdLink::from(pinned), beside))
}

fn sock_addr(
    ebpf: &mut aya::Ebpf,
    program: SockProgram,
) -> Result<&mut CgroupSockAddr, DataplaneError> {
    typed_program(ebpf, program.name(), "is not a cgroup sock_addr program")
}

fn tracepoint(
    ebpf: &mut aya::Ebpf,
    program: SockProgram,
) -> Result<&mut BtfTracePoint, DataplaneError> {
    typed_program(ebpf, program.name(), "is not a BTF tracepoint program")
}

//! Attachments: the ingress (TC or XDP) and TC egress programs on each
//! client-facing interface, pinned so they outlive the agent, taken over
//! by the next agent with `bpf_link_update`, pruned when the config no
//! longer names them, and re-attached when an interface comes back.

use std::path::{Path, PathBuf};

use aya::programs::{
    TcAttachType, XdpMode,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use std::collections::BTreeSet;
use tracing::{info, warn};

use super::{
    Dataplane, DataplaneError, Program,
    load::{classifier, xdp},
    pins::Pins,
};
use crate::{config::IngressMode, sys};

/// An attachment. Pinned, it stays attached when the agent exits, until
/// the pin is removed; unpinned, it ends when the link is dropped.
pub(super) struct OwnedLink {
    pub(super) link: FdLink,
    pub(super) pin: Option<PathBuf>,
}

impl OwnedLink {
    /// Detaches: removes the pin, then drops the last descriptor.
    pub(super) fn detach(self) -> std::io::Result<()> {
        if let Some(pin) = &self.pin {
            match std::fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        drop(self.link);
        Ok(())
    }
}

/// What is attached to one interface.
pub(super) struct Attached {
    pub(super) mode: IngressMode,
    /// The interface's index when attached: a different one now means the
    /// interface was deleted (and maybe recreated), so the links are dead.
    ifindex: u32,
    ingress: OwnedLink,
    egress: OwnedLink,
}

/// Detaches `link` (the `program` on `interface`), logging a failure: the
/// caller goes on with the rest.
pub(super) fn detach_link(program: Program, interface: &str, link: OwnedLink) {
    if let Err(e) = link.detach() {
        warn!(interface, hook = program.hook(), error = %e, "detach failed: cannot remove the link pin");
    }
}

impl Dataplane {
    /// Attaches to `interface`: client packets in `mode`, replies at TC
    /// egress. Either everything is attached or nothing. A pinned data plane
    /// pins each link, and takes over a link a previous agent pinned on the
    /// same interface by replacing its program atomically
    /// (`bpf_link_update`): no packet goes unsteered during an upgrade.
    ///
    /// On an interface already attached in another mode, the new ingress
    /// program is attached before the old one is detached. While both run,
    /// the first to see a packet steers it and the second sees a packet to a
    /// backend, not a VIP, and lets it pass: no packet is lost or steered
    /// twice. Returns the mode the interface had before, if any.
    #[expect(
        clippy::missing_panics_doc,
        reason = "cannot panic: the one `expect` is on an entry looked up just above"
    )]
    pub fn attach(
        &mut self,
        interface: &str,
        mode: IngressMode,
    ) -> Result<Option<IngressMode>, DataplaneError> {
        if let Some(old) = self.links.get(interface).map(|a| a.mode) {
            if old != mode {
                let ingress = self.attach_one(Program::ingress(mode), interface)?;
                let attached = self.links.get_mut(interface).expect("checked above");
                let old_link = std::mem::replace(&mut attached.ingress, ingress);
                attached.mode = mode;
                detach_link(Program::ingress(old), interface, old_link);
            }
            return Ok(Some(old));
        }
        let ifindex = sys::ifindex(interface);
        let ingress = self.attach_one(Program::ingress(mode), interface)?;
        let egress = match self.attach_one(Program::TcEgress, interface) {
            Ok(link) => link,
            Err(e) => {
                detach_link(Program::ingress(mode), interface, ingress);
                return Err(e);
            }
        };
        self.links.insert(
            interface.to_string(),
            Attached {
                mode,
                ifindex,
                ingress,
                egress,
            },
        );
        Ok(None)
    }

    fn attach_one(
        &mut self,
        program: Program,
        interface: &str,
    ) -> Result<OwnedLink, DataplaneError> {
        let attach_failed = |source| DataplaneError::Attach {
            name: program.name(),
            hook: program.hook(),
            interface: interface.to_string(),
            source: Box::new(source),
        };
        let link_failed = |action, source| DataplaneError::Link {
            name: program.name(),
            interface: interface.to_string(),
            action,
            source,
        };
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.link_path(interface, program.pin_name()));
        if let Some(path) = &pin
            && let Some(link) = self.adopt_link(program, interface, path)?
        {
            return Ok(OwnedLink {
                link,
                pin: Some(path.clone()),
            });
        }
        let link: FdLink = match program {
            // Driver mode: generic (skb) XDP would be slower than TC, so a
            // driver without native XDP is an error, not a silent fallback.
            Program::XdpIngress | Program::BenchXdpEmpty => {
                let prog = xdp(&mut self.ebpf, program.name())?;
                let id = prog
                    .attach(interface, XdpMode::Driver)
                    .map_err(attach_failed)?;
                let link = prog.take_link(id).map_err(attach_failed)?;
                FdLink::try_from(link).map_err(|e| link_failed("take the new link", e.into()))?
            }
            Program::TcIngress
            | Program::TcEgress
            | Program::BenchTcEmpty
            | Program::ProbeIpv6Csum
            | Program::UdpSweep => {
                let direction = if program == Program::TcEgress {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                };
                let prog = classifier(&mut self.ebpf, program.name())?;
                let id = prog.attach(interface, direction).map_err(attach_failed)?;
                let link = prog.take_link(id).map_err(attach_failed)?;
                FdLink::try_from(link).map_err(|e| link_failed("take the new link", e.into()))?
            }
        };
        let Some(path) = pin else {
            return Ok(OwnedLink { link, pin: None });
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::LinkPin {
                path: path.clone(),
                action: "create its directory",
                source,
            })?;
        }
        let pinned = link.pin(&path).map_err(|e| DataplaneError::LinkPin {
            path: path.clone(),
            action: "pin the link",
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(OwnedLink {
            link: FdLink::from(pinned),
            pin: Some(path),
        })
    }

    /// Takes over the link pinned at `path` if it is still attached to
    /// `interface` at the right hook: the program is replaced in place.
    /// A pin of a link whose interface is gone (or was recreated) is
    /// removed, and `None` says to attach anew.
    fn adopt_link(
        &mut self,
        program: Program,
        interface: &str,
        path: &Path,
    ) -> Result<Option<FdLink>, DataplaneError> {
        let target = match sys::pinned_link_target(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DataplaneError::LinkPin {
                    path: path.to_path_buf(),
                    action: "read the pinned link",
                    source,
                });
            }
        };
        let (link_type, attach_type) = match program {
            Program::XdpIngress | Program::BenchXdpEmpty => (sys::BPF_LINK_TYPE_XDP, 0),
            Program::TcEgress => (sys::BPF_LINK_TYPE_TCX, sys::BPF_TCX_EGRESS),
            Program::TcIngress
            | Program::BenchTcEmpty
            | Program::ProbeIpv6Csum
            | Program::UdpSweep => (sys::BPF_LINK_TYPE_TCX, sys::BPF_TCX_INGRESS),
        };
        let live = target.ifindex != 0 && target.ifindex == sys::ifindex(interface);
        if !live || target.link_type != link_type || target.attach_type != attach_type {
            std::fs::remove_file(path).map_err(|source| DataplaneError::LinkPin {
                path: path.to_path_buf(),
                action: "remove the stale pin",
                source,
            })?;
            info!(
                interface,
                hook = program.hook(),
                "removed the pin of a link whose interface is gone"
            );
            return Ok(None);
        }
        let update_failed =
            |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
                name: program.name(),
                interface: interface.to_string(),
                action: "replace the program on the pinned link (bpf_link_update)",
                source,
            };
        let pinned = PinnedLink::from_pin(path).map_err(|e| update_failed(e.into()))?;
        let link = FdLink::from(pinned);
        let link = match program {
            Program::XdpIngress | Program::BenchXdpEmpty => {
                let prog = xdp(&mut self.ebpf, program.name())?;
                let link = XdpLink::try_from(link).map_err(|e| update_failed(e.into()))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| update_failed(e.into()))?;
                let link = prog.take_link(id).map_err(|e| update_failed(e.into()))?;
                FdLink::try_from(link).map_err(|e| update_failed(e.into()))?
            }
            Program::TcIngress
            | Program::TcEgress
            | Program::BenchTcEmpty
            | Program::ProbeIpv6Csum
            | Program::UdpSweep => {
                let prog = classifier(&mut self.ebpf, program.name())?;
                let link =
                    SchedClassifierLink::try_from(link).map_err(|e| update_failed(e.into()))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| update_failed(e.into()))?;
                let link = prog.take_link(id).map_err(|e| update_failed(e.into()))?;
                FdLink::try_from(link).map_err(|e| update_failed(e.into()))?
            }
        };
        Ok(Some(link))
    }

    /// Detaches everything from `interface`, if attached.
    pub fn detach(&mut self, interface: &str) {
        if let Some(attached) = self.links.remove(interface) {
            detach_link(Program::ingress(attached.mode), interface, attached.ingress);
            detach_link(Program::TcEgress, interface, attached.egress);
            if let Some(pins) = &self.pins {
                // Empty once both pins are gone; a leftover is harmless.
                let _ = std::fs::remove_dir(pins.link_dir(interface));
            }
        }
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) {
        let interfaces: Vec<String> = self.links.keys().cloned().collect();
        for interface in interfaces {
            self.detach(&interface);
        }
    }

    /// Removes link pins this data plane does not hold: interfaces (or
    /// modes) a previous agent attached that the config no longer names.
    /// Returns (interface, hook) of each.
    pub fn prune_links(&mut self) -> Vec<(String, String)> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let held: BTreeSet<&Path> = self
            .links
            .values()
            .flat_map(|a| [&a.ingress, &a.egress])
            .filter_map(|l| l.pin.as_deref())
            .collect();
        let mut pruned = Vec::new();
        for (interface, hook, path) in pins.pinned_links() {
            if held.contains(path.as_path()) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    if let Some(dir) = path.parent() {
                        let _ = std::fs::remove_dir(dir);
                    }
                    pruned.push((interface, hook));
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot remove a stale link pin");
                }
            }
        }
        pruned
    }

    /// Interfaces whose links died since they were attached: the interface
    /// was deleted (its index is gone) or deleted and created again (a new
    /// index). Returns (name, mode, whether it exists now).
    pub fn dead_links(&self) -> Vec<(String, IngressMode, bool)> {
        self.links
            .iter()
            .filter_map(|(name, a)| {
                let now = sys::ifindex(name);
                (now != a.ifindex).then(|| (name.clone(), a.mode, now != 0))
            })
            .collect()
    }

    /// Detaches from every interface and the cgroup, and removes every
    /// pin: the data plane ends when this agent exits (`--detach-on-exit`).
    pub fn uninstall(&mut self) -> Result<usize, DataplaneError> {
        self.detach_socket_lb();
        self.detach_all();
        let Some(pins) = self.pins.take() else {
            return Ok(0);
        };
        Pins::uninstall(pins.root()).map_err(|source| DataplaneError::Bpffs {
            dir: pins.root().to_path_buf(),
            action: "remove the pins".to_string(),
            source,
        })
    }

    /// Interfaces the programs are attached to, and their modes.
    pub fn attached(&self) -> impl Iterator<Item = (&str, IngressMode)> {
        self.links.iter().map(|(name, a)| (name.as_str(), a.mode))
    }
}

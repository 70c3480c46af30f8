//! The data plane's home in bpffs, so it outlives the agent:
//!
//! ```text
//! <bpffs_dir>/maps/<MAP>                     every map of the object
//! <bpffs_dir>/links/<iface>/<hook>           tc_ingress, tc_egress or xdp
//! <bpffs_dir>/links/cgroup/<program>         the socket LB's cgroup hooks
//! <bpffs_dir>/links/tracing/<program>        and its socket tracepoints
//! ```
//!
//! An agent that finds pins adopts them. Each pinned map is checked against
//! what this build's object needs (type, key and value size, flags, layout
//! version from `LAYOUT`); a map whose capacity changed is migrated into a
//! new map, every other mismatch refuses the start with the map's name and
//! the command that resets the data plane. An incompatible pin is never
//! reused silently.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapInfo};
use canary_common::{layout, names};
use tracing::info;

use super::DataplaneError;
use crate::sys;

/// What to do with one map of the object at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapAction {
    /// No pin: create the map and pin it.
    Create,
    /// A compatible pin: the programs use the pinned map.
    Reuse,
    /// A pin that differs only in capacity: create a new map, copy the
    /// entries over, and replace the pin once the new programs run.
    Migrate,
    /// A pin of a map whose contents are transient, in any other layout:
    /// create a new, empty map and replace the pin once the new programs
    /// run.
    Recreate,
    /// A pin in an older layout version this agent converts from (see
    /// `layout::CONVERTIBLE`): create a new map, convert every entry, and
    /// replace the pin once the new programs run.
    Convert,
}

/// The maps whose capacity is a config knob (or, for `COUNTERS`, grows
/// when a new version counts more events), so a pin may differ in size
/// and be migrated.
const RESIZABLE: [&str; 11] = [
    names::SOCK_TIMEOUTS,
    names::COUNTERS,
    names::CONNTRACK,
    names::CT_UDP,
    names::UDP_CONFIG,
    names::UDP_TIMEOUTS,
    names::SERVICES,
    names::BREAKER,
    names::HISTOGRAMS,
    names::STATS,
    names::TIMEOUTS,
];

/// Maps whose entries live for a handshake, until a backend answers, or for
/// one socket: when a new version changes their layout, they start empty
/// rather than refusing the start. What is lost: handshakes in flight are
/// not timed out by the sweep, flows waiting to be confirmed are
/// re-resolved, and sockets steered before the upgrade are not measured
/// any more (`SOCK_TAGS`: `getpeername` shows their backend), unconnected
/// UDP replies show the backend (`SOCK_REVNAT`), and the drain deadline
/// finds no socket steered before (`SOCK_STEERED`); they keep their
/// backend.
const TRANSIENT: [&str; 5] = [
    names::PENDING,
    names::UNCONFIRMED,
    names::SOCK_TAGS,
    names::SOCK_REVNAT,
    names::SOCK_STEERED,
];

/// How long an agent waits for the one before it to let go of the pins
/// (a rolling update that starts the new agent while the old one is still
/// stopping).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The pin directory of one data plane, locked for this agent.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
    /// The directory, open with an exclusive `flock` on it while any copy
    /// lives: one agent (or `uninstall`) at a time per data plane. `None`
    /// for a value that only names the directory.
    _lock: Option<std::sync::Arc<std::fs::File>>,
}

/// Locks `root` for this agent, waiting up to [`LOCK_WAIT`] for another to
/// exit.
fn lock_root(root: &Path) -> Result<std::fs::File, DataplaneError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut said = false;
    loop {
        match sys::try_lock_dir(root) {
            Ok(Some(lock)) => return Ok(lock),
            Ok(None) if std::time::Instant::now() < deadline => {
                if !said {
                    info!(dir = %root.display(), wait_s = LOCK_WAIT.as_secs(), "another canary-agent holds the pinned data plane; waiting for it to exit");
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(None) => {
                return Err(DataplaneError::Busy {
                    dir: root.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(DataplaneError::Bpffs {
                    dir: root.to_path_buf(),
                    action: "lock the directory".to_string(),
                    source,
                });
            }
        }
    }
}

impl Pins {
    /// `links/` subdirectory of the socket LB's cgroup links.
    pub const CGROUP_LINKS: &str = "cgroup";
    /// `links/` subdirectory of the socket LB's tracepoint links.
    pub const TRACING_LINKS: &str = "tracing";

    /// Makes `root` usable for pins: mounts a bpf file system where none is
    /// (and logs it), creates `maps/` and `links/`.
    pub fn prepare(root: &Path) -> Result<Pins, DataplaneError> {
        let failed = |action: String, source: io::Error| DataplaneError::Bpffs {
            dir: root.to_path_buf(),
            action,
            source,
        };
        if !on_bpffs(root).map_err(|e| failed("inspect".to_string(), e))? {
            let target = mount_point_for(root);
            std::fs::create_dir_all(&target)
                .map_err(|e| failed(format!("create {}", target.display()), e))?;
            sys::mount_bpffs(&target)
                .map_err(|e| failed(format!("mount bpffs at {}", target.display()), e))?;
            info!(mountpoint = %target.display(), "no bpf file system was mounted there; mounted one to pin the data plane");
        }
        for dir in [root.join("maps"), root.join("links")] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| failed(format!("create {}", dir.display()), e))?;
        }
        let lock = lock_root(root)?;
        let pins = Pins {
            root: root.to_path_buf(),
            _lock: Some(std::sync::Arc::new(lock)),
        };
        // A replacement map staged by an agent that died before it took
        // over: the old pin is still the one in use.
        for name in layout::MAPS.iter().map(|m| m.name) {
            let staged = pins.staged_map_path(name);
            if staged.exists() {
                std::fs::remove_file(&staged)
                    .map_err(|e| failed(format!("remove {}", staged.display()), e))?;
            }
        }
        Ok(pins)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Where the replacement of migrating map `name` waits until it takes
    /// over the pin.
    pub fn staged_map_path(&self, name: &str) -> PathBuf {
        // bpffs refuses names with a dot.
        self.root.join("maps").join(format!("{name}-new"))
    }

    /// Where the links on `interface` are pinned. bpffs refuses names
    /// with a dot, which interface names may have (VLANs: `eth0.100`), so
    /// `.` is written `%2E` (and `%` as `%25`, so no two names meet).
    pub fn link_dir(&self, interface: &str) -> PathBuf {
        let escaped = interface.replace('%', "%25").replace('.', "%2E");
        self.root.join("links").join(escaped)
    }

    /// Where the link of `hook` on `interface` is pinned.
    pub fn link_path(&self, interface: &str, hook: &str) -> PathBuf {
        self.link_dir(interface).join(hook)
    }

    /// Whether any map is pinned (a data plane to adopt).
    pub fn has_maps(&self) -> bool {
        layout::MAPS.iter().any(|m| self.map_path(m.name).exists())
    }

    /// Every link pinned on an interface, as (interface, hook, path).
    pub fn pinned_links(&self) -> Vec<(String, String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.root.join("links")) else {
            return out;
        };
        for dir in dirs.flatten() {
            // The socket LB's (config refuses interfaces of these names).
            if [Self::CGROUP_LINKS, Self::TRACING_LINKS]
                .iter()
                .any(|d| dir.file_name() == *d)
            {
                continue;
            }
            let interface = dir
                .file_name()
                .to_string_lossy()
                .replace("%2E", ".")
                .replace("%25", "%");
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let hook = file.file_name().to_string_lossy().into_owned();
                out.push((interface.clone(), hook, file.path()));
            }
        }
        out
    }

    /// Decides, for every map of `object`, whether to create, reuse or
    /// migrate it. `capacity` holds the `max_entries` this agent asks for,
    /// by map name. Refuses incompatible pins.
    pub fn plan(
        &self,
        object: &[u8],
        capacity: &BTreeMap<&'static str, u32>,
    ) -> Result<BTreeMap<&'static str, MapAction>, DataplaneError> {
        let obj =
            aya_obj::Object::parse(object).map_err(|e| DataplaneError::Object(e.to_string()))?;
        let recorded = self.recorded_layout()?;
        let any_pinned = self.has_maps();
        let mut plan = BTreeMap::new();
        let all = layout::MAPS
            .iter()
            .map(|m| (m.name, Some(m.version)))
            .chain([(names::LAYOUT, None)]);
        for (index, (name, version)) in all.enumerate() {
            let def = obj
                .maps
                .get(name)
                .ok_or(DataplaneError::Missing { kind: "map", name })?;
            let path = self.map_path(name);
            if !path.exists() {
                plan.insert(name, MapAction::Create);
                continue;
            }
            let incompatible = |reason: String| DataplaneError::Incompatible {
                map: name,
                dir: self.root.clone(),
                reason,
            };
            let info = MapInfo::from_pin(&path).map_err(|e| {
                incompatible(format!("cannot read the pin {}: {e}", path.display()))
            })?;
            let want_entries = capacity.get(name).copied().unwrap_or(def.max_entries());
            let found_version = recorded.as_deref().and_then(|r| r.get(index).copied());
            if let (Some(version), Some(found)) = (version, found_version)
                && found != version
                && layout::CONVERTIBLE.contains(&(name, found))
            {
                info!(
                    map = name,
                    from = found,
                    to = version,
                    "pinned map has an older layout; its entries will be converted"
                );
                plan.insert(name, MapAction::Convert);
                continue;
            }
            let difference = layout_difference(
                def,
                &info,
                version.map(|v| (v, index)),
                recorded.as_deref(),
                any_pinned,
            );
            let action = match difference {
                Ok(Some(reason)) if TRANSIENT.contains(&name) => {
                    info!(map = name, difference = %reason, "pinned map has another layout; its contents are transient, so it starts empty");
                    MapAction::Recreate
                }
                Err(reason) | Ok(Some(reason)) => return Err(incompatible(reason)),
                Ok(None) if info.max_entries() == want_entries => MapAction::Reuse,
                Ok(None) if RESIZABLE.contains(&name) => {
                    info!(
                        map = name,
                        from = info.max_entries(),
                        to = want_entries,
                        "pinned map has another capacity; it will be migrated"
                    );
                    MapAction::Migrate
                }
                Ok(None) if TRANSIENT.contains(&name) => {
                    info!(
                        map = name,
                        "pinned map has another capacity; its contents are transient, so it starts empty"
                    );
                    MapAction::Recreate
                }
                Ok(None) => {
                    return Err(incompatible(format!(
                        "its capacity is {} entries, this agent needs {want_entries}",
                        info.max_entries()
                    )));
                }
            };
            plan.insert(name, action);
        }
        Ok(plan)
    }

    /// The layout versions in the pinned `LAYOUT` map, if there is one.
    fn recorded_layout(&self) -> Result<Option<Vec<u32>>, DataplaneError> {
        let path = self.map_path(names::LAYOUT);
        if !path.exists() {
            return Ok(None);
        }
        let layout = open_pinned::<Array<MapData, u32>>(&path, names::LAYOUT)?;
        let versions = (0..layout.len())
            .map(|i| layout.get(&i, 0).unwrap_or(0))
            .collect();
        Ok(Some(versions))
    }

    /// Detaches every pinned link and removes its pin, then every map pin
    /// and the directories. Maps still held by a running agent live on until it
    /// exits. Returns how many pins were removed.
    pub fn uninstall(root: &Path) -> io::Result<usize> {
        let mut removed = 0;
        // Links first: once they are gone no program uses the maps.
        for sub in ["links", "maps"] {
            let dir = root.join(sub);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let unpin = |path: &Path| -> io::Result<()> {
                    if sub == "links" {
                        // Detached now, not when the kernel's work queue
                        // frees the unlinked link: once this returns no
                        // program of ours runs.
                        sys::detach_pinned_link(path).map_err(|e| {
                            io::Error::new(e.kind(), format!("detach {}: {e}", path.display()))
                        })?;
                    }
                    std::fs::remove_file(path)
                };
                if entry.file_type()?.is_dir() {
                    for pin in std::fs::read_dir(entry.path())? {
                        unpin(&pin?.path())?;
                        removed += 1;
                    }
                    std::fs::remove_dir(entry.path())?;
                } else {
                    unpin(&entry.path())?;
                    removed += 1;
                }
            }
            std::fs::remove_dir(&dir)?;
        }
        match std::fs::remove_dir(root) {
            // A mount point (ours or the operator's) cannot be removed;
            // it is empty now, which is what matters.
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
        Ok(removed)
    }
}

/// Whether `dir`, or its nearest existing ancestor, is on a bpffs.
fn on_bpffs(dir: &Path) -> io::Result<bool> {
    let mut probe = dir;
    loop {
        if probe.exists() {
            return sys::is_bpffs(probe);
        }
        match probe.parent() {
            Some(parent) => probe = parent,
            None => return Ok(false),
        }
    }
}

/// Where to mount a bpffs so that `dir` lies on it: the conventional
/// `/sys/fs/bpf` for directories under it (sysfs allows no new
/// directories), else `dir` itself.
fn mount_point_for(dir: &Path) -> PathBuf {
    let conventional = Path::new("/sys/fs/bpf");
    if dir.starts_with(conventional) {
        conventional.to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Opens the map pinned at `path` as a `T`.
pub fn open_pinned<T>(path: &Path, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let failed = |source| DataplaneError::Map {
        map: name,
        action: format!("open the pin {}", path.display()),
        source: Box::new(source),
    };
    let data = MapData::from_pin(path).map_err(failed)?;
    let map = Map::from_map_data(data).map_err(failed)?;
    T::try_from(map).map_err(failed)
}

/// How a pinned map's layout differs from what the object defines: `None`
/// if only its capacity may differ, `Some(reason)` if its type, key,
/// value, flags or layout version differ, `Err(reason)` if its layout
/// cannot be told at all. `version` is this build's layout version of the
/// map and its index in `LAYOUT` (none for `LAYOUT` itself); `recorded`
/// the pinned `LAYOUT`'s versions, if there is one.
fn layout_difference(
    def: &aya_obj::Map,
    info: &MapInfo,
    version: Option<(u32, usize)>,
    recorded: Option<&[u32]>,
    any_pinned: bool,
) -> Result<Option<String>, String> {
    let found_type = info
        .map_type()
        .map(|t| t as u32)
        .map_err(|e| format!("unknown map type: {e}"))?;
    // aya creates ring buffers with value size 0 whatever the object says.
    let want_value = if found_type == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32
    {
        0
    } else {
        def.value_size()
    };
    for (what, want, found) in [
        ("map type", def.map_type(), found_type),
        ("key size", def.key_size(), info.key_size()),
        ("value size", want_value, info.value_size()),
        ("flags", def.map_flags(), info.map_flags()),
    ] {
        if want != found {
            return Ok(Some(format!(
                "its {what} is {found}, this agent needs {want}"
            )));
        }
    }
    let Some((version, index)) = version else {
        return Ok(None);
    };
    Ok(match recorded.map(|r| r.get(index).copied()) {
        None if any_pinned => Some(format!(
            "no {} map records its layout version",
            names::LAYOUT
        )),
        Some(Some(found)) if found != version => Some(format!(
            "its layout version is {found}, this agent uses {version} and has no migration from it"
        )),
        _ => None,
    })
}

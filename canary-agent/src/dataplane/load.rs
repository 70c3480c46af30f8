//! Loading the object: the programs (the verifier runs here) and the maps,
//! fresh or adopted from the pins a previous agent left, sized by the
//! capacities; the probe of the kernel's IPv6 checksum flag; the layout
//! versions recorded in `LAYOUT`.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapError},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use canary_common::{layout, names};
use tracing::warn;

use super::{
    Capacity, Dataplane, DataplaneError, EBPF_OBJECT, OBJECT_ENV, Program, map_error,
    pins::{MapAction, Pins},
};
use crate::telemetry::StatsSource;

/// The object the agent runs: the file `$CANARY_EBPF_OBJECT` if set, else
/// the embedded one.
fn agent_object() -> Result<std::borrow::Cow<'static, [u8]>, DataplaneError> {
    let Some(path) = std::env::var_os(OBJECT_ENV) else {
        return Ok(std::borrow::Cow::Borrowed(EBPF_OBJECT));
    };
    let bytes = std::fs::read(&path).map_err(|source| DataplaneError::ObjectFile {
        path: PathBuf::from(&path),
        source,
    })?;
    warn!(path = %Path::new(&path).display(), "loading the data plane from {OBJECT_ENV}, not the built-in object");
    Ok(std::borrow::Cow::Owned(bytes))
}

impl Dataplane {
    /// Loads the object and every program (the verifier runs here) without
    /// attaching anything, with fresh maps sized by `capacity` that live as
    /// long as this value: for packet fixtures and benchmarks.
    pub fn load(capacity: Capacity) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_with(capacity, None, EBPF_OBJECT)
    }

    /// Loads the object with its maps pinned under `bpffs_dir`, adopting
    /// the maps a previous agent pinned there: compatible pins are reused
    /// (conntrack, counters and breaker windows carry over), pins of
    /// another capacity are migrated into new maps, and anything else is
    /// refused. Call [`Dataplane::adopt`] before the first apply, and
    /// [`Dataplane::finish_migration`] once attached.
    pub fn open(capacity: Capacity, bpffs_dir: &Path) -> Result<Dataplane, DataplaneError> {
        let object = agent_object()?;
        let pins = Pins::prepare(bpffs_dir)?;
        let plan = pins.plan(&object, &capacity.by_map())?;
        let fresh = plan.values().all(|a| *a == MapAction::Create);
        match Dataplane::load_with(capacity, Some((pins, plan)), &object) {
            Err(e) if fresh => {
                // Maps the loader created and pinned before it failed.
                if let Err(undo) = Pins::uninstall(bpffs_dir) {
                    warn!(error = %undo, "cannot remove the pins of the failed load");
                }
                Err(e)
            }
            result => result,
        }
    }

    fn load_with(
        capacity: Capacity,
        pinned: Option<(Pins, BTreeMap<&'static str, MapAction>)>,
        object: &[u8],
    ) -> Result<Dataplane, DataplaneError> {
        // Distinct for every load, so this object's socket tracepoint
        // programs can be told from the previous agent's (cgroup.rs).
        let generation = sock_generation();
        let mut loader = EbpfLoader::new();
        loader.override_global(names::SOCK_GENERATION, &generation, true);
        for (name, entries) in capacity.by_map() {
            loader.map_max_entries(name, entries);
        }
        let mut migrating = Vec::new();
        let mut converting = Vec::new();
        if let Some((pins, plan)) = &pinned {
            for (&name, &action) in plan {
                match action {
                    // The loader opens the pin if there is one, else creates
                    // the map and pins it.
                    MapAction::Create | MapAction::Reuse => {
                        loader.map_pin_path(name, pins.map_path(name));
                    }
                    MapAction::Migrate | MapAction::Recreate => migrating.push(name),
                    MapAction::Convert => {
                        migrating.push(name);
                        converting.push(name);
                    }
                }
            }
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        if let Some((pins, _)) = &pinned {
            // Pinned beside the old map now, swapped in by
            // finish_migration: a crash before that leaves the old pin.
            for &name in &migrating {
                let staged = pins.staged_map_path(name);
                let map = ebpf
                    .map(name)
                    .ok_or(DataplaneError::Missing { kind: "map", name })?;
                map.pin(&staged).map_err(|e| DataplaneError::Bpffs {
                    dir: pins.root().to_path_buf(),
                    action: format!("pin the new {name} at {}", staged.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
            }
        }
        for program in Program::DATAPLANE {
            load_program(&mut ebpf, program)?;
        }
        let mut layout_map: Array<MapData, u32> = take_map(&mut ebpf, names::LAYOUT)?;
        // A migrating map's pin keeps the old layout until it is replaced:
        // recorded then, so a crash in between leaves a true record.
        record_layout(&mut layout_map, |name| !migrating.contains(&name))?;
        let stats = StatsSource {
            stats: take_map(&mut ebpf, names::STATS)?,
            histograms: take_map(&mut ebpf, names::HISTOGRAMS)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            view: Vec::new(),
            timeouts: take_map(&mut ebpf, names::TIMEOUTS)?,
            sock_timeouts: take_map(&mut ebpf, names::SOCK_TIMEOUTS)?,
            udp_timeouts: take_map(&mut ebpf, names::UDP_TIMEOUTS)?,
            rollout: StdHashMap::new(),
            attached: std::collections::BTreeMap::new(),
        };
        let sock_active = take_map(&mut ebpf, names::SOCK_ACTIVE)?;
        let mut dp = Dataplane {
            services: take_map(&mut ebpf, names::SERVICES)?,
            rules: take_map(&mut ebpf, names::RULES)?,
            conntrack: take_map(&mut ebpf, names::CONNTRACK)?,
            ct_udp: take_map(&mut ebpf, names::CT_UDP)?,
            sock_udp: take_map(&mut ebpf, names::SOCK_UDP)?,
            sock_steered: take_map(&mut ebpf, names::SOCK_STEERED)?,
            udp_config: take_map(&mut ebpf, names::UDP_CONFIG)?,
            pending: take_map(&mut ebpf, names::PENDING)?,
            pending_next: None,
            breaker: take_map(&mut ebpf, names::BREAKER)?,
            events: Some(take_map(&mut ebpf, names::EVENTS)?),
            stats: Arc::new(Mutex::new(stats)),
            slots: BTreeMap::new(),
            free_slots: VecDeque::new(),
            next_slot: 1,
            slot_limit: capacity.stats_slots() + 1,
            ncpus: aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?,
            ebpf,
            links: BTreeMap::new(),
            socket_lb: None,
            socket_programs_loaded: false,
            sock_active,
            generation,
            installed: BTreeMap::new(),
            svc_ids: BTreeMap::new(),
            next_svc_id: 1,
            next_rule_set: 1,
            fresh: pinned
                .as_ref()
                .is_some_and(|(_, plan)| plan.values().all(|a| *a == MapAction::Create)),
            pins: pinned.map(|(pins, _)| pins),
            migrating,
            converting,
            layout: layout_map,
            ipv6_nat: false,
        };
        dp.copy_migrating()?;
        dp.ipv6_nat = dp.probe_ipv6_csum()?;
        Ok(dp)
    }
}

/// The program `name` of the object, as a `T` (`what` names the type in
/// the error).
pub(super) fn typed_program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    what: &'static str,
) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Missing {
        kind: "program",
        name,
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name,
            action: what,
            source: Box::new(source),
        })
}

pub(super) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    typed_program(ebpf, name, "is not a TC classifier")
}

pub(super) fn load_program(ebpf: &mut Ebpf, program: Program) -> Result<(), DataplaneError> {
    let result = if program.is_xdp() {
        xdp(ebpf, program.name())?.load()
    } else {
        classifier(ebpf, program.name())?.load()
    };
    result.map_err(|source| DataplaneError::Program {
        name: program.name(),
        action: "rejected by the kernel at load",
        source: Box::new(source),
    })
}

pub(super) fn xdp<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, DataplaneError> {
    typed_program(ebpf, name, "is not an XDP program")
}

impl Dataplane {
    /// Runs the `BPF_F_IPV6` probe program once on an Ethernet/IPv6/TCP
    /// frame: whether the kernel accepted the flag.
    fn probe_ipv6_csum(&mut self) -> Result<bool, DataplaneError> {
        let mut frame = vec![0u8; 14 + 40 + 20];
        frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        frame[14] = 0x60;
        frame[14 + 5] = 20; // payload length
        frame[14 + 6] = canary_common::IPPROTO_TCP;
        frame[14 + 40 + 12] = 0x50;
        let (verdict, _) = self.test_run(Program::ProbeIpv6Csum, &frame)?;
        Ok(verdict == 0)
    }

    /// Whether IPv6 services can be steered here (see `ipv6_nat`).
    pub fn supports_ipv6(&self) -> bool {
        self.ipv6_nat
    }
}

/// Writes this build's layout version of every map `which` selects into
/// `LAYOUT`.
pub(super) fn record_layout(
    layout_map: &mut Array<MapData, u32>,
    which: impl Fn(&'static str) -> bool,
) -> Result<(), DataplaneError> {
    for (index, map) in (0u32..).zip(layout::MAPS) {
        if !which(map.name) {
            continue;
        }
        layout_map.set(index, map.version, 0).map_err(|source| {
            map_error(
                names::LAYOUT,
                "record the layout versions".to_string(),
                source,
            )
        })?;
    }
    Ok(())
}

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| map_error(name, "open".to_string(), source))
}

/// A `SOCK_GENERATION` for this load: non-zero (a fresh `SOCK_ACTIVE`
/// holds 0, which no object counts under) and, with the clock and the pid
/// mixed in, different from the previous agent's.
fn sock_generation() -> u32 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            d.as_secs() ^ u64::from(d.subsec_nanos()).rotate_left(32)
        });
    let mixed = canary_common::cohort::mix64((u64::from(std::process::id()) << 32) ^ clock);
    #[expect(clippy::cast_possible_truncation, reason = "any 32 bits of the mix")]
    let generation = mixed as u32;
    generation | 1
}

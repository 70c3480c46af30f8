//! Layout versions of the pinned maps.
//!
//! Maps outlive the agent: they are pinned in bpffs and adopted by the next
//! agent, which may be a newer build. Key and value *sizes* are checked
//! against the kernel's view of a pin, but a field can change meaning
//! without changing size, so each map also has a version, bumped whenever
//! the meaning of its key or value changes. The versions of the data plane
//! that created the pins live in the `LAYOUT` map, one entry per map in the
//! order of [`MAPS`] (append only: a map's index never changes).

use crate::names;

/// One pinned map and the version of its key/value layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// The map's name in the object (and its pin's file name).
    pub name: &'static str,
    /// Bumped whenever the meaning of the key or the value changes.
    pub version: u32,
}

/// Every map of the object except `LAYOUT` itself, in `LAYOUT` index order.
pub const MAPS: [MapLayout; 15] = [
    MapLayout {
        name: names::SERVICES,
        version: 1,
    },
    MapLayout {
        name: names::RULES,
        version: 1,
    },
    MapLayout {
        name: names::CONNTRACK,
        version: 1,
    },
    MapLayout {
        name: names::COUNTERS,
        version: 1,
    },
    MapLayout {
        name: names::STATS,
        version: 1,
    },
    MapLayout {
        name: names::HISTOGRAMS,
        version: 1,
    },
    MapLayout {
        name: names::PENDING,
        version: 1,
    },
    MapLayout {
        name: names::BREAKER,
        version: 1,
    },
    MapLayout {
        name: names::EVENTS,
        version: 1,
    },
    MapLayout {
        name: names::UNCONFIRMED,
        version: 1,
    },
    MapLayout {
        name: names::TIMEOUTS,
        version: 1,
    },
    MapLayout {
        name: names::SOCK_REVNAT,
        version: 1,
    },
    MapLayout {
        name: names::SOCK_TAGS,
        version: 1,
    },
    MapLayout {
        name: names::SOCK_TIMEOUTS,
        version: 1,
    },
    MapLayout {
        name: names::SOCK_ACTIVE,
        version: 1,
    },
];

/// Entries of the `LAYOUT` array: room to append maps without resizing it.
pub const LAYOUT_ENTRIES: u32 = 32;

const _: () = assert!(MAPS.len() <= LAYOUT_ENTRIES as usize);

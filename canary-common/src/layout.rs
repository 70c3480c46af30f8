//! Layout versions of the pinned maps.
//!
//! Maps outlive the agent: they are pinned in bpffs and adopted by the next
//! agent, which may be a newer build. Key and value *sizes* are checked
//! against the kernel's view of a pin, but a field can change meaning
//! without changing size, so each map also has a version, bumped whenever
//! the meaning of its key or value changes. The versions of the data plane
//! that created the pins live in the `LAYOUT` map, one entry per map in the
//! order of [`MAPS`] (append only: a map's index never changes).
//!
//! Version history:
//! - 1: IPv4 only, 4-byte addresses.
//! - 2 (`SERVICES`, `RULES`, `CONNTRACK`, `PENDING`, `UNCONFIRMED`): 16-byte
//!   addresses, IPv4 mapped, and a family byte in keys. The agent converts
//!   version-1 `SERVICES`, `RULES` and `CONNTRACK` pins (see [`v1`] and
//!   [`CONVERTIBLE`]), so live connections survive the upgrade; the
//!   transient maps start empty.
//! - `CT_UDP`, `UDP_CONFIG`, `UDP_TIMEOUTS` appear at version 1 (UDP
//!   services). The `CtEntry` field that was padding in `CONNTRACK` holds
//!   a UDP flow's idle timeout; TCP entries keep it 0, so `CONNTRACK`'s
//!   version is unchanged.
//! - 3 (`PENDING`): an array ring of recent SYNs (`SynRecord`, element 0
//!   the head) instead of a hash of handshakes in flight. Transient: an
//!   older pin is recreated empty.

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
pub const MAPS: [MapLayout; 20] = [
    MapLayout {
        name: names::SERVICES,
        version: 2,
    },
    MapLayout {
        name: names::RULES,
        version: 2,
    },
    MapLayout {
        name: names::CONNTRACK,
        version: 2,
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
        version: 3,
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
        version: 2,
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
    MapLayout {
        name: names::CT_UDP,
        version: 1,
    },
    MapLayout {
        name: names::UDP_CONFIG,
        version: 1,
    },
    MapLayout {
        name: names::UDP_TIMEOUTS,
        version: 1,
    },
    MapLayout {
        name: names::SOCK_UDP,
        version: 1,
    },
    MapLayout {
        name: names::SOCK_STEERED,
        version: 1,
    },
];

/// Entries of the `LAYOUT` array: room to append maps without resizing it.
pub const LAYOUT_ENTRIES: u32 = 32;

const _: () = assert!(MAPS.len() <= LAYOUT_ENTRIES as usize);

/// Maps whose entries the agent converts from an older layout version when
/// it adopts a pin: (map, the version it converts from). The conversion is
/// `From<v1::…>` for the current types.
pub const CONVERTIBLE: [(&str, u32); 3] = [
    (names::SERVICES, 1),
    (names::RULES, 1),
    (names::CONNTRACK, 1),
];

/// Layout version 1 of the converted maps (IPv4 only), kept to read the
/// pins of an older data plane.
#[cfg(feature = "user")]
pub mod v1 {
    use crate::{
        addr::{Addr, FAMILY_V4},
        flow, service,
        service::{MAX_BACKENDS, V4_MAPPED_BITS},
    };

    /// Version-1 `CONNTRACK` key.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct FlowKey {
        pub src_addr: u32,
        pub dst_addr: u32,
        pub src_port: u16,
        pub dst_port: u16,
        pub proto: u8,
        pub _pad: [u8; 3],
    }
    const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

    /// Version-1 `CONNTRACK` value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct CtEntry {
        pub nat_addr: u32,
        pub nat_port: u16,
        pub cohort: u8,
        pub flags: u8,
        pub svc_id: u32,
        pub stats_slot: u32,
        pub created_ns: u64,
        pub request_ns: u64,
        pub state: u64,
    }
    const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

    /// Version-1 `SERVICES` key.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct ServiceKey {
        pub vip: u32,
        pub port: u16,
        pub proto: u8,
        pub _pad: u8,
    }
    const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

    /// Version-1 backend.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Backend {
        pub addr: u32,
        pub port: u16,
        pub _pad: u16,
        pub stats_slot: u32,
    }
    const _: () = assert!(core::mem::size_of::<Backend>() == 12);

    /// Version-1 `SERVICES` value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ServiceValue {
        pub svc_id: u32,
        pub weight_ppm: u32,
        pub salt: u32,
        pub rule_set: u32,
        pub mode: u8,
        pub flags: u8,
        pub n_stable: u8,
        pub n_canary: u8,
        pub breaker_window_ms: u32,
        pub breaker_min_failures: u16,
        pub breaker_ratio_permille: u16,
        pub stable: [Backend; MAX_BACKENDS],
        pub canary: [Backend; MAX_BACKENDS],
    }
    const _: () = assert!(core::mem::size_of::<ServiceValue>() == 28 + 2 * 12 * MAX_BACKENDS);

    /// Version-1 `RULES` key data (behind the trie's prefix length).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct RuleKey {
        pub rule_set_be: u32,
        pub addr: u32,
    }
    const _: () = assert!(core::mem::size_of::<RuleKey>() == 8);

    impl From<FlowKey> for flow::FlowKey {
        fn from(k: FlowKey) -> flow::FlowKey {
            flow::FlowKey {
                src_addr: Addr::from_v4(k.src_addr),
                dst_addr: Addr::from_v4(k.dst_addr),
                src_port: k.src_port,
                dst_port: k.dst_port,
                proto: k.proto,
                family: FAMILY_V4,
                _pad: 0,
            }
        }
    }

    impl From<CtEntry> for flow::CtEntry {
        fn from(e: CtEntry) -> flow::CtEntry {
            flow::CtEntry {
                nat_addr: Addr::from_v4(e.nat_addr),
                nat_port: e.nat_port,
                cohort: e.cohort,
                flags: e.flags,
                svc_id: e.svc_id,
                stats_slot: e.stats_slot,
                idle_ms: 0,
                created_ns: e.created_ns,
                request_ns: e.request_ns,
                state: e.state,
            }
        }
    }

    impl From<ServiceKey> for service::ServiceKey {
        fn from(k: ServiceKey) -> service::ServiceKey {
            service::ServiceKey {
                vip: Addr::from_v4(k.vip),
                port: k.port,
                proto: k.proto,
                family: FAMILY_V4,
            }
        }
    }

    impl From<Backend> for service::Backend {
        fn from(b: Backend) -> service::Backend {
            service::Backend {
                addr: Addr::from_v4(b.addr),
                port: b.port,
                _pad: 0,
                stats_slot: b.stats_slot,
            }
        }
    }

    impl From<ServiceValue> for service::ServiceValue {
        fn from(v: ServiceValue) -> service::ServiceValue {
            service::ServiceValue {
                svc_id: v.svc_id,
                weight_ppm: v.weight_ppm,
                salt: v.salt,
                rule_set: v.rule_set,
                mode: v.mode,
                flags: v.flags,
                n_stable: v.n_stable,
                n_canary: v.n_canary,
                breaker_window_ms: v.breaker_window_ms,
                breaker_min_failures: v.breaker_min_failures,
                breaker_ratio_permille: v.breaker_ratio_permille,
                stable: used(&v.stable, v.n_stable),
                canary: used(&v.canary, v.n_canary),
            }
        }
    }

    /// The first `n` backends converted, the unused rest zero as the agent
    /// writes it (a mapped 0.0.0.0 would differ from what it writes).
    fn used(list: &[Backend; MAX_BACKENDS], n: u8) -> [service::Backend; MAX_BACKENDS] {
        let mut out = [service::Backend::default(); MAX_BACKENDS];
        for (to, from) in out.iter_mut().zip(list).take(usize::from(n)) {
            *to = service::Backend::from(*from);
        }
        out
    }

    /// A version-1 rule (trie prefix length and key) in the current layout:
    /// the IPv4 prefix moves behind the 96 bits of the mapped prefix.
    #[must_use]
    pub fn rule(prefix_len: u32, key: RuleKey) -> (u32, service::RuleKey) {
        (
            prefix_len + V4_MAPPED_BITS,
            service::RuleKey {
                rule_set_be: key.rule_set_be,
                addr: Addr::from_v4(key.addr),
            },
        )
    }

    mod pod {
        // SAFETY: repr(C), explicit padding, integers only (sizes asserted).
        unsafe impl aya::Pod for super::FlowKey {}
        // SAFETY: as above.
        unsafe impl aya::Pod for super::CtEntry {}
        // SAFETY: as above.
        unsafe impl aya::Pod for super::ServiceKey {}
        // SAFETY: as above.
        unsafe impl aya::Pod for super::ServiceValue {}
        // SAFETY: as above.
        unsafe impl aya::Pod for super::RuleKey {}
    }

    #[cfg(test)]
    mod tests {
        use core::net::{IpAddr, Ipv4Addr};

        use super::*;

        #[test]
        fn a_v1_flow_converts_to_the_same_ipv4_flow() {
            let ip = |a, b, c, d| u32::from_ne_bytes([a, b, c, d]);
            let key = FlowKey {
                src_addr: ip(10, 0, 0, 2),
                dst_addr: ip(10, 0, 0, 10),
                src_port: 40000u16.to_be(),
                dst_port: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            };
            let new = flow::FlowKey::from(key);
            assert_eq!(
                IpAddr::from(new.src_addr),
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))
            );
            assert_eq!(new.family, FAMILY_V4);
            assert_eq!(
                (new.src_port, new.dst_port, new.proto),
                (key.src_port, key.dst_port, 6)
            );
            let entry = CtEntry {
                nat_addr: ip(10, 0, 1, 1),
                nat_port: 8080u16.to_be(),
                cohort: 1,
                flags: 3,
                svc_id: 7,
                stats_slot: 9,
                created_ns: 11,
                request_ns: 12,
                state: 13,
            };
            let e = flow::CtEntry::from(entry);
            assert_eq!(
                IpAddr::from(e.nat_addr),
                IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1))
            );
            assert_eq!(
                (
                    e.nat_port,
                    e.cohort,
                    e.flags,
                    e.svc_id,
                    e.stats_slot,
                    e.created_ns,
                    e.request_ns,
                    e.state
                ),
                (entry.nat_port, 1, 3, 7, 9, 11, 12, 13)
            );
        }

        #[test]
        fn a_v1_rule_keeps_its_prefix_behind_the_mapped_bits() {
            let (len, key) = rule(
                32 + 24,
                RuleKey {
                    rule_set_be: 5u32.to_be(),
                    addr: u32::from_ne_bytes([192, 168, 7, 0]),
                },
            );
            assert_eq!(len, 32 + 96 + 24);
            assert_eq!(key.rule_set_be, 5u32.to_be());
            assert_eq!(
                IpAddr::from(key.addr),
                IpAddr::V4(Ipv4Addr::new(192, 168, 7, 0))
            );
        }
    }
}

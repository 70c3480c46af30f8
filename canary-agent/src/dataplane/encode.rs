//! What the maps hold, computed from the config: service keys and values,
//! rule keys, flow keys, and the breaker's ring-buffer records decoded.
//! Addresses and ports are stored in network byte order, as packets carry
//! them.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use aya::maps::lpm_trie::Key;
use canary_common::{
    IPPROTO_TCP,
    addr::Addr,
    flow::FlowKey,
    service::{
        Backend, Cohort, FLAG_CANARY_OFF, MAX_BACKENDS, MODE_PER_CONNECTION, MODE_STICKY,
        RULE_ALWAYS_CANARY, RULE_NEVER_CANARY, RULE_SET_BITS, RuleKey, ServiceKey, ServiceValue,
        V4_MAPPED_BITS,
    },
};

use crate::config::{CohortMode, ServiceConfig};

/// A breaker-trip record from the `EVENTS` ring buffer; `None` if it is too
/// short to be one.
pub fn decode_breaker_event(record: &[u8]) -> Option<canary_common::breaker::BreakerEvent> {
    if record.len() < std::mem::size_of::<canary_common::breaker::BreakerEvent>() {
        return None;
    }
    // SAFETY: the record holds at least a whole BreakerEvent (checked), a
    // plain-integer repr(C) type for which any bytes are valid; ring records
    // are only 8-aligned by contract, hence the unaligned read.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

/// The `SERVICES` key of a VIP.
pub fn service_key(vip: SocketAddr) -> ServiceKey {
    let vip_addr = Addr::from(vip.ip());
    ServiceKey {
        vip: vip_addr,
        port: vip.port().to_be(),
        proto: IPPROTO_TCP,
        family: vip_addr.family(),
    }
}

/// The `SERVICES` value of a service.
pub fn service_value(
    svc: &ServiceConfig,
    svc_id: u32,
    rule_set: u32,
    canary_off: bool,
    slot_of: impl Fn(Cohort, SocketAddr) -> u32,
) -> ServiceValue {
    let b = &svc.breaker;
    let mut value = ServiceValue {
        svc_id,
        weight_ppm: svc.weight.ppm(),
        salt: svc.salt,
        rule_set,
        mode: match svc.cohort {
            CohortMode::Sticky => MODE_STICKY,
            CohortMode::PerConnection => MODE_PER_CONNECTION,
        },
        flags: if canary_off { FLAG_CANARY_OFF } else { 0 },
        breaker_window_ms: u32::try_from(b.window.as_millis()).unwrap_or(u32::MAX),
        breaker_min_failures: if b.enabled { b.min_failures } else { 0 },
        // ppm → permille, rounded up so "0.01%" is not 0.
        breaker_ratio_permille: u16::try_from(b.failure_ratio.ppm().div_ceil(1000))
            .unwrap_or(u16::MAX),
        // Config validation caps both lists at MAX_BACKENDS (<= u8::MAX).
        n_stable: u8::try_from(svc.stable.len().min(MAX_BACKENDS)).unwrap_or(u8::MAX),
        n_canary: u8::try_from(svc.canary.len().min(MAX_BACKENDS)).unwrap_or(u8::MAX),
        stable: [Backend::default(); MAX_BACKENDS],
        canary: [Backend::default(); MAX_BACKENDS],
    };
    for (entry, addr) in value.stable.iter_mut().zip(&svc.stable) {
        *entry = backend(*addr, slot_of(Cohort::Stable, *addr));
    }
    for (entry, addr) in value.canary.iter_mut().zip(&svc.canary) {
        *entry = backend(*addr, slot_of(Cohort::Canary, *addr));
    }
    value
}

pub(super) fn backend(addr: SocketAddr, stats_slot: u32) -> Backend {
    Backend {
        addr: Addr::from(addr.ip()),
        port: addr.port().to_be(),
        _pad: 0,
        stats_slot,
    }
}

/// The conntrack key of a TCP packet from `src` to `dst` (one family).
pub fn flow_key(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>) -> FlowKey {
    let (src, dst) = (src.into(), dst.into());
    let src_addr = Addr::from(src.ip());
    FlowKey {
        src_addr,
        dst_addr: Addr::from(dst.ip()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto: IPPROTO_TCP,
        family: src_addr.family(),
        _pad: 0,
    }
}

/// (trie prefix length of the address, address, action) of a service's
/// rules. An IPv4 /n is a /96+n of the mapped address.
pub(super) fn rule_list(svc: &ServiceConfig) -> Vec<(u32, Addr, u32)> {
    let entry = |p: &crate::config::IpPrefix, action| {
        let len = u32::from(p.len);
        let len = match p.addr {
            IpAddr::V4(_) => V4_MAPPED_BITS + len,
            IpAddr::V6(_) => len,
        };
        (len, Addr::from(p.addr), action)
    };
    let always = svc
        .always_canary
        .iter()
        .map(|p| entry(p, RULE_ALWAYS_CANARY));
    let never = svc.never_canary.iter().map(|p| entry(p, RULE_NEVER_CANARY));
    always.chain(never).collect()
}

pub(super) fn same_rules(installed: &[(Key<RuleKey>, u32)], wanted: &[(u32, Addr, u32)]) -> bool {
    // Order-insensitive: rules read back from the kernel come in trie order.
    let have: BTreeSet<(u32, Addr, u32)> = installed
        .iter()
        .map(|(key, action)| (key.prefix_len(), key.data().addr, *action))
        .collect();
    let want: BTreeSet<(u32, Addr, u32)> = wanted
        .iter()
        .map(|(len, addr, action)| (RULE_SET_BITS + *len, *addr, *action))
        .collect();
    installed.len() == wanted.len() && have == want
}

pub(super) fn rule_key(rule_set: u32, prefix_len: u32, addr: Addr) -> Key<RuleKey> {
    Key::new(
        RULE_SET_BITS + prefix_len,
        RuleKey {
            rule_set_be: rule_set.to_be(),
            addr,
        },
    )
}

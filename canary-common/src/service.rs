//! The service table and the source-prefix rules, written by the agent and
//! read by the data plane on every new flow.

use crate::addr::Addr;

/// Most backends one cohort of a service can hold. Backends live inline in
/// the service value so that one map update replaces weight, rules and both
/// backend lists at once.
pub const MAX_BACKENDS: usize = 32;

/// Default capacity of the service table (and of the per-service maps); the
/// agent resizes them at load from `[agent] max_services`.
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;

/// Capacity of the rule trie (all services, both generations during a
/// reload).
pub const MAX_RULES: u32 = 65_536;

/// Cohort numbers, as stored in conntrack and used as stats indices.
pub const COHORT_STABLE: u8 = 0;
/// See [`COHORT_STABLE`].
pub const COHORT_CANARY: u8 = 1;

/// The cohort of a connection, backend or measurement, as user space
/// handles it. Maps store the integers above (no enum inside a Pod type);
/// user space converts with [`TryFrom<u8>`], so a value that is neither is
/// an error where it is read, never a silent "stable".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cohort {
    /// The release in production ([`COHORT_STABLE`]).
    Stable,
    /// The release under test ([`COHORT_CANARY`]).
    Canary,
}

impl Cohort {
    /// Both cohorts, stable first (the order of every per-cohort array and
    /// of the exported series).
    pub const ALL: [Cohort; 2] = [Cohort::Stable, Cohort::Canary];

    /// The name operators see: the `cohort` metric label, status output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Cohort::Stable => "stable",
            Cohort::Canary => "canary",
        }
    }

    /// The number the maps store.
    pub const fn as_u8(self) -> u8 {
        match self {
            Cohort::Stable => COHORT_STABLE,
            Cohort::Canary => COHORT_CANARY,
        }
    }
}

impl From<Cohort> for u8 {
    fn from(c: Cohort) -> u8 {
        c.as_u8()
    }
}

/// Index of the cohort in per-cohort arrays (`[stable, canary]`).
impl From<Cohort> for usize {
    fn from(c: Cohort) -> usize {
        usize::from(c.as_u8())
    }
}

/// A cohort number that is neither [`COHORT_STABLE`] nor [`COHORT_CANARY`]
/// (a corrupt or foreign map entry).
#[cfg(feature = "user")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownCohort(pub u8);

#[cfg(feature = "user")]
impl core::fmt::Display for UnknownCohort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "cohort number {} is neither stable (0) nor canary (1)",
            self.0
        )
    }
}

#[cfg(feature = "user")]
impl core::error::Error for UnknownCohort {}

#[cfg(feature = "user")]
impl TryFrom<u8> for Cohort {
    type Error = UnknownCohort;

    fn try_from(v: u8) -> Result<Cohort, UnknownCohort> {
        match v {
            COHORT_STABLE => Ok(Cohort::Stable),
            COHORT_CANARY => Ok(Cohort::Canary),
            other => Err(UnknownCohort(other)),
        }
    }
}

#[cfg(feature = "user")]
impl core::fmt::Display for Cohort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cohort keyed on the client address: a client stays in its cohort.
pub const MODE_STICKY: u8 = 0;
/// Cohort keyed on the 5-tuple: every connection draws anew.
pub const MODE_PER_CONNECTION: u8 = 1;

/// Rule action: the source prefix always goes to canary.
pub const RULE_ALWAYS_CANARY: u32 = 1;
/// Rule action: the source prefix never goes to canary.
pub const RULE_NEVER_CANARY: u32 = 2;

/// Service flag: send no new connection to canary, whatever the weight or
/// rules say. Set by the agent for a rolled-back service and by the
/// breaker in the data plane when it trips.
pub const FLAG_CANARY_OFF: u8 = 1 << 0;

/// `SERVICES` key: the VIP as packets address it (network byte order).
/// The protocol is part of the key, so one VIP:port may have a TCP and a
/// UDP service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub vip: Addr,
    pub port: u16,
    pub proto: u8,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// One backend (network byte order), of the service's family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
    /// Index into `STATS` where this backend's counters live.
    pub stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// Default number of backend stats slots (one per service × cohort ×
/// backend); the agent resizes `STATS` at load from `[agent] max_backends`.
/// Slot 0 is never assigned, so `STATS` has one entry more.
pub const DEFAULT_MAX_BACKENDS: u32 = 16_383;

/// `SERVICES` value: everything the data plane needs to steer a new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable identifier the agent assigns per service name.
    pub svc_id: u32,
    /// Canary share of new flows, `0..=1_000_000`.
    pub weight_ppm: u32,
    /// Per-service hash salt.
    pub salt: u32,
    /// Which rule set in `RULES` applies; 0 = none.
    pub rule_set: u32,
    /// `MODE_*`.
    pub mode: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Used entries of `stable`.
    pub n_stable: u8,
    /// Used entries of `canary`.
    pub n_canary: u8,
    /// Breaker window length; failures and attempts restart each window.
    pub breaker_window_ms: u32,
    /// Canary failures in one window that trip the breaker; 0 = no breaker.
    pub breaker_min_failures: u16,
    /// ... if they are also at least this share of the window's canary
    /// connection attempts, in thousandths.
    pub breaker_ratio_permille: u16,
    pub stable: [Backend; MAX_BACKENDS],
    pub canary: [Backend; MAX_BACKENDS],
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 28 + 2 * 24 * MAX_BACKENDS);

/// Data part of a `RULES` LPM key. The rule set id takes the first 32 bits
/// and is always matched in full (prefix length = 32 + source prefix), so
/// one trie holds the rules of every service and a new rule set can be
/// written beside the old one and switched to atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleKey {
    /// Big-endian, so the trie's byte-wise match sees its bits first.
    pub rule_set_be: u32,
    /// Source address, network byte order (IPv4: mapped, so an IPv4 /n
    /// prefix is a /96+n prefix of the mapped address).
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 20);

/// Bits of a `RULES` key before the source prefix starts.
pub const RULE_SET_BITS: u32 = 32;
/// Bits of a `RULES` key with the whole source address.
pub const RULE_KEY_BITS: u32 = RULE_SET_BITS + 128;
/// Bits of an IPv4-mapped address before the IPv4 address starts.
pub const V4_MAPPED_BITS: u32 = 96;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding, integers only.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: repr(C), no implicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: repr(C), a u32 and an Addr, no padding.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: repr(C), no implicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::Backend {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn cohort_numbers_round_trip_and_others_are_errors() {
        for c in Cohort::ALL {
            assert_eq!(Cohort::try_from(u8::from(c)), Ok(c));
        }
        assert_eq!(Cohort::try_from(COHORT_STABLE), Ok(Cohort::Stable));
        assert_eq!(Cohort::try_from(COHORT_CANARY), Ok(Cohort::Canary));
        for v in [2u8, 7, u8::MAX] {
            assert_eq!(Cohort::try_from(v), Err(UnknownCohort(v)));
        }
        assert_eq!(Cohort::ALL.map(Cohort::as_str), ["stable", "canary"]);
        assert_eq!(Cohort::ALL.map(usize::from), [0, 1]);
    }
}

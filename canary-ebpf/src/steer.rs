//! Where the cohort and the backend of a new flow are chosen.

use aya_ebpf::maps::lpm_trie::Key;
use canary_common::{
    addr::Addr,
    cohort::{backend_index, bucket, flow_hash_addr, is_canary, sticky_hash_addr},
    counters::Counter,
    flow::FlowKey,
    service::{
        Backend, COHORT_CANARY, COHORT_STABLE, MAX_BACKENDS, MODE_PER_CONNECTION,
        RULE_ALWAYS_CANARY, RULE_KEY_BITS, RULE_NEVER_CANARY, RuleKey, ServiceValue,
    },
};

use crate::maps::RULES;

/// The outcome of steering one flow.
pub struct Choice {
    pub cohort: u8,
    pub backend: Backend,
}

/// Chooses cohort and backend for `key` (client → VIP) of service `svc`.
///
/// Source rules decide first; otherwise the flow's bucket against the
/// weight; a tripped breaker or a rollback overrides both. The backend is
/// hashed from the same key, so a sticky client also sticks to its backend
/// while the list is unchanged. `new_connection` (a SYN, not a
/// re-resolution) counts as a canary attempt for the breaker.
#[inline(always)]
pub fn choose(
    svc: &ServiceValue,
    key: &FlowKey,
    now: u64,
    new_connection: bool,
) -> Result<Choice, Counter> {
    let hash = if svc.mode == MODE_PER_CONNECTION {
        flow_hash_addr(
            &key.src_addr,
            &key.dst_addr,
            key.src_port,
            key.dst_port,
            key.proto,
            svc.salt,
        )
    } else {
        sticky_hash_addr(&key.src_addr, svc.salt)
    };
    choose_hashed(svc, hash, Some(key.src_addr), now, new_connection)
}

/// [`choose`] for a flow whose hash is already known: the socket path
/// hashes other inputs (a network-namespace or socket cookie) and may not
/// know the client's address yet (`src` is `None`).
///
/// Without a source address the rules cannot be evaluated; a service that
/// has rules then sends the connection to stable (counted as
/// `SockSourceUnknown`), so a client that `never_canary` excludes never
/// lands on canary because its address was not known.
#[inline(always)]
pub fn choose_hashed(
    svc: &ServiceValue,
    hash: u64,
    src: Option<Addr>,
    now: u64,
    new_connection: bool,
) -> Result<Choice, Counter> {
    let rule = match src {
        Some(addr) => rule_for(svc.rule_set, addr),
        None if svc.rule_set != 0 => {
            crate::stats::count(Counter::SockSourceUnknown);
            Some(RULE_NEVER_CANARY)
        }
        None => None,
    };
    let cohort = match rule {
        Some(RULE_ALWAYS_CANARY) => COHORT_CANARY,
        Some(RULE_NEVER_CANARY) => COHORT_STABLE,
        _ if is_canary(bucket(hash), svc.weight_ppm) => COHORT_CANARY,
        _ => COHORT_STABLE,
    };
    // Rolled back, or the breaker tripped: canary gets nothing new.
    let cohort =
        if cohort == COHORT_CANARY && !crate::breaker::allow_canary(svc, now, new_connection) {
            COHORT_STABLE
        } else {
            cohort
        };
    let (list, count) = if cohort == COHORT_CANARY {
        (&svc.canary, svc.n_canary)
    } else {
        (&svc.stable, svc.n_stable)
    };
    if count == 0 {
        return Err(Counter::NoBackend);
    }
    let idx = backend_index(hash, count as u32);
    // Bound for the verifier; backend_index is always < count <= MAX.
    let backend = *list
        .get(idx as usize % MAX_BACKENDS)
        .ok_or(Counter::NoBackend)?;
    Ok(Choice { cohort, backend })
}

/// The action of the longest source prefix in `rule_set` matching `addr`.
#[inline(always)]
fn rule_for(rule_set: u32, addr: Addr) -> Option<u32> {
    if rule_set == 0 {
        return None;
    }
    let key = Key::new(
        RULE_KEY_BITS,
        RuleKey {
            rule_set_be: rule_set.to_be(),
            addr,
        },
    );
    RULES.get(&key).copied()
}

//! Client → VIP: steer new flows, DNAT every packet of a flow, and measure
//! the client's side of it. TCP here; UDP datagrams go to udp.rs after the
//! shared parse.

use canary_common::{
    addr::Addr,
    counters::Counter,
    flow::{
        CT_REVERSE, CtEntry, ST_BACKEND_FIN, ST_CLIENT_FIN, ST_DRAIN, ST_REQUEST, ST_RST,
        ST_SYN_RETRIED, is_syn_retry,
    },
    service::COHORT_CANARY,
};

use crate::{
    breaker,
    conntrack::{self, Entry},
    maps::SERVICES,
    nat::{End, Rewrite},
    packet::{self, Packet, TCP_FIN, TCP_RST},
    stats::{self, Action, Outcome, count},
    steer, udp,
};

/// Runs at TC ingress or XDP: the same logic on either kind of frame.
///
/// The parser and each protocol's handler are calls of their own: the
/// eBPF stack is 512 bytes for a whole chain of calls, and each handler
/// then spends only its own share beside the parsed packet.
#[inline(always)]
pub fn handle<F: Rewrite>(ctx: &F) -> Outcome {
    let mut pkt = Packet::EMPTY;
    match packet::parse(ctx, &mut pkt) {
        Outcome::Forward => {}
        other => return other,
    }
    if pkt.is_udp() {
        return udp::ingress(ctx, &pkt);
    }
    if !pkt.is_tcp() {
        return Outcome::Ignore;
    }
    tcp(ctx, &pkt)
}

/// A TCP segment `pkt` from a client.
#[inline(never)]
fn tcp<F: Rewrite>(ctx: &F, pkt: &Packet) -> Outcome {
    stats::settle(segment(ctx, pkt))
}

#[inline(always)]
fn segment<F: Rewrite>(ctx: &F, pkt: &Packet) -> Result<Action, Counter> {
    // An existing flow keeps its backend, whatever the service says now (or
    // if it is gone: removing a service drains it). A SYN after the client's
    // FIN, or after a RST, reuses the 5-tuple for a new connection.
    let tracked = conntrack::lookup(&pkt.key)
        .map(|e| (e, e.read()))
        .filter(|(_, ct)| ct.flags & CT_REVERSE == 0)
        .filter(|(_, ct)| !(pkt.is_syn() && ct.state & (ST_CLIENT_FIN | ST_RST) != 0));
    // Past its drain deadline (set by the agent after a rollback): this
    // segment goes on as a RST, and the flow is closed like a client RST.
    let mut drain = false;
    let (entry, backend_addr, backend_port, slot): (Option<Entry>, Addr, u16, u32) = match tracked {
        Some((entry, ct)) => {
            if pkt.first_fragment {
                return Err(Counter::Fragment);
            }
            drain =
                ct.state & (ST_DRAIN | ST_RST) == ST_DRAIN && !pkt.is_syn() && !pkt.has(TCP_RST);
            if pkt.is_syn() {
                syn_again(entry, &ct, pkt);
            }
            if pkt.payload_len > 0
                && ct.state & ST_REQUEST == 0
                && entry.set_state(ST_REQUEST) & ST_REQUEST == 0
            {
                entry.set_request_ns(conntrack::now());
            }
            if pkt.has(TCP_FIN) && entry.set_state(ST_CLIENT_FIN) & ST_BACKEND_FIN != 0 {
                conntrack::close(entry, true, conntrack::now());
            }
            (Some(entry), ct.nat_addr, ct.nat_port, ct.stats_slot)
        }
        None => {
            // Only new flows (and conntrack misses) consult the service.
            let Some(svc) = SERVICES.get_ptr(&pkt.key.service()) else {
                return Ok(Action::Ignore);
            };
            if pkt.first_fragment {
                // The rest of the datagram has no ports and could not follow.
                return Err(Counter::Fragment);
            }
            // SAFETY: `svc` is a live element of SERVICES for this run (the
            // map is not preallocated, so a concurrent update frees the old
            // value only after this program returns).
            let svc = unsafe { &*svc };
            let now = conntrack::now();
            if pkt.is_syn() {
                let choice = steer::choose(svc, &pkt.key, now, true)?;
                let slot = choice.backend.stats_slot;
                if let Some(c) = stats::backend(slot) {
                    c.connections += 1;
                }
                count(Counter::NewFlow);
                conntrack::create(&pkt.key, svc.svc_id, &choice, now);
                (None, choice.backend.addr, choice.backend.port, slot)
            } else {
                // A mid-flow packet with no entry: an evicted flow, one
                // older than the agent, or a stray or forged packet. It
                // goes where its flow re-resolves, or already went, but is
                // tracked (and counted as a flow) only once the backend
                // answers: strays cannot evict tracked flows, and the
                // backend's RST to a flow it never had is no refusal.
                count(Counter::CtMiss);
                let u = match conntrack::unconfirmed(&pkt.key) {
                    Some(u) => u,
                    None => {
                        let choice = steer::choose(svc, &pkt.key, now, false)?;
                        if !pkt.has(TCP_RST) {
                            conntrack::create_unconfirmed(&pkt.key, svc.svc_id, &choice, now);
                        }
                        CtEntry {
                            nat_addr: choice.backend.addr,
                            nat_port: choice.backend.port,
                            stats_slot: choice.backend.stats_slot,
                            ..CtEntry::default()
                        }
                    }
                };
                (None, u.nat_addr, u.nat_port, u.stats_slot)
            }
        }
    };
    let mut counters = stats::backend(slot);
    if let Some(c) = counters.as_deref_mut() {
        c.packets_from_client += 1;
        c.bytes_from_client += u64::from(pkt.payload_len);
        // A tracked flow's reset is counted once, below.
        if pkt.has(TCP_RST) && entry.is_none() {
            c.resets_from_client += 1;
        }
    }

    ctx.rewrite(pkt, End::Dst, backend_addr, backend_port)?;
    if drain {
        ctx.reset(pkt)?;
        count(Counter::DrainReset);
    }
    if (pkt.has(TCP_RST) || drain)
        && let Some(entry) = entry
    {
        // Marked closing, not removed: if the backend ignores this RST (a
        // forged one out of its window), the next packets still reach it.
        let rev = conntrack::lookup(&conntrack::reverse_key(
            &pkt.key,
            backend_addr,
            backend_port,
        ));
        if conntrack::rst(entry, rev, true, conntrack::now())
            && !drain
            && let Some(c) = counters
        {
            c.resets_from_client += 1;
        }
    }
    Ok(Action::Forward)
}

/// A SYN for a tracked, open flow: it stays on its backend. It is a retry
/// failure (`syn_retried`, and for canary the breaker) only if the backend
/// has not answered and it comes late enough for a real retransmission;
/// back-to-back copies and SYNs after the SYN-ACK are duplicates.
#[inline(always)]
fn syn_again(entry: Entry, ct: &CtEntry, pkt: &Packet) {
    count(Counter::SynRetransmit);
    let now = conntrack::now();
    if !is_syn_retry(ct.state, now.saturating_sub(ct.created_ns)) {
        count(Counter::SynDuplicate);
        return;
    }
    if entry.set_state(ST_SYN_RETRIED) & ST_SYN_RETRIED != 0 {
        return;
    }
    let first_failure = conntrack::fail_once(entry);
    if let Some(c) = stats::backend(ct.stats_slot) {
        c.syn_retried += 1;
        c.failed += u64::from(first_failure);
    }
    if ct.cohort == COHORT_CANARY && first_failure {
        breaker::failure(&pkt.key.service(), ct.svc_id, now);
    }
}

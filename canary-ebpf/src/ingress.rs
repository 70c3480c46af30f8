//! Client → VIP: steer new flows, DNAT every packet of a flow, and measure
//! the client's side of it.

use canary_common::{
    IPPROTO_TCP,
    counters::Counter,
    flow::{CT_REVERSE, ST_BACKEND_FIN, ST_CLIENT_FIN, ST_REQUEST, ST_SYN_RETRIED},
    service::{COHORT_CANARY, ServiceKey},
};

use crate::{
    breaker,
    conntrack::{self, Entry},
    maps::SERVICES,
    nat::{End, Rewrite},
    packet::{self, TCP_FIN, TCP_RST},
    stats::{self, Action, count},
    steer,
};

/// Runs at TC ingress or XDP: the same logic on either kind of frame.
#[inline(always)]
pub fn handle<F: Rewrite>(ctx: &F) -> Result<Action, Counter> {
    let Some(pkt) = packet::parse_tcp4(ctx)? else {
        return Ok(Action::Ignore);
    };

    // An existing flow keeps its backend, whatever the service says now (or
    // if it is gone: removing a service drains it). A SYN after the client's
    // FIN reuses the 5-tuple for a new connection.
    let tracked = conntrack::lookup(&pkt.key)
        .map(|e| (e, e.read()))
        .filter(|(_, ct)| ct.flags & CT_REVERSE == 0)
        .filter(|(_, ct)| !(pkt.is_syn() && ct.state & ST_CLIENT_FIN != 0));
    let (entry, backend_addr, backend_port, slot): (Option<Entry>, u32, u16, u32) = match tracked {
        Some((entry, ct)) => {
            if pkt.first_fragment {
                return Err(Counter::Fragment);
            }
            if pkt.is_syn() {
                count(Counter::SynRetransmit);
                if entry.set_state(ST_SYN_RETRIED) & ST_SYN_RETRIED == 0 {
                    if let Some(c) = stats::backend(ct.stats_slot) {
                        c.syn_retried += 1;
                    }
                    if ct.cohort == COHORT_CANARY {
                        breaker::failure(
                            pkt.key.dst_addr,
                            pkt.key.dst_port,
                            ct.svc_id,
                            conntrack::now(),
                        );
                    }
                }
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
            let svc_key = ServiceKey {
                vip: pkt.key.dst_addr,
                port: pkt.key.dst_port,
                proto: IPPROTO_TCP,
                _pad: 0,
            };
            let Some(svc) = SERVICES.get_ptr(&svc_key) else {
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
            let choice = steer::choose(svc, &pkt.key, now)?;
            let slot = choice.backend.stats_slot;
            let syn = pkt.is_syn();
            if let Some(c) = stats::backend(slot) {
                if syn {
                    c.connections += 1;
                } else if !pkt.has(TCP_RST) {
                    c.reopened += 1;
                }
            }
            count(if syn {
                Counter::NewFlow
            } else {
                Counter::CtMiss
            });
            if !pkt.has(TCP_RST) {
                conntrack::create(&pkt.key, svc.svc_id, &choice, syn, now);
            }
            (None, choice.backend.addr, choice.backend.port, slot)
        }
    };
    if let Some(c) = stats::backend(slot) {
        c.packets_from_client += 1;
        c.bytes_from_client += u64::from(pkt.payload_len);
        if pkt.has(TCP_RST) {
            c.resets_from_client += 1;
        }
    }

    ctx.rewrite(&pkt, End::Dst, backend_addr, backend_port)?;
    if pkt.has(TCP_RST) {
        if let Some(entry) = entry {
            conntrack::close(entry, true, conntrack::now());
        }
        conntrack::remove(&pkt.key, backend_addr, backend_port);
        count(Counter::RstClosed);
    }
    Ok(Action::Forward)
}

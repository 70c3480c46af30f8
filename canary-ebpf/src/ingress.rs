//! Client → VIP: steer new flows, DNAT every packet of a flow.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    programs::TcContext,
};
use canary_common::{
    IPPROTO_TCP,
    counters::Counter,
    flow::{CT_CLIENT_FIN, CT_REVERSE},
    service::ServiceKey,
};

use crate::{
    conntrack,
    maps::SERVICES,
    nat::{self, End},
    packet::{self, TCP_FIN, TCP_RST},
    stats::count,
    steer,
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(pkt) = packet::parse_tcp4(ctx)? else {
        return Ok(TC_ACT_UNSPEC);
    };
    // An existing flow keeps its backend, whatever the service says now (or
    // if it is gone: removing a service drains it). A SYN after the client's
    // FIN reuses the 5-tuple for a new connection.
    let tracked = conntrack::lookup(&pkt.key)
        .map(|e| (e, conntrack::read(e)))
        .filter(|(_, ct)| ct.flags & CT_REVERSE == 0)
        .filter(|(_, ct)| !(pkt.is_syn() && ct.flags & CT_CLIENT_FIN != 0));
    let (backend_addr, backend_port) = match tracked {
        Some((entry, ct)) => {
            if pkt.first_fragment {
                return Err(Counter::Fragment);
            }
            if pkt.is_syn() {
                count(Counter::SynRetransmit);
            }
            if pkt.has(TCP_FIN) {
                conntrack::mark(entry, CT_CLIENT_FIN);
            }
            (ct.nat_addr, ct.nat_port)
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
                return Ok(TC_ACT_UNSPEC);
            };
            if pkt.first_fragment {
                // The rest of the datagram has no ports and could not follow.
                return Err(Counter::Fragment);
            }
            // SAFETY: `svc` is a live element of SERVICES for this run (the
            // map is not preallocated, so a concurrent update frees the old
            // value only after this program returns).
            let svc = unsafe { &*svc };
            let choice = steer::choose(svc, &pkt.key)?;
            if pkt.is_syn() {
                count(Counter::NewFlow);
            } else {
                count(Counter::CtMiss);
            }
            if !pkt.has(TCP_RST) {
                conntrack::create(&pkt.key, svc.svc_id, &choice);
            }
            (choice.backend.addr, choice.backend.port)
        }
    };

    nat::rewrite(ctx, &pkt, End::Dst, backend_addr, backend_port)?;
    if pkt.has(TCP_RST) {
        conntrack::remove(&pkt.key, backend_addr, backend_port);
        count(Counter::RstClosed);
    }
    Ok(TC_ACT_OK)
}

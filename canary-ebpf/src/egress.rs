//! Backend → client replies: source back to VIP:port.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    programs::TcContext,
};
use canary_common::{
    counters::Counter,
    flow::{CT_BACKEND_FIN, CT_REVERSE, FlowKey},
};

use crate::{
    conntrack,
    nat::{self, End},
    packet::{self, TCP_FIN, TCP_RST},
    stats::count,
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(pkt) = packet::parse_tcp4(ctx)? else {
        return Ok(TC_ACT_UNSPEC);
    };
    let Some(entry) = conntrack::lookup(&pkt.key) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let ct = conntrack::read(entry);
    if ct.flags & CT_REVERSE == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    if pkt.has(TCP_FIN) {
        conntrack::mark(entry, CT_BACKEND_FIN);
    }
    nat::rewrite(ctx, &pkt, End::Src, ct.nat_addr, ct.nat_port)?;
    if pkt.has(TCP_RST) {
        let forward = FlowKey {
            src_addr: pkt.key.dst_addr,
            dst_addr: ct.nat_addr,
            src_port: pkt.key.dst_port,
            dst_port: ct.nat_port,
            proto: pkt.key.proto,
            _pad: [0; 3],
        };
        conntrack::remove(&forward, pkt.key.src_addr, pkt.key.src_port);
        count(Counter::RstClosed);
    }
    Ok(TC_ACT_OK)
}

//! Backend → client replies: source back to VIP:port, and the backend's
//! side of the measurements (handshake and first-byte times, refusals,
//! resets, close). UDP replies are measured in udp.rs, ICMP errors about
//! steered flows rewritten in icmp.rs.

use aya_ebpf::programs::TcContext;
use canary_common::{
    counters::Counter,
    flow::{
        CT_REOPENED, CT_REVERSE, ST_BACKEND_FIN, ST_CLIENT_FIN, ST_HANDSHAKE, ST_REQUEST,
        ST_RESPONSE, ST_RST,
    },
    service::COHORT_CANARY,
};

use crate::{
    breaker, conntrack, icmp,
    nat::{End, Rewrite},
    packet::{self, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{self, Action, Latency, Outcome, count},
    udp,
};

/// The parser, ICMP errors and flows are calls of their own, as in
/// ingress.rs.
#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    let mut pkt = Packet::EMPTY;
    match packet::parse(ctx, &mut pkt) {
        Outcome::Forward => {}
        other => return other,
    }
    if pkt.is_icmp() {
        return icmp::egress(ctx, &pkt);
    }
    flow(ctx, &pkt)
}

/// A TCP segment or UDP datagram `pkt` from a backend.
#[inline(never)]
fn flow(ctx: &TcContext, pkt: &Packet) -> Outcome {
    stats::settle(from_backend(ctx, pkt))
}

#[inline(always)]
fn from_backend(ctx: &TcContext, pkt: &Packet) -> Result<Action, Counter> {
    let Some(rev_entry) = conntrack::lookup(&pkt.key) else {
        // UDP has no unconfirmed flows: any datagram may start one.
        if pkt.is_udp() {
            return Ok(Action::Ignore);
        }
        return unconfirmed(ctx, pkt);
    };
    let rev = rev_entry.read();
    if rev.flags & CT_REVERSE == 0 {
        return Ok(Action::Ignore);
    }
    let mut counters = stats::backend(rev.stats_slot);
    if let Some(c) = counters.as_deref_mut() {
        c.packets_from_backend += 1;
        c.bytes_from_backend += u64::from(pkt.payload_len);
    }

    if pkt.is_udp() {
        udp::reply(pkt, rev_entry, &rev);
        ctx.rewrite(pkt, End::Src, rev.nat_addr, rev.nat_port)?;
        return Ok(Action::Forward);
    }

    // The forward entry holds the flow's state; read it only on the events
    // that need it (the reverse entry mirrors the bits checked per packet).
    let syn_ack = pkt.has(TCP_SYN) && pkt.has(TCP_ACK) && rev.state & ST_HANDSHAKE == 0;
    let response = pkt.payload_len > 0 && rev.state & ST_RESPONSE == 0;
    let closing = rev.state & ST_RST != 0;
    if syn_ack || response || closing || pkt.has(TCP_FIN) || pkt.has(TCP_RST) {
        let fwd_key = conntrack::forward_key(&pkt.key, &rev);
        let fwd = conntrack::lookup(&fwd_key);
        if closing && !pkt.has(TCP_RST) {
            // The backend still talks on a flow a RST closed: it ignored
            // that RST, so the connection lives.
            conntrack::revive(rev_entry, fwd, counters.as_deref_mut());
        }
        let timed = rev.flags & CT_REOPENED == 0;
        if syn_ack && rev_entry.set_state(ST_HANDSHAKE) & ST_HANDSHAKE == 0 {
            if let Some(fwd) = fwd {
                fwd.set_state(ST_HANDSHAKE);
                if timed {
                    let ct = fwd.read();
                    stats::observe(
                        ct.svc_id,
                        ct.cohort,
                        Latency::Handshake,
                        conntrack::now() - ct.created_ns,
                    );
                }
            }
        }
        if response && let Some(fwd) = fwd {
            // First-byte time runs from the client's first payload; bytes a
            // server sends first (a greeting) do not end it.
            let ct = fwd.read();
            if ct.state & ST_REQUEST != 0 && ct.request_ns != 0 {
                if rev_entry.set_state(ST_RESPONSE) & ST_RESPONSE == 0 {
                    if rev.cohort == COHORT_CANARY {
                        breaker::success(rev.svc_id);
                    }
                    if timed {
                        fwd.set_state(ST_RESPONSE);
                        stats::observe(
                            ct.svc_id,
                            ct.cohort,
                            Latency::FirstByte,
                            conntrack::now() - ct.request_ns,
                        );
                    }
                }
            } else if !timed {
                // Re-resolved flows are not timed: stop looking.
                rev_entry.set_state(ST_RESPONSE);
            }
        }
        if pkt.has(TCP_FIN)
            && let Some(fwd) = fwd
            && fwd.set_state(ST_BACKEND_FIN) & ST_CLIENT_FIN != 0
        {
            conntrack::close(fwd, true, conntrack::now());
        }
        if pkt.has(TCP_RST) {
            // Only the flow's first RST counts: the entries stay (marked
            // closing), and RSTs that follow answer packets still in
            // flight.
            let now = conntrack::now();
            let (first, refused) = match fwd {
                Some(fwd) => {
                    let refused = fwd.read().state & ST_HANDSHAKE == 0;
                    let first = conntrack::rst(fwd, Some(rev_entry), !refused, now);
                    (first, refused)
                }
                // The forward half was evicted: nothing to close. The
                // reverse entry mirrors the handshake bit and keeps the
                // once-only mark.
                None => {
                    let first = rev_entry.set_state(ST_RST) & ST_RST == 0;
                    if first {
                        count(Counter::RstClosed);
                    }
                    (first, rev.state & ST_HANDSHAKE == 0)
                }
            };
            if first {
                let first_failure = conntrack::fail_once(fwd.unwrap_or(rev_entry));
                // A RST before the handshake completed refuses the
                // connection.
                if let Some(c) = counters {
                    if refused {
                        c.refused += 1;
                    } else {
                        c.resets_from_backend += 1;
                    }
                    c.failed += u64::from(first_failure);
                }
                // A re-resolved flow was never a canary attempt: its reset
                // is no breaker failure either. A connection that failed
                // before (a SYN retry) is one failure, not two.
                if rev.cohort == COHORT_CANARY && timed && first_failure {
                    breaker::failure(&fwd_key.service(), rev.svc_id, now);
                }
            }
        }
    }
    ctx.rewrite(pkt, End::Src, rev.nat_addr, rev.nat_port)?;
    Ok(Action::Forward)
}

/// A reply with no conntrack entry: if it answers a re-resolved flow
/// waiting in `UNCONFIRMED`, the backend's answer decides that flow (see
/// [`conntrack::confirm`]) and the reply is reverse-NATed like any other;
/// otherwise it is not ours.
#[inline(always)]
fn unconfirmed(ctx: &TcContext, pkt: &Packet) -> Result<Action, Counter> {
    let Some(rev) = conntrack::unconfirmed(&pkt.key) else {
        return Ok(Action::Ignore);
    };
    if rev.flags & CT_REVERSE == 0 {
        return Ok(Action::Ignore);
    }
    let fwd_key = conntrack::forward_key(&pkt.key, &rev);
    let mut counters = stats::backend(rev.stats_slot);
    if let Some(c) = counters.as_deref_mut() {
        c.packets_from_backend += 1;
        c.bytes_from_backend += u64::from(pkt.payload_len);
    }
    conntrack::confirm(&fwd_key, &pkt.key, &rev, pkt.has(TCP_RST), counters);
    ctx.rewrite(pkt, End::Src, rev.nat_addr, rev.nat_port)?;
    Ok(Action::Forward)
}

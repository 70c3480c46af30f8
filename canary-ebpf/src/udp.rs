//! UDP flows: steered on their first datagram (the same `steer::choose`,
//! weights, rules and breaker as a TCP SYN), tracked in `CT_UDP` until idle
//! for their service's `udp_idle_timeout`, timed from the first datagram to
//! the first reply, failed when no reply comes within
//! `udp_response_timeout` (or an ICMP port unreachable does, see icmp.rs);
//! and the sweep that ends idle flows and counts unanswered ones when no
//! packet comes to do it.
//!
//! A flow is "absent" to the programs once it is closed (refused) or idle
//! past its timeout, whether or not the agent's sweep has removed it: its
//! next datagram is a new flow with a fresh choice. Correctness never
//! waits for the sweep.

use canary_common::{
    addr::Addr,
    counters::Counter,
    flow::{
        CT_REVERSE, CT_UNTIMED, CtEntry, FlowKey, ST_CLOSED, ST_DRAIN, ST_REFUSED, ST_RESPONSE,
        ST_TIMED_OUT, UDP_DEFAULT_IDLE_MS, UDP_REFRESH_NS, UdpConfig, sweep, udp_expired,
    },
    service::COHORT_CANARY,
};

use crate::{
    breaker,
    conntrack::{self, Entry},
    maps::{SERVICES, UDP_CONFIG, UDP_TIMEOUTS},
    nat::{End, Rewrite},
    packet::Packet,
    stats::{self, Action, Latency, Outcome, count},
    steer,
};

/// Client → VIP datagram `pkt` (at TC ingress or XDP). A call of its own,
/// like the TCP handler (see ingress.rs).
#[inline(never)]
pub fn ingress<F: Rewrite>(ctx: &F, pkt: &Packet) -> Outcome {
    stats::settle(datagram(ctx, pkt))
}

#[inline(always)]
fn datagram<F: Rewrite>(ctx: &F, pkt: &Packet) -> Result<Action, Counter> {
    let now = conntrack::coarse_now();
    let (backend_addr, backend_port, slot) = match live(&pkt.key, now) {
        Some((entry, ct)) => {
            refuse_unsteerable(pkt)?;
            if now.saturating_sub(ct.request_ns) >= UDP_REFRESH_NS {
                entry.set_request_ns(now);
            }
            if unanswered(&ct) {
                // The client sends again without a reply: the deadline may
                // have passed.
                deadline(entry, &ct, &pkt.key, now);
            }
            (ct.nat_addr, ct.nat_port, ct.stats_slot)
        }
        None => {
            let Some(svc) = SERVICES.get_ptr(&pkt.key.service()) else {
                return Ok(Action::Ignore);
            };
            refuse_unsteerable(pkt)?;
            // SAFETY: `svc` is a live element of SERVICES for this run (the
            // map is not preallocated, so a concurrent update frees the old
            // value only after this program returns).
            let svc = unsafe { &*svc };
            let start = conntrack::now();
            // The first datagram of a flow is a new connection attempt.
            let choice = steer::choose(svc, &pkt.key, start, true)?;
            let slot = choice.backend.stats_slot;
            if let Some(c) = stats::backend(slot) {
                c.connections += 1;
            }
            count(Counter::NewFlow);
            let cfg = match UDP_CONFIG.get_ptr(&svc.svc_id) {
                // SAFETY: a live UDP_CONFIG element for this run, copied.
                Some(c) => unsafe { *c },
                None => UdpConfig {
                    idle_ms: UDP_DEFAULT_IDLE_MS,
                    response_ms: 0,
                },
            };
            conntrack::create_udp(&pkt.key, svc.svc_id, &choice, &cfg, start);
            (choice.backend.addr, choice.backend.port, slot)
        }
    };
    if let Some(c) = stats::backend(slot) {
        c.packets_from_client += 1;
        c.bytes_from_client += u64::from(pkt.payload_len);
    }
    ctx.rewrite(pkt, End::Dst, backend_addr, backend_port)?;
    Ok(Action::Forward)
}

/// A datagram to a VIP that cannot be steered whole: a first fragment
/// (the rest of the datagram has no ports and could not follow), or IPv6
/// with checksum 0 (invalid, RFC 8200; the receiver drops it anyway).
#[inline(always)]
fn refuse_unsteerable(pkt: &Packet) -> Result<(), Counter> {
    if pkt.first_fragment {
        return Err(Counter::Fragment);
    }
    if pkt.is_v6() && pkt.csum_zero {
        return Err(Counter::Udp6ZeroChecksum);
    }
    Ok(())
}

/// The live forward entry of `fwd` (client → VIP), with its fields: not
/// closed and not idle past its timeout in both directions. An entry found
/// idle is ended here (its close counted once, see [`expire`]): the
/// caller then starts a new flow over it.
#[inline(always)]
fn live(fwd: &FlowKey, now: u64) -> Option<(Entry, CtEntry)> {
    let entry = conntrack::lookup(fwd)?;
    let ct = entry.read();
    if ct.flags & CT_REVERSE != 0 || ct.state & ST_CLOSED != 0 {
        return None;
    }
    if !udp_expired(ct.request_ns, now, ct.idle_ms) {
        return Some((entry, ct));
    }
    // Quiet this way; the backend may still be talking.
    let last = last_seen(fwd, &ct);
    if !udp_expired(last, now, ct.idle_ms) {
        return Some((entry, ct));
    }
    if expire(entry, &ct, fwd, last, now) {
        count(Counter::UdpExpired);
    }
    None
}

/// The latest datagram of the flow `fwd` (fields `ct`) either way.
#[inline(always)]
fn last_seen(fwd: &FlowKey, ct: &CtEntry) -> u64 {
    let rev = conntrack::lookup(&conntrack::reverse_key(fwd, ct.nat_addr, ct.nat_port));
    rev.map_or(ct.request_ns, |r| r.last_seen().max(ct.request_ns))
}

/// Whether the flow still waits for its first reply with a deadline.
#[inline(always)]
fn unanswered(ct: &CtEntry) -> bool {
    ct.state & (ST_RESPONSE | ST_TIMED_OUT | ST_REFUSED) == 0 && ct.flags & CT_UNTIMED == 0
}

/// If the response timeout of flow `fwd` (its forward entry `entry`, fields
/// `ct`) has passed at `now` with no reply, counts it once: a timeout
/// (`UDP_TIMEOUTS`), the flow's first failure if it is one, and for canary
/// a breaker failure. True if this call counted it.
// Calls of their own (this and `expire`): rare paths, kept out of the
// frame of every datagram's handler (see ingress.rs).
#[inline(never)]
fn deadline(entry: Entry, ct: &CtEntry, fwd: &FlowKey, now: u64) -> bool {
    let Some(cfg) = UDP_CONFIG.get_ptr(&ct.svc_id) else {
        return false;
    };
    // SAFETY: a live UDP_CONFIG element for this run; one u32 read.
    let response_ms = unsafe { (*cfg).response_ms };
    if response_ms == 0 || now.saturating_sub(ct.created_ns) < u64::from(response_ms) * 1_000_000 {
        return false;
    }
    if entry.set_state(ST_TIMED_OUT) & ST_TIMED_OUT != 0 {
        return false;
    }
    let first_failure = conntrack::fail_once(entry);
    if let Some(t) = UDP_TIMEOUTS.get_ptr_mut(ct.stats_slot) {
        // SAFETY: per-CPU value, only this CPU touches it while the program
        // runs (preemption disabled).
        unsafe {
            (*t).timeouts += 1;
            (*t).failed += u64::from(first_failure);
        }
    }
    if ct.cohort == COHORT_CANARY && first_failure {
        // The precise clock: breaker windows start on it, and a coarse
        // time a tick behind a window's start would look like the end of
        // a window.
        breaker::failure(&fwd.service(), ct.svc_id, conntrack::now());
    }
    true
}

/// Ends the flow `fwd` (forward entry `entry`, fields `ct`) whose last
/// datagram was at `last`: a deadline it passed unanswered is counted
/// first, then its close (open → last datagram), once. True if this call
/// closed it: the caller counts why (`UdpExpired`, `DrainReset`).
#[inline(never)]
fn expire(entry: Entry, ct: &CtEntry, fwd: &FlowKey, last: u64, now: u64) -> bool {
    if unanswered(ct) {
        deadline(entry, ct, fwd, now);
    }
    conntrack::close(entry, true, last)
}

/// Backend → client datagram `pkt` of a flow whose reverse entry is
/// `rev_entry` (fields `rev`): refreshes the entry, and the flow's first
/// reply ends its response time (`canary_first_byte_seconds`), is a
/// breaker success for canary, and (if late) a timeout first.
#[inline(always)]
pub fn reply(pkt: &Packet, rev_entry: Entry, rev: &CtEntry) {
    let now = conntrack::coarse_now();
    if now.saturating_sub(rev.request_ns) >= UDP_REFRESH_NS {
        rev_entry.set_request_ns(now);
    }
    if rev.state & ST_RESPONSE != 0 || rev_entry.set_state(ST_RESPONSE) & ST_RESPONSE != 0 {
        return;
    }
    let fwd_key = conntrack::forward_key(&pkt.key, rev);
    let Some(fwd) = conntrack::lookup(&fwd_key) else {
        return;
    };
    let ct = fwd.read();
    if ct.nat_port != pkt.key.src_port || ct.nat_addr != pkt.key.src_addr {
        // Another flow owns the forward key now (this reply is late).
        return;
    }
    let precise = conntrack::now();
    if unanswered(&ct) {
        deadline(fwd, &ct, &fwd_key, precise);
    }
    if fwd.set_state(ST_RESPONSE) & ST_RESPONSE != 0 {
        return;
    }
    stats::observe(
        ct.svc_id,
        ct.cohort,
        Latency::FirstByte,
        precise.saturating_sub(ct.created_ns),
    );
    if ct.cohort == COHORT_CANARY {
        breaker::success(ct.svc_id);
    }
}

/// The backend of flow `fwd` answered with ICMP port unreachable: the flow
/// is refused (once: `refused`, its first failure, for canary a breaker
/// failure) and closed, so the client's next datagram is a new flow.
#[inline(always)]
pub fn refused(fwd: &FlowKey, backend: Addr, backend_port: u16) {
    let Some(entry) = conntrack::lookup(fwd) else {
        return;
    };
    let ct = entry.read();
    if ct.flags & CT_REVERSE != 0 || ct.nat_addr != backend || ct.nat_port != backend_port {
        return;
    }
    if entry.set_state(ST_REFUSED) & ST_REFUSED != 0 {
        return;
    }
    let now = conntrack::now();
    let first_failure = conntrack::fail_once(entry);
    if let Some(c) = stats::backend(ct.stats_slot) {
        c.refused += 1;
        c.failed += u64::from(first_failure);
    }
    if ct.cohort == COHORT_CANARY && first_failure {
        breaker::failure(&fwd.service(), ct.svc_id, now);
    }
    // A flow that had replies was open: its duration counts.
    conntrack::close(entry, ct.state & ST_RESPONSE != 0, now);
}

/// The sweep of one `CT_UDP` entry, `key`, for the agent (run through
/// `BPF_PROG_TEST_RUN`, so every count is made here, with the programs'
/// atomics and per-CPU counters): counts an unanswered flow's deadline,
/// and removes a flow idle past its timeout or marked for its drain
/// deadline (`ST_DRAIN`) after counting its close;
/// a reverse half is removed when idle and no open flow owns it (one that
/// does is removed with it). Returns `sweep::*` bits.
// A call of its own: the sweep program runs it for each key of a batch.
#[inline(never)]
pub fn sweep(key: &FlowKey) -> u32 {
    let Some(entry) = conntrack::lookup(key) else {
        return 0;
    };
    let now = conntrack::coarse_now();
    let ct = entry.read();
    if ct.flags & CT_REVERSE != 0 {
        if !udp_expired(ct.request_ns, now, ct.idle_ms) {
            return 0;
        }
        // A live forward half that points here ends both halves itself.
        let owner = conntrack::lookup(&conntrack::forward_key(key, &ct)).map(Entry::read);
        let owned = owner.is_some_and(|f| {
            f.nat_addr == key.src_addr && f.nat_port == key.src_port && f.state & ST_CLOSED == 0
        });
        if owned {
            return 0;
        }
        conntrack::remove(key);
        return sweep::EXPIRED;
    }
    let mut done = 0;
    if unanswered(&ct) && deadline(entry, &ct, key, now) {
        done |= sweep::TIMED_OUT;
    }
    let last = last_seen(key, &ct);
    // The agent marks a rolled-back service's canary flows once their
    // drain deadline has passed: they end now, and the client's next
    // datagram is a new flow (steered by the weight in force: stable).
    let drained = ct.state & ST_DRAIN != 0;
    if drained || udp_expired(last, now, ct.idle_ms) {
        if expire(entry, &ct, key, last, now) {
            count(if drained {
                Counter::DrainReset
            } else {
                Counter::UdpExpired
            });
        }
        conntrack::remove(key);
        conntrack::remove(&conntrack::reverse_key(key, ct.nat_addr, ct.nat_port));
        done |= sweep::EXPIRED;
    }
    done
}

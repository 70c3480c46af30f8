//! Flow state: creation on the first packet, atomic state bits, and the
//! once-per-flow close.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_ktime_get_ns, generated::bpf_ktime_get_coarse_ns},
    maps::LruHashMap,
};
use canary_common::{
    IPPROTO_UDP,
    addr::Addr,
    counters::Counter,
    flow::{
        CT_REOPENED, CT_REVERSE, CT_UNTIMED, CtEntry, FlowKey, ST_CLOSED, ST_FAILED, ST_HANDSHAKE,
        ST_REVIVED, ST_RST, ST_RST_CLOSE, UdpConfig, pending,
    },
    stats::BackendCounters,
};

use crate::{
    maps::{CONNTRACK, CT_UDP, PENDING, UNCONFIRMED},
    stats::{self, Latency, count},
    steer::Choice,
};

/// A tracked entry: a live element of `CONNTRACK` or `CT_UDP` for this
/// program run.
#[derive(Clone, Copy)]
pub struct Entry(*mut CtEntry);

/// Marks the connection of `entry` failed; true if this is its first
/// failure, the one that counts (`failed`, the breaker).
#[inline(always)]
pub fn fail_once(entry: Entry) -> bool {
    entry.set_state(ST_FAILED) & ST_FAILED == 0
}

impl Entry {
    /// A copy of the entry's fields.
    #[inline(always)]
    pub fn read(self) -> CtEntry {
        // SAFETY: a live element from this run's lookup (the LRU map frees
        // elements only after an RCU grace period).
        unsafe { *self.0 }
    }

    /// Atomically sets `bits` in the state; returns the state before.
    #[inline(always)]
    pub fn set_state(self, bits: u64) -> u64 {
        // SAFETY: as in `read`; `state` is an 8-aligned u64 of the value and
        // every writer on every CPU uses atomics on it.
        unsafe { crate::atomic::or(core::ptr::addr_of_mut!((*self.0).state), bits) }
    }

    /// Atomically clears `bits` in the state; returns the state before.
    #[inline(always)]
    pub fn clear_state(self, bits: u64) -> u64 {
        // SAFETY: as in `set_state`.
        unsafe { crate::atomic::and(core::ptr::addr_of_mut!((*self.0).state), !bits) }
    }

    /// Records the time of the first client payload (TCP) or of the
    /// latest datagram (UDP, see `UDP_REFRESH_NS`).
    #[inline(always)]
    pub fn set_request_ns(self, ns: u64) {
        // SAFETY: as in `read`. TCP: only the ingress program writes this
        // field, once per flow (guarded by the ST_REQUEST bit). UDP: each
        // direction's program refreshes its own entry's last-seen time;
        // racing stores of two nearby times leave one of them, either fine.
        unsafe { (*self.0).request_ns = ns };
    }

    /// UDP: when a datagram of the entry's direction was last seen.
    #[inline(always)]
    pub fn last_seen(self) -> u64 {
        // SAFETY: as in `read`; one aligned u64 field.
        unsafe { (*self.0).request_ns }
    }
}

/// The conntrack table of a protocol: UDP flows have their own, so they
/// never evict TCP connections.
#[inline(always)]
fn table(proto: u8) -> &'static LruHashMap<FlowKey, CtEntry> {
    if proto == IPPROTO_UDP {
        &CT_UDP
    } else {
        &CONNTRACK
    }
}

/// The flow state for `key`, if tracked (in its protocol's table).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Entry> {
    table(key.proto).get_ptr_mut(key).map(Entry)
}

/// Removes the entry of `key` from its protocol's table.
#[inline(always)]
pub fn remove(key: &FlowKey) {
    let _ = table(key.proto).remove(key);
}

/// `bpf_ktime_get_ns`. Called only where a timestamp is used, never once per
/// packet: in a VM a clock read is a sizeable part of an established
/// packet's cost (see BENCHMARKS.md).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// `bpf_ktime_get_coarse_ns`: the same clock as [`now`] (`CLOCK_MONOTONIC`)
/// at tick resolution (a few ms), read without touching the clock source.
/// The UDP path reads it once per datagram for idle timeouts, which are
/// seconds long.
#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The reverse (reply) key of forward flow `fwd` served by `addr:port`.
#[inline(always)]
pub fn reverse_key(fwd: &FlowKey, backend_addr: Addr, backend_port: u16) -> FlowKey {
    FlowKey {
        src_addr: backend_addr,
        dst_addr: fwd.src_addr,
        src_port: backend_port,
        dst_port: fwd.src_port,
        proto: fwd.proto,
        family: fwd.family,
        _pad: 0,
    }
}

/// The forward (client → VIP) key of the flow a reply (`reply`, backend →
/// client) belongs to: the client from the reply's destination, the VIP
/// the reverse entry recorded.
#[inline(always)]
pub fn forward_key(reply: &FlowKey, rev: &CtEntry) -> FlowKey {
    FlowKey {
        src_addr: reply.dst_addr,
        dst_addr: rev.nat_addr,
        src_port: reply.dst_port,
        dst_port: rev.nat_port,
        proto: reply.proto,
        family: reply.family,
        _pad: 0,
    }
}

/// Inserts both fresh halves of flow `fwd` (client → VIP) steered by
/// `choice` into `map`, with `flags` (besides `CT_REVERSE`), and for UDP
/// the idle timeout `idle_ms` and last-seen time `request_ns` (0 for
/// TCP); a failure is counted. One entry value is built and turned into the other, so the
/// stack holds one 56-byte value, not two.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one entry's fields, spelled out")]
fn insert_flow(
    map: &LruHashMap<FlowKey, CtEntry>,
    fwd: &FlowKey,
    svc_id: u32,
    choice: &Choice,
    flags: u8,
    idle_ms: u32,
    now: u64,
    request_ns: u64,
) {
    let mut entry = CtEntry {
        nat_addr: choice.backend.addr,
        nat_port: choice.backend.port,
        cohort: choice.cohort,
        flags,
        svc_id,
        stats_slot: choice.backend.stats_slot,
        idle_ms,
        created_ns: now,
        request_ns,
        state: 0,
    };
    if map.insert(fwd, &entry, BPF_ANY as u64).is_err() {
        count(Counter::CtInsertFailed);
        return;
    }
    let rev = reverse_key(fwd, choice.backend.addr, choice.backend.port);
    entry.nat_addr = fwd.dst_addr;
    entry.nat_port = fwd.dst_port;
    entry.flags = flags | CT_REVERSE;
    if map.insert(&rev, &entry, BPF_ANY as u64).is_err() {
        count(Counter::CtInsertFailed);
    }
}

/// Inserts both halves of a flow into `map`; a failure is counted.
#[inline(always)]
fn insert_pair(
    map: &LruHashMap<FlowKey, CtEntry>,
    fwd: &FlowKey,
    forward: &CtEntry,
    rev: &FlowKey,
    reverse: &CtEntry,
) {
    if map.insert(fwd, forward, BPF_ANY as u64).is_err()
        || map.insert(rev, reverse, BPF_ANY as u64).is_err()
    {
        count(Counter::CtInsertFailed);
    }
}

/// Records a new flow `fwd` (client → VIP, opened by a SYN) steered by
/// `choice`: the forward entry, the reverse one for replies, and the SYN
/// in the `PENDING` ring for the handshake-timeout sweep. A failed insert
/// is counted; the flow still works because every later packet
/// re-resolves the same way.
// A call of its own: with 16-byte addresses the entries built here do
// not fit the caller's 512-byte stack frame beside everything else.
#[inline(never)]
pub fn create(fwd: &FlowKey, svc_id: u32, choice: &Choice, now: u64) {
    insert_flow(&CONNTRACK, fwd, svc_id, choice, 0, 0, now, 0);
    record_syn(fwd, choice.backend.stats_slot, now);
}

/// Appends the SYN of new flow `fwd` to the `PENDING` ring: takes the next
/// number from the head, then writes the record at its place, `seq` last
/// (a sweep that sees the number sees the rest; one that does not reads
/// it next time). Two array look-ups and a fetch-add, where a hash insert
/// took a quarter of a new flow's cost.
#[inline(always)]
fn record_syn(fwd: &FlowKey, stats_slot: u32, now: u64) {
    let Some(head) = PENDING.get_ptr_mut(pending::HEAD) else {
        return;
    };
    // SAFETY: a live element of the array (never freed); `seq` is an
    // 8-aligned u64 every program updates with atomics (the agent only
    // reads it).
    let seq = unsafe { crate::atomic::fetch_add(core::ptr::addr_of_mut!((*head).seq), 1) };
    let Some(rec) = PENDING.get_ptr_mut(pending::index(seq)) else {
        return;
    };
    // SAFETY: a live element of the array. Another CPU writes the same
    // element only a whole ring (`PENDING_CAPACITY` SYNs) later; volatile
    // stores keep `seq` after the fields it vouches for.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*rec).key), *fwd);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*rec).syn_ns), now);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*rec).stats_slot), stats_slot);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*rec).seq), seq + 1);
    }
}

/// Records a flow re-resolved after a conntrack miss (a non-SYN packet) in
/// `UNCONFIRMED` only: nothing enters `CONNTRACK`, and nothing is counted
/// as a connection, until the backend answers.
// A call of its own: with 16-byte addresses the entries built here do
// not fit the caller's 512-byte stack frame beside everything else.
#[inline(never)]
pub fn create_unconfirmed(fwd: &FlowKey, svc_id: u32, choice: &Choice, now: u64) {
    insert_flow(&UNCONFIRMED, fwd, svc_id, choice, CT_REOPENED, 0, now, 0);
}

/// Records a new UDP flow `fwd` (client → VIP, its first datagram at
/// `now`) steered by `choice` in `CT_UDP`, both halves, with its service's
/// timeouts `cfg`; either half replaces what was there (an expired or
/// refused flow of the same 5-tuple). A failed insert is counted; the
/// datagrams still go where the flow re-resolves.
// A call of its own, as `create` (and at most five arguments: BPF calls
// pass no more in registers).
#[inline(never)]
pub fn create_udp(fwd: &FlowKey, svc_id: u32, choice: &Choice, cfg: &UdpConfig, now: u64) {
    // A service without a response timeout (one-way) never fails for
    // want of a reply.
    let flags = if cfg.response_ms == 0 { CT_UNTIMED } else { 0 };
    insert_flow(&CT_UDP, fwd, svc_id, choice, flags, cfg.idle_ms, now, now);
}

/// The unconfirmed entry for `key` (either direction), copied.
#[inline(always)]
pub fn unconfirmed(key: &FlowKey) -> Option<CtEntry> {
    // SAFETY: a live element for this run (LRU elements are freed only
    // after an RCU grace period); copied out at once.
    UNCONFIRMED.get_ptr(key).map(|e| unsafe { *e })
}

/// The backend answered the unconfirmed flow whose reverse key is `rev`
/// (`reverse` its entry, `fwd` its forward key) with `rst` or not. A RST
/// ends it: the backend had no such connection. Anything else proves the
/// connection: the flow moves into `CONNTRACK`, past its handshake (a later
/// RST is a reset, not a refusal), and counts as reopened, once (the CPU
/// that removes the reverse entry).
#[inline(always)]
pub fn confirm(
    fwd: &FlowKey,
    rev: &FlowKey,
    reverse: &CtEntry,
    rst: bool,
    counters: Option<&mut BackendCounters>,
) {
    // The reverse entry decides which CPU acts on the answer.
    if UNCONFIRMED.remove(rev).is_err() {
        return;
    }
    if rst {
        let _ = UNCONFIRMED.remove(fwd);
        count(Counter::ReopenReset);
        return;
    }
    let reverse = CtEntry {
        state: ST_HANDSHAKE,
        ..*reverse
    };
    let forward = CtEntry {
        nat_addr: rev.src_addr,
        nat_port: rev.src_port,
        flags: reverse.flags & !CT_REVERSE,
        ..reverse
    };
    insert_pair(&CONNTRACK, fwd, &forward, rev, &reverse);
    // Removed only now: a client packet in between still finds the flow's
    // backend here rather than re-resolving it.
    let _ = UNCONFIRMED.remove(fwd);
    if let Some(c) = counters {
        c.reopened += 1;
    }
    count(Counter::ReopenConfirmed);
}

/// Counts the close of the flow whose forward entry is `fwd`, once: the
/// first caller to set ST_CLOSED wins (true). `duration` records open →
/// close (not for refused connections, which never opened).
#[inline(always)]
pub fn close(fwd: Entry, duration: bool, now: u64) -> bool {
    if fwd.set_state(ST_CLOSED) & ST_CLOSED != 0 {
        return false;
    }
    let ct = fwd.read();
    if let Some(c) = stats::backend(ct.stats_slot) {
        c.closed += 1;
    }
    if duration && ct.flags & CT_REOPENED == 0 && ct.state & ST_REVIVED == 0 {
        stats::observe(
            ct.svc_id,
            ct.cohort,
            Latency::Duration,
            // The coarse clock of a UDP flow's last datagram may lag its
            // precise start by a tick.
            now.saturating_sub(ct.created_ns) / 1000,
        );
    }
    true
}

/// A RST on the flow whose forward entry is `fwd` and reverse entry `rev`
/// (if still there): the first RST marks both entries closing and counts
/// the close (true); later ones change nothing (false). The entries stay,
/// so a RST the endpoints ignore breaks nothing: see [`revive`].
#[inline(always)]
pub fn rst(fwd: Entry, rev: Option<Entry>, duration: bool, now: u64) -> bool {
    if fwd.set_state(ST_RST) & ST_RST != 0 {
        return false;
    }
    if close(fwd, duration, now) {
        fwd.set_state(ST_RST_CLOSE);
    }
    // Marked last: egress revives a flow by the reverse entry's bit.
    if let Some(rev) = rev {
        rev.set_state(ST_RST);
    }
    // ST_RST also tells the sweep the handshake ended (refused or
    // reset): not a timeout.
    count(Counter::RstClosed);
    true
}

/// The backend sent a non-RST packet on a flow marked closing, whose
/// reverse entry is `rev`: the RST was ignored (out of window, RFC 5961)
/// and the connection lives. Clears the mark once (the CPU that clears the
/// reverse entry's bit). If the RST was what closed the flow, the close is
/// taken back, so the flow counts as active again (through `reopened`), and
/// `rst_ignored` counts it; a RST after both FINs or a handshake timeout
/// closed nothing and takes nothing back.
#[inline(always)]
pub fn revive(rev: Entry, fwd: Option<Entry>, counters: Option<&mut BackendCounters>) {
    if rev.clear_state(ST_RST) & ST_RST == 0 {
        return;
    }
    let Some(fwd) = fwd else {
        return;
    };
    if fwd.clear_state(ST_RST | ST_RST_CLOSE) & ST_RST_CLOSE != 0 {
        // Revived before un-closed, so a close racing in records no
        // second duration.
        fwd.set_state(ST_REVIVED);
        fwd.clear_state(ST_CLOSED);
        if let Some(c) = counters {
            c.reopened += 1;
        }
        count(Counter::RstIgnored);
    }
}

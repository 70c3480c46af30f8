//! Connection tracking: for every steered flow, a forward entry (client →
//! VIP, says which backend) and a reverse entry (backend → client, says
//! which VIP to restore on replies). TCP flows live in `CONNTRACK`, UDP
//! flows in `CT_UDP`: two LRU tables, so a burst of short UDP flows (a DNS
//! storm) can only evict other UDP flows, never a TCP connection.

use crate::{addr::Addr, service::ServiceKey};

/// A 5-tuple as seen in one direction, either family. Addresses and ports
/// are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key of the same flow seen in the other direction.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            family: self.family,
            _pad: 0,
        }
    }

    /// The `SERVICES` key a forward flow (client → VIP) addresses.
    #[inline(always)]
    #[must_use]
    pub const fn service(&self) -> ServiceKey {
        ServiceKey {
            vip: self.dst_addr,
            port: self.dst_port,
            proto: self.proto,
            family: self.family,
        }
    }
}

/// Default conntrack capacity in entries (two per flow). The agent's
/// `conntrack_capacity` setting overrides it at load time.
pub const CT_DEFAULT_CAPACITY: u32 = 262_144;

/// Default capacity of the UDP conntrack (`CT_UDP`), in entries (two per
/// flow): 32 768 UDP flows idle for less than their service's
/// `udp_idle_timeout`. The agent's `udp_conntrack_capacity` overrides it.
pub const CT_UDP_DEFAULT_CAPACITY: u32 = 65_536;

/// Static entry flag: the entry is the reverse (reply) half of a flow.
pub const CT_REVERSE: u8 = 1 << 0;
/// Static entry flag: the flow was re-resolved after a conntrack miss, so
/// its timestamps do not start at a SYN and its timings are not recorded;
/// it was never a connection attempt, so nothing it does is a refusal or a
/// breaker failure.
pub const CT_REOPENED: u8 = 1 << 1;
/// Static entry flag, UDP: the flow's service had no response timeout
/// when the flow began (a one-way service): its first reply is timed, but
/// no reply is no failure.
pub const CT_UNTIMED: u8 = 1 << 2;

/// `state` bits, set with atomic ORs (cleared with atomic ANDs only when an
/// ignored RST revives a flow). The forward entry holds the
/// flow's state; the reverse entry mirrors the bits egress checks on every
/// packet, so egress reads the forward entry only when one changes.
///
/// The client sent a FIN: a later SYN on the same 5-tuple is a new
/// connection, not a retransmission.
pub const ST_CLIENT_FIN: u64 = 1 << 0;
/// The backend sent a FIN.
pub const ST_BACKEND_FIN: u64 = 1 << 1;
/// The close was counted (exactly once per flow).
pub const ST_CLOSED: u64 = 1 << 2;
/// The backend's SYN-ACK was seen and the handshake time recorded.
pub const ST_HANDSHAKE: u64 = 1 << 3;
/// The client sent payload; `request_ns` is set.
pub const ST_REQUEST: u64 = 1 << 4;
/// The first backend payload after a request was seen and timed.
pub const ST_RESPONSE: u64 = 1 << 5;
/// The SYN was retransmitted (counted once per connection).
pub const ST_SYN_RETRIED: u64 = 1 << 6;
/// A RST was seen and nothing has shown it ignored yet: the flow is
/// closing. Set in both entries (egress checks the reverse one per packet).
/// The entries stay, so packets that follow still reach the flow's backend;
/// a non-RST packet from the backend clears the bit (the RST was ignored,
/// RFC 5961), and a SYN on the 5-tuple starts a new connection, as after a
/// FIN.
pub const ST_RST: u64 = 1 << 7;
/// Forward entry: the close was counted at a RST (not at FINs or a
/// handshake timeout), so a RST shown ignored takes it back.
pub const ST_RST_CLOSE: u64 = 1 << 8;
/// Forward entry: the flow outlived an ignored RST. Its duration was
/// recorded at that RST; its real close records none (one sample per
/// connection).
pub const ST_REVIVED: u64 = 1 << 9;
/// Forward entry (the reverse one when the forward half was evicted): the
/// connection's first failure was counted (`BackendCounters::failed`, the
/// breaker). A connection fails once, whatever else goes wrong with it.
pub const ST_FAILED: u64 = 1 << 10;

/// UDP forward entry: the service's `udp_response_timeout` passed with no
/// reply from the backend; counted once (`UDP_TIMEOUTS`), by whoever saw
/// it first: the client's next datagram, a late reply, or the agent's sweep.
pub const ST_TIMED_OUT: u64 = 1 << 11;
/// UDP forward entry: the backend answered with an ICMP port unreachable;
/// counted once as refused. The flow is closed with it, so the client's
/// next datagram on the 5-tuple is a new flow (steered afresh).
pub const ST_REFUSED: u64 = 1 << 12;
/// Forward entry, set by the agent: the flow's drain deadline after a
/// rollback has passed. TCP: the client's next segment is turned into a
/// RST to the backend. UDP: the sweep ends the flow.
pub const ST_DRAIN: u64 = 1 << 13;

/// Refresh granularity of a UDP entry's last-seen time: a packet rewrites
/// it only when it is at least this old, so a busy flow does not write
/// its entry (a cache line other CPUs read) on every datagram. Idle
/// timeouts are therefore this coarse.
pub const UDP_REFRESH_NS: u64 = 1_000_000_000;

/// Whether a UDP entry last seen at `last_seen_ns` counts as absent at
/// `now_ns` with an idle timeout of `idle_ms`: older than the timeout. An
/// expired flow's next datagram starts a new flow (a fresh cohort choice),
/// whether or not the agent's sweep has removed the entry yet.
#[inline(always)]
pub const fn udp_expired(last_seen_ns: u64, now_ns: u64, idle_ms: u32) -> bool {
    now_ns.saturating_sub(last_seen_ns) >= idle_ms as u64 * 1_000_000
}

/// A SYN for a tracked flow that comes sooner than this after the flow's
/// first SYN is a duplicate (a copy in the network, a spoofer), not a
/// retransmission. Linux retries a SYN after its initial RTO of 1 s
/// (`TCP_TIMEOUT_INIT`, as RFC 6298 recommends), and its smallest RTO of
/// any kind is `TCP_RTO_MIN`, 200 ms; this is that floor, five times below
/// the usual first retry. A stack tuned to retry sooner (a route's
/// `rto_min`, a sockops `TIMEOUT_INIT`) has its early retries counted as
/// duplicates: retries can be undercounted, never invented.
pub const SYN_RETRY_MIN_NS: u64 = 200_000_000;

/// Whether a SYN seen `since_first_ns` after its flow's first SYN, on a
/// flow in `state`, is a retransmission that says the backend did not
/// answer: no SYN-ACK was seen and a real retransmission timer could have
/// fired. Anything else is a duplicate and never a backend failure.
#[inline(always)]
pub const fn is_syn_retry(state: u64, since_first_ns: u64) -> bool {
    state & ST_HANDSHAKE == 0 && since_first_ns >= SYN_RETRY_MIN_NS
}

/// Conntrack value, TCP (`CONNTRACK`) and UDP (`CT_UDP`) alike.
///
/// Forward entry (key: client → VIP): `nat_addr:nat_port` is the backend.
/// Reverse entry (key: backend → client): `nat_addr:nat_port` is the VIP.
///
/// A UDP flow has no handshake: its first datagram is its request, so
/// `created_ns` is the request time, and `request_ns` is the last time a
/// datagram of the entry's direction was seen (see [`UDP_REFRESH_NS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// Network byte order.
    pub nat_addr: Addr,
    /// Network byte order.
    pub nat_port: u16,
    /// [`crate::service::COHORT_STABLE`] or [`crate::service::COHORT_CANARY`].
    pub cohort: u8,
    /// `CT_*` bits, fixed at creation.
    pub flags: u8,
    /// The service the flow was steered for.
    pub svc_id: u32,
    /// The backend's `STATS` slot.
    pub stats_slot: u32,
    /// UDP: the service's `udp_idle_timeout` in milliseconds when the flow
    /// began (a reload changes it for new flows only). TCP: 0.
    pub idle_ms: u32,
    /// `bpf_ktime_get_ns` at the flow's first SYN (or at re-resolution);
    /// a later SYN is a retry only [`SYN_RETRY_MIN_NS`] after it. UDP: at
    /// the flow's first datagram.
    pub created_ns: u64,
    /// TCP: `bpf_ktime_get_ns` of the first client payload (forward
    /// entry). UDP: when a datagram of this entry's direction was last
    /// seen (`bpf_ktime_get_coarse_ns`, refreshed every
    /// [`UDP_REFRESH_NS`]).
    pub request_ns: u64,
    /// `ST_*` bits (a 64-bit word: see the eBPF crate's atomic.rs).
    pub state: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 56);

/// `PENDING` element: one SYN of a new flow, in a ring of the latest
/// [`PENDING_CAPACITY`] SYNs. The programs append (one array write, no
/// hash insert, nothing removed at the SYN-ACK or a RST); the agent's
/// sweep reads the ring behind them and asks `CONNTRACK` whether each
/// handshake older than the timeout completed (see [`pending`]).
///
/// Element 0 is the ring's head: its `seq` counts the SYNs recorded so far
/// (the programs fetch-add it); the other fields stay zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SynRecord {
    /// The SYN's number plus one (0: never written), written last: a
    /// record whose `seq` is not the one expected at its place is not
    /// written yet (lower) or already overwritten (higher).
    pub seq: u64,
    /// The forward key (client → VIP).
    pub key: FlowKey,
    /// `bpf_ktime_get_ns` of the SYN (`CLOCK_MONOTONIC`): the forward
    /// entry's `created_ns`, which tells a later connection of the same
    /// 5-tuple apart.
    pub syn_ns: u64,
    /// The backend's `STATS` slot.
    pub stats_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SynRecord>() == 64);

/// Records in the `PENDING` ring (a power of two; the array has one more
/// element, the head). The ring must hold every SYN of a
/// `handshake_timeout` plus a sweep interval: 131 072 is 32 000 new
/// connections a second with the default 3 s. Beyond that the oldest
/// records are overwritten before the sweep reads them and their timeouts
/// are not counted (the sweep counts them as dropped). 8 MiB.
pub const PENDING_CAPACITY: u32 = 131_072;
const _: () = assert!(PENDING_CAPACITY.is_power_of_two());

/// The `PENDING` ring: where a record goes and what the sweep makes of it.
pub mod pending {
    use super::{
        CtEntry, PENDING_CAPACITY, ST_CLOSED, ST_FAILED, ST_HANDSHAKE, ST_REVIVED, ST_RST,
        SynRecord,
    };

    /// The array index of the head element.
    pub const HEAD: u32 = 0;

    /// The array index of SYN number `seq` (0-based).
    #[inline(always)]
    #[must_use]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "masked below PENDING_CAPACITY, a u32"
    )]
    pub const fn index(seq: u64) -> u32 {
        1 + (seq & (PENDING_CAPACITY as u64 - 1)) as u32
    }

    /// What the sweep finds at the place of SYN number `seq`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Slot {
        /// Not written yet (a program took the number and is writing it):
        /// stop here, read it next time.
        Unwritten,
        /// Overwritten by a SYN `CAPACITY` or more later: lost unseen.
        Overwritten,
        /// SYN younger than the timeout: stop here, read it next time.
        Young,
        /// Old enough: check its flow.
        Due,
    }

    /// Classifies `rec`, read at the place of SYN number `seq`, at `now`
    /// with handshake timeout `limit_ns`.
    #[must_use]
    pub fn classify(rec: &SynRecord, seq: u64, now: u64, limit_ns: u64) -> Slot {
        let want = seq + 1;
        if rec.seq < want {
            Slot::Unwritten
        } else if rec.seq > want {
            Slot::Overwritten
        } else if now.saturating_sub(rec.syn_ns) < limit_ns {
            Slot::Young
        } else {
            Slot::Due
        }
    }

    /// Where a sweep starts reading: where the last one stopped (`last`),
    /// or a whole ring back from `head` for an agent that has not swept
    /// yet; never more than a ring back (older records are overwritten).
    /// Also returns how many SYNs were skipped as overwritten.
    #[must_use]
    pub fn start(last: Option<u64>, head: u64) -> (u64, u64) {
        let oldest = head.saturating_sub(u64::from(PENDING_CAPACITY));
        match last {
            Some(last) if last >= oldest => (last, 0),
            Some(last) => (oldest, oldest - last),
            None => (oldest, 0),
        }
    }

    /// Whether the handshake of the due record `rec` timed out, given its
    /// flow's forward entry `fwd`: `Some(first_failure)` if so. It did if
    /// the entry is still that connection's (`created_ns` is the SYN's
    /// time; a later connection of the 5-tuple has its own record) and
    /// nothing ended the handshake: no SYN-ACK (`ST_HANDSHAKE`), no RST
    /// (`ST_RST`, or `ST_REVIVED` once an ignored RST was taken back), no
    /// close (`ST_CLOSED`: also what a sweep sets, so a record read twice,
    /// by a restarted agent, counts once). A connection already failed
    /// (SYN retried) counts its timeout, not a second failure.
    #[must_use]
    pub fn timed_out(rec: &SynRecord, fwd: Option<&CtEntry>) -> Option<bool> {
        let fwd = fwd?;
        let ended = ST_HANDSHAKE | ST_RST | ST_REVIVED | ST_CLOSED;
        (fwd.created_ns == rec.syn_ns && fwd.state & ended == 0)
            .then_some(fwd.state & ST_FAILED == 0)
    }
}

/// Capacity of `UNCONFIRMED`, in entries (two per flow): flows re-resolved
/// after a conntrack miss whose backend has not answered yet. Non-SYN
/// packets with no conntrack entry only ever create entries here, so a
/// flood of them (bare ACKs from fresh ports) churns this table and never
/// evicts a tracked flow from `CONNTRACK`. Under such a flood a genuine
/// re-resolved flow whose entry is pushed out before its backend answers is
/// re-resolved again by its next packet.
pub const UNCONFIRMED_CAPACITY: u32 = 8_192;

/// `UDP_CONFIG` value, per service id of a UDP service: the timeouts the
/// programs apply to its flows. Written by the agent with the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpConfig {
    /// A flow idle this long is over; its next datagram is a new flow.
    pub idle_ms: u32,
    /// A flow whose backend has not replied this long after its first
    /// datagram failed (`reason="timeout"`); 0 = never (one-way services).
    pub response_ms: u32,
}
const _: () = assert!(core::mem::size_of::<UdpConfig>() == 8);

/// The UDP idle timeout of flows whose service has no `UDP_CONFIG` entry
/// (never the case for a configured service): 30 s, as Linux's
/// `nf_conntrack_udp_timeout`.
pub const UDP_DEFAULT_IDLE_MS: u32 = 30_000;

/// The UDP sweep program (`canary_udp_sweep`), run by the agent through
/// `BPF_PROG_TEST_RUN` on a frame carrying up to [`sweep::BATCH`] forward
/// or reverse `FlowKey`s after an Ethernet header: what it did with one
/// key ([`sweep::EXPIRED`], ...), and the return value of a run
/// ([`sweep::result`], [`sweep::counts`]).
pub mod sweep {
    /// The flow was idle past its timeout or marked for its drain
    /// deadline: its close was counted (once) and its entries removed (or
    /// an orphaned reverse half was removed).
    pub const EXPIRED: u32 = 1 << 0;
    /// The flow's response timeout passed with no reply: counted now.
    pub const TIMED_OUT: u32 = 1 << 1;
    /// Offset of the first `FlowKey` in the frame: right after an Ethernet
    /// header, which `BPF_PROG_TEST_RUN` requires. The others follow.
    pub const KEY_OFFSET: usize = 14;
    /// Most keys in one frame.
    pub const BATCH: usize = 32;

    /// A run's return value: how many keys it expired and timed out.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_wrap,
        reason = "both counts are at most BATCH, far below 2^15"
    )]
    pub const fn result(expired: u32, timed_out: u32) -> i32 {
        (expired | (timed_out << 16)) as i32
    }

    /// (expired, timed out) from a run's return value.
    #[inline(always)]
    #[expect(clippy::cast_sign_loss, reason = "result() makes no negative value")]
    pub const fn counts(ret: i32) -> (u32, u32) {
        let ret = ret as u32;
        (ret & 0xffff, ret >> 16)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), two u32, no padding.
    unsafe impl aya::Pod for super::UdpConfig {}
    // SAFETY: repr(C), no padding (explicit `_pad`), every bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), no implicit padding (sizes asserted), integers only.
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: repr(C), explicit padding (size asserted), integers only.
    unsafe impl aya::Pod for super::SynRecord {}
}

#[cfg(test)]
mod tests {
    use super::{
        CtEntry, FlowKey, PENDING_CAPACITY, ST_CLOSED, ST_FAILED, ST_HANDSHAKE, ST_REVIVED, ST_RST,
        ST_SYN_RETRIED, SYN_RETRY_MIN_NS, SynRecord, is_syn_retry, pending, sweep,
    };

    #[test]
    fn pending_ring_places_skip_the_head_and_wrap() {
        let cap = u64::from(PENDING_CAPACITY);
        assert_eq!(pending::index(0), 1);
        assert_eq!(pending::index(cap - 1), PENDING_CAPACITY);
        assert_eq!(
            pending::index(cap),
            1,
            "SYN number CAPACITY reuses the first place"
        );
    }

    #[test]
    fn pending_sweep_tells_unwritten_overwritten_young_and_due_apart() {
        let rec = |seq, syn_ns| SynRecord {
            seq,
            syn_ns,
            ..SynRecord::default()
        };
        let cap = u64::from(PENDING_CAPACITY);
        let (now, limit) = (10_000, 3_000);
        assert_eq!(
            pending::classify(&rec(0, 0), 0, now, limit),
            pending::Slot::Unwritten
        );
        assert_eq!(
            pending::classify(&rec(5, 0), 5 + cap, now, limit),
            pending::Slot::Unwritten
        );
        assert_eq!(
            pending::classify(&rec(6 + cap, 0), 5, now, limit),
            pending::Slot::Overwritten
        );
        assert_eq!(
            pending::classify(&rec(6, 8_000), 5, now, limit),
            pending::Slot::Young
        );
        assert_eq!(
            pending::classify(&rec(6, 7_000), 5, now, limit),
            pending::Slot::Due
        );
    }

    #[test]
    fn pending_sweep_starts_where_it_stopped_or_a_ring_back() {
        let cap = u64::from(PENDING_CAPACITY);
        assert_eq!(pending::start(None, 10), (0, 0));
        assert_eq!(
            pending::start(None, cap + 10),
            (10, 0),
            "a new agent starts a ring back"
        );
        assert_eq!(pending::start(Some(7), cap + 5), (7, 0));
        assert_eq!(
            pending::start(Some(7), cap + 10),
            (10, 3),
            "three overwritten unread"
        );
    }

    #[test]
    fn only_a_handshake_nothing_ended_times_out_once() {
        let rec = SynRecord {
            seq: 1,
            key: FlowKey::default(),
            syn_ns: 42,
            ..SynRecord::default()
        };
        let ct = |created_ns, state| CtEntry {
            created_ns,
            state,
            ..CtEntry::default()
        };
        assert_eq!(
            pending::timed_out(&rec, None),
            None,
            "no entry: nothing to mark"
        );
        assert_eq!(pending::timed_out(&rec, Some(&ct(42, 0))), Some(true));
        assert_eq!(
            pending::timed_out(&rec, Some(&ct(42, ST_SYN_RETRIED | ST_FAILED))),
            Some(false),
            "a SYN-retried connection already failed once"
        );
        assert_eq!(
            pending::timed_out(&rec, Some(&ct(43, 0))),
            None,
            "a later connection"
        );
        for ended in [ST_HANDSHAKE, ST_RST, ST_REVIVED, ST_CLOSED | ST_FAILED] {
            assert_eq!(
                pending::timed_out(&rec, Some(&ct(42, ended))),
                None,
                "state {ended:#x}"
            );
        }
    }

    #[test]
    fn a_sweep_runs_counts_round_trip() {
        for (e, t) in [(0, 0), (1, 0), (0, 1), (32, 32), (17, 5)] {
            assert_eq!(sweep::counts(sweep::result(e, t)), (e, t));
        }
    }

    #[test]
    fn only_a_late_syn_without_a_syn_ack_is_a_retry() {
        let ms = 1_000_000;
        assert!(!is_syn_retry(0, 0), "back-to-back copies are duplicates");
        assert!(!is_syn_retry(0, 199 * ms), "sooner than any RTO");
        assert!(is_syn_retry(0, SYN_RETRY_MIN_NS), "at the floor");
        assert!(is_syn_retry(0, 1000 * ms), "Linux's first retry, 1 s");
        assert!(
            is_syn_retry(ST_SYN_RETRIED, 3000 * ms),
            "a second retry is still a retry (counted once elsewhere)"
        );
        assert!(
            !is_syn_retry(ST_HANDSHAKE, 3000 * ms),
            "after the SYN-ACK the backend has answered: never a retry"
        );
    }
}

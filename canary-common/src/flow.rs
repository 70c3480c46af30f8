//! Connection tracking: one global LRU hash holds, for every steered flow, a
//! forward entry (client → VIP, says which backend) and a reverse entry
//! (backend → client, says which VIP to restore on replies).

/// A TCP/IP 5-tuple as seen in one direction. Addresses and ports are in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    /// The key of the same flow seen in the other direction.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Default conntrack capacity in entries (two per flow). The agent's
/// `conntrack_capacity` setting overrides it at load time.
pub const CT_DEFAULT_CAPACITY: u32 = 262_144;

/// Static entry flag: the entry is the reverse (reply) half of a flow.
pub const CT_REVERSE: u8 = 1 << 0;
/// Static entry flag: the flow was re-resolved after a conntrack miss, so
/// its timestamps do not start at a SYN and its timings are not recorded.
pub const CT_REOPENED: u8 = 1 << 1;

/// `state` bits, changed with atomic ORs. The forward entry holds the
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

/// Conntrack value.
///
/// Forward entry (key: client → VIP): `nat_addr:nat_port` is the backend.
/// Reverse entry (key: backend → client): `nat_addr:nat_port` is the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// Network byte order.
    pub nat_addr: u32,
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
    /// `bpf_ktime_get_ns` at the SYN (or at re-resolution).
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the first client payload (forward entry).
    pub request_ns: u64,
    /// `ST_*` bits (a 64-bit word: see the eBPF crate's atomic.rs).
    pub state: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

/// `PENDING` value: a SYN forwarded and not yet answered. The agent counts
/// entries older than the handshake timeout as timed out and removes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingSyn {
    /// `bpf_ktime_get_ns` of the SYN (CLOCK_MONOTONIC).
    pub syn_ns: u64,
    /// The backend's `STATS` slot.
    pub stats_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PendingSyn>() == 16);

/// Capacity of `PENDING`: handshakes in flight at once. Beyond it the
/// oldest are evicted unseen (under a SYN flood timeouts are undercounted).
pub const PENDING_CAPACITY: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding (explicit `_pad`), every bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), no implicit padding (sizes asserted), integers only.
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: repr(C), explicit padding, integers only.
    unsafe impl aya::Pod for super::PendingSyn {}
}

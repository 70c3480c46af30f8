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

/// The entry is the reverse (reply) half of a flow.
pub const CT_REVERSE: u8 = 1 << 0;
/// The client sent a FIN: a later SYN on the same 5-tuple is a new
/// connection, not a retransmission.
pub const CT_CLIENT_FIN: u8 = 1 << 1;
/// The backend sent a FIN.
pub const CT_BACKEND_FIN: u8 = 1 << 2;

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
    /// `CT_*` bits.
    pub flags: u8,
    /// The service the flow was steered for.
    pub svc_id: u32,
    /// Index of the backend inside its cohort's list at the time of choice.
    pub backend_idx: u32,
    /// `bpf_ktime_get_ns` when the flow was first seen.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding (explicit `_pad`), every bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), no implicit padding (sizes asserted), integers only.
    unsafe impl aya::Pod for super::CtEntry {}
}

//! Data-plane counters: one per-CPU `u64` per reason, summed by the agent.
//! Every error path of the programs increments exactly one of these.

/// Index into the `COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New flow steered (SYN, or a re-resolved conntrack miss).
    NewFlow = 0,
    /// Non-SYN packet to a VIP with no conntrack entry: re-resolved
    /// deterministically to the same cohort and backend.
    CtMiss,
    /// SYN for a flow already tracked and not closed: kept on its backend.
    SynRetransmit,
    /// Flow ended by a RST; its entries were removed.
    RstClosed,
    /// Packet shorter than an Ethernet header.
    TruncatedEth,
    /// IPv4 packet shorter than its IP header, or IHL < 5.
    BadIpHeader,
    /// TCP packet to a VIP shorter than its TCP header, or data offset < 5.
    BadTcpHeader,
    /// First fragment of a fragmented packet to a VIP: cannot be steered.
    Fragment,
    /// The chosen cohort (and the fallback) had no backend.
    NoBackend,
    /// A packet rewrite or checksum helper failed.
    RewriteFailed,
    /// A conntrack insert failed; the flow still re-resolves per packet.
    CtInsertFailed,
    /// A measurement had no stats slot or histogram to go to (its service
    /// or backend was removed while the flow was open).
    Unattributed,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 12] = [
        Counter::NewFlow,
        Counter::CtMiss,
        Counter::SynRetransmit,
        Counter::RstClosed,
        Counter::TruncatedEth,
        Counter::BadIpHeader,
        Counter::BadTcpHeader,
        Counter::Fragment,
        Counter::NoBackend,
        Counter::RewriteFailed,
        Counter::CtInsertFailed,
        Counter::Unattributed,
    ];

    /// Number of slots in the `COUNTERS` map.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name (log fields, metric labels).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NewFlow => "new_flow",
            Counter::CtMiss => "ct_miss",
            Counter::SynRetransmit => "syn_retransmit",
            Counter::RstClosed => "rst_closed",
            Counter::TruncatedEth => "truncated_eth",
            Counter::BadIpHeader => "bad_ip_header",
            Counter::BadTcpHeader => "bad_tcp_header",
            Counter::Fragment => "fragment",
            Counter::NoBackend => "no_backend",
            Counter::RewriteFailed => "rewrite_failed",
            Counter::CtInsertFailed => "ct_insert_failed",
            Counter::Unattributed => "unattributed",
        }
    }

    /// Whether the counter records an error (as opposed to normal events).
    pub const fn is_error(self) -> bool {
        !matches!(
            self,
            Counter::NewFlow
                | Counter::CtMiss
                | Counter::SynRetransmit
                | Counter::RstClosed
                | Counter::Unattributed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Counter;

    #[test]
    fn counter_indices_match_their_position() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} is at position {i}", c.name());
        }
    }
}

//! Data-plane counters: one per-CPU `u64` per reason, summed by the agent.
//! Every error path of the programs increments exactly one of these.

/// Index into the `COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New flow steered (a SYN, or the first datagram of a UDP flow).
    NewFlow = 0,
    /// Non-SYN packet to a VIP with no conntrack entry: forwarded to the
    /// backend its flow re-resolves to (deterministically the same while
    /// the service is unchanged), tracked only once the backend answers.
    CtMiss,
    /// SYN for a flow already tracked and not closed: kept on its backend.
    SynRetransmit,
    /// A RST closed a tracked flow (counted at the first RST of the flow);
    /// its entries stay, marked closing.
    RstClosed,
    /// Packet shorter than an Ethernet header.
    TruncatedEth,
    /// IP packet shorter than its IP header (or an IPv6 extension header),
    /// or IHL < 5.
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
    /// SYN for a tracked flow that is not a retry failure: it came within
    /// `SYN_RETRY_MIN_NS` of the first SYN, or after the SYN-ACK (a copy,
    /// a lost SYN-ACK, a spoofer). Also counted in `SynRetransmit`.
    SynDuplicate,
    /// A RST was ignored: the backend sent a non-RST packet on a flow that
    /// RST had closed (and marked closing), so the flow is open again.
    RstIgnored,
    /// The backend answered a re-resolved flow with a non-RST packet: the
    /// flow is tracked in conntrack again.
    ReopenConfirmed,
    /// The backend answered a re-resolved flow with a RST: it had no such
    /// connection (a stray or forged packet). Not a refusal, not a failure.
    ReopenReset,
    /// IPv6 packet with extension headers (hop-by-hop, routing,
    /// fragment, destination options, authentication) before its
    /// transport header: passed unsteered, never parsed.
    Ipv6ExtHeader,
    /// A `connect()` from a process in the socket-LB cgroup to a VIP was
    /// steered at the socket (the TC programs never rewrite it).
    SockSteered,
    /// A socket-steered connection of a service with source rules had no
    /// known source address (its socket was not bound to one): the rules
    /// cannot tell whether it is excluded, so it went to stable.
    SockSourceUnknown,
    /// A socket-steered connection could not be tagged (socket storage
    /// allocation failed): it is steered and `getpeername` works, but none
    /// of its signals are counted.
    SockTagFailed,
    /// UDP datagram shorter than its UDP header (or whose length field
    /// says so): passed unsteered.
    BadUdpHeader,
    /// UDP over IPv6 with checksum 0, which IPv6 forbids (RFC 8200):
    /// passed unsteered (the receiving stack drops it).
    Udp6ZeroChecksum,
    /// A UDP flow idle past its service's `udp_idle_timeout` ended: its
    /// close was counted, by its next datagram (which starts a new flow)
    /// or by the agent's sweep (which removes it).
    UdpExpired,
    /// An ICMP error from a backend (or a router on its path) about a
    /// steered flow was reverse-NATed on its way to the client.
    IcmpErrorNatted,
    /// An ICMP error quoting a steered flow in a form canary does not
    /// rewrite (IPv4 options or IPv6 extension headers in the quoted
    /// header, or a quote too short for its ports): passed unrewritten.
    IcmpQuoteUnsupported,
    /// A canary connection or UDP flow past its service's drain deadline
    /// after a rollback, ended. TCP at TC: the client's segment went on to
    /// the backend as a RST, which resets the backend's side (the
    /// backend's answer to the client's next segment resets the client's).
    /// UDP at TC: the agent's sweep ended the flow. UDP steered at the
    /// socket: the client's next datagram started a new flow.
    DrainReset,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 26] = [
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
        Counter::SynDuplicate,
        Counter::RstIgnored,
        Counter::ReopenConfirmed,
        Counter::ReopenReset,
        Counter::Ipv6ExtHeader,
        Counter::SockSteered,
        Counter::SockSourceUnknown,
        Counter::SockTagFailed,
        Counter::BadUdpHeader,
        Counter::Udp6ZeroChecksum,
        Counter::UdpExpired,
        Counter::IcmpErrorNatted,
        Counter::IcmpQuoteUnsupported,
        Counter::DrainReset,
    ];

    /// Number of slots in the `COUNTERS` map.
    #[expect(clippy::cast_possible_truncation, reason = "a few dozen counters")]
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable `snake_case` name (log fields, metric labels).
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
            Counter::SynDuplicate => "syn_duplicate",
            Counter::RstIgnored => "rst_ignored",
            Counter::ReopenConfirmed => "reopen_confirmed",
            Counter::ReopenReset => "reopen_reset",
            Counter::Ipv6ExtHeader => "ipv6_ext_header",
            Counter::SockSteered => "sock_steered",
            Counter::SockSourceUnknown => "sock_source_unknown",
            Counter::SockTagFailed => "sock_tag_failed",
            Counter::BadUdpHeader => "bad_udp_header",
            Counter::Udp6ZeroChecksum => "udp6_zero_checksum",
            Counter::UdpExpired => "udp_expired",
            Counter::IcmpErrorNatted => "icmp_error_natted",
            Counter::IcmpQuoteUnsupported => "icmp_quote_unsupported",
            Counter::DrainReset => "drain_reset",
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
                | Counter::SynDuplicate
                | Counter::RstIgnored
                | Counter::ReopenConfirmed
                | Counter::ReopenReset
                | Counter::Ipv6ExtHeader
                | Counter::SockSteered
                | Counter::SockSourceUnknown
                | Counter::UdpExpired
                | Counter::IcmpErrorNatted
                | Counter::DrainReset
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

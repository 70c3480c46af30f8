//! One address type for both families. Every map key and value holds a
//! 16-byte address; an IPv4 address is stored IPv4-mapped
//! (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2), so one key type, one conntrack,
//! one service table and one rule trie serve IPv4 and IPv6, and the data
//! plane has one parser and one NAT for both. Keys also carry the family,
//! so an IPv6 packet that spells an IPv4-mapped address never meets an
//! IPv4 flow.

/// Family numbers stored in keys (the IP version).
pub const FAMILY_V4: u8 = 4;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u8 = 6;

/// Word 2 of an IPv4-mapped address, as stored (network byte order).
const V4_MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

/// An IPv4 or IPv6 address: four 32-bit words in network byte order,
/// exactly as the bytes appear in an IPv6 header (IPv4: mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Addr(pub [u32; 4]);
const _: () = assert!(core::mem::size_of::<Addr>() == 16);

impl Addr {
    /// The IPv4-mapped form of an IPv4 address read from a packet
    /// (network byte order).
    #[inline(always)]
    #[must_use]
    pub const fn from_v4(be: u32) -> Addr {
        Addr([0, 0, V4_MAPPED_WORD, be])
    }

    /// Whether this is an IPv4 address (IPv4-mapped).
    #[inline(always)]
    #[must_use]
    pub const fn is_v4(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address in network byte order (the last word; meaningful
    /// only when [`Addr::is_v4`]).
    #[inline(always)]
    #[must_use]
    pub const fn v4(&self) -> u32 {
        self.0[3]
    }

    /// The family number of this address.
    #[inline(always)]
    #[must_use]
    pub const fn family(&self) -> u8 {
        if self.is_v4() { FAMILY_V4 } else { FAMILY_V6 }
    }
}

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::Addr;

    impl From<Ipv4Addr> for Addr {
        fn from(ip: Ipv4Addr) -> Addr {
            Addr::from_v4(u32::from_ne_bytes(ip.octets()))
        }
    }

    impl From<Ipv6Addr> for Addr {
        /// An IPv4-mapped IPv6 address becomes that IPv4 address: the two
        /// spell the same destination.
        fn from(ip: Ipv6Addr) -> Addr {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Addr([word(0), word(4), word(8), word(12)])
        }
    }

    impl From<IpAddr> for Addr {
        fn from(ip: IpAddr) -> Addr {
            match ip {
                IpAddr::V4(v4) => v4.into(),
                IpAddr::V6(v6) => v6.into(),
            }
        }
    }

    impl From<Addr> for IpAddr {
        fn from(a: Addr) -> IpAddr {
            if a.is_v4() {
                return IpAddr::V4(Ipv4Addr::from(a.v4().to_ne_bytes()));
            }
            let mut o = [0u8; 16];
            for (chunk, word) in o.chunks_exact_mut(4).zip(a.0) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }

    // SAFETY: repr(C), four u32, no padding, every bit pattern valid.
    unsafe impl aya::Pod for Addr {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ipv4_is_stored_mapped_and_round_trips() {
        let ip = Ipv4Addr::new(10, 0, 0, 10);
        let a = Addr::from(ip);
        assert!(a.is_v4());
        assert_eq!(a.family(), FAMILY_V4);
        assert_eq!(a.v4(), u32::from_ne_bytes([10, 0, 0, 10]), "packet order");
        let mapped: Ipv6Addr = ip.to_ipv6_mapped();
        assert_eq!(
            Addr::from(mapped),
            a,
            "::ffff:10.0.0.10 is the same address"
        );
        assert_eq!(IpAddr::from(a), IpAddr::V4(ip));
    }

    #[test]
    fn ipv6_round_trips_in_header_byte_order() {
        let ip: Ipv6Addr = "fd00::1:2".parse().expect("literal");
        let a = Addr::from(ip);
        assert!(!a.is_v4());
        assert_eq!(a.family(), FAMILY_V6);
        assert_eq!(IpAddr::from(a), IpAddr::V6(ip));
        // The words are the header's bytes, in order.
        let bytes: [u8; 16] = ip.octets();
        assert_eq!(
            a.0[0].to_ne_bytes(),
            [bytes[0], bytes[1], bytes[2], bytes[3]]
        );
        assert_eq!(
            a.0[3].to_ne_bytes(),
            [bytes[12], bytes[13], bytes[14], bytes[15]]
        );
    }
}

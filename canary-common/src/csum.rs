//! Incremental Internet checksum updates (RFC 1624), for the XDP path, which
//! has no skb and so no `bpf_l3/l4_csum_replace`; and UDP's zero rule,
//! which the kernel helpers apply at TC under `BPF_F_MARK_MANGLED_0`.
//!
//! Values are the raw words as loaded from the packet: one's complement
//! addition commutes with byte swapping, so no byte-order conversion is
//! needed as long as the checksum and the replaced field are loaded the same
//! way.

/// Folds a sum of at most 2^32 16-bit words' worth into 16 bits. Two folds
/// are always enough for the sums formed here (a handful of words), and
/// being loop-free keeps the verifier's work constant.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "three folds of a sum of a handful of words leave 16 bits"
)]
const fn fold(sum: u64) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` after a 32-bit field changes from `from` to `to`:
/// `HC' = ~(~HC + ~m + m')` (RFC 1624, eqn. 3).
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nfrom = !from;
    let sum = (!check) as u64
        + (nfrom & 0xffff) as u64
        + (nfrom >> 16) as u64
        + (to & 0xffff) as u64
        + (to >> 16) as u64;
    !fold(sum)
}

/// The checksum `check` after a 16-bit field changes from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u64 + (!from) as u64 + to as u64;
    !fold(sum)
}

/// The checksum `check` after a 16-byte field (an IPv6 address, as four
/// words loaded the same way as the checksum) changes from `from` to `to`.
#[inline(always)]
pub const fn replace16(check: u16, from: &[u32; 4], to: &[u32; 4]) -> u16 {
    let mut sum = (!check) as u64;
    let mut i = 0;
    while i < 4 {
        let nfrom = !from[i];
        sum += (nfrom & 0xffff) as u64
            + (nfrom >> 16) as u64
            + (to[i] & 0xffff) as u64
            + (to[i] >> 16) as u64;
        i += 1;
    }
    !fold(sum)
}

/// The 32-bit one's complement difference of a 16-byte field changing
/// from `from` to `to` (words as loaded): what `bpf_csum_diff` returns, for
/// `bpf_l4_csum_replace` with size 0, computed without a helper call.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "two folds of a sum of eight 32-bit words leave 32 bits"
)]
pub const fn diff16(from: &[u32; 4], to: &[u32; 4]) -> u32 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += (!from[i]) as u64 + to[i] as u64;
        i += 1;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// UDP's zero rule, the same at XDP as `BPF_F_MARK_MANGLED_0` at TC.
///
/// A UDP checksum of 0 means "none" over IPv4 (RFC 768): it stays 0
/// whatever changes (`keep`). A recomputed UDP checksum that comes out 0
/// is sent as its other one's-complement spelling, 0xFFFF (`mangled`), so
/// it is not taken for "none". (UDP over IPv6 with checksum 0 is invalid,
/// RFC 8200; the programs pass it unsteered and never update it.)
pub mod udp {
    /// Whether a UDP checksum field holding `check` is left as it is.
    #[inline(always)]
    pub const fn keep(check: u16) -> bool {
        check == 0
    }

    /// The value to store for an updated UDP checksum `check`.
    #[inline(always)]
    pub const fn mangled(check: u16) -> u16 {
        if check == 0 { 0xffff } else { check }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// The checksum of `words` from scratch (RFC 1071).
    fn full(words: &[u16]) -> u16 {
        !fold(words.iter().map(|&w| u64::from(w)).sum())
    }

    /// A deterministic word stream (xorshift), so failures reproduce.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a random word is the low 16 bits of the generator state"
    )]
    fn words(seed: u64, n: usize) -> Vec<u16> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u16
            })
            .collect()
    }

    #[test]
    fn incremental_updates_equal_a_full_recomputation() {
        for seed in 0..2000u64 {
            let mut data = words(seed, 12);
            // Extremes too: all-ones and zero fields.
            if seed % 7 == 0 {
                data[2] = 0xffff;
                data[3] = 0xffff;
            }
            if seed % 11 == 0 {
                data[4] = 0;
            }
            let check = full(&data);
            let new = words(seed ^ 0xdead_beef, 3);
            let from = u32::from(data[2]) | (u32::from(data[3]) << 16);
            let to = u32::from(new[0]) | (u32::from(new[1]) << 16);
            let check = replace4(check, from, to);
            data[2] = new[0];
            data[3] = new[1];
            let check = replace2(check, data[4], new[2]);
            data[4] = new[2];
            // Equal as one's complement numbers (0x0000 and 0xffff are both zero).
            let expect = full(&data);
            assert!(
                check == expect || (check | expect == 0xffff && check & expect == 0),
                "seed {seed}: incremental {check:#06x}, full {expect:#06x}"
            );
        }
    }

    /// Adding the 32-bit difference to a checksum, as the kernel does with
    /// `bpf_l4_csum_replace(size 0)`, equals the 16-bit update.
    #[test]
    fn the_16_byte_difference_updates_like_replace16() {
        for seed in 0..2000u64 {
            let w = words(seed, 17);
            let word32 = |i: usize| u32::from(w[2 * i]) | (u32::from(w[2 * i + 1]) << 16);
            let from = [word32(0), word32(1), word32(2), word32(3)];
            let to = [word32(4), word32(5), word32(6), word32(7)];
            let check = w[16];
            let diff = diff16(&from, &to);
            // csum_replace_by_diff: ~csum_fold(csum_add(~check, diff)).
            let via_diff = !fold(u64::from(!check) + u64::from(diff));
            let expect = replace16(check, &from, &to);
            assert!(
                via_diff == expect || (via_diff | expect == 0xffff && via_diff & expect == 0),
                "seed {seed}: via diff {via_diff:#06x}, replace16 {expect:#06x}"
            );
        }
    }

    #[test]
    fn a_16_byte_update_equals_a_full_recomputation() {
        let word32 = |w: &[u16]| u32::from(w[0]) | (u32::from(w[1]) << 16);
        for seed in 0..2000u64 {
            let mut data = words(seed, 24);
            if seed % 5 == 0 {
                data[2..10].fill(0xffff);
            }
            let check = full(&data);
            let new = words(seed ^ 0x1234_5678, 8);
            let from = [0, 1, 2, 3].map(|i| word32(&data[2 + 2 * i..]));
            let to = [0, 1, 2, 3].map(|i| word32(&new[2 * i..]));
            let check = replace16(check, &from, &to);
            data[2..10].copy_from_slice(&new);
            let expect = full(&data);
            assert!(
                check == expect || (check | expect == 0xffff && check & expect == 0),
                "seed {seed}: incremental {check:#06x}, full {expect:#06x}"
            );
        }
    }

    #[test]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splits a u32 into its 16-bit words; the seed is below 500"
    )]
    fn a_checksum_verifies_after_the_update() {
        // Summing data and checksum gives 0xffff for a valid packet.
        for seed in 0..500u64 {
            let mut data = words(seed, 10);
            let check = full(&data);
            let to = 0x0a00_020a_u32.rotate_left(seed as u32);
            let from = u32::from(data[0]) | (u32::from(data[1]) << 16);
            let check = replace4(check, from, to);
            data[0] = to as u16;
            data[1] = (to >> 16) as u16;
            let total: u64 = data.iter().map(|&w| u64::from(w)).sum::<u64>() + u64::from(check);
            assert_eq!(fold(total), 0xffff, "seed {seed}");
        }
    }

    /// A UDP/IPv4 checksum of 0 ("none") stays 0 through any rewrite,
    /// and an update that folds to 0 is stored as 0xFFFF, which still
    /// verifies; as `BPF_F_MARK_MANGLED_0` does at TC.
    #[test]
    fn udp_zero_checksums_stay_zero_and_a_result_of_zero_becomes_ffff() {
        // "none" is kept: no update is computed at all.
        assert!(udp::keep(0));
        assert!(!udp::keep(0xffff) && !udp::keep(0x1234));
        // Find rewrites whose incremental result is exactly 0.
        let mut found = 0;
        for seed in 0..4000u64 {
            let mut data = words(seed, 10);
            let check = full(&data);
            let from = u32::from(data[0]) | (u32::from(data[1]) << 16);
            // Pick the new low word so that the updated sum is all ones:
            // then the checksum comes out 0x0000.
            let high = words(seed ^ 0x5555, 1)[0];
            let partial = replace4(check, from, u32::from(high) << 16);
            // Adding `x` to the sum lowers the checksum by `x`.
            let low = partial;
            let to = u32::from(low) | (u32::from(high) << 16);
            let updated = replace4(check, from, to);
            if updated != 0 {
                continue;
            }
            found += 1;
            let stored = udp::mangled(updated);
            assert_eq!(
                stored, 0xffff,
                "seed {seed}: a zero result is stored as 0xFFFF"
            );
            data[0] = low;
            data[1] = high;
            let total: u64 = data.iter().map(|&w| u64::from(w)).sum::<u64>() + u64::from(stored);
            assert_eq!(fold(total), 0xffff, "seed {seed}: 0xFFFF verifies");
        }
        assert!(found > 100, "the search found only {found} zero results");
        // Other results are stored as they are.
        assert_eq!(udp::mangled(0x1234), 0x1234);
    }

    #[test]
    fn a_udp_flow_expires_after_its_idle_timeout_not_before() {
        use crate::flow::udp_expired;
        let s = 1_000_000_000u64;
        assert!(!udp_expired(10 * s, 10 * s, 30_000));
        assert!(!udp_expired(10 * s, 39 * s, 30_000), "29 s idle of 30");
        assert!(udp_expired(10 * s, 40 * s, 30_000), "30 s idle");
        assert!(
            !udp_expired(10 * s, 9 * s, 30_000),
            "a clock behind the entry is no expiry"
        );
        assert!(udp_expired(0, u64::MAX, u32::MAX), "no overflow");
    }
}

//! Incremental Internet checksum updates (RFC 1624), for the XDP path, which
//! has no skb and so no `bpf_l3/l4_csum_replace`.
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
}

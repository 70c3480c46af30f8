//! The cohort and backend choice: a pure function of the flow and the
//! service's salt, so the kernel and the agent's tests compute the same
//! answer, and a flow whose conntrack entry was lost re-resolves to the same
//! place.

use crate::addr::Addr;

/// Weights are parts per million: 1 ppm = 0.0001 %.
pub const PPM: u32 = 1_000_000;

/// 64-bit finaliser (splitmix64). It is a bijection, so distinct inputs give
/// distinct outputs, and every input bit affects every output bit.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x
}

/// Hash for sticky mode: the client address alone (network byte order, as
/// read from the packet), salted per service.
#[inline(always)]
pub const fn sticky_hash(client_addr: u32, salt: u32) -> u64 {
    mix64(((salt as u64) << 32) | client_addr as u64)
}

/// Hash of a 64-bit client identity, salted per service: what the socket
/// path (cgroup `connect4/6`) keys cohorts on, since no packet (and so no
/// source address) exists yet when it decides. The identity is the
/// client's network-namespace cookie in sticky mode (a pod, or the whole
/// host network namespace) and the socket cookie in per-connection mode.
/// For a fixed salt it is a bijection of `id` (two mixes around a salted
/// XOR), so distinct clients never collide more than chance says.
#[inline(always)]
pub const fn sticky_hash64(id: u64, salt: u32) -> u64 {
    mix64(mix64(id) ^ mix64(SALT64_TAG | salt as u64))
}

/// Domain tag of [`sticky_hash64`]'s salt, so its salted constant differs
/// from anything [`sticky_hash`] feeds `mix64`.
const SALT64_TAG: u64 = 0x736f_636b_0000_0000;

/// Hash for per-connection mode: the whole 5-tuple (addresses and ports in
/// network byte order), salted per service.
#[inline(always)]
pub const fn flow_hash(
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
    proto: u8,
    salt: u32,
) -> u64 {
    let addrs = mix64(((src_addr as u64) << 32) | dst_addr as u64);
    let rest = ((src_port as u64) << 48) | ((dst_port as u64) << 32) | ((proto as u64) << 24);
    mix64(addrs ^ rest ^ salt as u64)
}

/// Folds a 16-byte address into 64 mixed bits.
#[inline(always)]
const fn fold_addr(a: &Addr) -> u64 {
    mix64(((a.0[0] as u64) << 32) | a.0[1] as u64) ^ (((a.0[2] as u64) << 32) | a.0[3] as u64)
}

/// [`sticky_hash`] for a client of either family. An IPv4 client hashes
/// exactly as [`sticky_hash`] of its IPv4 address, so clients keep their
/// buckets (and cohorts) across the change to 16-byte addresses.
#[inline(always)]
pub const fn sticky_hash_addr(client: &Addr, salt: u32) -> u64 {
    if client.is_v4() {
        sticky_hash(client.v4(), salt)
    } else {
        mix64(mix64(fold_addr(client)) ^ salt as u64)
    }
}

/// [`flow_hash`] for a flow of either family; an IPv4 flow hashes exactly
/// as [`flow_hash`] of its IPv4 addresses.
#[inline(always)]
pub const fn flow_hash_addr(
    src: &Addr,
    dst: &Addr,
    src_port: u16,
    dst_port: u16,
    proto: u8,
    salt: u32,
) -> u64 {
    if src.is_v4() && dst.is_v4() {
        return flow_hash(src.v4(), dst.v4(), src_port, dst_port, proto, salt);
    }
    let addrs = mix64(fold_addr(src) ^ fold_addr(dst).rotate_left(32));
    let rest = ((src_port as u64) << 48) | ((dst_port as u64) << 32) | ((proto as u64) << 24);
    mix64(addrs ^ rest ^ salt as u64)
}

/// The bucket of a flow key in `0..PPM`. A flow is canary iff its bucket is
/// below the weight, so raising the weight only ever adds buckets to canary
/// (monotonic), and the bucket does not depend on the weight at all.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "a remainder modulo PPM (10^6) fits u32"
)]
pub const fn bucket(hash: u64) -> u32 {
    (hash % PPM as u64) as u32
}

/// Whether a bucket falls in the canary share of `weight_ppm`.
#[inline(always)]
pub const fn is_canary(bucket: u32, weight_ppm: u32) -> bool {
    bucket < weight_ppm
}

/// Index of the backend inside a cohort of `count` backends (`count > 0`).
/// Re-mixed so the choice is independent of the cohort bucket: the canary
/// cohort (low buckets) still spreads evenly over its backends.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "a remainder modulo a u32 fits u32"
)]
pub const fn backend_index(hash: u64, count: u32) -> u32 {
    (mix64(hash ^ 0x5bd1_e995_c0ff_ee00) % count as u64) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// `sticky_hash(client(1), 42)` and `flow_hash(client(1), client(2),
    /// 1234, 80, TCP, 7)` as the data plane has computed them since v1.
    const STICKY_1_42: u64 = 0x1d2c_e7e2_7c38_e5c2;
    const FLOW_1_2: u64 = 0x3011_999c_84cf_1360;

    fn client(i: u32) -> u32 {
        // 10.0.0.0/8 in network byte order, as the data plane reads it.
        (0x0a00_0000 | i).to_be()
    }

    /// Chi-square over 100 equal bucket ranges: with 99 degrees of freedom
    /// the 99.9 % critical value is 148.2.
    fn assert_uniform(bins: &[u32; 100], what: &str) {
        let n: u32 = bins.iter().sum();
        let expected = f64::from(n) / 100.0;
        let chi2: f64 = bins
            .iter()
            .map(|&o| (f64::from(o) - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 148.2,
            "{what} chi-square {chi2:.1} >= 148.2 (99.9 %, 99 dof): {bins:?}"
        );
    }

    #[test]
    fn raising_the_weight_never_moves_a_canary_client_back_to_stable() {
        let weights = [0, 1, 100, 10_000, 50_000, 250_000, 500_000, 999_999, PPM];
        for i in 0..100_000 {
            let b = bucket(sticky_hash(client(i), 42));
            let verdicts: Vec<bool> = weights.iter().map(|&w| is_canary(b, w)).collect();
            // Once canary at some weight, canary at every higher weight.
            let first = verdicts.iter().position(|&c| c);
            if let Some(first) = first {
                assert!(
                    verdicts[first..].iter().all(|&c| c),
                    "client {i} (bucket {b}) left canary as the weight rose: {verdicts:?}"
                );
            }
        }
    }

    #[test]
    fn zero_weight_is_never_canary_and_full_weight_always() {
        for i in 0..100_000 {
            let b = bucket(sticky_hash(client(i), 7));
            assert!(b < PPM, "bucket {b} out of range");
            assert!(!is_canary(b, 0), "bucket {b} canary at 0 ppm");
            assert!(is_canary(b, PPM), "bucket {b} stable at 1e6 ppm");
        }
    }

    /// Chi-square over 100 equal bucket ranges for sequential client
    /// addresses (the worst case for a weak hash). With 99 degrees of
    /// freedom the 99.9 % critical value is 148.2.
    #[test]
    fn sticky_buckets_are_uniform_for_sequential_clients() {
        let n = 200_000u32;
        let mut bins = [0u32; 100];
        for i in 0..n {
            bins[(bucket(sticky_hash(client(i), 1)) / 10_000) as usize] += 1;
        }
        assert_uniform(&bins, "buckets:");
    }

    /// Same test for per-connection mode: one client, sequential source ports.
    #[test]
    fn flow_buckets_are_uniform_for_sequential_ports() {
        let mut bins = [0u32; 100];
        for src in 0..4u32 {
            for port in 1024..51_024u16 {
                let h = flow_hash(client(src), client(99), port.to_be(), 80u16.to_be(), 6, 3);
                bins[(bucket(h) / 10_000) as usize] += 1;
            }
        }
        assert_uniform(&bins, "buckets:");
    }

    /// At 5 % over 100 000 sequential clients the canary share must lie in the
    /// 99.9 % binomial interval: 5000 ± 3.29 * sqrt(100000 * 0.05 * 0.95).
    #[test]
    fn canary_share_matches_the_weight() {
        let n = 100_000u32;
        let canary = (0..n)
            .filter(|&i| is_canary(bucket(sticky_hash(client(i), 9)), 50_000))
            .count() as f64;
        let sd = (f64::from(n) * 0.05 * 0.95).sqrt();
        assert!(
            (canary - 5000.0).abs() < 3.29 * sd,
            "canary count {canary} outside 5000 ± {:.0}",
            3.29 * sd
        );
    }

    /// Backends inside a cohort are used evenly, including inside the small
    /// canary cohort (the backend hash is independent of the bucket).
    #[test]
    fn canary_clients_spread_evenly_over_canary_backends() {
        let mut per_backend = [0u32; 3];
        for i in 0..400_000 {
            let h = sticky_hash(client(i), 5);
            if is_canary(bucket(h), 50_000) {
                per_backend[backend_index(h, 3) as usize] += 1;
            }
        }
        let total: u32 = per_backend.iter().sum();
        let expected = f64::from(total) / 3.0;
        // 99.9 % two-sided, binomial p = 1/3 for each backend.
        let bound = 3.29 * (f64::from(total) * (1.0 / 3.0) * (2.0 / 3.0)).sqrt();
        for (i, &c) in per_backend.iter().enumerate() {
            assert!(
                (f64::from(c) - expected).abs() < bound,
                "backend {i}: {c} flows, expected {expected:.0} ± {bound:.0} ({per_backend:?})"
            );
        }
    }

    /// Network-namespace and socket cookies are small sequential
    /// integers: the worst case for a weak hash. Chi-square over 100
    /// equal bucket ranges, 99 degrees of freedom, 99.9 % critical value
    /// 148.2.
    #[test]
    fn sticky_hash64_buckets_are_uniform_for_sequential_cookies() {
        let n = 200_000u64;
        let mut bins = [0u32; 100];
        for id in 1..=n {
            bins[(bucket(sticky_hash64(id, 1)) / 10_000) as usize] += 1;
        }
        assert_uniform(&bins, "buckets:");
    }

    #[test]
    fn sticky_hash64_is_monotonic_in_the_weight_and_salted() {
        let weights = [0, 1, 10_000, 200_000, 500_000, 999_999, PPM];
        let mut agree = 0;
        for id in 1..10_001u64 {
            let b = bucket(sticky_hash64(id, 42));
            let verdicts: Vec<bool> = weights.iter().map(|&w| is_canary(b, w)).collect();
            if let Some(first) = verdicts.iter().position(|&c| c) {
                assert!(
                    verdicts[first..].iter().all(|&c| c),
                    "cookie {id} (bucket {b}) left canary as the weight rose"
                );
            }
            let other = bucket(sticky_hash64(id, 43));
            agree += usize::from(is_canary(b, 500_000) == is_canary(other, 500_000));
        }
        // Independent halves agree about half the time (99.9 %: 5000 ± 165).
        assert!(
            (4835..=5165).contains(&agree),
            "{agree} of 10000 agree across salts"
        );
    }

    /// The 32-bit sticky hash and the flow hash are what the TC path has
    /// always computed: pinned values, so adding the socket path's hash
    /// changes neither (an upgrade mid-rollout moves no client).
    #[test]
    fn the_packet_path_hashes_are_unchanged() {
        assert_eq!(sticky_hash(client(1), 42), STICKY_1_42);
        assert_eq!(
            flow_hash(client(1), client(2), 1234u16.to_be(), 80u16.to_be(), 6, 7),
            FLOW_1_2
        );
    }

    fn client6(i: u32) -> Addr {
        // fd00::/64 with a sequential interface id.
        Addr([0xfd00_0000_u32.to_be(), 0, 0, i.to_be()])
    }

    #[test]
    fn ipv4_clients_hash_as_before_the_16_byte_layout() {
        for i in 0..10_000 {
            let a = Addr::from_v4(client(i));
            assert_eq!(sticky_hash_addr(&a, 42), sticky_hash(client(i), 42));
            let b = Addr::from_v4(client(99));
            assert_eq!(
                flow_hash_addr(&a, &b, 1234u16.to_be(), 80u16.to_be(), 6, 3),
                flow_hash(client(i), client(99), 1234u16.to_be(), 80u16.to_be(), 6, 3)
            );
        }
    }

    /// Chi-square as above, for sequential IPv6 clients and ports.
    #[test]
    fn ipv6_buckets_are_uniform_for_sequential_clients_and_ports() {
        let mut sticky = [0u32; 100];
        let mut flows = [0u32; 100];
        let vip = client6(0xffff);
        for i in 0..200_000u32 {
            sticky[(bucket(sticky_hash_addr(&client6(i), 1)) / 10_000) as usize] += 1;
            #[expect(clippy::cast_possible_truncation, reason = "i % 50000 fits u16")]
            let port = (1024 + i % 50_000) as u16;
            let h = flow_hash_addr(
                &client6(i / 50_000),
                &vip,
                port.to_be(),
                80u16.to_be(),
                6,
                3,
            );
            flows[(bucket(h) / 10_000) as usize] += 1;
        }
        assert_uniform(&sticky, "sticky");
        assert_uniform(&flows, "per-connection");
    }

    #[test]
    fn the_salt_changes_which_clients_are_canary() {
        let same = (0..10_000)
            .filter(|&i| {
                let a = is_canary(bucket(sticky_hash(client(i), 1)), 500_000);
                let b = is_canary(bucket(sticky_hash(client(i), 2)), 500_000);
                a == b
            })
            .count();
        // Independent halves agree about half the time (99.9 %: 5000 ± 165).
        assert!(
            (4835..=5165).contains(&same),
            "{same} of 10000 agree across salts"
        );
    }
}

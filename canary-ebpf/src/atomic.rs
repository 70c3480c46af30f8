//! Atomic read-modify-write on map memory.
//!
//! Rust's BPF target declares no compare-and-swap, so `core::sync::atomic`
//! offers no `fetch_*` there; the kernel and LLVM do support atomic add,
//! fetch-or and fetch-and, which these intrinsics reach directly.
//!
//! Only 64-bit words: LLVM 22's BPF backend emits a 32-bit fetch-or whose
//! result is used as a plain, non-fetching OR (imm 0x40 instead of 0x41),
//! so the caller reads back its own operand. The 64-bit forms are correct
//! on every CPU level; the fixtures would catch a regression (fetch-and:
//! an ignored RST is counted exactly once however many packets show it).

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or, atomic_xadd};

/// `*p += v`, atomically across CPUs.
///
/// # Safety
/// `p` must be valid for writes, 8-aligned, and every concurrent writer of
/// `*p` must use atomics.
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// `*p += v` atomically across CPUs; returns the value before.
///
/// # Safety
/// `p` must be valid for writes, 8-aligned, and every concurrent writer of
/// `*p` must use atomics.
///
/// Written in assembly: for the generic CPU this crate is built for, LLVM
/// selects the old non-fetching `XADD` for an atomic add and rejects a
/// use of its result ("Invalid usage of the XADD return value"), although
/// the kernel has had `BPF_ADD | BPF_FETCH` since 5.12 (the fetch-or and
/// fetch-and above are the same instruction class).
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut old = v;
    // SAFETY: forwarded from the caller's contract; the instruction reads
    // and writes `*p` only.
    unsafe {
        core::arch::asm!(
            "{0} = atomic_fetch_add((u64 *)({1} + 0), {0})",
            inout(reg) old,
            in(reg) p,
            options(nostack, preserves_flags)
        );
    }
    old
}

/// `*p |= bits` atomically across CPUs; returns the value before.
///
/// # Safety
/// `p` must be valid for writes, 8-aligned, and every concurrent writer of
/// `*p` must use atomics.
#[inline(always)]
pub unsafe fn or(p: *mut u64, bits: u64) -> u64 {
    // SAFETY: forwarded from the caller's contract.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, bits) }
}

/// `*p &= mask` atomically across CPUs; returns the value before.
///
/// # Safety
/// `p` must be valid for writes, 8-aligned, and every concurrent writer of
/// `*p` must use atomics.
#[inline(always)]
pub unsafe fn and(p: *mut u64, mask: u64) -> u64 {
    // SAFETY: forwarded from the caller's contract.
    unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(p, mask) }
}

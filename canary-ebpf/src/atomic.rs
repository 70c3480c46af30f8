//! Atomic read-modify-write on map memory.
//!
//! Rust's BPF target declares no compare-and-swap, so `core::sync::atomic`
//! offers no `fetch_*` there; the kernel and LLVM do support atomic add and
//! fetch-or, which these intrinsics reach directly.
//!
//! Only 64-bit words: LLVM 22's BPF backend emits a 32-bit fetch-or whose
//! result is used as a plain, non-fetching OR (imm 0x40 instead of 0x41),
//! so the caller reads back its own operand. The 64-bit form is correct on
//! every CPU level; the fixtures would catch a regression.

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

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

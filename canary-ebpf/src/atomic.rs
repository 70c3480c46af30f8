//! Atomic read-modify-write on map memory.
//!
//! Rust's BPF target declares no compare-and-swap, so `core::sync::atomic`
//! offers no `fetch_*` there; the kernel and LLVM do support atomic add and
//! (ISA v3) fetch-or, which these intrinsics reach directly.

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
/// `p` must be valid for writes, 4-aligned, and every concurrent writer of
/// `*p` must use atomics.
#[inline(always)]
pub unsafe fn or(p: *mut u32, bits: u32) -> u32 {
    // SAFETY: forwarded from the caller's contract.
    unsafe { atomic_or::<u32, u32, { AtomicOrdering::Relaxed }>(p, bits) }
}

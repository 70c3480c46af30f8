//! Library target so that `canary-agent` can declare a build dependency on
//! this crate and be rebuilt when it changes; the programs are in `main.rs`.
#![no_std]

// The programs' dependencies: this target only exists to be depended on.
use aya_ebpf as _;
use canary_common as _;

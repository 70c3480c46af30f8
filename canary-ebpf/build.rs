//! Link flags of the eBPF object, and a rebuild when bpf-linker changes (it
//! is the linker, and cargo does not track it otherwise).
fn main() {
    // 32-bit ALU (BPF ISA v3, Linux >= 5.1) enables LLVM's atomic fetch-or
    // for the per-flow state bits. rustc already passes `--cpu generic`
    // (aya-build owns the rustflags), so this is a feature, not a CPU. The
    // agent needs Linux >= 6.6 anyway (TCX).
    println!("cargo:rustc-link-arg-bins=--cpu-features=+alu32");
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

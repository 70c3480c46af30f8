//! Compiles `canary-ebpf` for the BPF target (nightly + bpf-linker) and puts
//! the object in `OUT_DIR`, where `dataplane.rs` embeds it.
use std::path::Path;

// A dependency only so cargo reruns this script when the eBPF crate changes.
use canary_ebpf as _;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../canary-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "canary-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

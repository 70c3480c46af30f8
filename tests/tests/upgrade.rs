//! A data plane pinned by an older build, in an older map layout, adopted
//! by this build: its maps are converted entry by entry, so established
//! connections keep their backends across the upgrade.
//!
//! The version-1 pins are made here with raw `bpf()` calls, exactly as a
//! version-1 agent left them (the same map types, sizes and flags): there
//! is no version-1 agent binary to run.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{
    collections::BTreeSet,
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use canary_agent::{
    config::{Config, IngressMode, ServiceConfig},
    dataplane::{Capacity, Dataplane, Program, flow_key, pins::Pins},
};
use canary_common::{
    IPPROTO_TCP,
    flow::{CT_REVERSE, ST_HANDSHAKE},
    layout::{self, v1},
    service::{COHORT_CANARY, MAX_BACKENDS, RULE_NEVER_CANARY},
};
use canary_tests::{
    packet::{ACK, PSH, SYN, TC_ACT_OK, Tcp, parse},
    require_root,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: `attr` is a zero-padded buffer larger than every bpf_attr
    // variant used here, and its size is passed.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of::<[u64; 16]>(),
        )
    }
}

/// A map created and pinned at `path`, as a version-1 agent made it.
fn pinned_map(path: &Path, kind: u32, key: u32, value: u32, entries: u32, flags: u32) -> OwnedFd {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(kind) | (u64::from(key) << 32);
    attr[1] = u64::from(value) | (u64::from(entries) << 32);
    attr[2] = u64::from(flags);
    let fd = bpf(BPF_MAP_CREATE, &mut attr);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("an fd")) };
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = u64::from(fd.as_raw_fd().cast_unsigned());
    assert_eq!(
        bpf(BPF_OBJ_PIN, &mut attr),
        0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    fd
}

/// Writes `key` → `value` into the map `fd`.
fn put<K, V>(fd: &OwnedFd, key: &K, value: &V) {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd().cast_unsigned());
    attr[1] = std::ptr::from_ref(key) as u64;
    attr[2] = std::ptr::from_ref(value) as u64;
    assert_eq!(
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr),
        0,
        "BPF_MAP_UPDATE_ELEM: {}",
        std::io::Error::last_os_error()
    );
}

/// An LPM trie key as the kernel reads it: prefix length, then the data.
#[repr(C)]
struct LpmKey {
    prefix_len: u32,
    data: v1::RuleKey,
}

fn be(ip: [u8; 4]) -> u32 {
    u32::from_ne_bytes(ip)
}

/// The version-1 entries: one service (id 7) with a `never_canary` rule set,
/// and one established connection steered to its canary backend.
fn write_v1_data_plane(dir: &Path) {
    let maps = dir.join("maps");
    std::fs::create_dir_all(&maps).expect("pin directory");
    let layout = pinned_map(
        &maps.join("LAYOUT"),
        BPF_MAP_TYPE_ARRAY,
        4,
        4,
        layout::LAYOUT_ENTRIES,
        0,
    );
    for index in 0..u32::try_from(layout::MAPS.len()).expect("a few maps") {
        put(&layout, &index, &1u32);
    }
    let services = pinned_map(
        &maps.join("SERVICES"),
        BPF_MAP_TYPE_HASH,
        8,
        u32::try_from(size_of::<v1::ServiceValue>()).expect("small"),
        64,
        BPF_F_NO_PREALLOC,
    );
    let backend = |ip, slot| v1::Backend {
        addr: be(ip),
        port: 8080u16.to_be(),
        _pad: 0,
        stats_slot: slot,
    };
    let mut value = v1::ServiceValue {
        svc_id: 7,
        weight_ppm: 0,
        salt: canary_agent::config::default_salt("web"),
        rule_set: 1,
        mode: 0,
        flags: 0,
        n_stable: 1,
        n_canary: 1,
        breaker_window_ms: 1000,
        breaker_min_failures: 3,
        breaker_ratio_permille: 500,
        stable: [v1::Backend::default(); MAX_BACKENDS],
        canary: [v1::Backend::default(); MAX_BACKENDS],
    };
    value.stable[0] = backend([10, 0, 1, 10], 3);
    value.canary[0] = backend([10, 0, 2, 10], 4);
    let key = v1::ServiceKey {
        vip: be([10, 96, 0, 10]),
        port: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    put(&services, &key, &value);
    let rules = pinned_map(
        &maps.join("RULES"),
        BPF_MAP_TYPE_LPM_TRIE,
        4 + 8,
        4,
        1024,
        BPF_F_NO_PREALLOC,
    );
    let rule = LpmKey {
        prefix_len: 32 + 24,
        data: v1::RuleKey {
            rule_set_be: 1u32.to_be(),
            addr: be([10, 201, 7, 0]),
        },
    };
    put(&rules, &rule, &RULE_NEVER_CANARY);
    let conntrack = pinned_map(
        &maps.join("CONNTRACK"),
        BPF_MAP_TYPE_LRU_HASH,
        16,
        40,
        4096,
        0,
    );
    let client = (be([10, 201, 0, 5]), 40_000u16.to_be());
    let (vip, canary) = (
        (be([10, 96, 0, 10]), 80u16.to_be()),
        (be([10, 0, 2, 10]), 8080u16.to_be()),
    );
    let entry = v1::CtEntry {
        nat_addr: canary.0,
        nat_port: canary.1,
        cohort: COHORT_CANARY,
        flags: 0,
        svc_id: 7,
        stats_slot: 4,
        created_ns: 1,
        request_ns: 0,
        state: ST_HANDSHAKE,
    };
    let fwd = v1::FlowKey {
        src_addr: client.0,
        dst_addr: vip.0,
        src_port: client.1,
        dst_port: vip.1,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    put(&conntrack, &fwd, &entry);
    let rev = v1::FlowKey {
        src_addr: canary.0,
        dst_addr: client.0,
        src_port: canary.1,
        dst_port: client.1,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    put(
        &conntrack,
        &rev,
        &v1::CtEntry {
            nat_addr: vip.0,
            nat_port: vip.1,
            flags: CT_REVERSE,
            ..entry
        },
    );
}

fn services() -> Vec<ServiceConfig> {
    let text = "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                stable = [\"10.0.1.10:8080\"]\ncanary = [\"10.0.2.10:8080\"]\nnever_canary = [\"10.201.7.0/24\"]\n";
    Config::parse(text, Path::new("upgrade.toml"), &[])
        .expect("valid config")
        .services
}

/// Removes the pins, unmounts the test's bpffs and removes its directory,
/// however the test ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Pins::uninstall(&self.0);
        let path = CString::new(self.0.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: a valid C string for the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_version_1_data_plane_is_converted_and_its_connections_keep_their_backends() {
    require_root();
    // A bpffs of the test's own (Pins::prepare mounts one there), so no
    // other data plane is touched.
    let dir = PathBuf::from(format!("/run/canary-upgrade-test-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    Pins::prepare(&dir).expect("bpffs");
    write_v1_data_plane(&dir);

    let capacity = Capacity {
        conntrack: 4096,
        ..Capacity::default()
    };
    let mut dp = Dataplane::open(capacity, &dir).expect("a version-1 data plane is adopted");
    let services = services();
    let adopted = dp.adopt(&services).expect("adopt");
    assert_eq!(
        (adopted.services, adopted.flows),
        (1, 2),
        "the service and both halves of the flow were converted"
    );
    let report = dp.apply(&services, &BTreeSet::new()).expect("apply");
    assert!(
        report.changed.is_empty(),
        "the converted service is what the config asks for: {report:?}"
    );

    let client: std::net::SocketAddr = "10.201.0.5:40000".parse().expect("addr");
    let vip: std::net::SocketAddr = "10.96.0.10:80".parse().expect("addr");
    let entry = dp
        .conntrack_entry(&flow_key(client, vip))
        .expect("the converted flow");
    assert_eq!(
        (entry.cohort, entry.svc_id, entry.stats_slot),
        (COHORT_CANARY, 7, 4)
    );
    // The connection's next packet still goes to its canary backend,
    // although the weight is 0.
    let (code, out) = dp
        .test_run(
            Program::ingress(IngressMode::Tc),
            &Tcp::new(client, vip, ACK | PSH)
                .with_payload(b"more")
                .frame(),
        )
        .expect("test run");
    let out = parse(&out).expect("a TCP frame");
    assert_eq!(
        (code, out.dst),
        (TC_ACT_OK, "10.0.2.10:8080".parse().expect("addr")),
        "the live connection keeps its backend"
    );
    assert!(out.tcp_csum_ok && out.ip_csum_ok);
    // A new client in the converted never_canary prefix, at 100 %, stays
    // stable: the rule set was converted too.
    let mut all_canary = services.clone();
    all_canary[0].weight = "100%".parse().expect("weight");
    dp.apply(&all_canary, &BTreeSet::new())
        .expect("apply 100 %");
    let excluded: std::net::SocketAddr = "10.201.7.9:40001".parse().expect("addr");
    let (_, out) = dp
        .test_run(
            Program::ingress(IngressMode::Tc),
            &Tcp::new(excluded, vip, SYN).frame(),
        )
        .expect("test run");
    assert_eq!(
        parse(&out).expect("frame").dst,
        "10.0.1.10:8080".parse().expect("addr"),
        "never_canary survived"
    );

    dp.finish_migration()
        .expect("the converted maps take over the pins");
    drop(dp);
    // The next agent finds version-2 pins and reuses them as they are.
    let mut dp = Dataplane::open(capacity, &dir).expect("reopened");
    let adopted = dp.adopt(&services).expect("adopt again");
    assert_eq!(
        adopted.flows, 4,
        "the flow and the excluded client's new one, as pinned"
    );
    assert!(dp.conntrack_entry(&flow_key(client, vip)).is_some());
}

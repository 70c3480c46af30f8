//! Packet fixtures: the real programs run through `BPF_PROG_TEST_RUN` on
//! hand-built frames, in order, with the agent's own map-writing code.
//! Checksums are recomputed from scratch on every rewritten frame.
//!
//! Every fixture runs twice: with client packets through the TC ingress
//! program (`tc::…`) and through the XDP one (`xdp::…`); replies always go
//! through TC egress.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::unwrap_used,
    reason = "the helpers here are test code too: a failed step panics, which fails the test"
)]

mod fixture;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use canary_agent::{
    config::{Config, IngressMode, ServiceConfig},
    dataplane::{Capacity, Dataplane, flow_key},
};
use canary_common::{
    cohort::{backend_index, bucket, is_canary, sticky_hash},
    counters::Counter,
    flow::{CT_REOPENED, CT_REVERSE, ST_CLOSED, ST_FAILED, ST_RST, SYN_RETRY_MIN_NS},
    service::{COHORT_CANARY, COHORT_STABLE, Cohort},
};
use canary_tests::{
    packet::{ACK, FIN, PSH, Parsed, RST, SYN, Tcp, parse},
    require_root,
};
use fixture::{Dir, Fixture, V, addr, counter, test_run};

const VIP: &str = "10.96.0.10:80";
const STABLE: [&str; 2] = ["10.0.1.10:8080", "10.0.1.11:8080"];
const CANARY: &str = "10.0.2.10:8080";

/// Services from a `[[service]]` body (the test VIP and backends unless the
/// body says otherwise).
fn services(extra: &str) -> Vec<ServiceConfig> {
    let text = format!(
        "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\", \"{}\"]\ncanary = [\"{CANARY}\"]\n{extra}\n",
        STABLE[0], STABLE[1]
    );
    Config::parse(&text, Path::new("fixture.toml"), &[])
        .expect("fixture config is valid")
        .services
}

fn dataplane(mode: IngressMode, extra: &str) -> Fixture {
    require_root();
    let mut dp = Dataplane::load(Capacity {
        conntrack: 4096,
        ..Capacity::default()
    })
    .expect("programs load and pass the verifier");
    dp.apply(&services(extra), &BTreeSet::new())
        .expect("fixture services apply");
    Fixture { dp, mode }
}

/// Runs `dir` on `seg` and returns the verdict and the parsed output frame.
fn run(dp: &mut Fixture, dir: Dir, seg: &Tcp) -> (V, Parsed) {
    let (verdict, out) = test_run(dp, dir, &seg.frame()).expect("BPF_PROG_TEST_RUN");
    let parsed =
        parse(&out).unwrap_or_else(|| panic!("program output is not a TCP frame: {out:02x?}"));
    (verdict, parsed)
}

/// Sends a SYN from `client` to the VIP through ingress.
fn open(dp: &mut Fixture, client: SocketAddr) -> (V, Parsed) {
    run(dp, Dir::Ingress, &Tcp::new(client, addr(VIP), SYN))
}

fn assert_checksums(p: &Parsed, what: &str) {
    assert!(
        p.ip_csum_ok,
        "{what}: IP checksum wrong after rewrite: {p:?}"
    );
    assert!(
        p.tcp_csum_ok,
        "{what}: TCP checksum wrong after rewrite: {p:?}"
    );
}

fn syn_to_vip_is_dnated_with_valid_checksums_and_tracked(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"");
    let client = addr("10.201.0.7:40000");
    let syn = Tcp::new(client, addr(VIP), SYN).with_payload(b"x");
    let (verdict, out) = run(&mut dp, Dir::Ingress, &syn);

    assert_eq!(verdict, V::Forward, "a steered SYN is passed on rewritten");
    assert!(
        STABLE.map(addr).contains(&out.dst),
        "at 0% the SYN goes to a stable backend, got {}",
        out.dst
    );
    assert_eq!(out.src, client, "the client address is preserved");
    assert_eq!(
        (out.flags, out.payload.as_slice()),
        (SYN, &b"x"[..]),
        "only the destination changes"
    );
    assert_checksums(&out, "DNAT of SYN");

    let fwd = dp
        .conntrack_entry(&flow_key(client, addr(VIP)))
        .expect("forward conntrack entry after SYN");
    assert_eq!(
        (
            fwd.nat_addr,
            u16::from_be(fwd.nat_port),
            fwd.cohort,
            fwd.flags & CT_REVERSE
        ),
        (
            canary_common::addr::Addr::from(out.dst.ip()),
            out.dst.port(),
            COHORT_STABLE,
            0
        ),
        "forward entry names the chosen backend"
    );
    let rev = dp
        .conntrack_entry(&flow_key(out.dst, client))
        .expect("reverse conntrack entry after SYN");
    assert_eq!(
        (
            rev.nat_addr,
            u16::from_be(rev.nat_port),
            rev.flags & CT_REVERSE
        ),
        (
            canary_common::addr::Addr::from(addr(VIP).ip()),
            80,
            CT_REVERSE
        ),
        "reverse entry names the VIP to restore"
    );
    assert_eq!(counter(&dp, Counter::NewFlow), 1);
}

fn next_packet_after_a_weight_change_stays_on_its_backend(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\ncohort = \"per-connection\"");
    let client = addr("10.201.0.8:40001");
    let (_, first) = open(&mut dp, client);
    assert!(
        STABLE.map(addr).contains(&first.dst),
        "SYN at 0% → stable, got {}",
        first.dst
    );

    dp.apply(
        &services("weight = \"100%\"\ncohort = \"per-connection\""),
        &BTreeSet::new(),
    )
    .expect("weight change applies");

    for seg in [
        Tcp::new(client, addr(VIP), ACK),
        Tcp::new(client, addr(VIP), ACK | PSH).with_payload(b"GET / HTTP/1.0\r\n\r\n"),
        Tcp::new(client, addr(VIP), SYN), // a retransmitted SYN must not re-choose either
    ] {
        let (verdict, out) = run(&mut dp, Dir::Ingress, &seg);
        assert_eq!(verdict, V::Forward);
        assert_eq!(
            out.dst, first.dst,
            "flags {:#x}: an established flow moved after the weight change",
            seg.flags
        );
        assert_checksums(&out, "DNAT of established flow");
    }
    assert_eq!(
        counter(&dp, Counter::SynRetransmit),
        1,
        "the second SYN is counted as a retransmission"
    );

    // A new connection at 100 % goes to canary.
    let (_, fresh) = open(&mut dp, addr("10.201.0.8:40002"));
    assert_eq!(
        fresh.dst,
        addr(CANARY),
        "a new connection at 100% goes to canary"
    );
}

fn backend_reply_is_rewritten_to_come_from_the_vip(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    let client = addr("10.201.0.9:40003");
    let (_, syn) = open(&mut dp, client);
    assert_eq!(syn.dst, addr(CANARY));

    for (flags, payload) in [
        (SYN | ACK, &b""[..]),
        (ACK | PSH, &b"hello from canary"[..]),
    ] {
        let reply = Tcp::new(addr(CANARY), client, flags).with_payload(payload);
        let (verdict, out) = run(&mut dp, Dir::Egress, &reply);
        assert_eq!(verdict, V::Forward);
        assert_eq!(out.src, addr(VIP), "reply source must be VIP:port");
        assert_eq!(out.dst, client, "reply destination unchanged");
        assert_eq!(out.payload, payload);
        assert_checksums(&out, "reverse NAT of reply");
    }
}

fn foreign_packets_are_untouched_and_unspec(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"50%\"");
    let foreign = [
        // Other address, other port of the VIP, and a backend talking to a
        // client it never got a flow from.
        Tcp::new(addr("10.201.0.1:5000"), addr("10.96.0.11:80"), SYN).frame(),
        Tcp::new(addr("10.201.0.1:5000"), addr("10.96.0.10:81"), SYN).frame(),
        Tcp::new(addr(CANARY), addr("10.201.0.1:5000"), SYN | ACK).frame(),
        // UDP to the VIP, ARP, and IPv6.
        {
            let mut f = Tcp::new(addr("10.201.0.1:5000"), addr(VIP), 0).frame();
            f[14 + 9] = 17;
            f
        },
        {
            let mut f = vec![0xffu8; 6];
            f.extend_from_slice(&[2, 0, 0, 0, 0, 3, 0x08, 0x06]);
            f.extend_from_slice(&[0u8; 28]);
            f
        },
        {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x86, 0xdd, 0x60]);
            f.extend_from_slice(&[0u8; 60]);
            f
        },
    ];
    for (i, frame) in foreign.iter().enumerate() {
        for dir in [Dir::Ingress, Dir::Egress] {
            let (verdict, out) = test_run(&mut dp, dir, frame).expect("BPF_PROG_TEST_RUN");
            assert_eq!(verdict, V::Ignore, "foreign packet #{i} ({dir:?}): verdict");
            assert_eq!(&out, frame, "foreign packet #{i} ({dir:?}) was modified");
        }
    }
    assert_eq!(
        dp.conntrack_len(),
        0,
        "foreign packets must not create conntrack entries"
    );
}

fn rst_from_either_side_closes_the_flow_and_keeps_it_closing(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"");
    // Client RST.
    let client = addr("10.201.0.10:40004");
    let (_, syn) = open(&mut dp, client);
    let (verdict, rst) = run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), RST | ACK),
    );
    assert_eq!(
        (verdict, rst.dst),
        (V::Forward, syn.dst),
        "the client's RST still reaches the backend"
    );
    assert_checksums(&rst, "DNAT of RST");
    assert_closing(&dp, client, syn.dst, "after the client's RST");
    // A second RST (answering packets in flight) is the same close.
    let (verdict, again) = run(&mut dp, Dir::Ingress, &Tcp::new(client, addr(VIP), RST));
    assert_eq!((verdict, again.dst), (V::Forward, syn.dst));

    // Backend RST.
    let client = addr("10.201.0.11:40005");
    let (_, syn) = open(&mut dp, client);
    let (verdict, rst) = run(&mut dp, Dir::Egress, &Tcp::new(syn.dst, client, RST | ACK));
    assert_eq!(
        (verdict, rst.src),
        (V::Forward, addr(VIP)),
        "the backend's RST reaches the client from the VIP"
    );
    assert_checksums(&rst, "reverse NAT of RST");
    assert_closing(&dp, client, syn.dst, "after the backend's RST");
    let (verdict, again) = run(&mut dp, Dir::Egress, &Tcp::new(syn.dst, client, RST));
    assert_eq!((verdict, again.src), (V::Forward, addr(VIP)));

    assert_eq!(counter(&dp, Counter::RstClosed), 2, "one close per flow");
    assert_eq!(counter(&dp, Counter::RstIgnored), 0);
    let k = cohort(&dp, Cohort::Stable);
    assert_eq!(
        (
            k.connections,
            k.closed,
            k.active(),
            k.resets_from_client,
            k.refused
        ),
        (2, 2, 0, 1, 1),
        "each RST counted once, both flows closed: {k:?}"
    );
    assert_eq!(dp.conntrack_len(), 4, "closing flows keep both entries");
}

/// Both entries of the flow `client` → VIP served by `backend` are there
/// and marked closing.
fn assert_closing(dp: &Dataplane, client: SocketAddr, backend: SocketAddr, what: &str) {
    let fwd = dp
        .conntrack_entry(&flow_key(client, addr(VIP)))
        .unwrap_or_else(|| panic!("{what}: the forward entry is gone"));
    let rev = dp
        .conntrack_entry(&flow_key(backend, client))
        .unwrap_or_else(|| panic!("{what}: the reverse entry is gone"));
    assert!(
        fwd.state & ST_RST != 0 && rev.state & ST_RST != 0,
        "{what}: not marked closing: forward {fwd:?}, reverse {rev:?}"
    );
}

/// Moves the first SYN of `client`'s flow `ns` into the past, as if the
/// packets that follow came that much later (`BPF_PROG_TEST_RUN` runs take
/// microseconds; the programs read the clock themselves).
fn age(dp: &mut Dataplane, client: SocketAddr, ns: u64) {
    let key = flow_key(client, addr(VIP));
    let mut fwd = dp.conntrack_entry(&key).expect("a tracked flow to age");
    fwd.created_ns -= ns;
    dp.conntrack_insert(key, fwd).expect("aged entry written");
}

fn a_syn_after_the_clients_fin_is_a_new_connection(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\ncohort = \"per-connection\"");
    let client = addr("10.201.0.12:40006");
    let (_, first) = open(&mut dp, client);
    run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), FIN | ACK),
    );
    dp.apply(
        &services("weight = \"100%\"\ncohort = \"per-connection\""),
        &BTreeSet::new(),
    )
    .unwrap();
    // Late ACK of the closing flow: still the old backend.
    let (_, late) = run(&mut dp, Dir::Ingress, &Tcp::new(client, addr(VIP), ACK));
    assert_eq!(
        late.dst, first.dst,
        "closing flow must finish on its backend"
    );
    // Port reuse: a fresh SYN on the same 5-tuple draws anew (100 % → canary).
    let (_, reuse) = open(&mut dp, client);
    assert_eq!(reuse.dst, addr(CANARY), "SYN after FIN is a new connection");
}

fn conntrack_miss_reresolves_to_the_same_cohort_and_backend(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"30%\"");
    let salt = canary_agent::config::default_salt("web");
    let mut canary_seen = 0;
    for i in 1..=200u32 {
        let client = std::net::SocketAddrV4::new(std::net::Ipv4Addr::from(0x0ac9_0000 + i), 40_000);
        // The cohort the host-side function predicts for this client.
        let h = sticky_hash(u32::from_ne_bytes(client.ip().octets()), salt);
        let expected = if is_canary(bucket(h), 300_000) {
            canary_seen += 1;
            addr(CANARY)
        } else {
            addr(STABLE[backend_index(h, 2) as usize])
        };
        // A mid-flow ACK with no entry (as after an agent restart).
        let (verdict, out) = run(&mut dp, Dir::Ingress, &Tcp::new(client, addr(VIP), ACK));
        assert_eq!(verdict, V::Forward);
        assert_eq!(
            out.dst, expected,
            "client {client}: kernel and host disagree on the steering"
        );
        assert_checksums(&out, "DNAT after conntrack miss");
    }
    assert!(
        canary_seen > 20,
        "only {canary_seen} of 200 clients were canary at 30%"
    );
    assert_eq!(counter(&dp, Counter::CtMiss), 200);
    assert_eq!(counter(&dp, Counter::NewFlow), 0);
}

fn source_rules_decide_before_the_weight(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\nalways_canary = [\"10.201.5.0/24\"]");
    let (_, staff) = open(&mut dp, addr("10.201.5.77:40000"));
    assert_eq!(
        staff.dst,
        addr(CANARY),
        "always_canary client at 0% must reach canary"
    );
    let (_, other) = open(&mut dp, addr("10.201.6.77:40000"));
    assert!(
        STABLE.map(addr).contains(&other.dst),
        "other clients at 0% stay stable"
    );

    let mut dp = dataplane(
        m,
        "weight = \"100%\"\nnever_canary = [\"10.201.7.0/24\", \"10.201.7.128/25\"]",
    );
    for host in [1, 200] {
        let client = addr(&format!("10.201.7.{host}:40000"));
        let (_, vip) = open(&mut dp, client);
        assert!(
            STABLE.map(addr).contains(&vip.dst),
            "never_canary client {client} at 100% reached {}",
            vip.dst
        );
        let fwd = dp.conntrack_entry(&flow_key(client, addr(VIP))).unwrap();
        assert_eq!(fwd.cohort, COHORT_STABLE);
    }
    let (_, other) = open(&mut dp, addr("10.201.8.1:40000"));
    assert_eq!(other.dst, addr(CANARY));
    let fwd = dp
        .conntrack_entry(&flow_key(addr("10.201.8.1:40000"), addr(VIP)))
        .unwrap();
    assert_eq!(fwd.cohort, COHORT_CANARY);
}

fn rule_changes_apply_atomically_and_old_rules_are_removed(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\nalways_canary = [\"10.201.5.0/24\"]");
    dp.apply(
        &services("weight = \"0%\"\nalways_canary = [\"10.201.6.0/24\"]"),
        &BTreeSet::new(),
    )
    .unwrap();
    let (_, old) = open(&mut dp, addr("10.201.5.1:40000"));
    assert!(
        STABLE.map(addr).contains(&old.dst),
        "the replaced rule still applies: {}",
        old.dst
    );
    let (_, new) = open(&mut dp, addr("10.201.6.1:40000"));
    assert_eq!(new.dst, addr(CANARY), "the new rule does not apply");
    // Removing the service stops steering; the VIP becomes foreign.
    dp.apply(&[], &BTreeSet::new()).unwrap();
    let (verdict, _) = open(&mut dp, addr("10.201.9.1:40000"));
    assert_eq!(verdict, V::Ignore, "a removed service must not be steered");
}

fn removing_a_service_drains_it_established_flows_finish_new_ones_are_not_steered(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"");
    let client = addr("10.201.0.20:40010");
    let (_, syn) = open(&mut dp, client);
    dp.apply(&[], &BTreeSet::new()).expect("service removed");

    let (verdict, data) = run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), ACK | PSH).with_payload(b"more"),
    );
    assert_eq!(
        (verdict, data.dst),
        (V::Forward, syn.dst),
        "an established flow must finish on its backend"
    );
    assert_checksums(&data, "DNAT after service removal");
    let (verdict, reply) = run(&mut dp, Dir::Egress, &Tcp::new(syn.dst, client, ACK));
    assert_eq!(
        (verdict, reply.src),
        (V::Forward, addr(VIP)),
        "its replies still come from the VIP"
    );

    let fresh = Tcp::new(addr("10.201.0.21:40011"), addr(VIP), SYN);
    let (verdict, out) = test_run(&mut dp, Dir::Ingress, &fresh.frame()).unwrap();
    assert_eq!(
        verdict,
        V::Ignore,
        "a new connection to a removed service is not steered"
    );
    assert_eq!(out, fresh.frame(), "and not modified");
}

/// The counters of service "web", cohort `cohort`, summed over backends.
fn cohort(dp: &Dataplane, cohort: Cohort) -> canary_common::stats::BackendCounters {
    dp.snapshot()
        .expect("snapshot")
        .service("web")
        .expect("service web")
        .cohort_counters(cohort)
}

fn a_whole_connection_is_measured_once_in_its_cohort(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    let client = addr("10.201.0.30:40020");
    let (_, syn) = open(&mut dp, client);
    assert_eq!(syn.dst, addr(CANARY));
    let c = cohort(&dp, Cohort::Canary);
    assert_eq!(
        (c.connections, c.active(), c.packets_from_client),
        (1, 1, 1),
        "after SYN: {c:?}"
    );

    let sent = b"GET / HTTP/1.0\r\n\r\n";
    let reply = b"HTTP/1.0 200 OK\r\n\r\nhello";
    for (dir, seg) in [
        (Dir::Egress, Tcp::new(addr(CANARY), client, SYN | ACK)),
        (Dir::Ingress, Tcp::new(client, addr(VIP), ACK)),
        (
            Dir::Ingress,
            Tcp::new(client, addr(VIP), ACK | PSH).with_payload(sent),
        ),
        (
            Dir::Egress,
            Tcp::new(addr(CANARY), client, ACK | PSH).with_payload(reply),
        ),
        (
            Dir::Egress,
            Tcp::new(addr(CANARY), client, ACK | PSH).with_payload(reply),
        ),
        (Dir::Ingress, Tcp::new(client, addr(VIP), FIN | ACK)),
        (Dir::Egress, Tcp::new(addr(CANARY), client, FIN | ACK)),
        (Dir::Ingress, Tcp::new(client, addr(VIP), ACK)),
    ] {
        let (verdict, _) = run(&mut dp, dir, &seg);
        assert_eq!(verdict, V::Forward, "{dir:?} flags {:#x}", seg.flags);
    }
    let snap = dp.snapshot().unwrap();
    let web = snap.service("web").unwrap();
    let c = web.cohort_counters(Cohort::Canary);
    assert_eq!(c.connections, 1, "{c:?}");
    assert_eq!(c.closed, 1, "FIN both ways closes exactly once: {c:?}");
    assert_eq!(c.active(), 0, "{c:?}");
    assert_eq!(
        c.bytes_from_client,
        sent.len() as u64,
        "payload bytes from the client: {c:?}"
    );
    assert_eq!(
        c.bytes_from_backend,
        2 * reply.len() as u64,
        "payload bytes from the backend: {c:?}"
    );
    assert_eq!(
        (c.packets_from_client, c.packets_from_backend),
        (5, 4),
        "{c:?}"
    );
    assert_eq!(
        (
            c.refused,
            c.resets_from_backend,
            c.resets_from_client,
            c.syn_retried
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(
        web.cohort_counters(Cohort::Stable),
        canary_common::stats::BackendCounters::default(),
        "nothing in stable"
    );

    let h = web.histograms[usize::from(Cohort::Canary)]
        .as_ref()
        .expect("canary histograms");
    let n = |b: &[u64]| b.iter().sum::<u64>();
    assert_eq!(n(&h.handshake_ns.buckets), 1, "one handshake timed");
    assert_eq!(
        n(&h.first_byte_ns.buckets),
        1,
        "one first byte timed (not two)"
    );
    assert_eq!(n(&h.duration_us.buckets), 1, "one duration");
    assert!(
        web.histograms[usize::from(Cohort::Stable)].is_none(),
        "stable saw no connection"
    );
}

/// The handshake sweep (with a zero timeout: every SYN is due) counts
/// only the handshake nothing ended, and counts it once however often it
/// sweeps.
fn only_an_unanswered_handshake_times_out_and_only_once(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    // Answered.
    let answered = addr("10.201.0.41:40041");
    open(&mut dp, answered);
    run(
        &mut dp,
        Dir::Egress,
        &Tcp::new(addr(CANARY), answered, SYN | ACK),
    );
    // Refused.
    let refused = addr("10.201.0.42:40042");
    open(&mut dp, refused);
    run(
        &mut dp,
        Dir::Egress,
        &Tcp::new(addr(CANARY), refused, RST | ACK),
    );
    // Given up by the client before an answer.
    let abandoned = addr("10.201.0.43:40043");
    open(&mut dp, abandoned);
    run(&mut dp, Dir::Ingress, &Tcp::new(abandoned, addr(VIP), RST));
    // Never answered.
    let silent = addr("10.201.0.44:40044");
    open(&mut dp, silent);

    let swept = dp.sweep_pending(Duration::ZERO).expect("sweep");
    assert_eq!(swept, 1, "only the unanswered handshake times out");
    assert_eq!(
        dp.sweep_pending(Duration::ZERO).expect("second sweep"),
        0,
        "a timeout is counted once"
    );
    let snap = dp.snapshot().expect("snapshot");
    let web = snap.service("web").expect("service web");
    assert_eq!(web.cohort_timeouts(Cohort::Canary), 1, "one timeout");
    let canary = cohort(&dp, Cohort::Canary);
    assert_eq!((canary.connections, canary.refused), (4, 1), "{canary:?}");
    let fwd = dp
        .conntrack_entry(&flow_key(silent, addr(VIP)))
        .expect("the timed-out flow stays tracked");
    assert_eq!(
        fwd.state & (ST_CLOSED | ST_FAILED),
        ST_CLOSED | ST_FAILED,
        "the timed-out flow is marked closed and failed: {:#x}",
        fwd.state
    );
}

#[expect(
    clippy::many_single_char_names,
    reason = "a to f are the connections, in the order the test opens them"
)]
fn refusals_resets_and_syn_retries_are_told_apart(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    // Refused: RST answering the SYN.
    let a = addr("10.201.0.31:40021");
    open(&mut dp, a);
    run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), a, RST | ACK));
    // Reset by the backend after the handshake.
    let b = addr("10.201.0.32:40022");
    open(&mut dp, b);
    run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), b, SYN | ACK));
    run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), b, RST | ACK));
    // Reset by the client, after a retransmitted SYN (twice: counted once).
    // A retry comes at least SYN_RETRY_MIN_NS after the first SYN.
    let c = addr("10.201.0.33:40023");
    open(&mut dp, c);
    age(&mut dp, c, SYN_RETRY_MIN_NS);
    open(&mut dp, c);
    open(&mut dp, c);
    run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), c, SYN | ACK));
    run(&mut dp, Dir::Ingress, &Tcp::new(c, addr(VIP), RST));

    let k = cohort(&dp, Cohort::Canary);
    assert_eq!(k.connections, 3, "{k:?}");
    assert_eq!(k.refused, 1, "{k:?}");
    assert_eq!(k.resets_from_backend, 1, "{k:?}");
    assert_eq!(k.resets_from_client, 1, "{k:?}");
    assert_eq!(k.syn_retried, 1, "one connection needed a SYN retry: {k:?}");
    assert_eq!(k.closed, 3, "{k:?}");
    assert_eq!(k.active(), 0, "{k:?}");
    let snap = dp.snapshot().unwrap();
    let h = snap.service("web").unwrap().histograms[usize::from(Cohort::Canary)]
        .clone()
        .unwrap();
    assert_eq!(
        h.handshake_ns.buckets.iter().sum::<u64>(),
        2,
        "two handshakes completed"
    );
    assert_eq!(
        h.duration_us.buckets.iter().sum::<u64>(),
        2,
        "a refused connection has no duration"
    );
}

fn the_breaker_trips_on_canary_refusals_and_stops_steering_there_at_once(m: IngressMode) {
    const TRIP: &str = "weight = \"100%\"\ncohort = \"per-connection\"";
    let mut dp = dataplane(m, TRIP);
    let mut events = dp.take_events().expect("event ring buffer");
    // Default breaker: 3 failures that are >= 50% of the window's attempts.
    for port in 0..3u16 {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 201, 0, 40)), 41_000 + port);
        let (_, syn) = open(&mut dp, client);
        assert_eq!(
            syn.dst,
            addr(CANARY),
            "attempt {port} before the trip goes to canary"
        );
        let (verdict, _) = run(
            &mut dp,
            Dir::Egress,
            &Tcp::new(addr(CANARY), client, RST | ACK),
        );
        assert_eq!(verdict, V::Forward, "the refusal still reaches the client");
    }
    let b = dp.breaker_state("web").expect("breaker window");
    assert_eq!((b.failures, b.attempts, b.tripped), (3, 3, 1), "{b:?}");
    // The very next new connection goes to stable, at 100 % canary weight.
    let (_, next) = open(&mut dp, addr("10.201.0.41:42000"));
    assert!(
        STABLE.map(addr).contains(&next.dst),
        "after the trip a new connection reached {}",
        next.dst
    );
    // One event, with the numbers that tripped it.
    let item = events.next().expect("a breaker event");
    let ev = canary_agent::dataplane::decode_breaker_event(&item).expect("a whole event");
    assert_eq!((ev.failures, ev.attempts), (3, 3), "{ev:?}");
    drop(item);
    assert!(events.next().is_none(), "exactly one event per trip");
    // The cut-off stands through an apply that does not clear it (the
    // agent may not have read the trip yet)…
    dp.apply(&services(TRIP), &BTreeSet::new()).unwrap();
    let (_, still) = open(&mut dp, addr("10.201.0.42:42000"));
    assert_ne!(
        still.dst,
        addr(CANARY),
        "an apply cleared a tripped breaker's cut-off"
    );
    // …until the breaker is reset (an operator's `resume`).
    dp.reset_breaker("web").unwrap();
    dp.apply(&services(TRIP), &BTreeSet::new()).unwrap();
    let (_, again) = open(&mut dp, addr("10.201.0.42:42001"));
    assert_eq!(again.dst, addr(CANARY), "cleared: canary again");
}

fn stable_failures_and_a_disabled_breaker_do_not_trip(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\ncohort = \"per-connection\"");
    for port in 0..10u16 {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 201, 0, 43)), 41_000 + port);
        let (_, syn) = open(&mut dp, client);
        run(&mut dp, Dir::Egress, &Tcp::new(syn.dst, client, RST | ACK));
    }
    assert_eq!(
        dp.breaker_state("web").unwrap().tripped,
        0,
        "stable refusals must not trip the canary's breaker"
    );

    let mut dp = dataplane(
        m,
        "weight = \"100%\"\ncohort = \"per-connection\"\n[service.breaker]\nenabled = false",
    );
    for port in 0..10u16 {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 201, 0, 44)), 41_000 + port);
        open(&mut dp, client);
        run(
            &mut dp,
            Dir::Egress,
            &Tcp::new(addr(CANARY), client, RST | ACK),
        );
    }
    assert_eq!(
        dp.breaker_state("web").unwrap().tripped,
        0,
        "a disabled breaker trips"
    );
    let (_, next) = open(&mut dp, addr("10.201.0.45:42000"));
    assert_eq!(next.dst, addr(CANARY));
}

fn a_rolled_back_service_sends_nothing_new_to_canary_not_even_always_canary(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"\nalways_canary = [\"10.201.0.0/16\"]");
    let (_, before) = open(&mut dp, addr("10.201.0.50:40000"));
    assert_eq!(before.dst, addr(CANARY));
    let off = BTreeSet::from(["web".to_string()]);
    dp.apply(
        &services("weight = \"100%\"\nalways_canary = [\"10.201.0.0/16\"]"),
        &off,
    )
    .unwrap();
    let (_, after) = open(&mut dp, addr("10.201.0.51:40000"));
    assert!(
        STABLE.map(addr).contains(&after.dst),
        "rolled back, yet reached {}",
        after.dst
    );
    // The canary connection opened before stays where it is.
    let (_, data) = run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(addr("10.201.0.50:40000"), addr(VIP), ACK),
    );
    assert_eq!(
        data.dst,
        addr(CANARY),
        "an established canary connection must not move"
    );
    // A reload keeps the rollback.
    dp.apply(
        &services("weight = \"100%\"\nalways_canary = [\"10.201.0.0/16\"]"),
        &off,
    )
    .unwrap();
    let (_, reloaded) = open(&mut dp, addr("10.201.0.52:40000"));
    assert!(
        STABLE.map(addr).contains(&reloaded.dst),
        "a reload re-raised the canary: {}",
        reloaded.dst
    );
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "a random byte is the low 8 bits of the generator"
)]
fn truncated_and_garbage_packets_are_counted_not_crashed_on(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"5%\"");
    let syn = Tcp::new(addr("10.201.0.1:40000"), addr(VIP), SYN).frame();
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44; // IHL 4 < 5
    let mut bad_doff = syn.clone();
    bad_doff[14 + 20 + 12] = 0x40; // TCP data offset 4 < 5
    let mut fragment = syn.clone();
    fragment[14 + 6] = 0x20; // MF set, offset 0: first fragment to the VIP
    let mut long_ihl = syn[..14 + 20 + 20].to_vec();
    long_ihl[14] = 0x4f; // IHL 15: a 60-byte header in a 40-byte packet
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than 14 + 20
    // bytes (EINVAL), so a header cut short is made with a long IHL.
    let cases: [(&str, Vec<u8>, V, Option<Counter>); 5] = [
        (
            "IP header longer than the packet",
            long_ihl,
            V::Ignore,
            Some(Counter::BadIpHeader),
        ),
        (
            "IHL below 5",
            bad_ihl,
            V::Ignore,
            Some(Counter::BadIpHeader),
        ),
        (
            "TCP header cut short",
            syn[..14 + 20 + 10].to_vec(),
            V::Ignore,
            Some(Counter::BadTcpHeader),
        ),
        (
            "TCP data offset below 5",
            bad_doff,
            V::Ignore,
            Some(Counter::BadTcpHeader),
        ),
        (
            "first fragment to a VIP",
            fragment,
            V::Drop,
            Some(Counter::Fragment),
        ),
    ];
    for (what, frame, expected, counted) in cases {
        let before = counted.map(|c| counter(&dp, c));
        let (verdict, _) = test_run(&mut dp, Dir::Ingress, &frame)
            .unwrap_or_else(|e| panic!("{what} len {}: {e:?}", frame.len()));
        assert_eq!(verdict, expected, "{what}: verdict");
        if let (Some(c), Some(before)) = (counted, before) {
            assert_eq!(
                counter(&dp, c),
                before + 1,
                "{what}: {} not counted",
                c.name()
            );
        }
    }

    // Random garbage, with an IPv4 ethertype so it reaches the parser: no
    // crash, only the three deliberate verdicts, and nothing tracked unless
    // it happened to be a well-formed SYN to the VIP (it cannot be: the VIP
    // address is not random here).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..2000 {
        // At least 14 + 20 bytes: the kernel's test harness refuses less.
        let len = 14 + 20 + (next() % 80) as usize;
        let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        if i % 2 == 0 {
            frame[14] = 0x45; // make many of them parse as far as TCP
            frame[14 + 9] = 6;
        }
        for dir in [Dir::Ingress, Dir::Egress] {
            let (verdict, _) = test_run(&mut dp, dir, &frame).unwrap_or_else(|e| {
                panic!(
                    "garbage #{i} len {len} {:02x?}: {e:?}",
                    &frame[..frame.len().min(40)]
                )
            });
            assert!(
                [V::Ignore, V::Forward, V::Drop].contains(&verdict),
                "garbage #{i}: unexpected verdict {verdict:?}"
            );
        }
    }
    assert!(
        counter(&dp, Counter::BadIpHeader) > 100,
        "garbage should hit bad_ip_header"
    );
    assert_eq!(dp.conntrack_len(), 0, "garbage created conntrack entries");
}

/// The breaker's window of service "web": (failures, attempts, tripped).
fn breaker(dp: &Dataplane) -> (u64, u64, u64) {
    let b = dp.breaker_state("web").expect("breaker window");
    (b.failures, b.attempts, b.tripped)
}

fn duplicate_syns_are_not_retries_only_a_late_unanswered_one_is(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"\ncohort = \"per-connection\"");
    // 20 pairs of back-to-back identical SYNs (a copy in the network, a
    // spoofer): far more than the breaker's 3 failures in a row.
    for port in 0..20u16 {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 201, 1, 1)), 41_000 + port);
        let (_, first) = open(&mut dp, client);
        let (verdict, copy) = open(&mut dp, client);
        assert_eq!(
            (verdict, copy.dst),
            (V::Forward, first.dst),
            "a duplicate SYN stays on its flow's backend"
        );
    }
    // A SYN after the backend's SYN-ACK (the SYN-ACK was lost on the way
    // to the client), even a whole second later: the backend answered.
    let answered = addr("10.201.1.2:42000");
    open(&mut dp, answered);
    run(
        &mut dp,
        Dir::Egress,
        &Tcp::new(addr(CANARY), answered, SYN | ACK),
    );
    age(&mut dp, answered, 1_000_000_000);
    open(&mut dp, answered);

    let k = cohort(&dp, Cohort::Canary);
    assert_eq!(
        (k.connections, k.syn_retried, k.refused),
        (21, 0, 0),
        "duplicates are neither connections nor retries: {k:?}"
    );
    assert_eq!(counter(&dp, Counter::SynRetransmit), 21);
    assert_eq!(counter(&dp, Counter::SynDuplicate), 21);
    assert_eq!(
        breaker(&dp),
        (0, 21, 0),
        "21 canary attempts, no failure, no trip"
    );

    // A SYN with no SYN-ACK, SYN_RETRY_MIN_NS after the first: a retry.
    let unanswered = addr("10.201.1.3:43000");
    open(&mut dp, unanswered);
    age(&mut dp, unanswered, SYN_RETRY_MIN_NS);
    let (_, retry) = open(&mut dp, unanswered);
    assert_eq!(retry.dst, addr(CANARY));
    let k = cohort(&dp, Cohort::Canary);
    assert_eq!(
        (k.connections, k.syn_retried),
        (22, 1),
        "a late SYN without a SYN-ACK is a retry failure: {k:?}"
    );
    assert_eq!(counter(&dp, Counter::SynDuplicate), 21);
    assert_eq!(breaker(&dp), (1, 22, 0), "one failure counted");
}

fn a_bare_ack_on_a_miss_reaches_its_backend_untracked_until_the_backend_answers(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"\ncohort = \"per-connection\"");
    // A stray ACK: the backend answers with a RST (no such connection).
    let stray = addr("10.201.2.1:40000");
    let (verdict, out) = run(&mut dp, Dir::Ingress, &Tcp::new(stray, addr(VIP), ACK));
    assert_eq!((verdict, out.dst), (V::Forward, addr(CANARY)));
    assert_checksums(&out, "DNAT of a stray ACK");
    assert_eq!(dp.conntrack_len(), 0, "a stray ACK entered conntrack");
    let (verdict, rst) = run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), stray, RST));
    assert_eq!(
        (verdict, rst.src),
        (V::Forward, addr(VIP)),
        "the backend's RST reaches the client from the VIP"
    );
    assert_checksums(&rst, "reverse NAT of the RST to a stray ACK");
    assert_eq!(counter(&dp, Counter::ReopenReset), 1);
    // Its second RST finds nothing: not ours any more.
    let (verdict, _) = run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), stray, RST));
    assert_eq!(verdict, V::Ignore, "the stray flow was forgotten");

    // A real flow whose entry was lost: it stays on the backend it
    // re-resolved to even if the weight changes before the backend answers,
    // and is tracked again from the backend's answer.
    let lost = addr("10.201.2.2:40000");
    let (_, first) = run(&mut dp, Dir::Ingress, &Tcp::new(lost, addr(VIP), ACK));
    assert_eq!(first.dst, addr(CANARY));
    dp.apply(
        &services("weight = \"0%\"\ncohort = \"per-connection\""),
        &BTreeSet::new(),
    )
    .expect("weight change applies");
    let (_, data) = run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(lost, addr(VIP), ACK | PSH).with_payload(b"more"),
    );
    assert_eq!(data.dst, addr(CANARY), "re-resolved anew before the answer");
    assert_eq!(dp.conntrack_len(), 0);
    let (verdict, reply) = run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), lost, ACK));
    assert_eq!((verdict, reply.src), (V::Forward, addr(VIP)));
    assert_eq!(counter(&dp, Counter::ReopenConfirmed), 1);
    let fwd = dp
        .conntrack_entry(&flow_key(lost, addr(VIP)))
        .expect("tracked once the backend answered");
    assert_eq!(
        (fwd.nat_addr, fwd.cohort, fwd.flags & CT_REOPENED),
        (
            canary_common::addr::Addr::from(addr(CANARY).ip()),
            COHORT_CANARY,
            CT_REOPENED
        ),
        "{fwd:?}"
    );
    assert!(
        dp.conntrack_entry(&flow_key(addr(CANARY), lost)).is_some(),
        "reverse entry"
    );
    // Its later RST is a reset of an open connection, not a refusal.
    run(&mut dp, Dir::Egress, &Tcp::new(addr(CANARY), lost, RST));

    let k = cohort(&dp, Cohort::Canary);
    assert_eq!(
        (k.connections, k.refused, k.syn_retried, k.reopened),
        (0, 0, 0, 1),
        "re-resolved flows are no connections, refusals or retries: {k:?}"
    );
    assert_eq!(
        (k.resets_from_backend, k.closed, k.active()),
        (1, 1, 0),
        "{k:?}"
    );
    assert_eq!(
        breaker(&dp),
        (0, 0, 0),
        "nothing for the breaker: no attempt, no failure"
    );
    assert_eq!(counter(&dp, Counter::CtMiss), 3);
    assert_eq!(counter(&dp, Counter::NewFlow), 0);
}

#[expect(clippy::cast_possible_truncation, reason = "ports 10000 to 59999")]
fn stray_acks_from_fresh_ports_cannot_evict_tracked_flows(m: IngressMode) {
    // The fixture's conntrack holds 4096 entries; 6000 strays would have
    // evicted every tracked flow if they were tracked.
    const TRACKED: u16 = 100;
    const STRAYS: u32 = 6000;
    let mut dp = dataplane(m, "weight = \"20%\"\ncohort = \"per-connection\"");
    let tracked: Vec<(SocketAddr, SocketAddr)> = (0..TRACKED)
        .map(|port| {
            let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 201, 3, 1)), 30_000 + port);
            let (_, syn) = open(&mut dp, client);
            (client, syn.dst)
        })
        .collect();
    let before = dp.conntrack_len();
    assert_eq!(before, 2 * usize::from(TRACKED));
    for i in 0..STRAYS {
        let stray = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(0x0aca_0000 + i / 50_000)),
            (10_000 + i % 50_000) as u16,
        );
        let (verdict, _) = run(&mut dp, Dir::Ingress, &Tcp::new(stray, addr(VIP), ACK));
        assert_eq!(verdict, V::Forward, "stray {i}");
    }
    assert_eq!(counter(&dp, Counter::CtMiss), u64::from(STRAYS));
    assert_eq!(
        dp.conntrack_len(),
        before,
        "{STRAYS} stray ACKs changed the conntrack table"
    );
    for (client, backend) in tracked {
        let (_, out) = run(&mut dp, Dir::Ingress, &Tcp::new(client, addr(VIP), ACK));
        assert_eq!(out.dst, backend, "tracked flow {client} moved");
        assert!(
            dp.conntrack_entry(&flow_key(backend, client)).is_some(),
            "tracked flow {client} lost its reverse entry"
        );
    }
    assert_eq!(counter(&dp, Counter::CtMiss), u64::from(STRAYS), "all hit");
    let connections: u64 = Cohort::ALL
        .into_iter()
        .map(|c| cohort(&dp, c).connections)
        .sum();
    assert_eq!(
        connections,
        u64::from(TRACKED),
        "strays counted as connections"
    );
}

/// SYN, SYN-ACK and ACK of `client`'s connection; returns its backend.
fn handshake(dp: &mut Fixture, client: SocketAddr) -> SocketAddr {
    let (_, syn) = open(dp, client);
    run(dp, Dir::Egress, &Tcp::new(syn.dst, client, SYN | ACK));
    run(dp, Dir::Ingress, &Tcp::new(client, addr(VIP), ACK));
    syn.dst
}

fn an_ignored_rst_changes_nothing_even_across_a_weight_change(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\ncohort = \"per-connection\"");
    let client = addr("10.201.4.1:40000");
    let backend = handshake(&mut dp, client);
    assert!(STABLE.map(addr).contains(&backend));
    // A forged RST (a random sequence number: the backend drops it).
    let forged = Tcp {
        seq: 0x5eed_1234,
        ..Tcp::new(client, addr(VIP), RST)
    };
    let (verdict, out) = run(&mut dp, Dir::Ingress, &forged);
    assert_eq!((verdict, out.dst), (V::Forward, backend));
    assert_closing(&dp, client, backend, "after the forged RST");
    assert_eq!(cohort(&dp, Cohort::Stable).active(), 0, "closed at the RST");

    dp.apply(
        &services("weight = \"100%\"\ncohort = \"per-connection\""),
        &BTreeSet::new(),
    )
    .expect("weight change applies");
    let (verdict, data) = run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), ACK | PSH).with_payload(b"still here"),
    );
    assert_eq!(
        (verdict, data.dst),
        (V::Forward, backend),
        "the flow moved after an ignored RST and a weight change"
    );
    assert_checksums(&data, "DNAT on a closing flow");
    // The backend answers (twice): the RST was ignored, counted once.
    for _ in 0..2 {
        let (verdict, reply) = run(
            &mut dp,
            Dir::Egress,
            &Tcp::new(backend, client, ACK | PSH).with_payload(b"ok"),
        );
        assert_eq!((verdict, reply.src), (V::Forward, addr(VIP)));
    }
    assert_eq!(counter(&dp, Counter::RstIgnored), 1);
    let fwd = dp.conntrack_entry(&flow_key(client, addr(VIP))).unwrap();
    let rev = dp.conntrack_entry(&flow_key(backend, client)).unwrap();
    assert_eq!(
        (fwd.state & ST_RST, rev.state & ST_RST),
        (0, 0),
        "closing mark cleared"
    );
    let k = cohort(&dp, Cohort::Stable);
    assert_eq!(
        (k.connections, k.active(), k.resets_from_client),
        (1, 1, 1),
        "open again; the RST itself still counted: {k:?}"
    );

    // It ends later by FIN both ways: closed once more, one duration.
    run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), FIN | ACK),
    );
    run(&mut dp, Dir::Egress, &Tcp::new(backend, client, FIN | ACK));
    let k = cohort(&dp, Cohort::Stable);
    assert_eq!(k.active(), 0, "{k:?}");
    let snap = dp.snapshot().unwrap();
    let h = snap.service("web").unwrap().histograms[usize::from(Cohort::Stable)]
        .clone()
        .unwrap();
    assert_eq!(
        h.duration_us.buckets.iter().sum::<u64>(),
        1,
        "one duration per connection"
    );
    assert_eq!(counter(&dp, Counter::NewFlow), 1);
}

fn an_accepted_rst_ends_the_flow_and_a_new_syn_reuses_its_entry(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"\ncohort = \"per-connection\"");
    let client = addr("10.201.4.2:40000");
    let backend = handshake(&mut dp, client);
    run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), RST | ACK),
    );
    // The backend's data in flight meets a closed socket: the client
    // answers it with RSTs. Nothing but RSTs follows: the flow stays over.
    run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP), ACK | PSH).with_payload(b"late"),
    );
    run(&mut dp, Dir::Egress, &Tcp::new(backend, client, RST));
    run(&mut dp, Dir::Ingress, &Tcp::new(client, addr(VIP), RST));
    assert_closing(&dp, client, backend, "after an accepted RST");
    let k = cohort(&dp, Cohort::Stable);
    assert_eq!(
        (
            k.closed,
            k.active(),
            k.resets_from_client,
            k.resets_from_backend
        ),
        (1, 0, 1, 0),
        "one close, one reset: {k:?}"
    );
    assert_eq!(counter(&dp, Counter::RstIgnored), 0);

    // The port is reused: a new connection, steered at the new weight.
    dp.apply(
        &services("weight = \"100%\"\ncohort = \"per-connection\""),
        &BTreeSet::new(),
    )
    .expect("weight change applies");
    let (_, reuse) = open(&mut dp, client);
    assert_eq!(
        reuse.dst,
        addr(CANARY),
        "a SYN after a RST is a new connection"
    );
    let fwd = dp.conntrack_entry(&flow_key(client, addr(VIP))).unwrap();
    assert_eq!((fwd.state, fwd.cohort), (0, COHORT_CANARY), "a fresh entry");
    assert_eq!(counter(&dp, Counter::NewFlow), 2);
}

const VIP6: &str = "[fd00:96::10]:80";
const STABLE6: &str = "[fd00:1::10]:8080";
const CANARY6: &str = "[fd00:2::10]:8080";

/// The IPv4 test service beside an IPv6 one on the same port, whose body
/// gets `extra`.
fn dual_stack(m: IngressMode, extra: &str) -> Fixture {
    require_root();
    let text = format!(
        "[agent]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\ncanary = [\"{CANARY}\"]\n\
         [[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nstable = [\"{STABLE6}\"]\n\
         canary = [\"{CANARY6}\"]\n{extra}\n",
        STABLE[0]
    );
    let services = Config::parse(&text, Path::new("fixture.toml"), &[])
        .expect("dual-stack fixture config is valid")
        .services;
    let mut dp = Dataplane::load(Capacity {
        conntrack: 4096,
        ..Capacity::default()
    })
    .expect("programs load and pass the verifier");
    dp.apply(&services, &BTreeSet::new())
        .expect("fixture services apply");
    Fixture { dp, mode: m }
}

fn an_ipv6_connection_is_steered_reverse_natted_and_tracked(m: IngressMode) {
    let mut dp = dual_stack(m, "weight = \"100%\"\ncohort = \"per-connection\"");
    let client = addr("[fd00:201::7]:40000");
    let (verdict, out) = run(&mut dp, Dir::Ingress, &Tcp::new(client, addr(VIP6), SYN));
    assert_eq!(verdict, V::Forward, "a SYN to the IPv6 VIP is ours");
    assert_eq!(
        out.dst,
        addr(CANARY6),
        "100 % canary: DNAT to the canary backend"
    );
    assert_eq!(out.src, client, "the client address is preserved");
    assert_checksums(&out, "IPv6 DNAT");
    let fwd = dp
        .conntrack_entry(&flow_key(client, addr(VIP6)))
        .expect("the IPv6 flow is tracked");
    assert_eq!(fwd.cohort, COHORT_CANARY);
    for (flags, payload) in [(SYN | ACK, &b""[..]), (ACK | PSH, &b"hello over IPv6"[..])] {
        let reply = Tcp::new(addr(CANARY6), client, flags).with_payload(payload);
        let (verdict, out) = run(&mut dp, Dir::Egress, &reply);
        assert_eq!(verdict, V::Forward);
        assert_eq!(out.src, addr(VIP6), "reply source must be the IPv6 VIP");
        assert_eq!(out.dst, client);
        assert_eq!(out.payload, payload);
        assert_checksums(&out, "IPv6 reverse NAT");
    }
    let (verdict, out) = run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(client, addr(VIP6), ACK | PSH).with_payload(b"GET /"),
    );
    assert_eq!(
        (verdict, out.dst),
        (V::Forward, addr(CANARY6)),
        "the flow stays put"
    );
    assert_checksums(&out, "IPv6 DNAT of data");
    assert_eq!(counter(&dp, Counter::NewFlow), 1);
}

fn ipv6_extension_headers_are_passed_untouched_and_counted(m: IngressMode) {
    let mut dp = dual_stack(m, "weight = \"100%\"");
    let client = addr("[fd00:201::8]:40000");
    for ext in [
        canary_tests::packet::EXT_HOP_BY_HOP,
        canary_tests::packet::EXT_DEST_OPTS,
        canary_tests::packet::EXT_FRAGMENT,
    ] {
        let frame = Tcp::new(client, addr(VIP6), SYN).with_ext(ext, 8).frame();
        let (verdict, out) = test_run(&mut dp, Dir::Ingress, &frame).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            verdict,
            V::Ignore,
            "extension header {ext}: passed to the stack"
        );
        assert_eq!(out, frame, "extension header {ext}: untouched");
    }
    assert_eq!(counter(&dp, Counter::Ipv6ExtHeader), 3);
    assert_eq!(dp.conntrack_len(), 0, "nothing tracked");
}

fn ipv6_rules_match_ipv6_prefixes_and_families_never_meet(m: IngressMode) {
    let mut dp = dual_stack(
        m,
        "weight = \"100%\"\ncohort = \"per-connection\"\nnever_canary = [\"fd00:99::/64\"]",
    );
    let excluded = addr("[fd00:99::1234]:40001");
    let (_, out) = run(&mut dp, Dir::Ingress, &Tcp::new(excluded, addr(VIP6), SYN));
    assert_eq!(
        out.dst,
        addr(STABLE6),
        "never_canary decides before the weight"
    );
    let neighbour = addr("[fd00:98::1]:40001");
    let (_, out) = run(&mut dp, Dir::Ingress, &Tcp::new(neighbour, addr(VIP6), SYN));
    assert_eq!(
        out.dst,
        addr(CANARY6),
        "outside the prefix the weight decides"
    );
    // An IPv6 packet to the IPv4-mapped spelling of the IPv4 VIP is not
    // the IPv4 service: keys carry the family.
    let mapped = addr("[::ffff:10.96.0.10]:80");
    let frame = Tcp::new(addr("[fd00:201::9]:40002"), mapped, SYN).frame();
    let (verdict, out) = test_run(&mut dp, Dir::Ingress, &frame).expect("BPF_PROG_TEST_RUN");
    assert_eq!(
        (verdict, &out),
        (V::Ignore, &frame),
        "no IPv4 service for IPv6 packets"
    );
    // And the IPv4 service on the same port still works beside it.
    let (verdict, out) = open(&mut dp, addr("10.201.0.9:40003"));
    assert_eq!(
        (verdict, out.dst),
        (V::Forward, addr(STABLE[0])),
        "IPv4 weight is 0"
    );
}

/// A flow past its drain deadline (the agent's `ST_DRAIN` mark): the
/// client's next segment goes on to its backend as a RST (ACK kept,
/// sequence number and payload as sent, checksums valid), counted once,
/// and the flow is closing; the next segment is forwarded as it is.
fn a_drained_flow_turns_the_clients_next_segment_into_a_rst(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    let client = addr("10.201.0.30:40030");
    let (_, syn) = open(&mut dp, client);
    assert_eq!(syn.dst, addr(CANARY));
    let key = flow_key(client, addr(VIP));
    let mut fwd = dp.conntrack_entry(&key).expect("tracked");
    fwd.state |= canary_common::flow::ST_DRAIN;
    dp.conntrack_insert(key, fwd).expect("marked");
    let data = Tcp::new(client, addr(VIP), ACK | PSH).with_payload(b"GET\n");
    let (verdict, out) = run(&mut dp, Dir::Ingress, &data);
    assert_eq!((verdict, out.dst), (V::Forward, addr(CANARY)));
    assert_eq!(out.flags, RST | ACK, "the segment became a RST: {out:?}");
    assert_eq!(out.payload, b"GET\n");
    assert_checksums(&out, "the drain's RST");
    assert_eq!(counter(&dp, Counter::DrainReset), 1);
    assert_closing(&dp, client, addr(CANARY), "after the drain's RST");
    let (_, next) = run(&mut dp, Dir::Ingress, &data);
    assert_eq!(next.flags, ACK | PSH, "converted once");
    assert_eq!(counter(&dp, Counter::DrainReset), 1);
}

in_both_modes!(
    a_drained_flow_turns_the_clients_next_segment_into_a_rst,
    syn_to_vip_is_dnated_with_valid_checksums_and_tracked,
    next_packet_after_a_weight_change_stays_on_its_backend,
    backend_reply_is_rewritten_to_come_from_the_vip,
    foreign_packets_are_untouched_and_unspec,
    rst_from_either_side_closes_the_flow_and_keeps_it_closing,
    a_syn_after_the_clients_fin_is_a_new_connection,
    conntrack_miss_reresolves_to_the_same_cohort_and_backend,
    source_rules_decide_before_the_weight,
    rule_changes_apply_atomically_and_old_rules_are_removed,
    removing_a_service_drains_it_established_flows_finish_new_ones_are_not_steered,
    a_whole_connection_is_measured_once_in_its_cohort,
    refusals_resets_and_syn_retries_are_told_apart,
    only_an_unanswered_handshake_times_out_and_only_once,
    the_breaker_trips_on_canary_refusals_and_stops_steering_there_at_once,
    stable_failures_and_a_disabled_breaker_do_not_trip,
    a_rolled_back_service_sends_nothing_new_to_canary_not_even_always_canary,
    truncated_and_garbage_packets_are_counted_not_crashed_on,
    duplicate_syns_are_not_retries_only_a_late_unanswered_one_is,
    a_bare_ack_on_a_miss_reaches_its_backend_untracked_until_the_backend_answers,
    stray_acks_from_fresh_ports_cannot_evict_tracked_flows,
    an_ignored_rst_changes_nothing_even_across_a_weight_change,
    an_accepted_rst_ends_the_flow_and_a_new_syn_reuses_its_entry,
    an_ipv6_connection_is_steered_reverse_natted_and_tracked,
    ipv6_extension_headers_are_passed_untouched_and_counted,
    ipv6_rules_match_ipv6_prefixes_and_families_never_meet,
);

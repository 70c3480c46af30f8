//! UDP packet fixtures: the real programs through `BPF_PROG_TEST_RUN`, on
//! hand-built datagrams and ICMP errors, IPv4 and IPv6, client packets
//! through TC ingress and through XDP; every rewritten frame's checksums
//! recomputed from scratch.
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
    net::{IpAddr, SocketAddr},
    path::Path,
};

use canary_agent::{
    config::{Config, IngressMode, Protocol},
    dataplane::{Capacity, Dataplane, flow_key, flow_key_of},
};
use canary_common::{
    counters::Counter,
    flow::{CT_REVERSE, ST_CLOSED, ST_REFUSED, ST_RESPONSE, ST_TIMED_OUT},
    service::{COHORT_CANARY, COHORT_STABLE, Cohort},
    stats::BackendCounters,
};
use canary_tests::{
    packet::{IcmpError, ParsedIcmp, ParsedUdp, SYN, Tcp, Udp, parse, parse_icmp, parse_udp},
    require_root,
};
use fixture::{Dir, Fixture, V, addr, counter, test_run};

/// One family's UDP service: name, VIP, stable and canary backend.
#[derive(Clone, Copy)]
struct Svc {
    name: &'static str,
    vip: &'static str,
    stable: &'static str,
    canary: &'static str,
    client: &'static str,
}

const V4: Svc = Svc {
    name: "dns",
    vip: "10.96.0.53:53",
    stable: "10.0.1.53:5353",
    canary: "10.0.2.53:5353",
    client: "10.201.0.7",
};
const V6: Svc = Svc {
    name: "dns6",
    vip: "[fd00::53]:53",
    stable: "[fd00:1::53]:5353",
    canary: "[fd00:2::53]:5353",
    client: "fd00:201::7",
};
/// A TCP service on the IPv4 UDP service's VIP:port.
const TCP_BACKEND: &str = "10.0.3.53:53";

impl Svc {
    fn vip(self) -> SocketAddr {
        addr(self.vip)
    }
    fn stable(self) -> SocketAddr {
        addr(self.stable)
    }
    fn canary(self) -> SocketAddr {
        addr(self.canary)
    }
    /// The client at `port`.
    fn client(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.client.parse().unwrap(), port)
    }
}

/// A data plane with [`dataplane_services`].
fn dataplane(mode: IngressMode, extra: &str) -> Fixture {
    require_root();
    let services = dataplane_services(extra);
    let mut dp = Dataplane::load(Capacity {
        conntrack: 4096,
        udp_conntrack: 4096,
        ..Capacity::default()
    })
    .expect("programs load and pass the verifier");
    dp.apply(&services, &BTreeSet::new())
        .expect("fixture services apply");
    Fixture { dp, mode }
}

/// Runs `dir` on datagram `d`: the verdict and the parsed output.
fn send(dp: &mut Fixture, dir: Dir, d: &Udp) -> (V, ParsedUdp) {
    let (verdict, out) = test_run(dp, dir, &d.frame()).expect("BPF_PROG_TEST_RUN");
    let parsed =
        parse_udp(&out).unwrap_or_else(|| panic!("program output is not a UDP frame: {out:02x?}"));
    (verdict, parsed)
}

fn assert_checksums(p: &ParsedUdp, what: &str) {
    assert!(p.ip_csum_ok, "{what}: IP checksum wrong: {p:?}");
    assert!(p.udp_csum_ok, "{what}: UDP checksum wrong: {p:?}");
}

/// The counters of service `name`, cohort `cohort`.
fn cohort(dp: &Dataplane, name: &str, cohort: Cohort) -> BackendCounters {
    dp.snapshot()
        .expect("snapshot")
        .service(name)
        .unwrap_or_else(|| panic!("service {name}"))
        .cohort_counters(cohort)
}

fn udp_key(src: SocketAddr, dst: SocketAddr) -> canary_common::flow::FlowKey {
    flow_key_of(Protocol::Udp, src, dst)
}

/// Moves flow `client` → `svc`'s VIP into the past: its start by
/// `started_ns`, the last datagram of both halves by `idle_ns`.
fn age(dp: &mut Dataplane, svc: Svc, client: SocketAddr, started_ns: u64, idle_ns: u64) {
    let key = udp_key(client, svc.vip());
    let mut fwd = dp.conntrack_entry(&key).expect("a tracked flow to age");
    let backend = SocketAddr::new(IpAddr::from(fwd.nat_addr), u16::from_be(fwd.nat_port));
    fwd.created_ns -= started_ns;
    fwd.request_ns -= idle_ns;
    dp.conntrack_insert(key, fwd).unwrap();
    let rkey = udp_key(backend, client);
    let mut rev = dp.conntrack_entry(&rkey).expect("the reverse half");
    rev.request_ns -= idle_ns;
    dp.conntrack_insert(rkey, rev).unwrap();
}

const SECOND: u64 = 1_000_000_000;

fn a_first_datagram_is_steered_its_reply_reverse_natted_and_both_measured(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    for (i, svc) in [V4, V6].into_iter().enumerate() {
        let client = svc.client(40000);
        let query = Udp::new(client, svc.vip(), b"query one");
        let (verdict, out) = send(&mut dp, Dir::Ingress, &query);
        assert_eq!(
            verdict,
            V::Forward,
            "{}: the first datagram is ours",
            svc.name
        );
        assert_eq!(
            (out.src, out.dst, out.payload.as_slice()),
            (client, svc.canary(), &b"query one"[..]),
            "{}: DNAT to canary at 100 %",
            svc.name
        );
        assert_checksums(&out, "UDP DNAT");
        let fwd = dp.conntrack_entry(&udp_key(client, svc.vip())).unwrap();
        assert_eq!(
            (fwd.cohort, fwd.flags & CT_REVERSE, fwd.idle_ms),
            (COHORT_CANARY, 0, 30_000)
        );
        assert!(
            dp.conntrack_entry(&flow_key(client, svc.vip())).is_none(),
            "UDP flows are not in the TCP table"
        );

        let answer = Udp::new(svc.canary(), client, b"answer");
        let (verdict, back) = send(&mut dp, Dir::Egress, &answer);
        assert_eq!(verdict, V::Forward);
        assert_eq!(
            (back.src, back.dst),
            (svc.vip(), client),
            "the reply comes from the VIP"
        );
        assert_checksums(&back, "UDP reverse NAT");

        // The flow stays on its backend whatever the weight says now.
        let (_, again) = send(
            &mut dp,
            Dir::Ingress,
            &Udp::new(client, svc.vip(), b"query two"),
        );
        assert_eq!(again.dst, svc.canary());
        assert_checksums(&again, "UDP DNAT of a tracked flow");
        assert_eq!(
            counter(&dp, Counter::NewFlow),
            i as u64 + 1,
            "one new flow per family"
        );

        let c = cohort(&dp, svc.name, Cohort::Canary);
        assert_eq!(
            (c.connections, c.packets_from_client, c.packets_from_backend),
            (1, 2, 1),
            "{}: {c:?}",
            svc.name
        );
        assert_eq!(
            (c.bytes_from_client, c.bytes_from_backend),
            (18, 6),
            "payload bytes each way"
        );
        let snap = dp.snapshot().unwrap();
        let h = snap
            .service(svc.name)
            .unwrap()
            .histograms_of(Cohort::Canary)
            .expect("canary histograms");
        assert_eq!(
            h.first_byte_ns.buckets.iter().sum::<u64>(),
            1,
            "one response time: first datagram → first reply"
        );
        assert_eq!(
            h.handshake_ns.buckets.iter().sum::<u64>(),
            0,
            "UDP has no handshake"
        );
        let fwd = dp.conntrack_entry(&udp_key(client, svc.vip())).unwrap();
        assert!(
            fwd.state & ST_RESPONSE != 0,
            "the forward half knows it was answered"
        );
    }
    let b = dp.breaker_state("dns").unwrap();
    assert_eq!(
        (b.attempts, b.failures),
        (1, 0),
        "a new canary flow is an attempt"
    );
}

fn a_zero_checksum_stays_zero_and_a_result_of_zero_is_sent_as_ffff(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"");
    // IPv4: checksum 0 means "none" and stays 0, both ways.
    let client = V4.client(40100);
    let (verdict, out) = send(
        &mut dp,
        Dir::Ingress,
        &Udp::new(client, V4.vip(), b"no checksum").with_checksum(0),
    );
    assert_eq!((verdict, out.dst), (V::Forward, V4.stable()));
    assert!(out.ip_csum_ok, "{out:?}");
    assert_eq!(out.checksum, 0, "a zero UDP checksum stays zero");
    let (_, back) = send(
        &mut dp,
        Dir::Egress,
        &Udp::new(V4.stable(), client, b"none back").with_checksum(0),
    );
    assert_eq!(
        (back.src, back.checksum),
        (V4.vip(), 0),
        "and zero on the way back"
    );

    // A payload word chosen so that the rewritten datagram sums to all
    // ones: its checksum computes to 0, which must be sent as 0xFFFF.
    for (svc, port) in [(V4, 40101), (V6, 40101)] {
        let client = svc.client(port);
        let zero_after = |src: SocketAddr, dst: SocketAddr| -> Vec<u8> {
            let mut payload = vec![0, 0, b'p', b'a', b'd'];
            let c = Udp::new(src, dst, &payload).segment();
            let c = [c[6], c[7]];
            payload[..2].copy_from_slice(&c);
            payload
        };
        let payload = zero_after(client, svc.stable());
        let query = Udp::new(client, svc.vip(), &payload);
        assert_ne!(
            u16::from_be_bytes([query.segment()[6], query.segment()[7]]),
            0xffff,
            "the datagram as sent has an ordinary checksum"
        );
        let (_, out) = send(&mut dp, Dir::Ingress, &query);
        assert_eq!(out.dst, svc.stable());
        assert_eq!(
            out.checksum, 0xffff,
            "{}: a result of 0 is sent as 0xFFFF",
            svc.name
        );
        assert_checksums(&out, "fold to zero, DNAT");

        let payload = zero_after(svc.vip(), client);
        let (_, back) = send(
            &mut dp,
            Dir::Egress,
            &Udp::new(svc.stable(), client, &payload),
        );
        assert_eq!(back.src, svc.vip());
        assert_eq!(back.checksum, 0xffff, "{}: and on the way back", svc.name);
        assert_checksums(&back, "fold to zero, reverse NAT");
    }

    // IPv6 forbids checksum 0: counted, passed untouched.
    let frame = Udp::new(V6.client(40102), V6.vip(), b"bad")
        .with_checksum(0)
        .frame();
    let (verdict, out) = test_run(&mut dp, Dir::Ingress, &frame).unwrap();
    assert_eq!(
        (verdict, out == frame),
        (V::Ignore, true),
        "IPv6 zero checksum: passed as is"
    );
    assert_eq!(counter(&dp, Counter::Udp6ZeroChecksum), 1);
}

fn idle_flows_end_their_next_datagram_starts_a_new_flow_and_the_sweep_removes_them(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"0%\"");
    let client = V4.client(40200);
    let (_, first) = send(&mut dp, Dir::Ingress, &Udp::new(client, V4.vip(), b"a"));
    assert_eq!(first.dst, V4.stable());
    send(&mut dp, Dir::Egress, &Udp::new(V4.stable(), client, b"b"));
    // 29 s idle of 30: still the same flow, wherever the weight goes.
    age(&mut dp, V4, client, 29 * SECOND, 29 * SECOND);
    reload(&mut dp, "weight = \"100%\"");
    let (_, same) = send(&mut dp, Dir::Ingress, &Udp::new(client, V4.vip(), b"c"));
    assert_eq!(
        same.dst,
        V4.stable(),
        "a flow not yet idle keeps its backend"
    );
    assert_eq!(counter(&dp, Counter::NewFlow), 1);
    assert_eq!(
        dp.sweep_udp().unwrap().expired,
        0,
        "nothing idle for the sweep"
    );

    // Idle for its whole timeout: the next datagram is a new flow, steered
    // afresh (to canary at 100 %), and the old one's close is counted.
    age(&mut dp, V4, client, 31 * SECOND, 31 * SECOND);
    let (_, fresh) = send(&mut dp, Dir::Ingress, &Udp::new(client, V4.vip(), b"d"));
    assert_eq!(
        fresh.dst,
        V4.canary(),
        "an expired flow is absent: chosen afresh"
    );
    assert_checksums(&fresh, "DNAT of the new flow");
    assert_eq!(counter(&dp, Counter::NewFlow), 2);
    assert_eq!(counter(&dp, Counter::UdpExpired), 1);
    let stable = cohort(&dp, V4.name, Cohort::Stable);
    assert_eq!((stable.connections, stable.closed), (1, 1), "{stable:?}");
    let snap = dp.snapshot().unwrap();
    let durations = snap
        .service(V4.name)
        .unwrap()
        .histograms_of(Cohort::Stable)
        .unwrap()
        .duration_us
        .buckets
        .iter()
        .sum::<u64>();
    assert_eq!(durations, 1, "the ended flow's duration");

    // The server keeps an otherwise quiet flow alive: a reply refreshes it.
    // (The sweep does remove the stable flow's reverse half, left behind
    // when the flow moved to canary and idle since.)
    age(&mut dp, V4, client, 31 * SECOND, 31 * SECOND);
    send(
        &mut dp,
        Dir::Egress,
        &Udp::new(V4.canary(), client, b"push"),
    );
    assert!(dp.conntrack_entry(&udp_key(V4.stable(), client)).is_some());
    assert_eq!(
        dp.sweep_udp().unwrap().expired,
        1,
        "only the orphaned reverse half"
    );
    assert!(dp.conntrack_entry(&udp_key(V4.stable(), client)).is_none());
    let fwd = dp.conntrack_entry(&udp_key(client, V4.vip())).unwrap();
    assert!(
        fwd.state & ST_CLOSED == 0,
        "the reply kept the flow: {fwd:?}"
    );

    // The sweep ends a flow no datagram comes to end: counted once, both
    // halves removed.
    age(&mut dp, V4, client, 31 * SECOND, 31 * SECOND);
    let swept = dp.sweep_udp().unwrap();
    assert_eq!(swept.expired, 1, "{swept:?}");
    assert_eq!(dp.conntrack_len(), 0, "both halves removed");
    let canary = cohort(&dp, V4.name, Cohort::Canary);
    assert_eq!((canary.connections, canary.closed), (1, 1), "{canary:?}");
    assert_eq!(counter(&dp, Counter::UdpExpired), 2);

    // More idle flows than one sweep run takes (32): all end, each once.
    for port in 41_000..41_075 {
        let client = V4.client(port);
        send(&mut dp, Dir::Ingress, &Udp::new(client, V4.vip(), b"e"));
        age(&mut dp, V4, client, 31 * SECOND, 31 * SECOND);
    }
    assert_eq!(
        dp.sweep_udp().unwrap().expired,
        75,
        "every idle flow, in three runs"
    );
    assert_eq!(dp.conntrack_len(), 0);
    assert_eq!(counter(&dp, Counter::UdpExpired), 77);
    assert_eq!(cohort(&dp, V4.name, Cohort::Canary).closed, 76);
}

/// Re-applies the fixture services with `extra`.
fn reload(dp: &mut Fixture, extra: &str) {
    dp.dp
        .apply(&dataplane_services(extra), &BTreeSet::new())
        .expect("reload applies");
}

/// Both UDP services (with `extra` keys each) and the TCP one (weight 0)
/// on the IPv4 VIP:port.
fn dataplane_services(extra: &str) -> Vec<canary_agent::config::ServiceConfig> {
    let mut text = "[agent]\ninterfaces = [\"lo\"]\n".to_string();
    for s in [V4, V6] {
        text.push_str(&format!(
            "[[service]]\nname = \"{}\"\nvip = \"{}\"\nprotocol = \"udp\"\nstable = [\"{}\"]\n\
             canary = [\"{}\"]\ncohort = \"per-connection\"\n{extra}\n",
            s.name, s.vip, s.stable, s.canary
        ));
    }
    text.push_str(&format!(
        "[[service]]\nname = \"dns-tcp\"\nvip = \"{}\"\nstable = [\"{TCP_BACKEND}\"]\n",
        V4.vip
    ));
    Config::parse(&text, Path::new("fixture.toml"), &[])
        .unwrap()
        .services
}

fn a_tcp_and_a_udp_service_on_one_vip_port_are_two_services(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    let client = V4.client(40300);
    let (verdict, tcp) = {
        let (v, out) = test_run(
            &mut dp,
            Dir::Ingress,
            &Tcp::new(client, V4.vip(), SYN).frame(),
        )
        .unwrap();
        (v, parse(&out).expect("a TCP frame"))
    };
    assert_eq!(
        (verdict, tcp.dst),
        (V::Forward, addr(TCP_BACKEND)),
        "TCP to the TCP service"
    );
    assert!(tcp.tcp_csum_ok);
    let (verdict, udp) = send(&mut dp, Dir::Ingress, &Udp::new(client, V4.vip(), b"q"));
    assert_eq!(
        (verdict, udp.dst),
        (V::Forward, V4.canary()),
        "UDP to the UDP service"
    );
    assert!(
        dp.conntrack_entry(&flow_key(client, V4.vip())).is_some(),
        "TCP table"
    );
    assert!(
        dp.conntrack_entry(&udp_key(client, V4.vip())).is_some(),
        "UDP table"
    );
    assert_eq!(cohort(&dp, "dns-tcp", Cohort::Stable).connections, 1);
    assert_eq!(cohort(&dp, V4.name, Cohort::Canary).connections, 1);
    // Another port of the VIP is nobody's.
    let other = Udp::new(client, addr("10.96.0.53:54"), b"q");
    let (verdict, out) = test_run(&mut dp, Dir::Ingress, &other.frame()).unwrap();
    assert_eq!((verdict, out), (V::Ignore, other.frame()));
}

/// Sends the first datagram of a flow from `client` and returns the frame
/// the backend got.
fn first_datagram(dp: &mut Fixture, svc: Svc, client: SocketAddr) -> Vec<u8> {
    let (verdict, out) = test_run(
        dp,
        Dir::Ingress,
        &Udp::new(client, svc.vip(), b"is anyone there").frame(),
    )
    .unwrap();
    assert_eq!(verdict, V::Forward);
    out
}

fn assert_icmp_natted(p: &ParsedIcmp, svc: Svc, client: SocketAddr, what: &str) {
    assert!(p.ip_csum_ok, "{what}: outer IP checksum: {p:?}");
    assert!(p.icmp_csum_ok, "{what}: ICMP checksum: {p:?}");
    assert_eq!(p.dst, client.ip(), "{what}: to the client");
    assert_eq!(
        (p.quote.src, p.quote.dst),
        (client, svc.vip()),
        "{what}: the quote is the datagram the client sent"
    );
    assert!(p.quote.ip_csum_ok, "{what}: quoted IP checksum: {p:?}");
}

fn an_icmp_port_unreachable_is_reverse_natted_inside_out_and_refuses_the_flow(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    for svc in [V4, V6] {
        let client = svc.client(40400);
        let sent = first_datagram(&mut dp, svc, client);
        let error = IcmpError::port_unreachable(svc.canary().ip(), &sent[14..]);
        let (verdict, out) = test_run(&mut dp, Dir::Egress, &error.frame()).unwrap();
        assert_eq!(verdict, V::Forward, "{}: the error is ours", svc.name);
        let p = parse_icmp(&out).expect("an ICMP error");
        assert_icmp_natted(&p, svc, client, svc.name);
        assert_eq!(
            p.src,
            svc.vip().ip(),
            "{}: the backend's error comes from the VIP",
            svc.name
        );
        assert_eq!(
            p.quote.l4_csum_ok,
            Some(true),
            "{}: the quoted UDP checksum: {p:?}",
            svc.name
        );
        let fwd = dp.conntrack_entry(&udp_key(client, svc.vip())).unwrap();
        assert!(
            fwd.state & (ST_REFUSED | ST_CLOSED) == ST_REFUSED | ST_CLOSED,
            "{fwd:?}"
        );
        let c = cohort(&dp, svc.name, Cohort::Canary);
        assert_eq!(
            (c.refused, c.failed, c.closed),
            (1, 1, 1),
            "{}: {c:?}",
            svc.name
        );
        let b = dp.breaker_state(svc.name).unwrap();
        assert_eq!(
            (b.attempts, b.failures),
            (1, 1),
            "{}: a breaker failure",
            svc.name
        );
        // The client's next datagram is a new flow.
        first_datagram(&mut dp, svc, client);
        assert_eq!(cohort(&dp, svc.name, Cohort::Canary).connections, 2);
    }
    assert_eq!(counter(&dp, Counter::IcmpErrorNatted), 2);

    // From a router on the way (time exceeded): the outer source stays,
    // the quote is rewritten; no refusal. A quote cut short after the
    // ports (ICMPv4 promises 8 bytes) is rewritten as far as it goes.
    let client = V4.client(40401);
    let sent = first_datagram(&mut dp, V4, client);
    let router: IpAddr = "10.0.9.1".parse().unwrap();
    let mut error = IcmpError::port_unreachable(router, &sent[14..14 + 20 + 8]);
    (error.kind, error.code) = (11, 0);
    let (verdict, out) = test_run(&mut dp, Dir::Egress, &error.frame()).unwrap();
    assert_eq!(verdict, V::Forward);
    let p = parse_icmp(&out).unwrap();
    assert_icmp_natted(&p, V4, client, "time exceeded");
    assert_eq!(p.src, router, "a router's error keeps its source");
    assert_eq!(
        cohort(&dp, V4.name, Cohort::Canary).refused,
        1,
        "no refusal"
    );

    // TCP (PMTU: fragmentation needed) goes the same way.
    let tcp_client = V4.client(40402);
    let (_, syn) = test_run(
        &mut dp,
        Dir::Ingress,
        &Tcp::new(tcp_client, V4.vip(), SYN).frame(),
    )
    .unwrap();
    let mut error = IcmpError::port_unreachable(addr(TCP_BACKEND).ip(), &syn[14..]);
    (error.kind, error.code) = (3, 4);
    let (verdict, out) = test_run(&mut dp, Dir::Egress, &error.frame()).unwrap();
    assert_eq!(verdict, V::Forward);
    let p = parse_icmp(&out).unwrap();
    assert_icmp_natted(&p, V4, tcp_client, "frag needed");
    assert_eq!(p.quote.proto, 6);

    // An error about nothing of ours is untouched.
    let stray = Udp::new(V4.client(40403), addr("10.0.1.99:53"), b"x");
    let error = IcmpError::port_unreachable(addr("10.0.1.99:53").ip(), &stray.ip_packet());
    let (verdict, out) = test_run(&mut dp, Dir::Egress, &error.frame()).unwrap();
    assert_eq!((verdict, out), (V::Ignore, error.frame()));
    assert_eq!(counter(&dp, Counter::IcmpErrorNatted), 4);
}

fn unanswered_and_refused_canary_flows_feed_the_breaker_and_a_reply_does_not(m: IngressMode) {
    let mut dp = dataplane(m, "weight = \"100%\"");
    let mut events = dp.take_events().expect("event ring buffer");
    // Answered: a success, no failure.
    let answered = V4.client(40500);
    first_datagram(&mut dp, V4, answered);
    send(
        &mut dp,
        Dir::Egress,
        &Udp::new(V4.canary(), answered, b"yes"),
    );
    // Unanswered past udp_response_timeout (3 s): the client's next
    // datagram finds the deadline passed.
    let silent = V4.client(40501);
    first_datagram(&mut dp, V4, silent);
    age(&mut dp, V4, silent, 4 * SECOND, 0);
    let (_, again) = send(&mut dp, Dir::Ingress, &Udp::new(silent, V4.vip(), b"again"));
    assert_eq!(again.dst, V4.canary(), "a retry stays on its backend");
    let fwd = dp.conntrack_entry(&udp_key(silent, V4.vip())).unwrap();
    assert!(fwd.state & ST_TIMED_OUT != 0, "{fwd:?}");
    // Unanswered, and the client never sends again: the sweep counts it.
    let gone = V4.client(40502);
    first_datagram(&mut dp, V4, gone);
    age(&mut dp, V4, gone, 4 * SECOND, 0);
    let swept = dp.sweep_udp().unwrap();
    assert_eq!((swept.timed_out, swept.expired), (1, 0), "{swept:?}");
    assert_eq!(
        dp.sweep_udp().unwrap().timed_out,
        0,
        "each flow times out once"
    );

    let snap = dp.snapshot().unwrap();
    let web = snap.service(V4.name).unwrap();
    assert_eq!(
        web.cohort_timeouts(Cohort::Canary),
        2,
        "two unanswered flows"
    );
    assert_eq!(web.failed_connections(Cohort::Canary), 2);
    let b = dp.breaker_state(V4.name).unwrap();
    assert_eq!((b.attempts, b.failures, b.tripped), (3, 2, 0), "{b:?}");

    // A refusal makes three: the breaker (3 failures, ≥ 50 %) trips, and
    // the next new flow goes to stable at 100 % canary weight.
    let refused = V4.client(40503);
    let sent = first_datagram(&mut dp, V4, refused);
    let error = IcmpError::port_unreachable(V4.canary().ip(), &sent[14..]);
    test_run(&mut dp, Dir::Egress, &error.frame()).unwrap();
    let b = dp.breaker_state(V4.name).unwrap();
    assert_eq!((b.attempts, b.failures, b.tripped), (4, 3, 1), "{b:?}");
    let item = events.next().expect("a breaker event");
    drop(item);
    let (_, next) = send(
        &mut dp,
        Dir::Ingress,
        &Udp::new(V4.client(40504), V4.vip(), b"q"),
    );
    assert_eq!(next.dst, V4.stable(), "tripped: new flows go to stable");
    let fwd = dp
        .conntrack_entry(&udp_key(V4.client(40504), V4.vip()))
        .unwrap();
    assert_eq!(fwd.cohort, COHORT_STABLE);
    // One-way services never time out.
    reload(&mut dp, "weight = \"0%\"\nudp_response_timeout = \"off\"");
    let oneway = V4.client(40505);
    first_datagram(&mut dp, V4, oneway);
    age(&mut dp, V4, oneway, 10 * SECOND, 0);
    send(
        &mut dp,
        Dir::Ingress,
        &Udp::new(oneway, V4.vip(), b"log line"),
    );
    assert_eq!(
        dp.sweep_udp().unwrap().timed_out,
        0,
        "no response timeout: no failure"
    );
    assert_eq!(
        dp.snapshot()
            .unwrap()
            .service(V4.name)
            .unwrap()
            .cohort_timeouts(Cohort::Stable),
        0
    );
}

in_both_modes!(
    a_first_datagram_is_steered_its_reply_reverse_natted_and_both_measured,
    a_zero_checksum_stays_zero_and_a_result_of_zero_is_sent_as_ffff,
    idle_flows_end_their_next_datagram_starts_a_new_flow_and_the_sweep_removes_them,
    a_tcp_and_a_udp_service_on_one_vip_port_are_two_services,
    an_icmp_port_unreachable_is_reverse_natted_inside_out_and_refuses_the_flow,
    unanswered_and_refused_canary_flows_feed_the_breaker_and_a_reply_does_not,
);

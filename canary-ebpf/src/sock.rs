//! Socket-level steering for clients on the node (cgroup `connect4/6`,
//! `getpeername4/6`) and the per-socket signals of the connections it
//! steers (BTF tracepoints).
//!
//! A `connect()` to a VIP from a process in the socket-LB cgroup is steered
//! once, before the kernel sends anything: the cohort and backend are chosen
//! as on the packet path ([`steer::choose_hashed`]), the destination is
//! rewritten to the backend, and the socket is tagged ([`SockTag`] in
//! `SOCK_TAGS`). Its packets then carry the backend's address, so the TC
//! programs never see a VIP and never NAT them. The tracepoints count each
//! tagged socket's connection, handshake, first byte, bytes, resets,
//! failures and close into the same `STATS` slot and `HISTOGRAMS` entry as
//! the packet path, and feed the same breaker. Every per-connection event
//! counts once: an atomic bit in the tag decides (so a tracepoint program
//! and its replacement, both attached for a moment during an upgrade,
//! never count one event twice).
//!
//! IPv4 and IPv6 alike: addresses are `Addr`s (IPv4 mapped), and a
//! dual-stack IPv6 socket dialling a v4-mapped VIP reaches the IPv4
//! service and is sent to the backend's v4-mapped address.

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, null_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_sk_storage_get},
    programs::{BtfTracePointContext, SockAddrContext},
};
use canary_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    addr::Addr,
    cohort::sticky_hash64,
    counters::Counter,
    flow::{UDP_DEFAULT_IDLE_MS, UDP_REFRESH_NS, udp_expired},
    service::{Backend, COHORT_CANARY, MODE_PER_CONNECTION, ServiceKey, ServiceValue},
    sock::{
        SK_CLOSED, SK_ESTABLISHED, SK_FAILED, SK_OPENED, SK_REQUEST, SK_RESPONSE,
        SK_RST_FROM_BACKEND, SK_RST_FROM_CLIENT, SK_SYN_RETRIED, SU_DRAIN, SU_DRAINED, SU_REPLIED,
        SU_TIMED_OUT, SockEnd, SockRevKey, SockRevValue, SockTag, SockUdpFlow, sock_end,
    },
    stats::BackendCounters,
};

use crate::{
    atomic, breaker,
    conntrack::now,
    maps::{
        COUNTERS, SERVICES, SOCK_ACTIVE, SOCK_REVNAT, SOCK_STEERED, SOCK_TAGS, SOCK_TIMEOUTS,
        SOCK_UDP, STATS, UDP_CONFIG,
    },
    stats::{Latency, observe},
    steer::{self, Choice},
};

/// TCP states (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
/// `recvmsg` flag: the data stays queued (a peek is no response yet).
const MSG_PEEK: i32 = 2;

/// Which family of hook runs: `connect4`/`getpeername4` see an IPv4
/// socket address, the `6` hooks an IPv6 one (which may be v4-mapped).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    V4,
    V6,
}

/// The `SERVICES` key of `addr:port` (network byte order) over `proto`:
/// a v4-mapped destination is the IPv4 service.
#[inline(always)]
fn service_key(addr: &Addr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        vip: *addr,
        port,
        proto,
        family: addr.family(),
    }
}

/// Makes the socket connect (or send) to `backend` instead of the VIP it
/// dialled. An IPv6 socket reaches an IPv4 backend at its v4-mapped
/// address.
#[inline(always)]
pub fn write_backend(ctx: &SockAddrContext, hook: Hook, backend: &Backend) {
    write_user_addr(ctx, hook, &backend.addr, backend.port);
}

/// The destination (`user_ip4/6`, `user_port`) of a sock_addr context and
/// its port (network byte order).
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, hook: Hook) -> (Addr, u16) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context; every hook may read these
    // fields 4 bytes at a time (volatile, so no load is merged wider).
    let (addr, port) = unsafe {
        let addr = match hook {
            Hook::V4 => Addr::from_v4(read_volatile(addr_of!((*sa).user_ip4))),
            Hook::V6 => Addr([
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]),
        };
        (addr, read_volatile(addr_of!((*sa).user_port)))
    };
    // The port is a big-endian u16 in the low half of the word.
    #[expect(clippy::cast_possible_truncation, reason = "user_port holds a u16")]
    (addr, port as u16)
}

/// The socket's own address, if it was bound to one (`bind()` before
/// `connect()`); the kernel picks it only after this hook otherwise.
#[inline(always)]
fn source_addr(ctx: &SockAddrContext, hook: Hook) -> Option<Addr> {
    // SAFETY: `sk` of a sock_addr context is a valid socket for the run;
    // `src_ip4`/`src_ip6[i]` are readable 4 bytes at a time.
    let addr = unsafe {
        let sk: *mut bpf_sock = read_volatile(addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk));
        match hook {
            Hook::V4 => Addr::from_v4(read_volatile(addr_of!((*sk).src_ip4))),
            Hook::V6 => Addr([
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ]),
        }
    };
    // Unbound: 0.0.0.0 (or ::ffff:0.0.0.0), or ::.
    let unbound = if addr.is_v4() {
        addr.v4() == 0
    } else {
        addr.0 == [0; 4]
    };
    (!unbound).then_some(addr)
}

/// Chooses cohort and backend for a socket (`cookie`) dialling a VIP of
/// `svc`, as the packet path does, and points the socket at the backend.
/// The client's identity: no packet exists yet, so no source port, and
/// usually no source address. Sticky: the network namespace (a pod; all
/// of the host's processes are one client). Per connection (or UDP flow):
/// the socket. `None` if no backend could be chosen (counted; the
/// destination is left as dialled and reaches no one, as at TC).
#[inline(always)]
fn steer_socket(
    ctx: &SockAddrContext,
    hook: Hook,
    svc: &ServiceValue,
    cookie: u64,
    now: u64,
) -> Option<Choice> {
    let id = if svc.mode == MODE_PER_CONNECTION {
        cookie
    } else {
        // SAFETY: get_netns_cookie takes the sock_addr context.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    };
    match steer::choose_hashed(
        svc,
        sticky_hash64(id, svc.salt),
        source_addr(ctx, hook),
        now,
        true,
    ) {
        Ok(choice) => {
            write_backend(ctx, hook, &choice.backend);
            count(Counter::SockSteered);
            Some(choice)
        }
        Err(counter) => {
            count(counter);
            None
        }
    }
}

/// `connect4`/`connect6`: steers a connection to a VIP. A destination that
/// is no VIP costs one hash lookup (and a socket-storage check) and is
/// left alone.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, hook: Hook) {
    let (addr, port) = user_addr(ctx, hook);
    // SAFETY: `protocol` is readable in every sock_addr hook.
    #[expect(clippy::cast_possible_truncation, reason = "an IP protocol number")]
    let proto = unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) } as u8;
    let Some(svc) = SERVICES.get_ptr(&service_key(&addr, port, proto)) else {
        forget(ctx);
        return;
    };
    // SAFETY: a live SERVICES element for this run (not preallocated: a
    // concurrent update frees the old value only after this run).
    let svc = unsafe { &*svc };
    // SAFETY: get_socket_cookie takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let now = now();
    let Some(choice) = steer_socket(ctx, hook, svc, cookie, now) else {
        return;
    };
    let family = addr.family();
    let tag = SockTag {
        vip: addr,
        backend: choice.backend.addr,
        vip_port: port,
        backend_port: choice.backend.port,
        cohort: choice.cohort,
        family,
        proto,
        _pad: 0,
        svc_id: svc.svc_id,
        stats_slot: choice.backend.stats_slot,
        cookie,
        connect_ns: now,
        request_ns: 0,
        state: 0,
    };
    let mut init = tag;
    // SAFETY: the storage of this context's socket; the pointer is a live
    // map value (or null) for this run.
    let p = unsafe { SOCK_TAGS.get_or_insert_ptr_mut(ctx, Some(&mut init)) };
    if proto == IPPROTO_UDP {
        // A connected UDP socket is one flow; no TCP state event will
        // count it, and none closes it (see the README).
        add(&tag, Field::Connections, 1);
        add(&tag, Field::Closed, 1);
    }
    // Which service and backend the socket was steered to, by cookie: the
    // agent finds it here when the drain deadline aborts the socket (the
    // tag is readable only through the socket itself).
    let reverse_key = SockRevKey {
        cookie,
        addr: choice.backend.addr,
        port: choice.backend.port,
        family,
        _pad: [0; 5],
    };
    let reverse = SockRevValue {
        vip: addr,
        port,
        family,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    // An LRU map evicts rather than fails.
    let _ = SOCK_STEERED.insert(&reverse_key, &reverse, u64::from(BPF_ANY));
    if p.is_null() {
        count(Counter::SockTagFailed);
    } else {
        // SAFETY: a live storage value of this socket; a socket that
        // connects again (after a failed connect, or connected UDP) gets a
        // fresh tag. No tracepoint counts for it meanwhile: the socket is
        // locked in connect().
        unsafe { *p = tag };
    }
}

/// A `connect()` to something that is no VIP: if the socket carries a tag
/// from an earlier connect to a VIP, it is not steered any more, so the tag
/// and its reverse entry go.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    // SAFETY: the storage of this context's socket, looked up only.
    let p = unsafe { SOCK_TAGS.get_ptr_mut(ctx) };
    if p.is_null() {
        return;
    }
    // SAFETY: `sk` of a sock_addr context is this run's socket.
    unsafe {
        let sk = read_volatile(addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk));
        let _ = SOCK_TAGS.delete(sk);
    }
}

/// `getpeername4`/`getpeername6`: a steered socket's peer is the VIP its
/// application dialled, not the backend.
#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, hook: Hook) {
    // SAFETY: the storage of this context's socket, looked up only.
    let p = unsafe { SOCK_TAGS.get_ptr_mut(ctx) };
    if p.is_null() {
        return;
    }
    // SAFETY: a live storage value for this run, copied out.
    let tag = unsafe { *p };
    let (addr, port) = user_addr(ctx, hook);
    // The peer is the backend this socket was steered to (and not, say,
    // a later connect's destination that is no VIP: that drops the tag).
    if addr != tag.backend || port != tag.backend_port {
        return;
    }
    write_user_addr(ctx, hook, &tag.vip, tag.vip_port);
}

/// Writes `addr:port` (network byte order) as the context's user address.
/// An IPv6 hook writes the 16 bytes (v4-mapped for an IPv4 address).
#[inline(always)]
fn write_user_addr(ctx: &SockAddrContext, hook: Hook, addr: &Addr, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is this program's context; sendmsg/recvmsg (like
    // connect and getpeername) may store 4 bytes at a time into
    // `user_ip4`/`user_ip6[i]` and `user_port` (volatile: the verifier
    // refuses merged wider stores).
    unsafe {
        match hook {
            Hook::V4 => write_volatile(addr_of_mut!((*sa).user_ip4), addr.v4()),
            Hook::V6 => {
                for (i, word) in addr.0.iter().enumerate() {
                    write_volatile(addr_of_mut!((*sa).user_ip6[i]), *word);
                }
            }
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port));
    }
}

/// `sendmsg4`/`sendmsg6`: a datagram an unconnected UDP socket sends to an
/// address. To a VIP, it goes to the backend of the socket's flow to that
/// VIP (`SOCK_UDP`), chosen on the flow's first datagram like a connection
/// and kept until the flow is idle for the service's `udp_idle_timeout`;
/// the reply path (`SOCK_REVNAT`) makes `recvmsg` show the VIP. A
/// destination that is no VIP costs one look-up in each map.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, hook: Hook) {
    let (addr, port) = user_addr(ctx, hook);
    // SAFETY: get_socket_cookie takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr,
        port,
        family: addr.family(),
        _pad: [0; 5],
    };
    let now = now();
    if let Some(flow) = SOCK_UDP.get_ptr_mut(&key) {
        // SAFETY: a live LRU element for this run, copied out.
        let f = unsafe { *flow };
        if f.state & SU_DRAIN != 0 {
            // Past its drain deadline: this datagram starts a new flow.
            // SAFETY: a live LRU element; `state` is an 8-aligned u64
            // changed only through atomics here.
            if unsafe { atomic::or(addr_of_mut!((*flow).state), SU_DRAINED) } & SU_DRAINED == 0 {
                count(Counter::DrainReset);
            }
        } else if !udp_expired(f.last_ns, now, f.idle_ms) {
            write_user_addr(ctx, hook, &f.backend, f.backend_port);
            if now.saturating_sub(f.last_ns) >= UDP_REFRESH_NS {
                // SAFETY: as above; a plain store racing another only
                // keeps one of two recent times.
                unsafe { (*flow).last_ns = now };
            }
            add_slot(f.stats_slot, Field::PacketsFromClient, 1);
            udp_deadline(flow, &f, &key, now);
            return;
        }
    }
    let Some(svc) = SERVICES.get_ptr(&service_key(&addr, port, IPPROTO_UDP)) else {
        return;
    };
    // SAFETY: a live SERVICES element for this run.
    let svc = unsafe { &*svc };
    let Some(choice) = steer_socket(ctx, hook, svc, cookie, now) else {
        return;
    };
    // SAFETY: a live UDP_CONFIG element for this run, copied out.
    let config = UDP_CONFIG.get_ptr(&svc.svc_id).map(|c| unsafe { *c });
    let flow = SockUdpFlow {
        backend: choice.backend.addr,
        backend_port: choice.backend.port,
        cohort: choice.cohort,
        _pad: 0,
        svc_id: svc.svc_id,
        stats_slot: choice.backend.stats_slot,
        idle_ms: config.map_or(UDP_DEFAULT_IDLE_MS, |c| c.idle_ms),
        response_ms: config.map_or(0, |c| c.response_ms),
        _pad2: 0,
        first_ns: now,
        last_ns: now,
        state: 0,
    };
    let reverse_key = SockRevKey {
        cookie,
        addr: choice.backend.addr,
        port: choice.backend.port,
        family: key.family,
        _pad: [0; 5],
    };
    let reverse = SockRevValue {
        vip: addr,
        port,
        family: key.family,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    if SOCK_UDP.insert(&key, &flow, u64::from(BPF_ANY)).is_err()
        || SOCK_REVNAT
            .insert(&reverse_key, &reverse, u64::from(BPF_ANY))
            .is_err()
    {
        count(Counter::SockTagFailed);
    }
    // A flow is counted when it starts, and closed at once: nothing tells
    // an unconnected socket's flow has ended (see the README).
    add_slot(flow.stats_slot, Field::Connections, 1);
    add_slot(flow.stats_slot, Field::Closed, 1);
    add_slot(flow.stats_slot, Field::PacketsFromClient, 1);
}

/// The client sends again on a flow with no reply yet: past the service's
/// `udp_response_timeout`, the flow failed (`reason="timeout"`, once), as
/// at TC when the client's next datagram comes after the deadline.
#[inline(always)]
fn udp_deadline(flow: *mut SockUdpFlow, f: &SockUdpFlow, key: &SockRevKey, now: u64) {
    if f.state & (SU_REPLIED | SU_TIMED_OUT) != 0
        || f.response_ms == 0
        || now.saturating_sub(f.first_ns) < u64::from(f.response_ms) * 1_000_000
    {
        return;
    }
    // SAFETY: a live LRU element; `state` is an 8-aligned u64 changed only
    // through atomics.
    if unsafe { atomic::or(addr_of_mut!((*flow).state), SU_TIMED_OUT) } & SU_TIMED_OUT != 0 {
        return;
    }
    count_timeout(f.stats_slot, true);
    if f.cohort == COHORT_CANARY {
        breaker::failure(
            &service_key(&key.addr, key.port, IPPROTO_UDP),
            f.svc_id,
            now,
        );
    }
}

/// `recvmsg4`/`recvmsg6`: a datagram received with its source asked for
/// (`recvfrom`, `recvmsg` with a name). From the backend of a steered flow
/// it shows the VIP the application sent to; the flow's first reply is
/// timed (`canary_first_byte_seconds`: first datagram → first reply) and,
/// for canary, is a success for the breaker.
#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, hook: Hook) {
    let (addr, port) = user_addr(ctx, hook);
    // SAFETY: get_socket_cookie takes the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let family = addr.family();
    let key = SockRevKey {
        cookie,
        addr,
        port,
        family,
        _pad: [0; 5],
    };
    // SAFETY: a live LRU element for this run, copied out at once.
    let Some(vip) = SOCK_REVNAT.get_ptr(&key).map(|v| unsafe { *v }) else {
        connected_recvmsg(ctx, hook, &addr, port);
        return;
    };
    write_user_addr(ctx, hook, &vip.vip, vip.port);
    let flow_key = SockRevKey {
        cookie,
        addr: vip.vip,
        port: vip.port,
        family,
        _pad: [0; 5],
    };
    let Some(flow) = SOCK_UDP.get_ptr_mut(&flow_key) else {
        return;
    };
    // SAFETY: a live LRU element for this run, copied out.
    let f = unsafe { *flow };
    // The flow may have moved to another backend since (idle, re-chosen):
    // only its own backend's replies count for it.
    if f.backend != addr || f.backend_port != port {
        return;
    }
    add_slot(f.stats_slot, Field::PacketsFromBackend, 1);
    // SAFETY: as in `udp_deadline`.
    let before = unsafe { atomic::or(addr_of_mut!((*flow).state), SU_REPLIED) };
    if before & (SU_REPLIED | SU_TIMED_OUT) != 0 {
        return;
    }
    let now = now();
    observe(f.svc_id, f.cohort, Latency::FirstByte, now - f.first_ns);
    if f.cohort == COHORT_CANARY {
        breaker::success(f.svc_id);
    }
}

/// `recvmsg` on a connected UDP socket (steered by `connect4/6`): a reply
/// from its backend shows the VIP, read from the socket's tag.
#[inline(always)]
fn connected_recvmsg(ctx: &SockAddrContext, hook: Hook, addr: &Addr, port: u16) {
    // SAFETY: the storage of this context's socket, looked up only.
    let p = unsafe { SOCK_TAGS.get_ptr_mut(ctx) };
    if p.is_null() {
        return;
    }
    // SAFETY: a live storage value for this run, copied out.
    let tag = unsafe { *p };
    if tag.backend == *addr && tag.backend_port == port {
        write_user_addr(ctx, hook, &tag.vip, tag.vip_port);
    }
}

/// This object's generation, set by the agent at load. Its tracepoint
/// programs count only while `SOCK_ACTIVE` holds it: an agent that
/// replaces them attaches its own (which count nothing yet), switches
/// `SOCK_ACTIVE` in one write, and only then lets the old links go, so no
/// event is counted by both or by neither while the kernel releases them.
#[unsafe(no_mangle)]
static SOCK_GENERATION: u32 = 0;

/// Whether this object's tracepoint programs are the ones that count.
#[inline(always)]
fn counting() -> bool {
    // SAFETY: a read of a constant the loader patched (volatile, so the
    // compiler does not fold the 0 it was compiled with).
    let mine = unsafe { read_volatile(addr_of!(SOCK_GENERATION)) };
    SOCK_ACTIVE.get(0).is_some_and(|active| *active == mine)
}

/// The tag of the socket `sk` (a BTF `struct sock *`), if `connect4/6`
/// steered it over TCP and these programs are the counting generation.
/// Untagged sockets (nearly all) cost one storage look-up.
#[inline(always)]
fn tag_of(sk: *mut c_void) -> Option<Tag> {
    any_tag_of(sk).filter(|tag| tag.read().proto == IPPROTO_TCP)
}

/// The tag of the socket `sk` steered by `connect4/6`, TCP or UDP (a
/// connected UDP socket counts its bytes and first reply like a TCP one),
/// if these programs are the counting generation.
#[inline(always)]
fn any_tag_of(sk: *mut c_void) -> Option<Tag> {
    // SAFETY: bpf_sk_storage_get takes the map and a socket pointer (NULL
    // or not a full socket: it returns NULL); no value, no create flag.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_TAGS).cast_mut().cast(),
            sk,
            null_mut(),
            0,
        )
    }
    .cast::<SockTag>();
    (!p.is_null() && counting()).then_some(Tag(p))
}

/// A connected UDP socket sends again with no reply to its first request:
/// past the service's `udp_response_timeout`, the flow failed (once).
#[inline(always)]
fn connected_udp_deadline(t: Tag, tag: &SockTag) {
    if tag.state & (SK_REQUEST | SK_RESPONSE | SK_FAILED) != SK_REQUEST || tag.request_ns == 0 {
        return;
    }
    // SAFETY: a live UDP_CONFIG element for this run, copied out.
    let Some(config) = UDP_CONFIG.get_ptr(&tag.svc_id).map(|c| unsafe { *c }) else {
        return;
    };
    let now = now();
    if config.response_ms == 0
        || now.saturating_sub(tag.request_ns) < u64::from(config.response_ms) * 1_000_000
        || !fail(t, tag, now)
    {
        return;
    }
    count_timeout(tag.stats_slot, true);
}

/// A tagged socket's storage: a live value for this program run (socket
/// storage is freed only after an RCU grace period).
#[derive(Clone, Copy)]
struct Tag(*mut SockTag);

impl Tag {
    /// A copy of the tag.
    #[inline(always)]
    fn read(self) -> SockTag {
        // SAFETY: a live storage value (see the type).
        unsafe { *self.0 }
    }

    /// Atomically sets `bits`; returns the state before.
    #[inline(always)]
    fn set(self, bits: u64) -> u64 {
        // SAFETY: `state` is an 8-aligned u64 of a live value; every writer
        // after connect() uses atomics on it.
        unsafe { atomic::or(addr_of_mut!((*self.0).state), bits) }
    }

    /// Sets `bit`; true if this caller set it (the event's one count).
    #[inline(always)]
    fn first(self, bit: u64) -> bool {
        self.set(bit) & bit == 0
    }
}

/// Adds `v` to one counter of the tag's stats slot, atomically: these
/// programs run in process context as well as in softirq, so two of them
/// can touch one CPU's slot at once.
#[inline(always)]
fn add(tag: &SockTag, field: Field, v: u64) {
    add_slot(tag.stats_slot, field, v);
}

/// A timed-out connection or flow of stats slot `slot`, and its failure if
/// it is the first (`SOCK_TIMEOUTS`, added to the sweep's at export).
#[inline(always)]
fn count_timeout(slot: u32, first_failure: bool) {
    if let Some(to) = SOCK_TIMEOUTS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU array element; u64 fields, updated only
        // through atomics.
        unsafe {
            atomic::add(addr_of_mut!((*to).timeouts), 1);
            atomic::add(addr_of_mut!((*to).failed), u64::from(first_failure));
        }
    }
}

/// [`add`] by stats slot (an unconnected UDP flow has no tag).
#[inline(always)]
fn add_slot(slot: u32, field: Field, v: u64) {
    match STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU array element, 8-aligned u64 fields, updated
        // only through atomics by these programs.
        Some(c) => unsafe { atomic::add(field_ptr(c, field), v) },
        None => count(Counter::Unattributed),
    }
}

/// Adds one to a data-plane counter, atomically (see [`add`]).
#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU array element, an 8-aligned u64.
        unsafe { atomic::add(slot, 1) };
    }
}

/// A failure of the tagged connection: counted in `failed` if it is the
/// connection's first, and then, for canary, fed to the breaker as the
/// packet path does.
#[inline(always)]
fn fail(t: Tag, tag: &SockTag, now: u64) -> bool {
    let first = t.first(SK_FAILED);
    if first && tag.cohort == COHORT_CANARY {
        breaker::failure(
            &service_key(&tag.vip, tag.vip_port, tag.proto),
            tag.svc_id,
            now,
        );
    }
    first
}

/// `sock:inet_sock_set_state`: the connection is counted when the socket
/// enters `SYN_SENT`, its handshake timed at `ESTABLISHED`, and its end
/// counted at `CLOSE`.
#[inline(always)]
pub fn state(ctx: &BtfTracePointContext) {
    let sk: *mut c_void = ctx.arg(0);
    let Some(t) = tag_of(sk) else { return };
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let tag = t.read();
    match new {
        TCP_SYN_SENT => {
            if t.first(SK_OPENED) {
                add(&tag, Field::Connections, 1);
            }
        }
        TCP_ESTABLISHED if old == TCP_SYN_SENT => {
            if t.set(SK_ESTABLISHED) & (SK_ESTABLISHED | SK_OPENED) == SK_OPENED {
                observe(
                    tag.svc_id,
                    tag.cohort,
                    Latency::Handshake,
                    now() - tag.connect_ns,
                );
            }
        }
        TCP_CLOSE => {
            let before = t.set(SK_CLOSED);
            if before & SK_CLOSED != 0 {
                return;
            }
            let _ = SOCK_STEERED.remove(&SockRevKey {
                cookie: tag.cookie,
                addr: tag.backend,
                port: tag.backend_port,
                family: tag.family,
                _pad: [0; 5],
            });
            match sock_end(before, now().saturating_sub(tag.connect_ns)) {
                SockEnd::Uncounted => {}
                SockEnd::TimedOut => {
                    let first = t.first(SK_FAILED);
                    count_timeout(tag.stats_slot, first);
                }
                SockEnd::Closed { duration } => {
                    add(&tag, Field::Closed, 1);
                    if duration {
                        observe(
                            tag.svc_id,
                            tag.cohort,
                            Latency::Duration,
                            (now() - tag.connect_ns) / 1000,
                        );
                    }
                }
            }
        }
        _ => {}
    }
}

/// `tcp:tcp_receive_reset`: a RST from the backend refuses the connection
/// (before the handshake completed) or resets it; either is a failure.
#[inline(always)]
pub fn rst_from_backend(ctx: &BtfTracePointContext) {
    let Some(t) = tag_of(ctx.arg(0)) else { return };
    let before = t.set(SK_RST_FROM_BACKEND);
    if before & SK_RST_FROM_BACKEND != 0 {
        return;
    }
    let tag = t.read();
    let first_failure = fail(t, &tag, now());
    let field = if before & SK_ESTABLISHED == 0 {
        Field::Refused
    } else {
        Field::ResetsFromBackend
    };
    add(&tag, field, 1);
    add(&tag, Field::Failed, u64::from(first_failure));
}

/// `tcp:tcp_send_reset`: the client's stack sent a RST on the connection.
#[inline(always)]
pub fn rst_from_client(ctx: &BtfTracePointContext) {
    let Some(t) = tag_of(ctx.arg(0)) else { return };
    if t.first(SK_RST_FROM_CLIENT) {
        add(&t.read(), Field::ResetsFromClient, 1);
    }
}

/// `tcp:tcp_retransmit_skb`: a retransmission while in `SYN_SENT` is a SYN
/// retry: the backend did not answer (a failure, once per connection).
#[inline(always)]
pub fn retransmit(ctx: &BtfTracePointContext) {
    let Some(t) = tag_of(ctx.arg(0)) else { return };
    let tag = t.read();
    let in_syn_sent = tag.state & (SK_OPENED | SK_ESTABLISHED | SK_CLOSED) == SK_OPENED;
    if !in_syn_sent || !t.first(SK_SYN_RETRIED) {
        return;
    }
    let first_failure = fail(t, &tag, now());
    add(&tag, Field::SynRetried, 1);
    add(&tag, Field::Failed, u64::from(first_failure));
}

/// `sock:sock_send_length` (every `sendmsg`, with its result): bytes from
/// the client, and the time of its first request.
#[inline(always)]
pub fn send(ctx: &BtfTracePointContext) {
    let ret: i32 = ctx.arg(1);
    if ret <= 0 {
        return;
    }
    let Some(t) = any_tag_of(ctx.arg(0)) else {
        return;
    };
    let tag = t.read();
    add(&tag, Field::BytesFromClient, ret.unsigned_abs().into());
    if tag.proto == IPPROTO_UDP {
        add(&tag, Field::PacketsFromClient, 1);
        connected_udp_deadline(t, &tag);
    }
    if tag.state & SK_REQUEST == 0 && t.first(SK_REQUEST) {
        // SAFETY: a live storage value; only this (first) sender writes it.
        unsafe { (*t.0).request_ns = now() };
    }
}

/// `sock:sock_recv_length` (every `recvmsg`, with its result): bytes from
/// the backend, and the first response after a request (first-byte time,
/// and for canary a success that ends the breaker's run of failures).
#[inline(always)]
pub fn recv(ctx: &BtfTracePointContext) {
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret <= 0 || flags & MSG_PEEK != 0 {
        return;
    }
    let Some(t) = any_tag_of(ctx.arg(0)) else {
        return;
    };
    let tag = t.read();
    add(&tag, Field::BytesFromBackend, ret.unsigned_abs().into());
    if tag.proto == IPPROTO_UDP {
        add(&tag, Field::PacketsFromBackend, 1);
        if tag.state & SK_FAILED != 0 {
            // Timed out already: a late reply is no response.
            return;
        }
    }
    // Bytes a server sends before any request (a greeting) are no response.
    if tag.state & (SK_REQUEST | SK_RESPONSE) != SK_REQUEST || tag.request_ns == 0 {
        return;
    }
    if t.first(SK_RESPONSE) {
        observe(
            tag.svc_id,
            tag.cohort,
            Latency::FirstByte,
            now() - tag.request_ns,
        );
        if tag.cohort == COHORT_CANARY {
            breaker::success(tag.svc_id);
        }
    }
}

/// The `BackendCounters` fields the socket path counts.
#[derive(Clone, Copy)]
enum Field {
    Connections,
    Closed,
    Refused,
    ResetsFromBackend,
    ResetsFromClient,
    SynRetried,
    Failed,
    BytesFromClient,
    BytesFromBackend,
    PacketsFromClient,
    PacketsFromBackend,
}

/// The address of `field` in the counters at `c`.
#[inline(always)]
fn field_ptr(c: *mut BackendCounters, field: Field) -> *mut u64 {
    // SAFETY: only a field address is formed (no read or write); `c` is a
    // live map element wherever this is called from.
    unsafe {
        match field {
            Field::Connections => addr_of_mut!((*c).connections),
            Field::Closed => addr_of_mut!((*c).closed),
            Field::Refused => addr_of_mut!((*c).refused),
            Field::ResetsFromBackend => addr_of_mut!((*c).resets_from_backend),
            Field::ResetsFromClient => addr_of_mut!((*c).resets_from_client),
            Field::SynRetried => addr_of_mut!((*c).syn_retried),
            Field::Failed => addr_of_mut!((*c).failed),
            Field::BytesFromClient => addr_of_mut!((*c).bytes_from_client),
            Field::BytesFromBackend => addr_of_mut!((*c).bytes_from_backend),
            Field::PacketsFromClient => addr_of_mut!((*c).packets_from_client),
            Field::PacketsFromBackend => addr_of_mut!((*c).packets_from_backend),
        }
    }
}

//! A `[[service]]`: its VIP, backends, weight, cohort mode and source
//! rules; its plan and breaker are validated in `plan.rs` and
//! `breaker.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use canary_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    service::{MAX_BACKENDS, MAX_RULES},
};

use super::{
    BreakerConfig, ConfigError, DEFAULT_UDP_IDLE_TIMEOUT, DEFAULT_UDP_RESPONSE_TIMEOUT,
    MAX_SERVICE_NAME, RolloutConfig, Weight,
    breaker::validate_breaker,
    check::{duration_in, int_in, invalid, quoted, shown, truncated},
    plan::validate_rollout,
    raw::{RawService, RawWeight},
};

/// The transport protocol of a service. A TCP and a UDP service may share
/// a VIP:port: they are two services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Protocol {
    /// Steered per connection, on its SYN.
    #[default]
    Tcp,
    /// Steered per flow (a 5-tuple), on its first datagram; see
    /// [`UdpTimeouts`].
    Udp,
}

impl Protocol {
    /// The name used in config, logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The IP protocol number the data plane keys services by.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a UDP service's flows live and wait (unused for TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpTimeouts {
    /// A flow with no datagram either way for this long is over, like
    /// Linux's `nf_conntrack_udp_timeout` (default 30 s): the client's
    /// next datagram is a new flow with a fresh cohort choice.
    pub idle: Duration,
    /// A flow whose backend has not replied this long after its first
    /// datagram failed (`reason="timeout"`); `None` (`"off"`) for one-way
    /// services, whose backends never reply.
    pub response: Option<Duration>,
}

impl Default for UdpTimeouts {
    fn default() -> UdpTimeouts {
        UdpTimeouts {
            idle: DEFAULT_UDP_IDLE_TIMEOUT,
            response: Some(DEFAULT_UDP_RESPONSE_TIMEOUT),
        }
    }
}

/// How a service assigns clients to cohorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CohortMode {
    /// Keyed on the client address: a client stays in its cohort, and
    /// raising the weight only adds clients to canary.
    #[default]
    Sticky,
    /// Keyed on the 5-tuple: each connection draws anew.
    PerConnection,
}

impl fmt::Display for CohortMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CohortMode::Sticky => "sticky",
            CohortMode::PerConnection => "per-connection",
        })
    }
}

/// An IPv4 or IPv6 prefix such as `192.168.10.0/24` or `fd00:1::/64`,
/// host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpPrefix {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length, 0..=32 (IPv4) or 0..=128 (IPv6).
    pub len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            "not an IP prefix; write it like \"192.168.10.0/24\" or \"fd00:1::/64\"".to_string()
        })?;
        let bits: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => bits,
            Some(l) => match l.parse() {
                Ok(l) if l <= bits => l,
                _ => return Err(format!("the prefix length must be 0 to {bits}")),
            },
        };
        let network = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if network != addr {
            return Err(format!(
                "host bits are set; did you mean \"{network}/{len}\"?"
            ));
        }
        Ok(IpPrefix { addr, len })
    }
}

/// One validated service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    /// Unique name (a metric label later).
    pub name: String,
    /// Where clients connect.
    pub vip: SocketAddr,
    /// TCP or UDP: with the VIP, what the data plane matches.
    pub protocol: Protocol,
    /// UDP flow timeouts (defaults for a TCP service, where they are
    /// unused).
    pub udp: UdpTimeouts,
    /// Stable backends, in order (the VIP's family).
    pub stable: Vec<SocketAddr>,
    /// Canary backends, in order (the VIP's family).
    pub canary: Vec<SocketAddr>,
    /// Share of new connections (or clients, in sticky mode) sent to canary.
    pub weight: Weight,
    /// How cohorts are assigned.
    pub cohort: CohortMode,
    /// Sources always sent to canary.
    pub always_canary: Vec<IpPrefix>,
    /// Sources never sent to canary.
    pub never_canary: Vec<IpPrefix>,
    /// Hash salt: decides which clients fall in the canary share.
    pub salt: u32,
    /// The data plane's own cut-off.
    pub breaker: BreakerConfig,
    /// The plan that drives the weight, if any.
    pub rollout: Option<RolloutConfig>,
    /// The team's PromQL checks (`[[service.rollout.checks]]`); empty
    /// without a plan.
    pub checks: Vec<super::CheckConfig>,
    /// Enforce or shadow (`[service.rollout] mode`); enforce without a
    /// plan.
    pub mode: super::Mode,
    /// The release its canary backends run: a rollout and its rollback
    /// belong to one release (`release = "v2.4.1"`, or derived from the
    /// canary backend set).
    pub release: String,
    /// After a rollback, canary TCP connections still open this long
    /// after it are reset on both sides; `None`: they drain for ever.
    pub drain_deadline: Option<Duration>,
}

/// Validates every `[[service]]`, and what they must not share: names,
/// VIPs, and the room for source rules.
pub(super) fn validate_services(raw: Vec<RawService>) -> Result<Vec<ServiceConfig>, ConfigError> {
    let mut names = BTreeSet::new();
    let mut vips: BTreeMap<(SocketAddr, Protocol), String> = BTreeMap::new();
    let mut total_rules = 0usize;
    let mut services = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let svc = validate_service(i, raw)?;
        let section = format!("service {:?}", svc.name);
        if !names.insert(svc.name.clone()) {
            return Err(invalid(
                &section,
                "name",
                quoted(&svc.name),
                "used by an earlier service; names must be unique",
            ));
        }
        if let Some(other) = vips.insert((svc.vip, svc.protocol), svc.name.clone()) {
            return Err(invalid(
                &section,
                "vip",
                quoted(&svc.vip.to_string()),
                format!(
                    "already used by service {other:?} for {}; each VIP:port belongs to one service per protocol",
                    svc.protocol
                ),
            ));
        }
        total_rules += svc.always_canary.len() + svc.never_canary.len();
        services.push(svc);
    }
    // A reload writes the new rule sets beside the old ones before switching.
    if total_rules > MAX_RULES as usize / 2 {
        return Err(invalid(
            "[[service]]",
            "always_canary/never_canary",
            format!("{total_rules} prefixes in all"),
            format!("at most {} prefixes across all services", MAX_RULES / 2),
        ));
    }
    Ok(services)
}

pub(super) fn validate_service(
    index: usize,
    raw: RawService,
) -> Result<ServiceConfig, ConfigError> {
    let name = raw.name.trim().to_string();
    let unnamed = format!("service #{}", index + 1);
    if name.len() > MAX_SERVICE_NAME {
        return Err(invalid(
            &unnamed,
            "name",
            shown(&name),
            format!(
                "{} characters long; at most {MAX_SERVICE_NAME} (it names the service's state file)",
                name.len()
            ),
        ));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            &unnamed,
            "name",
            quoted(truncated(&raw.name, 60)),
            "use letters, digits, '-', '_' or '.' (it becomes a metric label)",
        ));
    }
    let section = format!("service {name:?}");
    let s = section.as_str();

    let vip = parse_endpoint(s, "vip", &raw.vip)?;
    let stable = parse_backends(s, "stable", &raw.stable)?;
    let canary = parse_backends(s, "canary", &raw.canary)?;
    if stable.is_empty() {
        return Err(invalid(
            s,
            "stable",
            "[]",
            "a service needs at least one stable backend",
        ));
    }
    let family = |a: &SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    for (key, list) in [("stable", &stable), ("canary", &canary)] {
        if let Some(other) = list.iter().find(|b| b.is_ipv4() != vip.is_ipv4()) {
            return Err(invalid(
                s,
                key,
                quoted(&other.to_string()),
                format!(
                    "an {} backend for an {} VIP; a service's VIP and backends share a family (make a second service for the other family)",
                    family(other),
                    family(&vip)
                ),
            ));
        }
    }
    if let Some(both) = stable.iter().find(|b| canary.contains(b)) {
        return Err(invalid(
            s,
            "canary",
            quoted(&both.to_string()),
            "also listed in stable; a backend belongs to one cohort",
        ));
    }

    let has_weight = raw.weight.is_some();
    let weight = match raw.weight {
        None => Weight::default(),
        Some(RawWeight::Text(t)) => t
            .parse::<Weight>()
            .map_err(|e| invalid(s, "weight", quoted(&t), e.to_string()))?,
        Some(RawWeight::Number(n)) => {
            return Err(invalid(
                s,
                "weight",
                n,
                "a bare number is ambiguous; quote it with a unit, e.g. \"5%\" or \"2500ppm\"",
            ));
        }
    };
    if weight.ppm() > 0 && canary.is_empty() {
        return Err(invalid(
            s,
            "weight",
            quoted(&weight.to_string()),
            "no canary backends to send traffic to; add `canary = [...]` or set weight = \"0%\"",
        ));
    }

    let cohort = match raw.cohort.as_deref() {
        None | Some("sticky") => CohortMode::Sticky,
        Some("per-connection") => CohortMode::PerConnection,
        Some(other) => {
            return Err(invalid(
                s,
                "cohort",
                quoted(other),
                "must be \"sticky\" or \"per-connection\"",
            ));
        }
    };

    let always_canary = parse_prefixes(s, "always_canary", &raw.always_canary)?;
    let never_canary = parse_prefixes(s, "never_canary", &raw.never_canary)?;
    if !always_canary.is_empty() && canary.is_empty() {
        return Err(invalid(
            s,
            "always_canary",
            quoted(&always_canary[0].to_string()),
            "no canary backends to send these clients to; add `canary = [...]`",
        ));
    }
    for (key, list) in [
        ("always_canary", &always_canary),
        ("never_canary", &never_canary),
    ] {
        if let Some(p) = list.iter().find(|p| p.addr.is_ipv4() != vip.is_ipv4()) {
            return Err(invalid(
                s,
                key,
                quoted(&p.to_string()),
                format!(
                    "an {} prefix never matches a client of an {} VIP; list prefixes of the VIP's family",
                    if p.addr.is_ipv4() { "IPv4" } else { "IPv6" },
                    family(&vip)
                ),
            ));
        }
    }
    if let Some(p) = always_canary.iter().find(|p| never_canary.contains(p)) {
        return Err(invalid(
            s,
            "never_canary",
            quoted(&p.to_string()),
            "also in always_canary; a prefix can only be in one list",
        ));
    }

    let (protocol, udp) = validate_protocol(
        s,
        raw.protocol.as_deref(),
        raw.udp_idle_timeout.as_deref(),
        raw.udp_response_timeout.as_deref(),
    )?;
    let breaker = validate_breaker(s, raw.breaker)?;
    let (mut checks, mut mode) = (Vec::new(), super::Mode::Enforce);
    let rollout = match raw.rollout {
        None => None,
        Some(mut r) => {
            mode = super::analysis::validate_mode(s, r.mode.as_deref())?;
            checks = super::analysis::validate_checks(s, std::mem::take(&mut r.checks))?;
            if mode == super::Mode::Shadow && !has_weight {
                return Err(invalid(
                    s,
                    "rollout.mode",
                    "\"shadow\"",
                    "shadow mode keeps the configured weight while the plan is only \
                     reported; set weight (e.g. weight = \"5%\")",
                ));
            }
            if has_weight && mode == super::Mode::Enforce {
                return Err(invalid(
                    s,
                    "weight",
                    quoted(&weight.to_string()),
                    "a [service.rollout] plan sets the weight; remove weight or the plan",
                ));
            }
            if canary.is_empty() {
                return Err(invalid(
                    s,
                    "rollout.steps",
                    "[...]",
                    "a rollout plan needs canary backends",
                ));
            }
            Some(validate_rollout(s, r)?)
        }
    };
    let release = match raw.release {
        None => derived_release(&canary),
        Some(r) => validate_release(s, &r)?,
    };
    let drain_deadline = match raw.drain_deadline.as_deref() {
        None | Some("off") => None,
        Some(t) => Some(duration_in(
            s,
            "drain_deadline",
            t,
            (Duration::from_secs(1), Duration::from_hours(30 * 24)),
            "10m",
        )?),
    };
    Ok(ServiceConfig {
        drain_deadline,
        release,
        rollout,
        checks,
        mode,
        breaker,
        salt: match raw.salt {
            None => default_salt(&name),
            Some(n) => int_in(s, "salt", n, 0, u32::MAX.into(), "")?,
        },
        name,
        vip,
        protocol,
        udp,
        stable,
        canary,
        weight,
        cohort,
        always_canary,
        never_canary,
    })
}

/// Longest `udp_idle_timeout`: a day.
const MAX_UDP_IDLE: Duration = Duration::from_hours(24);
/// Shortest `udp_idle_timeout`: the data plane refreshes a flow's
/// last-seen time once a second, so a shorter timeout would end busy
/// flows.
const MIN_UDP_IDLE: Duration = Duration::from_secs(2);
/// Shortest `udp_response_timeout`.
const MIN_UDP_RESPONSE: Duration = Duration::from_millis(10);

/// `protocol` and, for UDP, its timeouts (`udp_idle_timeout`,
/// `udp_response_timeout`).
fn validate_protocol(
    s: &str,
    protocol: Option<&str>,
    idle: Option<&str>,
    response: Option<&str>,
) -> Result<(Protocol, UdpTimeouts), ConfigError> {
    let protocol = match protocol {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            return Err(invalid(
                s,
                "protocol",
                quoted(other),
                "must be \"tcp\" or \"udp\"",
            ));
        }
    };
    if protocol == Protocol::Tcp {
        for (key, value) in [
            ("udp_idle_timeout", idle),
            ("udp_response_timeout", response),
        ] {
            if let Some(v) = value {
                return Err(invalid(
                    s,
                    key,
                    quoted(v),
                    "applies to UDP services only; add protocol = \"udp\" or remove it",
                ));
            }
        }
        return Ok((protocol, UdpTimeouts::default()));
    }
    let text_response = response;
    let idle = match idle {
        None => DEFAULT_UDP_IDLE_TIMEOUT,
        Some(text) => duration_in(
            s,
            "udp_idle_timeout",
            text,
            (MIN_UDP_IDLE, MAX_UDP_IDLE),
            "30s",
        )?,
    };
    let response = match text_response {
        None => Some(DEFAULT_UDP_RESPONSE_TIMEOUT.min(idle)),
        Some("off") => None,
        Some(text) => {
            let d = duration_in(
                s,
                "udp_response_timeout",
                text,
                (MIN_UDP_RESPONSE, MAX_UDP_IDLE),
                "3s",
            )?;
            if d > idle {
                return Err(invalid(
                    s,
                    "udp_response_timeout",
                    quoted(text),
                    format!(
                        "longer than udp_idle_timeout ({}): a flow ends before its deadline; shorten it or raise udp_idle_timeout",
                        crate::units::show_duration(idle)
                    ),
                ));
            }
            Some(d)
        }
    };
    Ok((protocol, UdpTimeouts { idle, response }))
}

/// Longest `release`.
pub const MAX_RELEASE: usize = 64;

/// The release of a service that names none: `canary-` and a hash of its
/// sorted canary backends, the same on every node with the same backends,
/// and new whenever the set changes (new canary backends are a new release).
pub fn derived_release(canary: &[SocketAddr]) -> String {
    let mut backends: Vec<String> = canary.iter().map(ToString::to_string).collect();
    backends.sort();
    // FNV-1a, 64 bit, over the sorted addresses separated by commas.
    let hash = backends
        .join(",")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("canary-{:012x}", hash >> 16)
}

fn validate_release(s: &str, text: &str) -> Result<String, ConfigError> {
    let ok = !text.is_empty()
        && text.len() <= MAX_RELEASE
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if !ok {
        return Err(invalid(
            s,
            "release",
            quoted(truncated(text, 70)),
            format!(
                "1 to {MAX_RELEASE} letters, digits, '.', '-', '_' or '+' (it names the release in etcd keys and state files), e.g. \"v2.4.1\""
            ),
        ));
    }
    Ok(text.to_string())
}

/// The salt of a service without an explicit `salt`: a hash of its name, so
/// every node of a fleet (and every restart) puts a client in the same
/// cohort.
pub fn default_salt(name: &str) -> u32 {
    // FNV-1a, 32 bit.
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn parse_endpoint(section: &str, key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        invalid(
            section,
            key,
            quoted(text),
            "not an address:port; write it like \"10.96.0.10:80\" or \"[fd00::10]:80\"",
        )
    })?;
    // `[::ffff:10.0.0.1]:80` is the IPv4 address: the data plane stores
    // IPv4 mapped, so the two would be one key.
    let addr = match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    };
    if addr.port() == 0 {
        return Err(invalid(
            section,
            key,
            quoted(text),
            "port 0 is not a valid service port",
        ));
    }
    let broadcast = matches!(addr.ip(), IpAddr::V4(v4) if v4.is_broadcast());
    if addr.ip().is_unspecified() || broadcast || addr.ip().is_multicast() {
        return Err(invalid(
            section,
            key,
            quoted(text),
            "must be a unicast address",
        ));
    }
    Ok(addr)
}

fn parse_backends(
    section: &str,
    key: &'static str,
    list: &[String],
) -> Result<Vec<SocketAddr>, ConfigError> {
    if list.len() > MAX_BACKENDS {
        return Err(invalid(
            section,
            key,
            format!("{} backends", list.len()),
            format!("at most {MAX_BACKENDS} backends per cohort"),
        ));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(list.len());
    for text in list {
        let addr = parse_endpoint(section, key, text)?;
        if out.contains(&addr) {
            return Err(invalid(
                section,
                key,
                quoted(text),
                "listed twice; list each backend once",
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

fn parse_prefixes(
    section: &str,
    key: &'static str,
    list: &[String],
) -> Result<Vec<IpPrefix>, ConfigError> {
    let mut out: Vec<IpPrefix> = Vec::with_capacity(list.len());
    for text in list {
        let p: IpPrefix = text
            .parse()
            .map_err(|e: String| invalid(section, key, quoted(text), e))?;
        if out.contains(&p) {
            return Err(invalid(section, key, quoted(text), "listed twice"));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{error_text, parse, with_service};

    #[test]
    fn each_semantic_error_names_the_key_value_and_fix() {
        let base = "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"10.0.1.10:8080\"]\ncanary = [\"10.0.2.10:8080\"]";
        let cases: &[(&str, &str)] = &[
            (
                "weight = \"150%\"",
                "service \"web\": weight = \"150%\": more than 100%; write a percentage or parts per million",
            ),
            (
                "weight = 5",
                "service \"web\": weight = 5: a bare number is ambiguous",
            ),
            (
                "cohort = \"random\"",
                "service \"web\": cohort = \"random\": must be \"sticky\" or \"per-connection\"",
            ),
            (
                "always_canary = [\"192.168.10.1/24\"]",
                "service \"web\": always_canary = \"192.168.10.1/24\": host bits are set; did you mean \"192.168.10.0/24\"?",
            ),
            (
                "always_canary = [\"10.1.0.0/16\"]\nnever_canary = [\"10.1.0.0/16\"]",
                "service \"web\": never_canary = \"10.1.0.0/16\": also in always_canary",
            ),
            (
                "never_canary = [\"fd00::/8\"]",
                "never_canary = \"fd00::/8\": an IPv6 prefix never matches a client of an IPv4 VIP",
            ),
            (
                "protocol = \"sctp\"",
                "service \"web\": protocol = \"sctp\": must be \"tcp\" or \"udp\"",
            ),
            (
                "udp_idle_timeout = \"60s\"",
                "service \"web\": udp_idle_timeout = \"60s\": applies to UDP services only; add protocol = \"udp\" or remove it",
            ),
            (
                "protocol = \"udp\"\nudp_idle_timeout = \"1s\"",
                "service \"web\": udp_idle_timeout = \"1s\": must be a duration between 2s and 1d",
            ),
            (
                "protocol = \"udp\"\nudp_response_timeout = \"soon\"",
                "service \"web\": udp_response_timeout = \"soon\": not a duration",
            ),
            (
                "protocol = \"udp\"\nudp_idle_timeout = \"5s\"\nudp_response_timeout = \"10s\"",
                "service \"web\": udp_response_timeout = \"10s\": longer than udp_idle_timeout (5s): a flow ends before its deadline",
            ),
        ];
        for (extra, expected) in cases {
            let msg = error_text(&with_service(&format!("{base}\n{extra}")));
            assert!(
                msg.contains(expected),
                "for {extra:?}:\n expected {expected:?}\n got      {msg:?}"
            );
        }
    }

    #[test]
    fn bad_addresses_are_rejected() {
        let cases: &[(&str, &str)] = &[
            (
                "vip = \"10.96.0.10\"\nstable = [\"10.0.1.10:8080\"]",
                "vip = \"10.96.0.10\": not an address:port; write it like \"10.96.0.10:80\"",
            ),
            (
                "vip = \"[fd00::10]:80\"\nstable = [\"10.0.1.10:8080\"]",
                "stable = \"10.0.1.10:8080\": an IPv4 backend for an IPv6 VIP",
            ),
            (
                "vip = \"[fd00::10]:80\"\nstable = [\"[fd00::1]:8080\"]\nalways_canary = [\"fd00:1::1/64\"]\ncanary = [\"[fd00::2]:8080\"]",
                "always_canary = \"fd00:1::1/64\": host bits are set; did you mean \"fd00:1::/64\"?",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"[fd00::1]:8080\"]",
                "stable = \"[fd00::1]:8080\": an IPv6 backend for an IPv4 VIP; a service's VIP and backends share a family",
            ),
            (
                "vip = \"10.96.0.10:0\"\nstable = [\"10.0.1.10:8080\"]",
                "port 0 is not a valid service port",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.300:8080\"]",
                "stable = \"10.0.1.300:8080\": not an address:port",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.1:1\", \"10.0.1.1:1\"]",
                "stable = \"10.0.1.1:1\": listed twice",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = []",
                "stable = []: a service needs at least one stable backend",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.1:1\"]\ncanary = [\"10.0.1.1:1\"]",
                "canary = \"10.0.1.1:1\": also listed in stable",
            ),
            (
                "vip = \"10.96.0.10:80\"\nstable = [\"10.0.1.1:1\"]\ncanary = [\"[fd00::2]:80\"]",
                "canary = \"[fd00::2]:80\": an IPv6 backend for an IPv4 VIP; a service's VIP and backends share a family",
            ),
        ];
        for (lines, expected) in cases {
            let msg = error_text(&with_service(&format!("name = \"web\"\n{lines}")));
            assert!(
                msg.contains(expected),
                "for {lines:?}:\n expected {expected:?}\n got      {msg:?}"
            );
        }
    }

    #[test]
    fn a_nonzero_weight_needs_canary_backends() {
        let msg = error_text(&with_service(
            "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"10.0.1.10:8080\"]\nweight = \"5%\"",
        ));
        assert_eq!(
            msg,
            "service \"web\": weight = \"5%\": no canary backends to send traffic to; \
             add `canary = [...]` or set weight = \"0%\""
        );
        let msg = error_text(&with_service(
            "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [\"10.0.1.10:8080\"]\nalways_canary = [\"10.0.0.0/8\"]",
        ));
        assert!(
            msg.contains("always_canary = \"10.0.0.0/8\": no canary backends"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_vips_and_names_are_rejected() {
        let svc = |name: &str, vip: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nstable = [\"10.0.1.10:8080\"]\n"
            )
        };
        let head = "[agent]\ninterfaces = [\"lo\"]\n";
        let msg = error_text(&format!(
            "{head}{}{}",
            svc("a", "10.96.0.10:80"),
            svc("b", "10.96.0.10:80")
        ));
        assert_eq!(
            msg,
            "service \"b\": vip = \"10.96.0.10:80\": already used by service \"a\" for tcp; each VIP:port belongs to one service per protocol"
        );
        let msg = error_text(&format!(
            "{head}{}{}",
            svc("a", "10.96.0.10:80"),
            svc("a", "10.96.0.11:80")
        ));
        assert!(
            msg.contains("service \"a\": name = \"a\": used by an earlier service"),
            "{msg}"
        );
        // Same address, other port: a different service.
        parse(&format!(
            "{head}{}{}",
            svc("a", "10.96.0.10:80"),
            svc("b", "10.96.0.10:443")
        ))
        .expect("distinct ports");
    }

    #[test]
    fn a_tcp_and_a_udp_service_may_share_a_vip_port_with_udp_timeouts_defaulted() {
        let head = "[agent]\ninterfaces = [\"lo\"]\n";
        let svc = |name: &str, extra: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nvip = \"10.96.0.10:53\"\nstable = [\"10.0.1.10:53\"]\n{extra}\n"
            )
        };
        let c = parse(&format!(
            "{head}{}{}",
            svc("dns-tcp", ""),
            svc("dns", "protocol = \"udp\"")
        ))
        .expect("one VIP:port, two protocols");
        assert_eq!(c.services[0].protocol, Protocol::Tcp, "tcp is the default");
        assert_eq!(c.services[1].protocol, Protocol::Udp);
        assert_eq!(
            c.services[1].udp,
            UdpTimeouts {
                idle: Duration::from_secs(30),
                response: Some(Duration::from_secs(3)),
            },
            "defaults: 30 s idle (nf_conntrack_udp_timeout), 3 s to the first reply"
        );
        // Two UDP services on one VIP:port are one too many.
        let msg = error_text(&format!(
            "{head}{}{}",
            svc("a", "protocol = \"udp\""),
            svc("b", "protocol = \"udp\"")
        ));
        assert!(
            msg.contains("already used by service \"a\" for udp"),
            "{msg}"
        );
        // "off": a one-way service whose backends never reply; a short idle
        // timeout caps the default response timeout.
        let c = parse(&format!(
            "{head}{}",
            svc(
                "log",
                "protocol = \"udp\"\nudp_response_timeout = \"off\"\nudp_idle_timeout = \"2m\""
            )
        ))
        .expect("off");
        assert_eq!(
            c.services[0].udp,
            UdpTimeouts {
                idle: Duration::from_mins(2),
                response: None,
            }
        );
        let c = parse(&format!(
            "{head}{}",
            svc("fast", "protocol = \"udp\"\nudp_idle_timeout = \"2s\"")
        ))
        .expect("short idle");
        assert_eq!(c.services[0].udp.response, Some(Duration::from_secs(2)));
    }

    #[test]
    fn too_many_backends_are_rejected() {
        let many: Vec<String> = (1..=MAX_BACKENDS + 1)
            .map(|i| format!("\"10.0.1.{i}:80\""))
            .collect();
        let msg = error_text(&with_service(&format!(
            "name = \"web\"\nvip = \"10.96.0.10:80\"\nstable = [{}]",
            many.join(", ")
        )));
        assert!(
            msg.contains("stable = 33 backends: at most 32 backends per cohort"),
            "{msg}"
        );
    }
}

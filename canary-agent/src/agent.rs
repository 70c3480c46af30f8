//! The daemon: validate the config, load and fill the data plane, attach,
//! then serve signals until told to stop.
//!
//! SIGHUP re-reads the config file and applies it all or nothing; SIGINT and
//! SIGTERM detach from every interface and exit.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigError},
    dataplane::{ApplyReport, Dataplane, DataplaneError, decode_breaker_event, error_chain},
    http,
    rollout::{RollbackReason, ServiceState, StateError, StateStore},
    telemetry::Exporter,
};

/// How the agent was started.
#[derive(Clone, Debug)]
pub struct Options {
    /// Path of the TOML config.
    pub config: PathBuf,
    /// Interfaces from the command line; replace `[agent] interfaces`.
    pub interfaces: Vec<String>,
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config is invalid; nothing was attached.
    #[error("invalid config, nothing was attached")]
    Config(#[from] ConfigError),
    /// Loading, filling or attaching the data plane failed; whatever was
    /// attached has been detached.
    #[error("data plane setup failed, nothing is left attached")]
    Dataplane(#[from] DataplaneError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A persisted rollout state could not be read; nothing was attached
    /// (starting anyway could re-raise a rolled-back canary).
    #[error("cannot read the rollout state, nothing was attached")]
    State(#[from] StateError),
    /// The breaker's event ring buffer could not be watched.
    #[error("cannot watch the breaker's event ring buffer")]
    Events(#[source] std::io::Error),
    /// The metrics address could not be bound; nothing was attached.
    #[error(
        "cannot listen on metrics_addr {addr} (in use? set [agent] metrics_addr), nothing was attached"
    )]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    // Handlers first, so a signal during setup is not lost.
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;

    let mut config = Config::load(&opts.config, &opts.interfaces)?;
    // Bound before anything is attached: a taken port fails cleanly.
    let metrics_addr = config.agent.metrics_addr;
    let listener = TcpListener::bind(metrics_addr)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: metrics_addr,
            source,
        })?;
    let store = StateStore::new(&config.agent.state_dir);
    let mut states = load_states(&store, &config)?;
    let mut dp = Dataplane::load(config.agent.conntrack_capacity)?;
    for (name, state) in &states {
        dp.set_canary_off(name, !state.canary_allowed())?;
    }
    let report = dp.apply(&config.services)?;
    publish_states(&dp, &states);
    let ring = dp
        .take_events()
        .ok_or(AgentError::Events(std::io::Error::other("taken twice")))?;
    // SAFETY: the ring buffer owns its map fd for its whole life, and
    // as_raw_fd always returns that fd; the AsyncFd owns the ring buffer.
    let mut events =
        unsafe { AsyncFd::register(ring) }.map_err(|e| AgentError::Events(e.into_parts().1))?;
    log_services(&config, &report);
    for iface in &config.agent.interfaces {
        // On error, dropping `dp` detaches the interfaces already attached.
        dp.attach(iface)?;
        info!(interface = %iface, "attached TC ingress and egress");
    }
    let exporter = Arc::new(Exporter::new(
        dp.stats_source(),
        config.agent.metrics_buckets_per_octave,
    ));
    let server = tokio::spawn(http::serve(listener, exporter));
    info!(addr = %metrics_addr, "serving Prometheus metrics at /metrics");
    warn_reserved(&config);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        config = %opts.config.display(),
        services = config.services.len(),
        interfaces = ?config.agent.interfaces,
        "canary-agent ready"
    );

    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                match guard {
                    Ok(mut guard) => {
                        breaker_events(guard.get_inner_mut(), &mut dp, &store, &mut states);
                        guard.clear_ready();
                    }
                    Err(e) => warn!(error = %e, "breaker event ring buffer unreadable"),
                }
            }
            _ = hup.recv() => {
                // Trips already in the ring are recorded before the reload
                // reads the state files, so a reload cannot undo one.
                breaker_events(events.get_mut(), &mut dp, &store, &mut states);
                match reload(&opts, &config, &mut dp, &store, &mut states) {
                    Ok(new) => config = new,
                    Err(e) => error!(error = %error_chain(&e), "config reload rejected; the previous config is still active"),
                }
            }
            _ = sweep.tick() => {
                match dp.sweep_pending(config.agent.handshake_timeout) {
                    Ok(0) => {}
                    Ok(n) => info!(timed_out = n, "handshakes timed out"),
                    Err(e) => warn!(error = %error_chain(&e), "handshake sweep failed"),
                }
            }
            _ = int.recv() => { info!("SIGINT received, shutting down"); break; }
            _ = term.recv() => { info!("SIGTERM received, shutting down"); break; }
        }
    }
    server.abort();
    log_counters(&dp);
    let interfaces: Vec<String> = dp.attached().map(str::to_string).collect();
    dp.detach_all();
    info!(interfaces = ?interfaces, "detached; canary-agent stopped");
    Ok(())
}

/// Why a reload was rejected.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("applying the new config failed and was rolled back")]
    Dataplane(#[from] DataplaneError),
}

/// Applies the config file anew: services first (all or nothing), then
/// interface changes (new ones attached before removed ones are detached).
fn reload(
    opts: &Options,
    old: &Config,
    dp: &mut Dataplane,
    store: &StateStore,
    states: &mut BTreeMap<String, ServiceState>,
) -> Result<Config, ReloadError> {
    info!(config = %opts.config.display(), "SIGHUP received, reloading config");
    let new = Config::load(&opts.config, &opts.interfaces)?;
    // State files are read anew: removing one is how an operator clears a
    // rollback (until canaryctl can).
    let new_states = load_states(store, &new)?;
    let added: Vec<&String> = new
        .agent
        .interfaces
        .iter()
        .filter(|i| !old.agent.interfaces.contains(i))
        .collect();
    let mut attached = Vec::new();
    for iface in &added {
        if let Err(e) = dp.attach(iface) {
            for done in attached {
                dp.detach(done);
            }
            return Err(e.into());
        }
        attached.push(iface.as_str());
    }
    for (name, state) in &new_states {
        let was = states
            .get(name)
            .map(ServiceState::canary_allowed)
            .unwrap_or(true);
        if was != state.canary_allowed() {
            if let Err(e) = dp.set_canary_off(name, !state.canary_allowed()) {
                for done in attached {
                    dp.detach(done);
                }
                return Err(e.into());
            }
            info!(event = "rollout-state", service = %name, state = state.name(), "rollout state changed by its state file");
        }
    }
    let report = match dp.apply(&new.services) {
        Ok(report) => report,
        Err(e) => {
            for done in attached {
                dp.detach(done);
            }
            return Err(e.into());
        }
    };
    for iface in &attached {
        info!(interface = %iface, "attached TC ingress and egress");
    }
    for iface in old
        .agent
        .interfaces
        .iter()
        .filter(|i| !new.agent.interfaces.contains(i))
    {
        dp.detach(iface);
        info!(interface = %iface, "detached");
    }
    log_services(&new, &report);
    *states = new_states;
    publish_states(dp, states);
    // Interfaces and handshake_timeout apply now; the rest is bound at start.
    let restart_only = |c: &Config| {
        (
            c.agent.control_socket.clone(),
            c.agent.metrics_addr,
            c.agent.metrics_buckets_per_octave,
            c.agent.conntrack_capacity,
        )
    };
    if restart_only(old) != restart_only(&new) {
        warn!(
            "control_socket, metrics_addr, metrics_buckets_per_octave and conntrack_capacity \
             changes take effect at the next restart"
        );
    }
    info!(
        added = ?report.added,
        changed = ?report.changed,
        removed = ?report.removed,
        "config reloaded"
    );
    Ok(new)
}

/// The persisted state of every configured service.
fn load_states(
    store: &StateStore,
    config: &Config,
) -> Result<BTreeMap<String, ServiceState>, StateError> {
    let mut states = BTreeMap::new();
    for svc in &config.services {
        let state = store.load(&svc.name)?;
        if let ServiceState::RolledBack { reason, detail, .. } = &state {
            warn!(service = %svc.name, reason = reason.as_str(), detail = %detail,
                "service is rolled back: no new connection goes to canary");
        }
        states.insert(svc.name.clone(), state);
    }
    Ok(states)
}

/// Exports every service's rollout state.
fn publish_states(dp: &Dataplane, states: &BTreeMap<String, ServiceState>) {
    let source = dp.stats_source();
    let mut source = source.lock().unwrap_or_else(|p| p.into_inner());
    for (name, state) in states {
        source.set_rollout(name, state.name(), None);
    }
}

/// Records every breaker trip waiting in the ring buffer: the data plane has
/// already cut the canary off; this persists the rollback and says so.
fn breaker_events(
    ring: &mut RingBuf<MapData>,
    dp: &mut Dataplane,
    store: &StateStore,
    states: &mut BTreeMap<String, ServiceState>,
) {
    while let Some(item) = ring.next() {
        let Some(ev) = decode_breaker_event(&item) else {
            warn!(bytes = item.len(), "short breaker event ignored");
            continue;
        };
        drop(item);
        let Some(name) = dp.service_name(ev.svc_id).map(str::to_string) else {
            warn!(svc_id = ev.svc_id, "breaker event for an unknown service");
            continue;
        };
        if states.get(&name).is_some_and(|s| !s.canary_allowed()) {
            continue;
        }
        let detail = format!(
            "{} canary failures of {} attempts in one breaker window",
            ev.failures, ev.attempts
        );
        let state = ServiceState::rolled_back(RollbackReason::Breaker, detail.clone());
        if let Err(e) = store.save(&name, &state) {
            // The cut-off stands in the kernel; only its persistence failed.
            error!(service = %name, error = %error_chain(&e), "rollback not persisted: a restart would re-raise the canary");
        }
        if let Err(e) = dp.set_canary_off(&name, true) {
            error!(service = %name, error = %error_chain(&e), "cannot mark the service rolled back in the data plane");
        }
        {
            let source = dp.stats_source();
            let mut source = source.lock().unwrap_or_else(|p| p.into_inner());
            source.set_rollout(&name, state.name(), Some(RollbackReason::Breaker.as_str()));
        }
        warn!(
            event = "rollback",
            service = %name,
            reason = "breaker",
            failures = ev.failures,
            attempts = ev.attempts,
            tripped_at_ns = ev.at_ns,
            "canary rolled back by the data-plane breaker: no new connection goes to canary"
        );
        states.insert(name, state);
    }
}

fn log_services(config: &Config, report: &ApplyReport) {
    for svc in &config.services {
        if report.added.contains(&svc.name) || report.changed.contains(&svc.name) {
            info!(
                service = %svc.name,
                vip = %svc.vip,
                weight = %svc.weight,
                cohort = %svc.cohort,
                stable = svc.stable.len(),
                canary = svc.canary.len(),
                always_canary = svc.always_canary.len(),
                never_canary = svc.never_canary.len(),
                "service programmed"
            );
        }
    }
    for name in &report.removed {
        info!(service = %name, "service removed");
    }
}

fn warn_reserved(config: &Config) {
    // Accepted so configs written for later releases validate today.
    info!(
        control_socket = %config.agent.control_socket.display(),
        "the control socket (canaryctl) is not built yet; this setting is reserved"
    );
}

fn log_counters(dp: &Dataplane) {
    match dp.counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .filter(|(_, v)| *v > 0)
                .map(|(c, v)| format!("{}={v}", c.name()))
                .collect();
            info!(counters = %summary.join(" "), "data-plane counters");
        }
        Err(e) => warn!(error = %error_chain(&e), "cannot read data-plane counters"),
    }
}

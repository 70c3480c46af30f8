//! The daemon: validate the config, load and fill the data plane, attach,
//! then serve signals, the control socket and the breaker's events until
//! told to stop.
//!
//! SIGHUP (or `canaryctl reload`) re-reads the config file and applies it
//! all or nothing; SIGINT and SIGTERM end the agent, leaving the pinned
//! data plane running (unless `--detach-on-exit`).
//! Everything that changes the data plane runs on this one task, in order.
//!
//! - `mod.rs`: start (adopt, program, attach), the loop, stop;
//! - `rollout.rs`: events into the rollout engine, its effects carried out;
//! - `reload.rs`: the config read anew and applied all or nothing;
//! - `judging.rs`: which plans are due, their windows, the judgements;
//! - `fleet.rs`: the fleet's records in, this node's decisions out;
//! - `analysis.rs`: checks and fleet evidence from Prometheus, off the loop;
//! - `status.rs`: the answer to `canaryctl status`.

mod analysis;
mod fleet;
mod judging;
mod reload;
mod rollout;
mod status;

use self::{
    judging::StepWindow,
    reload::{ChangeError, configure},
};

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{Config, ConfigError, IngressMode, ServiceConfig},
    control::{self, Access, ControlError, ControlServer, ErrorCode, Request, Response},
    dataplane::{ApplyReport, Capacity, Dataplane, DataplaneError, decode_breaker_event},
    error_chain,
    events::Events,
    http,
    rollout::{
        StateError, StateStore,
        engine::{self, Event, Refusal, Rollout},
    },
    supervise::{Supervisor, SupervisorError},
    telemetry::Exporter,
};

/// How the agent was started.
#[derive(Clone, Debug)]
pub struct Options {
    /// Path of the TOML config.
    pub config: PathBuf,
    /// Interfaces from the command line; replace `[agent] interfaces`.
    pub interfaces: Vec<String>,
    /// Remove links and pins at exit, so the data plane ends with the agent
    /// (labs and tests). Without it the data plane keeps running.
    pub detach_on_exit: bool,
    /// `--node`: replaces `[fleet] node`.
    pub node: Option<String>,
}

impl Options {
    /// Reads and validates the config, with the command line's overrides.
    async fn load(&self) -> Result<Config, ConfigError> {
        Config::load_off_thread(&self.config, &self.interfaces)
            .await?
            .with_node(self.node.as_deref())
    }
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config is invalid; nothing was attached.
    #[error("invalid config, nothing was attached")]
    Config(#[from] ConfigError),
    /// Loading, adopting, filling or attaching the data plane failed. A
    /// data plane this agent created is removed again; one it was adopting
    /// keeps running as it was.
    #[error("data plane setup failed")]
    Dataplane(#[from] DataplaneError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A persisted rollout state could not be read; nothing was attached
    /// (starting anyway could re-raise a rolled-back canary).
    #[error("cannot read the rollout state, nothing was attached")]
    State(#[from] StateError),
    /// A persisted rollout state does not fit the config; nothing was
    /// changed.
    #[error("a rollout state does not fit the config, nothing was changed")]
    StateConflict(#[from] Refusal),
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
    /// The control socket could not be set up; nothing was attached.
    #[error("control socket setup failed, nothing was attached")]
    Control(#[from] ControlError),
    /// The fleet's etcd client could not be set up (a TLS file unreadable).
    #[error("cannot set up the fleet's etcd client")]
    Fleet(#[source] crate::fleet::EtcdError),
    /// A serving task kept ending (see the log); the agent stopped.
    #[error("a serving task failed")]
    Task(#[from] SupervisorError),
}

/// The running agent: config, data plane and rollout state, changed only
/// from the main loop.
struct Agent {
    opts: Options,
    config: Config,
    dp: Dataplane,
    store: StateStore,
    /// Each configured service's rollout: the one source of truth for the
    /// weight in force and whether its canary is cut off. The data plane is
    /// programmed from it; the kernel's breaker flag comes back as an event.
    rollouts: BTreeMap<String, Rollout>,
    /// Each service's latest verdicts (judgements and state changes) with
    /// their times, newest last: `status` shows the last, `explain` them
    /// all, the fleet summary the last.
    verdicts: BTreeMap<String, std::collections::VecDeque<(u64, String)>>,
    /// The judge's window of each plan-driven service.
    windows: BTreeMap<String, StepWindow>,
    /// Where state changes are announced.
    events: Events,
    /// This node's name, in events.
    node: String,
    /// Configured interfaces whose links died with them, and their modes:
    /// re-attached when they come back.
    lost_interfaces: BTreeMap<String, IngressMode>,
    /// The fleet, with `[fleet]`.
    fleet: Option<fleet::FleetLink>,
    /// Checks and fleet evidence from Prometheus (with `[analysis]`).
    analysis: analysis::Analysis,
    /// Each service's state changes (`canaryctl history`).
    history: crate::rollout::history::History,
    /// Per service, the rollback (its time) whose drain deadline was
    /// enforced (once per rollback), and what that did, in words.
    drained: BTreeMap<String, (u64, String)>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    // Handlers first, so a signal during setup is not lost.
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;

    let config = opts.load().await?;
    // The fleet's TLS files are read before anything is attached: an
    // unreadable one fails the start cleanly (connecting itself is lazy).
    if let Some(fc) = &config.fleet {
        crate::fleet::connect(fc).await.map_err(AgentError::Fleet)?;
    }
    // Sockets are bound before anything is attached: a taken port or a
    // live agent on the control socket fails cleanly.
    let metrics_addr = config.agent.metrics_addr;
    let listener = TcpListener::bind(metrics_addr)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: metrics_addr,
            source,
        })?;
    let access = Access::resolve(config.agent.control_group.as_deref()).await?;
    let control_path = config.agent.control_socket.clone();
    let control_listener = control::bind(&control_path, &access)?;

    let store = StateStore::new(&config.agent.state_dir);
    let (rollouts, mut pending) =
        configure(&store, &config, &BTreeMap::new()).map_err(|e| match e {
            ChangeError::State(e) => AgentError::State(e),
            ChangeError::Refused(e) => AgentError::StateConflict(e),
            ChangeError::Config(e) => AgentError::Config(e),
            ChangeError::Dataplane(e) => AgentError::Dataplane(e),
        })?;
    let mut dp = Dataplane::open(Capacity::from(&config.agent), &config.agent.bpffs_dir)?;
    let adopted = match dp.adopt(&config.services) {
        Ok(a) => a,
        Err(e) => return Err(abandon(dp, e)),
    };
    if !dp.is_fresh() {
        info!(
            bpffs_dir = %config.agent.bpffs_dir.display(),
            services = adopted.services,
            conntrack_entries = adopted.flows,
            "adopting the pinned data plane: established connections, counters and breaker windows carry over"
        );
    }
    let webhook = config.agent.webhook.clone();
    // Every long-running task is supervised: restarted if it ends, or the
    // agent stops; never silently gone.
    let mut tasks = Supervisor::new();
    let node = config_node(&config);
    let (analysis_tx, mut analysis_done) = mpsc::channel(64);
    let state_dir = config.agent.state_dir.clone();
    let mut agent = Agent {
        opts,
        config,
        dp,
        store,
        rollouts,
        verdicts: BTreeMap::new(),
        windows: BTreeMap::new(),
        events: Events::start(webhook, &mut tasks),
        node,
        lost_interfaces: BTreeMap::new(),
        fleet: None,
        analysis: analysis::Analysis::new(analysis_tx),
        history: crate::rollout::history::History::new(&state_dir),
        drained: BTreeMap::new(),
    };
    for svc in &agent.config.services {
        agent.history.load(&svc.name);
    }
    // Trips the kernel recorded while no agent ran (or that the last one
    // did not get to persist) become rollbacks like any other trip.
    for (name, state) in adopted.tripped {
        let event = Event::BreakerTripped {
            failures: state.failures,
            attempts: state.attempts,
        };
        if let Some(p) = agent.decide_pending(&name, event) {
            pending.push(p);
        }
    }
    if let Err(e) = agent.setup() {
        return Err(abandon(agent.dp, e));
    }
    // The data plane is programmed from the decided states: what is left
    // is persisting and announcing them.
    agent.carry_out_programmed(pending);
    let mut fleet_events = None;
    if let Some(fc) = agent.config.fleet.clone() {
        let (node, endpoints) = (fc.node.clone(), fc.etcd.clone());
        let mut fleet = crate::fleet::Fleet::start(fc, &mut tasks)
            .await
            .map_err(AgentError::Fleet)?;
        fleet_events = fleet.events.take();
        agent.fleet = Some(fleet::FleetLink::new(fleet));
        info!(node = %node, etcd = ?endpoints, "fleet: rollouts are shared through etcd (until it answers, the last known states stay: fail static)");
    }
    let ring = agent
        .dp
        .take_events()
        .ok_or(AgentError::Events(std::io::Error::other("taken twice")))?;
    // SAFETY: the ring buffer owns its map fd for its whole life, and
    // as_raw_fd always returns that fd; the AsyncFd owns the ring buffer.
    let mut events =
        unsafe { AsyncFd::register(ring) }.map_err(|e| AgentError::Events(e.into_parts().1))?;

    let exporter = Arc::new(Exporter::new(
        agent.dp.stats_source(),
        agent.config.agent.metrics_buckets_per_octave,
    ));
    let metrics_server = http::MetricsServer::new(listener, exporter);
    tasks.spawn("metrics server", move || metrics_server.serve());
    info!(addr = %metrics_addr, "serving Prometheus metrics at /metrics");
    let (calls_tx, mut calls) = mpsc::channel(64);
    let control_server = ControlServer::new(control_listener, access, calls_tx);
    tasks.spawn("control socket server", move || control_server.serve());
    info!(socket = %control_path.display(), "serving the control socket (canaryctl)");
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each plan's judgement runs at its own interval; this checks who is due.
    let mut judge_tick = tokio::time::interval(Duration::from_millis(100));
    judge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        config = %agent.opts.config.display(),
        services = agent.config.services.len(),
        interfaces = ?agent.config.agent.interfaces,
        "canary-agent ready"
    );

    let mut failed = None;
    loop {
        tokio::select! {
            e = tasks.watch() => { failed = Some(e); break; }
            guard = events.readable_mut() => {
                match guard {
                    Ok(mut guard) => {
                        agent.breaker_events(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                    Err(e) => warn!(error = %e, "breaker event ring buffer unreadable"),
                }
            }
            Some((cmd, reply)) = calls.recv() => {
                // Trips already in the ring are recorded first, so no command
                // acts on a state the data plane has already left.
                agent.breaker_events(events.get_mut());
                let _ = reply.send(agent.execute(cmd).await);
            }
            _ = hup.recv() => {
                agent.breaker_events(events.get_mut());
                info!(config = %agent.opts.config.display(), "SIGHUP received, reloading config");
                let new = agent.opts.load().await;
                if let Err(e) = agent.reload(new) {
                    error!(error = %error_chain(&e), "config reload rejected; the previous config is still active");
                }
            }
            Some(ev) = next_fleet_event(&mut fleet_events) => {
                agent.breaker_events(events.get_mut());
                agent.fleet_event(ev);
            }
            _ = judge_tick.tick() => {
                agent.breaker_events(events.get_mut());
                agent.judge_due();
                agent.checks_due();
                agent.shadow_breakers();
            }
            Some(done) = analysis_done.recv() => {
                agent.breaker_events(events.get_mut());
                agent.analysis_done(done);
            }
            _ = sweep.tick() => {
                agent.watch_interfaces();
                agent.publish_attached();
                agent.drain_due();
                agent.refresh_summaries();
                match agent.dp.sweep_pending(agent.config.agent.handshake_timeout) {
                    Ok(0) => {}
                    Ok(n) => info!(timed_out = n, "handshakes timed out"),
                    Err(e) => warn!(error = %error_chain(&e), "handshake sweep failed"),
                }
                match agent.dp.sweep_udp() {
                    Ok(s) if s == crate::dataplane::UdpSwept::default() => {}
                    Ok(s) => debug!(expired = s.expired, unanswered = s.timed_out, "UDP flows swept"),
                    Err(e) => warn!(error = %error_chain(&e), "UDP sweep failed"),
                }
            }
            _ = int.recv() => { info!("SIGINT received, shutting down"); break; }
            _ = term.recv() => { info!("SIGTERM received, shutting down"); break; }
        }
    }
    tasks.shutdown();
    let _ = std::fs::remove_file(&control_path);
    agent.log_counters();
    let interfaces: Vec<String> = agent
        .dp
        .attached()
        .map(|(name, _)| name.to_string())
        .collect();
    if agent.opts.detach_on_exit {
        let removed = agent.dp.uninstall()?;
        info!(interfaces = ?interfaces, socket_lb = ?agent.config.agent.socket_lb, pins = removed, "detached and removed the pinned data plane (--detach-on-exit); canary-agent stopped");
    } else {
        // Also after a failed task: the data plane goes on, as after a crash.
        info!(
            interfaces = ?interfaces,
            bpffs_dir = %agent.config.agent.bpffs_dir.display(),
            "canary-agent stopped; the data plane keeps steering with the last weights (the next agent adopts it; `canary-agent uninstall` removes it)"
        );
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The next event of the fleet's tasks; never, without a fleet.
async fn next_fleet_event(
    events: &mut Option<mpsc::Receiver<crate::fleet::FleetEvent>>,
) -> Option<crate::fleet::FleetEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// This node's name: `[fleet] node` (or `--node`), else the host name.
fn config_node(config: &Config) -> String {
    config
        .fleet
        .as_ref()
        .map_or_else(crate::sys::hostname, |f| f.node.clone())
}

/// Gives up a data plane whose setup failed: one this agent created is
/// removed (nothing half-installed stays behind), one it adopted keeps
/// running as the previous agent left it.
fn abandon(mut dp: Dataplane, error: DataplaneError) -> AgentError {
    if dp.is_fresh() {
        if let Err(e) = dp.uninstall() {
            warn!(error = %error_chain(&e), "cannot remove the half-installed data plane");
        }
    } else {
        warn!("the data plane adopted from the previous agent keeps running as it was");
    }
    AgentError::Dataplane(error)
}

/// The services as the data plane should see them: configured values, with
/// the weight the rollout state puts in force. In shadow mode the kernel
/// breaker is off (it would cut the canary off with no agent in the loop);
/// the judge and the checks still report.
fn effective(config: &Config, rollouts: &BTreeMap<String, Rollout>) -> Vec<ServiceConfig> {
    config
        .services
        .iter()
        .map(|svc| {
            let mut out = svc.clone();
            if let Some(rollout) = rollouts.get(&svc.name) {
                out.weight = crate::rollout::enforced(svc, &rollout.state).0;
            }
            if svc.mode == crate::config::Mode::Shadow {
                out.breaker.enabled = false;
            }
            out
        })
        .collect()
}

/// The services whose canary the rollout states cut off (never by an
/// automatic decision in shadow mode).
fn canary_off(config: &Config, rollouts: &BTreeMap<String, Rollout>) -> BTreeSet<String> {
    config
        .services
        .iter()
        .filter(|svc| {
            rollouts
                .get(&svc.name)
                .is_some_and(|r| crate::rollout::enforced(svc, &r.state).1)
        })
        .map(|svc| svc.name.clone())
        .collect()
}

impl Agent {
    /// Runs one control command.
    async fn execute(&mut self, cmd: Request) -> Response {
        match cmd {
            Request::Status { service } => {
                let fleet = self.fleet_status(service.as_deref()).await;
                self.status_with(service.as_deref(), fleet)
            }
            Request::Reload => match self.reload(self.opts.load().await) {
                Ok(()) => Response::ok(serde_json::json!({ "reloaded": true })),
                Err(e) => Response::error(
                    ErrorCode::Conflict,
                    format!(
                        "reload rejected, the running config stays: {}",
                        error_chain(&e)
                    ),
                ),
            },
            Request::SetWeight { service, weight } => {
                self.operator(&service, engine::Command::SetWeight(weight))
                    .await
            }
            Request::Promote { service } => self.operator(&service, engine::Command::Promote).await,
            Request::Rollback { service } => {
                self.operator(&service, engine::Command::Rollback).await
            }
            Request::Resume { service } => self.operator(&service, engine::Command::Resume).await,
            Request::Pause { service } => self.operator(&service, engine::Command::Pause).await,
            Request::Approve { service } => self.operator(&service, engine::Command::Approve).await,
            Request::History { service } => self.history_of(&service),
            Request::Explain { service } => self.explain(&service),
        }
    }

    /// An operator's command: fleet-wide with `[fleet]`, else here.
    async fn operator(&mut self, service: &str, command: engine::Command) -> Response {
        if self.fleet.is_some() {
            self.fleet_command(service, command).await
        } else {
            self.command(service, command)
        }
    }

    /// Records every breaker trip waiting in the ring buffer: the data plane
    /// has already cut the canary off; this persists the rollback and says
    /// so.
    fn breaker_events(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let Some(ev) = decode_breaker_event(&item) else {
                warn!(bytes = item.len(), "short breaker event ignored");
                continue;
            };
            drop(item);
            let Some(name) = self.dp.service_name(ev.svc_id).map(str::to_string) else {
                warn!(svc_id = ev.svc_id, "breaker event for an unknown service");
                continue;
            };
            let event = Event::BreakerTripped {
                failures: ev.failures,
                attempts: ev.attempts,
            };
            if let Err(e) = self.feed(&name, event) {
                // The cut-off stands in the kernel; only its record failed.
                error!(service = %name, tripped_at_ns = ev.at_ns, error = %e, "breaker rollback not persisted: a restart would re-raise the canary");
            }
        }
    }

    /// Programs the maps from the config and the rollout states, attaches
    /// to every configured interface (taking over pinned links), removes
    /// pinned links the config no longer names, and completes any map
    /// migration.
    fn setup(&mut self) -> Result<(), DataplaneError> {
        let report = self.dp.apply(
            &effective(&self.config, &self.rollouts),
            &canary_off(&self.config, &self.rollouts),
        )?;
        self.publish_states();
        self.log_services(&report);
        // Migrated maps: the hand-over window is kept to the attach calls.
        self.dp.catch_up_migration()?;
        for iface in self.config.agent.interfaces.clone() {
            self.dp.attach(&iface.name, iface.mode)?;
            info!(interface = %iface.name, mode = iface.mode.as_str(), "attached");
        }
        if let Some(cgroup) = self.config.agent.socket_lb.clone() {
            self.dp.attach_socket_lb(&cgroup)?;
            info!(cgroup = %cgroup.display(), "socket LB attached: connect() to a VIP from this cgroup is steered at the socket");
        } else {
            let removed = self.dp.detach_socket_lb();
            if removed > 0 {
                info!(links = removed, "socket LB detached (socket_lb = false)");
            }
        }
        self.dp.finish_migration()?;
        self.publish_attached();
        for (interface, hook) in self.dp.prune_links() {
            info!(interface = %interface, hook = %hook, "detached a pinned link the config no longer names");
        }
        Ok(())
    }

    /// Re-attaches interfaces that were deleted and created again (a veth
    /// recreated), and says when one disappears.
    fn watch_interfaces(&mut self) {
        for (name, mode, exists) in self.dp.dead_links() {
            // Its links died with the old interface; drop them and their pins.
            self.dp.detach(&name);
            if !exists {
                warn!(interface = %name, "interface disappeared; it is re-attached when it comes back");
            }
            self.lost_interfaces.insert(name, mode);
        }
        let lost: Vec<(String, IngressMode)> = self
            .lost_interfaces
            .iter()
            .map(|(n, m)| (n.clone(), *m))
            .collect();
        for (name, mode) in lost {
            if crate::sys::ifindex(&name) == 0 {
                continue;
            }
            match self.dp.attach(&name, mode) {
                Ok(_) => {
                    self.lost_interfaces.remove(&name);
                    info!(interface = %name, mode = mode.as_str(), "interface is back; re-attached");
                }
                Err(e) => {
                    error!(interface = %name, error = %error_chain(&e), "interface is back but cannot be re-attached; retrying every second");
                }
            }
        }
    }

    /// Resets the canary connections of every rolled-back service whose
    /// `drain_deadline` has passed since the rollback (once per rollback).
    fn drain_due(&mut self) {
        let now = crate::rollout::now_unix();
        let due: Vec<(String, u64, u64, Vec<std::net::SocketAddr>)> = self
            .config
            .services
            .iter()
            .filter_map(|svc| {
                let deadline = svc.drain_deadline?;
                let Some(crate::rollout::ServiceState::RolledBack { at_unix, .. }) =
                    self.rollouts.get(&svc.name).map(|r| &r.state)
                else {
                    return None;
                };
                let done = self.drained.get(&svc.name).map(|d| d.0) == Some(*at_unix);
                (!done && now >= at_unix.saturating_add(deadline.as_secs())).then(|| {
                    (
                        svc.name.clone(),
                        *at_unix,
                        deadline.as_secs(),
                        svc.canary.clone(),
                    )
                })
            })
            .collect();
        for (name, at, deadline, canary) in due {
            let done = match self.dp.drain_canary(&name, &canary) {
                Ok(d) => {
                    warn!(
                        service = %name,
                        connections = d.tcp_marked,
                        udp_flows = d.udp_ended,
                        socket_udp_flows = d.socket_udp_marked,
                        sockets_aborted = d.sockets_aborted,
                        drain_deadline_s = deadline,
                        "drain deadline passed after the rollback: open canary connections are reset on both sides (at TC at their client's next segment; steered at the socket now), canary UDP flows ended (their next datagrams go to stable)"
                    );
                    d.to_string()
                }
                Err(e) => {
                    error!(service = %name, error = %error_chain(&e), "cannot reset the canary connections past the drain deadline");
                    format!("failed: {}", error_chain(&e))
                }
            };
            self.drained.insert(name, (at, done));
        }
    }

    /// Exports which configured links are attached
    /// (`canary_dataplane_attached`).
    fn publish_attached(&self) {
        let attached: BTreeSet<String> = self
            .dp
            .attached()
            .map(|(name, _)| name.to_string())
            .collect();
        let mut links: Vec<(String, bool)> = self
            .config
            .agent
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), attached.contains(&i.name)))
            .collect();
        if self.config.agent.socket_lb.is_some() {
            links.push(("socket-lb".to_string(), true));
        }
        self.dp
            .stats_source()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_attached(links);
    }

    fn log_services(&self, report: &ApplyReport) {
        for svc in effective(&self.config, &self.rollouts) {
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

    fn log_counters(&self) {
        match self.dp.counters() {
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
}

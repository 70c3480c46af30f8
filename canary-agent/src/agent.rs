//! The daemon: validate the config, load and fill the data plane, attach,
//! then serve signals, the control socket and the breaker's events until
//! told to stop.
//!
//! SIGHUP (or `canaryctl reload`) re-reads the config file and applies it
//! all or nothing; SIGINT and SIGTERM end the agent, leaving the pinned
//! data plane running (unless `--detach-on-exit`).
//! Everything that changes the data plane runs on this one task, in order.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use canary_common::{service::Cohort, stats::quantile};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigError, IngressMode, InterfaceConfig, ServiceConfig},
    control::{self, Access, ControlError, ControlServer, ErrorCode, Request, Response},
    dataplane::{ApplyReport, Dataplane, DataplaneError, decode_breaker_event, error_chain},
    events::{Event as Notice, Events},
    http,
    judge::{CohortWindow, judge},
    rollout::{
        ServiceState, StateError, StateStore,
        engine::{self, Decision, Effect, Event, Judgement, Refusal, Rollout},
    },
    status::{CohortStatus, ServiceStatus, StatusReport},
    supervise::{Supervisor, SupervisorError},
    telemetry::{Exporter, ServiceSnapshot},
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
    /// A serving task kept ending (see the log); the agent stopped.
    #[error("a serving task failed")]
    Task(#[from] SupervisorError),
}

/// Why a reload (or a control command) was rejected; nothing changed.
#[derive(Debug, thiserror::Error)]
enum ChangeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("applying it failed and was rolled back")]
    Dataplane(#[from] DataplaneError),
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
    /// What last changed each service's state, for `status`.
    verdicts: BTreeMap<String, String>,
    /// Verdicts the judge gave each service since the agent started, for
    /// `status` (a soak proves with it that the judge ran).
    judgements: BTreeMap<String, u64>,
    /// The judge's window of each plan-driven service.
    windows: BTreeMap<String, StepWindow>,
    /// Where state changes are announced.
    events: Events,
    /// This node's name, in events.
    node: String,
    /// Configured interfaces whose links died with them, and their modes:
    /// re-attached when they come back.
    lost_interfaces: BTreeMap<String, IngressMode>,
}

/// What the judge compares for one service: counts since the step began.
struct StepWindow {
    /// When the step (or the agent's watch of it) began.
    started: std::time::Instant,
    /// The service's counters and histograms then.
    base: ServiceSnapshot,
    /// When the next judgement is due.
    due: std::time::Instant,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    // Handlers first, so a signal during setup is not lost.
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;

    let config = Config::load_off_thread(&opts.config, &opts.interfaces).await?;
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
    let mut dp = Dataplane::open(config.agent.capacity(), &config.agent.bpffs_dir)?;
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
    let mut agent = Agent {
        opts,
        config,
        dp,
        store,
        rollouts,
        verdicts: BTreeMap::new(),
        judgements: BTreeMap::new(),
        windows: BTreeMap::new(),
        events: Events::start(webhook, &mut tasks),
        node: hostname(),
        lost_interfaces: BTreeMap::new(),
    };
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
                let new = Config::load_off_thread(&agent.opts.config, &agent.opts.interfaces).await;
                if let Err(e) = agent.reload(new) {
                    error!(error = %error_chain(&e), "config reload rejected; the previous config is still active");
                }
            }
            _ = judge_tick.tick() => {
                agent.breaker_events(events.get_mut());
                agent.judge_due();
            }
            _ = sweep.tick() => {
                agent.watch_interfaces();
                match agent.dp.sweep_pending(agent.config.agent.handshake_timeout) {
                    Ok(0) => {}
                    Ok(n) => info!(timed_out = n, "handshakes timed out"),
                    Err(e) => warn!(error = %error_chain(&e), "handshake sweep failed"),
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
        info!(interfaces = ?interfaces, pins = removed, "detached and removed the pinned data plane (--detach-on-exit); canary-agent stopped");
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
/// the weight the rollout state puts in force.
fn effective(config: &Config, rollouts: &BTreeMap<String, Rollout>) -> Vec<ServiceConfig> {
    config
        .services
        .iter()
        .map(|svc| {
            let mut out = svc.clone();
            if let Some(rollout) = rollouts.get(&svc.name) {
                out.weight = rollout.state.effective_weight(svc);
            }
            out
        })
        .collect()
}

/// Why an event for a service was not carried out.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("no such service")]
    UnknownService,
    #[error(transparent)]
    Refused(Refusal),
    #[error("not persisted")]
    NotPersisted(#[source] StateError),
    #[error("not applied, the old state is back")]
    NotApplied(#[source] DataplaneError),
}

/// A decision whose data-plane programming is done by one apply for all
/// services (at start and on reload); the rest of its effects follow it.
struct Pending {
    service: String,
    from: ServiceState,
    decision: Decision,
}

/// The rollout of every service of `config` as its state file (fed to the
/// engine as [`Event::Configured`]) and the config decide, with the
/// decisions that changed something. Nothing is written; a state the
/// config cannot take refuses the whole config.
fn configure(
    store: &StateStore,
    config: &Config,
    current: &BTreeMap<String, Rollout>,
) -> Result<(BTreeMap<String, Rollout>, Vec<Pending>), ChangeError> {
    let now = crate::rollout::now_unix();
    let mut rollouts = BTreeMap::new();
    let mut pending = Vec::new();
    for svc in &config.services {
        let saved = store.load(&svc.name)?;
        let before = current
            .get(&svc.name)
            .cloned()
            .unwrap_or_else(|| Rollout::new(saved.clone()));
        let decision = engine::decide(svc, &before, Event::Configured { saved }, now)?;
        if let ServiceState::RolledBack { reason, detail, .. } = &decision.to.state {
            warn!(service = %svc.name, reason = reason.as_str(), detail = %detail,
                "service is rolled back: no new connection goes to canary");
        }
        rollouts.insert(svc.name.clone(), decision.to.clone());
        if !decision.effects.is_empty() {
            pending.push(Pending {
                service: svc.name.clone(),
                from: before.state,
                decision,
            });
        }
    }
    Ok((rollouts, pending))
}

/// The services whose canary the rollout states cut off.
fn canary_off(rollouts: &BTreeMap<String, Rollout>) -> BTreeSet<String> {
    rollouts
        .iter()
        .filter(|(_, r)| !r.state.canary_allowed())
        .map(|(n, _)| n.clone())
        .collect()
}

impl Agent {
    /// Applies the config file anew: services first (all or nothing), then
    /// interface changes (new ones attached before removed ones are
    /// detached). State files are read anew too: removing one resets that
    /// service to its configured weight.
    ///
    /// `new` is the config file as read (off the runtime thread) and
    /// validated, or why it was not.
    fn reload(&mut self, new: Result<Config, ConfigError>) -> Result<(), ChangeError> {
        let new = new?;
        let (new_rollouts, pending) = configure(&self.store, &new, &self.rollouts)?;
        let old = &self.config;
        // New interfaces, and interfaces whose mode changed.
        let added: Vec<InterfaceConfig> = new
            .agent
            .interfaces
            .iter()
            .filter(|i| !old.agent.interfaces.contains(i))
            .cloned()
            .collect();
        // What each attach replaced, to undo it if the reload fails.
        let mut attached: Vec<(InterfaceConfig, Option<IngressMode>)> = Vec::new();
        let result = (|| -> Result<ApplyReport, DataplaneError> {
            for iface in &added {
                let before = self.dp.attach(&iface.name, iface.mode)?;
                attached.push((iface.clone(), before));
            }
            // The canary-off flags go in with the services, all or nothing.
            self.dp
                .apply(&effective(&new, &new_rollouts), &canary_off(&new_rollouts))
        })();
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                // The maps were restored by the apply's own undo; now the
                // attachments.
                for (iface, before) in attached.into_iter().rev() {
                    match before {
                        None => self.dp.detach(&iface.name),
                        Some(mode) => {
                            if let Err(undo) = self.dp.attach(&iface.name, mode) {
                                warn!(interface = %iface.name, error = %error_chain(&undo), "cannot restore the previous mode");
                            }
                        }
                    }
                }
                return Err(e.into());
            }
        };
        for (iface, before) in &attached {
            match before {
                None => info!(interface = %iface.name, mode = iface.mode.as_str(), "attached"),
                Some(old) => {
                    info!(interface = %iface.name, from = old.as_str(), to = iface.mode.as_str(), "ingress mode changed")
                }
            }
        }
        for iface in self
            .config
            .agent
            .interfaces
            .iter()
            .filter(|i| !new.agent.interfaces.iter().any(|n| n.name == i.name))
        {
            self.dp.detach(&iface.name);
            info!(interface = %iface.name, "detached");
        }
        // Interfaces and handshake_timeout apply now; the rest is bound at
        // start.
        let restart_only = |c: &Config| {
            (
                c.agent.control_socket.clone(),
                c.agent.control_group.clone(),
                c.agent.metrics_addr,
                c.agent.metrics_buckets_per_octave,
                c.agent.capacity(),
                c.agent.state_dir.clone(),
                c.agent.bpffs_dir.clone(),
            )
        };
        if restart_only(&self.config) != restart_only(&new) {
            warn!(
                "control_socket, control_group, metrics_addr, metrics_buckets_per_octave, conntrack_capacity, \
                 max_services, max_backends, state_dir \
                 and bpffs_dir changes take effect at the next restart"
            );
        }
        self.lost_interfaces
            .retain(|name, _| new.agent.interfaces.iter().any(|i| i.name == *name));
        // Applied: the states the config or the state files changed are
        // persisted and announced (a canary that a deleted state file lets
        // back in gets a fresh breaker: the deletion is a `resume`).
        self.config = new;
        self.rollouts = new_rollouts;
        self.carry_out_programmed(pending);
        self.publish_states();
        self.log_services(&report);
        info!(added = ?report.added, changed = ?report.changed, removed = ?report.removed, "config reloaded");
        Ok(())
    }

    /// Runs one control command.
    async fn execute(&mut self, cmd: Request) -> Response {
        match cmd {
            Request::Status { service } => self.status(service.as_deref()),
            Request::Reload => match self
                .reload(Config::load_off_thread(&self.opts.config, &self.opts.interfaces).await)
            {
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
                self.command(&service, engine::Command::SetWeight(weight))
            }
            Request::Promote { service } => self.command(&service, engine::Command::Promote),
            Request::Rollback { service } => self.command(&service, engine::Command::Rollback),
            Request::Resume { service } => self.command(&service, engine::Command::Resume),
            Request::Pause { service } => self.command(&service, engine::Command::Pause),
            Request::Approve { service } => self.command(&service, engine::Command::Approve),
        }
    }

    /// An operator's command for `service`: the engine decides, the
    /// answer is the service's status or why nothing changed.
    fn command(&mut self, service: &str, command: engine::Command) -> Response {
        match self.feed(service, Event::Operator(command)) {
            Ok(()) => self.status(Some(service)),
            Err(FeedError::UnknownService) => {
                let names: Vec<&str> = self
                    .config
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                Response::error(
                    ErrorCode::UnknownService,
                    format!("no service {service:?}; configured: {names:?}"),
                )
            }
            Err(FeedError::Refused(why)) => Response::error(ErrorCode::Conflict, why.0),
            Err(FeedError::NotPersisted(e)) => Response::error(
                ErrorCode::Internal,
                format!("not changed: {}", error_chain(&e)),
            ),
            Err(FeedError::NotApplied(e)) => Response::error(
                ErrorCode::Internal,
                format!("not changed: {}", error_chain(&e)),
            ),
        }
    }

    /// Feeds `event` to the engine for `service` and carries out what it
    /// decides: persisted first, then applied; if applying fails, the old
    /// state is restored on disk and in the data plane.
    fn feed(&mut self, service: &str, event: Event) -> Result<(), FeedError> {
        let svc = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .cloned()
            .ok_or(FeedError::UnknownService)?;
        let current = self
            .rollouts
            .get(service)
            .cloned()
            .unwrap_or_else(|| Rollout::new(ServiceState::IDLE));
        let decision = engine::decide(&svc, &current, event, crate::rollout::now_unix())
            .map_err(FeedError::Refused)?;
        self.carry_out(&svc, &current, decision)
    }

    /// The engine's decision for a trip found at start, before the data
    /// plane is programmed (the start programs every service at once).
    fn decide_pending(&mut self, service: &str, event: Event) -> Option<Pending> {
        let svc = self.config.services.iter().find(|s| s.name == service)?;
        let current = self.rollouts.get(service)?.clone();
        let decision = engine::decide(svc, &current, event, crate::rollout::now_unix()).ok()?;
        self.rollouts
            .insert(service.to_string(), decision.to.clone());
        Some(Pending {
            service: service.to_string(),
            from: current.state,
            decision,
        })
    }

    /// Carries out `decision` for `svc`, whose rollout was `current`.
    fn carry_out(
        &mut self,
        svc: &ServiceConfig,
        current: &Rollout,
        decision: Decision,
    ) -> Result<(), FeedError> {
        let name = svc.name.clone();
        for effect in &decision.effects {
            match effect {
                Effect::Persist => self
                    .store
                    .save(&name, &decision.to.state)
                    .map_err(FeedError::NotPersisted)?,
                Effect::ResetBreaker => self.reset_breaker(&name),
                Effect::Program => {
                    self.rollouts.insert(name.clone(), decision.to.clone());
                    let applied = self.dp.apply(
                        &effective(&self.config, &self.rollouts),
                        &canary_off(&self.rollouts),
                    );
                    if let Err(e) = applied {
                        self.rollouts.insert(name.clone(), current.clone());
                        let _ = self.store.save(&name, &current.state);
                        let _ = self.dp.apply(
                            &effective(&self.config, &self.rollouts),
                            &canary_off(&self.rollouts),
                        );
                        return Err(FeedError::NotApplied(e));
                    }
                }
                Effect::RestartWindow => {
                    self.windows.remove(&name);
                }
                Effect::Announce { by, verdict } => {
                    self.announce_change(svc, &current.state, &decision.to.state, *by, verdict);
                }
                Effect::Verdict(line) => {
                    self.verdicts.insert(name.clone(), line.clone());
                }
            }
        }
        self.rollouts.insert(name, decision.to);
        Ok(())
    }

    /// Carries out decisions whose data plane is already programmed (by the
    /// start's or a reload's one apply).
    fn carry_out_programmed(&mut self, pending: Vec<Pending>) {
        let mut reset = false;
        for p in pending {
            let Some(svc) = self
                .config
                .services
                .iter()
                .find(|s| s.name == p.service)
                .cloned()
            else {
                continue;
            };
            for effect in &p.decision.effects {
                match effect {
                    Effect::Persist => {
                        if let Err(e) = self.store.save(&p.service, &p.decision.to.state) {
                            error!(service = %p.service, error = %error_chain(&e), "cannot persist the rollout state: a restart would not find it");
                        }
                    }
                    Effect::ResetBreaker => {
                        self.reset_breaker(&p.service);
                        reset = true;
                    }
                    Effect::Program => {}
                    Effect::RestartWindow => {
                        self.windows.remove(&p.service);
                    }
                    Effect::Announce { by, verdict } => {
                        self.announce_change(&svc, &p.from, &p.decision.to.state, *by, verdict);
                    }
                    Effect::Verdict(line) => {
                        self.verdicts.insert(p.service.clone(), line.clone());
                    }
                }
            }
        }
        // The apply kept a tripped breaker's cut-off; with the breaker
        // reset, the canary the state lets in is let in now.
        if reset
            && let Err(e) = self.dp.apply(
                &effective(&self.config, &self.rollouts),
                &canary_off(&self.rollouts),
            )
        {
            error!(error = %error_chain(&e), "cannot let the resumed canary back in; `canaryctl resume` it");
        }
    }

    fn reset_breaker(&mut self, service: &str) {
        if let Err(e) = self.dp.reset_breaker(service) {
            warn!(service = %service, error = %error_chain(&e), "cannot reset the breaker");
        }
    }

    /// A state change, told everywhere: metrics, the log, the webhook and
    /// `status`.
    fn announce_change(
        &mut self,
        svc: &ServiceConfig,
        from: &ServiceState,
        to: &ServiceState,
        by: engine::Actor,
        verdict: &str,
    ) {
        let rollback = match to {
            ServiceState::RolledBack { reason, .. } => Some(reason.as_str()),
            _ => None,
        };
        self.publish_state(&svc.name, to, rollback);
        let weight = to.effective_weight(svc);
        warn!(event = "rollout-state", service = %svc.name, from = from.name(), to = to.name(), weight = %weight, by = by.as_str(), "{verdict}");
        self.announce(
            &svc.name,
            from,
            to,
            &weight.to_string(),
            by.as_str(),
            verdict,
        );
        self.verdicts.insert(svc.name.clone(), verdict.to_string());
    }

    /// The `status` answer.
    fn status(&self, only: Option<&str>) -> Response {
        if let Some(name) = only
            && !self.config.services.iter().any(|s| s.name == name)
        {
            return Response::error(ErrorCode::UnknownService, format!("no service {name:?}"));
        }
        let snapshot = match self
            .dp
            .snapshot_where(|name| only.is_none_or(|o| o == name))
        {
            Ok(s) => s,
            Err(e) => return Response::error(ErrorCode::Internal, error_chain(&e)),
        };
        let mut services = Vec::new();
        for svc in self
            .config
            .services
            .iter()
            .filter(|s| only.is_none_or(|n| n == s.name))
        {
            let state = self
                .rollouts
                .get(&svc.name)
                .map(|r| r.state.clone())
                .unwrap_or(ServiceState::IDLE);
            let Some(snap) = snapshot.service(&svc.name) else {
                continue;
            };
            let cohorts = Cohort::ALL.map(|cohort| {
                let c = snap.cohort_counters(cohort);
                let failed = snap.failed_connections(cohort);
                let hist = snap.histograms[usize::from(cohort)].as_ref();
                let ms = |q| {
                    hist.and_then(|h| quantile(&h.first_byte_ns.buckets, q))
                        .map(|ns| ns / 1e6)
                };
                CohortStatus {
                    cohort: cohort.as_str().to_string(),
                    connections: c.connections,
                    active: c.active(),
                    failed,
                    resets_from_backend: c.resets_from_backend,
                    failure_ratio: if c.connections == 0 {
                        0.0
                    } else {
                        failed as f64 / c.connections as f64
                    },
                    first_byte_p50_ms: ms(0.5),
                    first_byte_p99_ms: ms(0.99),
                }
            });
            let total = cohorts[0].connections + cohorts[1].connections;
            services.push(ServiceStatus {
                name: svc.name.clone(),
                state: state.name().to_string(),
                configured_weight: svc.weight.to_string(),
                effective_weight: state.effective_weight(svc).to_string(),
                step: plan_step(svc, &state),
                observed_canary_share: (total > 0)
                    .then(|| cohorts[1].connections as f64 / total as f64),
                cohorts: cohorts.to_vec(),
                last_verdict: self
                    .verdicts
                    .get(&svc.name)
                    .cloned()
                    .or_else(|| match &state {
                        ServiceState::RolledBack { reason, detail, .. } => {
                            Some(format!("rolled back ({}): {detail}", reason.as_str()))
                        }
                        _ => None,
                    }),
                judgements: self.judgements.get(&svc.name).copied().unwrap_or(0),
            });
        }
        match serde_json::to_value(StatusReport { services }) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::error(ErrorCode::Internal, e.to_string()),
        }
    }

    /// Judges every plan-driven service whose interval is up, and moves its
    /// rollout on, back, or not at all.
    fn judge_due(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<ServiceConfig> = self
            .config
            .services
            .iter()
            .filter(|s| s.rollout.is_some())
            .filter(|s| {
                matches!(
                    self.rollouts.get(&s.name).map(|r| &r.state),
                    Some(
                        ServiceState::Progressing { .. }
                            | ServiceState::AwaitingApproval { .. }
                            | ServiceState::Paused { .. }
                    )
                )
            })
            .filter(|s| self.windows.get(&s.name).is_none_or(|w| w.due <= now))
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        let snapshot = match self
            .dp
            .snapshot_where(|name| due.iter().any(|s| s.name == name))
        {
            Ok(s) => s,
            Err(e) => return warn!(error = %error_chain(&e), "judge: cannot read the data plane"),
        };
        for svc in due {
            let Some(plan) = svc.rollout.as_ref() else {
                continue;
            };
            let Some(current) = snapshot.service(&svc.name) else {
                continue;
            };
            // A step's hold counts from when the step began, as persisted, so
            // an agent restart does not start it over. The judge's sample
            // window does start anew: the counts at the step's start were
            // not kept.
            let step_age = match self.rollouts.get(&svc.name).map(|r| &r.state) {
                Some(ServiceState::Progressing { since_unix, .. }) => {
                    let now_unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    Duration::from_secs(now_unix.saturating_sub(*since_unix))
                }
                _ => Duration::ZERO,
            };
            let window = self
                .windows
                .entry(svc.name.clone())
                .or_insert_with(|| StepWindow {
                    started: now.checked_sub(step_age).unwrap_or(now),
                    base: current.clone(),
                    due: now,
                });
            window.due = now + plan.interval;
            let stable = cohort_window(&window.base, current, Cohort::Stable);
            let canary = cohort_window(&window.base, current, Cohort::Canary);
            let judgement = Judgement {
                verdict: judge(&plan.judge, &stable, &canary),
                held: window.started.elapsed(),
                canary_connections: canary.connections,
            };
            *self.judgements.entry(svc.name.clone()).or_default() += 1;
            if let Err(e) = self.feed(&svc.name, Event::Judged(judgement)) {
                warn!(service = %svc.name, error = %e, "the judge's decision was not carried out");
            }
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
            &canary_off(&self.rollouts),
        )?;
        self.publish_states();
        self.log_services(&report);
        // Migrated maps: the hand-over window is kept to the attach calls.
        self.dp.catch_up_migration()?;
        for iface in self.config.agent.interfaces.clone() {
            self.dp.attach(&iface.name, iface.mode)?;
            info!(interface = %iface.name, mode = iface.mode.as_str(), "attached");
        }
        self.dp.finish_migration()?;
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
                    error!(interface = %name, error = %error_chain(&e), "interface is back but cannot be re-attached; retrying every second")
                }
            }
        }
    }

    /// Tells people: one event per state change (the log line is written
    /// by the caller).
    fn announce(
        &self,
        service: &str,
        from: &ServiceState,
        to: &ServiceState,
        weight: &str,
        by: &str,
        detail: &str,
    ) {
        self.events.send(Notice {
            event: "rollout-state",
            node: self.node.clone(),
            service: service.to_string(),
            from: from.name().to_string(),
            to: to.name().to_string(),
            weight: weight.to_string(),
            by: by.to_string(),
            detail: detail.to_string(),
            at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
    }

    /// Exports every service's rollout state.
    fn publish_states(&self) {
        for (name, rollout) in &self.rollouts {
            self.publish_state(name, &rollout.state, None);
        }
    }

    fn publish_state(&self, name: &str, state: &ServiceState, rollback: Option<&'static str>) {
        let source = self.dp.stats_source();
        let mut source = source.lock().unwrap_or_else(|p| p.into_inner());
        source.set_rollout(name, state.name(), rollback);
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

/// This node's hostname.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// "2/4 (5%)" for a plan-driven service.
fn plan_step(svc: &ServiceConfig, state: &ServiceState) -> Option<String> {
    let steps = &svc.rollout.as_ref()?.steps;
    let step = match state {
        ServiceState::Progressing { step, .. }
        | ServiceState::AwaitingApproval { step }
        | ServiceState::Paused { step, .. } => *step as usize,
        _ => return None,
    };
    let i = step.min(steps.len() - 1);
    Some(format!("{}/{} ({})", i + 1, steps.len(), steps[i].weight))
}

/// What one cohort did between `base` and `now`.
fn cohort_window(base: &ServiceSnapshot, now: &ServiceSnapshot, cohort: Cohort) -> CohortWindow {
    let (b, n) = (base.cohort_counters(cohort), now.cohort_counters(cohort));
    let failures = |s: &ServiceSnapshot| s.failed_connections(cohort);
    let mut first_byte = Box::new([0u64; canary_common::stats::HIST_BUCKETS]);
    if let Some(h) = &now.histograms[usize::from(cohort)] {
        let old = base.histograms[usize::from(cohort)].as_ref();
        for (i, slot) in first_byte.iter_mut().enumerate() {
            *slot = h.first_byte_ns.buckets[i]
                .saturating_sub(old.map(|o| o.first_byte_ns.buckets[i]).unwrap_or(0));
        }
    }
    CohortWindow {
        connections: n.connections.saturating_sub(b.connections),
        failures: failures(now).saturating_sub(failures(base)),
        first_byte,
    }
}

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
    config::{Config, ConfigError, Gate, IngressMode, InterfaceConfig, ServiceConfig},
    control::{self, Access, Command, ControlError, ControlServer, Response, code},
    dataplane::{ApplyReport, Dataplane, DataplaneError, decode_breaker_event, error_chain},
    events::{Event, Events},
    http,
    judge::{CohortWindow, Verdict, judge},
    rollout::{RollbackReason, ServiceState, StateError, StateStore},
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
    StateConflict(#[from] StateConflict),
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
    StateConflict(#[from] StateConflict),
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
    states: BTreeMap<String, ServiceState>,
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
    /// Failing judgements in a row.
    fails: u32,
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
    let (states, forced) = load_states(&store, &config).map_err(|e| match e {
        ChangeError::State(e) => AgentError::State(e),
        ChangeError::StateConflict(e) => AgentError::StateConflict(e),
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
        states,
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
        agent.record_trip(&name, state.failures, state.attempts, state.tripped_ns);
    }
    if let Err(e) = agent.setup() {
        return Err(abandon(agent.dp, e));
    }
    agent.persist_forced(forced);
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
fn effective(config: &Config, states: &BTreeMap<String, ServiceState>) -> Vec<ServiceConfig> {
    config
        .services
        .iter()
        .map(|svc| {
            let mut out = svc.clone();
            if let Some(state) = states.get(&svc.name) {
                out.weight = state.effective_weight(svc);
            }
            out
        })
        .collect()
}

/// A saved rollout state the config no longer fits, in a way that cannot
/// be resolved without a person.
#[derive(Debug, thiserror::Error)]
#[error("service {service:?}: its saved rollout state ({state}) does not fit the config: {detail}")]
pub struct StateConflict {
    service: String,
    state: &'static str,
    detail: String,
}

/// What becomes of a saved state under a (new) config.
#[derive(Debug, PartialEq)]
enum Fit {
    /// It still applies.
    Keep,
    /// The rollout it belongs to is over: the service goes back to idle,
    /// for the reason given.
    End(&'static str),
    /// Neither: refused with this explanation.
    Refuse(String),
}

/// Whether `state` still fits `svc`. A state that would send new
/// connections to canary backends the config no longer has ends the
/// rollout, rather than dropping them as `no_backend`; a plan step the new
/// plan does not have is refused.
fn fit(svc: &ServiceConfig, state: &ServiceState) -> Fit {
    match state {
        ServiceState::Progressing { step, .. }
        | ServiceState::Paused { step, .. }
        | ServiceState::AwaitingApproval { step } => match &svc.rollout {
            None => Fit::End("the config has no rollout plan for it any more"),
            Some(plan) if *step as usize >= plan.steps.len() => Fit::Refuse(format!(
                "it is at step {} of its plan and the config's plan has {} steps; \
                 `canaryctl rollback` or `canaryctl promote` it first, or delete its state file \
                 to start the plan over",
                step + 1,
                plan.steps.len()
            )),
            Some(_) => Fit::Keep,
        },
        _ if svc.canary.is_empty() && state.effective_weight(svc).ppm() > 0 => {
            Fit::End("the config has no canary backends for it any more")
        }
        _ => Fit::Keep,
    }
}

/// A change of state that the config forced, persisted once it is in force.
struct Forced {
    service: String,
    from: ServiceState,
    to: ServiceState,
    why: &'static str,
}

/// The rollout state of every configured service under `config`: its
/// saved state, a plan's first step where a plan has none yet, or idle
/// where the config ended its rollout. Nothing is written: the changes
/// come back as [`Forced`], for [`Agent::persist_forced`] once applied.
fn load_states(
    store: &StateStore,
    config: &Config,
) -> Result<(BTreeMap<String, ServiceState>, Vec<Forced>), ChangeError> {
    let mut states = BTreeMap::new();
    let mut forced = Vec::new();
    for svc in &config.services {
        let saved = store.load(&svc.name)?;
        let (mut state, mut why) = match fit(svc, &saved) {
            Fit::Keep => (saved.clone(), None),
            Fit::End(why) => (ServiceState::IDLE, Some(why)),
            Fit::Refuse(detail) => {
                return Err(ChangeError::StateConflict(StateConflict {
                    service: svc.name.clone(),
                    state: saved.name(),
                    detail,
                }));
            }
        };
        if svc.rollout.is_some() && state == ServiceState::IDLE {
            // A plan with no state yet starts at its first step.
            state = ServiceState::progressing(0);
            why = Some("rollout plan started");
        }
        if let Some(why) = why {
            forced.push(Forced {
                service: svc.name.clone(),
                from: saved,
                to: state.clone(),
                why,
            });
        }
        if let ServiceState::RolledBack { reason, detail, .. } = &state {
            warn!(service = %svc.name, reason = reason.as_str(), detail = %detail,
                "service is rolled back: no new connection goes to canary");
        }
        states.insert(svc.name.clone(), state);
    }
    Ok((states, forced))
}

/// The services whose canary the rollout states cut off.
fn canary_off(states: &BTreeMap<String, ServiceState>) -> BTreeSet<String> {
    states
        .iter()
        .filter(|(_, s)| !s.canary_allowed())
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
        let (new_states, forced) = load_states(&self.store, &new)?;
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
                .apply_with_off(&effective(&new, &new_states), canary_off(&new_states))
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
        // Applied: a canary a removed state file lets back in starts with a
        // fresh breaker window (the file's deletion is a `resume`), and
        // what the config forced is persisted.
        for (name, state) in &new_states {
            let was_off = self.states.get(name).is_some_and(|s| !s.canary_allowed());
            let is_off = !state.canary_allowed();
            if was_off != is_off {
                info!(event = "rollout-state", service = %name, state = state.name(), "rollout state changed by its state file");
                if was_off && let Err(e) = self.dp.reset_breaker(name) {
                    warn!(service = %name, error = %error_chain(&e), "cannot reset the breaker");
                }
            }
        }
        self.config = new;
        self.states = new_states;
        self.persist_forced(forced);
        self.publish_states();
        self.log_services(&report);
        info!(added = ?report.added, changed = ?report.changed, removed = ?report.removed, "config reloaded");
        Ok(())
    }

    /// Runs one control command.
    async fn execute(&mut self, cmd: Command) -> Response {
        match cmd {
            Command::Status { service } => self.status(service.as_deref()),
            Command::Reload => match self
                .reload(Config::load_off_thread(&self.opts.config, &self.opts.interfaces).await)
            {
                Ok(()) => Response::ok(serde_json::json!({ "reloaded": true })),
                Err(e) => Response::error(
                    code::CONFLICT,
                    format!(
                        "reload rejected, the running config stays: {}",
                        error_chain(&e)
                    ),
                ),
            },
            Command::SetWeight { service, weight } => {
                self.transition(&service, "canaryctl", |svc, state| {
                    if matches!(state, ServiceState::RolledBack { .. }) {
                        return Err("it is rolled back; `canaryctl resume` it first".to_string());
                    }
                    if weight.ppm() > 0 && svc.canary.is_empty() {
                        return Err("it has no canary backends".to_string());
                    }
                    Ok(ServiceState::Idle {
                        weight_ppm: Some(weight.ppm()),
                    })
                })
            }
            Command::Promote { service } => self.transition(&service, "canaryctl", |svc, _| {
                if svc.canary.is_empty() {
                    return Err("it has no canary backends to promote".to_string());
                }
                Ok(ServiceState::promoted())
            }),
            Command::Rollback { service } => self.transition(&service, "canaryctl", |_, state| {
                if matches!(state, ServiceState::RolledBack { .. }) {
                    return Err("it is already rolled back".to_string());
                }
                Ok(ServiceState::rolled_back(
                    RollbackReason::Operator,
                    "canaryctl rollback".to_string(),
                ))
            }),
            Command::Resume { service } => self.transition(&service, "canaryctl", |svc, state| {
                Ok(match (state, &svc.rollout) {
                    (ServiceState::Paused { step, .. }, Some(_)) => {
                        ServiceState::progressing(*step)
                    }
                    (
                        ServiceState::Progressing { .. } | ServiceState::AwaitingApproval { .. },
                        Some(_),
                    ) => {
                        return Err(format!("its rollout is already {}", state.name()));
                    }
                    // A plan starts over; without one, the configured weight.
                    (_, Some(_)) => ServiceState::progressing(0),
                    (_, None) => ServiceState::IDLE,
                })
            }),
            Command::Pause { service } => {
                self.transition(&service, "canaryctl", |svc, state| match state {
                    ServiceState::Progressing { step, .. } => Ok(ServiceState::Paused {
                        step: *step,
                        weight_ppm: state.effective_weight(svc).ppm(),
                    }),
                    _ => Err(format!(
                        "pause holds a progressing rollout; it is {}",
                        state.name()
                    )),
                })
            }
            Command::Approve { service } => {
                self.transition(&service, "canaryctl", |_, state| match state {
                    ServiceState::AwaitingApproval { step } => Ok(ServiceState::progressing(*step)),
                    _ => Err(format!("nothing awaits approval; it is {}", state.name())),
                })
            }
        }
    }

    /// Moves `service` to the state `decide` returns (or answers why not):
    /// persisted first, then applied; if applying fails, the old state is
    /// restored on disk and in the data plane.
    fn transition(
        &mut self,
        service: &str,
        actor: &str,
        decide: impl FnOnce(&ServiceConfig, &ServiceState) -> Result<ServiceState, String>,
    ) -> Response {
        let Some(svc) = self.config.services.iter().find(|s| s.name == service) else {
            let names: Vec<&str> = self
                .config
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Response::error(
                code::UNKNOWN_SERVICE,
                format!("no service {service:?}; configured: {names:?}"),
            );
        };
        let old = self
            .states
            .get(service)
            .cloned()
            .unwrap_or(ServiceState::IDLE);
        let new = match decide(svc, &old) {
            Ok(new) => new,
            Err(why) => {
                return Response::error(code::CONFLICT, format!("service {service:?}: {why}"));
            }
        };
        if let Err(e) = self.store.save(service, &new) {
            return Response::error(code::INTERNAL, format!("not changed: {}", error_chain(&e)));
        }
        self.states.insert(service.to_string(), new.clone());
        let applied = self
            .dp
            .set_canary_off(service, !new.canary_allowed())
            .and_then(|()| self.dp.apply(&effective(&self.config, &self.states)));
        if let Err(e) = applied {
            self.states.insert(service.to_string(), old.clone());
            let _ = self.store.save(service, &old);
            let _ = self.dp.set_canary_off(service, !old.canary_allowed());
            let _ = self.dp.apply(&effective(&self.config, &self.states));
            return Response::error(code::INTERNAL, format!("not changed: {}", error_chain(&e)));
        }
        let rollback = match &new {
            ServiceState::RolledBack { reason, .. } => Some(reason.as_str()),
            _ => None,
        };
        self.publish_state(service, &new, rollback);
        let weight = new.effective_weight(svc);
        let verdict = format!(
            "{} by {actor}: {} → {} (canary weight {weight})",
            new_verb(&new),
            old.name(),
            new.name()
        );
        // A new step (or none) starts a new judgement window.
        self.windows.remove(service);
        self.announce(service, &old, &new, &weight.to_string(), actor, &verdict);
        warn!(event = "rollout-state", service = %service, from = old.name(), to = new.name(), weight = %weight, "{verdict}");
        self.verdicts.insert(service.to_string(), verdict);
        self.status(Some(service))
    }

    /// The `status` answer.
    fn status(&self, only: Option<&str>) -> Response {
        if let Some(name) = only
            && !self.config.services.iter().any(|s| s.name == name)
        {
            return Response::error(code::UNKNOWN_SERVICE, format!("no service {name:?}"));
        }
        let snapshot = match self
            .dp
            .snapshot_where(|name| only.is_none_or(|o| o == name))
        {
            Ok(s) => s,
            Err(e) => return Response::error(code::INTERNAL, error_chain(&e)),
        };
        let mut services = Vec::new();
        for svc in self
            .config
            .services
            .iter()
            .filter(|s| only.is_none_or(|n| n == s.name))
        {
            let state = self
                .states
                .get(&svc.name)
                .cloned()
                .unwrap_or(ServiceState::IDLE);
            let Some(snap) = snapshot.service(&svc.name) else {
                continue;
            };
            let cohorts = Cohort::ALL.map(|cohort| {
                let c = snap.cohort_counters(cohort);
                let failed = c.refused + c.syn_retried + snap.cohort_timeouts(cohort);
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
            Err(e) => Response::error(code::INTERNAL, e.to_string()),
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
                    self.states.get(&s.name),
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
            let step_age = match self.states.get(&svc.name) {
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
                    fails: 0,
                    due: now,
                });
            window.due = now + plan.interval;
            let stable = cohort_window(&window.base, current, Cohort::Stable);
            let canary = cohort_window(&window.base, current, Cohort::Canary);
            let verdict = judge(&plan.judge, &stable, &canary);
            let held = window.started.elapsed();
            window.fails = if matches!(verdict, Verdict::Fail { .. }) {
                window.fails + 1
            } else {
                0
            };
            let fails = window.fails;
            let line = verdict.describe();
            self.verdicts
                .insert(svc.name.clone(), format!("judge: {line}"));
            *self.judgements.entry(svc.name.clone()).or_default() += 1;
            if fails >= plan.fail_after {
                let detail = format!("{line} ({fails} judgements in a row)");
                self.transition(&svc.name, "the judge", |_, _| {
                    Ok(ServiceState::rolled_back(
                        RollbackReason::Judge,
                        detail.clone(),
                    ))
                });
                self.verdicts.insert(
                    svc.name.clone(),
                    format!("rolled back by the judge: {line}"),
                );
                continue;
            }
            let Some(ServiceState::Progressing { step, .. }) = self.states.get(&svc.name).cloned()
            else {
                continue;
            };
            let step_cfg = &plan.steps[(step as usize).min(plan.steps.len() - 1)];
            let passed = matches!(verdict, Verdict::Pass { .. })
                && held >= step_cfg.hold
                && canary.connections >= step_cfg.min_connections;
            if !passed {
                continue;
            }
            let next = step + 1;
            let new = if next as usize >= plan.steps.len() {
                ServiceState::promoted()
            } else if plan.steps[next as usize].gate == Gate::Manual {
                ServiceState::AwaitingApproval { step: next }
            } else {
                ServiceState::progressing(next)
            };
            info!(event = "judgement", service = %svc.name, step = step + 1, verdict = %line, "step passed");
            self.transition(&svc.name, "the judge", move |_, _| Ok(new));
            self.verdicts.insert(
                svc.name.clone(),
                format!("step {} passed: {line}", step + 1),
            );
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
            self.record_trip(&name, ev.failures, ev.attempts, ev.at_ns);
        }
    }

    /// Persists and announces a breaker trip of `name`, unless its canary
    /// is already off.
    fn record_trip(&mut self, name: &str, failures: u64, attempts: u64, at_ns: u64) {
        if self.states.get(name).is_some_and(|s| !s.canary_allowed()) {
            return;
        }
        let detail =
            format!("{failures} canary failures of {attempts} attempts in one breaker window");
        let state = ServiceState::rolled_back(RollbackReason::Breaker, detail.clone());
        if let Err(e) = self.store.save(name, &state) {
            // The cut-off stands in the kernel; only its persistence failed.
            error!(service = %name, error = %error_chain(&e), "rollback not persisted: a restart would re-raise the canary");
        }
        if let Err(e) = self.dp.set_canary_off(name, true) {
            error!(service = %name, error = %error_chain(&e), "cannot mark the service rolled back in the data plane");
        }
        self.publish_state(name, &state, Some(RollbackReason::Breaker.as_str()));
        warn!(
            event = "rollout-state",
            service = %name,
            to = "rolled-back",
            reason = "breaker",
            failures,
            attempts,
            tripped_at_ns = at_ns,
            "canary rolled back by the data-plane breaker: no new connection goes to canary"
        );
        self.verdicts.insert(
            name.to_string(),
            format!("rolled back by the breaker: {detail}"),
        );
        let old = self.states.get(name).cloned().unwrap_or(ServiceState::IDLE);
        self.announce(name, &old, &state, "0%", "the breaker", &detail);
        self.states.insert(name.to_string(), state);
    }

    /// Programs the maps from the config and the rollout states, attaches
    /// to every configured interface (taking over pinned links), removes
    /// pinned links the config no longer names, and completes any map
    /// migration.
    fn setup(&mut self) -> Result<(), DataplaneError> {
        let report = self.dp.apply_with_off(
            &effective(&self.config, &self.states),
            canary_off(&self.states),
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

    /// Persists and announces the state changes the config forced, now
    /// that they are in force.
    fn persist_forced(&mut self, forced: Vec<Forced>) {
        for f in forced {
            if let Err(e) = self.store.save(&f.service, &f.to) {
                error!(service = %f.service, error = %error_chain(&e), "cannot persist the rollout state");
            }
            info!(event = "rollout-state", service = %f.service, from = f.from.name(), to = f.to.name(), why = f.why, "rollout state changed by the config");
            if f.from != f.to {
                let weight = self
                    .config
                    .services
                    .iter()
                    .find(|s| s.name == f.service)
                    .map(|s| f.to.effective_weight(s).to_string())
                    .unwrap_or_default();
                self.announce(&f.service, &f.from, &f.to, &weight, "the config", f.why);
            }
        }
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
        self.events.send(Event {
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
        for (name, state) in &self.states {
            self.publish_state(name, state, None);
        }
    }

    fn publish_state(&self, name: &str, state: &ServiceState, rollback: Option<&'static str>) {
        let source = self.dp.stats_source();
        let mut source = source.lock().unwrap_or_else(|p| p.into_inner());
        source.set_rollout(name, state.name(), rollback);
    }

    fn log_services(&self, report: &ApplyReport) {
        for svc in effective(&self.config, &self.states) {
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

fn new_verb(state: &ServiceState) -> &'static str {
    match state {
        ServiceState::Idle {
            weight_ppm: Some(_),
        } => "weight set",
        ServiceState::Idle { weight_ppm: None } => "resumed",
        ServiceState::Progressing { .. } => "step entered",
        ServiceState::AwaitingApproval { .. } => "gate reached",
        ServiceState::Paused { .. } => "paused",
        ServiceState::Promoted { .. } => "promoted",
        ServiceState::RolledBack { .. } => "rolled back",
    }
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
    let failures = |s: &ServiceSnapshot, c: &canary_common::stats::BackendCounters| {
        c.refused + c.syn_retried + c.resets_from_backend + s.cohort_timeouts(cohort)
    };
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
        failures: failures(now, &n).saturating_sub(failures(base, &b)),
        first_byte,
    }
}

//! Supervision of the agent's long-running tasks (the metrics server, the
//! control socket server, webhook delivery): a task that ends while the
//! agent runs is logged and restarted, and one that keeps ending stops the
//! agent with an error. None is ever silently gone.
//!
//! A panic aborts the whole agent (see `main.rs`), so in the daemon a task
//! "ends" by returning; the restart path also covers panics where they
//! unwind (unit tests).

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::AbortHandle};
use tracing::{error, warn};

/// A task ending this many times within [`RESTART_WINDOW`] stops the agent:
/// restarting it further would only hide a fault.
pub const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
pub const RESTART_WINDOW: Duration = Duration::from_mins(1);

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// Makes a task's future, once at start and once per restart.
type Start = Arc<dyn Fn() -> BoxFuture + Send + Sync>;

/// How a task ended.
#[derive(Debug)]
enum Ended {
    Returned,
    Panicked(String),
    /// Aborted by [`Supervisor::shutdown`]: expected.
    Cancelled,
}

/// A supervised task kept ending.
#[derive(Debug, thiserror::Error)]
#[error(
    "the {task} task ended {times} times within {}s ({how}); stopping the agent",
    RESTART_WINDOW.as_secs()
)]
pub struct SupervisorError {
    /// The task's name.
    pub task: &'static str,
    /// How often it ended within the window.
    pub times: usize,
    /// How it ended the last time.
    pub how: String,
}

/// The agent's supervised tasks.
pub struct Supervisor {
    tx: mpsc::UnboundedSender<(&'static str, Ended, Start)>,
    rx: mpsc::UnboundedReceiver<(&'static str, Ended, Start)>,
    running: BTreeMap<&'static str, AbortHandle>,
    ends: BTreeMap<&'static str, VecDeque<Instant>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    /// No tasks yet.
    pub fn new() -> Supervisor {
        let (tx, rx) = mpsc::unbounded_channel();
        Supervisor {
            tx,
            rx,
            running: BTreeMap::new(),
            ends: BTreeMap::new(),
        }
    }

    /// Spawns the task `name`; `start` makes its future, again for each
    /// restart (so it holds what the task needs behind `Arc`s).
    pub fn spawn<F, Fut>(&mut self, name: &'static str, start: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let start: Start = Arc::new(move || Box::pin(start()) as BoxFuture);
        self.start(name, start);
    }

    fn start(&mut self, name: &'static str, start: Start) {
        let task = tokio::spawn(start());
        self.running.insert(name, task.abort_handle());
        let tx = self.tx.clone();
        // A watcher per task reports its end, whichever way.
        tokio::spawn(async move {
            let ended = match task.await {
                Ok(()) => Ended::Returned,
                Err(e) if e.is_cancelled() => Ended::Cancelled,
                Err(e) => {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-text panic".to_string());
                    Ended::Panicked(msg)
                }
            };
            let _ = tx.send((name, ended, start));
        });
    }

    /// Waits for a task to end, logs it and restarts it; returns only when
    /// a task ended more than [`MAX_RESTARTS`] times within
    /// [`RESTART_WINDOW`]. Cancel-safe (for `select!`): after its one await
    /// it runs to completion without yielding.
    pub async fn watch(&mut self) -> SupervisorError {
        loop {
            let Some((name, ended, start)) = self.rx.recv().await else {
                // Unreachable: `self` holds a sender.
                return std::future::pending().await;
            };
            let how = match ended {
                Ended::Cancelled => continue,
                Ended::Returned => "returned".to_string(),
                Ended::Panicked(msg) => format!("panicked: {msg}"),
            };
            let now = Instant::now();
            let ends = self.ends.entry(name).or_default();
            ends.push_back(now);
            while ends
                .front()
                .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
            {
                ends.pop_front();
            }
            let times = ends.len();
            if times > MAX_RESTARTS {
                error!(task = name, how = %how, times, "task keeps ending; stopping the agent");
                return SupervisorError {
                    task: name,
                    times,
                    how,
                };
            }
            warn!(task = name, how = %how, times, "task ended unexpectedly; restarting it");
            self.start(name, start);
        }
    }

    /// Stops every task (the agent is shutting down).
    pub fn shutdown(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_task_that_ends_is_restarted_and_one_that_keeps_ending_stops_the_agent() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let starts = Arc::new(AtomicUsize::new(0));
            let mut sup = Supervisor::new();
            let counter = Arc::clone(&starts);
            sup.spawn("flaky", move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert!(!n.is_multiple_of(2), "start {n} panics");
                }
            });
            // A healthy task beside it is left alone.
            sup.spawn("steady", std::future::pending::<()>);
            let err = tokio::time::timeout(Duration::from_secs(5), sup.watch())
                .await
                .expect("the supervisor gives up");
            assert_eq!(err.task, "flaky");
            assert_eq!(err.times, MAX_RESTARTS + 1);
            assert_eq!(
                starts.load(Ordering::SeqCst),
                MAX_RESTARTS + 1,
                "restarted after each end until the limit"
            );
            assert!(
                err.to_string()
                    .starts_with("the flaky task ended 6 times within 60s"),
                "{err}"
            );
            sup.shutdown();
        });
    }
}

//! Connection slots for the agent's servers (`/metrics` and the control
//! socket): at most `cap` connections at once, and a newcomer never waits
//! behind idle ones.
//!
//! A connection is *idle* while the server waits for its client (a request
//! head or line not yet sent) and *busy* while the agent works for it
//! (answering a command, writing a scrape). When every slot is taken, the
//! connection idle longest is evicted (closed) to make room: thousands of
//! clients that connect and say nothing cannot keep `canaryctl rollback`
//! or a Prometheus scrape out, and a server never holds more than `cap`
//! descriptors for its clients. Only when every slot is busy is a newcomer
//! turned away, at once, with a short "busy" answer.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

/// The slots of one server.
#[derive(Debug)]
pub struct Slots {
    cap: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Connections holding a slot, by id.
    live: BTreeSet<u64>,
    next_id: u64,
    /// Idle connections by when they became idle (a sequence number, so
    /// the first entry has waited longest), each with its eviction signal.
    idle: BTreeMap<u64, (u64, Arc<Notify>)>,
    next_seq: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent at every step, so a poisoned lock (a
    // panic elsewhere while holding it) is still safe to use.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Slots {
    /// At most `cap` connections at once (at least one).
    pub fn new(cap: usize) -> Slots {
        Slots {
            cap: cap.max(1),
            state: Arc::default(),
        }
    }

    /// A slot for a connection just accepted. When all are taken, the
    /// connection idle longest is evicted to make room; `None` when every
    /// slot is busy (the caller answers "busy" and closes).
    pub fn acquire(&self) -> Option<Slot> {
        let mut st = lock(&self.state);
        if st.live.len() >= self.cap {
            let (_, (id, evict)) = st.idle.pop_first()?;
            // Its slot is free from now on; the connection closes as soon
            // as its task runs.
            st.live.remove(&id);
            evict.notify_one();
        }
        let id = st.next_id;
        st.next_id += 1;
        st.live.insert(id);
        Some(Slot {
            id,
            evict: Arc::new(Notify::new()),
            state: Arc::clone(&self.state),
        })
    }

    /// Connections holding a slot now.
    pub fn in_use(&self) -> usize {
        lock(&self.state).live.len()
    }
}

/// [`Slots::acquire`] for an accept loop. When every slot is taken and none
/// is idle yet, connections just accepted may not have run far enough to
/// wait for their client: yield once so they can, then try again, rather
/// than turn the newcomer away during a burst of connects.
pub async fn acquire(slots: &Slots) -> Option<Slot> {
    if let Some(slot) = slots.acquire() {
        return Some(slot);
    }
    tokio::task::yield_now().await;
    slots.acquire()
}

/// One connection's slot; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    evict: Arc<Notify>,
    state: Arc<Mutex<State>>,
}

impl Slot {
    /// Runs `wait` (waiting for the client) as idle: if a newcomer needs
    /// the slot meanwhile, `wait` is dropped and `None` returned, and the
    /// caller closes the connection. `Some` with `wait`'s output otherwise.
    pub async fn idle<F: Future>(&self, wait: F) -> Option<F::Output> {
        /// Removes the slot's idle entry when dropped.
        struct Busy<'a>(&'a Mutex<State>, u64);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                lock(self.0).idle.remove(&self.1);
            }
        }
        let seq = {
            let mut st = lock(&self.state);
            if !st.live.contains(&self.id) {
                return None; // evicted earlier
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.idle.insert(seq, (self.id, Arc::clone(&self.evict)));
            seq
        };
        // Busy again however this ends, also when the caller drops us.
        let _busy = Busy(&self.state, seq);
        tokio::select! {
            // An eviction wins over data that arrived in the same instant:
            // the slot already belongs to the newcomer.
            biased;
            () = self.evict.notified() => None,
            out = wait => Some(out),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.state).live.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_newcomer_evicts_the_connection_idle_longest() {
        rt().block_on(async {
            let slots = Slots::new(2);
            let (a, b) = (slots.acquire().unwrap(), slots.acquire().unwrap());
            let (tx_a, rx_a) = tokio::sync::oneshot::channel::<()>();
            let (_tx_b, rx_b) = tokio::sync::oneshot::channel::<()>();
            // a idles first, then b.
            let a_task = tokio::spawn(async move { a.idle(rx_a).await.is_none() });
            tokio::task::yield_now().await;
            let b_task = tokio::spawn(async move {
                let evicted = b.idle(rx_b).await.is_none();
                (evicted, b)
            });
            tokio::task::yield_now().await;
            let c = slots.acquire().expect("room made by evicting a");
            assert!(a_task.await.unwrap(), "a, idle longest, was evicted");
            drop(tx_a);
            assert_eq!(slots.in_use(), 2, "b and c");
            // b is still idle and evictable; c is busy.
            let d = slots.acquire().expect("room made by evicting b");
            let (evicted, b) = b_task.await.unwrap();
            assert!(evicted, "b evicted next");
            assert!(
                b.idle(async {}).await.is_none(),
                "an evicted slot stays evicted"
            );
            assert!(slots.acquire().is_none(), "c and d are busy: no room");
            drop((c, d));
            assert_eq!(slots.in_use(), 0);
        });
    }

    #[test]
    fn a_busy_connection_is_never_evicted_and_idle_returns_the_output() {
        rt().block_on(async {
            let slots = Slots::new(1);
            let a = slots.acquire().unwrap();
            assert_eq!(a.idle(async { 7 }).await, Some(7));
            assert!(slots.acquire().is_none(), "a is busy, not idle");
            drop(a);
            assert!(slots.acquire().is_some(), "a's slot is free once dropped");
        });
    }
}

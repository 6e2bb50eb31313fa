//! Long-lived tasks that outlive a panic.
//!
//! The commander's loops (the fleet owner, intake, results, the policy watches, telemetry
//! receivers) must not die on one bad message. Input is validated before it reaches code
//! that can panic; this is the net under that rule. A panic inside a supervised task is
//! caught, logged with its cause, counted (`fleet_task_panics_total{task}`), and the task
//! starts again from its last good state after a short backoff. While a task is down,
//! [`Health::down`] names it and `/readyz` answers 503.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::sync::watch;

/// A long-lived task of the commander (`fleet`, `intake`, `results`, `policy_watch` …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TaskLabel {
    pub task: &'static str,
}

/// First wait before a restart; doubles per panic in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A task that ran this long since its last restart starts over at [`FIRST_BACKOFF`].
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The wait before a restart: doubling while a task keeps failing, from the start again
/// once it ran long enough to count as stable.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(FIRST_BACKOFF)
    }

    /// The wait after a failure of a run that started at `started`.
    fn next(&mut self, started: Instant) -> Duration {
        if started.elapsed() >= STABLE_AFTER {
            self.0 = FIRST_BACKOFF;
        }
        let wait = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        wait
    }
}

/// A component that is down now, and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Down {
    pub component: &'static str,
    pub reason: String,
}

/// Which components are down (shared by the supervisor and `/readyz`).
#[derive(Debug, Default)]
pub struct Health {
    down: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    /// Components down now, by name.
    pub fn down(&self) -> Vec<Down> {
        self.down
            .lock()
            .map(|d| {
                d.iter()
                    .map(|(c, r)| Down {
                        component: c,
                        reason: r.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn set_down(&self, component: &'static str, reason: String) {
        if let Ok(mut d) = self.down.lock() {
            d.insert(component, reason);
        }
    }

    pub fn set_up(&self, component: &'static str) {
        if let Ok(mut d) = self.down.lock() {
            d.remove(component);
        }
    }
}

/// Catches, counts and restarts. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Supervisor {
    pub health: Arc<Health>,
    /// Panics caught, by task.
    pub panics: Family<TaskLabel, Counter>,
}

/// The text of a panic payload (`panic!("…")` carries a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

impl Supervisor {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "task_panics",
            "Panics caught in long-lived tasks (each was logged and the task restarted)",
            self.panics.clone(),
        );
    }

    /// Counts and logs a panic caught in `task` (for callers that catch it themselves and
    /// carry on, such as a request handler).
    pub fn caught(&self, task: &'static str, payload: &(dyn Any + Send)) -> String {
        let cause = panic_message(payload);
        self.panics.get_or_create(&TaskLabel { task }).inc();
        tracing::error!(task, cause = %cause, "panic caught");
        cause
    }

    /// Runs `body` over `state` until it returns. A panic is caught and `body` runs again
    /// on the same `state`, which is as the panic left it: the last good state less the
    /// one step that panicked. The component is marked down from the panic until it runs
    /// again. Returns the state when `body` returns (its own decision to stop).
    pub async fn run_with_state<S, F>(&self, task: &'static str, mut state: S, mut body: F) -> S
    where
        S: Send,
        F: for<'a> FnMut(&'a mut S) -> futures::future::BoxFuture<'a, ()>,
    {
        let mut backoff = Backoff::new();
        loop {
            let started = Instant::now();
            match AssertUnwindSafe(body(&mut state)).catch_unwind().await {
                Ok(()) => return state,
                Err(payload) => {
                    let cause = self.caught(task, payload.as_ref());
                    let wait = backoff.next(started);
                    self.health
                        .set_down(task, format!("restarting after a panic: {cause}"));
                    tracing::warn!(
                        task,
                        backoff_ms = wait.as_millis() as u64,
                        "restarting after a panic"
                    );
                    tokio::time::sleep(wait).await;
                    self.health.set_up(task);
                }
            }
        }
    }

    /// Spawns a task made by `make`, made again after a panic, and also after it returns
    /// on its own while `stop` is still false (a loop that should run until shutdown
    /// ended: that is a fault too, and the component is down until it runs again).
    pub fn spawn<F, Fut>(
        &self,
        task: &'static str,
        stop: watch::Receiver<bool>,
        mut make: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new();
            loop {
                let started = Instant::now();
                let outcome = AssertUnwindSafe(make()).catch_unwind().await;
                if *stop.borrow() {
                    return;
                }
                let reason = match outcome {
                    Ok(()) => {
                        tracing::error!(task, "task ended before shutdown; restarting it");
                        "ended before shutdown".to_string()
                    }
                    Err(payload) => {
                        format!(
                            "restarting after a panic: {}",
                            me.caught(task, payload.as_ref())
                        )
                    }
                };
                let wait = backoff.next(started);
                me.health.set_down(task, reason);
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                me.health.set_up(task);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_counted_marked_down_and_restarted() {
        let sup = Supervisor::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let handle = sup.spawn("intake", stop_rx, move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("byte index 3 is not a char boundary");
                }
                std::future::pending::<()>().await;
            }
        });
        // First run panics: down, named, with its cause.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let down = sup.health.down();
        assert_eq!(down.len(), 1);
        assert_eq!(down[0].component, "intake");
        assert!(down[0].reason.contains("char boundary"), "{down:?}");
        // Restarted twice (100 ms, then 200 ms backoff), then it stays up.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(sup.health.down().is_empty());
        assert_eq!(
            sup.panics
                .get_or_create(&TaskLabel { task: "intake" })
                .get(),
            2
        );
        stop_tx.send(true).unwrap();
        handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_a_panic() {
        let sup = Supervisor::default();
        let state: Vec<u32> = Vec::new();
        let out = sup
            .run_with_state("fleet", state, |s| {
                Box::pin(async move {
                    s.push(s.len() as u32);
                    if s.len() < 3 {
                        panic!("bad event");
                    }
                })
            })
            .await;
        // Three runs, each kept what the ones before it did.
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(
            sup.panics.get_or_create(&TaskLabel { task: "fleet" }).get(),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_returns_early_is_restarted_but_not_after_stop() {
        let sup = Supervisor::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let handle = sup.spawn("watch", stop_rx, move || {
            r.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(runs.load(Ordering::SeqCst) >= 2);
        stop_tx.send(true).unwrap();
        handle.await.unwrap();
    }
}

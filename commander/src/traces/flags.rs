//! What the rest of the commander says about traces it cannot see: the detector flags the
//! workers and tasks of its open alerts, the results loop marks tasks that failed. The
//! keeper reads these when it decides a trace. Bounded: old marks go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Marks kept per kind at most.
const MAX_MARKS: usize = 100_000;
/// A worker's flag covers traces that ended up to this long before its alert was first
/// seen: the behaviour that raised it started earlier.
pub const LOOKBACK_MS: u64 = 60_000;
/// Marks older than this are forgotten (the traces they name are long decided).
const MARK_TTL_MS: u64 = 30 * 60_000;

#[derive(Clone, Debug)]
struct WorkerFlag {
    rule: String,
    since_ms: u64,
    until_ms: u64,
}

#[derive(Clone, Debug)]
enum TaskMark {
    Flagged(String),
    Failed,
}

#[derive(Debug, Default)]
struct State {
    workers: HashMap<String, WorkerFlag>,
    tasks: HashMap<String, (TaskMark, u64)>,
    order: VecDeque<(u64, String)>,
}

/// Shared between the detector, the results loop and the keeper.
#[derive(Clone, Debug, Default)]
pub struct Flags(Arc<Mutex<State>>);

/// What the marks say about one trace.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    pub task_failed: bool,
    pub flagged_by: Vec<String>,
}

impl Flags {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update of plain maps.
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// An open alert of `rule` on `worker`, first seen at `since_ms`: its traces are
    /// flagged until `until_ms` (refreshed every detector tick while the alert is open).
    pub fn flag_worker(&self, worker: &str, rule: &str, since_ms: u64, until_ms: u64) {
        self.with(|s| {
            if !s.workers.contains_key(worker) && s.workers.len() >= MAX_MARKS {
                return;
            }
            let f = s
                .workers
                .entry(worker.to_string())
                .or_insert_with(|| WorkerFlag {
                    rule: rule.to_string(),
                    since_ms,
                    until_ms,
                });
            f.since_ms = f.since_ms.min(since_ms);
            f.until_ms = f.until_ms.max(until_ms);
            if f.rule != rule && !f.rule.split(',').any(|r| r == rule) && f.rule.len() < 256 {
                f.rule.push(',');
                f.rule.push_str(rule);
            }
        })
    }

    /// An open alert names `task`.
    pub fn flag_task(&self, task: &str, rule: &str, now_ms: u64) {
        self.mark(task, TaskMark::Flagged(rule.to_string()), now_ms);
    }

    /// `task` ended failed, timed out or dead-lettered.
    pub fn task_failed(&self, task: &str, now_ms: u64) {
        self.mark(task, TaskMark::Failed, now_ms);
    }

    fn mark(&self, task: &str, m: TaskMark, now_ms: u64) {
        self.with(|s| {
            if s.tasks.insert(task.to_string(), (m, now_ms)).is_none() {
                s.order.push_back((now_ms, task.to_string()));
            }
            while s.order.len() > MAX_MARKS
                || s.order
                    .front()
                    .is_some_and(|(at, _)| at.saturating_add(MARK_TTL_MS) < now_ms)
            {
                if let Some((_, old)) = s.order.pop_front() {
                    s.tasks.remove(&old);
                }
            }
            s.workers
                .retain(|_, f| f.until_ms.saturating_add(MARK_TTL_MS) >= now_ms);
        })
    }

    /// The marks on a trace that ran from `start_ms` to `end_ms` on `workers` for `tasks`.
    pub fn verdict<'a>(
        &self,
        workers: impl Iterator<Item = &'a str>,
        tasks: impl Iterator<Item = &'a str>,
        start_ms: u64,
        end_ms: u64,
    ) -> Verdict {
        self.with(|s| {
            let mut v = Verdict::default();
            for w in workers {
                if let Some(f) = s.workers.get(w)
                    && end_ms.saturating_add(LOOKBACK_MS) >= f.since_ms
                    && start_ms <= f.until_ms
                {
                    for r in f.rule.split(',') {
                        if !v.flagged_by.iter().any(|x| x == r) {
                            v.flagged_by.push(r.to_string());
                        }
                    }
                }
            }
            for t in tasks {
                match s.tasks.get(t) {
                    Some((TaskMark::Failed, _)) => v.task_failed = true,
                    Some((TaskMark::Flagged(r), _)) if !v.flagged_by.contains(r) => {
                        v.flagged_by.push(r.clone())
                    }
                    _ => {}
                }
            }
            v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_flag_covers_its_traces_around_the_alert_and_task_marks_are_bounded() {
        let f = Flags::default();
        f.flag_worker("w1", "tool_loop", 100_000, 200_000);
        f.flag_worker("w1", "token_loop", 120_000, 210_000);
        let v = f.verdict(["w1"].into_iter(), [].into_iter(), 50_000, 90_000);
        assert_eq!(v.flagged_by, vec!["tool_loop", "token_loop"]);
        // Ended long before the alert, or started after it ended: not flagged.
        assert!(
            f.verdict(["w1"].into_iter(), [].into_iter(), 0, 30_000)
                .flagged_by
                .is_empty()
        );
        assert!(
            f.verdict(["w1"].into_iter(), [].into_iter(), 220_000, 230_000)
                .flagged_by
                .is_empty()
        );
        assert!(
            f.verdict(["w2"].into_iter(), [].into_iter(), 100_000, 110_000)
                .flagged_by
                .is_empty()
        );
        f.task_failed("t1", 0);
        f.flag_task("t2", "stuck_agent", 0);
        let v = f.verdict([].into_iter(), ["t1", "t2"].into_iter(), 0, 0);
        assert!(v.task_failed);
        assert_eq!(v.flagged_by, vec!["stuck_agent"]);
        for i in 0..(MAX_MARKS + 10) {
            f.task_failed(&format!("x{i}"), 1);
        }
        assert!(f.with(|s| s.tasks.len()) <= MAX_MARKS);
        // Forgotten after the TTL.
        f.task_failed("late", MARK_TTL_MS + 10);
        assert!(f.verdict([].into_iter(), ["x5"].into_iter(), 0, 0) == Verdict::default());
    }
}

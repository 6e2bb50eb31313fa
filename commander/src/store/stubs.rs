//! The records an HTTP submission wrote that no intake loop here has taken yet ("stubs":
//! state `received`, no history).
//!
//! `POST /v1/tasks` writes a stub so that the task is found from the moment it is
//! accepted. The intake loop that takes the task replaces it with the real record. With
//! several replicas sharing the intake stream, that loop may be another replica's: the
//! record is then written there, and the stub here would say `received` for ever and
//! never be swept (only finished records are). So every stub is watched, and
//! `pipeline::stubs` finishes one whose task has a result in the results stream.
//!
//! A watched stub is looked at again and again, 10 s after it was accepted and then at
//! doubling intervals up to 5 minutes: a task another replica runs for hours costs a few
//! dozen looks, not one a pass. The watch is bounded ([`MAX_WATCHED`]); a stub past it
//! is watched again after the next restart, which finds every stub in the store.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Stubs watched at most (about 100 bytes each).
pub const MAX_WATCHED: usize = 1_000_000;
/// The first look, after the stub was written (or found at start).
const FIRST_LOOK_MS: u64 = 10_000;
/// The longest wait between two looks.
const LAST_LOOK_MS: u64 = 300_000;

/// One watched stub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// When this commander accepted the task (unix ms); `None` for a stub found in the
    /// store at start.
    pub accepted_ms: Option<u64>,
    /// When it is next looked at.
    pub due_ms: u64,
    /// Looks so far.
    pub looks: u32,
}

impl Watch {
    /// The watch after one more look that found nothing, at `now_ms`.
    pub fn again(self, now_ms: u64) -> Watch {
        let wait = FIRST_LOOK_MS
            .saturating_mul(1u64 << self.looks.min(16))
            .min(LAST_LOOK_MS);
        Watch {
            due_ms: now_ms.saturating_add(wait),
            looks: self.looks.saturating_add(1),
            ..self
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    due: BTreeSet<(u64, Arc<str>)>,
    by_id: HashMap<Arc<str>, Watch>,
}

/// The stubs watched, soonest look first.
#[derive(Debug, Default)]
pub struct Stubs {
    inner: Mutex<Inner>,
}

impl Stubs {
    /// Watches the stub of `id`, first looked at [`FIRST_LOOK_MS`] after `now_ms`; `false`
    /// when the watch is full (it is then not watched). Watching a stub again keeps its
    /// first acceptance time.
    pub fn watch(&self, id: &str, accepted_ms: Option<u64>, now_ms: u64) -> bool {
        let mut inner = self.lock();
        let prior = inner.by_id.get(id).copied();
        if prior.is_none() && inner.by_id.len() >= MAX_WATCHED {
            return false;
        }
        let w = Watch {
            accepted_ms: prior.and_then(|p| p.accepted_ms).or(accepted_ms),
            due_ms: now_ms.saturating_add(FIRST_LOOK_MS),
            looks: 0,
        };
        inner.put(Arc::from(id), w, prior);
        true
    }

    /// Takes up to `n` stubs due at `now_ms`, soonest first. Each is watched no more until
    /// it is given back with [`Stubs::again`].
    pub fn due(&self, now_ms: u64, n: usize) -> Vec<(Arc<str>, Watch)> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        while out.len() < n {
            let Some((due_ms, id)) = inner.due.first().cloned() else {
                break;
            };
            if due_ms > now_ms {
                break;
            }
            inner.due.pop_first();
            if let Some(w) = inner.by_id.remove(&id) {
                out.push((id, w));
            }
        }
        out
    }

    /// Watches a stub taken with [`Stubs::due`] again, for its next look (unless it was
    /// watched anew meanwhile).
    pub fn again(&self, id: Arc<str>, w: Watch, now_ms: u64) {
        let mut inner = self.lock();
        if inner.by_id.contains_key(&id) || inner.by_id.len() >= MAX_WATCHED {
            return;
        }
        inner.put(id, w.again(now_ms), None);
    }

    /// When this commander accepted `id`, if its stub is watched with that time.
    pub fn accepted_ms(&self, id: &str) -> Option<u64> {
        self.lock().by_id.get(id).and_then(|w| w.accepted_ms)
    }

    /// Stops watching `id` (its stub was finished, or replaced by the intake loop).
    pub fn forget(&self, id: &str) {
        let mut inner = self.lock();
        if let Some((id, w)) = inner.by_id.remove_entry(id) {
            inner.due.remove(&(w.due_ms, id));
        }
    }

    /// Stubs watched now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock was held left whole entries: the sets are changed by
        // single inserts and removes.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    fn put(&mut self, id: Arc<str>, w: Watch, prior: Option<Watch>) {
        if let Some(p) = prior {
            self.due.remove(&(p.due_ms, id.clone()));
        }
        self.due.insert((w.due_ms, id.clone()));
        self.by_id.insert(id, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_are_looked_at_soonest_first_then_less_and_less_often() {
        let s = Stubs::default();
        assert!(s.watch("a", Some(1_000), 1_000));
        assert!(s.watch("b", Some(2_000), 2_000));
        assert!(
            s.due(10_999, 10).is_empty(),
            "none is due before its first look"
        );
        let due = s.due(12_000, 10);
        let ids: Vec<&str> = due.iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(s.is_empty(), "taken stubs are not watched until given back");

        // Looks that find nothing wait 10, 20, 40 … s, then 5 minutes at most.
        let (id, mut w) = due[0].clone();
        let mut waits = Vec::new();
        let mut now = 12_000;
        for _ in 0..8 {
            s.again(id.clone(), w, now);
            let next = s.due(u64::MAX, 1);
            assert_eq!(next.len(), 1);
            waits.push(next[0].1.due_ms - now);
            w = next[0].1;
            now = w.due_ms;
        }
        assert_eq!(
            waits,
            [
                10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000
            ]
        );
        assert_eq!(w.accepted_ms, Some(1_000), "the acceptance time is kept");
        // Many looks do not overflow the wait.
        let far = Watch {
            looks: u32::MAX,
            ..w
        }
        .again(u64::MAX - 1);
        assert_eq!((far.due_ms, far.looks), (u64::MAX, u32::MAX));
    }

    #[test]
    fn a_forgotten_or_rewatched_stub_is_looked_at_once() {
        let s = Stubs::default();
        s.watch("a", Some(5), 0);
        s.watch("a", None, 50_000);
        assert_eq!(s.len(), 1);
        assert!(
            s.due(59_999, 10).is_empty(),
            "watched anew: its first look moved"
        );
        let due = s.due(60_000, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.accepted_ms, Some(5));
        // Watched anew while taken: the given-back watch does not double it.
        s.watch("a", None, 60_000);
        s.again(due[0].0.clone(), due[0].1, 60_000);
        assert_eq!(s.len(), 1);
        s.forget("a");
        assert!(s.is_empty());
        assert!(s.due(u64::MAX, 10).is_empty());
        assert_eq!(s.accepted_ms("a"), None);
    }
}

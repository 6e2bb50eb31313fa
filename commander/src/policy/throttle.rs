//! Throttles: governor (GCRA) rate limiters per pool, team, producer or worker, in tasks
//! per second and estimated tokens per minute.
//!
//! Limiters are keyed by the scope's value, so `scope = "team"` without `match` gives
//! every team its own limit. A policy swap keeps the limiters of throttles whose spec did
//! not change (their permits carry over); changed or new ones start full. A task that a
//! throttle holds back is not lost: it stays in the intake stream and comes back at its
//! turn: after the limiter's next permit and after the turns given to the tasks held
//! back before it, one permit's interval apart (a line per key). Told only the next
//! permit, a backlog of held-back tasks all came back together, one passed and the rest
//! were read and handed back again, hundreds of times each.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, RateLimiter};

use super::load::{Policy, Throttle};
use super::schema::{ThrottleScope, ThrottleSpec};

/// The longest a held-back task is told to wait: one whose turn is further off comes
/// back after this and is given a turn then, without holding a place in the line
/// meanwhile.
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// One throttle's limiters.
#[derive(Debug)]
pub struct Limiter {
    pub spec: ThrottleSpec,
    /// The task limiter and its interval between permits.
    tasks: Option<(DefaultKeyedRateLimiter<String>, Duration)>,
    /// The token limiter, its burst, and its interval between single-token permits.
    tokens: Option<(DefaultKeyedRateLimiter<String>, u32, Duration)>,
    /// Per key, when the turns given so far end.
    line: Mutex<HashMap<String, Instant>>,
}

impl Limiter {
    /// The quotas were built (and their ranges checked) when the policy was validated.
    fn new(t: &Throttle) -> Self {
        Self {
            spec: t.spec.clone(),
            tasks: t
                .quotas
                .tasks
                .map(|q| (RateLimiter::keyed(q), q.replenish_interval())),
            tokens: t
                .quotas
                .tokens
                .map(|(q, cap)| (RateLimiter::keyed(q), cap, q.replenish_interval())),
            line: Mutex::default(),
        }
    }

    /// Takes permits for one task of `tokens` estimated tokens, or says how long to wait:
    /// until its turn.
    fn take(&self, key: &String, tokens: u64) -> Result<(), Duration> {
        // The limiter's own clock: building a clock per call costs a calibration.
        if let Some((l, interval)) = &self.tasks
            && let Err(not_until) = l.check_key(key)
        {
            return Err(self.hold(key, not_until.wait_time_from(l.clock().now()), *interval));
        }
        if let Some((l, cap, interval)) = &self.tokens {
            // A task larger than the burst waits for a full bucket, then passes.
            let n = tokens.clamp(1, u64::from(*cap)) as u32;
            let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            match l.check_key_n(key, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(l.clock().now());
                    return Err(self.hold(key, wait, interval.saturating_mul(n.get())));
                }
                Err(_) => return Err(Duration::from_secs(1)),
            }
        }
        Ok(())
    }

    /// A held-back task's wait: its turn in `key`'s line.
    fn hold(&self, key: &str, wait: Duration, interval: Duration) -> Duration {
        let Ok(mut line) = self.line.lock() else {
            return wait.min(MAX_HOLD);
        };
        let now = Instant::now();
        let end = line.get(key).copied();
        let (hold, end) = turn(now, wait, end, interval);
        if let Some(end) = end {
            line.insert(key.to_string(), end);
        }
        hold
    }

    fn retain_recent(&self) {
        if let Some((l, _)) = &self.tasks {
            l.retain_recent();
        }
        if let Some((l, _, _)) = &self.tokens {
            l.retain_recent();
        }
        let now = Instant::now();
        if let Ok(mut line) = self.line.lock() {
            line.retain(|_, end| *end > now);
        }
    }

    fn keys(&self) -> usize {
        self.tasks.as_ref().map(|(l, _)| l.len()).unwrap_or(0)
            + self.tokens.as_ref().map(|(l, _, _)| l.len()).unwrap_or(0)
    }
}

/// A held-back task's turn: once the limiter has a permit (`wait` from `now`) and the
/// turns already given end (`line_end`). Returns how long it waits, and where the line
/// ends now (`None`: unchanged, for a turn past [`MAX_HOLD`], which holds no place: the
/// task comes back after `MAX_HOLD` and asks again).
pub fn turn(
    now: Instant,
    wait: Duration,
    line_end: Option<Instant>,
    interval: Duration,
) -> (Duration, Option<Instant>) {
    let first = now.checked_add(wait).unwrap_or(now);
    let at = line_end.filter(|end| *end > first).unwrap_or(first);
    let hold = at.saturating_duration_since(now);
    if hold > MAX_HOLD {
        return (MAX_HOLD, None);
    }
    (hold, at.checked_add(interval))
}

/// What a throttle can key a task by.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThrottleKeys<'a> {
    pub pool: &'a str,
    pub team: Option<&'a str>,
    pub producer: Option<&'a str>,
    pub worker: Option<&'a str>,
}

/// A task held back: by which throttle, for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct Throttled {
    pub name: String,
    pub key: String,
    pub wait: Duration,
}

/// The limiters of the policy in force.
#[derive(Clone, Debug, Default)]
pub struct Throttles {
    active: Vec<Arc<Limiter>>,
}

/// Limiters by spec, so a swap that keeps a throttle keeps its state.
#[derive(Debug, Default)]
pub struct LimiterCache {
    by_spec: Mutex<HashMap<String, Arc<Limiter>>>,
}

impl LimiterCache {
    /// The limiters for `policy`, reusing those whose spec is unchanged.
    pub fn build(&self, policy: &Policy) -> Throttles {
        let Ok(mut cache) = self.by_spec.lock() else {
            return Throttles {
                active: policy
                    .throttles
                    .iter()
                    .map(|t| Arc::new(Limiter::new(t)))
                    .collect(),
            };
        };
        let mut next = HashMap::new();
        let mut active = Vec::with_capacity(policy.throttles.len());
        for t in &policy.throttles {
            let fp = format!("{:?}", t.spec);
            let l = cache
                .remove(&fp)
                .unwrap_or_else(|| Arc::new(Limiter::new(t)));
            next.insert(fp, l.clone());
            active.push(l);
        }
        *cache = next;
        Throttles { active }
    }
}

impl Throttles {
    /// Takes a permit from every throttle that applies, in policy order, or names the
    /// first that holds the task back (permits already taken from earlier throttles are
    /// spent: a held-back task can only make the fleet slower, never faster).
    pub fn admit(&self, keys: ThrottleKeys<'_>, tokens: u64) -> Result<(), Throttled> {
        for l in &self.active {
            let value = match l.spec.scope {
                ThrottleScope::Pool => Some(keys.pool),
                ThrottleScope::Team => keys.team,
                ThrottleScope::Producer => keys.producer,
                ThrottleScope::Worker => keys.worker,
            };
            let Some(value) = value else { continue };
            if l.spec.matches.as_deref().is_some_and(|m| m != value) {
                continue;
            }
            let key = value.to_string();
            if let Err(wait) = l.take(&key, tokens) {
                return Err(Throttled {
                    name: l.spec.name.clone(),
                    key,
                    wait,
                });
            }
        }
        Ok(())
    }

    /// Forgets keys whose limiters are full again (bounds memory for per-value throttles).
    pub fn retain_recent(&self) -> usize {
        self.active.iter().for_each(|l| l.retain_recent());
        self.active.iter().map(|l| l.keys()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }
}

//! Throttles: governor (GCRA) rate limiters per pool, team, producer or worker, in tasks
//! per second and estimated tokens per minute.
//!
//! Limiters are keyed by the scope's value, so `scope = "team"` without `match` gives
//! every team its own limit. A policy swap keeps the limiters of throttles whose spec did
//! not change (their permits and lines carry over); changed or new ones start full.
//!
//! A task a throttle holds back is given a turn in its key's line: after the limiter's
//! next permit and after the turns already given, one permit's interval apart. While a
//! key has a line, a newcomer joins its end instead of taking a permit, and a task back at
//! its turn takes the permit its turn was given for. The limiter still decides: tasks back
//! late together pass no faster than it allows (one without a permit yet keeps its place,
//! waiting for the next), so the GCRA bound holds whatever the lateness.
//! A turn close at hand ([`INLINE_MAX`]) is waited out in the intake stream: the message is
//! handed back with that delay, and the turn is remembered here by task id. A turn further
//! off is parked: the caller stores the task with its [`Turn`] and acks it, so a long line
//! never fills the intake consumer's window, where it held up every other key's tasks.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::RateLimiter;
use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;

use super::load::{Policy, Throttle};
use super::schema::{ThrottleScope, ThrottleSpec};
use crate::domain::Clock;

/// The furthest a turn may be for its task to wait in the intake stream; one further off
/// is parked.
pub const INLINE_MAX: Duration = Duration::from_secs(1);

/// How late a task may come back and still find its turn: the hand-back adds a few
/// milliseconds, and the release loop wakes after the turn, never before.
const EARLY_MS: u64 = 20;

/// Remembered in-stream turns older than this are forgotten (their task never came back:
/// cancelled, or taken by another replica).
const TURN_MEMORY_MS: u64 = 60_000;

pub use crate::domain::ThrottleTurn as Turn;

/// The fingerprint of a throttle's spec: the same spec, the same limiter.
pub fn spec_hash(spec: &ThrottleSpec) -> u64 {
    crate::domain::fnv1a(&[format!("{spec:?}").as_bytes()])
}

/// The task asking for permits.
#[derive(Clone, Copy, Debug)]
pub struct Asking<'a> {
    pub task_id: &'a str,
    pub now_ms: u64,
    /// The turn it was parked with, coming back from the parked queue.
    pub turn: Option<&'a Turn>,
    /// In-stream turns each throttle may hold at once; past it a held task is parked
    /// however near its turn (the intake window is shared by every key).
    pub inline_cap: usize,
}

/// The policy clock as the limiters read it, so throttles run on the same time as the
/// lines and turns they give: fleet time in a `clock.speed` lab (a task a second of fleet
/// time, not of the wall clock), a hand-moved clock in tests. Its reading never goes back
/// ([`Clock::monotonic`]).
#[derive(Clone, Debug)]
struct PolicyTime(Arc<dyn Clock>);

impl governor::clock::Clock for PolicyTime {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(u64::try_from(self.0.monotonic().as_nanos()).unwrap_or(u64::MAX))
    }
}

type KeyedLimiter =
    RateLimiter<String, DefaultKeyedStateStore<String>, PolicyTime, NoOpMiddleware<Nanos>>;

/// A key's line and the in-stream turns given, in microseconds of the policy clock.
#[derive(Debug, Default)]
struct Lines {
    /// Per key, when the turns given so far end.
    end_us: HashMap<String, u64>,
    /// Per task id waiting in the stream: its key and turn.
    turns: HashMap<String, (String, u64)>,
    /// Per key, when the turns given to tasks back at theirs that found no permit end:
    /// each such task gets the next permit no other has been promised, so tasks back late
    /// together come back one permit apart, not all at the next permit again.
    missed_end_us: HashMap<String, u64>,
}

/// One throttle's limiters.
#[derive(Debug)]
pub struct Limiter {
    pub spec: ThrottleSpec,
    hash: u64,
    /// The task limiter and its interval between permits.
    tasks: Option<(KeyedLimiter, Duration)>,
    /// The token limiter, its burst, and its interval between single-token permits.
    tokens: Option<(KeyedLimiter, u32, Duration)>,
    lines: Mutex<Lines>,
    /// Whether `lines` holds a line or an in-stream turn (set under its lock): while it
    /// does not, a task with no turn asks the limiter alone, without the lock. (The
    /// turns given to tasks that missed their permits do not count: a task with no turn
    /// asks the limiter all the same once no line is left.)
    lined: AtomicBool,
}

/// Where a held-back task waits for its turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// In the intake stream, handed back with the turn's delay.
    Inline,
    /// Stored in the parked queue and acked; released at its turn.
    Park,
}

impl Limiter {
    /// The quotas were built (and their ranges checked) when the policy was validated;
    /// with several replicas, this one's part of them (`ThrottleSpec::divided`).
    fn new(t: &Throttle, clock: &Arc<dyn Clock>, replicas: usize) -> Self {
        let quotas = match replicas {
            0 | 1 => t.quotas,
            n => t.spec.divided(n).quotas().unwrap_or(t.quotas),
        };
        let keyed = |q| {
            RateLimiter::new(
                q,
                DefaultKeyedStateStore::default(),
                PolicyTime(clock.clone()),
            )
        };
        Self {
            spec: t.spec.clone(),
            hash: spec_hash(&t.spec),
            tasks: quotas.tasks.map(|q| (keyed(q), q.replenish_interval())),
            tokens: quotas
                .tokens
                .map(|(q, cap)| (keyed(q), cap, q.replenish_interval())),
            lines: Mutex::default(),
            lined: AtomicBool::new(false),
        }
    }

    /// A task of `tokens` estimated tokens: the tokens it counts for (at most the burst).
    fn token_permits(&self, tokens: u64) -> NonZeroU32 {
        let cap = self.tokens.as_ref().map_or(1, |(_, cap, _)| *cap);
        let n = tokens.clamp(1, u64::from(cap)) as u32;
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    /// The interval a task takes in its key's line: the longer of its task permit's and
    /// its tokens'.
    fn interval(&self, tokens: u64) -> Duration {
        let tasks = self.tasks.as_ref().map_or(Duration::ZERO, |(_, i)| *i);
        let n = self.token_permits(tokens).get();
        let tokens = self
            .tokens
            .as_ref()
            .map_or(Duration::ZERO, |(_, _, i)| i.saturating_mul(n));
        tasks.max(tokens)
    }

    /// Takes permits from the limiters now, or says how long until they have them.
    fn check(&self, key: &String, tokens: u64) -> Result<(), Duration> {
        if let Some((l, _)) = &self.tasks
            && let Err(not_until) = l.check_key(key)
        {
            return Err(not_until.wait_time_from(l.clock().now()));
        }
        if let Some((l, _, _)) = &self.tokens {
            // A task larger than the burst waits for a full bucket, then passes.
            match l.check_key_n(key, self.token_permits(tokens)) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => return Err(not_until.wait_time_from(l.clock().now())),
                Err(_) => return Err(Duration::from_secs(1)),
            }
        }
        Ok(())
    }

    /// The turn `ask` holds here for `key`, if any: remembered for a task waiting in the
    /// stream, or carried by a parked one (given by this very spec).
    fn held_turn(&self, lines: &mut Lines, key: &str, ask: &Asking<'_>) -> Option<u64> {
        if let Some((k, at)) = lines.turns.remove(ask.task_id)
            && k == key
        {
            return Some(at);
        }
        ask.turn
            .filter(|t| self.gave(t) && t.key == key)
            .map(|t| t.at_ms.saturating_mul(1_000))
    }

    /// Whether `turn` came from this throttle, as its spec is now.
    fn gave(&self, turn: &Turn) -> bool {
        self.spec.name == turn.throttle && self.hash == turn.spec
    }

    /// Lets the task through, or gives it a turn and says where it waits.
    fn take(&self, key: &String, tokens: u64, ask: &Asking<'_>) -> Result<(), (u64, Wait)> {
        let now_us = ask.now_ms.saturating_mul(1_000);
        // The common case, a throttle with no line and a task with no turn, costs the
        // limiter's check alone.
        if ask.turn.is_none()
            && !self.lined.load(Ordering::Acquire)
            && self.check(key, tokens).is_ok()
        {
            return Ok(());
        }
        let Ok(mut lines) = self.lines.lock() else {
            // A poisoned lock: the limiter alone decides, as without lines.
            return self.check(key, tokens).map_err(|w| {
                let at = now_us.saturating_add(micros(w));
                (at, Wait::Inline)
            });
        };
        if let Some(at_us) = self.held_turn(&mut lines, key, ask) {
            // Back before its turn (a clock step), it keeps the turn; at its turn, it
            // takes the permit, or keeps its place for the next one (several back late
            // together, or a newcomer took it after the line ran out).
            let at_us = if at_us <= now_us.saturating_add(EARLY_MS * 1_000) {
                match self.check(key, tokens) {
                    Ok(()) => return Ok(()),
                    Err(wait) => {
                        let next = now_us.saturating_add(micros(wait));
                        let free = lines.missed_end_us.get(key).copied().unwrap_or(0);
                        let at = next.max(free);
                        let end = at.saturating_add(micros(self.interval(tokens)).max(1));
                        lines.missed_end_us.insert(key.clone(), end);
                        at
                    }
                }
            } else {
                at_us
            };
            let wait_in = self.place(&mut lines, key, ask, at_us, now_us);
            self.note_lined(&lines);
            return Err((at_us, wait_in));
        }
        let line_end = lines
            .end_us
            .get(key.as_str())
            .copied()
            .filter(|e| *e > now_us);
        let first = match line_end {
            Some(end) => end,
            None => match self.check(key, tokens) {
                Ok(()) => return Ok(()),
                Err(wait) => now_us.saturating_add(micros(wait)),
            },
        };
        let end = first.saturating_add(micros(self.interval(tokens)).max(1));
        lines.end_us.insert(key.clone(), end);
        let wait_in = self.place(&mut lines, key, ask, first, now_us);
        self.note_lined(&lines);
        Err((first, wait_in))
    }

    fn note_lined(&self, lines: &Lines) {
        let lined = !(lines.end_us.is_empty() && lines.turns.is_empty());
        self.lined.store(lined, Ordering::Release);
    }

    /// Where a task with a turn at `at_us` waits, remembering an in-stream turn.
    fn place(
        &self,
        lines: &mut Lines,
        key: &str,
        ask: &Asking<'_>,
        at_us: u64,
        now_us: u64,
    ) -> Wait {
        let near = at_us.saturating_sub(now_us) <= micros(INLINE_MAX);
        if near && lines.turns.len() < ask.inline_cap {
            lines
                .turns
                .insert(ask.task_id.to_string(), (key.to_string(), at_us));
            Wait::Inline
        } else {
            Wait::Park
        }
    }

    /// Whether nothing has asked it for a permit yet.
    fn is_fresh(&self) -> bool {
        self.keys() == 0 && self.lines.lock().is_ok_and(|l| l.end_us.is_empty())
    }

    /// Where `key`'s line ends at least: parked turns outlive a restart, the lines do not.
    fn extend_line(&self, key: &str, at_ms: u64) {
        if let Ok(mut lines) = self.lines.lock() {
            let end = at_ms
                .saturating_mul(1_000)
                .saturating_add(micros(self.interval(1)).max(1));
            let e = lines.end_us.entry(key.to_string()).or_insert(0);
            *e = (*e).max(end);
            self.note_lined(&lines);
        }
    }

    /// Lowers `key`'s line end to what still waits in it, after parked tasks left it
    /// before their turns (cancelled, or past their deadline): the last turn still parked
    /// (`last_parked_ms`) or waited out in the stream. With none, the line is gone and
    /// the next task asks the limiter alone. Turns still parked keep their times.
    fn shrink_line(&self, key: &str, last_parked_ms: Option<u64>) {
        let Ok(mut lines) = self.lines.lock() else {
            return;
        };
        let step = micros(self.interval(1)).max(1);
        let in_stream = lines
            .turns
            .values()
            .filter(|(k, _)| k == key)
            .map(|(_, at)| *at)
            .max();
        match last_parked_ms
            .map(|ms| ms.saturating_mul(1_000))
            .max(in_stream)
        {
            Some(last) => {
                if let Some(end) = lines.end_us.get_mut(key) {
                    *end = (*end).min(last.saturating_add(step));
                }
            }
            None => {
                lines.end_us.remove(key);
            }
        }
        self.note_lined(&lines);
    }

    fn retain_recent(&self, now_ms: u64) {
        if let Some((l, _)) = &self.tasks {
            l.retain_recent();
        }
        if let Some((l, _, _)) = &self.tokens {
            l.retain_recent();
        }
        let now_us = now_ms.saturating_mul(1_000);
        let forget_before = now_us.saturating_sub(TURN_MEMORY_MS * 1_000);
        if let Ok(mut lines) = self.lines.lock() {
            lines.end_us.retain(|_, end| *end > now_us);
            lines.missed_end_us.retain(|_, end| *end > now_us);
            lines.turns.retain(|_, (_, at)| *at > forget_before);
            self.note_lined(&lines);
        }
    }

    fn keys(&self) -> usize {
        self.tasks.as_ref().map(|(l, _)| l.len()).unwrap_or(0)
            + self.tokens.as_ref().map(|(l, _, _)| l.len()).unwrap_or(0)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What a throttle can key a task by.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThrottleKeys<'a> {
    pub pool: &'a str,
    pub team: Option<&'a str>,
    pub producer: Option<&'a str>,
    pub worker: Option<&'a str>,
}

/// A task held back: its turn (which throttle, which key, when), and where it waits for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Throttled {
    /// From now until its turn.
    pub wait: Duration,
    pub turn: Turn,
    pub wait_in: Wait,
    /// The throttle's rate, for the reason a producer reads (`2 task(s)/s`).
    pub rate: String,
}

/// The limiters of the policy in force.
#[derive(Clone, Debug, Default)]
pub struct Throttles {
    active: Vec<Arc<Limiter>>,
}

/// Limiters by spec, so a swap that keeps a throttle keeps its state.
#[derive(Debug)]
pub struct LimiterCache {
    by_spec: Mutex<HashMap<String, Arc<Limiter>>>,
    clock: Arc<dyn Clock>,
    /// The replicas sharing the intake, this one included: each limits to its part.
    replicas: AtomicUsize,
}

impl LimiterCache {
    /// Limiters that run on `clock`, the policy clock.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            by_spec: Mutex::default(),
            clock,
            replicas: AtomicUsize::new(1),
        }
    }

    /// The replicas sharing the intake, this one included.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Sets how many replicas share the intake; returns whether that changed (the next
    /// [`Self::build`] then makes every limiter afresh, at its new part).
    pub fn set_replicas(&self, n: usize) -> bool {
        self.replicas.swap(n.max(1), Ordering::Relaxed) != n.max(1)
    }

    /// The limiters for `policy`, reusing those whose spec is unchanged. Fresh ones (new,
    /// or never asked) take up their lines behind the turns of the tasks `parked` (read
    /// only when there is one): a restart forgets the lines, not the parked tasks.
    pub fn build(&self, policy: &Policy, parked: &dyn Fn() -> Vec<Turn>) -> Throttles {
        let throttles = self.limiters(policy);
        let new: Vec<&Arc<Limiter>> = throttles.active.iter().filter(|l| l.is_fresh()).collect();
        if !new.is_empty() {
            for turn in parked() {
                if let Some(l) = new.iter().find(|l| l.gave(&turn)) {
                    l.extend_line(&turn.key, turn.at_ms);
                }
            }
        }
        throttles
    }

    fn limiters(&self, policy: &Policy) -> Throttles {
        let replicas = self.replicas();
        let Ok(mut cache) = self.by_spec.lock() else {
            return Throttles {
                active: policy
                    .throttles
                    .iter()
                    .map(|t| Arc::new(Limiter::new(t, &self.clock, replicas)))
                    .collect(),
            };
        };
        let mut next = HashMap::new();
        let mut active = Vec::with_capacity(policy.throttles.len());
        for t in &policy.throttles {
            let fp = format!("{replicas}|{:?}", t.spec);
            let l = cache
                .remove(&fp)
                .unwrap_or_else(|| Arc::new(Limiter::new(t, &self.clock, replicas)));
            next.insert(fp, l.clone());
            active.push(l);
        }
        *cache = next;
        Throttles { active }
    }
}

fn rate_of(spec: &ThrottleSpec) -> String {
    let mut parts = Vec::new();
    if let Some(r) = spec.tasks_per_s {
        parts.push(format!("{r} task(s)/s"));
    }
    if let Some(r) = spec.tokens_per_min {
        parts.push(format!("{r} token(s)/min"));
    }
    parts.join(" and ")
}

impl Throttles {
    /// Takes a permit from every throttle that applies, in policy order, or names the
    /// first that holds the task back, with its turn (permits already taken from earlier
    /// throttles are spent: a held-back task can only make the fleet slower, never
    /// faster).
    pub fn admit(
        &self,
        keys: ThrottleKeys<'_>,
        tokens: u64,
        ask: Asking<'_>,
    ) -> Result<(), Throttled> {
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
            if let Err((at_us, wait_in)) = l.take(&key, tokens, &ask) {
                let now_us = ask.now_ms.saturating_mul(1_000);
                return Err(Throttled {
                    wait: Duration::from_micros(at_us.saturating_sub(now_us)),
                    turn: Turn {
                        throttle: l.spec.name.clone(),
                        key,
                        at_ms: at_us.div_ceil(1_000),
                        spec: l.hash,
                    },
                    wait_in,
                    rate: rate_of(&l.spec),
                });
            }
        }
        Ok(())
    }

    /// Whether `turn` was given by a throttle in force with the same spec; a parked task
    /// whose turn is void is released at once, to be given a turn by the new spec.
    pub fn honours(&self, turn: &Turn) -> bool {
        self.active.iter().any(|l| l.gave(turn))
    }

    /// After parked tasks left their lines before their turns (`left`: their turns), ends
    /// each of those lines at the last turn still parked in it (`last_parked`: for a
    /// throttle and key, in unix ms), or removes it when none is: a newcomer then waits
    /// behind the tasks that still wait, not behind places nobody will come back for.
    pub fn shrink_lines(&self, left: &[Turn], last_parked: &dyn Fn(&str, &str) -> Option<u64>) {
        for l in &self.active {
            let mut keys: Vec<&str> = left
                .iter()
                .filter(|t| l.gave(t))
                .map(|t| t.key.as_str())
                .collect();
            keys.sort_unstable();
            keys.dedup();
            for key in keys {
                l.shrink_line(key, last_parked(&l.spec.name, key));
            }
        }
    }

    /// Forgets keys whose limiters are full again, lines that ran out and in-stream turns
    /// whose task never came back (bounds memory for per-value throttles).
    pub fn retain_recent(&self, now_ms: u64) -> usize {
        self.active.iter().for_each(|l| l.retain_recent(now_ms));
        self.active.iter().map(|l| l.keys()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }
}

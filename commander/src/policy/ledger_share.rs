//! Budgets that hold for the fleet when several replicas share intake.
//!
//! Each replica keeps its own ledger, from its own task records (exact across its own
//! crashes, `store::log`), and shares what it has committed that still counts: the key
//! `ledger.<replica>` of the `<prefix>_control` bucket holds its cells (budget, value,
//! bucket, spent, reserved), written when they changed: at most every [`EVERY`] while other
//! replicas run, every [`EVERY_ALONE`] while none does.
//! Every replica follows the other replicas' keys and checks each task against its own
//! cells plus theirs (`budget::Ledger::set_others`), so N replicas together commit one
//! limit, not N.
//!
//! Each key has one writer, so a write needs no compare-and-set, and the task path never
//! waits for NATS: a task is admitted against what the others shared at most about
//! [`EVERY`] plus a watch's delivery ago. So that replicas admitting at the same moment do
//! not together pass a limit, each key also says which revision of every other replica's
//! key its replica counts (`seen`; a replica writes within [`EVERY`] when another's
//! spending changed), and beyond what every other counts of its own a replica takes at
//! most 1/N of the room it sees (`budget::Ledger::my_part_fits`; a task past its part
//! waits a moment in the intake stream): together they pass a limit by about one task per
//! other replica at most, however late the others read. A write that only says what its
//! replica counts is not itself acknowledged, so two replicas do not answer each other
//! for ever. A compare-and-set on a shared cell per task would close even
//! that, at one NATS round trip per task and budget, serialised on the hottest cell.
//!
//! A key stays when its replica stops: its cells are real spending, and they leave the
//! window by their bucket times, which every reader applies itself. A replica writes its
//! key at least every [`ALIVE_EVERY`]; one not heard from for [`GONE_AFTER`] is taken to
//! be gone, and its reservations stop counting (nobody would ever settle them: a replica
//! killed for good would otherwise hold its tasks' estimates until the window ends), while
//! its spending still counts. While NATS is away a replica goes on with what it last
//! read, and writes again when NATS is back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::PolicyEngine;
use super::budget::Cells;
use crate::domain::{Cell, CellKey};

/// Keys of the control bucket that hold a replica's cells start with this.
pub const KEY_PREFIX: &str = "ledger.";
/// How often a replica looks whether its cells changed, and writes them when they did.
pub const EVERY: Duration = Duration::from_millis(20);
/// How often a lone replica writes its cells when they changed: nobody reads them until
/// another starts (which reads them then, at most this old).
pub const EVERY_ALONE: Duration = Duration::from_secs(1);
/// Cells one replica shares at most (the largest first); more are counted in
/// `fleet_budget_cells_unshared`. A budget keeps up to 10,000 values, a rolling window
/// 60 buckets of each: the bound keeps the key within NATS's 1 MiB `max_payload`.
pub const MAX_CELLS: usize = 4_096;
/// The largest key a replica writes; cells beyond it are left out as above.
pub const MAX_BYTES: usize = 512 * 1024;
/// Other replicas whose cells are kept at most (a key per replica id ever started).
pub const MAX_REPLICAS: usize = 256;
/// A replica writes its key at least this often, changed or not.
pub const ALIVE_EVERY: Duration = Duration::from_secs(10);
/// A replica whose key has not been written for this long is taken to be gone.
pub const GONE_AFTER: Duration = Duration::from_secs(30);

/// A failed write is logged once per 10 s: while NATS is away it fails at every try.
static WRITE_FAILURES_LOG: crate::domain::LogEvery =
    crate::domain::LogEvery::new(Duration::from_secs(10));

/// What a replica's key holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shared {
    pub replica: String,
    /// When it was written (the writer's clock; shown, not used).
    pub at_ms: u64,
    /// (budget, value, bucket start in unix ms, spent USD, reserved USD).
    pub cells: Vec<(String, String, u64, f64, f64)>,
    /// Written as the replica stopped cleanly, with nothing left to settle: it no longer
    /// shares the intake, and its reservations no longer count (its spending does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// The revision of each other replica's key this one has taken on (counts in its
    /// checks): what each of them commits beyond it, this one may not count yet. Absent
    /// from keys written before December 2026, which acknowledge nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seen: BTreeMap<String, u64>,
}

/// The key of a replica's cells.
pub fn key(replica: &str) -> String {
    format!("{KEY_PREFIX}{replica}")
}

/// What one replica shares of `own` cells: the largest first, as many as fit in
/// [`MAX_CELLS`] and [`MAX_BYTES`]. Sorts `own` so (largest first) and returns the body
/// and how many cells it left out (the last ones). `stopped`: its last write, as it stops.
pub fn encode(
    replica: &str,
    at_ms: u64,
    own: &mut [(CellKey, Cell)],
    stopped: bool,
    seen: &BTreeMap<String, u64>,
) -> (Vec<u8>, usize) {
    own.sort_by(|a, b| {
        let size = |c: &Cell| c.spent + c.reserved;
        size(&b.1).total_cmp(&size(&a.1))
    });
    let all = own.len();
    let mut keep = all.min(MAX_CELLS);
    loop {
        let shared = Shared {
            replica: replica.to_string(),
            at_ms,
            stopped,
            seen: seen.clone(),
            cells: own[..keep]
                .iter()
                .map(|(k, c)| {
                    (
                        k.budget.clone(),
                        k.value.clone(),
                        k.bucket,
                        c.spent,
                        c.reserved,
                    )
                })
                .collect(),
        };
        // Serialising plain strings and numbers cannot fail; an empty body is a key
        // with nothing in it, which readers treat as such.
        let body = serde_json::to_vec(&shared).unwrap_or_default();
        if body.len() <= MAX_BYTES || keep == 0 {
            return (body, all - keep);
        }
        keep /= 2;
    }
}

/// Reads another replica's key; `None` when it is not one (it is then passed over).
/// Amounts that are not finite, or below zero, count as zero; at most [`MAX_CELLS`] cells
/// are read.
pub fn decode(body: &[u8]) -> Option<Shared> {
    let mut s: Shared = serde_json::from_slice(body).ok()?;
    s.cells.truncate(MAX_CELLS);
    for c in &mut s.cells {
        for x in [&mut c.3, &mut c.4] {
            if !x.is_finite() || *x < 0.0 {
                *x = 0.0;
            }
        }
    }
    Some(s)
}

/// The other replicas' cells, summed: `(cells, alive)`; a replica that is gone counts its
/// spending, not its reservations.
pub fn merge<'a>(others: impl IntoIterator<Item = (&'a Shared, bool)>) -> Cells {
    let mut out = Cells::new();
    for (s, alive) in others {
        for (budget, value, bucket, spent, reserved) in &s.cells {
            let c = out
                .entry(budget.clone())
                .or_default()
                .entry(value.clone())
                .or_default()
                .entry(*bucket)
                .or_default();
            c.spent += spent;
            if alive {
                c.reserved += reserved;
            }
        }
    }
    out
}

/// How often a replica writes its key unchanged, and when one that has not is gone.
#[derive(Clone, Copy, Debug)]
struct Timing {
    alive_every: Duration,
    gone_after: Duration,
}

/// Another replica's key as last read.
#[derive(Debug)]
struct Other {
    shared: Shared,
    /// Its revision in the bucket: a watch that starts again brings the same one back,
    /// which says nothing new about whether its replica is alive.
    revision: u64,
    /// When it was last written, as this process knows it (its own clock from the watch;
    /// at start, from the entry's age).
    heard: Instant,
    /// Whether it counted as alive at the last merge.
    alive: bool,
}

/// What the others shared, taken on together.
struct Merged {
    /// Their cells summed.
    cells: Cells,
    /// How many of them are alive.
    alive: usize,
    /// The newest revision of `me`'s key every one alive has taken on; `None` when one
    /// has not said.
    acked: Option<u64>,
}

fn merged(others: &BTreeMap<String, Other>, me: &str) -> Merged {
    let alive: Vec<&Other> = others.values().filter(|o| o.alive).collect();
    let acked = alive
        .iter()
        .map(|o| o.shared.seen.get(me).copied())
        .min()
        .flatten();
    Merged {
        cells: merge(others.values().map(|o| (&o.shared, o.alive))),
        alive: alive.len(),
        acked,
    }
}

/// One replica's side of the shared ledger.
#[derive(Debug)]
pub struct LedgerShare {
    kv: kv::Store,
    engine: Arc<PolicyEngine>,
    replica: String,
    /// The other replicas' keys as last read, by replica.
    others: Mutex<BTreeMap<String, Other>>,
    /// Another replica shared spending this one has not yet said it counts.
    ack_due: AtomicBool,
    /// [`ALIVE_EVERY`] and [`GONE_AFTER`] (shorter in tests).
    timing: Timing,
    /// Cells the last write left out (`fleet_budget_cells_unshared`).
    pub unshared: Gauge,
    /// Replicas sharing the intake as counted here, this one included (`fleet_replicas`).
    pub replicas: Gauge,
}

impl LedgerShare {
    /// Reads the other replicas' keys before this replica decides anything, so a replica
    /// that starts does not admit against its own ledger alone.
    pub async fn start(
        kv: kv::Store,
        engine: Arc<PolicyEngine>,
        replica: &str,
    ) -> Result<Arc<Self>, String> {
        let timing = Timing {
            alive_every: ALIVE_EVERY,
            gone_after: GONE_AFTER,
        };
        Self::start_timed(kv, engine, replica, timing).await
    }

    async fn start_timed(
        kv: kv::Store,
        engine: Arc<PolicyEngine>,
        replica: &str,
        timing: Timing,
    ) -> Result<Arc<Self>, String> {
        let share = Arc::new(Self {
            kv,
            engine,
            replica: replica.to_string(),
            others: Mutex::default(),
            ack_due: AtomicBool::new(false),
            timing,
            unshared: Gauge::default(),
            replicas: Gauge::default(),
        });
        share.replicas.set(1);
        let mut keys = share.kv.keys().await.map_err(|e| e.to_string())?;
        let mut found = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| e.to_string())?;
            if k.starts_with(KEY_PREFIX) && k != key(replica) && found.len() < MAX_REPLICAS {
                found.push(k);
            }
        }
        for k in found {
            if let Some(entry) = share.kv.entry(k).await.map_err(|e| e.to_string())? {
                // A key written long ago is a replica gone long ago: its age tells, so a
                // replica that starts does not wait 30 s to stop counting it. (Clocks
                // between machines are near enough for that: the watch, later, goes by
                // this process's clock alone.)
                let written_ns = entry.created.unix_timestamp_nanos();
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                let age = u64::try_from(now_ns.saturating_sub(written_ns)).unwrap_or(0);
                let age = Duration::from_nanos(age).min(share.timing.gone_after);
                let heard = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                share.take(&entry, heard);
            }
        }
        share.forget_the_gone();
        share.take_own_last_share().await?;
        Ok(share)
    }

    /// What this replica wrote last before it stopped is what the others took on of it
    /// (their keys name that revision): it counts as shared, so a restart does not have to
    /// wait for them to take on a new write before it may take its part of the room.
    async fn take_own_last_share(&self) -> Result<(), String> {
        let Some(entry) = self
            .kv
            .entry(key(&self.replica))
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let Some(last) =
            decode(&entry.value).filter(|_| matches!(entry.operation, kv::Operation::Put))
        else {
            return Ok(());
        };
        let cells: Vec<(CellKey, Cell)> = last
            .cells
            .into_iter()
            .map(|(budget, value, bucket, spent, reserved)| {
                (
                    CellKey {
                        budget,
                        value,
                        bucket,
                    },
                    Cell { spent, reserved },
                )
            })
            .collect();
        self.engine
            .with_ledger(|l| l.mark_shared(entry.revision, &cells));
        Ok(())
    }

    /// Writes this replica's cells when they change, and follows the others', until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The ledger's change count last written, and when; none yet, so the first tick
        // writes.
        let mut written: Option<(u64, Instant)> = None;
        loop {
            let mut w = match self.kv.watch_with_history(format!("{KEY_PREFIX}*")).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the other replicas' budgets; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    e = w.next() => match e {
                        Some(Ok(entry)) => self.take(&entry, Instant::now()),
                        Some(Err(e)) => tracing::warn!(error = %e, "shared ledger watch error"),
                        None => break,
                    },
                    _ = tick.tick() => {
                        self.write_if_changed(&mut written).await;
                        self.forget_the_gone();
                    }
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Writes this replica's cells when they changed since the last write that NATS took
    /// ([`EVERY`] apart while other replicas run, [`EVERY_ALONE`] while none does), when
    /// another shared spending this one has not yet said it counts ([`EVERY`] apart), or
    /// when that write is [`ALIVE_EVERY`] old.
    async fn write_if_changed(&self, written: &mut Option<(u64, Instant)>) {
        if let Some((c, at)) = *written {
            let gap = if self.replicas.get() > 1 {
                EVERY
            } else {
                EVERY_ALONE
            };
            let since = at.elapsed();
            let changed = self.engine.with_ledger(|l| c != l.changes());
            let ack = self.ack_due.load(Ordering::Relaxed);
            if !(changed && since >= gap
                || ack && since >= EVERY
                || since >= self.timing.alive_every)
            {
                return;
            }
        }
        if let Some(changes) = self.write(false).await {
            *written = Some((changes, Instant::now()));
        }
    }

    /// Writes this replica's cells; the ledger's change count they stand for once NATS
    /// took them.
    async fn write(&self, stopped: bool) -> Option<u64> {
        let policy = self.engine.live().policy.clone();
        let now = self.engine.now_ms();
        let (changes, mut own) = self
            .engine
            .with_ledger(|l| (l.changes(), l.own_counting(&policy, now)));
        // Cleared before the others' revisions are read: one taken on after is said next.
        self.ack_due.store(false, Ordering::Relaxed);
        let seen: BTreeMap<String, u64> = {
            let others = self.others.lock().unwrap_or_else(|p| p.into_inner());
            others
                .iter()
                .map(|(r, o)| (r.clone(), o.revision))
                .collect()
        };
        let (body, left_out) = encode(&self.replica, now, &mut own, stopped, &seen);
        // What the others will see: the cells written, not those left out.
        own.truncate(own.len() - left_out);
        self.unshared
            .set(i64::try_from(left_out).unwrap_or(i64::MAX));
        if left_out > 0 {
            tracing::warn!(
                left_out,
                "budget cells not shared with the other replicas: too many (the largest are)"
            );
        }
        match self.kv.put(key(&self.replica), Bytes::from(body)).await {
            Ok(revision) => {
                self.engine.with_ledger(|l| l.mark_shared(revision, &own));
                Some(changes)
            }
            Err(e) => {
                // Said again at the next tick (an acknowledgement too).
                self.ack_due.store(true, Ordering::Relaxed);
                if let Some(held_back) = WRITE_FAILURES_LOG.due(self.engine.now_ms()) {
                    tracing::warn!(
                        error = %e,
                        similar_lines_held_back = held_back,
                        "budget spending not yet shared with the other replicas; trying again (one line per 10 s)"
                    );
                }
                None
            }
        }
    }

    /// The last write, once the task path has settled all it will as this replica stops
    /// cleanly: its spending as it stands, marked stopped, so the others count it out at
    /// once (its throttle part and its reservations), not [`GONE_AFTER`] later. Waits at
    /// most `within` for NATS; a replica that cannot write it is counted out then.
    pub async fn write_stopped(&self, within: Duration) {
        match tokio::time::timeout(within, self.write(true)).await {
            Ok(Some(_)) => tracing::info!("told the other replicas this one stopped"),
            Ok(None) | Err(_) => tracing::warn!(
                "could not tell the other replicas this one stopped: they count it out 30 s after its last write"
            ),
        }
    }

    /// Takes on another replica's key, written at `heard` as far as this process knows.
    fn take(&self, entry: &kv::Entry, heard: Instant) {
        let Some(replica) = entry.key.strip_prefix(KEY_PREFIX) else {
            return;
        };
        if replica == self.replica || !matches!(entry.operation, kv::Operation::Put) {
            return;
        }
        let Some(shared) =
            // A key under `ledger.` that names anything but a replica's id was not written
            // by a commander: it would count as a replica, and divide every throttle and
            // budget part.
            decode(&entry.value)
                .filter(|s| crate::store::is_replica_id(replica) && s.replica == replica)
        else {
            tracing::warn!(key = %entry.key, "another replica's budget cells unreadable, or not a replica's; passed over");
            return;
        };
        let merged = {
            let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
            if others
                .get(replica)
                .is_some_and(|o| o.revision >= entry.revision)
            {
                return;
            }
            if others.len() >= MAX_REPLICAS && !others.contains_key(replica) {
                tracing::warn!(
                    replica,
                    "too many replicas' budget cells; this one's passed over"
                );
                return;
            }
            if shared.stopped && others.get(replica).is_none_or(|o| o.alive) {
                tracing::info!(
                    replica,
                    "another replica stopped: its reservations no longer count, its spending does"
                );
            }
            // New spending to count (or a replica new here): say so in this replica's
            // key, so that one knows what this one counts. Not for a write that only
            // acknowledges: two replicas would go on acknowledging each other.
            if others.get(replica).is_none_or(|o| {
                o.shared.cells != shared.cells || o.shared.stopped != shared.stopped
            }) {
                self.ack_due.store(true, Ordering::Relaxed);
            }
            let other = Other {
                alive: !shared.stopped && heard.elapsed() < self.timing.gone_after,
                shared,
                revision: entry.revision,
                heard,
            };
            others.insert(replica.to_string(), other);
            merged(&others, &self.replica)
        };
        self.take_on(merged);
    }

    /// Puts the others' cells, summed, in the ledger with what they have taken on of this
    /// replica's, and counts the replicas sharing the intake (the throttles and budget
    /// parts are divided among them) when that changed.
    fn take_on(&self, merged: Merged) {
        self.engine.with_ledger(|l| {
            l.set_others(merged.cells);
            l.set_acked(merged.acked);
        });
        let n = merged.alive.saturating_add(1);
        let n_gauge = i64::try_from(n).unwrap_or(i64::MAX);
        if self.replicas.get() != n_gauge {
            self.replicas.set(n_gauge);
            self.engine.set_replicas(n);
        }
    }

    /// Stops counting the reservations of replicas not heard from for [`GONE_AFTER`].
    fn forget_the_gone(&self) {
        let merged = {
            let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
            let mut changed = false;
            for (replica, o) in others.iter_mut() {
                if o.alive && o.heard.elapsed() >= self.timing.gone_after {
                    o.alive = false;
                    changed = true;
                    tracing::warn!(
                        replica = %replica,
                        silent_s = o.heard.elapsed().as_secs(),
                        "another replica has not written its budget cells: taken to be gone; its reservations no longer count, its spending does"
                    );
                }
            }
            if !changed {
                return;
            }
            merged(&others, &self.replica)
        };
        self.take_on(merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(budget: &str, value: &str, bucket: u64, spent: f64, reserved: f64) -> (CellKey, Cell) {
        (
            CellKey {
                budget: budget.into(),
                value: value.into(),
                bucket,
            },
            Cell { spent, reserved },
        )
    }

    #[test]
    fn a_replicas_cells_travel_and_the_others_are_summed() {
        let (body, left_out) = encode(
            "aaaaaaaaaaaaaaaa",
            7,
            &mut [
                cell("day", "*", 100, 0.5, 0.25),
                cell("team", "search", 100, 1.0, 0.0),
            ],
            false,
            &BTreeMap::from([("bbbbbbbbbbbbbbbb".to_string(), 4)]),
        );
        assert_eq!(left_out, 0);
        let a = decode(&body).unwrap();
        assert_eq!(a.replica, "aaaaaaaaaaaaaaaa");
        assert_eq!(a.seen["bbbbbbbbbbbbbbbb"], 4, "what it took on of b");
        assert_eq!(a.cells[0].0, "team", "the largest first");
        let b = Shared {
            replica: "bbbbbbbbbbbbbbbb".into(),
            at_ms: 9,
            cells: vec![("day".into(), "*".into(), 100, 2.0, 0.0)],
            ..Default::default()
        };
        let m = merge([(&a, true), (&b, true)]);
        assert_eq!(
            m["day"]["*"][&100],
            Cell {
                spent: 2.5,
                reserved: 0.25
            }
        );
        assert_eq!(m["team"]["search"][&100].spent, 1.0);
        let gone = merge([(&a, false)]);
        assert_eq!(
            gone["day"]["*"][&100],
            Cell {
                spent: 0.5,
                reserved: 0.0
            },
            "a replica that is gone: its spending counts, its reservations do not"
        );
    }

    #[test]
    fn what_another_replica_wrote_is_read_with_care() {
        assert_eq!(decode(b"not json"), None);
        assert_eq!(
            decode(br#"{"replica":"x","at_ms":1}"#),
            None,
            "cells missing"
        );
        let s = decode(
            br#"{"replica":"x","at_ms":1,"cells":[["b","*",1,-5.0,1e400],["b","*",2,1.5,0.5]]}"#,
        );
        // 1e400 is not a number serde_json reads: the whole key is passed over.
        assert_eq!(s, None);
        let s = decode(br#"{"replica":"x","at_ms":1,"cells":[["b","*",1,-5.0,0.5]]}"#).unwrap();
        assert_eq!(s.cells[0].3, 0.0, "nothing below zero");
        let many: Vec<_> = (0..MAX_CELLS as u64 + 10)
            .map(|i| ("b".to_string(), "*".to_string(), i, 1.0, 0.0))
            .collect();
        let body = serde_json::to_vec(&Shared {
            replica: "x".into(),
            at_ms: 1,
            cells: many,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(decode(&body).unwrap().cells.len(), MAX_CELLS);
    }

    #[test]
    fn a_replica_shares_at_most_its_bounds_the_largest_first() {
        let mut own: Vec<_> = (0..MAX_CELLS as u64 + 100)
            .map(|i| cell("b", &format!("v{i}"), 1, i as f64, 0.0))
            .collect();
        let (body, left_out) = encode("r", 1, &mut own, false, &BTreeMap::new());
        assert_eq!(left_out, 100);
        let s = decode(&body).unwrap();
        assert_eq!(s.cells.len(), MAX_CELLS);
        assert!(
            s.cells.iter().all(|c| c.3 >= 100.0),
            "the smallest left out"
        );
        // Long values: the byte bound halves what is shared until it fits.
        let long = "x".repeat(1_000);
        let mut own: Vec<_> = (0..1_000u64)
            .map(|i| cell("b", &format!("{long}{i}"), 1, 1.0, 0.0))
            .collect();
        let (body, left_out) = encode("r", 1, &mut own, false, &BTreeMap::new());
        assert!(body.len() <= MAX_BYTES, "{}", body.len());
        assert!(left_out > 0 && left_out < 1_000, "{left_out}");
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// Two replicas' policy engines (a budget of $1 a day for team search, on one manual
    /// clock) and the control bucket on a real nats-server.
    struct Two {
        _nats: fleet_testkit::NatsServer,
        _dirs: [tempfile::TempDir; 2],
        kv: kv::Store,
        clock: Arc<crate::policy::ManualClock>,
        a: Arc<PolicyEngine>,
        b: Arc<PolicyEngine>,
        /// Today's cell of the budget for team search.
        cell: CellKey,
    }

    impl Two {
        async fn start() -> Self {
            use crate::policy::tests::{BEFORE_MIDNIGHT, BUDGET, engine, parse};
            let nats = fleet_testkit::NatsServer::start().expect("nats-server");
            let kv = crate::broker::control_bucket_for_tests(nats.url()).await;
            let clock = crate::policy::ManualClock::at(BEFORE_MIDNIGHT);
            let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
            let open = |i: usize| {
                let store = crate::store::Store::open(dirs[i].path()).unwrap();
                engine(
                    clock.clone(),
                    &store,
                    parse(&[("a.policy.toml", BUDGET)]).unwrap(),
                )
            };
            let (a, b) = (open(0), open(1));
            let cell = CellKey {
                budget: "team-daily".into(),
                value: "search".into(),
                bucket: crate::policy::window::Window::Day.bucket(BEFORE_MIDNIGHT),
            };
            Self {
                _nats: nats,
                _dirs: dirs,
                kv,
                clock,
                a,
                b,
                cell,
            }
        }

        /// What `e` counts committed in the cell now, every replica's together.
        fn committed(&self, e: &PolicyEngine) -> f64 {
            let now = e.now_ms();
            e.with_ledger(|l| {
                l.committed(
                    "team-daily",
                    "search",
                    crate::policy::window::Window::Day,
                    now,
                )
            })
        }

        fn reserve(&self, e: &PolicyEngine, est: f64) {
            e.with_ledger(|l| l.reserve(std::slice::from_ref(&self.cell), est));
        }

        /// A task reserved at `est` finished for `actual`.
        fn settle(&self, e: &PolicyEngine, est: f64, actual: f64) {
            let r = crate::domain::Reservation {
                est_usd: est,
                cells: vec![self.cell.clone()],
                charged_usd: None,
            };
            e.settle(&r, actual);
        }
    }

    /// Two replicas with a budget of $1 a day for team search: what one commits, the
    /// other counts, both ways, and a replica that starts reads the others' before it
    /// decides. Without the share each would admit up to the whole limit.
    #[tokio::test]
    async fn a_budget_holds_across_replicas() {
        let t = Two::start().await;
        let (a, b) = (&t.a, &t.b);
        // a commits 0.75 before b's share starts: b reads it before deciding anything.
        t.reserve(a, 0.75);
        let (stop_tx, stop) = watch::channel(false);
        let share_a = LedgerShare::start(t.kv.clone(), a.clone(), "aaaaaaaaaaaaaaaa")
            .await
            .unwrap();
        tokio::spawn(share_a.clone().run(stop.clone()));
        for _ in 0..500 {
            if t.kv.entry(key("aaaaaaaaaaaaaaaa")).await.unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Keys that are not a replica's: passed over, not counted as replicas.
        let junk = |replica: &str| {
            let shared = Shared {
                replica: replica.into(),
                at_ms: 1,
                cells: vec![(
                    "team-daily".into(),
                    "search".into(),
                    t.cell.bucket,
                    5.0,
                    0.0,
                )],
                ..Default::default()
            };
            Bytes::from(serde_json::to_vec(&shared).unwrap())
        };
        t.kv.put("ledger.junk", junk("junk")).await.unwrap();
        t.kv.put(key("cccccccccccccccc"), junk("dddddddddddddddd"))
            .await
            .unwrap();
        let share_b = LedgerShare::start(t.kv.clone(), b.clone(), "bbbbbbbbbbbbbbbb")
            .await
            .unwrap();
        assert_eq!(t.committed(b), 0.75, "b counts a's spending from its start");
        assert_eq!(b.replicas(), 2, "a and b, not the keys of no replica");
        let standing = &b.standing()[0];
        assert_eq!(
            (standing.reserved_usd, standing.other_replicas_usd),
            (0.75, 0.75)
        );
        tokio::spawn(share_b.clone().run(stop.clone()));

        // b commits 0.2: a counts both; a task of 0.1 is over the limit on either.
        t.reserve(b, 0.2);
        until("a counts b's reservation", || {
            (t.committed(a) - 0.95).abs() < 1e-9
        })
        .await;
        // a says it took that on, in its own key: the revision of b's key it counts.
        for _ in 0..500 {
            let b_key = t.kv.entry(key("bbbbbbbbbbbbbbbb")).await.unwrap().unwrap();
            let a_key = t.kv.get(key("aaaaaaaaaaaaaaaa")).await.unwrap().unwrap();
            if decode(&a_key).unwrap().seen.get("bbbbbbbbbbbbbbbb") == Some(&b_key.revision) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let b_key = t.kv.entry(key("bbbbbbbbbbbbbbbb")).await.unwrap().unwrap();
        let a_key = t.kv.get(key("aaaaaaaaaaaaaaaa")).await.unwrap().unwrap();
        assert_eq!(
            decode(&a_key).unwrap().seen.get("bbbbbbbbbbbbbbbb"),
            Some(&b_key.revision),
            "a acknowledges b's last share"
        );
        // a's task finished for 0.05 less than its estimate: b counts the charge.
        t.settle(a, 0.75, 0.7);
        until("b counts a's charge", || {
            (t.committed(b) - 0.9).abs() < 1e-9
        })
        .await;
        assert_eq!(t.committed(a), t.committed(b));
        // A window later the day's cells no longer count anywhere.
        t.clock.advance(Duration::from_secs(120));
        assert_eq!(t.committed(b), 0.0);
        let _ = stop_tx.send(true);
    }

    /// A replica killed for good would hold its tasks' estimates until the window ends:
    /// once its key has gone unwritten long enough, its reservations stop counting
    /// elsewhere and its spending still counts. One that is alive writes its key unchanged
    /// often enough to stay counted.
    #[tokio::test]
    async fn a_replica_not_heard_from_stops_holding_its_reservations() {
        let t = Two::start().await;
        let (a, b, kv) = (&t.a, &t.b, &t.kv);
        // a: 0.25 spent, 0.5 reserved for a task in flight.
        t.reserve(a, 0.5);
        t.reserve(a, 0.25);
        t.settle(a, 0.25, 0.25);
        let timing = Timing {
            alive_every: Duration::from_millis(200),
            gone_after: Duration::from_secs(1),
        };
        let (stop_a_tx, stop_a) = watch::channel(false);
        let share_a = LedgerShare::start_timed(kv.clone(), a.clone(), "aaaaaaaaaaaaaaaa", timing)
            .await
            .unwrap();
        tokio::spawn(share_a.clone().run(stop_a));
        let (stop_b_tx, stop_b) = watch::channel(false);
        let share_b = LedgerShare::start_timed(kv.clone(), b.clone(), "bbbbbbbbbbbbbbbb", timing)
            .await
            .unwrap();
        tokio::spawn(share_b.clone().run(stop_b));
        let committed = || t.committed(b);
        until("b counts a's spending and reservation", || {
            (committed() - 0.75).abs() < 1e-9
        })
        .await;
        // Twice the time a silent replica is given: a writes unchanged and stays counted.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!((committed() - 0.75).abs() < 1e-9, "{}", committed());
        // a stops for good.
        let _ = stop_a_tx.send(true);
        until(
            "a's reservation no longer counts; its spending does",
            || (committed() - 0.25).abs() < 1e-9,
        )
        .await;
        let _ = stop_b_tx.send(true);
    }

    /// A replica that stops cleanly says so with its last write: the others count it out
    /// at once (one replica fewer dividing the throttles and budget parts; its
    /// reservations no longer count, its spending does), not 30 s later. When it starts
    /// again it counts again.
    #[tokio::test]
    async fn a_replica_that_stops_cleanly_is_counted_out_at_once() {
        let t = Two::start().await;
        let (a, b, kv) = (&t.a, &t.b, &t.kv);
        t.reserve(a, 0.5);
        t.reserve(a, 0.25);
        t.settle(a, 0.25, 0.25);
        let run = |engine: &Arc<PolicyEngine>, replica: &'static str| {
            let (kv, engine) = (kv.clone(), engine.clone());
            async move {
                let share = LedgerShare::start(kv, engine, replica).await.unwrap();
                let (stop_tx, stop) = watch::channel(false);
                let task = tokio::spawn(share.clone().run(stop));
                (share, stop_tx, task)
            }
        };
        let (share_a, stop_a, task_a) = run(a, "aaaaaaaaaaaaaaaa").await;
        let (_share_b, stop_b, _task_b) = run(b, "bbbbbbbbbbbbbbbb").await;
        until("b counts a, its spending and its reservation", || {
            b.replicas() == 2 && (t.committed(b) - 0.75).abs() < 1e-9
        })
        .await;

        let _ = stop_a.send(true);
        task_a.await.unwrap();
        share_a.write_stopped(Duration::from_secs(2)).await;
        let stopped = decode(&kv.get(key("aaaaaaaaaaaaaaaa")).await.unwrap().unwrap()).unwrap();
        assert!(stopped.stopped, "{stopped:?}");
        // Well within the 30 s a silent replica is given.
        until("b counts a out: one replica, a's spending alone", || {
            b.replicas() == 1 && (t.committed(b) - 0.25).abs() < 1e-9
        })
        .await;

        let (_share_a, _stop_a, _task_a) = run(a, "aaaaaaaaaaaaaaaa").await;
        until("a counts again once it writes", || {
            b.replicas() == 2 && (t.committed(b) - 0.75).abs() < 1e-9
        })
        .await;
        let _ = stop_b.send(true);
    }
}

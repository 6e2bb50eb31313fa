//! Which replica speaks for the fleet. Every replica runs its own detector over the same
//! telemetry, so each raises the same alerts; one, the leader, notifies them
//! (`<prefix>.alerts.<severity>` and the sinks) and takes the ladder's one-shot steps
//! (notify, cancel or restart a task). The others keep their alerts, in force
//! interventions and routing as before, quietly. Every replica keeps the same traces too,
//! and the leader exports them (`traces`, which reads the same [`Leading`]).
//!
//! The lead is a lease on the key `leader` of the `<prefix>_control` bucket, renewed with
//! compare-and-set every [`RENEW`]. A replica that has seen the key unchanged for
//! [`EXPIRES`] takes it, with compare-and-set on the revision it saw, so one replica wins;
//! one whose renewal fails on its revision (another took the key) stops leading. One cut
//! off from NATS goes on leading until it learns that: during a partition both sides may
//! notify, which beats neither. A replica that stops cleanly hands the lease back at once.
//! The times are the machine's monotonic clock: the lease is about this process being
//! alive, not about fleet time.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

/// The key in the control bucket that holds the lease.
pub const KEY: &str = "leader";
/// How often the leader renews, and the others look.
pub const RENEW: Duration = Duration::from_secs(1);
/// How long the key may stay unchanged before another replica takes it.
pub const EXPIRES: Duration = Duration::from_secs(5);

/// What the key holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub replica: String,
}

pub use crate::domain::Leading;

/// Sets whether this replica leads, logging the change.
fn set(leading: &Leading, on: bool, replica: &str) {
    if leading.set(on) {
        if on {
            tracing::info!(
                replica,
                "this replica now leads: it notifies the fleet's alerts and exports kept traces"
            );
        } else {
            tracing::info!(
                replica,
                "this replica no longer leads (notifies alerts, exports kept traces): another does"
            );
        }
    }
}

/// One replica's side of the lease.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    replica: String,
    pub leading: Leading,
}

/// Where the lease stands between looks.
#[derive(Debug, Default)]
struct Seen {
    /// The revision this replica holds the lease at, while it leads.
    held: Option<u64>,
    /// When this replica last renewed.
    renewed: Option<Instant>,
    /// The last revision seen of another's lease, and since when it has not changed.
    other: Option<(u64, Instant)>,
}

impl Lease {
    /// `leading` is set while this replica holds the lease.
    pub fn new(kv: kv::Store, replica: &str, leading: Leading) -> Self {
        Lease {
            kv,
            replica: replica.to_string(),
            leading,
        }
    }

    /// Renews or looks every [`RENEW`] until `stop`; then hands the lease back if held.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut seen = Seen::default();
        let mut every = tokio::time::interval(RENEW);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.changed() => break,
            }
            self.step(&mut seen, Instant::now()).await;
        }
        if let Some(revision) = seen.held {
            set(&self.leading, false, &self.replica);
            // Only while still the holder: another may have taken it meanwhile.
            let handed = self
                .kv
                .delete_expect_revision(KEY, Some(revision))
                .await
                .is_ok();
            tracing::info!(handed, "alert lead handed back");
        }
    }

    fn body(&self) -> Bytes {
        // Serialising a struct of one string cannot fail.
        Bytes::from(
            serde_json::to_vec(&Holder {
                replica: self.replica.clone(),
            })
            .unwrap_or_default(),
        )
    }

    async fn step(&self, seen: &mut Seen, now: Instant) {
        if let Some(revision) = seen.held {
            match self.kv.update(KEY, self.body(), revision).await {
                Ok(r) => {
                    seen.held = Some(r);
                    seen.renewed = Some(now);
                }
                Err(e) if matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision) => {
                    seen.held = None;
                    set(&self.leading, false, &self.replica);
                }
                // NATS is away: go on leading until NATS says another replica took the
                // lead (the renewal then fails on its revision). Cut off, this replica
                // may still reach its sinks; a notice twice beats none.
                Err(e) => {
                    if seen
                        .renewed
                        .is_some_and(|r| now.duration_since(r) >= EXPIRES)
                    {
                        tracing::debug!(error = %e, "alert lead not renewed");
                    } else {
                        tracing::warn!(error = %e, "alert lead not renewed; still leading until another replica is known to lead");
                    }
                }
            }
            return;
        }
        let taken = match self.kv.entry(KEY).await {
            Ok(None) => self.kv.create(KEY, self.body()).await.ok(),
            Ok(Some(e)) => {
                let holder = matches!(e.operation, kv::Operation::Put)
                    .then(|| serde_json::from_slice::<Holder>(&e.value).ok())
                    .flatten();
                let free = match &holder {
                    // Handed back, or this replica's own from before a restart.
                    None => true,
                    Some(h) if h.replica == self.replica => true,
                    Some(_) => match seen.other {
                        Some((r, since)) if r == e.revision => now.duration_since(since) >= EXPIRES,
                        other => {
                            // A revision changed since the last look: the holder is alive
                            // (the first look says nothing: the key may be long stale).
                            if other.is_some() {
                                self.leading.heard_other(now.into_std());
                            }
                            seen.other = Some((e.revision, now));
                            false
                        }
                    },
                };
                if free {
                    self.kv.update(KEY, self.body(), e.revision).await.ok()
                } else {
                    None
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "alert lead not looked at");
                None
            }
        };
        if let Some(r) = taken {
            seen.held = Some(r);
            seen.renewed = Some(now);
            seen.other = None;
            set(&self.leading, true, &self.replica);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..200 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// One of two replicas leads, and the other hears it renew; one that stops cleanly
    /// hands the lead back and the other takes it at its next look; a restart of the holder (the same replica id) leads again
    /// at once.
    #[tokio::test]
    async fn one_replica_leads_and_hands_the_lead_back_when_it_stops() {
        let nats = fleet_testkit::NatsServer::start().expect("nats-server");
        let kv = crate::broker::control_bucket_for_tests(nats.url()).await;
        let a = Arc::new(Lease::new(kv.clone(), "a", Leading::default()));
        let b = Arc::new(Lease::new(kv.clone(), "b", Leading::default()));
        let (stop_a, rx) = watch::channel(false);
        let run_a = tokio::spawn(a.clone().run(rx));
        until("a leads", || a.leading.now()).await;
        let (stop_b, rx) = watch::channel(false);
        let run_b = tokio::spawn(b.clone().run(rx));
        tokio::time::sleep(RENEW * 3).await;
        assert!(a.leading.now() && !b.leading.now(), "one leads");
        // b saw a renew (a trace b kept before then, a exported: `traces`).
        let heard = b.leading.other_last_heard().expect("b heard a renew");
        assert!(heard.elapsed() < RENEW * 2, "{:?} ago", heard.elapsed());

        let _ = stop_a.send(true);
        run_a.await.unwrap();
        assert!(!a.leading.now());
        until("b takes the lead a handed back", || b.leading.now()).await;

        // b's holder key names b: b again (a restart) leads at its first look.
        let _ = stop_b.send(true);
        run_b.await.unwrap();
        kv.put(KEY, Lease::new(kv.clone(), "b", Leading::default()).body())
            .await
            .unwrap();
        let again = Arc::new(Lease::new(kv.clone(), "b", Leading::default()));
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(again.clone().run(rx));
        until("b leads again after a restart", || again.leading.now()).await;
        let a2 = Arc::new(Lease::new(kv.clone(), "a", Leading::default()));
        let (_stop_a2, rx) = watch::channel(false);
        tokio::spawn(a2.clone().run(rx));
        tokio::time::sleep(RENEW * 3).await;
        assert!(!a2.leading.now(), "a does not take a lead that is renewed");
        assert!(a2.leading.other_last_heard().is_some());
    }
}

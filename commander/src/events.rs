//! The live event hub behind `GET /v1/stream`: typed events (`fleet_snapshot`,
//! `agent_update`, `alert`, `decision`, `intervention`, `policy`), each with a sequence
//! id, fanned out to every subscriber over a bounded broadcast channel and kept in a
//! bounded ring so a client that reconnects with `Last-Event-ID` resumes where it was.
//!
//! Publishing never waits: a subscriber that falls a channel's length behind is told it
//! lagged and is dropped by the stream (counted), so a slow client never slows the
//! commander. With no subscriber in the last minute, publishing is skipped before any
//! serialisation (the task path pays one atomic load per decision batch).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::broadcast;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    FleetSnapshot,
    AgentUpdate,
    Alert,
    Decision,
    Intervention,
    Policy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::FleetSnapshot,
        Kind::AgentUpdate,
        Kind::Alert,
        Kind::Decision,
        Kind::Intervention,
        Kind::Policy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::FleetSnapshot => "fleet_snapshot",
            Kind::AgentUpdate => "agent_update",
            Kind::Alert => "alert",
            Kind::Decision => "decision",
            Kind::Intervention => "intervention",
            Kind::Policy => "policy",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One event as sent: `id:`, `event:` and `data:` of an SSE frame.
#[derive(Debug)]
pub struct Event {
    pub id: u64,
    pub kind: Kind,
    /// For the stream's `pool` and `worker` filters (an event about the whole fleet has
    /// neither and passes both).
    pub pool: Option<String>,
    pub worker: Option<String>,
    /// The whole SSE frame (`id: …\nevent: …\ndata: <json>\n\n`), encoded once here and
    /// shared by every subscriber: fanning out costs a reference count per client.
    pub frame: bytes::Bytes,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The stream's counters (`fleet_stream_*` on `/metrics`).
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub published: Family<KindLabel, Counter>,
    /// Clients connected now.
    pub clients: Gauge,
    /// Clients dropped because they fell behind.
    pub dropped: Counter,
    /// Events a resuming client asked for that had left the ring.
    pub resume_gaps: Counter,
    /// Clients refused because `http.max_streams` were connected.
    pub refused: Counter,
}

impl StreamCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "stream_events",
            "Events published to /v1/stream, by kind",
            self.published.clone(),
        );
        r.register(
            "stream_clients",
            "Clients connected to /v1/stream",
            self.clients.clone(),
        );
        r.register(
            "stream_clients_dropped",
            "Stream clients dropped because they fell behind",
            self.dropped.clone(),
        );
        r.register(
            "stream_resume_gaps",
            "Resumes (Last-Event-ID) older than the ring: the client missed events",
            self.resume_gaps.clone(),
        );
        r.register(
            "stream_clients_refused",
            "Clients refused because http.max_streams streams were open",
            self.refused.clone(),
        );
    }
}

/// How long after the last subscriber left events are still kept (so a reconnect
/// resumes without a gap).
const LINGER_MS: u64 = 60_000;

#[derive(Debug)]
struct Inner {
    tx: broadcast::Sender<Arc<Event>>,
    ring: Mutex<VecDeque<Arc<Event>>>,
    ring_size: usize,
    next_id: AtomicU64,
    /// Monotonic ms of the last moment a subscriber was connected.
    last_watched_ms: AtomicU64,
    started: std::time::Instant,
    counters: Arc<StreamCounters>,
    /// One permit per stream that may be open at once.
    slots: Arc<tokio::sync::Semaphore>,
    /// True once the commander is shutting down: every stream ends.
    closing: tokio::sync::watch::Sender<bool>,
}

/// Cheap to clone; every clone publishes to the same subscribers.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// Streams open at once unless the config says otherwise (`http.max_streams`): a
/// dashboard tab holds one.
pub const DEFAULT_MAX_STREAMS: usize = 1_000;

impl Default for Hub {
    fn default() -> Self {
        Hub::new(4096, 1024, DEFAULT_MAX_STREAMS)
    }
}

impl Hub {
    /// `ring_size` events kept for resumes; a subscriber more than `lag` events behind
    /// is dropped; at most `max_clients` streams at once ([`Hub::slot`]).
    pub fn new(ring_size: usize, lag: usize, max_clients: usize) -> Self {
        let (tx, _) = broadcast::channel(lag.max(16));
        Hub {
            inner: Arc::new(Inner {
                tx,
                ring: Mutex::new(VecDeque::with_capacity(ring_size.min(65_536))),
                ring_size: ring_size.max(1),
                next_id: AtomicU64::new(1),
                last_watched_ms: AtomicU64::new(0),
                started: std::time::Instant::now(),
                counters: Arc::new(StreamCounters::default()),
                slots: Arc::new(tokio::sync::Semaphore::new(max_clients)),
                closing: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    /// A place for one more stream, held for as long as it is open; `None` (counted) when
    /// every place is taken: each open stream holds a task, its buffers and a socket.
    pub fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.inner.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.inner.counters.refused.inc();
        }
        slot
    }

    /// Ends every open stream (and every one opened after): the commander is shutting
    /// down, and a stream that never ends would keep its connection, and the shutdown
    /// that waits for connections to finish, open for as long as its client stays.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Changes to true when [`Hub::close`] is called.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    pub fn counters(&self) -> Arc<StreamCounters> {
        self.inner.counters.clone()
    }

    fn mono_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether anyone is (or was, within a minute) listening: publishers skip building
    /// an event otherwise.
    pub fn watched(&self) -> bool {
        if self.inner.tx.receiver_count() > 0 {
            self.inner
                .last_watched_ms
                .store(self.mono_ms().max(1), Ordering::Relaxed);
            return true;
        }
        let last = self.inner.last_watched_ms.load(Ordering::Relaxed);
        last != 0 && self.mono_ms().saturating_sub(last) < LINGER_MS
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Event>>> {
        // A poisoned lock only means a panic elsewhere mid-push of plain data.
        self.inner.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes an event (when [`Hub::watched`]); `data` is serialised once.
    pub fn publish(
        &self,
        kind: Kind,
        pool: Option<&str>,
        worker: Option<&str>,
        data: &impl Serialize,
    ) {
        if self.watched() {
            self.publish_watched(kind, pool, worker, data);
        }
    }

    /// [`Hub::publish`] for a caller that has just checked [`Hub::watched`] (once for a
    /// batch of events).
    pub fn publish_watched(
        &self,
        kind: Kind,
        pool: Option<&str>,
        worker: Option<&str>,
        data: &impl Serialize,
    ) {
        let data = match serde_json::to_string(data) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(kind = kind.as_str(), error = %e, "stream event not serialised");
                return;
            }
        };
        let mut ring = self.ring();
        // The id is taken under the ring's lock so the ring stays in id order.
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Compact JSON has no newline, so the body is one `data:` line.
        let frame = format!("id: {id}\nevent: {}\ndata: {data}\n\n", kind.as_str());
        let ev = Arc::new(Event {
            id,
            kind,
            pool: pool.map(str::to_string),
            worker: worker.map(str::to_string),
            frame: frame.into(),
        });
        if ring.len() >= self.inner.ring_size {
            ring.pop_front();
        }
        ring.push_back(ev.clone());
        // No receiver is not an error: the event stays in the ring for a resume.
        let _ = self.inner.tx.send(ev);
        drop(ring);
        self.inner
            .counters
            .published
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// A new subscriber, and the events after `last_id` still in the ring (a resume).
    /// `gap` is true when some events after `last_id` had already left the ring.
    pub fn subscribe(&self, last_id: Option<u64>) -> Subscription {
        let ring = self.ring();
        // Subscribing under the ring's lock: no event is both replayed and received.
        let rx = self.inner.tx.subscribe();
        let mut replay = Vec::new();
        let mut gap = false;
        if let Some(last) = last_id {
            let oldest = ring.front().map_or(u64::MAX, |e| e.id);
            let newest = ring.back().map_or(0, |e| e.id);
            // Ids are taken under this lock, so this is every id this hub has handed out.
            // A later one is another run's (the commander restarted, or another replica
            // answered the reconnect): what followed it is unknowable here.
            let unissued = last >= self.inner.next_id.load(Ordering::Relaxed);
            gap = unissued || (last < newest && last.saturating_add(1) < oldest);
            replay = ring.iter().filter(|e| e.id > last).cloned().collect();
        }
        drop(ring);
        self.inner
            .last_watched_ms
            .store(self.mono_ms().max(1), Ordering::Relaxed);
        if gap {
            self.inner.counters.resume_gaps.inc();
        }
        Subscription { rx, replay, gap }
    }
}

/// What [`Hub::subscribe`] hands a stream.
#[derive(Debug)]
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<Event>>,
    pub replay: Vec<Arc<Event>>,
    pub gap: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_built_while_nobody_listens() {
        let hub = Hub::new(8, 16, 4);
        hub.publish(Kind::Decision, None, None, &"x");
        assert!(hub.ring().is_empty());
        let _s = hub.subscribe(None);
        hub.publish(Kind::Decision, None, None, &"y");
        assert_eq!(hub.ring().len(), 1);
        let e = hub.ring()[0].clone();
        assert_eq!(&e.frame[..], b"id: 1\nevent: decision\ndata: \"y\"\n\n");
    }

    #[test]
    fn a_resume_replays_what_followed_and_says_when_the_ring_lost_some() {
        let hub = Hub::new(4, 16, 4);
        let _keep = hub.subscribe(None);
        for i in 0..10 {
            hub.publish(Kind::Alert, Some("p"), None, &i);
        }
        // Ring holds 7..=10.
        let s = hub.subscribe(Some(8));
        assert_eq!(
            s.replay.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![9, 10]
        );
        assert!(!s.gap);
        let s = hub.subscribe(Some(2));
        assert!(s.gap, "events 3..6 left the ring");
        assert_eq!(s.replay.len(), 4);
        assert_eq!(hub.counters().resume_gaps.get(), 1);
        let s = hub.subscribe(Some(10));
        assert!(s.replay.is_empty() && !s.gap);
        // An id this hub never handed out is another run's: the client missed what
        // followed it, and is told so.
        let s = hub.subscribe(Some(11));
        assert!(s.replay.is_empty() && s.gap, "another run's id");
        assert_eq!(hub.counters().resume_gaps.get(), 2);
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_and_publishing_never_waits() {
        let hub = Hub::new(4, 16, 4);
        let mut s = hub.subscribe(None);
        for i in 0..1000 {
            hub.publish(Kind::Decision, None, None, &i);
        }
        assert!(matches!(
            s.rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}

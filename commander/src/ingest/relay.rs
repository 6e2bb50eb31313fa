//! OTLP exports received over gRPC or HTTP, passed on to the other commander replicas over
//! NATS, so that every replica's live state, detector and trace keeper see the whole
//! fleet, as they already do for telemetry sent over NATS (docs/protocol.md §3, "Several
//! commander replicas").
//!
//! Only while another replica runs (`broker::OtherReplicas`, looked at every
//! [`OTHERS_LOOK_EVERY`](crate::broker::OTHERS_LOOK_EVERY), and within moments of a replica's start or clean stop, which
//! the budget ledger hears of): a lone commander pays one atomic load per export. An export goes on
//! once the live state here took it (one refused is sent again by its client), as its
//! protobuf body with its `Fleet-Kind`, on `<prefix>.telemetry._relay.<replica>`, through
//! the telemetry connection, which does not hear its own messages; replicas do not pass on
//! what they read from NATS, so nothing goes round. The queue to the publishing task is
//! bounded: past it an export is not passed on, and counted, rather than slow a receiver.

use std::sync::Arc;

use bytes::Bytes;
use fleet_worker::protocol::{Subjects, headers};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, watch};

use crate::broker::{OTHERS_RELOOK_EVERY, OtherReplicas};

/// Subject token of relayed exports (`<prefix>.telemetry._relay.<replica>`).
pub const RELAY_TOKEN: &str = "_relay";
/// Exports waiting to be published.
const QUEUE: usize = 1_024;
/// Room kept for the headers under the server's `max_payload`.
const HEADER_ROOM: usize = 1_024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    pub signal: &'static str,
    /// `relayed`, `shed` (the queue was full), `too_large` (over the server's
    /// `max_payload`) or `failed` (the publish failed).
    pub outcome: &'static str,
}

/// One export to pass on.
#[derive(Debug)]
struct Export {
    kind: &'static str,
    signal: &'static str,
    body: Bytes,
}

/// The receivers' side: hands exports to the publishing task.
#[derive(Clone, Debug)]
pub struct Relay {
    tx: mpsc::Sender<Export>,
    others: Arc<OtherReplicas>,
    max_body: usize,
    pub counts: Family<RelayLabels, Counter>,
}

impl Relay {
    /// Whether exports are passed on now (another replica runs).
    pub fn wanted(&self) -> bool {
        self.others.last_known()
    }

    /// Passes on one export the live state took (`kind` its `Fleet-Kind`); never waits.
    pub fn pass(&self, kind: &'static str, signal: &'static str, body: Bytes) {
        let outcome = if body.len() > self.max_body {
            "too_large"
        } else {
            match self.tx.try_send(Export { kind, signal, body }) {
                // Counted once published.
                Ok(()) => return,
                Err(_) => "shed",
            }
        };
        self.count(signal, outcome);
    }

    fn count(&self, signal: &'static str, outcome: &'static str) {
        self.counts
            .get_or_create(&RelayLabels { signal, outcome })
            .inc();
    }

    /// The relay and its two tasks (publishing; looking for other replicas), until `stop`.
    /// `client` is the telemetry connection (no echo).
    pub fn start(
        client: async_nats::Client,
        others: Arc<OtherReplicas>,
        subjects: &Subjects,
        replica: &str,
        stop: watch::Receiver<bool>,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let max_payload = client.server_info().max_payload;
        let relay = Relay {
            tx,
            others: others.clone(),
            max_body: max_payload.saturating_sub(HEADER_ROOM),
            counts: Family::default(),
        };
        let subject = format!("{}.telemetry.{RELAY_TOKEN}.{replica}", subjects.prefix());
        let publish = tokio::spawn(publish(relay.clone(), client, subject, rx, stop.clone()));
        let look = tokio::spawn(look_for_others(others, stop));
        (relay, vec![publish, look])
    }
}

async fn publish(
    relay: Relay,
    client: async_nats::Client,
    subject: String,
    mut rx: mpsc::Receiver<Export>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let e = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = stop.changed() => return,
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::KIND, e.kind);
        let outcome = match client
            .publish_with_headers(subject.clone(), h, e.body)
            .await
        {
            Ok(()) => "relayed",
            Err(err) => {
                tracing::debug!(error = %err, "telemetry not passed on to the other replicas");
                "failed"
            }
        };
        relay.count(e.signal, outcome);
    }
}

/// Keeps the looks fresh ([`OtherReplicas::count`]: every [`OTHERS_LOOK_EVERY`](crate::broker::OTHERS_LOOK_EVERY), or
/// every [`OTHERS_RELOOK_EVERY`] while the budget ledger counts other replicas than the
/// last look found), so exports go on within moments of a second replica's start (the
/// record lookups and listings share these looks).
async fn look_for_others(others: Arc<OtherReplicas>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(OTHERS_RELOOK_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let before = others.last_known();
        let run = others.count().await > 0;
        if before != run {
            tracing::info!(
                relay = run,
                "OTLP telemetry {} passed on to the other replicas",
                if run { "is" } else { "is no longer" }
            );
        }
    }
}

//! Telemetry over NATS: `<prefix>.telemetry.<pool>.<worker>`, with `Fleet-Kind` saying
//! what the payload is (a JSON heartbeat, or a protobuf OTLP export).
//!
//! A core subscription: telemetry may be lost under overload, and that is the point (it
//! is shed before anything on the task path). async-nats drops messages silently when the
//! subscription buffer is full, so the buffer is sized here and slow-consumer events are
//! counted by the connection's event callback (see `broker.rs`).

use async_nats::Subject;
use bytes::Bytes;
use fleet_worker::message::Heartbeat;
use fleet_worker::protocol::{Subjects, header, headers, kinds};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use tokio::sync::watch;

use super::limits::{self, Signal};
use super::{IngestError, Ingestor};

/// Subject token of the commander's own spans: they describe the commander, not a worker.
pub const COMMANDER_TOKEN: &str = "_commander";

/// Reads telemetry until `stop` turns true.
pub async fn run(
    client: async_nats::Client,
    subjects: Subjects,
    ingestor: Ingestor,
    mut stop: watch::Receiver<bool>,
) {
    let subject = subjects.telemetry_all();
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot subscribe to telemetry; NATS telemetry is off");
            return;
        }
    };
    tracing::info!(subject, "reading telemetry from NATS");
    let own = format!("{}.telemetry.{COMMANDER_TOKEN}.", subjects.prefix());
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => break },
            _ = stop.changed() => break,
        };
        let kind = header(msg.headers.as_ref(), headers::KIND).unwrap_or("");
        if msg.subject.starts_with(own.as_str()) {
            // Another replica's own spans (this connection never hears its own: no echo).
            if kind == kinds::OTLP_TRACES
                && let Err(e) = ingestor.commander_spans(msg.payload)
            {
                tracing::debug!(subject = %msg.subject, error = %e, "commander spans refused");
            }
            continue;
        }
        if let Err(e) = handle(&ingestor, kind, &msg.subject, msg.payload) {
            match e {
                IngestError::Overloaded(_) | IngestError::Stopped => {}
                other => refused(&msg.subject, kind, &other),
            }
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Says why telemetry was refused where its sender's developer looks: core NATS has no
/// answer to give a worker whose heartbeat does not parse, so the log is the only place
/// the reason can reach them. One warning every 10 s at most, so a flood of bad messages
/// cannot flood the log; the rest at debug.
static REFUSED_LOG: crate::domain::LogEvery =
    crate::domain::LogEvery::new(std::time::Duration::from_secs(10));

fn refused(subject: &Subject, kind: &str, error: &IngestError) {
    use crate::domain::Clock;
    // The header came from outside: shown clipped.
    let kind: String = kind.chars().take(64).collect();
    match REFUSED_LOG.due(crate::domain::SystemClock.now_ms()) {
        Some(held_back) => tracing::warn!(
            %subject,
            kind,
            %error,
            similar_lines_held_back = held_back,
            "telemetry message refused (one line per 10 s; every one is counted)"
        ),
        None => tracing::debug!(%subject, kind, %error, "telemetry message refused"),
    }
}

/// Handles one message; counted in every outcome.
pub fn handle(
    ingestor: &Ingestor,
    kind: &str,
    subject: &Subject,
    payload: Bytes,
) -> Result<(), IngestError> {
    let m = &ingestor.metrics;
    match kind {
        kinds::HEARTBEAT => match serde_json::from_slice::<Heartbeat>(&payload) {
            Ok(hb) => ingestor.heartbeat("nats", hb),
            Err(e) => {
                m.telemetry("nats", "heartbeats", "received", 1);
                m.telemetry("nats", "heartbeats", "rejected", 1);
                Err(IngestError::Decode(format!(
                    "heartbeat JSON on {subject}: {e}"
                )))
            }
        },
        // Read by `Ingestor::traces` itself, which counts what it refuses.
        kinds::OTLP_TRACES => {
            match limits::check_protobuf(Signal::Traces, &payload, ingestor.limits) {
                Ok(_) => ingestor.traces("nats", payload).map(|_| ()),
                Err(e) => {
                    m.telemetry("nats", "traces", "rejected", 1);
                    Err(e.into())
                }
            }
        }
        kinds::OTLP_METRICS => match super::otlp::checked_decode::<ExportMetricsServiceRequest>(
            Signal::Metrics,
            &payload,
            ingestor.limits,
        ) {
            Ok(req) => ingestor.metrics("nats", req).map(|_| ()),
            Err(e) => {
                m.telemetry("nats", "metrics", "rejected", 1);
                Err(e)
            }
        },
        kinds::OTLP_LOGS => match super::otlp::checked_decode::<ExportLogsServiceRequest>(
            Signal::Logs,
            &payload,
            ingestor.limits,
        ) {
            Ok(req) => ingestor.logs("nats", &req).map(|_| ()),
            Err(e) => {
                m.telemetry("nats", "logs", "rejected", 1);
                Err(e)
            }
        },
        other => {
            m.telemetry("nats", "unknown", "rejected", 1);
            // The header came from outside: shown clipped.
            let other: String = other.chars().take(64).collect();
            Err(IngestError::Decode(format!(
                "unknown {} {other:?} (expected heartbeat, otlp-traces, otlp-metrics or otlp-logs)",
                headers::KIND
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fleet::FleetHandle;
    use crate::ingest::Metrics;
    use crate::ingest::limits::DecodeLimits;

    fn ingestor(fleet: FleetHandle) -> Ingestor {
        Ingestor {
            fleet,
            metrics: Arc::new(Metrics::default()),
            limits: DecodeLimits::default(),
            supervisor: Default::default(),
            traces: None,
            relay: None,
        }
    }

    /// A worker in another language learns why its heartbeat was dropped: the error the
    /// log line carries names the field, and nothing reaches the live state.
    #[test]
    fn a_heartbeat_is_refused_saying_why_and_a_minimal_one_is_taken() {
        let (fleet, mut rx) = FleetHandle::detached(16);
        let counters = fleet.counters.clone();
        let ing = ingestor(fleet);
        let subject = Subject::from("fleet.telemetry.code.py-1");
        let send = |body: &str| {
            handle(
                &ing,
                kinds::HEARTBEAT,
                &subject,
                Bytes::from(body.to_string()),
            )
        };
        let base = r#""schema": 1, "worker_id": "py-1", "pool": "code""#;
        for (body, says) in [
            (format!("{{{base}}}"), "missing field `state`"),
            (
                format!(r#"{{{base}, "state": "busy"}}"#),
                "unknown variant `busy`",
            ),
            (
                format!(r#"{{{base}, "state": "idle", "max_in_flight": 20000}}"#),
                "heartbeat dropped: max_in_flight 20000 is over 10000",
            ),
            (
                format!(r#"{{{base}, "state": "idle", "context_tokens": 2000000000}}"#),
                "context_tokens 2000000000 is over 1000000000",
            ),
            (
                r#"{"schema": 1, "worker_id": "py 1", "pool": "code", "state": "idle"}"#.into(),
                r#"worker_id "py 1" is not a subject token"#,
            ),
        ] {
            let e = send(&body).unwrap_err().to_string();
            assert!(e.contains(says), "{body}: {e}");
        }
        assert_eq!(counters.heartbeats_invalid.get(), 3);
        assert!(rx.0.try_recv().is_err(), "nothing reached the live state");
        send(&format!(r#"{{{base}, "state": "idle"}}"#)).unwrap();
        assert!(rx.0.try_recv().is_ok());
    }
}

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
                other => {
                    tracing::debug!(subject = %msg.subject, kind, error = %other, "telemetry message refused")
                }
            }
        }
    }
    let _ = sub.unsubscribe().await;
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
            Err(IngestError::Decode(format!(
                "unknown {} {other:?} (expected heartbeat, otlp-traces, otlp-metrics or otlp-logs)",
                headers::KIND
            )))
        }
    }
}

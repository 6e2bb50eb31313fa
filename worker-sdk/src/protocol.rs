//! The wire contract: subjects, JetStream streams and consumers, header names.
//!
//! Everything a process needs to agree on to join the fleet lives here, so the commander,
//! the Rust SDK and docs/protocol.md describe one thing. Stream and consumer settings are
//! deliberately limited to what nats-server 2.9.10 (Debian's) understands: single-filter
//! consumers, no per-message TTL, no consumer metadata.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::{consumer, stream};

/// Version of every JSON message defined in [`crate::message`].
pub const SCHEMA_VERSION: u32 = 1;

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "fleet";

/// Header names. NATS header lookup is case-sensitive, so readers use [`header`].
pub mod headers {
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    pub const BAGGAGE: &str = "baggage";
    /// JetStream de-duplication key (within the stream's duplicate window).
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    pub const TASK_ID: &str = "Fleet-Task-Id";
    /// Dispatch attempt, starting at 1. (task id, attempt) names one execution.
    pub const ATTEMPT: &str = "Fleet-Attempt";
    pub const MODEL: &str = "Fleet-Model";
    /// The routing decision that sent this task (look it up at `/v1/decisions/{task}`).
    pub const DECISION_ID: &str = "Fleet-Decision-Id";
    /// RFC 3339 instant after which the task is no longer worth doing.
    pub const DEADLINE: &str = "Fleet-Deadline";
    /// Where the producer wants its result (a core NATS subject), besides
    /// `<prefix>.results.<task_id>`. A header, so that a task whose body does not parse
    /// can still be answered.
    pub const REPLY_TO: &str = "Fleet-Reply-To";
    /// On work: the commander replica that dispatched the task. A worker copies it onto
    /// the task's result, so that the replica that keeps the task's record knows the result
    /// for its own when several replicas share the intake stream.
    pub const REPLICA: &str = "Fleet-Replica";
    /// On telemetry subjects: what the payload is (`heartbeat`, `otlp-traces`,
    /// `otlp-metrics` or `otlp-logs`).
    pub const KIND: &str = "Fleet-Kind";
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// On a task the commander republishes to intake out of its deferred queue:
    /// `<first deferral, unix ms>:<releases so far>`. Producers never set it.
    pub const RELEASE: &str = "Fleet-Release";
}

/// Values of the [`headers::KIND`] header.
pub mod kinds {
    pub const HEARTBEAT: &str = "heartbeat";
    /// An OTLP `ExportTraceServiceRequest`, protobuf-encoded.
    pub const OTLP_TRACES: &str = "otlp-traces";
    /// An OTLP `ExportMetricsServiceRequest`, protobuf-encoded.
    pub const OTLP_METRICS: &str = "otlp-metrics";
    /// An OTLP `ExportLogsServiceRequest`, protobuf-encoded.
    pub const OTLP_LOGS: &str = "otlp-logs";
}

/// The most tasks one worker may run at once, as its config and its heartbeat say
/// (section 5.3 of docs/protocol.md): a heartbeat over it is dropped by the commander.
pub const MAX_IN_FLIGHT: u32 = 10_000;

/// Stream names (a function of the prefix, so two fleets can share one server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

impl Subjects {
    /// A prefix is one or more subject tokens; it must not contain wildcards.
    pub fn new(prefix: &str) -> Result<Self, ProtocolError> {
        if prefix.is_empty() || !prefix.split('.').all(is_subject_token) {
            return Err(ProtocolError::BadPrefix(prefix.to_string()));
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Stream-name stem: `fleet` -> `FLEET`, `a.b` -> `A_B`.
    fn stem(&self) -> String {
        self.prefix.replace(['.', '-'], "_").to_uppercase()
    }

    pub fn submit(&self) -> String {
        format!("{}.tasks.submit", self.prefix)
    }
    pub fn work(&self, pool: &str) -> String {
        format!("{}.work.{pool}", self.prefix)
    }
    pub fn work_targeted(&self, pool: &str, worker: &str) -> String {
        format!("{}.work.{pool}.{worker}", self.prefix)
    }
    pub fn work_all(&self) -> String {
        format!("{}.work.>", self.prefix)
    }
    pub fn result(&self, task_id: &str) -> String {
        format!("{}.results.{task_id}", self.prefix)
    }
    pub fn results_all(&self) -> String {
        format!("{}.results.>", self.prefix)
    }
    pub fn telemetry(&self, pool: &str, worker: &str) -> String {
        format!("{}.telemetry.{pool}.{worker}", self.prefix)
    }
    pub fn telemetry_all(&self) -> String {
        format!("{}.telemetry.>", self.prefix)
    }
    pub fn control(&self, worker: &str) -> String {
        format!("{}.control.{worker}", self.prefix)
    }
    pub fn decisions(&self, pool: &str) -> String {
        format!("{}.decisions.{pool}", self.prefix)
    }
    pub fn alerts(&self, severity: &str) -> String {
        format!("{}.alerts.{severity}", self.prefix)
    }
    /// Status notices about one task that are not its result (`deferred until …`).
    pub fn status(&self, task_id: &str) -> String {
        format!("{}.status.{task_id}", self.prefix)
    }
    /// Policy pushes (request/reply).
    pub fn policy_push(&self) -> String {
        format!("{}.policy.push", self.prefix)
    }
    /// One commander replica asking the others for a task's record (request/reply; the
    /// replica that keeps it answers).
    pub fn record_lookup(&self, task_id: &str) -> String {
        format!("{}.records.{task_id}", self.prefix)
    }
    /// An operator's cancel of a task, sent on to the replica that keeps its record
    /// (request/reply).
    pub fn record_cancel(&self, task_id: &str) -> String {
        format!("{}.records.{task_id}.cancel", self.prefix)
    }
    /// One commander replica asking the others for a task's routing decision (scatter/gather:
    /// each replica that logged one answers with its latest).
    pub fn decision_lookup(&self, task_id: &str) -> String {
        format!("{}.records.{task_id}.decision", self.prefix)
    }
    /// Every record lookup, decision lookup and forwarded cancel.
    pub fn record_requests(&self) -> String {
        format!("{}.records.>", self.prefix)
    }
    /// A replica's request for the other replicas' pages of waiting (deferred or parked)
    /// tasks; each that runs answers with its own (scatter/gather).
    pub fn waiting_listings(&self) -> String {
        format!("{}.listings.waiting", self.prefix)
    }
    /// A replica's request for the other replicas' pages of finished tasks; each that runs
    /// answers with its own (scatter/gather).
    pub fn finished_listings(&self) -> String {
        format!("{}.listings.finished", self.prefix)
    }

    pub fn intake_stream(&self) -> String {
        format!("{}_INTAKE", self.stem())
    }
    pub fn work_stream(&self) -> String {
        format!("{}_WORK", self.stem())
    }
    pub fn results_stream(&self) -> String {
        format!("{}_RESULTS", self.stem())
    }

    /// Task intake: work-queue retention, so a task leaves the stream only when a commander
    /// has dispatched (or durably rejected) it and acked.
    pub fn intake_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.intake_stream(),
            description: Some("fleet commander: submitted tasks awaiting dispatch".into()),
            subjects: vec![self.submit()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: DEDUP_WINDOW,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Pool work: work-queue retention; one durable pull consumer per pool subject, plus one
    /// per worker for targeted dispatch. Their filters never overlap, as work-queue streams
    /// require.
    pub fn work_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.work_stream(),
            description: Some("fleet commander: dispatched tasks awaiting a worker".into()),
            subjects: vec![self.work_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: DEDUP_WINDOW,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Results: limits retention with an age bound, so a producer can fetch its result
    /// after the fact (direct get, last message for `<prefix>.results.<task_id>`).
    pub fn results_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.results_stream(),
            description: Some("fleet commander: task results".into()),
            subjects: vec![self.results_all()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: RESULTS_MAX_AGE,
            duplicate_window: DEDUP_WINDOW,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The durable pull consumer a pool's workers share. The commander and the SDK both
    /// create it with this exact config, idempotently.
    pub fn pool_consumer_config(&self, pool: &str, ack_wait: Duration) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(pool_consumer_name(pool)),
            description: Some(format!("workers of pool {pool}")),
            filter_subject: self.work(pool),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: MAX_DELIVER,
            max_ack_pending: 10_000,
            ..Default::default()
        }
    }

    /// A worker's own consumer, for tasks dispatched to it by name. It is removed by the
    /// server after the worker has been gone for a while.
    pub fn targeted_consumer_config(
        &self,
        pool: &str,
        worker: &str,
        ack_wait: Duration,
    ) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(targeted_consumer_name(pool, worker)),
            description: Some(format!("tasks targeted at worker {worker} of pool {pool}")),
            filter_subject: self.work_targeted(pool, worker),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: MAX_DELIVER,
            inactive_threshold: Duration::from_secs(3600),
            ..Default::default()
        }
    }
}

/// Window in which a repeated `Nats-Msg-Id` is dropped by JetStream.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(20 * 60);
/// How long results stay fetchable.
pub const RESULTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A poison task stops being redelivered after this many deliveries.
pub const MAX_DELIVER: i64 = 10;
/// Default time a worker has to ack (or send progress) before redelivery.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Name of the durable consumer shared by a pool's workers.
pub fn pool_consumer_name(pool: &str) -> String {
    format!("pool-{pool}")
}

/// Name of the durable consumer of the tasks targeted at one worker of a pool.
pub fn targeted_consumer_name(pool: &str, worker: &str) -> String {
    format!("worker-{pool}-{worker}")
}

/// Ids that become subject tokens (task ids, pool names, worker ids): letters, digits,
/// `-` and `_`, 1 to 128 characters. No dots or wildcards, so they cannot change the
/// meaning of a subject.
pub fn is_subject_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// A publishable subject (for reply-to): dot-separated tokens of printable ASCII, no
/// wildcards, no whitespace.
pub fn is_publish_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|c| c.is_ascii_graphic() && c != b'*' && c != b'>')
        })
}

/// The reply subjects the commander publishes results to by default: NATS inboxes.
pub const DEFAULT_REPLY_PREFIXES: &[&str] = &["_INBOX."];

/// Why the commander will not publish a result to `subject` given as `Fleet-Reply-To`, or
/// `None` when it may. A reply subject must be publishable, start with one of `allowed`
/// (by default `_INBOX.`), and never be a system subject (`$JS.…`, `$SYS.…`, `$KV.…`, any
/// `$…`) or one of the fleet's own (`<fleet_prefix>.…`): a producer must not be able to
/// make the commander purge a stream, speak for a worker or submit tasks.
pub fn reply_subject_problem<S: AsRef<str>>(
    subject: &str,
    allowed: &[S],
    fleet_prefix: &str,
) -> Option<String> {
    if !is_publish_subject(subject) {
        return Some(format!(
            "reply subject {subject:?} is not a publishable NATS subject"
        ));
    }
    if subject.starts_with('$') {
        return Some(format!(
            "reply subject {subject:?} is a system subject ($JS, $SYS, $KV, ...)"
        ));
    }
    let own = subject == fleet_prefix
        || subject
            .strip_prefix(fleet_prefix)
            .is_some_and(|rest| rest.starts_with('.'));
    if own {
        return Some(format!(
            "reply subject {subject:?} is one of the fleet's own subjects ({fleet_prefix}.>)"
        ));
    }
    if !allowed.iter().any(|p| subject.starts_with(p.as_ref())) {
        let list: Vec<&str> = allowed.iter().map(AsRef::as_ref).collect();
        return Some(format!(
            "reply subject {subject:?} must start with one of: {}",
            list.join(", ")
        ));
    }
    None
}

/// Case-insensitive header lookup (W3C names are case-insensitive; async-nats is not).
/// A header spelled exactly `name` wins over one that differs only in case.
///
/// `name` may be anything. It is compared with the names present rather than parsed into
/// a `HeaderName`: async-nats' `get(&str)` panics on a name a header cannot have, and
/// parsing a name that is not one of NATS' own copies it (messages carry a handful of
/// headers, so the scan costs less than that copy).
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    let mut folded = None;
    for (k, v) in headers?.iter() {
        let k: &str = k.as_ref();
        if k == name {
            return v.first().map(HeaderValue::as_str);
        }
        if folded.is_none() && k.eq_ignore_ascii_case(name) {
            folded = v.first();
        }
    }
    folded.map(HeaderValue::as_str)
}

/// Inserts a header, refusing (instead of panicking, as async-nats' `From<&str>` does)
/// names or values a NATS header cannot carry.
pub fn set_header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), ProtocolError> {
    let name: HeaderName = name
        .parse()
        .map_err(|_| ProtocolError::BadHeader(name.to_string()))?;
    let value: HeaderValue = value
        .parse()
        .map_err(|_| ProtocolError::BadHeader(name.to_string()))?;
    headers.insert(name, value);
    Ok(())
}

/// [`set_header`] for one of the protocol's own names (the [`headers`] constants) and a
/// value the caller already owns: neither is copied, where `set_header` copies both. For
/// code that sets headers on every message.
/// What a message counts against the server's `max_payload` (the limit `INFO` announces,
/// 1 MiB by default): its header block as sent (`NATS/1.0`, each `key: value` line, the
/// blank line) and its payload. A message over it is refused by the client before it is
/// sent, every time: it can never be stored.
pub fn wire_len(headers: &HeaderMap, payload_len: usize) -> usize {
    if headers.is_empty() {
        return payload_len;
    }
    let mut len = b"NATS/1.0\r\n\r\n".len() + payload_len;
    for (k, vs) in headers.iter() {
        for v in vs {
            len += AsRef::<str>::as_ref(k).len() + b": \r\n".len() + v.as_str().len();
        }
    }
    len
}

pub fn set_known_header(
    headers: &mut HeaderMap,
    name: &'static str,
    value: String,
) -> Result<(), ProtocolError> {
    if name.contains(|c: char| !c.is_ascii_graphic() || c == ':') || value.contains(['\r', '\n']) {
        return Err(ProtocolError::BadHeader(name.to_string()));
    }
    // Checked above: `from_static` takes any name, and `From<String>` panics on a value
    // with a line break.
    headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
    Ok(())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("subject prefix {0:?} must be dot-separated tokens of letters, digits, '-' or '_'")]
    BadPrefix(String),
    #[error("header {0:?} has a name or value a NATS header cannot carry")]
    BadHeader(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_contract() {
        let s = Subjects::default();
        assert_eq!(s.submit(), "fleet.tasks.submit");
        assert_eq!(s.work("code"), "fleet.work.code");
        assert_eq!(s.work_targeted("code", "w1"), "fleet.work.code.w1");
        assert_eq!(s.result("t1"), "fleet.results.t1");
        assert_eq!(s.telemetry("code", "w1"), "fleet.telemetry.code.w1");
        assert_eq!(s.control("w1"), "fleet.control.w1");
        assert_eq!(s.decisions("code"), "fleet.decisions.code");
        assert_eq!(s.alerts("critical"), "fleet.alerts.critical");
        assert_eq!(s.intake_stream(), "FLEET_INTAKE");
        let t = Subjects::new("acme.prod-1").unwrap();
        assert_eq!(t.work_stream(), "ACME_PROD_1_WORK");
        assert!(Subjects::new("fleet.*").is_err());
        assert!(Subjects::new("").is_err());
    }

    #[test]
    fn header_lookup_ignores_case_and_set_header_refuses_newlines() {
        let mut h = HeaderMap::new();
        set_header(&mut h, "TraceParent", "x").unwrap();
        assert_eq!(header(Some(&h), "traceparent"), Some("x"));
        assert!(set_header(&mut h, "a", "line\nbreak").is_err());
        assert!(set_header(&mut h, "bad:name", "v").is_err());
        // A name no header can have is simply absent (async-nats' own lookup panics).
        assert_eq!(header(Some(&h), "bad name\r\n"), None);
        assert_eq!(header(None, "traceparent"), None);
    }

    #[test]
    fn the_exact_spelling_wins_over_a_case_folded_one() {
        let mut h = HeaderMap::new();
        set_header(&mut h, "TRACEPARENT", "folded").unwrap();
        set_header(&mut h, "traceparent", "exact").unwrap();
        set_header(&mut h, "Fleet-Other", "o").unwrap();
        assert_eq!(header(Some(&h), "traceparent"), Some("exact"));
        assert_eq!(header(Some(&h), "TRACEPARENT"), Some("folded"));
        assert_eq!(header(Some(&h), "fleet-other"), Some("o"));
    }

    #[test]
    fn set_known_header_moves_the_value_and_refuses_line_breaks() {
        let mut h = HeaderMap::new();
        set_known_header(&mut h, headers::TASK_ID, "t-1".to_string()).unwrap();
        set_known_header(&mut h, headers::NATS_MSG_ID, "t-1:1".to_string()).unwrap();
        assert_eq!(header(Some(&h), headers::TASK_ID), Some("t-1"));
        assert_eq!(header(Some(&h), headers::NATS_MSG_ID), Some("t-1:1"));
        assert_eq!(
            set_known_header(&mut h, headers::TASK_ID, "a\r\nb".to_string()),
            Err(ProtocolError::BadHeader(headers::TASK_ID.to_string()))
        );
        assert!(set_known_header(&mut h, "bad:name", "v".to_string()).is_err());
        assert_eq!(header(Some(&h), headers::TASK_ID), Some("t-1"));
    }

    #[test]
    fn tokens_and_subjects() {
        assert!(is_subject_token("task-1_A"));
        assert!(!is_subject_token("a.b"));
        assert!(!is_subject_token("a*"));
        assert!(!is_subject_token(&"x".repeat(129)));
        assert!(is_publish_subject("_INBOX.abc.def"));
        assert!(!is_publish_subject("a..b"));
        assert!(!is_publish_subject("a.>"));
        assert!(!is_publish_subject("a b"));
    }

    #[test]
    fn reply_subjects_are_inboxes_never_system_or_fleet_subjects() {
        let ok = |s| reply_subject_problem(s, DEFAULT_REPLY_PREFIXES, "fleet").is_none();
        assert!(ok("_INBOX.abc"));
        assert!(ok("_INBOX.abc.def"));
        for bad in [
            "$JS.API.STREAM.PURGE.FLEET_RESULTS",
            "$JS.API.STREAM.INFO.FLEET_INTAKE",
            "$SYS.REQ.SERVER.PING",
            "$KV.fleet_policy.active",
            "fleet.tasks.submit",
            "fleet",
            "orders.created",
            "_INBOX.*",
            "_INBOX.a b",
            "",
        ] {
            assert!(!ok(bad), "{bad:?} must be refused");
        }
        // A configured prefix never opens the system or fleet subjects.
        let allowed = [
            "$JS.".to_string(),
            "fleet.".to_string(),
            "replies.".to_string(),
        ];
        assert!(reply_subject_problem("$JS.API.X", &allowed, "fleet").is_some());
        assert!(reply_subject_problem("fleet.results.x", &allowed, "fleet").is_some());
        assert!(reply_subject_problem("replies.svc-a.1", &allowed, "fleet").is_none());
        assert!(reply_subject_problem("fleetwide.x", &["fleetwide."], "fleet").is_none());
    }
}

//! JSON messages on the wire. Each carries `schema` ([`SCHEMA_VERSION`]).
//!
//! Tasks come from untrusted producers, so [`Task`] refuses unknown fields (a misspelt
//! `priorty` should be an error, not a silently ignored wish) and [`Task::validate`] reports
//! every problem at once. Results and heartbeats come from workers in any language and are
//! read tolerantly.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::protocol::{SCHEMA_VERSION, is_subject_token};

/// A unit of work submitted by a producer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Message schema version; must be 1.
    pub schema: u32,
    /// Task id: letters, digits, `-`, `_`, at most 128. If absent, the `Fleet-Task-Id`
    /// header, then `Nats-Msg-Id`, then `seq-<intake stream sequence>` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What to do, in words. Required, non-empty, at most 64 KiB.
    pub description: String,
    /// Structured input for the handler; any JSON.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub input: serde_json::Value,
    /// Pool requested by the producer; the commander honours it when the pool exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Model requested by the producer (honoured when the commander allows it and knows
    /// the model). On dispatch, the commander sets it to the model it chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Capabilities the task needs (e.g. `code`, `long-context`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// 0 (lowest) to 9 (highest); default 5.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// RFC 3339 instant after which the result is no longer wanted, in any UTC offset
    /// ([`parse_rfc3339`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Most the producer will pay for this task, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// The producer's estimate of how long the task takes, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_duration_s: Option<f64>,
    /// Free-form string attributes (task_type, tenant …), at most 64.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

fn default_priority() -> u8 {
    5
}

impl Task {
    /// A task with only the required fields set.
    pub fn new(description: impl Into<String>) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id: None,
            description: description.into(),
            input: serde_json::Value::Null,
            pool: None,
            model: None,
            capabilities: Vec::new(),
            priority: default_priority(),
            deadline: None,
            max_cost_usd: None,
            expected_duration_s: None,
            attributes: BTreeMap::new(),
        }
    }

    /// Parses and validates producer-supplied JSON, reporting every problem.
    ///
    /// JSON that does not parse (or is not an object) is one [`TaskError::Parse`] with
    /// line and column. Otherwise every problem comes back at once in
    /// [`TaskError::Invalid`]: unknown fields (with the field meant, when one is close),
    /// missing ones, values of the wrong type and values out of range.
    pub fn from_json(bytes: &[u8]) -> Result<Self, TaskError> {
        // The strict parse answers the common case, a good task, in one pass.
        let strict = match serde_json::from_slice::<Task>(bytes) {
            Ok(task) => {
                task.validate()?;
                return Ok(task);
            }
            Err(e) => e,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| TaskError::Parse(e.to_string()))?;
        let serde_json::Value::Object(fields) = value else {
            return Err(TaskError::Parse(format!(
                "a task is a JSON object, not {}",
                json_kind(&value)
            )));
        };
        let problems = every_problem(fields);
        if problems.is_empty() {
            // Not reached for any input the checks above know; the parser's word stands.
            return Err(TaskError::Parse(strict.to_string()));
        }
        Err(TaskError::Invalid(problems))
    }

    /// Checks every field; all problems are returned together.
    pub fn validate(&self) -> Result<(), TaskError> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, why: String| {
            problems.push(FieldProblem {
                field: field.into(),
                problem: why,
            })
        };
        if self.schema != SCHEMA_VERSION {
            bad(
                "schema",
                format!(
                    "unsupported schema {}; this commander speaks {SCHEMA_VERSION}",
                    self.schema
                ),
            );
        }
        if let Some(id) = &self.id
            && !is_subject_token(id)
        {
            bad("id", "must be 1-128 letters, digits, '-' or '_'".into());
        }
        if self.description.trim().is_empty() {
            bad("description", "must not be empty".into());
        }
        if self.description.len() > 64 * 1024 {
            bad("description", "must be at most 65536 bytes".into());
        }
        if let Some(pool) = &self.pool
            && !is_subject_token(pool)
        {
            bad("pool", "must be 1-128 letters, digits, '-' or '_'".into());
        }
        if let Some(model) = &self.model
            && (model.is_empty()
                || model.len() > 128
                || !model
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b)))
        {
            bad(
                "model",
                "must be 1-128 letters, digits, '-', '_', '.', ':', '/' or '@'".into(),
            );
        }
        if self.capabilities.len() > 32 {
            bad("capabilities", "at most 32".into());
        }
        if self
            .capabilities
            .iter()
            .any(|c| c.is_empty() || c.len() > 64)
        {
            bad("capabilities", "each must be 1-64 characters".into());
        }
        if self.priority > 9 {
            bad("priority", format!("{} is out of range 0-9", self.priority));
        }
        if let Some(d) = &self.deadline
            && parse_rfc3339(d).is_none()
        {
            bad("deadline", format!("{d:?} is not an RFC 3339 timestamp"));
        }
        if let Some(c) = self.max_cost_usd
            && !(c.is_finite() && c >= 0.0)
        {
            bad("max_cost_usd", "must be a finite number >= 0".into());
        }
        if let Some(d) = self.expected_duration_s
            && !(d.is_finite() && d > 0.0)
        {
            bad("expected_duration_s", "must be a finite number > 0".into());
        }
        if self.attributes.len() > 64 {
            bad("attributes", "at most 64".into());
        }
        if self
            .attributes
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
        {
            bad(
                "attributes",
                "keys must be 1-128 bytes and values at most 1024".into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TaskError::Invalid(problems))
        }
    }

    /// The deadline as a point in time, if set and valid.
    pub fn deadline_time(&self) -> Option<SystemTime> {
        self.deadline.as_deref().and_then(parse_rfc3339)
    }
}

/// Whether a JSON value fits a field's type, and if not, why.
type FieldCheck = fn(&serde_json::Value) -> Result<(), String>;

/// A task's fields, and whether a value fits each one's type.
const TASK_FIELDS: &[(&str, FieldCheck)] = &[
    ("schema", |v| fits::<u32>(v, "an integer")),
    ("id", |v| fits::<Option<String>>(v, "a string")),
    ("description", |v| fits::<String>(v, "a string")),
    ("input", |_| Ok(())),
    ("pool", |v| fits::<Option<String>>(v, "a string")),
    ("model", |v| fits::<Option<String>>(v, "a string")),
    ("capabilities", |v| {
        fits::<Vec<String>>(v, "an array of strings")
    }),
    ("priority", |v| fits::<u8>(v, "an integer 0-9")),
    ("deadline", |v| {
        fits::<Option<String>>(v, "an RFC 3339 string")
    }),
    ("max_cost_usd", |v| fits::<Option<f64>>(v, "a number")),
    ("expected_duration_s", |v| {
        fits::<Option<f64>>(v, "a number")
    }),
    ("attributes", |v| {
        fits::<BTreeMap<String, String>>(v, "an object of strings")
    }),
];

fn fits<T: serde::de::DeserializeOwned>(v: &serde_json::Value, want: &str) -> Result<(), String> {
    T::deserialize(v)
        .map(|_| ())
        .map_err(|_| format!("must be {want}, got {}", json_kind(v)))
}

fn json_kind(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => format!("{b}"),
        serde_json::Value::Number(n) => format!("the number {n}"),
        serde_json::Value::String(_) => "a string".into(),
        serde_json::Value::Array(_) => "an array".into(),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

/// Every problem of a task object that the strict parse refused: unknown, missing and
/// mistyped fields, then the range checks of [`Task::validate`] on the fields that are
/// left, each field reported once.
fn every_problem(mut fields: serde_json::Map<String, serde_json::Value>) -> Vec<FieldProblem> {
    let mut problems = Vec::new();
    let known = |k: &str| TASK_FIELDS.iter().any(|(f, _)| *f == k);
    let unknown: Vec<String> = fields.keys().filter(|k| !known(k)).cloned().collect();
    for k in unknown {
        fields.remove(&k);
        let hint = TASK_FIELDS
            .iter()
            .map(|(f, _)| *f)
            .find(|f| !fields.contains_key(*f) && edit_distance(f, &k) <= 2)
            .map(|f| format!(" (did you mean {f:?}?)"))
            .unwrap_or_default();
        problems.push(FieldProblem {
            field: k,
            problem: format!("unknown field{hint}"),
        });
    }
    for (name, check) in TASK_FIELDS {
        if let Some(v) = fields.get(*name)
            && let Err(why) = check(v)
        {
            problems.push(FieldProblem {
                field: (*name).into(),
                problem: why,
            });
            fields.remove(*name);
        }
    }
    // Required fields: reported when absent, then stood in for so the rest is checked.
    for (name, stand_in) in [
        ("schema", serde_json::Value::from(SCHEMA_VERSION)),
        ("description", serde_json::Value::from("-")),
    ] {
        if !fields.contains_key(name) {
            if !problems.iter().any(|p| p.field == name) {
                problems.push(FieldProblem {
                    field: name.into(),
                    problem: "is required".into(),
                });
            }
            fields.insert(name.into(), stand_in);
        }
    }
    if let Ok(rest) = serde_json::from_value::<Task>(serde_json::Value::Object(fields))
        && let Err(TaskError::Invalid(more)) = rest.validate()
    {
        for p in more {
            if !problems.iter().any(|q| q.field == p.field) {
                problems.push(p);
            }
        }
    }
    problems
}

/// Levenshtein distance of two short ASCII-ish names (field names are at most ~20 chars).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().take(64).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().take(64).enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// One field's problem in a refused task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("task JSON does not parse: {0}")]
    Parse(String),
    #[error("task is invalid: {}", .0.iter().map(|p| format!("{}: {}", p.field, p.problem)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldProblem>),
}

impl TaskError {
    /// Stable machine-readable code for the rejection.
    pub fn code(&self) -> &'static str {
        match self {
            TaskError::Parse(_) => "bad_json",
            TaskError::Invalid(_) => "invalid_task",
        }
    }
}

/// How a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// The handler succeeded.
    Ok,
    /// The handler failed; `error` says why.
    Failed,
    /// The task was cancelled (deadline passed, operator, shutdown).
    Cancelled,
    /// The commander refused the task (bad input, no pool can serve it); never ran.
    Rejected,
}

/// A machine-readable code and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// Token and cost accounting for one task, as the worker reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    /// USD, when the worker knows it; absent means unknown, never zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// When things happened, RFC 3339 with milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Handler run time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The outcome of a task, published on `<prefix>.results.<task_id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub schema: u32,
    pub task_id: String,
    /// The dispatch attempt this result belongs to (0 for a commander rejection).
    #[serde(default)]
    pub attempt: u32,
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub output: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub timings: Timings,
    /// Worker that produced it; absent for commander rejections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl TaskResult {
    /// A cancellation by the commander (a deadline that passed, an operator's cancel of
    /// a waiting task): the task never ran.
    pub fn cancelled(task_id: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            status: ResultStatus::Cancelled,
            ..Self::rejected(task_id, code, message)
        }
    }

    /// A rejection by the commander: the task never ran.
    pub fn rejected(task_id: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            task_id: task_id.to_string(),
            attempt: 0,
            status: ResultStatus::Rejected,
            output: serde_json::Value::Null,
            error: Some(ErrorInfo {
                code: code.to_string(),
                message: message.into(),
            }),
            usage: None,
            timings: Timings {
                finished_at: Some(now_rfc3339()),
                ..Default::default()
            },
            worker_id: None,
            pool: None,
        }
    }
}

/// What a worker is doing, as it says in its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Active,
    /// Finishing in-flight tasks, pulling nothing new.
    Draining,
    /// Pulling nothing new until resumed (a `pause` control command); running tasks finish.
    Paused,
}

/// Published every few seconds on `<prefix>.telemetry.<pool>.<worker>` with
/// `Fleet-Kind: heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub schema: u32,
    pub worker_id: String,
    pub pool: String,
    pub state: WorkerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Ids of the tasks being run now (the first is "the current task").
    #[serde(default)]
    pub current_tasks: Vec<String>,
    #[serde(default)]
    pub max_in_flight: u32,
    /// Tokens in the context of the current LLM conversation, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<u64>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk_version: Option<String>,
    /// When the worker started (RFC 3339): its uptime. Optional on the wire (empty when
    /// left out): the commander then counts uptime from the first signal it heard.
    #[serde(default)]
    pub started_at: String,
    /// Optional on the wire, as `started_at`; the commander does not read it.
    #[serde(default)]
    pub sent_at: String,
}

/// Now, RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The instant an RFC 3339 timestamp names: any precision and any UTC offset (`Z`,
/// `+01:00`, `-05:00`), `T` or a space between date and time. A timestamp with no offset
/// at all is read as UTC, as it was before offsets were read; `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    use time::format_description::well_known::Rfc3339;
    let parse = |t: &str| {
        time::OffsetDateTime::parse(t, &Rfc3339)
            .ok()
            .map(SystemTime::from)
    };
    if let Some(t) = parse(s) {
        return Some(t);
    }
    // What `time` refuses: a space for the `T` (RFC 3339 section 5.6 allows it), and no
    // offset at all.
    let (date, sep, clock) = (s.get(..10)?, s.as_bytes().get(10)?, s.get(11..)?);
    if !matches!(sep, b'T' | b't' | b' ') {
        return None;
    }
    let zoned =
        clock.ends_with(['Z', 'z']) || clock.get(8..).is_some_and(|r| r.contains(['+', '-']));
    let utc = if zoned { "" } else { "Z" };
    parse(&format!("{date}T{clock}{utc}"))
}

/// A timestamp NATS gives (a stored message's time) in unix milliseconds; `None` for an
/// instant before 1970.
pub fn unix_ms(t: time::OffsetDateTime) -> Option<u64> {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// [`parse_rfc3339`] in unix milliseconds; `None` also for an instant before 1970.
pub fn rfc3339_unix_ms(s: &str) -> Option<u64> {
    let since = parse_rfc3339(s)?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    u64::try_from(since.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/protocol.md §5.3: a worker in another language needs only the four fields
    /// that say who it is and what it does.
    #[test]
    fn a_heartbeat_needs_only_schema_worker_pool_and_state() {
        let hb: Heartbeat = serde_json::from_str(
            r#"{"schema": 1, "worker_id": "py-1", "pool": "code", "state": "idle"}"#,
        )
        .unwrap();
        assert_eq!(
            (hb.worker_id.as_str(), hb.state),
            ("py-1", WorkerState::Idle)
        );
        assert_eq!((hb.started_at.as_str(), hb.sent_at.as_str()), ("", ""));
        assert!(hb.current_tasks.is_empty() && hb.model.is_none());
        for (json, missing) in [
            (
                r#"{"schema": 1, "worker_id": "py-1", "pool": "code"}"#,
                "state",
            ),
            (
                r#"{"schema": 1, "worker_id": "py-1", "state": "idle"}"#,
                "pool",
            ),
        ] {
            let e = serde_json::from_str::<Heartbeat>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("missing field `{missing}`")), "{e}");
        }
    }

    #[test]
    fn rfc3339_timestamps_are_read_with_their_offsets() {
        let utc = parse_rfc3339("2026-11-23T18:00:00Z").unwrap();
        for same in [
            "2026-11-23T18:00:00Z",
            "2026-11-23T18:00:00.000Z",
            "2026-11-23t18:00:00z",
            "2026-11-23T19:00:00+01:00",
            "2026-11-23T19:00:00.000+01:00",
            "2026-11-23T13:00:00-05:00",
            "2026-11-23T18:00:00+00:00",
            "2026-11-23 19:00:00+01:00",
            // No offset: UTC, as humantime always read it.
            "2026-11-23T18:00:00",
            "2026-11-23 18:00:00",
            "2026-11-23T18:00:00.0000000000Z",
            "2026-11-23T18:00:00.0000000000+00:00",
            "2026-11-23T19:00:00.0000000000+01:00",
        ] {
            assert_eq!(parse_rfc3339(same), Some(utc), "{same}");
        }
        for bad in [
            "",
            "tomorrow",
            "2026-11-23T18:00:00+0100",
            "2026-11-23T18:00:00+01",
            "2026-13-23T18:00:00Z",
            "2026-11-23T18:00:00Zé",
            "2026-11-23T18:0é:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        let mut task = Task::new("x");
        task.deadline = Some("2026-11-23T13:00:00-05:00".into());
        assert!(task.validate().is_ok());
        assert_eq!(task.deadline_time(), Some(utc));
    }

    #[test]
    fn minimal_task_parses_with_defaults() {
        let t = Task::from_json(br#"{"schema":1,"description":"summarise this"}"#).unwrap();
        assert_eq!(t.priority, 5);
        assert!(t.id.is_none());
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            serde_json::json!({"schema":1,"description":"summarise this","priority":5})
        );
    }

    #[test]
    fn only_json_that_does_not_parse_is_a_parse_error() {
        let Err(TaskError::Parse(m)) = Task::from_json(b"{not json") else {
            panic!("malformed JSON is one parse error")
        };
        assert!(m.contains("line 1 column 2"), "{m}");
        assert!(matches!(Task::from_json(b"[]"), Err(TaskError::Parse(m)) if m.contains("object")));
        assert!(
            matches!(Task::from_json(br#"{"schema":1}"#), Err(TaskError::Invalid(p)) if p[0].field == "description")
        );
    }

    #[test]
    fn unknown_missing_mistyped_and_out_of_range_fields_come_back_together() {
        let Err(TaskError::Invalid(problems)) =
            Task::from_json(br#"{"schema":1,"descripton":"typo","priority":99}"#)
        else {
            panic!("should be invalid")
        };
        let got: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.problem.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "descripton",
                    "unknown field (did you mean \"description\"?)"
                ),
                ("description", "is required"),
                ("priority", "99 is out of range 0-9"),
            ]
        );
        let Err(TaskError::Invalid(problems)) = Task::from_json(
            br#"{"description":"x","priority":300,"capabilities":"code","max_cost_usd":-1,"x":1}"#,
        ) else {
            panic!("should be invalid")
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["x", "capabilities", "priority", "schema", "max_cost_usd"]
        );
        assert_eq!(
            problems[2].problem,
            "must be an integer 0-9, got the number 300"
        );
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let json = br#"{"schema":2,"id":"a.b","description":" ","pool":"x*","priority":12,
            "deadline":"tomorrow","max_cost_usd":-1,"expected_duration_s":0}"#;
        let Err(TaskError::Invalid(problems)) = Task::from_json(json) else {
            panic!("should be invalid")
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "schema",
                "id",
                "description",
                "pool",
                "priority",
                "deadline",
                "max_cost_usd",
                "expected_duration_s"
            ]
        );
    }

    #[test]
    fn results_are_read_tolerantly() {
        let r: TaskResult =
            serde_json::from_str(r#"{"schema":1,"task_id":"t","status":"ok","future_field":true}"#)
                .unwrap();
        assert_eq!(r.status, ResultStatus::Ok);
        assert_eq!(r.attempt, 0);
    }
}

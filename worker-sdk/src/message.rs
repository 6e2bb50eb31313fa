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
    /// RFC 3339 instant after which the result is no longer wanted.
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
    pub fn from_json(bytes: &[u8]) -> Result<Self, TaskError> {
        let task: Task =
            serde_json::from_slice(bytes).map_err(|e| TaskError::Parse(e.to_string()))?;
        task.validate()?;
        Ok(task)
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
            && humantime::parse_rfc3339_weak(d).is_err()
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
        self.deadline
            .as_deref()
            .and_then(|d| humantime::parse_rfc3339_weak(d).ok())
    }
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
    pub started_at: String,
    pub sent_at: String,
}

/// Now, RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bad_json_and_missing_fields_are_parse_errors() {
        assert!(matches!(
            Task::from_json(b"{not json"),
            Err(TaskError::Parse(_))
        ));
        assert!(
            matches!(Task::from_json(br#"{"schema":1}"#), Err(TaskError::Parse(m)) if m.contains("description"))
        );
        assert!(
            matches!(Task::from_json(br#"{"schema":1,"description":"x","priorty":3}"#), Err(TaskError::Parse(m)) if m.contains("priorty"))
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

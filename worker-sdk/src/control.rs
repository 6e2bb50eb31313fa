//! Control commands: what the commander (or an operator) asks a worker to do, on
//! `<prefix>.control.<worker>`, as a core NATS request; the worker answers on the reply
//! subject with its new state (docs/protocol.md §10).
//!
//! Every command is idempotent: pausing a paused worker answers `paused` and changes
//! nothing. A command that does not parse, names an unknown command or lacks what it needs
//! gets an error reply and changes nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::message::ErrorInfo;
use crate::protocol::{SCHEMA_VERSION, is_subject_token};

/// The fastest pace a throttle may set; above it a throttle means nothing.
pub const MAX_TASKS_PER_S: f64 = 10_000.0;
/// The slowest: one task a day.
pub const MIN_TASKS_PER_S: f64 = 1.0 / 86_400.0;

/// A control request as sent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub schema: u32,
    /// `pause`, `resume`, `drain`, `throttle`, `unthrottle`, `cancel` or `status`.
    pub command: String,
    /// `cancel` and `restart`: the task whose handler is aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// `throttle`: the most tasks the worker starts per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_per_s: Option<f64>,
    /// Why, in words: logged by the worker and put in a cancelled task's error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The sender's id for this request (an intervention id), echoed in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl ControlRequest {
    pub fn new(command: Command) -> Self {
        let mut r = ControlRequest {
            schema: SCHEMA_VERSION,
            command: command.name().to_string(),
            ..Default::default()
        };
        match command {
            Command::Throttle { tasks_per_s } => r.tasks_per_s = Some(tasks_per_s),
            Command::Cancel { task_id } | Command::Restart { task_id } => r.task_id = Some(task_id),
            _ => {}
        }
        r
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

/// A command, checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Pull nothing new; what runs finishes. A task delivered while paused is handed back.
    Pause,
    /// Pull again (ends a pause or a drain).
    Resume,
    /// Finish what runs, then pull nothing new until resumed.
    Drain,
    /// Start at most this many tasks per second.
    Throttle { tasks_per_s: f64 },
    /// Lift a throttle.
    Unthrottle,
    /// Abort the handler of this task: its result is `cancelled`.
    Cancel { task_id: String },
    /// Abort the handler of this task and hand its delivery back, without a result, so
    /// the task runs again (on whichever worker of the pool pulls it first).
    Restart { task_id: String },
    /// Change nothing; answer the state.
    Status,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Drain => "drain",
            Command::Throttle { .. } => "throttle",
            Command::Unthrottle => "unthrottle",
            Command::Cancel { .. } => "cancel",
            Command::Restart { .. } => "restart",
            Command::Status => "status",
        }
    }

    /// Every command name, for error messages and docs.
    pub const NAMES: [&'static str; 8] = [
        "pause",
        "resume",
        "drain",
        "throttle",
        "unthrottle",
        "cancel",
        "restart",
        "status",
    ];
}

/// Why a request was refused; `code` is what the reply's `error.code` says.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: String) -> Refusal {
    Refusal { code, message }
}

/// Parses and checks a request body.
pub fn parse(body: &[u8]) -> Result<(ControlRequest, Command), Refusal> {
    let req: ControlRequest = serde_json::from_slice(body).map_err(|e| {
        refuse(
            "bad_request",
            format!("control request does not parse: {e}"),
        )
    })?;
    if req.schema != SCHEMA_VERSION {
        return Err(refuse(
            "unsupported_schema",
            format!(
                "schema {} is not supported (this worker speaks {SCHEMA_VERSION})",
                req.schema
            ),
        ));
    }
    let command = match req.command.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "drain" => Command::Drain,
        "unthrottle" => Command::Unthrottle,
        "status" => Command::Status,
        "throttle" => match req.tasks_per_s {
            Some(r) if r.is_finite() && (MIN_TASKS_PER_S..=MAX_TASKS_PER_S).contains(&r) => {
                Command::Throttle { tasks_per_s: r }
            }
            Some(r) => {
                return Err(refuse(
                    "bad_request",
                    format!(
                        "tasks_per_s {r} is out of range ({MIN_TASKS_PER_S:.6} to {MAX_TASKS_PER_S})"
                    ),
                ));
            }
            None => return Err(refuse("bad_request", "throttle needs tasks_per_s".into())),
        },
        name @ ("cancel" | "restart") => match &req.task_id {
            Some(id) if is_subject_token(id) => {
                let task_id = id.clone();
                if name == "cancel" {
                    Command::Cancel { task_id }
                } else {
                    Command::Restart { task_id }
                }
            }
            Some(id) => {
                return Err(refuse(
                    "bad_request",
                    format!("task_id {id:?} is not a task id"),
                ));
            }
            None => return Err(refuse("bad_request", format!("{name} needs task_id"))),
        },
        other => {
            return Err(refuse(
                "unknown_command",
                format!(
                    "unknown command {other:?}; known: {}",
                    Command::NAMES.join(", ")
                ),
            ));
        }
    };
    Ok((req, command))
}

/// Why a running handler is aborted, with the command's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Abort {
    /// The result is `cancelled`.
    Cancel(String),
    /// No result: the delivery is handed back to run again.
    Restart(String),
}

/// Whether a worker pulls work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Running,
    Paused,
    /// Finishing what runs; pulls nothing new until resumed.
    Draining,
}

/// The worker's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    pub schema: u32,
    pub ok: bool,
    pub worker_id: String,
    /// The command answered (as sent; absent when the body did not parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The request's `id`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The state after the command (unchanged on an error).
    pub mode: Mode,
    /// Tasks running now.
    pub in_flight: u32,
    /// The throttle in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// What a worker obeys: its mode, its throttle, and a way to abort each running handler.
#[derive(Debug)]
pub(crate) struct Controls {
    mode: watch::Sender<Mode>,
    pace: Mutex<Option<Pace>>,
    /// One per running task (task id → how to abort its handler): what heartbeats list and
    /// the in-flight count.
    running: Mutex<BTreeMap<String, oneshot::Sender<Abort>>>,
}

#[derive(Debug)]
struct Pace {
    tasks_per_s: f64,
    every: Duration,
    next: Instant,
}

impl Controls {
    pub(crate) fn new() -> Self {
        Controls {
            mode: watch::channel(Mode::Running).0,
            pace: Mutex::new(None),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub(crate) fn watch_mode(&self) -> watch::Receiver<Mode> {
        self.mode.subscribe()
    }

    pub(crate) fn tasks_per_s(&self) -> Option<f64> {
        self.pace
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|p| p.tasks_per_s))
    }

    /// Under a throttle, when the next start may be; `None` when not throttled.
    pub(crate) fn next_start(&self) -> Option<Instant> {
        let pace = self.pace.lock().ok()?;
        pace.as_ref().map(|p| p.next.max(Instant::now()))
    }

    /// Under a throttle, reserves the next start if it is within `within` and says when it
    /// is: `Err(())` when it is further off. Starts are spaced `1 / tasks_per_s` apart,
    /// with no burst. `Ok(None)` when not throttled.
    pub(crate) fn reserve_start(&self, within: Duration) -> Result<Option<Instant>, ()> {
        let Ok(mut pace) = self.pace.lock() else {
            return Ok(None);
        };
        let Some(p) = pace.as_mut() else {
            return Ok(None);
        };
        let now = Instant::now();
        let at = p.next.max(now);
        if at > now + within {
            return Err(());
        }
        p.next = at + p.every;
        Ok(Some(at))
    }

    /// Registers a handler about to run; the receiver yields the reason if it is cancelled.
    pub(crate) fn started(&self, task_id: &str) -> oneshot::Receiver<Abort> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut r) = self.running.lock() {
            r.insert(task_id.to_string(), tx);
        }
        rx
    }

    pub(crate) fn finished(&self, task_id: &str) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(task_id);
        }
    }

    /// The ids of the tasks running now, sorted.
    pub(crate) fn running_tasks(&self) -> Vec<String> {
        self.running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn in_flight(&self) -> u32 {
        self.running
            .lock()
            .map(|r| u32::try_from(r.len()).unwrap_or(u32::MAX))
            .unwrap_or(0)
    }

    /// Carries out a checked command.
    fn apply(&self, command: &Command, reason: &str) -> Result<(), Refusal> {
        match command {
            Command::Pause => {
                self.mode.send_replace(Mode::Paused);
            }
            Command::Resume => {
                self.mode.send_replace(Mode::Running);
            }
            Command::Drain => {
                self.mode.send_replace(Mode::Draining);
            }
            Command::Throttle { tasks_per_s } => {
                if let Ok(mut p) = self.pace.lock() {
                    let every = Duration::from_secs_f64(1.0 / tasks_per_s);
                    // A change of rate keeps the slot already promised.
                    let next = p.as_ref().map_or_else(Instant::now, |p| p.next);
                    *p = Some(Pace {
                        tasks_per_s: *tasks_per_s,
                        every,
                        next,
                    });
                }
                // Wakes a pull loop sleeping on the old pace.
                self.mode.send_modify(|_| {});
            }
            Command::Unthrottle => {
                if let Ok(mut p) = self.pace.lock() {
                    *p = None;
                }
                self.mode.send_modify(|_| {});
            }
            Command::Cancel { task_id } | Command::Restart { task_id } => {
                let abort = self.running.lock().ok().and_then(|mut r| r.remove(task_id));
                match abort {
                    Some(tx) => {
                        let reason = reason.to_string();
                        let _ = tx.send(if matches!(command, Command::Restart { .. }) {
                            Abort::Restart(reason)
                        } else {
                            Abort::Cancel(reason)
                        });
                    }
                    None => {
                        return Err(refuse(
                            "not_running",
                            format!("task {task_id} is not running on this worker"),
                        ));
                    }
                }
            }
            Command::Status => {}
        }
        Ok(())
    }

    /// Answers one request body: applies it when it is good, and says the state either way.
    pub(crate) fn answer(&self, worker_id: &str, body: &[u8]) -> ControlReply {
        let parsed = parse(body);
        let (command, id) = match &parsed {
            Ok((req, _)) => (Some(req.command.clone()), req.id.clone()),
            Err(_) => (None, None),
        };
        let outcome = parsed.and_then(|(req, cmd)| {
            let reason = req.reason.as_deref().unwrap_or("asked by the commander");
            self.apply(&cmd, reason).map(|()| (req, cmd))
        });
        let error = match &outcome {
            Ok((req, cmd)) => {
                tracing::info!(command = cmd.name(), reason = req.reason.as_deref().unwrap_or(""), id = req.id.as_deref().unwrap_or(""), mode = ?self.mode(), "control command obeyed");
                None
            }
            Err(r) => {
                tracing::warn!(code = r.code, error = %r.message, "control command refused; nothing changed");
                Some(ErrorInfo {
                    code: r.code.to_string(),
                    message: r.message.clone(),
                })
            }
        };
        ControlReply {
            schema: SCHEMA_VERSION,
            ok: error.is_none(),
            worker_id: worker_id.to_string(),
            command,
            id,
            mode: self.mode(),
            in_flight: self.in_flight(),
            tasks_per_s: self.tasks_per_s(),
            error,
        }
    }
}

/// Answers the control requests of `sub` until `stop`. Requests without a reply subject
/// are obeyed all the same.
pub(crate) async fn listen(
    client: async_nats::Client,
    mut sub: async_nats::Subscriber,
    worker_id: String,
    controls: std::sync::Arc<Controls>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = stop.changed() => return,
        };
        let reply = controls.answer(&worker_id, &msg.payload);
        let Some(to) = msg.reply else { continue };
        match serde_json::to_vec(&reply) {
            Ok(body) => {
                if let Err(e) = client.publish(to, body.into()).await {
                    tracing::warn!(error = %e, "control reply not sent");
                }
            }
            Err(e) => tracing::warn!(error = %e, "control reply not encodable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> &'static str {
        parse(body.as_bytes()).unwrap_err().code
    }

    #[test]
    fn every_command_parses_and_round_trips() {
        for c in [
            Command::Pause,
            Command::Resume,
            Command::Drain,
            Command::Throttle { tasks_per_s: 0.5 },
            Command::Unthrottle,
            Command::Cancel {
                task_id: "t-1".into(),
            },
            Command::Status,
        ] {
            let body = serde_json::to_vec(&ControlRequest::new(c.clone()).id("i1")).unwrap();
            let (req, parsed) = parse(&body).unwrap();
            assert_eq!(parsed, c);
            assert_eq!(req.id.as_deref(), Some("i1"));
            assert!(Command::NAMES.contains(&c.name()));
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_code() {
        assert_eq!(
            code(r#"{"schema":1,"command":"explode"}"#),
            "unknown_command"
        );
        assert_eq!(code(r#"{"schema":1,"command":"PAUSE"}"#), "unknown_command");
        assert_eq!(code("not json"), "bad_request");
        assert_eq!(
            code(r#"{"schema":1,"command":"pause","x":1}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"schema":2,"command":"pause"}"#),
            "unsupported_schema"
        );
        assert_eq!(code(r#"{"schema":1,"command":"throttle"}"#), "bad_request");
        for r in ["0", "-1", "1e9", "1e-9"] {
            let body = format!(r#"{{"schema":1,"command":"throttle","tasks_per_s":{r}}}"#);
            assert_eq!(code(&body), "bad_request", "{r}");
        }
        assert_eq!(code(r#"{"schema":1,"command":"cancel"}"#), "bad_request");
        assert_eq!(code(r#"{"schema":1,"command":"restart"}"#), "bad_request");
        assert_eq!(
            code(r#"{"schema":1,"command":"cancel","task_id":"a.b"}"#),
            "bad_request"
        );
        let msg = parse(br#"{"schema":1,"command":"explode"}"#)
            .unwrap_err()
            .message;
        assert!(msg.contains("pause, resume, drain"), "{msg}");
    }

    #[tokio::test]
    async fn a_refused_command_changes_nothing_and_a_good_one_is_idempotent() {
        let c = Controls::new();
        let pause = serde_json::to_vec(&ControlRequest::new(Command::Pause)).unwrap();
        for _ in 0..2 {
            let r = c.answer("w1", &pause);
            assert!(r.ok);
            assert_eq!(r.mode, Mode::Paused);
        }
        let r = c.answer("w1", br#"{"schema":1,"command":"explode","id":"x"}"#);
        assert!(!r.ok);
        assert_eq!(r.error.unwrap().code, "unknown_command");
        assert_eq!(r.mode, Mode::Paused);
        let cancel = ControlRequest::new(Command::Cancel {
            task_id: "t1".into(),
        });
        let r = c.answer("w1", &serde_json::to_vec(&cancel).unwrap());
        assert_eq!(r.error.unwrap().code, "not_running");
        let abort = c.started("t1");
        assert_eq!(c.answer("w1", b"{}").in_flight, 1);
        let r = c.answer("w1", &serde_json::to_vec(&cancel.reason("stuck")).unwrap());
        assert!(r.ok, "{r:?}");
        assert_eq!(abort.await.unwrap(), Abort::Cancel("stuck".into()));
        let restart = ControlRequest::new(Command::Restart {
            task_id: "t2".into(),
        });
        let abort = c.started("t2");
        let r = c.answer("w1", &serde_json::to_vec(&restart.reason("again")).unwrap());
        assert!(r.ok, "{r:?}");
        assert_eq!(abort.await.unwrap(), Abort::Restart("again".into()));
        assert_eq!(c.answer("w1", b"{}").in_flight, 0);
        let resume = serde_json::to_vec(&ControlRequest::new(Command::Resume)).unwrap();
        assert_eq!(c.answer("w1", &resume).mode, Mode::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_spaces_starts_and_lifting_it_ends_the_spacing() {
        let c = Controls::new();
        let soon = Duration::from_millis(300);
        assert_eq!(c.next_start(), None);
        assert_eq!(c.reserve_start(soon), Ok(None));
        let t = serde_json::to_vec(&ControlRequest::new(Command::Throttle { tasks_per_s: 4.0 }))
            .unwrap();
        let r = c.answer("w1", &t);
        assert_eq!(r.tasks_per_s, Some(4.0));
        let a = c.reserve_start(soon).unwrap().unwrap();
        let b = c.reserve_start(soon).unwrap().unwrap();
        assert_eq!(b - a, Duration::from_millis(250));
        assert_eq!(c.next_start(), Some(b + Duration::from_millis(250)));
        assert_eq!(
            c.reserve_start(soon),
            Err(()),
            "a start 500 ms off is not held for"
        );
        let u = serde_json::to_vec(&ControlRequest::new(Command::Unthrottle)).unwrap();
        assert_eq!(c.answer("w1", &u).tasks_per_s, None);
        assert_eq!(c.next_start(), None);
    }
}

//! Replay of real agent behaviour: the 200 τ-bench airline runs (GPT-4o) in
//! `../shared/data/tau-bench/` as GenAI traces through the commander's live state and
//! detector, to see what the slice and drift detectors find between the runs that passed
//! and the runs that failed.
//!
//! How a run becomes telemetry (the file has no timings or token counts):
//! - each run is one task on one of ten agents of pool `airline` (task type
//!   `airline_support`, model `gpt-4o`), with a process span as its root, failed when the
//!   run's reward is 0;
//! - each assistant turn is a `chat` span of 2 s; input tokens are the characters of the
//!   conversation so far over 4, output tokens the characters of what the turn wrote (text
//!   and tool-call arguments) over 4;
//! - each tool call is an `execute_tool` span of 1 s after its turn, with the tool's name
//!   and arguments, failed when the tool answered `Error: …`;
//! - spans leave every 2 s, heartbeats every 5 s, as the lab's simulated agents send them.
//!
//! The cohort replay puts the passing runs over the first 45 minutes of an hour and the
//! failing runs over the last 15, the drift detector's windows: drift or a failure slice
//! that fires is a difference between the cohorts the detectors saw. The same replay with
//! the runs split at random into groups of the same sizes is the control.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use serde::Deserialize;

use fleet_commander::policy::schema::AlertSpec;

use super::agents::Rng;
use super::{Fired, Harness};
use crate::otlp::{i as int, s};

const AGENTS: usize = 10;
const POOL: &str = "airline";
const TASK_TYPE: &str = "airline_support";
const MODEL: &str = "gpt-4o";
const CHAT_MS: u64 = 2_000;
const TOOL_MS: u64 = 1_000;

#[derive(Deserialize)]
struct RawRun {
    task_id: u64,
    trial: u64,
    reward: f64,
    traj: Vec<RawMessage>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<RawCall>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct RawCall {
    id: String,
    function: RawFunction,
}

#[derive(Deserialize)]
struct RawFunction {
    name: String,
    arguments: String,
}

/// One tool call of a turn.
#[derive(Clone, Debug)]
pub struct Call {
    pub tool: String,
    pub arguments: String,
    pub failed: bool,
}

/// One assistant turn.
#[derive(Clone, Debug)]
pub struct Turn {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub calls: Vec<Call>,
}

/// One τ-bench run as the replay sends it.
#[derive(Clone, Debug)]
pub struct TauRun {
    pub task_id: u64,
    pub trial: u64,
    pub passed: bool,
    pub turns: Vec<Turn>,
}

impl TauRun {
    fn duration_ms(&self) -> u64 {
        self.turns
            .iter()
            .map(|t| CHAT_MS + TOOL_MS * t.calls.len() as u64)
            .sum()
    }
}

/// Reads the gzip-compressed trajectories file.
pub fn load(path: &Path) -> Result<Vec<TauRun>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: Vec<RawRun> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(raw.into_iter().map(convert).collect())
}

fn convert(r: RawRun) -> TauRun {
    let chars = |m: &RawMessage| {
        m.content.as_deref().map_or(0, |c| c.chars().count())
            + m.tool_calls
                .iter()
                .map(|c| c.function.name.len() + c.function.arguments.chars().count())
                .sum::<usize>()
    };
    // A tool's answer, by the call it answers.
    let answers: BTreeMap<&str, bool> = r
        .traj
        .iter()
        .filter(|m| m.role == "tool")
        .filter_map(|m| {
            let failed = m.content.as_deref().is_some_and(|c| c.starts_with("Error"));
            m.tool_call_id.as_deref().map(|id| (id, failed))
        })
        .collect();
    let mut so_far = 0usize;
    let mut turns = Vec::new();
    for m in &r.traj {
        if m.role == "assistant" {
            turns.push(Turn {
                input_tokens: (so_far / 4).max(1) as u64,
                output_tokens: (chars(m) / 4).max(1) as u64,
                calls: m
                    .tool_calls
                    .iter()
                    .map(|c| Call {
                        tool: c.function.name.clone(),
                        arguments: c.function.arguments.clone(),
                        failed: answers.get(c.id.as_str()).copied().unwrap_or(false),
                    })
                    .collect(),
            });
        }
        so_far += chars(m);
    }
    TauRun {
        task_id: r.task_id,
        trial: r.trial,
        passed: r.reward >= 1.0,
        turns,
    }
}

/// A span of a replayed run, waiting for its end time to pass.
struct Pending {
    end_ms: u64,
    span: Span,
}

/// The replay's agents: who is busy until when, and the spans each has yet to send.
struct Replay {
    busy_until: [u64; AGENTS],
    pending: Vec<Vec<Pending>>,
    completed: [u64; AGENTS],
    failed: [u64; AGENTS],
    seq: u64,
}

impl Replay {
    /// Lays out `run` on the first agent free at `start_ms` (or the one free soonest).
    fn start(&mut self, n: usize, run: &TauRun, start_ms: u64) {
        let agent = (0..AGENTS)
            .min_by_key(|&a| self.busy_until[a].max(start_ms))
            .unwrap_or(0);
        let begin = self.busy_until[agent].max(start_ms);
        let end = begin + run.duration_ms().max(1);
        self.busy_until[agent] = end;
        let mut trace = [0u8; 16];
        trace[..8].copy_from_slice(&(n as u64 + 1).to_be_bytes());
        trace[8..].copy_from_slice(&run.task_id.to_be_bytes());
        self.seq += 1;
        let root = self.seq;
        let task = format!("tau-{}-{}", run.task_id, run.trial);
        let mut t = begin;
        for turn in &run.turns {
            let chat = vec![
                s("gen_ai.operation.name", "chat"),
                s("gen_ai.provider.name", "openai"),
                s("gen_ai.request.model", MODEL),
                s("gen_ai.response.model", MODEL),
                int("gen_ai.usage.input_tokens", turn.input_tokens as i64),
                int("gen_ai.usage.output_tokens", turn.output_tokens as i64),
            ];
            self.push(
                agent,
                &trace,
                root,
                &task,
                ("chat gpt-4o", 3),
                (t, t + CHAT_MS),
                chat,
                false,
            );
            t += CHAT_MS;
            for c in &turn.calls {
                let attrs = vec![
                    s("gen_ai.operation.name", "execute_tool"),
                    s("gen_ai.tool.name", c.tool.as_str()),
                    s("gen_ai.tool.call.arguments", c.arguments.as_str()),
                ];
                let name = format!("execute_tool {}", c.tool);
                self.push(
                    agent,
                    &trace,
                    root,
                    &task,
                    (&name, 1),
                    (t, t + TOOL_MS),
                    attrs,
                    c.failed,
                );
                t += TOOL_MS;
            }
        }
        let root_attrs = vec![
            s("messaging.system", "nats"),
            s("messaging.operation.type", "process"),
            s("fleet.pool", POOL),
        ];
        self.pending[agent].push(Pending {
            end_ms: end,
            span: span(
                &trace,
                root,
                None,
                &task,
                ("process fleet.work.airline", 5),
                (begin, end),
                root_attrs,
                !run.passed,
            ),
        });
        if run.passed {
            self.completed[agent] += 1;
        } else {
            self.failed[agent] += 1;
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one span's fields, named at the call"
    )]
    fn push(
        &mut self,
        agent: usize,
        trace: &[u8; 16],
        root: u64,
        task: &str,
        name_kind: (&str, i32),
        times: (u64, u64),
        attrs: Vec<KeyValue>,
        failed: bool,
    ) {
        self.seq += 1;
        let sp = span(
            trace,
            self.seq,
            Some(root),
            task,
            name_kind,
            times,
            attrs,
            failed,
        );
        self.pending[agent].push(Pending {
            end_ms: times.1,
            span: sp,
        });
    }

    /// Agent `a`'s spans that have ended by `now_ms`, as one export.
    fn export(&mut self, a: usize, now_ms: u64) -> Option<Bytes> {
        let (due, rest): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending[a])
            .into_iter()
            .partition(|p| p.end_ms <= now_ms);
        self.pending[a] = rest;
        if due.is_empty() {
            return None;
        }
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        s("service.name", "tau-bench-replay"),
                        s("fleet.worker.id", format!("tau-{a}")),
                        s("fleet.pool", POOL),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: due.into_iter().map(|p| p.span).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        Some(Bytes::from(req.encode_to_vec()))
    }

    fn heartbeat(&self, a: usize, now_ms: u64) -> Vec<u8> {
        let at = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms),
        )
        .to_string();
        let busy = self.busy_until[a] > now_ms;
        serde_json::json!({
            "schema": 1, "worker_id": format!("tau-{a}"), "pool": POOL,
            "state": if busy { "active" } else { "idle" }, "model": MODEL,
            "current_tasks": [], "max_in_flight": 1,
            "completed": self.completed[a], "failed": self.failed[a],
            "sdk_version": "tau-replay", "started_at": at, "sent_at": at,
        })
        .to_string()
        .into_bytes()
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one span's fields, named at the call"
)]
fn span(
    trace: &[u8; 16],
    id: u64,
    parent: Option<u64>,
    task: &str,
    (name, kind): (&str, i32),
    (start_ms, end_ms): (u64, u64),
    mut attributes: Vec<KeyValue>,
    failed: bool,
) -> Span {
    attributes.push(s("fleet.task.id", task));
    attributes.push(s("fleet.task.type", TASK_TYPE));
    crate::otlp::SpanOf {
        trace,
        id,
        parent,
        name,
        kind,
        start_ms,
        end_ms,
        attributes,
        failed,
    }
    .build()
}

/// What one replay raised.
#[derive(Clone, Debug)]
pub struct Findings {
    /// Every alert that fired, in order.
    pub fired: Vec<Fired>,
    pub spans: u64,
}

impl Findings {
    pub fn fired_rule(&self, rule: fleet_commander::detect::Rule) -> bool {
        self.fired.iter().any(|f| f.rule == rule)
    }
}

/// Replays `first` spread over minutes 0–45 of an hour and `second` over minutes 45–60,
/// then five quiet minutes.
pub fn replay(first: &[&TauRun], second: &[&TauRun], spec: &AlertSpec) -> Result<Findings, String> {
    let mut h = Harness::new(&[POOL], 100, spec)?;
    let t0 = 1_800_000_000_000u64;
    let mut rp = Replay {
        busy_until: [t0; AGENTS],
        pending: (0..AGENTS).map(|_| Vec::new()).collect(),
        completed: [0; AGENTS],
        failed: [0; AGENTS],
        seq: 0,
    };
    // Each run's start, spread evenly over its cohort's window.
    let mut starts: Vec<(u64, usize, &TauRun)> = Vec::new();
    for (cohort, from_s, span_s) in [(first, 0u64, 45 * 60u64), (second, 45 * 60, 15 * 60)] {
        let n = cohort.len().max(1) as u64;
        for (k, r) in cohort.iter().enumerate() {
            starts.push((
                t0 + (from_s + span_s * k as u64 / n) * 1000,
                starts.len(),
                r,
            ));
        }
    }
    starts.sort_by_key(|(at, n, _)| (*at, *n));
    let mut next = 0;
    let mut fired = Vec::new();
    for sec in 0..65 * 60u64 {
        let now = t0 + sec * 1000;
        while next < starts.len() && starts[next].0 <= now {
            let (at, n, r) = starts[next];
            rp.start(n, r, at);
            next += 1;
        }
        for a in 0..AGENTS {
            if (sec + a as u64).is_multiple_of(2)
                && let Some(body) = rp.export(a, now)
            {
                h.feed_traces(&body, now)?;
            }
            if (sec + a as u64).is_multiple_of(5) {
                h.feed_heartbeat(&rp.heartbeat(a, now), now)?;
            }
        }
        fired.extend(h.tick(now, sec));
    }
    Ok(Findings {
        fired,
        spans: h.spans,
    })
}

/// The cohort replay and `controls` replays with the runs split at random.
#[derive(Clone, Debug)]
pub struct TauReport {
    pub runs: usize,
    pub passed: usize,
    pub cohorts: Findings,
    /// Per control replay: whether drift fired, whether a failure slice fired.
    pub controls: Vec<(bool, bool)>,
}

pub fn run(path: &Path, controls: usize, seed: u64, spec: &AlertSpec) -> Result<TauReport, String> {
    let runs = load(path)?;
    let passing: Vec<&TauRun> = runs.iter().filter(|r| r.passed).collect();
    let failing: Vec<&TauRun> = runs.iter().filter(|r| !r.passed).collect();
    let cohorts = replay(&passing, &failing, spec)?;
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for _ in 0..controls {
        let mut all: Vec<&TauRun> = runs.iter().collect();
        // Fisher–Yates with the lab's generator.
        for i in (1..all.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            all.swap(i, j);
        }
        let (a, b) = all.split_at(passing.len());
        let f = replay(a, b, spec)?;
        out.push((
            f.fired_rule(fleet_commander::detect::Rule::BehaviourDrift),
            f.fired_rule(fleet_commander::detect::Rule::FailureSlice),
        ));
    }
    Ok(TauReport {
        runs: runs.len(),
        passed: passing.len(),
        cohorts,
        controls: out,
    })
}

/// Where the trajectories are, from the repository root.
pub fn default_path() -> std::path::PathBuf {
    std::path::PathBuf::from("../shared/data/tau-bench/airline-gpt-4o.json.gz")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(tools: &[(&str, bool)], passed: bool) -> TauRun {
        TauRun {
            task_id: 1,
            trial: 0,
            passed,
            turns: tools
                .iter()
                .map(|(t, failed)| Turn {
                    input_tokens: 100,
                    output_tokens: 20,
                    calls: vec![Call {
                        tool: t.to_string(),
                        arguments: "{}".into(),
                        failed: *failed,
                    }],
                })
                .collect(),
        }
    }

    #[test]
    fn a_trajectory_becomes_turns_with_tokens_from_its_lengths_and_failed_tools() {
        let raw: RawRun = serde_json::from_value(serde_json::json!({
            "task_id": 3, "trial": 1, "reward": 0.0, "traj": [
                {"role": "system", "content": "12345678"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "book", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "book", "content": "Error: no seats"},
                {"role": "assistant", "content": "Sorry."}
            ]
        }))
        .unwrap();
        let r = convert(raw);
        assert!(!r.passed);
        assert_eq!(r.turns.len(), 2);
        assert_eq!(r.turns[0].input_tokens, 2, "8 characters of system prompt");
        assert_eq!(r.turns[0].calls[0].tool, "book");
        assert!(r.turns[0].calls[0].failed);
        assert!(r.turns[1].calls.is_empty());
    }

    #[test]
    fn a_changed_tool_mix_in_the_last_quarter_hour_is_seen_as_drift_and_the_same_mix_is_not() {
        let a = run_of(
            &[("search", false), ("book", false), ("search", false)],
            true,
        );
        let b = run_of(
            &[
                ("cancel", false),
                ("refund", false),
                ("cancel", false),
                ("cancel", false),
            ],
            true,
        );
        let before: Vec<&TauRun> = std::iter::repeat_n(&a, 150).collect();
        let after: Vec<&TauRun> = std::iter::repeat_n(&b, 60).collect();
        let spec = AlertSpec::default();
        let f = replay(&before, &after, &spec).unwrap();
        assert!(
            f.fired_rule(fleet_commander::detect::Rule::BehaviourDrift),
            "{:?}",
            f.fired
        );
        let same: Vec<&TauRun> = std::iter::repeat_n(&a, 60).collect();
        let f = replay(&before, &same, &spec).unwrap();
        assert!(
            !f.fired_rule(fleet_commander::detect::Rule::BehaviourDrift),
            "{:?}",
            f.fired
        );
    }
}

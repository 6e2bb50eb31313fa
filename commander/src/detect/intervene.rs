//! The escalation ladder, as pure functions: which steps of `[[escalation]]` are due for
//! the alerts firing now, which interventions end because their alert resolved, and what
//! each worker should be told (its mode and throttle) given every intervention in force.
//! `act.rs` does the I/O.
//!
//! An intervention is named `<alert id>:<step name>`: a step runs once per alert
//! occurrence, whichever replica or restart looks at it again (idempotent), and a step
//! reverted by hand is not re-applied while the same alert fires.

use std::collections::{BTreeMap, BTreeSet};

use fleet_worker::control::{Command, Mode};
use serde::{Deserialize, Serialize};

use super::lifecycle::{Alert, AlertState};
use super::rules::Severity;
use crate::fleet::view::FleetSnapshot;
use crate::policy::live::Block;
use crate::policy::schema::{BlockScope, EscalationAction, EscalationSpec};

/// What an intervention acts on: the alert's worker, every worker of its pool, or nothing
/// it can act on (a fleet-wide alert).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Worker(String),
    Pool(String),
    Fleet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterventionState {
    /// In force (throttle, pause, drain) until its alert resolves or it is reverted.
    Active,
    /// Done once (log, notify, cancel_task): nothing to undo.
    Done,
    /// Nothing to act on (say why in `note`).
    Skipped,
    /// Undone: its alert resolved, or someone reverted it.
    Reverted,
}

impl InterventionState {
    pub fn as_str(self) -> &'static str {
        match self {
            InterventionState::Active => "active",
            InterventionState::Done => "done",
            InterventionState::Skipped => "skipped",
            InterventionState::Reverted => "reverted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            InterventionState::Active,
            InterventionState::Done,
            InterventionState::Skipped,
            InterventionState::Reverted,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// A worker's answer to the commands an intervention needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerOutcome {
    pub worker: String,
    /// The commands sent, in order (`pause`, `throttle` …).
    pub commands: Vec<String>,
    pub ok: bool,
    /// The worker answered and refused (it cannot obey that command): not asked again
    /// for this change. Without an answer it is asked again on the next tick.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub at_ms: u64,
}

/// One step of the ladder applied to one alert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intervention {
    /// `<alert id>:<step name>`.
    pub id: String,
    pub alert_id: String,
    pub rule: String,
    pub step: String,
    pub action: EscalationAction,
    /// The rung of the ladder (1 log, 3 notify, 4 intervention).
    pub level: u8,
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// `block`: the scope refused dispatch and its value (from the alert's labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<(BlockScope, String)>,
    /// `reroute`: the pool whose work moves, and where to (its `fallback_pool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reroute: Option<(String, String)>,
    /// An operator's pool weight: the pool's candidate scores are multiplied by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<(String, f64)>,
    pub sticky: bool,
    pub state: InterventionState,
    /// What was done, in words (or why nothing was).
    pub note: String,
    pub applied_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_ms: Option<u64>,
    /// `alert resolved`, or the operator who reverted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_by: Option<String>,
    /// The latest answer of each worker it reached.
    #[serde(default)]
    pub workers: Vec<WorkerOutcome>,
}

impl Intervention {
    /// Whether it changes how workers run while in force.
    pub fn controls_workers(&self) -> bool {
        matches!(
            self.action,
            EscalationAction::Throttle | EscalationAction::Pause | EscalationAction::Drain
        )
    }

    /// Records a worker's latest answer (one entry per worker).
    pub fn outcome(&mut self, o: WorkerOutcome) {
        const MAX_LISTED: usize = 256;
        if let Some(w) = self.workers.iter_mut().find(|w| w.worker == o.worker) {
            *w = o;
        } else if self.workers.len() < MAX_LISTED {
            self.workers.push(o);
        }
    }
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "info" => 0,
        "warning" => 1,
        _ => 2,
    }
}

fn rank(s: Severity) -> u8 {
    severity_rank(s.as_str())
}

fn applies(step: &EscalationSpec, a: &Alert) -> bool {
    (step.rules.is_empty() || step.rules.iter().any(|r| r == a.rule.as_str()))
        && rank(a.severity) >= severity_rank(&step.severity)
}

/// The alert's target: its worker, else its pool, else the fleet.
fn target_of(a: &Alert) -> Target {
    if let Some(w) = a.labels.get("worker") {
        Target::Worker(w.clone())
    } else if let Some(p) = a.labels.get("pool") {
        Target::Pool(p.clone())
    } else {
        Target::Fleet
    }
}

/// The task the alert's worker is running, for `cancel_task` and `restart_task`.
fn task_of(a: &Alert, snapshot: &FleetSnapshot) -> Option<String> {
    if let Some(t) = &a.links.task {
        return Some(t.clone());
    }
    let w = a.labels.get("worker")?;
    snapshot
        .workers
        .iter()
        .find(|x| &x.id == w)
        .and_then(|x| x.current_task.clone())
}

/// The steps due now for the firing alerts, as new interventions (those whose id `known`
/// already has are left alone). One-shot steps come out `Done` (or `Skipped`); the I/O
/// then carries them out.
pub fn due(
    open: &[Alert],
    steps: &[EscalationSpec],
    snapshot: &FleetSnapshot,
    known: impl Fn(&str) -> bool,
    now_ms: u64,
) -> Vec<Intervention> {
    let mut out = Vec::new();
    for a in open.iter().filter(|a| a.state == AlertState::Firing) {
        let Some(firing) = a.firing_ms else { continue };
        for step in steps.iter().filter(|s| applies(s, a)) {
            let id = format!("{}:{}", a.id, step.name);
            if now_ms < firing.saturating_add(step.after_s.saturating_mul(1000)) || known(&id) {
                continue;
            }
            out.push(plan_step(a, step, snapshot, id, now_ms));
        }
    }
    out
}

/// A `cancel_task` or `restart_task` step: done once on the alert's worker's task, or
/// skipped with why.
fn task_step(
    action: EscalationAction,
    target: &Target,
    task_id: Option<&str>,
) -> (InterventionState, String) {
    let verb = if action == EscalationAction::CancelTask {
        "cancel"
    } else {
        "restart"
    };
    match (target, task_id) {
        (Target::Worker(_), Some(t)) => (InterventionState::Done, format!("{verb} task {t}")),
        (Target::Worker(w), None) => (
            InterventionState::Skipped,
            format!("worker {w} is running no task to {verb}"),
        ),
        _ => (
            InterventionState::Skipped,
            format!("{} needs an alert about one worker", action.as_str()),
        ),
    }
}

fn plan_step(
    a: &Alert,
    step: &EscalationSpec,
    snapshot: &FleetSnapshot,
    id: String,
    now_ms: u64,
) -> Intervention {
    let target = target_of(a);
    let task_id = matches!(
        step.action,
        EscalationAction::CancelTask | EscalationAction::RestartTask
    )
    .then(|| task_of(a, snapshot))
    .flatten();
    let block = step
        .block
        .and_then(|scope| a.labels.get(scope.as_str()).map(|v| (scope, v.clone())));
    let (state, note) = match step.action {
        EscalationAction::Log => (InterventionState::Done, "logged".to_string()),
        EscalationAction::Notify => (
            InterventionState::Done,
            format!("sent to sink {}", step.sink.as_deref().unwrap_or("?")),
        ),
        EscalationAction::Block => match (&block, step.block) {
            (Some((scope, value)), _) => (
                InterventionState::Active,
                format!(
                    "{} {value} blocked while this lasts: {}",
                    scope.as_str(),
                    a.message
                ),
            ),
            (None, scope) => (
                InterventionState::Skipped,
                format!(
                    "the alert has no {} label to block",
                    scope.map_or("?", BlockScope::as_str)
                ),
            ),
        },
        _ if target == Target::Fleet => (
            InterventionState::Skipped,
            "a fleet-wide alert names no worker or pool to act on".to_string(),
        ),
        EscalationAction::CancelTask | EscalationAction::RestartTask => {
            task_step(step.action, &target, task_id.as_deref())
        }
        EscalationAction::Reroute => match &target {
            Target::Pool(p) | Target::Worker(p) if a.labels.contains_key("pool") => (
                InterventionState::Active,
                format!("reroute pool {}", a.labels.get("pool").unwrap_or(p)),
            ),
            _ => (
                InterventionState::Skipped,
                "the alert names no pool to reroute".to_string(),
            ),
        },
        EscalationAction::Throttle => (
            InterventionState::Active,
            format!(
                "throttle to {} task(s)/s",
                step.tasks_per_s.unwrap_or_default()
            ),
        ),
        EscalationAction::Pause => (InterventionState::Active, "pause".to_string()),
        EscalationAction::Drain => (InterventionState::Active, "drain".to_string()),
    };
    Intervention {
        id,
        alert_id: a.id.clone(),
        rule: a.rule.as_str().to_string(),
        step: step.name.clone(),
        action: step.action,
        level: step.action.level(),
        target,
        task_id,
        tasks_per_s: step.tasks_per_s,
        sink: step.sink.clone(),
        block,
        reroute: None,
        weight: None,
        sticky: step.sticky,
        state,
        note,
        applied_ms: now_ms,
        reverted_ms: None,
        reverted_by: None,
        workers: Vec::new(),
    }
}

/// Active, non-sticky interventions whose alert is no longer firing: they end.
pub fn ended<'a>(
    active: impl IntoIterator<Item = &'a Intervention>,
    open: &[Alert],
) -> Vec<String> {
    let firing: BTreeSet<&str> = open
        .iter()
        .filter(|a| a.state == AlertState::Firing)
        .map(|a| a.id.as_str())
        .collect();
    active
        .into_iter()
        .filter(|i| i.state == InterventionState::Active && !i.sticky)
        .filter(|i| !firing.contains(i.alert_id.as_str()))
        .map(|i| i.id.clone())
        .collect()
}

/// The dispatch blocks the active `block` interventions ask for, in a stable order.
pub fn blocks<'a>(active: impl IntoIterator<Item = &'a Intervention>) -> Vec<Block> {
    let mut out: Vec<Block> = active
        .into_iter()
        .filter(|i| i.state == InterventionState::Active)
        .filter_map(|i| {
            let (scope, value) = i.block.clone()?;
            Some(Block {
                scope,
                value,
                intervention: i.id.clone(),
                reason: i.note.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.intervention.cmp(&b.intervention));
    out
}

/// The forced reroutes the active `reroute` interventions ask for.
pub fn reroutes<'a>(
    active: impl IntoIterator<Item = &'a Intervention>,
) -> Vec<crate::route::decide::PolicyReroute> {
    let mut out: Vec<_> = active
        .into_iter()
        .filter(|i| i.state == InterventionState::Active)
        .filter_map(|i| {
            let (from, to) = i.reroute.clone()?;
            Some(crate::route::decide::PolicyReroute {
                forced: Some(format!("rerouted by intervention {}", i.id)),
                from,
                to,
                error_rate_above: None,
                p95_latency_ms_above: None,
            })
        })
        .collect();
    out.sort_by(|a, b| a.from.cmp(&b.from));
    out.dedup_by(|a, b| a.from == b.from);
    out
}

/// The pool weights the active operator interventions set (the newest per pool).
pub fn weights<'a>(active: impl IntoIterator<Item = &'a Intervention>) -> Vec<(String, f64)> {
    let mut newest: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for i in active
        .into_iter()
        .filter(|i| i.state == InterventionState::Active)
    {
        if let Some((pool, w)) = &i.weight {
            let e = newest.entry(pool.clone()).or_insert((i.applied_ms, *w));
            if i.applied_ms >= e.0 {
                *e = (i.applied_ms, *w);
            }
        }
    }
    newest.into_iter().map(|(p, (_, w))| (p, w)).collect()
}

/// How a worker should run, given every intervention in force on it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerControl {
    pub mode: Mode,
    pub tasks_per_s: Option<f64>,
    /// The interventions that ask for it.
    pub because: Vec<String>,
}

impl Default for WorkerControl {
    fn default() -> Self {
        WorkerControl {
            mode: Mode::Running,
            tasks_per_s: None,
            because: Vec::new(),
        }
    }
}

/// Pause wins over drain, drain over running; the lowest throttle wins.
fn stronger(a: Mode, b: Mode) -> Mode {
    let rank = |m: Mode| match m {
        Mode::Running => 0,
        Mode::Draining => 1,
        Mode::Paused => 2,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// What every worker touched by an active intervention should be told. A pool target
/// reaches the pool's workers that are not lost, so a worker that joins later is told too.
pub fn desired<'a>(
    active: impl IntoIterator<Item = &'a Intervention>,
    snapshot: &FleetSnapshot,
) -> BTreeMap<String, WorkerControl> {
    let mut out: BTreeMap<String, WorkerControl> = BTreeMap::new();
    for i in active
        .into_iter()
        .filter(|i| i.state == InterventionState::Active && i.controls_workers())
    {
        let workers: Vec<&str> = match &i.target {
            Target::Worker(w) => vec![w.as_str()],
            Target::Pool(p) => snapshot
                .workers
                .iter()
                .filter(|w| !w.lost && w.pool.as_deref() == Some(p.as_str()))
                .map(|w| w.id.as_str())
                .collect(),
            Target::Fleet => Vec::new(),
        };
        for w in workers {
            let c = out.entry(w.to_string()).or_default();
            match i.action {
                EscalationAction::Pause => c.mode = stronger(c.mode, Mode::Paused),
                EscalationAction::Drain => c.mode = stronger(c.mode, Mode::Draining),
                EscalationAction::Throttle => {
                    let r = i.tasks_per_s.unwrap_or(f64::MAX);
                    c.tasks_per_s = Some(c.tasks_per_s.map_or(r, |x| x.min(r)));
                }
                _ => {}
            }
            c.because.push(i.id.clone());
        }
    }
    out
}

/// The interventions a change of what a worker is told is for: those that started or ended
/// since it was told last, or (a command sent again) those in force.
pub fn changed_by(from: &WorkerControl, to: &WorkerControl) -> Vec<String> {
    let was: BTreeSet<&String> = from.because.iter().collect();
    let is: BTreeSet<&String> = to.because.iter().collect();
    let diff: Vec<String> = was
        .symmetric_difference(&is)
        .map(|s| (*s).clone())
        .collect();
    if diff.is_empty() {
        to.because.clone()
    } else {
        diff
    }
}

/// The commands that take a worker from what it was told last to what it should be.
pub fn commands(from: &WorkerControl, to: &WorkerControl) -> Vec<Command> {
    let mut out = Vec::new();
    if from.mode != to.mode {
        out.push(match to.mode {
            Mode::Running => Command::Resume,
            Mode::Paused => Command::Pause,
            Mode::Draining => Command::Drain,
        });
    }
    if from.tasks_per_s != to.tasks_per_s {
        out.push(match to.tasks_per_s {
            Some(tasks_per_s) => Command::Throttle { tasks_per_s },
            None => Command::Unthrottle,
        });
    }
    out
}

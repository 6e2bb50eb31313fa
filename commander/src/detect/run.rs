//! The detector's loop: once every `detect.interval_ms`, the fleet snapshot and the policy
//! in force in; what fired, renotified or resolved out to the alert log, to
//! `<prefix>.alerts.<severity>` and to the gauges; then the escalation ladder (`act.rs`). A slow or failing publish never holds
//! up the next tick beyond its own await; the detector never touches ingest or the task
//! path, it only reads the snapshot the fleet owner publishes anyway.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fleet_worker::protocol::Subjects;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::watch;

use super::{Alert, AlertLog, AlertState, Change, Detector, Rule};
use crate::domain::Clock;
use crate::fleet::FleetHandle;
use crate::fleet::view::FleetSnapshot;
use crate::policy::PolicyEngine;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub rule: &'static str,
    pub severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub rule: &'static str,
    pub change: &'static str,
}

/// The detector's gauges and counters (on `/metrics` with the `fleet_` prefix).
#[derive(Debug, Default)]
pub struct DetectCounters {
    /// Alerts firing now, by rule and severity.
    pub firing: Family<AlertLabels, Gauge>,
    /// Alert changes (pending, firing, renotify, resolved, dropped), by rule.
    pub changes: Family<ChangeLabels, Counter>,
    /// New alerts refused because `detect.max_open` were open.
    pub refused: Counter,
    /// Alert messages that could not be published on NATS.
    pub publish_errors: Counter,
    /// Detector ticks run.
    pub ticks: Counter,
    /// Alert messages a silence kept from NATS and the sinks.
    pub silenced: Counter,
    /// 1 while this replica notifies the fleet's alerts (`lead.rs`).
    pub leader: Gauge,
}

impl DetectCounters {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("alerts_firing", "Alerts firing now", self.firing.clone());
        r.register(
            "alert_changes",
            "Alert changes (pending, firing, renotify, resolved, dropped)",
            self.changes.clone(),
        );
        r.register(
            "alerts_refused",
            "New alerts refused because detect.max_open were open",
            self.refused.clone(),
        );
        r.register(
            "alert_publish_errors",
            "Alert messages not published on NATS",
            self.publish_errors.clone(),
        );
        r.register("detect_ticks", "Detector evaluations", self.ticks.clone());
        r.register(
            "alerts_leader",
            "1 while this replica leads: it notifies the fleet's alerts and exports kept traces (one replica does)",
            self.leader.clone(),
        );
        r.register(
            "alerts_silenced",
            "Alert messages a silence kept from NATS and the sinks",
            self.silenced.clone(),
        );
    }
}

/// What the API reads of detection: the open alerts (refreshed each tick), the log and
/// the sinks' delivery state.
#[derive(Clone, Debug)]
pub struct Alerts {
    pub log: AlertLog,
    pub open: Arc<ArcSwap<Vec<Alert>>>,
    pub counters: Arc<DetectCounters>,
    pub sinks: super::sinks::Sinks,
    pub silences: super::silence::Silences,
    pub interventions: super::act::InterventionLog,
    /// Wakes the loop before its next tick (an operator's pause or resume is carried out
    /// at once, not within the second).
    pub kick: Arc<tokio::sync::Notify>,
    /// Where the operator's changes go for the other replicas (none in unit tests).
    pub shared: Option<Arc<super::shared::Share>>,
}

impl Alerts {
    /// Hands an operator's change to the other replicas (`detect::shared`).
    pub fn share(&self, edit: super::shared::Edit) {
        if let Some(s) = &self.shared {
            s.offer(edit);
        }
    }

    pub fn new(
        log: AlertLog,
        sinks: super::sinks::Sinks,
        silences: super::silence::Silences,
        interventions: super::act::InterventionLog,
    ) -> Self {
        Self {
            log,
            open: Arc::new(ArcSwap::from_pointee(Vec::new())),
            counters: Arc::new(DetectCounters::default()),
            sinks,
            silences,
            interventions,
            kick: Arc::new(tokio::sync::Notify::new()),
            shared: None,
        }
    }
}

/// The message on `<prefix>.alerts.<severity>`.
#[derive(Debug, Serialize)]
pub struct AlertMessage<'a> {
    /// `firing`, `renotify` or `resolved`.
    pub event: &'static str,
    pub alert: &'a Alert,
}

/// What the loop reads and where it writes.
#[derive(Debug)]
pub struct Wiring {
    pub alerts: Alerts,
    pub fleet: FleetHandle,
    pub engine: Arc<PolicyEngine>,
    /// Where a cancel or restart of a task is noted beside its routing decision.
    pub decisions: crate::decisions::DecisionLog,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub clock: Arc<dyn Clock>,
    pub interval: Duration,
    pub max_open: usize,
    /// Where open alerts flag their workers' and tasks' traces for keeping.
    pub trace_flags: crate::traces::flags::Flags,
    /// Whether this replica notifies alerts and takes the ladder's one-shot steps now.
    pub leading: super::lead::Leading,
}

/// Evaluates every `interval` until `stop`.
pub async fn run(w: Arc<Wiring>, mut stop: watch::Receiver<bool>) {
    let mut detector = Detector::new(w.max_open);
    let mut actor = super::act::Actor::default();
    let mut tick = tokio::time::interval(w.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut drift: Option<tokio::task::JoinHandle<Vec<super::rules::Observation>>> = None;
    let mut was_leading = false;
    loop {
        // A kick (an operator's command) only brings the workers to the interventions in
        // force: the rules run on the tick, once per snapshot, as their history expects.
        let kicked = tokio::select! {
            _ = tick.tick() => false,
            _ = w.alerts.kick.notified() => true,
            _ = stop.changed() => return,
        };
        let snapshot = w.fleet.snapshot();
        let live = w.engine.live();
        let now_ms = w.clock.now_ms();
        let leading = w.leading.now();
        w.alerts.counters.leader.set(i64::from(leading));
        let open = if kicked {
            w.alerts.open.load_full().as_ref().clone()
        } else {
            detect_once(
                &w,
                &mut detector,
                &mut drift,
                (&snapshot, &live),
                now_ms,
                leading,
            )
            .await
        };
        if leading && !was_leading {
            take_over(&w, &open).await;
        }
        was_leading = leading;
        actor
            .tick(&super::act::Tick {
                log: &w.alerts.interventions,
                sinks: &w.alerts.sinks,
                client: &w.client,
                subjects: &w.subjects,
                steps: &live.policy.escalation,
                open: &open,
                snapshot: &snapshot,
                now_ms,
                engine: &w.engine,
                decisions: Some(&w.decisions),
                leading,
            })
            .await;
        if !kicked {
            let (refused, counted) = (detector.refused(), w.alerts.counters.refused.get());
            if refused > counted {
                w.alerts.counters.refused.inc_by(refused - counted);
            }
            w.alerts.open.store(Arc::new(open));
        }
    }
}

/// One evaluation of the rules: alerts settled (stored, and published and delivered when
/// `leading`), and the open ones, with their silences, returned.
async fn detect_once(
    w: &Wiring,
    detector: &mut Detector,
    drift: &mut Option<tokio::task::JoinHandle<Vec<super::rules::Observation>>>,
    (snapshot, live): (&FleetSnapshot, &crate::policy::live::Live),
    now_ms: u64,
    leading: bool,
) -> Vec<Alert> {
    step_drift(detector, drift, snapshot, &live.policy.alerts, now_ms).await;
    let changes = detector.tick(snapshot, &live.policy.alerts, &live.routing.pools, now_ms);
    w.alerts.counters.ticks.inc();
    for (change, alert) in &changes {
        settle(w, *change, alert, now_ms, leading).await;
    }
    let mut open = detector.open();
    for a in &mut open {
        a.silenced_by = w.alerts.silences.muting(a, now_ms);
    }
    set_gauges(&w.alerts.counters, &open);
    flag_traces(&w.trace_flags, &open, now_ms, w.interval);
    open
}

/// Every open alert (pending or firing) flags its worker's traces and its task's, so the
/// trace keeper keeps them (docs/traces.md). A worker's flag lasts while the alert is
/// open, refreshed each tick.
fn flag_traces(
    flags: &crate::traces::flags::Flags,
    open: &[super::lifecycle::Alert],
    now_ms: u64,
    interval: Duration,
) {
    let until = now_ms.saturating_add(2 * interval.as_millis() as u64);
    for a in open {
        let rule = a.rule.as_str();
        if let Some(w) = &a.links.worker {
            flags.flag_worker(w, rule, a.started_ms, until);
        }
        if let Some(t) = &a.links.task {
            flags.flag_task(t, rule, now_ms);
        }
    }
}

/// Takes a finished drift evaluation's verdicts, and starts the next one when it is due
/// (on a blocking thread: a drifting group can take tens of thousands of splits).
async fn step_drift(
    detector: &mut Detector,
    running: &mut Option<tokio::task::JoinHandle<Vec<super::rules::Observation>>>,
    snapshot: &crate::fleet::view::FleetSnapshot,
    spec: &crate::policy::schema::AlertSpec,
    now_ms: u64,
) {
    if let Some(job) = running.take_if(|j| j.is_finished()) {
        match job.await {
            Ok(observations) => detector.drift_done(observations),
            Err(e) => {
                tracing::error!(error = %e, "drift evaluation failed");
                detector.drift_done(Vec::new());
            }
        }
    }
    if running.is_none()
        && let Some(job) = detector.drift_job(snapshot, spec, now_ms)
    {
        *running = Some(tokio::task::spawn_blocking(move || {
            let _span = tracing::debug_span!("drift", groups = job.view.groups.len()).entered();
            job.run()
        }));
    }
}

/// On becoming the replica that notifies: the alerts firing here are sent, as this
/// replica sees them, so their receivers hear from it when they resolve (the replica that
/// led before may be gone).
async fn take_over(w: &Wiring, open: &[Alert]) {
    let firing = open
        .iter()
        .filter(|a| a.state == AlertState::Firing && a.silenced_by.is_none());
    for alert in firing {
        send(w, Change::Firing, alert).await;
    }
}

/// Counts, stores and publishes one change (a silenced one is stored, not sent; nor is
/// any while another replica notifies).
async fn settle(w: &Wiring, change: Change, alert: &Alert, now_ms: u64, leading: bool) {
    let mut alert = alert.clone();
    alert.silenced_by = w.alerts.silences.muting(&alert, now_ms);
    let alert = &alert;
    w.alerts
        .counters
        .changes
        .get_or_create(&ChangeLabels {
            rule: alert.rule.as_str(),
            change: change.as_str(),
        })
        .inc();
    if !change.is_sent() {
        return;
    }
    match change {
        Change::Firing => {
            tracing::warn!(alert = %alert.id, rule = alert.rule.as_str(), severity = alert.severity.as_str(), value = alert.value, threshold = alert.threshold, "{}", alert.message)
        }
        Change::Resolved => {
            tracing::info!(alert = %alert.id, rule = alert.rule.as_str(), reason = alert.ended_reason.as_deref().unwrap_or(""), "alert resolved")
        }
        _ => {}
    }
    if let Err(e) = w.alerts.log.record(alert) {
        tracing::error!(alert = %alert.id, error = %e, "alert not stored");
    }
    if alert.silenced_by.is_some() {
        w.alerts.counters.silenced.inc();
        return;
    }
    if leading {
        send(w, change, alert).await;
    }
}

/// Hands one change to the sinks and publishes it on `<prefix>.alerts.<severity>`.
async fn send(w: &Wiring, change: Change, alert: &Alert) {
    let msg = AlertMessage {
        event: change.as_str(),
        alert,
    };
    let Ok(body) = serde_json::to_vec(&msg) else {
        return;
    };
    w.alerts.sinks.offer(change, alert);
    let subject = w.subjects.alerts(alert.severity.as_str());
    if let Err(e) = w.client.publish(subject, body.into()).await {
        w.alerts.counters.publish_errors.inc();
        tracing::warn!(alert = %alert.id, error = %e, "alert not published");
    }
}

/// Firing alerts per rule, counted in one pass; every rule is set (to 0 when quiet).
fn set_gauges(c: &DetectCounters, open: &[Alert]) {
    let mut firing = [0i64; Rule::ALL.len()];
    for a in open.iter().filter(|a| a.state == AlertState::Firing) {
        if let Some(i) = Rule::ALL.iter().position(|r| *r == a.rule) {
            firing[i] += 1;
        }
    }
    for (rule, n) in Rule::ALL.into_iter().zip(firing) {
        c.firing
            .get_or_create(&AlertLabels {
                rule: rule.as_str(),
                severity: rule.severity().as_str(),
            })
            .set(n);
    }
}

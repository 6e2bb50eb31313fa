//! An alert's life: pending (its condition holds, not yet for long enough) → firing →
//! resolved (its value stayed back below the resolve level for `resolve_s`, or its scope
//! sent no data for `no_data_s`). One alert per rule and scope (its dedup key); a firing
//! alert is sent again every `renotify_s`. Pure: observations and the time in, the changes
//! to publish and store out.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::rules::{Links, Observation, Rule, Severity};
use crate::policy::schema::AlertSpec;

/// Where an alert is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Pending,
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// One alert, as stored, served and published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Rule, scope and the time its condition was first seen: unique per occurrence.
    pub id: String,
    pub rule: Rule,
    pub severity: Severity,
    pub labels: BTreeMap<String, String>,
    pub state: AlertState,
    /// The last value seen, and the threshold it is compared with.
    pub value: f64,
    pub threshold: f64,
    pub message: String,
    /// When the condition was first seen (pending from then).
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firing_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Why it resolved: `recovered`, `no_data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_reason: Option<String>,
    pub links: Links,
    /// The silence muting it (not published nor delivered while that silence lasts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silenced_by: Option<String>,
    /// Its transitions, oldest first (bounded).
    #[serde(default)]
    pub history: Vec<Transition>,
    /// When it was last sent (firing or renotified).
    #[serde(skip)]
    last_sent_ms: u64,
    /// When the value was last above the resolve level, or last seen at all.
    #[serde(skip)]
    last_holding_ms: u64,
    #[serde(skip)]
    last_seen_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub state: AlertState,
    pub value: f64,
}

/// What happened to an alert at this tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Its condition was seen; it fires if it holds for the rule's `for`.
    Pending,
    Firing,
    /// Still firing; sent again.
    Renotify,
    Resolved,
    /// Its condition went away before it fired.
    Dropped,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Pending => "pending",
            Change::Firing => "firing",
            Change::Renotify => "renotify",
            Change::Resolved => "resolved",
            Change::Dropped => "dropped",
        }
    }

    /// Whether receivers hear of it (alert stream and sinks).
    pub fn is_sent(self) -> bool {
        matches!(self, Change::Firing | Change::Renotify | Change::Resolved)
    }
}

/// The dedup key: the rule and the scope labels.
pub type Key = (Rule, BTreeMap<String, String>);

/// Transitions kept per alert.
const MAX_TRANSITIONS: usize = 16;

/// The open alerts (pending and firing), bounded.
#[derive(Debug, Default)]
pub struct Lifecycle {
    open: HashMap<Key, Alert>,
    /// New alerts not opened because `max_open` were open.
    pub refused: u64,
}

impl Lifecycle {
    pub fn open(&self) -> impl Iterator<Item = &Alert> {
        self.open.values()
    }

    /// Steps every alert by this tick's observations. An open alert its rule did not
    /// observe is recovering when `present` says its scope is still reporting, and has no
    /// data otherwise. Returns each change with the alert as it is after it; resolved and
    /// dropped alerts leave the open set.
    pub fn step(
        &mut self,
        observations: Vec<Observation>,
        present: impl Fn(&BTreeMap<String, String>) -> bool,
        spec: &AlertSpec,
        now_ms: u64,
        max_open: usize,
    ) -> Vec<(Change, Alert)> {
        let mut changes = Vec::new();
        for o in observations {
            let key: Key = (o.rule, o.labels.clone());
            match self.open.get_mut(&key) {
                Some(a) => {
                    if let Some(c) = advance(a, &o, spec, now_ms) {
                        changes.push((c, a.clone()));
                    }
                }
                None if o.active => {
                    if self.open.len() >= max_open {
                        self.refused += 1;
                        continue;
                    }
                    let mut a = new_alert(&o, now_ms);
                    let change = if o.rule.for_ms(spec) == 0 {
                        fire(&mut a, now_ms);
                        Change::Firing
                    } else {
                        Change::Pending
                    };
                    changes.push((change, a.clone()));
                    self.open.insert(key, a);
                }
                None => {}
            }
        }
        for a in self.open.values_mut() {
            if a.last_seen_ms == now_ms {
                continue;
            }
            if let Some(c) = unobserved(a, present(&a.labels), spec, now_ms) {
                changes.push((c, a.clone()));
            }
        }
        self.open.retain(|_, a| a.state != AlertState::Resolved);
        changes
    }
}

/// An open alert its rule had nothing to say about this tick.
fn unobserved(a: &mut Alert, present: bool, spec: &AlertSpec, now_ms: u64) -> Option<Change> {
    if a.state == AlertState::Pending {
        a.state = AlertState::Resolved;
        a.ended_ms = Some(now_ms);
        return Some(Change::Dropped);
    }
    if present {
        // Its scope reports and the value is back below the resolve level.
        a.last_seen_ms = now_ms;
        if now_ms.saturating_sub(a.last_holding_ms) >= spec.resolve_s * 1000 {
            end(a, now_ms, "recovered");
            return Some(Change::Resolved);
        }
    } else {
        // No data: not sent again while nothing is known of it.
        if now_ms.saturating_sub(a.last_seen_ms) >= spec.no_data_s * 1000 {
            end(a, now_ms, "no_data");
            return Some(Change::Resolved);
        }
        return None;
    }
    renotify(a, spec, now_ms)
}

fn renotify(a: &mut Alert, spec: &AlertSpec, now_ms: u64) -> Option<Change> {
    (a.state == AlertState::Firing
        && now_ms.saturating_sub(a.last_sent_ms) >= spec.renotify_s * 1000)
        .then(|| {
            a.last_sent_ms = now_ms;
            Change::Renotify
        })
}

fn new_alert(o: &Observation, now_ms: u64) -> Alert {
    let scope: Vec<String> = o.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Alert {
        id: format!("{}:{}:{now_ms}", o.rule.as_str(), scope.join(",")),
        rule: o.rule,
        severity: o.rule.severity(),
        labels: o.labels.clone(),
        state: AlertState::Pending,
        value: o.value,
        threshold: o.threshold,
        message: o.message.clone(),
        started_ms: now_ms,
        firing_ms: None,
        ended_ms: None,
        ended_reason: None,
        links: o.links.clone(),
        silenced_by: None,
        history: vec![Transition {
            at_ms: now_ms,
            state: AlertState::Pending,
            value: o.value,
        }],
        last_sent_ms: 0,
        last_holding_ms: now_ms,
        last_seen_ms: now_ms,
    }
}

fn push(a: &mut Alert, at_ms: u64, state: AlertState) {
    if a.history.len() >= MAX_TRANSITIONS {
        a.history.remove(1);
    }
    a.history.push(Transition {
        at_ms,
        state,
        value: a.value,
    });
}

fn fire(a: &mut Alert, now_ms: u64) {
    a.state = AlertState::Firing;
    a.firing_ms = Some(now_ms);
    a.last_sent_ms = now_ms;
    push(a, now_ms, AlertState::Firing);
}

fn end(a: &mut Alert, now_ms: u64, reason: &'static str) {
    a.state = AlertState::Resolved;
    a.ended_ms = Some(now_ms);
    a.ended_reason = Some(reason.to_string());
    push(a, now_ms, AlertState::Resolved);
}

/// One open alert and this tick's observation of its scope.
fn advance(a: &mut Alert, o: &Observation, spec: &AlertSpec, now_ms: u64) -> Option<Change> {
    a.last_seen_ms = now_ms;
    a.value = o.value;
    a.threshold = o.threshold;
    a.links = o.links.clone();
    match a.state {
        AlertState::Pending if !o.active => {
            a.state = AlertState::Resolved;
            a.ended_ms = Some(now_ms);
            Some(Change::Dropped)
        }
        AlertState::Pending => {
            a.message.clone_from(&o.message);
            (now_ms.saturating_sub(a.started_ms) >= o.rule.for_ms(spec)).then(|| {
                fire(a, now_ms);
                Change::Firing
            })
        }
        AlertState::Firing => {
            if o.holding {
                a.last_holding_ms = now_ms;
                a.message.clone_from(&o.message);
            } else if now_ms.saturating_sub(a.last_holding_ms) >= spec.resolve_s * 1000 {
                end(a, now_ms, "recovered");
                return Some(Change::Resolved);
            }
            renotify(a, spec, now_ms)
        }
        AlertState::Resolved => None,
    }
}

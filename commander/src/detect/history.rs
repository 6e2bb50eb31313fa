//! The detector's short memory of the snapshots it saw: what the rules compare "now"
//! against (a 5-minute throughput baseline, the stuck count five minutes ago, each
//! agent's spend and tasks over the last hour). Bounded: a few minutes of per-second
//! fleet samples, and per agent one sample every five minutes for an hour.

use std::collections::{HashMap, VecDeque};

use crate::fleet::view::FleetSnapshot;
use crate::fleet::worker::State;

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
/// Fleet samples kept: the 5-minute baseline, the gap after it and the window compared
/// with it.
const FLEET_KEEP_MS: u64 = 7 * MINUTE;
/// The window "now" is measured over, and the resolution of the throughput rule.
const NOW_WINDOW_MS: u64 = 30 * SECOND;
const BASELINE_MS: u64 = 5 * MINUTE;
/// Between the throughput baseline and the window compared with it: a drop that has begun
/// must not become its own baseline while its alert is pending (`pending_s`, 60 s by
/// default). Without the gap, the baseline took in a minute of the drop before it could
/// fire, and a 44 % drop read as under 30 % by then.
pub const THROUGHPUT_GAP_MS: u64 = MINUTE;
/// One per-agent sample every this long, for an hour.
const AGENT_STEP_MS: u64 = 5 * MINUTE;
const AGENT_KEEP_MS: u64 = 60 * MINUTE;
/// The least history an hourly average is taken over (a rate from two minutes of data
/// would call every burst a runaway).
pub const MIN_HOUR_SPAN_MS: u64 = 15 * MINUTE;

#[derive(Clone, Copy, Debug)]
struct FleetSample {
    at_ms: u64,
    output_tokens_per_s: f64,
    stuck: u64,
}

#[derive(Clone, Copy, Debug)]
struct AgentSample {
    at_ms: u64,
    cost_usd: f64,
    tasks: u64,
}

#[derive(Debug, Default)]
struct Agent {
    pool: Option<String>,
    samples: VecDeque<AgentSample>,
    /// The latest figures (sampled every tick, kept every `AGENT_STEP_MS`).
    now: Option<AgentSample>,
}

/// One agent's part of the fleet's last hour.
#[derive(Clone, Debug, PartialEq)]
pub struct Share {
    pub worker: String,
    pub pool: Option<String>,
    pub cost_share: f64,
    pub task_share: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HourShares {
    pub total_cost: f64,
    pub workers: Vec<Share>,
}

#[derive(Debug, Default)]
pub struct History {
    fleet: VecDeque<FleetSample>,
    agents: HashMap<String, Agent>,
    /// The first snapshot seen.
    since_ms: Option<u64>,
    last_ms: u64,
}

impl History {
    /// Takes in a snapshot made at `now_ms`.
    pub fn record(&mut self, s: &FleetSnapshot, now_ms: u64) {
        self.since_ms.get_or_insert(now_ms);
        self.last_ms = now_ms;
        let stuck = s
            .fleet
            .states
            .get(State::Stuck.as_str())
            .copied()
            .unwrap_or(0);
        self.fleet.push_back(FleetSample {
            at_ms: now_ms,
            output_tokens_per_s: s.fleet.output_tokens_per_s,
            stuck,
        });
        while self
            .fleet
            .front()
            .is_some_and(|f| now_ms.saturating_sub(f.at_ms) > FLEET_KEEP_MS)
        {
            self.fleet.pop_front();
        }
        for w in &s.workers {
            // The id is cloned only for an agent seen for the first time.
            let a = match self.agents.get_mut(&w.id) {
                Some(a) => a,
                None => self.agents.entry(w.id.clone()).or_default(),
            };
            a.pool.clone_from(&w.pool);
            let sample = AgentSample {
                at_ms: now_ms,
                cost_usd: w.cost_usd,
                tasks: w.tasks_completed + w.tasks_failed,
            };
            a.now = Some(sample);
            if a.samples
                .back()
                .is_none_or(|last| now_ms.saturating_sub(last.at_ms) >= AGENT_STEP_MS)
            {
                a.samples.push_back(sample);
            }
            while a
                .samples
                .front()
                .is_some_and(|f| now_ms.saturating_sub(f.at_ms) > AGENT_KEEP_MS)
            {
                a.samples.pop_front();
            }
        }
        // Agents the fleet no longer lists are forgotten with it.
        if self.agents.len() > s.workers.len() {
            let listed: std::collections::HashSet<&str> =
                s.workers.iter().map(|w| w.id.as_str()).collect();
            self.agents.retain(|id, _| listed.contains(id.as_str()));
        }
    }

    fn span_ms(&self) -> u64 {
        match (self.fleet.front(), self.fleet.back()) {
            (Some(a), Some(b)) => b.at_ms.saturating_sub(a.at_ms),
            _ => 0,
        }
    }

    /// The fleet's output tokens/s over the last 30 s, and its mean over the 5 minutes
    /// that ended a minute before those (`THROUGHPUT_GAP_MS`): once 6½ minutes are known.
    pub fn throughput(&self) -> Option<(f64, f64)> {
        if self.span_ms() < BASELINE_MS + THROUGHPUT_GAP_MS + NOW_WINDOW_MS {
            return None;
        }
        let end = self.fleet.back()?.at_ms;
        let split = end.saturating_sub(NOW_WINDOW_MS);
        let stop = split.saturating_sub(THROUGHPUT_GAP_MS);
        let start = stop.saturating_sub(BASELINE_MS);
        let mean = |from: u64, to: u64| {
            let (sum, n) = self
                .fleet
                .iter()
                .filter(|s| s.at_ms > from && s.at_ms <= to)
                .fold((0.0, 0u32), |(sum, n), s| {
                    (sum + s.output_tokens_per_s, n + 1)
                });
            (n > 0).then(|| sum / f64::from(n))
        };
        Some((mean(split, end)?, mean(start, stop)?))
    }

    /// Stuck agents now and five minutes ago, once five minutes are known.
    pub fn stuck_change(&self) -> Option<(u64, u64)> {
        if self.span_ms() < BASELINE_MS {
            return None;
        }
        let now = self.fleet.back()?;
        let before = self
            .fleet
            .iter()
            .rev()
            .find(|s| now.at_ms.saturating_sub(s.at_ms) >= BASELINE_MS)?;
        Some((now.stuck, before.stuck))
    }

    /// What `worker` spends per hour on average, over the last hour (at least
    /// [`MIN_HOUR_SPAN_MS`] of it).
    pub fn worker_hourly_cost(&self, worker: &str) -> Option<f64> {
        let (spent, _, span) = self.agents.get(worker).and_then(Self::hour_delta)?;
        Some(spent * (60 * MINUTE) as f64 / span as f64)
    }

    /// Spend, tasks and the span they cover, from the oldest kept sample to now.
    fn hour_delta(a: &Agent) -> Option<(f64, u64, u64)> {
        let first = a.samples.front()?;
        let now = a.now?;
        let span = now.at_ms.saturating_sub(first.at_ms);
        (span >= MIN_HOUR_SPAN_MS).then(|| {
            (
                (now.cost_usd - first.cost_usd).max(0.0),
                now.tasks.saturating_sub(first.tasks),
                span,
            )
        })
    }

    /// Each agent's share of the fleet's spend and tasks over the last hour.
    pub fn hour_shares(&self) -> Option<HourShares> {
        let deltas: Vec<(&String, &Agent, f64, u64)> = self
            .agents
            .iter()
            .filter_map(|(id, a)| Self::hour_delta(a).map(|(c, t, _)| (id, a, c, t)))
            .collect();
        if deltas.is_empty() {
            return None;
        }
        let total_cost: f64 = deltas.iter().map(|d| d.2).sum();
        let total_tasks: u64 = deltas.iter().map(|d| d.3).sum();
        if total_cost <= 0.0 {
            return None;
        }
        let workers = deltas
            .into_iter()
            .map(|(id, a, c, t)| Share {
                worker: id.clone(),
                pool: a.pool.clone(),
                cost_share: c / total_cost,
                task_share: if total_tasks == 0 {
                    0.0
                } else {
                    t as f64 / total_tasks as f64
                },
            })
            .collect();
        Some(HourShares {
            total_cost,
            workers,
        })
    }

    /// The fleet's average spend per hour, from the snapshot's spend of the last hour,
    /// over as much of that hour as the detector has watched (at least
    /// [`MIN_HOUR_SPAN_MS`]): a commander up for 20 minutes has seen 20 minutes of it.
    pub fn fleet_hourly_cost(&self, cost_last_hour_usd: f64) -> Option<f64> {
        let watched = self.last_ms.saturating_sub(self.since_ms?).min(60 * MINUTE);
        (watched >= MIN_HOUR_SPAN_MS)
            .then(|| cost_last_hour_usd * (60 * MINUTE) as f64 / watched as f64)
    }
}

//! One process's tokens, reported two ways. OpenTelemetry instrumentations report an LLM
//! call as a span with token counts, as points of the `gen_ai.client.token.usage` metric,
//! or both. Counting both would count a call twice; counting only spans would miss the
//! calls a process reports only as metrics. So, per process and model, the tokens booked
//! are the larger of the two reports: the spans as they come, and what the metric says
//! beyond them.
//!
//! A metric export can include a call whose span is still in the exporter's batch (spans
//! leave every few seconds). So the metric's word is taken `grace_ms` later: at each
//! tick, the total the metric had reached `grace_ms` ago, less what spans carried by now,
//! less what was booked that way before, is booked. A process whose spans never carry
//! tokens is not tracked here; its metrics are booked as they come.

use rustc_hash::FxHashMap;

/// Processes × models tracked.
const MAX_CELLS: usize = 4_096;
/// Metric totals remembered per cell (one per export; exports come every few seconds).
const HISTORY: usize = 64;

/// Input or output tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Input,
    Output,
}

#[derive(Debug, Default)]
struct Tally {
    /// Tokens spans carried.
    spans: u64,
    /// The metric's running total, with when each step arrived.
    metric: std::collections::VecDeque<(u64, u64)>,
    /// Tokens booked from the metric beyond the spans.
    extra: u64,
}

impl Tally {
    fn metric_at(&self, at_ms: u64) -> u64 {
        self.metric
            .iter()
            .rev()
            .find(|(t, _)| *t <= at_ms)
            .map(|(_, total)| *total)
            .unwrap_or(0)
    }

    fn metric_now(&self) -> u64 {
        self.metric.back().map(|(_, t)| *t).unwrap_or(0)
    }
}

/// Tokens the metric reported beyond the spans, to book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extra {
    /// The process (its resource's worker id) and the model.
    pub resource: String,
    pub model: String,
    pub side: Side,
    pub tokens: u64,
}

/// The two reports of every process that sends both: by process, then model, then side.
#[derive(Debug, Default)]
pub struct UsageMix {
    cells: FxHashMap<String, FxHashMap<String, [Tally; 2]>>,
    len: usize,
}

impl UsageMix {
    /// Tokens a span of `resource` carried for `model`.
    pub fn span(&mut self, resource: &str, model: &str, input: u64, output: u64) {
        for (side, n) in [(Side::Input, input), (Side::Output, output)] {
            if let Some(t) = self.cell(resource, model, side) {
                t.spans = t.spans.saturating_add(n);
            }
        }
    }

    /// A metric step (tokens since its last export) of `resource` for `model`.
    pub fn metric(&mut self, resource: &str, model: &str, side: Side, delta: u64, now_ms: u64) {
        if let Some(t) = self.cell(resource, model, side) {
            let total = t.metric_now().saturating_add(delta);
            if t.metric.len() == HISTORY {
                t.metric.pop_front();
            }
            t.metric.push_back((now_ms, total));
        }
    }

    /// What the metrics said `grace_ms` ago beyond the spans, not booked yet.
    pub fn due(&mut self, now_ms: u64, grace_ms: u64) -> Vec<Extra> {
        let mut out = Vec::new();
        for (resource, models) in &mut self.cells {
            for (model, sides) in models.iter_mut() {
                for (t, side) in sides.iter_mut().zip([Side::Input, Side::Output]) {
                    let said = t.metric_at(now_ms.saturating_sub(grace_ms));
                    let beyond = said.saturating_sub(t.spans);
                    let add = beyond.saturating_sub(t.extra);
                    if add > 0 {
                        t.extra += add;
                        out.push(Extra {
                            resource: resource.clone(),
                            model: model.clone(),
                            side,
                            tokens: add,
                        });
                    }
                }
            }
        }
        out
    }

    /// The tally, looked up without allocating (the task path of telemetry calls this for
    /// every span with usage); created while under the bound.
    fn cell(&mut self, resource: &str, model: &str, side: Side) -> Option<&mut Tally> {
        let i = usize::from(side == Side::Output);
        let known = self
            .cells
            .get(resource)
            .is_some_and(|m| m.contains_key(model));
        if !known {
            if self.len >= MAX_CELLS {
                return None;
            }
            self.len += 1;
            self.cells
                .entry(resource.to_string())
                .or_default()
                .insert(model.to_string(), Default::default());
        }
        self.cells
            .get_mut(resource)
            .and_then(|m| m.get_mut(model))
            .map(|sides| &mut sides[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_reports_of_the_same_calls_count_once() {
        let mut m = UsageMix::default();
        // A call's span, and the metric export that also counts it.
        m.span("p", "gpt-4o", 100, 10);
        m.metric("p", "gpt-4o", Side::Input, 100, 1_000);
        assert!(m.due(60_000, 30_000).is_empty());
    }

    #[test]
    fn calls_reported_only_as_metrics_are_booked_after_the_grace() {
        let mut m = UsageMix::default();
        m.span("p", "gpt-4o", 100, 10);
        // The export counts the spanned call and one more that has no span.
        m.metric("p", "gpt-4o", Side::Input, 250, 1_000);
        assert!(m.due(10_000, 30_000).is_empty(), "not before the grace");
        let due = m.due(31_000, 30_000);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].side, due[0].tokens), (Side::Input, 150));
        // Booked once.
        assert!(m.due(62_000, 30_000).is_empty());
    }

    #[test]
    fn a_span_that_arrives_after_the_metric_is_not_booked_twice() {
        let mut m = UsageMix::default();
        m.metric("p", "gpt-4o", Side::Output, 40, 1_000);
        // Its span leaves the exporter's batch five seconds later.
        m.span("p", "gpt-4o", 0, 40);
        assert!(m.due(40_000, 30_000).is_empty());
    }
}

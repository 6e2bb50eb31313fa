//! The deterministic fallback classifier: keywords, length and declared capabilities,
//! from the rubric alone. Used when no endpoint is configured, the breaker is open, or
//! the LLM's answer cannot be trusted. Same task, same rubric: same answer.

use fleet_worker::message::Task;

use super::rubric::{LONG_CONTEXT, Rubric};
use super::{Answer, task_text};

/// Rough tokens for a text: providers' tokenisers average ~4 characters per token for
/// English prose and code.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Classifies `task` from the rubric: the task type whose keywords match most (declared
/// capabilities count as matches too), its default tier, token estimates from the larger
/// of the type's typical input and the text's own length.
pub fn classify(rubric: &Rubric, task: &Task) -> (Answer, String) {
    let text = task_text(task, usize::MAX).to_lowercase();
    let mut best: Option<(usize, usize)> = None; // (hits, index)
    for (i, t) in rubric.task_types.iter().enumerate() {
        let mut hits = t
            .keywords
            .iter()
            .filter(|k| text.contains(&k.to_lowercase()))
            .count();
        hits += t
            .capabilities
            .iter()
            .filter(|c| task.capabilities.contains(c))
            .count();
        if hits > 0 && best.is_none_or(|(h, _)| hits > h) {
            best = Some((hits, i));
        }
    }
    let (hits, spec) = match best {
        Some((hits, i)) => (hits, &rubric.task_types[i]),
        None => match rubric.task_type(&rubric.classifier.default_task_type) {
            Some(t) => (0, t),
            // Validation guarantees the default exists; the first type is the next best.
            None => (0, &rubric.task_types[0]),
        },
    };
    let input_tokens = spec.input_tokens.max(estimate_tokens(text.len()) + 200);
    // Capabilities the producer declared are what it needs; a keyword guess adds nothing
    // to them (a "refactor" task that says it needs `code` does not also need `review`).
    let mut capabilities: Vec<String> = if task.capabilities.is_empty() {
        spec.capabilities.clone()
    } else {
        task.capabilities.clone()
    };
    if input_tokens > rubric.classifier.long_context_tokens
        && !capabilities.iter().any(|c| c == LONG_CONTEXT)
    {
        capabilities.push(LONG_CONTEXT.to_string());
    }
    let why = if hits == 0 {
        format!(
            "no keyword of any task type matched; default type {}",
            spec.name
        )
    } else {
        format!("{hits} keyword/capability match(es) for {}", spec.name)
    };
    (
        Answer {
            task_type: spec.name.clone(),
            tier: spec.default_tier.clone(),
            capabilities,
            input_tokens,
            output_tokens: spec.output_tokens,
            confidence: if hits == 0 {
                0.2
            } else {
                (0.4 + 0.15 * hits as f64).min(0.85)
            },
        },
        why,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(d: &str) -> Task {
        Task::new(d)
    }

    #[test]
    fn keywords_pick_the_type_and_its_tier() {
        let r = Rubric::builtin().unwrap();
        for (text, want, tier) in [
            (
                "Please review this pull request for SQL injection",
                "code_review",
                "standard",
            ),
            (
                "Summarise the attached meeting notes",
                "summarisation",
                "simple",
            ),
            ("Extract the invoice total to JSON", "extraction", "simple"),
            (
                "Research and compare the top vector databases",
                "research",
                "complex",
            ),
            (
                "Implement a token bucket; write tests",
                "code_generation",
                "complex",
            ),
            (
                "Classify the sentiment of this review",
                "classification",
                "simple",
            ),
            ("hello there", "classification", "simple"),
        ] {
            let (a, _) = classify(&r, &task(text));
            assert_eq!(
                (a.task_type.as_str(), a.tier.as_str()),
                (want, tier),
                "{text}"
            );
        }
    }

    #[test]
    fn long_input_is_long_context_and_deterministic() {
        let r = Rubric::builtin().unwrap();
        let t = task(&"summarise this. ".repeat(10_000));
        let (a, _) = classify(&r, &t);
        assert!(a.capabilities.iter().any(|c| c == LONG_CONTEXT));
        assert!(a.input_tokens > 32_000);
        assert_eq!(classify(&r, &t).0, a);
    }
}

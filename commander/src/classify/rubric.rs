//! Routing rubrics: the task types the fleet knows, the complexity tiers, the model that
//! classifies, and which models (on which pools) may serve each tier.
//!
//! One TOML file (`routing-rubrics/default.toml` is built in). Validated as a whole, every
//! problem reported with file and line; re-read while the commander runs by `sources.rs`
//! (the file's watch and last refusal: [`crate::hot::SourceFile`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::domain::ProblemKind::*;
use crate::domain::{Location, Problem};
use crate::registry::Registry;
use crate::tomlread::{from_toml, line_of};

/// The rubric shipped with the commander.
pub const BUILTIN: &str = include_str!("../../../routing-rubrics/default.toml");
const BUILTIN_NAME: &str = "builtin:routing-rubrics/default.toml";

/// The prompt used when a rubric sets none. Placeholders: `{task_types}`, `{tiers}`,
/// `{capabilities}` (rendered from the rubric).
pub const DEFAULT_PROMPT: &str = "You classify tasks for a fleet of LLM agents so that each task goes to the cheapest model that can do it well.

Task types:
{task_types}

Complexity tiers, simplest first:
{tiers}

Known capabilities: {capabilities}

Answer with one JSON object and nothing else, with exactly these keys:
{\"task_type\": one of the task type names, \"tier\": one of the tier names, \"capabilities\": a list of known capabilities the task needs, \"estimated_input_tokens\": integer, \"estimated_output_tokens\": integer, \"confidence\": number from 0 to 1}";

#[derive(Debug, thiserror::Error)]
pub enum RubricError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", crate::domain::render(.0).join("\n"))]
    Invalid(Vec<Problem>),
}

/// `[classifier]`: how tasks are classified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// The cheap model asked to classify (priced through the model registry).
    pub model: String,
    /// System prompt; `{task_types}`, `{tiers}`, `{capabilities}` are filled in. Unset:
    /// [`DEFAULT_PROMPT`].
    #[serde(default)]
    pub prompt: Option<String>,
    /// Answers less sure than this are not trusted; the fallback decides. 0 to 1.
    #[serde(default = "default_min_confidence")]
    pub min_confidence: f64,
    /// The task text sent to the classifier is cut to this many characters.
    #[serde(default = "default_max_task_chars")]
    pub max_task_chars: usize,
    /// Task type of last resort for the fallback classifier (must be a task type).
    pub default_task_type: String,
    /// Capabilities the classifier may name beyond those of the task types.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Estimated input above this many tokens makes a task `long-context`.
    #[serde(default = "default_long_context_tokens")]
    pub long_context_tokens: u64,
}

fn default_min_confidence() -> f64 {
    0.3
}
fn default_max_task_chars() -> usize {
    4000
}
fn default_long_context_tokens() -> u64 {
    32_000
}

/// The capability that marks a task as long-context (routing's context rule keys on it).
pub const LONG_CONTEXT: &str = "long-context";

/// One `[[task_type]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskTypeSpec {
    pub name: String,
    pub description: String,
    /// Capabilities a pool must have to run this type.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Words and phrases (case-insensitive) the fallback classifier looks for.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Example tasks, shown to the classifier.
    #[serde(default)]
    pub examples: Vec<String>,
    /// Tier when nothing says otherwise.
    pub default_tier: String,
    /// Typical tokens, for the fallback's estimates.
    #[serde(default = "default_input_tokens")]
    pub input_tokens: u64,
    #[serde(default = "default_output_tokens")]
    pub output_tokens: u64,
}

fn default_input_tokens() -> u64 {
    2000
}
fn default_output_tokens() -> u64 {
    500
}

/// One `[[tier.candidate]]`: a model that may serve the tier, and the pools that run it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateSpec {
    pub model: String,
    pub pools: Vec<String>,
}

/// One `[[tier]]`, simplest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub examples: Vec<String>,
    /// The model used when cost cannot rank the candidates (must be a candidate).
    pub default_model: String,
    #[serde(rename = "candidate")]
    pub candidates: Vec<CandidateSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    classifier: toml::Spanned<ClassifierSpec>,
    #[serde(default)]
    task_type: Vec<toml::Spanned<TaskTypeSpec>>,
    #[serde(default)]
    tier: Vec<toml::Spanned<TierSpec>>,
}

/// A validated rubric.
#[derive(Clone, Debug, Serialize)]
pub struct Rubric {
    pub name: String,
    pub description: Option<String>,
    pub classifier: ClassifierSpec,
    pub task_types: Vec<TaskTypeSpec>,
    pub tiers: Vec<TierSpec>,
    /// Every capability a classification may name.
    pub capabilities: BTreeSet<String>,
    /// Where it came from (`builtin:…` or a path).
    pub source: String,
    /// The system prompt, rendered once.
    #[serde(skip)]
    pub system_prompt: String,
    /// The text it was parsed from, so it can be checked again against a changed registry.
    #[serde(skip)]
    pub text: String,
}

/// What a rubric is checked against besides itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckAgainst<'a> {
    /// Candidate models must be in it.
    pub registry: Option<&'a Registry>,
    /// Candidate pools must be among them (unset: not checked).
    pub pools: Option<&'a BTreeMap<String, crate::config::PoolConfig>>,
}

/// Checks each task type; adds the capabilities they declare. Returns the names seen.
fn check_task_types<'a>(
    task_types: &'a [TaskTypeSpec],
    type_lines: &[usize],
    file: &str,
    tier_names: &BTreeSet<&str>,
    capabilities: &mut BTreeSet<String>,
    problems: &mut Vec<Problem>,
) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    for (t, line) in task_types.iter().zip(type_lines) {
        let at = Entry::new(file, *line, format!("task_type {:?}", t.name));
        if !is_name(&t.name) {
            problems.push(at.problem(BadValue, "name must be letters, digits, '-' or '_'"));
        }
        if !seen.insert(t.name.as_str()) {
            problems.push(at.problem(Duplicate, "defined twice"));
        }
        if t.description.trim().is_empty() {
            problems.push(at.problem(Missing, "description is empty"));
        }
        if !tier_names.contains(t.default_tier.as_str()) {
            problems.push(at.problem(
                UnknownName,
                format!(
                    "default_tier {:?} is not a tier (tiers: {})",
                    t.default_tier,
                    join(tier_names)
                ),
            ));
        }
        if t.keywords.iter().any(|k| k.trim().is_empty()) {
            problems.push(at.problem(Missing, "keywords must not be empty strings"));
        }
        for c in &t.capabilities {
            if c.trim().is_empty() {
                problems.push(at.problem(Missing, "capabilities must not be empty strings"));
            }
            capabilities.insert(c.clone());
        }
    }
    seen
}

/// Checks `[classifier]` against the task types seen and the registry.
fn check_classifier(
    classifier: &ClassifierSpec,
    at_c: &Entry,
    seen: &BTreeSet<&str>,
    against: CheckAgainst<'_>,
    problems: &mut Vec<Problem>,
) {
    if !seen.contains(classifier.default_task_type.as_str()) {
        problems.push(at_c.problem(
            UnknownName,
            format!(
                "default_task_type {:?} is not a task type",
                classifier.default_task_type
            ),
        ));
    }
    if !(0.0..=1.0).contains(&classifier.min_confidence) {
        problems.push(at_c.problem(
            OutOfRange,
            format!(
                "min_confidence {} must be between 0 and 1",
                classifier.min_confidence
            ),
        ));
    }
    if classifier.max_task_chars == 0 {
        problems.push(at_c.problem(OutOfRange, "max_task_chars must be at least 1"));
    }
    if let Some(reg) = against.registry
        && reg.lookup(&classifier.model).is_none()
    {
        problems.push(at_c.problem(
            UnknownName,
            format!(
                "model {:?} is not in the model registry ({}), so its cost is unknown",
                classifier.model, reg.source
            ),
        ));
    }
    let template = classifier.prompt.as_deref().unwrap_or(DEFAULT_PROMPT);
    if template.trim().is_empty() {
        problems.push(at_c.problem(Missing, "prompt is empty"));
    }
}

/// Checks each tier and its candidates against the registry and the configured pools.
fn check_tiers(
    tiers: &[TierSpec],
    tier_lines: &[usize],
    file: &str,
    against: CheckAgainst<'_>,
    problems: &mut Vec<Problem>,
) {
    let mut seen = BTreeSet::new();
    for (t, line) in tiers.iter().zip(tier_lines) {
        let at = Entry::new(file, *line, format!("tier {:?}", t.name));
        if !is_name(&t.name) {
            problems.push(at.problem(BadValue, "name must be letters, digits, '-' or '_'"));
        }
        if !seen.insert(t.name.as_str()) {
            problems.push(at.problem(Duplicate, "defined twice"));
        }
        if t.candidates.is_empty() {
            problems.push(at.problem(Missing, "needs at least one [[tier.candidate]]"));
        }
        if !t.candidates.iter().any(|c| c.model == t.default_model) {
            problems.push(at.problem(
                UnknownName,
                format!(
                    "default_model {:?} is not one of its candidates",
                    t.default_model
                ),
            ));
        }
        let mut models = BTreeSet::new();
        for c in &t.candidates {
            if !models.insert(c.model.as_str()) {
                problems.push(at.problem(
                    Duplicate,
                    format!("candidate model {:?} listed twice", c.model),
                ));
            }
            if c.pools.is_empty() {
                problems
                    .push(at.problem(Missing, format!("candidate {:?} names no pool", c.model)));
            }
            if let Some(reg) = against.registry
                && reg.lookup(&c.model).is_none()
            {
                problems.push(at.problem(
                    UnknownName,
                    format!(
                        "candidate model {:?} is not in the model registry ({})",
                        c.model, reg.source
                    ),
                ));
            }
            if let Some(pools) = against.pools {
                for p in &c.pools {
                    if !pools.contains_key(p) {
                        problems.push(at.problem(UnknownName, format!("candidate {:?} names pool {p:?}, which is not configured (pools: {})", c.model, join(&pools.keys().map(String::as_str).collect()))));
                    }
                }
            }
        }
    }
}

/// An entry of the file (`[classifier]`, a task type, a tier): where it starts and its
/// name, which each of its problems starts with.
struct Entry {
    at: Location,
    what: String,
}

impl Entry {
    fn new(file: &str, line: usize, what: String) -> Self {
        Self {
            at: Location::line(file, line),
            what,
        }
    }

    fn problem(
        &self,
        kind: crate::domain::ProblemKind,
        message: impl std::fmt::Display,
    ) -> Problem {
        self.at.problem(kind, format!("{}: {message}", self.what))
    }
}

impl Rubric {
    /// Parses and validates `text`; every problem is reported as `file:line: message`.
    pub fn parse(text: &str, file: &str, against: CheckAgainst<'_>) -> Result<Self, RubricError> {
        let parsed: File = from_toml(text, file).map_err(RubricError::Invalid)?;
        let mut problems = Vec::new();
        let cline = line_of(text, parsed.classifier.span().start);
        let classifier = parsed.classifier.into_inner();
        let at_c = Entry::new(file, cline, "[classifier]".to_string());

        let mut task_types = Vec::new();
        let mut type_lines = Vec::new();
        for t in parsed.task_type {
            type_lines.push(line_of(text, t.span().start));
            task_types.push(t.into_inner());
        }
        let mut tiers = Vec::new();
        let mut tier_lines = Vec::new();
        for t in parsed.tier {
            tier_lines.push(line_of(text, t.span().start));
            tiers.push(t.into_inner());
        }
        if task_types.is_empty() {
            problems.push(
                Location::file(file).problem(Missing, "at least one [[task_type]] is needed"),
            );
        }
        if tiers.is_empty() {
            problems.push(Location::file(file).problem(Missing, "at least one [[tier]] is needed"));
        }
        let tier_names: BTreeSet<&str> = tiers.iter().map(|t| t.name.as_str()).collect();

        let mut capabilities: BTreeSet<String> = classifier.capabilities.iter().cloned().collect();
        capabilities.insert(LONG_CONTEXT.to_string());
        let seen = check_task_types(
            &task_types,
            &type_lines,
            file,
            &tier_names,
            &mut capabilities,
            &mut problems,
        );
        check_classifier(&classifier, &at_c, &seen, against, &mut problems);
        check_tiers(&tiers, &tier_lines, file, against, &mut problems);
        if !problems.is_empty() {
            return Err(RubricError::Invalid(problems));
        }
        let mut rubric = Self {
            name: parsed.name.unwrap_or_else(|| file.to_string()),
            description: parsed.description,
            classifier,
            task_types,
            tiers,
            capabilities,
            source: file.to_string(),
            system_prompt: String::new(),
            text: text.to_string(),
        };
        rubric.system_prompt = rubric.render_prompt();
        Ok(rubric)
    }

    pub fn builtin() -> Result<Self, RubricError> {
        let registry = Registry::builtin().map_err(|e| match e {
            crate::registry::RegistryError::Invalid(p) => RubricError::Invalid(p),
            other => RubricError::Invalid(vec![
                Location::file(BUILTIN_NAME).problem(Syntax, other.to_string()),
            ]),
        })?;
        Self::parse(
            BUILTIN,
            BUILTIN_NAME,
            CheckAgainst {
                registry: Some(&registry),
                pools: None,
            },
        )
    }

    pub fn load(path: &Path, against: CheckAgainst<'_>) -> Result<Self, RubricError> {
        let text = std::fs::read_to_string(path).map_err(|source| RubricError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), against)
    }

    /// Checks this rubric again, as written, against other pools or another registry.
    pub fn recheck(&self, against: CheckAgainst<'_>) -> Result<(), RubricError> {
        Self::parse(&self.text, &self.source, against).map(|_| ())
    }

    pub fn task_type(&self, name: &str) -> Option<&TaskTypeSpec> {
        self.task_types.iter().find(|t| t.name == name)
    }

    /// Position of a tier, simplest first.
    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.name == name)
    }

    fn render_prompt(&self) -> String {
        let mut types = String::new();
        for t in &self.task_types {
            types.push_str(&format!("- {}: {}", t.name, t.description));
            if !t.capabilities.is_empty() {
                types.push_str(&format!(" (needs: {})", t.capabilities.join(", ")));
            }
            for e in t.examples.iter().take(3) {
                types.push_str(&format!("\n    e.g. {e}"));
            }
            types.push('\n');
        }
        let mut tiers = String::new();
        for t in &self.tiers {
            tiers.push_str(&format!("- {}: {}", t.name, t.description));
            for e in t.examples.iter().take(3) {
                tiers.push_str(&format!("\n    e.g. {e}"));
            }
            tiers.push('\n');
        }
        let caps = self
            .capabilities
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        self.classifier
            .prompt
            .as_deref()
            .unwrap_or(DEFAULT_PROMPT)
            .replace("{task_types}", types.trim_end())
            .replace("{tiers}", tiers.trim_end())
            .replace("{capabilities}", &caps)
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn join(names: &BTreeSet<&str>) -> String {
    names.iter().copied().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_rubric_is_valid_and_covers_the_seed_task_types() {
        let r = Rubric::builtin().unwrap();
        for t in [
            "code_review",
            "summarisation",
            "extraction",
            "classification",
            "research",
            "code_generation",
        ] {
            assert!(r.task_type(t).is_some(), "{t}");
        }
        assert!(r.system_prompt.contains("code_review"));
        assert!(!r.system_prompt.contains("{tiers}"));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"
[classifier]
model = "no-such-model"
default_task_type = "nope"
min_confidence = 2.0

[[task_type]]
name = "a"
description = ""
default_tier = "missing"

[[task_type]]
name = "a"
description = "again"
default_tier = "cheap"

[[tier]]
name = "cheap"
description = "cheap"
default_model = "gpt-4o"
[[tier.candidate]]
model = "gpt-4o-mini"
pools = ["nowhere"]
"#;
        let reg = Registry::builtin().unwrap();
        let pools = BTreeMap::from([("docs".to_string(), Default::default())]);
        let err = Rubric::parse(
            text,
            "r.toml",
            CheckAgainst {
                registry: Some(&reg),
                pools: Some(&pools),
            },
        )
        .unwrap_err()
        .to_string();
        for want in [
            "r.toml:2: [classifier]: default_task_type \"nope\"",
            "r.toml:2: [classifier]: min_confidence 2",
            "r.toml:2: [classifier]: model \"no-such-model\"",
            "r.toml:7: task_type \"a\": description is empty",
            "r.toml:7: task_type \"a\": default_tier \"missing\"",
            "r.toml:12: task_type \"a\": defined twice",
            "r.toml:17: tier \"cheap\": default_model \"gpt-4o\" is not one of its candidates",
            "names pool \"nowhere\", which is not configured",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
    }

    #[test]
    fn syntax_and_unknown_fields_have_lines() {
        let err = Rubric::parse(
            "[classifier]\nmodel = \"x\"\ncolour = 1\n",
            "r.toml",
            Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("r.toml:3:"), "{err}");
        let err = Rubric::parse("[classifier\n", "r.toml", Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("r.toml:1:"), "{err}");
    }
}

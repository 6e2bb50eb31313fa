//! The model registry: provider, context window, tier and prices per model.
//!
//! One TOML file (`policies/models.toml` is built in as the default). Readers take the
//! [`Registry`] in force from the one live snapshot (`policy::Live`); `sources.rs`
//! re-reads the file when its watch ([`crate::hot::DirWatch`]) says it changed, and
//! swaps in a new snapshot only if the whole file is valid. A bad edit leaves the last
//! good registry in place and says why, with file and line.

use std::path::Path;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::domain::ProblemKind::{Duplicate, Missing, OutOfRange};
use crate::domain::{Location, Problem};
use crate::tomlread::{from_toml, line_of};

/// The registry shipped with the commander, used when no file is configured.
pub const BUILTIN: &str = include_str!("../../policies/models.toml");

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", crate::domain::render(.0).join("\n"))]
    Invalid(Vec<Problem>),
}

/// Price tiers, cheapest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Economy,
    Standard,
    Premium,
}

/// One `[[model]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Canonical name, as providers spell it without a date suffix (`gpt-4o`).
    pub name: String,
    /// Other spellings seen on spans (dated snapshots match the base name without listing).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `gen_ai.provider.name` value (`openai`, `anthropic`, `gcp.gemini` …).
    pub provider: String,
    /// Context window in tokens.
    pub context_window: u64,
    pub tier: Tier,
    /// USD per 1M input tokens that were not served from or written to a cache.
    pub input_per_mtok: f64,
    /// USD per 1M output tokens (reasoning tokens included).
    pub output_per_mtok: f64,
    /// USD per 1M input tokens read from the provider's cache. Unset: the input price.
    #[serde(default)]
    pub cache_read_per_mtok: Option<f64>,
    /// USD per 1M input tokens written to the provider's cache. Unset: the input price.
    #[serde(default)]
    pub cache_write_per_mtok: Option<f64>,
}

pub use crate::domain::TokenUsage;

impl ModelEntry {
    /// USD for `usage` at this model's prices.
    pub fn cost(&self, usage: &TokenUsage) -> f64 {
        let cached = usage.cache_read.saturating_add(usage.cache_write);
        let plain = usage.input.saturating_sub(cached) as f64;
        let read = usage.cache_read as f64;
        let write = usage.cache_write as f64;
        (plain * self.input_per_mtok
            + read * self.cache_read_per_mtok.unwrap_or(self.input_per_mtok)
            + write * self.cache_write_per_mtok.unwrap_or(self.input_per_mtok)
            + usage.output as f64 * self.output_per_mtok)
            / 1_000_000.0
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    model: Vec<toml::Spanned<ModelEntry>>,
}

/// A validated registry.
#[derive(Debug, Default)]
pub struct Registry {
    models: Vec<ModelEntry>,
    by_key: FxHashMap<String, usize>,
    /// Where it came from (`builtin` or a path), for the API.
    pub source: String,
}

impl Registry {
    /// Parses and validates `text`; every problem is reported, each as `file:line: message`.
    pub fn parse(text: &str, file: &str) -> Result<Self, RegistryError> {
        let parsed: File = from_toml(text, file).map_err(RegistryError::Invalid)?;
        let mut problems = Vec::new();
        let mut models = Vec::new();
        let mut by_key: FxHashMap<String, usize> = FxHashMap::default();
        for spanned in parsed.model {
            let at = Location::line(file, line_of(text, spanned.span().start));
            let m = spanned.into_inner();
            let model = format!("model {:?}", m.name);
            if m.name.trim().is_empty() {
                problems.push(at.problem(Missing, format!("{model}: name is empty")));
            }
            if m.context_window == 0 {
                problems.push(at.problem(
                    OutOfRange,
                    format!("{model}: context_window must be above 0"),
                ));
            }
            for (field, v) in [
                ("input_per_mtok", Some(m.input_per_mtok)),
                ("output_per_mtok", Some(m.output_per_mtok)),
                ("cache_read_per_mtok", m.cache_read_per_mtok),
                ("cache_write_per_mtok", m.cache_write_per_mtok),
            ] {
                if let Some(v) = v
                    && !(v.is_finite() && v >= 0.0)
                {
                    problems.push(at.problem(
                        OutOfRange,
                        format!("{model}: {field} must be a price >= 0, not {v}"),
                    ));
                }
            }
            let idx = models.len();
            for key in std::iter::once(&m.name).chain(&m.aliases) {
                let k = key.trim().to_ascii_lowercase();
                if let Some(&other) = by_key.get(&k) {
                    let other: &ModelEntry = &models[other];
                    problems.push(at.problem(
                        Duplicate,
                        format!(
                            "{model}: {key:?} is already a name or alias of {:?}",
                            other.name
                        ),
                    ));
                } else {
                    by_key.insert(k, idx);
                }
            }
            models.push(m);
        }
        if !problems.is_empty() {
            return Err(RegistryError::Invalid(problems));
        }
        Ok(Self {
            models,
            by_key,
            source: file.to_string(),
        })
    }

    pub fn builtin() -> Result<Self, RegistryError> {
        Self::parse(BUILTIN, "builtin:policies/models.toml")
    }

    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// Finds a model by name or alias, ignoring case, a provider prefix (`openai/gpt-4o`,
    /// `models/gemini-2.0-flash`) and a snapshot date suffix (`gpt-4o-2024-08-06`,
    /// `claude-sonnet-4-5-20250929`, `…@20250929`, Bedrock's `…-v1:0`).
    pub fn lookup(&self, model: &str) -> Option<&ModelEntry> {
        // Hot path: the name as sent is usually already a key.
        if let Some(&i) = self.by_key.get(model) {
            return self.models.get(i);
        }
        let lower = model.trim().to_ascii_lowercase();
        if let Some(&i) = self.by_key.get(&lower) {
            return self.models.get(i);
        }
        let mut name = lower.as_str();
        if let Some((_, rest)) = name.rsplit_once('/') {
            name = rest;
        }
        for _ in 0..3 {
            if let Some(&i) = self.by_key.get(name) {
                return self.models.get(i);
            }
            let stripped = strip_version_suffix(name);
            if stripped == name {
                break;
            }
            name = stripped;
        }
        self.by_key.get(name).and_then(|&i| self.models.get(i))
    }
}

/// Removes one trailing snapshot marker: `-20250929`, `-2024-08-06`, `@20250929`, `-v1:0`,
/// `-latest`, `-001`.
///
/// Model names come from spans, so they are any UTF-8: every cut is at an ASCII marker
/// found by `rfind` or checked through `get`, never at a computed byte offset that could
/// fall inside a character.
pub(crate) fn strip_version_suffix(name: &str) -> &str {
    if let Some((head, _)) = name.rsplit_once('@') {
        return head;
    }
    if let Some((head, tail)) = name.rsplit_once("-v")
        && !tail.is_empty()
        && tail.bytes().all(|c| c.is_ascii_digit() || c == b':')
    {
        return head;
    }
    if let Some(rest) = name.strip_suffix("-latest") {
        return rest;
    }
    // -YYYY-MM-DD: the last 11 bytes, all ASCII, so the cut before them is a boundary.
    if let Some(cut) = name.len().checked_sub(11)
        && cut > 0
        && let (Some(head), Some(tail)) = (name.get(..cut), name.get(cut..))
        && is_dashed_date(tail.as_bytes())
    {
        return head;
    }
    // -YYYYMMDD or -NNN
    if let Some((head, tail)) = name.rsplit_once('-')
        && (tail.len() == 8 || tail.len() == 3)
        && tail.bytes().all(|c| c.is_ascii_digit())
    {
        return head;
    }
    name
}

/// `-YYYY-MM-DD` exactly.
fn is_dashed_date(b: &[u8]) -> bool {
    b.len() == 11
        && b.iter().enumerate().all(|(i, c)| match i {
            0 | 5 | 8 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// How readers below the policy layer (the fleet owner) read the registry in force.
pub type RegistryInForce = dyn crate::hot::InForce<Registry>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProblemKind;

    #[test]
    fn builtin_registry_is_valid_and_has_the_seed_models() {
        let r = Registry::builtin().unwrap();
        let sonnet = r.lookup("claude-sonnet-4-5").unwrap();
        assert_eq!(sonnet.context_window, 200_000);
        assert_eq!((sonnet.input_per_mtok, sonnet.output_per_mtok), (3.0, 15.0));
        let gpt = r.lookup("gpt-4o").unwrap();
        assert_eq!(gpt.context_window, 128_000);
        assert_eq!((gpt.input_per_mtok, gpt.output_per_mtok), (2.5, 10.0));
        let flash = r.lookup("gemini-2.0-flash").unwrap();
        assert_eq!(flash.context_window, 1_048_576);
        assert_eq!((flash.input_per_mtok, flash.output_per_mtok), (0.075, 0.30));
        assert!(r.lookup("claude-haiku-4-5").is_some());
        assert!(r.lookup("gpt-4o-mini").is_some());
    }

    #[test]
    fn lookup_ignores_case_prefix_and_snapshot_dates() {
        let r = Registry::builtin().unwrap();
        for name in [
            "GPT-4o",
            "gpt-4o-2024-08-06",
            "openai/gpt-4o",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-5@20250929",
            "anthropic.claude-sonnet-4-5-v1:0",
            "models/gemini-2.0-flash",
            "gemini-2.0-flash-001",
        ] {
            assert!(r.lookup(name).is_some(), "{name}");
        }
        assert_eq!(
            r.lookup("gpt-4o-mini-2024-07-18").unwrap().name,
            "gpt-4o-mini"
        );
        assert!(r.lookup("my-finetune").is_none());
        assert!(r.lookup("gpt-5").is_none());
    }

    #[test]
    fn cost_counts_cached_tokens_at_their_prices() {
        let r = Registry::builtin().unwrap();
        let sonnet = r.lookup("claude-sonnet-4-5").unwrap();
        let usage = TokenUsage {
            input: 1_000_000,
            output: 100_000,
            cache_read: 400_000,
            cache_write: 100_000,
        };
        // 500k plain × $3 + 400k × $0.30 + 100k × $3.75 + 100k × $15, per 1M.
        let expected = 1.5 + 0.12 + 0.375 + 1.5;
        assert!((sonnet.cost(&usage) - expected).abs() < 1e-9);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"
[[model]]
name = "a"
provider = "x"
context_window = 0
tier = "economy"
input_per_mtok = -1.0
output_per_mtok = 1.0

[[model]]
name = "A"
provider = "x"
context_window = 10
tier = "economy"
input_per_mtok = 1.0
output_per_mtok = 1.0
"#;
        let RegistryError::Invalid(p) = Registry::parse(text, "m.toml").unwrap_err() else {
            panic!("expected Invalid");
        };
        let got: Vec<_> = p.iter().map(|p| (p.at.line, p.kind)).collect();
        assert_eq!(
            got,
            [
                (Some(2), ProblemKind::OutOfRange),
                (Some(2), ProblemKind::OutOfRange),
                (Some(10), ProblemKind::Duplicate)
            ],
            "{p:?}"
        );
        assert!(p.iter().all(|p| p.at.file == "m.toml"));
    }

    #[test]
    fn syntax_and_unknown_fields_carry_the_line() {
        let e = Registry::parse("[[model]]\nname = \"a\"\nprise = 1\n", "m.toml").unwrap_err();
        assert!(e.to_string().starts_with("m.toml:"), "{e}");
        assert!(e.to_string().contains("prise"), "{e}");
        let e = Registry::parse("[[model]\n", "m.toml").unwrap_err();
        assert!(e.to_string().starts_with("m.toml:1"), "{e}");
    }
}

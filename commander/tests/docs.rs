//! The TOML examples in the docs are what the commander reads: a user copies them. Each
//! ```toml block is read by the reader of the file it shows (a config, a policy, the model
//! registry), and must read without a problem.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use std::path::Path;

use fleet_commander::classify::rubric::Rubric;
use fleet_commander::config::Config;
use fleet_commander::policy::{self, Document, Policy};
use fleet_commander::registry::Registry;

/// Each ```toml block of `doc`, with the line it starts on.
fn toml_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (n, line) in doc.lines().enumerate() {
        match open.take() {
            None if line.trim_start() == "```toml" => open = Some((n + 2, String::new())),
            None => {}
            Some(block) if line.trim_start().starts_with("```") => blocks.push(block),
            Some((at, mut text)) => {
                text.push_str(line);
                text.push('\n');
                open = Some((at, text));
            }
        }
    }
    blocks
}

/// What a block is, by the first table it opens.
enum Kind {
    Config,
    Policy,
    Registry,
    /// docs/rubrics.md shows the parts of a rubric, abridged (`…`): not a whole file.
    Abridged,
}

fn kind(doc: &str, text: &str) -> Kind {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .unwrap_or("");
    if doc == "rubrics.md" {
        Kind::Abridged
    } else if doc == "policy.md" || ["[[escalation]]", "[[redaction]]"].contains(&first) {
        Kind::Policy
    } else if first == "[[model]]" {
        Kind::Registry
    } else {
        Kind::Config
    }
}

#[test]
fn every_toml_example_in_the_docs_reads() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let registry = Registry::builtin().unwrap();
    let rubric = Rubric::builtin().unwrap();
    let mut read = 0;
    let mut problems = Vec::new();
    for e in std::fs::read_dir(&docs).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with(".md") {
            continue;
        }
        let doc = std::fs::read_to_string(e.path()).unwrap();
        for (line, text) in toml_blocks(&doc) {
            let at = format!("docs/{name}:{line}");
            let outcome = match kind(&name, &text) {
                Kind::Abridged => continue,
                Kind::Config => Config::parse(&text, Path::new(&at))
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Kind::Registry => Registry::parse(&text, &at)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Kind::Policy => Policy::parse(
                    vec![Document {
                        name: at.clone(),
                        text: text.clone(),
                    }],
                    policy::CheckAgainst {
                        pools: None,
                        registry: &registry,
                        rubric: &rubric,
                    },
                )
                .map(|_| ())
                .map_err(|e| e.to_string()),
            };
            read += 1;
            if let Err(e) = outcome {
                problems.push(format!("{at}: {e}"));
            }
        }
    }
    assert!(read >= 7, "the docs' examples were found: {read}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

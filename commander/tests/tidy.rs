//! House rules, checked on the source tree (in the manner of rust-analyzer's tidy tests):
//! the code map in ARCHITECTURE.md names files that exist, the ground-floor module imports
//! nothing of ours, and no import between the commander's top-level modules closes a
//! circle, except the ones listed below, which are known and being taken apart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file and folder under the repository root, as `/`-separated relative paths.
fn tree(dir: &Path, rel: &str, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if matches!(name.as_str(), "target" | ".git" | ".venv" | "node_modules") {
            continue;
        }
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if e.path().is_dir() {
            out.insert(format!("{path}/"));
            tree(&e.path(), &path, out);
        } else {
            out.insert(path);
        }
    }
}

#[test]
fn every_path_in_the_code_map_exists() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let map = &text[text.find("## Code map").expect("a code map")..];
    let map = &map[..map.find("## Architecture invariants").unwrap_or(map.len())];
    let mut files = BTreeSet::new();
    tree(&root(), "", &mut files);
    let mut missing = Vec::new();
    for (n, line) in map.lines().enumerate() {
        for (i, token) in line.split('`').enumerate() {
            // Odd pieces are inside backticks.
            let looks_like_path = i % 2 == 1
                && !token.contains(' ')
                && (token.ends_with(".rs") || token.ends_with(".md") || token.ends_with('/'))
                && !token.starts_with('<');
            if !looks_like_path {
                continue;
            }
            // Names in the map are relative to the crate or folder being described, so a
            // path matches when it ends the same way.
            let token = token.trim_start_matches("./");
            let found = files
                .iter()
                .any(|f| f == token || f.ends_with(&format!("/{token}")));
            if !found {
                missing.push(format!(
                    "ARCHITECTURE.md code map, line {}: `{token}`",
                    n + 1
                ));
            }
        }
    }
    assert!(missing.is_empty(), "no such file:\n{}", missing.join("\n"));
}

/// `crate::<module>` references of each top-level module of the commander, with the first
/// line that makes each.
fn module_imports() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = root().join("commander/src");
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if e.path().is_dir() {
            let mut files = BTreeSet::new();
            tree(&e.path(), "", &mut files);
            let paths = files
                .into_iter()
                .filter(|f| f.ends_with(".rs"))
                .map(|f| e.path().join(f))
                .collect();
            modules.entry(name).or_default().extend::<Vec<_>>(paths);
        } else if let Some(stem) = name.strip_suffix(".rs")
            && !matches!(stem, "lib" | "main")
        {
            modules.entry(stem.to_string()).or_default().push(e.path());
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut imports = BTreeMap::new();
    for (module, files) in &modules {
        let mut uses: BTreeMap<String, String> = BTreeMap::new();
        for f in files {
            let text = std::fs::read_to_string(f).unwrap();
            // Unit tests may reach anywhere.
            let text = text.split("#[cfg(test)]").next().unwrap_or("");
            let rel = f.strip_prefix(root()).unwrap_or(f).display().to_string();
            for (n, line) in text.lines().enumerate() {
                // A doc link is not a dependency.
                if line.trim_start().starts_with("//") {
                    continue;
                }
                let mut rest = line;
                while let Some(at) = rest.find("crate::") {
                    rest = &rest[at + "crate::".len()..];
                    let target: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if names.contains(&target) && &target != module {
                        uses.entry(target)
                            .or_insert_with(|| format!("{rel}:{}: {}", n + 1, line.trim()));
                    }
                }
            }
        }
        imports.insert(module.clone(), uses);
    }
    imports
}

#[test]
fn the_ground_floor_imports_nothing_of_ours() {
    let imports = module_imports();
    let domain = &imports["domain"];
    assert!(domain.is_empty(), "domain imports: {domain:?}");
}

/// Imports that run back down-to-up today, each to be taken apart (issue 14's list).
/// Without them the module graph has no circle. Fixing one means deleting it here; a new
/// import that closes a circle fails the test with its line.
const KNOWN_BACK_EDGES: &[(&str, &str)] = &[];

/// Whether `to` can be reached from `from` in `graph` (module -> module -> line) along
/// the edges `edge` keeps.
fn reaches(
    graph: &BTreeMap<String, BTreeMap<String, String>>,
    from: &str,
    to: &str,
    edge: impl Fn(&str, &str) -> bool,
) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(m) = stack.pop() {
        if m == to {
            return true;
        }
        if seen.insert(m.clone())
            && let Some(next) = graph.get(&m)
        {
            stack.extend(next.keys().filter(|n| edge(&m, n)).cloned());
        }
    }
    false
}

#[test]
fn no_import_closes_a_circle_between_top_level_modules() {
    let imports = module_imports();
    let edge = |from: &str, to: &str| !KNOWN_BACK_EDGES.contains(&(from, to));
    let reaches = |from: &str, to: &str| reaches(&imports, from, to, edge);
    let mut circles = Vec::new();
    for (from, uses) in &imports {
        for (to, line) in uses {
            if edge(from, to) && reaches(to, from) {
                circles.push(format!("{from} -> {to} closes a circle, at {line}"));
            }
        }
    }
    assert!(circles.is_empty(), "{}", circles.join("\n"));
    let gone: Vec<_> = KNOWN_BACK_EDGES
        .iter()
        .filter(|(from, to)| !imports.get(*from).is_some_and(|u| u.contains_key(*to)))
        .collect();
    assert!(
        gone.is_empty(),
        "no longer imported, delete from KNOWN_BACK_EDGES: {gone:?}"
    );
}

/// The layers block of ARCHITECTURE.md: each module and its layer (0 is the bottom).
fn layers() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let start = text
        .find("```layers")
        .expect("a ```layers block in ARCHITECTURE.md");
    let block = &text[start + "```layers".len()..];
    let block = &block[..block.find("```").expect("the layers block ends")];
    let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        for m in line.split_whitespace() {
            out.insert(m.to_string(), lines.len() - 1 - i);
        }
    }
    out
}

#[test]
fn every_import_runs_down_the_layers() {
    let layers = layers();
    let imports = module_imports();
    let unplaced: Vec<_> = imports
        .keys()
        .filter(|m| !layers.contains_key(*m))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from ARCHITECTURE.md's layers: {unplaced:?}"
    );
    let mut up = Vec::new();
    for (from, uses) in &imports {
        for (to, line) in uses {
            if layers[to] >= layers[from] {
                up.push(format!(
                    "{from} (layer {}) imports {to} (layer {}) at {line}",
                    layers[from], layers[to]
                ));
            }
        }
    }
    assert!(
        up.is_empty(),
        "imports that do not run down:\n{}",
        up.join("\n")
    );
}

#[test]
fn no_circle_between_the_files_of_a_module_folder() {
    let src = root().join("commander/src");
    let mut circles = Vec::new();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        if !e.path().is_dir() {
            continue;
        }
        let folder = e.file_name().to_string_lossy().to_string();
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for f in std::fs::read_dir(e.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if let Some(stem) = name.strip_suffix(".rs") {
                files.insert(stem.to_string(), f.path());
            } else if f.path().join("mod.rs").exists() {
                files.insert(name, f.path().join("mod.rs"));
            }
        }
        let siblings: BTreeSet<String> = files.keys().filter(|k| *k != "mod").cloned().collect();
        let mut uses: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (name, path) in &files {
            let text = std::fs::read_to_string(path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap_or("");
            let mut found = BTreeMap::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                let crate_path = format!("crate::{folder}::");
                let mut refs: Vec<String> = Vec::new();
                for prefix in ["super::", crate_path.as_str()] {
                    let mut rest = line;
                    while let Some(at) = rest.find(prefix) {
                        rest = &rest[at + prefix.len()..];
                        if let Some(group) = rest.strip_prefix('{') {
                            let group = &group[..group.find('}').unwrap_or(group.len())];
                            refs.extend(
                                group
                                    .split(',')
                                    .map(|g| g.trim().split("::").next().unwrap_or("").to_string()),
                            );
                        } else {
                            refs.push(
                                rest.chars()
                                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                                    .collect(),
                            );
                        }
                    }
                }
                for r in refs {
                    if siblings.contains(&r) && &r != name {
                        let rel = path
                            .strip_prefix(root())
                            .unwrap_or(path)
                            .display()
                            .to_string();
                        found.entry(r).or_insert_with(|| format!("{rel}:{}", n + 1));
                    }
                }
            }
            uses.insert(name.clone(), found);
        }
        let reaches = |from: &str, to: &str| reaches(&uses, from, to, |_, _| true);
        for (from, to_lines) in &uses {
            // `mod.rs` re-exports its children; children reaching up to it is the usual shape.
            if from == "mod" {
                continue;
            }
            for (to, line) in to_lines {
                if reaches(to, from) {
                    circles.push(format!(
                        "{folder}/{from} -> {to} closes a circle, at {line}"
                    ));
                }
            }
        }
    }
    assert!(circles.is_empty(), "{}", circles.join("\n"));
}

/// Every metric the commander registers is named in the docs a user reads (`fleet_` and
/// its registered name; a counter's `_total` and a unit's suffix may follow), so a new
/// metric cannot ship unexplained.
#[test]
fn every_metric_is_named_in_the_docs() {
    let mut docs = String::new();
    for e in std::fs::read_dir(root().join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push_str(&std::fs::read_to_string(e.path()).unwrap());
        }
    }
    let mut files = BTreeSet::new();
    tree(&root().join("commander/src"), "", &mut files);
    let mut missing = BTreeSet::new();
    let mut seen = 0;
    for f in files.iter().filter(|f| f.ends_with(".rs")) {
        let text = std::fs::read_to_string(root().join("commander/src").join(f)).unwrap();
        for call in ["register(", "register_with_unit("] {
            for (at, _) in text.match_indices(call) {
                // The metric's name is the call's first argument, a string literal; other
                // `register` calls take a registry.
                let rest = text[at + call.len()..].trim_start();
                let Some(literal) = rest.strip_prefix('"') else {
                    continue;
                };
                let Some(end) = literal.find('"') else {
                    continue;
                };
                seen += 1;
                let name = format!("fleet_{}", &literal[..end]);
                if !docs.contains(&name) {
                    missing.insert(format!("{name} (commander/src/{f})"));
                }
            }
        }
    }
    assert!(seen > 80, "the metrics' registrations were found: {seen}");
    assert!(
        missing.is_empty(),
        "metrics no doc names:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
}

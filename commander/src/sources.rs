//! The files the commander re-reads while it runs, checked against one another before any
//! of them changes. A decision reads the model registry, the routing rubric and the policy
//! together, so an edit to one is checked against the others as they are in force:
//!
//! - a **rubric** edit against the configured registry and pools, and the policy in force
//!   against the new rubric;
//! - a **registry** edit against the rubric (its candidate and classifier models) and the
//!   policy in force (the models it names);
//! - a **policy** against the pools, the registry and the rubric ([`PolicyEngine::parse_and_swap`]).
//!
//! Each check runs under the engine's gate against the one live snapshot in force
//! (`policy::Live`), and a change that passes is swapped in as a new snapshot with that
//! source replaced, so every snapshot a reader can see was checked as a whole. A refused
//! edit names its file and line and the file it would break, keeps what is in force, and
//! goes into the policy audit trail (source `registry` or `rubric`), as does an accepted one.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::rubric::{self, Rubric};
use crate::domain::{Location, Problem, ProblemKind};
use crate::policy::{Live, Policy, PolicyEngine, Source, SourceChange};
use crate::registry::Registry;
use crate::supervise::Supervisor;

/// The checked reloads of the registry and the rubric.
#[derive(Debug)]
pub struct Sources {
    engine: Arc<PolicyEngine>,
    /// This replica, for the audit trail.
    identity: String,
}

/// What a reload did.
#[derive(Debug, PartialEq)]
pub enum Reload {
    /// Nothing configured to reload (the value is built in).
    BuiltIn,
    /// Swapped in as this generation.
    Applied { generation: u64 },
}

/// A checked edit, ready to log and audit: the generation now in force, what changed,
/// and a size to log.
type Checked = Result<(u64, Vec<String>, usize), Vec<Problem>>;

impl Sources {
    pub fn new(engine: Arc<PolicyEngine>, identity: &str) -> Arc<Self> {
        Arc::new(Self {
            engine,
            identity: identity.to_string(),
        })
    }

    /// Re-reads the registry file and swaps it in if the rubric and the policy in force
    /// still hold against it. Refusals come back as `file:line: message` lines.
    pub async fn reload_registry(&self) -> Result<Reload, Vec<Problem>> {
        let Some(path) = self.engine.files.registry.path() else {
            return Ok(Reload::BuiltIn);
        };
        let file = path.display().to_string();
        let text = read(path)?;
        let checked = self.engine.with_gate(|| self.check_registry(&file, &text));
        self.settle(Source::Registry, &file, text, checked).await
    }

    /// Re-reads the rubric file and swaps it in if it holds against the configured
    /// registry and pools and the policy in force holds against it.
    pub async fn reload_rubric(&self) -> Result<Reload, Vec<Problem>> {
        let Some(path) = self.engine.files.rubric.path() else {
            return Ok(Reload::BuiltIn);
        };
        let file = path.display().to_string();
        let text = read(path)?;
        let checked = self.engine.with_gate(|| self.check_rubric(&file, &text));
        self.settle(Source::Rubric, &file, text, checked).await
    }

    /// Under the gate: the new registry against the rubric and the policy in force.
    fn check_registry(&self, file: &str, text: &str) -> Checked {
        let live = self.engine.live();
        let new = Registry::parse(text, file).map_err(|e| match e {
            crate::registry::RegistryError::Invalid(p) => p,
            other => vec![Location::file(file).problem(ProblemKind::Unreadable, other.to_string())],
        })?;
        let mut problems = prefixed(
            file,
            "the routing rubric",
            live.rubric
                .recheck(rubric::CheckAgainst {
                    registry: Some(&new),
                    pools: live.pools(),
                })
                .err()
                .map(|e| rubric_problems(&e)),
        );
        problems.extend(prefixed(
            file,
            "the policy in force",
            recheck_policy(&live, &new, &live.rubric),
        ));
        if !problems.is_empty() {
            return Err(problems);
        }
        let diff = registry_diff(&live.registry, &new);
        let size = new.models().len();
        let now = self.engine.swap_source(|l| l.with_registry(new));
        Ok((now.registry_generation, diff, size))
    }

    /// Under the gate: the new rubric against the registry and pools, and the policy in
    /// force against the new rubric.
    fn check_rubric(&self, file: &str, text: &str) -> Checked {
        let live = self.engine.live();
        let new = Rubric::parse(
            text,
            file,
            rubric::CheckAgainst {
                registry: Some(&live.registry),
                pools: live.pools(),
            },
        )
        .map_err(|e| rubric_problems(&e))?;
        let problems = prefixed(
            file,
            "the policy in force",
            recheck_policy(&live, &live.registry, &new),
        );
        if !problems.is_empty() {
            return Err(problems);
        }
        let diff = rubric_diff(&live.rubric, &new);
        let size = new.task_types.len();
        let now = self.engine.swap_source(|l| l.with_rubric(new));
        Ok((now.rubric_generation, diff, size))
    }

    /// Watches both files (when configured) until the returned tasks are dropped, and
    /// looks at them every `rescan` whatever the file events say.
    pub fn watch(
        self: &Arc<Self>,
        rescan: Duration,
        supervisor: &Supervisor,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let files = [
            (
                Source::Registry,
                self.engine.files.registry.path(),
                "registry_watch",
            ),
            (
                Source::Rubric,
                self.engine.files.rubric.path(),
                "rubric_watch",
            ),
        ];
        files
            .into_iter()
            .filter_map(|(source, path, task)| {
                let me = self.clone();
                let reload = move || {
                    let me = me.clone();
                    async move {
                        let _ = match source {
                            Source::Registry => me.reload_registry().await,
                            _ => me.reload_rubric().await,
                        };
                    }
                };
                Some(watch_file(path?, rescan, supervisor, task, reload))
            })
            .collect()
    }

    /// Logs, records and audits the outcome of a checked reload.
    async fn settle(
        &self,
        source: Source,
        file: &str,
        text: String,
        checked: Checked,
    ) -> Result<Reload, Vec<Problem>> {
        let record = match source {
            Source::Registry => &self.engine.files.registry,
            _ => &self.engine.files.rubric,
        };
        let (errors, diff, outcome) = match checked {
            Ok((generation, diff, size)) => {
                tracing::info!(file, generation, size, changes = %diff.join("; "), "{} reloaded", source.as_str());
                record.accepted();
                (Vec::new(), diff, Ok(Reload::Applied { generation }))
            }
            Err(problems) => {
                let text = crate::domain::render(&problems);
                tracing::error!(file, errors = %text.join(" | "), "{} change refused; keeping the one in force", source.as_str());
                record.refuse(text.join("\n"));
                (text, Vec::new(), Err(problems))
            }
        };
        self.engine
            .audit_source_change(SourceChange {
                source,
                file: file.to_string(),
                text,
                identity: self.identity.clone(),
                errors,
                diff,
            })
            .await;
        outcome
    }
}

/// The policy in force, checked again against `registry` and `rubric`.
fn recheck_policy(live: &Live, registry: &Registry, rubric: &Rubric) -> Option<Vec<Problem>> {
    Policy::parse(
        live.policy.documents.clone(),
        crate::policy::CheckAgainst {
            pools: live.pools(),
            registry,
            rubric,
        },
    )
    .err()
    .map(|e| match e {
        crate::policy::PolicyError::Invalid(p) => p,
        other => vec![Location::file("policy").problem(ProblemKind::BadValue, other.to_string())],
    })
}

fn read(path: &Path) -> Result<String, Vec<Problem>> {
    std::fs::read_to_string(path).map_err(|e| {
        vec![
            Location::file(&path.display().to_string())
                .problem(ProblemKind::Unreadable, e.to_string()),
        ]
    })
}

fn rubric_problems(e: &rubric::RubricError) -> Vec<Problem> {
    match e {
        rubric::RubricError::Invalid(problems) => problems.clone(),
        other => vec![Location::file("rubric").problem(ProblemKind::Unreadable, other.to_string())],
    }
}

/// Problems another file has with an edit of `file`, each naming both: the edited file,
/// and the other file's own problem (its file and line) in the message.
fn prefixed(file: &str, what: &str, problems: Option<Vec<Problem>>) -> Vec<Problem> {
    problems
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            Location::file(file).problem(
                ProblemKind::BreaksOther,
                format!("this edit breaks {what}: {p}"),
            )
        })
        .collect()
}

fn registry_diff(old: &Registry, new: &Registry) -> Vec<String> {
    let names =
        |r: &Registry| -> BTreeSet<String> { r.models().iter().map(|m| m.name.clone()).collect() };
    let (before, after) = (names(old), names(new));
    let mut diff: Vec<String> = after
        .difference(&before)
        .map(|m| format!("model {m} added"))
        .collect();
    diff.extend(
        before
            .difference(&after)
            .map(|m| format!("model {m} removed")),
    );
    for m in new.models() {
        if let Some(o) = old.lookup(&m.name)
            && (o.input_per_mtok != m.input_per_mtok || o.output_per_mtok != m.output_per_mtok)
        {
            diff.push(format!("model {} repriced", m.name));
        }
    }
    diff
}

fn rubric_diff(old: &Rubric, new: &Rubric) -> Vec<String> {
    let names =
        |r: &Rubric| -> BTreeSet<String> { r.task_types.iter().map(|t| t.name.clone()).collect() };
    let (before, after) = (names(old), names(new));
    let mut diff: Vec<String> = after
        .difference(&before)
        .map(|t| format!("task type {t} added"))
        .collect();
    diff.extend(
        before
            .difference(&after)
            .map(|t| format!("task type {t} removed")),
    );
    if diff.is_empty() {
        diff.push("task types unchanged; candidates, tiers or prompt edited".into());
    }
    diff
}

/// Calls `reload` whenever `path`'s content (or why it cannot be read) differs from what
/// was last seen, looked at after each burst of file events in its directory and every
/// `rescan` (`hot::DirWatch` says why both). A panic while reading an edit is caught and
/// counted by `supervisor`; the watcher carries on.
fn watch_file<F, Fut>(
    path: &Path,
    rescan: Duration,
    supervisor: &Supervisor,
    task: &'static str,
    reload: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::FutureExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let path = path.to_path_buf();
    let content = move || std::fs::read(&path).map_err(|e| e.kind());
    let supervisor = supervisor.clone();
    let mut watch = crate::hot::DirWatch::new(&dir, rescan);
    // Loaded at start a moment ago; only what differs from it is an edit.
    let mut last = content();
    tokio::spawn(async move {
        loop {
            // Editors write in several steps: wait for the burst to end.
            watch.changed(Duration::from_millis(150)).await;
            let now = content();
            if now == last {
                continue;
            }
            last = now;
            if let Err(payload) = std::panic::AssertUnwindSafe(reload()).catch_unwind().await {
                supervisor.caught(task, payload.as_ref());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ManualClock, Start};
    use crate::route::RoutingTable;
    use crate::store::Store;

    /// An engine whose registry and rubric are re-read from files in `dir`.
    fn engine(dir: &Path) -> Arc<PolicyEngine> {
        let registry_file = dir.join("models.toml");
        std::fs::write(&registry_file, crate::registry::BUILTIN).unwrap();
        engine_reading(dir, registry_file)
    }

    /// An engine whose registry is re-read from `registry_file` (written already) and its
    /// rubric from a file in `dir`.
    fn engine_reading(dir: &Path, registry_file: std::path::PathBuf) -> Arc<PolicyEngine> {
        let rubric_file = dir.join("rubric.toml");
        std::fs::write(&rubric_file, rubric::BUILTIN).unwrap();
        let registry = Registry::load(&registry_file).unwrap();
        let rubric = Rubric::load(
            &rubric_file,
            rubric::CheckAgainst {
                registry: Some(&registry),
                pools: None,
            },
        )
        .unwrap();
        let policy = Policy::builtin(crate::policy::CheckAgainst {
            pools: None,
            registry: &registry,
            rubric: &rubric,
        })
        .unwrap();
        let store = Store::open(&dir.join("sled")).unwrap();
        PolicyEngine::open(
            &store,
            Start {
                routing: RoutingTable {
                    pools: Default::default(),
                    routing: Default::default(),
                },
                registry,
                registry_file: Some(registry_file),
                rubric,
                rubric_file: Some(rubric_file),
                policy,
            },
            ManualClock::at(1_800_000_000_000),
            100,
            100,
        )
        .unwrap()
    }

    const ONE_MODEL: &str = "[[model]]\nname = \"m\"\nprovider = \"p\"\ncontext_window = 5\ntier = \"premium\"\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n";

    #[tokio::test]
    async fn a_registry_edit_is_checked_against_the_rubric_and_a_bad_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let sources = Sources::new(engine.clone(), "test");
        let before = engine.live();
        let n = before.registry.models().len();

        // Syntax error: named with file and line, nothing changes.
        std::fs::write(dir.path().join("models.toml"), "[[model]]\nname = 1\n").unwrap();
        let err = sources.reload_registry().await.unwrap_err();
        assert_eq!(
            (err[0].at.line, err[0].kind),
            (Some(2), ProblemKind::Syntax),
            "{err:?}"
        );
        // A registry without the rubric's models breaks the rubric: refused, naming it.
        std::fs::write(dir.path().join("models.toml"), ONE_MODEL).unwrap();
        let err = sources.reload_registry().await.unwrap_err();
        assert!(
            err.iter().all(|p| p.kind == ProblemKind::BreaksOther
                && p.at.file.ends_with("models.toml")
                && p.message.contains("rubric.toml:")),
            "each names both files: {err:?}"
        );
        let err = crate::domain::render(&err).join("\n");
        let after = engine.live();
        assert_eq!(after.registry.models().len(), n, "the last good stays");
        assert_eq!(after.registry_generation, 1);
        assert_eq!(
            engine.files.registry.last_error().as_deref(),
            Some(err.as_str())
        );

        // A repricing passes: a new snapshot, the rest of it shared with the last.
        let repriced =
            crate::registry::BUILTIN.replacen("input_per_mtok = 3.0", "input_per_mtok = 3.5", 1);
        assert_ne!(repriced, crate::registry::BUILTIN, "the seed file changed");
        std::fs::write(dir.path().join("models.toml"), repriced).unwrap();
        assert_eq!(
            sources.reload_registry().await,
            Ok(Reload::Applied { generation: 2 })
        );
        let now = engine.live();
        assert_eq!(now.registry_generation, 2);
        assert!(Arc::ptr_eq(&now.rubric, &before.rubric));
        assert!(Arc::ptr_eq(&now.policy, &before.policy));
        assert_eq!(now.generation().registry, 2);
        assert!(engine.files.registry.last_error().is_none());
        let audit = engine.audit.list(10, None).unwrap();
        assert_eq!(
            audit
                .iter()
                .filter(|r| r.source == Source::Registry)
                .count(),
            3,
            "every attempt is audited"
        );
    }

    #[tokio::test]
    async fn a_registry_mounted_from_a_configmap_follows_its_updates_and_nothing_else() {
        // kubelet's layout: `models.toml` links through `..data` into a versioned directory,
        // and an update swaps `..data`.
        let dir = tempfile::tempdir().unwrap();
        let cm = dir.path().join("cm");
        let repriced =
            crate::registry::BUILTIN.replacen("input_per_mtok = 3.0", "input_per_mtok = 3.5", 1);
        for (v, text) in [
            ("..v1", crate::registry::BUILTIN),
            ("..v2", repriced.as_str()),
        ] {
            std::fs::create_dir_all(cm.join(v)).unwrap();
            std::fs::write(cm.join(v).join("models.toml"), text).unwrap();
        }
        std::os::unix::fs::symlink("..v1", cm.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/models.toml", cm.join("models.toml")).unwrap();
        let engine = engine_reading(dir.path(), cm.join("models.toml"));
        let sources = Sources::new(engine.clone(), "test");
        let _watches = sources.watch(Duration::from_millis(50), &Supervisor::default());
        let registry_audits = || {
            engine
                .audit
                .list(100, None)
                .unwrap()
                .iter()
                .filter(|r| r.source == Source::Registry)
                .count()
        };

        // Rescans and a rewrite with the same bytes are not edits.
        std::fs::write(
            cm.join("..v1").join("models.toml"),
            crate::registry::BUILTIN,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(engine.live().registry_generation, 1);
        assert_eq!(registry_audits(), 0);

        std::os::unix::fs::symlink("..v2", cm.join("..data_tmp")).unwrap();
        std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while engine.live().registry_generation == 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the swap of ..data was never applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(engine.live().registry_generation, 2, "applied once");
        assert_eq!(registry_audits(), 1);
    }

    #[tokio::test]
    async fn a_rubric_edit_applies_with_a_new_generation_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let sources = Sources::new(engine.clone(), "test");
        let path = dir.path().join("rubric.toml");
        std::fs::write(
            &path,
            rubric::BUILTIN.replace("name = \"research\"", "name = \"investigation\""),
        )
        .unwrap();
        assert_eq!(
            sources.reload_rubric().await,
            Ok(Reload::Applied { generation: 2 })
        );
        assert!(engine.live().rubric.task_type("investigation").is_some());

        std::fs::write(
            &path,
            rubric::BUILTIN.replace("default_tier = \"simple\"", "default_tier = \"trivial\""),
        )
        .unwrap();
        let err = sources.reload_rubric().await.unwrap_err();
        assert!(
            err.iter()
                .any(|p| p.kind == ProblemKind::UnknownName && p.message.contains("trivial")),
            "{err:?}"
        );
        let err = crate::domain::render(&err).join("\n");
        let live = engine.live();
        assert!(
            live.rubric.task_type("investigation").is_some(),
            "the last good stays"
        );
        assert_eq!(live.rubric_generation, 2);
        assert_eq!(
            engine.files.rubric.last_error().as_deref(),
            Some(err.as_str())
        );
    }
}

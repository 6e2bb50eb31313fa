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
//! One gate ([`Against::gate`]) serialises these checks and their swaps, so every
//! combination a reader can see was checked together. A refused edit names its file and
//! line and the file it would break, keeps what is in force, and goes into the policy audit
//! trail (source `registry` or `rubric`), as does an accepted one.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::rubric::{self, Rubric};
use crate::policy::{Against, CheckAgainst, Policy, PolicyEngine, Source, SourceChange};
use crate::registry::Registry;
use crate::supervise::Supervisor;

/// The checked reloads of the registry and the rubric.
#[derive(Debug)]
pub struct Sources {
    against: Against,
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

impl Sources {
    pub fn new(against: Against, engine: Arc<PolicyEngine>, identity: &str) -> Arc<Self> {
        Arc::new(Self {
            against,
            engine,
            identity: identity.to_string(),
        })
    }

    /// Re-reads the registry file and swaps it in if the rubric and the policy in force
    /// still hold against it. Refusals come back as `file:line: message` lines.
    pub async fn reload_registry(&self) -> Result<Reload, Vec<String>> {
        let handle = &self.against.registry;
        let Some(path) = handle.path() else {
            return Ok(Reload::BuiltIn);
        };
        let file = path.display().to_string();
        let text = read(path)?;
        let checked = self.with_gate(|| {
            let new = Registry::parse(&text, &file).map_err(|e| vec![e.to_string()])?;
            let rubric = self.against.rubric.current();
            let mut problems = prefixed(
                &file,
                "the routing rubric",
                rubric
                    .recheck(rubric::CheckAgainst {
                        registry: Some(&new),
                        pools: self.pools(),
                    })
                    .err()
                    .map(|e| rubric_problems(&e)),
            );
            problems.extend(prefixed(
                &file,
                "the policy in force",
                self.recheck_policy(&new, &rubric),
            ));
            if !problems.is_empty() {
                return Err(problems);
            }
            let diff = registry_diff(&handle.current(), &new);
            let size = new.models().len();
            Ok((handle.store(new), diff, size))
        });
        self.settle(Source::Registry, &file, text, checked).await
    }

    /// Re-reads the rubric file and swaps it in if it holds against the configured
    /// registry and pools and the policy in force holds against it.
    pub async fn reload_rubric(&self) -> Result<Reload, Vec<String>> {
        let handle = &self.against.rubric;
        let Some(path) = handle.path() else {
            return Ok(Reload::BuiltIn);
        };
        let file = path.display().to_string();
        let text = read(path)?;
        let checked = self.with_gate(|| {
            let registry = self.against.registry.current();
            let new = Rubric::parse(
                &text,
                &file,
                rubric::CheckAgainst {
                    registry: Some(&registry),
                    pools: self.pools(),
                },
            )
            .map_err(|e| rubric_problems(&e))?;
            let problems = prefixed(
                &file,
                "the policy in force",
                self.recheck_policy(&registry, &new),
            );
            if !problems.is_empty() {
                return Err(problems);
            }
            let diff = rubric_diff(&handle.current(), &new);
            let size = new.task_types.len();
            Ok((handle.store(new), diff, size))
        });
        self.settle(Source::Rubric, &file, text, checked).await
    }

    /// Watches both files (when configured) until the returned tasks are dropped.
    pub fn watch(self: &Arc<Self>, supervisor: &Supervisor) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(path) = self.against.registry.path() {
            let me = self.clone();
            tasks.extend(watch_file(path, supervisor, "registry_watch", move || {
                let me = me.clone();
                async move {
                    let _ = me.reload_registry().await;
                }
            }));
        }
        if let Some(path) = self.against.rubric.path() {
            let me = self.clone();
            tasks.extend(watch_file(path, supervisor, "rubric_watch", move || {
                let me = me.clone();
                async move {
                    let _ = me.reload_rubric().await;
                }
            }));
        }
        tasks
    }

    fn pools(&self) -> Option<&std::collections::BTreeMap<String, crate::config::PoolConfig>> {
        (!self.against.pools.is_empty()).then_some(&self.against.pools)
    }

    fn with_gate<R>(&self, f: impl FnOnce() -> R) -> R {
        // A poisoned gate only means a panic elsewhere mid-check; every check starts afresh.
        let _gate = self
            .against
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// The policy in force, checked again against `registry` and `rubric`.
    fn recheck_policy(&self, registry: &Registry, rubric: &Rubric) -> Option<Vec<String>> {
        let live = self.engine.live();
        Policy::parse(
            live.policy.documents.clone(),
            CheckAgainst {
                pools: self.pools(),
                registry,
                rubric,
            },
        )
        .err()
        .map(|e| e.problems())
    }

    /// Logs, records and audits the outcome of a checked reload.
    async fn settle(
        &self,
        source: Source,
        file: &str,
        text: String,
        checked: Result<(u64, Vec<String>, usize), Vec<String>>,
    ) -> Result<Reload, Vec<String>> {
        let handle_refuse = |why: String| match source {
            Source::Registry => self.against.registry.refuse(why),
            _ => self.against.rubric.refuse(why),
        };
        let (errors, diff, outcome) = match checked {
            Ok((generation, diff, size)) => {
                tracing::info!(file, generation, size, changes = %diff.join("; "), "{} reloaded", source.as_str());
                (Vec::new(), diff, Ok(Reload::Applied { generation }))
            }
            Err(problems) => {
                tracing::error!(file, errors = %problems.join(" | "), "{} change refused; keeping the one in force", source.as_str());
                handle_refuse(problems.join("\n"));
                (problems.clone(), Vec::new(), Err(problems))
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

fn read(path: &Path) -> Result<String, Vec<String>> {
    std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])
}

fn rubric_problems(e: &rubric::RubricError) -> Vec<String> {
    match e {
        rubric::RubricError::Invalid(problems) => problems.clone(),
        other => vec![other.to_string()],
    }
}

/// Problems another file has with an edit of `file`, each naming both.
fn prefixed(file: &str, what: &str, problems: Option<Vec<String>>) -> Vec<String> {
    problems
        .unwrap_or_default()
        .into_iter()
        .map(|p| format!("{file}: this edit breaks {what}: {p}"))
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

/// Calls `reload` after each burst of changes to `path` (editors write in several steps).
/// A panic while reading an edit is caught and counted by `supervisor`; the watcher carries on.
fn watch_file<F, Fut>(
    path: &Path,
    supervisor: &Supervisor,
    task: &'static str,
    reload: F,
) -> Option<tokio::task::JoinHandle<()>>
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
    let file_name = path.file_name().map(|n| n.to_os_string());
    let (watcher, mut rx) = match crate::hot::watch_dir(&dir, move |p| {
        p.file_name().map(|n| n.to_os_string()) == file_name
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, dir = %dir.display(), task, "cannot watch the file; edits need a restart");
            return None;
        }
    };
    let supervisor = supervisor.clone();
    Some(tokio::spawn(async move {
        let _watcher = watcher;
        while rx.recv().await.is_some() {
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            if let Err(payload) = std::panic::AssertUnwindSafe(reload()).catch_unwind().await {
                supervisor.caught(task, payload.as_ref());
            }
        }
    }))
}

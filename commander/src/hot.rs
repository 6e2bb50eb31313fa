//! The files the commander re-reads while it runs (the model registry, the routing rubric):
//! where each one is and why its last edit was refused. The values in force are not kept
//! here: they live in the one live snapshot (`policy::Live`: routing table, registry,
//! rubric and policy, behind one `ArcSwap`), which `sources.rs` and the policy engine
//! rebuild and swap whole. Readers below the policy layer (the fleet owner's prices) reach
//! a value in force through [`InForce`], without importing the layer above.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::domain::{Location, Problem, ProblemKind};

/// A file re-read while the commander runs, and the outcome of its last edit.
#[derive(Debug)]
pub struct SourceFile {
    path: Option<PathBuf>,
    last_error: ArcSwap<Option<String>>,
}

impl SourceFile {
    /// `None`: the value is built in and never reloaded.
    pub fn new(path: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            path,
            last_error: ArcSwap::from_pointee(None),
        })
    }

    /// The file it is reloaded from (none: built in).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records a refused edit; the value in force stays.
    pub fn refuse(&self, why: String) {
        self.last_error.store(Arc::new(Some(why)));
    }

    /// Records an accepted edit (clears the last refusal).
    pub fn accepted(&self) {
        self.last_error.store(Arc::new(None));
    }

    /// Why the last edit was refused, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.load().as_ref().clone()
    }
}

/// Where a reader below the policy layer reads a value in force: in service, the one live
/// snapshot (the policy engine implements it); in tests and tools, a [`Fixed`] value.
pub trait InForce<T>: Send + Sync + Debug {
    fn in_force(&self) -> Arc<T>;
}

/// A value that never changes (tests, benches, offline tools).
#[derive(Debug)]
pub struct Fixed<T>(pub Arc<T>);

impl<T: Debug + Send + Sync> InForce<T> for Fixed<T> {
    fn in_force(&self) -> Arc<T> {
        self.0.clone()
    }
}

/// `value`, fixed, as the shared reader the fleet and benches take.
pub fn fixed<T: Debug + Send + Sync + 'static>(value: T) -> Arc<dyn InForce<T>> {
    Arc::new(Fixed(Arc::new(value)))
}

/// Watches `dir` (not recursively): a unit arrives on the channel whenever a file for
/// which `wanted` holds changes. Access events are ignored — a reload's own read (or
/// another process reading the file) opens it, and counting that would make every reload
/// trigger the next. Keep the watcher alive as long as events are wanted.
pub fn watch_dir(
    dir: &Path,
    wanted: impl Fn(&Path) -> bool + Send + 'static,
) -> notify::Result<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && ev.paths.iter().any(|p| wanted(p))
        {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

/// 1-based line of a byte offset, for `file:line` messages.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A TOML syntax or shape error as a [`Problem`] at its line and column.
pub fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> Problem {
    let at = match e.span() {
        Some(s) => {
            let start = s.start.min(text.len());
            let line_start = text
                .get(..start)
                .and_then(|t| t.rfind('\n'))
                .map_or(0, |i| i + 1);
            let column = text
                .get(line_start..start)
                .map_or(1, |t| t.chars().count() + 1);
            Location {
                file: file.to_string(),
                line: Some(line_of(text, start)),
                column: Some(column),
            }
        }
        None => Location::file(file),
    };
    let message = e.message().to_string();
    let kind = if message.starts_with("unknown field") {
        ProblemKind::UnknownField
    } else {
        ProblemKind::Syntax
    };
    at.problem(kind, message)
}

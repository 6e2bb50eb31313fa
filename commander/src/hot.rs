//! Files that are read at start and re-read while the commander runs (the model registry,
//! the routing rubric): readers take the current value, with its generation, from one
//! [`ArcSwap`]. Reloads that check a file against the others go through
//! [`crate::sources`]; a bad edit leaves the last good value in place and says why.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

/// A value that can be loaded from a file (or is built in when no file is configured).
pub trait Reloadable: Sized + Send + Sync + 'static {
    type Error: Display;
    /// What it is, for logs ("model registry").
    const WHAT: &'static str;
    fn load(path: &Path) -> Result<Self, Self::Error>;
    fn builtin() -> Result<Self, Self::Error>;
    /// A size to log on reload (models, task types …).
    fn size(&self) -> usize;
}

/// A value and the generation it was swapped in as (1 at start, +1 per swap), read together.
#[derive(Debug)]
struct Generation<T> {
    generation: u64,
    value: Arc<T>,
}

/// The live value plus the outcome of the last reload attempt.
#[derive(Debug)]
pub struct Hot<T> {
    current: ArcSwap<Generation<T>>,
    last_error: ArcSwap<Option<String>>,
    /// The last generation handed out, so concurrent swaps never reuse one.
    generation: AtomicU64,
    path: Option<PathBuf>,
}

impl<T: Reloadable> Hot<T> {
    /// Loads `path` (or the built-in value when `None`). A bad file at start is an error.
    pub fn open(path: Option<&Path>) -> Result<Arc<Self>, T::Error> {
        let value = match path {
            Some(p) => T::load(p)?,
            None => T::builtin()?,
        };
        Ok(Self::loaded(value, path.map(Path::to_path_buf)))
    }

    /// A value already loaded (and checked) from `path`, which later reloads re-read.
    pub fn loaded(value: T, path: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Generation {
                generation: 1,
                value: Arc::new(value),
            }),
            last_error: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(1),
            path,
        })
    }

    /// A fixed value (tests, benches).
    pub fn from_value(value: T) -> Arc<Self> {
        Self::loaded(value, None)
    }

    pub fn current(&self) -> Arc<T> {
        self.current.load().value.clone()
    }

    /// The current value and its generation, from one read.
    pub fn snapshot(&self) -> (Arc<T>, u64) {
        let g = self.current.load();
        (g.value.clone(), g.generation)
    }

    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// The file it is reloaded from (none: built in).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records a refused reload; the value in force stays.
    pub fn refuse(&self, why: String) {
        self.last_error.store(Arc::new(Some(why)));
    }

    /// The rejection of the last reload, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.load().as_ref().clone()
    }

    /// Swaps in a value checked elsewhere; returns its generation.
    pub fn store(&self, value: T) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.current.store(Arc::new(Generation {
            generation,
            value: Arc::new(value),
        }));
        self.last_error.store(Arc::new(None));
        generation
    }

    /// Re-reads the file; swaps only a fully valid value in.
    pub fn reload(&self) -> Result<usize, T::Error> {
        let Some(path) = &self.path else {
            return Ok(self.current.load().value.size());
        };
        match T::load(path) {
            Ok(value) => {
                let n = value.size();
                let _ = self.store(value);
                tracing::info!(file = %path.display(), size = n, "{} reloaded", T::WHAT);
                Ok(n)
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "{} change rejected; keeping the previous one", T::WHAT);
                self.last_error.store(Arc::new(Some(e.to_string())));
                Err(e)
            }
        }
    }
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

/// A TOML syntax/shape error as `file:line: message`.
pub fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|s| format!("{file}:{}", line_of(text, s.start)))
        .unwrap_or_else(|| file.to_string());
    format!("{at}: {}", e.message())
}

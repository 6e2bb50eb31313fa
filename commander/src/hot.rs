//! Files that are read at start and re-read while the commander runs (the model registry,
//! the routing rubric): readers take the current value from an [`ArcSwap`]; a watcher
//! re-reads the file when it changes and swaps in the new value only if the whole file is
//! valid. A bad edit leaves the last good value in place and says why.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

/// A value that can be loaded from a file (or is built in when no file is configured).
pub trait Reloadable: Sized + Send + Sync + 'static {
    type Error: Display;
    /// What it is, for logs ("model registry").
    const WHAT: &'static str;
    /// Its watcher's name as a supervised task (`registry_watch`).
    const TASK: &'static str;
    fn load(path: &Path) -> Result<Self, Self::Error>;
    fn builtin() -> Result<Self, Self::Error>;
    /// A size to log on reload (models, task types …).
    fn size(&self) -> usize;
}

/// The live value plus the outcome of the last reload attempt.
#[derive(Debug)]
pub struct Hot<T> {
    current: ArcSwap<T>,
    last_error: ArcSwap<Option<String>>,
    /// Bumped on every successful swap, so caches derived from the value can tell.
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
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(value),
            last_error: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(1),
            path: path.map(Path::to_path_buf),
        }))
    }

    /// A fixed value (tests, benches).
    pub fn from_value(value: T) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(value),
            last_error: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(1),
            path: None,
        })
    }

    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The rejection of the last reload, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.load().as_ref().clone()
    }

    /// Swaps in a value checked elsewhere.
    pub fn store(&self, value: T) {
        self.current.store(Arc::new(value));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.last_error.store(Arc::new(None));
    }

    /// Re-reads the file; swaps only a fully valid value in.
    pub fn reload(&self) -> Result<usize, T::Error> {
        let Some(path) = &self.path else {
            return Ok(self.current.load().size());
        };
        match T::load(path) {
            Ok(value) => {
                let n = value.size();
                self.store(value);
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

    /// Watches the file and reloads it (debounced) until the returned task is dropped.
    /// A panic while reading an edit is caught and counted by `supervisor`; the edit is
    /// refused like any bad one and the watcher carries on.
    pub fn watch(
        self: &Arc<Self>,
        supervisor: &crate::supervise::Supervisor,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let path = self.path.clone()?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let file_name = path.file_name().map(|n| n.to_os_string());
        let (watcher, mut rx) = match watch_dir(&dir, move |p| {
            p.file_name().map(|n| n.to_os_string()) == file_name
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "cannot watch the {}; edits need a restart", T::WHAT);
                return None;
            }
        };
        let me = self.clone();
        let supervisor = supervisor.clone();
        Some(tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                // Editors write in several steps; wait for the burst to end.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while rx.try_recv().is_ok() {}
                let reloaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _ = me.reload();
                }));
                if let Err(payload) = reloaded {
                    let cause = supervisor.caught(T::TASK, payload.as_ref());
                    me.last_error.store(Arc::new(Some(format!(
                        "the edit could not be read: {cause}"
                    ))));
                }
            }
        }))
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

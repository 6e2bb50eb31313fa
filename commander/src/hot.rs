//! The files the commander re-reads while it runs (the model registry, the routing rubric):
//! where each one is and why its last edit was refused, and the watch that says when to
//! read them again ([`DirWatch`], for these and the policy directory). The values in force are not kept
//! here: they live in the one live snapshot (`policy::Live`: routing table, registry,
//! rubric and policy, behind one `ArcSwap`), which `sources.rs` and the policy engine
//! rebuild and swap whole. Readers below the policy layer (the fleet owner's prices) reach
//! a value in force through [`InForce`], without importing the layer above.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

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

/// Wakes its owner when the files of a directory may have changed: after any file event in
/// it (reads aside), and every `rescan` whatever the events said. The owner reads what it
/// wants and compares it with what it last judged; a wake-up is a hint, never a change.
///
/// Any event, not only one naming a wanted file: a Kubernetes ConfigMap (or a secret, or
/// git-sync's layout) is updated by swapping a symlink (`..data`) the files point through,
/// and the only events name the swapped link. The rescan covers what raises no event here at
/// all: a symlink swapped above the directory (the watch holds the old one's inode), a
/// network filesystem changed from another machine. At a rescan the watch is set up again
/// when the directory now resolves elsewhere, or when it could not be set up before.
#[derive(Debug)]
pub struct DirWatch {
    dir: PathBuf,
    /// Where `dir` resolved when the watch was set up.
    resolved: Option<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
    tx: tokio::sync::mpsc::Sender<()>,
    rx: tokio::sync::mpsc::Receiver<()>,
    rescan: tokio::time::Interval,
    /// A failure to watch is logged once, not at every rescan.
    warned: bool,
}

impl DirWatch {
    /// Watches `dir` (not recursively) and rescans it every `rescan` (at least 1 ms). A
    /// directory that cannot be watched is still rescanned.
    pub fn new(dir: &Path, rescan: std::time::Duration) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(16);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + rescan,
            rescan.max(std::time::Duration::from_millis(1)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut me = Self {
            dir: dir.to_path_buf(),
            resolved: None,
            watcher: None,
            tx,
            rx,
            rescan: tick,
            warned: false,
        };
        me.rewatch();
        me
    }

    /// Resolves after a burst of file events has settled (`settle` after the first, the
    /// rest dropped) or at the next rescan.
    pub async fn changed(&mut self, settle: std::time::Duration) {
        tokio::select! {
            _ = self.rx.recv() => {
                tokio::time::sleep(settle).await;
                while self.rx.try_recv().is_ok() {}
            }
            _ = self.rescan.tick() => {
                let now = std::fs::canonicalize(&self.dir).ok();
                if self.watcher.is_none() || now != self.resolved {
                    self.rewatch();
                }
            }
        }
    }

    fn rewatch(&mut self) {
        use notify::Watcher;
        self.watcher = None;
        self.resolved = std::fs::canonicalize(&self.dir).ok();
        let tx = self.tx.clone();
        let watched = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Reads are left out: a reload's own read (or another process reading the
            // files) would otherwise trigger the next one.
            if let Ok(ev) = ev
                && !ev.kind.is_access()
            {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&self.dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        match watched {
            Ok(w) => {
                self.watcher = Some(w);
                self.warned = false;
            }
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    error = %e,
                    dir = %self.dir.display(),
                    "cannot watch the directory; its files are re-read at every rescan only"
                );
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    const LONG: Duration = Duration::from_secs(3600);

    /// Points `link` at `target` in one step, as kubelet and git-sync do: a new link
    /// renamed over the old one.
    fn swap(link: &Path, target: &str) {
        let mut name = link.file_name().unwrap().to_os_string();
        name.push("_tmp");
        let tmp = link.with_file_name(name);
        symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, link).unwrap();
    }

    #[tokio::test]
    async fn a_configmap_update_wakes_the_watch_though_no_watched_file_is_named() {
        // kubelet's layout: the files are links through `..data` into a versioned directory.
        let dir = tempfile::tempdir().unwrap();
        let cm = dir.path();
        for v in ["..v1", "..v2"] {
            std::fs::create_dir(cm.join(v)).unwrap();
            std::fs::write(cm.join(v).join("main.policy.toml"), v).unwrap();
        }
        symlink("..v1", cm.join("..data")).unwrap();
        symlink("..data/main.policy.toml", cm.join("main.policy.toml")).unwrap();
        let mut watch = DirWatch::new(cm, LONG);
        swap(&cm.join("..data"), "..v2");
        tokio::time::timeout(Duration::from_secs(10), watch.changed(Duration::ZERO))
            .await
            .expect("the swap of ..data wakes the watch, long before the rescan");
        assert_eq!(
            std::fs::read_to_string(cm.join("main.policy.toml")).unwrap(),
            "..v2"
        );
    }

    #[tokio::test]
    async fn a_directory_swapped_above_the_watch_is_found_at_the_rescan_and_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, link) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("current"),
        );
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        symlink("a", &link).unwrap();
        let mut watch = DirWatch::new(&link, Duration::from_millis(200));
        assert_eq!(
            watch.resolved.as_deref(),
            Some(a.canonicalize().unwrap().as_path())
        );
        // The swap happens in the parent: the watch on `a` hears nothing of it.
        swap(&link, "b");
        tokio::time::timeout(Duration::from_secs(10), watch.changed(Duration::ZERO))
            .await
            .expect("the rescan wakes the watch");
        assert_eq!(
            watch.resolved.as_deref(),
            Some(b.canonicalize().unwrap().as_path()),
            "watched again where the directory now resolves"
        );
        assert!(watch.watcher.is_some());
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_watched_is_still_rescanned_and_watched_once_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let later = dir.path().join("later");
        let mut watch = DirWatch::new(&later, Duration::from_millis(100));
        assert!(watch.watcher.is_none());
        std::fs::create_dir(&later).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.changed(Duration::ZERO))
            .await
            .expect("the rescan wakes the watch");
        assert!(watch.watcher.is_some(), "watched once it exists");
    }
}

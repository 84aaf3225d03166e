//! Watching a mounted Secret's directory for the changes worth a reload.
//!
//! inotify reports opens and reads as well as writes, and a reload opens the very files it
//! watches. A watcher that took every event as a change reloaded itself once per debounce, for
//! ever: 20 wake-ups a second (and one for the notify thread each time) in every idle sidecar.
//! Only events that can change what a file says count here.

use std::{path::Path, time::Duration};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use tokio::sync::mpsc;

/// Events closer together than this are one reload: the kubelet's swap is several renames.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// A watched directory; dropping it stops the watch.
pub struct DirWatch {
    _watcher: RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
}

impl DirWatch {
    pub fn start(dir: &Path, mode: RecursiveMode) -> notify::Result<Self> {
        let (tx, changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| is_change(&e.kind)) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(dir, mode)?;
        Ok(Self {
            _watcher: watcher,
            changes,
        })
    }

    /// Resolves once a change has happened and its burst of events has settled; `None` when
    /// the watcher has stopped.
    pub async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await?;
        tokio::time::sleep(DEBOUNCE).await;
        while self.changes.try_recv().is_ok() {}
        Some(())
    }
}

/// Whether an event can change what a watched file says: opening, reading and closing a file
/// read-only cannot; everything else (create, write, rename, remove, metadata) may.
pub fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};

    use super::*;

    #[test]
    fn opens_and_reads_are_not_changes() {
        for kind in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(!is_change(&EventKind::Access(kind)), "{kind:?}");
        }
    }

    #[test]
    fn writes_renames_and_removals_are_changes() {
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(is_change(&kind), "{kind:?}");
        }
    }

    /// What the reload loop did to itself: reading a watched file must not wake the watcher,
    /// writing one must.
    #[tokio::test]
    async fn a_read_does_not_wake_the_watch_and_a_write_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.json");
        std::fs::write(&file, "{}").unwrap();
        let mut watch = DirWatch::start(dir.path(), RecursiveMode::Recursive).unwrap();

        for _ in 0..3 {
            std::fs::read(&file).unwrap();
        }
        let woke = tokio::time::timeout(Duration::from_millis(300), watch.changed()).await;
        assert!(woke.is_err(), "reading the file woke the watch");

        std::fs::write(&file, r#"{"changed": true}"#).unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), watch.changed()).await;
        assert_eq!(
            woke,
            Ok(Some(())),
            "writing the file did not wake the watch"
        );
    }
}

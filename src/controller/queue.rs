//! A queue of ClaudeKeys for a task beside the reconcile loop to look at soon (the orphan
//! sweep's): deduplicated, and pushing never blocks a reconcile or a watch.

use std::collections::BTreeSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// ClaudeKeys by (namespace, name), and a wake-up for the one task that takes them.
#[derive(Default)]
pub struct Queue {
    pending: Mutex<BTreeSet<(String, String)>>,
    wake: Notify,
}

impl Queue {
    pub fn push(&self, namespace: &str, name: &str) {
        self.lock()
            .insert((namespace.to_string(), name.to_string()));
        self.wake.notify_one();
    }

    /// Everything queued, emptied.
    pub fn take(&self) -> BTreeSet<(String, String)> {
        std::mem::take(&mut *self.lock())
    }

    /// Until something is pushed (at once if something was since the last wait).
    pub async fn pushed(&self) {
        self.wake.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, String)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::Queue;

    #[test]
    fn queued_claudekeys_are_taken_once() {
        let queue = Queue::default();
        queue.push("team", "bot");
        queue.push("team", "bot");
        queue.push("team", "other");
        assert_eq!(queue.take().len(), 2);
        assert!(queue.take().is_empty());
    }
}

//! ClaudeKeys waiting for a place in their namespace's pattern-list budget
//! (`super::decide::pattern_budget`), and what brings them back. A place frees when another
//! ClaudeKey of the namespace goes or changes its lists; the refused one's own watch sees
//! neither, so without this it waited for the slow poll (minutes) after its team had done
//! what its condition asked.
//!
//! The reconcile records each outcome ([`PlaceWaits::record`]); the ClaudeKey watch reports
//! the changes that can free a place (a spec changed, a ClaudeKey with patterns deleted:
//! `super::watches`), and such a change of a ClaudeKey that is not itself waiting queues its
//! namespace's waiting ones for a reconcile ([`PlaceWaits::triggers`]). A waiting one's own
//! status write wakes nobody, so two refused ClaudeKeys never wake each other in turn.
//!
//! Each reconcile of a waiting ClaudeKey records a Warning Event, so one change fans out to as
//! many API writes as its namespace has waiting ClaudeKeys: the wakes go out at most once per
//! [`WAKE_SPACING`] (changes in between are folded into the next round), so no run of edits
//! turns a namespace's waiting ClaudeKeys into a storm.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::ObjectRef;

use super::queue::Queue;
use crate::crd::ClaudeKey;

/// The least time between two rounds of wakes.
pub const WAKE_SPACING: Duration = Duration::from_secs(2);

/// Names waiting for a place, by namespace; and the ones to reconcile again.
#[derive(Default)]
pub struct PlaceWaits {
    waiting: Mutex<HashMap<String, BTreeSet<String>>>,
    wake: Queue,
}

impl PlaceWaits {
    /// What a reconcile decided: `waiting` when it refused the ClaudeKey a place.
    pub fn record(&self, namespace: &str, name: &str, waiting: bool) {
        let mut all = self.lock();
        if waiting {
            all.entry(namespace.to_string())
                .or_default()
                .insert(name.to_string());
        } else if let Some(names) = all.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                all.remove(namespace);
            }
        }
    }

    /// A ClaudeKey changed in a way that may free a place: its namespace's waiting ones are
    /// looked at again, unless it is one of them.
    pub fn changed(&self, namespace: &str, name: &str) {
        let all = self.lock();
        let Some(names) = all.get(namespace) else {
            return;
        };
        if names.contains(name) {
            return;
        }
        for waiting in names {
            self.wake.push(namespace, waiting);
        }
    }

    /// A ClaudeKey is gone: it waits no more.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.record(namespace, name, false);
    }

    /// The ClaudeKeys to reconcile again, as they are queued, at most one round per
    /// [`WAKE_SPACING`]: for `Controller::reconcile_on`.
    pub fn triggers(
        waits: impl AsRef<Self> + Send + 'static,
    ) -> impl Stream<Item = ObjectRef<ClaudeKey>> + Send + 'static {
        futures::stream::unfold((waits, false), |(waits, woke)| async move {
            if woke {
                tokio::time::sleep(WAKE_SPACING).await;
            }
            waits.as_ref().wake.pushed().await;
            let batch = waits.as_ref().wake.take();
            let refs = batch
                .into_iter()
                .map(|(namespace, name)| ObjectRef::new(&name).within(&namespace));
            Some((futures::stream::iter(refs), (waits, true)))
        })
        .flatten()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeSet<String>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn queued(waits: &PlaceWaits) -> Vec<(String, String)> {
        waits.wake.take().into_iter().collect()
    }

    fn pair(namespace: &str, name: &str) -> (String, String) {
        (namespace.to_string(), name.to_string())
    }

    /// c and e of namespace `team` wait for a place.
    fn c_and_e_waiting() -> PlaceWaits {
        let waits = PlaceWaits::default();
        waits.record("team", "c", true);
        waits.record("team", "e", true);
        waits
    }

    #[test]
    fn a_change_in_the_namespace_wakes_its_waiting_claudekeys() {
        let waits = c_and_e_waiting();
        waits.record("other", "x", true);
        waits.changed("team", "a");
        assert_eq!(queued(&waits), [pair("team", "c"), pair("team", "e")]);
        waits.forget("team", "b");
        waits.changed("team", "b");
        assert_eq!(queued(&waits), [pair("team", "c"), pair("team", "e")]);
    }

    #[test]
    fn nothing_is_woken_where_nobody_waits_nor_by_a_waiting_one() {
        let waits = PlaceWaits::default();
        waits.changed("team", "a");
        assert!(queued(&waits).is_empty());
        let waits = c_and_e_waiting();
        // c's own status write: neither c nor e is woken by it.
        waits.changed("team", "c");
        assert!(queued(&waits).is_empty());
        waits.changed("elsewhere", "a");
        assert!(queued(&waits).is_empty());
    }

    #[test]
    fn one_given_a_place_or_deleted_waits_no_more() {
        let waits = c_and_e_waiting();
        waits.record("team", "c", false);
        waits.forget("team", "e");
        waits.changed("team", "e");
        assert!(
            queued(&waits).is_empty(),
            "e's deletion woke nobody waiting"
        );
        waits.changed("team", "a");
        assert!(queued(&waits).is_empty());
        assert!(waits.lock().is_empty());
    }

    /// A round of wakes goes out at once; the changes after it wait for the spacing and are
    /// folded into one round.
    #[tokio::test(start_paused = true)]
    async fn the_trigger_stream_wakes_at_most_one_round_per_spacing() {
        let waits = Arc::new(PlaceWaits::default());
        waits.record("team", "c", true);
        let mut triggers = Box::pin(PlaceWaits::triggers(waits.clone()));
        let start = tokio::time::Instant::now();
        let c = Some(ObjectRef::new("c").within("team"));
        waits.changed("team", "a");
        assert_eq!(triggers.next().await, c);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the first round waits for nothing"
        );
        for _ in 0..10 {
            waits.changed("team", "a");
        }
        assert_eq!(triggers.next().await, c);
        assert!(start.elapsed() >= WAKE_SPACING, "{:?}", start.elapsed());
        let more = tokio::time::timeout(WAKE_SPACING * 3, triggers.next()).await;
        assert!(
            more.is_err(),
            "ten changes made more than one round: {more:?}"
        );
    }
}

//! Shared settlements, merged per ClaudeKey and sent a moment after the answers they settle.
//!
//! Settling each answer with its own script call would double the Redis calls per request,
//! and at one request at a time each settlement would sit in Redis's queue right in front of the
//! next request's admission. Settlements add up (token refunds, nano-dollars), so those of one
//! ClaudeKey within [`SETTLE_DELAY`] go as one call: one for many answers under load, none on
//! the next admission's path. The price: a refund or a spend counts up to that much later.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::shared::{Keys, SharedCounters, Unavailable};

/// How long a settlement waits for others of its ClaudeKey before it is sent.
pub const SETTLE_DELAY: Duration = Duration::from_millis(20);

/// One answer's settlement.
#[derive(Debug, Clone, Copy)]
pub struct Settlement {
    /// The ClaudeKey's tokens per minute (0: none), to refill its bucket.
    pub tpm: u64,
    /// Reserved minus used tokens (negative when usage exceeded the reservation).
    pub delta: i64,
    /// The answer's cost in nano-dollars.
    pub nanos: u64,
    pub day_seconds: i64,
}

/// Runs once the merged settlement of a ClaudeKey was sent: with the day's and month's spend
/// Redis reported, or with the nano-dollars lost to the shared total (to count locally).
pub type Settled = Box<dyn FnOnce(Result<(u64, u64), u64>) + Send>;

struct Merged {
    keys: Keys,
    settlement: Settlement,
    done: Settled,
}

/// Settlements waiting to be sent to the shared counters, by ClaudeKey (its rate key).
pub struct Settlements {
    counters: Arc<SharedCounters>,
    by_key: Mutex<HashMap<String, Merged>>,
}

impl Settlements {
    pub fn new(counters: Arc<SharedCounters>) -> Self {
        Self {
            counters,
            by_key: Mutex::default(),
        }
    }

    /// Queues a settlement, merged with the others of its ClaudeKey; the first of a batch
    /// schedules the send. `done` replaces the ClaudeKey's earlier one (they differ only in
    /// which budgets the metrics show, and the latest config is the one to show).
    pub fn queue(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        keys: &Keys,
        settlement: Settlement,
        done: Settled,
    ) {
        let mut pending = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() {
            let settlements = self.clone();
            runtime.spawn(async move {
                tokio::time::sleep(SETTLE_DELAY).await;
                settlements.flush().await;
            });
        }
        match pending.get_mut(&keys.rate) {
            Some(merged) => {
                merged.settlement.tpm = settlement.tpm;
                merged.settlement.delta += settlement.delta;
                merged.settlement.nanos += settlement.nanos;
                merged.settlement.day_seconds = settlement.day_seconds;
                merged.done = done;
            }
            None => {
                pending.insert(
                    keys.rate.clone(),
                    Merged {
                        keys: keys.clone(),
                        settlement,
                        done,
                    },
                );
            }
        }
    }

    /// Sends every queued settlement now, one call per ClaudeKey, all at once (the multiplexed
    /// connection pipelines them). Also run at shutdown, so no spend is left behind.
    pub async fn flush(&self) {
        let batch: Vec<Merged> = {
            let mut pending = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().map(|(_, merged)| merged).collect()
        };
        let sends = batch.into_iter().map(|merged| async move {
            let s = merged.settlement;
            let result = self
                .counters
                .settle(&merged.keys, s.tpm, s.delta, s.nanos, s.day_seconds)
                .await;
            (merged.done)(result.map_err(|Unavailable| s.nanos));
        });
        futures::future::join_all(sends).await;
    }
}

//! How a ClaudeKey's limits refill and give back leased credit (`lease`) through the shared
//! counters, in the background, and cover a refusal with credit another request brought in.

use std::sync::Arc;

use super::{
    KeyLimits, Shared,
    budget::Budgets,
    lease::{GiveBack, Grant, Needs},
    shared::AdmitCall,
};
use crate::crd::LimitsSpec;

impl KeyLimits {
    /// Asks for more credit in the background (one refill at a time): admissions go on
    /// from what is left meanwhile.
    pub(super) fn refill(self: &Arc<Self>, shared: &Shared, spec: &LimitsSpec, needs: &Needs) {
        if self.lease.is_asking() {
            return;
        }
        let (limits, shared, spec) = (self.clone(), shared.clone(), spec.clone());
        let users: Vec<(String, u32)> = needs.users.iter().map(|(d, _)| (d.clone(), 0)).collect();
        let wants = self.lease.wants(needs);
        tokio::spawn(async move {
            let Some(_asking) = limits.lease.ask() else {
                return;
            };
            let call = AdmitCall {
                requests: 0,
                reserve: 0,
                users: &users,
                wants,
            };
            let budgets = Budgets::default();
            let decided = shared
                .counters
                .admit(&limits.keys, &spec, &budgets, call, limits.day_seconds)
                .await;
            if let Ok(Ok(admitted)) = decided {
                limits.add_credit(&shared, &admitted.grant, &spec);
            }
        });
    }

    /// Holds granted credit; a lease it starts is watched, so what is left goes back when it
    /// expires even if no request comes to notice.
    pub(super) fn add_credit(self: &Arc<Self>, shared: &Shared, grant: &Grant, spec: &LimitsSpec) {
        if !self.lease.add(grant, spec) {
            return;
        }
        let (limits, shared) = (Arc::downgrade(self), shared.clone());
        tokio::spawn(async move {
            loop {
                let Some(held) = limits.upgrade() else { return };
                let Some(at) = held.lease.expires() else {
                    return;
                };
                if at > tokio::time::Instant::now() {
                    drop(held);
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                if let Some(back) = held.lease.expired() {
                    held.give_back(&shared, back);
                }
                return;
            }
        });
    }

    pub(super) async fn covered_after_refusal(&self, needs: &Needs<'_>) -> bool {
        if self.lease.take(needs).is_some() {
            return true;
        }
        tokio::task::yield_now().await;
        self.lease.take(needs).is_some()
    }

    /// Gives credit back in the background; if Redis does not answer it is lost, which only
    /// leaves the windows fuller than they are until they refill.
    pub(super) fn give_back(&self, shared: &Shared, back: GiveBack) {
        let (counters, keys, day_seconds) =
            (shared.counters.clone(), self.keys.clone(), self.day_seconds);
        tokio::spawn(async move {
            let _ = counters.give_back(&keys, &back, day_seconds).await;
        });
    }
}

//! What every reconcile shares: the client, the backend cache, metrics, the Event recorder, the
//! consumer-restart limiter and per-object failure counts for backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::events::{EventType, Recorder};
use kube::{Resource, api::ObjectMeta};

use super::consumers::RestartLimiter;
use super::decide::RotationReason;
use super::in_use::{KeysInUse, SourceKeys};
use super::metrics::Metrics;
use super::place_waits::PlaceWaits;
use super::queue::Queue;
use super::redis_users::NamespaceUsers;
use super::seal::Sealer;
use super::secrets::GatewayEndpoint;
use super::stores::{Stores, WrittenStatus};
use crate::backend::cache::BackendCache;
use crate::crd::ClaudeKey;
use crate::events;

/// A hook run after both Secrets are written and before status, with the rotation (if any) that
/// was just written: tests use it to kill a controller at exactly that point and prove a restart
/// never issues a second key.
pub type Hook = Arc<dyn Fn(Option<RotationReason>) -> BoxFuture<'static, ()> + Send + Sync>;

/// Shared state of one running controller.
pub struct Context {
    pub client: Client,
    /// The operator namespace (source and admin-key Secrets, gateway configs, the HMAC key).
    pub namespace: String,
    /// What `-client` Secrets say about the gateway.
    pub gateway: GatewayEndpoint,
    /// Signs and verifies the bookkeeping on Secrets.
    pub sealer: Sealer,
    /// Which upstream keys each ClaudeKey uses, for retirement.
    pub keys_in_use: KeysInUse,
    /// Records cluster sources' current keys in their status.
    pub source_keys: SourceKeys,
    pub cache: BackendCache,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub limiter: RestartLimiter,
    /// How long consumers wait for gateway proxies to see a new key; see `consumers::restart_at`.
    pub consumer_restart_delay: Duration,
    /// Base URL of the Anthropic API, for retiring replaced upstream keys via `crate::admin`.
    pub anthropic_url: String,
    /// Retirement outcomes, registered in the controller's registry.
    pub admin_metrics: crate::admin::AdminMetrics,
    /// Per-key usage gauges, filled by [`super::usage`].
    pub usage_metrics: crate::admin::UsageMetrics,
    pub after_secrets: Option<Hook>,
    /// The watch caches every reconcile reads.
    pub stores: Stores,
    /// The status last written per ClaudeKey, for a reconcile that runs before the watch
    /// delivered it.
    pub written_status: WrittenStatus,
    /// With shared limits: the Redis users of namespace-placement sidecars.
    pub namespace_users: Option<Arc<NamespaceUsers>>,
    /// ClaudeKeys whose gateway config the orphan sweep should look at.
    pub orphans: Queue,
    /// Distinct custom-pattern lists a namespace may use (`super::decide::pattern_budget`).
    pub max_pattern_lists: usize,
    /// ClaudeKeys refused a place in that budget, woken when one may have freed.
    pub place_waits: Arc<PlaceWaits>,
    failures: Mutex<HashMap<String, u32>>,
}

/// Shortest and longest waits after a failure (before jitter).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The wait after the `failures`-th failure in a row: 1 s doubling to 5 min, of which a random
/// half is taken off (`random` in [0, 1)). Without the jitter, one backend outage would make
/// every ClaudeKey on it retry in the same second, again and again; with it the retries spread
/// over half of each step while the worst case stays bounded by the cap.
pub fn backoff_after(failures: u32, random: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_MAX);
    base.mul_f64(1.0 - random.clamp(0.0, 1.0) / 2.0)
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        namespace: String,
        gateway: GatewayEndpoint,
        sealer: Sealer,
        cache: BackendCache,
        metrics: Metrics,
        recorder: Recorder,
        limiter: RestartLimiter,
        consumer_restart_delay: Duration,
        anthropic_url: String,
        admin_metrics: crate::admin::AdminMetrics,
        usage_metrics: crate::admin::UsageMetrics,
        after_secrets: Option<Hook>,
        stores: Stores,
    ) -> Self {
        Self {
            client,
            namespace,
            gateway,
            sealer,
            keys_in_use: KeysInUse::default(),
            source_keys: SourceKeys::default(),
            cache,
            metrics,
            recorder,
            limiter,
            consumer_restart_delay,
            anthropic_url,
            admin_metrics,
            usage_metrics,
            after_secrets,
            stores,
            written_status: WrittenStatus::default(),
            namespace_users: None,
            orphans: Queue::default(),
            max_pattern_lists: super::DEFAULT_MAX_PATTERN_LISTS,
            place_waits: Arc::default(),
            failures: Mutex::default(),
        }
    }

    /// Records one more failure of `key` and returns how long to wait: see [`backoff_after`].
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        backoff_after(*n, rand::random::<f64>())
    }

    /// Forgets the failures of `key` after a clean reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Publishes an Event on the ClaudeKey; a failure to record is logged, never fatal.
    pub async fn event(&self, ck: &ClaudeKey, type_: EventType, reason: &str, note: String) {
        let event = events::event(type_, "Reconcile", reason, note);
        let reference = ck.object_ref(&());
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            let ObjectMeta {
                namespace, name, ..
            } = &ck.meta();
            tracing::warn!(?namespace, ?name, %error, reason, "failed to record an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_keeps_at_least_half_of_each_step() {
        assert_eq!(backoff_after(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff_after(2, 0.0), Duration::from_secs(2));
        let low = backoff_after(3, 0.999_999);
        assert!(
            low >= Duration::from_secs(2) && low < Duration::from_millis(2001),
            "{low:?}"
        );
        assert_eq!(backoff_after(20, 0.0), BACKOFF_MAX);
        assert_eq!(backoff_after(u32::MAX, 1.0), BACKOFF_MAX / 2);
        assert_eq!(backoff_after(0, 0.0), BACKOFF_MIN);
    }

    /// Many ClaudeKeys failing together (one backend outage) must not retry in lock-step.
    #[test]
    fn simultaneous_failures_spread_out() {
        let waits: std::collections::BTreeSet<u128> = (0..200)
            .map(|_| backoff_after(6, rand::random::<f64>()).as_millis())
            .collect();
        let (lo, hi) = (waits.first().copied(), waits.last().copied());
        assert!(waits.len() > 100, "only {} distinct waits", waits.len());
        assert!(lo >= Some(16_000) && hi <= Some(32_000), "{lo:?}..{hi:?}");
        assert!(
            hi.zip(lo).is_some_and(|(h, l)| h - l > 8_000),
            "{lo:?}..{hi:?}"
        );
    }
}

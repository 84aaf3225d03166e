//! A per-source cache of upstream keys in front of the backends: each source is read at most once
//! per `refreshInterval`, however many ClaudeKeys share it, and every read is counted and timed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::{BackendError, Backends, UpstreamKey};
use crate::crd::SourceSpec;

/// An upstream key with when it was read and when it should be read again.
#[derive(Clone, Debug)]
pub struct CachedKey {
    pub key: UpstreamKey,
    /// Wall-clock time of the read, for `status.upstream.syncedAt`.
    pub synced_at: DateTime<Utc>,
    /// How long until the cache entry goes stale: the controller requeues then.
    pub refresh_in: Duration,
}

#[derive(Clone)]
struct Entry {
    key: UpstreamKey,
    fetched: Instant,
    synced_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    backend: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

/// The cache and its metrics. Failed reads are not cached: the caller backs off instead.
pub struct BackendCache {
    backends: Backends,
    entries: Mutex<HashMap<String, Entry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<BackendLabel, Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.005, 2.0, 12,
    ))
}

impl BackendCache {
    /// A cache over `backends`, registering `claudekey_backend_requests_total{backend,result}` and
    /// `claudekey_backend_request_duration_seconds{backend}` in `registry`.
    pub fn new(backends: Backends, registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<BackendLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "backend_requests",
            "Reads of upstream keys from secret backends",
            requests.clone(),
        );
        registry.register(
            "backend_request_duration_seconds",
            "Latency of reads of upstream keys from secret backends",
            latency.clone(),
        );
        Self {
            backends,
            entries: Mutex::default(),
            requests,
            latency,
        }
    }

    /// The upstream key for `source`, from the cache while it is younger than `refreshInterval`.
    pub async fn fetch(&self, source: &SourceSpec) -> Result<CachedKey, BackendError> {
        let refresh = source.refresh_interval.as_duration();
        let id = source_id(source);
        if let Some(hit) = self.lookup(&id, refresh) {
            return Ok(hit);
        }
        let backend = self.backends.for_source(source)?;
        let started = Instant::now();
        let result = backend.fetch(source).await;
        let name = backend.name();
        self.latency
            .get_or_create(&BackendLabel { backend: name })
            .observe(started.elapsed().as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                backend: name,
                result: result_label(&result),
            })
            .inc();
        let key = result?;
        let entry = Entry {
            key: key.clone(),
            fetched: Instant::now(),
            synced_at: Utc::now(),
        };
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        Ok(CachedKey {
            key,
            synced_at: entry.synced_at,
            refresh_in: refresh,
        })
    }

    /// Forgets a source, so the next fetch reads the backend (used after a failed read elsewhere).
    pub fn invalidate(&self, source: &SourceSpec) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&source_id(source));
    }

    fn lookup(&self, id: &str, refresh: Duration) -> Option<CachedKey> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(id)?;
        let age = entry.fetched.elapsed();
        (age < refresh).then(|| CachedKey {
            key: entry.key.clone(),
            synced_at: entry.synced_at,
            refresh_in: refresh - age,
        })
    }
}

/// Where a source points, without its refresh interval: sources naming the same secret share
/// one entry even when they poll at different rates. The namespace of a kubernetesSecret is part
/// of it: a team's Secret never answers for the operator namespace's Secret of the same name.
fn source_id(source: &SourceSpec) -> String {
    serde_json::to_string(&(
        &source.secret_namespace,
        &source.kubernetes_secret,
        &source.aws_secrets_manager,
        &source.vault,
    ))
    .expect("source specs always serialize")
}

fn result_label(result: &Result<UpstreamKey, BackendError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(BackendError::NotFound { .. }) => "notFound",
        Err(BackendError::AccessDenied { .. }) => "accessDenied",
        Err(BackendError::Malformed { .. }) => "malformed",
        Err(BackendError::Unavailable { .. }) => "unavailable",
        Err(BackendError::NotConfigured { .. }) => "notConfigured",
        Err(BackendError::NotAnUpstreamKey { .. }) => "notAnUpstreamKey",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;
    use secrecy::{ExposeSecret, SecretString};

    use super::*;
    use crate::backend::SecretBackend;

    struct Counting(AtomicUsize);

    impl SecretBackend for Counting {
        fn name(&self) -> &'static str {
            "kubernetes"
        }
        fn fetch<'a>(
            &'a self,
            _: &'a SourceSpec,
        ) -> BoxFuture<'a, Result<UpstreamKey, BackendError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(UpstreamKey {
                    value: SecretString::from(format!("sk-ant-{n}")),
                    version: n.to_string(),
                })
            })
        }
    }

    fn source(name: &str, refresh: &str) -> SourceSpec {
        serde_yaml::from_str(&format!(
            "{{ kubernetesSecret: {{ name: {name} }}, refreshInterval: {refresh} }}"
        ))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn reads_each_source_once_per_refresh_interval_and_counts_reads() {
        let backend = Arc::new(Counting(AtomicUsize::new(0)));
        let backends = Backends {
            kubernetes: backend.clone(),
            aws: None,
            vault: None,
        };
        let mut registry = Registry::with_prefix("claudekey");
        let cache = BackendCache::new(backends, &mut registry);
        let a = cache.fetch(&source("a", "60s")).await.unwrap();
        assert_eq!(a.refresh_in, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(20)).await;
        // Same secret, other refresh interval: shared entry.
        let again = cache.fetch(&source("a", "90s")).await.unwrap();
        assert_eq!(again.key.value.expose_secret(), "sk-ant-0");
        assert_eq!(again.refresh_in, Duration::from_secs(70));
        cache.fetch(&source("b", "60s")).await.unwrap();
        assert_eq!(backend.0.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(41)).await;
        let fresh = cache.fetch(&source("a", "60s")).await.unwrap();
        assert_eq!(fresh.key.version, "2");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "claudekey_backend_requests_total{backend=\"kubernetes\",result=\"ok\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains(
            "claudekey_backend_request_duration_seconds_count{backend=\"kubernetes\"} 3"
        ));
        assert!(!text.contains("sk-ant"));
    }

    #[tokio::test]
    async fn a_teams_secret_never_shares_an_entry_with_the_operator_namespace() {
        let backend = Arc::new(Counting(AtomicUsize::new(0)));
        let backends = Backends {
            kubernetes: backend.clone(),
            aws: None,
            vault: None,
        };
        let cache = BackendCache::new(backends, &mut Registry::default());
        let operator = cache.fetch(&source("support", "60s")).await.unwrap();
        let mut team = source("support", "60s");
        team.secret_namespace = Some("team-a".into());
        let theirs = cache.fetch(&team).await.unwrap();
        assert_ne!(
            operator.key.value.expose_secret(),
            theirs.key.value.expose_secret()
        );
        assert_eq!(backend.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn unconfigured_backends_fail_without_being_cached() {
        let backends = Backends {
            kubernetes: Arc::new(Counting(AtomicUsize::new(0))),
            aws: None,
            vault: None,
        };
        let cache = BackendCache::new(backends, &mut Registry::default());
        let aws: SourceSpec =
            serde_yaml::from_str("{ awsSecretsManager: { secretId: x } }").unwrap();
        let err = cache.fetch(&aws).await.unwrap_err();
        assert!(matches!(err, BackendError::NotConfigured { .. }));
    }
}

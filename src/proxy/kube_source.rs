//! The gateway's config from the Kubernetes API (DESIGN.md §10 "Placement"): one config Secret
//! per ClaudeKey in the operator namespace, labelled `claudekey.io/config=gateway`, each holding
//! a `proxy.json` in §8's format. The Secrets are watched (no volume, so no kubelet delay and no
//! pod restart when ClaudeKeys come and go) and each one that changes is compiled alone: the
//! others keep their compiled `Tenant`, so a gateway with thousands of ClaudeKeys applies one
//! rotation in the time of one compile. A Secret that fails to compile keeps its last good
//! version, as a file does in the directory loader.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{
    config::{CompileError, ConfigSet, Store, compile},
    limits::Limiters,
    metrics::Metrics,
    tenant::Tenant,
};
use crate::proxyconf::FILE_NAME;

/// Label (and value) that marks a Secret as a gateway config; the controller sets it.
pub use crate::crd::annotations::{CONFIG_LABEL, CONFIG_LABEL_VALUE, NAMESPACE_LABEL};
/// `claudekey-gw-<first 40 hex of sha256("<namespace>/<name>")>`: the controller's naming.
pub use crate::crd::gateway_config_secret_name as config_secret_name;
/// At most this many watch events already waiting are applied in one pass, between checks of
/// whether a publication is due (`MIN_PUBLISH_INTERVAL` decides how often one is).
const MAX_BATCH: usize = 1024;

/// A changed set is published at once when the last publication is at least this old, and
/// otherwise as soon as it is: a rotation still goes live at once, while Secrets arriving one
/// by one (the controller creating thousands of ClaudeKeys) cost one snapshot of the whole set
/// per interval instead of one per Secret. Per Secret, n of them cost O(n²): 21.5 s of the
/// gateway's CPU while 10,000 arrived (docs/benchmarks.md).
const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// When the served set's next publication is due. Pure (the caller gives the time), so the
/// throttle is tested without a clock.
#[derive(Debug, Default)]
struct Publisher {
    last: Option<Instant>,
    pending: bool,
}

impl Publisher {
    fn changed(&mut self) {
        self.pending = true;
    }

    /// When the pending change is due (`now` at the earliest); `None` without one.
    fn due(&self, now: Instant) -> Option<Instant> {
        self.pending.then(|| {
            self.last
                .map_or(now, |last| (last + MIN_PUBLISH_INTERVAL).max(now))
        })
    }

    fn published(&mut self, at: Instant) {
        self.last = Some(at);
        self.pending = false;
    }
}

/// Why one config Secret is not served (or keeps its last good version). Names the Secret,
/// never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("config Secret {secret} has no {FILE_NAME}")]
    Missing { secret: String },
    #[error("config Secret {secret}: {source}")]
    Compile {
        secret: String,
        source: CompileError,
    },
    /// The Secret's name or namespace label does not belong to the ClaudeKey its config names:
    /// two Secrets could otherwise serve (and share the limits of) one ClaudeKey.
    #[error(
        "config Secret {secret} does not belong to ClaudeKey {claudekey}: its name and {NAMESPACE_LABEL} label must match"
    )]
    Mismatch { secret: String, claudekey: String },
}

/// Where the gateway's config Secrets live, and the client that reads them.
#[derive(Clone)]
pub struct SecretsSource {
    pub client: Client,
    pub namespace: String,
}

impl std::fmt::Debug for SecretsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsSource")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

struct Entry {
    digest: [u8; 32],
    tenant: Arc<Tenant>,
}

/// The served ClaudeKeys by config Secret name, each with the digest of the bytes it was
/// compiled from. Pure bookkeeping: the watch loop feeds it Secrets, tests feed it directly.
pub struct Tenants {
    limiters: Arc<Limiters>,
    by_secret: BTreeMap<String, Entry>,
    /// Secrets seen since the watch (re)started its list; the rest are gone at `InitDone`.
    listing: Option<BTreeSet<String>>,
}

impl Tenants {
    pub fn new(limiters: Arc<Limiters>) -> Self {
        Self {
            limiters,
            by_secret: BTreeMap::new(),
            listing: None,
        }
    }

    /// A created or updated Secret; returns whether the served set changed. Only this Secret
    /// is compiled, and only when its `proxy.json` changed. On error the last good version of
    /// it (if any) stays.
    pub fn apply(&mut self, secret: &Secret) -> Result<bool, SecretError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        if let Some(listing) = &mut self.listing {
            listing.insert(name.clone());
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(FILE_NAME))
            .ok_or_else(|| SecretError::Missing {
                secret: name.clone(),
            })?;
        let digest: [u8; 32] = Sha256::digest(&bytes.0).into();
        if self
            .by_secret
            .get(&name)
            .is_some_and(|e| e.digest == digest)
        {
            return Ok(false);
        }
        let tenant = compile(&bytes.0, &self.limiters).map_err(|source| SecretError::Compile {
            secret: name.clone(),
            source,
        })?;
        check_owner(secret, &name, &tenant)?;
        self.by_secret.insert(
            name,
            Entry {
                digest,
                tenant: Arc::new(tenant),
            },
        );
        Ok(true)
    }

    /// A deleted (or no longer labelled) Secret; returns whether it was served.
    pub fn delete(&mut self, name: &str) -> bool {
        self.by_secret.remove(name).is_some()
    }

    /// The watch restarted: what it lists from now on is everything there is.
    pub fn begin_listing(&mut self) {
        self.listing = Some(BTreeSet::new());
    }

    /// The list is complete: Secrets it did not return were deleted while the watch was down.
    pub fn end_listing(&mut self) -> bool {
        let Some(seen) = self.listing.take() else {
            return false;
        };
        let before = self.by_secret.len();
        self.by_secret.retain(|name, _| seen.contains(name));
        before != self.by_secret.len()
    }

    /// The set to serve: shares every compiled tenant, so it costs one pointer per ClaudeKey.
    pub fn snapshot(&self) -> ConfigSet {
        ConfigSet::new(self.by_secret.values().map(|e| e.tenant.clone()).collect())
    }

    pub fn len(&self) -> usize {
        self.by_secret.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_secret.is_empty()
    }
}

/// The Secret must carry the name and namespace label of the ClaudeKey its config names.
fn check_owner(secret: &Secret, name: &str, tenant: &Tenant) -> Result<(), SecretError> {
    let label = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(NAMESPACE_LABEL));
    let expected = config_secret_name(&tenant.id.namespace, &tenant.id.name);
    if label != Some(&tenant.id.namespace) || name != expected {
        return Err(SecretError::Mismatch {
            secret: name.to_string(),
            claudekey: tenant.label.to_string(),
        });
    }
    Ok(())
}

/// What one watch event did to the set.
fn on_event(tenants: &mut Tenants, event: watcher::Event<Secret>, metrics: &Metrics) -> bool {
    let labelled = |s: &Secret| {
        s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CONFIG_LABEL))
            .is_some_and(|v| v == CONFIG_LABEL_VALUE)
    };
    match event {
        watcher::Event::Init => {
            tenants.begin_listing();
            false
        }
        watcher::Event::InitApply(secret) | watcher::Event::Apply(secret) => {
            let name = secret.metadata.name.clone().unwrap_or_default();
            if !labelled(&secret) {
                // The selector already filters; this guards a misconfigured selector.
                return tenants.delete(&name);
            }
            match tenants.apply(&secret) {
                Ok(changed) => {
                    if changed {
                        tracing::info!(secret = %name, "gateway config Secret loaded");
                    }
                    metrics.config_reload(true);
                    changed
                }
                Err(error) => {
                    tracing::warn!(secret = %name, %error, "keeping the last good config of this Secret");
                    metrics.config_reload(false);
                    false
                }
            }
        }
        watcher::Event::Delete(secret) => {
            let name = secret.metadata.name.unwrap_or_default();
            let removed = tenants.delete(&name);
            if removed {
                tracing::info!(secret = %name, "gateway config Secret removed");
            }
            removed
        }
        watcher::Event::InitDone => {
            // Always publish after a list, so the first one makes the gateway ready.
            tenants.end_listing();
            true
        }
    }
}

/// The watch loop's state: the compiled tenants, whether a first list completed, and the
/// publication a change is waiting for.
struct WatchState {
    tenants: Tenants,
    listed: bool,
    publisher: Publisher,
}

impl WatchState {
    /// One watch event (or error) applied; a change waits for `due`.
    fn on(
        &mut self,
        event: Result<watcher::Event<Secret>, watcher::Error>,
        metrics: &Metrics,
        namespace: &str,
    ) {
        match event {
            Ok(event) => {
                self.listed |= matches!(event, watcher::Event::InitDone);
                if on_event(&mut self.tenants, event, metrics) {
                    self.publisher.changed();
                }
            }
            Err(error) => {
                tracing::warn!(%error, %namespace, "config Secret watch failed; retrying");
            }
        }
    }

    /// When the pending change may be published. Mid-list the old set keeps serving (a
    /// relist must never drop ClaudeKeys), and nothing is served before the first list.
    fn due(&self, now: Instant) -> Option<Instant> {
        let servable = self.listed && self.tenants.listing.is_none();
        self.publisher.due(now).filter(|_| servable)
    }
}

/// Watches the config Secrets of `source.namespace` and keeps `store` current until the task is
/// aborted. `store` stays `None` (not ready) until the first complete list.
pub fn spawn(
    source: SecretsSource,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    limiters: Arc<Limiters>,
) -> tokio::task::JoinHandle<()> {
    let api: Api<Secret> = Api::namespaced(source.client, &source.namespace);
    let config = watcher::Config::default().labels(&format!("{CONFIG_LABEL}={CONFIG_LABEL_VALUE}"));
    let namespace = source.namespace;
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut state = WatchState {
            tenants: Tenants::new(limiters),
            listed: false,
            publisher: Publisher::default(),
        };
        loop {
            let next = match state.due(Instant::now()) {
                Some(at) => tokio::select! {
                    next = stream.next() => Some(next),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(stream.next().await),
            };
            if let Some(next) = next {
                let Some(first) = next else { break };
                state.on(first, &metrics, &namespace);
                // The events already waiting behind it, in the same pass.
                for _ in 1..MAX_BATCH {
                    let Some(event) = stream.next().now_or_never().flatten() else {
                        break;
                    };
                    state.on(event, &metrics, &namespace);
                }
            }
            let now = Instant::now();
            if state.due(now).is_some_and(|at| at <= now) {
                tracing::info!(claudekeys = state.tenants.len(), "gateway config updated");
                store.store(Some(Arc::new(state.tenants.snapshot())));
                state.publisher.published(now);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::sha256_hex;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    fn config(ns: &str, name: &str, workload: &str) -> String {
        serde_json::json!({
            "claudeKey": { "namespace": ns, "name": name },
            "upstream": [{ "key": "sk-ant-api03-secretUPSTREAM", "fingerprint": "up:1", "validUntil": null }],
            "workloadKeys": [{ "sha256": sha256_hex(workload), "fingerprint": "ck:1", "validUntil": null }],
            "policy": {}
        })
        .to_string()
    }

    fn secret(ns: &str, name: &str, proxy_json: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(config_secret_name(ns, name)),
                labels: Some(
                    [
                        (CONFIG_LABEL.to_string(), CONFIG_LABEL_VALUE.to_string()),
                        (NAMESPACE_LABEL.to_string(), ns.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some([(FILE_NAME.to_string(), ByteString(proxy_json.into()))].into()),
            ..Default::default()
        }
    }

    fn labels(t: &Tenants) -> Vec<String> {
        t.snapshot()
            .tenants
            .iter()
            .map(|t| t.label.to_string())
            .collect()
    }

    #[test]
    fn a_change_is_published_at_once_unless_one_was_within_the_interval() {
        let t0 = Instant::now();
        let mut p = Publisher::default();
        assert_eq!(p.due(t0), None, "nothing changed");
        p.changed();
        assert_eq!(p.due(t0), Some(t0), "the first change is due at once");
        p.published(t0);
        assert_eq!(p.due(t0), None);
        let soon = t0 + MIN_PUBLISH_INTERVAL / 4;
        p.changed();
        p.changed();
        assert_eq!(
            p.due(soon),
            Some(t0 + MIN_PUBLISH_INTERVAL),
            "changes right after a publication wait for the interval, together"
        );
        let later = t0 + MIN_PUBLISH_INTERVAL * 3;
        assert_eq!(
            p.due(later),
            Some(later),
            "a change after a quiet interval is due at once"
        );
    }

    #[test]
    fn name_is_stable_and_fits() {
        let name = config_secret_name("team-a", "support-bot");
        assert_eq!(name.len(), "claudekey-gw-".len() + 40);
        assert_eq!(name, config_secret_name("team-a", "support-bot"));
        assert_ne!(name, config_secret_name("team-a/support", "bot"));
        assert_ne!(name, config_secret_name("team-b", "support-bot"));
    }

    #[test]
    fn only_the_changed_secret_is_recompiled() {
        let mut t = Tenants::new(Arc::default());
        assert!(t.apply(&secret("a", "x", &config("a", "x", "k1"))).unwrap());
        assert!(t.apply(&secret("b", "y", &config("b", "y", "k2"))).unwrap());
        let before = t.snapshot();
        // Same bytes: nothing compiled, nothing changed.
        assert!(!t.apply(&secret("a", "x", &config("a", "x", "k1"))).unwrap());
        // New bytes for one Secret: the other tenant is the very same compiled object.
        assert!(t.apply(&secret("a", "x", &config("a", "x", "k3"))).unwrap());
        let after = t.snapshot();
        let y = |s: &ConfigSet| {
            s.tenants
                .iter()
                .find(|t| &*t.label == "b/y")
                .unwrap()
                .clone()
        };
        assert!(Arc::ptr_eq(&y(&before), &y(&after)));
        let x = |s: &ConfigSet| {
            s.tenants
                .iter()
                .find(|t| &*t.label == "a/x")
                .unwrap()
                .clone()
        };
        assert!(!Arc::ptr_eq(&x(&before), &x(&after)));
        assert!(t.delete(&config_secret_name("a", "x")));
        assert_eq!(labels(&t), ["b/y"]);
    }

    #[test]
    fn a_bad_update_keeps_the_last_good_version_and_names_only_the_secret() {
        let mut t = Tenants::new(Arc::default());
        t.apply(&secret("a", "x", &config("a", "x", "k1"))).unwrap();
        let good = t.snapshot().tenants[0].clone();
        let bad = r#"{"claudeKey": {"namespace": "sk-ant-api03-leakLEAK", "name": 5}}"#;
        let error = t.apply(&secret("a", "x", bad)).unwrap_err().to_string();
        assert!(error.contains(&config_secret_name("a", "x")), "{error}");
        assert!(!error.contains("sk-ant-api03"), "{error}");
        assert!(Arc::ptr_eq(&good, &t.snapshot().tenants[0]));
        let mut empty = secret("a", "x", "");
        empty.data = None;
        assert!(matches!(t.apply(&empty), Err(SecretError::Missing { .. })));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_secret_must_belong_to_the_claudekey_it_configures() {
        let mut t = Tenants::new(Arc::default());
        // Named for a/x but configuring b/y.
        let mut s = secret("a", "x", &config("b", "y", "k"));
        assert!(matches!(t.apply(&s), Err(SecretError::Mismatch { .. })));
        // Right name, wrong namespace label.
        s = secret("b", "y", &config("b", "y", "k"));
        s.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(NAMESPACE_LABEL.into(), "a".into());
        assert!(matches!(t.apply(&s), Err(SecretError::Mismatch { .. })));
        assert!(t.is_empty());
    }

    #[test]
    fn a_relist_drops_what_it_no_longer_returns_and_ignores_unlabelled() {
        let metrics = Metrics::default();
        let mut t = Tenants::new(Arc::default());
        for (ns, n) in [("a", "x"), ("b", "y")] {
            let s = secret(ns, n, &config(ns, n, n));
            on_event(&mut t, watcher::Event::Apply(s), &metrics);
        }
        let mut unlabelled = secret("c", "z", &config("c", "z", "z"));
        unlabelled.metadata.labels = None;
        assert!(!on_event(
            &mut t,
            watcher::Event::Apply(unlabelled),
            &metrics
        ));
        assert_eq!(t.len(), 2);
        on_event(&mut t, watcher::Event::Init, &metrics);
        let s = secret("b", "y", &config("b", "y", "y"));
        on_event(&mut t, watcher::Event::InitApply(s), &metrics);
        assert_eq!(t.len(), 2, "the old set serves until the list is complete");
        assert!(on_event(&mut t, watcher::Event::InitDone, &metrics));
        assert_eq!(labels(&t), ["b/y"]);
    }
}

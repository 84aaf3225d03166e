//! Leader election on a coordination.k8s.io Lease, so only one replica reconciles. A small
//! module rather than a crate, with client-go's safety margins:
//!
//! - A **follower** never trusts the wall clock written into the Lease (another node's clock may
//!   be skewed). It notes, on its own monotonic clock, when it first saw the current holder's
//!   record (holder + renewTime) and takes the Lease only after `leaseDuration` has passed since
//!   then without the record changing.
//! - The **leader** counts its own time from the *start* of its last successful renewal. Every
//!   renewal attempt is cut off at `renew deadline` (two thirds of the lease) after that instant,
//!   and a leader that has not renewed by then stops leading at once.
//!
//! A follower sees a renewal only after the leader started it, so it can take over no earlier
//! than `start + leaseDuration`, while the leader stopped at `start + renewDeadline`: there is a
//! gap of a third of the lease (5 s of the default 15 s) in which nobody leads, never an overlap.
//! `tests` prove it with a stalled leader on a virtual clock.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::time::Instant;

/// Lease settings. The renew deadline and retry period follow from the lease duration in
/// client-go's proportions (15 s / 10 s / 2.5 s).
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity, e.g. the pod name.
    pub identity: String,
    pub lease_duration: Duration,
}

impl LeaseConfig {
    /// How long a leader keeps leading without a successful renewal: two thirds of the lease,
    /// so it has stopped well before any follower may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// Pause between attempts, for followers and for the leader's renewals.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 6
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to read or write Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("lost Lease {namespace}/{name}: could not renew it within the renew deadline")]
    Lost { namespace: String, name: String },
}

/// Where the Lease lives: the apiserver in production, memory in tests.
pub trait LeaseStore: Send + Sync {
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
    /// Replaces the Lease; the apiserver refuses (409) a stale `resourceVersion`.
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
}

/// The Lease `name` through the Kubernetes API.
pub struct KubeLease {
    api: Api<Lease>,
    name: String,
}

impl LeaseStore for KubeLease {
    async fn get(&self) -> Result<Option<Lease>, kube::Error> {
        self.api.get_opt(&self.name).await
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.api.create(&PostParams::default(), lease).await
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.api
            .replace(&self.name, &PostParams::default(), lease)
            .await
    }
}

/// The holder record last seen, and when (on this replica's monotonic clock) it was first seen.
#[derive(Clone, Debug)]
struct Observed {
    record: (Option<String>, Option<String>),
    at: Instant,
}

/// A Lease handle.
pub struct Elector<S = KubeLease> {
    store: S,
    config: LeaseConfig,
    observed: Mutex<Option<Observed>>,
    /// Start of the last successful acquire or renewal: the leader's deadlines count from here.
    renewed_at: Mutex<Option<Instant>>,
}

impl Elector<KubeLease> {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        let store = KubeLease {
            api: Api::namespaced(client, &config.namespace),
            name: config.name.clone(),
        };
        Self::with_store(store, config)
    }
}

impl<S: LeaseStore> Elector<S> {
    pub fn with_store(store: S, config: LeaseConfig) -> Self {
        Self {
            store,
            config,
            observed: Mutex::default(),
            renewed_at: Mutex::default(),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            let started = Instant::now();
            match self.round(false).await {
                Ok(true) => {
                    *lock(&self.renewed_at) = Some(started);
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period()).await;
        }
    }

    /// Renews the Lease until it cannot: returns once this replica must stop leading, at the
    /// latest `renew_deadline` after the start of the last successful renewal (a request that
    /// hangs is abandoned at that instant too).
    pub async fn hold(&self) -> LeaderError {
        let mut renewed = lock(&self.renewed_at).unwrap_or_else(Instant::now);
        loop {
            let deadline = renewed + self.config.renew_deadline();
            let wake = (Instant::now() + self.config.retry_period()).min(deadline);
            tokio::time::sleep_until(wake).await;
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.round(true)).await {
                Ok(Ok(true)) => {
                    renewed = started;
                    *lock(&self.renewed_at) = Some(started);
                }
                Ok(Ok(false)) | Err(_) => return self.lost(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "failed to renew the controller Lease");
                    if Instant::now() >= deadline {
                        return self.lost();
                    }
                }
            }
        }
    }

    /// Gives the Lease up so another replica can take over without waiting for it to expire.
    pub async fn release(&self) {
        *lock(&self.renewed_at) = None;
        if let Ok(Some(mut lease)) = self.store.get().await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.config.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                spec.acquire_time = None;
                let _ = self.store.replace(&lease).await;
            }
        }
    }

    fn lost(&self) -> LeaderError {
        LeaderError::Lost {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
        }
    }

    fn api_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// When the current holder's record was first seen unchanged; a new record restarts it.
    fn observe(&self, spec: &LeaseSpec) -> Instant {
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
        );
        let mut observed = lock(&self.observed);
        match observed.as_ref() {
            Some(o) if o.record == record => o.at,
            _ => {
                let at = Instant::now();
                *observed = Some(Observed { record, at });
                at
            }
        }
    }

    /// One round of the protocol; optimistic concurrency (resourceVersion) settles races.
    /// `renewing`: this replica leads, so a Lease held by anyone else means it lost.
    async fn round(&self, renewing: bool) -> Result<bool, LeaderError> {
        let now = Utc::now();
        let existing = self.store.get().await.map_err(|e| self.api_error(e))?;
        let Some(mut lease) = existing else {
            if renewing {
                return Ok(false);
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.claim(None, now)),
            };
            return match self.store.create(&lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.api_error(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(&self.config.identity);
        if renewing && !ours {
            return Ok(false);
        }
        let seen_since = self.observe(&spec);
        if !may_take(&spec, &self.config, seen_since, Instant::now()) {
            return Ok(false);
        }
        lease.spec = Some(self.claim(Some(&spec), now));
        match self.store.replace(&lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.api_error(e)),
        }
    }

    fn claim(&self, previous: Option<&LeaseSpec>, now: DateTime<Utc>) -> LeaseSpec {
        let ours =
            previous.is_some_and(|p| p.holder_identity.as_deref() == Some(&self.config.identity));
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(micro(now))
            },
            renew_time: Some(micro(now)),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        }
    }
}

/// Whether this replica may hold a Lease with `spec`: it is ours, free, or its holder's record
/// has not changed for a whole lease duration by this replica's own clock (`seen_since` is
/// when it first saw that record). The Lease's own renewTime is never compared with this
/// replica's wall clock.
fn may_take(spec: &LeaseSpec, config: &LeaseConfig, seen_since: Instant, now: Instant) -> bool {
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == config.identity => true,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(config.lease_duration, Duration::from_secs)
                .max(config.lease_duration);
            now >= seen_since + duration
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn micro(at: DateTime<Utc>) -> MicroTime {
    let micros = at.timestamp_micros();
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(micros)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

#[cfg(test)]
#[path = "leader_tests.rs"]
mod tests;

//! Leader election on a coordination.k8s.io Lease, so only one replica reconciles. A small
//! module rather than a crate: acquire, renew on a timer, step down when renewal fails for
//! longer than the lease, and release on graceful shutdown so a successor starts at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// Lease settings. Renewal runs every third of the lease duration.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity, e.g. the pod name.
    pub identity: String,
    pub lease_duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to read or write Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("lost Lease {namespace}/{name}: could not renew it within its duration")]
    Lost { namespace: String, name: String },
}

/// A Lease handle.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn renew_every(&self) -> Duration {
        self.config.lease_duration / 3
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.renew_every()).await;
        }
    }

    /// Renews the Lease forever; returns an error once it is lost.
    pub async fn hold(&self) -> LeaderError {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => return self.lost(),
                Err(e) => {
                    tracing::warn!(error = %e, "failed to renew the controller Lease");
                    if last_renewed.elapsed() >= self.config.lease_duration {
                        return self.lost();
                    }
                }
            }
        }
    }

    /// Gives the Lease up so another replica can take over without waiting for it to expire.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.config.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                spec.acquire_time = None;
                let _ = self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await;
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

    /// One round of the protocol; optimistic concurrency (resourceVersion) settles races.
    async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = Utc::now();
        let existing = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error(e))?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.claim(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.api_error(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if !may_take(&spec, &self.config.identity, now) {
            return Ok(false);
        }
        lease.spec = Some(self.claim(Some(&spec), now));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
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

/// Whether `identity` may hold a Lease with this spec at `now`: it is ours, free, or expired.
pub fn may_take(spec: &LeaseSpec, identity: &str, now: DateTime<Utc>) -> bool {
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let Some(renewed) = spec.renew_time.as_ref() else {
                return true;
            };
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let renewed =
                DateTime::<Utc>::from_timestamp(renewed.0.as_second(), 0).unwrap_or_default();
            now >= renewed + chrono::TimeDelta::seconds(duration)
        }
    }
}

fn micro(at: DateTime<Utc>) -> MicroTime {
    let micros = at.timestamp_micros();
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(micros)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lease_is_respected_until_it_expires() {
        let now: DateTime<Utc> = "2026-11-27T10:00:10Z".parse().unwrap();
        let held = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(micro("2026-11-27T10:00:00Z".parse().unwrap())),
            ..Default::default()
        };
        assert!(may_take(&held, "a", now));
        assert!(!may_take(&held, "b", now));
        assert!(may_take(&held, "b", now + chrono::TimeDelta::seconds(5)));
        assert!(may_take(&LeaseSpec::default(), "b", now));
    }
}

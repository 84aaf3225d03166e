//! One ClaudeKey as the proxy serves it: `proxy.json` compiled once (hashes decoded, globs and
//! regexes built, limiter looked up), so no request ever compiles or allocates policy.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::HeaderValue;
use secrecy::ExposeSecret;

use super::{
    caps::Caps,
    limits::{KeyLimits, Limiters},
    prescreen::Prescreen,
    redact::Redactor,
    scope::Scope,
};
use crate::{
    crd::{LimitsSpec, PromptInjectionMode},
    proxyconf::{ClaudeKeyRef, FederationConfig, ProxyConfig, still_valid},
};

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("failed to read workload key hash {fingerprint}: not 64 hex digits")]
    Hash { fingerprint: String },
    #[error("failed to use upstream key {fingerprint}: not a valid header value")]
    UpstreamKey { fingerprint: String },
    #[error("failed to find a current upstream key: no entry has validUntil null")]
    NoCurrentUpstream,
    #[error("failed to read auditSalt: not 64 hex digits")]
    AuditSalt,
    #[error(transparent)]
    Redact(#[from] super::redact::RedactError),
}

/// An upstream key ready to send: a sensitive header value (never logged by hyper or us).
pub struct UpstreamKey {
    pub header: HeaderValue,
    /// Shared with every audit line that names it (a pointer copy per request, not a string).
    pub fingerprint: Arc<str>,
    pub valid_until: Option<DateTime<Utc>>,
}

pub struct WorkloadHash {
    pub sha256: [u8; 32],
    pub fingerprint: String,
    pub valid_until: Option<DateTime<Utc>>,
}

pub struct Tenant {
    pub id: ClaudeKeyRef,
    /// `namespace/name`, the metric label and audit field. Shared, like `namespace`, so a
    /// request's audit line and label sets copy a pointer, not the text.
    pub label: Arc<str>,
    pub namespace: Arc<str>,
    /// Current first, then the previous keys still in their grace period. Empty for a
    /// federation source.
    pub upstream: Vec<UpstreamKey>,
    /// Workload identity federation: access tokens instead of upstream keys.
    pub federation: Option<FederationConfig>,
    pub workload_keys: Vec<WorkloadHash>,
    pub expires_at: Option<DateTime<Utc>>,
    pub scope: Scope,
    pub caps: Caps,
    pub limits: LimitsSpec,
    pub limiter: Arc<KeyLimits>,
    /// Shared with every tenant whose detectors are the same (compiled once per distinct list).
    pub redactor: Arc<Redactor>,
    pub redact_responses: bool,
    pub injection: PromptInjectionMode,
    /// Both text steps in one pass, when both are on (shared like the redactor).
    pub prescreen: Option<Arc<Prescreen>>,
    /// The audit line's user hash, keyed by the ClaudeKey's salt.
    pub user_hasher: super::audit::UserHasher,
    /// Its per-request metric series, resolved on first use.
    pub series: super::metrics::Series,
}

impl Tenant {
    pub fn compile(config: &ProxyConfig, limiters: &Limiters) -> Result<Self, TenantError> {
        // A federation source has no upstream key; any other must have a current one.
        let current = match (&config.federation, config.current_upstream()) {
            (Some(_), current) => current,
            (None, Some(current)) => Some(current),
            (None, None) => return Err(TenantError::NoCurrentUpstream),
        };
        let ordered = current
            .into_iter()
            .chain(config.upstream.iter().filter(|u| u.valid_until.is_some()));
        let upstream = ordered
            .map(|u| {
                let mut header = HeaderValue::from_str(u.key.expose_secret()).map_err(|_| {
                    TenantError::UpstreamKey {
                        fingerprint: u.fingerprint.clone(),
                    }
                })?;
                header.set_sensitive(true);
                Ok(UpstreamKey {
                    header,
                    fingerprint: u.fingerprint.as_str().into(),
                    valid_until: u.valid_until,
                })
            })
            .collect::<Result<_, TenantError>>()?;
        let workload_keys = config
            .workload_keys
            .iter()
            .map(|w| {
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(w.sha256.trim(), &mut sha256).map_err(|_| {
                    TenantError::Hash {
                        fingerprint: w.fingerprint.clone(),
                    }
                })?;
                Ok(WorkloadHash {
                    sha256,
                    fingerprint: w.fingerprint.clone(),
                    valid_until: w.valid_until,
                })
            })
            .collect::<Result<_, TenantError>>()?;
        let audit_salt = match &config.audit_salt {
            None => super::audit::process_salt(),
            Some(hex_salt) => {
                let mut salt = [0u8; 32];
                hex::decode_to_slice(hex_salt.trim(), &mut salt)
                    .map_err(|_| TenantError::AuditSalt)?;
                salt
            }
        };
        let policy = &config.policy;
        let limiter = limiters.for_key(&config.claude_key);
        let redactor = Redactor::shared(&policy.data_protection)?;
        Ok(Self {
            user_hasher: super::audit::UserHasher::new(&audit_salt),
            id: config.claude_key.clone(),
            label: limiter.label().clone(),
            namespace: config.claude_key.namespace.as_str().into(),
            upstream,
            federation: config.federation.clone(),
            workload_keys,
            expires_at: policy.expires_at,
            scope: Scope::new(&policy.scope),
            caps: Caps::new(&policy.scope, &policy.data_protection),
            limits: policy.limits.clone(),
            limiter,
            redact_responses: policy.data_protection.redact_responses,
            injection: policy.data_protection.prompt_injection,
            prescreen: Prescreen::shared(&redactor, policy.data_protection.prompt_injection),
            redactor,
            series: Default::default(),
        })
    }

    /// The key to try first; `None` only for a federation source.
    pub fn current_upstream(&self) -> Option<&UpstreamKey> {
        self.upstream.first()
    }

    /// A previous upstream key still in its grace period, for one retry after a 401.
    pub fn previous_upstream(&self, now: DateTime<Utc>) -> Option<&UpstreamKey> {
        self.upstream
            .iter()
            .skip(1)
            .find(|u| still_valid(u.valid_until, now))
    }

    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// Names the ClaudeKey only: keys and compiled policy stay out of any debug output.
impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

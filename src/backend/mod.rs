//! Secret backends that hold upstream Anthropic keys (DESIGN.md §4): one trait, one file per
//! backend. Only the controller reads backends; errors say what to fix and never carry the value.

pub mod aws;
pub mod cache;
pub mod config;
pub mod kubernetes;
pub mod vault;

use std::sync::Arc;

use futures::future::BoxFuture;
use secrecy::SecretString;

use crate::crd::SourceSpec;

/// An upstream key as read from a backend, with the backend's version of it.
#[derive(Clone, Debug)]
pub struct UpstreamKey {
    /// The key itself; `Debug` shows `[REDACTED]`.
    pub value: SecretString,
    /// The backend's version identifier (Secret resourceVersion, AWS VersionId, Vault KV version).
    pub version: String,
}

/// Why a backend could not produce a key. Messages name the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{source_name} not found: {detail}")]
    NotFound { source_name: String, detail: String },
    #[error("access to {source_name} denied: {detail}")]
    AccessDenied { source_name: String, detail: String },
    #[error("{source_name} is malformed: {detail}")]
    Malformed { source_name: String, detail: String },
    #[error("failed to read {source_name}: {detail}")]
    Unavailable { source_name: String, detail: String },
    /// A Secret of the operator namespace without the upstream-key label: never read, so no
    /// source can copy the admin key or a TLS key out of the operator namespace.
    #[error(
        "{source_name} is not labelled claudekey.io/upstream-key=true; only Secrets the platform team labelled so can be a source"
    )]
    NotAnUpstreamKey { source_name: String },
    #[error("the {backend} backend is not configured in this controller: {detail}")]
    NotConfigured {
        backend: &'static str,
        detail: String,
    },
}

impl BackendError {
    /// Transient errors are retried with backoff; the others wait for a fix by a person.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// A source of upstream keys.
pub trait SecretBackend: Send + Sync {
    /// Short name for metrics labels and messages: `kubernetes`, `aws` or `vault`.
    fn name(&self) -> &'static str;

    /// Reads the current upstream key for `source`.
    fn fetch<'a>(
        &'a self,
        source: &'a SourceSpec,
    ) -> BoxFuture<'a, Result<UpstreamKey, BackendError>>;
}

/// The backends this controller was started with, chosen per ClaudeKey by its source.
#[derive(Clone)]
pub struct Backends {
    pub kubernetes: Arc<dyn SecretBackend>,
    pub aws: Option<Arc<dyn SecretBackend>>,
    pub vault: Option<Arc<dyn SecretBackend>>,
}

impl Backends {
    /// The backend that serves `source`, or why none does.
    pub fn for_source(&self, source: &SourceSpec) -> Result<&dyn SecretBackend, BackendError> {
        let not_configured = |backend, detail: &str| BackendError::NotConfigured {
            backend,
            detail: detail.to_string(),
        };
        if source.kubernetes_secret.is_some() {
            Ok(self.kubernetes.as_ref())
        } else if source.aws_secrets_manager.is_some() {
            self.aws.as_deref().ok_or_else(|| {
                not_configured(
                    "aws",
                    "install the chart with backends.aws.enabled=true (flag --aws-enabled)",
                )
            })
        } else if source.vault.is_some() {
            self.vault.as_deref().ok_or_else(|| {
                not_configured(
                    "vault",
                    "install the chart with backends.vault.address set (flag --vault-addr)",
                )
            })
        } else {
            Err(not_configured("none", "the source names no backend"))
        }
    }
}

/// The `Display` texts of a transport error and its sources ("dispatch failure: io error: …"),
/// each once: the transport's own words, never a response body nor an SDK's `Debug` dump.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.join(": ")
}

//! The embedded-default backend: the upstream key in a Secret in the operator's namespace
//! (labelled `claudekey.io/upstream-key: "true"`), or in a team's own namespace for a
//! namespaced ClaudeKeySource.
//!
//! Version: `sha256:` and the first 16 hex digits of the value's SHA-256, not the Secret's
//! resourceVersion, so relabelling or annotating the Secret never looks like a new key.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use secrecy::SecretString;

use super::{BackendError, SecretBackend, UpstreamKey};
use crate::crd::{KubernetesSecretSource, SourceSpec, annotations::UPSTREAM_KEY_LABEL};
use crate::keys::sha256_hex;

/// Reads a source's kubernetesSecret: from the operator namespace only when the Secret carries
/// the upstream-key label, or from the namespace a ClaudeKeySource lives in.
pub struct KubernetesBackend {
    client: Client,
    namespace: String,
}

impl KubernetesBackend {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
        }
    }

    async fn read(
        &self,
        source: &KubernetesSecretSource,
        team_namespace: Option<&str>,
    ) -> Result<UpstreamKey, BackendError> {
        let namespace = team_namespace.unwrap_or(&self.namespace);
        let source_name = format!("Secret {namespace}/{}", source.name);
        let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_opt(&source.name)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 403 => BackendError::AccessDenied {
                    source_name: source_name.clone(),
                    detail: "grant the controller get on Secrets in that namespace".to_string(),
                },
                // Only code and reason: a response that failed to parse may quote Secret data.
                kube::Error::Api(status) => BackendError::Unavailable {
                    source_name: source_name.clone(),
                    detail: format!("HTTP {} {}", status.code, status.reason),
                },
                _ => BackendError::Unavailable {
                    source_name: source_name.clone(),
                    detail: "the apiserver could not be reached or answered unreadably".to_string(),
                },
            })?;
        let Some(secret) = secret else {
            return Err(BackendError::NotFound {
                source_name,
                detail: format!(
                    "create it with the Anthropic key under data key {:?}",
                    source.key
                ),
            });
        };
        if team_namespace.is_none() && !carries_upstream_label(&secret) {
            return Err(BackendError::NotAnUpstreamKey { source_name });
        }
        let raw = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&source.key))
            .ok_or_else(|| BackendError::Malformed {
                source_name: source_name.clone(),
                detail: format!("it has no data key {:?}", source.key),
            })?;
        let value = std::str::from_utf8(&raw.0)
            .map_err(|_| BackendError::Malformed {
                source_name: source_name.clone(),
                detail: format!("data key {:?} is not UTF-8 text", source.key),
            })?
            .trim();
        if value.is_empty() {
            return Err(BackendError::Malformed {
                source_name,
                detail: format!("data key {:?} is empty", source.key),
            });
        }
        Ok(UpstreamKey {
            version: value_version(value),
            value: SecretString::from(value.to_string()),
        })
    }
}

/// Whether a Secret of the operator namespace was marked by the platform team as an upstream key.
fn carries_upstream_label(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(UPSTREAM_KEY_LABEL))
        .is_some_and(|v| v == "true")
}

/// The version this backend reports for a value.
pub fn value_version(value: &str) -> String {
    format!("sha256:{}", &sha256_hex(value)[..16])
}

impl SecretBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn fetch<'a>(
        &'a self,
        source: &'a SourceSpec,
    ) -> BoxFuture<'a, Result<UpstreamKey, BackendError>> {
        Box::pin(async move {
            match &source.kubernetes_secret {
                Some(s) => self.read(s, source.secret_namespace.as_deref()).await,
                None => Err(BackendError::NotConfigured {
                    backend: "kubernetes",
                    detail: "the source has no kubernetesSecret".to_string(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_depends_on_the_value_only_and_hides_it() {
        let v = value_version("sk-ant-api03-abc");
        assert_eq!(v, value_version("sk-ant-api03-abc"));
        assert_ne!(v, value_version("sk-ant-api03-abd"));
        assert!(v.starts_with("sha256:") && v.len() == 23 && !v.contains("abc"));
    }
}

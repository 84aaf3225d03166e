//! The embedded-default backend: the upstream key in a Secret in the operator's namespace.
//!
//! Version: `sha256:` and the first 16 hex digits of the value's SHA-256, not the Secret's
//! resourceVersion, so relabelling or annotating the Secret never looks like a new key.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use secrecy::SecretString;

use super::{BackendError, SecretBackend, UpstreamKey};
use crate::crd::{KubernetesSecretSource, SourceSpec};
use crate::keys::sha256_hex;

/// Reads `spec.source.kubernetesSecret` from the operator namespace only.
pub struct KubernetesBackend {
    secrets: Api<Secret>,
    namespace: String,
}

impl KubernetesBackend {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    async fn read(&self, source: &KubernetesSecretSource) -> Result<UpstreamKey, BackendError> {
        let source_name = format!("Secret {}/{}", self.namespace, source.name);
        let secret = self
            .secrets
            .get_opt(&source.name)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 403 => BackendError::AccessDenied {
                    source_name: source_name.clone(),
                    detail: "grant the controller get on Secrets in its namespace".to_string(),
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
                Some(s) => self.read(s).await,
                None => Err(BackendError::NotConfigured {
                    backend: "kubernetes",
                    detail: "spec.source.kubernetesSecret is not set".to_string(),
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

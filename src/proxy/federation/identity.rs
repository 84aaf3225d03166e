//! Where the proxy's identity token comes from: the kubelet-projected file of a sidecar (re-read
//! on every exchange: the kubelet replaces it at 80 % of its lifetime), or, for the gateway, a
//! fresh token for its own ServiceAccount from the TokenRequest API, one per exchange.

use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, api::PostParams};
use secrecy::SecretString;

/// Lifetime asked of the TokenRequest API: the shortest it grants, since each token is used once.
const TOKEN_REQUEST_SECONDS: i64 = 600;

/// Tokens larger than this are not JWTs (the SDK's limit): a wrong path, not a token.
const MAX_TOKEN_BYTES: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("failed to read the identity token file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the identity token file {path} is empty or larger than 16 KiB")]
    Size { path: String },
    #[error("failed to request an identity token for ServiceAccount {namespace}/{name}: {reason}")]
    TokenRequest {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "no identity token is configured: a sidecar needs --identity-token-file, the gateway --identity-service-account"
    )]
    Missing,
}

#[derive(Clone)]
pub enum IdentitySource {
    /// Sidecar: the projected serviceAccountToken volume's file.
    File(PathBuf),
    /// Gateway: its own ServiceAccount, through the TokenRequest API.
    TokenRequest {
        client: kube::Client,
        namespace: String,
        name: String,
    },
}

impl std::fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "File({})", path.display()),
            Self::TokenRequest {
                namespace, name, ..
            } => write!(f, "TokenRequest({namespace}/{name})"),
        }
    }
}

impl IdentitySource {
    /// A token for `audience`. A file yields whatever the kubelet last wrote (its audience is
    /// the volume's); the TokenRequest API a new token every time.
    pub async fn token(&self, audience: &str) -> Result<SecretString, IdentityError> {
        match self {
            Self::File(path) => {
                let shown = path.display().to_string();
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| IdentityError::File {
                        path: shown.clone(),
                        reason: e.kind().to_string(),
                    })?;
                if meta.len() == 0 || meta.len() > MAX_TOKEN_BYTES {
                    return Err(IdentityError::Size { path: shown });
                }
                let raw =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| IdentityError::File {
                            path: shown.clone(),
                            reason: e.kind().to_string(),
                        })?;
                let token = raw.trim();
                if token.is_empty() {
                    return Err(IdentityError::Size { path: shown });
                }
                Ok(SecretString::from(token.to_string()))
            }
            Self::TokenRequest {
                client,
                namespace,
                name,
            } => {
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec![audience.to_string()],
                        expiration_seconds: Some(TOKEN_REQUEST_SECONDS),
                        bound_object_ref: None,
                    },
                    ..Default::default()
                };
                let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
                let answer = api
                    .create_token_request(name, &PostParams::default(), &request)
                    .await
                    .map_err(|e| IdentityError::TokenRequest {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        reason: api_reason(&e),
                    })?;
                let token = answer.status.map(|s| s.token).unwrap_or_default();
                if token.is_empty() {
                    return Err(IdentityError::TokenRequest {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        reason: "the answer held no token".into(),
                    });
                }
                Ok(SecretString::from(token))
            }
        }
    }
}

/// HTTP code and reason only: an error body could quote the request, whose answer is a token.
fn api_reason(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("HTTP {} {}", status.code, status.reason),
        _ => "request failed".to_string(),
    }
}

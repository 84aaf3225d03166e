//! The `vault` backend: upstream keys in a HashiCorp Vault (or OpenBao) KV v2 engine, read with
//! Kubernetes auth (service-account JWT + role) or a token from a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

mod errors;

use self::errors::{map_login_error, map_read_error, status_code};
use super::{BackendError, SecretBackend, UpstreamKey};
use crate::crd::{SourceSpec, VaultSource};

/// Per-request timeout: a hung Vault must not stall the reconcile.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A Kubernetes-auth token is renewed by logging in again once this share of its TTL has passed,
/// so it never expires in the middle of a read.
const RELOGIN_AT_TTL_FRACTION: f64 = 0.8;

/// How the controller authenticates to Vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaultAuth {
    /// A token read from a file (e.g. written by Vault Agent); re-read whenever it changes.
    TokenFile(PathBuf),
    /// Kubernetes auth: the service-account JWT in `jwt_file` is exchanged for a token under `role`
    /// (a ClaudeKey's `the source's vault.role`, else `default_role`) at the auth `mount`.
    Kubernetes {
        mount: String,
        default_role: Option<String>,
        jwt_file: PathBuf,
    },
}

/// Controller-wide settings for the Vault backend.
#[derive(Clone, Debug)]
pub struct VaultSettings {
    /// Vault address, e.g. https://vault.vault.svc:8200.
    pub addr: String,
    /// PEM CA bundle that signed Vault's serving certificate, when not a public CA.
    pub ca_cert: Option<PathBuf>,
    pub auth: VaultAuth,
}

/// A logged-in client and when it should be replaced.
struct Session {
    client: Arc<VaultClient>,
    /// For token-file auth: the token the client carries, to notice the file changed.
    token: SecretString,
    /// For Kubernetes auth: when to log in again.
    renew_at: Option<Instant>,
}

/// Reads KV v2 secrets; one session per Vault role (token-file auth uses a single session).
pub struct VaultBackend {
    settings: VaultSettings,
    sessions: Mutex<HashMap<String, Session>>,
}

impl VaultBackend {
    /// Checks the settings; no request is made until the first fetch.
    pub fn new(settings: VaultSettings) -> Result<Self, BackendError> {
        validate_addr(&settings.addr)?;
        if let Some(ca) = &settings.ca_cert
            && !ca.is_file()
        {
            return Err(not_configured(format!(
                "--vault-ca-cert {} is not a readable file",
                ca.display()
            )));
        }
        Ok(Self {
            settings,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The role a source logs in with (the session key); empty for token-file auth.
    fn role_for(&self, source: &VaultSource) -> Result<String, BackendError> {
        match &self.settings.auth {
            VaultAuth::TokenFile(_) => Ok(String::new()),
            VaultAuth::Kubernetes { default_role, .. } => source
                .role
                .clone()
                .or_else(|| default_role.clone())
                .filter(|r| !r.is_empty())
                .ok_or_else(|| {
                    not_configured(format!(
                        "no Vault role to log in with for {}/{}: set vault.role on the source, or the \
                         chart value backends.vault.auth.kubernetes.role (flag --vault-auth-role)",
                        source.mount, source.path
                    ))
                }),
        }
    }

    /// A client with a valid token for `role`, logging in or re-reading the token file as needed.
    /// `stale` forces a fresh token (after Vault answered 403 to the cached one).
    async fn client(
        &self,
        role: &str,
        at: &str,
        stale: bool,
    ) -> Result<Arc<VaultClient>, BackendError> {
        let mut sessions = self.sessions.lock().await;
        match &self.settings.auth {
            VaultAuth::TokenFile(path) => {
                let token = read_secret_file(path, "--vault-token-file", at)?;
                if let Some(s) = sessions.get(role)
                    && s.token.expose_secret() == token.expose_secret()
                {
                    return Ok(s.client.clone());
                }
                let client = Arc::new(self.build_client(&token)?);
                sessions.insert(
                    role.to_string(),
                    Session {
                        client: client.clone(),
                        token,
                        renew_at: None,
                    },
                );
                Ok(client)
            }
            VaultAuth::Kubernetes {
                mount, jwt_file, ..
            } => {
                if !stale
                    && let Some(s) = sessions.get(role)
                    && s.renew_at.is_none_or(|t| Instant::now() < t)
                {
                    return Ok(s.client.clone());
                }
                // The projected service-account token rotates; read it at each login.
                let jwt = read_secret_file(jwt_file, "--vault-jwt-file", at)?;
                let anonymous = self.build_client(&SecretString::from(String::new()))?;
                let auth =
                    vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.expose_secret())
                        .await
                        .map_err(|e| map_login_error(&e, at, mount, role, &self.settings.addr))?;
                let token = SecretString::from(auth.client_token);
                let renew_at = (auth.lease_duration > 0).then(|| {
                    Instant::now()
                        + Duration::from_secs_f64(
                            auth.lease_duration as f64 * RELOGIN_AT_TTL_FRACTION,
                        )
                });
                let client = Arc::new(self.build_client(&token)?);
                sessions.insert(
                    role.to_string(),
                    Session {
                        client: client.clone(),
                        token,
                        renew_at,
                    },
                );
                Ok(client)
            }
        }
    }

    fn build_client(&self, token: &SecretString) -> Result<VaultClient, BackendError> {
        let mut builder = VaultClientSettingsBuilder::default();
        // Every setting is explicit: vaultrs otherwise falls back to VAULT_* environment variables.
        builder
            .address(&self.settings.addr)
            .token(token.expose_secret())
            .timeout(Some(REQUEST_TIMEOUT))
            .verify(true)
            .identity(None)
            .ca_certs(
                self.settings
                    .ca_cert
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            );
        let settings = builder
            .build()
            .map_err(|e| not_configured(format!("invalid Vault client settings: {e}")))?;
        VaultClient::new(settings)
            .map_err(|e| not_configured(format!("failed to build the Vault client: {e}")))
    }

    /// One KV v2 read: the secret's data and its version together, so they always match.
    async fn read(
        &self,
        client: &VaultClient,
        source: &VaultSource,
    ) -> Result<(serde_json::Value, u64), ClientError> {
        let endpoint = ReadSecretRequest::builder()
            .mount(source.mount.as_str())
            .path(source.path.as_str())
            .build()
            .map_err(|_| ClientError::ResponseEmptyError)?;
        let response = vaultrs::api::exec_with_result(client, endpoint).await?;
        Ok((response.data, response.metadata.version))
    }

    async fn fetch_vault(&self, source: &VaultSource) -> Result<UpstreamKey, BackendError> {
        let at = format!("vault secret {}/{}", source.mount, source.path);
        let role = self.role_for(source)?;
        let mut client = self.client(&role, &at, false).await?;
        let mut result = self.read(&client, source).await;
        if matches!(status_code(result.as_ref().err()), Some(401 | 403)) {
            // The token may have expired or been revoked, or the token file replaced: once more
            // with a fresh token before blaming the policy.
            client = self.client(&role, &at, true).await?;
            result = self.read(&client, source).await;
        }
        let (data, version) =
            result.map_err(|e| map_read_error(&e, &at, source, &role, &self.settings))?;
        let value =
            extract_field(&data, &source.field).map_err(|detail| BackendError::Malformed {
                source_name: at.clone(),
                detail,
            })?;
        Ok(UpstreamKey {
            value,
            version: version.to_string(),
        })
    }
}

impl SecretBackend for VaultBackend {
    fn name(&self) -> &'static str {
        "vault"
    }

    fn fetch<'a>(
        &'a self,
        source: &'a SourceSpec,
    ) -> BoxFuture<'a, Result<UpstreamKey, BackendError>> {
        Box::pin(async move {
            let vault = source.vault.as_ref().ok_or_else(|| {
                not_configured(format!(
                    "source {} is not a vault source",
                    source.describe()
                ))
            })?;
            self.fetch_vault(vault).await
        })
    }
}

pub(super) fn not_configured(detail: String) -> BackendError {
    BackendError::NotConfigured {
        backend: "vault",
        detail,
    }
}

/// vaultrs panics on an unparsable address; check it first.
fn validate_addr(addr: &str) -> Result<(), BackendError> {
    let uri: http::Uri = addr
        .parse()
        .map_err(|_| not_configured(format!("--vault-addr {addr:?} is not a URL")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(not_configured(format!(
            "--vault-addr {addr:?} must be an http:// or https:// URL with a host"
        ))),
    }
}

/// Reads a token or JWT file. Its contents are secret; errors name only the file.
fn read_secret_file(path: &Path, flag: &str, at: &str) -> Result<SecretString, BackendError> {
    let text = std::fs::read_to_string(path).map_err(|e| BackendError::AccessDenied {
        source_name: at.to_string(),
        detail: format!("failed to read {flag} {}: {e}", path.display()),
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(BackendError::AccessDenied {
            source_name: at.to_string(),
            detail: format!("{flag} {} is empty", path.display()),
        });
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// Picks the key out of a KV v2 secret's `data` (as JSON text). Errors name fields, never values.
pub(crate) fn extract_field(data: &serde_json::Value, field: &str) -> Result<SecretString, String> {
    let object = match data {
        serde_json::Value::Object(o) => o,
        serde_json::Value::Null => {
            return Err(
                "the latest version is deleted or destroyed; write a new version".to_string(),
            );
        }
        _ => return Err("the secret's data is not a key/value object".to_string()),
    };
    match object.get(field) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
            Ok(SecretString::from(s.trim().to_string()))
        }
        Some(serde_json::Value::String(_)) => Err(format!("field {field:?} is empty")),
        Some(_) => Err(format!("field {field:?} is not a string")),
        None => {
            let mut names: Vec<&str> = object.keys().map(String::as_str).take(10).collect();
            if object.len() > 10 {
                names.push("…");
            }
            let names = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            Err(format!(
                "the secret has no field {field:?} (fields: {names}); set the source's vault.field"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;
    use serde_json::json;

    use super::*;

    /// Shared with the error-mapping tests in `vault/errors.rs`.
    pub(super) const KEY: &str = "sk-ant-api03-unit-test-value-AA";

    pub(super) fn source() -> VaultSource {
        VaultSource {
            mount: "secret".into(),
            path: "claude/x".into(),
            field: "api_key".into(),
            role: None,
        }
    }

    pub(super) fn settings(auth: VaultAuth) -> VaultSettings {
        VaultSettings {
            addr: "http://127.0.0.1:8200".into(),
            ca_cert: None,
            auth,
        }
    }

    fn k8s(default_role: Option<&str>) -> VaultAuth {
        VaultAuth::Kubernetes {
            mount: "kubernetes".into(),
            default_role: default_role.map(str::to_string),
            jwt_file: "/nonexistent".into(),
        }
    }

    #[test]
    fn field_is_read_and_errors_name_fields_not_values() {
        let v = extract_field(&json!({ "api_key": KEY }), "api_key").expect("field");
        assert_eq!(v.expose_secret(), KEY);
        let err =
            extract_field(&json!({ "key": KEY, "note": "x" }), "api_key").expect_err("missing");
        assert!(
            err.contains("no field \"api_key\"") && err.contains("key, note"),
            "{err}"
        );
        assert!(!err.contains(KEY));
        assert!(extract_field(&json!({ "api_key": 1 }), "api_key").is_err());
        assert!(extract_field(&json!({ "api_key": " " }), "api_key").is_err());
        assert!(
            extract_field(&serde_json::Value::Null, "api_key")
                .expect_err("deleted")
                .contains("deleted")
        );
    }

    #[test]
    fn role_comes_from_the_source_then_the_flag() {
        let b = VaultBackend::new(settings(k8s(Some("default")))).expect("valid");
        assert_eq!(b.role_for(&source()).expect("role"), "default");
        let mut s = source();
        s.role = Some("team-a".into());
        assert_eq!(b.role_for(&s).expect("role"), "team-a");
        let b = VaultBackend::new(settings(k8s(None))).expect("valid");
        let err = b.role_for(&source()).expect_err("no role");
        assert!(err.to_string().contains("--vault-auth-role"), "{err}");
    }

    #[test]
    fn addresses_are_checked_before_vaultrs_can_panic_on_them() {
        for bad in ["", "vault:8200", "ftp://vault", "http://"] {
            assert!(validate_addr(bad).is_err(), "{bad}");
        }
        assert!(validate_addr("https://vault.vault.svc:8200").is_ok());
        let mut s = settings(k8s(None));
        s.ca_cert = Some("/nonexistent/ca.pem".into());
        assert!(VaultBackend::new(s).is_err());
    }

    #[tokio::test]
    async fn an_unreadable_token_file_names_the_file_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let b = VaultBackend::new(settings(VaultAuth::TokenFile(path.clone()))).expect("valid");
        let err = b.fetch_vault(&source()).await.expect_err("no file");
        assert!(matches!(err, BackendError::AccessDenied { .. }));
        assert!(err.to_string().contains("--vault-token-file"), "{err}");
        std::fs::write(&path, "\n").expect("write");
        let err = b.fetch_vault(&source()).await.expect_err("empty file");
        assert!(err.to_string().contains("is empty"), "{err}");
    }
}

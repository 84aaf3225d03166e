//! Mapping Vault failures to `BackendError`s that say what to fix: the path, the policy to
//! attach, the role binding. Vault's own error strings are quoted; response bodies never are.

use rustify::errors::ClientError as RestError;
use vaultrs::error::ClientError;

use super::{VaultAuth, VaultSettings, not_configured};
use crate::backend::BackendError;
use crate::crd::VaultSource;

/// The HTTP status of a Vault error response, whether or not its body parsed.
pub(super) fn status_code(err: Option<&ClientError>) -> Option<u16> {
    match err? {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: RestError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

/// Vault's own error strings ("permission denied", "invalid role name") are safe and useful;
/// nothing else from a response is quoted, since a body could hold the value.
fn vault_says(err: &ClientError) -> String {
    match err {
        ClientError::APIError { errors, .. } if !errors.is_empty() => {
            // Vault nests errors as "1 error occurred:\n\t* permission denied\n\n"; one line reads
            // better in a condition message.
            let joined = errors
                .join("; ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let cut: String = joined.chars().take(300).collect();
            format!(" (Vault: {cut})")
        }
        _ => String::new(),
    }
}

pub(super) fn map_login_error(
    err: &ClientError,
    at: &str,
    mount: &str,
    role: &str,
    addr: &str,
) -> BackendError {
    match status_code(Some(err)) {
        Some(400 | 401 | 403) => BackendError::AccessDenied {
            source_name: at.to_string(),
            detail: format!(
                "Kubernetes-auth login at auth/{mount} with role {role:?} was refused{}; check that the role \
                 exists, is bound to the controller's service account and namespace, and that Vault can \
                 review its token",
                vault_says(err)
            ),
        },
        Some(404) => not_configured(format!(
            "no Kubernetes auth method at auth/{mount} on {addr}{}; enable it or fix --vault-auth-mount",
            vault_says(err)
        )),
        _ => unavailable(err, at, addr),
    }
}

pub(super) fn map_read_error(
    err: &ClientError,
    at: &str,
    source: &VaultSource,
    role: &str,
    settings: &VaultSettings,
) -> BackendError {
    let who = match &settings.auth {
        VaultAuth::TokenFile(p) => format!("the token in {}", p.display()),
        VaultAuth::Kubernetes { .. } => format!("role {role:?}"),
    };
    match status_code(Some(err)) {
        Some(404) => BackendError::NotFound {
            source_name: at.to_string(),
            detail: format!(
                "no KV v2 secret at {}/data/{} on {}{}; write it (bao kv put -mount={} {} {}=…) or fix \
                 the source's vault mount and path",
                source.mount,
                source.path,
                settings.addr,
                vault_says(err),
                source.mount,
                source.path,
                source.field
            ),
        },
        Some(401 | 403) => BackendError::AccessDenied {
            source_name: at.to_string(),
            detail: format!(
                "permission denied for {who}{}; attach a policy with path \"{}/data/{}\" {{ capabilities = \
                 [\"read\"] }}",
                vault_says(err),
                source.mount,
                source.path
            ),
        },
        _ => unavailable(err, at, &settings.addr),
    }
}

fn unavailable(err: &ClientError, at: &str, addr: &str) -> BackendError {
    let detail = match (status_code(Some(err)), err) {
        (Some(503), _) => format!("Vault at {addr} is sealed or in standby{}", vault_says(err)),
        (Some(code), _) => format!("Vault at {addr} answered HTTP {code}{}", vault_says(err)),
        (
            None,
            ClientError::RestClientError {
                source: RestError::RequestError { source, .. },
            },
        ) => format!(
            "failed to reach Vault at {addr}: {}",
            crate::backend::error_chain(source.as_ref())
        ),
        // Display of the other vaultrs errors is a fixed sentence; their sources (parse errors)
        // are not followed, since serde messages can quote the body.
        (None, _) => format!("failed to read from Vault at {addr}: {err}"),
    };
    BackendError::Unavailable {
        source_name: at.to_string(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{KEY, settings, source};
    use super::*;

    fn api(code: u16, errors: &[&str]) -> ClientError {
        ClientError::APIError {
            code,
            errors: errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn read_errors_say_what_to_fix() {
        let s = settings(VaultAuth::TokenFile("/t/token".into()));
        let at = "vault secret secret/claude/x";
        let e = map_read_error(&api(404, &[]), at, &source(), "", &s);
        assert!(matches!(e, BackendError::NotFound { .. }));
        assert!(e.to_string().contains("secret/data/claude/x"), "{e}");
        let e = map_read_error(&api(403, &["permission denied"]), at, &source(), "", &s);
        assert!(matches!(e, BackendError::AccessDenied { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(r#"path "secret/data/claude/x" { capabilities = ["read"] }"#),
            "{msg}"
        );
        assert!(
            msg.contains("/t/token") && msg.contains("permission denied"),
            "{msg}"
        );
        let e = map_read_error(&api(503, &["Vault is sealed"]), at, &source(), "", &s);
        assert!(e.is_transient() && e.to_string().contains("sealed"), "{e}");
    }

    #[test]
    fn a_body_in_an_unparsed_error_is_never_quoted() {
        let leaked = ClientError::RestClientError {
            source: RestError::ServerResponseError {
                code: 500,
                content: Some(format!(r#"{{"data":{{"api_key":"{KEY}"}}}}"#)),
            },
        };
        let s = settings(VaultAuth::TokenFile("/t/token".into()));
        let e = map_read_error(&leaked, "at", &source(), "r", &s);
        assert!(e.is_transient());
        assert!(!e.to_string().contains(KEY), "{e}");
    }

    #[test]
    fn login_refusals_point_at_the_role_binding() {
        let e = map_login_error(
            &api(400, &["invalid role name \"x\""]),
            "at",
            "kubernetes",
            "x",
            "http://v",
        );
        assert!(matches!(e, BackendError::AccessDenied { .. }));
        assert!(e.to_string().contains("role \"x\""), "{e}");
        let e = map_login_error(&api(404, &[]), "at", "k8s", "x", "http://v");
        assert!(e.to_string().contains("--vault-auth-mount"), "{e}");
    }
}

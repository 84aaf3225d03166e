//! The controller's flags for the optional AWS and Vault backends, and building the backends from
//! them. The Kubernetes backend needs no flags; it is built by the controller.

use std::path::PathBuf;
use std::sync::Arc;

use super::aws::{AwsSecretsManagerBackend, AwsSettings};
use super::vault::{VaultAuth, VaultBackend, VaultSettings};
use super::{BackendError, SecretBackend};

/// The service-account token kubelet mounts into every pod, used for Vault Kubernetes auth.
pub const DEFAULT_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Flags for the AWS Secrets Manager and Vault backends. Each has an environment-variable twin.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendArgs {
    /// Serve ClaudeKeys whose source is awsSecretsManager. Credentials come from the SDK's default
    /// chain (IRSA / EKS Pod Identity, AWS_* variables, profile).
    #[arg(long, env = "CLAUDEKEY_AWS_ENABLED")]
    pub aws_enabled: bool,
    /// AWS region for sources that name none (default: the SDK's chain, e.g. AWS_REGION).
    #[arg(long, env = "CLAUDEKEY_AWS_REGION")]
    pub aws_region: Option<String>,
    /// Secrets Manager endpoint override, e.g. a VPC endpoint or a moto server in tests.
    #[arg(long, env = "CLAUDEKEY_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// Vault (or OpenBao) address; setting it serves ClaudeKeys whose source is vault.
    #[arg(long, env = "CLAUDEKEY_VAULT_ADDR")]
    pub vault_addr: Option<String>,
    /// Authenticate to Vault with the token in this file (re-read when it changes) instead of
    /// Kubernetes auth.
    #[arg(long, env = "CLAUDEKEY_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,
    /// Vault Kubernetes-auth role for sources that name none in the source's vault.role.
    #[arg(long, env = "CLAUDEKEY_VAULT_AUTH_ROLE")]
    pub vault_auth_role: Option<String>,
    /// Mount path of Vault's Kubernetes auth method.
    #[arg(long, env = "CLAUDEKEY_VAULT_AUTH_MOUNT", default_value = "kubernetes")]
    pub vault_auth_mount: String,
    /// Service-account JWT presented to Vault's Kubernetes auth (re-read at each login).
    #[arg(long, env = "CLAUDEKEY_VAULT_JWT_FILE", default_value = DEFAULT_JWT_FILE)]
    pub vault_jwt_file: PathBuf,
    /// PEM CA bundle to verify Vault's TLS certificate with, when not signed by a public CA.
    #[arg(long, env = "CLAUDEKEY_VAULT_CA_CERT")]
    pub vault_ca_cert: Option<PathBuf>,
}

impl BackendArgs {
    /// The AWS settings, or `None` when the AWS backend is off.
    pub fn aws_settings(&self) -> Option<AwsSettings> {
        self.aws_enabled.then(|| AwsSettings {
            region: self.aws_region.clone().filter(|r| !r.is_empty()),
            endpoint_url: self.aws_endpoint_url.clone().filter(|u| !u.is_empty()),
        })
    }

    /// The Vault settings, or `None` when no address is given. A token file wins over
    /// Kubernetes auth, so a Vault Agent sidecar can supply the token.
    pub fn vault_settings(&self) -> Option<VaultSettings> {
        let addr = self.vault_addr.clone().filter(|a| !a.is_empty())?;
        let auth = match &self.vault_token_file {
            Some(file) => VaultAuth::TokenFile(file.clone()),
            None => VaultAuth::Kubernetes {
                mount: self.vault_auth_mount.trim_matches('/').to_string(),
                default_role: self.vault_auth_role.clone().filter(|r| !r.is_empty()),
                jwt_file: self.vault_jwt_file.clone(),
            },
        };
        Some(VaultSettings {
            addr,
            ca_cert: self.vault_ca_cert.clone(),
            auth,
        })
    }
}

/// The AWS and Vault backends the flags ask for (`None` where a backend is off), for
/// `Backends { aws, vault, .. }`. Fails only on settings that can never work.
pub async fn build(
    args: &BackendArgs,
) -> Result<
    (
        Option<Arc<dyn SecretBackend>>,
        Option<Arc<dyn SecretBackend>>,
    ),
    BackendError,
> {
    let aws = match args.aws_settings() {
        Some(settings) => {
            Some(Arc::new(AwsSecretsManagerBackend::new(&settings).await) as Arc<dyn SecretBackend>)
        }
        None => None,
    };
    let vault = match args.vault_settings() {
        Some(settings) => Some(Arc::new(VaultBackend::new(settings)?) as Arc<dyn SecretBackend>),
        None => None,
    };
    Ok((aws, vault))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        backends: BackendArgs,
    }

    fn parse(args: &[&str]) -> BackendArgs {
        Cli::try_parse_from(std::iter::once("claudekey").chain(args.iter().copied()))
            .expect("flags parse")
            .backends
    }

    #[test]
    fn defaults_turn_both_backends_off() {
        let args = parse(&[]);
        assert_eq!(args.vault_auth_mount, "kubernetes");
        assert_eq!(args.vault_jwt_file, PathBuf::from(DEFAULT_JWT_FILE));
        assert!(args.aws_settings().is_none());
        assert!(args.vault_settings().is_none());
    }

    #[test]
    fn aws_flags_map_to_settings() {
        let args = parse(&[
            "--aws-enabled",
            "--aws-region",
            "eu-west-1",
            "--aws-endpoint-url",
            "http://127.0.0.1:5000",
        ]);
        let s = args.aws_settings().expect("aws on");
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
    }

    #[test]
    fn vault_defaults_to_kubernetes_auth_and_token_file_wins() {
        let args = parse(&[
            "--vault-addr",
            "https://vault:8200",
            "--vault-auth-role",
            "claudekey",
            "--vault-auth-mount",
            "/k8s/",
        ]);
        let s = args.vault_settings().expect("vault on");
        assert_eq!(
            s.auth,
            VaultAuth::Kubernetes {
                mount: "k8s".into(),
                default_role: Some("claudekey".into()),
                jwt_file: PathBuf::from(DEFAULT_JWT_FILE),
            }
        );
        let args = parse(&[
            "--vault-addr",
            "https://vault:8200",
            "--vault-token-file",
            "/t/token",
        ]);
        assert_eq!(
            args.vault_settings().expect("vault on").auth,
            VaultAuth::TokenFile("/t/token".into())
        );
    }

    #[tokio::test]
    async fn build_refuses_an_unusable_vault_address() {
        let args = parse(&["--vault-addr", "not a url"]);
        let err = build(&args).await.err().expect("bad address refused");
        assert!(
            matches!(
                err,
                BackendError::NotConfigured {
                    backend: "vault",
                    ..
                }
            ),
            "{err}"
        );
        let args = parse(&["--vault-addr", "ftp://vault"]);
        assert!(build(&args).await.is_err());
    }

    #[tokio::test]
    async fn build_returns_only_the_backends_asked_for() {
        let (aws, vault) = build(&parse(&["--vault-addr", "http://127.0.0.1:8200"]))
            .await
            .expect("build");
        assert!(aws.is_none());
        assert_eq!(vault.expect("vault").name(), "vault");
        let (aws, vault) = build(&parse(&["--aws-enabled", "--aws-region", "us-east-1"]))
            .await
            .expect("build");
        assert_eq!(aws.expect("aws").name(), "aws");
        assert!(vault.is_none());
    }
}

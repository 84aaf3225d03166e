//! The Vault backend against a real OpenBao dev server (Vault API), started by
//! `hack/control-plane.sh start`; Kubernetes auth also against its kube-apiserver (TokenReview).
//! Fails, never skips, when they are not there.

mod support;

use std::path::{Path, PathBuf};

use claudekey::backend::vault::{VaultAuth, VaultBackend, VaultSettings};
use claudekey::backend::{BackendError, SecretBackend, UpstreamKey};
use claudekey::crd::SourceSpec;
use secrecy::ExposeSecret;
use serde_json::json;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

const ADDR_ENV: &str = "CLAUDEKEY_TEST_VAULT_ADDR";
const TOKEN_ENV: &str = "CLAUDEKEY_TEST_VAULT_TOKEN";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the test servers with hack/control-plane.sh start and source its env file")
    })
}

fn addr() -> String {
    env(ADDR_ENV)
}

/// A client with the dev server's root token, to arrange secrets, policies and auth methods.
fn admin() -> VaultClient {
    client_with_token(&env(TOKEN_ENV))
}

fn client_with_token(token: &str) -> VaultClient {
    let settings = VaultClientSettingsBuilder::default()
        .address(addr())
        .token(token)
        .build()
        .expect("vault client settings");
    VaultClient::new(settings).expect("vault client")
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn test_key(tag: &str) -> String {
    format!("sk-ant-api03-{tag}-{}-AA", uuid::Uuid::new_v4().simple())
}

fn source(vault: serde_json::Value) -> SourceSpec {
    serde_json::from_value(json!({ "vault": vault })).expect("valid source")
}

async fn put(path: &str, data: serde_json::Value) {
    vaultrs::kv2::set(&admin(), "secret", path, &data)
        .await
        .expect("write KV v2 secret");
}

/// A backend that reads its token from a file in `dir`, holding `token`.
fn token_file_backend(dir: &Path, token: &str) -> (VaultBackend, PathBuf) {
    let file = dir.join("token");
    std::fs::write(&file, format!("{token}\n")).expect("write token file");
    let backend = VaultBackend::new(VaultSettings {
        addr: addr(),
        ca_cert: None,
        auth: VaultAuth::TokenFile(file.clone()),
    })
    .expect("valid settings");
    (backend, file)
}

async fn fetch(backend: &VaultBackend, source: &SourceSpec) -> Result<UpstreamKey, BackendError> {
    backend.fetch(source).await
}

/// The error must say `needle` and quote none of `secrets`, in Display or Debug.
fn assert_error(err: &BackendError, needle: &str, secrets: &[&str]) {
    let msg = err.to_string();
    eprintln!("error as reported: {msg}");
    assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    let debug = format!("{err:?}");
    for s in secrets {
        assert!(
            !msg.contains(s) && !debug.contains(s),
            "error quotes a secret: {msg}"
        );
    }
}

#[tokio::test]
async fn reads_kv2_versions_with_a_token_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backend, _) = token_file_backend(dir.path(), &env(TOKEN_ENV));
    let path = unique("claude/rotate");
    let (k1, k2) = (test_key("one"), test_key("two"));
    let src = source(json!({ "path": path }));

    put(&path, json!({ "api_key": k1 })).await;
    let got = fetch(&backend, &src).await.expect("fetch version 1");
    assert_eq!(got.value.expose_secret(), k1);
    assert_eq!(got.version, "1");

    put(&path, json!({ "api_key": k2, "owner": "team-a" })).await;
    let got = fetch(&backend, &src).await.expect("fetch version 2");
    assert_eq!(got.value.expose_secret(), k2);
    assert_eq!(got.version, "2");
}

#[tokio::test]
async fn missing_path_and_field_say_what_to_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backend, _) = token_file_backend(dir.path(), &env(TOKEN_ENV));
    let path = unique("claude/missing");
    let err = fetch(&backend, &source(json!({ "path": path })))
        .await
        .expect_err("no secret there");
    assert!(
        matches!(err, BackendError::NotFound { .. }) && !err.is_transient(),
        "{err}"
    );
    assert_error(&err, &format!("no KV v2 secret at secret/data/{path}"), &[]);

    let key = test_key("field");
    put(&path, json!({ "key": key })).await;
    let err = fetch(&backend, &source(json!({ "path": path })))
        .await
        .expect_err("no api_key field");
    assert!(matches!(err, BackendError::Malformed { .. }), "{err}");
    assert_error(&err, "no field \"api_key\" (fields: key)", &[&key]);
    let got = fetch(&backend, &source(json!({ "path": path, "field": "key" })))
        .await
        .expect("custom field");
    assert_eq!(got.value.expose_secret(), key);
}

#[tokio::test]
async fn a_bad_token_is_denied_and_a_replaced_token_file_is_picked_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = format!("s.{}", uuid::Uuid::new_v4().simple());
    let (backend, file) = token_file_backend(dir.path(), &bad);
    let path = unique("claude/token");
    let key = test_key("token");
    put(&path, json!({ "api_key": key })).await;
    let src = source(json!({ "path": path }));

    let err = fetch(&backend, &src).await.expect_err("bad token");
    assert!(
        matches!(err, BackendError::AccessDenied { .. }) && !err.is_transient(),
        "{err}"
    );
    assert_error(
        &err,
        &format!(r#"path "secret/data/{path}" {{ capabilities = ["read"] }}"#),
        &[&key, &bad],
    );

    // A Vault Agent (or a person) writes a good token: the same backend uses it, no restart.
    std::fs::write(&file, env(TOKEN_ENV)).expect("replace token file");
    let got = fetch(&backend, &src)
        .await
        .expect("new token read from the file");
    assert_eq!(got.value.expose_secret(), key);
}

/// The least-privilege policy from docs/backends.md: read on exactly `<mount>/data/<path>`.
#[tokio::test]
async fn the_documented_policy_is_enough_and_no_more() {
    let allowed = unique("claude/allowed");
    let other = unique("claude/other");
    let (key, other_key) = (test_key("allowed"), test_key("other"));
    put(&allowed, json!({ "api_key": key })).await;
    put(&other, json!({ "api_key": other_key })).await;
    let policy = unique("claudekey-read");
    vaultrs::sys::policy::set(
        &admin(),
        &policy,
        &format!("path \"secret/data/{allowed}\" {{\n  capabilities = [\"read\"]\n}}\n"),
    )
    .await
    .expect("write policy");
    let token = vaultrs::token::new(
        &admin(),
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .policies(vec![policy.clone()])
                .no_default_policy(true)
                .ttl("10m"),
        ),
    )
    .await
    .expect("create a token with only that policy")
    .client_token;
    let dir = tempfile::tempdir().expect("tempdir");
    let (backend, _) = token_file_backend(dir.path(), &token);

    let got = fetch(&backend, &source(json!({ "path": allowed })))
        .await
        .expect("allowed path");
    assert_eq!(got.value.expose_secret(), key);
    assert_eq!(got.version, "1");
    let err = fetch(&backend, &source(json!({ "path": other })))
        .await
        .expect_err("a path outside the policy");
    assert!(matches!(err, BackendError::AccessDenied { .. }), "{err}");
    assert_error(
        &err,
        &format!(r#"path "secret/data/{other}" {{ capabilities = ["read"] }}"#),
        &[&other_key, &token],
    );
}

#[tokio::test]
async fn an_unreachable_vault_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "root").expect("token file");
    let backend = VaultBackend::new(VaultSettings {
        addr: format!("http://127.0.0.1:{port}"),
        ca_cert: None,
        auth: VaultAuth::TokenFile(file),
    })
    .expect("valid settings");
    let err = fetch(&backend, &source(json!({ "path": "claude/x" })))
        .await
        .expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    assert_error(&err, "failed to reach Vault at", &[]);
}

/// Server URL and CA (PEM) of the test control plane, for OpenBao's TokenReview calls.
fn apiserver() -> (String, String) {
    use base64::Engine;
    let path = env(support::KUBECONFIG_ENV);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cluster = kubeconfig
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .expect("a cluster in the kubeconfig");
    let server = cluster.server.expect("cluster server");
    let ca = cluster
        .certificate_authority_data
        .expect("certificate-authority-data in the test kubeconfig");
    let pem = base64::engine::general_purpose::STANDARD
        .decode(ca)
        .expect("base64 CA");
    (server, String::from_utf8(pem).expect("PEM CA"))
}

/// Kubernetes auth end to end: a real ServiceAccount token from the test apiserver's TokenRequest
/// API, reviewed by OpenBao against that apiserver (TokenReview), exchanged for a Vault token with
/// the documented read policy.
#[tokio::test]
async fn kubernetes_auth_logs_in_with_a_service_account_token() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
    use kube::Api;
    use kube::api::{DeleteParams, ObjectMeta, PostParams};
    use vaultrs::api::auth::kubernetes::requests::{
        ConfigureKubernetesAuthRequest, CreateKubernetesRoleRequest,
    };

    // rustls has both ring and aws-lc-rs compiled in (the AWS SDK brings the latter), so the kube
    // client needs a process default; the binary installs the same one.
    claudekey::crypto::install_default_provider();
    let client = support::client().await;
    let ns = support::namespace(&client, "vault-auth").await;
    let sa_name = "claudekey";
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(sa_name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create service account");
    // OpenBao reviews the login JWT with the JWT itself (no reviewer token configured), so the
    // service account needs TokenReview rights, as in a cluster where Vault runs outside it.
    let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());
    let crb_name = unique("claudekey-vault-auth-test");
    let crb = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(crb_name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "system:auth-delegator".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa_name.into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    crbs.create(&PostParams::default(), &crb)
        .await
        .expect("bind auth-delegator");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let jwt = sas
        .create_token_request(sa_name, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token in status")
        .token;

    let mount = unique("k8s");
    vaultrs::sys::auth::enable(&admin(), &mount, "kubernetes", None)
        .await
        .expect("enable kubernetes auth");
    let (server, ca_pem) = apiserver();
    vaultrs::auth::kubernetes::configure(
        &admin(),
        &mount,
        &server,
        Some(
            ConfigureKubernetesAuthRequest::builder()
                .kubernetes_ca_cert(ca_pem)
                .disable_local_ca_jwt(true),
        ),
    )
    .await
    .expect("configure kubernetes auth");
    let path = unique("claude/k8s");
    let key = test_key("k8s");
    put(&path, json!({ "api_key": key })).await;
    let policy = unique("claudekey-read");
    vaultrs::sys::policy::set(
        &admin(),
        &policy,
        &format!("path \"secret/data/{path}\" {{\n  capabilities = [\"read\"]\n}}\n"),
    )
    .await
    .expect("write policy");
    vaultrs::auth::kubernetes::role::create(
        &admin(),
        &mount,
        "claudekey",
        Some(
            CreateKubernetesRoleRequest::builder()
                .bound_service_account_names(vec![sa_name.to_string()])
                .bound_service_account_namespaces(vec![ns.clone()])
                .token_policies(vec![policy.clone()])
                .token_ttl("10m"),
        ),
    )
    .await
    .expect("create role");
    vaultrs::auth::kubernetes::role::create(
        &admin(),
        &mount,
        "elsewhere",
        Some(
            CreateKubernetesRoleRequest::builder()
                .bound_service_account_names(vec![sa_name.to_string()])
                .bound_service_account_namespaces(vec!["some-other-namespace".to_string()])
                .token_policies(vec![policy.clone()]),
        ),
    )
    .await
    .expect("create a role bound elsewhere");

    let dir = tempfile::tempdir().expect("tempdir");
    let jwt_file = dir.path().join("token");
    std::fs::write(&jwt_file, &jwt).expect("write jwt");
    let backend = VaultBackend::new(VaultSettings {
        addr: addr(),
        ca_cert: None,
        auth: VaultAuth::Kubernetes {
            mount: mount.clone(),
            default_role: Some("claudekey".into()),
            jwt_file,
        },
    })
    .expect("valid settings");

    let result = fetch(&backend, &source(json!({ "path": path }))).await;
    let err = fetch(
        &backend,
        &source(json!({ "path": path, "role": "elsewhere" })),
    )
    .await;
    let _ = crbs.delete(&crb_name, &DeleteParams::default()).await;

    let got = result.expect("read through kubernetes auth");
    assert_eq!(got.value.expose_secret(), key);
    assert_eq!(got.version, "1");
    let err = err.expect_err("a role bound to another namespace");
    assert!(matches!(err, BackendError::AccessDenied { .. }), "{err}");
    assert_error(&err, "role \"elsewhere\" was refused", &[&key, &jwt]);
}

/// `--vault-ca-cert`: an HTTPS server signed by a private CA is reached only with that CA. The
/// test control plane's kube-apiserver is such a server; it is not Vault, so the read is then
/// refused by HTTP status, which proves the TLS handshake succeeded.
#[tokio::test]
async fn a_private_ca_file_is_trusted_for_https() {
    let server = env("CLAUDEKEY_TEST_APISERVER");
    let ca = PathBuf::from(env("CLAUDEKEY_TEST_CA"));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "not-a-vault-token").expect("token file");
    let backend = |ca_cert: Option<PathBuf>| {
        VaultBackend::new(VaultSettings {
            addr: server.clone(),
            ca_cert,
            auth: VaultAuth::TokenFile(file.clone()),
        })
        .expect("valid settings")
    };
    let src = source(json!({ "path": "claude/x" }));

    let err = fetch(&backend(Some(ca)), &src)
        .await
        .expect_err("the apiserver is not Vault");
    assert!(
        matches!(err, BackendError::AccessDenied { .. }),
        "TLS with the CA file: {err}"
    );

    let err = fetch(&backend(None), &src)
        .await
        .expect_err("untrusted certificate");
    assert!(err.is_transient(), "{err}");
    assert_error(&err, "failed to reach Vault at", &["not-a-vault-token"]);
}

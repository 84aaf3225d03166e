//! Workload identity federation (DESIGN.md §11) against the real kube-apiserver: tokens from the
//! TokenRequest API (what the kubelet projects) are exchanged by `claudekey proxy` at the fake
//! upstream, which verifies them with the apiserver's own discovery document and JWKS. Part of
//! the proxy_gateway binary, whose global log capture is scanned for tokens.

use std::{path::Path, sync::Arc, time::Duration};

use claudekey::{
    fake_upstream::{FakeUpstream, FederationRule},
    proxy::{Mode, federation::IdentitySource},
};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRoleBinding, RoleRef, Subject},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::proxy_common::{self, Harness, kubelet_write, message, send};
use super::{logs, run_sdk, support};

const AUDIENCE: &str = "https://api.anthropic.com";
const ORG: &str = "0f1e2d3c-aaaa-bbbb-cccc-000000000001";
const SVAC: &str = "svac_01TestServiceAccount";
const RULE: &str = "fdrl_01TestRule";

/// Lets anonymous clients (Anthropic, here the fake) read the issuer's discovery document and
/// JWKS, as the Kubernetes docs advise for federation with an outside party.
async fn allow_issuer_discovery(client: &Client) {
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some("claudekey-test-issuer-discovery".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "system:service-account-issuer-discovery".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: "system:unauthenticated".into(),
            namespace: None,
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "claudekey-test-issuer-discovery",
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&binding),
        )
        .await
        .expect("bind issuer discovery for anonymous clients");
}

/// The test cluster's issuer and the CA that signs its serving certificate.
fn issuer() -> (String, Vec<u8>) {
    let apiserver = std::env::var("CLAUDEKEY_TEST_APISERVER")
        .expect("CLAUDEKEY_TEST_APISERVER is not set: source the control plane's env file");
    let ca = std::env::var("CLAUDEKEY_TEST_CA").expect("CLAUDEKEY_TEST_CA");
    (
        format!("{apiserver}/"),
        std::fs::read(&ca).unwrap_or_else(|e| panic!("read {ca}: {e}")),
    )
}

/// A ServiceAccount in a fresh namespace.
async fn service_account(client: &Client, name: &str) -> (Api<ServiceAccount>, String) {
    let namespace = support::namespace(client, "wif").await;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &sa).await.unwrap();
    (api, namespace)
}

/// What the kubelet projects: a token for `audience`, from the TokenRequest API.
async fn token(api: &Api<ServiceAccount>, name: &str, audience: &str) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    api.create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token in status")
        .token
}

/// Writes the projected token file as the kubelet does (atomic replace).
fn project(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn rule(subject: &str, lifetime: Duration) -> FederationRule {
    let (issuer, ca) = issuer();
    FederationRule {
        id: RULE.into(),
        organization_id: ORG.into(),
        service_account_id: SVAC.into(),
        issuer,
        audience: AUDIENCE.into(),
        subject: subject.into(),
        token_lifetime: lifetime,
        issuer_ca_pem: ca,
    }
}

fn federated_proxy_json(source: &str) -> String {
    json!({
        "claudeKey": { "namespace": "team-a", "name": "bot" },
        "upstream": [],
        "workloadKeys": [],
        "policy": {},
        "federation": {
            "source": source, "organizationId": ORG, "serviceAccountId": SVAC,
            "federationRuleId": RULE, "audience": AUDIENCE
        }
    })
    .to_string()
}

/// A sidecar proxy for a federation source, reading `token_file`.
async fn sidecar(token_file: &Path, source: &str) -> Harness {
    let path = token_file.to_path_buf();
    Harness::start_with(
        Mode::Sidecar,
        &[],
        |dir| kubelet_write(dir, &federated_proxy_json(source)),
        move |settings| settings.identity = Some(IdentitySource::File(path)),
    )
    .await
}

/// What most sidecar tests start from: a fresh namespace with ServiceAccount `bot`, its
/// projected token written to a file the way the kubelet writes it, and a sidecar of source
/// `wif` reading that file.
struct Projected {
    h: Harness,
    sas: Api<ServiceAccount>,
    namespace: String,
    token_file: std::path::PathBuf,
    _files: tempfile::TempDir,
}

impl Projected {
    async fn start() -> Self {
        let _ = logs();
        let client = support::client().await;
        allow_issuer_discovery(&client).await;
        let (sas, namespace) = service_account(&client, "bot").await;
        let files = tempfile::tempdir().unwrap();
        let token_file = files.path().join("token");
        project(&token_file, &token(&sas, "bot", AUDIENCE).await);
        let h = sidecar(&token_file, "wif").await;
        Self {
            h,
            sas,
            namespace,
            token_file,
            _files: files,
        }
    }

    /// The kubelet writes a new projected token.
    async fn project_new_token(&self) {
        project(&self.token_file, &token(&self.sas, "bot", AUDIENCE).await);
    }
}

fn exchanges_of(fake: &FakeUpstream) -> (usize, usize) {
    let all = fake.exchanges();
    let ok = all.iter().filter(|e| e.refusal.is_none()).count();
    (ok, all.len() - ok)
}

fn metric(h: &Harness, outcome: &str) -> u64 {
    let text = h.proxy.metrics.encode();
    let prefix = format!(
        "claudekey_proxy_federation_exchanges_total{{source=\"wif\",outcome=\"{outcome}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// POSTs an identity token to the fake's token endpoint as the SDK does.
async fn exchange_directly(fake: &FakeUpstream, assertion: &str) -> (u16, Value) {
    let body = json!({
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": assertion, "federation_rule_id": RULE, "organization_id": ORG,
        "service_account_id": SVAC,
    });
    let request = http::Request::post(format!("{}/v1/oauth/token", fake.url()))
        .header("content-type", "application/json")
        .header(
            "anthropic-beta",
            "oauth-2025-04-20,oidc-federation-2026-04-01",
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let response = proxy_common::client().request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_token_is_exchanged_and_the_sdk_gets_200_with_no_token_anywhere() {
    let _ = logs();
    let client = support::client().await;
    allow_issuer_discovery(&client).await;
    let (sas, namespace) = service_account(&client, "bot").await;
    let identity = token(&sas, "bot", AUDIENCE).await;
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("token");
    project(&token_file, &identity);
    let h = sidecar(&token_file, "wif").await;
    h.fake.add_federation_rule(rule(
        &format!("system:serviceaccount:{namespace}:bot"),
        Duration::from_secs(3600),
    ));

    let (ok, out) = run_sdk(h.addr).await;
    assert!(ok, "the SDK failed through the federated sidecar:\n{out}");
    assert!(out.contains("CREATE:"), "{out}");
    assert_eq!(
        exchanges_of(&h.fake),
        (1, 0),
        "one exchange serves both calls"
    );
    assert_eq!(metric(&h, "ok"), 1);

    // The wire format: the SDK's exchange, then Bearer + the OAuth beta on the Messages API.
    let received = h.fake.received();
    let exchange = received
        .iter()
        .find(|r| r.path == "/v1/oauth/token")
        .expect("an exchange");
    assert_eq!(
        exchange.header("anthropic-beta"),
        Some("oauth-2025-04-20,oidc-federation-2026-04-01")
    );
    assert_eq!(exchange.header("content-type"), Some("application/json"));
    let sent: Value = serde_json::from_slice(&exchange.body).unwrap();
    assert_eq!(
        sent["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert_eq!(sent["assertion"], identity.as_str());
    assert_eq!(sent["federation_rule_id"], RULE);
    let access = h.fake.issued_access_tokens();
    assert_eq!(access.len(), 1);
    let access = &access[0];
    assert!(access.starts_with("sk-ant-oat01-"));
    let calls: Vec<_> = received
        .iter()
        .filter(|r| r.path.starts_with("/v1/messages"))
        .collect();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(
            call.header("authorization"),
            Some(format!("Bearer {access}").as_str())
        );
        assert!(call.header("x-api-key").is_none());
        assert!(
            call.header("anthropic-beta")
                .unwrap()
                .contains("oauth-2025-04-20")
        );
    }

    // The identity token is spent: Anthropic (the fake) refuses it a second time, opaquely.
    let (status, body) = exchange_directly(&h.fake, &identity).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        h.fake
            .exchanges()
            .last()
            .unwrap()
            .refusal
            .as_deref()
            .unwrap()
            .contains("replay"),
        "{:?}",
        h.fake.exchanges()
    );
    // Messages with an unknown bearer, or the real one without the beta, are refused.
    let plain = proxy_common::client();
    let bad = send(
        &plain,
        &h.fake.url(),
        "POST",
        "/v1/messages",
        Some("Bearer sk-ant-oat01-forged"),
        Some(message("x", false)),
    )
    .await;
    assert_eq!(bad.status, 401);

    // No token in any log line, audit line, metric, or object in the namespace.
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    let audit = h.audit.lock().unwrap().join("\n");
    let metrics = h.proxy.metrics.encode();
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &namespace)
        .list(&Default::default())
        .await
        .unwrap();
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &namespace)
        .list(&Default::default())
        .await
        .unwrap();
    let objects = format!(
        "{}{}",
        serde_json::to_string(&secrets).unwrap(),
        serde_json::to_string(&events).unwrap()
    );
    for (what, text) in [
        ("log", &log),
        ("audit", &audit),
        ("metrics", &metrics),
        ("objects", &objects),
    ] {
        assert!(
            !text.contains(access.as_str()),
            "the access token is in the {what}"
        );
        assert!(
            !text.contains(&identity),
            "the identity token is in the {what}"
        );
        assert!(
            !text.contains("sk-ant-oat01-"),
            "an access token is in the {what}"
        );
    }
    assert!(audit.contains(&format!("federation:{RULE}")), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_mismatch_is_a_503_and_a_refused_token_is_never_sent_again() {
    let p = Projected::start().await;
    let (h, namespace) = (&p.h, &p.namespace);
    let plain = proxy_common::client();
    // The rule names another namespace; then another service account.
    for subject in [
        "system:serviceaccount:team-other:bot".to_string(),
        format!("system:serviceaccount:{namespace}:other"),
    ] {
        h.fake
            .add_federation_rule(rule(&subject, Duration::from_secs(3600)));
        let before = h.fake.exchanges().len();
        for _ in 0..3 {
            let reply = send(
                &plain,
                &h.url(),
                "POST",
                "/v1/messages",
                None,
                Some(message("hi", false)),
            )
            .await;
            assert_eq!(reply.status, 503, "{}", reply.text());
            let error = &reply.json()["error"];
            assert_eq!(error["type"], "api_error");
            let text = error["message"].as_str().unwrap();
            assert!(
                text.contains(RULE) && text.contains("wif") && text.contains("401"),
                "{text}"
            );
        }
        let after = h.fake.exchanges();
        assert_eq!(
            after.len(),
            before + 1,
            "the refused token was sent again: {after:?}"
        );
        assert!(
            after
                .last()
                .unwrap()
                .refusal
                .as_deref()
                .unwrap()
                .contains("sub"),
            "{after:?}"
        );
        // A new projected token is tried (after the retry pause), and refused again.
        p.project_new_token().await;
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    assert!(metric(h, "refused") >= 2);
    assert_eq!(metric(h, "ok"), 0);
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(
        log.contains("federation token exchange failed") && log.contains(RULE),
        "no log line names the rule"
    );
    // The fake never saw a Messages call.
    assert!(
        !h.fake
            .received()
            .iter()
            .any(|r| r.path.starts_with("/v1/messages"))
    );
}

/// An access token the upstream stops accepting (its rule deleted, the token revoked) is
/// dropped at its first 401, so the next request exchanges a new one instead of sending the
/// refused token until its refresh time; a client provoking 401s gets at most one drop per
/// `DROP_REFUSED_EVERY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_access_token_is_dropped_and_exchanged_anew() {
    let p = Projected::start().await;
    let h = &p.h;
    h.fake.add_federation_rule(rule(
        &format!("system:serviceaccount:{}:bot", p.namespace),
        Duration::from_secs(3600),
    ));
    let plain = proxy_common::client();
    let url = h.url();
    let call = || {
        send(
            &plain,
            &url,
            "POST",
            "/v1/messages",
            None,
            Some(message("hi", false)),
        )
    };
    assert_eq!(call().await.status, 200);
    // Revoked at Anthropic; the kubelet has written a new identity token meanwhile.
    h.fake.revoke_access_tokens();
    p.project_new_token().await;
    assert_eq!(call().await.status, 401, "sent with the revoked token");
    let reply = call().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (ok, _) = exchanges_of(&h.fake);
    assert_eq!(ok, 2, "one new exchange after the 401");
    // Within DROP_REFUSED_EVERY, a second revocation is not followed at once.
    h.fake.revoke_access_tokens();
    p.project_new_token().await;
    assert_eq!(call().await.status, 401);
    assert_eq!(call().await.status, 401);
    assert_eq!(exchanges_of(&h.fake).0, 2, "no exchange on every 401");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_second_tokens_are_refreshed_under_load_with_no_failed_request() {
    let p = Arc::new(Projected::start().await);
    let h = &p.h;
    h.fake.set_recording(false);
    h.fake.add_federation_rule(rule(
        &format!("system:serviceaccount:{}:bot", p.namespace),
        Duration::from_secs(60),
    ));
    // The "kubelet" projects a new token every 10 s.
    let kubelet = {
        let p = p.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                p.project_new_token().await;
            }
        })
    };
    let until = tokio::time::Instant::now() + Duration::from_secs(80);
    let mut workers = Vec::new();
    for _ in 0..2 {
        let p = p.clone();
        workers.push(tokio::spawn(async move {
            let h = &p.h;
            let plain = proxy_common::client();
            let (mut ok, mut failed) = (0u32, Vec::new());
            while tokio::time::Instant::now() < until {
                let reply = send(
                    &plain,
                    &h.url(),
                    "POST",
                    "/v1/messages",
                    None,
                    Some(message("hi", false)),
                )
                .await;
                if reply.status == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("{} {}", reply.status, reply.text()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        }));
    }
    let mut total = 0;
    for worker in workers {
        let (ok, failed) = worker.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    kubelet.abort();
    let (ok, refused) = exchanges_of(&h.fake);
    assert_eq!(refused, 0, "{:?}", h.fake.exchanges());
    // 80 s of 60 s tokens refreshed at 30 s: the first token and at least two refreshes.
    assert!(ok >= 3, "only {ok} exchanges in 80 s");
    let mut seen: Vec<String> = h
        .fake
        .exchanges()
        .into_iter()
        .map(|e| e.assertion_sha256)
        .collect();
    let n = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "an identity token was sent twice");
    assert!(total > 100, "only {total} requests");
}

/// The gateway exchanges a token of its own ServiceAccount (TokenRequest API) per source, and
/// reports each outcome as `FederationReady` on the ClusterClaudeKeySource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_exchanges_its_own_token_and_reports_federation_ready() {
    use claudekey::crd::ClusterClaudeKeySource;
    let gw = super::Gateway::start_with("wif-gw", |settings, client, namespace| {
        settings.identity = Some(IdentitySource::TokenRequest {
            client: client.clone(),
            namespace: namespace.to_string(),
            name: "claudekey-gateway".into(),
        });
    })
    .await;
    let client = support::client().await;
    support::install_crd(&client).await;
    allow_issuer_discovery(&client).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &gw.namespace);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("claudekey-gateway".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let source = format!("wif-{}", &gw.namespace);
    let sources: Api<ClusterClaudeKeySource> = Api::all(client.clone());
    let body = json!({
        "apiVersion": "claudekey.io/v1alpha2", "kind": "ClusterClaudeKeySource",
        "metadata": { "name": source },
        "spec": { "workloadIdentityFederation": {
            "organizationId": ORG, "serviceAccountId": SVAC, "federationRuleId": RULE,
            "audience": AUDIENCE,
        } },
    });
    sources
        .patch(
            &source,
            &PatchParams::apply("claudekey-tests"),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    let config = federated_proxy_json(&source).replace(
        "\"workloadKeys\":[]",
        &format!(
            "\"workloadKeys\":[{{\"sha256\":\"{}\",\"fingerprint\":\"ck:a\",\"validUntil\":null}}]",
            claudekey::keys::sha256_hex(super::WORKLOAD_A)
        ),
    );
    gw.secrets
        .create(
            &PostParams::default(),
            &super::config_secret("bot", &config, true),
        )
        .await
        .unwrap();
    let https = super::tls_client(&gw.pki.ca_pem);
    let condition = |want: &'static str| {
        let sources = sources.clone();
        let source = source.clone();
        async move {
            let found = sources.get_status(&source).await.ok()?;
            let c = found
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "FederationReady")?;
            (c.reason == want).then_some(c)
        }
    };
    // A rule for another service account of the gateway's namespace: 503 and ExchangeRefused.
    gw.fake.add_federation_rule(rule(
        &format!("system:serviceaccount:{}:other", gw.namespace),
        Duration::from_secs(3600),
    ));
    super::until_status(
        &https,
        &gw.url(),
        super::WORKLOAD_A,
        503,
        "the refused exchange",
    )
    .await;
    let refused = support::eventually(super::WAIT, "FederationReady=False", || {
        condition("ExchangeRefused")
    })
    .await;
    assert_eq!(refused.status, "False");
    assert!(refused.message.contains("401"), "{}", refused.message);
    // The rule fixed: the next exchange (a new token: the gateway never reuses one) succeeds.
    gw.fake.add_federation_rule(rule(
        &format!("system:serviceaccount:{}:claudekey-gateway", gw.namespace),
        Duration::from_secs(3600),
    ));
    super::until_status(&https, &gw.url(), super::WORKLOAD_A, 200, "the exchange").await;
    let ok = support::eventually(super::WAIT, "FederationReady=True", || {
        condition("TokenExchanged")
    })
    .await;
    assert_eq!(ok.status, "True");
    let exchanges = gw.fake.exchanges();
    let mut hashes: Vec<_> = exchanges.iter().map(|e| &e.assertion_sha256).collect();
    let n = hashes.len();
    hashes.sort();
    hashes.dedup();
    assert_eq!(
        hashes.len(),
        n,
        "an identity token was sent twice: {exchanges:?}"
    );
    // Nothing of a token in the source's status.
    let status = serde_json::to_string(&sources.get_status(&source).await.unwrap()).unwrap();
    assert!(
        !status.contains("sk-ant-oat01-") && !status.contains("eyJ"),
        "{status}"
    );
    for token in gw.fake.issued_access_tokens() {
        let log = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
        assert!(!log.contains(&token), "the access token was logged");
    }
    sources.delete(&source, &Default::default()).await.unwrap();
}

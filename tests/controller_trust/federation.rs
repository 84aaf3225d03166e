//! Workload-identity-federation sources (DESIGN.md §11): the apiserver refuses a malformed one;
//! otherwise Ready ClaudeKeys with no upstream key anywhere, and what the gateway reports on the
//! source (FederationReady) shows on its ClaudeKeys.

use claudekey::crd::ClusterClaudeKeySource;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::{apply_ref, cluster_wide, serial, unique};
use crate::{controller_support::*, support};

/// A workload-identity-federation source (DESIGN.md §11): nothing to read, no upstream key
/// anywhere, yet Ready ClaudeKeys whose proxy.json names the federation; the sidecar's token
/// shape is in status for the webhook (namespace placement only).
#[tokio::test]
async fn a_federation_source_yields_ready_claudekeys_with_no_upstream_key() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-wif").await;
    let team = support::namespace(&client, "ck-trust-wifteam").await;
    let federation = json!({
        "organizationId": "0f1e2d3c-aaaa-bbbb-cccc-000000000001",
        "serviceAccountId": "svac_01Trust", "federationRuleId": "fdrl_01Trust",
        "audience": "https://api.anthropic.com", "tokenExpirationSeconds": 1200,
    });
    // The apiserver refuses a malformed federation (id prefixes, lifetime bounds, one-of).
    let sources = Api::<ClusterClaudeKeySource>::all(client.clone());
    for (field, value) in [
        ("serviceAccountId", json!("user_01")),
        ("federationRuleId", json!("rule_01")),
        ("audience", json!("")),
        ("tokenExpirationSeconds", json!(300)),
        ("tokenExpirationSeconds", json!(7200)),
    ] {
        let mut bad = federation.clone();
        bad[field] = value.clone();
        let body = json!({
            "apiVersion": "claudekey.io/v1alpha2", "kind": "ClusterClaudeKeySource",
            "metadata": { "name": unique("bad-wif") },
            "spec": { "workloadIdentityFederation": bad },
        });
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        let refused = sources
            .patch(
                &name,
                &PatchParams::apply("claudekey-tests"),
                &Patch::Apply(&body),
            )
            .await;
        assert!(refused.is_err(), "{field}={value} was accepted");
    }
    let both = json!({
        "apiVersion": "claudekey.io/v1alpha2", "kind": "ClusterClaudeKeySource",
        "metadata": { "name": unique("bad-wif") },
        "spec": { "workloadIdentityFederation": federation, "kubernetesSecret": { "name": "x" } },
    });
    let name = both["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        sources
            .patch(
                &name,
                &PatchParams::apply("claudekey-tests"),
                &Patch::Apply(&both)
            )
            .await
            .is_err(),
        "two backends at once"
    );

    let direct = unique("wif-ns");
    apply_cluster_source(
        &client,
        &direct,
        json!({ "workloadIdentityFederation": federation, "allowedNamespaces": { "names": [&team] }, "placement": "namespace" }),
    )
    .await;
    let gateway = unique("wif-gw");
    apply_cluster_source(
        &client,
        &gateway,
        json!({ "workloadIdentityFederation": federation, "allowedNamespaces": { "names": [&team] } }),
    )
    .await;
    let mut cfg = cluster_wide(&operator, None);
    cfg.gateway_ca = Some("-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n".into());
    let controller = start(&client, cfg);
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &direct).await;
    apply_ref(&client, &team, "gw", "ClusterClaudeKeySource", &gateway).await;

    let ck = wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    let status = ck.status.unwrap();
    assert_eq!(status.placement, Some(claudekey::crd::Placement::Namespace));
    let token = status.identity_token.expect("status.identityToken");
    assert_eq!(
        (token.audience.as_str(), token.expiration_seconds),
        ("https://api.anthropic.com", 1200)
    );
    assert!(status.source.unwrap().contains("federation:fdrl_01Trust"));
    let owned = wait_owned(&client, &team, "bot", "proxy.json", |_| true).await;
    assert!(owned.config.upstream.is_empty());
    let written = owned.config.federation.expect("federation in proxy.json");
    assert_eq!(written.source, direct);
    assert_eq!(written.federation_rule_id, "fdrl_01Trust");
    assert_eq!(written.service_account_id, "svac_01Trust");
    assert!(owned.workload_key.starts_with("ck_live_"));

    let ck = wait_claudekey(&client, &team, "gw", "Ready", is_ready).await;
    let status = ck.status.unwrap();
    assert_eq!(status.placement, Some(claudekey::crd::Placement::Gateway));
    assert!(
        status.identity_token.is_none(),
        "the gateway uses its own token"
    );
    let config_name = claudekey::crd::gateway_config_secret_name(&team, "gw");
    let config = Api::<Secret>::namespaced(client.clone(), &operator)
        .get(&config_name)
        .await
        .expect("the gateway config Secret");
    let config: claudekey::proxyconf::ProxyConfig =
        serde_json::from_slice(&config.data.unwrap()["proxy.json"].0).unwrap();
    assert!(config.upstream.is_empty());
    assert_eq!(config.federation.unwrap().source, gateway);
    // What the gateway reports on the source (FederationReady) shows on its ClaudeKeys.
    let refused = json!({ "status": { "conditions": [{
        "type": "FederationReady", "status": "False", "reason": "ExchangeRefused",
        "message": "the token exchange was refused (HTTP 401 invalid_grant)",
        "lastTransitionTime": "2026-12-01T10:00:00Z",
    }] } });
    sources
        .patch_status(&gateway, &PatchParams::default(), &Patch::Merge(&refused))
        .await
        .unwrap();
    let ck = wait_claudekey(&client, &team, "gw", "FederationReady=False", |ck| {
        condition(ck, "FederationReady")
            .is_some_and(|(status, reason, _)| status == "False" && reason == "ExchangeRefused")
    })
    .await;
    let (_, _, message) = condition(&ck, "FederationReady").unwrap();
    assert!(
        message.contains(&gateway) && message.contains("invalid_grant"),
        "{message}"
    );
    assert!(
        is_ready(&ck),
        "the workload key stays valid; only the exchange fails"
    );
    // The other source reported nothing: no condition on its ClaudeKey.
    let ck = wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    assert!(condition(&ck, "FederationReady").is_none());
    // Nothing that looks like an Anthropic key anywhere in the workload namespace.
    for secret in Api::<Secret>::namespaced(client.clone(), &team)
        .list(&Default::default())
        .await
        .unwrap()
    {
        for value in secret.data.iter().flatten().map(|(_, v)| &v.0) {
            assert!(!String::from_utf8_lossy(value).contains("sk-ant-"));
        }
    }
    controller.stop().await;
}

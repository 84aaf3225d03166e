//! The trust boundaries of DESIGN.md §10 against the real control plane, each as an attack from a
//! namespace team's side: sources granted per namespace, the label guard in the operator
//! namespace, upstream keys out of workload namespaces (placement gateway), authenticated
//! bookkeeping, and retirement at Anthropic only from a cluster source once nobody uses a key.
//!
//! Several tests run a controller that watches every namespace, so the tests of this binary
//! take turns (`serial`): two such controllers would fight over each other's ClaudeKeys.

mod controller_support;
#[path = "controller_trust/federation.rs"]
mod federation;
#[path = "controller_trust/orphans.rs"]
mod orphans;
#[path = "controller_trust/pattern_budget.rs"]
mod pattern_budget;
#[allow(dead_code)]
#[path = "proxy_common/redis_server.rs"]
mod redis_server;
#[path = "controller_trust/redis_users.rs"]
mod redis_users;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use claudekey::controller::ControllerConfig;
use claudekey::crd::ClusterClaudeKeySource;
use claudekey::fake_upstream::{FakeUpstream, KeyStatus};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use controller_support::*;

/// One test at a time in this binary.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A controller for every namespace, with `operator_ns` as its operator namespace.
fn cluster_wide(operator_ns: &str, anthropic_url: Option<String>) -> ControllerConfig {
    let mut cfg = config(operator_ns);
    cfg.watch_namespace = None;
    if let Some(url) = anthropic_url {
        cfg.anthropic_url = url;
    }
    cfg
}

/// A cluster-wide controller whose ClaudeKeys may be placed on the gateway (its CA is set).
fn gateway_controller(operator: &str) -> ControllerConfig {
    let mut cfg = cluster_wide(operator, None);
    cfg.gateway_ca = Some("-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n".into());
    cfg
}

/// A ClusterClaudeKeySource of a new name (`prefix-…`) for `key`, in the operator namespace,
/// granted to `team` alone. Names unique to each test: a later test's cluster-wide controller
/// (another operator namespace) must find nothing of ours under the names its own sources use.
async fn grant_cluster_source(
    client: &kube::Client,
    operator: &str,
    team: &str,
    prefix: &str,
    key: &str,
) -> String {
    let source = unique(prefix);
    put_upstream(client, operator, &source, key).await;
    apply_cluster_source(
        client,
        &source,
        json!({ "kubernetesSecret": { "name": &source }, "allowedNamespaces": { "names": [team] } }),
    )
    .await;
    source
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn apply_ref(client: &kube::Client, ns: &str, name: &str, kind: &str, source: &str) {
    let value = json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClaudeKey",
        "metadata": { "name": name },
        "spec": {
            "sourceRef": { "kind": kind, "name": source },
            "rotation": { "interval": "24h", "gracePeriod": "3s" },
        },
    });
    apply_claudekey_value(client, ns, name, value).await;
}

/// A Secret in `ns` that is not labelled as an upstream key (the admin key, a TLS key).
async fn put_unlabelled(client: &kube::Client, ns: &str, name: &str, entries: &[(&str, &str)]) {
    let data: BTreeMap<String, String> = entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let body = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name }, "stringData": data });
    apply_secret(client, ns, name, &body).await;
}

/// Fails when any Secret in `ns` holds any of `values`, raw or base64-encoded.
async fn assert_no_secret_holds(client: &kube::Client, ns: &str, values: &[&str]) {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap();
    for secret in secrets.items {
        let text = serde_json::to_string(&secret).unwrap();
        let raw: String = secret
            .data
            .iter()
            .flatten()
            .map(|(_, v)| String::from_utf8_lossy(&v.0).into_owned())
            .collect();
        for value in values {
            let b64 = base64::engine::general_purpose::STANDARD.encode(value);
            let body = &value[12..];
            assert!(
                !raw.contains(body)
                    && !text.contains(body)
                    && !text.contains(&b64[..b64.len() - 4]),
                "Secret {ns}/{} holds a key it must not",
                secret.metadata.name.unwrap_or_default()
            );
        }
    }
}

fn reason(ck: &claudekey::crd::ClaudeKey) -> Option<String> {
    condition(ck, "Ready").map(|c| c.1)
}

#[tokio::test]
async fn a_namespace_team_can_loot_nothing() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-op").await;
    let attacker = support::namespace(&client, "ck-trust-team-a").await;
    let other = support::namespace(&client, "ck-trust-team-b").await;
    let admin_key = format!("sk-ant-admin01-{}AA", uuid::Uuid::new_v4().simple());
    let tls_key = format!(
        "-----BEGIN PRIVATE KEY-----{}",
        uuid::Uuid::new_v4().simple()
    );
    let theirs = upstream_key();
    let own_other = upstream_key();
    put_unlabelled(
        &client,
        &operator,
        "anthropic-admin",
        &[("admin-key", &admin_key)],
    )
    .await;
    put_unlabelled(&client, &operator, "webhook-tls", &[("tls.key", &tls_key)]).await;
    put_upstream(&client, &operator, "team-b-key", &theirs).await;
    // A namespaced source of team b, with its own key.
    put_upstream(&client, &other, "own", &own_other).await;
    let (sa, sb, sc) = (unique("loot-admin"), unique("loot-tls"), unique("loot-b"));
    // Sources that name unlabelled Secrets, even when granted to the attacker.
    for (name, secret, key) in [
        (&sa, "anthropic-admin", "admin-key"),
        (&sb, "webhook-tls", "tls.key"),
    ] {
        apply_cluster_source(
            &client,
            name,
            json!({ "kubernetesSecret": { "name": secret, "key": key },
                    "allowedNamespaces": { "names": [&attacker] }, "placement": "namespace" }),
        )
        .await;
    }
    // Another team's source, not granted to the attacker.
    apply_cluster_source(
        &client,
        &sc,
        json!({ "kubernetesSecret": { "name": "team-b-key", "key": "api-key" },
                "allowedNamespaces": { "names": [&other] }, "placement": "namespace" }),
    )
    .await;
    let own_source = json!({ "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKeySource",
        "metadata": { "name": "own" }, "spec": { "kubernetesSecret": { "name": "own" } } });
    Api::<claudekey::crd::ClaudeKeySource>::namespaced(client.clone(), &other)
        .patch(
            "own",
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&own_source),
        )
        .await
        .unwrap();
    let controller = start(&client, cluster_wide(&operator, None));
    apply_ref(&client, &attacker, "admin", "ClusterClaudeKeySource", &sa).await;
    apply_ref(&client, &attacker, "tls", "ClusterClaudeKeySource", &sb).await;
    apply_ref(&client, &attacker, "theirs", "ClusterClaudeKeySource", &sc).await;
    apply_ref(&client, &attacker, "own", "ClaudeKeySource", "own").await;
    let expect = [
        ("admin", "UpstreamKeyLabelMissing"),
        ("tls", "UpstreamKeyLabelMissing"),
        ("theirs", "SourceNotAllowed"),
        ("own", "SourceNotFound"),
    ];
    for (name, want) in expect {
        let ck = wait_claudekey(&client, &attacker, name, want, |ck| {
            reason(ck).as_deref() == Some(want)
        })
        .await;
        assert!(!is_ready(&ck));
        let message = condition(&ck, "Ready").unwrap().2;
        assert!(!message.contains(&admin_key[14..]), "{message}");
    }
    assert!(
        event_reasons(&client, &attacker)
            .await
            .iter()
            .any(|r| r == "SourceNotAllowed")
    );
    let loot = [
        admin_key.as_str(),
        tls_key.as_str(),
        theirs.as_str(),
        own_other.as_str(),
    ];
    assert_no_secret_holds(&client, &attacker, &loot).await;
    controller.stop().await;
}

#[tokio::test]
async fn a_namespace_that_loses_its_grant_loses_the_upstream_key_at_once() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-grant").await;
    let team = support::namespace(&client, "ck-trust-sel").await;
    let key = upstream_key();
    put_upstream(&client, &operator, "shared", &key).await;
    let label = unique("claudekey.io/grant");
    let (label_key, label_value) = label.split_once('-').unwrap();
    let source = unique("by-label");
    apply_cluster_source(
        &client,
        &source,
        json!({ "kubernetesSecret": { "name": "shared" }, "placement": "namespace",
                "allowedNamespaces": { "selector": { "matchLabels": { label_key: label_value } } } }),
    )
    .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let set_label = |value: Option<&str>| json!({ "metadata": { "labels": { label_key: value } } });
    namespaces
        .patch(
            &team,
            &PatchParams::default(),
            &Patch::Merge(set_label(Some(label_value))),
        )
        .await
        .unwrap();
    let controller = start(&client, cluster_wide(&operator, None));
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    let proxy = Api::<Secret>::namespaced(client.clone(), &team);
    assert!(
        proxy.get_opt("bot-proxy").await.unwrap().is_some(),
        "placement namespace"
    );
    namespaces
        .patch(
            &team,
            &PatchParams::default(),
            &Patch::Merge(set_label(None)),
        )
        .await
        .unwrap();
    let ck = wait_claudekey(&client, &team, "bot", "SourceNotAllowed", |ck| {
        reason(ck).as_deref() == Some("SourceNotAllowed")
    })
    .await;
    assert!(!is_ready(&ck));
    support::eventually(Duration::from_secs(10), "-proxy removed", || async {
        proxy
            .get_opt("bot-proxy")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_no_secret_holds(&client, &team, &[&key]).await;
    controller.stop().await;
}

#[tokio::test]
async fn placement_gateway_keeps_the_upstream_key_in_the_operator_namespace() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-gw").await;
    let team = support::namespace(&client, "ck-trust-gwteam").await;
    let key = upstream_key();
    let source = grant_cluster_source(&client, &operator, &team, "gateway", &key).await;
    let controller = start(&client, gateway_controller(&operator));
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    let ck = wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    assert_eq!(
        ck.status.as_ref().unwrap().placement,
        Some(claudekey::crd::Placement::Gateway)
    );
    let here = Api::<Secret>::namespaced(client.clone(), &team);
    let client_secret = here.get("bot-client").await.unwrap();
    let data = client_secret.data.unwrap();
    assert!(data.contains_key("ca.crt") && data.contains_key("ANTHROPIC_API_KEY"));
    assert!(here.get_opt("bot-proxy").await.unwrap().is_none());
    // The whole cluster: only the operator namespace holds the key.
    for ns in Api::<Namespace>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap()
    {
        let name = ns.metadata.name.unwrap();
        if name != operator {
            assert_no_secret_holds(&client, &name, &[&key]).await;
        }
    }
    let config_name = claudekey::crd::gateway_config_secret_name(&team, "bot");
    let config = Api::<Secret>::namespaced(client.clone(), &operator)
        .get(&config_name)
        .await
        .expect("the gateway config Secret");
    assert_eq!(
        config.metadata.labels.unwrap()["claudekey.io/config"],
        "gateway"
    );
    // Deleting the ClaudeKey removes its config (the orphan sweep), so its workload key dies.
    Api::<claudekey::crd::ClaudeKey>::namespaced(client.clone(), &team)
        .delete("bot", &Default::default())
        .await
        .unwrap();
    support::eventually(Duration::from_secs(20), "config removed", || async {
        let api = Api::<Secret>::namespaced(client.clone(), &operator);
        api.get_opt(&config_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    controller.stop().await;
}

#[tokio::test]
async fn a_forged_ledger_is_never_acted_on() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-ledger").await;
    let team = support::namespace(&client, "ck-trust-forge").await;
    let old = upstream_key();
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let fake = FakeUpstream::start(&[]).await.unwrap();
    fake.add_key(&old);
    fake.add_admin_key(&admin_key);
    let source = unique("forge");
    let admin = format!("{source}-admin");
    put_upstream(&client, &operator, &source, &old).await;
    put_upstream(&client, &operator, &admin, &admin_key).await;
    apply_cluster_source(
        &client,
        &source,
        json!({ "kubernetesSecret": { "name": &source }, "placement": "namespace",
                "allowedNamespaces": { "names": [&team] },
                "anthropicAdmin": { "adminKeySecretRef": { "name": &admin, "key": "api-key" } } }),
    )
    .await;
    let controller = start(&client, cluster_wide(&operator, Some(fake.url())));
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    let before = owned(&client, &team, "bot").await.unwrap();
    // The namespace team adds a backdoor workload key to the ledger on its -client Secret.
    let backdoor = "ab".repeat(32);
    let annotations = before.client_secret.metadata.annotations.clone().unwrap();
    let forged = annotations["claudekey.io/ledger"].replacen(
        "\"workloadKeys\":[",
        &format!("\"workloadKeys\":[{{\"sha256\":\"{backdoor}\",\"fingerprint\":\"ck:abababab\",\"validUntil\":\"2099-01-01T00:00:00Z\"}},"),
        1,
    );
    let patch = json!({ "metadata": { "annotations": { "claudekey.io/ledger": forged } } });
    Api::<Secret>::namespaced(client.clone(), &team)
        .patch("bot-client", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    support::eventually(Duration::from_secs(20), "LedgerTampered", || async {
        event_reasons(&client, &team)
            .await
            .iter()
            .any(|r| r == "LedgerTampered")
            .then_some(())
    })
    .await;
    let after = wait_owned(&client, &team, "bot", "repaired", |o| {
        !o.workload_hashes().is_empty()
    })
    .await;
    assert!(
        !after.workload_hashes().contains(&backdoor),
        "the proxy never accepts the forged hash"
    );
    assert!(
        fake.received()
            .iter()
            .all(|r| !r.path.starts_with("/v1/organizations/api_keys/")),
        "no Admin API change"
    );
    assert_eq!(fake.key_status(&old), Some(KeyStatus::Active));
    controller.stop().await;
}

/// Two ClaudeKeys in two namespaces share a source with anthropicAdmin: the replaced key is
/// deactivated exactly once, and only when neither uses it any more.
#[tokio::test]
async fn a_shared_key_is_retired_once_when_nobody_uses_it() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-retire").await;
    let (ns1, ns2) = (
        support::namespace(&client, "ck-trust-r1").await,
        support::namespace(&client, "ck-trust-r2").await,
    );
    let (old, new) = (upstream_key(), upstream_key());
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let fake = FakeUpstream::start(&[]).await.unwrap();
    let old_id = fake.add_key(&old);
    fake.add_key(&new);
    fake.add_admin_key(&admin_key);
    let source = unique("shared");
    let admin = format!("{source}-admin");
    put_upstream(&client, &operator, &source, &old).await;
    put_upstream(&client, &operator, &admin, &admin_key).await;
    apply_cluster_source(
        &client,
        &source,
        json!({ "kubernetesSecret": { "name": &source }, "placement": "namespace",
                "refreshInterval": "10s", "allowedNamespaces": { "names": [&ns1, &ns2] },
                "anthropicAdmin": { "adminKeySecretRef": { "name": &admin, "key": "api-key" } } }),
    )
    .await;
    let controller = start(&client, cluster_wide(&operator, Some(fake.url())));
    for ns in [&ns1, &ns2] {
        apply_claudekey_value(
            &client,
            ns,
            "bot",
            json!({ "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey", "metadata": { "name": "bot" },
                    "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": &source },
                              "rotation": { "interval": "24h", "gracePeriod": if ns == &ns1 { "3s" } else { "40s" } } } }),
        )
        .await;
        wait_claudekey(&client, ns, "bot", "Ready", is_ready).await;
    }
    let deactivations = || {
        fake.received()
            .iter()
            .filter(|r| r.path.starts_with("/v1/organizations/api_keys/"))
            .count()
    };
    // The source's key is replaced: both roll it, each with its own grace.
    put_upstream(&client, &operator, &source, &new).await;
    for ns in [&ns1, &ns2] {
        wait_owned(&client, ns, "bot", "new key rolled", |o| {
            o.config.current_upstream().is_some_and(|u| {
                u.fingerprint
                    == claudekey::keys::fingerprint(claudekey::keys::KeyKind::Upstream, &new)
            })
        })
        .await;
    }
    let sources: Api<ClusterClaudeKeySource> = Api::all(client.clone());
    support::eventually(Duration::from_secs(20), "queued on the source", || async {
        let s = sources.get(&source).await.ok()?;
        (!s.status?.retiring.is_empty()).then_some(())
    })
    .await;
    // ns1 leaves (deleted) while ns2 is still in its grace: nothing is deactivated.
    Api::<claudekey::crd::ClaudeKey>::namespaced(client.clone(), &ns1)
        .delete("bot", &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        deactivations(),
        0,
        "ns2 still uses the old key in its grace"
    );
    assert_eq!(fake.key_status(&old), Some(KeyStatus::Active));
    // Once ns2's grace ends: exactly one deactivation.
    support::eventually(Duration::from_secs(60), "old key deactivated", || async {
        (fake.key_status(&old) == Some(KeyStatus::Inactive)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(deactivations(), 1, "exactly one deactivation call");
    assert_eq!(fake.key_status(&new), Some(KeyStatus::Active));
    let status = sources.get(&source).await.unwrap().status.unwrap();
    assert!(status.retiring.is_empty());
    let record = status.retired.last().unwrap();
    assert_eq!(record.key_id.as_deref(), Some(old_id.as_str()));
    assert!(!serde_json::to_string(&status).unwrap().contains(&old[14..]));
    controller.stop().await;
}

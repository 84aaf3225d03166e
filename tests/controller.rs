//! The controller against the real control plane (hack/control-plane.sh): issue, rotate, revoke,
//! upstream roll, drift repair, backend outage and garbage collection. One namespace per test,
//! which is also the operator namespace of the in-process controller.

mod controller_support;
mod support;

use std::time::Duration;

use claudekey::crd::ClaudeKey;
use claudekey::keys::{KeyKind, fingerprint, sha256_hex};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams};

use controller_support::*;

#[tokio::test]
async fn apply_issues_both_secrets_with_owner_labels_and_ready_status() {
    let (client, ns) = setup("ck-apply").await;
    let upstream = upstream_key();
    put_upstream(&client, &ns, "upstream", &upstream).await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;

    let ck = wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let owned = wait_owned(&client, &ns, "bot", "both Secrets", |_| true).await;
    let uid = ck.metadata.uid.clone().unwrap();
    for secret in [&owned.client_secret, &owned.proxy_secret] {
        let owner = &secret
            .metadata
            .owner_references
            .as_ref()
            .expect("owner reference")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ClaudeKey", uid.as_str(), Some(true))
        );
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "claudekey");
        assert_eq!(labels["claudekey.io/name"], "bot");
    }
    assert!(owned.workload_key.starts_with("ck_live_") && owned.workload_key.len() == 51);
    let base_url = &owned.client_secret.data.as_ref().unwrap()["ANTHROPIC_BASE_URL"];
    assert_eq!(
        base_url,
        &ByteString(format!("https://claudekey-gateway.{ns}.svc:8443").into_bytes())
    );
    assert_eq!(
        owned.proxy_secret.data.as_ref().unwrap().len(),
        1,
        "-proxy holds exactly proxy.json"
    );
    assert_eq!(owned.workload_hashes(), [sha256_hex(&owned.workload_key)]);
    assert_eq!(owned.config.upstream.len(), 1);
    assert_eq!(
        owned.config.upstream[0].fingerprint,
        fingerprint(KeyKind::Upstream, &upstream)
    );
    assert_eq!(owned.config.policy.scope.max_tokens, Some(512));

    let status = ck.status.as_ref().unwrap();
    assert_eq!(
        fingerprint_of(&ck),
        fingerprint(KeyKind::Workload, &owned.workload_key)
    );
    assert_eq!(
        status.upstream.as_ref().unwrap().fingerprint,
        fingerprint(KeyKind::Upstream, &upstream)
    );
    assert_eq!(status.observed_generation, ck.metadata.generation);
    assert_eq!(
        status.source.as_deref(),
        Some(format!("ClusterClaudeKeySource/{ns}.bot (kubernetes:upstream)").as_str())
    );
    assert_eq!(status.placement, Some(claudekey::crd::Placement::Namespace));
    assert!(status.next_rotation_time.is_some());
    for type_ in ["Ready", "Rotating", "Degraded", "RotationDue"] {
        assert!(condition(&ck, type_).is_some(), "condition {type_}");
    }
    assert_no_leaks(&client, &ns, &[owned.workload_key.clone(), upstream]).await;
    controller.stop().await;
}

fn fingerprint_of(ck: &ClaudeKey) -> String {
    controller_support::fingerprint(ck).unwrap_or_default()
}

#[tokio::test]
async fn rotate_annotation_overlaps_for_the_grace_period_then_drops_the_old_key() {
    let (client, ns) = setup("ck-rotate").await;
    let upstream = upstream_key();
    put_upstream(&client, &ns, "upstream", &upstream).await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();

    annotate(&client, &ns, "bot", "claudekey.io/rotate", "1").await;
    let during = wait_owned(&client, &ns, "bot", "new key beside the old one", |o| {
        o.workload_key != first.workload_key
    })
    .await;
    assert_eq!(
        during.workload_hashes(),
        [
            sha256_hex(&during.workload_key),
            sha256_hex(&first.workload_key)
        ]
    );
    assert!(during.config.workload_keys[0].valid_until.is_none());
    assert!(during.config.workload_keys[1].valid_until.is_some());
    let ck = wait_claudekey(&client, &ns, "bot", "Rotating=True", |ck| {
        condition(ck, "Rotating").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(
        fingerprint_of(&ck),
        fingerprint(KeyKind::Workload, &during.workload_key)
    );
    let previous = ck
        .status
        .as_ref()
        .unwrap()
        .workload_key
        .as_ref()
        .unwrap()
        .previous_fingerprint
        .clone();
    assert_eq!(
        previous,
        Some(fingerprint(KeyKind::Workload, &first.workload_key))
    );

    // After the 3 s grace, the controller wakes by itself (no event) and drops the old hash.
    let after = wait_owned(&client, &ns, "bot", "old key dropped after grace", |o| {
        o.workload_hashes().len() == 1
    })
    .await;
    assert_eq!(
        after.workload_key, during.workload_key,
        "no further rotation"
    );
    wait_claudekey(&client, &ns, "bot", "Rotating=False", |ck| {
        condition(ck, "Rotating").is_some_and(|c| c.0 == "False")
    })
    .await;
    assert_no_leaks(
        &client,
        &ns,
        &[first.workload_key, during.workload_key, upstream],
    )
    .await;
    controller.stop().await;
}

#[tokio::test]
async fn revoke_annotation_drops_the_old_key_at_once() {
    let (client, ns) = setup("ck-revoke").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    let spec = SPEC_FAST.replace("gracePeriod: 3s", "gracePeriod: 1h");
    apply_claudekey(&client, &ns, "bot", &spec).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();

    annotate(&client, &ns, "bot", "claudekey.io/revoke", "breach-1").await;
    let revoked = wait_owned(&client, &ns, "bot", "revoked key", |o| {
        o.workload_key != first.workload_key
    })
    .await;
    assert_eq!(
        revoked.workload_hashes(),
        [sha256_hex(&revoked.workload_key)],
        "the old key is gone, no grace"
    );
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    support::eventually(Duration::from_secs(10), "KeyRevoked event", || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("KeyRevoked"))
                .then_some(())
        }
    })
    .await;
    assert_no_leaks(&client, &ns, &[first.workload_key, revoked.workload_key]).await;
    controller.stop().await;
}

#[tokio::test]
async fn new_upstream_value_is_rolled_with_overlap() {
    let (client, ns) = setup("ck-upstream").await;
    let old = upstream_key();
    put_upstream(&client, &ns, "upstream", &old).await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    let ck = wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();
    let old_version = ck.status.unwrap().upstream.unwrap().version;

    let new = upstream_key();
    put_upstream(&client, &ns, "upstream", &new).await;
    let rolled = wait_owned(&client, &ns, "bot", "new upstream key current", |o| {
        o.config.upstream.len() == 2
    })
    .await;
    let fps: Vec<_> = rolled
        .config
        .upstream
        .iter()
        .map(|u| (u.fingerprint.clone(), u.valid_until.is_some()))
        .collect();
    assert_eq!(
        fps,
        [
            (fingerprint(KeyKind::Upstream, &new), false),
            (fingerprint(KeyKind::Upstream, &old), true)
        ]
    );
    assert_eq!(
        rolled.workload_key, first.workload_key,
        "an upstream roll keeps the workload key"
    );
    let ck = wait_claudekey(&client, &ns, "bot", "status shows the new upstream", |ck| {
        ck.status
            .as_ref()
            .and_then(|s| s.upstream.as_ref())
            .is_some_and(|u| u.fingerprint == fingerprint(KeyKind::Upstream, &new))
    })
    .await;
    assert_ne!(ck.status.unwrap().upstream.unwrap().version, old_version);
    wait_owned(
        &client,
        &ns,
        "bot",
        "old upstream dropped after grace",
        |o| o.config.upstream.len() == 1,
    )
    .await;
    assert_no_leaks(&client, &ns, &[old, new, first.workload_key]).await;
    controller.stop().await;
}

#[tokio::test]
async fn backend_outage_degrades_but_keeps_serving_the_last_good_key() {
    let (client, ns) = setup("ck-outage").await;
    let upstream = upstream_key();
    put_upstream(&client, &ns, "upstream", &upstream).await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let before = owned(&client, &ns, "bot").await.unwrap();

    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete("upstream", &DeleteParams::default())
        .await
        .unwrap();
    let ck = wait_claudekey(&client, &ns, "bot", "Degraded=True", |ck| {
        condition(ck, "Degraded").is_some_and(|c| c.0 == "True")
    })
    .await;
    let (_, reason, message) = condition(&ck, "Degraded").unwrap();
    assert_eq!(reason, "BackendError");
    assert!(
        message.contains(&format!("Secret {ns}/upstream not found")),
        "{message}"
    );
    let during = owned(&client, &ns, "bot").await.unwrap();
    assert_eq!(during.config.upstream.len(), 1);
    assert_eq!(
        during.config.upstream[0].fingerprint,
        fingerprint(KeyKind::Upstream, &upstream),
        "last good key kept"
    );
    assert_eq!(during.workload_key, before.workload_key);

    put_upstream(&client, &ns, "upstream", &upstream).await;
    let ck = wait_claudekey(&client, &ns, "bot", "Degraded=False again", |ck| {
        condition(ck, "Degraded").is_some_and(|c| c.0 == "False") && is_ready(ck)
    })
    .await;
    assert_eq!(
        fingerprint_of(&ck),
        fingerprint(KeyKind::Workload, &before.workload_key)
    );
    assert_no_leaks(&client, &ns, &[upstream, before.workload_key]).await;
    controller.stop().await;
}

#[tokio::test]
async fn deleting_the_claudekey_garbage_collects_its_secrets() {
    let (client, ns) = setup("ck-gc").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    assert!(owned(&client, &ns, "bot").await.is_some());

    Api::<ClaudeKey>::namespaced(client.clone(), &ns)
        .delete("bot", &DeleteParams::default())
        .await
        .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    support::eventually(Duration::from_secs(60), "Secrets garbage-collected", || {
        let secrets = secrets.clone();
        async move {
            let client_gone = secrets.get_opt("bot-client").await.ok()?.is_none();
            let proxy_gone = secrets.get_opt("bot-proxy").await.ok()?.is_none();
            (client_gone && proxy_gone).then_some(())
        }
    })
    .await;
    assert!(
        secrets.get_opt("upstream").await.unwrap().is_some(),
        "the backend Secret is not owned"
    );
    controller.stop().await;
}

/// The expiry below is the deadline-driven wake-up (no event at all triggers it). Scheduled
/// rotation uses the same requeue and is covered by `decide`'s unit tests: `rotation.interval`
/// has a floor of 10m, too long to wait for here.
#[tokio::test]
async fn expiry_retires_the_key_and_reports_it() {
    let (client, ns) = setup("ck-expiry").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    let expires = (chrono::Utc::now() + chrono::TimeDelta::seconds(4))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    apply_claudekey(
        &client,
        &ns,
        "bot",
        &format!("{SPEC_FAST}  expiresAt: \"{expires}\"\n"),
    )
    .await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();
    let ck = wait_claudekey(&client, &ns, "bot", "Ready=False Expired", |ck| {
        condition(ck, "Ready").is_some_and(|c| c.1 == "Expired")
    })
    .await;
    assert_eq!(condition(&ck, "RotationDue").unwrap().0, "True");
    let after = owned(&client, &ns, "bot").await.unwrap();
    assert_ne!(
        after.workload_key, first.workload_key,
        "the expired key is retired"
    );
    assert_eq!(after.workload_hashes().len(), 1, "with zero grace");
    assert!(after.config.policy.expires_at.is_some());
    assert!(
        event_reasons(&client, &ns)
            .await
            .iter()
            .any(|r| r == "KeyExpired")
    );
    controller.stop().await;
}

//! The controller keeping its Secrets right against the real control plane: hand edits and
//! deletions repaired without a new key, spec changes applied without looking like tampering,
//! invalid specs reported, and foreign Secrets never taken over.

mod controller_support;
mod support;

use std::time::Duration;

use claudekey::keys::sha256_hex;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams, api::Patch, api::PatchParams};

use controller_support::*;

#[tokio::test]
async fn hand_edited_proxy_secret_is_repaired_without_a_new_key() {
    let (client, ns) = setup("ck-tamper").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    // No backend refresh within the test: only the owned-Secret watch can trigger the repairs.
    let spec = SPEC_FAST.replace("refreshInterval: 1s", "refreshInterval: 1h");
    apply_claudekey(&client, &ns, "bot", &spec).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let before = owned(&client, &ns, "bot").await.unwrap();

    // Someone adds an extra workload hash with no end, and a second data entry.
    let mut forged = before.config.clone();
    forged
        .workload_keys
        .push(claudekey::proxyconf::WorkloadKeyEntry {
            sha256: sha256_hex("ck_live_attacker"),
            fingerprint: "ck:deadbeef".into(),
            valid_until: None,
        });
    let patch = serde_json::json!({ "data": {
        "proxy.json": ByteString(serde_json::to_vec(&forged).unwrap()),
        "extra": ByteString(b"x".to_vec()),
    }});
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    secrets
        .patch("bot-proxy", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    let repaired = wait_owned(&client, &ns, "bot", "repaired -proxy", |o| {
        o.workload_hashes().len() == 1 && o.proxy_secret.data.as_ref().is_some_and(|d| d.len() == 1)
    })
    .await;
    assert_eq!(
        repaired.workload_key, before.workload_key,
        "no new key issued"
    );
    assert_eq!(repaired.workload_hashes(), before.workload_hashes());

    // Deleting it outright is repaired the same way.
    secrets
        .delete("bot-proxy", &DeleteParams::default())
        .await
        .unwrap();
    let restored = wait_owned(&client, &ns, "bot", "recreated -proxy", |_| true).await;
    assert_eq!(restored.workload_key, before.workload_key);
    assert_eq!(restored.workload_hashes(), before.workload_hashes());

    // An owner reference stripped from -client by hand comes back, with the same key.
    let strip = serde_json::json!({ "metadata": { "ownerReferences": null } });
    secrets
        .patch("bot-client", &PatchParams::default(), &Patch::Merge(&strip))
        .await
        .unwrap();
    let readopted = wait_owned(&client, &ns, "bot", "owner reference restored", |o| {
        o.client_secret.metadata.owner_references.is_some()
    })
    .await;
    assert_eq!(readopted.workload_key, before.workload_key);
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    support::eventually(Duration::from_secs(10), "TamperRepaired event", || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("TamperRepaired"))
                .then_some(())
        }
    })
    .await;
    controller.stop().await;
}

/// Whoever may write `claudekeys/status` (a team granted it by mistake, or a stray tool) writes
/// its own version: a planted condition, the other placement (the webhook injects by it), a
/// made-up key fingerprint. The edit is itself a watch event; the controller's next status write
/// replaces the whole status with what it observed, and no new key is issued for it.
#[tokio::test]
async fn a_hand_edited_status_is_replaced_by_the_controllers() {
    let (client, ns) = setup("ck-status").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    let spec = SPEC_FAST.replace("refreshInterval: 1s", "refreshInterval: 1h");
    apply_claudekey(&client, &ns, "bot", &spec).await;
    let before = wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let real = before.status.clone().unwrap();
    let other = match real.placement {
        Some(claudekey::crd::Placement::Gateway) => "namespace",
        _ => "gateway",
    };
    let forged = serde_json::json!({ "status": {
        "placement": other,
        "workloadKey": { "fingerprint": "ck:forged", "issuedAt": "2026-01-01T00:00:00Z" },
        "conditions": [
            { "type": "Ready", "status": "True", "reason": "Forged", "message": "trust me",
              "lastTransitionTime": "2026-01-01T00:00:00Z" },
            { "type": "Verified", "status": "True", "reason": "Forged", "message": "audited",
              "lastTransitionTime": "2026-01-01T00:00:00Z" },
        ],
    }});
    Api::<claudekey::crd::ClaudeKey>::namespaced(client.clone(), &ns)
        .patch_status("bot", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .unwrap();
    let after = wait_claudekey(&client, &ns, "bot", "the controller's status back", |ck| {
        ck.status.as_ref().is_some_and(|s| {
            s.placement == real.placement
                && s.conditions.iter().all(|c| c.reason != "Forged")
                && s.workload_key == real.workload_key
        })
    })
    .await;
    assert_eq!(
        fingerprint(&after),
        fingerprint(&before),
        "no new key issued"
    );
    let status = after.status.unwrap();
    assert!(status.conditions.iter().all(|c| c.type_ != "Verified"));
    controller.stop().await;
}

#[tokio::test]
async fn invalid_custom_pattern_is_reported_not_retried() {
    let (client, ns) = setup("ck-invalid").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    let spec = format!(
        "{SPEC_FAST}  dataProtection:\n    customPatterns: [{{ name: broken, regex: \"EMP-[0-9\" }}]\n"
    );
    apply_claudekey(&client, &ns, "bot", &spec).await;
    let ck = wait_claudekey(&client, &ns, "bot", "InvalidSpec", |ck| {
        condition(ck, "Ready").is_some_and(|c| c.1 == "InvalidSpec")
    })
    .await;
    assert!(condition(&ck, "Ready").unwrap().2.contains("broken"));
    assert!(
        owned(&client, &ns, "bot").await.is_none(),
        "nothing issued for an invalid spec"
    );
    // Fixing the spec is picked up.
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready after the fix", is_ready).await;
    controller.stop().await;
}

#[tokio::test]
async fn spec_change_rewrites_the_policy_without_a_new_key_or_a_tamper_event() {
    let (client, ns) = setup("ck-respec").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let before = owned(&client, &ns, "bot").await.unwrap();

    apply_claudekey(
        &client,
        &ns,
        "bot",
        &SPEC_FAST.replace("maxTokens: 512", "maxTokens: 64"),
    )
    .await;
    let after = wait_owned(&client, &ns, "bot", "new policy", |o| {
        o.config.policy.scope.max_tokens == Some(64)
    })
    .await;
    assert_eq!(after.workload_key, before.workload_key);
    let ck = wait_claudekey(&client, &ns, "bot", "observed the new generation", |ck| {
        ck.status.as_ref().and_then(|s| s.observed_generation) == ck.metadata.generation
    })
    .await;
    assert!(is_ready(&ck));
    let reasons = event_reasons(&client, &ns).await;
    assert!(
        !reasons.iter().any(|r| r == "TamperRepaired"),
        "{reasons:?}"
    );
    // The first key is in the Ready condition, not in an Event; a policy change is no new key.
    assert!(
        !reasons
            .iter()
            .any(|r| r == "KeyIssued" || r == "KeyRotated"),
        "{reasons:?}"
    );
    controller.stop().await;
}

#[tokio::test]
async fn a_foreign_secret_with_an_owned_name_is_never_taken_over() {
    let (client, ns) = setup("ck-conflict").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    put_upstream(
        &client,
        &ns,
        "bot-client",
        "someone else's data, not a key at all",
    )
    .await;
    let controller = start(&client, config(&ns));
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    let ck = wait_claudekey(&client, &ns, "bot", "SecretConflict", |ck| {
        condition(ck, "Ready").is_some_and(|c| c.1 == "SecretConflict")
    })
    .await;
    assert!(condition(&ck, "Ready").unwrap().2.contains("bot-client"));
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let untouched = secrets.get("bot-client").await.unwrap();
    assert!(untouched.metadata.owner_references.is_none());
    assert!(untouched.data.unwrap().contains_key("api-key"));
    assert!(secrets.get_opt("bot-proxy").await.unwrap().is_none());

    secrets
        .delete("bot-client", &DeleteParams::default())
        .await
        .unwrap();
    wait_claudekey(&client, &ns, "bot", "Ready once the name is free", is_ready).await;
    controller.stop().await;
}

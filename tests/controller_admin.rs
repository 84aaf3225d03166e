//! Retiring a replaced upstream key through the Anthropic Admin API, against the real control
//! plane and the shared fake upstream's Admin API (key list and update).

mod controller_support;
mod support;

use std::time::Duration;

use claudekey::fake_upstream::{FakeUpstream, KeyStatus, partial_key_hint};

use controller_support::*;

/// The fake upstream with these active keys and an admin key; returns it and the keys' ids.
async fn fake_admin(keys: &[&str], admin_key: &str) -> (FakeUpstream, Vec<String>) {
    let fake = FakeUpstream::start(&[]).await.expect("fake upstream");
    let ids = keys.iter().map(|k| fake.add_key(k)).collect();
    fake.add_admin_key(admin_key);
    (fake, ids)
}

#[tokio::test]
async fn replaced_upstream_key_is_deactivated_after_its_grace_period() {
    let (client, ns) = setup("ck-admin-api").await;
    let old = upstream_key();
    let new = upstream_key();
    let other = upstream_key();
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let (fake, ids) = fake_admin(&[&old, &new, &other], &admin_key).await;
    let url = fake.url();
    put_upstream(&client, &ns, "upstream", &old).await;
    put_upstream(&client, &ns, "anthropic-admin", &admin_key).await;
    let mut cfg = config(&ns);
    cfg.anthropic_url = url;
    let controller = start(&client, cfg);
    let spec = format!(
        "{SPEC_FAST}  anthropicAdmin:\n    adminKeySecretRef: {{ name: anthropic-admin, key: api-key }}\n"
    );
    apply_claudekey(&client, &ns, "bot", &spec).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;

    put_upstream(&client, &ns, "upstream", &new).await;
    wait_owned(&client, &ns, "bot", "new upstream rolled", |o| {
        o.config.upstream.len() == 2
    })
    .await;
    assert_eq!(
        fake.key_status(&old),
        Some(KeyStatus::Active),
        "not retired during its grace period"
    );

    support::eventually(Duration::from_secs(30), "old key deactivated", || async {
        (fake.key_status(&old) == Some(KeyStatus::Inactive)).then_some(())
    })
    .await;
    assert_eq!(
        fake.key_status(&new),
        Some(KeyStatus::Active),
        "the current key stays active"
    );
    assert_eq!(
        fake.key_status(&other),
        Some(KeyStatus::Active),
        "unrelated keys are left alone"
    );
    assert!(
        fake.received()
            .iter()
            .filter(|r| r.path.starts_with("/v1/organizations/"))
            .all(|r| r.header("x-api-key") == Some(admin_key.as_str())),
        "the Admin API is called with the admin key only"
    );
    let events = kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    support::eventually(Duration::from_secs(10), "UpstreamKeyRetired event", || {
        let (events, old_id) = (events.clone(), ids[0].clone());
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("UpstreamKeyRetired")
                        && e.note.as_deref().is_some_and(|n| n.contains(&old_id))
                })
                .then_some(())
        }
    })
    .await;
    // Retired once: the queue in the ledger is emptied.
    wait_owned(&client, &ns, "bot", "retirement queue emptied", |o| {
        o.proxy_secret
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| !a["claudekey.io/ledger"].contains("retiring"))
    })
    .await;
    let ck = wait_claudekey(&client, &ns, "bot", "healthy", |ck| {
        let retired = ck
            .status
            .as_ref()
            .and_then(|s| s.upstream.as_ref())
            .is_some_and(|u| u.retired.is_some());
        retired && condition(ck, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    assert!(is_ready(&ck));
    let retired = ck
        .status
        .as_ref()
        .and_then(|s| s.upstream.as_ref())
        .and_then(|u| u.retired.clone())
        .expect("status.upstream.retired is recorded");
    assert_eq!(retired.key_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(retired.outcome, "UpstreamKeyRetired");
    assert_eq!(retired.hint, partial_key_hint(&old));
    assert_no_leaks(&client, &ns, &[old, new, other, admin_key]).await;
    controller.stop().await;
}

/// Never guess: when two active keys share the replaced key's hint, neither is touched; the
/// ClaudeKey is Degraded with the ambiguity and the key stays queued.
#[tokio::test]
async fn ambiguous_hint_changes_nothing_and_degrades() {
    let (client, ns) = setup("ck-admin-ambig").await;
    let old = upstream_key();
    let new = upstream_key();
    let twin = hint_twin(&old);
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let (fake, _) = fake_admin(&[&old, &twin, &new], &admin_key).await;
    let url = fake.url();
    put_upstream(&client, &ns, "upstream", &old).await;
    put_upstream(&client, &ns, "anthropic-admin", &admin_key).await;
    let mut cfg = config(&ns);
    cfg.anthropic_url = url;
    let controller = start(&client, cfg);
    let spec = format!(
        "{SPEC_FAST}  anthropicAdmin:\n    adminKeySecretRef: {{ name: anthropic-admin, key: api-key }}\n"
    );
    apply_claudekey(&client, &ns, "bot", &spec).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    put_upstream(&client, &ns, "upstream", &new).await;

    let ck = wait_claudekey(&client, &ns, "bot", "Degraded by ambiguity", |ck| {
        condition(ck, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "UpstreamKeyAmbiguous")
    })
    .await;
    let retired = ck
        .status
        .as_ref()
        .and_then(|s| s.upstream.as_ref())
        .and_then(|u| u.retired.clone())
        .expect("status.upstream.retired is recorded");
    assert_eq!(retired.outcome, "UpstreamKeyAmbiguous");
    assert_eq!(retired.key_id, None);
    assert!(
        event_reasons(&client, &ns)
            .await
            .iter()
            .any(|r| r == "UpstreamKeyAmbiguous")
    );
    for key in [&old, &twin, &new] {
        assert_eq!(
            fake.key_status(key),
            Some(KeyStatus::Active),
            "no key was changed"
        );
    }
    let owned = wait_owned(&client, &ns, "bot", "still queued", |_| true).await;
    assert!(
        owned.proxy_secret.metadata.annotations.as_ref().unwrap()["claudekey.io/ledger"]
            .contains("retiring"),
        "the key stays queued for retirement"
    );
    assert_no_leaks(&client, &ns, &[old, twin, new, admin_key]).await;
    controller.stop().await;
}

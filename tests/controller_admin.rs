//! Retiring a replaced upstream key through the Anthropic Admin API, against the real control
//! plane and a small fake of the Admin API's key list and update endpoints.

mod controller_support;
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::HeaderMap,
    routing::{get, post},
};
use serde_json::{Value, json};

use controller_support::*;

#[derive(Default)]
struct FakeAdmin {
    /// (id, partial_key_hint, status)
    keys: Vec<(String, String, String)>,
    admin_keys_seen: Vec<String>,
}

type Shared = Arc<Mutex<FakeAdmin>>;

fn console_hint(key: &str) -> String {
    format!("{}...{}", &key[..16], &key[key.len() - 4..])
}

async fn list(State(state): State<Shared>, headers: HeaderMap) -> Json<Value> {
    let mut state = state.lock().unwrap();
    let seen = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    state.admin_keys_seen.push(seen.to_string());
    let data: Vec<Value> = state
        .keys
        .iter()
        .map(|(id, hint, status)| json!({ "id": id, "type": "api_key", "partial_key_hint": hint, "status": status, "name": id }))
        .collect();
    Json(json!({ "data": data, "has_more": false, "first_id": null, "last_id": null }))
}

async fn update(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut state = state.lock().unwrap();
    let status = body["status"].as_str().unwrap_or_default().to_string();
    for key in state.keys.iter_mut().filter(|k| k.0 == id) {
        key.2 = status.clone();
    }
    Json(json!({ "id": id, "type": "api_key", "status": status }))
}

async fn fake_admin(state: Shared) -> String {
    let app = Router::new()
        .route("/v1/organizations/api_keys", get(list))
        .route("/v1/organizations/api_keys/{id}", post(update))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn replaced_upstream_key_is_deactivated_after_its_grace_period() {
    let (client, ns) = setup("ck-admin-api").await;
    let old = upstream_key();
    let new = upstream_key();
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let state: Shared = Arc::default();
    state.lock().unwrap().keys = vec![
        ("apikey_old".into(), console_hint(&old), "active".into()),
        ("apikey_new".into(), console_hint(&new), "active".into()),
        (
            "apikey_other".into(),
            "sk-ant-api03-zzz...zzzz".into(),
            "active".into(),
        ),
    ];
    let url = fake_admin(state.clone()).await;
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
        state.lock().unwrap().keys[0].2,
        "active",
        "not retired during its grace period"
    );

    support::eventually(Duration::from_secs(30), "old key deactivated", || async {
        (state.lock().unwrap().keys[0].2 == "inactive").then_some(())
    })
    .await;
    {
        let state = state.lock().unwrap();
        assert_eq!(state.keys[1].2, "active", "the current key stays active");
        assert_eq!(state.keys[2].2, "active", "unrelated keys are left alone");
        assert!(state.admin_keys_seen.iter().all(|k| *k == admin_key));
    }
    let events = kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    support::eventually(Duration::from_secs(10), "UpstreamKeyRetired event", || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("UpstreamKeyRetired")
                        && e.note.as_deref().is_some_and(|n| n.contains("apikey_old"))
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
    assert_eq!(retired.key_id.as_deref(), Some("apikey_old"));
    assert_eq!(retired.outcome, "UpstreamKeyRetired");
    assert_eq!(retired.hint, console_hint(&old));
    assert_no_leaks(&client, &ns, &[old, new, admin_key]).await;
    controller.stop().await;
}

/// Never guess: when two active keys share the replaced key's hint, neither is touched; the
/// ClaudeKey is Degraded with the ambiguity and the key stays queued.
#[tokio::test]
async fn ambiguous_hint_changes_nothing_and_degrades() {
    let (client, ns) = setup("ck-admin-ambig").await;
    let old = upstream_key();
    let new = upstream_key();
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let state: Shared = Arc::default();
    state.lock().unwrap().keys = vec![
        ("apikey_a".into(), console_hint(&old), "active".into()),
        ("apikey_b".into(), console_hint(&old), "active".into()),
        ("apikey_new".into(), console_hint(&new), "active".into()),
    ];
    let url = fake_admin(state.clone()).await;
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
    {
        let state = state.lock().unwrap();
        assert!(
            state.keys.iter().all(|k| k.2 == "active"),
            "no key was changed"
        );
    }
    let owned = wait_owned(&client, &ns, "bot", "still queued", |_| true).await;
    assert!(
        owned.proxy_secret.metadata.annotations.as_ref().unwrap()["claudekey.io/ledger"]
            .contains("retiring"),
        "the key stays queued for retirement"
    );
    assert_no_leaks(&client, &ns, &[old, new, admin_key]).await;
    controller.stop().await;
}

//! The Admin API client and the retirement step against the shared fake upstream: pagination,
//! status updates, 401/404, "already inactive", "hint matches two keys", usage gauges.

use claudekey::admin::{
    AdminClient, AdminError, DrillResult, KeyStatus, RetireOutcome, UsageMetrics, probe_key,
    retire, retire_after_grace,
};
use claudekey::fake_upstream::{FakeUpstream, KeyStatus as FakeStatus, UsageRecord};
use secrecy::SecretString;

const ADMIN: &str = "sk-ant-admin01-testadminkeyvalue-AAAA";

fn key(n: usize) -> String {
    format!("sk-ant-api03-K{n:03}xxxxxxxxxxxxxxxxxxxxxxxxxxxx-{n:04}")
}

async fn fake_with(n: usize) -> (FakeUpstream, AdminClient) {
    claudekey::crypto::install_default_provider();
    let keys: Vec<String> = (0..n).map(key).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let fake = FakeUpstream::start(&refs).await.expect("fake upstream");
    fake.add_admin_key(ADMIN);
    let admin = AdminClient::new(&fake.url(), SecretString::from(ADMIN)).unwrap();
    (fake, admin)
}

#[tokio::test]
async fn lists_every_page() {
    let (fake, admin) = fake_with(250).await;
    let keys = admin.list_keys().await.unwrap();
    assert_eq!(keys.len(), 250);
    let ids: std::collections::HashSet<_> = keys.iter().map(|k| &k.id).collect();
    assert_eq!(ids.len(), 250, "no key listed twice");
    let pages = fake
        .received()
        .iter()
        .filter(|r| r.path.starts_with("/v1/organizations/api_keys"))
        .count();
    assert_eq!(pages, 3, "100 per page");
    assert!(
        fake.received()
            .iter()
            .all(|r| r.header("anthropic-version").is_some())
    );
}

#[tokio::test]
async fn get_update_and_typed_errors() {
    let (fake, admin) = fake_with(2).await;
    let keys = admin.list_keys().await.unwrap();
    let id = &keys[0].id;
    let updated = admin.set_status(id, KeyStatus::Inactive).await.unwrap();
    assert_eq!(updated.status, KeyStatus::Inactive);
    assert_eq!(fake.key_status(&key(0)), Some(FakeStatus::Inactive));
    assert_eq!(admin.get_key(id).await.unwrap().status, KeyStatus::Inactive);
    assert!(matches!(
        admin.get_key("apikey_missing").await,
        Err(AdminError::NotFound { .. })
    ));
    let wrong =
        AdminClient::new(&fake.url(), SecretString::from("sk-ant-admin01-wrongwrong")).unwrap();
    let err = wrong.list_keys().await.unwrap_err();
    assert!(matches!(err, AdminError::Unauthorized), "{err}");
    assert!(!err.to_string().contains("wrongwrong"));
}

#[tokio::test]
async fn forbidden_and_server_errors_are_typed() {
    // The fake has no 403 (its admin keys are all-powerful); a tiny axum stub gives one.
    claudekey::crypto::install_default_provider();
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"type":"error","error":{"type":"permission_error","message":"no"}})),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let admin = AdminClient::new(&format!("http://{addr}"), SecretString::from(ADMIN)).unwrap();
    let err = admin.list_keys().await.unwrap_err();
    assert!(matches!(err, AdminError::Forbidden { .. }), "{err}");
    assert!(!err.to_string().contains("testadminkeyvalue"));
}

#[tokio::test]
async fn retires_a_unique_key_and_the_drill_sees_it_dead() {
    let (fake, admin) = fake_with(120).await;
    let old = SecretString::from(key(110));
    assert_eq!(probe_key(&fake.url(), &old).await, DrillResult::Live);
    let outcome = retire_after_grace(&admin, &old).await;
    assert!(
        matches!(&outcome, RetireOutcome::Retired { .. }),
        "{outcome:?}"
    );
    assert_eq!(fake.key_status(&key(110)), Some(FakeStatus::Inactive));
    assert_eq!(fake.key_status(&key(111)), Some(FakeStatus::Active));
    assert_eq!(probe_key(&fake.url(), &old).await, DrillResult::Dead);
    // Second time: already inactive, a success with no update sent.
    fake.clear_received();
    let again = retire(&admin, &old, None).await;
    assert!(
        matches!(again, RetireOutcome::AlreadyInactive { .. }),
        "{again:?}"
    );
    assert!(again.is_success());
    assert!(fake.received().iter().all(|r| r.method == "GET"));
}

#[tokio::test]
async fn ambiguous_and_missing_hints_change_nothing() {
    let (fake, admin) = fake_with(1).await;
    // Same first three and last four characters after the prefix: the same hint.
    let a = "sk-ant-api03-SAMaaaaaaaaaaaaaaaaaaaaaa-TAIL";
    let b = "sk-ant-api03-SAMbbbbbbbbbbbbbbbbbbbbbb-TAIL";
    fake.add_key(a);
    fake.add_key(b);
    let outcome = retire(&admin, &SecretString::from(a), None).await;
    match &outcome {
        RetireOutcome::Ambiguous { key_ids } => assert_eq!(key_ids.len(), 2),
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert!(!outcome.message("sk-ant-api03-…IL").contains("SAMaaa"));
    assert_eq!(fake.key_status(a), Some(FakeStatus::Active));
    assert_eq!(fake.key_status(b), Some(FakeStatus::Active));
    let none = retire(&admin, &SecretString::from(key(999)), None).await;
    assert_eq!(none, RetireOutcome::NotFound);
    let wrong =
        AdminClient::new(&fake.url(), SecretString::from("sk-ant-admin01-nope-nope")).unwrap();
    let failed = retire(&wrong, &SecretString::from(key(0)), None).await;
    assert!(matches!(failed, RetireOutcome::Failed { .. }), "{failed:?}");
    assert_eq!(fake.key_status(&key(0)), Some(FakeStatus::Active));
}

#[tokio::test]
async fn usage_report_feeds_the_gauges() {
    let (fake, admin) = fake_with(2).await;
    let ids: Vec<String> = admin
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    fake.add_usage(UsageRecord {
        api_key_id: ids[0].clone(),
        model: "claude-sonnet-4-5".into(),
        uncached_input_tokens: 1_000_000,
        output_tokens: 100_000,
        ..Default::default()
    });
    fake.add_usage(UsageRecord {
        api_key_id: ids[0].clone(),
        model: "claude-haiku-4-5".into(),
        uncached_input_tokens: 10,
        cache_read_input_tokens: 7,
        ..Default::default()
    });
    fake.add_usage(UsageRecord {
        api_key_id: ids[1].clone(),
        model: "claude-sonnet-4-5".into(),
        output_tokens: 5,
        ..Default::default()
    });
    let now = chrono::Utc::now();
    let usage = admin
        .usage_by_key(now - chrono::TimeDelta::days(1), now, &ids[..1])
        .await
        .unwrap();
    assert_eq!(usage.len(), 1, "filtered to one key");
    let u = &usage[&ids[0]];
    assert_eq!(u.uncached_input_tokens, 1_000_010);
    assert_eq!(u.output_tokens, 100_000);
    assert_eq!(u.cache_read_input_tokens, 7);
    assert!(u.cost_usd > 4.5 && u.cost_usd < 4.6, "{}", u.cost_usd);

    let mut registry = prometheus_client::registry::Registry::with_prefix("claudekey");
    let metrics = UsageMetrics::register(&mut registry);
    metrics.set("team-a/support-bot", u);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains(r#"claudekey_upstream_usage_tokens{claudekey="team-a/support-bot",kind="input"} 1000010"#), "{text}");
    assert!(
        text.contains("claudekey_upstream_cost_usd_estimate{"),
        "{text}"
    );
    assert!(!text.contains("apikey_"), "no key ids in labels");
    metrics.remove("team-a/support-bot");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("support-bot"));
}

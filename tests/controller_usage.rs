//! Usage per upstream key: the controller reads Anthropic's usage report (the shared fake's
//! Admin API) for ClaudeKeys with `spec.anthropicAdmin` and exports it as gauges, including
//! traffic that never went through a proxy; it never guesses between keys that share a hint.

mod controller_support;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use claudekey::fake_upstream::{FakeUpstream, KeyStatus};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use kube::Api;
use serde_json::{Value, json};

use controller_support::*;

/// A Messages call straight to the upstream with the raw key, as a leaked key would be used.
async fn bypass_call(base: &str, key: &str) -> Value {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = json!({
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{ "role": "user", "content": "a request that skipped the proxy" }],
    });
    let request = http::Request::post(format!("{base}/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.expect("call the fake");
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn upstream_usage_is_exported_per_claudekey_and_never_guessed() {
    let (client, ns) = setup("ck-usage").await;
    let upstream = upstream_key();
    let admin_key = format!("sk-ant-admin01-{}", uuid::Uuid::new_v4().simple());
    let fake = FakeUpstream::start(&[&upstream])
        .await
        .expect("fake upstream");
    fake.add_admin_key(&admin_key);
    put_upstream(&client, &ns, "upstream", &upstream).await;
    put_upstream(&client, &ns, "anthropic-admin", &admin_key).await;
    let mut cfg = config(&ns);
    cfg.anthropic_url = fake.url();
    cfg.usage_interval = Some(Duration::from_millis(500));
    cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], free_port())));
    let controller = start(&client, cfg);
    let with_admin = format!(
        "{SPEC_FAST}  anthropicAdmin:\n    adminKeySecretRef: {{ name: anthropic-admin, key: api-key }}\n"
    );
    apply_claudekey(&client, &ns, "bot", &with_admin).await;
    apply_claudekey(&client, &ns, "no-admin", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;

    // Traffic that bypassed the proxy is in Anthropic's report, so it is in the gauges.
    let reply = bypass_call(&fake.url(), &upstream).await;
    let input = reply["usage"]["input_tokens"].as_f64().unwrap();
    let output = reply["usage"]["output_tokens"].as_f64().unwrap();
    assert!(input > 0.0 && output > 0.0);
    let id = format!("{ns}/bot");
    let input_series =
        format!(r#"claudekey_upstream_usage_tokens{{claudekey="{id}",kind="input"}}"#);
    let output_series =
        format!(r#"claudekey_upstream_usage_tokens{{claudekey="{id}",kind="output"}}"#);
    let text = support::eventually(Duration::from_secs(20), "usage exported", || async {
        let text = controller.metrics().await;
        (series(&text, &output_series) == Some(output)).then_some(text)
    })
    .await;
    assert_eq!(series(&text, &input_series), Some(input));
    let cost = series(
        &text,
        &format!(r#"claudekey_upstream_cost_usd_estimate{{claudekey="{id}"}}"#),
    )
    .expect("cost gauge");
    assert!(cost > 0.0, "haiku has a list price: {cost}");
    assert!(
        !text.contains(&format!(r#"claudekey="{ns}/no-admin""#)),
        "a ClaudeKey without an admin key has no usage series"
    );
    assert!(!text.contains("sk-ant-"), "no key or hint in metrics");
    assert!(
        series(
            &text,
            r#"claudekey_upstream_usage_polls_total{result="ok"}"#
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // A second key at Anthropic with the same hint: the report cannot be attributed, so the
    // series goes away and a Warning Event says why. Nothing is summed by guess.
    let twin = hint_twin(&upstream);
    fake.add_key(&twin);
    support::eventually(Duration::from_secs(20), "series dropped", || async {
        let text = controller.metrics().await;
        let unmatched = series(
            &text,
            r#"claudekey_upstream_usage_polls_total{result="unmatched"}"#,
        );
        (unmatched.is_some() && !text.contains(&output_series)).then_some(())
    })
    .await;
    support::eventually(Duration::from_secs(10), "UpstreamUsageUnavailable", || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            event_reasons(&client, &ns)
                .await
                .iter()
                .any(|r| r == "UpstreamUsageUnavailable")
                .then_some(())
        }
    })
    .await;

    // Once the twin is archived the hint is unique again and the series come back.
    fake.set_key_status(&twin, KeyStatus::Archived);
    support::eventually(Duration::from_secs(20), "usage exported again", || async {
        (series(&controller.metrics().await, &output_series) == Some(output)).then_some(())
    })
    .await;

    // Deleting the ClaudeKey drops its series.
    Api::<claudekey::crd::ClaudeKey>::namespaced(client.clone(), &ns)
        .delete("bot", &Default::default())
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(20),
        "no series of a deleted key",
        || async { (!controller.metrics().await.contains(&id)).then_some(()) },
    )
    .await;
    assert_no_leaks(&client, &ns, &[upstream, twin, admin_key]).await;
    controller.stop().await;
}

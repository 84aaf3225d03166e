//! The admin listener the kubelet probes (the traffic port is loopback-only in sidecar mode):
//! `/healthz` always, `/readyz` only once a config is loaded, `/metrics` in OpenMetrics text.

mod proxy_common;

use claudekey::proxy::Mode;
use proxy_common::*;
use serde_json::json;

#[tokio::test]
async fn readyz_waits_for_a_config_and_metrics_are_served() {
    // Gateway mode, no ClaudeKey mounted yet.
    let h = Harness::start(Mode::Gateway, &[UPSTREAM_A], |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let proxy = h.proxy.clone();
    tokio::spawn(async move { proxy.serve_admin(listener, std::future::pending()).await });
    let c = client();
    assert_eq!(
        send(&c, &admin, "GET", "/healthz", None, None).await.status,
        200
    );
    assert_eq!(
        send(&c, &admin, "GET", "/readyz", None, None).await.status,
        503
    );
    // Requests before any config are refused in the API's shape, not dropped.
    let r = send(&c, &h.url(), "GET", "/v1/models", Some(WORKLOAD_A), None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "api_error");

    // A ClaudeKey's Secret is mounted: the watcher picks up the new sub-directory.
    kubelet_write(
        &h.dir.path().join("bot"),
        &proxy_json(
            "bot",
            &[(UPSTREAM_A, None)],
            &[(WORKLOAD_A, None)],
            json!({}),
        ),
    );
    let url = admin.clone();
    let mut ready = false;
    for _ in 0..250 {
        if send(&c, &url, "GET", "/readyz", None, None).await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "readyz never turned ready");
    assert_eq!(
        send(&c, &h.url(), "GET", "/v1/models", Some(WORKLOAD_A), None)
            .await
            .status,
        200
    );
    let metrics = send(&c, &admin, "GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains(r#"claudekey_proxy_requests_total{claudekey="team-a/bot",model="none",endpoint="models",status="2xx"} 1"#), "{text}");
    assert!(text.contains(r#"claudekey_proxy_requests_total{claudekey="unauthenticated""#));
    assert!(text.ends_with("# EOF\n"));
}

//! The forwarder sidecar of gateway placement: the official Python SDK's placeholder requests
//! carried to the TLS gateway, streams unbuffered, a rotated workload key picked up from the
//! kubelet's `..data` swap, and no key ever sent to a gateway the CA does not vouch for.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use claudekey::{fake_upstream::Reply as FakeReply, proxy::forwarder::Forwarder};
use http_body_util::{BodyExt as _, Full};
use kube::api::PostParams;
use serde_json::json;

use crate::proxy_common::{self, UPSTREAM_A, WORKLOAD_A, WORKLOAD_B, message, proxy_json};
use crate::{
    Gateway, Pki, REPLY, assert_no_keys_logged, call, config_secret, run_sdk, tls_client,
    until_status,
};

/// Writes the `<name>-client` files into `dir` as the kubelet updates a Secret volume: a new
/// timestamped directory swapped in through the `..data` symlink.
fn kubelet_write_client(dir: &Path, files: &[(&str, &str)], generation: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let data = format!("..2026_12_01_00_00_00.{generation}");
    std::fs::create_dir(dir.join(&data)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&data).join(name), text).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&data, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_carries_the_python_sdk_to_the_tls_gateway() {
    let gw = Gateway::start("gw-forward").await;
    let pp = PostParams::default();
    let a = proxy_json(
        "bot",
        &[(UPSTREAM_A, None)],
        &[(WORKLOAD_A, None)],
        json!({}),
    );
    gw.secrets
        .create(&pp, &config_secret("bot", &a, true))
        .await
        .unwrap();
    let direct = tls_client(&gw.pki.ca_pem);
    until_status(&direct, &gw.url(), WORKLOAD_A, 200, "ClaudeKey bot served").await;

    // The forwarder: loopback only, the `-client` volume as the kubelet writes it.
    let refused = claudekey::proxy::forwarder::check_listen("0.0.0.0:8484".parse().unwrap());
    assert!(
        refused.is_err(),
        "the forwarder must refuse a non-loopback listener"
    );
    let client_dir = tempfile::tempdir().unwrap();
    let base_url = gw.url();
    kubelet_write_client(
        client_dir.path(),
        &[
            ("ANTHROPIC_API_KEY", WORKLOAD_A),
            ("ANTHROPIC_BASE_URL", &base_url),
            ("ca.crt", &gw.pki.ca_pem),
        ],
        1,
    );
    let forwarder = Forwarder::new(client_dir.path());
    assert!(forwarder.ready.load().is_some(), "client config loaded");
    let watcher = forwarder.spawn_watcher().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(forwarder.clone().serve(listener, async {
        let _ = stopped.await;
    }));

    let (ok, out) = run_sdk(addr).await;
    assert!(ok, "the SDK failed through the forwarder:\n{out}");
    assert!(out.contains(&format!("CREATE:{REPLY}")), "{out}");
    assert!(out.contains(&format!("STREAM:{REPLY}")), "{out}");
    let plain = proxy_common::client();
    let forwarded = format!("http://{addr}");
    assert_eq!(
        call(&plain, &forwarded, "anything").await.0,
        200,
        "the app's key is replaced"
    );

    // A stream arrives as it is produced, not buffered by the forwarder: the first event long
    // before the last.
    gw.fake.set_reply(FakeReply::Text("word ".repeat(40)));
    gw.fake.set_chunk_chars(5);
    gw.fake.set_delta_delay(Duration::from_millis(50));
    let request = http::Request::post(format!("{forwarded}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(message("hi", true).to_string())))
        .unwrap();
    let started = std::time::Instant::now();
    let response = plain.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let _first = body.frame().await.expect("a first frame").unwrap();
    let first = started.elapsed();
    while body.frame().await.is_some() {}
    let total = started.elapsed();
    assert!(
        total >= Duration::from_secs(1) && first < total / 2,
        "first frame after {first:?}, last after {total:?}"
    );
    gw.fake.set_delta_delay(Duration::ZERO);
    gw.fake.set_reply(FakeReply::Text(REPLY.into()));

    // The controller rotates the workload key: the gateway accepts only the new one, and the
    // forwarder picks it up from the kubelet's `..data` swap.
    let rotated = proxy_json(
        "bot",
        &[(UPSTREAM_A, None)],
        &[(WORKLOAD_B, None)],
        json!({}),
    );
    gw.rewrite_config("bot", rotated).await;
    until_status(&plain, &forwarded, "x", 401, "the old workload key refused").await;
    kubelet_write_client(
        client_dir.path(),
        &[
            ("ANTHROPIC_API_KEY", WORKLOAD_B),
            ("ANTHROPIC_BASE_URL", &base_url),
            ("ca.crt", &gw.pki.ca_pem),
        ],
        2,
    );
    until_status(
        &plain,
        &forwarded,
        "x",
        200,
        "the forwarder to send the new key",
    )
    .await;

    // A gateway whose certificate the CA does not vouch for is never sent the key.
    let other = Pki::new();
    kubelet_write_client(
        client_dir.path(),
        &[
            ("ANTHROPIC_API_KEY", WORKLOAD_B),
            ("ANTHROPIC_BASE_URL", &base_url),
            ("ca.crt", &other.ca_pem),
        ],
        3,
    );
    until_status(&plain, &forwarded, "x", 502, "an untrusted gateway refused").await;
    let before = gw.fake.received().len();
    assert_eq!(call(&plain, &forwarded, "x").await.0, 502);
    assert_eq!(gw.fake.received().len(), before);

    for r in gw.fake.received() {
        assert_eq!(r.header("x-api-key"), Some(UPSTREAM_A));
        assert!(r.header("authorization").is_none());
    }
    let _ = stop.send(());
    watcher.abort();
    assert_no_keys_logged(&[UPSTREAM_A, WORKLOAD_A, WORKLOAD_B]);
}

//! The official Anthropic Python SDK (`anthropic` from PyPI) pointed at an in-process proxy in
//! front of the fake upstream: create, stream, count_tokens, models, and the proxy's own errors
//! as the SDK's exception types. Needs `CLAUDEKEY_TEST_PYTHON` (the venv that hack/tools.sh
//! builds); fails, never skips, without it.

mod proxy_common;

use claudekey::{fake_upstream::Reply as FakeReply, proxy::Mode};
use proxy_common::*;
use serde_json::json;

const REPLY: &str = "Hello from the fake upstream, through claudekey.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_through_the_proxy() {
    let python = std::env::var("CLAUDEKEY_TEST_PYTHON").expect(
        "CLAUDEKEY_TEST_PYTHON is not set: run hack/tools.sh and source the control plane's env file \
         (it exports the venv's python with the anthropic SDK and pytest)",
    );
    let h = Harness::start(Mode::Gateway, &[UPSTREAM_A], |dir| {
        kubelet_write(
            &dir.join("open"),
            &proxy_json(
                "open",
                &[(UPSTREAM_A, None)],
                &[(WORKLOAD_A, None)],
                json!({ "scope": { "models": ["claude-sonnet-4-*"] } }),
            ),
        );
        kubelet_write(
            &dir.join("limited"),
            &proxy_json(
                "limited",
                &[(UPSTREAM_A, None)],
                &[(WORKLOAD_B, None)],
                json!({ "limits": { "requestsPerMinute": 1 } }),
            ),
        );
    })
    .await;
    h.fake.set_reply(FakeReply::Text(REPLY.into()));
    h.fake.set_chunk_chars(5);

    let output = tokio::process::Command::new(&python)
        .args(["-m", "pytest", "tests/sdk", "-q", "-p", "no:cacheprovider"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ANTHROPIC_BASE_URL", h.url())
        .env("ANTHROPIC_API_KEY", WORKLOAD_A)
        .env("CLAUDEKEY_LIMITED_API_KEY", WORKLOAD_B)
        .env("CLAUDEKEY_EXPECTED_REPLY", REPLY)
        .env("CLAUDEKEY_FAKE_URL", h.fake.url())
        .env("CLAUDEKEY_FAKE_KEY", UPSTREAM_A)
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env_remove("ANTHROPIC_PROFILE")
        .env_remove("ANTHROPIC_CONFIG_DIR")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .unwrap_or_else(|e| panic!("failed to run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pytest failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("9 passed"),
        "expected all 9 SDK tests to run:\n{stdout}"
    );

    // What the SDK sent, as the upstream saw it: the upstream key only, never the workload key.
    // Requests with an Authorization header reached the fake directly from the SDK (the proxy
    // never forwards one): they show which header this SDK version uses. 2.x: Bearer.
    let (direct, seen): (Vec<_>, Vec<_>) = h
        .fake
        .received()
        .into_iter()
        .partition(|r| r.header("authorization").is_some());
    assert_eq!(direct.len(), 1, "expected one direct SDK request");
    let style = match (
        direct[0].header("authorization"),
        direct[0].header("x-api-key"),
    ) {
        (Some(bearer), _) if bearer == format!("Bearer {UPSTREAM_A}") => "Authorization: Bearer",
        _ => panic!("unexpected credential headers in {:?}", direct[0].headers),
    };
    eprintln!("the installed SDK sends its key as {style}");
    assert!(
        seen.len() >= 5,
        "{} requests reached the upstream",
        seen.len()
    );
    for r in &seen {
        assert_eq!(r.header("x-api-key"), Some(UPSTREAM_A));
        assert!(r.header("authorization").is_none());
        assert!(
            r.header("anthropic-version").is_some(),
            "anthropic-version must pass through"
        );
    }
    let audit = h.audit_lines();
    assert!(
        audit
            .iter()
            .any(|l| l["status"] == 429 && l["claudeKey"] == "team-a/limited")
    );
}

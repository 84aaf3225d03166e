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

/// Issue 16 through the official SDK: what the SDK can express of each bullet (a document block,
/// a float or string `max_tokens`, a batch, invented model names, a client that gives up), with
/// the upstream's view, the audit log and /metrics checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_meets_the_policy_on_every_part_of_a_request() {
    let python = std::env::var("CLAUDEKEY_TEST_PYTHON").expect(
        "CLAUDEKEY_TEST_PYTHON is not set: run hack/tools.sh and source the control plane's env file",
    );
    let policy = json!({
        "scope": {
            "models": ["claude-sonnet-4-*"],
            "endpoints": ["messages", "countTokens", "models", "batches"],
            "maxInputChars": 2000,
            "maxTokens": 1024
        },
        "dataProtection": { "redact": ["email"], "promptInjection": "block" }
    });
    let h = Harness::start(Mode::Sidecar, &[UPSTREAM_A], |dir| {
        kubelet_write(dir, &proxy_json("bot", &[(UPSTREAM_A, None)], &[], policy));
    })
    .await;
    let run = |checks: &'static [&'static str]| {
        let (python, url) = (python.clone(), h.url());
        async move {
            let output = tokio::process::Command::new(&python)
                .arg("tests/sdk/policy_check.py")
                .args(checks)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env("ANTHROPIC_BASE_URL", url)
                .env("ANTHROPIC_API_KEY", "claudekey-sidecar")
                .env_remove("ANTHROPIC_AUTH_TOKEN")
                .env("NO_PROXY", "127.0.0.1,localhost")
                .env_remove("HTTP_PROXY")
                .env_remove("HTTPS_PROXY")
                .env_remove("ALL_PROXY")
                .output()
                .await
                .unwrap_or_else(|e| panic!("failed to run {python}: {e}"));
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success(),
                "SDK checks failed:\n{stdout}\n{stderr}"
            );
            for check in checks {
                assert!(
                    stdout.contains(&format!("ok {check}")),
                    "{check} did not run:\n{stdout}"
                );
            }
        }
    };
    run(&["document", "max_tokens", "batch", "models"]).await;

    let seen: Vec<String> = h
        .fake
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    let all = seen.join("\n");
    assert!(
        !all.contains("jane.doe@example.com"),
        "the upstream saw the e-mail"
    );
    assert!(
        !all.contains("Ignore all previous instructions"),
        "the upstream saw the injection"
    );
    assert!(
        !all.contains("aaaaaaaaaa"),
        "the upstream saw the 5,000-character document"
    );
    assert!(
        !all.contains("100000"),
        "the upstream saw max_tokens 100000"
    );
    assert_eq!(
        seen.iter()
            .filter(|b| b.contains("[REDACTED:email]"))
            .count(),
        2,
        "the document and the batch, redacted"
    );
    let metrics = h.proxy.metrics.encode();
    let models: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.split("model=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    // The allowlist entry, and `none` for the requests refused before their model was read.
    assert_eq!(
        models.into_iter().collect::<Vec<_>>(),
        ["claude-sonnet-4-*", "none"],
        "model labels"
    );

    // A client that gives up before the answer: one audit line, outcome client_closed.
    let before = h.audit_lines().len();
    h.fake.set_response_delay(std::time::Duration::from_secs(2));
    run(&["abandon"]).await;
    let audit = h.wait_audit(before + 1).await;
    assert_eq!(audit.len(), before + 1);
    assert_eq!(audit[before]["outcome"], "client_closed");
    assert_eq!(audit[before]["status"], 499);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(h.audit_lines().len(), before + 1, "one line per request");
}

//! Spend budgets and Redis outages with a real redis-server: budgets spent across proxies and
//! reset by the next period (UTC days and months computed by Redis's clock), batches priced at
//! their estimate, and Redis killed and restarted under load.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use claudekey::{
    fake_upstream::{FakeUpstream, Reply as FakeReply},
    proxy::{
        Mode,
        limits::{LimitSettings, RedisSettings},
    },
};
use secrecy::SecretString;
use serde_json::json;

use crate::{
    proxy_common::{redis_server::RedisServer, *},
    shared_limits::{Running, body, four, shared, start_proxy},
};

/// With real UTC days and calendar months (the production period), Redis's Lua computes the
/// same reset times as the proxy's Rust: a budget of 0 is spent at once and names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_periods_in_redis_are_utc_days_and_calendar_months() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let client = client();
    for (field, name) in [("usdPerDay", "zero-day"), ("usdPerMonth", "zero-month")] {
        let policy = json!({ "limits": { "budget": { field: 0 } } });
        let p = start_proxy(Mode::Sidecar, &fake, name, &policy, shared(&redis, 86_400)).await;
        let expected = claudekey::proxy::limits::budget::Periods::now(86_400);
        let ends = if field == "usdPerDay" {
            expected.day.ends
        } else {
            expected.month.ends
        };
        let ends = chrono::DateTime::from_timestamp(ends, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let r = send(
            &client,
            &p.url(),
            "POST",
            "/v1/messages",
            Some(p.key()),
            Some(body(false, "u", 16)),
        )
        .await;
        assert_eq!(r.status, 429);
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(field) && message.contains(&ends),
            "{message} (want {ends})"
        );
        assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(0.0));
    }
    assert!(fake.received().is_empty());
}

/// Sleeps until a fresh budget period of `day_seconds` has just begun (by this machine's clock,
/// which is also the local redis-server's).
async fn at_period_start(day_seconds: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_millis() as u64 % (day_seconds * 1000);
    tokio::time::sleep(Duration::from_millis(day_seconds * 1000 - into + 50)).await;
}

/// usdPerDay 0.05, settled across processes from real usage: each answer is ~2000 output tokens
/// of Sonnet 4.5 ($15/MTok: $0.03), so the second answer spends the day; then every proxy
/// refuses with a non-retryable 429 naming the budget, the official SDK raises RateLimitError
/// without retrying, and the next day (a 12-second day: `LimitSettings::day_seconds`, which no
/// flag or environment variable can set) opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_budget_is_refused_once_spent_across_proxies_and_reopens_the_next_day() {
    let python = std::env::var("CLAUDEKEY_TEST_PYTHON").expect(
        "CLAUDEKEY_TEST_PYTHON is not set: run hack/tools.sh and source the control plane's env file",
    );
    let day = 12;
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    fake.set_reply(FakeReply::Text("word ".repeat(1600)));
    let proxies = four(
        &fake,
        "budget",
        json!({ "limits": { "budget": { "usdPerDay": 0.05 } } }),
        &shared(&redis, day as i64),
    )
    .await;
    at_period_start(day).await;
    let client = client();
    let call = |p: &Running| {
        let (client, url, key) = (client.clone(), p.url(), p.key());
        async move {
            send(
                &client,
                &url,
                "POST",
                "/v1/messages",
                Some(key),
                Some(body(false, "u", 4096)),
            )
            .await
        }
    };
    // Spent on two different proxies (a gateway, then a sidecar).
    assert_eq!(call(&proxies[0]).await.status, 200);
    assert_eq!(call(&proxies[2]).await.status, 200);
    // Settlement runs after the answer, so the two may reach Redis in either order: wait until
    // the shared spend shows both, on the proxy that settled last (it read the sum back).
    let spent = |p: &Running| {
        p.metric(r#"claudekey_proxy_spend_usd{claudekey="team-a/budget",period="day"}"#)
            .is_some_and(|v| v >= 0.05)
    };
    eventually(|| spent(&proxies[0]) || spent(&proxies[2])).await;
    for p in &proxies {
        let r = call(p).await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.headers["x-should-retry"], "false");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        assert!(
            message.contains("usdPerDay") && message.contains("$0.05"),
            "{message}"
        );
        assert!(message.contains("resets at"), "{message}");
    }
    let upstream_before = fake.received().len();
    let refused = |p: &Running| {
        p.metric(
            r#"claudekey_proxy_rate_limited_total{claudekey="team-a/budget",kind="usdPerDay"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = refused(&proxies[3]);
    let script = r#"
import anthropic
c = anthropic.Anthropic()
try:
    c.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    print("NO_ERROR")
except anthropic.RateLimitError as e:
    print("RATE_LIMIT", e.status_code, e.response.headers.get("x-should-retry"))
"#;
    let output = tokio::process::Command::new(&python)
        .args(["-c", script])
        .env("ANTHROPIC_BASE_URL", proxies[3].url())
        .env("ANTHROPIC_API_KEY", "claudekey-sidecar")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("RATE_LIMIT 429 false"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One request, not the SDK's default 1 + 2 retries.
    assert_eq!(refused(&proxies[3]) - before, 1.0);
    assert_eq!(fake.received().len(), upstream_before);
    // The next day opens again, on every proxy (two answers of $0.03 spend a day: two proxies
    // a day).
    for pair in proxies.chunks(2) {
        at_period_start(day).await;
        for p in pair {
            assert_eq!(call(p).await.status, 200);
        }
    }
}

/// Redis killed under load: no request fails or hangs because of it (each proxy counts its
/// fallback share), the fallback metric rises; Redis restarted on the same port: the proxies
/// count in Redis again by themselves. The password (given apart from the URL) appears in no log
/// line and no metric.
#[tokio::test(flavor = "current_thread")]
async fn redis_killed_mid_load_falls_back_and_comes_back_without_a_restart() {
    let logs = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || Writer(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let password = "redis-pw-Zq8xK2vNw7";
    let mut redis = RedisServer::start(Some(password));
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let limits = LimitSettings {
        redis: Some(RedisSettings {
            url: SecretString::from(redis.url_without_password()),
            username: None,
            password: Some(SecretString::from(password.to_string())),
            timeout: Duration::from_millis(100),
        }),
        ..LimitSettings::default()
    };
    let policy = json!({ "limits": { "requestsPerMinute": 100000, "tokensPerMinute": 10000000, "perUserRequestsPerHour": 100000 } });
    let proxies = vec![
        start_proxy(Mode::Gateway, &fake, "outage", &policy, limits.clone()).await,
        start_proxy(Mode::Sidecar, &fake, "outage", &policy, limits.clone()).await,
    ];
    let rate_key = "claudekey:{team-a/outage}:rate";
    let exists = |redis: &RedisServer| -> bool {
        let client = ::redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        ::redis::cmd("EXISTS")
            .arg(rate_key)
            .query::<i64>(&mut conn)
            .unwrap()
            == 1
    };
    let wave = |proxies: &[Running]| {
        let client = client();
        let calls: Vec<_> = proxies
            .iter()
            .flat_map(|p| (0..5).map(move |i| (p.url(), p.key(), i)))
            .map(|(url, key, i)| {
                let client = client.clone();
                async move {
                    let start = Instant::now();
                    let r = send(
                        &client,
                        &url,
                        "POST",
                        "/v1/messages",
                        Some(key),
                        Some(body(i % 2 == 0, "u", 16)),
                    )
                    .await;
                    (r.status, start.elapsed())
                }
            })
            .collect();
        futures::future::join_all(calls)
    };
    let check = |results: Vec<(u16, Duration)>| {
        for (status, took) in results {
            assert_eq!(status, 200);
            assert!(took < Duration::from_secs(2), "a request took {took:?}");
        }
    };
    check(wave(&proxies).await);
    assert!(exists(&redis));
    for p in &proxies {
        assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(0.0));
    }

    redis.kill();
    for _ in 0..5 {
        check(wave(&proxies).await);
    }
    for p in &proxies {
        assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(1.0));
        assert!(
            p.metric("claudekey_proxy_limits_shared_errors_total ")
                .unwrap()
                >= 1.0
        );
    }

    redis.restart();
    assert!(!exists(&redis), "a restarted Redis starts empty");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check(wave(&proxies).await);
        let back = proxies
            .iter()
            .all(|p| p.metric("claudekey_proxy_limits_fallback ") == Some(0.0));
        if back && exists(&redis) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shared counting did not resume within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(text.contains("Redis unreachable"), "{text}");
    assert!(text.contains("Redis answers again"), "{text}");
    assert!(!text.contains(password), "the Redis password was logged");
    for p in &proxies {
        assert!(!p.proxy.metrics.encode().contains(password));
    }
}

/// A `std::io::Write` into the shared log buffer.
struct Writer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A batch's usage never comes back through the proxy: its estimate (input and max_tokens of each
/// request, at list price) is what it spends, so batches cannot slip past a budget (in memory).
#[tokio::test]
async fn a_batch_spends_its_estimate() {
    let policy = json!({
        "scope": { "endpoints": ["messages", "batches"] },
        "limits": { "budget": { "usdPerDay": 0.01 } }
    });
    let h = Harness::start(Mode::Sidecar, &[UPSTREAM_A], |dir| {
        kubelet_write(
            dir,
            &proxy_json("batch", &[(UPSTREAM_A, None)], &[], policy),
        );
    })
    .await;
    let c = client();
    // 1,000 output tokens of Sonnet 4.5 at $15/MTok: $0.015, over the day's $0.01.
    let batch = json!({ "requests": [{ "custom_id": "a", "params": body(false, "u", 1000) }] });
    let r = send(
        &c,
        &h.url(),
        "POST",
        "/v1/messages/batches",
        Some("claudekey-sidecar"),
        Some(batch),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    h.wait_audit(1).await;
    let r = send(
        &c,
        &h.url(),
        "POST",
        "/v1/messages",
        Some("claudekey-sidecar"),
        Some(body(false, "u", 16)),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("usdPerDay"));
}

/// Redis down from the start: each proxy admits its documented fallback share of the limit
/// (0.5 x 60 = 30 of a burst), no fewer (never all refused) and no more (never fail-open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_proxy_admits_its_fallback_share() {
    let mut redis = RedisServer::start(None);
    let limits = LimitSettings {
        fallback_share: 0.5,
        ..shared(&redis, 86_400)
    };
    redis.kill();
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let policy = json!({ "limits": { "requestsPerMinute": 60 } });
    let p = start_proxy(Mode::Gateway, &fake, "fallback", &policy, limits).await;
    let start = Instant::now();
    let statuses = crate::shared_limits::burst(std::slice::from_ref(&p), 50, "u", 16).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refill = (start.elapsed().as_secs_f64() / 2.0).ceil() as usize;
    assert!(
        (30..=30 + refill).contains(&ok),
        "{ok} admitted, want 30 (+{refill})"
    );
    assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(1.0));
}

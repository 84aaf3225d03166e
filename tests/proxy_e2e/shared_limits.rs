//! Limits and budgets shared through a real redis-server (DESIGN.md §12): two gateway-mode and
//! two sidecar-mode proxies serve one ClaudeKey in front of one fake upstream. Each proxy is a
//! `Proxy` of its own (own limiter state, own connection to Redis); nothing but Redis is
//! shared, which is what separate processes or pods share too.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use claudekey::{
    fake_upstream::{FakeUpstream, Reply as FakeReply},
    proxy::{
        AuditTarget, Mode, Proxy, ProxySettings,
        limits::{LimitSettings, RedisSettings},
    },
};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::proxy_common::{redis_server::RedisServer, *};

/// One proxy on a free loopback port; stops when dropped.
struct Running {
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    mode: Mode,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn key(&self) -> &'static str {
        match self.mode {
            Mode::Gateway => WORKLOAD_A,
            Mode::Sidecar => "claudekey-sidecar",
        }
    }

    fn metric(&self, line_start: &str) -> Option<f64> {
        self.proxy
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

async fn start_proxy(
    mode: Mode,
    fake: &FakeUpstream,
    name: &str,
    policy: &Value,
    limits: LimitSettings,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let workload: &[(&str, Option<&str>)] = match mode {
        Mode::Gateway => &[(WORKLOAD_A, None)],
        Mode::Sidecar => &[],
    };
    kubelet_write(
        dir.path(),
        &proxy_json(name, &[(UPSTREAM_A, None)], workload, policy.clone()),
    );
    let mut settings = ProxySettings::new(dir.path(), fake.url(), mode);
    settings.audit = AuditTarget::Memory(Default::default());
    settings.upstream_timeout = Duration::from_secs(10);
    settings.limits = limits;
    let proxy = Arc::new(Proxy::start(settings).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = proxy.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    Running {
        proxy,
        addr,
        mode,
        dir,
        _stop: stop,
    }
}

/// Shared limits in `redis`. The accuracy tests allow a second a call: on two busy cores a
/// burst of 160 requests can take longer than the production 100 ms, and a fallback would
/// measure the fallback share instead of the shared count (the outage test keeps 100 ms).
fn shared(redis: &RedisServer, day_seconds: i64) -> LimitSettings {
    LimitSettings {
        redis: Some(RedisSettings {
            url: SecretString::from(redis.url()),
            password: None,
            timeout: Duration::from_secs(1),
        }),
        day_seconds,
        ..LimitSettings::default()
    }
}

/// Two gateways and two sidecars of ClaudeKey `name`, sharing `limits`.
async fn four(
    fake: &FakeUpstream,
    name: &str,
    policy: Value,
    limits: &LimitSettings,
) -> Vec<Running> {
    let mut out = Vec::new();
    for mode in [Mode::Gateway, Mode::Gateway, Mode::Sidecar, Mode::Sidecar] {
        out.push(start_proxy(mode, fake, name, &policy, limits.clone()).await);
    }
    out
}

fn body(stream: bool, user: &str, max_tokens: u64) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": max_tokens,
        "stream": stream,
        "metadata": { "user_id": user },
        "messages": [{ "role": "user", "content": "hi" }],
    })
}

/// `per_proxy` requests at once through each proxy (streamed every other one); the statuses.
async fn burst(proxies: &[Running], per_proxy: usize, user: &str, max_tokens: u64) -> Vec<u16> {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for (p, proxy) in proxies.iter().enumerate() {
        for i in 0..per_proxy {
            let (client, url, key) = (client.clone(), proxy.url(), proxy.key());
            let body = body((i + p) % 2 == 0, user, max_tokens);
            tasks.spawn(async move {
                let r = send(&client, &url, "POST", "/v1/messages", Some(key), Some(body)).await;
                assert!(r.status < 500, "{}: {}", r.status, r.text());
                r.status
            });
        }
    }
    tasks.join_all().await
}

/// requestsPerMinute: 60 allows a burst of exactly 60 (GCRA's tolerance is a whole minute) and
/// then one request a second. So when four proxies each try 40 requests within a couple of
/// seconds, the upstream sees 60 plus about one per elapsed second if the proxies share one
/// counter, and up to 160 (40 x 4; 4 x 60 with more load) if each counted alone: the test
/// takes seconds and still tells the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_proxies_share_one_requests_per_minute() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let proxies = four(
        &fake,
        "rpm",
        json!({ "limits": { "requestsPerMinute": 60 } }),
        &shared(&redis, 86_400),
    )
    .await;
    // One request through each first (connections up), counted in the same window.
    let start = Instant::now();
    let mut statuses = burst(&proxies, 1, "u", 16).await;
    statuses.extend(burst(&proxies, 40, "u", 16).await);
    let elapsed = start.elapsed().as_secs_f64();
    let upstream = fake.received().len();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, upstream);
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    let refill = elapsed.ceil() as usize;
    eprintln!(
        "limit accuracy: requestsPerMinute 60 across 4 proxies, upstream saw {upstream} in {elapsed:.2} s"
    );
    assert!(
        (58..=62 + refill).contains(&upstream),
        "upstream saw {upstream} requests in {elapsed:.1} s, want 60 +/- 2 (+{refill} refilled)"
    );
    // No proxy fell back to local counting: the figure above is the shared count.
    for p in &proxies {
        assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(0.0));
    }
}

/// tokensPerMinute: each answer's real usage (about 250 output tokens, streamed or not) is
/// settled into the shared bucket, so what the upstream reports used across four proxies stays
/// near the limit, not four times it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_proxies_share_one_tokens_per_minute_settled_from_real_usage() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    fake.set_reply(FakeReply::Text("word ".repeat(200)));
    let tpm = 6_000u64;
    let proxies = four(
        &fake,
        "tpm",
        json!({ "limits": { "tokensPerMinute": tpm } }),
        &shared(&redis, 86_400),
    )
    .await;
    // Reserve 300 a request, use ~251: sequential waves, so settlements return what was unused.
    let start = Instant::now();
    for _ in 0..4 {
        burst(&proxies, 4, "u", 300).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let used: u64 = fake
        .received()
        .iter()
        .filter(|r| r.path.starts_with("/v1/messages"))
        .count() as u64
        * 251;
    let refill = (elapsed * tpm as f64 / 60.0).ceil() as u64;
    assert!(
        used <= tpm + refill + 300,
        "upstream used ~{used} tokens in {elapsed:.1} s; the limit is {tpm} (+{refill} refilled)"
    );
    // Settlement gave unused reservations back: more requests passed than reservations alone allow.
    assert!(
        used > tpm * 7 / 10,
        "only ~{used} tokens used: settlement did not return reservations"
    );
}

/// perUserRequestsPerHour: one end user gets 10 requests an hour across all four proxies; another
/// user is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_proxies_share_one_users_hourly_window() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let proxies = four(
        &fake,
        "users",
        json!({ "limits": { "perUserRequestsPerHour": 10 } }),
        &shared(&redis, 86_400),
    )
    .await;
    let statuses = burst(&proxies, 6, "end-user-1", 16).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    assert_eq!(fake.received().len(), 10);
    let statuses = burst(&proxies[..1], 3, "end-user-2", 16).await;
    assert!(statuses.iter().all(|s| *s == 200));
}

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
    // Settlement runs after the answer: wait until the shared spend shows it.
    eventually(|| {
        proxies[2]
            .metric(r#"claudekey_proxy_spend_usd{claudekey="team-a/budget",period="day"}"#)
            .is_some_and(|v| v >= 0.05)
    })
    .await;
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

/// Keys are named by the ClaudeKey's identity: a rotation (new upstream and workload keys in
/// proxy.json) keeps the shared window, and a proxy started afterwards sees it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeps_the_shared_window() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A, UPSTREAM_B])
        .await
        .unwrap();
    let policy = json!({ "limits": { "requestsPerMinute": 2 } });
    let p = start_proxy(
        Mode::Gateway,
        &fake,
        "rotated",
        &policy,
        shared(&redis, 86_400),
    )
    .await;
    let c = client();
    let call = |url: String, key: &'static str| {
        let c = c.clone();
        async move {
            send(
                &c,
                &url,
                "POST",
                "/v1/messages",
                Some(key),
                Some(body(false, "u", 16)),
            )
            .await
            .status
        }
    };
    assert_eq!(call(p.url(), WORKLOAD_A).await, 200);
    assert_eq!(call(p.url(), WORKLOAD_A).await, 200);
    assert_eq!(call(p.url(), WORKLOAD_A).await, 429);
    // Rotated: new upstream key, new workload key (the old one in its grace period).
    kubelet_write(
        p.dir.path(),
        &proxy_json(
            "rotated",
            &[
                (UPSTREAM_B, None),
                (UPSTREAM_A, Some("2099-01-01T00:00:00Z")),
            ],
            &[
                (WORKLOAD_B, None),
                (WORKLOAD_A, Some("2099-01-01T00:00:00Z")),
            ],
            policy.clone(),
        ),
    );
    let url = p.url();
    let mut status = 0;
    for _ in 0..100 {
        status = call(url.clone(), WORKLOAD_B).await;
        if status != 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 429, "the new key must not reset the window");
    // Another proxy of the same ClaudeKey, started now: the same window.
    let q = start_proxy(
        Mode::Sidecar,
        &fake,
        "rotated",
        &policy,
        shared(&redis, 86_400),
    )
    .await;
    assert_eq!(call(q.url(), "claudekey-sidecar").await, 429);
}

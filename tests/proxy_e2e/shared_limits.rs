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
        limits::{LimitSettings, RedisSettings, settlements},
    },
};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::proxy_common::{redis_server::RedisServer, *};

/// One proxy on a free loopback port; stops when dropped.
pub(crate) struct Running {
    pub(crate) proxy: Arc<Proxy>,
    addr: SocketAddr,
    mode: Mode,
    pub(crate) dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<()>,
}

impl Running {
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn key(&self) -> &'static str {
        match self.mode {
            Mode::Gateway => WORKLOAD_A,
            Mode::Sidecar => "claudekey-sidecar",
        }
    }

    /// Stops as on SIGTERM and waits until it has (the shared counters flushed).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.serving
            .await
            .expect("the proxy served until told to stop");
    }

    /// Stops as a killed process does: the serving task is dropped mid-flight and so is the
    /// proxy, so nothing it held runs again (no flush, no lease-end give-back).
    pub(crate) async fn crash(self) {
        self.serving.abort();
        let _ = self.serving.await;
        assert_eq!(
            Arc::strong_count(&self.proxy),
            1,
            "nothing else may keep the crashed proxy alive"
        );
    }

    pub(crate) fn metric(&self, line_start: &str) -> Option<f64> {
        self.proxy
            .metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

pub(crate) async fn start_proxy(
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
    let serving = tokio::spawn(async move {
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
        stop,
        serving,
    }
}

/// Shared limits in `redis`. The accuracy tests allow a second a call: on two busy cores a
/// burst of 160 requests can take longer than the production 100 ms, and a fallback would
/// measure the fallback share instead of the shared count (the outage test keeps 100 ms).
pub(crate) fn shared(redis: &RedisServer, day_seconds: i64) -> LimitSettings {
    LimitSettings {
        redis: Some(RedisSettings {
            url: SecretString::from(redis.url()),
            username: None,
            password: None,
            timeout: Duration::from_secs(1),
        }),
        day_seconds,
        ..LimitSettings::default()
    }
}

/// Two gateways and two sidecars of ClaudeKey `name`, sharing `limits`.
pub(crate) async fn four(
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

pub(crate) fn body(stream: bool, user: &str, max_tokens: u64) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": max_tokens,
        "stream": stream,
        "metadata": { "user_id": user },
        "messages": [{ "role": "user", "content": "hi" }],
    })
}

/// `per_proxy` requests at once through each proxy (streamed every other one); the statuses.
pub(crate) async fn burst(
    proxies: &[Running],
    per_proxy: usize,
    user: &str,
    max_tokens: u64,
) -> Vec<u16> {
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

/// Settlements of one ClaudeKey are merged (`limits::settlements`): forty answers through one
/// proxy cost about one script call each (its admission), not two, and every nano-dollar still
/// reaches the shared spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_of_a_burst_are_merged_into_few_calls() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    fake.set_reply(FakeReply::Text("word ".repeat(200)));
    let policy = json!({ "limits": {
        "tokensPerMinute": 1_000_000, "budget": { "usdPerDay": 1000 } } });
    let proxy = start_proxy(
        Mode::Gateway,
        &fake,
        "merged",
        &policy,
        shared(&redis, 86_400),
    )
    .await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // One answer first: the scripts are loaded (a first EVALSHA fails with NOSCRIPT), then
    // the counts start from zero.
    assert_eq!(
        burst(std::slice::from_ref(&proxy), 1, "u", 300).await,
        [200]
    );
    tokio::time::sleep(settlements::SETTLE_DELAY * 5).await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let statuses = burst(std::slice::from_ref(&proxy), 40, "u", 300).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // 41 answers of 250 output tokens of Sonnet 4.5 ($15/MTok) at least.
    let floor = 41.0 * 250.0 * 15e-6;
    eventually(|| {
        proxy
            .metric(r#"claudekey_proxy_spend_usd{claudekey="team-a/merged",period="day"}"#)
            .is_some_and(|v| v >= floor)
    })
    .await;
    let calls = crate::shared_leases::script_calls(&redis).await;
    assert!(
        (40..=50).contains(&calls),
        "{calls} script calls for 40 answers: settlements were not merged"
    );
}

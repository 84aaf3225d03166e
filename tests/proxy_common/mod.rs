//! Shared set-up of the proxy tests: the fake upstream and an in-process proxy on free loopback
//! ports, config directories laid out the way the kubelet writes a mounted Secret, and a
//! small HTTP client.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub mod redis_server;

use bytes::Bytes;
use claudekey::{
    fake_upstream::FakeUpstream,
    keys::sha256_hex,
    proxy::{AuditTarget, Mode, Proxy, ProxySettings},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};

pub const UPSTREAM_A: &str = "sk-ant-api03-upstreamAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-a1AA";
pub const UPSTREAM_B: &str = "sk-ant-api03-upstreamBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB-b2BB";
pub const WORKLOAD_A: &str = "ck_live_workloadAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
pub const WORKLOAD_B: &str = "ck_live_workloadBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

/// A `proxy.json` as the controller writes it. `upstream` and `workload` are (key, validUntil).
pub fn proxy_json(
    name: &str,
    upstream: &[(&str, Option<&str>)],
    workload: &[(&str, Option<&str>)],
    policy: Value,
) -> String {
    let upstream: Vec<Value> = upstream
        .iter()
        .map(|(k, until)| json!({ "key": k, "fingerprint": format!("up:{}", &sha256_hex(k)[..8]), "validUntil": until }))
        .collect();
    let workload: Vec<Value> = workload
        .iter()
        .map(|(k, until)| json!({ "sha256": sha256_hex(k), "fingerprint": format!("ck:{}", &sha256_hex(k)[..8]), "validUntil": until }))
        .collect();
    json!({
        "claudeKey": { "namespace": "team-a", "name": name },
        "upstream": upstream,
        "workloadKeys": workload,
        "policy": policy,
    })
    .to_string()
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Writes `proxy.json` into `dir` exactly as the kubelet updates a Secret volume: a new
/// timestamped directory, a `..data_tmp` symlink to it renamed over `..data`, and `proxy.json`
/// a symlink to `..data/proxy.json`. The old directory is removed afterwards.
pub fn kubelet_write(dir: &Path, proxy_json: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let generation = format!(
        "..2026_11_27_00_00_00.{}",
        GENERATION.fetch_add(1, Ordering::SeqCst)
    );
    std::fs::create_dir(dir.join(&generation)).unwrap();
    std::fs::write(dir.join(&generation).join("proxy.json"), proxy_json).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&generation, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if std::fs::symlink_metadata(dir.join("proxy.json")).is_err() {
        std::os::unix::fs::symlink("..data/proxy.json", dir.join("proxy.json")).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// A fake upstream and a proxy in front of it.
pub struct Harness {
    pub fake: FakeUpstream,
    pub proxy: Arc<Proxy>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub audit: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Harness {
    /// Starts the fake with `upstream_keys` and a proxy whose config dir is prepared by `setup`.
    pub async fn start(mode: Mode, upstream_keys: &[&str], setup: impl FnOnce(&Path)) -> Self {
        Self::start_with(mode, upstream_keys, setup, |_| {}).await
    }

    /// [`Harness::start`], with the proxy's settings adjusted by `tweak` (limits, grace).
    pub async fn start_with(
        mode: Mode,
        upstream_keys: &[&str],
        setup: impl FnOnce(&Path),
        tweak: impl FnOnce(&mut ProxySettings),
    ) -> Self {
        let fake = FakeUpstream::start(upstream_keys).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        let audit = Arc::new(Mutex::new(Vec::new()));
        let mut settings = ProxySettings::new(dir.path(), fake.url(), mode);
        settings.audit = AuditTarget::Memory(audit.clone());
        settings.pod = Some("pod-1".into());
        settings.poll_interval = Duration::from_secs(2);
        settings.upstream_timeout = Duration::from_secs(10);
        tweak(&mut settings);
        let proxy = Arc::new(Proxy::start(settings).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = proxy.clone();
        let serving = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            fake,
            proxy,
            addr,
            dir,
            audit,
            stop: Some(stop),
            serving: Some(serving),
        }
    }

    /// Stops the proxy as a signal would, and waits until it has finished (audit flushed).
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            serving.await.unwrap();
        }
    }

    /// A non-streamed Messages request saying `text`, without a key (a sidecar's client).
    pub async fn ask(&self, text: &str) -> Reply {
        send(
            &client(),
            &self.url(),
            "POST",
            "/v1/messages",
            None,
            Some(message(text, false)),
        )
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        self.audit
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the audit log has `n` lines (a streamed response is audited when it ends).
    pub async fn wait_audit(&self, n: usize) -> Vec<Value> {
        eventually(|| self.audit.lock().unwrap().len() >= n).await;
        self.audit_lines()
    }
}

/// Polls `check` every 20 ms for up to 10 s.
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within 10 s");
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response: status, headers, and the body as received, one entry per data frame.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub frames: Vec<Bytes>,
}

impl Reply {
    pub fn body(&self) -> Vec<u8> {
        self.frames.concat()
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body()).unwrap()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }

    /// The concatenated `text_delta`s of an SSE body.
    pub fn sse_text(&self) -> String {
        sse_events(&self.text())
            .iter()
            .filter_map(|(_, d)| {
                d.pointer("/delta/text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }
}

/// `(event name, data)` of every event in an SSE body.
pub fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// Sends a request; `key` goes in `x-api-key` (or as a Bearer token when it starts with
/// "Bearer ").
pub async fn send(
    client: &HttpClient,
    base: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json");
    if let Some(key) = key {
        builder = match key.strip_prefix("Bearer ") {
            Some(token) => builder.header("authorization", format!("Bearer {token}")),
            None => builder.header("x-api-key", key),
        };
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push(data);
        }
    }
    Reply {
        status,
        headers,
        frames,
    }
}

/// A Messages request body.
pub fn message(text: &str, stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 256,
        "stream": stream,
        "metadata": { "user_id": "end-user-42" },
        "messages": [{ "role": "user", "content": text }],
    })
}

//! Gateway placement against the real kube-apiserver (DESIGN.md §10): the gateway serves
//! ClaudeKeys from labelled config Secrets watched through the API, over HTTPS whose certificate
//! files are swapped without a restart; the forwarder sidecar carries the official Python SDK's
//! placeholder requests to it. Every log line of the run is captured and scanned for keys: its
//! own test binary, so the global log capture sees only these tests.

#[path = "proxy_gateway/end_to_end.rs"]
mod end_to_end;
mod federation;
#[path = "proxy_gateway/forwarder.rs"]
mod forwarder;
mod proxy_common;
mod support;

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use claudekey::{
    fake_upstream::{FakeUpstream, Reply as FakeReply},
    proxy::{
        AuditTarget, Mode, Proxy, ProxySettings,
        kube_source::{CONFIG_LABEL, NAMESPACE_LABEL, SecretsSource, config_secret_name},
    },
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use proxy_common::{UPSTREAM_A, WORKLOAD_A, WORKLOAD_B, message, proxy_json};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const WORKLOAD_A2: &str = "ck_live_workloadA2A2A2A2A2A2A2A2A2A2A2A2A2A2A2A2A2A2A2";
const WORKLOAD_C: &str = "ck_live_workloadCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC";
const REPLY: &str = "Hello from the fake upstream, through the claudekey gateway.";

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this binary, at debug level (kube, hyper and rustls included).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(logs.clone());
        tracing_subscriber::fmt()
            .with_env_filter("debug,claudekey=trace")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        logs
    })
    .clone()
}

fn assert_no_keys_logged(keys: &[&str]) {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(
        text.contains("gateway config Secret loaded"),
        "the capture saw no gateway log at all"
    );
    for key in keys {
        assert!(!text.contains(key), "a key was logged");
    }
}

/// A CA and a serving certificate for 127.0.0.1 signed by it, as PEM.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "claudekey gateway CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = ca.pem();
        Self { ca, ca_pem }
    }

    /// A new leaf (cert PEM, key PEM, cert DER) for 127.0.0.1.
    fn leaf(&self) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// Replaces a file atomically, as a Secret volume update lands.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn tls_client(
    ca_pem: &str,
) -> HttpClient<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let config = claudekey::tls::client_config_trusting(ca_pem.as_bytes()).unwrap();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    HttpClient::builder(TokioExecutor::new()).build(https)
}

/// Status and body of a Messages request with `key` through `base`.
async fn call<C>(client: &HttpClient<C, Full<Bytes>>, base: &str, key: &str) -> (u16, String)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let body = message("hello", false).to_string();
    let request = http::Request::post(format!("{base}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(request).await.expect("request");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

/// Waits until `key` through `base` answers `status`.
async fn until_status<C>(
    client: &HttpClient<C, Full<Bytes>>,
    base: &str,
    key: &str,
    status: u16,
    what: &str,
) where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    support::eventually(WAIT, what, || async {
        (call(client, base, key).await.0 == status).then_some(())
    })
    .await;
}

/// The config Secret of ClaudeKey team-a/`name`, labelled as the controller labels it.
fn config_secret(name: &str, proxy_json: &str, labelled: bool) -> Secret {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(NAMESPACE_LABEL.to_string(), "team-a".to_string());
    if labelled {
        labels.insert(CONFIG_LABEL.to_string(), "gateway".to_string());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(config_secret_name("team-a", name)),
            labels: Some(labels),
            ..Default::default()
        },
        data: Some([("proxy.json".to_string(), ByteString(proxy_json.into()))].into()),
        ..Default::default()
    }
}

/// A gateway on HTTPS in front of the fake upstream, reading config Secrets of a fresh
/// operator namespace.
pub(crate) struct Gateway {
    fake: FakeUpstream,
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    secrets: Api<Secret>,
    /// The namespace whose config Secrets it serves (the operator namespace).
    namespace: String,
    pki: Pki,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Gateway {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, |_, _, _| {}).await
    }

    /// [`Gateway::start`], with the settings adjusted by `tweak` (given the client and the
    /// operator namespace) before the gateway starts.
    async fn start_with(
        prefix: &str,
        tweak: impl FnOnce(&mut ProxySettings, &kube::Client, &str),
    ) -> Self {
        logs();
        let client = support::client().await;
        let namespace = support::namespace(&client, prefix).await;
        let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
        fake.set_reply(FakeReply::Text(REPLY.into()));
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = pki.leaf();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        replace(&cert_path, &cert);
        replace(&key_path, &key);
        let mut settings = ProxySettings::new(dir.path().join("unused"), fake.url(), Mode::Gateway);
        settings.audit = AuditTarget::Memory(Arc::default());
        settings.config_secrets = Some(SecretsSource {
            client: client.clone(),
            namespace: namespace.clone(),
        });
        settings.tls = Some((cert_path, key_path));
        tweak(&mut settings, &client, &namespace);
        let proxy = Arc::new(Proxy::start(settings).expect("gateway starts"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = proxy.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        // Ready once the first list of config Secrets is in (none yet).
        support::eventually(WAIT, "the gateway's first list", || async {
            proxy.store.load().is_some().then_some(())
        })
        .await;
        Self {
            fake,
            proxy,
            addr,
            secrets: Api::namespaced(client, &namespace),
            namespace,
            pki,
            dir,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Replaces the `proxy.json` of ClaudeKey team-a/`name`'s config Secret, as the controller
    /// does when it rotates or changes the ClaudeKey.
    async fn rewrite_config(&self, name: &str, proxy_json: impl Into<Vec<u8>>) {
        let secret_name = config_secret_name("team-a", name);
        let mut secret = self.secrets.get(&secret_name).await.unwrap();
        secret.data = Some([("proxy.json".to_string(), ByteString(proxy_json.into()))].into());
        self.secrets
            .replace(&secret_name, &PostParams::default(), &secret)
            .await
            .unwrap();
    }

    /// The DER of the certificate a new TLS connection is served.
    async fn served_cert(&self) -> Vec<u8> {
        let config = claudekey::tls::client_config_trusting(self.pki.ca_pem.as_bytes()).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.expect("handshake");
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_config_secrets_over_reloading_tls() {
    let gw = Gateway::start("gw-secrets").await;
    let client = tls_client(&gw.pki.ca_pem);
    let base = gw.url();
    let pp = PostParams::default();

    // Two ClaudeKeys from two config Secrets; a third Secret without the label is ignored.
    let a = proxy_json(
        "bot",
        &[(UPSTREAM_A, None)],
        &[(WORKLOAD_A, None)],
        json!({}),
    );
    let b = proxy_json(
        "bot2",
        &[(UPSTREAM_A, None)],
        &[(WORKLOAD_B, None)],
        json!({}),
    );
    let c = proxy_json(
        "bot3",
        &[(UPSTREAM_A, None)],
        &[(WORKLOAD_C, None)],
        json!({}),
    );
    gw.secrets
        .create(&pp, &config_secret("bot", &a, true))
        .await
        .unwrap();
    gw.secrets
        .create(&pp, &config_secret("bot2", &b, true))
        .await
        .unwrap();
    gw.secrets
        .create(&pp, &config_secret("bot3", &c, false))
        .await
        .unwrap();
    until_status(&client, &base, WORKLOAD_A, 200, "ClaudeKey bot served").await;
    until_status(&client, &base, WORKLOAD_B, 200, "ClaudeKey bot2 served").await;
    let (status, body) = call(&client, &base, WORKLOAD_A).await;
    assert_eq!(status, 200);
    assert!(body.contains(REPLY), "{body}");
    assert_eq!(
        call(&client, &base, WORKLOAD_C).await.0,
        401,
        "unlabelled Secret served"
    );

    // Rotate bot's workload key: the new one is accepted, the old one until its grace ends.
    let until = (chrono::Utc::now() + chrono::Duration::seconds(4)).to_rfc3339();
    let rotated = proxy_json(
        "bot",
        &[(UPSTREAM_A, None)],
        &[(WORKLOAD_A2, None), (WORKLOAD_A, Some(until.as_str()))],
        json!({}),
    );
    gw.rewrite_config("bot", rotated).await;
    until_status(&client, &base, WORKLOAD_A2, 200, "the rotated key accepted").await;
    assert_eq!(
        call(&client, &base, WORKLOAD_A).await.0,
        200,
        "old key inside its grace"
    );
    until_status(
        &client,
        &base,
        WORKLOAD_A,
        401,
        "the old key refused after its grace",
    )
    .await;
    let (_, body) = call(&client, &base, WORKLOAD_A).await;
    assert!(body.contains("grace period has ended"), "{body}");
    assert_eq!(
        call(&client, &base, WORKLOAD_B).await.0,
        200,
        "bot2 untouched by bot's rotation"
    );

    // A broken update keeps the last good version.
    gw.rewrite_config("bot2", "{not json").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        call(&client, &base, WORKLOAD_B).await.0,
        200,
        "last good version kept"
    );

    // Deleting a config Secret removes its ClaudeKey.
    gw.secrets
        .delete(
            &config_secret_name("team-a", "bot2"),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    until_status(
        &client,
        &base,
        WORKLOAD_B,
        401,
        "bot2 removed with its Secret",
    )
    .await;
    assert_eq!(call(&client, &base, WORKLOAD_A2).await.0, 200);

    // New certificate files are served to new connections, without a restart.
    let old_cert = gw.served_cert().await;
    let (cert, key, der) = gw.pki.leaf();
    replace(&gw.dir.path().join("tls.key"), &key);
    replace(&gw.dir.path().join("tls.crt"), &cert);
    support::eventually(WAIT, "the new certificate served", || async {
        (gw.served_cert().await == der).then_some(())
    })
    .await;
    assert_ne!(old_cert, der);
    let fresh = tls_client(&gw.pki.ca_pem);
    assert_eq!(call(&fresh, &base, WORKLOAD_A2).await.0, 200);

    // The upstream saw the upstream key only; nothing logged any key.
    for r in gw.fake.received() {
        assert_eq!(r.header("x-api-key"), Some(UPSTREAM_A));
    }
    drop(gw.proxy);
    assert_no_keys_logged(&[UPSTREAM_A, WORKLOAD_A, WORKLOAD_A2, WORKLOAD_B, WORKLOAD_C]);
}

const SDK_SCRIPT: &str = r#"
import os, anthropic
c = anthropic.Anthropic(max_retries=0)
assert c.api_key == "claudekey-sidecar", c.api_key
m = c.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=64,
                      messages=[{"role": "user", "content": "Say hello."}])
with c.messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=64,
                       messages=[{"role": "user", "content": "Say hello."}]) as s:
    streamed = "".join(s.text_stream)
print("CREATE:" + m.content[0].text)
print("STREAM:" + streamed)
"#;

async fn run_sdk(forwarder: SocketAddr) -> (bool, String) {
    let python = std::env::var("CLAUDEKEY_TEST_PYTHON").expect(
        "CLAUDEKEY_TEST_PYTHON is not set: run hack/tools.sh and source the control plane's env file",
    );
    let output = tokio::process::Command::new(&python)
        .args(["-c", SDK_SCRIPT])
        .env("ANTHROPIC_BASE_URL", format!("http://{forwarder}"))
        .env("ANTHROPIC_API_KEY", "claudekey-sidecar")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .unwrap_or_else(|e| panic!("failed to run {python}: {e}"));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

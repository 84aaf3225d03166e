//! Helpers for the controller's cluster tests: an in-process controller per test namespace,
//! upstream-key Secrets, ClaudeKeys, reading back the owned Secrets, and a captured log buffer.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use claudekey::controller::{ControllerConfig, RunError, run_with};
use claudekey::crd::ClaudeKey;
use claudekey::keys::sha256_hex;
use claudekey::proxyconf::ProxyConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support;

/// Everything every controller in this test binary logged, at debug level.
pub fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("claudekey=debug,kube=info,info")
            .with_writer(move || BufWriter(writer.clone()))
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("install the log capture");
        buffer
    })
}

struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A client, the CRD, and a fresh namespace that is also the operator namespace.
pub async fn setup(prefix: &str) -> (Client, String) {
    log_buffer();
    claudekey::crypto::install_default_provider();
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::namespace(&client, prefix).await;
    (client, ns)
}

/// A controller running in-process as a task; `stop` is graceful, `crash` aborts the task.
pub struct Running {
    pub task: JoinHandle<Result<(), RunError>>,
    stop: Option<oneshot::Sender<()>>,
    pub metrics_port: Option<u16>,
}

impl Running {
    pub fn crash(self) {
        self.task.abort();
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(20), self.task).await;
        let result = result
            .expect("controller stops in time")
            .expect("controller task");
        result.expect("controller ends cleanly");
    }

    /// The controller's /metrics text (only when started with a metrics port).
    pub async fn metrics(&self) -> String {
        let port = self.metrics_port.expect("started with a metrics port");
        http_get(port, "/metrics").await.unwrap_or_default()
    }
}

/// The value of an unlabelled metric line, 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    series(text, name).unwrap_or(0.0)
}

/// The value of the metric line that starts with `series` (name, and labels if any).
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A plain HTTP/1.0 GET against the loopback admin port.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// A free loopback port for an admin listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The configuration tests use: namespace-scoped, no Lease unless a test asks for one.
pub fn config(ns: &str) -> ControllerConfig {
    let mut config = ControllerConfig::new(ns);
    config.watch_namespace = Some(ns.to_string());
    config.leader_election = None;
    config.identity = format!("test-{}", uuid::Uuid::new_v4().simple());
    config
}

/// Starts a controller with `config`.
pub fn start(client: &Client, config: ControllerConfig) -> Running {
    let (tx, rx) = oneshot::channel();
    let metrics_port = config.metrics_listen.map(|a| a.port());
    let task = tokio::spawn(run_with(client.clone(), config, async {
        let _ = rx.await;
    }));
    Running {
        task,
        stop: Some(tx),
        metrics_port,
    }
}

/// A realistic-looking upstream key that appears nowhere else.
pub fn upstream_key() -> String {
    format!(
        "sk-ant-api03-{}-{}AA",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Another upstream key with the same Admin API hint as `key` (prefix, three characters, last
/// four): the "hint matches two keys" case.
pub fn hint_twin(key: &str) -> String {
    let mut chars: Vec<char> = key.chars().collect();
    let middle = chars.len() / 2;
    chars[middle] = if chars[middle] == 'x' { 'y' } else { 'x' };
    let twin: String = chars.into_iter().collect();
    assert_eq!(
        claudekey::fake_upstream::partial_key_hint(&twin),
        claudekey::fake_upstream::partial_key_hint(key)
    );
    twin
}

/// Creates or replaces the upstream-key Secret `name` (data key `api-key`) in `ns`, labelled as
/// an upstream key the platform team granted to sources.
pub async fn put_upstream(client: &Client, ns: &str, name: &str, value: &str) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                "claudekey.io/upstream-key".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "api-key".to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    let body = serde_json::json!({ "apiVersion": "v1", "kind": "Secret", "metadata": secret.metadata, "data": secret.data });
    apply_secret(client, ns, name, &body).await;
}

/// Server-side applies Secret `ns/name` as the tests' field manager, taking over its fields.
pub async fn apply_secret(client: &kube::Client, ns: &str, name: &str, body: &serde_json::Value) {
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(body),
        )
        .await
        .unwrap_or_else(|e| panic!("write Secret {ns}/{name}: {e}"));
}

/// Applies a ClaudeKey whose spec is given as YAML (indented two spaces under `spec:`). A spec
/// with a backend inline under `source:` (and `anthropicAdmin:`) is moved into a
/// ClusterClaudeKeySource `<ns>.<name>` that allows exactly `ns` with placement namespace, and
/// the ClaudeKey refers to it: the tests of rotation and backends read as before.
pub async fn apply_claudekey(client: &Client, ns: &str, name: &str, spec_yaml: &str) {
    let yaml = format!(
        "apiVersion: claudekey.io/v1alpha2\nkind: ClaudeKey\nmetadata:\n  name: {name}\nspec:\n{spec_yaml}"
    );
    let mut value: serde_json::Value = serde_yaml::from_str(&yaml).expect("test ClaudeKey YAML");
    let spec = value["spec"].as_object_mut().expect("a spec");
    let admin = spec.remove("anthropicAdmin");
    if let Some(mut source) = spec.remove("source") {
        let source_name = format!("{ns}.{name}");
        let refresh = source.as_object_mut().unwrap().remove("refreshInterval");
        let mut source_spec = serde_json::json!({
            "allowedNamespaces": { "names": [ns] },
            "placement": "namespace",
            "refreshInterval": floor_refresh(refresh),
        });
        for (k, v) in source.as_object().unwrap() {
            source_spec[k] = v.clone();
        }
        if let Some(admin) = admin {
            source_spec["anthropicAdmin"] = admin;
        }
        apply_cluster_source(client, &source_name, source_spec).await;
        spec.insert(
            "sourceRef".into(),
            serde_json::json!({ "kind": "ClusterClaudeKeySource", "name": source_name }),
        );
    }
    apply_claudekey_value(client, ns, name, value).await;
}

/// The shortest refresh the schema allows, for specs that asked for less.
fn floor_refresh(asked: Option<serde_json::Value>) -> String {
    let asked = asked.and_then(|v| v.as_str().map(str::to_string));
    match asked.as_deref() {
        None | Some("1s") | Some("2s") | Some("5s") => "10s".to_string(),
        Some(other) => other.to_string(),
    }
}

/// Creates or replaces a ClusterClaudeKeySource with this spec (JSON).
pub async fn apply_cluster_source(client: &Client, name: &str, spec: serde_json::Value) {
    let value = serde_json::json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClusterClaudeKeySource",
        "metadata": { "name": name },
        "spec": spec,
    });
    Api::<claudekey::crd::ClusterClaudeKeySource>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&value),
        )
        .await
        .expect("apply ClusterClaudeKeySource");
}

/// Applies a ClaudeKey given as a whole JSON object.
pub async fn apply_claudekey_value(
    client: &Client,
    ns: &str,
    name: &str,
    value: serde_json::Value,
) {
    Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&value),
        )
        .await
        .expect("apply ClaudeKey");
}

/// Sets an annotation on the ClaudeKey (the rotate / revoke triggers).
pub async fn annotate(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
    Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate ClaudeKey");
}

/// The owned Secrets as the proxy and consumers see them.
pub struct Owned {
    pub client_secret: Secret,
    pub proxy_secret: Secret,
    pub workload_key: String,
    pub config: ProxyConfig,
}

impl Owned {
    pub fn workload_hashes(&self) -> Vec<String> {
        self.config
            .workload_keys
            .iter()
            .map(|k| k.sha256.clone())
            .collect()
    }
}

/// Reads both Secrets; `None` while either is missing.
pub async fn owned(client: &Client, ns: &str, name: &str) -> Option<Owned> {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let client_secret = api.get_opt(&format!("{name}-client")).await.ok()??;
    let proxy_secret = api.get_opt(&format!("{name}-proxy")).await.ok()??;
    let workload_key = String::from_utf8(
        client_secret
            .data
            .as_ref()?
            .get("ANTHROPIC_API_KEY")?
            .0
            .clone(),
    )
    .ok()?;
    let config = serde_json::from_slice(&proxy_secret.data.as_ref()?.get("proxy.json")?.0).ok()?;
    Some(Owned {
        client_secret,
        proxy_secret,
        workload_key,
        config,
    })
}

/// Waits until `check` holds for the ClaudeKey (status included) and returns it.
pub async fn wait_claudekey(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&ClaudeKey) -> bool,
) -> ClaudeKey {
    let api = Api::<ClaudeKey>::namespaced(client.clone(), ns);
    support::eventually(Duration::from_secs(30), what, || {
        let api = api.clone();
        let check = &check;
        async move {
            api.get_opt(name)
                .await
                .ok()
                .flatten()
                .filter(|ck| check(ck))
        }
    })
    .await
}

/// Waits until `check` holds for the owned Secrets, read at a moment when they agree (the
/// `-client` key is the current key in `proxy.json`: the controller writes `-client` first), and
/// returns them.
pub async fn wait_owned(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Owned) -> bool,
) -> Owned {
    support::eventually(Duration::from_secs(30), what, || {
        let check = &check;
        async move {
            owned(client, ns, name)
                .await
                .filter(|o| o.workload_hashes().first() == Some(&sha256_hex(&o.workload_key)))
                .filter(|o| check(o))
        }
    })
    .await
}

/// The status of condition `type_` ("True"/"False"), if present.
pub fn condition(ck: &ClaudeKey, type_: &str) -> Option<(String, String, String)> {
    ck.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn is_ready(ck: &ClaudeKey) -> bool {
    condition(ck, "Ready").is_some_and(|c| c.0 == "True")
}

pub fn fingerprint(ck: &ClaudeKey) -> Option<String> {
    Some(
        ck.status
            .as_ref()?
            .workload_key
            .as_ref()?
            .fingerprint
            .clone(),
    )
}

/// Fails when any captured log line, any Event in `ns`, or any ClaudeKey status contains one of
/// `secrets`.
pub async fn assert_no_leaks(client: &Client, ns: &str, secrets: &[String]) {
    use k8s_openapi::api::events::v1::Event;
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list Events");
    let events = serde_json::to_string(&events.items).unwrap();
    let statuses = Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list ClaudeKeys");
    let statuses =
        serde_json::to_string(&statuses.items.iter().map(|c| &c.status).collect::<Vec<_>>())
            .unwrap();
    let logs = logs();
    assert!(
        !events.is_empty() && logs.contains("workload key issued"),
        "nothing was captured to check"
    );
    for secret in secrets {
        assert!(secret.len() > 20, "checking a real key");
        let body = &secret[12..];
        assert!(!logs.contains(body), "a key appears in the controller logs");
        assert!(!events.contains(body), "a key appears in an Event");
        assert!(!statuses.contains(body), "a key appears in a status");
    }
}

pub const SPEC_FAST: &str = "  source:\n    kubernetesSecret: { name: upstream, key: api-key }\n    refreshInterval: 1s\n  rotation: { interval: 24h, gracePeriod: 3s }\n  scope: { models: [\"claude-haiku-*\"], maxTokens: 512 }\n";

/// Reasons of the Events recorded in `ns`.
pub async fn event_reasons(client: &kube::Client, ns: &str) -> Vec<String> {
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
    let list = events.list(&Default::default()).await.unwrap();
    list.items.into_iter().filter_map(|e| e.reason).collect()
}

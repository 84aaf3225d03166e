//! The webhook as the real kube-apiserver calls it: served in-process over TLS on a loopback
//! port with a fresh CA, registered with `url: https://127.0.0.1:<port>/…` and the caBundle,
//! scoped to a test namespace. Needs the test control plane (CLAUDEKEY_TEST_KUBECONFIG).

#[path = "webhook_e2e/certificates.rs"]
mod certificates;
mod node;
#[path = "webhook_e2e/placement.rs"]
mod placement;
mod support;
mod webhook_flood;
mod webhook_guards;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use claudekey::crd::ClaudeKey;
use claudekey::webhook::{self, Mode, SidecarConfig, WebhookConfig};

const IMAGE: &str = "registry.example/claudekey:e2e";
const WAIT: Duration = Duration::from_secs(60);

fn raw_key() -> String {
    format!(
        "sk-ant-api03-{}AA",
        "E2eTestKey_".repeat(9).chars().take(93).collect::<String>()
    )
}

/// A CA and a serving certificate for 127.0.0.1, as PEM.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn new_pki(cn: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, cn);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf cert");
    Pki {
        ca_pem: ca.pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// Writes cert and key the way a Secret volume update lands: each file replaced atomically.
fn install_pki(dir: &Path, pki: &Pki) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    for (path, text) in [(&key, &pki.key_pem), (&cert, &pki.cert_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write pem");
        std::fs::rename(&tmp, path).expect("rename pem");
    }
    (cert, key)
}

/// The chart's ValidatingWebhookConfiguration and MutatingWebhookConfiguration, as
/// `helm template` renders them with default values (needs CLAUDEKEY_TEST_HELM).
fn rendered_configurations() -> Vec<Value> {
    let helm = std::env::var("CLAUDEKEY_TEST_HELM").unwrap_or_else(|_| {
        panic!("CLAUDEKEY_TEST_HELM is not set: source the control plane's env file (hack/control-plane.sh)")
    });
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/claudekey");
    let out = std::process::Command::new(&helm)
        .args(["template", "claudekey"])
        .arg(&chart)
        .args([
            "-n",
            "claudekey-system",
            "--show-only",
            "templates/webhook-configurations.yaml",
        ])
        .output()
        .unwrap_or_else(|e| panic!("run {helm}: {e}"));
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let configs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("rendered YAML parses"))
        .filter(|d| {
            d["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("WebhookConfiguration"))
        })
        .collect();
    assert_eq!(configs.len(), 2, "the chart renders both configurations");
    configs
}

/// One webhook server, its registrations and its namespace.
struct Harness {
    client: Client,
    namespace: String,
    port: u16,
    dir: tempfile::TempDir,
    name: String,
    ca_pem: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    async fn start(mode: Mode, prefix: &str) -> Self {
        // Both ring and aws-lc-rs are compiled in (AWS SDK), so rustls needs to be told.
        claudekey::crypto::install_default_provider();
        let client = support::client().await;
        support::install_crd(&client).await;
        let namespace = support::namespace(&client, prefix).await;
        let (store, driver) = webhook::claudekey_cache(client.clone());
        tokio::spawn(driver);
        tokio::time::timeout(WAIT, store.wait_until_ready())
            .await
            .expect("cache ready in time")
            .expect("cache");

        let dir = tempfile::tempdir().expect("tempdir");
        let pki = new_pki("claudekey e2e CA 1");
        let (cert, key) = install_pki(dir.path(), &pki);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let config = WebhookConfig {
            mode,
            sidecar: SidecarConfig {
                image: IMAGE.to_string(),
                ..SidecarConfig::default()
            },
            tls_cert_file: cert,
            tls_key_file: key,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            webhook::serve(config, listener, Arc::new(store), async {
                let _ = rx.await;
            })
            .await
            .expect("webhook serves");
        });
        let harness = Self {
            client,
            name: format!("claudekey-e2e-{namespace}"),
            ca_pem: pki.ca_pem.clone(),
            namespace,
            port,
            dir,
            _shutdown: tx,
        };
        harness.register(&pki.ca_pem).await;
        harness.wait_until_called().await;
        harness
    }

    /// Server-side applies the chart's own webhook configurations (rendered by `helm template`,
    /// so this test and the chart cannot drift apart), pointed at this server and scoped to
    /// this namespace; re-running it swaps the caBundle.
    async fn register(&self, ca_pem: &str) {
        let pp = PatchParams::apply("claudekey-tests").force();
        for mut config in rendered_configurations() {
            let kind = config["kind"].as_str().expect("kind").to_string();
            for webhook in config["webhooks"].as_array_mut().expect("webhooks") {
                let path = webhook
                    .pointer("/clientConfig/service/path")
                    .and_then(Value::as_str)
                    .expect("the chart's webhooks call a service path")
                    .to_string();
                webhook["clientConfig"] = json!({
                    "url": format!("https://127.0.0.1:{}{path}", self.port),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
                });
                webhook["namespaceSelector"] =
                    json!({"matchLabels": {"kubernetes.io/metadata.name": self.namespace}});
                webhook["timeoutSeconds"] = json!(10);
            }
            config["metadata"] = json!({"name": self.name});
            match kind.as_str() {
                "MutatingWebhookConfiguration" => {
                    Api::<MutatingWebhookConfiguration>::all(self.client.clone())
                        .patch(&self.name, &pp, &Patch::Apply(&config))
                        .await
                        .expect("apply mutating webhook");
                }
                _ => {
                    Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
                        .patch(&self.name, &pp, &Patch::Apply(&config))
                        .await
                        .expect("apply validating webhook");
                }
            }
        }
    }

    /// The apiserver picks up webhook configurations asynchronously: wait until a dry-run
    /// create of an offending Deployment reaches our server (a denial in enforce mode, a
    /// warning in warn mode).
    async fn wait_until_called(&self) {
        let body = serde_json::to_vec(&deployment("probe", &raw_key())).expect("json");
        let path = format!("/apis/apps/v1/namespaces/{}/deployments", self.namespace);
        let client = self.client.clone();
        support::eventually(WAIT, "the apiserver to call the webhook", || {
            let dry = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            let request = kube::core::Request::new(path.clone())
                .create(&dry, body.clone())
                .expect("request");
            let client = client.clone();
            async move {
                let response = client
                    .send(request.map(kube::client::Body::from))
                    .await
                    .ok()?;
                let warned = response
                    .headers()
                    .get_all("warning")
                    .iter()
                    .any(|w| String::from_utf8_lossy(w.as_bytes()).contains("claudekey:"));
                let bytes = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .ok()?
                    .to_bytes();
                let denied = String::from_utf8_lossy(&bytes).contains("claudekey:");
                (warned || denied).then_some(())
            }
        })
        .await;
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates ClaudeKey `name` and, when given, sets `status.placement` as the controller does
    /// once its source is resolved (the webhook injects nothing before).
    async fn create_claudekey(&self, name: &str, placement: Option<&str>) {
        let ck: ClaudeKey = serde_json::from_value(json!({
            "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"sourceRef": {"kind": "ClusterClaudeKeySource", "name": "anthropic-bot"}},
        }))
        .expect("ClaudeKey");
        Api::<ClaudeKey>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &ck)
            .await
            .expect("create ClaudeKey");
        if let Some(placement) = placement {
            self.set_placement(name, placement).await;
        }
    }

    async fn set_placement(&self, name: &str, placement: &str) {
        Api::<ClaudeKey>::namespaced(self.client.clone(), &self.namespace)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"placement": placement}})),
            )
            .await
            .expect("set status.placement");
    }

    /// Deletes both configurations (as if no webhook were installed).
    async fn unregister(&self) {
        let dp = DeleteParams::default();
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
        let _ = Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
        // The apiserver drops them asynchronously too: wait until a bad dry run passes.
        let body = serde_json::to_vec(&deployment("probe", &raw_key())).expect("json");
        let path = format!("/apis/apps/v1/namespaces/{}/deployments", self.namespace);
        let client = self.client.clone();
        support::eventually(WAIT, "the apiserver to stop calling the webhook", || {
            let dry = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            let request = kube::core::Request::new(path.clone())
                .create(&dry, body.clone())
                .expect("request");
            let client = client.clone();
            async move {
                let response = client
                    .send(request.map(kube::client::Body::from))
                    .await
                    .ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
    }

    async fn cleanup(self) {
        let dp = DeleteParams::default();
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
        let _ = Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
    }
}

fn deployment(name: &str, key_value: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                {"name": "app", "image": "example/app:1", "env": [{"name": "ANTHROPIC_API_KEY", "value": key_value}]}
            ]}}
        }
    }))
    .expect("deployment")
}

fn inject_pod(name: &str, claudekey: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"claudekey.io/inject": claudekey}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1", "env": [
            {"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": {"name": "old", "key": "k"}}}
        ]}]}
    }))
    .expect("pod")
}

fn denial(result: Result<impl std::fmt::Debug, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[tokio::test]
async fn enforce_denies_raw_keys_and_injects_the_sidecar() {
    let h = Harness::start(Mode::Enforce, "wh-enforce").await;
    let pp = PostParams::default();

    let message = denial(
        h.deployments()
            .create(&pp, &deployment("leaky", &raw_key()))
            .await,
    );
    assert!(
        message.contains("claudekey: Deployment/leaky: container \"app\" env ANTHROPIC_API_KEY holds an Anthropic key (sk-ant-api03-…AA)"),
        "{message}"
    );
    assert!(message.contains("claudekey.io/inject"), "{message}");
    assert!(
        !message.contains(&raw_key()),
        "the denial leaks the key: {message}"
    );

    let clean = h
        .deployments()
        .create(&pp, &deployment("clean", "claudekey-sidecar"))
        .await
        .expect("clean Deployment admitted");
    assert_eq!(clean.metadata.name.as_deref(), Some("clean"));

    let message = denial(h.pods().create(&pp, &inject_pod("orphan", "missing")).await);
    assert!(
        message.contains(&format!(
            "ClaudeKey missing does not exist in namespace {}",
            h.namespace
        )),
        "{message}"
    );

    h.create_claudekey("bot", Some("namespace")).await;
    // The reflector sees the ClaudeKey a moment after the API does.
    let pods = h.pods();
    let pod = support::eventually(WAIT, "the webhook cache to see ClaudeKey bot", || {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &inject_pod("injected", "bot"))
                .await
                .ok()
        }
    })
    .await;
    let spec = pod.spec.expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(sidecar.name, "claudekey-proxy");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some(IMAGE));
    let startup = sidecar.startup_probe.as_ref().expect("a startupProbe");
    assert_eq!(
        startup.http_get.as_ref().and_then(|g| g.path.as_deref()),
        Some("/readyz"),
        "apps start once the proxy is ready"
    );
    let env: Vec<(String, Option<String>)> = spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert_eq!(
        env,
        [
            (
                "ANTHROPIC_API_KEY".to_string(),
                Some("claudekey-sidecar".to_string())
            ),
            (
                "ANTHROPIC_BASE_URL".to_string(),
                Some("http://127.0.0.1:8484".to_string())
            ),
        ]
    );
    let annotations = pod.metadata.annotations.expect("annotations");
    assert_eq!(
        annotations.get("claudekey.io/injected").map(String::as_str),
        Some("bot")
    );

    // Another container reading the proxy Secret is refused by the validating webhook.
    let snoop: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "snoop"},
        "spec": {"containers": [{"name": "snoop", "image": "x", "envFrom": [{"secretRef": {"name": "bot-proxy"}}]}]}
    }))
    .expect("pod");
    let message = denial(h.pods().create(&pp, &snoop).await);
    assert!(
        message.contains("envFrom loads Secret bot-proxy"),
        "{message}"
    );

    // `kubectl debug` adds ephemeral containers through a subresource: checked as well.
    let debug = json!({"spec": {"ephemeralContainers": [
        {"name": "debugger", "image": "busybox", "env": [{"name": "K", "value": raw_key()}]}
    ]}});
    let result = h
        .pods()
        .patch_subresource(
            "ephemeralcontainers",
            "injected",
            &PatchParams::default(),
            &Patch::Strategic(&debug),
        )
        .await;
    let message = denial(result);
    assert!(
        message.contains(
            "Pod/injected: ephemeral container \"debugger\" env K holds an Anthropic key"
        ),
        "{message}"
    );
    assert!(!message.contains(&raw_key()));

    let host: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "host", "annotations": {"claudekey.io/inject": "bot"}},
        "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "x"}]}
    }))
    .expect("pod");
    let message = denial(h.pods().create(&pp, &host).await);
    assert!(message.contains("hostNetwork"), "{message}");
    h.cleanup().await;
}

#[tokio::test]
async fn warn_mode_admits_with_warnings() {
    let h = Harness::start(Mode::Warn, "wh-warn").await;
    let body = serde_json::to_vec(&deployment("leaky", &raw_key())).expect("json");
    let request = kube::core::Request::new(format!(
        "/apis/apps/v1/namespaces/{}/deployments",
        h.namespace
    ))
    .create(&PostParams::default(), body)
    .expect("request");
    let response = h
        .client
        .send(request.map(kube::client::Body::from))
        .await
        .expect("apiserver answers");
    assert!(
        response.status().is_success(),
        "warn mode admits: {}",
        response.status()
    );
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Deployment/leaky") && w.contains("ANTHROPIC_API_KEY")),
        "{warnings:?}"
    );
    assert!(warnings.iter().all(|w| !w.contains(&raw_key())));
    h.cleanup().await;
}

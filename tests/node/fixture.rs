//! The one chart install every node test shares, and the fake upstream it points at.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;

use claudekey::fake_upstream::FakeUpstream;

/// The chart's release namespace, which is also the operator namespace upstream Secrets live in.
pub const OPERATOR_NS: &str = "ck-node";
pub const RELEASE: &str = "claudekey";

pub struct Fixture {
    pub upstream: FakeUpstream,
    pub install_time: Duration,
}

impl Fixture {
    /// A fresh upstream key the fake accepts (each test its own, so tests never share keys).
    pub fn new_upstream_key(&self) -> String {
        let key = format!("sk-ant-api03-node-{}-AA", uuid::Uuid::new_v4().simple());
        self.upstream.add_key(&key);
        key
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: the node tier needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start, as root) and its env file sourced")
    })
}

/// The fake Anthropic API on the node's bridge address, served by a runtime of its own that
/// outlives every test's runtime.
fn start_upstream(node_ip: &str) -> FakeUpstream {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = format!("{node_ip}:0");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let fake = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .unwrap_or_else(|e| panic!("bind the fake upstream on {addr}: {e}"));
            FakeUpstream::serve(listener, &[]).expect("serve")
        });
        tx.send(fake).expect("send");
        rt.block_on(std::future::pending::<()>());
    });
    rx.recv().expect("the fake upstream started")
}

/// Installs the chart once per test process (`helm upgrade --install --wait`) from the image the node imported.
pub fn installed() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let node_ip = env("CLAUDEKEY_TEST_NODE_IP");
        let image = env("CLAUDEKEY_TEST_IMAGE");
        let (repository, tag) = image.rsplit_once(':').expect("image has a tag");
        let upstream = start_upstream(&node_ip);
        let redis = node_redis();
        let start = Instant::now();
        let out = Command::new(env("CLAUDEKEY_TEST_HELM"))
            // `upgrade --install`: on the node tier's fresh node this installs; when single
            // tests are re-run by hand on a node kept running, it re-points the release at this
            // process's fake upstream instead of failing on the existing release.
            .args(["upgrade", "--install", RELEASE])
            .arg(env("CLAUDEKEY_TEST_CHART"))
            .args(["--kubeconfig", &env("CLAUDEKEY_TEST_KUBECONFIG")])
            .args([
                "-n",
                OPERATOR_NS,
                "--create-namespace",
                "--wait",
                "--timeout",
                "180s",
            ])
            .args(["--set", &format!("image.repository={repository}")])
            .args(["--set", &format!("image.tag={tag}")])
            .args(["--set", "image.pullPolicy=Never"])
            .args(["--set", &format!("upstreamURL={}", upstream.url())])
            .args(["--set", "logFormat=text"])
            .args(redis.iter().flat_map(|url| {
                [
                    format!("redis.url={url}"),
                    format!("redis.existingSecret={REDIS_SECRET}"),
                    "redis.sidecars=true".to_string(),
                ]
                .map(|set| ["--set".to_string(), set])
                .into_iter()
                .flatten()
            }))
            // Extra values for experiments by hand (e.g. a control run with a setting undone).
            .args(
                std::env::var("CLAUDEKEY_NODE_HELM_SET")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| vec!["--set".to_string(), v])
                    .unwrap_or_default(),
            )
            .output()
            .expect("run helm");
        if !out.status.success() {
            panic!(
                "helm upgrade --install --wait failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                diagnostics()
            );
        }
        Fixture {
            upstream,
            install_time: start.elapsed(),
        }
    })
}

/// The Secret of the Redis password in the release namespace (`redis.existingSecret`).
pub const REDIS_SECRET: &str = "claudekey-redis";

/// The node's Redis (hack/node.sh), with its password put where the chart reads it before the
/// install; `None` on a cluster without one (hack/e2e-cluster.sh), where shared-limits tests
/// fail.
fn node_redis() -> Option<String> {
    let url = std::env::var("CLAUDEKEY_TEST_NODE_REDIS_URL").ok()?;
    let password = env("CLAUDEKEY_TEST_NODE_REDIS_PASSWORD");
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": OPERATOR_NS } },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": { "name": REDIS_SECRET, "namespace": OPERATOR_NS },
                "stringData": { "password": password }
            }
        ]
    });
    let mut child = Command::new(env("CLAUDEKEY_TEST_KUBECTL"))
        .args(["--kubeconfig", &env("CLAUDEKEY_TEST_KUBECONFIG")])
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run kubectl");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        manifest.to_string().as_bytes(),
    )
    .expect("write the manifest");
    drop(child.stdin.take());
    assert!(
        child.wait().expect("kubectl").success(),
        "kubectl apply of the Redis password Secret failed"
    );
    Some(url)
}

/// What the pods of the release look like, for a failure message.
pub fn diagnostics() -> String {
    let out = Command::new(env("CLAUDEKEY_TEST_KUBECTL"))
        .args(["--kubeconfig", &env("CLAUDEKEY_TEST_KUBECONFIG")])
        .args(["get", "pods,events", "-A", "-o", "wide"])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(kubectl failed: {e})"),
    }
}

pub async fn node_client() -> Client {
    super::super::support::client().await
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A probe's port: a number, or the name of one of the container's ports.
pub fn resolve_port(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("{}: no port named {name}", c.name))
                .container_port
        }
    }
}

/// The HTTP status of a GET to a pod address (inside a network namespace the node created),
/// as the kubelet's probe sends it: TLS unverified.
pub fn curl_status(url: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            url,
        ])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

//! Which metric names the dashboard, the alert rules and the docs use, and which the binaries
//! really export: each role runs as the built `claudekey` binary (the controller against the
//! test apiserver) and its `/metrics` is scraped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `claudekey_*` name a text mentions (a trailing `_` is a prose wildcard, not a name).
fn names_in(text: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\bclaudekey_[a-z0-9_]*[a-z0-9]\b").expect("regex");
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

/// The files that name metrics for users, relative to the repository: the chart's dashboard and
/// rules (deploy/monitoring carries the same), deploy/monitoring, the READMEs and docs/.
pub fn users() -> Vec<PathBuf> {
    let mut files = vec![
        "charts/claudekey/files/grafana-dashboard.json".into(),
        "charts/claudekey/files/prometheus-rules.yaml".into(),
        "deploy/monitoring/prometheusrule.yaml".into(),
        "deploy/monitoring/grafana-dashboard.json".into(),
        "deploy/monitoring/alerts_test.yaml".into(),
        "deploy/monitoring/README.md".into(),
        "README.md".into(),
        "charts/claudekey/README.md".into(),
    ];
    let docs = std::fs::read_dir(root().join("docs")).expect("docs/");
    let mut md: Vec<PathBuf> = docs
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| p.strip_prefix(root()).expect("under root").to_path_buf())
        .collect();
    md.sort();
    files.extend(md);
    files
}

/// name -> the files that use it.
pub fn used() -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rel in users() {
        let text = std::fs::read_to_string(root().join(&rel))
            .unwrap_or_else(|e| panic!("read {}: {e}", rel.display()));
        for name in names_in(&text) {
            used.entry(name)
                .or_default()
                .insert(rel.display().to_string());
        }
    }
    used
}

/// The series names an OpenMetrics exposition can produce: from its `# TYPE` lines (so a
/// family with no series yet still counts) and from its samples.
pub fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// A role running as the real binary, killed on drop.
pub struct Role {
    pub name: &'static str,
    child: Child,
    metrics_port: u16,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn spawn(name: &'static str, args: &[String], dir: &Path, metrics_port: u16) -> Role {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_claudekey"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Role {
        name,
        child,
        metrics_port,
    }
}

/// Ports and fixtures of the running roles.
pub struct Roles {
    pub roles: Vec<Role>,
    pub webhook_port: u16,
    pub proxy_port: u16,
    /// Kept alive while the proxy forwards to it.
    #[allow(dead_code)]
    pub upstream: claudekey::fake_upstream::FakeUpstream,
}

/// A key the fake upstream accepts; shaped like a real one, valid nowhere else.
const UPSTREAM_KEY: &str = "sk-ant-api03-metricnamesAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The controller (against the apiserver of KUBECONFIG, reconciling only `team`, with `ops`
/// as its operator namespace), the webhook (with a throwaway certificate) and the proxy (sidecar
/// mode, forwarding to an in-process fake Anthropic API), each on free loopback ports.
pub async fn start_roles(dir: &Path, ops: &str, team: &str) -> Roles {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).expect("write key");
    let upstream = claudekey::fake_upstream::FakeUpstream::start(&[UPSTREAM_KEY])
        .await
        .expect("fake upstream");
    let proxy_dir = dir.join("proxy");
    std::fs::create_dir_all(&proxy_dir).expect("proxy dir");
    let policy = serde_json::json!({
        "scope": { "models": ["claude-haiku-*"] },
        "limits": { "requestsPerMinute": 1 },
    });
    let config = serde_json::json!({
        "claudeKey": { "namespace": "team-a", "name": "metrics" },
        "upstream": [{ "key": UPSTREAM_KEY, "fingerprint": "up:00000000", "validUntil": null }],
        "workloadKeys": [],
        "policy": policy,
    });
    std::fs::write(proxy_dir.join("proxy.json"), config.to_string()).expect("proxy.json");
    let path = |f: &str| dir.join(f).display().to_string();
    let (c, w, p) = (free_port(), free_port(), free_port());
    let (webhook_port, proxy_port) = (free_port(), free_port());
    let roles = vec![
        spawn(
            "controller",
            &[
                "controller".into(),
                format!("--namespace={ops}"),
                format!("--watch-namespace={team}"),
                format!("--metrics-listen=127.0.0.1:{c}"),
                "--leader-election=false".into(),
                "--usage-interval=0s".into(),
            ],
            dir,
            c,
        ),
        spawn(
            "webhook",
            &[
                "webhook".into(),
                format!("--listen=127.0.0.1:{webhook_port}"),
                format!("--tls-cert-file={}", path("tls.crt")),
                format!("--tls-key-file={}", path("tls.key")),
                "--proxy-image=example.invalid/claudekey:test".into(),
                format!("--metrics-listen=127.0.0.1:{w}"),
            ],
            dir,
            w,
        ),
        spawn(
            "proxy",
            &[
                "proxy".into(),
                "--mode=sidecar".into(),
                format!("--config-dir={}", path("proxy")),
                format!("--listen=127.0.0.1:{proxy_port}"),
                format!("--upstream={}", upstream.url()),
                format!("--metrics-listen=127.0.0.1:{p}"),
            ],
            dir,
            p,
        ),
    ];
    Roles {
        roles,
        webhook_port,
        proxy_port,
        upstream,
    }
}

/// Two Messages calls through the proxy: one answered, one over the 1-per-minute limit.
pub async fn drive_proxy(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let until = Instant::now() + Duration::from_secs(30);
        let response = loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let request = format!(
                    "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                     anthropic-version: 2023-06-01\r\nx-api-key: claudekey-sidecar\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let mut response = String::new();
                if s.write_all(request.as_bytes()).await.is_ok()
                    && s.read_to_string(&mut response).await.is_ok()
                    && !response.starts_with("HTTP/1.1 503")
                {
                    break response;
                }
            }
            assert!(Instant::now() < until, "the proxy never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        statuses.push(response.get(9..12).unwrap_or_default().to_string());
    }
    assert_eq!(statuses, ["200", "429"], "one answered, one rate-limited");
}

/// One AdmissionReview the webhook cannot read, over HTTPS.
pub async fn drive_webhook(port: u16, ca_pem: &str) {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector
                .connect(name, tcp)
                .await
                .expect("TLS to the webhook");
            let body = "not an AdmissionReview";
            let request = format!(
                "POST /validate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(request.as_bytes()).await.expect("write");
            let mut out = String::new();
            let _ = tls.read_to_string(&mut out).await;
            assert!(out.starts_with("HTTP/1.1"), "webhook answered {out:?}");
            return;
        }
        assert!(Instant::now() < until, "the webhook never listened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs every CRD `claudekey crd` prints and makes a ClaudeKey in `team` Ready through the
/// running controller binary: on a kubernetesSecret source in `ops`, in whichever API this
/// branch speaks (the first one, or v1alpha2's ClusterClaudeKeySource with placement namespace).
pub async fn drive_controller(client: &kube::Client, ops: &str, team: &str) {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{
        Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = claudekey::crd::crd_yaml();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let Ok(crd) = <CustomResourceDefinition as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        let name = crd.metadata.name.clone().expect("CRD name");
        crds.patch(
            &name,
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let established = crds
                .get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .is_some_and(|s| {
                    s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            assert!(Instant::now() < until, "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let v2 = text.contains("kind: ClusterClaudeKeySource");
    let mut secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "metrics-upstream", "labels": { "claudekey.io/upstream-key": "true" } },
        "stringData": { "api-key": UPSTREAM_KEY },
    }))
    .expect("secret");
    secret.metadata.namespace = Some(ops.to_string());
    Api::<Secret>::namespaced(client.clone(), ops)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the upstream Secret");
    let version = if v2 { "v1alpha2" } else { "v1alpha1" };
    let resource = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("claudekey.io", version, kind),
            plural,
        )
    };
    let source =
        serde_json::json!({ "kubernetesSecret": { "name": "metrics-upstream", "key": "api-key" } });
    let spec = if v2 {
        let ar = resource("ClusterClaudeKeySource", "clusterclaudekeysources");
        let name = format!("metrics-{team}");
        let mut spec = source.clone();
        spec["allowedNamespaces"] = serde_json::json!({ "names": [team] });
        spec["placement"] = serde_json::json!("namespace");
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": format!("claudekey.io/{version}"), "kind": "ClusterClaudeKeySource",
            "metadata": { "name": name }, "spec": spec,
        }))
        .expect("source");
        Api::<DynamicObject>::all_with(client.clone(), &ar)
            .create(&PostParams::default(), &obj)
            .await
            .expect("create the ClusterClaudeKeySource");
        serde_json::json!({ "sourceRef": { "kind": "ClusterClaudeKeySource", "name": name } })
    } else {
        serde_json::json!({ "source": source })
    };
    let mut spec = spec;
    spec["scope"] = serde_json::json!({ "models": ["claude-haiku-*"] });
    let ar = resource("ClaudeKey", "claudekeys");
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": format!("claudekey.io/{version}"), "kind": "ClaudeKey",
        "metadata": { "name": "metrics", "namespace": team }, "spec": spec,
    }))
    .expect("ClaudeKey");
    Api::<DynamicObject>::namespaced_with(client.clone(), team, &ar)
        .create(&PostParams::default(), &obj)
        .await
        .expect("create the ClaudeKey");
}

/// Names that appear only after events a short test cannot cause (an apiserver error during a
/// reconcile; Anthropic's usage report or a retirement through the Admin API; a live retired
/// key). Each must still be registered by the file named here, so a dashboard query renamed to
/// a name nobody exports still fails.
pub const EVENT_ONLY: &[(&str, &str, &str)] = &[
    // Only for ClaudeKeys with spec.limits.budget.
    (
        "claudekey_proxy_spend_usd",
        "src/proxy/limits/metrics.rs",
        "\"spend_usd\"",
    ),
    (
        "claudekey_proxy_budget_usd",
        "src/proxy/limits/metrics.rs",
        "\"budget_usd\"",
    ),
    // Only once a federation source's token was exchanged (tests/federation scrape it).
    (
        "claudekey_proxy_federation_exchanges_total",
        "src/proxy/metrics.rs",
        "\"federation_exchanges\"",
    ),
    (
        "claudekey_reconcile_errors_total",
        "src/controller/metrics.rs",
        "\"reconcile_errors\"",
    ),
    (
        "claudekey_upstream_usage_tokens",
        "src/admin/usage.rs",
        "\"upstream_usage_tokens\"",
    ),
    (
        "claudekey_upstream_cost_usd_estimate",
        "src/admin/usage.rs",
        "\"upstream_cost_usd_estimate\"",
    ),
    (
        "claudekey_upstream_usage_polls_total",
        "src/admin/usage.rs",
        "\"upstream_usage_polls\"",
    ),
    (
        "claudekey_upstream_retirements_total",
        "src/admin/metrics.rs",
        "\"upstream_retirements\"",
    ),
    (
        "claudekey_revocation_drills_total",
        "src/admin/metrics.rs",
        "\"revocation_drills\"",
    ),
    (
        "claudekey_retired_key_live",
        "src/admin/metrics.rs",
        "\"retired_key_live\"",
    ),
    (
        "claudekey_proxy_user_window_overflow_total",
        "src/proxy/metrics.rs",
        "\"user_window_overflow\"",
    ),
];

/// GET /metrics of a role, waiting up to 60 s for it to answer 200.
pub async fn scrape(role: &mut Role, dir: &Path) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = role.child.try_wait() {
            let log =
                std::fs::read_to_string(dir.join(format!("{}.log", role.name))).unwrap_or_default();
            panic!(
                "{} exited ({status}) before serving /metrics:\n{log}",
                role.name
            );
        }
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", role.metrics_port)).await {
            let request = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
            let mut response = String::new();
            let answered = s.write_all(request.as_bytes()).await.is_ok()
                && s.read_to_string(&mut response).await.is_ok();
            if answered
                && (response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
            {
                return response;
            }
        }
        assert!(
            Instant::now() < until,
            "{} does not serve /metrics on 127.0.0.1:{}",
            role.name,
            role.metrics_port
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_lines_name_their_series() {
        let text = "# TYPE claudekey_a counter\n# TYPE claudekey_b_seconds histogram\n\
                    # TYPE claudekey_c gauge\nclaudekey_c{x=\"1\"} 2\n";
        let got = exported(text);
        for want in [
            "claudekey_a_total",
            "claudekey_b_seconds_bucket",
            "claudekey_b_seconds_count",
            "claudekey_c",
        ] {
            assert!(got.contains(want), "{got:?} lacks {want}");
        }
        assert!(
            !got.contains("claudekey_a"),
            "a counter's series end in _total"
        );
        assert_eq!(
            names_in("see `claudekey_upstream_*` and claudekey_x_total{a=\"b\"}"),
            BTreeSet::from(["claudekey_x_total".to_string()])
        );
    }
}

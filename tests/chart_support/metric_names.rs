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

/// The controller (against the apiserver of KUBECONFIG), the webhook (with a throwaway
/// certificate) and the proxy, each on free loopback ports.
pub fn start_roles(dir: &Path) -> Vec<Role> {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: source the control plane's env file (hack/control-plane.sh)"
    );
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).expect("write key");
    std::fs::create_dir_all(dir.join("proxy")).expect("proxy dir");
    let path = |f: &str| dir.join(f).display().to_string();
    let (c, w, p) = (free_port(), free_port(), free_port());
    vec![
        spawn(
            "controller",
            &[
                "controller".into(),
                "--namespace=default".into(),
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
                format!("--listen=127.0.0.1:{}", free_port()),
                format!("--tls-cert-file={}", path("tls.crt")),
                format!("--tls-key-file={}", path("tls.key")),
                format!("--metrics-listen=127.0.0.1:{w}"),
            ],
            dir,
            w,
        ),
        spawn(
            "proxy",
            &[
                "proxy".into(),
                format!("--config-dir={}", path("proxy")),
                format!("--listen=127.0.0.1:{}", free_port()),
                "--upstream=http://127.0.0.1:9".into(),
                format!("--metrics-listen=127.0.0.1:{p}"),
            ],
            dir,
            p,
        ),
    ]
}

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

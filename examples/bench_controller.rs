//! Controller scale benchmark for `hack/bench.sh` (issue 9, row 5): applies `--count`
//! ClaudeKeys at once to the real kube-apiserver (KUBECONFIG) while a `claudekey controller`
//! process (started by the script) reconciles them, and prints one JSON object:
//! `{"count":…,"apply_s":…,"ready_s":…,"api_requests":…,"reconciles":…}`.
//!
//! - `ready_s`: from the first create until every ClaudeKey has `Ready=True` (seen through one
//!   watch, so polling adds no load).
//! - `api_requests`: the apiserver's `apiserver_request_total` growth over the run minus this
//!   client's own requests (creates, the watch, the two metric reads): what the controller
//!   asked for. With `reconciles` (from the controller's `/metrics`) it gives requests per
//!   reconcile.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource, condition};

#[derive(Parser)]
#[command(
    about = "Time until N ClaudeKeys applied at once are Ready, and API requests per reconcile"
)]
struct Args {
    /// The controller's operator namespace (the upstream-key Secret is created there).
    #[arg(long)]
    operator_namespace: String,
    /// The controller's metrics URL, e.g. http://127.0.0.1:9090/metrics.
    #[arg(long)]
    controller_metrics: String,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Spread over this many namespaces.
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value = "300s")]
    timeout: humantime::Duration,
    /// Leave the ClaudeKeys, their namespaces and the upstream key in place (a gateway
    /// benchmark serves them); the namespaces are printed as `kept`.
    #[arg(long)]
    keep: bool,
    /// A gateway serving the operator namespace's config Secrets: once all are Ready, rotate the
    /// first ClaudeKey and time how long after its new key is written the gateway accepts it.
    #[arg(long)]
    gateway: Option<String>,
}

const LABEL: &str = "claudekey.io/bench";

fn ready(ck: &ClaudeKey) -> bool {
    ck.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.status == "True")
    })
}

/// Sum of every series of `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `apiserver_request_total` by `verb resource[/subresource]`, summed over the other labels.
async fn apiserver_requests(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut by_kind = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
        let kind = match sub.as_str() {
            "" => format!("{verb} {resource}"),
            _ => format!("{verb} {resource}/{sub}"),
        };
        *by_kind.entry(kind).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(by_kind)
}

/// What grew between two readings, largest first, without the kinds that did not move.
fn growth(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut grown: Vec<(String, f64)> = after
        .iter()
        .map(|(kind, a)| (kind.clone(), a - before.get(kind).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1));
    grown
}

async fn controller_reconciles(url: &str) -> anyhow::Result<f64> {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let response = client.get(url.parse()?).await?;
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await?
        .to_bytes();
    Ok(metric_sum(
        &String::from_utf8_lossy(&body),
        "claudekey_reconciles_total",
    ))
}

/// Rotates `name` (annotation `claudekey.io/rotate`), waits for its `-client` Secret to carry a
/// new key, then asks the gateway with that key every 10 ms: the seconds from the new key being
/// written (as this client saw it) until the gateway's first 200.
async fn gateway_change(
    client: &Client,
    gateway: &str,
    ns: &str,
    name: &str,
) -> anyhow::Result<f64> {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let key_of = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get("ANTHROPIC_API_KEY"))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let client_secret = format!("{name}-client");
    let old =
        key_of(&secrets.get(&client_secret).await?).context("no key in the -client Secret")?;
    let patch = json!({ "metadata": { "annotations": { "claudekey.io/rotate": uuid::Uuid::new_v4().to_string() } } });
    Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let new = loop {
        if let Some(key) = key_of(&secrets.get(&client_secret).await?)
            && key != old
        {
            break key;
        }
        if Instant::now() > deadline {
            bail!("{ns}/{name} was not rotated within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let written = Instant::now();
    let http: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    loop {
        let request = http::Request::post(format!("{gateway}/v1/messages"))
            .header("x-api-key", &new)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                body.as_bytes(),
            )))?;
        if http
            .request(request)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(written.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("the gateway did not accept the new key of {ns}/{name} within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn claudekey(name: &str) -> anyhow::Result<ClaudeKey> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
        "metadata": { "name": name, "labels": { LABEL: "1" } },
        "spec": {
            "sourceRef": { "kind": "ClusterClaudeKeySource", "name": "bench" },
            "scope": { "models": ["claude-haiku-*"], "maxTokens": 1024 },
        }
    }))?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    claudekey::crypto::install_default_provider();
    let client = Client::try_default().await.context("KUBECONFIG")?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
    let namespaces: Vec<String> = (0..args.namespaces)
        .map(|i| format!("bench-{run}-{i}"))
        .collect();
    for ns in &namespaces {
        let body: Namespace = serde_json::from_value(
            json!({ "metadata": { "name": ns, "labels": { LABEL: "1" } } }),
        )?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &body)
            .await?;
    }
    let source: ClusterClaudeKeySource = serde_json::from_value(json!({
        "metadata": { "name": "bench" },
        "spec": {
            "kubernetesSecret": { "name": "bench-upstream", "key": "api-key" },
            "allowedNamespaces": { "selector": { "matchLabels": { LABEL: "1" } } },
        },
    }))?;
    let sources = Api::<ClusterClaudeKeySource>::all(client.clone());
    // Kept from an earlier run (`--keep`): its ClaudeKeys keep using it, unchanged.
    if sources.get_opt("bench").await?.is_none() {
        sources.create(&PostParams::default(), &source).await?;
    }
    let upstream: Secret = serde_json::from_value(json!({
        "metadata": { "name": "bench-upstream", "labels": { "claudekey.io/upstream-key": "true" } },
        "stringData": { "api-key": format!("sk-ant-api03-{}AA", "BenchUpstream_".repeat(7)) },
    }))?;
    let secrets = Api::<Secret>::namespaced(client.clone(), &args.operator_namespace);
    if secrets.get_opt("bench-upstream").await?.is_none() {
        secrets.create(&PostParams::default(), &upstream).await?;
    }

    // Everything above is set-up; the counters start here.
    let requests_before = apiserver_requests(&client).await?;
    let reconciles_before = controller_reconciles(&args.controller_metrics).await?;
    let all = Api::<ClaudeKey>::all(client.clone());
    let watch = watcher(
        all,
        watcher::Config::default().labels(&format!("{LABEL}=1")),
    )
    .applied_objects()
    .try_filter(|ck| futures::future::ready(ready(ck)))
    .map_ok(|ck| format!("{}/{}", ck.namespace().unwrap_or_default(), ck.name_any()));
    let mut watch = Box::pin(watch);

    let start = Instant::now();
    let names: Vec<(String, String)> = (0..args.count)
        .map(|i| {
            (
                namespaces[i % namespaces.len()].clone(),
                format!("ck-{i:04}"),
            )
        })
        .collect();
    stream::iter(names.iter().cloned())
        .map(|(ns, name)| {
            let client = client.clone();
            async move {
                Api::<ClaudeKey>::namespaced(client, &ns)
                    .create(&PostParams::default(), &claudekey(&name)?)
                    .await
                    .with_context(|| format!("create {ns}/{name}"))
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let apply_s = start.elapsed().as_secs_f64();

    let mut seen = HashSet::new();
    let deadline = start + *args.timeout;
    while seen.len() < args.count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Ok(Some(Ok(id))) if namespaces.iter().any(|n| id.starts_with(&format!("{n}/"))) => {
                seen.insert(id);
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => eprintln!("watch: {e}"),
            Ok(None) => bail!("the watch ended"),
            Err(_) => bail!(
                "only {} of {} ClaudeKeys Ready after {}",
                seen.len(),
                args.count,
                args.timeout
            ),
        }
    }
    let ready_s = start.elapsed().as_secs_f64();
    drop(watch);
    // Let the last status writes and Events land before reading the counters.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests_after = apiserver_requests(&client).await?;
    let reconciles_after = controller_reconciles(&args.controller_metrics).await?;
    // Our own: the creates, one list + watch, and the metrics read that ends the window.
    let own = args.count as f64 + 2.0 + 1.0;
    let gateway_change_s = match &args.gateway {
        Some(url) => Some(gateway_change(&client, url, &namespaces[0], "ck-0000").await?),
        None => None,
    };
    let grown = growth(&requests_before, &requests_after);
    let api_requests = grown.iter().map(|(_, d)| d).sum::<f64>() - own;
    let per_claudekey: serde_json::Map<String, serde_json::Value> = grown
        .iter()
        .map(|(kind, d)| {
            let per = (d / args.count as f64 * 100.0).round() / 100.0;
            (kind.clone(), json!(per))
        })
        .collect();
    let reconciles = reconciles_after - reconciles_before;
    println!(
        "{}",
        json!({
            "count": args.count,
            "namespaces": args.namespaces,
            "apply_s": apply_s,
            "ready_s": ready_s,
            "api_requests": api_requests,
            "reconciles": reconciles,
            "per_claudekey_by_kind": per_claudekey,
            "gateway_change_s": gateway_change_s,
            "kept": if args.keep { json!(namespaces) } else { json!(null) },
        })
    );
    if args.keep {
        return Ok(());
    }
    for ns in &namespaces {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::background())
            .await;
    }
    let _ = secrets
        .delete("bench-upstream", &DeleteParams::default())
        .await;
    Ok(())
}

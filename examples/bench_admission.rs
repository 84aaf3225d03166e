//! Admission benchmark client for `hack/bench.sh`: the latency of creating a 10-container
//! Deployment through the real kube-apiserver (KUBECONFIG), without and with claudekey's
//! webhooks registered, in alternating rounds. Prints `{"without_ms":[…],"with_ms":[…]}`.
//!
//! The webhook server is already running (`claudekey webhook` at `--webhook`, serving a
//! certificate signed by `--ca-file`); this client only registers it, scoped to a throwaway
//! namespace, and removes the registration and the namespace when done. Deployments have
//! `replicas: 0` so the controller-manager creates no pods behind the measurement's back.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Deployment create latency with and without claudekey's admission webhooks")]
struct Args {
    /// Base URL of the running webhook, e.g. https://127.0.0.1:8443.
    #[arg(long)]
    webhook: String,
    /// PEM CA that signed the webhook's serving certificate (becomes the caBundle).
    #[arg(long)]
    ca_file: std::path::PathBuf,
    /// Creates per round and case.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Rounds; each measures without, then with the webhooks.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const WAIT: Duration = Duration::from_secs(60);

fn deployment(name: &str, key_value: &str) -> anyhow::Result<Deployment> {
    let containers: Vec<Value> = (0..10)
        .map(|i| {
            json!({
                "name": format!("c{i}"), "image": "example/app:1",
                "args": ["--model", "claude-sonnet-4-5"],
                "env": [
                    {"name": "ANTHROPIC_API_KEY", "value": key_value},
                    {"name": "LOG_LEVEL", "value": "debug"},
                    {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
                ]
            })
        })
        .collect();
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}
        }
    }))?)
}

fn raw_key() -> String {
    format!("sk-ant-api03-{}AA", &"BenchKey_".repeat(11)[..93])
}

struct Bench {
    client: Client,
    namespace: String,
    name: String,
    webhook: String,
    ca_pem: String,
}

impl Bench {
    fn hook(&self, path: &str) -> Value {
        json!({
            "clientConfig": {
                "url": format!("{}/{path}", self.webhook.trim_end_matches('/')),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
            },
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
        })
    }

    /// The same registrations as the Helm chart's, scoped to the bench namespace.
    async fn register(&self) -> anyhow::Result<()> {
        let mut mutating = self.hook("mutate");
        mutating["name"] = json!("inject.claudekey.io");
        mutating["reinvocationPolicy"] = json!("Never");
        mutating["rules"] = json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]);
        let mut validating = self.hook("validate");
        validating["name"] = json!("keys.claudekey.io");
        validating["rules"] = json!([
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["pods", "pods/ephemeralcontainers"]},
            {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"]},
            {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["jobs", "cronjobs"]},
        ]);
        let pp = PatchParams::apply("claudekey-bench").force();
        let m = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration", "metadata": {"name": self.name}, "webhooks": [mutating]});
        Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .patch(&self.name, &pp, &Patch::Apply(&m))
            .await
            .context("failed to register the mutating webhook")?;
        let v = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration", "metadata": {"name": self.name}, "webhooks": [validating]});
        Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .patch(&self.name, &pp, &Patch::Apply(&v))
            .await
            .context("failed to register the validating webhook")?;
        self.wait_for_webhooks(true).await
    }

    async fn unregister(&self) -> anyhow::Result<()> {
        let dp = DeleteParams::default();
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
        let _ = Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
        self.wait_for_webhooks(false).await
    }

    /// The apiserver applies registrations asynchronously: probe with a dry-run create of a
    /// Deployment carrying a raw key until it is denied (registered) or admitted (not).
    async fn wait_for_webhooks(&self, active: bool) -> anyhow::Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let probe = deployment("probe", &raw_key())?;
        let deadline = Instant::now() + WAIT;
        loop {
            let denied = api.create(&dry, &probe).await.is_err();
            if denied == active {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the apiserver did not pick up the webhook change in {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates `count` clean Deployments one after another; milliseconds each.
    async fn creates(&self, label: &str, round: usize, count: usize) -> anyhow::Result<Vec<f64>> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let d = deployment(&format!("{label}-{round}-{i}"), "claudekey-sidecar")?;
            let start = Instant::now();
            api.create(&PostParams::default(), &d)
                .await
                .with_context(|| format!("failed to create Deployment {label}-{round}-{i}"))?;
            out.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(out)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    claudekey::crypto::install_default_provider();
    let args = Args::parse();
    if !args.webhook.starts_with("https://127.") {
        bail!("--webhook must be a loopback https URL");
    }
    let client = Client::try_default()
        .await
        .context("failed to build a client from KUBECONFIG")?;
    let namespace = format!(
        "claudekey-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .context("failed to create the bench namespace")?;
    let bench = Bench {
        client: client.clone(),
        name: namespace.clone(),
        namespace: namespace.clone(),
        webhook: args.webhook.clone(),
        ca_pem: std::fs::read_to_string(&args.ca_file).context("failed to read --ca-file")?,
    };
    let result = async {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        // Warm the apiserver's paths once for each case before measuring.
        bench.creates("warm-off", 0, 2).await?;
        for round in 1..=args.rounds {
            bench.unregister().await?;
            without.extend(bench.creates("off", round, args.count).await?);
            bench.register().await?;
            if round == 1 {
                bench.creates("warm-on", 0, 2).await?;
            }
            with.extend(bench.creates("on", round, args.count).await?);
        }
        anyhow::Ok((without, with))
    }
    .await;
    let _ = bench.unregister().await;
    let _ = Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await;
    let (without, with) = result?;
    println!("{}", json!({"without_ms": without, "with_ms": with}));
    Ok(())
}

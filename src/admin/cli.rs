//! `claudekey revoke` (the breach playbook in one command) and `claudekey drill` (is the
//! retired upstream key really dead?). Both talk to the cluster with the user's kubeconfig.

use std::{process::ExitCode, time::Duration};

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::events::{Recorder, Reporter},
};
use secrecy::SecretString;

use super::retire::{CONDITION_RETIRED_KEY_LIVE, DrillResult, admin_client_for, probe_key, retire};
use crate::crd::{
    AnthropicAdminSpec, ClaudeKey, ClusterClaudeKeySource, SourceKind, annotations,
    gateway_config_secret_name, proxy_secret_name,
};
use crate::events;
use crate::keys::masked_hint;
use crate::proxyconf::{FILE_NAME, ProxyConfig};

/// Flags shared by revoke and drill.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The ClaudeKey's name.
    pub name: String,
    /// The ClaudeKey's namespace (default: the kubeconfig's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Base URL of the Anthropic API (tests point it at the fake upstream).
    #[arg(
        long,
        env = "CLAUDEKEY_ANTHROPIC_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_url: String,
    /// Namespace of the claudekey operator, where the admin-key Secret lives.
    #[arg(
        long,
        env = "CLAUDEKEY_OPERATOR_NAMESPACE",
        default_value = "claudekey"
    )]
    pub operator_namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub common: Common,
    /// How long to wait for the controller to replace the workload key.
    #[arg(long, default_value = "2m", value_parser = humantime_secs)]
    pub timeout: Duration,
}

#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    pub common: Common,
    /// Read the retired key from stdin instead of the `-proxy` Secret's previous entry.
    #[arg(long)]
    pub key_stdin: bool,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.parse::<crate::crd::GoDuration>()
        .map(|d| d.as_duration())
        .map_err(|e| e.to_string())
}

/// Exit codes: 0 ok, 1 error, 2 timed out / upstream not retired, 3 retired key LIVE, 4 no verdict.
const EXIT_NOT_RETIRED: u8 = 2;
const EXIT_KEY_LIVE: u8 = 3;
const EXIT_INCONCLUSIVE: u8 = 4;

async fn setup(common: &Common) -> anyhow::Result<(Client, Api<ClaudeKey>, ClaudeKey, String)> {
    let client = Client::try_default().await?;
    let ns = common
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<ClaudeKey> = Api::namespaced(client.clone(), &ns);
    let ck = api.get(&common.name).await?;
    Ok((client, api, ck, ns))
}

/// Upstream keys in the ClaudeKey's `proxy.json` (its `-proxy` Secret, or its gateway config
/// Secret in the operator namespace) that are no longer current (the replaced ones).
async fn previous_upstream_keys(
    client: &Client,
    ns: &str,
    name: &str,
    operator_ns: &str,
) -> anyhow::Result<Vec<SecretString>> {
    let mut secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&proxy_secret_name(name))
        .await?;
    if secret.is_none() {
        secret = Api::<Secret>::namespaced(client.clone(), operator_ns)
            .get_opt(&gateway_config_secret_name(ns, name))
            .await?;
    }
    let Some(bytes) = secret
        .and_then(|s| s.data)
        .and_then(|d| d.get(FILE_NAME).cloned())
    else {
        return Ok(Vec::new());
    };
    let config: ProxyConfig = serde_json::from_slice(&bytes.0)
        .map_err(|e| anyhow::anyhow!("failed to parse {FILE_NAME} of {name}: {e}"))?;
    Ok(config
        .upstream
        .into_iter()
        .filter(|u| u.valid_until.is_some())
        .map(|u| u.key)
        .collect())
}

/// The `anthropicAdmin` of the ClaudeKey's ClusterClaudeKeySource: only the platform's source
/// decides what may be deactivated at Anthropic.
async fn source_admin(
    client: &Client,
    ck: &ClaudeKey,
) -> anyhow::Result<Option<AnthropicAdminSpec>> {
    if ck.spec.source_ref.kind != SourceKind::ClusterClaudeKeySource {
        return Ok(None);
    }
    Ok(Api::<ClusterClaudeKeySource>::all(client.clone())
        .get_opt(&ck.spec.source_ref.name)
        .await?
        .and_then(|s| s.spec.anthropic_admin))
}

async fn publish(client: &Client, ck: &ClaudeKey, warning: bool, reason: &str, note: String) {
    let recorder = Recorder::new(client.clone(), Reporter::from("claudekey-cli"));
    let event = events::event(events::event_type(warning), "Revoke", reason, note);
    if let Err(e) = recorder.publish(&event, &ck.object_ref(&())).await {
        eprintln!("warning: failed to record the Event: {e}");
    }
}

pub async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let c = &args.common;
    let (client, api, ck, ns) = setup(c).await?;
    let old = ck
        .status
        .as_ref()
        .and_then(|s| s.workload_key.as_ref())
        .map(|w| w.fingerprint.clone());
    let stamp = Utc::now().to_rfc3339();
    let patch =
        serde_json::json!({ "metadata": { "annotations": { annotations::REVOKE: stamp } } });
    api.patch(&c.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    println!(
        "{ns}/{}: revoke requested ({stamp}); waiting for the controller…",
        c.name
    );
    let deadline = tokio::time::Instant::now() + args.timeout;
    let new_fp = loop {
        let now = api.get(&c.name).await?;
        let wk = now.status.as_ref().and_then(|s| s.workload_key.as_ref());
        if let Some(w) =
            wk.filter(|w| Some(&w.fingerprint) != old.as_ref() && w.previous_fingerprint.is_none())
        {
            break w.fingerprint.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "timed out after {:?}: the workload key was not replaced (is the controller running?)",
                args.timeout
            );
            return Ok(ExitCode::from(EXIT_NOT_RETIRED));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "workload key replaced: {} -> {new_fp}; the old one is no longer accepted",
        old.as_deref().unwrap_or("none")
    );
    let previous = previous_upstream_keys(&client, &ns, &c.name, &c.operator_namespace).await?;
    // The workload key is already replaced: a missing admin key must not hide that success.
    let admin = match source_admin(&client, &ck).await? {
        Some(spec) => admin_client_for(&client, &c.operator_namespace, &spec, &c.anthropic_url)
            .await
            .map_err(|e| eprintln!("warning: {e}"))
            .ok(),
        None => None,
    };
    match (admin, previous.is_empty()) {
        (Some(admin), false) => {
            let mut all_ok = true;
            for key in &previous {
                let hint = masked_hint(secrecy::ExposeSecret::expose_secret(key));
                let outcome = retire(&admin, key, None).await;
                println!("upstream key {hint}: {}", outcome.message(&hint));
                publish(
                    &client,
                    &ck,
                    !outcome.is_success(),
                    outcome.reason(),
                    outcome.message(&hint),
                )
                .await;
                all_ok &= outcome.is_success();
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_RETIRED)
            })
        }
        (None, false) => {
            println!(
                "the replaced upstream key of {} is not deactivated: deactivate it in the Anthropic Console (or set anthropicAdmin on its ClusterClaudeKeySource and run revoke again)",
                c.name
            );
            Ok(ExitCode::SUCCESS)
        }
        (_, true) => {
            println!(
                "the upstream key was not replaced. If it may be exposed too: create a new key in the Anthropic Console, write it to the backend, let claudekey roll it, then run `claudekey revoke {}` again to deactivate the old one.",
                c.name
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn drill(args: DrillArgs) -> anyhow::Result<ExitCode> {
    let c = &args.common;
    let (client, api, ck, ns) = setup(c).await?;
    let keys = if args.key_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        vec![SecretString::from(line.trim().to_string())]
    } else {
        previous_upstream_keys(&client, &ns, &c.name, &c.operator_namespace).await?
    };
    if keys.is_empty() {
        anyhow::bail!(
            "no retired upstream key to test: {} holds no previous entry (use --key-stdin)",
            proxy_secret_name(&c.name)
        );
    }
    let mut worst = DrillResult::Dead;
    for key in &keys {
        let hint = masked_hint(secrecy::ExposeSecret::expose_secret(key));
        let result = probe_key(&c.anthropic_url, key).await;
        println!("{}: {}", result.label(), result.message(&hint));
        publish(
            &client,
            &ck,
            result != DrillResult::Dead,
            result.reason(),
            result.message(&hint),
        )
        .await;
        if result == DrillResult::Live
            || (matches!(result, DrillResult::Inconclusive(_)) && worst == DrillResult::Dead)
        {
            worst = result;
        }
    }
    set_live_condition(&api, &c.name, &worst).await?;
    Ok(match worst {
        DrillResult::Dead => ExitCode::SUCCESS,
        DrillResult::Live => ExitCode::from(EXIT_KEY_LIVE),
        DrillResult::Inconclusive(_) => ExitCode::from(EXIT_INCONCLUSIVE),
    })
}

/// Upserts the RetiredKeyLive condition (True when live, False when dead); leaves it alone
/// when inconclusive. Merge patch with the resourceVersion, so a concurrent status write wins.
async fn set_live_condition(
    api: &Api<ClaudeKey>,
    name: &str,
    result: &DrillResult,
) -> anyhow::Result<()> {
    let status = match result {
        DrillResult::Live => "True",
        DrillResult::Dead => "False",
        DrillResult::Inconclusive(_) => return Ok(()),
    };
    let ck = api.get(name).await?;
    let mut conditions = ck
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let cond = Condition {
        type_: CONDITION_RETIRED_KEY_LIVE.into(),
        status: status.into(),
        reason: result.reason().into(),
        message: result.message("(retired key)"),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
        observed_generation: ck.metadata.generation,
    };
    match conditions
        .iter_mut()
        .find(|c| c.type_ == CONDITION_RETIRED_KEY_LIVE)
    {
        Some(c) if c.status == cond.status => return Ok(()),
        Some(c) => *c = cond,
        None => conditions.push(cond),
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": ck.metadata.resource_version },
        "status": { "conditions": conditions },
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

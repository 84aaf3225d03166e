//! `claudekey self-check`: proves an install works, from inside the cluster (the chart's
//! `helm test` hook runs it from the claudekey image itself, so no other image is pulled).
//!
//! 1. The validating webhook answers: a server-side dry run of a Pod carrying a raw-looking key
//!    in the probe namespace is refused by `validate.claudekey.io`.
//! 2. The mutating webhook answers: a dry run of a Pod asking to be injected with a ClaudeKey
//!    that does not exist is refused by `inject.claudekey.io`.
//! 3. The controller works: the given ClaudeKey reaches Ready.
//!
//! A webhook that does not answer fails differently ("failed calling webhook"), and so does one
//! that is not registered (the Pod is admitted): each check says which. The Pods are dry runs:
//! nothing is ever stored. The probe key is built at run time and never printed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::crd::{ClaudeKey, annotations};

/// Flags of `claudekey self-check`; each has a `CLAUDEKEY_SELF_CHECK_*` twin.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A namespace the webhooks cover, where Pods are created as server-side dry runs (never
    /// stored); needs the `create` verb on pods there.
    #[arg(
        long,
        env = "CLAUDEKEY_SELF_CHECK_PROBE_NAMESPACE",
        default_value = "default"
    )]
    pub probe_namespace: String,
    /// A ClaudeKey that must become Ready, as NAMESPACE/NAME (needs `get` on it). Without it,
    /// only the webhooks are checked.
    #[arg(long, env = "CLAUDEKEY_SELF_CHECK_CLAUDEKEY")]
    pub claudekey: Option<String>,
    /// How long the ClaudeKey may take to become Ready.
    #[arg(long, env = "CLAUDEKEY_SELF_CHECK_TIMEOUT", default_value = "120s")]
    pub timeout: humantime::Duration,
}

/// The webhooks, by the names they are registered under.
const VALIDATE: &str = "validate.claudekey.io";
const INJECT: &str = "inject.claudekey.io";
/// Name of the dry-run Pods (never stored, so it can never clash with a real Pod).
const PROBE_POD: &str = "claudekey-self-check";

/// A raw-looking Anthropic key, built here so that no key-shaped literal sits in the binary.
fn probe_key() -> String {
    format!("sk-ant-api03-{}AA", "x".repeat(93))
}

fn probe_pod(env: Option<EnvVar>, inject: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(PROBE_POD.into()),
            annotations: inject
                .map(|name| [(annotations::INJECT.to_string(), name.to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app".into()),
                env: env.map(|e| vec![e]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a dry-run create that `webhook` must refuse came back with: `Ok` when that webhook
/// refused it, otherwise why the check failed. `secret` is cut out of any message.
pub fn judge_refusal(
    webhook: &str,
    outcome: Result<(), String>,
    secret: &str,
) -> Result<(), String> {
    let message = match outcome {
        Ok(()) => {
            return Err(format!(
                "{webhook} admitted the probe Pod: is the webhook registered, and in enforce mode?"
            ));
        }
        Err(message) => message.replace(secret, "<key>"),
    };
    if message.contains(&format!("admission webhook \"{webhook}\" denied")) {
        Ok(())
    } else if message.contains("failed calling webhook") {
        Err(format!(
            "{webhook} did not answer (are the webhook pods Ready? did you install with --wait?): {message}"
        ))
    } else {
        Err(format!(
            "expected {webhook} to refuse the probe Pod; got: {message}"
        ))
    }
}

async fn dry_run_create(pods: &Api<Pod>, pod: &Pod) -> Result<(), String> {
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match pods.create(&params, pod).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(e) => Err(e.to_string()),
    }
}

/// The Ready condition of `ck`: `Ok` when True, else its reason and message.
pub fn ready(ck: &ClaudeKey) -> Result<(), String> {
    let conditions = ck.status.as_ref().map(|s| s.conditions.as_slice());
    match conditions
        .unwrap_or_default()
        .iter()
        .find(|c| c.type_ == crate::crd::condition::READY)
    {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!("Ready={} {}: {}", c.status, c.reason, c.message)),
        None => Err("no Ready condition yet (is the controller running?)".into()),
    }
}

async fn wait_ready(client: Client, target: &str, timeout: Duration) -> Result<(), String> {
    let Some((ns, name)) = target.split_once('/') else {
        return Err(format!("--claudekey {target}: expected NAMESPACE/NAME"));
    };
    let api = Api::<ClaudeKey>::namespaced(client, ns);
    let deadline = Instant::now() + timeout;
    loop {
        let last = match api.get(name).await {
            Ok(ck) => ready(&ck),
            Err(e) => Err(format!("failed to read the ClaudeKey: {e}")),
        };
        match last {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() >= deadline => {
                return Err(format!(
                    "ClaudeKey {target} not Ready after {timeout:?}: {why}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// Runs the checks in order; prints one line per check passed, and the first failure.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = Client::try_default().await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &args.probe_namespace);
    let key = probe_key();
    let raw = probe_pod(
        Some(EnvVar {
            name: "ANTHROPIC_API_KEY".into(),
            value: Some(key.clone()),
            ..Default::default()
        }),
        None,
    );
    let absent = format!(
        "claudekey-self-check-absent-{}",
        uuid::Uuid::new_v4().simple()
    );
    let outcome = async {
        judge_refusal(VALIDATE, dry_run_create(&pods, &raw).await, &key)?;
        println!("ok: the validating webhook answers ({VALIDATE} refused a raw key)");
        let inject = probe_pod(None, Some(&absent));
        judge_refusal(INJECT, dry_run_create(&pods, &inject).await, &key)?;
        println!("ok: the mutating webhook answers ({INJECT} refused a missing ClaudeKey)");
        if let Some(target) = &args.claudekey {
            wait_ready(client.clone(), target, *args.timeout).await?;
            println!("ok: ClaudeKey {target} is Ready");
        }
        Ok::<_, String>(())
    }
    .await;
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(why) => {
            eprintln!("FAIL: {}", why.replace(&key, "<key>"));
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_counts_only_when_the_named_webhook_denied() {
        let key = probe_key();
        let denied = format!(
            "admission webhook \"validate.claudekey.io\" denied the request: env ANTHROPIC_API_KEY holds {key}"
        );
        assert_eq!(judge_refusal(VALIDATE, Err(denied.clone()), &key), Ok(()));
        // Another webhook's refusal is not this one answering.
        let other = judge_refusal(INJECT, Err(denied), &key).unwrap_err();
        assert!(other.starts_with("expected inject.claudekey.io"), "{other}");
        assert!(!other.contains(&key) && other.contains("<key>"), "{other}");
        let down = judge_refusal(
            VALIDATE,
            Err("Internal error occurred: failed calling webhook \"validate.claudekey.io\": connection refused".into()),
            &key,
        )
        .unwrap_err();
        assert!(down.contains("did not answer"), "{down}");
        let admitted = judge_refusal(VALIDATE, Ok(()), &key).unwrap_err();
        assert!(admitted.contains("admitted the probe Pod"), "{admitted}");
    }

    #[test]
    fn the_probe_pods_carry_the_key_or_the_inject_annotation() {
        let key = probe_key();
        assert_eq!(key.len(), "sk-ant-api03-".len() + 95);
        let raw = probe_pod(
            Some(EnvVar {
                name: "ANTHROPIC_API_KEY".into(),
                value: Some(key.clone()),
                ..Default::default()
            }),
            None,
        );
        let container = &raw.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            container.env.as_ref().unwrap()[0].value.as_deref(),
            Some(key.as_str())
        );
        let inject = probe_pod(None, Some("absent"));
        assert_eq!(
            inject.metadata.annotations.unwrap()[annotations::INJECT],
            "absent"
        );
    }

    #[test]
    fn ready_reads_the_ready_condition() {
        let mut ck: ClaudeKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
            "metadata": {"name": "t", "namespace": "n"},
            "spec": {"sourceRef": {"kind": "ClusterClaudeKeySource", "name": "s"}},
        }))
        .unwrap();
        assert!(ready(&ck).unwrap_err().contains("no Ready condition"));
        ck.status = serde_json::from_value(serde_json::json!({"conditions": [
            {"type": "Ready", "status": "False", "reason": "SourceNotFound", "message": "m",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
        .unwrap();
        assert_eq!(ready(&ck).unwrap_err(), "Ready=False SourceNotFound: m");
        ck.status.as_mut().unwrap().conditions[0].status = "True".into();
        assert_eq!(ready(&ck), Ok(()));
    }
}

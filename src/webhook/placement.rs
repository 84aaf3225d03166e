//! Which sidecar a pod gets, by the placement of its ClaudeKey (DESIGN.md §10, CONTRACT.md):
//! `namespace` keeps today's proxy sidecar mounting `<name>-proxy`; `gateway` injects the thin
//! forwarder (`claudekey proxy --mode forward`) mounting `<name>-client`, which holds no
//! upstream key. The app containers get the same placeholder env either way. Kept apart from
//! `mutate`: it reuses that patch and swaps the sidecar and its volume.

use json_patch::{Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod, SecretVolumeSource, Volume, VolumeMount};
use serde_json::Value;

use super::mutate::{self, PROXY_VOLUME, Refusal, SidecarConfig};
use super::rules::SIDECAR_NAME;
use crate::crd::{ClaudeKey, annotations, client_secret_name};

/// Volume carrying `<name>-client` into the forwarder.
pub const CLIENT_VOLUME: &str = "claudekey-client";
/// Where the forwarder reads `<name>-client` (its `--config-dir`).
pub const CLIENT_DIR: &str = "/var/run/claudekey/client";

/// Where a ClaudeKey's upstream key lives, from `status.placement`.
pub use crate::crd::Placement;

/// What the webhook's cache knows of the ClaudeKey a pod names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// No such ClaudeKey in the namespace.
    Missing,
    /// It exists but the controller has not resolved its placement yet (or wrote one this
    /// webhook does not know): injecting either sidecar could mount a Secret that never comes.
    NotReady,
    Placed(Placement),
}

impl Found {
    /// From a ClaudeKey object (`None`: not in the cache).
    pub fn of(claudekey: Option<&ClaudeKey>) -> Self {
        match claudekey {
            None => Self::Missing,
            Some(ck) => Self::placed(
                ck.status
                    .as_ref()
                    .and_then(|s| s.placement)
                    .map(Placement::as_str),
            ),
        }
    }

    /// An existing ClaudeKey with this `status.placement`; anything but the two known values
    /// is not ready (fail closed).
    pub fn placed(placement: Option<&str>) -> Self {
        match placement {
            Some("gateway") => Self::Placed(Placement::Gateway),
            Some("namespace") => Self::Placed(Placement::Namespace),
            _ => Self::NotReady,
        }
    }
}

/// Why a pod is refused here, on top of `mutate`'s own refusals.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum InjectError {
    #[error(transparent)]
    Refusal(#[from] Refusal),
    #[error("ClaudeKey {namespace}/{name} is not Ready yet: retry once its status shows Ready")]
    NotReady { namespace: String, name: String },
    #[error(
        "the pod already has a volume named {CLIENT_VOLUME:?}: rename it so the claudekey forwarder can be injected"
    )]
    ClientVolumeClash,
}

/// The injection patch for `pod`: `mutate`'s, with the forwarder in place of the proxy when the
/// ClaudeKey's placement is `gateway`. `lookup` answers from the webhook's cache.
pub fn inject(
    pod: &Pod,
    namespace: &str,
    lookup: impl Fn(&str) -> Found,
    config: &SidecarConfig,
) -> Result<Option<Patch>, InjectError> {
    let name = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::INJECT))
        .map(|n| n.trim().to_string())
        .unwrap_or_default();
    let found = lookup(&name);
    let patch = mutate::mutate(pod, namespace, |n| lookup(n) != Found::Missing, config)?;
    let Some(patch) = patch else {
        return Ok(None);
    };
    match found {
        Found::Placed(Placement::Namespace) => Ok(Some(patch)),
        Found::Placed(Placement::Gateway) => {
            let clash = pod
                .spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .is_some_and(|v| v.iter().any(|v| v.name == CLIENT_VOLUME));
            if clash {
                return Err(InjectError::ClientVolumeClash);
            }
            Ok(Some(to_forwarder(patch, &name, config)))
        }
        // `mutate` refuses a missing ClaudeKey itself; kept for completeness.
        Found::Missing | Found::NotReady => Err(InjectError::NotReady {
            namespace: namespace.to_string(),
            name,
        }),
    }
}

/// Swaps, in `mutate`'s patch, the proxy sidecar for the forwarder and the `-proxy` volume for
/// the `-client` one. Everything else (app env, annotation, order) stays as `mutate` made it.
fn to_forwarder(patch: Patch, claudekey: &str, config: &SidecarConfig) -> Patch {
    let sidecar = to_value(&forwarder_container(config));
    let volume = to_value(&client_volume(claudekey));
    let swap = |value: &mut Value| {
        let name = value.get("name").and_then(Value::as_str);
        if name == Some(SIDECAR_NAME) && value.get("restartPolicy").is_some() {
            *value = sidecar.clone();
        } else if name == Some(PROXY_VOLUME) && value.get("secret").is_some() {
            *value = volume.clone();
        }
    };
    let ops = patch
        .0
        .into_iter()
        .map(|op| match op {
            PatchOperation::Add(mut add) => {
                match &mut add.value {
                    Value::Array(items) => items.iter_mut().for_each(swap),
                    value => swap(value),
                }
                PatchOperation::Add(add)
            }
            other => other,
        })
        .collect();
    Patch(ops)
}

/// The forwarder as a native sidecar: the proxy sidecar's image, hardening, resources and
/// probes, with forward mode's flags and the `-client` mount instead of `-proxy`.
pub fn forwarder_container(config: &SidecarConfig) -> Container {
    let mut container = mutate::sidecar_container(config);
    container.args = Some(
        [
            "proxy",
            "--mode",
            "forward",
            "--config-dir",
            CLIENT_DIR,
            "--listen",
            &format!("127.0.0.1:{}", config.port),
            "--metrics-listen",
            &format!("0.0.0.0:{}", config.metrics_port),
        ]
        .map(str::to_string)
        .to_vec(),
    );
    container.volume_mounts = Some(vec![VolumeMount {
        name: CLIENT_VOLUME.to_string(),
        mount_path: CLIENT_DIR.to_string(),
        read_only: Some(true),
        ..Default::default()
    }]);
    container
}

fn client_volume(claudekey: &str) -> Volume {
    Volume {
        name: CLIENT_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(client_secret_name(claudekey)),
            optional: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("k8s-openapi types always serialize")
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;

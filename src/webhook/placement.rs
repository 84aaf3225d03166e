//! Which sidecar a pod gets, by the placement of its ClaudeKey (DESIGN.md §10, CONTRACT.md):
//! `namespace` keeps today's proxy sidecar mounting `<name>-proxy`; `gateway` injects the thin
//! forwarder (`claudekey proxy --mode forward`) mounting `<name>-client`, which holds no
//! upstream key. The app containers get the same placeholder env either way. Kept apart from
//! `mutate`: it reuses that patch and swaps the sidecar and its volume.

use json_patch::{Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Container, Pod, ProjectedVolumeSource, SecretVolumeSource, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use serde_json::Value;

use super::mutate::{self, PROXY_VOLUME, Refusal, SidecarConfig};
use super::rules::SIDECAR_NAME;
use crate::crd::{ClaudeKey, IdentityTokenStatus, annotations, client_secret_name};

/// Volume carrying `<name>-client` into the forwarder.
pub const CLIENT_VOLUME: &str = "claudekey-client";
/// Where the forwarder reads `<name>-client` (its `--config-dir`).
pub const CLIENT_DIR: &str = "/var/run/claudekey/client";
/// Volume carrying the projected identity token into the proxy sidecar (federation).
pub const IDENTITY_VOLUME: &str = "claudekey-identity";
/// Where the proxy sidecar finds it (CONTRACT.md).
pub const IDENTITY_DIR: &str = "/var/run/secrets/claudekey.io/identity";
const IDENTITY_FILE: &str = "token";
pub use super::finding::IDENTITY_TOKEN_PATH;

/// Where a ClaudeKey's upstream key lives, from `status.placement`.
pub use crate::crd::Placement;

/// What the webhook's cache knows of the ClaudeKey a pod names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// No such ClaudeKey in the namespace.
    Missing,
    /// It exists but the controller has not resolved its placement yet (or wrote one this
    /// webhook does not know): injecting either sidecar could mount a Secret that never comes.
    NotReady,
    Placed(Placement),
    /// Placement namespace with a workload-identity-federation source: the proxy sidecar also
    /// gets the projected service-account token it exchanges.
    Federated(IdentityTokenStatus),
}

impl Found {
    /// From a ClaudeKey object (`None`: not in the cache).
    pub fn of(claudekey: Option<&ClaudeKey>) -> Self {
        match claudekey {
            None => Self::Missing,
            Some(ck) => {
                let status = ck.status.as_ref();
                let found = Self::placed(status.and_then(|s| s.placement).map(Placement::as_str));
                match (found, status.and_then(|s| s.identity_token.clone())) {
                    (Self::Placed(Placement::Namespace), Some(token)) => Self::Federated(token),
                    (found, _) => found,
                }
            }
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
    #[error(
        "the pod already has a volume named {IDENTITY_VOLUME:?}: rename it so the claudekey proxy can get its identity token"
    )]
    IdentityVolumeClash,
}

fn has_volume(pod: &Pod, name: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v.name == name))
}

/// Adds, in `mutate`'s patch, the projected service-account token to the proxy sidecar only
/// (its volume, its mount, `--identity-token-file`). App containers never mount it: with it an
/// app could get Anthropic access tokens of its own, past every policy of the proxy.
fn with_identity(patch: Patch, token: &IdentityTokenStatus) -> Patch {
    let volume = to_value(&identity_volume(token));
    let mount = to_value(&VolumeMount {
        name: IDENTITY_VOLUME.to_string(),
        mount_path: IDENTITY_DIR.to_string(),
        read_only: Some(true),
        ..Default::default()
    });
    let extend = |value: &mut Value| {
        let name = value.get("name").and_then(Value::as_str);
        if name == Some(SIDECAR_NAME) && value.get("restartPolicy").is_some() {
            if let Some(Value::Array(args)) = value.get_mut("args") {
                args.push("--identity-token-file".into());
                args.push(IDENTITY_TOKEN_PATH.into());
            }
            if let Some(Value::Array(mounts)) = value.get_mut("volumeMounts") {
                mounts.push(mount.clone());
            }
        }
    };
    let mut ops: Vec<PatchOperation> = patch
        .0
        .into_iter()
        .map(|op| match op {
            PatchOperation::Add(mut add) => {
                match &mut add.value {
                    Value::Array(items) => items.iter_mut().for_each(extend),
                    value => extend(value),
                }
                PatchOperation::Add(add)
            }
            other => other,
        })
        .collect();
    // The volume goes next to the `-proxy` one, in the same shape (array or appended entry).
    let mut volume_op = None;
    for op in &ops {
        if let PatchOperation::Add(add) = op {
            let is_proxy = |v: &Value| v.get("name").and_then(Value::as_str) == Some(PROXY_VOLUME);
            match &add.value {
                Value::Array(items) if items.iter().any(is_proxy) => {
                    let mut items = items.clone();
                    items.push(volume.clone());
                    volume_op = Some((add.path.clone(), Value::Array(items), true));
                }
                value if is_proxy(value) => {
                    volume_op = Some((add.path.clone(), volume.clone(), false));
                }
                _ => {}
            }
        }
    }
    if let Some((path, value, replace_array)) = volume_op {
        if replace_array {
            for op in &mut ops {
                if let PatchOperation::Add(add) = op
                    && add.path == path
                {
                    add.value = value.clone();
                }
            }
        } else {
            // `mutate` appended the `-proxy` volume at `/spec/volumes/-`: append this one too.
            ops.push(PatchOperation::Add(json_patch::AddOperation {
                path,
                value,
            }));
        }
    }
    Patch(ops)
}

fn identity_volume(token: &IdentityTokenStatus) -> Volume {
    Volume {
        name: IDENTITY_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(token.audience.clone()),
                    expiration_seconds: Some(token.expiration_seconds),
                    path: IDENTITY_FILE.to_string(),
                }),
                ..Default::default()
            }]),
            // Unset (0644): only the sidecar mounts it. The kubelet writes the token root-owned
            // 0644 without fsGroup, 0640 in the fsGroup with one, 0600 owned by the user when
            // all containers share it: the sidecar (65532) reads it in each case (checked on a
            // real node by tests/node/federation.rs).
            default_mode: None,
        }),
        ..Default::default()
    }
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
    if matches!(found, Found::Federated(_)) && has_volume(pod, IDENTITY_VOLUME) {
        return Err(InjectError::IdentityVolumeClash);
    }
    let patch = mutate::mutate(pod, namespace, |n| lookup(n) != Found::Missing, config)?;
    let Some(patch) = patch else {
        return Ok(None);
    };
    match found {
        Found::Placed(Placement::Namespace) => Ok(Some(patch)),
        Found::Federated(token) => {
            let mut patch = with_identity(patch, &token);
            // The apiserver refuses a serviceAccountToken projection without a
            // serviceAccountName; the ServiceAccount admission plugin sets `default` before
            // webhooks run, but not everywhere (it can be disabled): set it the same way.
            let named = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .is_some_and(|n| !n.is_empty());
            if !named {
                patch.0.push(PatchOperation::Add(json_patch::AddOperation {
                    path: "/spec/serviceAccountName".parse().expect("valid pointer"),
                    value: Value::String("default".into()),
                }));
            }
            Ok(Some(patch))
        }
        Found::Placed(Placement::Gateway) => {
            if has_volume(pod, CLIENT_VOLUME) {
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

//! The custom resources (`claudekey.io/v1alpha2`): `ClaudeKey` and its sources
//! (`ClusterClaudeKeySource`, `ClaudeKeySource`). Types, defaults and schema only: no I/O lives
//! here; the controller, webhook and proxy all read these types.

mod duration;
mod federation;
mod source;
mod spec;
mod status;

pub use duration::{DurationError, GoDuration};
pub use federation::*;
pub use source::*;
pub use spec::*;
pub use status::*;

use kube::CustomResourceExt;

/// API group of every claudekey resource and annotation.
pub const GROUP: &str = "claudekey.io";
/// API version of every claudekey resource.
pub const VERSION: &str = "v1alpha2";
/// `apiVersion` of every claudekey resource.
pub const API_VERSION: &str = "claudekey.io/v1alpha2";

/// Annotations and labels that tools outside the code rely on (DESIGN.md §2, §3, §5).
pub mod annotations {
    /// On a ClaudeKey: any new value rotates the workload key now, with the grace period.
    pub const ROTATE: &str = "claudekey.io/rotate";
    /// On a ClaudeKey: any new value rotates now with zero grace (the breach playbook).
    pub const REVOKE: &str = "claudekey.io/revoke";
    /// On a Pod: the ClaudeKey whose proxy sidecar the mutating webhook injects.
    pub const INJECT: &str = "claudekey.io/inject";
    /// On a Pod: set by the mutating webhook once the sidecar is in, so injection is idempotent.
    pub const INJECTED: &str = "claudekey.io/injected";
    /// On a workload's pod template: the ClaudeKey whose `-client` Secret it reads from env.
    pub const CONSUMES: &str = "claudekey.io/consumes";
    /// On a workload's pod template: fingerprint of the workload key it was last restarted for.
    pub const RESTARTED_FOR: &str = "claudekey.io/restartedFor";
    /// Label naming the ClaudeKey that owns a Secret.
    pub const NAME_LABEL: &str = "claudekey.io/name";
    /// On a Secret in the operator namespace: `"true"` lets a kubernetesSecret source read it.
    /// Nothing else there (the admin key, TLS keys) can ever be named as a source.
    pub const UPSTREAM_KEY_LABEL: &str = "claudekey.io/upstream-key";
    /// On a gateway config Secret: [`CONFIG_LABEL_VALUE`]; what the gateway selects on.
    pub const CONFIG_LABEL: &str = "claudekey.io/config";
    pub const CONFIG_LABEL_VALUE: &str = "gateway";
    /// On a gateway config Secret: the namespace of its ClaudeKey.
    pub const NAMESPACE_LABEL: &str = "claudekey.io/namespace";
    /// On a gateway config Secret: `<namespace>/<name>` of its ClaudeKey (names can be longer
    /// than a label value may be).
    pub const CLAUDEKEY_ANNOTATION: &str = "claudekey.io/claudekey";
    /// On a gateway config Secret: the uid of the ClaudeKey it was written for, so one created
    /// again under the same name is told apart (`controller::orphans`).
    pub const CLAUDEKEY_UID_ANNOTATION: &str = "claudekey.io/claudekey-uid";
    /// Standard label on everything claudekey writes.
    pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY_LABEL`], also the server-side-apply field manager.
    pub const MANAGER: &str = "claudekey";
}

/// Name of the Secret that gateway consumers read (`ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`).
pub fn client_secret_name(claudekey: &str) -> String {
    format!("{claudekey}-client")
}

/// Name of the Secret that only the proxy mounts (`proxy.json`).
pub fn proxy_secret_name(claudekey: &str) -> String {
    format!("{claudekey}-proxy")
}

/// Name of the gateway config Secret of ClaudeKey `namespace/name` in the operator namespace:
/// a digest, so every namespace/name pair fits in a Secret name.
pub fn gateway_config_secret_name(namespace: &str, name: &str) -> String {
    let digest = crate::keys::sha256_hex(&format!("{namespace}/{name}"));
    format!("claudekey-gw-{}", &digest[..40])
}

/// Every CRD, in the order of their files in `crds/`.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        ClaudeKey::crd(),
        ClaudeKeySource::crd(),
        ClusterClaudeKeySource::crd(),
    ]
}

/// One CRD as YAML, exactly what its file in `crds/` holds.
pub fn crd_document(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    let yaml = serde_yaml::to_string(crd).expect("the CRD type always serializes");
    let quoted: String = yaml.lines().map(|l| quote_yaml11_bool(l) + "\n").collect();
    format!("---\n{quoted}")
}

/// serde_yaml writes YAML 1.2, where a bare `off` is a string; kubectl and Helm read YAML 1.1,
/// where it is `false` (so the enum value `promptInjection: off` could not be set). Such scalars
/// are quoted, so every parser reads the string meant.
fn quote_yaml11_bool(line: &str) -> String {
    const WORDS: [&str; 6] = ["y", "n", "yes", "no", "on", "off"];
    let value_at = line
        .find("- ")
        .filter(|i| line[..*i].trim().is_empty())
        .map(|i| i + 2)
        .or_else(|| line.find(": ").map(|i| i + 2));
    match value_at {
        Some(i) if WORDS.contains(&line[i..].to_ascii_lowercase().as_str()) => {
            format!("{}'{}'", &line[..i], &line[i..])
        }
        _ => line.to_string(),
    }
}

/// Every CRD as multi-document YAML, exactly what `claudekey crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    crds().iter().map(crd_document).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crds_match_generated() {
        let checked_in = [
            include_str!("../../crds/claudekey.io_claudekeys.yaml"),
            include_str!("../../crds/claudekey.io_claudekeysources.yaml"),
            include_str!("../../crds/claudekey.io_clusterclaudekeysources.yaml"),
        ];
        for (file, crd) in checked_in.iter().zip(crds()) {
            assert!(
                *file == crd_document(&crd),
                "crds/ is stale for {}: run `hack/crdgen.sh`",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn yaml11_booleans_are_quoted() {
        assert!(crd_yaml().contains("- 'off'"));
        assert!(!crd_yaml().contains("- off\n"));
        assert_eq!(quote_yaml11_bool("      - flag"), "      - flag");
        assert_eq!(quote_yaml11_bool("  default: off"), "  default: 'off'");
    }

    #[test]
    fn gateway_config_names_fit_any_pair() {
        let long = "a".repeat(253);
        let name = gateway_config_secret_name(&"n".repeat(63), &long);
        assert!(name.len() <= 63, "{name}");
        // Neither part can hold a '/', so `namespace/name` names one pair only.
        assert_ne!(
            gateway_config_secret_name("team-a", "bot"),
            gateway_config_secret_name("team-b", "bot")
        );
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = ClaudeKey::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names, Some(vec!["ck".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Ready",
                "Reason",
                "Source",
                "Placement",
                "Key",
                "Upstream",
                "Next Rotation",
                "Age"
            ]
        );
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }
}

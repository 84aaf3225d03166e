//! The `ClaudeKey` custom resource (`claudekey.io/v1alpha1`): types, defaults and schema only.
//! No I/O lives here; the controller, webhook and proxy all read these types.

mod duration;
mod spec;
mod status;

pub use duration::{DurationError, GoDuration};
pub use spec::*;
pub use status::*;

use kube::CustomResourceExt;

/// API group of every claudekey resource and annotation.
pub const GROUP: &str = "claudekey.io";

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

/// The CRD as multi-line YAML, exactly what `claudekey crd` prints and `crds/` holds.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml::to_string(&ClaudeKey::crd()).expect("the CRD type always serializes");
    format!("---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_matches_generated() {
        let checked_in = include_str!("../../crds/claudekey.io_claudekeys.yaml");
        assert!(
            checked_in == crd_yaml(),
            "crds/claudekey.io_claudekeys.yaml is stale: run `cargo run -- crd > crds/claudekey.io_claudekeys.yaml`"
        );
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = ClaudeKey::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names, Some(vec!["ck".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Source", "Key", "Upstream", "Next Rotation", "Age"]);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }
}

//! The chart's RBAC rule by rule: exactly what the controller, the webhook and the gateway need,
//! cluster-wide and in the release namespace, and nothing more.

use k8s_openapi::api::rbac::v1::{ClusterRole, Role};

use crate::chart_support::*;

#[test]
fn rbac_is_exactly_least_privilege() {
    let docs = render("default");
    let ctl: ClusterRole = one(&docs, "ClusterRole", "claudekey-controller");
    let mut want = set(&[
        "claudekey.io/clusterclaudekeysources[]:get",
        "claudekey.io/clusterclaudekeysources[]:list",
        "claudekey.io/clusterclaudekeysources[]:watch",
        "claudekey.io/clusterclaudekeysources/status[]:get",
        "claudekey.io/clusterclaudekeysources/status[]:update",
        "claudekey.io/clusterclaudekeysources/status[]:patch",
        "claudekey.io/claudekeysources[]:get",
        "claudekey.io/claudekeysources[]:list",
        "claudekey.io/claudekeysources[]:watch",
        "/namespaces[]:get",
        "/namespaces[]:list",
        "/namespaces[]:watch",
        "claudekey.io/claudekeys[]:get",
        "claudekey.io/claudekeys[]:list",
        "claudekey.io/claudekeys[]:watch",
        "claudekey.io/claudekeys[]:patch",
        "claudekey.io/claudekeys/status[]:update",
        "claudekey.io/claudekeys/status[]:patch",
        "events.k8s.io/events[]:create",
        "events.k8s.io/events[]:patch",
        "/events[]:create",
        "/events[]:patch",
    ]);
    for v in [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ] {
        want.insert(format!("/secrets[]:{v}"));
    }
    for r in ["deployments", "statefulsets", "daemonsets"] {
        for v in ["get", "list", "watch", "patch"] {
            want.insert(format!("apps/{r}[]:{v}"));
        }
    }
    assert_eq!(rules(ctl.rules.as_deref().unwrap_or_default()), want);
    let role: Role = one(&docs, "Role", "claudekey-controller");
    assert_eq!(
        rules(role.rules.as_deref().unwrap_or_default()),
        set(&[
            "/secrets[]:get",
            "/secrets[]:list",
            "/secrets[]:watch",
            "/secrets[]:create",
            "/secrets[]:update",
            "/secrets[]:patch",
            "/secrets[]:delete",
            "coordination.k8s.io/leases[]:create",
            "coordination.k8s.io/leases[claudekey-controller]:get",
            "coordination.k8s.io/leases[claudekey-controller]:update",
            "coordination.k8s.io/leases[claudekey-controller]:patch",
        ])
    );
    let wh: ClusterRole = one(&docs, "ClusterRole", "claudekey-webhook");
    assert_eq!(
        rules(wh.rules.as_deref().unwrap_or_default()),
        set(&[
            "claudekey.io/claudekeys[]:get",
            "claudekey.io/claudekeys[]:list",
            "claudekey.io/claudekeys[]:watch"
        ])
    );
    assert_eq!(
        non_test(&docs, "ClusterRole"),
        set(&[
            "claudekey-controller",
            "claudekey-gateway",
            "claudekey-webhook"
        ])
    );
    let gw: Role = one(&docs, "Role", "claudekey-gateway");
    assert_eq!(
        rules(gw.rules.as_deref().unwrap_or_default()),
        set(&[
            "/secrets[]:get",
            "/secrets[]:list",
            "/secrets[]:watch",
            "/serviceaccounts/token[claudekey-gateway]:create"
        ]),
        "the gateway only reads Secrets, in its own namespace, and requests tokens of its own ServiceAccount"
    );
    assert_eq!(
        non_test(&docs, "Role"),
        set(&["claudekey-controller", "claudekey-gateway"])
    );
    // Cluster-wide, the gateway may only report FederationReady on sources.
    let gw: ClusterRole = one(&docs, "ClusterRole", "claudekey-gateway");
    assert_eq!(
        rules(gw.rules.as_deref().unwrap_or_default()),
        set(&[
            "claudekey.io/clusterclaudekeysources/status[]:get",
            "claudekey.io/clusterclaudekeysources/status[]:patch"
        ]),
        "no other cluster-wide RBAC for the gateway"
    );
}

//! The gateway the chart renders by default: its flags, its TLS Secret with a CA of its own (or a
//! cert-manager Certificate), the controller's CA-only mount; and no gateway objects when it is off.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;

use crate::chart_support::*;

#[test]
fn gateway_serves_every_config_secret_over_tls_with_a_role_in_its_namespace() {
    let docs = render("default");
    let gw: Deployment = one(&docs, "Deployment", "claudekey-gateway");
    assert_eq!(gw.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let p = pod(&gw);
    let a = args(&p.containers[0]);
    for want in [
        "proxy",
        "--mode=gateway",
        "--config-secrets=ck-test",
        "--listen=0.0.0.0:8443",
        "--tls-cert=/etc/claudekey/gateway-tls/tls.crt",
        "--tls-key=/etc/claudekey/gateway-tls/tls.key",
        "--audit-log=-",
        "--metrics-listen=0.0.0.0:9484",
        "--identity-service-account=ck-test/claudekey-gateway",
    ] {
        assert!(a.contains(&want.to_string()), "{a:?} lacks {want}");
    }
    assert!(
        !a.iter().any(|x| x.starts_with("--config-dir")),
        "one of --config-dir / --config-secrets: {a:?}"
    );
    let tls = p
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "tls")
        .and_then(|v| v.secret)
        .expect("tls volume");
    assert_eq!(tls.secret_name.as_deref(), Some("claudekey-gateway-tls"));
    let mounts = p.containers[0].volume_mounts.clone().unwrap_or_default();
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == "/etc/claudekey/gateway-tls" && m.read_only == Some(true)),
        "{mounts:?}"
    );
    let secret: k8s_openapi::api::core::v1::Secret = one(&docs, "Secret", "claudekey-gateway-tls");
    let data = secret.data.expect("data");
    for k in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(data.get(k).is_some_and(|v| !v.0.is_empty()), "lacks {k}");
    }
    let webhook_tls: k8s_openapi::api::core::v1::Secret =
        one(&docs, "Secret", "claudekey-webhook-tls");
    assert_ne!(
        webhook_tls.data.expect("data").get("ca.crt"),
        data.get("ca.crt"),
        "the gateway has its own CA"
    );
    // The controller gets only the CA, never the gateway's key.
    let ctl: Deployment = one(&docs, "Deployment", "claudekey-controller");
    let ca = pod(&ctl)
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "gateway-ca")
        .and_then(|v| v.secret)
        .expect("gateway-ca volume");
    assert_eq!(ca.secret_name.as_deref(), Some("claudekey-gateway-tls"));
    let items: Vec<String> = ca
        .items
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(items, ["ca.crt"]);
    let svc: k8s_openapi::api::core::v1::Service = one(&docs, "Service", "claudekey-gateway");
    let ports = svc.spec.and_then(|s| s.ports).expect("ports");
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].port),
        (Some("https"), 8443)
    );
    assert!(names(&docs, "PodDisruptionBudget").contains("claudekey-gateway"));
    let sa: ServiceAccount = one(&docs, "ServiceAccount", "claudekey-gateway");
    assert_eq!(
        sa.automount_service_account_token,
        Some(true),
        "it watches Secrets"
    );

    // cert-manager: a Certificate for the gateway Service into the same Secret.
    let docs = render("cert-manager");
    let cert = docs
        .iter()
        .find(|d| {
            d["kind"].as_str() == Some("Certificate")
                && d["metadata"]["name"].as_str() == Some("claudekey-gateway")
        })
        .expect("gateway Certificate");
    assert_eq!(
        cert["spec"]["secretName"].as_str(),
        Some("claudekey-gateway-tls")
    );
    let dns: Vec<&str> = cert["spec"]["dnsNames"]
        .as_sequence()
        .expect("dnsNames")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(dns.contains(&"claudekey-gateway.ck-test.svc"), "{dns:?}");
    assert!(!names(&docs, "Secret").contains("claudekey-gateway-tls"));

    // Off: no gateway objects, and the controller gets no gateway flags.
    let docs = render("namespaced");
    assert!(!names(&docs, "Deployment").contains("claudekey-gateway"));
    assert!(!non_test(&docs, "Role").contains("claudekey-gateway"));
    let ctl: Deployment = one(&docs, "Deployment", "claudekey-controller");
    let a = args(&pod(&ctl).containers[0]);
    assert!(!a.iter().any(|x| x.starts_with("--gateway")), "{a:?}");
}

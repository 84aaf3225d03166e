//! The chart's admission webhooks: probes that ask for routes the webhook serves, both
//! configurations with self-signed TLS or through cert-manager, and what the warn scenario changes
//! (mode, failure policy, namespace selector, sidecar).

use std::collections::BTreeSet;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;

use crate::chart_support::*;
use crate::scenarios;

/// The webhook's probes ask the listener behind their port for a path it serves: a probe that
/// gets 404 would keep the webhook unready (and, failing closed, block every pod create) or
/// restart it forever.
#[tokio::test]
async fn webhook_probes_hit_routes_the_webhook_serves() {
    use std::sync::Arc;

    use claudekey::webhook::{
        mutate::SidecarConfig,
        server::{Metrics, metrics_router, router},
        validate::{Admission, Mode},
    };
    use tower::ServiceExt;

    let metrics = Arc::new(Metrics::default());
    let admission = Arc::new(Admission {
        mode: Mode::Enforce,
        sidecar: SidecarConfig::default(),
        claudekeys: Arc::new(Vec::<(String, String)>::new()),
    });
    let https = router(admission, metrics.clone());
    let plain = metrics_router(metrics);
    for s in scenarios() {
        let wh: Deployment = one(&render(&s), "Deployment", "claudekey-webhook");
        let c = &pod(&wh).containers[0];
        for (kind, probe) in [
            ("liveness", &c.liveness_probe),
            ("readiness", &c.readiness_probe),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{s}: webhook {kind} probe is not httpGet"));
            let port = match &get.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => name,
                other => panic!("{s}: probe port {other:?} is not named"),
            };
            let listener = match port.as_str() {
                "https" => https.clone(),
                "metrics" => plain.clone(),
                other => panic!("{s}: probe on unknown port {other}"),
            };
            let path = get.path.clone().unwrap_or_default();
            let request = http::Request::get(&path)
                .body(axum::body::Body::empty())
                .expect("request");
            let status = listener.oneshot(request).await.expect("router").status();
            assert_eq!(
                status,
                http::StatusCode::OK,
                "{s}: webhook {kind} probe GET {path} on port {port}"
            );
        }
    }
}

#[test]
fn webhooks_are_wired_with_self_signed_tls_by_default() {
    let docs = render("default");
    let v: ValidatingWebhookConfiguration =
        one(&docs, "ValidatingWebhookConfiguration", "claudekey-webhook");
    let m: MutatingWebhookConfiguration =
        one(&docs, "MutatingWebhookConfiguration", "claudekey-webhook");
    let vw = &v.webhooks.expect("webhooks")[0];
    let mw = &m.webhooks.expect("webhooks")[0];
    assert_eq!(vw.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(mw.failure_policy.as_deref(), Some("Fail"));
    assert_eq!((vw.timeout_seconds, mw.timeout_seconds), (Some(5), Some(5)));
    assert_eq!(vw.side_effects, "None");
    let svc = |cc: &k8s_openapi::api::admissionregistration::v1::WebhookClientConfig| {
        let s = cc.service.clone().expect("service");
        (s.name, s.namespace, s.path.unwrap_or_default(), s.port)
    };
    assert_eq!(
        svc(&vw.client_config),
        (
            "claudekey-webhook".into(),
            NS.into(),
            "/validate".into(),
            Some(443)
        )
    );
    assert_eq!(
        svc(&mw.client_config),
        (
            "claudekey-webhook".into(),
            NS.into(),
            "/mutate".into(),
            Some(443)
        )
    );
    let vrules: BTreeSet<String> = vw
        .rules
        .clone()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| {
            let ops = r.operations.unwrap_or_default().join("+");
            r.resources
                .unwrap_or_default()
                .into_iter()
                .map(move |res| format!("{res}:{ops}"))
        })
        .collect();
    let want: BTreeSet<String> = [
        "pods",
        "pods/ephemeralcontainers",
        "podtemplates",
        "replicationcontrollers",
        "configmaps",
        "deployments",
        "statefulsets",
        "daemonsets",
        "replicasets",
        "jobs",
        "cronjobs",
    ]
    .iter()
    .map(|r| format!("{r}:CREATE+UPDATE"))
    .collect();
    assert_eq!(vrules, want);
    let mrules = mw.rules.clone().unwrap_or_default();
    assert_eq!(mrules.len(), 1);
    assert_eq!(
        mrules[0].resources.clone().unwrap_or_default(),
        vec!["pods".to_string()]
    );
    assert_eq!(
        mrules[0].operations.clone().unwrap_or_default(),
        vec!["CREATE".to_string()]
    );
    for sel in [&vw.namespace_selector, &mw.namespace_selector] {
        let expr = &sel
            .as_ref()
            .expect("namespaceSelector")
            .match_expressions
            .clone()
            .expect("matchExpressions")[0];
        assert_eq!(
            (expr.key.as_str(), expr.operator.as_str()),
            ("kubernetes.io/metadata.name", "NotIn")
        );
        let vals = expr.values.clone().unwrap_or_default();
        assert!(
            vals.contains(&"kube-system".to_string()) && vals.contains(&NS.to_string()),
            "{vals:?}"
        );
    }
    let ca = vw
        .client_config
        .ca_bundle
        .clone()
        .expect("caBundle in self-signed mode");
    assert_eq!(
        Some(ca),
        mw.client_config.ca_bundle.clone(),
        "one CA for both webhooks"
    );
    let tls: k8s_openapi::api::core::v1::Secret = one(&docs, "Secret", "claudekey-webhook-tls");
    let data = tls.data.expect("data");
    for k in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(
            data.get(k).is_some_and(|v| !v.0.is_empty()),
            "TLS Secret lacks {k}"
        );
    }
    assert!(names(&docs, "Certificate").is_empty());
}

#[test]
fn cert_manager_mode_uses_a_certificate_and_the_cainjector() {
    let docs = render("cert-manager");
    assert!(
        non_test(&docs, "Secret").is_empty(),
        "no chart-made TLS Secret with cert-manager"
    );
    let v: ValidatingWebhookConfiguration =
        one(&docs, "ValidatingWebhookConfiguration", "claudekey-webhook");
    let m: MutatingWebhookConfiguration =
        one(&docs, "MutatingWebhookConfiguration", "claudekey-webhook");
    let want = format!("{NS}/claudekey-webhook");
    for ann in [
        v.metadata.annotations.clone(),
        m.metadata.annotations.clone(),
    ] {
        assert_eq!(
            ann.expect("annotations")
                .get("cert-manager.io/inject-ca-from"),
            Some(&want)
        );
    }
    assert!(
        v.webhooks.expect("webhooks")[0]
            .client_config
            .ca_bundle
            .is_none()
    );
    let cert = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Certificate"))
        .expect("Certificate");
    assert_eq!(
        cert["spec"]["secretName"].as_str(),
        Some("claudekey-webhook-tls")
    );
    assert_eq!(
        cert["spec"]["issuerRef"]["name"].as_str(),
        Some("claudekey-selfsigned")
    );
    let dns: Vec<&str> = cert["spec"]["dnsNames"]
        .as_sequence()
        .expect("dnsNames")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(dns.contains(&"claudekey-webhook.ck-test.svc"), "{dns:?}");
    assert_eq!(names(&docs, "Issuer"), set(&["claudekey-selfsigned"]));

    let docs = render("cert-manager-issuer");
    assert!(
        names(&docs, "Issuer").is_empty(),
        "an existing issuer needs no chart Issuer"
    );
    let cert = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Certificate"))
        .expect("Certificate");
    assert_eq!(
        cert["spec"]["issuerRef"]["kind"].as_str(),
        Some("ClusterIssuer")
    );
}

#[test]
fn warn_scenario_changes_mode_policy_selector_and_sidecar() {
    let docs = render("warn");
    let ctl: Deployment = one(&docs, "Deployment", "claudekey-controller");
    assert_eq!(
        args(&pod(&ctl).containers[0]).last().map(String::as_str),
        Some("--consumer-restarts-per-minute=5"),
        "extraArgs come after the chart's own flags"
    );
    let wh: Deployment = one(&docs, "Deployment", "claudekey-webhook");
    let a = args(&pod(&wh).containers[0]);
    assert!(a.contains(&"--mode=warn".to_string()), "{a:?}");
    assert!(
        a.contains(&"--proxy-image=registry.example.com/claudekey:0.1.0-sidecar".to_string()),
        "{a:?}"
    );
    let sidecar: Vec<&str> = a
        .iter()
        .filter(|x| x.starts_with("--sidecar-"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        sidecar,
        [
            "--sidecar-cpu-request=10m",
            "--sidecar-memory-request=16Mi",
            "--sidecar-memory-limit=64Mi"
        ]
    );
    assert_eq!(
        pod(&wh).containers[0].image.as_deref(),
        Some(format!("ghcr.io/claudekey/claudekey@sha256:{}", "0".repeat(64)).as_str())
    );
    let v: ValidatingWebhookConfiguration =
        one(&docs, "ValidatingWebhookConfiguration", "claudekey-webhook");
    let vw = &v.webhooks.expect("webhooks")[0];
    assert_eq!(vw.failure_policy.as_deref(), Some("Ignore"));
    let sel = vw.namespace_selector.clone().expect("selector");
    assert_eq!(
        sel.match_labels
            .expect("opt-in label")
            .get("claudekey.io/enabled")
            .map(String::as_str),
        Some("true")
    );
    let excluded = sel.match_expressions.expect("exprs")[0]
        .values
        .clone()
        .unwrap_or_default();
    assert_eq!(
        excluded,
        vec![
            "kube-system".to_string(),
            NS.to_string(),
            "monitoring".to_string()
        ]
    );
    let ctl: Deployment = one(&docs, "Deployment", "claudekey-controller");
    assert!(args(&pod(&ctl).containers[0]).contains(&"--log-format=text".to_string()));
}

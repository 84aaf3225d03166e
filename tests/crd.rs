//! The generated CRDs (ClaudeKey and its sources) against a real kube-apiserver: accepted,
//! defaults applied, printer columns served, and invalid objects refused with a message a person
//! can act on.

mod support;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
    core::Status,
};
use serde_json::{Value, json};

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource};

fn claudekey_json(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClaudeKey",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("valid object JSON")
}

async fn setup() -> (Client, Api<DynamicObject>, String) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::namespace(&client, "crd").await;
    let resource = ApiResource::erase::<ClaudeKey>(&());
    let api = Api::namespaced_with(client.clone(), &ns, &resource);
    (client, api, ns)
}

/// Creates the object and returns the apiserver's refusal; panics if it was accepted.
async fn refused(api: &Api<DynamicObject>, name: &str, spec: Value) -> Status {
    match api
        .create(&PostParams::default(), &claudekey_json(name, spec))
        .await
    {
        Err(kube::Error::Api(status)) => *status,
        Err(other) => panic!("{name}: unexpected error {other}"),
        Ok(_) => panic!("{name}: the apiserver accepted an invalid ClaudeKey"),
    }
}

fn k8s_source() -> Value {
    json!({ "kind": "ClusterClaudeKeySource", "name": "support" })
}

/// Creates a ClusterClaudeKeySource and returns the apiserver's answer.
async fn create_source(client: &Client, name: &str, spec: Value) -> Result<(), Status> {
    let resource = ApiResource::erase::<ClusterClaudeKeySource>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClusterClaudeKeySource",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(*status),
        Err(other) => panic!("{name}: unexpected error {other}"),
    }
}

#[tokio::test]
async fn valid_claudekey_is_stored_with_defaults() {
    let (client, api, ns) = setup().await;
    let spec = json!({
        "sourceRef": k8s_source(),
        "scope": { "models": ["claude-sonnet-4-*", "claude-haiku-*"], "maxTokens": 4096 },
        "limits": { "requestsPerMinute": 50, "tokensPerMinute": 40000, "perUserRequestsPerHour": 20,
                    "budget": { "usdPerDay": 0.05, "usdPerMonth": 100 } },
        "rotation": { "interval": "2160h", "gracePeriod": "15m" },
        "dataProtection": { "redact": ["email", "ssn"], "customPatterns": [{ "name": "employee-id", "regex": "EMP-[0-9]{6}" }] },
        "expiresAt": "2027-03-01T00:00:00Z",
    });
    api.create(&PostParams::default(), &claudekey_json("support-bot", spec))
        .await
        .expect("create");

    // Read back through the typed API: the schema's defaults were applied by the apiserver.
    let typed: Api<ClaudeKey> = Api::namespaced(client, &ns);
    let stored = typed.get("support-bot").await.expect("get typed");
    let spec = &stored.spec;
    assert_eq!(spec.source_ref.name, "support");
    assert_eq!(spec.scope.endpoints.len(), 3, "default endpoints");
    assert_eq!(
        spec.data_protection.prompt_injection,
        claudekey::crd::PromptInjectionMode::Flag
    );
    assert_eq!(spec.rotation.grace_period.as_str(), "15m");
    let budget = spec.limits.budget.as_ref().expect("budget");
    assert_eq!(
        (budget.usd_per_day, budget.usd_per_month),
        (Some(0.05), Some(100.0))
    );
}

#[tokio::test]
async fn minimal_claudekey_gets_every_default() {
    let (client, api, ns) = setup().await;
    api.create(
        &PostParams::default(),
        &claudekey_json("minimal", json!({ "sourceRef": k8s_source() })),
    )
    .await
    .expect("create");
    let stored = Api::<ClaudeKey>::namespaced(client, &ns)
        .get("minimal")
        .await
        .expect("get");
    assert_eq!(stored.spec.rotation.interval.as_str(), "2160h");
    assert_eq!(stored.spec.scope, claudekey::crd::ScopeSpec::default());
}

#[tokio::test]
async fn printer_columns_are_served() {
    let (client, api, ns) = setup().await;
    api.create(
        &PostParams::default(),
        &claudekey_json("columns", json!({ "sourceRef": k8s_source() })),
    )
    .await
    .expect("create");
    // What `kubectl get ck` asks for: the server-side Table rendering.
    let request = http::Request::get(format!(
        "/apis/claudekey.io/v1alpha2/namespaces/{ns}/claudekeys"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: Value = client.request(request).await.expect("table");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
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
    // Placement shows with `-o wide` only.
    let placement = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "Placement")
        .unwrap();
    assert_eq!(placement["priority"], 1);
    assert_eq!(table["rows"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_source_names_exactly_one_backend() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let two = json!({
        "kubernetesSecret": { "name": "a" },
        "vault": { "path": "claude/a" },
    });
    let err = create_source(&client, &format!("two-{suffix}"), two)
        .await
        .expect_err("two backends");
    assert_eq!(err.code, 422);
    assert!(
        err.message
            .contains("set exactly one of kubernetesSecret, awsSecretsManager, vault"),
        "{}",
        err.message
    );
    let err = create_source(
        &client,
        &format!("none-{suffix}"),
        json!({ "refreshInterval": "5m" }),
    )
    .await
    .expect_err("no backend");
    assert!(err.message.contains("set exactly one"), "{}", err.message);
    // Stored with its defaults: placement gateway, nobody allowed.
    create_source(
        &client,
        &format!("ok-{suffix}"),
        json!({ "kubernetesSecret": { "name": "anthropic-support" } }),
    )
    .await
    .expect("a valid source");
    let stored = Api::<ClusterClaudeKeySource>::all(client)
        .get(&format!("ok-{suffix}"))
        .await
        .unwrap();
    assert_eq!(stored.spec.placement, claudekey::crd::Placement::Gateway);
    assert!(stored.spec.allowed_namespaces.names.is_empty());
    assert_eq!(stored.spec.refresh_interval.as_str(), "5m");
}

#[tokio::test]
async fn floors_refuse_a_second_with_the_field_named() {
    let (client, api, _) = setup().await;
    let err = refused(
        &api,
        "every-second",
        json!({ "sourceRef": k8s_source(), "rotation": { "interval": "1s", "gracePeriod": "0s" } }),
    )
    .await;
    assert_eq!(err.code, 422);
    assert!(
        err.message.contains("spec.rotation.interval") && err.message.contains("at least 10m"),
        "{}",
        err.message
    );
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let err = create_source(
        &client,
        &format!("poll-{suffix}"),
        json!({ "kubernetesSecret": { "name": "a" }, "refreshInterval": "1s" }),
    )
    .await
    .expect_err("1s refresh");
    assert!(
        err.message.contains("spec.refreshInterval") && err.message.contains("at least 10s"),
        "{}",
        err.message
    );
    let err = refused(
        &api,
        "bad-kind",
        json!({ "sourceRef": { "kind": "Secret", "name": "anthropic-admin" } }),
    )
    .await;
    assert!(
        err.message.contains("spec.sourceRef.kind"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn grace_period_must_be_shorter_than_interval() {
    let (_, api, _) = setup().await;
    for (name, grace) in [("grace-equal", "24h"), ("grace-longer", "25h")] {
        let spec = json!({ "sourceRef": k8s_source(), "rotation": { "interval": "24h", "gracePeriod": grace } });
        let err = refused(&api, name, spec).await;
        assert!(
            err.message
                .contains("gracePeriod must be shorter than interval"),
            "{}",
            err.message
        );
    }
}

#[tokio::test]
async fn malformed_values_are_refused_with_the_field_named() {
    let (_, api, _) = setup().await;
    let cases = [
        (
            "negative-rpm",
            json!({ "limits": { "requestsPerMinute": -1 } }),
            "spec.limits.requestsPerMinute",
        ),
        (
            "zero-tokens",
            json!({ "scope": { "maxTokens": 0 } }),
            "spec.scope.maxTokens",
        ),
        (
            "negative-budget",
            json!({ "limits": { "budget": { "usdPerDay": -0.01 } } }),
            "spec.limits.budget.usdPerDay",
        ),
        (
            "budget-as-text",
            json!({ "limits": { "budget": { "usdPerMonth": "100" } } }),
            "spec.limits.budget.usdPerMonth",
        ),
        (
            "bad-duration",
            json!({ "rotation": { "interval": "90 days" } }),
            "spec.rotation.interval",
        ),
        (
            "bad-glob",
            json!({ "scope": { "models": ["claude sonnet"] } }),
            "spec.scope.models[0]",
        ),
        (
            "bad-endpoint",
            json!({ "scope": { "endpoints": ["complete"] } }),
            "spec.scope.endpoints[0]",
        ),
        (
            "bad-detector",
            json!({ "dataProtection": { "redact": ["passport"] } }),
            "spec.dataProtection.redact[0]",
        ),
        (
            "bad-injection",
            json!({ "dataProtection": { "promptInjection": "maybe" } }),
            "spec.dataProtection.promptInjection",
        ),
        (
            "bad-expiry",
            json!({ "expiresAt": "next tuesday" }),
            "spec.expiresAt",
        ),
        (
            // A shared gateway compiles every pattern: their number is bounded at the door.
            "too-many-patterns",
            json!({ "dataProtection": { "customPatterns": (0..33)
                .map(|i| json!({ "name": format!("p{i}"), "regex": format!("EMP-{i}") }))
                .collect::<Vec<_>>() } }),
            "spec.dataProtection.customPatterns",
        ),
        (
            "too-many-models",
            json!({ "scope": { "models": (0..17).map(|i| format!("claude-{i}-*")).collect::<Vec<_>>() } }),
            "spec.scope.models",
        ),
        (
            // Every list a namespace writes is held by a shared gateway, per ClaudeKey.
            "too-many-betas",
            json!({ "scope": { "betas": (0..65).map(|i| format!("beta-{i}")).collect::<Vec<_>>() } }),
            "spec.scope.betas",
        ),
        (
            "too-many-mcp-servers",
            json!({ "scope": { "mcpServers": (0..33).map(|i| format!("https://mcp{i}.example.com/sse")).collect::<Vec<_>>() } }),
            "spec.scope.mcpServers",
        ),
        (
            "too-many-endpoints",
            json!({ "scope": { "endpoints": vec!["messages"; 9] } }),
            "spec.scope.endpoints",
        ),
        (
            "too-many-detectors",
            json!({ "dataProtection": { "redact": vec!["email"; 9] } }),
            "spec.dataProtection.redact",
        ),
        (
            "too-long-model",
            json!({ "scope": { "models": [format!("claude-{}*", "a".repeat(58))] } }),
            "spec.scope.models[0]",
        ),
    ];
    for (name, extra, field) in cases {
        let mut spec = json!({ "sourceRef": k8s_source() });
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let err = refused(&api, name, spec).await;
        assert_eq!(err.code, 422, "{name}: {}", err.message);
        assert!(
            err.message.contains(field),
            "{name}: message does not name {field}: {}",
            err.message
        );
    }
}

//! Workload identity federation on real pods (issue 19, placement `namespace`, DESIGN.md §11):
//! the injected sidecar reads the token the kubelet projected for its pod, exchanges it at the
//! fake's `/v1/oauth/token` (which verifies it with this apiserver's discovery document and
//! JWKS), and the app — the official SDK, unchanged, with the placeholder key — gets an answer.
//!
//! The kubelet decides who may read the projected token file (mode and owner depend on the pod's
//! `fsGroup` and on whether all containers run as one user), and the sidecar runs as uid 65532
//! while the app runs as another user: so the token file is looked at on the node itself, for
//! the pod shape every app here has (no `fsGroup`) and for one with `fsGroup`.
//!
//! The fake fetches the issuer's JWKS from the issuer URL, as Anthropic does: here the apiserver
//! on loopback (`CLAUDEKEY_TEST_APISERVER`, CA `CLAUDEKEY_TEST_CA`). Against another cluster
//! (hack/e2e-cluster.sh) those must name its issuer, reachable from this process, or the test
//! fails saying so; the look at the file on disk is for our node only.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1::{Container, Event, Pod};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::Value;

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource};
use claudekey::fake_upstream::{FakeUpstream, FederationRule};

use super::fixture::{installed, node_client};
use super::manifests::{app_pod, claudekey, federation_source};
use super::{logs, namespace, wait_claudekey_ready};
use crate::support::eventually;

const AUDIENCE: &str = "https://api.anthropic.com";
const ORG: &str = "0f1e2d3c-aaaa-bbbb-cccc-00000000000e";
const SVAC: &str = "svac_01NodeServiceAccount";
const RULE: &str = "fdrl_01NodeRule";
/// The shortest lifetime a source may ask the kubelet for.
const TOKEN_SECONDS: i64 = 600;
const SIDECAR_UID: u32 = 65532;
const FS_GROUP: i64 = 3000;
const SIDECAR: &str = "claudekey-proxy";
const IDENTITY_VOLUME: &str = "claudekey-identity";

/// What the app holds (names only, never values), then one call through the sidecar; then it
/// idles so the sidecar's metrics can be read. Bounded: a test that dies leaves no pod forever.
const SDK_FEDERATED: &str = r#"
import base64, json, os, time, anthropic
names = sorted(n for n in os.environ if n.startswith("ANTHROPIC_"))
print("ENV", " ".join(names), flush=True)
secret = [n for n, v in os.environ.items() if v.startswith("sk-ant-") or v.startswith("eyJ")]
print("SECRET_ENV", len(secret), flush=True)
print("IDENTITY_DIR", os.path.exists("/var/run/secrets/claudekey.io"), flush=True)
try:
    # The app's own ServiceAccount token, if mounted: its audience is the apiserver's.
    own = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read().split(".")[1]
    aud = json.loads(base64.urlsafe_b64decode(own + "=" * (-len(own) % 4)))["aud"]
    print("OWN_TOKEN_AUD", json.dumps(aud), flush=True)
except OSError:
    print("OWN_TOKEN_AUD none", flush=True)
try:
    # max_retries=0: a 503 from a failed exchange shows here at once.
    client = anthropic.Anthropic(max_retries=0, timeout=20)
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=32,
                                 messages=[{"role": "user", "content": "Say hello."}])
    print("ANSWER", msg.content[0].text, flush=True)
except Exception as e:
    print("FAIL", type(e).__name__, e, flush=True)
time.sleep(120)
"#;

/// Lets anonymous clients (Anthropic, here the fake) read the issuer's discovery document and
/// JWKS, as docs/federation.md tells a self-managed cluster to.
async fn allow_issuer_discovery(client: &Client) {
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some("claudekey-node-issuer-discovery".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "system:service-account-issuer-discovery".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: "system:unauthenticated".into(),
            namespace: None,
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "claudekey-node-issuer-discovery",
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&binding),
        )
        .await
        .expect("bind issuer discovery for anonymous clients");
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: source the node's env file (another cluster: the issuer and its CA, see the module doc)"))
}

/// The fake's rule trusting this cluster's issuer (the apiserver's `--service-account-issuer`)
/// for `subject`.
fn rule(subject: &str) -> FederationRule {
    let ca = env("CLAUDEKEY_TEST_CA");
    FederationRule {
        id: RULE.into(),
        organization_id: ORG.into(),
        service_account_id: SVAC.into(),
        issuer: format!("{}/", env("CLAUDEKEY_TEST_APISERVER")),
        audience: AUDIENCE.into(),
        subject: subject.into(),
        token_lifetime: Duration::from_secs(3600),
        issuer_ca_pem: std::fs::read(&ca).unwrap_or_else(|e| panic!("read {ca}: {e}")),
    }
}

/// The unverified claims of a JWT (the fake verified them; this only reads them).
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// The identity tokens the sidecar of pod `ns/name` sent to the fake's token endpoint.
fn assertions_of(upstream: &FakeUpstream, ns: &str, name: &str) -> Vec<String> {
    upstream
        .received()
        .iter()
        .filter(|r| r.path == "/v1/oauth/token")
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter(|b| b["federation_rule_id"] == RULE)
        .filter_map(|b| b["assertion"].as_str().map(str::to_string))
        .filter(|a| {
            let pod = &claims(a)["kubernetes.io"];
            pod["namespace"] == ns && pod["pod"]["name"] == name
        })
        .collect()
}

/// Whether uid 65532 (group 65532, plus `fs_group` as the kubelet adds it) may read a file.
fn sidecar_can_read(uid: u32, gid: u32, mode: u32, fs_group: Option<u32>) -> bool {
    mode & 0o004 != 0
        || (uid == SIDECAR_UID && mode & 0o400 != 0)
        || ((gid == SIDECAR_UID || Some(gid) == fs_group) && mode & 0o040 != 0)
}

/// The token the kubelet projected into `pod`, read on the node, and whether the sidecar can
/// read it (with the file's owner and mode, for the failure message).
fn projected_token(pod: &Pod, fs_group: Option<u32>) -> (String, bool, String) {
    let uid = pod.metadata.uid.as_deref().expect("pod uid");
    let path = format!(
        "{}/pods/{uid}/volumes/kubernetes.io~projected/{IDENTITY_VOLUME}/token",
        env("CLAUDEKEY_TEST_KUBELET_DIR")
    );
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    let token = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mode = meta.mode() & 0o7777;
    let shape = format!("uid {} gid {} mode {mode:o}", meta.uid(), meta.gid());
    (
        token,
        sidecar_can_read(meta.uid(), meta.gid(), mode, fs_group),
        shape,
    )
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The identity token reaches the sidecar only: the app mounts no projected token of claudekey
/// and has no credential of its own in its env (the placeholder and the loopback base URL only).
fn assert_only_the_sidecar_holds_the_token(pod: &Pod, ns: &str) {
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == IDENTITY_VOLUME)
        .unwrap_or_else(|| panic!("{ns}: no {IDENTITY_VOLUME} volume"));
    let projection = volume
        .projected
        .as_ref()
        .expect("a projected volume")
        .sources
        .as_ref();
    let token = projection
        .and_then(|s| s.iter().find_map(|p| p.service_account_token.as_ref()))
        .expect("a serviceAccountToken projection");
    assert_eq!(token.audience.as_deref(), Some(AUDIENCE));
    assert_eq!(token.expiration_seconds, Some(TOKEN_SECONDS));
    let mounts = |c: &Container| -> Vec<String> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| m.name.clone())
            .collect()
    };
    let sidecar = container(pod, SIDECAR);
    assert!(mounts(sidecar).contains(&IDENTITY_VOLUME.to_string()));
    assert!(
        sidecar
            .args
            .iter()
            .flatten()
            .any(|a| a == "--identity-token-file"),
        "{:?}",
        sidecar.args
    );
    let app = container(pod, "app");
    assert!(!mounts(app).contains(&IDENTITY_VOLUME.to_string()));
    assert!(app.env_from.is_none(), "{:?}", app.env_from);
    for var in app.env.iter().flatten() {
        let value = var.value.as_deref().unwrap_or_default();
        match var.name.as_str() {
            "ANTHROPIC_BASE_URL" => assert!(value.starts_with("http://127.0.0.1:"), "{value}"),
            "ANTHROPIC_API_KEY" => assert_eq!(value, "claudekey-sidecar"),
            name => assert!(!name.starts_with("ANTHROPIC_"), "the app has {name}"),
        }
        assert!(var.value_from.is_none(), "{} from elsewhere", var.name);
    }
}

/// The sidecar's metrics, scraped on the pod's address as Prometheus would.
fn metrics(pod: &Pod) -> String {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let args = container(pod, SIDECAR).args.clone().unwrap_or_default();
    let listen = args
        .iter()
        .skip_while(|a| *a != "--metrics-listen")
        .nth(1)
        .expect("--metrics-listen");
    let port = listen.rsplit_once(':').expect("host:port").1;
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{ip}:{port}/metrics"),
        ])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "scrape the sidecar's metrics");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn a_sidecar_exchanges_its_pods_projected_token_and_the_sdk_gets_answers() {
    let fx = installed();
    let client = node_client().await;
    allow_issuer_discovery(&client).await;
    let ns = namespace(&client, "node-wif").await;
    // The pods name no ServiceAccount: theirs is `default`, and so is the token's subject.
    fx.upstream
        .add_federation_rule(rule(&format!("system:serviceaccount:{ns}:default")));
    Api::<ClusterClaudeKeySource>::all(client.clone())
        .create(
            &PostParams::default(),
            &federation_source(&ns, "bot", (ORG, SVAC, RULE), AUDIENCE, TOKEN_SECONDS),
        )
        .await
        .expect("create the federation ClusterClaudeKeySource");
    Api::<ClaudeKey>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &claudekey(&ns, "bot", "20s"))
        .await
        .expect("create the ClaudeKey");
    let ck = wait_claudekey_ready(&client, &ns, "bot").await;
    let identity = ck.status.as_ref().and_then(|s| s.identity_token.clone());
    assert_eq!(
        identity.map(|t| (t.audience, t.expiration_seconds)),
        Some((AUDIENCE.to_string(), TOKEN_SECONDS))
    );

    // The pod shape of every app here (runAsUser 1000, no fsGroup), and one with fsGroup.
    let plain = app_pod("wif-plain", "bot", SDK_FEDERATED, "Never");
    let mut grouped = app_pod("wif-fsgroup", "bot", SDK_FEDERATED, "Never");
    let security = grouped
        .spec
        .as_mut()
        .and_then(|s| s.security_context.as_mut());
    security.expect("securityContext").fs_group = Some(FS_GROUP);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for pod in [&plain, &grouped] {
        pods.create(&PostParams::default(), pod)
            .await
            .expect("create the app pod (the webhook injects the federated sidecar)");
    }

    let mut secrets = Vec::new();
    let mut texts = Vec::new();
    for (name, fs_group) in [("wif-plain", None), ("wif-fsgroup", Some(FS_GROUP as u32))] {
        let out = eventually(Duration::from_secs(90), "the app's call", || async {
            let out = logs(&client, &ns, name, "app").await;
            (out.contains("ANSWER") || out.contains("FAIL")).then_some(out)
        })
        .await;
        let proxy = logs(&client, &ns, name, SIDECAR).await;
        let pod = pods.get(name).await.expect("the app pod");
        // On our node, the file the kubelet wrote, as the sidecar (uid 65532) finds it.
        let on_disk = std::env::var_os("CLAUDEKEY_TEST_NODE").is_some().then(|| {
            let (token, readable, shape) = projected_token(&pod, fs_group);
            eprintln!("{name}: the projected token file is {shape}");
            assert!(
                readable,
                "{name}: the sidecar (uid {SIDECAR_UID}) cannot read the token file ({shape})"
            );
            token
        });
        assert!(
            out.contains("ANSWER Hello from the fake Anthropic API."),
            "{name} app output:\n{out}\nproxy:\n{proxy}"
        );
        assert_only_the_sidecar_holds_the_token(&pod, &ns);
        assert!(out.contains("SECRET_ENV 0"), "{out}");
        assert!(out.contains("IDENTITY_DIR False"), "{out}");
        assert!(
            out.contains("ENV ANTHROPIC_API_KEY ANTHROPIC_BASE_URL\n"),
            "{out}"
        );
        // The app's own ServiceAccount token, if any, is not one the rule accepts.
        let own = out
            .lines()
            .find_map(|l| l.strip_prefix("OWN_TOKEN_AUD "))
            .expect("OWN_TOKEN_AUD line");
        assert!(!own.contains(AUDIENCE), "{own}");

        // The sidecar exchanged one token, its own pod's (as the kubelet projects it: bound to
        // the pod, the pod's ServiceAccount, the source's audience), the one on disk.
        let sent = assertions_of(&fx.upstream, &ns, name);
        assert_eq!(sent.len(), 1, "{name}: {} exchanges", sent.len());
        let token = sent[0].clone();
        let claims = claims(&token);
        assert_eq!(claims["sub"], format!("system:serviceaccount:{ns}:default"));
        assert!(
            claims["aud"].as_array().is_some_and(|a| a == &[AUDIENCE]),
            "{claims}"
        );
        if let Some(file) = &on_disk {
            assert!(
                *file == token,
                "{name}: the sidecar sent another token than its file's"
            );
        }
        // Accepted, once.
        let digest = claudekey::keys::sha256_hex(&token);
        let exchanged: Vec<_> = fx
            .upstream
            .exchanges()
            .into_iter()
            .filter(|e| e.assertion_sha256 == digest)
            .collect();
        assert_eq!(exchanged.len(), 1, "{name}: {exchanged:?}");
        assert_eq!(exchanged[0].rule_id, RULE);
        assert_eq!(exchanged[0].refusal, None);

        if fs_group.is_none() {
            let metrics = metrics(&pod);
            assert!(
                metrics.lines().any(|l| {
                    l.starts_with("claudekey_proxy_federation_exchanges_total{")
                        && l.contains("outcome=\"ok\"")
                        && l.ends_with(" 1")
                }),
                "{metrics}"
            );
            // The body budget is what the flag the webhook injected says (half the sidecar's
            // memory limit), in the real binary.
            let args = container(&pod, SIDECAR).args.clone().unwrap_or_default();
            let mib: usize = args
                .iter()
                .skip_while(|a| *a != "--body-budget-mib")
                .nth(1)
                .expect("--body-budget-mib injected")
                .parse()
                .expect("a number of MiB");
            let limit = format!("claudekey_proxy_body_budget_limit_bytes {}", mib << 20);
            assert!(metrics.lines().any(|l| l == limit), "{limit}\n{metrics}");
            texts.push((format!("{name} metrics"), metrics));
        }
        secrets.push(token);
        texts.push((format!("{name} app log"), out));
        texts.push((format!("{name} proxy log"), proxy));
    }

    // The Messages calls went upstream with the access tokens, never the placeholder.
    let received = fx.upstream.received();
    let issued = fx.upstream.issued_access_tokens();
    let bearers: Vec<String> = received
        .iter()
        .filter(|r| r.path.starts_with("/v1/messages"))
        .filter_map(|r| {
            r.header("authorization")?
                .strip_prefix("Bearer ")
                .map(str::to_string)
        })
        .filter(|t| t.starts_with("sk-ant-oat01-"))
        .collect();
    let ours: Vec<&String> = issued.iter().filter(|t| bearers.contains(t)).collect();
    assert!(
        ours.len() >= 2,
        "no Messages call with an issued access token"
    );
    assert!(
        !received
            .iter()
            .any(|r| r.header("x-api-key") == Some("claudekey-sidecar"))
    );
    secrets.extend(issued);

    // No token in a log, the metrics, an Event or the ClaudeKey.
    let events = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("list Events");
    texts.push((
        "Events".into(),
        serde_json::to_string(&events).expect("JSON"),
    ));
    let ck = Api::<ClaudeKey>::namespaced(client.clone(), &ns)
        .get("bot")
        .await
        .expect("the ClaudeKey");
    texts.push((
        "ClaudeKey".into(),
        serde_json::to_string(&ck).expect("JSON"),
    ));
    for (what, text) in &texts {
        assert!(
            !text.contains("sk-ant-oat01-"),
            "an access token is in the {what}"
        );
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a token is in the {what}");
        }
    }

    for name in ["wif-plain", "wif-fsgroup"] {
        let _ = pods
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await;
    }
}

/// The readability rule the node test applies to the token file can say no.
#[test]
fn sidecar_can_read_follows_owner_group_and_other_bits() {
    assert!(sidecar_can_read(0, 0, 0o644, None));
    assert!(!sidecar_can_read(0, 0, 0o600, None));
    assert!(!sidecar_can_read(0, 0, 0o640, None));
    assert!(sidecar_can_read(0, 3000, 0o640, Some(3000)));
    assert!(!sidecar_can_read(0, 3000, 0o600, Some(3000)));
    assert!(sidecar_can_read(SIDECAR_UID, 0, 0o600, None));
    assert!(!sidecar_can_read(1000, 1000, 0o600, None));
}

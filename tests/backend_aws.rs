//! The AWS Secrets Manager backend against a real moto server (AWS wire protocol), started by
//! `hack/control-plane.sh start`. Fails, never skips, when the server is not there.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::Credentials;
use claudekey::backend::aws::AwsSecretsManagerBackend;
use claudekey::backend::{BackendError, SecretBackend, UpstreamKey};
use claudekey::crd::SourceSpec;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::sync::RwLock;

const ENDPOINT_ENV: &str = "CLAUDEKEY_TEST_AWS_ENDPOINT";
const REGION_ENV: &str = "CLAUDEKEY_TEST_AWS_REGION";

fn endpoint() -> String {
    std::env::var(ENDPOINT_ENV).unwrap_or_else(|_| {
        panic!("{ENDPOINT_ENV} is not set: start moto with hack/control-plane.sh start and source its env file")
    })
}

fn region() -> String {
    std::env::var(REGION_ENV).unwrap_or_else(|_| "us-east-1".to_string())
}

async fn sdk_config(endpoint: &str, access_key: &str, secret_key: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region()))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "claudekey-tests",
        ))
        .load()
        .await
}

/// A client for arranging secrets, and a backend under test, both pointed at moto.
async fn setup() -> (Client, AwsSecretsManagerBackend) {
    let config = sdk_config(&endpoint(), "testing", "testing").await;
    (
        Client::new(&config),
        AwsSecretsManagerBackend::from_sdk_config(config),
    )
}

/// moto enforces IAM for the whole server or not at all. Every test holds this lock for reading;
/// the IAM test takes it for writing while it switches enforcement on.
static MOTO_AUTH: RwLock<()> = RwLock::const_new(());

fn unique(prefix: &str) -> String {
    format!("{prefix}/{}", uuid::Uuid::new_v4().simple())
}

fn test_key(tag: &str) -> String {
    format!("sk-ant-api03-{tag}-{}-AA", uuid::Uuid::new_v4().simple())
}

fn source(aws: serde_json::Value) -> SourceSpec {
    serde_json::from_value(json!({ "awsSecretsManager": aws })).expect("valid source")
}

async fn create(client: &Client, name: &str, value: &str) -> String {
    client
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .expect("create secret in moto")
        .version_id()
        .expect("moto returns a version id")
        .to_string()
}

async fn fetch(
    backend: &AwsSecretsManagerBackend,
    source: &SourceSpec,
) -> Result<UpstreamKey, BackendError> {
    backend.fetch(source).await
}

/// The error must be of the expected kind, say `needle`, and quote none of `secrets`.
fn assert_error(err: &BackendError, needle: &str, secrets: &[&str]) {
    let msg = err.to_string();
    eprintln!("error as reported: {msg}");
    assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    let debug = format!("{err:?}");
    for s in secrets {
        assert!(
            !msg.contains(s) && !debug.contains(s),
            "error quotes a secret: {msg}"
        );
    }
}

#[tokio::test]
async fn reads_the_current_version_and_follows_a_new_one() {
    let _shared = MOTO_AUTH.read().await;
    let (client, backend) = setup().await;
    let name = unique("prod/claude/rotate");
    let (k1, k2) = (test_key("one"), test_key("two"));
    let v1 = create(&client, &name, &k1).await;
    let src = source(json!({ "secretId": name }));

    let got = fetch(&backend, &src).await.expect("fetch v1");
    assert_eq!(got.value.expose_secret(), k1);
    assert_eq!(got.version, v1);

    let v2 = client
        .put_secret_value()
        .secret_id(&name)
        .secret_string(&k2)
        .send()
        .await
        .expect("put new value")
        .version_id()
        .expect("version id")
        .to_string();
    assert_ne!(v1, v2);
    let got = fetch(&backend, &src).await.expect("fetch v2");
    assert_eq!(
        got.value.expose_secret(),
        k2,
        "AWSCURRENT moved to the new value"
    );
    assert_eq!(got.version, v2);

    // The old value is still there under AWSPREVIOUS, for the grace overlap.
    let previous = source(json!({ "secretId": name, "versionStage": "AWSPREVIOUS" }));
    let got = fetch(&backend, &previous).await.expect("fetch AWSPREVIOUS");
    assert_eq!(got.value.expose_secret(), k1);
    assert_eq!(got.version, v1);
}

#[tokio::test]
async fn reads_a_field_of_a_json_secret() {
    let _shared = MOTO_AUTH.read().await;
    let (client, backend) = setup().await;
    let name = unique("prod/claude/json");
    let key = test_key("json");
    let version = create(
        &client,
        &name,
        &json!({ "api_key": key, "owner": "team-a" }).to_string(),
    )
    .await;

    let got = fetch(
        &backend,
        &source(json!({ "secretId": name, "jsonField": "api_key" })),
    )
    .await
    .expect("fetch json field");
    assert_eq!(got.value.expose_secret(), key);
    assert_eq!(got.version, version);

    let err = fetch(&backend, &source(json!({ "secretId": name })))
        .await
        .expect_err("JSON without jsonField");
    assert!(matches!(err, BackendError::Malformed { .. }), "{err}");
    assert_error(
        &err,
        "set the source's awsSecretsManager.jsonField",
        &[&key],
    );

    let err = fetch(
        &backend,
        &source(json!({ "secretId": name, "jsonField": "apiKey" })),
    )
    .await
    .expect_err("missing field");
    assert!(matches!(err, BackendError::Malformed { .. }), "{err}");
    assert_error(&err, "no field \"apiKey\" (fields: ", &[&key]);
}

#[tokio::test]
async fn malformed_json_is_reported_without_the_value() {
    let _shared = MOTO_AUTH.read().await;
    let (client, backend) = setup().await;
    let name = unique("prod/claude/malformed");
    let key = test_key("malformed");
    create(&client, &name, &format!(r#"{{"api_key": "{key}""#)).await;

    let err = fetch(
        &backend,
        &source(json!({ "secretId": name, "jsonField": "api_key" })),
    )
    .await
    .expect_err("malformed JSON");
    assert!(
        matches!(err, BackendError::Malformed { .. }) && !err.is_transient(),
        "{err}"
    );
    assert_error(&err, "not valid JSON", &[&key, "sk-ant-"]);
    assert_error(&err, &name, &[]);
}

#[tokio::test]
async fn a_missing_secret_says_which_and_where() {
    let _shared = MOTO_AUTH.read().await;
    let (_client, backend) = setup().await;
    let name = unique("prod/claude/missing");
    let err = fetch(&backend, &source(json!({ "secretId": name })))
        .await
        .expect_err("missing secret");
    assert!(
        matches!(err, BackendError::NotFound { .. }) && !err.is_transient(),
        "{err}"
    );
    assert_error(
        &err,
        &format!("secret {name} not found in {}", region()),
        &[],
    );
}

#[tokio::test]
async fn a_secret_in_another_region_is_not_found_there() {
    let _shared = MOTO_AUTH.read().await;
    let (client, backend) = setup().await;
    let name = unique("prod/claude/region");
    let key = test_key("region");
    create(&client, &name, &key).await;
    let other = if region() == "eu-west-1" {
        "us-west-2"
    } else {
        "eu-west-1"
    };

    let err = fetch(
        &backend,
        &source(json!({ "secretId": name, "region": other })),
    )
    .await
    .expect_err("wrong region");
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert_error(
        &err,
        &format!("secret {name} not found in {other}"),
        &[&key],
    );
    // The same backend still reads the home region with its other cached client.
    let got = fetch(
        &backend,
        &source(json!({ "secretId": name, "region": region() })),
    )
    .await
    .expect("home region");
    assert_eq!(got.value.expose_secret(), key);
}

#[tokio::test]
async fn a_missing_version_stage_is_not_found() {
    let _shared = MOTO_AUTH.read().await;
    let (client, backend) = setup().await;
    let name = unique("prod/claude/stage");
    create(&client, &name, &test_key("stage")).await;
    let err = fetch(
        &backend,
        &source(json!({ "secretId": name, "versionStage": "AWSPENDING" })),
    )
    .await
    .expect_err("no AWSPENDING version");
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert_error(&err, "stage AWSPENDING", &[]);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient() {
    let _shared = MOTO_AUTH.read().await;
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = sdk_config(&format!("http://127.0.0.1:{port}"), "testing", "testing").await;
    let backend = AwsSecretsManagerBackend::from_sdk_config(config);
    let err = fetch(&backend, &source(json!({ "secretId": "prod/claude/x" })))
        .await
        .expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    assert_error(&err, "failed to reach Secrets Manager", &[]);
}

/// One blocking HTTP/1.1 request to moto (its admin API and IAM, which the backend never calls).
fn moto_request(path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let url = endpoint();
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host).expect("connect to moto");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("write to moto");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read from moto");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response from moto: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An IAM Query API call. While enforcement is off moto only reads the credential scope of the
/// Authorization header (to route to IAM), not the signature.
fn iam(params: &[(&str, &str)]) -> String {
    let form: Vec<String> = params
        .iter()
        .chain([("Version", "2010-05-08")].iter())
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect();
    let auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0";
    let (status, body) = moto_request(
        "/",
        &[
            ("Authorization", auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &form.join("&"),
    );
    assert_eq!(status, 200, "IAM {params:?}: {body}");
    body
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn xml_field<'a>(xml: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = xml[start..]
        .find(&format!("</{tag}>"))
        .expect("closing tag")
        + start;
    &xml[start..end]
}

/// An IAM user whose only policy allows `actions` on every resource; returns its access key.
fn iam_user_allowed(actions: &[&str]) -> (String, String) {
    let user = format!(
        "claudekey-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    iam(&[("Action", "CreateUser"), ("UserName", &user)]);
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Action": actions, "Resource": "*" }]
    })
    .to_string();
    iam(&[
        ("Action", "PutUserPolicy"),
        ("UserName", &user),
        ("PolicyName", "claudekey"),
        ("PolicyDocument", &policy),
    ]);
    let key = iam(&[("Action", "CreateAccessKey"), ("UserName", &user)]);
    (
        xml_field(&key, "AccessKeyId").to_string(),
        xml_field(&key, "SecretAccessKey").to_string(),
    )
}

/// Switches moto's IAM enforcement on, and off again when dropped (also when the test fails).
struct EnforceIam;

impl EnforceIam {
    fn on() -> Self {
        let (status, body) = moto_request(
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            "0",
        );
        assert_eq!(status, 200, "enable moto auth: {body}");
        EnforceIam
    }
}

impl Drop for EnforceIam {
    fn drop(&mut self) {
        let (status, body) = moto_request(
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            "inf",
        );
        assert_eq!(status, 200, "disable moto auth: {body}");
    }
}

/// moto evaluates the Action of IAM policies but not their Resource (moto/iam/access_control.py:
/// "TODO add support for the Resource and Condition parts"), so least privilege per ARN cannot
/// be shown here; a principal without the action, and unknown credentials, can.
#[tokio::test]
async fn access_denied_says_which_permission_to_grant() {
    let _exclusive = MOTO_AUTH.write().await;
    let (client, _) = setup().await;
    let name = unique("prod/claude/iam");
    let key = test_key("iam");
    create(&client, &name, &key).await;
    let (denied_id, denied_secret) = iam_user_allowed(&["secretsmanager:DescribeSecret"]);
    let (allowed_id, allowed_secret) = iam_user_allowed(&["secretsmanager:GetSecretValue"]);
    let src = source(json!({ "secretId": name }));
    let backend_as = |id: String, secret: String| async move {
        AwsSecretsManagerBackend::from_sdk_config(sdk_config(&endpoint(), &id, &secret).await)
    };
    let denied = backend_as(denied_id, denied_secret).await;
    let allowed = backend_as(allowed_id, allowed_secret).await;
    let unknown = backend_as("AKIAUNKNOWN000000000".into(), "nope".into()).await;

    let _iam = EnforceIam::on();
    let err = fetch(&denied, &src)
        .await
        .expect_err("no GetSecretValue permission");
    assert!(
        matches!(err, BackendError::AccessDenied { .. }) && !err.is_transient(),
        "{err}"
    );
    assert_error(
        &err,
        &format!("grant secretsmanager:GetSecretValue on {name}"),
        &[&key],
    );

    let got = fetch(&allowed, &src)
        .await
        .expect("the granted principal reads it");
    assert_eq!(got.value.expose_secret(), key);

    // moto answers this JSON-protocol API with XML error bodies, which the SDK cannot parse, so
    // here both denials arrive as a bare 403 and share a message naming both causes; real AWS
    // sends the JSON error code (UnrecognizedClientException), covered by the unit tests.
    let err = fetch(&unknown, &src)
        .await
        .expect_err("unknown credentials");
    assert!(matches!(err, BackendError::AccessDenied { .. }), "{err}");
    assert_error(&err, "IRSA / EKS Pod Identity", &[&key, "nope"]);
}

/// With no credentials at all (no IRSA, no Pod Identity, nothing in the chain) the message says
/// what to set up rather than "dispatch failure".
#[tokio::test]
async fn no_credentials_points_at_irsa() {
    let _shared = MOTO_AUTH.read().await;
    let config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region()))
        .endpoint_url(endpoint())
        .build();
    let backend = AwsSecretsManagerBackend::from_sdk_config(config);
    let err = fetch(&backend, &source(json!({ "secretId": "prod/claude/x" })))
        .await
        .expect_err("no credentials");
    assert!(matches!(err, BackendError::AccessDenied { .. }), "{err}");
    assert_error(&err, "no usable AWS credentials", &[]);
}

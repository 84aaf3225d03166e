//! The `aws` backend: upstream keys in AWS Secrets Manager, read with `GetSecretValue` using the
//! controller's default credential chain (IRSA / EKS Pod Identity in production).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig, timeout::TimeoutConfig};
use aws_sdk_secretsmanager::Client;
use futures::future::BoxFuture;
use secrecy::SecretString;

mod errors;

use self::errors::{Location, map_sdk_error};
use super::{BackendError, SecretBackend, UpstreamKey};
use crate::crd::{AwsSecretsManagerSource, SourceSpec};

/// The stage read when a source names none. Always sent explicitly: moto (and some proxies)
/// treat a missing stage differently from AWS.
pub const DEFAULT_VERSION_STAGE: &str = "AWSCURRENT";

/// How long one `GetSecretValue` (with its retries) may take before the reconcile gives up and
/// backs off; a hung endpoint must not stall the controller.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(20);

/// Controller-wide settings for the AWS backend.
#[derive(Clone, Debug, Default)]
pub struct AwsSettings {
    /// Region for sources that name none; otherwise the SDK's own chain (AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Secrets Manager endpoint override (moto server in tests, a VPC endpoint in production).
    pub endpoint_url: Option<String>,
}

/// Reads upstream keys from AWS Secrets Manager, one SDK client per region.
pub struct AwsSecretsManagerBackend {
    base: SdkConfig,
    clients: Mutex<HashMap<String, Client>>,
}

impl AwsSecretsManagerBackend {
    /// Loads the default credential and region chain once, with `settings` applied on top.
    pub async fn new(settings: &AwsSettings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        Self::from_sdk_config(loader.load().await)
    }

    /// Uses an already loaded SDK configuration (tests pass static credentials this way).
    pub fn from_sdk_config(base: SdkConfig) -> Self {
        Self {
            base,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The region a source is read from: its own, else the controller's.
    fn region_for(&self, source: &AwsSecretsManagerSource) -> Result<String, BackendError> {
        source
            .region
            .clone()
            .or_else(|| self.base.region().map(|r| r.to_string()))
            .ok_or_else(|| BackendError::NotConfigured {
                backend: "aws",
                detail: format!(
                    "no region for secret {}: set awsSecretsManager.region on the source, or the \
                     controller's default region (chart value backends.aws.region, flag --aws-region)",
                    source.secret_id
                ),
            })
    }

    /// The cached client for `region`, built on first use. Clients are cheap handles over a
    /// shared connection pool, so caching one per region keeps connections warm.
    fn client(&self, region: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let conf = aws_sdk_secretsmanager::config::Builder::from(&self.base)
                    .region(Region::new(region.to_string()))
                    .build();
                Client::from_conf(conf)
            })
            .clone()
    }

    async fn fetch_aws(
        &self,
        source: &AwsSecretsManagerSource,
    ) -> Result<UpstreamKey, BackendError> {
        let region = self.region_for(source)?;
        let stage = source
            .version_stage
            .as_deref()
            .unwrap_or(DEFAULT_VERSION_STAGE);
        let at = Location {
            secret_id: &source.secret_id,
            region: &region,
            stage,
        };
        let out = self
            .client(&region)
            .get_secret_value()
            .secret_id(&source.secret_id)
            .version_stage(stage)
            .send()
            .await
            .map_err(|err| map_sdk_error(&at, &err))?;
        let version = out
            .version_id()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| BackendError::Malformed {
                source_name: at.name(),
                detail: "Secrets Manager returned no VersionId".to_string(),
            })?
            .to_string();
        let text = match (out.secret_string(), out.secret_binary()) {
            (Some(s), _) => s,
            (None, Some(b)) => std::str::from_utf8(b.as_ref()).map_err(|_| BackendError::Malformed {
                source_name: at.name(),
                detail: "the secret holds binary data that is not UTF-8 text; store the key as SecretString"
                    .to_string(),
            })?,
            (None, None) => {
                return Err(BackendError::Malformed {
                    source_name: at.name(),
                    detail: "the secret version holds no value".to_string(),
                });
            }
        };
        let value = extract_value(
            text,
            source.json_field.as_deref(),
            "the source's awsSecretsManager.jsonField",
        )
        .map_err(|detail| BackendError::Malformed {
            source_name: at.name(),
            detail,
        })?;
        Ok(UpstreamKey { value, version })
    }
}

impl SecretBackend for AwsSecretsManagerBackend {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn fetch<'a>(
        &'a self,
        source: &'a SourceSpec,
    ) -> BoxFuture<'a, Result<UpstreamKey, BackendError>> {
        Box::pin(async move {
            let aws =
                source
                    .aws_secrets_manager
                    .as_ref()
                    .ok_or_else(|| BackendError::NotConfigured {
                        backend: "aws",
                        detail: format!(
                            "source {} is not an awsSecretsManager source",
                            source.describe()
                        ),
                    })?;
            self.fetch_aws(aws).await
        })
    }
}

/// Turns the stored text into the key: the text itself, or one string field of a JSON object.
/// The error is a detail that never quotes the text (it may be the key, or hold it).
pub(crate) fn extract_value(
    text: &str,
    json_field: Option<&str>,
    field_setting: &str,
) -> Result<SecretString, String> {
    let trimmed = text.trim();
    let value = match json_field {
        Some(field) => {
            let parsed: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| {
                format!(
                    "{field_setting} is {field:?} but the value is not valid JSON ({:?} error at line {} column {}); \
                     store a JSON object or unset {field_setting}",
                    e.classify(),
                    e.line(),
                    e.column()
                )
            })?;
            let object = parsed.as_object().ok_or_else(|| {
                format!("{field_setting} is {field:?} but the value is JSON that is not an object")
            })?;
            match object.get(field) {
                Some(serde_json::Value::String(s)) => s.trim().to_string(),
                Some(_) => {
                    return Err(format!("field {field:?} of the JSON value is not a string"));
                }
                None => {
                    return Err(format!(
                        "the JSON value has no field {field:?} (fields: {}); fix {field_setting}",
                        field_list(object)
                    ));
                }
            }
        }
        None => {
            if trimmed.starts_with('{')
                && let Ok(serde_json::Value::Object(object)) = serde_json::from_str(trimmed)
            {
                return Err(format!(
                    "the value is a JSON object (fields: {}); set {field_setting} to the field that holds the key",
                    field_list(&object)
                ));
            }
            trimmed.to_string()
        }
    };
    if value.is_empty() {
        return Err("the key is empty".to_string());
    }
    Ok(SecretString::from(value))
}

/// Names (never values) of a JSON object's fields, bounded so a huge object stays a short message.
fn field_list(object: &serde_json::Map<String, serde_json::Value>) -> String {
    if object.is_empty() {
        return "none".to_string();
    }
    let mut names: Vec<&str> = object.keys().map(String::as_str).take(10).collect();
    if object.len() > 10 {
        names.push("…");
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const FIELD: &str = "jsonField";
    const KEY: &str = "sk-ant-api03-unit-test-value-AA";

    #[test]
    fn plain_text_is_the_key_trimmed() {
        let v = extract_value(&format!(" {KEY}\n"), None, FIELD).expect("plain");
        assert_eq!(v.expose_secret(), KEY);
    }

    #[test]
    fn json_field_is_read() {
        let text = format!(r#"{{"api_key":"{KEY}","other":"x"}}"#);
        let v = extract_value(&text, Some("api_key"), FIELD).expect("json");
        assert_eq!(v.expose_secret(), KEY);
    }

    #[test]
    fn json_without_field_setting_is_refused_naming_fields_not_values() {
        let text = format!(r#"{{"api_key":"{KEY}"}}"#);
        let err = extract_value(&text, None, FIELD).expect_err("needs jsonField");
        assert!(err.contains("api_key") && err.contains(FIELD), "{err}");
        assert!(!err.contains(KEY), "{err}");
    }

    #[test]
    fn missing_field_lists_fields_and_never_the_value() {
        let text = format!(r#"{{"key":"{KEY}"}}"#);
        let err = extract_value(&text, Some("api_key"), FIELD).expect_err("missing field");
        assert!(
            err.contains("no field \"api_key\"") && err.contains("key"),
            "{err}"
        );
        assert!(!err.contains(KEY), "{err}");
    }

    #[test]
    fn malformed_json_never_quotes_the_text() {
        let text = format!(r#"{{"api_key":"{KEY}""#);
        let err = extract_value(&text, Some("api_key"), FIELD).expect_err("malformed");
        assert!(err.contains("not valid JSON"), "{err}");
        assert!(!err.contains(KEY) && !err.contains("sk-ant"), "{err}");
        // A bare key with jsonField set is the common misconfiguration.
        let err = extract_value(KEY, Some("api_key"), FIELD).expect_err("bare key");
        assert!(!err.contains("sk-ant"), "{err}");
    }

    #[test]
    fn non_string_field_and_empty_values_are_refused() {
        assert!(extract_value(r#"{"api_key":42}"#, Some("api_key"), FIELD).is_err());
        assert!(extract_value(r#"{"api_key":"  "}"#, Some("api_key"), FIELD).is_err());
        assert!(extract_value("   ", None, FIELD).is_err());
        assert!(extract_value("[1]", Some("api_key"), FIELD).is_err());
    }
}

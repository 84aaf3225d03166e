//! Mapping Secrets Manager failures to `BackendError`s that say what to fix, quoting codes and
//! AWS messages (which name principals and ARNs) but never a response body or a value.

use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

use super::OPERATION_TIMEOUT;
use crate::backend::BackendError;

/// Longest piece of an AWS error message we repeat; AWS messages name principals and ARNs, which
/// help, but we keep status conditions short.
const MAX_MESSAGE: usize = 300;

/// Where a read went, for messages.
pub(super) struct Location<'a> {
    pub(super) secret_id: &'a str,
    pub(super) region: &'a str,
    pub(super) stage: &'a str,
}

impl Location<'_> {
    pub(super) fn name(&self) -> String {
        format!(
            "AWS secret {} (stage {}) in {}",
            self.secret_id, self.stage, self.region
        )
    }
}

/// Maps an SDK failure to a typed error that says what to fix. Only error codes, AWS error
/// messages (which name principals and ARNs, never values) and transport errors are quoted.
pub(super) fn map_sdk_error(
    at: &Location<'_>,
    err: &SdkError<GetSecretValueError, HttpResponse>,
) -> BackendError {
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            classify_service_error(at, e.code(), e.message(), service.raw().status().as_u16())
        }
        SdkError::TimeoutError(_) => BackendError::Unavailable {
            source_name: at.name(),
            detail: format!(
                "Secrets Manager did not answer within {}s",
                OPERATION_TIMEOUT.as_secs()
            ),
        },
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => {
            // Credential-chain failures land here ("no credentials", IRSA token unreadable);
            // the context chain names which provider failed and why.
            let context = truncate(&crate::backend::error_chain(err));
            if context.to_ascii_lowercase().contains("credential") {
                BackendError::AccessDenied {
                    source_name: at.name(),
                    detail: format!(
                        "the controller has no usable AWS credentials ({context}); configure IRSA or EKS \
                         Pod Identity for its service account"
                    ),
                }
            } else {
                BackendError::Unavailable {
                    source_name: at.name(),
                    detail: format!("failed to reach Secrets Manager: {context}"),
                }
            }
        }
        // The body of an unparseable response is never quoted: it could hold the value.
        _ => BackendError::Unavailable {
            source_name: at.name(),
            detail: "failed to read the Secrets Manager response".to_string(),
        },
    }
}

/// The decision behind [`map_sdk_error`] for errors the service returned: by error code, else
/// by HTTP status (IAM denials from some endpoints come in a body the JSON protocol cannot parse).
fn classify_service_error(
    at: &Location<'_>,
    code: Option<&str>,
    message: Option<&str>,
    status: u16,
) -> BackendError {
    let name = at.name();
    let aws_says = message
        .map(|m| format!(" (AWS: {})", truncate(m)))
        .unwrap_or_default();
    let code = match (code, status) {
        (Some(code), _) => code,
        (None, 403) => "Forbidden",
        (None, 404) => "ResourceNotFoundException",
        (None, _) => "unknown",
    };
    match code {
        "ResourceNotFoundException" => BackendError::NotFound {
            source_name: name,
            detail: format!(
                "secret {} not found in {} with stage {}{aws_says}; check the source's awsSecretsManager \
                 secretId, region and versionStage",
                at.secret_id, at.region, at.stage
            ),
        },
        "AccessDeniedException" | "AccessDenied" => BackendError::AccessDenied {
            source_name: name,
            detail: format!(
                "grant secretsmanager:GetSecretValue on {} to the controller's IAM role (and kms:Decrypt \
                 on its KMS key if it uses a customer managed key){aws_says}",
                at.secret_id
            ),
        },
        // A 403 whose body named no error code: a missing permission or bad credentials.
        "Forbidden" => BackendError::AccessDenied {
            source_name: name,
            detail: format!(
                "Secrets Manager answered 403: grant secretsmanager:GetSecretValue on {} to the \
                 controller's IAM role (and kms:Decrypt on its KMS key if it uses a customer managed \
                 key), and check that IRSA / EKS Pod Identity gives the controller valid credentials",
                at.secret_id
            ),
        },
        "DecryptionFailure" => BackendError::AccessDenied {
            source_name: name,
            detail: format!(
                "Secrets Manager could not decrypt the secret; grant kms:Decrypt on the secret's KMS key to \
                 the controller's IAM role{aws_says}"
            ),
        },
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => BackendError::AccessDenied {
            source_name: name,
            detail: format!(
                "AWS rejected the controller's credentials ({code}){aws_says}; check IRSA / EKS Pod \
                 Identity for the controller's service account"
            ),
        },
        "InvalidRequestException" => BackendError::NotFound {
            source_name: name,
            detail: format!(
                "the secret cannot be read in its current state{aws_says}; it may be scheduled for deletion"
            ),
        },
        "InvalidParameterException" | "ValidationException" => BackendError::Malformed {
            source_name: name,
            detail: format!(
                "Secrets Manager refused the request ({code}){aws_says}; check secretId and versionStage"
            ),
        },
        _ => BackendError::Unavailable {
            source_name: name,
            detail: format!("Secrets Manager returned {code} (HTTP {status}){aws_says}"),
        },
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE {
        s.to_string()
    } else {
        let cut: String = s.chars().take(MAX_MESSAGE).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Location<'static> {
        Location {
            secret_id: "prod/claude/x",
            region: "us-east-1",
            stage: "AWSCURRENT",
        }
    }

    #[test]
    fn not_found_names_secret_region_and_stage() {
        let e = classify_service_error(
            &at(),
            Some("ResourceNotFoundException"),
            Some("Secrets Manager can't find the specified secret."),
            400,
        );
        assert!(matches!(e, BackendError::NotFound { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("secret prod/claude/x not found in us-east-1"),
            "{msg}"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn access_denied_says_which_permission_to_grant() {
        let e = classify_service_error(
            &at(),
            Some("AccessDeniedException"),
            Some("User: arn:aws:sts::1:assumed-role/r is not authorized"),
            400,
        );
        assert!(matches!(e, BackendError::AccessDenied { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("grant secretsmanager:GetSecretValue on prod/claude/x"),
            "{msg}"
        );
        let e = classify_service_error(&at(), Some("DecryptionFailure"), None, 400);
        assert!(e.to_string().contains("kms:Decrypt"));
        let e = classify_service_error(&at(), Some("UnrecognizedClientException"), None, 400);
        assert!(matches!(e, BackendError::AccessDenied { .. }));
        // A denial whose body the SDK could not parse is still a denial.
        let e = classify_service_error(&at(), None, None, 403);
        assert!(matches!(e, BackendError::AccessDenied { .. }), "{e}");
    }

    #[test]
    fn throttling_and_server_errors_are_transient() {
        for code in [
            "ThrottlingException",
            "InternalServiceError",
            "ServiceUnavailable",
        ] {
            assert!(
                classify_service_error(&at(), Some(code), None, 400).is_transient(),
                "{code}"
            );
        }
        assert!(
            !classify_service_error(&at(), Some("InvalidParameterException"), None, 400)
                .is_transient()
        );
    }

    #[test]
    fn long_aws_messages_are_truncated() {
        let long = "x".repeat(2000);
        let e = classify_service_error(&at(), Some("ThrottlingException"), Some(&long), 400);
        assert!(e.to_string().len() < 600);
    }
}

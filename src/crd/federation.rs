//! The `workloadIdentityFederation` backend of a `ClusterClaudeKeySource` (DESIGN.md §11): no
//! upstream key exists anywhere; the proxy exchanges a projected service-account token for a
//! short-lived access token at Anthropic (`POST /v1/oauth/token`, RFC 7523 jwt-bearer).
//! Nothing in here is secret: these ids are what the SDK reads from plain environment variables.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Shortest projected-token lifetime the kubelet accepts.
pub const MIN_TOKEN_EXPIRATION_SECONDS: i64 = 600;
/// Longest identity-token lifetime Anthropic accepts (1 h).
pub const MAX_TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// Anthropic's side of a federation: which rule maps the cluster's tokens to which service
/// account, and what the projected token looks like.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityFederationSource {
    /// The Anthropic organization's id (a UUID, as the Console shows it).
    #[schemars(regex(pattern = r"^[0-9A-Za-z-]{1,64}$"))]
    pub organization_id: String,
    /// The Anthropic service account the rule maps tokens to (svac_…).
    #[schemars(regex(pattern = r"^svac_[0-9A-Za-z]{1,128}$"))]
    pub service_account_id: String,
    /// The federation rule that accepts this cluster's tokens (fdrl_…).
    #[schemars(regex(pattern = r"^fdrl_[0-9A-Za-z]{1,128}$"))]
    pub federation_rule_id: String,
    /// The workspace to scope access tokens to (wrkspc_… or default); needed only when the rule
    /// spans several workspaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(default|wrkspc_[0-9A-Za-z]{1,128})$"))]
    pub workspace_id: Option<String>,
    /// The `aud` the projected token carries; the federation rule must expect it. Use a value
    /// only Anthropic accepts (e.g. https://api.anthropic.com), never the apiserver's own
    /// audience, so the token is worthless to anything else.
    #[schemars(length(min = 1, max = 253))]
    pub audience: String,
    /// Lifetime the kubelet gives the projected token, 600 to 3600 s (Anthropic refuses tokens
    /// valid longer than 1 h). The kubelet renews it at 80 % of that.
    #[serde(default = "default_expiration")]
    #[schemars(range(min = 600, max = 3600))]
    pub token_expiration_seconds: i64,
}

fn default_expiration() -> i64 {
    MAX_TOKEN_EXPIRATION_SECONDS
}

/// Reasons of the `FederationReady` condition; each is explained in docs/troubleshooting.md.
pub mod federation_ready {
    /// True: the last exchange gave an access token.
    pub const REASON_TOKEN_EXCHANGED: &str = "TokenExchanged";
    /// False: Anthropic refused the identity token (rule, issuer, audience or subject mismatch).
    pub const REASON_EXCHANGE_REFUSED: &str = "ExchangeRefused";
    /// False: the token endpoint could not be reached or answered with something else.
    pub const REASON_EXCHANGE_FAILED: &str = "ExchangeFailed";
    /// False: no identity token could be read or requested.
    pub const REASON_NO_IDENTITY_TOKEN: &str = "NoIdentityToken";
    /// False: the only identity token at hand was already exchanged and the access token ended.
    pub const REASON_IDENTITY_TOKEN_REUSED: &str = "IdentityTokenReused";

    /// The static reason for one read back from a status (`None`: not one of ours).
    pub fn known(reason: &str) -> Option<&'static str> {
        [
            REASON_TOKEN_EXCHANGED,
            REASON_EXCHANGE_REFUSED,
            REASON_EXCHANGE_FAILED,
            REASON_NO_IDENTITY_TOKEN,
            REASON_IDENTITY_TOKEN_REUSED,
        ]
        .into_iter()
        .find(|r| *r == reason)
    }
}

impl WorkloadIdentityFederationSource {
    /// A short, non-secret description for status and messages.
    pub fn describe(&self) -> String {
        format!("federation:{}", self.federation_rule_id)
    }
}

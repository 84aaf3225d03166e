//! The `FederationReady` condition of a ClusterClaudeKeySource, from the proxy's exchanges.
//! Only the gateway writes it (it has API access; a sidecar has none and is seen through its
//! metric, log and 503s). The controller copies it onto the ClaudeKeys of the source.

/// Condition type on ClusterClaudeKeySource (and mirrored on ClaudeKey).
pub const FEDERATION_READY: &str = "FederationReady";

/// Reasons of `FederationReady`; each is explained in docs/troubleshooting.md.
pub mod reason {
    /// True: the last exchange gave an access token.
    pub const TOKEN_EXCHANGED: &str = "TokenExchanged";
    /// False: Anthropic refused the identity token (rule, issuer, audience or subject mismatch).
    pub const EXCHANGE_REFUSED: &str = "ExchangeRefused";
    /// False: the token endpoint could not be reached or answered with something else.
    pub const EXCHANGE_FAILED: &str = "ExchangeFailed";
    /// False: no identity token could be read or requested.
    pub const NO_IDENTITY_TOKEN: &str = "NoIdentityToken";
    /// False: the only identity token at hand was already exchanged and the access token ended.
    pub const IDENTITY_TOKEN_REUSED: &str = "IdentityTokenReused";
}

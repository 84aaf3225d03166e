//! The fake's verifier of identity tokens, as Anthropic's token endpoint checks them
//! (DESIGN.md §11): RS256 with a `kid` found in the issuer's JWKS, and the claims `iss`, `aud`,
//! `sub`, `iat`, `exp` (30 s skew, at most 1 h lifetime). Signature checks use `ring`, which
//! rustls already links; the JWKS is fetched from the issuer's discovery document over TLS.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::Deserialize;
use serde_json::Value;

/// Clock skew allowed on `iat` and `exp`.
pub const SKEW_SECONDS: i64 = 30;
/// Longest identity-token lifetime accepted.
pub const MAX_LIFETIME_SECONDS: i64 = 3600;

/// Why a token was refused. Only the fake's own log and tests see it: the client gets one
/// opaque `invalid_grant`, as from Anthropic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a compact JWS")]
    Malformed,
    #[error("alg {0:?} is not RS256")]
    Algorithm(String),
    #[error("no kid in the header")]
    NoKid,
    #[error("kid {0:?} is not in the issuer's JWKS")]
    UnknownKid(String),
    #[error("the signature does not verify")]
    Signature,
    #[error("claim {0} is missing or wrong")]
    Claim(&'static str),
    #[error("the token has expired")]
    Expired,
    #[error("the token is valid for longer than 1 h")]
    TooLong,
    #[error("the JWKS could not be fetched: {0}")]
    Jwks(String),
}

/// The claims the rule is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub jti: Option<String>,
}

/// One RSA key of a JWKS.
#[derive(Debug, Clone, Deserialize)]
pub struct Jwk {
    #[serde(default)]
    pub kid: Option<String>,
    pub kty: String,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// The parts of a compact JWS, decoded.
struct Parts {
    header: Value,
    payload: Value,
    signed: String,
    signature: Vec<u8>,
}

fn split(token: &str) -> Result<Parts, Refusal> {
    let mut it = token.trim().split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(Refusal::Malformed);
    };
    let json = |part: &str| -> Result<Value, Refusal> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| Refusal::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| Refusal::Malformed)
    };
    Ok(Parts {
        header: json(h)?,
        payload: json(p)?,
        signed: format!("{h}.{p}"),
        signature: URL_SAFE_NO_PAD.decode(s).map_err(|_| Refusal::Malformed)?,
    })
}

/// The unverified `iss` of a token: which issuer's JWKS to fetch.
pub fn issuer(token: &str) -> Result<String, Refusal> {
    let parts = split(token)?;
    parts.payload["iss"]
        .as_str()
        .map(str::to_string)
        .ok_or(Refusal::Claim("iss"))
}

/// Verifies the signature against `jwks` and reads the claims; the time and audience checks
/// are [`check_claims`].
pub fn verify_signature(token: &str, jwks: &Jwks) -> Result<Claims, Refusal> {
    let parts = split(token)?;
    let alg = parts.header["alg"].as_str().unwrap_or_default();
    if alg != "RS256" {
        return Err(Refusal::Algorithm(alg.to_string()));
    }
    let kid = parts.header["kid"].as_str().ok_or(Refusal::NoKid)?;
    let key = jwks
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some(kid) && k.kty == "RSA")
        .ok_or_else(|| Refusal::UnknownKid(kid.to_string()))?;
    let decode = |v: &Option<String>| {
        v.as_deref()
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .ok_or(Refusal::Signature)
    };
    let (n, e) = (decode(&key.n)?, decode(&key.e)?);
    ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            parts.signed.as_bytes(),
            &parts.signature,
        )
        .map_err(|_| Refusal::Signature)?;
    claims(&parts.payload)
}

fn claims(payload: &Value) -> Result<Claims, Refusal> {
    let string = |name: &'static str| {
        payload[name]
            .as_str()
            .map(str::to_string)
            .ok_or(Refusal::Claim(name))
    };
    let number = |name: &'static str| payload[name].as_i64().ok_or(Refusal::Claim(name));
    let aud = match &payload["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => return Err(Refusal::Claim("aud")),
    };
    Ok(Claims {
        iss: string("iss")?,
        sub: string("sub")?,
        aud,
        iat: number("iat")?,
        exp: number("exp")?,
        jti: payload["jti"].as_str().map(str::to_string),
    })
}

/// The rule's checks on verified claims at `now` (unix seconds).
pub fn check_claims(
    claims: &Claims,
    issuer: &str,
    audience: &str,
    subject: &str,
    now: i64,
) -> Result<(), Refusal> {
    if claims.iss != issuer {
        return Err(Refusal::Claim("iss"));
    }
    if !claims.aud.iter().any(|a| a == audience) {
        return Err(Refusal::Claim("aud"));
    }
    if !subject_matches(subject, &claims.sub) {
        return Err(Refusal::Claim("sub"));
    }
    if claims.iat > now + SKEW_SECONDS {
        return Err(Refusal::Claim("iat"));
    }
    if claims.exp <= now - SKEW_SECONDS {
        return Err(Refusal::Expired);
    }
    if claims.exp - claims.iat > MAX_LIFETIME_SECONDS {
        return Err(Refusal::TooLong);
    }
    Ok(())
}

/// A rule's subject: exact, or a prefix ending in `*` (e.g. `system:serviceaccount:team-a:*`).
pub fn subject_matches(pattern: &str, sub: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => sub.starts_with(prefix),
        None => pattern == sub,
    }
}

/// Fetches `{issuer}/.well-known/openid-configuration`, then its `jwks_uri`, trusting only
/// `ca_pem` (the test cluster's CA) and anonymous, as Anthropic would.
pub async fn fetch_jwks(issuer: &str, ca_pem: &[u8]) -> Result<Jwks, Refusal> {
    let tls =
        crate::tls::client_config_trusting(ca_pem).map_err(|e| Refusal::Jwks(e.to_string()))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let get = |url: String| {
        let client = client.clone();
        async move {
            let uri: http::Uri = url
                .parse()
                .map_err(|_| Refusal::Jwks(format!("bad URL {url}")))?;
            let fetch = async {
                let response = client
                    .get(uri)
                    .await
                    .map_err(|e| Refusal::Jwks(e.to_string()))?;
                if !response.status().is_success() {
                    return Err(Refusal::Jwks(format!("{url}: HTTP {}", response.status())));
                }
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Refusal::Jwks(e.to_string()))?;
                serde_json::from_slice::<Value>(&body.to_bytes())
                    .map_err(|e| Refusal::Jwks(e.to_string()))
            };
            tokio::time::timeout(Duration::from_secs(10), fetch)
                .await
                .map_err(|_| Refusal::Jwks(format!("{url}: timed out")))?
        }
    };
    let discovery = get(format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    ))
    .await?;
    let jwks_uri = discovery["jwks_uri"]
        .as_str()
        .ok_or_else(|| Refusal::Jwks("no jwks_uri in the discovery document".into()))?;
    let jwks = get(jwks_uri.to_string()).await?;
    serde_json::from_value(jwks).map_err(|e| Refusal::Jwks(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            iss: "https://issuer.example/".into(),
            sub: "system:serviceaccount:team-a:bot".into(),
            aud: vec!["https://api.anthropic.com".into()],
            iat: 1_000,
            exp: 1_600,
            jti: Some("j1".into()),
        }
    }

    fn check(c: &Claims, subject: &str, now: i64) -> Result<(), Refusal> {
        check_claims(
            c,
            "https://issuer.example/",
            "https://api.anthropic.com",
            subject,
            now,
        )
    }

    #[test]
    fn each_claim_is_checked() {
        let sub = "system:serviceaccount:team-a:bot";
        assert_eq!(check(&claims(), sub, 1_100), Ok(()));
        assert_eq!(
            check(&claims(), "system:serviceaccount:team-b:bot", 1_100),
            Err(Refusal::Claim("sub"))
        );
        assert_eq!(
            check(&claims(), "system:serviceaccount:team-a:*", 1_100),
            Ok(())
        );
        assert_eq!(
            check(&claims(), "system:serviceaccount:team-a:bo", 1_100),
            Err(Refusal::Claim("sub"))
        );
        let wrong_aud = Claims {
            aud: vec!["https://kubernetes.default.svc".into()],
            ..claims()
        };
        assert_eq!(check(&wrong_aud, sub, 1_100), Err(Refusal::Claim("aud")));
        let wrong_iss = Claims {
            iss: "https://evil.example/".into(),
            ..claims()
        };
        assert_eq!(check(&wrong_iss, sub, 1_100), Err(Refusal::Claim("iss")));
    }

    #[test]
    fn time_has_thirty_seconds_of_skew_and_one_hour_at_most() {
        let sub = "system:serviceaccount:team-a:bot";
        assert_eq!(check(&claims(), sub, 1_629), Ok(()));
        assert_eq!(check(&claims(), sub, 1_630), Err(Refusal::Expired));
        assert_eq!(check(&claims(), sub, 970), Ok(()));
        assert_eq!(check(&claims(), sub, 969), Err(Refusal::Claim("iat")));
        let long = Claims {
            exp: 1_000 + 3_601,
            ..claims()
        };
        assert_eq!(check(&long, sub, 1_100), Err(Refusal::TooLong));
    }

    #[test]
    fn malformed_and_unsigned_tokens_are_refused() {
        let jwks = Jwks { keys: vec![] };
        assert_eq!(verify_signature("a.b", &jwks), Err(Refusal::Malformed));
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            enc(serde_json::json!({"alg": "none"})),
            enc(serde_json::json!({"iss": "x"}))
        );
        assert_eq!(
            verify_signature(&none, &jwks),
            Err(Refusal::Algorithm("none".into()))
        );
        let hs = format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "HS256", "kid": "k"})),
            enc(serde_json::json!({"iss": "x"}))
        );
        assert_eq!(
            verify_signature(&hs, &jwks),
            Err(Refusal::Algorithm("HS256".into()))
        );
        let unknown = format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "RS256", "kid": "k"})),
            enc(serde_json::json!({"iss": "x"}))
        );
        assert_eq!(
            verify_signature(&unknown, &jwks),
            Err(Refusal::UnknownKid("k".into()))
        );
        assert_eq!(issuer(&unknown), Ok("x".into()));
    }
}

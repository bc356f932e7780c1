//! Checks one bearer token: algorithm, issuer, signature, audience, validity
//! window, then finds the api key bound to the identity.

use super::{JwksRegistry, JwtAuth};
use crate::caller::Caller;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Longest caller id we forward upstream.
const MAX_CALLER_ID: usize = 256;

/// Why a JWT was refused; each has its own OpenAI error `code`. None of them
/// says anything about which api keys exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's signature is not valid")]
    InvalidSignature,
    #[error("the token's algorithm is not accepted; tokens must be signed with RS256 or ES256")]
    AlgorithmNotAllowed,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token's issuer is not trusted")]
    UnknownIssuer,
}

impl JwtError {
    /// The OpenAI error `code`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Expired => "jwt_expired",
            Self::NotYetValid => "jwt_not_yet_valid",
            Self::InvalidSignature | Self::AlgorithmNotAllowed => "jwt_invalid_signature",
            Self::WrongAudience => "jwt_wrong_audience",
            Self::UnknownIssuer => "jwt_unknown_issuer",
        }
    }
}

/// Why `verify` refused a bearer: a JWT-specific reason, or one that answers
/// like a bad api key (`crate::Error` makes both 401s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Jwt(JwtError),
    /// Well-signed but unusable, or bound to no api key.
    NotAllowed,
    Malformed,
}

impl From<JwtError> for Refusal {
    fn from(e: JwtError) -> Self {
        Self::Jwt(e)
    }
}

/// A verified caller: the api key its identity is bound to, and its id.
#[derive(Debug, Clone)]
pub struct Identity {
    pub caller: Arc<Caller>,
    pub caller_id: String,
    pub provider_id: String,
}

/// The same answer for every token that is well-signed but unusable, as
/// for an unknown API key: it tells nothing about which keys exist.
const NOT_ALLOWED: Refusal = Refusal::NotAllowed;
const MALFORMED: Refusal = Refusal::Malformed;

fn segments(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.split('.');
    let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then_some((h, p, s))
}

fn json_segment(segment: &str) -> Option<Map<String, Value>> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// A bearer is treated as a JWT when it is three dot-separated parts whose
/// first decodes to a JSON header with `alg`; anything else is an API key.
pub fn looks_like_jwt(bearer: &str) -> bool {
    segments(bearer)
        .and_then(|(h, _, _)| json_segment(h))
        .is_some_and(|h| h.contains_key("alg"))
}

/// Verifies `token` against the snapshot's providers and their keys, and
/// returns the identity with the api key bound to it.
pub async fn verify(auth: &JwtAuth, keys: &JwksRegistry, token: &str) -> Result<Identity, Refusal> {
    let (h, p, _) = segments(token).ok_or(MALFORMED)?;
    let header = json_segment(h).ok_or(MALFORMED)?;
    // `none`, HS* (e.g. HS256 keyed with the issuer's public key) and anything
    // else are refused before any key is looked at.
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        _ => return Err(Refusal::Jwt(JwtError::AlgorithmNotAllowed)),
    };
    let kid = header.get("kid").and_then(Value::as_str);
    let unverified = json_segment(p).ok_or(MALFORMED)?;
    let iss = unverified
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(Refusal::Jwt(JwtError::UnknownIssuer))?;
    let provider = auth
        .provider(iss)
        .ok_or(Refusal::Jwt(JwtError::UnknownIssuer))?;
    let candidates = keys.cache(provider).keys_for(kid, alg).await;
    if candidates.is_empty() {
        return Err(Refusal::Jwt(JwtError::InvalidSignature));
    }
    let mut validation = Validation::new(alg);
    validation.leeway = provider.leeway;
    validation.validate_nbf = true;
    validation.validate_aud = true;
    validation.set_audience(&provider.audiences);
    validation.set_issuer(&[&provider.issuer]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let mut last = ErrorKind::InvalidSignature;
    let mut claims = None;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
            Ok(data) => {
                claims = Some(data.claims);
                break;
            }
            Err(e) => {
                last = e.into_kind();
                // Only a bad signature is worth trying the next key for: the
                // claims are checked after the signature held.
                if !matches!(last, ErrorKind::InvalidSignature) {
                    break;
                }
            }
        }
    }
    let claims = claims.ok_or_else(|| rejection(&last))?;
    let caller_id = provider.caller_id(&claims).ok_or(NOT_ALLOWED)?;
    if caller_id.len() > MAX_CALLER_ID || http::HeaderValue::from_str(caller_id).is_err() {
        return Err(NOT_ALLOWED);
    }
    let caller = provider.bound(caller_id, &claims).ok_or(NOT_ALLOWED)?;
    Ok(Identity {
        caller: caller.clone(),
        caller_id: caller_id.to_string(),
        provider_id: provider.id.clone(),
    })
}

fn rejection(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::ExpiredSignature => Refusal::Jwt(JwtError::Expired),
        ErrorKind::ImmatureSignature => Refusal::Jwt(JwtError::NotYetValid),
        ErrorKind::InvalidAudience => Refusal::Jwt(JwtError::WrongAudience),
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => Refusal::Jwt(JwtError::WrongAudience),
        ErrorKind::InvalidIssuer => Refusal::Jwt(JwtError::UnknownIssuer),
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => MALFORMED,
        ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::Base64(_)
        | ErrorKind::InvalidToken => MALFORMED,
        _ => Refusal::Jwt(JwtError::InvalidSignature),
    }
}

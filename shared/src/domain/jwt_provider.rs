use super::{non_empty, HumanDuration};
use crate::error::Error;
use serde::{Deserialize, Deserializer, Serialize};
use std::time::Duration;

/// Default allowed difference between the issuer's clock and ours.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Largest clock skew a provider may allow.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);

/// A trusted issuer of caller JWTs, e.g. an Entra ID tenant
/// (`/admin/v1/jwt_providers`). Api keys bind identities of its tokens with
/// `jwt_provider_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProvider {
    /// Unique, non-empty.
    pub display_name: String,
    /// The exact `iss` of accepted tokens, e.g.
    /// `https://login.microsoftonline.com/<tenant>/v2.0`. Unique.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one of them.
    pub audiences: Vec<String>,
    /// Where the signing keys are; default: `jwks_uri` of the issuer's
    /// OpenID discovery document (`<issuer>/.well-known/openid-configuration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub claim_mappings: ClaimMappings,
    /// Allowed difference between the issuer's clock and ours for `exp`/`nbf`.
    #[serde(default = "default_clock_skew")]
    pub clock_skew: HumanDuration,
}

/// Which claims of a token mean what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimMappings {
    /// The caller's id (sent upstream as `caller-objectid`, matched by an api
    /// key's `jwt_subject`): the first of these claims the token has. A single
    /// name is accepted too. Default `["oid", "sub"]`.
    #[serde(default = "default_caller_id_claims", deserialize_with = "one_or_many")]
    pub caller_id: Vec<String>,
}

impl Default for ClaimMappings {
    fn default() -> Self {
        Self {
            caller_id: default_caller_id_claims(),
        }
    }
}

fn default_caller_id_claims() -> Vec<String> {
    vec!["oid".into(), "sub".into()]
}

fn default_clock_skew() -> HumanDuration {
    HumanDuration(DEFAULT_CLOCK_SKEW)
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    match Raw::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a claim name or a list of claim names"))?
    {
        Raw::One(s) => Ok(vec![s]),
        Raw::Many(v) => Ok(v),
    }
}

impl JwtProvider {
    /// Checks the value on its own.
    pub fn validate(&self) -> Result<(), Error> {
        non_empty("display_name", &self.display_name)?;
        non_empty("issuer", &self.issuer)?;
        check_endpoint("issuer", &self.issuer)?;
        if self.audiences.is_empty() {
            return Err(Error::validation(
                "audiences",
                "must name at least one accepted audience",
            ));
        }
        for (i, a) in self.audiences.iter().enumerate() {
            non_empty(&format!("audiences[{i}]"), a)?;
        }
        if let Some(uri) = &self.jwks_uri {
            check_endpoint("jwks_uri", uri)?;
        }
        if self.claim_mappings.caller_id.is_empty() {
            return Err(Error::validation(
                "claim_mappings.caller_id",
                "must name at least one claim",
            ));
        }
        for (i, c) in self.claim_mappings.caller_id.iter().enumerate() {
            non_empty(&format!("claim_mappings.caller_id[{i}]"), c)?;
        }
        if self.clock_skew.0 > MAX_CLOCK_SKEW {
            return Err(Error::validation(
                "clock_skew",
                format!("must be at most {}", HumanDuration(MAX_CLOCK_SKEW)),
            ));
        }
        Ok(())
    }

    /// The OpenID discovery document's address.
    pub fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }
}

/// Whether a URL's host stays on this machine (`localhost` or a loopback IP).
pub fn is_loopback_host(host: url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// An https URL (http only on loopback, for local issuers) without user info
/// or fragment: keys fetched from it decide who gets in.
pub fn check_endpoint(field: &str, text: &str) -> Result<url::Url, Error> {
    let url = url::Url::parse(text.trim())
        .map_err(|e| Error::validation(field, format!("not a valid URL: {e}")))?;
    let loopback = match url.host() {
        Some(host) => is_loopback_host(host),
        None => return Err(Error::validation(field, "has no host")),
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(Error::validation(
                field,
                "must use https (http is allowed only on loopback)",
            ))
        }
        other => {
            return Err(Error::validation(
                field,
                format!("scheme `{other}` is not allowed; use https"),
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::validation(field, "must not contain user info"));
    }
    if url.fragment().is_some() {
        return Err(Error::validation(field, "must not contain a fragment"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> JwtProvider {
        serde_json::from_value(serde_json::json!({
            "display_name": "entra",
            "issuer": "https://login.microsoftonline.com/tid/v2.0",
            "audiences": ["api://aigw"],
        }))
        .unwrap()
    }

    #[test]
    fn defaults_and_forms() {
        let p = provider();
        p.validate().unwrap();
        assert_eq!(p.claim_mappings.caller_id, ["oid", "sub"]);
        assert_eq!(p.clock_skew.0, DEFAULT_CLOCK_SKEW);
        assert_eq!(
            p.discovery_url(),
            "https://login.microsoftonline.com/tid/v2.0/.well-known/openid-configuration"
        );
        let one: ClaimMappings = serde_json::from_str(r#"{"caller_id":"appid"}"#).unwrap();
        assert_eq!(one.caller_id, ["appid"]);
        assert!(serde_json::from_str::<ClaimMappings>(r#"{"caller_id":1}"#).is_err());
        assert!(serde_json::from_str::<ClaimMappings>(r#"{"other":"x"}"#).is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        type Mutation = fn(&mut JwtProvider);
        let cases: Vec<(Mutation, &str)> = vec![
            (|p| p.display_name = " ".into(), "display_name"),
            (|p| p.issuer = "http://issuer.example".into(), "issuer"),
            (|p| p.issuer = "not a url".into(), "issuer"),
            (|p| p.audiences.clear(), "audiences"),
            (|p| p.audiences = vec!["".into()], "audiences[0]"),
            (
                |p| p.jwks_uri = Some("ftp://keys.example".into()),
                "jwks_uri",
            ),
            (|p| p.claim_mappings.caller_id.clear(), "claim_mappings"),
            (
                |p| p.clock_skew = HumanDuration(Duration::from_secs(3600)),
                "clock_skew",
            ),
        ];
        for (mutate, field) in cases {
            let mut p = provider();
            mutate(&mut p);
            let err = p.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{field}: {err}");
        }
        let mut p = provider();
        p.issuer = "http://127.0.0.1:8080/tenant".into();
        p.validate().unwrap();
    }
}

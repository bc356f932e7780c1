use super::non_empty;
use crate::error::Error;
use serde::{Deserialize, Serialize};

pub const DEFAULT_API_VERSION: &str = "2024-10-21";
/// What every read shows in place of a secret.
pub const MASKED: &str = "***";

/// Upstream credential and endpoint (`/admin/v1/provider_keys`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderKey {
    pub display_name: String,
    #[serde(default)]
    pub provider: String,
    #[serde(default = "default_adapter")]
    pub adapter: String,
    /// API key, or JSON text for Entra ID credentials (see [`Credential`]).
    pub secret: String,
    pub api_base: String,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Extra trust anchors (PEM) for the upstream's TLS, besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Allows a plain-http `api_base` (local tests and simulators only): the
    /// secret then crosses the network in clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_upstream: bool,
}

fn default_adapter() -> String {
    "azure-openai".into()
}

fn default_api_version() -> String {
    DEFAULT_API_VERSION.into()
}

impl ProviderKey {
    /// Checks the value on its own, including the secret's shape.
    pub fn validate(&self) -> Result<(), Error> {
        non_empty("display_name", &self.display_name)?;
        if self.adapter != "azure-openai" {
            return Err(Error::validation(
                "adapter",
                format!(
                    "unsupported adapter `{}`; supported: azure-openai",
                    self.adapter
                ),
            ));
        }
        non_empty("secret", &self.secret)?;
        Credential::parse(&self.secret)?;
        check_upstream(&self.api_base, self.allow_insecure_upstream)?;
        check_api_version(&self.api_version)?;
        check_known_api_version(&self.api_version)?;
        if let Some(pem) = &self.ca_pem {
            parse_ca_pem(pem).map_err(|m| Error::validation("ca_pem", m))?;
        }
        Ok(())
    }

    /// The value as reads show it.
    pub fn masked(&self) -> Self {
        Self {
            secret: MASKED.into(),
            ..self.clone()
        }
    }
}

/// How the gateway authenticates to the upstream, parsed from `secret`.
/// Its `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    ApiKey {
        key: String,
    },
    ClientSecret {
        tenant_id: String,
        client_id: String,
        client_secret: String,
        authority_host: Option<String>,
    },
    ManagedIdentity {
        client_id: Option<String>,
    },
    WorkloadIdentity,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ApiKey { .. } => "ApiKey(***)",
            Self::ClientSecret { .. } => "ClientSecret(***)",
            Self::ManagedIdentity { .. } => "ManagedIdentity",
            Self::WorkloadIdentity => "WorkloadIdentity",
        })
    }
}

/// Longest secret part (an API key, a client secret, an id).
pub const MAX_SECRET_LEN: usize = 4096;

impl Credential {
    /// A secret that starts with `{` is Entra ID JSON; anything else is an API key.
    pub fn parse(secret: &str) -> Result<Self, Error> {
        let c = Self::parse_stored(secret)?;
        c.check()?;
        Ok(c)
    }

    /// Every part can go where it is sent: an API key into a header, ids and
    /// secrets into a token request's form and URL. The data plane runs this
    /// too before it compiles a snapshot.
    pub fn check(&self) -> Result<(), Error> {
        fn text(field: &str, v: &str, allowed: fn(u8) -> bool, what: &str) -> Result<(), Error> {
            if v.is_empty() || v.len() > MAX_SECRET_LEN || !v.bytes().all(allowed) {
                return Err(Error::validation(
                    field,
                    format!("must be 1 to {MAX_SECRET_LEN} {what}"),
                ));
            }
            Ok(())
        }
        let visible = |b: u8| b.is_ascii_graphic();
        let no_control = |b: u8| !b.is_ascii_control();
        let id_chars = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        match self {
            Self::ApiKey { key } => text(
                "secret",
                key,
                visible,
                "visible ASCII characters (an API key goes into a header)",
            ),
            Self::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
                ..
            } => {
                text(
                    "secret.tenant_id",
                    tenant_id,
                    id_chars,
                    "letters, digits, `-`, `_` or `.`",
                )?;
                text(
                    "secret.client_id",
                    client_id,
                    no_control,
                    "characters, none a control character",
                )?;
                text(
                    "secret.client_secret",
                    client_secret,
                    no_control,
                    "characters, none a control character",
                )
            }
            Self::ManagedIdentity {
                client_id: Some(id),
            } => text(
                "secret.managed_identity.client_id",
                id,
                no_control,
                "characters, none a control character",
            ),
            Self::ManagedIdentity { client_id: None } | Self::WorkloadIdentity => Ok(()),
        }
    }

    /// Parses without [`Credential::check`]: for a secret stored before a
    /// check existed, which the data plane then refuses with its reason.
    pub fn parse_stored(secret: &str) -> Result<Self, Error> {
        let trimmed = secret.trim();
        if !trimmed.starts_with('{') {
            return Ok(Self::ApiKey {
                key: secret.to_string(),
            });
        }
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(trimmed)
            .map_err(|e| Error::validation("secret", format!("not a valid JSON object: {e}")))?;
        let str_field = |name: &str, required: bool| -> Result<Option<String>, Error> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) if !required => Ok(None),
                None | Some(serde_json::Value::Null) => Err(Error::validation(
                    format!("secret.{name}"),
                    "is required for Entra ID client credentials",
                )),
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(Error::validation(
                    format!("secret.{name}"),
                    "must be a non-empty string",
                )),
            }
        };
        let only = |allowed: &[&str]| -> Result<(), Error> {
            match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
                Some(k) => Err(Error::validation(format!("secret.{k}"), "unknown field")),
                None => Ok(()),
            }
        };
        if let Some(mi) = obj.get("managed_identity") {
            only(&["managed_identity"])?;
            let inner = mi
                .as_object()
                .ok_or_else(|| Error::validation("secret.managed_identity", "must be an object"))?;
            if let Some(k) = inner.keys().find(|k| k.as_str() != "client_id") {
                return Err(Error::validation(
                    format!("secret.managed_identity.{k}"),
                    "unknown field",
                ));
            }
            let client_id = match inner.get("client_id") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
                Some(_) => {
                    return Err(Error::validation(
                        "secret.managed_identity.client_id",
                        "must be a non-empty string",
                    ))
                }
            };
            return Ok(Self::ManagedIdentity { client_id });
        }
        if let Some(wi) = obj.get("workload_identity") {
            only(&["workload_identity"])?;
            match wi.as_object() {
                Some(m) if m.is_empty() => return Ok(Self::WorkloadIdentity),
                _ => {
                    return Err(Error::validation(
                        "secret.workload_identity",
                        "must be an empty object; AKS supplies the identity",
                    ))
                }
            }
        }
        only(&["tenant_id", "client_id", "client_secret", "authority_host"])?;
        let tenant_id = str_field("tenant_id", true)?.unwrap_or_default();
        let client_id = str_field("client_id", true)?.unwrap_or_default();
        let client_secret = str_field("client_secret", true)?.unwrap_or_default();
        let authority_host = str_field("authority_host", false)?;
        if let Some(host) = &authority_host {
            check_origin(host, "secret.authority_host", &["https"])?;
        }
        Ok(Self::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
            authority_host,
        })
    }
}

/// The upstream origin of `api_base`, refused when it is plain http and the
/// key does not say `allow_insecure_upstream`.
pub fn check_upstream(api_base: &str, allow_insecure: bool) -> Result<String, Error> {
    let base = resolve_api_base(api_base)?;
    if !allow_insecure && base.starts_with("http://") {
        return Err(Error::validation(
            "api_base",
            "plain http would send the secret in clear; use https, or set \
             allow_insecure_upstream: true (local tests only)",
        ));
    }
    Ok(base)
}

/// `api_version` goes into every upstream URL's query.
pub fn check_api_version(v: &str) -> Result<(), Error> {
    non_empty("api_version", v)?;
    if v.len() > 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
    {
        return Err(Error::validation(
            "api_version",
            "may hold only letters, digits, `-` and `.` (at most 64)",
        ));
    }
    Ok(())
}

/// The forms Azure OpenAI serves, checked when a key is written (a stored
/// key of another form still compiles, with the lax check above): `v1`
/// (Azure's v1 API: `/openai/v1/…`, deployment in the body), or a dated
/// version `YYYY-MM-DD` / `YYYY-MM-DD-preview` (deployment in the path).
pub fn check_known_api_version(v: &str) -> Result<(), Error> {
    let b = v.as_bytes();
    let dated = |d: &[u8]| {
        d.len() == 10
            && d.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            })
    };
    let known = v == "v1"
        || dated(b)
        || v.strip_suffix("-preview")
            .is_some_and(|d| dated(d.as_bytes()));
    if known {
        Ok(())
    } else {
        Err(Error::validation(
            "api_version",
            "use `v1` (Azure's v1 API) or a dated version such as `2024-10-21` or `2025-04-01-preview`",
        ))
    }
}

/// DER certificates from PEM text; at least one, nothing else allowed.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut certs = Vec::new();
    for item in rustls_pemfile::read_all(&mut pem.as_bytes()) {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(der)) => certs.push(der.to_vec()),
            Ok(_) => return Err("holds something other than certificates".into()),
            Err(e) => return Err(format!("is not valid PEM: {e}")),
        }
    }
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// Turns `api_base` into the origin (plus optional path prefix) requests go
/// to: a bare resource name becomes `https://<name>.openai.azure.com`.
pub fn resolve_api_base(api_base: &str) -> Result<String, Error> {
    let field = "api_base";
    let text = api_base.trim();
    non_empty(field, text)?;
    if !text.contains("://") {
        let is_name = text.len() <= 64
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !text.starts_with('-')
            && !text.ends_with('-');
        if !is_name {
            return Err(Error::validation(
                field,
                "must be an http(s) origin or a bare Azure resource name (letters, digits, `-`)",
            ));
        }
        return Ok(format!(
            "https://{}.openai.azure.com",
            text.to_ascii_lowercase()
        ));
    }
    let url = check_origin(text, field, &["http", "https"])?;
    let base = url.as_str().trim_end_matches('/').to_string();
    // The URL parser accepts hosts and paths (a backtick, say) that the HTTP
    // client's URI type refuses: check with the type the data plane builds,
    // or every node would refuse the snapshot instead of this write.
    format!("{base}/openai/deployments/d/chat/completions?api-version=v")
        .parse::<http::Uri>()
        .map_err(|e| Error::validation(field, format!("is not usable in a request URL: {e}")))?;
    Ok(base)
}

fn check_origin(text: &str, field: &str, schemes: &[&str]) -> Result<url::Url, Error> {
    let url = url::Url::parse(text)
        .map_err(|e| Error::validation(field, format!("not a valid URL: {e}")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(Error::validation(
            field,
            format!(
                "scheme `{}` is not allowed; use {}",
                url.scheme(),
                schemes.join(" or ")
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::validation(field, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::validation(field, "must not contain user info"));
    }
    if url.query().is_some() {
        return Err(Error::validation(field, "must not contain a query string"));
    }
    if url.fragment().is_some() {
        return Err(Error::validation(field, "must not contain a fragment"));
    }
    if field.ends_with("authority_host") && url.path() != "/" {
        return Err(Error::validation(
            field,
            "must be a bare origin without a path",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_forms() {
        assert_eq!(
            resolve_api_base("acme-west").unwrap(),
            "https://acme-west.openai.azure.com"
        );
        assert_eq!(
            resolve_api_base("https://acme-west.openai.azure.com/").unwrap(),
            "https://acme-west.openai.azure.com"
        );
        assert_eq!(
            resolve_api_base("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        for bad in [
            "https://x.openai.azure.com/?a=1",
            "https://x.openai.azure.com/#frag",
            "https://user:pw@x.openai.azure.com",
            "ftp://x.openai.azure.com",
            // Found by fuzzing (admin_json): accepted by the URL parser,
            // refused by `http::Uri`, so no node could compile it.
            "http://`126.0.01.,:8080/prefi`",
            "not a host",
            "",
        ] {
            let err = resolve_api_base(bad).unwrap_err().to_string();
            assert!(err.starts_with("api_base"), "{bad}: {err}");
        }
    }

    #[test]
    fn credential_forms() {
        assert!(matches!(
            Credential::parse("sk-123").unwrap(),
            Credential::ApiKey { .. }
        ));
        let c =
            Credential::parse(r#"{"tenant_id":"t","client_id":"c","client_secret":"s"}"#).unwrap();
        assert!(matches!(
            c,
            Credential::ClientSecret {
                authority_host: None,
                ..
            }
        ));
        let err = Credential::parse(r#"{"tenant_id":"t","client_id":"c"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret.client_secret: is required for Entra ID client credentials"
        );
        let err = Credential::parse(
            r#"{"tenant_id":"t","client_id":"c","client_secret":"s","authority_host":"http://login.example"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("secret.authority_host"));
        let err = Credential::parse(
            r#"{"tenant_id":"t","client_id":"c","client_secret":"s","authority_host":"https://login.example/tenant"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bare origin"));
        assert_eq!(
            Credential::parse(r#"{"managed_identity":{"client_id":"abc"}}"#).unwrap(),
            Credential::ManagedIdentity {
                client_id: Some("abc".into())
            }
        );
        assert_eq!(
            Credential::parse(r#"{"workload_identity":{}}"#).unwrap(),
            Credential::WorkloadIdentity
        );
        assert!(Credential::parse("{not json").is_err());
    }
}

#[cfg(test)]
mod api_version_tests {
    use super::check_known_api_version;

    #[test]
    fn only_the_forms_azure_serves_are_written() {
        for ok in ["v1", "2024-10-21", "2025-04-01-preview"] {
            assert!(check_known_api_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "v2",
            "2024-1-21",
            "2024-10-21-beta",
            "latest",
            "2024-10-21-preview-x",
        ] {
            assert!(check_known_api_version(bad).is_err(), "{bad}");
        }
    }
}

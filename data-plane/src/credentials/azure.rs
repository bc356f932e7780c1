//! Tokens from the `azure_identity` crate.

use super::{FetchedToken, TokenError, TokenSource};
use aigw_shared::domain::{parse_ca_pem, Credential};
use aigw_shared::snapshot::SnapshotProviderKey;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// The token scope for Azure OpenAI (Cognitive Services).
pub const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// Builds a credential of the kind the provider key's secret names and asks
/// it for a token.
pub struct AzureTokenSource {
    credential: Credential,
    transport: Transport,
}

impl AzureTokenSource {
    /// The HTTP transport trusts the system roots plus the key's `ca_pem`.
    pub fn new(pk: &SnapshotProviderKey) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &pk.ca_pem {
            let ders = parse_ca_pem(pem)
                .map_err(|e| format!("provider key {}: ca_pem {e}", pk.display_name))?;
            let mut certs = Vec::with_capacity(ders.len());
            for der in ders {
                certs.push(
                    reqwest::Certificate::from_der(&der)
                        .map_err(|e| format!("provider key {}: ca_pem: {e}", pk.display_name))?,
                );
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| {
            format!(
                "provider key {}: cannot build the Entra ID HTTP client: {e}",
                pk.display_name
            )
        })?;
        Ok(Self {
            credential: pk.credential.clone(),
            transport: Transport::new(Arc::new(client)),
        })
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            transport: Some(self.transport.clone()),
            // A couple of quick retries for a transient 5xx/429; the token
            // cache retries further with its own backoff.
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(200),
                max_retries: 2,
                max_total_elapsed: azure_core::time::Duration::seconds(10),
                max_delay: azure_core::time::Duration::seconds(2),
            }),
            ..Default::default()
        }
    }

    fn build(&self) -> azure_core::Result<Arc<dyn TokenCredential>> {
        let mut client_options = self.client_options();
        Ok(match &self.credential {
            Credential::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
                authority_host,
            } => {
                let cloud = match authority_host {
                    None => CloudConfiguration::AzurePublic,
                    Some(host) => {
                        let mut custom = CustomConfiguration::default();
                        custom.authority_host = host.trim_end_matches('/').to_string();
                        custom.into()
                    }
                };
                client_options.cloud = Some(Arc::new(cloud));
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    Secret::new(client_secret.clone()),
                    Some(ClientSecretCredentialOptions { client_options }),
                )?
            }
            // App Service / Container Apps (IDENTITY_ENDPOINT, IDENTITY_HEADER)
            // or the VM's instance metadata service.
            Credential::ManagedIdentity { client_id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options,
                }))?
            }
            // AKS: AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE,
            // AZURE_AUTHORITY_HOST.
            Credential::WorkloadIdentity => {
                WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions { client_options },
                    ..Default::default()
                }))?
            }
            Credential::ApiKey { .. } => {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "an API key is not an Entra ID credential",
                ))
            }
        })
    }
}

impl TokenSource for AzureTokenSource {
    fn kind(&self) -> &'static str {
        match self.credential {
            Credential::ApiKey { .. } => "api key",
            Credential::ClientSecret { .. } => "client secret",
            Credential::ManagedIdentity { .. } => "managed identity",
            Credential::WorkloadIdentity => "workload identity",
        }
    }

    fn fetch(&self) -> BoxFuture<'static, Result<FetchedToken, TokenError>> {
        let credential = self.build();
        Box::pin(async move {
            let credential = credential.map_err(|e| token_error(&e))?;
            let token = credential
                .get_token(&[SCOPE], None)
                .await
                .map_err(|e| token_error(&e))?;
            let left = token.expires_on - azure_core::time::OffsetDateTime::now_utc();
            Ok(FetchedToken {
                secret: token.token.secret().to_string(),
                expires_in: Duration::try_from(left).unwrap_or(Duration::ZERO),
            })
        })
    }
}

/// One line for the caller and the log, with Entra's `AADSTS` code.
fn token_error(e: &azure_core::Error) -> TokenError {
    let mut texts = vec![e.to_string()];
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        texts.push(inner.to_string());
        cur = inner.source();
    }
    let mut code = texts.iter().find_map(|t| aadsts_code(t));
    if code.is_none() {
        if let azure_core::error::ErrorKind::HttpResponse {
            error_code: Some(c),
            ..
        } = e.kind()
        {
            code = c
                .split(',')
                .next()
                .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
                .map(|c| format!("AADSTS{c}"));
        }
    }
    let first_line = |t: &str| {
        t.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string()
    };
    let sentence = texts.iter().find_map(|t| aadsts_sentence(t));
    let entra_said = sentence.is_some();
    let mut message = match sentence {
        // "ClientSecretCredential authentication failed. AADSTS7000215: ...",
        // without Entra's trace lines (or the crate's complaint about them).
        Some(sentence) => match texts[0].find(" authentication failed.") {
            Some(at) => format!("{} {sentence}", &texts[0][..at + 23]),
            None => sentence,
        },
        None => first_line(&texts[0]),
    };
    // Connection errors hide the useful part in the innermost source.
    if let Some(root) = texts.last().map(|t| first_line(t)) {
        if !entra_said && texts.len() > 1 && !root.is_empty() && !message.contains(&root) {
            message = format!("{message}: {root}");
        }
    }
    if message.chars().count() > 400 {
        message = message.chars().take(400).collect::<String>() + "…";
    }
    TokenError { message, code }
}

/// Entra's `AADSTS<code>: <text>` up to the end of its first line. Entra's
/// `error_description` goes on with `\r\n`-separated trace lines (which the
/// crate may quote, escaped, when it fails to parse them).
fn aadsts_sentence(text: &str) -> Option<String> {
    let at = text.find("AADSTS")?;
    aadsts_code(&text[at..])?;
    let rest = &text[at..];
    let end = ["\\r", "\\n", "\r", "\n", "\""]
        .iter()
        .filter_map(|stop| rest.find(stop))
        .min()
        .unwrap_or(rest.len());
    Some(rest[..end].trim().to_string())
}

/// `AADSTS` followed by digits, anywhere in `text`.
fn aadsts_code(text: &str) -> Option<String> {
    let at = text.find("AADSTS")?;
    let digits: String = text[at + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_aadsts_codes() {
        assert_eq!(
            aadsts_code("ClientSecretCredential authentication failed. AADSTS7000215: Invalid client secret provided.").as_deref(),
            Some("AADSTS7000215")
        );
        assert_eq!(aadsts_code("no code here"), None);
        assert_eq!(aadsts_code("AADSTS: nothing"), None);
    }

    #[test]
    fn entra_errors_become_one_line_with_the_code() {
        // What azure_identity 1.0 reports for Entra's real error body: its
        // `error_description` has \r\n trace lines, which the crate fails to
        // borrow-parse and quotes escaped.
        let e = azure_core::Error::with_message(
            azure_core::error::ErrorKind::Credential,
            "ClientSecretCredential authentication failed. invalid type: string \"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value.\\r\\nTrace ID: 3e92\\r\\nCorrelation ID: d266\", expected a borrowed string at line 1 column 300\nTo troubleshoot, visit https://aka.ms/azsdk/rust/identity/troubleshoot#client-secret",
        );
        let t = token_error(&e);
        assert_eq!(t.code.as_deref(), Some("AADSTS7000215"));
        assert_eq!(
            t.message,
            "ClientSecretCredential authentication failed. AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value."
        );
        // Parsed properly (no escapes): the first line only.
        let e = azure_core::Error::with_message(
            azure_core::error::ErrorKind::Credential,
            "ClientSecretCredential authentication failed. AADSTS90002: Tenant 't' not found.\r\nTrace ID: 1\nTo troubleshoot, visit https://aka.ms/x",
        );
        let t = token_error(&e);
        assert_eq!(
            t.message,
            "ClientSecretCredential authentication failed. AADSTS90002: Tenant 't' not found."
        );
        // No Entra code: the first line.
        let e = azure_core::Error::with_message(
            azure_core::error::ErrorKind::Io,
            "connection refused\nmore",
        );
        assert_eq!(token_error(&e), TokenError::new("connection refused"));
    }

    #[tokio::test]
    async fn an_unreachable_token_endpoint_is_a_readable_error() {
        // A port nothing listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut pk = key(Some(&format!("https://127.0.0.1:{port}")));
        pk.display_name = "azure-aad-prod".into();
        let source = AzureTokenSource::new(&pk).unwrap();
        assert_eq!(source.kind(), "client secret");
        let err = source.fetch().await.err().unwrap();
        assert_eq!(err.code, None);
        assert!(
            err.message
                .starts_with("ClientSecretCredential authentication failed"),
            "{err}"
        );
        assert!(!err.message.contains('\n'), "{err}");
        assert!(!err.message.contains("s3cret"), "{err}");
    }

    fn key(authority_host: Option<&str>) -> SnapshotProviderKey {
        SnapshotProviderKey {
            display_name: "pk".into(),
            adapter: "azure-openai".into(),
            api_base: "https://x.openai.azure.com".into(),
            api_version: "2024-10-21".into(),
            ca_pem: None,
            allow_insecure_upstream: false,
            credential: Credential::ClientSecret {
                tenant_id: "t".into(),
                client_id: "c".into(),
                client_secret: "s3cret".into(),
                authority_host: authority_host.map(str::to_string),
            },
        }
    }

    #[test]
    fn http_authority_hosts_are_refused_by_the_crate() {
        let source = AzureTokenSource::new(&key(Some("http://127.0.0.1:1"))).unwrap();
        let err = source.build().err().map(|e| token_error(&e)).unwrap();
        assert!(err.message.contains("HTTPS"), "{err}");
    }
}

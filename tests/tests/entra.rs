//! Entra ID authentication to Azure OpenAI, end to end: a standalone control
//! plane (with its in-process data plane) in front of the mock Azure OpenAI,
//! with tokens from the mock Entra ID token endpoint (TLS, test CA), the mock
//! App Service identity endpoint, or a federated token file (AKS).
//!
//! The mock Azure accepts exactly the tokens the mock identity provider
//! issued, until they expire.

use aigw_tests::mock_azure::MockAzure;
use aigw_tests::mock_entra::{
    MockEntra, MockIdentityEndpoint, COGNITIVE_SERVICES_RESOURCE, COGNITIVE_SERVICES_SCOPE,
    JWT_BEARER,
};
use aigw_tests::process::poll_until;
use aigw_tests::{sha256_hex, ControlPlane, Options};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TENANT: &str = "8f3c1a2e-5b7d-4e21-9a0c-2d6f4b8e1c37";
const CLIENT_ID: &str = "0b9e6f4a-1c2d-4e3f-8a7b-5c6d7e8f9a0b";
const CLIENT_SECRET: &str = "Qx8~entra.client-secret_7Hd2";
const CALLER_KEY: &str = "sk-caller-entra-7f1e";
const DEPLOYMENT: &str = "gpt4o-prod";
const ALIAS: &str = "gpt-4o-azure";
const PROVIDER: &str = "azure-aad-prod";

/// A standalone gateway configured with one Entra ID provider key.
struct Gateway {
    cp: ControlPlane,
    http: reqwest::Client,
    proxy: String,
    metrics: String,
}

impl Gateway {
    /// Starts a standalone control plane with `env`, creates the provider
    /// key `provider_key` (seed shape), a model on it and a caller key, and
    /// waits until the in-process data plane has applied them.
    async fn start(env: Vec<(String, String)>, provider_key: Value) -> Result<Gateway> {
        let mut opts = Options::standalone();
        opts.env = env;
        let cp = ControlPlane::start_with(opts).await?;
        let admin = cp.rest();
        let pk = admin.create_id("provider_keys", &provider_key).await?;
        admin
            .create(
                "models",
                &json!({
                    "display_name": ALIAS,
                    "provider": "azure",
                    "model_name": DEPLOYMENT,
                    "provider_key_id": pk,
                }),
            )
            .await?;
        admin
            .create(
                "apikeys",
                &json!({"key_hash": sha256_hex(CALLER_KEY), "allowed_models": ["*"]}),
            )
            .await?;
        let version = admin.all_events().await?.len() as u64;
        let addr = |key: &str| -> Result<String> {
            Ok(format!(
                "http://{}",
                cp.config()["data_plane"][key]
                    .as_str()
                    .with_context(|| format!("data_plane.{key}"))?
            ))
        };
        let gw = Gateway {
            proxy: addr("listen")?,
            metrics: addr("metrics_listen")?,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(256)
                .build()?,
            cp,
        };
        let (http, readyz) = (gw.http.clone(), format!("{}/readyz", gw.metrics));
        poll_until(
            "the standalone data plane to apply the config",
            600,
            Duration::from_millis(50),
            || {
                let req = http.get(&readyz).send();
                async move {
                    let Ok(r) = req.await else { return Ok(None) };
                    let v: Value = r.json().await.unwrap_or_default();
                    Ok((v["version"].as_u64() >= Some(version)).then_some(()))
                }
            },
        )
        .await?;
        Ok(gw)
    }

    /// `POST /v1/chat/completions` as the caller; (status, body).
    async fn chat(&self, text: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.proxy))
            .bearer_auth(CALLER_KEY)
            .json(&json!({"model": ALIAS, "messages": [{"role": "user", "content": text}]}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn metric(&self, name: &str) -> Result<u64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.metrics))
            .send()
            .await?
            .text()
            .await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("metric {name} not in:\n{text}"))
    }
}

/// The seed's Entra ID provider key: `secret` is JSON text. The mocks need
/// `authority_host`, `ca_pem` (the test CA) and `api_base` (the mock Azure).
fn entra_key(secret: Value, ca_pem: Option<&str>, api_base: &str) -> Value {
    let mut v = json!({
        "display_name": PROVIDER,
        "provider": "azure",
        "adapter": "azure-openai",
        "secret": secret.to_string(),
        "api_base": api_base,
    });
    if let Some(pem) = ca_pem {
        v["ca_pem"] = json!(pem);
    }
    aigw_tests::fixtures::allow_http(&mut v);
    v
}

fn client_secret(entra: &MockEntra, secret: &str) -> Value {
    json!({
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": secret,
        "authority_host": entra.origin(),
    })
}

async fn mocks() -> (MockAzure, MockEntra) {
    let azure = MockAzure::start().await;
    azure.add_deployment(DEPLOYMENT, "gpt-4o-2024-08-06");
    let entra = MockEntra::start().await;
    entra.add_client(TENANT, CLIENT_ID, CLIENT_SECRET);
    entra.issue_to(&azure);
    (azure, entra)
}

fn assert_chat_ok(status: u16, body: &Value) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], ALIAS, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("Hello from Azure OpenAI!")),
        "{body}"
    );
}

#[tokio::test]
async fn client_secret_key_calls_azure_with_a_bearer_token_and_no_api_key() -> Result<()> {
    let (azure, entra) = mocks().await;
    let gw = Gateway::start(
        vec![],
        entra_key(
            client_secret(&entra, CLIENT_SECRET),
            Some(entra.ca_pem()),
            &azure.base_url(),
        ),
    )
    .await?;

    let (status, body) = gw.chat("what is 4200 + 42?").await?;
    assert_chat_ok(status, &body);

    let upstream = azure
        .last_request(DEPLOYMENT)
        .context("no upstream request")?;
    let issued = entra.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        upstream.header("authorization"),
        Some(format!("Bearer {}", issued[0].token).as_str())
    );
    assert_eq!(upstream.header("api-key"), None);

    // The token request, as Entra expects it.
    let reqs = entra.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(r.param("grant_type"), Some("client_credentials"));
    assert_eq!(r.param("client_id"), Some(CLIENT_ID));
    assert_eq!(r.param("client_secret"), Some(CLIENT_SECRET));
    assert_eq!(r.param("scope"), Some(COGNITIVE_SERVICES_SCOPE));

    // Cached: more calls, no more token requests.
    for i in 0..5 {
        let (status, body) = gw.chat(&format!("again {i}")).await?;
        assert_chat_ok(status, &body);
    }
    assert_eq!(entra.token_requests(), 1);
    assert_eq!(gw.metric("aigw_entra_token_refreshes_total").await?, 1);
    assert_eq!(gw.metric("aigw_entra_token_failures_total").await?, 0);
    assert!(!gw.cp.stdout().contains(CLIENT_SECRET));
    Ok(())
}

#[tokio::test]
async fn two_hundred_concurrent_cold_requests_cause_one_token_request() -> Result<()> {
    let (azure, entra) = mocks().await;
    // A slow token endpoint keeps the cache cold while the calls pile up.
    entra.set_delay(Duration::from_millis(500));
    let gw = Gateway::start(
        vec![],
        entra_key(
            client_secret(&entra, CLIENT_SECRET),
            Some(entra.ca_pem()),
            &azure.base_url(),
        ),
    )
    .await?;
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let (http, url) = (
                gw.http.clone(),
                format!("{}/v1/chat/completions", gw.proxy),
            );
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth(CALLER_KEY)
                    .json(&json!({"model": ALIAS, "messages": [{"role": "user", "content": format!("call {i}")}]}))
                    .send()
                    .await?;
                anyhow::Ok(r.status().as_u16())
            })
        })
        .collect();
    let mut ok = 0;
    for c in calls {
        let status = c.await??;
        assert_eq!(status, 200);
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(azure.requests(DEPLOYMENT), 200);
    assert_eq!(
        entra.token_requests(),
        1,
        "token requests for 200 cold calls"
    );
    println!(
        "200 concurrent cold calls: {} token request(s)",
        entra.token_requests()
    );
    Ok(())
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_under_steady_load() -> Result<()> {
    let (azure, entra) = mocks().await;
    // 6 s tokens: the mock Azure refuses each one 6 s after it was issued.
    entra.set_expires_in(6);
    let gw = Gateway::start(
        vec![],
        entra_key(
            client_secret(&entra, CLIENT_SECRET),
            Some(entra.ca_pem()),
            &azure.base_url(),
        ),
    )
    .await?;

    // Four callers back to back for 15 s (bounded in count as well).
    let started = Instant::now();
    let load = Duration::from_secs(15);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (http, url) = (
                gw.http.clone(),
                format!("{}/v1/chat/completions", gw.proxy),
            );
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                for i in 0..5000 {
                    if started.elapsed() >= load {
                        break;
                    }
                    let r = http
                        .post(&url)
                        .bearer_auth(CALLER_KEY)
                        .json(&json!({"model": ALIAS, "messages": [{"role": "user", "content": format!("w{w} #{i}")}]}))
                        .send()
                        .await?;
                    let status = r.status().as_u16();
                    if status == 200 {
                        ok += 1;
                    } else {
                        failed.push(format!("{status}: {}", r.text().await.unwrap_or_default()));
                    }
                }
                anyhow::Ok((ok, failed))
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await??;
        ok += o;
        failed.extend(f);
    }
    assert!(failed.is_empty(), "caller errors: {failed:?}");
    assert!(ok > 0);

    // 15 s of 6 s tokens: the first plus a refresh about every 4.5 s.
    let issued = entra.issued();
    println!(
        "{ok} calls in {:?}, 0 errors; {} token requests; {} refused bearer requests upstream",
        started.elapsed(),
        entra.token_requests(),
        azure.bearer_refusals()
    );
    assert!(
        (3..=6).contains(&issued.len()),
        "{} tokens issued in 15 s",
        issued.len()
    );
    // Each token was replaced before it expired.
    for pair in issued.windows(2) {
        assert!(
            pair[1].issued_at < pair[0].expires_at(),
            "a token was refreshed only after it had expired"
        );
    }
    // (A refresh may still be under way, hence no equality with `issued`.)
    assert!(gw.metric("aigw_entra_token_refreshes_total").await? >= 3);
    Ok(())
}

#[tokio::test]
async fn a_bad_client_secret_is_a_502_naming_the_key_and_the_aadsts_code() -> Result<()> {
    let (azure, entra) = mocks().await;
    let wrong = "not-the-secret~9zQ";
    let gw = Gateway::start(
        vec![],
        entra_key(
            client_secret(&entra, wrong),
            Some(entra.ca_pem()),
            &azure.base_url(),
        ),
    )
    .await?;

    let (status, body) = gw.chat("hello").await?;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_auth_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(PROVIDER), "{message}");
    assert!(message.contains("AADSTS7000215"), "{message}");
    assert!(!message.contains(wrong), "the secret leaked: {message}");
    assert!(
        !message.contains("Trace ID") && !message.contains("invalid type"),
        "one clean line: {message}"
    );
    println!("502 upstream_auth_error: {message}");
    assert_eq!(azure.requests(DEPLOYMENT), 0, "no call without a token");

    // The data plane keeps trying in the background, with backoff, and
    // counts the failures.
    poll_until("a background retry", 200, Duration::from_millis(50), || {
        let failures = gw.metric("aigw_entra_token_failures_total");
        async move { Ok((failures.await? >= 2).then_some(())) }
    })
    .await?;
    assert!(entra.token_requests() >= 2);
    let logs = format!("{}{}", gw.cp.stdout(), gw.cp.stderr());
    assert!(!logs.contains(wrong), "the secret reached the log");
    Ok(())
}

#[tokio::test]
async fn a_refused_token_that_was_accepted_before_is_refreshed_once_and_retried() -> Result<()> {
    let (azure, entra) = mocks().await;
    let gw = Gateway::start(
        vec![],
        entra_key(
            client_secret(&entra, CLIENT_SECRET),
            Some(entra.ca_pem()),
            &azure.base_url(),
        ),
    )
    .await?;
    let (status, body) = gw.chat("first").await?;
    assert_chat_ok(status, &body);
    let first = entra.issued()[0].token.clone();

    azure.revoke_bearer(&first);
    let (status, body) = gw.chat("after revocation").await?;
    assert_chat_ok(status, &body);
    assert_eq!(entra.token_requests(), 2);
    let second = entra.issued()[1].token.clone();
    let upstream = azure.last_request(DEPLOYMENT).context("upstream")?;
    assert_eq!(
        upstream.header("authorization"),
        Some(format!("Bearer {second}").as_str())
    );
    // One refused attempt, then the retry with the new token.
    assert_eq!(azure.requests(DEPLOYMENT), 3);
    assert_eq!(azure.bearer_refusals(), 1);
    assert_eq!(gw.metric("aigw_entra_forced_refreshes_total").await?, 1);

    // Refused again while Entra fails: the caller gets 502 upstream_auth_error.
    azure.revoke_bearer(&second);
    entra.set_outage(Some((
        400,
        r#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant not found.","error_codes":[90002]}"#,
    )));
    let (status, body) = gw.chat("revoked again, Entra failing").await?;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_auth_error", "{body}");
    Ok(())
}

#[tokio::test]
async fn managed_identity_on_app_service() -> Result<()> {
    let azure = MockAzure::start().await;
    azure.add_deployment(DEPLOYMENT, "gpt-4o-2024-08-06");
    let identity = MockIdentityEndpoint::start().await;
    identity.issue_to(&azure);
    let gw = Gateway::start(
        identity.env(),
        entra_key(
            json!({"managed_identity": {"client_id": "mi-client-1"}}),
            None,
            &azure.base_url(),
        ),
    )
    .await?;
    for i in 0..3 {
        let (status, body) = gw.chat(&format!("mi {i}")).await?;
        assert_chat_ok(status, &body);
    }
    assert_eq!(identity.token_requests(), 1);
    let r = &identity.requests()[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.param("api-version"), Some("2019-08-01"));
    assert_eq!(r.param("resource"), Some(COGNITIVE_SERVICES_RESOURCE));
    assert_eq!(r.param("client_id"), Some("mi-client-1"));
    assert_eq!(
        r.headers.get("x-identity-header").map(String::as_str),
        Some(identity.identity_header())
    );
    let upstream = azure.last_request(DEPLOYMENT).context("upstream")?;
    assert_eq!(
        upstream.header("authorization"),
        Some(format!("Bearer {}", identity.issued()[0].token).as_str())
    );
    assert_eq!(upstream.header("api-key"), None);
    Ok(())
}

#[tokio::test]
async fn workload_identity_on_aks() -> Result<()> {
    let (azure, entra) = mocks().await;
    let assertion = "eyJhbGciOiJSUzI1NiJ9.service-account-token.sig";
    let wi_client = "5d1e3f7a-aks-workload-client";
    entra.add_federated(TENANT, wi_client, assertion);
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, assertion)?;
    let env = vec![
        ("AZURE_AUTHORITY_HOST".to_string(), entra.origin()),
        ("AZURE_TENANT_ID".to_string(), TENANT.to_string()),
        ("AZURE_CLIENT_ID".to_string(), wi_client.to_string()),
        (
            "AZURE_FEDERATED_TOKEN_FILE".to_string(),
            token_file.display().to_string(),
        ),
    ];
    let gw = Gateway::start(
        env,
        entra_key(
            json!({"workload_identity": {}}),
            Some(entra.ca_pem()),
            &azure.base_url(),
        ),
    )
    .await?;
    for i in 0..3 {
        let (status, body) = gw.chat(&format!("wi {i}")).await?;
        assert_chat_ok(status, &body);
    }
    assert_eq!(entra.token_requests(), 1);
    let r = &entra.requests()[0];
    assert_eq!(r.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(r.param("client_id"), Some(wi_client));
    assert_eq!(r.param("client_assertion"), Some(assertion));
    assert_eq!(r.param("client_assertion_type"), Some(JWT_BEARER));
    assert_eq!(r.param("scope"), Some(COGNITIVE_SERVICES_SCOPE));
    let upstream = azure.last_request(DEPLOYMENT).context("upstream")?;
    assert_eq!(
        upstream.header("authorization"),
        Some(format!("Bearer {}", entra.issued()[0].token).as_str())
    );
    assert_eq!(upstream.header("api-key"), None);
    Ok(())
}

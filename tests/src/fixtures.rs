//! Admin resource bodies shaped like the seed's curl calls.

use crate::rest::sha256_hex;
use serde_json::{json, Value};

pub const PROVIDER_KEYS: &str = "/admin/v1/provider_keys";
pub const MODELS: &str = "/admin/v1/models";
pub const APIKEYS: &str = "/admin/v1/apikeys";

/// Seed: provider key with a resource API key.
pub fn provider_key(display_name: &str, secret: &str) -> Value {
    json!({
        "display_name": display_name,
        "provider": "azure",
        "adapter": "azure-openai",
        "secret": secret,
        "api_base": "https://acme-west.openai.azure.com"
    })
}

/// Seed: provider key with Entra ID client credentials as JSON text.
pub fn entra_provider_key(display_name: &str, client_secret: &str) -> Value {
    let secret = json!({
        "tenant_id": "YOUR_TENANT_ID",
        "client_id": "YOUR_CLIENT_ID",
        "client_secret": client_secret,
    });
    json!({
        "display_name": display_name,
        "provider": "azure",
        "adapter": "azure-openai",
        "secret": secret.to_string(),
        "api_base": "https://acme-west.openai.azure.com"
    })
}

/// Seed: model alias on one Azure deployment.
pub fn model(display_name: &str, provider_key_id: &str) -> Value {
    json!({
        "display_name": display_name,
        "provider": "azure",
        "model_name": "gpt4o-prod",
        "provider_key_id": provider_key_id
    })
}

/// Seed: caller API key for the plaintext `caller_key`.
pub fn api_key(caller_key: &str, allowed_models: &[&str]) -> Value {
    json!({
        "key_hash": sha256_hex(caller_key),
        "allowed_models": allowed_models
    })
}

/// The seed's names (`000`: "Azure OpenAI Upstream").
pub const SEED_PROVIDER_KEY: &str = "azure-prod";
pub const SEED_ALIAS: &str = "gpt-4o-azure";
pub const SEED_DEPLOYMENT: &str = "gpt4o-prod";
pub const SEED_CALLER_KEY: &str = "sk-azure-caller";

/// A provider key with a resource API key at `api_base` (e.g. a mock's
/// `http://127.0.0.1:PORT`, then with `allow_insecure_upstream`).
pub fn provider_key_at(display_name: &str, secret: &str, api_base: &str) -> Value {
    let mut v = provider_key(display_name, secret);
    v["api_base"] = json!(api_base);
    allow_http(&mut v);
    v
}

/// Sets `allow_insecure_upstream` on a provider key whose `api_base` is plain
/// http (the mocks): the gateway refuses http upstreams otherwise.
pub fn allow_http(provider_key: &mut Value) {
    if provider_key["api_base"]
        .as_str()
        .is_some_and(|b| b.starts_with("http://"))
    {
        provider_key["allow_insecure_upstream"] = json!(true);
    }
}

/// Creates provider key `azure` for `mock` (its default `api-key`); returns its id.
pub async fn mock_provider_key(
    admin: &crate::rest::AdminClient,
    mock: &crate::mock_azure::MockAzure,
) -> anyhow::Result<String> {
    admin
        .create_id(
            "provider_keys",
            &provider_key_at(
                "azure",
                crate::mock_azure::DEFAULT_API_KEY,
                &mock.base_url(),
            ),
        )
        .await
}

/// A model alias on the Azure deployment `deployment`.
pub fn model_on(display_name: &str, deployment: &str, provider_key_id: &str) -> Value {
    let mut v = model(display_name, provider_key_id);
    v["model_name"] = json!(deployment);
    v
}

/// Ids of what [`seed_azure`] created.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub provider_key_id: String,
    pub model_id: String,
    pub api_key_id: String,
}

/// The seed's three admin calls, with `api_base` pointing at a mock: provider
/// key `azure-prod` (secret `secret`), model `gpt-4o-azure` on deployment
/// `gpt4o-prod`, and a caller key `sk-azure-caller` allowed that alias only.
pub async fn seed_azure(
    admin: &crate::rest::AdminClient,
    api_base: &str,
    secret: &str,
) -> anyhow::Result<Seeded> {
    let provider_key_id = admin
        .create_id(
            "provider_keys",
            &provider_key_at(SEED_PROVIDER_KEY, secret, api_base),
        )
        .await?;
    let model_id = admin
        .create_id(
            "models",
            &model_on(SEED_ALIAS, SEED_DEPLOYMENT, &provider_key_id),
        )
        .await?;
    let api_key_id = admin
        .create_id("apikeys", &api_key(SEED_CALLER_KEY, &[SEED_ALIAS]))
        .await?;
    Ok(Seeded {
        provider_key_id,
        model_id,
        api_key_id,
    })
}

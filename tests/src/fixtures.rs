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

//! Entra ID tokens for the Azure upstream.
//!
//! - `azure`    — a [`TokenSource`] backed by the `azure_identity` crate: client
//!   secret, managed identity (App Service / VM), workload identity (AKS)
//! - `provider` — [`TokenProvider`], one provider key's token cache: single
//!   flight, refresh ahead of expiry in the background, retry with backoff
//!
//! The [`CredentialRegistry`] lives in the `ConfigHandle`, outside any one
//! snapshot: each compiled snapshot asks it for the provider of every Entra ID
//! key it routes to, and gets the same one back while the key's credential
//! (and `ca_pem`) is unchanged, so a config change does not cost a token
//! fetch. A changed credential gets a new provider; once a snapshot is applied,
//! providers of keys it no longer holds are dropped (their background task
//! stops when the last in-flight call on an older snapshot is done).
//!
//! The crate's credentials keep their own cache and refresh 5 minutes before
//! expiry; that would make a token that lives under 5 minutes look expired at
//! once, and a forced refresh would hand back the token Azure just refused.
//! So this module decides when to fetch, and each fetch asks a freshly built
//! credential (cheap: the HTTP transport is shared), which is exactly one
//! request to the token endpoint.

mod azure;
mod provider;

pub use azure::{AzureTokenSource, SCOPE};
pub use provider::{Bearer, TokenProvider};

use crate::metrics::Metrics;
use aigw_shared::snapshot::SnapshotProviderKey;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A token as the token endpoint returned it.
pub struct FetchedToken {
    pub secret: String,
    /// Lifetime from now.
    pub expires_in: Duration,
}

/// Why no token could be had. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    /// What went wrong, one line.
    pub message: String,
    /// Entra's error code, e.g. `AADSTS7000215`, when it gave one.
    pub code: Option<String>,
}

impl TokenError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
        }
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) if !self.message.contains(code.as_str()) => {
                write!(f, "{code}: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

impl TokenError {
    /// The caller's view: 502 `upstream_auth_error` naming the provider key.
    pub fn to_upstream_error(&self, provider_name: &str, kind: &str) -> crate::Error {
        crate::Error::UpstreamAuth(format!(
            "cannot get an Entra ID token ({kind}) for provider key `{provider_name}`: {self}"
        ))
    }
}

/// Fetches one token; every call is one request to the token endpoint.
pub trait TokenSource: Send + Sync + 'static {
    /// E.g. `client secret`, for messages.
    fn kind(&self) -> &'static str;
    fn fetch(&self) -> BoxFuture<'static, Result<FetchedToken, TokenError>>;
}

type SourceFactory =
    dyn Fn(&SnapshotProviderKey) -> Result<Arc<dyn TokenSource>, String> + Send + Sync;

/// Token providers by provider key id, shared by successive snapshots.
pub struct CredentialRegistry {
    providers: Mutex<HashMap<String, Arc<TokenProvider>>>,
    factory: Box<SourceFactory>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CredentialRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRegistry")
            .field("providers", &self.len())
            .finish_non_exhaustive()
    }
}

impl CredentialRegistry {
    /// Tokens from `azure_identity`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_factory(metrics, |pk| {
            AzureTokenSource::new(pk).map(|s| Arc::new(s) as Arc<dyn TokenSource>)
        })
    }

    /// Tokens from `factory` (tests use it to count fetches).
    pub fn with_factory<F>(metrics: Arc<Metrics>, factory: F) -> Self
    where
        F: Fn(&SnapshotProviderKey) -> Result<Arc<dyn TokenSource>, String> + Send + Sync + 'static,
    {
        Self {
            providers: Mutex::new(HashMap::new()),
            factory: Box::new(factory),
            metrics,
        }
    }

    fn providers(&self) -> MutexGuard<'_, HashMap<String, Arc<TokenProvider>>> {
        self.providers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The provider for an Entra ID key: the current one if its credential
    /// and CA are unchanged, else a new one (registered only by
    /// [`retain_only`](Self::retain_only) once its snapshot is applied).
    pub fn resolve(
        &self,
        id: &str,
        pk: &SnapshotProviderKey,
    ) -> Result<Arc<TokenProvider>, String> {
        let fingerprint = fingerprint(id, pk);
        if let Some(p) = self.providers().get(id) {
            if p.fingerprint() == &fingerprint {
                return Ok(p.clone());
            }
        }
        let source = (self.factory)(pk)?;
        Ok(Arc::new(TokenProvider::new(
            id,
            fingerprint,
            source,
            self.metrics.clone(),
        )))
    }

    /// Makes `providers` (an applied snapshot's) the registered set: changed
    /// credentials are replaced, removed keys dropped.
    pub fn retain_only(&self, providers: HashMap<String, Arc<TokenProvider>>) {
        let old = std::mem::replace(&mut *self.providers(), providers);
        drop(old);
    }

    pub fn get(&self, id: &str) -> Option<Arc<TokenProvider>> {
        self.providers().get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.providers().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Identifies a credential without keeping it: sha256 over the key id, the
/// credential and the CA.
fn fingerprint(id: &str, pk: &SnapshotProviderKey) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(id.as_bytes());
    field(&serde_json::to_vec(&pk.credential).unwrap_or_default());
    field(pk.ca_pem.as_deref().unwrap_or_default().as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests;

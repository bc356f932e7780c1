//! Admin resources as users write them (REST JSON and gRPC), and the rules a
//! value must meet on its own. Rules that depend on other resources
//! (uniqueness, references) live in the control plane's command handler.

mod api_key;
mod duration;
mod jwt_provider;
mod model;
mod provider_key;

pub use api_key::{ApiKey, Budget, BudgetPeriod};
pub use duration::HumanDuration;
pub use jwt_provider::{
    check_endpoint, is_loopback_host, ClaimMappings, JwtProvider, DEFAULT_CLOCK_SKEW,
    MAX_CLOCK_SKEW,
};
pub use model::{
    check_deployment_name, CacheConfig, Cost, Fallbacks, HealthCheck, Model, RateLimit, Routing,
    RoutingStrategy, Target, DEFAULT_PROBE_PATH, MAX_CACHE_BYTES, MAX_CACHE_ENTRIES,
    MAX_CACHE_TTL_SECONDS, MAX_CALL_TIMEOUT, MAX_CONTEXT_WINDOW, MAX_COOLDOWN, MAX_DEPLOYMENT_NAME,
    MAX_FALLBACKS, MAX_FALLBACK_DEPTH, MAX_FIRST_TOKEN_TIMEOUT, MAX_PROBE_COUNT,
    MAX_PROBE_INTERVAL, MAX_RATE_LIMIT, MAX_RETRIES, MAX_RETRY_BACKOFF, MAX_STREAM_IDLE_TIMEOUT,
    MIN_PROBE_INTERVAL,
};
pub use provider_key::{
    check_api_version, check_upstream, parse_ca_pem, resolve_api_base, Credential, ProviderKey,
    DEFAULT_API_VERSION, MASKED, MAX_SECRET_LEN,
};

use crate::error::Error;

pub(crate) fn non_empty(field: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::validation(field, "must not be empty"));
    }
    Ok(())
}

/// Kinds of admin resources, named as in the REST paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    ProviderKey,
    Model,
    ApiKey,
    JwtProvider,
    /// A data-plane node's credentials (`/admin/v1/nodes`).
    Node,
}

impl ResourceKind {
    /// The kinds served by the generic REST/gRPC create-read-update-delete
    /// routes; node credentials have their own (issue, revoke).
    pub const ALL: [ResourceKind; 4] = [
        Self::ProviderKey,
        Self::Model,
        Self::ApiKey,
        Self::JwtProvider,
    ];

    /// Collection name in REST paths and event filters.
    pub fn collection(self) -> &'static str {
        match self {
            Self::ProviderKey => "provider_keys",
            Self::Model => "models",
            Self::ApiKey => "apikeys",
            Self::JwtProvider => "jwt_providers",
            Self::Node => "nodes",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "provider_keys" | "provider_key" => Some(Self::ProviderKey),
            "models" | "model" => Some(Self::Model),
            "apikeys" | "api_keys" | "apikey" | "api_key" => Some(Self::ApiKey),
            "jwt_providers" | "jwt_provider" => Some(Self::JwtProvider),
            "nodes" | "node" => Some(Self::Node),
            _ => None,
        }
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ProviderKey => "provider key",
            Self::Model => "model",
            Self::ApiKey => "api key",
            Self::JwtProvider => "jwt provider",
            Self::Node => "node",
        })
    }
}

//! An api key as the hot path checks it: allowlist, expiry, budget and rate
//! limits. Compiled from the snapshot's hashed keys (`config`) and from the
//! keys bound to JWT identities (`jwt`).

use crate::limits::{Limiter, Limits};

#[derive(Debug)]
pub struct Caller {
    pub id: String,
    allow_all: bool,
    allowed: Vec<String>,
    pub disabled: bool,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// Spend reached the key's budget for the current period.
    pub budget_exceeded: bool,
    pub limits: Option<Limits>,
}

impl Caller {
    /// An api key as the hot path checks it.
    pub fn from_api_key(
        id: String,
        k: aigw_shared::domain::ApiKey,
        budget_exceeded: bool,
        limiter: &Limiter,
    ) -> Self {
        Self {
            budget_exceeded,
            limits: Limits::new(limiter, format!("key/{id}"), k.rate_limit),
            id,
            allow_all: k.allowed_models.iter().any(|m| m == "*"),
            allowed: k.allowed_models,
            disabled: k.disabled,
            expires_at: k.expires_at.map(|t| t.unix_timestamp()),
        }
    }

    pub fn allows(&self, alias: &str) -> bool {
        self.allow_all || self.allowed.iter().any(|a| a == alias)
    }
}

use super::{non_empty, HumanDuration};
use crate::error::Error;
use serde::{Deserialize, Serialize};

/// A caller-facing alias mapped to one or more Azure deployments (`/admin/v1/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub display_name: String,
    #[serde(default)]
    pub provider: String,
    /// Single-deployment form: the Azure deployment name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_key_id: Option<String>,
    /// Several deployments behind one alias.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Log prompts and completions of this model's calls (off: never logged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_payloads: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub provider_key_id: String,
    pub model_name: String,
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingStrategy {
    #[default]
    Weighted,
    RoundRobin,
    LeastLatency,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    #[serde(default)]
    pub strategy: RoutingStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<HumanDuration>,
}

/// Limits that must all pass; absent means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
}

/// USD per 1,000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    #[serde(default)]
    pub input_per_1k: f64,
    #[serde(default)]
    pub output_per_1k: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

impl Model {
    pub fn validate(&self) -> Result<(), Error> {
        non_empty("display_name", &self.display_name)?;
        let single = self.model_name.is_some() || self.provider_key_id.is_some();
        if single && !self.targets.is_empty() {
            return Err(Error::validation(
                "targets",
                "give either model_name + provider_key_id or targets, not both",
            ));
        }
        if single {
            non_empty("model_name", self.model_name.as_deref().unwrap_or_default())?;
            non_empty(
                "provider_key_id",
                self.provider_key_id.as_deref().unwrap_or_default(),
            )?;
        } else if self.targets.is_empty() {
            return Err(Error::validation(
                "provider_key_id",
                "is required (with model_name), or give targets",
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            non_empty(&format!("targets[{i}].provider_key_id"), &t.provider_key_id)?;
            non_empty(&format!("targets[{i}].model_name"), &t.model_name)?;
        }
        if let Some(cost) = &self.cost {
            for (name, v) in [
                ("cost.input_per_1k", cost.input_per_1k),
                ("cost.output_per_1k", cost.output_per_1k),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(Error::validation(name, "must be a non-negative number"));
                }
            }
        }
        if let Some(rl) = &self.rate_limit {
            rl.validate("rate_limit")?;
        }
        if let Some(c) = &self.cache {
            if c.ttl_seconds == Some(0) {
                return Err(Error::validation("cache.ttl_seconds", "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The deployments behind this alias, whichever form was written.
    pub fn resolved_targets(&self) -> Vec<Target> {
        match (&self.model_name, &self.provider_key_id) {
            (Some(m), Some(p)) => vec![Target {
                provider_key_id: p.clone(),
                model_name: m.clone(),
                priority: 0,
                weight: 1,
            }],
            _ => self.targets.clone(),
        }
    }

    /// Provider keys this model references.
    pub fn provider_key_ids(&self) -> impl Iterator<Item = &str> {
        self.provider_key_id
            .as_deref()
            .into_iter()
            .chain(self.targets.iter().map(|t| t.provider_key_id.as_str()))
    }
}

impl RateLimit {
    pub fn validate(&self, field: &str) -> Result<(), Error> {
        for (name, v) in [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("rpd", self.rpd),
            ("tpd", self.tpd),
            ("concurrency", self.concurrency),
        ] {
            if v == Some(0) {
                return Err(Error::validation(
                    format!("{field}.{name}"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
        }
        Ok(())
    }
}

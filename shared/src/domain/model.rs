use super::{non_empty, HumanDuration};
use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Longest `routing.timeout`: a whole call, retries included.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest `routing.stream_idle_timeout`.
pub const MAX_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest `routing.retry_backoff`.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// Longest `routing.cooldown`.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(3600);
/// Most `routing.retries`.
pub const MAX_RETRIES: u32 = 10;
/// Longest `cache.ttl_seconds` (30 days).
pub const MAX_CACHE_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Most `cache.max_entries`.
pub const MAX_CACHE_ENTRIES: u64 = 100_000_000;
/// Most `cache.max_bytes` (1 TiB).
pub const MAX_CACHE_BYTES: u64 = 1 << 40;
/// Largest value of any rate limit (`rpm`, `tpm`, `rpd`, `tpd`, `concurrency`):
/// counters are signed 64-bit and a limit far above any real traffic is a typo.
pub const MAX_RATE_LIMIT: u64 = 1_000_000_000_000;
/// Longest Azure deployment name (`model_name`).
pub const MAX_DEPLOYMENT_NAME: usize = 64;

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
        if let Some(name) = &self.model_name {
            check_deployment_name("model_name", name)?;
        }
        for (i, t) in self.targets.iter().enumerate() {
            non_empty(&format!("targets[{i}].provider_key_id"), &t.provider_key_id)?;
            check_deployment_name(&format!("targets[{i}].model_name"), &t.model_name)?;
        }
        if let Some(r) = &self.routing {
            r.validate()?;
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
            for (name, v, max) in [
                ("cache.ttl_seconds", c.ttl_seconds, MAX_CACHE_TTL_SECONDS),
                ("cache.max_entries", c.max_entries, MAX_CACHE_ENTRIES),
                ("cache.max_bytes", c.max_bytes, MAX_CACHE_BYTES),
            ] {
                within(name, v, 1, max)?;
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
            within(&format!("{field}.{name}"), v, 1, MAX_RATE_LIMIT)?;
        }
        Ok(())
    }
}

impl Routing {
    pub fn validate(&self) -> Result<(), Error> {
        let one_ms = Duration::from_millis(1);
        for (name, v, min, max) in [
            ("routing.timeout", self.timeout, one_ms, MAX_CALL_TIMEOUT),
            (
                "routing.stream_idle_timeout",
                self.stream_idle_timeout,
                one_ms,
                MAX_STREAM_IDLE_TIMEOUT,
            ),
            (
                "routing.retry_backoff",
                self.retry_backoff,
                Duration::ZERO,
                MAX_RETRY_BACKOFF,
            ),
            ("routing.cooldown", self.cooldown, one_ms, MAX_COOLDOWN),
        ] {
            if let Some(HumanDuration(d)) = v {
                if d < min || d > max {
                    return Err(Error::validation(
                        name,
                        format!(
                            "must be between {} and {}",
                            HumanDuration(min),
                            HumanDuration(max)
                        ),
                    ));
                }
            }
        }
        within(
            "routing.retries",
            self.retries.map(u64::from),
            0,
            u64::from(MAX_RETRIES),
        )
    }
}

fn within(field: &str, v: Option<u64>, min: u64, max: u64) -> Result<(), Error> {
    match v {
        Some(v) if v < min || v > max => Err(Error::validation(
            field,
            format!("must be between {min} and {max}"),
        )),
        _ => Ok(()),
    }
}

/// Azure deployment names: letters, digits, `-`, `_` and `.`, at most
/// [`MAX_DEPLOYMENT_NAME`] characters, not `.` or `..`. The name is also a
/// path segment of every upstream URL.
pub fn check_deployment_name(field: &str, name: &str) -> Result<(), Error> {
    non_empty(field, name)?;
    let ok = name.len() <= MAX_DEPLOYMENT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::validation(
            field,
            format!(
                "an Azure deployment name: 1 to {MAX_DEPLOYMENT_NAME} letters, digits, `-`, `_` or `.`"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        serde_json::from_value(serde_json::json!({
            "display_name": "m", "model_name": "gpt-4o", "provider_key_id": "pk",
        }))
        .unwrap()
    }

    fn field_of(m: &Model) -> Option<String> {
        match m.validate() {
            Err(Error::Validation { field, .. }) => Some(field),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn every_bound_is_inclusive_and_one_past_it_is_named() {
        let d = |d: Duration| Some(HumanDuration(d));
        let one = Duration::from_millis(1);
        type Set = fn(&mut Model, bool);
        let cases: [(&str, Set); 9] = [
            ("routing.timeout", |m, past| {
                m.routing.get_or_insert_default().timeout = Some(HumanDuration(
                    MAX_CALL_TIMEOUT + Duration::from_millis(past.into()),
                ))
            }),
            ("routing.stream_idle_timeout", |m, past| {
                m.routing.get_or_insert_default().stream_idle_timeout = Some(HumanDuration(
                    MAX_STREAM_IDLE_TIMEOUT + Duration::from_millis(past.into()),
                ))
            }),
            ("routing.retry_backoff", |m, past| {
                m.routing.get_or_insert_default().retry_backoff = Some(HumanDuration(
                    MAX_RETRY_BACKOFF + Duration::from_millis(past.into()),
                ))
            }),
            ("routing.cooldown", |m, past| {
                m.routing.get_or_insert_default().cooldown = Some(HumanDuration(
                    MAX_COOLDOWN + Duration::from_millis(past.into()),
                ))
            }),
            ("routing.retries", |m, past| {
                m.routing.get_or_insert_default().retries = Some(MAX_RETRIES + u32::from(past))
            }),
            ("cache.ttl_seconds", |m, past| {
                m.cache.get_or_insert_default().ttl_seconds =
                    Some(MAX_CACHE_TTL_SECONDS + u64::from(past))
            }),
            ("cache.max_entries", |m, past| {
                m.cache.get_or_insert_default().max_entries =
                    Some(MAX_CACHE_ENTRIES + u64::from(past))
            }),
            ("rate_limit.tpm", |m, past| {
                m.rate_limit.get_or_insert_default().tpm = Some(MAX_RATE_LIMIT + u64::from(past))
            }),
            ("model_name", |m, past| {
                m.model_name = Some("d".repeat(MAX_DEPLOYMENT_NAME + usize::from(past)))
            }),
        ];
        for (field, set) in cases {
            let mut at = model();
            set(&mut at, false);
            assert_eq!(field_of(&at), None, "{field} at its bound");
            let mut past = model();
            set(&mut past, true);
            assert_eq!(
                field_of(&past).as_deref(),
                Some(field),
                "{field} past its bound"
            );
        }
        // Zero durations where a zero would stop every call.
        let mut m = model();
        m.routing = Some(Routing {
            timeout: d(Duration::ZERO),
            ..Default::default()
        });
        assert_eq!(field_of(&m).as_deref(), Some("routing.timeout"));
        m.routing = Some(Routing {
            timeout: d(one),
            retry_backoff: d(Duration::ZERO),
            ..Default::default()
        });
        assert_eq!(field_of(&m), None);
    }

    #[test]
    fn deployment_names_are_what_azure_allows() {
        for ok in ["gpt-4o", "gpt4o_prod.v2", "A", "..a", "a.."] {
            assert!(check_deployment_name("model_name", ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "gpt 4o", ".", "..", "a/b", "a?b", "a#b", "a%2F", "é", "a\u{1}",
        ] {
            assert!(check_deployment_name("model_name", bad).is_err(), "{bad:?}");
        }
    }
}

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
/// Longest `routing.first_token_timeout`.
pub const MAX_FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(600);
/// Shortest and longest `health_check.interval`.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(3600);
/// Most `health_check.unhealthy_after` / `healthy_after`.
pub const MAX_PROBE_COUNT: u32 = 100;
/// Longest `health_check.path`.
pub const MAX_PROBE_PATH: usize = 256;
/// Azure Front Door's health probe path on an Azure OpenAI endpoint.
pub const DEFAULT_PROBE_PATH: &str = "/status-0123456789abcdef";
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// Most aliases in one `fallbacks` list, and the longest fallback chain
/// (a → b → c → d is 3 deep).
pub const MAX_FALLBACKS: usize = 3;
pub const MAX_FALLBACK_DEPTH: usize = 3;
/// Largest `context_window` (tokens).
pub const MAX_CONTEXT_WINDOW: u64 = 100_000_000;

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
    /// Single-deployment form: the deployment's context window (tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
    /// Other aliases to try when this one cannot answer (opt-in).
    /// Boxed: most models have none, and every admin value carries a Model.
    #[serde(default, skip_serializing_if = "Fallbacks::is_empty")]
    pub fallbacks: Box<Fallbacks>,
}

/// Aliases tried in order, per reason this alias could not answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallbacks {
    /// Azure refused the prompt (400 `content_filter`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_filter: Vec<String>,
    /// Azure's `context_length_exceeded`, or the prompt cannot fit any
    /// target's `context_window`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_window_exceeded: Vec<String>,
    /// Every target is down, cooling down or failing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

impl Fallbacks {
    pub fn is_empty(&self) -> bool {
        self.content_filter.is_empty()
            && self.context_window_exceeded.is_empty()
            && self.unavailable.is_empty()
    }

    /// (field name, aliases) of each reason.
    pub fn lists(&self) -> [(&'static str, &[String]); 3] {
        [
            ("content_filter", &self.content_filter),
            ("context_window_exceeded", &self.context_window_exceeded),
            ("unavailable", &self.unavailable),
        ]
    }

    /// Every alias named, once, sorted.
    pub fn aliases(&self) -> std::collections::BTreeSet<&str> {
        self.lists()
            .into_iter()
            .flat_map(|(_, l)| l.iter().map(String::as_str))
            .collect()
    }
}

/// Active health probes of a model's targets (`routing.health_check`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path on the provider key's `api_base`; default [`DEFAULT_PROBE_PATH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Consecutive failed probes that take a target out of rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_after: Option<u32>,
    /// Consecutive good probes that bring it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_after: Option<u32>,
}

impl HealthCheck {
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_PROBE_PATH)
    }
    pub fn interval(&self) -> Duration {
        self.interval.map_or(DEFAULT_PROBE_INTERVAL, |d| d.0)
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
            .map_or(DEFAULT_PROBE_TIMEOUT.min(self.interval() / 2), |d| d.0)
    }
    pub fn unhealthy_after(&self) -> u32 {
        self.unhealthy_after.unwrap_or(DEFAULT_UNHEALTHY_AFTER)
    }
    pub fn healthy_after(&self) -> u32 {
        self.healthy_after.unwrap_or(DEFAULT_HEALTHY_AFTER)
    }

    pub fn validate(&self, field: &str) -> Result<(), Error> {
        let path = self.path();
        let path_ok = path.starts_with('/')
            && path.len() <= MAX_PROBE_PATH
            && path
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%' | b'\\'))
            && !path.split('/').any(|s| s == "." || s == "..");
        if !path_ok {
            return Err(Error::validation(
                format!("{field}.path"),
                format!(
                    "a path starting with `/`, at most {MAX_PROBE_PATH} printable characters, \
                     without `?`, `#`, `%`, `\\` or dot segments"
                ),
            ));
        }
        let interval = self.interval();
        if !(MIN_PROBE_INTERVAL..=MAX_PROBE_INTERVAL).contains(&interval) {
            return Err(Error::validation(
                format!("{field}.interval"),
                format!(
                    "must be between {} and {}",
                    HumanDuration(MIN_PROBE_INTERVAL),
                    HumanDuration(MAX_PROBE_INTERVAL)
                ),
            ));
        }
        let timeout = self.timeout();
        if timeout < Duration::from_millis(1) || timeout >= interval {
            return Err(Error::validation(
                format!("{field}.timeout"),
                "must be at least 1ms and shorter than the interval",
            ));
        }
        for (name, v) in [
            ("unhealthy_after", self.unhealthy_after),
            ("healthy_after", self.healthy_after),
        ] {
            within(
                &format!("{field}.{name}"),
                v.map(u64::from),
                1,
                u64::from(MAX_PROBE_COUNT),
            )?;
        }
        Ok(())
    }
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
    /// The deployment's context window (tokens): a prompt that cannot fit
    /// is not sent to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
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
    /// A target without its first byte (JSON) or first event (stream) by
    /// then is abandoned for another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<HealthCheck>>,
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
            within(
                &format!("targets[{i}].context_window"),
                t.context_window,
                1,
                MAX_CONTEXT_WINDOW,
            )?;
        }
        if self.context_window.is_some() && !single {
            return Err(Error::validation(
                "context_window",
                "belongs to the single-deployment form; with targets, set it per target",
            ));
        }
        within("context_window", self.context_window, 1, MAX_CONTEXT_WINDOW)?;
        for (reason, list) in self.fallbacks.lists() {
            let field = format!("fallbacks.{reason}");
            if list.len() > MAX_FALLBACKS {
                return Err(Error::validation(
                    field,
                    format!("at most {MAX_FALLBACKS} aliases"),
                ));
            }
            for (i, alias) in list.iter().enumerate() {
                non_empty(&format!("{field}[{i}]"), alias)?;
                if alias == &self.display_name {
                    return Err(Error::validation(
                        format!("{field}[{i}]"),
                        "a model cannot fall back to itself",
                    ));
                }
                if list[..i].contains(alias) {
                    return Err(Error::validation(
                        format!("{field}[{i}]"),
                        format!("`{alias}` is listed twice"),
                    ));
                }
            }
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
                context_window: self.context_window,
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
            (
                "routing.first_token_timeout",
                self.first_token_timeout,
                one_ms,
                MAX_FIRST_TOKEN_TIMEOUT,
            ),
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
        if let Some(h) = &self.health_check {
            h.validate("routing.health_check")?;
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
    fn health_checks_are_bounded_and_default_to_front_doors_probe() {
        let mut m = model();
        let check = |m: &mut Model, h: serde_json::Value| {
            m.routing =
                Some(serde_json::from_value(serde_json::json!({"health_check": h})).unwrap());
            field_of(m)
        };
        assert_eq!(check(&mut m, serde_json::json!({})), None);
        let h = m.routing.as_ref().unwrap().health_check.as_ref().unwrap();
        assert_eq!(h.path(), DEFAULT_PROBE_PATH);
        assert_eq!(h.interval(), Duration::from_secs(10));
        assert_eq!(h.timeout(), Duration::from_secs(2));
        assert_eq!((h.unhealthy_after(), h.healthy_after()), (3, 2));
        // A 1 s interval gets half of it as timeout by default.
        assert_eq!(check(&mut m, serde_json::json!({"interval": "1s"})), None);
        for (bad, field) in [
            (serde_json::json!({"interval": "999ms"}), "interval"),
            (serde_json::json!({"interval": "3601s"}), "interval"),
            (
                serde_json::json!({"interval": "5s", "timeout": "5s"}),
                "timeout",
            ),
            (serde_json::json!({"unhealthy_after": 0}), "unhealthy_after"),
            (serde_json::json!({"healthy_after": 101}), "healthy_after"),
            (serde_json::json!({"path": "status"}), "path"),
            (serde_json::json!({"path": "/a/../b"}), "path"),
            (serde_json::json!({"path": "/a?x=1"}), "path"),
        ] {
            assert_eq!(
                check(&mut m, bad.clone()),
                Some(format!("routing.health_check.{field}")),
                "{bad}"
            );
        }
        assert_eq!(
            check(
                &mut m,
                serde_json::json!({"interval": "1h", "timeout": "59m", "unhealthy_after": 100, "healthy_after": 1, "path": "/openai/models"})
            ),
            None
        );
    }

    #[test]
    fn fallbacks_and_context_windows_are_checked() {
        let mut m = model();
        m.fallbacks.content_filter = vec!["strict".into(), "m".into()];
        assert_eq!(field_of(&m).as_deref(), Some("fallbacks.content_filter[1]"));
        m.fallbacks.content_filter = vec!["a".into(), "a".into()];
        assert_eq!(field_of(&m).as_deref(), Some("fallbacks.content_filter[1]"));
        m.fallbacks.content_filter = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        assert_eq!(field_of(&m).as_deref(), Some("fallbacks.content_filter"));
        m.fallbacks.content_filter = vec!["a".into(), "b".into(), "c".into()];
        m.fallbacks.unavailable = vec!["a".into()];
        assert_eq!(field_of(&m), None);
        assert_eq!(m.fallbacks.aliases().len(), 3);
        m.context_window = Some(0);
        assert_eq!(field_of(&m).as_deref(), Some("context_window"));
        m.context_window = Some(128_000);
        assert_eq!(field_of(&m), None);
        assert_eq!(m.resolved_targets()[0].context_window, Some(128_000));
        // With targets the window is per target.
        let mut t: Model = serde_json::from_value(serde_json::json!({
            "display_name": "t", "context_window": 1000,
            "targets": [{"provider_key_id": "pk", "model_name": "d", "context_window": 1000}],
        }))
        .unwrap();
        assert_eq!(field_of(&t).as_deref(), Some("context_window"));
        t.context_window = None;
        assert_eq!(field_of(&t), None);
        t.targets[0].context_window = Some(MAX_CONTEXT_WINDOW + 1);
        assert_eq!(field_of(&t).as_deref(), Some("targets[0].context_window"));
        // Absent fallbacks stay absent on the wire.
        let v = serde_json::to_value(model()).unwrap();
        assert!(v.get("fallbacks").is_none() && v.get("context_window").is_none());
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

//! Protobuf messages ↔ domain values. Proto3 has no "absent" for scalars:
//! an empty string means "not given".

use crate::error::Error;
use aigw_shared::domain::{
    ApiKey, Budget, BudgetPeriod, CacheConfig, ClaimMappings, Cost, Fallbacks, HealthCheck,
    HumanDuration, JwtProvider, Model, ProviderKey, RateLimit, Routing, RoutingStrategy, Target,
    DEFAULT_API_VERSION, DEFAULT_CLOCK_SKEW,
};
use aigw_shared::proto::admin::v1 as pb;

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn duration(field: &str, s: String) -> Result<Option<HumanDuration>, Error> {
    opt(s)
        .map(|t| HumanDuration::parse(&t).map_err(|m| Error::Invalid(format!("{field}: {m}"))))
        .transpose()
}

fn text(d: Option<HumanDuration>) -> String {
    d.map(|d| d.to_string()).unwrap_or_default()
}

pub fn provider_key_in(v: Option<pb::ProviderKey>) -> Result<ProviderKey, Error> {
    let v = v.ok_or_else(|| Error::Invalid("value: is required".into()))?;
    Ok(ProviderKey {
        display_name: v.display_name,
        provider: v.provider,
        adapter: opt(v.adapter).unwrap_or_else(|| "azure-openai".into()),
        secret: v.secret,
        api_base: v.api_base,
        api_version: opt(v.api_version).unwrap_or_else(|| DEFAULT_API_VERSION.into()),
        ca_pem: opt(v.ca_pem),
        allow_insecure_upstream: v.allow_insecure_upstream,
    })
}

pub fn provider_key_out(v: ProviderKey) -> pb::ProviderKey {
    pb::ProviderKey {
        display_name: v.display_name,
        provider: v.provider,
        adapter: v.adapter,
        secret: v.secret,
        api_base: v.api_base,
        api_version: v.api_version,
        ca_pem: v.ca_pem.unwrap_or_default(),
        allow_insecure_upstream: v.allow_insecure_upstream,
    }
}

fn rate_limit_in(v: pb::RateLimit) -> RateLimit {
    RateLimit {
        rpm: v.rpm,
        tpm: v.tpm,
        rpd: v.rpd,
        tpd: v.tpd,
        concurrency: v.concurrency,
    }
}

fn rate_limit_out(v: RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        rpm: v.rpm,
        tpm: v.tpm,
        rpd: v.rpd,
        tpd: v.tpd,
        concurrency: v.concurrency,
    }
}

pub fn model_in(v: Option<pb::Model>) -> Result<Model, Error> {
    let v = v.ok_or_else(|| Error::Invalid("value: is required".into()))?;
    let routing = v
        .routing
        .map(|r| -> Result<Routing, Error> {
            Ok(Routing {
                strategy: match r.strategy.as_str() {
                    "" | "weighted" => RoutingStrategy::Weighted,
                    "round_robin" => RoutingStrategy::RoundRobin,
                    "least_latency" => RoutingStrategy::LeastLatency,
                    other => {
                        return Err(Error::Invalid(format!(
                            "routing.strategy: unknown `{other}`; use weighted, round_robin, least_latency"
                        )))
                    }
                },
                retries: r.retries,
                retry_backoff: duration("routing.retry_backoff", r.retry_backoff)?,
                timeout: duration("routing.timeout", r.timeout)?,
                stream_idle_timeout: duration("routing.stream_idle_timeout", r.stream_idle_timeout)?,
                cooldown: duration("routing.cooldown", r.cooldown)?,
                first_token_timeout: duration(
                    "routing.first_token_timeout",
                    r.first_token_timeout,
                )?,
                health_check: r
                    .health_check
                    .map(|h| -> Result<Box<HealthCheck>, Error> {
                        Ok(Box::new(HealthCheck {
                            path: opt(h.path),
                            interval: duration("routing.health_check.interval", h.interval)?,
                            timeout: duration("routing.health_check.timeout", h.timeout)?,
                            unhealthy_after: h.unhealthy_after,
                            healthy_after: h.healthy_after,
                        }))
                    })
                    .transpose()?,
            })
        })
        .transpose()?;
    Ok(Model {
        display_name: v.display_name,
        provider: v.provider,
        model_name: opt(v.model_name),
        provider_key_id: opt(v.provider_key_id),
        targets: v
            .targets
            .into_iter()
            .map(|t| Target {
                provider_key_id: t.provider_key_id,
                model_name: t.model_name,
                priority: t.priority,
                weight: t.weight.max(1),
                context_window: t.context_window,
            })
            .collect(),
        routing,
        rate_limit: v.rate_limit.map(rate_limit_in),
        cost: v.cost.map(|c| Cost {
            input_per_1k: c.input_per_1k,
            output_per_1k: c.output_per_1k,
        }),
        cache: v.cache.map(|c| CacheConfig {
            enabled: c.enabled,
            ttl_seconds: c.ttl_seconds,
            max_entries: c.max_entries,
            max_bytes: c.max_bytes,
        }),
        log_payloads: v.log_payloads,
        context_window: v.context_window,
        fallbacks: Box::new(
            v.fallbacks
                .map(|f| Fallbacks {
                    content_filter: f.content_filter,
                    context_window_exceeded: f.context_window_exceeded,
                    unavailable: f.unavailable,
                })
                .unwrap_or_default(),
        ),
    })
}

pub fn model_out(v: Model) -> pb::Model {
    pb::Model {
        display_name: v.display_name,
        provider: v.provider,
        model_name: v.model_name.unwrap_or_default(),
        provider_key_id: v.provider_key_id.unwrap_or_default(),
        targets: v
            .targets
            .into_iter()
            .map(|t| pb::Target {
                provider_key_id: t.provider_key_id,
                model_name: t.model_name,
                priority: t.priority,
                weight: t.weight,
                context_window: t.context_window,
            })
            .collect(),
        routing: v.routing.map(|r| pb::Routing {
            strategy: match r.strategy {
                RoutingStrategy::Weighted => "weighted",
                RoutingStrategy::RoundRobin => "round_robin",
                RoutingStrategy::LeastLatency => "least_latency",
            }
            .into(),
            retries: r.retries,
            retry_backoff: text(r.retry_backoff),
            timeout: text(r.timeout),
            stream_idle_timeout: text(r.stream_idle_timeout),
            cooldown: text(r.cooldown),
            first_token_timeout: text(r.first_token_timeout),
            health_check: r.health_check.map(|h| pb::HealthCheck {
                path: h.path.unwrap_or_default(),
                interval: text(h.interval),
                timeout: text(h.timeout),
                unhealthy_after: h.unhealthy_after,
                healthy_after: h.healthy_after,
            }),
        }),
        rate_limit: v.rate_limit.map(rate_limit_out),
        cost: v.cost.map(|c| pb::Cost {
            input_per_1k: c.input_per_1k,
            output_per_1k: c.output_per_1k,
        }),
        cache: v.cache.map(|c| pb::Cache {
            enabled: c.enabled,
            ttl_seconds: c.ttl_seconds,
            max_entries: c.max_entries,
            max_bytes: c.max_bytes,
        }),
        log_payloads: v.log_payloads,
        context_window: v.context_window,
        fallbacks: (!v.fallbacks.is_empty()).then_some(pb::Fallbacks {
            content_filter: v.fallbacks.content_filter,
            context_window_exceeded: v.fallbacks.context_window_exceeded,
            unavailable: v.fallbacks.unavailable,
        }),
    }
}

pub fn api_key_in(v: Option<pb::ApiKey>) -> Result<ApiKey, Error> {
    let v = v.ok_or_else(|| Error::Invalid("value: is required".into()))?;
    let expires_at = opt(v.expires_at)
        .map(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| Error::Invalid(format!("expires_at: not an RFC 3339 time: {e}")))
        })
        .transpose()?;
    let budget = v
        .budget
        .map(|b| -> Result<Budget, Error> {
            Ok(Budget {
                max_usd: b.max_usd,
                period: match b.period.as_str() {
                    "" | "month" => BudgetPeriod::Month,
                    "day" => BudgetPeriod::Day,
                    "total" => BudgetPeriod::Total,
                    other => {
                        return Err(Error::Invalid(format!(
                            "budget.period: unknown `{other}`; use day, month, total"
                        )))
                    }
                },
            })
        })
        .transpose()?;
    Ok(ApiKey {
        key_hash: v.key_hash,
        allowed_models: v.allowed_models,
        display_name: opt(v.display_name),
        rate_limit: v.rate_limit.map(rate_limit_in),
        budget,
        expires_at,
        disabled: v.disabled,
        jwt_provider_id: opt(v.jwt_provider_id),
        jwt_subject: opt(v.jwt_subject),
        jwt_claims: v.jwt_claims.into_iter().collect(),
    })
}

pub fn api_key_out(v: ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        key_hash: v.key_hash,
        allowed_models: v.allowed_models,
        display_name: v.display_name.unwrap_or_default(),
        rate_limit: v.rate_limit.map(rate_limit_out),
        budget: v.budget.map(|b| pb::Budget {
            max_usd: b.max_usd,
            period: match b.period {
                BudgetPeriod::Day => "day",
                BudgetPeriod::Month => "month",
                BudgetPeriod::Total => "total",
            }
            .into(),
        }),
        expires_at: v
            .expires_at
            .map(crate::events::format_rfc3339)
            .unwrap_or_default(),
        disabled: v.disabled,
        jwt_provider_id: v.jwt_provider_id.unwrap_or_default(),
        jwt_subject: v.jwt_subject.unwrap_or_default(),
        jwt_claims: v.jwt_claims.into_iter().collect(),
    }
}

pub fn jwt_provider_in(v: Option<pb::JwtProvider>) -> Result<JwtProvider, Error> {
    let v = v.ok_or_else(|| Error::Invalid("value: is required".into()))?;
    let caller_id = v.claim_mappings.map(|c| c.caller_id).unwrap_or_default();
    Ok(JwtProvider {
        display_name: v.display_name,
        issuer: v.issuer,
        audiences: v.audiences,
        jwks_uri: opt(v.jwks_uri),
        claim_mappings: if caller_id.is_empty() {
            ClaimMappings::default()
        } else {
            ClaimMappings { caller_id }
        },
        clock_skew: duration("clock_skew", v.clock_skew)?
            .unwrap_or(HumanDuration(DEFAULT_CLOCK_SKEW)),
    })
}

pub fn jwt_provider_out(v: JwtProvider) -> pb::JwtProvider {
    pb::JwtProvider {
        display_name: v.display_name,
        issuer: v.issuer,
        audiences: v.audiences,
        jwks_uri: v.jwks_uri.unwrap_or_default(),
        claim_mappings: Some(pb::ClaimMappings {
            caller_id: v.claim_mappings.caller_id,
        }),
        clock_skew: v.clock_skew.to_string(),
    }
}

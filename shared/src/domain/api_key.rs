use super::{model::RateLimit, non_empty};
use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// A caller credential (`/admin/v1/apikeys`): either a key, stored only as its
/// sha256, or a JWT identity bound with `jwt_provider_id` plus `jwt_subject`
/// and/or `jwt_claims`. Allowlists, limits and budgets apply the same way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Lower-case hex sha256 of the caller's key; empty for a JWT identity.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_hash: String,
    /// Aliases; `"*"` allows all, `[]` none.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub disabled: bool,
    /// Callers presenting a JWT of this provider (its id), instead of a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_provider_id: Option<String>,
    /// The exact caller id (the provider's `claim_mappings.caller_id` claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_subject: Option<String>,
    /// Claims the token must carry, name → value; for a list claim (`roles`,
    /// `groups`) or a space-separated one (`scp`) the value must be among them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub jwt_claims: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub max_usd: f64,
    #[serde(default)]
    pub period: BudgetPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    #[default]
    Month,
    Total,
}

impl ApiKey {
    /// Checks the value and normalises `key_hash` to lower case.
    pub fn validate(&mut self) -> Result<(), Error> {
        self.key_hash = self.key_hash.trim().to_ascii_lowercase();
        match &self.jwt_provider_id {
            Some(provider) => self.validate_jwt_binding(provider)?,
            None => {
                if self.key_hash.len() != 64
                    || !self.key_hash.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(Error::validation(
                        "key_hash",
                        "must be the 64-character hex sha256 of the caller's key \
                         (or bind a JWT identity with jwt_provider_id instead)",
                    ));
                }
                if self.jwt_subject.is_some() || !self.jwt_claims.is_empty() {
                    let field = if self.jwt_subject.is_some() {
                        "jwt_subject"
                    } else {
                        "jwt_claims"
                    };
                    return Err(Error::validation(field, "requires jwt_provider_id"));
                }
            }
        }
        if let Some(name) = &self.display_name {
            non_empty("display_name", name)?;
        }
        for (i, m) in self.allowed_models.iter().enumerate() {
            non_empty(&format!("allowed_models[{i}]"), m)?;
        }
        if let Some(rl) = &self.rate_limit {
            rl.validate("rate_limit")?;
        }
        if let Some(b) = &self.budget {
            if !b.max_usd.is_finite() || b.max_usd < 0.0 {
                return Err(Error::validation(
                    "budget.max_usd",
                    "must be a non-negative number",
                ));
            }
        }
        Ok(())
    }

    fn validate_jwt_binding(&self, provider: &str) -> Result<(), Error> {
        non_empty("jwt_provider_id", provider)?;
        if !self.key_hash.is_empty() {
            return Err(Error::validation(
                "key_hash",
                "give either key_hash or jwt_provider_id, not both",
            ));
        }
        if let Some(subject) = &self.jwt_subject {
            non_empty("jwt_subject", subject)?;
        }
        for (name, value) in &self.jwt_claims {
            non_empty("jwt_claims", name)?;
            non_empty(&format!("jwt_claims.{name}"), value)?;
        }
        if self.jwt_subject.is_none() && self.jwt_claims.is_empty() {
            return Err(Error::validation(
                "jwt_subject",
                "a JWT identity needs jwt_subject or jwt_claims (or both)",
            ));
        }
        Ok(())
    }

    /// Binds a JWT identity rather than a key.
    pub fn is_jwt(&self) -> bool {
        self.jwt_provider_id.is_some()
    }

    pub fn allows(&self, alias: &str) -> bool {
        self.allowed_models.iter().any(|m| m == "*" || m == alias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_key() -> ApiKey {
        ApiKey {
            jwt_provider_id: Some("p1".into()),
            jwt_subject: Some("00000000-0000-0000-0000-000000000001".into()),
            allowed_models: vec!["*".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_key_is_a_hash_or_a_jwt_identity() {
        jwt_key().validate().unwrap();
        let mut claims_only = jwt_key();
        claims_only.jwt_subject = None;
        claims_only
            .jwt_claims
            .insert("roles".into(), "Aigw.Caller".into());
        claims_only.validate().unwrap();

        let err = |mut k: ApiKey| k.validate().unwrap_err().to_string();
        assert!(err(ApiKey::default()).starts_with("key_hash"));
        let mut both = jwt_key();
        both.key_hash = "a".repeat(64);
        assert!(err(both).contains("not both"));
        let mut bare = jwt_key();
        bare.jwt_subject = None;
        assert!(err(bare).starts_with("jwt_subject"));
        let mut orphan = ApiKey {
            key_hash: "a".repeat(64),
            ..Default::default()
        };
        orphan.jwt_subject = Some("x".into());
        assert_eq!(err(orphan), "jwt_subject: requires jwt_provider_id");
        let mut empty_claim = jwt_key();
        empty_claim.jwt_claims.insert("groups".into(), " ".into());
        assert!(err(empty_claim).starts_with("jwt_claims.groups"));
    }

    #[test]
    fn plain_keys_serialize_as_before() {
        let k = ApiKey {
            key_hash: "a".repeat(64),
            ..Default::default()
        };
        let v = serde_json::to_value(&k).unwrap();
        assert!(v.get("jwt_provider_id").is_none() && v.get("jwt_claims").is_none());
        let j = serde_json::to_value(jwt_key()).unwrap();
        assert!(j.get("key_hash").is_none(), "{j}");
    }
}

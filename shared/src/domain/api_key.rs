use super::{model::RateLimit, non_empty};
use crate::error::Error;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A caller credential, stored only as the sha256 of the key (`/admin/v1/apikeys`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Lower-case hex sha256 of the caller's key.
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
        if self.key_hash.len() != 64 || !self.key_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::validation(
                "key_hash",
                "must be the 64-character hex sha256 of the caller's key",
            ));
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

    pub fn allows(&self, alias: &str) -> bool {
        self.allowed_models.iter().any(|m| m == "*" || m == alias)
    }
}

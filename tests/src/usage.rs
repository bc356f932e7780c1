//! Usage totals as the control plane's admin API reports them
//! (`GET /admin/v1/usage`), and an exact comparison with totals a test
//! computed from the calls it made.

use crate::process::poll_until;
use crate::rest::AdminClient;
use anyhow::{ensure, Result};
use serde_json::Value;
use std::ops::AddAssign;
use std::time::Duration;

/// Sums over all usage rows. `cost_nanos` is the cost in nano-USD (exact when
/// prices are multiples of 1e-6 USD per 1k tokens).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub prompt: u64,
    pub completion: u64,
    pub cost_nanos: u64,
}

impl AddAssign for Totals {
    fn add_assign(&mut self, r: Self) {
        self.requests += r.requests;
        self.errors += r.errors;
        self.prompt += r.prompt;
        self.completion += r.completion;
        self.cost_nanos += r.cost_nanos;
    }
}

/// The sums of every row of `GET /admin/v1/usage`.
pub async fn usage_totals(admin: &AdminClient) -> Result<Totals> {
    let v: Value = admin.get("/admin/v1/usage").await?.expect(200)?;
    let mut t = Totals::default();
    for row in v["rows"].as_array().cloned().unwrap_or_default() {
        t.requests += row["requests"].as_u64().unwrap_or(0);
        t.errors += row["errors"].as_u64().unwrap_or(0);
        t.prompt += row["prompt_tokens"].as_u64().unwrap_or(0);
        t.completion += row["completion_tokens"].as_u64().unwrap_or(0);
        t.cost_nanos += (row["cost_usd"].as_f64().unwrap_or(0.0) * 1e9).round() as u64;
    }
    Ok(t)
}

/// Waits (at most `attempts` polls 100 ms apart) until the usage API has
/// counted `expected.requests` calls, then requires every total to match
/// exactly (more would mean double counting).
pub async fn assert_totals(admin: &AdminClient, expected: Totals, attempts: u32) -> Result<()> {
    let got = poll_until(
        "usage totals to reach the calls made",
        attempts,
        Duration::from_millis(100),
        || async {
            let t = usage_totals(admin).await?;
            ensure!(
                t.requests <= expected.requests,
                "counted twice: {t:?} > {expected:?}"
            );
            Ok((t.requests == expected.requests).then_some(t))
        },
    )
    .await?;
    ensure!(
        got == expected,
        "usage API {got:?} != computed {expected:?}"
    );
    Ok(())
}

/// Waits (≤ 4 s) until every client's key is refused `429 budget_exceeded`
/// on a chat call to `alias`: a crossed budget reaching each node.
pub async fn wait_budget_refused(
    clients: &[crate::data_plane::ProxyClient],
    alias: &str,
) -> Result<()> {
    for (n, c) in clients.iter().enumerate() {
        poll_until(
            &format!("node-{n} to refuse the key over budget"),
            400,
            Duration::from_millis(10),
            || async {
                let r = c
                    .chat(&crate::data_plane::chat_body(alias, "one more"))
                    .await?;
                Ok((r.status.as_u16() == 429 && r.text.contains("budget_exceeded")).then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

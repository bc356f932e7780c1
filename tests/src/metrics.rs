//! Reading Prometheus text from a `/metrics` endpoint.

use anyhow::Result;

/// The value of the series written exactly as `series` (name and labels),
/// e.g. `aigw_cp_usage_rejected_total{reason="tokens_out_of_bounds"}`.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrapes `url` (a full `/metrics` address) and reads `series`; 0 when absent.
pub async fn scrape_value(url: &str, series: &str) -> Result<f64> {
    let text = reqwest::get(url).await?.error_for_status()?.text().await?;
    Ok(value(&text, series).unwrap_or(0.0))
}

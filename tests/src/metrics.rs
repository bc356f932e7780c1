//! Reading Prometheus text from a `/metrics` endpoint.

use anyhow::{Context, Result};

/// Scrapes `url` (a full `/metrics` address): the sum of `name`'s samples
/// with all of `labels`, 0 when absent.
pub async fn scrape_value(url: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let text = reqwest::get(url).await?.error_for_status()?.text().await?;
    Ok(sum(&scrape(&text)?, name, labels))
}

/// Prometheus text parsed (types, labels, values).
pub fn scrape(text: &str) -> Result<prometheus_parse::Scrape> {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .context("parsing /metrics")
}

/// The sum of `name`'s samples whose labels include all of `labels`; 0 when absent.
pub fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

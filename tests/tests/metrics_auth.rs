//! `/metrics` names aliases, key ids and cost: with a metrics token only a
//! scrape that presents it (or, on the admin port, an admin key) reads it;
//! health probes stay open.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{DataPlane, DataPlaneOptions};
use anyhow::{ensure, Result};
use serde_json::json;

const TOKEN: &str = "prometheus-0123456789abcdef";

async fn get(url: &str, bearer: Option<&str>) -> Result<(u16, String)> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let resp = req.send().await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

#[tokio::test]
async fn a_metrics_token_guards_metrics_on_both_planes() -> Result<()> {
    let cp = ControlPlane::start_with(
        Options::default()
            .with_config(json!({"control_plane": {"metrics_auth": {"token": TOKEN}}})),
    )
    .await?;
    let cp_metrics = format!("{}/metrics", cp.admin_url());
    let (status, body) = get(&cp_metrics, None).await?;
    ensure!(
        status == 401 && body.contains("metrics_auth"),
        "{status} {body}"
    );
    ensure!(get(&cp_metrics, Some("wrong-token-0123456789")).await?.0 == 401);
    let (status, body) = get(&cp_metrics, Some(TOKEN)).await?;
    ensure!(
        status == 200 && body.contains("aigw_cp_snapshot_version"),
        "{status}"
    );
    ensure!(get(&cp_metrics, Some(cp.admin_key())).await?.0 == 200);
    ensure!(get(&format!("{}/livez", cp.admin_url()), None).await?.0 == 200);

    let dp = DataPlane::start_ready(
        DataPlaneOptions::for_control_plane(&cp, "node-m")
            .with_config(json!({"data_plane": {"metrics_auth": {"token": TOKEN}}})),
    )
    .await?;
    let dp_metrics = format!("{}/metrics", dp.metrics_url());
    let (status, body) = get(&dp_metrics, None).await?;
    ensure!(
        status == 401 && body.contains("metrics_auth"),
        "{status} {body}"
    );
    let (status, body) = get(&dp_metrics, Some(TOKEN)).await?;
    ensure!(
        status == 200 && body.contains("aigw_listener_connections"),
        "{status}"
    );
    ensure!(get(&format!("{}/livez", dp.metrics_url()), None).await?.0 == 200);
    ensure!(get(&format!("{}/readyz", dp.metrics_url()), None).await?.0 == 200);
    Ok(())
}

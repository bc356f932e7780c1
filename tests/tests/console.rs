//! The admin console in a real browser (issue 23): headless Chromium through
//! chromedriver against the standalone `aigw` with a mock Azure upstream and
//! a local OpenID issuer. An operator signs in with the admin key, creates a
//! provider key, a model and an API key through the forms, uses the key
//! shown once for a proxy call, finds the call in Usage and the three writes
//! in the Audit log under the console's actor; a viewer signed in through
//! SSO sees no write button and a forged post gets 403; a post without the
//! CSRF token is refused. Every page is screenshotted into
//! `target/<profile>/console-screenshots/`.

use aigw_tests::browser::{screenshot_dir, Browser};
use aigw_tests::data_plane::{chat_body, wait_standalone_synced, ProxyClient};
use aigw_tests::mock_azure::{MockAzure, API_VERSION};
use aigw_tests::mock_oidc::{MockOidc, TestKey};
use aigw_tests::process::{free_addr, poll_until};
use aigw_tests::{ControlPlane, Options};
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::time::Duration;

const AZURE_SECRET: &str = "console-azure-secret";
const DEPLOYMENT: &str = "gpt4o-console";
const ALIAS: &str = "gpt-console";
const PK_NAME: &str = "azure-console";
const KEY_NAME: &str = "console-caller";
const CLIENT_ID: &str = "aigw-console";

struct Env {
    _mock: MockAzure,
    oidc: MockOidc,
    cp: ControlPlane,
    base: String,
}

async fn env() -> Result<Env> {
    let mock = MockAzure::start().await;
    mock.set_api_key(AZURE_SECRET);
    mock.add_deployment(DEPLOYMENT, "gpt-4o-mini-2024-07-18");
    let oidc = MockOidc::start(&[]).await;
    oidc.enable_code_flow(TestKey::rsa("console-key"), CLIENT_ID);
    // The redirect URL names the admin listener, so it is picked here.
    let admin = free_addr();
    let cp = ControlPlane::start_with(Options::standalone().with_config(json!({
        "control_plane": { "admin_listen": admin.to_string() },
        "admin": { "console": { "oidc": {
            "issuer": oidc.issuer(),
            "client_id": CLIENT_ID,
            "redirect_url": format!("http://{admin}/console/oidc/callback"),
            "admin_values": ["console.admin"],
            "viewer_values": ["console.viewer"],
        } } },
    })))
    .await?;
    Ok(Env {
        _mock: mock,
        base: format!("http://{admin}"),
        oidc,
        cp,
    })
}

/// The id of the listed row whose name cell is `name`.
async fn row_id(b: &Browser, name: &str) -> Result<String> {
    for row in b.find_all("#list tbody tr[data-id]").await? {
        if row.text().await?.contains(name) {
            return row.attr("data-id").await?.context("row without data-id");
        }
    }
    anyhow::bail!("no row named {name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_end_to_end_in_a_browser() -> Result<()> {
    let env = env().await?;
    let base = &env.base;
    let b = Browser::start().await?;

    // `/` leads to the sign-in page; a wrong key is refused there.
    b.goto(&format!("{base}/")).await?;
    b.wait("#admin_key").await?;
    b.screenshot("01-login").await?;
    b.fill("#admin_key", "not-the-key").await?;
    b.click("#sign-in").await?;
    ensure!(b.text("#login-error").await?.contains("not an admin key"));
    b.fill("#admin_key", env.cp.admin_key()).await?;
    b.click("#sign-in").await?;
    let identity = b.text("#identity").await?;
    ensure!(identity.starts_with("key:"), "{identity}");
    ensure!(b.text("#role").await? == "admin");
    let actor = format!("console:{identity}");

    // Provider key: an API error is shown next to the field it names.
    b.goto(&format!("{base}/console/provider_keys")).await?;
    b.fill("#display_name", PK_NAME).await?;
    b.fill("#api_base", "ftp://nowhere").await?;
    b.fill("#secret", AZURE_SECRET).await?;
    b.click("#create").await?;
    let err = b.text("#api_base-error").await?;
    ensure!(err.contains("api_base"), "error not beside api_base: {err}");
    b.screenshot("02-provider-key-error").await?;
    b.fill("#api_base", &env._mock.base_url()).await?;
    b.fill("#api_version", API_VERSION).await?;
    b.fill("#secret", AZURE_SECRET).await?;
    b.click("#allow_insecure_upstream").await?;
    b.click("#create").await?;
    b.wait("#list tbody tr[data-id]").await?;
    let pk_id = row_id(&b, PK_NAME).await?;
    ensure!(
        !b.client.source().await?.contains(AZURE_SECRET),
        "the provider secret is shown"
    );
    b.screenshot("03-provider-keys").await?;

    // Model on that key's deployment, with a cost so usage has one.
    b.goto(&format!("{base}/console/models")).await?;
    b.fill("#display_name", ALIAS).await?;
    b.wait("#targets-0--provider_key_id")
        .await?
        .select_by_value(&pk_id)
        .await?;
    b.fill("#targets-0--model_name", DEPLOYMENT).await?;
    b.fill("#cost-input_per_1k", "0.5").await?;
    b.fill("#cost-output_per_1k", "1.5").await?;
    b.click("#create").await?;
    b.wait("#list tbody tr[data-id]").await?;
    let model_id = row_id(&b, ALIAS).await?;
    b.screenshot("04-models").await?;

    // API key: generated, shown once, allowed the new alias.
    b.goto(&format!("{base}/console/api_keys")).await?;
    b.fill("#display_name", KEY_NAME).await?;
    for cb in b.find_all("input[name=allowed_models]").await? {
        if cb.attr("value").await?.as_deref() == Some(ALIAS) {
            cb.click().await?;
        }
    }
    b.click("#create").await?;
    let shown = b.wait("#new-key").await?;
    let caller_key = shown.prop("value").await?.context("no key shown")?;
    ensure!(
        caller_key.starts_with("sk-aigw-") && caller_key.len() > 40,
        "{caller_key}"
    );
    b.click("button[data-copy=new-key]").await?;
    b.screenshot("05-api-key-shown-once").await?;
    let key_id = row_id(&b, KEY_NAME).await?;
    // Only the hash is kept: the list after a reload does not show the key.
    b.goto(&format!("{base}/console/api_keys")).await?;
    b.wait("#list").await?;
    ensure!(
        !b.client.source().await?.contains(&caller_key),
        "the key is shown twice"
    );

    // The copied key works on the proxy...
    wait_standalone_synced(&env.cp).await?;
    let proxy = ProxyClient::new(&env.cp.proxy_url(), Some(&caller_key));
    let r = proxy
        .chat(&chat_body(ALIAS, "hello from the console test"))
        .await?;
    ensure!(
        r.status == 200,
        "proxy call with the console's key: {} {}",
        r.status,
        r.text
    );

    // ...and in the playground, through the data plane, with latency, tokens and target.
    b.goto(&format!("{base}/console/playground")).await?;
    b.wait("#model").await?.select_by_value(ALIAS).await?;
    b.fill("#caller_key", &caller_key).await?;
    b.fill("#message", "Say hi").await?;
    b.click("#send").await?;
    ensure!(b.text("#result-status").await? == "200");
    let served_by = b.text("#result-served-by").await?;
    ensure!(served_by.contains(DEPLOYMENT), "served by {served_by}");
    ensure!(!b.text("#result-answer").await?.is_empty());
    ensure!(b
        .text("#result-tokens")
        .await?
        .chars()
        .any(|c| c.is_ascii_digit()));
    b.screenshot("06-playground").await?;
    // The same as a stream (SSE): the answer is put together from its chunks.
    b.wait("#model").await?.select_by_value(ALIAS).await?;
    b.fill("#caller_key", &caller_key).await?;
    b.click("#stream").await?;
    b.click("#send").await?;
    ensure!(b.text("#result-status").await? == "200");
    ensure!(
        !b.text("#result-answer").await?.is_empty(),
        "empty streamed answer"
    );
    ensure!(b.text("#result-served-by").await?.contains(DEPLOYMENT));

    // Usage shows the calls once aggregated (the REST view says when).
    let admin = env.cp.rest();
    poll_until(
        "usage of the console's key",
        300,
        Duration::from_millis(200),
        || {
            let admin = admin.clone();
            let key_id = key_id.clone();
            async move {
                let rows = admin
                    .get("/admin/v1/usage?group_by=api_key")
                    .await?
                    .json()?;
                let n = rows["rows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["group"]["api_key"] == json!(key_id))
                    .map(|r| r["requests"].as_u64().unwrap_or(0))
                    .sum::<u64>();
                Ok((n >= 2).then_some(()))
            }
        },
    )
    .await?;
    b.goto(&format!("{base}/console/usage?group_by=api_key"))
        .await?;
    let table = b.text("#usage-table").await?;
    ensure!(table.contains(KEY_NAME), "usage table:\n{table}");
    b.wait("#chart-cost-per-day").await?;
    b.wait("#chart-top-keys").await?;
    b.screenshot("07-usage").await?;
    let csv = b
        .wait("#csv")
        .await?
        .attr("href")
        .await?
        .context("csv link")?;
    ensure!(csv.starts_with("/console/usage.csv?"));

    // The three writes, each with the console's actor.
    b.goto(&format!("{base}/console/audit")).await?;
    let audit = b.text("#audit-table").await?;
    for (kind, id) in [
        ("ProviderKeyCreated", &pk_id),
        ("ModelCreated", &model_id),
        ("ApiKeyCreated", &key_id),
    ] {
        let row = audit
            .lines()
            .find(|l| l.contains(kind) && l.contains(id.as_str()))
            .with_context(|| format!("no {kind} for {id} in the audit log:\n{audit}"))?;
        ensure!(row.contains(&actor), "{kind} not by {actor}: {row}");
    }
    ensure!(!audit.contains(AZURE_SECRET));
    b.screenshot("08-audit").await?;
    let events = admin.events("resource=models").await?;
    ensure!(events.iter().any(|e| e["actor"] == json!(actor)));

    // The remaining pages render.
    b.goto(&format!("{base}/console/")).await?;
    b.wait("#config-version").await?;
    b.wait("#nodes-table").await?;
    b.screenshot("00-overview").await?;
    b.goto(&format!("{base}/console/jwt_providers")).await?;
    b.wait("#create-form").await?;
    b.screenshot("09-jwt-providers").await?;
    b.goto(&format!("{base}/console/models/{model_id}")).await?;
    let value = b
        .wait("#value")
        .await?
        .prop("value")
        .await?
        .unwrap_or_default();
    ensure!(value.contains(DEPLOYMENT), "edit form: {value}");
    b.screenshot("10-model-edit").await?;
    // An edit goes through the API's parse: an unknown field is named above the form...
    let textarea = b.wait("#value").await?;
    textarea.clear().await?;
    textarea
        .send_keys(&value.replace("\"display_name\"", "\"display_nam\""))
        .await?;
    b.click("#save").await?;
    let err = b.text("#form-error").await?;
    ensure!(err.contains("display_nam"), "edit error: {err}");
    // ...and a valid one is saved (weight 1 -> 4) and listed.
    let textarea = b.wait("#value").await?;
    textarea.clear().await?;
    textarea
        .send_keys(&value.replace("\"weight\": 1", "\"weight\": 4"))
        .await?;
    b.click("#save").await?;
    let listed = b.text("#list").await?;
    ensure!(listed.contains("weight 4"), "after the edit:\n{listed}");
    b.goto(&format!("{base}/console/sessions")).await?;
    b.wait("#sessions-table").await?;
    b.screenshot("11-sessions").await?;

    // Posts without the session's CSRF token are refused, and change nothing.
    let before = admin.list("models").await?.len();
    let status = b
        .fetch_status("/console/models", &format!("display_name=csrf-less&targets%5B0%5D.provider_key_id={pk_id}&targets%5B0%5D.model_name=x"))
        .await?;
    ensure!(status == 403, "a CSRF-less post got {status}");
    let status = b
        .fetch_status(&format!("/console/models/{model_id}/delete"), "csrf=0000")
        .await?;
    ensure!(status == 403, "a post with a wrong CSRF token got {status}");
    ensure!(admin.list("models").await?.len() == before);
    // Without the session cookie at all: 401, not a page.
    let anon = reqwest::Client::new()
        .post(format!("{base}/console/models/{model_id}/delete"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=x")
        .send()
        .await?;
    ensure!(anon.status() == 401, "{}", anon.status());

    // Sign out ends the session.
    b.click("header form[action='/console/logout'] button")
        .await?;
    b.wait("#admin_key").await?;
    b.goto(&format!("{base}/console/models")).await?;
    b.wait("#admin_key").await?;

    // SSO: someone without a console role is refused.
    env.oidc.login_as("mallory", &["something.else"]);
    b.click("#sso").await?;
    ensure!(b.text("#page-error").await?.contains("no console role"));

    // SSO as a viewer: reads only, no write button; a forged post gets 403.
    env.oidc.login_as("vera", &["console.viewer"]);
    b.goto(&format!("{base}/console/login")).await?;
    b.click("#sso").await?;
    ensure!(b.text("#identity").await? == "oidc:vera");
    ensure!(b.text("#role").await? == "viewer");
    for page in ["provider_keys", "models", "api_keys", "jwt_providers"] {
        b.goto(&format!("{base}/console/{page}")).await?;
        b.wait("#list").await?;
        let writes = b
            .find_all("#create, #create-form, button.danger, form[action$='/purge']")
            .await?;
        ensure!(
            writes.is_empty(),
            "the viewer sees {} write controls on {page}",
            writes.len()
        );
    }
    b.goto(&format!("{base}/console/api_keys")).await?;
    ensure!(b.text("#list").await?.contains(KEY_NAME));
    b.screenshot("12-viewer-api-keys").await?;
    b.goto(&format!("{base}/console/models/{model_id}")).await?;
    b.wait("#value").await?;
    ensure!(
        b.find_all("#save").await?.is_empty(),
        "the viewer has a save button"
    );
    // The viewer's own CSRF token, as a forger inside the page would use it.
    let csrf = b
        .wait("input[name=csrf]")
        .await?
        .prop("value")
        .await?
        .context("csrf token")?;
    let status = b
        .fetch_status(
            &format!("/console/models/{model_id}/delete"),
            &format!("csrf={csrf}"),
        )
        .await?;
    ensure!(status == 403, "the viewer's forged delete got {status}");
    let status = b
        .fetch_status(
            "/console/api_keys",
            &format!("csrf={csrf}&display_name=forged&allowed_models=*"),
        )
        .await?;
    ensure!(status == 403, "the viewer's forged create got {status}");
    ensure!(admin.list("models").await?.len() == before);
    ensure!(!admin
        .list("apikeys")
        .await?
        .iter()
        .any(|k| k["value"]["display_name"] == json!("forged")));
    ensure!(env.oidc.pkce_refusals() == 0);

    // SSO as an admin: the mapping gives writes.
    b.click("header form[action='/console/logout'] button")
        .await?;
    env.oidc.login_as("alice", &["console.admin"]);
    b.goto(&format!("{base}/console/login")).await?;
    b.click("#sso").await?;
    ensure!(b.text("#role").await? == "admin");
    b.goto(&format!("{base}/console/models")).await?;
    b.wait("#create").await?;

    b.close().await?;
    eprintln!("console screenshots: {}", screenshot_dir().display());
    Ok(())
}

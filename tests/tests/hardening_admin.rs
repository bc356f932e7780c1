//! Issue 17, the admin's rows: values a data plane could not compile, or that
//! would make a call panic or leak a secret, are refused at the write (400
//! naming the field), and the gateway keeps serving and applying later
//! changes. Real `aigw` binary in standalone mode, mock Azure upstreams.

use aigw_tests::data_plane::{chat_body, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{
    self, seed_azure, Seeded, MODELS, PROVIDER_KEYS, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT,
};
use aigw_tests::mock_azure::{MockAzure, DEFAULT_API_KEY};
use aigw_tests::{AdminClient, ControlPlane, Options, Resp};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

struct Gateway {
    mock: MockAzure,
    cp: ControlPlane,
    admin: AdminClient,
    seeded: Seeded,
    /// Presents `sk-all`, allowed every alias.
    proxy: ProxyClient,
}

async fn gateway() -> Result<Gateway> {
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let seeded = seed_azure(&admin, &mock.base_url(), DEFAULT_API_KEY).await?;
    admin
        .create_id("apikeys", &fixtures::api_key("sk-all", &["*"]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let proxy = ProxyClient::new(&cp.proxy_url(), Some("sk-all"));
    Ok(Gateway {
        mock,
        cp,
        admin,
        seeded,
        proxy,
    })
}

impl Gateway {
    /// A 400 whose message names every one of `mentions`.
    async fn refused(&self, resp: Result<Resp>, mentions: &[&str]) -> Result<String> {
        let msg = resp?.expect_error(400)?;
        for m in mentions {
            ensure!(msg.contains(m), "error_msg {msg:?} does not mention {m:?}");
        }
        Ok(msg)
    }

    /// A model body on the seed's provider key.
    fn model(&self, alias: &str, deployment: &str) -> Value {
        fixtures::model_on(alias, deployment, &self.seeded.provider_key_id)
    }

    /// The gateway still applies changes and serves: a new alias written now
    /// answers 200 through the proxy, and the old one too.
    async fn still_serving(&self, alias: &str) -> Result<()> {
        self.admin
            .create_id("models", &self.model(alias, SEED_DEPLOYMENT))
            .await?;
        wait_standalone_synced(&self.cp).await?;
        for a in [alias, SEED_ALIAS] {
            self.proxy
                .chat(&chat_body(a, "hello"))
                .await?
                .expect(200)
                .with_context(|| format!("a call to {a} after the refused writes"))?;
        }
        Ok(())
    }
}

/// Row 4: a read-modify-write that re-points a key at another host keeps
/// `***` as the secret: the stored Azure key must not follow.
#[tokio::test]
async fn the_masked_secret_does_not_follow_a_new_destination() -> Result<()> {
    let gw = gateway().await?;
    let attacker = MockAzure::start().await;
    attacker.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let path = format!("{PROVIDER_KEYS}/{}", gw.seeded.provider_key_id);
    let read = gw.admin.get(&path).await?.expect(200)?;
    let mut pk = read["value"].clone();
    ensure!(pk["secret"] == "***", "reads mask the secret: {pk}");

    // Re-pointed with the mask: refused, naming the secret and what moved.
    let mut moved = pk.clone();
    moved["api_base"] = json!(attacker.base_url());
    gw.refused(gw.admin.put(&path, &moved).await, &["secret", "api_base"])
        .await?;
    let mut new_ca = pk.clone();
    new_ca["ca_pem"] = json!(aigw_tests::mock_entra::TestCa::new().pem());
    gw.refused(gw.admin.put(&path, &new_ca).await, &["secret", "ca_pem"])
        .await?;
    // Nor can the mask follow a switch to (or from) plain http.
    let mut insecure = pk.clone();
    insecure["allow_insecure_upstream"] = json!(false);
    insecure["api_base"] = json!("https://acme-west.openai.azure.com");
    gw.refused(gw.admin.put(&path, &insecure).await, &["secret"])
        .await?;
    // Plain http needs the explicit opt-in, whatever the secret.
    let mut http = fixtures::provider_key("plain-http", "sk-1");
    http["api_base"] = json!(attacker.base_url());
    gw.refused(
        gw.admin.post(PROVIDER_KEYS, &http).await,
        &["api_base", "allow_insecure_upstream"],
    )
    .await?;
    // A new key cannot be created with the mask as its secret.
    let fresh = fixtures::provider_key_at("fresh", "***", &attacker.base_url());
    gw.refused(gw.admin.post(PROVIDER_KEYS, &fresh).await, &["secret"])
        .await?;

    // The same destination keeps the stored secret (read-modify-write works).
    pk["display_name"] = json!("azure-prod-renamed");
    gw.admin.put(&path, &pk).await?.expect(200)?;
    wait_standalone_synced(&gw.cp).await?;
    ProxyClient::new(&gw.cp.proxy_url(), Some(SEED_CALLER_KEY))
        .chat(&chat_body(SEED_ALIAS, "hello"))
        .await?
        .expect(200)?;
    let upstream = gw
        .mock
        .last_request(SEED_DEPLOYMENT)
        .context("the call reached the real upstream")?;
    assert_eq!(upstream.header("api-key"), Some(DEFAULT_API_KEY));
    assert_eq!(attacker.total_requests(), 0, "nothing went to the new host");

    // With the secret in the same request, re-pointing is allowed.
    let mut repointed = pk.clone();
    repointed["api_base"] = json!(attacker.base_url());
    repointed["secret"] = json!(DEFAULT_API_KEY);
    gw.admin.put(&path, &repointed).await?.expect(200)?;
    Ok(())
}

/// Row 6: durations and TTLs that overflow a deadline or the cache's TTL are
/// refused at the write; before, they were accepted and every call panicked.
#[tokio::test]
async fn overflowing_durations_and_ttls_are_refused_at_the_write() -> Result<()> {
    let gw = gateway().await?;
    let huge = "300000000000years";
    let cases = [
        ("routing", json!({"timeout": huge}), "routing.timeout"),
        (
            "routing",
            json!({"stream_idle_timeout": huge}),
            "routing.stream_idle_timeout",
        ),
        ("routing", json!({"cooldown": huge}), "routing.cooldown"),
        (
            "routing",
            json!({"retry_backoff": huge}),
            "routing.retry_backoff",
        ),
        ("routing", json!({"retries": u32::MAX}), "routing.retries"),
        (
            "cache",
            json!({"enabled": true, "ttl_seconds": u64::MAX}),
            "cache.ttl_seconds",
        ),
        (
            "cache",
            json!({"enabled": true, "max_entries": u64::MAX}),
            "cache.max_entries",
        ),
    ];
    for (section, value, field) in cases {
        let mut m = gw.model("overflow", SEED_DEPLOYMENT);
        m[section] = value.clone();
        gw.refused(gw.admin.post(MODELS, &m).await, &[field])
            .await
            .with_context(|| format!("{section}: {value}"))?;
    }
    // The largest documented values are accepted.
    let mut max = gw.model("at-the-bounds", SEED_DEPLOYMENT);
    max["routing"] = json!({"timeout": "1h", "stream_idle_timeout": "1h", "cooldown": "1h",
        "retry_backoff": "1m", "retries": 10});
    max["cache"] = json!({"enabled": true, "ttl_seconds": 30 * 24 * 3600});
    gw.admin.post(MODELS, &max).await?.expect(201)?;
    wait_standalone_synced(&gw.cp).await?;
    gw.proxy
        .chat(&chat_body("at-the-bounds", "hello"))
        .await?
        .expect(200)?;
    gw.still_serving("after-durations").await
}

/// Row 7: a deployment name Azure would not allow, a secret that cannot go
/// into a header, and a limit no counter can hold are refused; later changes
/// still reach the data plane.
#[tokio::test]
async fn values_a_data_plane_cannot_compile_are_refused_and_later_changes_apply() -> Result<()> {
    let gw = gateway().await?;
    gw.refused(
        gw.admin.post(MODELS, &gw.model("spaced", "gpt 4o")).await,
        &["model_name"],
    )
    .await?;
    let mut targets = gw.model("targets", SEED_DEPLOYMENT);
    targets["model_name"] = Value::Null;
    targets["provider_key_id"] = Value::Null;
    targets["targets"] =
        json!([{"provider_key_id": gw.seeded.provider_key_id, "model_name": "gpt\t4o"}]);
    gw.refused(
        gw.admin.post(MODELS, &targets).await,
        &["targets[0].model_name"],
    )
    .await?;
    for secret in ["sk-\u{1}x", "sk with space", "sk-\u{e9}"] {
        let pk = fixtures::provider_key_at("ctl", secret, &gw.mock.base_url());
        gw.refused(gw.admin.post(PROVIDER_KEYS, &pk).await, &["secret"])
            .await
            .with_context(|| format!("secret {secret:?}"))?;
    }
    let entra = json!({"tenant_id": "t/../x", "client_id": "c", "client_secret": "s"});
    let pk = fixtures::provider_key_at("entra", &entra.to_string(), &gw.mock.base_url());
    gw.refused(
        gw.admin.post(PROVIDER_KEYS, &pk).await,
        &["secret.tenant_id"],
    )
    .await?;
    for field in ["rpm", "tpm", "rpd", "tpd", "concurrency"] {
        let mut m = gw.model("limited", SEED_DEPLOYMENT);
        m["rate_limit"] = json!({ field: u64::MAX });
        gw.refused(
            gw.admin.post(MODELS, &m).await,
            &[&format!("rate_limit.{field}")],
        )
        .await?;
        let mut k = fixtures::api_key("sk-limited", &["*"]);
        k["rate_limit"] = json!({ field: u64::MAX });
        gw.refused(
            gw.admin.post("/admin/v1/apikeys", &k).await,
            &[&format!("rate_limit.{field}")],
        )
        .await?;
    }
    // A large limit within the bound is a limit, not a refusal of every call.
    let mut big = gw.model("big-limit", SEED_DEPLOYMENT);
    big["rate_limit"] = json!({"rpm": 1_000_000_000_000u64});
    gw.admin.post(MODELS, &big).await?.expect(201)?;
    wait_standalone_synced(&gw.cp).await?;
    gw.proxy
        .chat(&chat_body("big-limit", "hello"))
        .await?
        .expect(200)?;
    gw.still_serving("after-bad-values").await
}

/// Row 8: a deployment name shaped like a path and a query never reaches the
/// upstream URL.
#[tokio::test]
async fn path_like_deployment_names_are_refused() -> Result<()> {
    let gw = gateway().await?;
    for name in [
        "../../../../x?api-version=1#",
        "..",
        "a/b",
        "x%2F..",
        "d?x=1",
    ] {
        gw.refused(
            gw.admin.post(MODELS, &gw.model("escape", name)).await,
            &["model_name"],
        )
        .await
        .with_context(|| format!("model_name {name:?}"))?;
    }
    let before = gw.mock.total_requests();
    gw.still_serving("after-paths").await?;
    // Only the two good calls reached the upstream, both on the seed's path.
    assert_eq!(gw.mock.total_requests(), before + 2);
    let last = gw
        .mock
        .last_request(SEED_DEPLOYMENT)
        .context("no upstream request")?;
    assert_eq!(
        last.path,
        format!("/openai/deployments/{SEED_DEPLOYMENT}/chat/completions")
    );
    Ok(())
}

//! Caller authentication with JWTs (Entra ID / OIDC), besides API keys,
//! end to end: a standalone control plane with the seed's provider key and
//! model on a mock Azure OpenAI, a local OpenID issuer (discovery document and
//! JWKS over http on loopback, test RSA and EC keys), a `jwt_providers`
//! resource trusting it, and api keys bound to JWT identities.

use aigw_shared::proto::admin::v1 as pb;
use aigw_tests::data_plane::{chat_body, expect_openai_error, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{api_key, seed_azure, SEED_ALIAS, SEED_DEPLOYMENT};
use aigw_tests::mock_azure::MockAzure;
use aigw_tests::mock_oidc::{now, tampered, unsigned, MockOidc, TestKey};
use aigw_tests::process::poll_until;
use aigw_tests::{AdminClient, ControlPlane, Options, Resp};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::time::Duration;
use tonic::Code;

const AZURE_SECRET: &str = "YOUR_AZURE_API_KEY";
const AUDIENCE: &str = "api://aigw-gateway";
/// Entra object ids of the workloads in these tests.
const PAYMENTS_OID: &str = "6b1f0b6e-3d1c-4c1e-9d4a-0a1b2c3d4e5f";
const REPORTING_OID: &str = "0c9a8b7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d";
const STRANGER_OID: &str = "ffffffff-0000-4000-8000-000000000000";
/// A plain caller key next to the JWT callers.
const PLAIN_KEY: &str = "sk-plain-caller";

struct Gateway {
    mock: MockAzure,
    oidc: MockOidc,
    cp: ControlPlane,
    admin: AdminClient,
    /// Bound to `PAYMENTS_OID` exactly.
    payments_key_id: String,
    /// Bound to any identity with role `Aigw.Caller`.
    role_key_id: String,
    proxy: ProxyClient,
}

/// Mock Azure, a local issuer serving `keys`, a standalone control plane, the
/// seed, a jwt provider for the issuer (keys found through discovery unless
/// `jwks_uri` is given) and two api keys bound to JWT identities.
async fn gateway(keys: &[&TestKey], jwks_uri: bool) -> Result<Gateway> {
    let mock = MockAzure::start().await;
    mock.set_api_key(AZURE_SECRET);
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let oidc = MockOidc::start(keys).await;
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    seed_azure(&admin, &mock.base_url(), AZURE_SECRET).await?;
    let mut provider = json!({
        "display_name": "entra-local",
        "issuer": oidc.issuer(),
        "audiences": [AUDIENCE],
        "claim_mappings": {"caller_id": ["oid", "sub"]},
        "clock_skew": "30s",
    });
    if jwks_uri {
        provider["jwks_uri"] = json!(oidc.jwks_uri());
    }
    let provider_id = admin.create_id("jwt_providers", &provider).await?;
    let payments_key_id = admin
        .create_id(
            "apikeys",
            &json!({
                "display_name": "payments-app",
                "jwt_provider_id": provider_id,
                "jwt_subject": PAYMENTS_OID,
                "allowed_models": [SEED_ALIAS],
            }),
        )
        .await?;
    let role_key_id = admin
        .create_id(
            "apikeys",
            &json!({
                "display_name": "aigw-callers",
                "jwt_provider_id": provider_id,
                "jwt_claims": {"roles": "Aigw.Caller"},
                "allowed_models": ["*"],
            }),
        )
        .await?;
    admin
        .create("apikeys", &api_key(PLAIN_KEY, &[SEED_ALIAS]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let proxy = ProxyClient::new(&cp.proxy_url(), None);
    Ok(Gateway {
        mock,
        oidc,
        cp,
        admin,
        payments_key_id,
        role_key_id,
        proxy,
    })
}

impl Gateway {
    async fn chat_as(&self, bearer: &str) -> Result<Resp> {
        self.proxy
            .with_key(Some(bearer))
            .chat(&chat_body(SEED_ALIAS, "Say hello from Azure OpenAI."))
            .await
    }

    fn claims(&self, oid: &str) -> Value {
        self.oidc.claims(AUDIENCE, oid)
    }

    /// `caller-objectid` of the last request the mock Azure received.
    fn forwarded_caller(&self) -> Option<String> {
        self.mock
            .last_request(SEED_DEPLOYMENT)
            .and_then(|r| r.header("caller-objectid").map(str::to_string))
    }
}

fn ok(resp: &Resp) -> Result<Value> {
    ensure!(
        resp.status.as_u16() == 200,
        "expected 200, got {}: {}",
        resp.status,
        resp.text
    );
    let body = resp.json()?;
    ensure!(body["model"] == SEED_ALIAS, "{body}");
    Ok(body)
}

/// A 401 with `code`; its message names no api key.
fn rejected(resp: &Resp, code: &str, g: &Gateway) -> Result<()> {
    let err = expect_openai_error(resp, 401, code)?;
    let message = err["message"].as_str().unwrap_or_default();
    for secret in [
        g.payments_key_id.as_str(),
        g.role_key_id.as_str(),
        "payments-app",
        "aigw-callers",
        PAYMENTS_OID,
        AUDIENCE,
    ] {
        ensure!(
            !message.contains(secret),
            "the error gives away `{secret}`: {message}"
        );
    }
    Ok(())
}

/// The usage row of `api_key_id` once it counts `requests` calls.
async fn usage_of(admin: &AdminClient, api_key_id: &str, requests: u64) -> Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let found = poll_until(
        "the usage aggregates to count the JWT calls",
        300,
        Duration::from_millis(100),
        || async {
            let v = admin
                .get("/admin/v1/usage?group_by=api_key")
                .await?
                .expect(200)?;
            *last.lock().unwrap_or_else(|e| e.into_inner()) = v.clone();
            let row = v["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["group"]["api_key"] == api_key_id)
                .cloned();
            if let Some(r) = &row {
                ensure!(
                    r["requests"].as_u64().unwrap_or(0) <= requests,
                    "counted more than made: {r}"
                );
            }
            Ok(row.filter(|r| r["requests"] == json!(requests)))
        },
    )
    .await;
    let keys = admin.list("apikeys").await.unwrap_or_default();
    found.with_context(|| {
        format!(
            "api key {api_key_id}, {requests} requests; last usage answer: {}; api keys: {keys:?}",
            last.lock().unwrap_or_else(|e| e.into_inner())
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_are_accepted_and_bad_ones_refused_with_their_code() -> Result<()> {
    let (rsa, ec) = (TestKey::rsa("rsa-1"), TestKey::ec("ec-1"));
    let g = gateway(&[&rsa, &ec], false).await?;

    // RS256, bound by subject: answered, and the caller's object id reaches Azure.
    let token = rsa.sign(&g.claims(PAYMENTS_OID));
    ok(&g.chat_as(&token).await?)?;
    assert_eq!(g.forwarded_caller().as_deref(), Some(PAYMENTS_OID));
    let sent = g.mock.last_request(SEED_DEPLOYMENT).context("a request")?;
    ensure!(
        sent.header("authorization").is_none(),
        "the caller's token went upstream"
    );
    // ES256, bound by a role claim.
    let mut claims = g.claims(REPORTING_OID);
    claims["roles"] = json!(["Reader", "Aigw.Caller"]);
    ok(&g.chat_as(&ec.sign(&claims)).await?)?;
    assert_eq!(g.forwarded_caller().as_deref(), Some(REPORTING_OID));
    // The allowlist of the bound key applies: the model list is filtered.
    let models = g.proxy.with_key(Some(&token)).models().await?.expect(200)?;
    assert_eq!(models["data"][0]["id"], SEED_ALIAS, "{models}");

    // An API key still works, and cannot smuggle a caller id upstream.
    let spoofed = ProxyClient::send(
        g.proxy
            .with_key(Some(PLAIN_KEY))
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .header("caller-objectid", PAYMENTS_OID)
            .json(&chat_body(SEED_ALIAS, "hi")),
    )
    .await?;
    ok(&spoofed)?;
    assert_eq!(g.forwarded_caller(), None);

    // Refusals, each with its code.
    let mut expired = g.claims(PAYMENTS_OID);
    expired["exp"] = json!(now() - 120);
    rejected(&g.chat_as(&rsa.sign(&expired)).await?, "jwt_expired", &g)?;
    let mut wrong_aud = g.claims(PAYMENTS_OID);
    wrong_aud["aud"] = json!("api://someone-else");
    rejected(
        &g.chat_as(&rsa.sign(&wrong_aud)).await?,
        "jwt_wrong_audience",
        &g,
    )?;
    let mut wrong_iss = g.claims(PAYMENTS_OID);
    wrong_iss["iss"] = json!("https://login.microsoftonline.com/other-tenant/v2.0");
    rejected(
        &g.chat_as(&rsa.sign(&wrong_iss)).await?,
        "jwt_unknown_issuer",
        &g,
    )?;
    let mut forged = g.claims(STRANGER_OID);
    forged["roles"] = json!(["Aigw.Caller"]);
    rejected(
        &g.chat_as(&tampered(&token, &forged)).await?,
        "jwt_invalid_signature",
        &g,
    )?;
    rejected(
        &g.chat_as(&unsigned(&g.claims(PAYMENTS_OID))).await?,
        "jwt_invalid_signature",
        &g,
    )?;
    rejected(
        &g.chat_as(&rsa.hs256_with_public_key(&g.claims(PAYMENTS_OID)))
            .await?,
        "jwt_invalid_signature",
        &g,
    )?;
    // A key the issuer never published, under a published kid.
    let impostor = TestKey::rsa("rsa-1");
    rejected(
        &g.chat_as(&impostor.sign(&g.claims(PAYMENTS_OID))).await?,
        "jwt_invalid_signature",
        &g,
    )?;
    // A valid token of an identity no api key binds: the same answer as an
    // unknown API key.
    let unbound = g.chat_as(&rsa.sign(&g.claims(STRANGER_OID))).await?;
    rejected(&unbound, "invalid_api_key", &g)?;
    let unknown_key = g.chat_as("sk-nobody").await?;
    rejected(&unknown_key, "invalid_api_key", &g)?;
    ensure!(
        unbound.json()?["error"]["type"] == unknown_key.json()?["error"]["type"],
        "an unbound identity must look like an unknown key"
    );
    assert_eq!(
        g.mock.requests(SEED_DEPLOYMENT),
        3,
        "refused calls never went upstream"
    );

    // Usage aggregates show the JWT callers like any api key.
    let row = usage_of(&g.admin, &g.payments_key_id, 1).await?;
    assert_eq!(row["errors"], json!(0), "{row}");
    assert!(row["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{row}");
    usage_of(&g.admin, &g.role_key_id, 1).await?;
    let plain = g
        .admin
        .list("apikeys")
        .await?
        .into_iter()
        .find(|k| k["value"]["key_hash"] == aigw_tests::sha256_hex(PLAIN_KEY).as_str())
        .context("the plain key")?;
    usage_of(&g.admin, plain["id"].as_str().unwrap_or_default(), 1).await?;

    // Disabling the bound key refuses its identity on the next snapshot.
    let mut key = g
        .admin
        .get(&format!("/admin/v1/apikeys/{}", g.payments_key_id))
        .await?
        .expect(200)?["value"]
        .clone();
    key["disabled"] = json!(true);
    g.admin
        .put(&format!("/admin/v1/apikeys/{}", g.payments_key_id), &key)
        .await?
        .expect(200)?;
    wait_standalone_synced(&g.cp).await?;
    rejected(&g.chat_as(&token).await?, "invalid_api_key", &g)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_picked_up_without_restart() -> Result<()> {
    let (old, new) = (TestKey::rsa("2026-01"), TestKey::ec("2026-02"));
    let g = gateway(&[&old], true).await?;
    ok(&g.chat_as(&old.sign(&g.claims(PAYMENTS_OID))).await?)?;
    let fetched = g.oidc.jwks_requests();
    assert_eq!(
        g.oidc.discovery_requests(),
        0,
        "jwks_uri is configured: no discovery"
    );

    // The issuer rotates: tokens signed with the new kid work at once.
    g.oidc.publish(&[&old, &new]);
    ok(&g.chat_as(&new.sign(&g.claims(PAYMENTS_OID))).await?)?;
    assert_eq!(
        g.oidc.jwks_requests(),
        fetched + 1,
        "one fetch for the new kid"
    );
    assert_eq!(g.forwarded_caller().as_deref(), Some(PAYMENTS_OID));
    // The old key is retired at the issuer; the new one keeps working
    // without another fetch.
    g.oidc.publish(&[&new]);
    ok(&g.chat_as(&new.sign(&g.claims(PAYMENTS_OID))).await?)?;
    assert_eq!(g.oidc.jwks_requests(), fetched + 1);
    // Unknown kids right after a fetch do not make the gateway fetch again.
    let stranger = TestKey::rsa("stranger");
    for _ in 0..3 {
        rejected(
            &g.chat_as(&stranger.sign(&g.claims(PAYMENTS_OID))).await?,
            "jwt_invalid_signature",
            &g,
        )?;
    }
    assert_eq!(
        g.oidc.jwks_requests(),
        fetched + 1,
        "unknown-kid fetches are rate-limited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_outage_keeps_the_cached_keys() -> Result<()> {
    let key = TestKey::ec("only");
    let g = gateway(&[&key], false).await?;
    let token = key.sign(&g.claims(PAYMENTS_OID));
    ok(&g.chat_as(&token).await?)?;
    assert!(
        g.oidc.discovery_requests() >= 1,
        "keys found through discovery"
    );

    g.oidc.set_down(true);
    // A token with an unknown kid makes the gateway try the issuer, which fails...
    let before = g.oidc.discovery_requests() + g.oidc.jwks_requests();
    let rotated = TestKey::ec("rotated");
    rejected(
        &g.chat_as(&rotated.sign(&g.claims(PAYMENTS_OID))).await?,
        "jwt_invalid_signature",
        &g,
    )?;
    ensure!(
        g.oidc.discovery_requests() + g.oidc.jwks_requests() > before,
        "the unknown kid should have made the gateway try the issuer"
    );
    // ...and the keys it had still verify tokens.
    ok(&g.chat_as(&token).await?)?;
    ok(&g.chat_as(&key.sign(&g.claims(PAYMENTS_OID))).await?)?;
    Ok(())
}

#[tokio::test]
async fn jwt_providers_are_an_admin_resource() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let issuer = "https://login.microsoftonline.com/00000000-0000-0000-0000-0000000000aa/v2.0";
    let body = json!({"display_name": "entra", "issuer": issuer, "audiences": ["api://aigw"]});
    let rec = admin.create("jwt_providers", &body).await?;
    let id = rec["id"].as_str().context("id")?.to_string();
    assert_eq!(rec["revision"], 1);
    // Defaults are filled in and shown.
    assert_eq!(
        rec["value"]["claim_mappings"]["caller_id"],
        json!(["oid", "sub"])
    );
    assert_eq!(rec["value"]["clock_skew"], "1m");
    assert_eq!(admin.list("jwt_providers").await?.len(), 1);

    // Bad values name the field.
    for (bad, field) in [
        (
            json!({"issuer": "http://login.example", "audiences": ["a"]}),
            "issuer",
        ),
        (json!({"audiences": []}), "audiences"),
        (json!({"jwks_uri": "ftp://keys.example"}), "jwks_uri"),
        (json!({"clock_skew": "2h"}), "clock_skew"),
        (
            json!({"claim_mappings": {"caller_id": []}}),
            "claim_mappings",
        ),
        (json!({"unknown": 1}), "unknown"),
    ] {
        let mut v = body.clone();
        for (k, val) in bad.as_object().context("object")? {
            v[k] = val.clone();
        }
        v["display_name"] = json!("other");
        let msg = admin
            .post("/admin/v1/jwt_providers", &v)
            .await?
            .expect_error(400)?;
        ensure!(msg.contains(field), "{field}: {msg}");
    }
    // The issuer and the name are unique.
    let mut dup = body.clone();
    dup["display_name"] = json!("entra-2");
    let msg = admin
        .post("/admin/v1/jwt_providers", &dup)
        .await?
        .expect_error(409)?;
    ensure!(msg.contains("issuer"), "{msg}");

    // Api keys bind identities of an existing provider only.
    let bound =
        json!({"jwt_provider_id": id, "jwt_subject": PAYMENTS_OID, "allowed_models": ["*"]});
    let key_id = admin.create_id("apikeys", &bound).await?;
    let msg = admin
        .post("/admin/v1/apikeys", &bound)
        .await?
        .expect_error(409)?;
    ensure!(msg.contains("jwt_subject"), "{msg}");
    let mut dangling = bound.clone();
    dangling["jwt_provider_id"] = json!("nope");
    dangling["jwt_subject"] = json!("x");
    let msg = admin
        .post("/admin/v1/apikeys", &dangling)
        .await?
        .expect_error(409)?;
    ensure!(msg.contains("jwt_provider_id"), "{msg}");
    let mut both = bound.clone();
    both["key_hash"] = json!(aigw_tests::sha256_hex("sk-x"));
    let msg = admin
        .post("/admin/v1/apikeys", &both)
        .await?
        .expect_error(400)?;
    ensure!(msg.contains("not both"), "{msg}");
    let key = admin
        .get(&format!("/admin/v1/apikeys/{key_id}"))
        .await?
        .expect(200)?;
    ensure!(key["value"].get("key_hash").is_none(), "{key}");

    // A provider still bound by a key cannot go.
    let msg = admin
        .delete(&format!("/admin/v1/jwt_providers/{id}"))
        .await?
        .expect_error(409)?;
    ensure!(msg.contains(&key_id), "{msg}");

    // The same resource over gRPC.
    let mut c = cp.grpc_admin().await?;
    let list = c
        .list_jwt_providers(pb::ListJwtProvidersRequest {})
        .await?
        .into_inner();
    assert_eq!(list.total, 1);
    let got = c
        .get_jwt_provider(pb::GetJwtProviderRequest { id: id.clone() })
        .await?
        .into_inner();
    let value = got.value.context("value")?;
    assert_eq!(value.issuer, issuer);
    assert_eq!(value.clock_skew, "1m");
    let updated = c
        .update_jwt_provider(pb::UpdateJwtProviderRequest {
            id: id.clone(),
            value: Some(pb::JwtProvider {
                audiences: vec!["api://aigw".into(), "api://aigw-2".into()],
                clock_skew: "90s".into(),
                ..value.clone()
            }),
            expected_revision: Some(1),
        })
        .await?
        .into_inner();
    assert_eq!(updated.revision, 2);
    let err = c
        .create_jwt_provider(pb::CreateJwtProviderRequest {
            value: Some(pb::JwtProvider {
                display_name: "grpc".into(),
                issuer: "https://other.example/".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("no audiences");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("audiences"), "{}", err.message());
    let created = c
        .create_jwt_provider(pb::CreateJwtProviderRequest {
            value: Some(pb::JwtProvider {
                display_name: "grpc".into(),
                issuer: "https://other.example/".into(),
                audiences: vec!["x".into()],
                claim_mappings: Some(pb::ClaimMappings {
                    caller_id: vec!["appid".into()],
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let v = created.value.context("value")?;
    assert_eq!(v.claim_mappings.context("mappings")?.caller_id, ["appid"]);
    let err = c
        .delete_jwt_provider(pb::DeleteJwtProviderRequest {
            id: id.clone(),
            expected_revision: None,
        })
        .await
        .expect_err("still bound");
    assert_eq!(err.code(), Code::FailedPrecondition);
    c.delete_jwt_provider(pb::DeleteJwtProviderRequest {
        id: created.id.clone(),
        expected_revision: Some(1),
    })
    .await?;

    // Unbind, then delete; the audit trail has every step.
    admin
        .delete(&format!("/admin/v1/apikeys/{key_id}"))
        .await?
        .expect(200)?;
    admin
        .delete(&format!("/admin/v1/jwt_providers/{id}"))
        .await?
        .expect(200)?;
    let events = admin.events("resource=jwt_providers").await?;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "JwtProviderCreated",
            "JwtProviderUpdated",
            "JwtProviderCreated",
            "JwtProviderDeleted",
            "JwtProviderDeleted"
        ]
    );
    Ok(())
}

//! REST admin API against the real control-plane binary: the seed's calls,
//! CRUD semantics, revisions, the event log, health and the OpenAPI document.

use aigw_tests::fixtures::{self, APIKEYS, MODELS, PROVIDER_KEYS};
use aigw_tests::rest::{assert_gapless, Resp};
use aigw_tests::{sha256_hex, AdminClient, ControlPlane};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// Asserts the `{"id","value","revision"}` record shape; returns the id.
fn record(body: &Value, revision: u64) -> Result<String> {
    let obj = body.as_object().context("record is not an object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    ensure!(
        keys == ["id", "revision", "value"],
        "record keys are {keys:?}: {body}"
    );
    ensure!(
        body["revision"].as_u64() == Some(revision),
        "want revision {revision}: {body}"
    );
    let id = body["id"].as_str().context("id is not a string")?;
    ensure!(!id.is_empty(), "empty id");
    ensure!(body["value"].is_object(), "value is not an object: {body}");
    Ok(id.to_string())
}

fn etag(resp: &Resp) -> Option<String> {
    resp.header("etag").map(str::to_string)
}

#[tokio::test]
async fn seed_calls_create_provider_keys_model_and_caller_key() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();

    // 1. Provider key with a resource API key.
    let r = admin
        .post(
            PROVIDER_KEYS,
            &fixtures::provider_key("azure-prod", "YOUR_AZURE_API_KEY"),
        )
        .await?;
    let pk = r.expect(201)?;
    let pk_id = record(&pk, 1)?;
    assert_eq!(pk["value"]["secret"], "***", "secret must be masked: {pk}");
    assert_eq!(pk["value"]["display_name"], "azure-prod");
    assert_eq!(pk["value"]["provider"], "azure");
    assert_eq!(pk["value"]["adapter"], "azure-openai");
    assert_eq!(
        pk["value"]["api_base"],
        "https://acme-west.openai.azure.com"
    );
    assert_eq!(
        pk["value"]["api_version"], "2024-10-21",
        "default api_version"
    );
    assert!(!r.text.contains("YOUR_AZURE_API_KEY"));

    // 2. Provider key with Entra ID client credentials (JSON text secret).
    let r = admin
        .post(
            PROVIDER_KEYS,
            &fixtures::entra_provider_key("azure-aad-prod", "YOUR_CLIENT_SECRET"),
        )
        .await?;
    let aad = r.expect(201)?;
    let aad_id = record(&aad, 1)?;
    assert_eq!(
        aad["value"]["secret"], "***",
        "secret must be masked: {aad}"
    );
    assert!(!r.text.contains("YOUR_CLIENT_SECRET"));
    assert_ne!(pk_id, aad_id);

    // 3. Model alias bound to the provider key.
    let model = admin
        .post(MODELS, &fixtures::model("gpt-4o-azure", &pk_id))
        .await?
        .expect(201)?;
    let model_id = record(&model, 1)?;
    assert_eq!(model["value"]["display_name"], "gpt-4o-azure");
    assert_eq!(model["value"]["model_name"], "gpt4o-prod");
    assert_eq!(model["value"]["provider_key_id"], pk_id.as_str());

    // 4. Caller API key by hash (printf '%s' sk-azure-caller | shasum -a 256).
    let hash = sha256_hex("sk-azure-caller");
    assert_eq!(hash.len(), 64);
    let key = admin
        .post(
            APIKEYS,
            &json!({"key_hash": hash, "allowed_models": ["gpt-4o-azure"]}),
        )
        .await?
        .expect(201)?;
    let key_id = record(&key, 1)?;
    assert_eq!(key["value"]["key_hash"], hash.as_str());
    assert_eq!(key["value"]["allowed_models"], json!(["gpt-4o-azure"]));

    // Reads return what was written, masked.
    let got = admin
        .get(&format!("{PROVIDER_KEYS}/{aad_id}"))
        .await?
        .expect(200)?;
    assert_eq!(got["value"]["secret"], "***");
    assert_eq!(got["value"]["display_name"], "azure-aad-prod");
    let got = admin
        .get(&format!("{MODELS}/{model_id}"))
        .await?
        .expect(200)?;
    assert_eq!(got, model);
    let got = admin
        .get(&format!("{APIKEYS}/{key_id}"))
        .await?
        .expect(200)?;
    assert_eq!(got, key);
    Ok(())
}

#[tokio::test]
async fn api_keys_alias_serves_list_get_and_writes() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let id = admin
        .create("apikeys", &fixtures::api_key("sk-alias-1", &["*"]))
        .await
        .and_then(|r| record(&r, 1))?;

    let via_alias = admin.list("api_keys").await?;
    assert_eq!(via_alias, admin.list("apikeys").await?);
    assert_eq!(via_alias.len(), 1);
    assert_eq!(via_alias[0]["id"], id.as_str());

    let one = admin
        .get(&format!("/admin/v1/api_keys/{id}"))
        .await?
        .expect(200)?;
    assert_eq!(
        one,
        admin.get(&format!("{APIKEYS}/{id}")).await?.expect(200)?
    );

    // Writes through the alias land in the same collection.
    let id2 = admin
        .create("api_keys", &fixtures::api_key("sk-alias-2", &[]))
        .await
        .and_then(|r| record(&r, 1))?;
    assert_eq!(admin.list("apikeys").await?.len(), 2);
    admin
        .delete(&format!("/admin/v1/api_keys/{id2}"))
        .await?
        .expect(200)?;
    admin
        .get(&format!("{APIKEYS}/{id2}"))
        .await?
        .expect_error(404)?;
    Ok(())
}

#[tokio::test]
async fn list_has_total_and_records() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    for c in ["provider_keys", "models", "apikeys"] {
        let body = admin.get(&format!("/admin/v1/{c}")).await?.expect(200)?;
        assert_eq!(body, json!({"total": 0, "list": []}), "{c} starts empty");
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = fixtures::provider_key(&format!("pk-{i}"), &format!("secret-{i}"));
        ids.push(record(&admin.create("provider_keys", &body).await?, 1)?);
    }
    let body = admin.get(PROVIDER_KEYS).await?.expect(200)?;
    assert_eq!(body["total"], 3, "{body}");
    let list = body["list"].as_array().context("list")?;
    assert_eq!(list.len(), 3);
    let mut listed = Vec::new();
    for r in list {
        listed.push(record(r, 1)?);
        assert_eq!(r["value"]["secret"], "***", "list must mask secrets: {r}");
    }
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    Ok(())
}

#[tokio::test]
async fn put_is_a_full_replace_that_bumps_the_revision() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let mut body = fixtures::provider_key("pk-put", "sk-one");
    body["api_version"] = json!("2024-02-01");
    body["provider"] = json!("azure-special");
    let id = record(&admin.create("provider_keys", &body).await?, 1)?;
    let path = format!("{PROVIDER_KEYS}/{id}");

    // Replace without api_version/provider: they fall back to their defaults
    // instead of keeping the old values (replace, not merge).
    let replacement = json!({
        "display_name": "pk-put-renamed",
        "secret": "sk-two",
        "api_base": "acme-east",
    });
    let r = admin.put(&path, &replacement).await?;
    let rec = r.expect(200)?;
    assert_eq!(record(&rec, 2)?, id);
    assert_eq!(
        etag(&r).as_deref(),
        Some("\"2\""),
        "ETag of the new revision"
    );
    assert_eq!(rec["value"]["display_name"], "pk-put-renamed");
    assert_eq!(rec["value"]["api_base"], "acme-east");
    assert_eq!(rec["value"]["api_version"], "2024-10-21");
    assert_eq!(rec["value"]["provider"], "");
    assert_eq!(rec["value"]["secret"], "***");
    assert_eq!(admin.get(&path).await?.expect(200)?, rec);

    // Third write: revision 3.
    let r = admin.put(&path, &replacement).await?.expect(200)?;
    record(&r, 3)?;

    // PUT to an id that does not exist creates it under that id.
    let r = admin
        .put(
            &format!("{APIKEYS}/caller-chosen-id"),
            &fixtures::api_key("sk-put-new", &["*"]),
        )
        .await?;
    let created = r.expect(201)?;
    assert_eq!(record(&created, 1)?, "caller-chosen-id");
    assert_eq!(etag(&r).as_deref(), Some("\"1\""));
    assert_eq!(
        admin
            .get(&format!("{APIKEYS}/caller-chosen-id"))
            .await?
            .expect(200)?,
        created
    );
    Ok(())
}

#[tokio::test]
async fn delete_answers_deleted_then_get_is_404() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    for (collection, body) in [
        ("provider_keys", fixtures::provider_key("pk-del", "sk-del")),
        ("apikeys", fixtures::api_key("sk-caller-del", &["*"])),
    ] {
        let id = admin.create_id(collection, &body).await?;
        let path = format!("/admin/v1/{collection}/{id}");
        let r = admin.delete(&path).await?.expect(200)?;
        assert_eq!(r, json!({"deleted": true, "id": id}));
        admin.get(&path).await?.expect_error(404)?;
        // A second delete has nothing to delete.
        admin.delete(&path).await?.expect_error(404)?;
        assert!(admin.list(collection).await?.is_empty());
        // The name is free again.
        admin.create(collection, &body).await?;
    }
    // Reads and deletes of unknown ids are 404 in every collection.
    for c in ["provider_keys", "models", "apikeys", "api_keys"] {
        admin
            .get(&format!("/admin/v1/{c}/no-such-id"))
            .await?
            .expect_error(404)?;
        admin
            .delete(&format!("/admin/v1/{c}/no-such-id"))
            .await?
            .expect_error(404)?;
    }
    Ok(())
}

#[tokio::test]
async fn if_match_guards_updates_and_deletes() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let body = fixtures::provider_key("pk-if-match", "sk-if-match");
    let id = admin.create_id("provider_keys", &body).await?;
    let path = format!("{PROVIDER_KEYS}/{id}");
    admin.put(&path, &body).await?.expect(200)?; // revision 2

    let msg = admin
        .put_if_match(&path, "1", &body)
        .await?
        .expect_error(409)?;
    assert!(msg.contains("revision"), "stale revision message: {msg}");
    // Still revision 2, unchanged.
    record(&admin.get(&path).await?.expect(200)?, 2)?;

    // The ETag value itself (quoted) is accepted, as is a bare number.
    let r = admin.get(&path).await?;
    let tag = etag(&r).context("GET has no ETag")?;
    assert_eq!(tag, "\"2\"");
    record(
        &admin.put_if_match(&path, &tag, &body).await?.expect(200)?,
        3,
    )?;
    record(
        &admin.put_if_match(&path, "3", &body).await?.expect(200)?,
        4,
    )?;

    // Not a revision at all.
    admin
        .put_if_match(&path, "yesterday", &body)
        .await?
        .expect_error(400)?;

    // Deletes honour it too.
    admin.delete_if_match(&path, "3").await?.expect_error(409)?;
    admin.get(&path).await?.expect(200)?;
    admin.delete_if_match(&path, "4").await?.expect(200)?;
    admin.get(&path).await?.expect_error(404)?;

    // If-Match on an id that does not exist cannot match.
    admin
        .put_if_match(
            &format!("{APIKEYS}/ghost"),
            "1",
            &fixtures::api_key("sk-ghost", &[]),
        )
        .await?
        .expect_error(409)?;
    admin
        .get(&format!("{APIKEYS}/ghost"))
        .await?
        .expect_error(404)?;
    Ok(())
}

#[tokio::test]
async fn etag_header_carries_the_revision() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let r = admin
        .post(APIKEYS, &fixtures::api_key("sk-etag", &["*"]))
        .await?;
    let id = record(&r.expect(201)?, 1)?;
    assert_eq!(
        etag(&r).as_deref(),
        Some("\"1\""),
        "POST answers with an ETag"
    );
    let path = format!("{APIKEYS}/{id}");
    let r = admin.get(&path).await?;
    r.expect(200)?;
    assert_eq!(etag(&r).as_deref(), Some("\"1\""));
    admin
        .put(&path, &fixtures::api_key("sk-etag", &[]))
        .await?
        .expect(200)?;
    let r = admin.get(&path).await?;
    assert_eq!(etag(&r).as_deref(), Some("\"2\""));
    Ok(())
}

#[tokio::test]
async fn events_list_masked_writes_and_filter() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let secret = "sk-events-plaintext-4242";
    let pk = admin
        .create_id("provider_keys", &fixtures::provider_key("pk-ev", secret))
        .await?; // 1
    let entra = admin
        .create_id(
            "provider_keys",
            &fixtures::entra_provider_key("pk-ev-aad", "entra-events-secret"),
        )
        .await?; // 2
    let model = admin
        .create_id("models", &fixtures::model("m-ev", &pk))
        .await?; // 3
    let key = admin
        .create_id("apikeys", &fixtures::api_key("sk-ev-caller", &["m-ev"]))
        .await?; // 4
    admin
        .put(
            &format!("{PROVIDER_KEYS}/{pk}"),
            &fixtures::provider_key("pk-ev", "sk-events-rotated"),
        )
        .await?
        .expect(200)?; // 5
    admin
        .delete(&format!("{MODELS}/{model}"))
        .await?
        .expect(200)?; // 6
    admin
        .put(
            &format!("{APIKEYS}/{key}"),
            &fixtures::api_key("sk-ev-caller", &[]),
        )
        .await?
        .expect(200)?; // 7

    let r = admin.get("/admin/v1/events").await?;
    let body = r.expect(200)?;
    assert!(
        !r.text.contains(secret),
        "plaintext secret in the audit log"
    );
    assert!(!r.text.contains("sk-events-rotated"));
    assert!(!r.text.contains("entra-events-secret"));
    assert_eq!(body["total"], 7);
    let all = body["list"].as_array().context("list")?.clone();
    assert_gapless(&all, 7)?;
    let types: Vec<&str> = all
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        types,
        [
            "ProviderKeyCreated",
            "ProviderKeyCreated",
            "ModelCreated",
            "ApiKeyCreated",
            "ProviderKeyUpdated",
            "ModelDeleted",
            "ApiKeyUpdated"
        ]
    );
    for e in &all {
        for field in ["at", "actor", "type", "resource", "resource_id"] {
            let v = e[field].as_str().unwrap_or_default();
            assert!(!v.is_empty(), "event field {field} missing: {e}");
        }
        assert!(e["version"].as_u64().is_some_and(|v| v >= 1), "{e}");
        assert!(e["payload"].is_object(), "{e}");
    }
    assert_eq!(all[0]["payload"]["value"]["secret"], "***");
    assert_eq!(all[1]["payload"]["value"]["secret"], "***");
    assert_eq!(all[4]["payload"]["value"]["secret"], "***");
    assert_eq!(all[0]["resource"], "provider_keys");
    assert_eq!(all[0]["resource_id"], pk.as_str());
    assert_eq!(all[3]["resource"], "apikeys");
    assert_eq!(all[5]["resource_id"], model.as_str());

    let seqs = |list: &[Value]| {
        list.iter()
            .map(|e| e["seq"].as_u64().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(&admin.events("resource=provider_keys").await?),
        [1, 2, 5]
    );
    assert_eq!(seqs(&admin.events("resource=models").await?), [3, 6]);
    assert_eq!(seqs(&admin.events("resource=apikeys").await?), [4, 7]);
    assert_eq!(seqs(&admin.events("resource=api_keys").await?), [4, 7]);
    assert_eq!(
        seqs(&admin.events(&format!("resource_id={entra}")).await?),
        [2]
    );
    assert_eq!(seqs(&admin.events("from_seq=3&to_seq=5").await?), [3, 4, 5]);
    assert_eq!(seqs(&admin.events("from_seq=6").await?), [6, 7]);
    assert_eq!(seqs(&admin.events("to_seq=2").await?), [1, 2]);
    assert_eq!(seqs(&admin.events("from_seq=2&limit=2").await?), [2, 3]);
    assert_eq!(
        seqs(
            &admin
                .events("resource=provider_keys&from_seq=2&to_seq=4")
                .await?
        ),
        [2]
    );
    assert!(admin.events("from_seq=8").await?.is_empty());

    admin
        .get("/admin/v1/events?resource=widgets")
        .await?
        .expect_error(400)?;
    admin
        .get("/admin/v1/events?from_seq=abc")
        .await?
        .expect_error(400)?;
    admin
        .with_key(None)
        .get("/admin/v1/events")
        .await?
        .expect_error(401)?;
    Ok(())
}

#[tokio::test]
async fn health_endpoints_need_no_admin_key() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let anon = AdminClient::new(&cp.admin_url(), None);
    for path in ["/livez", "/readyz"] {
        let r = anon.get(path).await?;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    // …while the admin API does.
    anon.get(PROVIDER_KEYS).await?.expect_error(401)?;
    Ok(())
}

#[tokio::test]
async fn x_api_key_header_authenticates_too() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let anon = AdminClient::new(&cp.admin_url(), None);
    let r = AdminClient::send(
        anon.request(reqwest::Method::GET, PROVIDER_KEYS)
            .header("x-api-key", cp.admin_key()),
    )
    .await?;
    r.expect(200)?;
    Ok(())
}

#[tokio::test]
async fn openapi_document_is_served_without_auth() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let anon = AdminClient::new(&cp.admin_url(), None);
    let r = anon.get("/admin/openapi.json").await?;
    let doc = r.expect(200)?;
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content-type: {:?}",
        r.header("content-type")
    );
    let version = doc["openapi"]
        .as_str()
        .context("no openapi version field")?;
    assert!(version.starts_with('3'), "openapi {version}");
    assert!(doc["info"]["title"].is_string(), "no info.title");
    assert!(doc["paths"].is_object(), "no paths object");
    Ok(())
}

#[tokio::test]
async fn openapi_document_describes_the_admin_resources() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let doc = cp.rest().get("/admin/openapi.json").await?.expect(200)?;
    let paths = doc["paths"].as_object().context("no paths object")?;
    for c in ["provider_keys", "models", "apikeys"] {
        let listed = paths
            .keys()
            .any(|p| p.starts_with(&format!("/admin/v1/{c}")));
        assert!(
            listed,
            "OpenAPI paths do not document /admin/v1/{c}: {:?}",
            paths.keys()
        );
    }
    assert!(
        paths.keys().any(|p| p.starts_with("/admin/v1/events")),
        "OpenAPI paths do not document /admin/v1/events"
    );
    Ok(())
}

#[tokio::test]
async fn renames_and_deletes_free_unique_names() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let id = admin
        .create_id("provider_keys", &fixtures::provider_key("name-a", "sk-1"))
        .await?;
    admin
        .put(
            &format!("{PROVIDER_KEYS}/{id}"),
            &fixtures::provider_key("name-b", "sk-1"),
        )
        .await?
        .expect(200)?;
    // The old name is free, the new one taken.
    admin
        .create("provider_keys", &fixtures::provider_key("name-a", "sk-2"))
        .await?;
    admin
        .post(PROVIDER_KEYS, &fixtures::provider_key("name-b", "sk-3"))
        .await?
        .expect_error(409)?;
    // Same for key hashes when an api key changes its hash.
    let k = admin
        .create_id("apikeys", &fixtures::api_key("sk-hash-1", &[]))
        .await?;
    admin
        .put(
            &format!("{APIKEYS}/{k}"),
            &fixtures::api_key("sk-hash-2", &[]),
        )
        .await?
        .expect(200)?;
    admin
        .create("apikeys", &fixtures::api_key("sk-hash-1", &[]))
        .await?;
    admin
        .post(APIKEYS, &fixtures::api_key("sk-hash-2", &[]))
        .await?
        .expect_error(409)?;
    // Names are unique per collection, not across collections.
    admin
        .create("models", &fixtures::model("name-b", &id))
        .await?;
    Ok(())
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_error_bodies() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    admin.get("/admin/v1/widgets").await?.expect_error(404)?;
    admin.get("/nope").await?.expect_error(404)?;
    let r = AdminClient::send(admin.request(reqwest::Method::PATCH, PROVIDER_KEYS)).await?;
    r.expect_error(405)?;
    let r = admin
        .post(&format!("{PROVIDER_KEYS}/some-id"), &json!({}))
        .await?;
    r.expect_error(405)?;
    Ok(())
}

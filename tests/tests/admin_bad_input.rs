//! Bad admin input against the real binary: every rejection has the right
//! status and an `{"error_msg"}` body naming the problem, and no rejected
//! request leaves anything in the event log.

use aigw_tests::fixtures::{self, APIKEYS, MODELS, PROVIDER_KEYS};
use aigw_tests::rest::assert_gapless;
use aigw_tests::{AdminClient, ControlPlane, Resp};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// A control plane plus a count of the writes it acknowledged.
struct Session {
    cp: ControlPlane,
    admin: AdminClient,
    acknowledged: u64,
}

impl Session {
    async fn start() -> Result<Self> {
        let cp = ControlPlane::start().await?;
        let admin = cp.rest();
        Ok(Self {
            cp,
            admin,
            acknowledged: 0,
        })
    }

    /// A write that must succeed; counted.
    async fn ok(&mut self, resp: Result<Resp>, status: u16) -> Result<Value> {
        let body = resp?.expect(status)?;
        self.acknowledged += 1;
        Ok(body)
    }

    async fn create(&mut self, path: &str, body: &Value) -> Result<String> {
        let rec = self.ok(self.admin.post(path, body).await, 201).await?;
        Ok(rec["id"].as_str().context("id")?.to_string())
    }

    /// A rejected request: `status`, and an error message that contains every
    /// one of `mentions`.
    async fn rejected(&self, resp: Result<Resp>, status: u16, mentions: &[&str]) -> Result<String> {
        let msg = resp?.expect_error(status)?;
        for m in mentions {
            ensure!(msg.contains(m), "error_msg {msg:?} does not mention {m:?}");
        }
        Ok(msg)
    }

    /// The log holds exactly the acknowledged writes, numbered 1..=n.
    async fn assert_no_partial_writes(&self) -> Result<()> {
        let events = self.admin.all_events().await?;
        assert_gapless(&events, self.acknowledged)
            .context("the event log must hold exactly the acknowledged writes")
    }
}

#[tokio::test]
async fn malformed_json_is_400() -> Result<()> {
    let s = Session::start().await?;
    for path in [PROVIDER_KEYS, MODELS, APIKEYS] {
        for body in [
            "{\"display_name\": ",
            "not json at all",
            "{'display_name': 'single quotes'}",
            "{\"display_name\": \"x\",}",
            "",
            "   ",
            "null",
            "[]",
            "\"a string\"",
        ] {
            let msg = s
                .rejected(s.admin.post_raw(path, body).await, 400, &[])
                .await;
            msg.with_context(|| format!("POST {path} with body {body:?}"))?;
        }
        // The same on PUT.
        let msg = s
            .rejected(s.admin.post_raw(path, "{").await, 400, &[])
            .await?;
        assert!(!msg.is_empty());
        let put = AdminClient::send(
            s.admin
                .request(reqwest::Method::PUT, &format!("{path}/some-id"))
                .header("content-type", "application/json")
                .body("{\"display_name\""),
        )
        .await;
        s.rejected(put, 400, &[]).await?;
    }
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn trailing_garbage_after_the_json_document_is_400() -> Result<()> {
    let s = Session::start().await?;
    let valid = fixtures::provider_key("pk-trailing", "sk-trailing").to_string();
    for suffix in [
        " trailing",
        "}",
        "{}",
        " {\"display_name\": \"other\"}",
        ",1",
    ] {
        let body = format!("{valid}{suffix}");
        s.rejected(
            s.admin.post_raw(PROVIDER_KEYS, body.clone()).await,
            400,
            &[],
        )
        .await
        .with_context(|| format!("POST {PROVIDER_KEYS} with body {body:?}"))?;
    }
    assert!(s.admin.list("provider_keys").await?.is_empty());
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn wrong_types_are_400_naming_the_field() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            PROVIDER_KEYS,
            json!({"display_name": 5, "secret": "s", "api_base": "acme"}),
            "display_name",
        ),
        (
            PROVIDER_KEYS,
            json!({"display_name": "p", "secret": ["s"], "api_base": "acme"}),
            "secret",
        ),
        (
            PROVIDER_KEYS,
            json!({"display_name": "p", "secret": "s", "api_base": {"host": "acme"}}),
            "api_base",
        ),
        (
            MODELS,
            json!({"display_name": "m", "model_name": 4, "provider_key_id": pk}),
            "model_name",
        ),
        (
            MODELS,
            json!({"display_name": "m", "model_name": "d", "provider_key_id": pk, "cost": {"input_per_1k": "cheap"}}),
            "cost.input_per_1k",
        ),
        (
            MODELS,
            json!({"display_name": "m", "targets": "all"}),
            "targets",
        ),
        (
            APIKEYS,
            json!({"key_hash": aigw_tests::sha256_hex("k"), "allowed_models": "gpt"}),
            "allowed_models",
        ),
        (
            APIKEYS,
            json!({"key_hash": aigw_tests::sha256_hex("k"), "disabled": "yes"}),
            "disabled",
        ),
        (
            APIKEYS,
            json!({"key_hash": aigw_tests::sha256_hex("k"), "rate_limit": {"rpm": -1}}),
            "rate_limit.rpm",
        ),
        (
            APIKEYS,
            json!({"key_hash": aigw_tests::sha256_hex("k"), "budget": {"max_usd": 5, "period": "fortnight"}}),
            "budget.period",
        ),
        (
            APIKEYS,
            json!({"key_hash": aigw_tests::sha256_hex("k"), "expires_at": "next tuesday"}),
            "expires_at",
        ),
        (APIKEYS, json!({"key_hash": 12345}), "key_hash"),
    ];
    for (path, body, field) in cases {
        s.rejected(s.admin.post(path, &body).await, 400, &[field])
            .await
            .with_context(|| format!("POST {path} {body}"))?;
    }
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn unknown_fields_are_400() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    let mut pk_body = fixtures::provider_key("pk2", "sk");
    pk_body["colour"] = json!("blue");
    let mut model_body = fixtures::model("m", &pk);
    model_body["routing"] = json!({"strategy": "weighted", "retires": 3});
    let mut key_body = fixtures::api_key("sk-unknown", &["*"]);
    key_body["rate_limit"] = json!({"rpm": 10, "rps": 1});
    let mut key_body2 = fixtures::api_key("sk-unknown2", &["*"]);
    key_body2["keyhash"] = json!("x");
    for (path, body, field) in [
        (PROVIDER_KEYS, pk_body, "colour"),
        (MODELS, model_body, "retires"),
        (APIKEYS, key_body, "rps"),
        (APIKEYS, key_body2, "keyhash"),
    ] {
        s.rejected(s.admin.post(path, &body).await, 400, &[field])
            .await
            .with_context(|| format!("POST {path} {body}"))?;
        // Full replace rejects them just the same.
        s.rejected(
            s.admin.put(&format!("{path}/some-id"), &body).await,
            400,
            &[field],
        )
        .await
        .with_context(|| format!("PUT {path} {body}"))?;
    }
    // An unknown field inside the Entra secret JSON is named too.
    let body = json!({
        "display_name": "aad",
        "secret": json!({"tenant_id": "t", "client_id": "c", "client_secret": "s", "tennant": "x"}).to_string(),
        "api_base": "acme",
    });
    s.rejected(
        s.admin.post(PROVIDER_KEYS, &body).await,
        400,
        &["secret.tennant"],
    )
    .await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn missing_required_fields_are_400() -> Result<()> {
    let s = Session::start().await?;
    let full = fixtures::provider_key("pk", "sk");
    for field in ["display_name", "secret", "api_base"] {
        let mut body = full.clone();
        body.as_object_mut().context("object")?.remove(field);
        s.rejected(s.admin.post(PROVIDER_KEYS, &body).await, 400, &[field])
            .await
            .with_context(|| format!("provider key without {field}"))?;
    }
    s.rejected(
        s.admin
            .post(APIKEYS, &json!({"allowed_models": ["*"]}))
            .await,
        400,
        &["key_hash"],
    )
    .await?;
    // A model needs a deployment: provider_key_id + model_name, or targets.
    s.rejected(
        s.admin
            .post(MODELS, &json!({"display_name": "m", "model_name": "d"}))
            .await,
        400,
        &["provider_key_id"],
    )
    .await?;
    s.rejected(
        s.admin
            .post(
                MODELS,
                &json!({"display_name": "m", "provider_key_id": "x"}),
            )
            .await,
        400,
        &["model_name"],
    )
    .await?;
    s.rejected(
        s.admin.post(MODELS, &json!({"display_name": "m"})).await,
        400,
        &["provider_key_id"],
    )
    .await?;
    s.rejected(
        s.admin
            .post(MODELS, &json!({"provider_key_id": "x", "model_name": "d"}))
            .await,
        400,
        &["display_name"],
    )
    .await?;
    s.rejected(s.admin.post(PROVIDER_KEYS, &json!({})).await, 400, &[])
        .await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn empty_display_names_are_400() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    for name in ["", "   "] {
        s.rejected(
            s.admin
                .post(PROVIDER_KEYS, &fixtures::provider_key(name, "sk"))
                .await,
            400,
            &["display_name"],
        )
        .await?;
        s.rejected(
            s.admin.post(MODELS, &fixtures::model(name, &pk)).await,
            400,
            &["display_name"],
        )
        .await?;
        let mut key = fixtures::api_key("sk-caller", &["*"]);
        key["display_name"] = json!(name);
        s.rejected(s.admin.post(APIKEYS, &key).await, 400, &["display_name"])
            .await?;
        // Renaming to empty is rejected as well, and changes nothing.
        s.rejected(
            s.admin
                .put(
                    &format!("{PROVIDER_KEYS}/{pk}"),
                    &fixtures::provider_key(name, "sk"),
                )
                .await,
            400,
            &["display_name"],
        )
        .await?;
    }
    let got = s
        .admin
        .get(&format!("{PROVIDER_KEYS}/{pk}"))
        .await?
        .expect(200)?;
    assert_eq!(got["value"]["display_name"], "pk");
    assert_eq!(got["revision"], 1);
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn duplicate_display_names_and_key_hashes_are_409() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("azure-prod", "sk"))
        .await?;
    let other = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("azure-dr", "sk"))
        .await?;
    s.create(MODELS, &fixtures::model("gpt-4o-azure", &pk))
        .await?;
    let key = s
        .create(APIKEYS, &fixtures::api_key("sk-azure-caller", &["*"]))
        .await?;
    let mut named = fixtures::api_key("sk-named", &["*"]);
    named["display_name"] = json!("team-a");
    s.create(APIKEYS, &named).await?;

    s.rejected(
        s.admin
            .post(PROVIDER_KEYS, &fixtures::provider_key("azure-prod", "sk2"))
            .await,
        409,
        &["display_name", "azure-prod"],
    )
    .await?;
    s.rejected(
        s.admin
            .post(MODELS, &fixtures::model("gpt-4o-azure", &other))
            .await,
        409,
        &["display_name"],
    )
    .await?;
    // Renaming onto a taken name.
    s.rejected(
        s.admin
            .put(
                &format!("{PROVIDER_KEYS}/{other}"),
                &fixtures::provider_key("azure-prod", "sk"),
            )
            .await,
        409,
        &["display_name"],
    )
    .await?;
    // Same key hash, also when written in upper case.
    let dup = fixtures::api_key("sk-azure-caller", &[]);
    s.rejected(s.admin.post(APIKEYS, &dup).await, 409, &["key_hash"])
        .await?;
    let mut upper = dup.clone();
    upper["key_hash"] = json!(dup["key_hash"]
        .as_str()
        .context("hash")?
        .to_ascii_uppercase());
    s.rejected(s.admin.post(APIKEYS, &upper).await, 409, &["key_hash"])
        .await?;
    s.rejected(
        s.admin.put(&format!("{APIKEYS}/another-id"), &dup).await,
        409,
        &["key_hash"],
    )
    .await?;
    let mut named2 = fixtures::api_key("sk-named-2", &["*"]);
    named2["display_name"] = json!("team-a");
    s.rejected(s.admin.post(APIKEYS, &named2).await, 409, &["display_name"])
        .await?;
    // Writing a resource onto its own unique values is fine.
    s.ok(s.admin.put(&format!("{APIKEYS}/{key}"), &dup).await, 200)
        .await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn bad_api_base_is_400_naming_api_base() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    for base in [
        "https://acme-west.openai.azure.com/?api-version=1",
        "https://acme-west.openai.azure.com?x=1",
        "https://acme-west.openai.azure.com/#frag",
        "https://user:password@acme-west.openai.azure.com",
        "https://user@acme-west.openai.azure.com",
        "ftp://acme-west.openai.azure.com",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "acme west",
        "https://",
        "",
    ] {
        let mut body = fixtures::provider_key("pk-bad-base", "sk");
        body["api_base"] = json!(base);
        s.rejected(s.admin.post(PROVIDER_KEYS, &body).await, 400, &["api_base"])
            .await
            .with_context(|| format!("POST api_base {base:?}"))?;
        s.rejected(
            s.admin.put(&format!("{PROVIDER_KEYS}/{pk}"), &body).await,
            400,
            &["api_base"],
        )
        .await
        .with_context(|| format!("PUT api_base {base:?}"))?;
    }
    // The accepted forms, for contrast.
    for (i, base) in [
        "acme-west",
        "https://acme-west.openai.azure.com",
        "http://127.0.0.1:8080",
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = fixtures::provider_key(&format!("pk-good-{i}"), "sk");
        body["api_base"] = json!(base);
        fixtures::allow_http(&mut body);
        s.create(PROVIDER_KEYS, &body).await?;
    }
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn bad_entra_secret_is_400_naming_the_part() -> Result<()> {
    let s = Session::start().await?;
    let cases = [
        (
            json!({"tenant_id": "t", "client_id": "c"}),
            "secret.client_secret",
        ),
        (
            json!({"tenant_id": "t", "client_id": "c", "client_secret": ""}),
            "secret.client_secret",
        ),
        (
            json!({"client_id": "c", "client_secret": "s"}),
            "secret.tenant_id",
        ),
        (
            json!({"tenant_id": "t", "client_secret": "s"}),
            "secret.client_id",
        ),
        (
            json!({"tenant_id": "t", "client_id": "c", "client_secret": "s", "authority_host": "http://login.example"}),
            "secret.authority_host",
        ),
    ];
    for (secret, field) in cases {
        let body = json!({
            "display_name": "aad",
            "secret": secret.to_string(),
            "api_base": "https://acme-west.openai.azure.com",
        });
        s.rejected(s.admin.post(PROVIDER_KEYS, &body).await, 400, &[field])
            .await
            .with_context(|| format!("secret {secret}"))?;
    }
    // JSON-looking text that is not JSON.
    let body = json!({"display_name": "aad", "secret": "{tenant_id: t", "api_base": "acme"});
    s.rejected(s.admin.post(PROVIDER_KEYS, &body).await, 400, &["secret"])
        .await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn dangling_provider_key_references_are_409() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    let key = s
        .create(APIKEYS, &fixtures::api_key("sk-c", &["*"]))
        .await?;
    s.rejected(
        s.admin
            .post(MODELS, &fixtures::model("m", "no-such-provider-key"))
            .await,
        409,
        &["provider_key_id", "no-such-provider-key"],
    )
    .await?;
    // An id of another kind is no provider key either.
    s.rejected(
        s.admin.post(MODELS, &fixtures::model("m", &key)).await,
        409,
        &["provider_key_id"],
    )
    .await?;
    let multi = json!({
        "display_name": "m-multi",
        "targets": [
            {"provider_key_id": pk, "model_name": "d1"},
            {"provider_key_id": "ghost", "model_name": "d2", "priority": 1},
        ],
    });
    s.rejected(s.admin.post(MODELS, &multi).await, 409, &["ghost"])
        .await?;
    // Re-pointing an existing model at a missing key.
    let m = s.create(MODELS, &fixtures::model("m", &pk)).await?;
    s.rejected(
        s.admin
            .put(&format!("{MODELS}/{m}"), &fixtures::model("m", "ghost"))
            .await,
        409,
        &["provider_key_id"],
    )
    .await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn deleting_a_provider_key_in_use_is_409_naming_the_model() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk-used", "sk"))
        .await?;
    let pk2 = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk-target", "sk"))
        .await?;
    let m = s
        .create(MODELS, &fixtures::model("gpt-4o-azure", &pk))
        .await?;
    let multi = json!({
        "display_name": "multi-alias",
        "targets": [{"provider_key_id": pk2, "model_name": "d1", "weight": 3}],
    });
    let mm = s.create(MODELS, &multi).await?;

    s.rejected(
        s.admin.delete(&format!("{PROVIDER_KEYS}/{pk}")).await,
        409,
        &["gpt-4o-azure"],
    )
    .await?;
    s.rejected(
        s.admin.delete(&format!("{PROVIDER_KEYS}/{pk2}")).await,
        409,
        &["multi-alias"],
    )
    .await?;
    s.admin
        .get(&format!("{PROVIDER_KEYS}/{pk}"))
        .await?
        .expect(200)?;

    // Once nothing uses it, it can go.
    s.ok(s.admin.delete(&format!("{MODELS}/{m}")).await, 200)
        .await?;
    s.ok(s.admin.delete(&format!("{PROVIDER_KEYS}/{pk}")).await, 200)
        .await?;
    s.ok(s.admin.delete(&format!("{MODELS}/{mm}")).await, 200)
        .await?;
    s.ok(s.admin.delete(&format!("{PROVIDER_KEYS}/{pk2}")).await, 200)
        .await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn bodies_over_1_mib_are_413() -> Result<()> {
    const LIMIT: usize = 1024 * 1024;
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    let mut big = fixtures::provider_key("pk-big", "sk");
    big["provider"] = json!("x".repeat(1024 * 1024));
    s.rejected(s.admin.post(PROVIDER_KEYS, &big).await, 413, &[])
        .await?;
    s.rejected(
        s.admin.put(&format!("{PROVIDER_KEYS}/{pk}"), &big).await,
        413,
        &[],
    )
    .await?;
    // One byte over the limit, not JSON at all: too large before parsing matters.
    let junk = vec![b'a'; LIMIT + 1];
    s.rejected(s.admin.post_raw(APIKEYS, junk).await, 413, &[])
        .await?;
    // Exactly the limit is not too large: it is read, and fails as JSON.
    let mut exact = vec![b' '; LIMIT];
    exact[0] = b'{';
    s.rejected(s.admin.post_raw(APIKEYS, exact).await, 400, &[])
        .await?;

    // Far over the limit: the server answers before the upload is done, so
    // the client may see the 413 or the connection closing under it (the
    // server does not drain the rest); either way nothing is stored.
    let huge = vec![b'a'; 8 * LIMIT];
    match s.admin.post_raw(APIKEYS, huge).await {
        Ok(r) => {
            r.expect_error(413)?;
        }
        Err(e) => eprintln!("8 MiB upload cut off instead of a readable 413: {e:#}"),
    }

    // Just under the limit is accepted.
    let mut fits = fixtures::provider_key("pk-fits", "sk");
    fits["provider"] = json!("y".repeat(LIMIT - 1024));
    s.create(PROVIDER_KEYS, &fits).await?;
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn missing_or_wrong_admin_key_is_401() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    let body = fixtures::provider_key("pk-2", "sk");
    let anon = s.admin.with_key(None);
    let wrong = s.admin.with_key(Some("not-the-admin-key"));
    let key = s.cp.admin_key();
    let almost = s.admin.with_key(Some(&key[..key.len() - 1]));
    for client in [&anon, &wrong, &almost] {
        s.rejected(client.get(PROVIDER_KEYS).await, 401, &[])
            .await?;
        s.rejected(client.get(&format!("{PROVIDER_KEYS}/{pk}")).await, 401, &[])
            .await?;
        s.rejected(client.post(PROVIDER_KEYS, &body).await, 401, &[])
            .await?;
        s.rejected(
            client.put(&format!("{PROVIDER_KEYS}/{pk}"), &body).await,
            401,
            &[],
        )
        .await?;
        s.rejected(
            client.delete(&format!("{PROVIDER_KEYS}/{pk}")).await,
            401,
            &[],
        )
        .await?;
        s.rejected(client.get("/admin/v1/events").await, 401, &[])
            .await?;
        s.rejected(client.get("/admin/v1/nodes").await, 401, &[])
            .await?;
    }
    // Other schemes and header spellings.
    let raw = |h: &str, v: String| {
        AdminClient::send(
            anon.request(reqwest::Method::POST, PROVIDER_KEYS)
                .header(h, v)
                .json(&body),
        )
    };
    s.rejected(
        raw("authorization", format!("Basic {}", s.cp.admin_key())).await,
        401,
        &[],
    )
    .await?;
    s.rejected(raw("authorization", "Bearer".to_string()).await, 401, &[])
        .await?;
    s.rejected(raw("x-api-key", "wrong".to_string()).await, 401, &[])
        .await?;
    // Unauthenticated bodies are not even parsed: garbage is still 401.
    s.rejected(anon.post_raw(PROVIDER_KEYS, "{garbage").await, 401, &[])
        .await?;
    assert_eq!(s.admin.list("provider_keys").await?.len(), 1);
    s.assert_no_partial_writes().await
}

#[tokio::test]
async fn other_invalid_values_are_400_naming_the_field() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("pk", "sk"))
        .await?;
    let mut bad_adapter = fixtures::provider_key("p1", "sk");
    bad_adapter["adapter"] = json!("openai-direct");
    let mut empty_secret = fixtures::provider_key("p2", "sk");
    empty_secret["secret"] = json!("");
    let mut bad_version = fixtures::provider_key("p3", "sk");
    bad_version["api_version"] = json!("2024/10/21");
    let mut zero_rpm = fixtures::api_key("sk-z", &["*"]);
    zero_rpm["rate_limit"] = json!({"rpm": 0});
    let mut neg_budget = fixtures::api_key("sk-n", &["*"]);
    neg_budget["budget"] = json!({"max_usd": -1.0, "period": "day"});
    let mut neg_cost = fixtures::model("m", &pk);
    neg_cost["cost"] = json!({"input_per_1k": -0.5, "output_per_1k": 0.1});
    let mut zero_ttl = fixtures::model("m", &pk);
    zero_ttl["cache"] = json!({"enabled": true, "ttl_seconds": 0});
    let both = json!({
        "display_name": "m", "model_name": "d", "provider_key_id": pk,
        "targets": [{"provider_key_id": pk, "model_name": "d2"}],
    });
    let cases = [
        (PROVIDER_KEYS, bad_adapter, "adapter"),
        (PROVIDER_KEYS, empty_secret, "secret"),
        (PROVIDER_KEYS, bad_version, "api_version"),
        (APIKEYS, json!({"key_hash": "abc123"}), "key_hash"),
        (APIKEYS, json!({"key_hash": "z".repeat(64)}), "key_hash"),
        (APIKEYS, zero_rpm, "rate_limit.rpm"),
        (APIKEYS, neg_budget, "budget.max_usd"),
        (
            APIKEYS,
            json!({"key_hash": aigw_tests::sha256_hex("e"), "allowed_models": [""]}),
            "allowed_models[0]",
        ),
        (MODELS, neg_cost, "cost.input_per_1k"),
        (MODELS, zero_ttl, "cache.ttl_seconds"),
        (MODELS, both, "targets"),
    ];
    for (path, body, field) in cases {
        s.rejected(s.admin.post(path, &body).await, 400, &[field])
            .await
            .with_context(|| format!("POST {path} {body}"))?;
    }
    // Caller-chosen ids must be path-safe.
    s.rejected(
        s.admin
            .put(
                &format!("{APIKEYS}/bad%20id"),
                &fixtures::api_key("sk-id", &[]),
            )
            .await,
        400,
        &["id"],
    )
    .await?;
    s.assert_no_partial_writes().await
}

/// Everything above in one session: after a long run of rejected requests
/// mixed with good ones, the log holds exactly the good ones.
#[tokio::test]
async fn rejected_requests_never_reach_the_event_log() -> Result<()> {
    let mut s = Session::start().await?;
    let pk = s
        .create(PROVIDER_KEYS, &fixtures::provider_key("azure-prod", "sk-1"))
        .await?;
    let _ = s.admin.post_raw(PROVIDER_KEYS, "{").await?;
    let _ = s
        .admin
        .post(PROVIDER_KEYS, &fixtures::provider_key("azure-prod", "sk"))
        .await?;
    let m = s
        .create(MODELS, &fixtures::model("gpt-4o-azure", &pk))
        .await?;
    let _ = s.admin.post(MODELS, &fixtures::model("x", "ghost")).await?;
    let _ = s.admin.delete(&format!("{PROVIDER_KEYS}/{pk}")).await?;
    let mut big = fixtures::api_key("sk-big", &[]);
    big["display_name"] = json!("b".repeat(1024 * 1024));
    let _ = s.admin.post(APIKEYS, &big).await?;
    let k = s
        .create(
            APIKEYS,
            &fixtures::api_key("sk-azure-caller", &["gpt-4o-azure"]),
        )
        .await?;
    let _ = s
        .admin
        .post(APIKEYS, &fixtures::api_key("sk-azure-caller", &[]))
        .await?;
    let _ = s
        .admin
        .put_if_match(
            &format!("{APIKEYS}/{k}"),
            "7",
            &fixtures::api_key("sk-x", &[]),
        )
        .await?;
    let _ = s
        .admin
        .with_key(None)
        .delete(&format!("{APIKEYS}/{k}"))
        .await?;
    let _ = s
        .admin
        .with_key(Some("wrong"))
        .post(APIKEYS, &fixtures::api_key("sk-w", &[]))
        .await?;
    s.ok(s.admin.delete(&format!("{MODELS}/{m}")).await, 200)
        .await?;
    s.ok(s.admin.delete(&format!("{PROVIDER_KEYS}/{pk}")).await, 200)
        .await?;

    s.assert_no_partial_writes().await?;
    assert!(s.admin.list("provider_keys").await?.is_empty());
    assert!(s.admin.list("models").await?.is_empty());
    let keys = s.admin.list("apikeys").await?;
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0]["revision"], 1,
        "the stale update must not have applied"
    );
    Ok(())
}

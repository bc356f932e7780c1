//! gRPC `AdminService` and server reflection against the real binary.

use aigw_shared::proto::admin::v1 as pb;
use aigw_tests::fixtures::{self, PROVIDER_KEYS};
use aigw_tests::grpc::{admin_client, file_containing_symbol, list_services};
use aigw_tests::ControlPlane;
use anyhow::{Context, Result};
use tonic::Code;

fn provider_key(name: &str, secret: &str) -> pb::ProviderKey {
    pb::ProviderKey {
        display_name: name.into(),
        provider: "azure".into(),
        adapter: "azure-openai".into(),
        secret: secret.into(),
        api_base: "https://acme-west.openai.azure.com".into(),
        api_version: String::new(),
        ca_pem: String::new(),
        allow_insecure_upstream: false,
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Result<(Code, String)> {
    match r {
        Ok(v) => anyhow::bail!("expected an error status, got {v:?}"),
        Err(s) => Ok((s.code(), s.message().to_string())),
    }
}

#[tokio::test]
async fn provider_key_crud_over_grpc() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let mut c = cp.grpc_admin().await?;

    let rec = c
        .create_provider_key(pb::CreateProviderKeyRequest {
            value: Some(provider_key("azure-prod", "sk-grpc-secret")),
        })
        .await?
        .into_inner();
    assert!(!rec.id.is_empty());
    assert_eq!(rec.revision, 1);
    let v = rec.value.clone().context("value")?;
    assert_eq!(v.secret, "***");
    assert_eq!(v.display_name, "azure-prod");
    assert_eq!(v.api_version, "2024-10-21", "default api_version");
    let id = rec.id.clone();

    let got = c
        .get_provider_key(pb::GetProviderKeyRequest { id: id.clone() })
        .await?
        .into_inner();
    assert_eq!(got, rec);

    let list = c
        .list_provider_keys(pb::ListProviderKeysRequest {})
        .await?
        .into_inner();
    assert_eq!(list.total, 1);
    assert_eq!(list.list, vec![rec.clone()]);

    // Update with a stale expected revision: ABORTED, nothing changes.
    let st = c
        .update_provider_key(pb::UpdateProviderKeyRequest {
            id: id.clone(),
            value: Some(provider_key("azure-prod-2", "sk-2")),
            expected_revision: Some(7),
        })
        .await;
    assert_eq!(code(st)?.0, Code::Aborted);
    // With the current one: revision 2.
    let upd = c
        .update_provider_key(pb::UpdateProviderKeyRequest {
            id: id.clone(),
            value: Some(provider_key("azure-prod-2", "sk-2")),
            expected_revision: Some(1),
        })
        .await?
        .into_inner();
    assert_eq!(upd.revision, 2);
    assert_eq!(
        upd.value.as_ref().map(|v| v.display_name.as_str()),
        Some("azure-prod-2")
    );
    // Without one: unconditional, revision 3.
    let upd = c
        .update_provider_key(pb::UpdateProviderKeyRequest {
            id: id.clone(),
            value: Some(provider_key("azure-prod-3", "sk-3")),
            expected_revision: None,
        })
        .await?
        .into_inner();
    assert_eq!(upd.revision, 3);

    // gRPC updates do not create: unknown id is NOT_FOUND.
    let st = c
        .update_provider_key(pb::UpdateProviderKeyRequest {
            id: "no-such-id".into(),
            value: Some(provider_key("x", "sk")),
            expected_revision: None,
        })
        .await;
    assert_eq!(code(st)?.0, Code::NotFound);

    // Delete: stale revision aborted, then deleted.
    let st = c
        .delete_provider_key(pb::DeleteProviderKeyRequest {
            id: id.clone(),
            expected_revision: Some(2),
        })
        .await;
    assert_eq!(code(st)?.0, Code::Aborted);
    let del = c
        .delete_provider_key(pb::DeleteProviderKeyRequest {
            id: id.clone(),
            expected_revision: Some(3),
        })
        .await?
        .into_inner();
    assert!(del.deleted);
    assert_eq!(del.id, id);
    let st = c
        .get_provider_key(pb::GetProviderKeyRequest { id: id.clone() })
        .await;
    assert_eq!(code(st)?.0, Code::NotFound);

    // The same writes are in the shared event log.
    let events = c
        .list_events(pb::ListEventsRequest {
            resource: "provider_keys".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let types: Vec<&str> = events.list.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        types,
        [
            "ProviderKeyCreated",
            "ProviderKeyUpdated",
            "ProviderKeyUpdated",
            "ProviderKeyDeleted"
        ]
    );
    assert_eq!(events.total, 4);
    for e in &events.list {
        assert!(!e.payload_json.contains("sk-grpc-secret") && !e.payload_json.contains("sk-2"));
        let payload: serde_json::Value = serde_json::from_str(&e.payload_json)?;
        if e.r#type != "ProviderKeyDeleted" {
            assert_eq!(payload["value"]["secret"], "***", "{}", e.payload_json);
        }
    }
    Ok(())
}

#[tokio::test]
async fn grpc_requires_the_admin_key() -> Result<()> {
    let cp = ControlPlane::start().await?;
    for key in [None, Some("wrong-key")] {
        let mut c = admin_client(&cp.grpc_url(), key).await?;
        let st = c.list_provider_keys(pb::ListProviderKeysRequest {}).await;
        assert_eq!(code(st)?.0, Code::Unauthenticated, "key {key:?}");
        let st = c
            .create_provider_key(pb::CreateProviderKeyRequest {
                value: Some(provider_key("sneaky", "sk")),
            })
            .await;
        assert_eq!(code(st)?.0, Code::Unauthenticated, "key {key:?}");
        let st = c.list_events(pb::ListEventsRequest::default()).await;
        assert_eq!(code(st)?.0, Code::Unauthenticated, "key {key:?}");
    }
    // x-api-key metadata is accepted too.
    let mut c = admin_client(&cp.grpc_url(), None).await?;
    let mut req = tonic::Request::new(pb::ListProviderKeysRequest {});
    req.metadata_mut()
        .insert("x-api-key", cp.admin_key().parse()?);
    assert_eq!(c.list_provider_keys(req).await?.into_inner().total, 0);
    // Nothing was written by the rejected calls.
    assert!(cp.rest().all_events().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn grpc_maps_bad_input_to_status_codes() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let mut c = cp.grpc_admin().await?;

    let st = c
        .create_provider_key(pb::CreateProviderKeyRequest { value: None })
        .await;
    assert_eq!(code(st)?.0, Code::InvalidArgument);
    let mut bad = provider_key("bad-base", "sk");
    bad.api_base = "https://acme.openai.azure.com/?x=1".into();
    let (c1, msg) = code(
        c.create_provider_key(pb::CreateProviderKeyRequest { value: Some(bad) })
            .await,
    )?;
    assert_eq!(c1, Code::InvalidArgument);
    assert!(msg.contains("api_base"), "{msg}");
    let (c2, msg) = code(
        c.create_provider_key(pb::CreateProviderKeyRequest {
            value: Some(provider_key("", "sk")),
        })
        .await,
    )?;
    assert_eq!(c2, Code::InvalidArgument);
    assert!(msg.contains("display_name"), "{msg}");
    let (c3, msg) = code(
        c.create_api_key(pb::CreateApiKeyRequest {
            value: Some(pb::ApiKey {
                key_hash: "not-a-hash".into(),
                ..Default::default()
            }),
        })
        .await,
    )?;
    assert_eq!(c3, Code::InvalidArgument);
    assert!(msg.contains("key_hash"), "{msg}");

    // Duplicate name and dangling reference.
    let pk = c
        .create_provider_key(pb::CreateProviderKeyRequest {
            value: Some(provider_key("dup", "sk")),
        })
        .await?
        .into_inner();
    let st = c
        .create_provider_key(pb::CreateProviderKeyRequest {
            value: Some(provider_key("dup", "sk")),
        })
        .await;
    assert_eq!(code(st)?.0, Code::AlreadyExists);
    let st = c
        .create_model(pb::CreateModelRequest {
            value: Some(pb::Model {
                display_name: "m".into(),
                model_name: "d".into(),
                provider_key_id: "ghost".into(),
                ..Default::default()
            }),
        })
        .await;
    assert_eq!(code(st)?.0, Code::FailedPrecondition);
    let model = c
        .create_model(pb::CreateModelRequest {
            value: Some(pb::Model {
                display_name: "gpt-4o-grpc".into(),
                model_name: "d".into(),
                provider_key_id: pk.id.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    assert_eq!(model.revision, 1);
    let (c4, msg) = code(
        c.delete_provider_key(pb::DeleteProviderKeyRequest {
            id: pk.id.clone(),
            expected_revision: None,
        })
        .await,
    )?;
    assert_eq!(c4, Code::FailedPrecondition);
    assert!(
        msg.contains("gpt-4o-grpc"),
        "the message must name the model: {msg}"
    );
    let st = c.list_events(pb::ListEventsRequest {
        resource: "widgets".into(),
        ..Default::default()
    });
    assert_eq!(code(st.await)?.0, Code::InvalidArgument);

    // Only the two successful writes are in the log.
    assert_eq!(cp.rest().all_events().await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn grpc_and_rest_see_the_same_state() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let mut c = cp.grpc_admin().await?;
    let admin = cp.rest();
    let rec = c
        .create_provider_key(pb::CreateProviderKeyRequest {
            value: Some(provider_key("from-grpc", "sk")),
        })
        .await?
        .into_inner();
    let via_rest = admin
        .get(&format!("{PROVIDER_KEYS}/{}", rec.id))
        .await?
        .expect(200)?;
    assert_eq!(via_rest["value"]["display_name"], "from-grpc");
    assert_eq!(via_rest["revision"], 1);

    let id = admin
        .create_id("apikeys", &fixtures::api_key("sk-from-rest", &["*"]))
        .await?;
    let key = c
        .get_api_key(pb::GetApiKeyRequest { id: id.clone() })
        .await?
        .into_inner();
    let v = key.value.context("value")?;
    assert_eq!(v.key_hash, aigw_tests::sha256_hex("sk-from-rest"));
    assert_eq!(v.allowed_models, vec!["*"]);
    let listed = c
        .list_api_keys(pb::ListApiKeysRequest {})
        .await?
        .into_inner();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.list[0].id, id);
    Ok(())
}

#[tokio::test]
async fn server_reflection_lists_services_and_resolves_symbols() -> Result<()> {
    let cp = ControlPlane::start().await?;
    // Reflection needs no admin key, like `grpcurl -plaintext host:port list`.
    let services = list_services(&cp.grpc_url()).await?;
    for s in ["aigw.admin.v1.AdminService", "aigw.config.v1.ConfigService"] {
        assert!(
            services.iter().any(|x| x == s),
            "{s} not listed: {services:?}"
        );
    }

    let files = file_containing_symbol(&cp.grpc_url(), "aigw.admin.v1.AdminService").await?;
    let admin = files
        .iter()
        .find(|f| f.package() == "aigw.admin.v1")
        .with_context(|| {
            format!(
                "no aigw.admin.v1 file in {:?}",
                files.iter().map(|f| f.name()).collect::<Vec<_>>()
            )
        })?;
    let svc = admin
        .service
        .iter()
        .find(|s| s.name() == "AdminService")
        .context("descriptor lacks AdminService")?;
    let methods: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
    for m in [
        "CreateProviderKey",
        "ListEvents",
        "UpdateApiKey",
        "DeleteModel",
    ] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
    assert!(admin.message_type.iter().any(|m| m.name() == "ProviderKey"));

    // A method symbol resolves to the same file; an unknown one does not.
    let by_method = file_containing_symbol(
        &cp.grpc_url(),
        "aigw.admin.v1.AdminService.CreateProviderKey",
    )
    .await?;
    assert!(by_method.iter().any(|f| f.package() == "aigw.admin.v1"));
    assert!(
        file_containing_symbol(&cp.grpc_url(), "aigw.admin.v1.NoSuchService")
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn oversized_grpc_messages_are_refused_without_a_write() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let mut c = cp.grpc_admin().await?;
    let mut big = provider_key("big", "sk");
    big.provider = "x".repeat(2 * 1024 * 1024);
    let (status, msg) = code(
        c.create_provider_key(pb::CreateProviderKeyRequest { value: Some(big) })
            .await,
    )?;
    assert!(
        matches!(status, Code::OutOfRange | Code::ResourceExhausted),
        "oversized message answered with {status:?}: {msg}"
    );
    // The connection stays usable and nothing was written.
    let list = c
        .list_provider_keys(pb::ListProviderKeysRequest {})
        .await?
        .into_inner();
    assert_eq!(list.total, 0);
    assert!(cp.rest().all_events().await?.is_empty());
    Ok(())
}

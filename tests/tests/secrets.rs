//! Provider secrets at rest: encrypted on disk, masked in every read, absent
//! from logs; the master key guards the data dir.

use aigw_shared::proto::admin::v1 as pb;
use aigw_tests::fixtures::{self, PROVIDER_KEYS};
use aigw_tests::{AdminClient, ControlPlane, Options};
use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::json;
use std::path::{Path, PathBuf};

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Fails if any file under `dir` contains any of `secrets` as bytes; returns
/// how many bytes were scanned.
fn assert_absent_from_files(dir: &Path, secrets: &[&str]) -> Result<usize> {
    let mut scanned = 0;
    for f in files_under(dir)? {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        scanned += bytes.len();
        for s in secrets {
            assert!(
                !contains(&bytes, s.as_bytes()),
                "plaintext secret {s:?} found in {}",
                f.display()
            );
        }
    }
    Ok(scanned)
}

async fn assert_absent_from_reads(
    cp: &ControlPlane,
    admin: &AdminClient,
    secrets: &[&str],
) -> Result<()> {
    let mut texts = Vec::new();
    for path in [
        PROVIDER_KEYS.to_string(),
        "/admin/v1/events?limit=10000".to_string(),
    ] {
        let r = admin.get(&path).await?;
        r.expect(200)?;
        texts.push(r.text);
    }
    for pk in admin.list("provider_keys").await? {
        let id = pk["id"].as_str().context("id")?;
        assert_eq!(pk["value"]["secret"], "***");
        let r = admin.get(&format!("{PROVIDER_KEYS}/{id}")).await?;
        assert_eq!(r.expect(200)?["value"]["secret"], "***");
        texts.push(r.text);
    }
    let mut grpc = cp.grpc_admin().await?;
    let list = grpc
        .list_provider_keys(pb::ListProviderKeysRequest {})
        .await?
        .into_inner();
    for r in &list.list {
        assert_eq!(r.value.as_ref().map(|v| v.secret.as_str()), Some("***"));
    }
    texts.push(format!("{list:?}"));
    let events = grpc
        .list_events(pb::ListEventsRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    texts.push(format!("{events:?}"));
    for t in &texts {
        for s in secrets {
            assert!(
                !t.contains(s),
                "plaintext secret {s:?} in an admin read: {t}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn provider_secrets_never_reach_disk_logs_or_reads() -> Result<()> {
    let api_key = "sk-PLAINTEXT-azure-api-key-7f3a9c";
    let client_secret = "ENTRA-client-secret-Zq8~d1x";
    let rotated = "sk-PLAINTEXT-rotated-key-55e1b0";
    let grpc_secret = "sk-PLAINTEXT-grpc-key-0c4d2e";
    let secrets = [api_key, client_secret, rotated, grpc_secret];

    // Snapshots every 2 events, so state snapshots are on disk too; the most
    // verbose logging of the gateway's own code.
    let opts = Options::default().with_config(json!({
        "control_plane": {"snapshot_every": 2},
        "telemetry": {"log_level": "info,aigw_control_plane=trace,aigw_shared=trace"},
    }));
    let mut cp = ControlPlane::start_with(opts).await?;
    let admin = cp.rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &fixtures::provider_key("azure-prod", api_key),
        )
        .await?;
    let aad = admin
        .create_id(
            "provider_keys",
            &fixtures::entra_provider_key("azure-aad-prod", client_secret),
        )
        .await?;
    admin
        .create("models", &fixtures::model("gpt-4o-azure", &pk))
        .await?;
    admin
        .put(
            &format!("{PROVIDER_KEYS}/{aad}"),
            &fixtures::provider_key("azure-aad-prod", rotated),
        )
        .await?
        .expect(200)?;
    // A read-modify-write that sends the mask back keeps the stored secret.
    let mut rmw = admin
        .get(&format!("{PROVIDER_KEYS}/{pk}"))
        .await?
        .expect(200)?["value"]
        .clone();
    rmw["api_version"] = json!("2025-01-01");
    admin
        .put(&format!("{PROVIDER_KEYS}/{pk}"), &rmw)
        .await?
        .expect(200)?;
    // A rejected write that carries a secret.
    let mut bad = fixtures::provider_key("azure-bad", api_key);
    bad["api_base"] = json!("https://u:p@x.openai.azure.com");
    admin.post(PROVIDER_KEYS, &bad).await?.expect_error(400)?;
    // And one over gRPC.
    cp.grpc_admin()
        .await?
        .create_provider_key(pb::CreateProviderKeyRequest {
            value: Some(pb::ProviderKey {
                display_name: "azure-grpc".into(),
                secret: grpc_secret.into(),
                api_base: "acme-west".into(),
                ..Default::default()
            }),
        })
        .await?;

    assert_absent_from_reads(&cp, &admin, &secrets).await?;

    // Crash (nothing gets a chance to tidy up), then scan every byte on disk:
    // data dir, config, and the process's logs.
    cp.kill9();
    let scanned = assert_absent_from_files(&cp.data_dir(), &secrets)?;
    assert!(scanned > 0, "the data dir is empty");
    assert_absent_from_files(cp.root(), &secrets)?;

    // The secrets are really stored (encrypted): the state survives a restart.
    cp.restart().await?;
    let admin = cp.rest();
    assert_eq!(admin.list("provider_keys").await?.len(), 3);
    let got = admin
        .get(&format!("{PROVIDER_KEYS}/{pk}"))
        .await?
        .expect(200)?;
    assert_eq!(got["value"]["api_version"], "2025-01-01");
    assert_absent_from_reads(&cp, &admin, &secrets).await?;
    cp.kill9();
    assert_absent_from_files(cp.root(), &secrets)?;
    Ok(())
}

#[tokio::test]
async fn standalone_node_and_snapshot_cache_keep_secrets_off_disk() -> Result<()> {
    let api_key = "sk-PLAINTEXT-standalone-key-93be01";
    let client_secret = "ENTRA-standalone-secret-Hq2~p9";
    let secrets = [api_key, client_secret];
    let mut cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &fixtures::provider_key("azure-prod", api_key),
        )
        .await?;
    admin
        .create(
            "provider_keys",
            &fixtures::entra_provider_key("azure-aad-prod", client_secret),
        )
        .await?;
    admin
        .create("models", &fixtures::model("gpt-4o-azure", &pk))
        .await?;
    let version = admin.all_events().await?.len() as u64;

    // Wait until the in-process node has applied this version (and so had
    // the chance to write its snapshot cache).
    let admin2 = admin.clone();
    aigw_tests::process::poll_until(
        "the standalone node to apply the config",
        600,
        std::time::Duration::from_millis(50),
        || {
            let admin = admin2.clone();
            async move {
                let nodes = admin.get("/admin/v1/nodes").await?.expect(200)?;
                let applied = nodes["list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|n| n["applied_version"].as_u64() >= Some(version));
                Ok(applied.then_some(()))
            }
        },
    )
    .await?;
    let cache = std::path::PathBuf::from(
        cp.config()["data_plane"]["snapshot_cache"]
            .as_str()
            .context("snapshot_cache")?,
    );
    aigw_tests::process::poll_until(
        "the snapshot cache file",
        600,
        std::time::Duration::from_millis(50),
        || {
            let exists = cache.is_file();
            async move { Ok(exists.then_some(())) }
        },
    )
    .await?;
    assert_absent_from_reads(&cp, &admin, &secrets).await?;
    cp.kill9();
    assert_absent_from_files(cp.root(), &secrets)?;
    Ok(())
}

#[tokio::test]
async fn standalone_generates_a_private_master_key_in_the_data_dir() -> Result<()> {
    let mut cp = ControlPlane::start_with(Options::standalone()).await?;
    let key_file = cp.data_dir().join("master.key");
    let text =
        std::fs::read_to_string(&key_file).context("standalone must write data/master.key")?;
    let key = base64::engine::general_purpose::STANDARD.decode(text.trim())?;
    assert_eq!(key.len(), 32, "master key must be 32 bytes");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "master.key mode is {mode:o}");
    }
    assert!(
        cp.stdout().contains("master.key") || cp.stderr().contains("master.key"),
        "the log must say a key file was generated"
    );
    assert!(
        !cp.stdout().contains(text.trim()),
        "the master key itself must not be logged"
    );

    let admin = cp.rest();
    let id = admin
        .create_id(
            "provider_keys",
            &fixtures::provider_key("pk", "sk-standalone-secret"),
        )
        .await?;
    cp.kill9();
    cp.restart().await?;
    // Same key reused: the data is readable and the file unchanged.
    assert_eq!(std::fs::read_to_string(&key_file)?, text);
    cp.rest()
        .get(&format!("{PROVIDER_KEYS}/{id}"))
        .await?
        .expect(200)?;
    Ok(())
}

#[tokio::test]
async fn a_different_master_key_refuses_the_data_dir() -> Result<()> {
    let mut cp = ControlPlane::start().await?;
    cp.rest()
        .create("provider_keys", &fixtures::provider_key("pk", "sk-guarded"))
        .await?;
    cp.kill9();
    cp.options_mut().master_key = Some(aigw_tests::control_plane::random_master_key());
    let err = cp
        .restart()
        .await
        .err()
        .context("started with the wrong master key")?;
    assert!(!cp.is_running());
    let stderr = cp.stderr();
    assert!(
        stderr.contains("master key"),
        "stderr must explain the master key mismatch: {stderr}\n{err:#}"
    );
    Ok(())
}

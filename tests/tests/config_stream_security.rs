//! Who may read the config stream (it carries provider secrets) and who may
//! speak for a node.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{control_plane_version, DataPlane, DataPlaneOptions};
use aigw_tests::fixtures::provider_key_at;
use aigw_tests::grpc::{channel, config_watch_first};
use aigw_tests::pki::{Leaf, Pki};
use aigw_tests::process::poll_until;
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The node list entry of `node_id`.
async fn node_entry(cp: &ControlPlane, node_id: &str) -> Result<Option<Value>> {
    let body = cp.rest().get("/admin/v1/nodes").await?.expect(200)?;
    Ok(body["list"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node_id"] == node_id).cloned()))
}

#[tokio::test]
async fn a_second_connection_with_a_live_nodes_id_is_refused() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let dp = DataPlane::start_ready(DataPlaneOptions::for_control_plane(&cp, "node-real")).await?;
    let real = poll_until(
        "the real node listed",
        200,
        Duration::from_millis(25),
        || async {
            Ok(node_entry(&cp, dp.node_id())
                .await?
                .filter(|n| n["connected"] == true))
        },
    )
    .await?;

    // The shared token is right; the id is taken.
    let token = cp.node_token().expect("node token");
    let answer = config_watch_first(channel(&cp.grpc_url()).await?, "node-real", token).await?;
    let status = answer.expect_err("an impostor got a snapshot");
    ensure!(
        status.code() == tonic::Code::AlreadyExists,
        "impostor refused with {status:?}"
    );

    let after = node_entry(&cp, "node-real").await?.expect("listed");
    ensure!(after["connected"] == true, "{after}");
    ensure!(after["address"] == real["address"], "{real} -> {after}");
    ensure!(
        after["applied_version"] == real["applied_version"],
        "{real} -> {after}"
    );
    // A fresh id with the same token is still welcome.
    let other = config_watch_first(channel(&cp.grpc_url()).await?, "node-other", token).await?;
    ensure!(other.is_ok(), "{other:?}");
    Ok(())
}

/// A TCP relay that records every byte crossing it, both ways: what someone
/// on the network path between a node and the control plane would capture.
async fn capturing_relay(
    upstream: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, Arc<Mutex<Vec<u8>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let captured = Arc::new(Mutex::new(Vec::new()));
    let log = captured.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to, log) in [
                (
                    Box::new(cr) as Box<dyn AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn AsyncWrite + Unpin + Send>,
                    log.clone(),
                ),
                (Box::new(sr), Box::new(cw), log.clone()),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        }
    });
    Ok((addr, captured))
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if any.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Ok(
        tonic::transport::Channel::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?,
    )
}

const SECRET: &str = "azure-key-canary-4f1c9d7e2b";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_node_certificates_guard_the_config_stream() -> Result<()> {
    let pki = Pki::new("aigw fleet CA");
    let dir = tempfile::tempdir()?;
    let ca_file = pki.write_ca(dir.path(), "ca.pem")?;
    let server = pki.issue(&["localhost"], &[[127, 0, 0, 1].into()]);
    let (server_cert, server_key) = server.write(dir.path(), "control-plane")?;
    let node = pki.issue(&["node-tls"], &[]);
    let (node_cert, node_key) = node.write(dir.path(), "node-tls")?;

    let cp = ControlPlane::start_with(Options::default().with_config(json!({
        "control_plane": {"grpc_tls": {
            "cert_file": server_cert, "key_file": server_key, "client_ca_file": ca_file
        }}
    })))
    .await?;
    let admin = cp.rest();
    admin
        .create(
            "provider_keys",
            &provider_key_at("azure-prod", SECRET, "https://example.openai.azure.com"),
        )
        .await?;

    // The node reaches the control plane through a relay that records the bytes.
    let (relay, captured) = capturing_relay(cp.grpc_addr()).await?;
    let dp = DataPlane::start_ready(
        DataPlaneOptions::for_control_plane(&cp, "node-tls").with_config(json!({
            "data_plane": {
                "control_plane_url": format!("https://localhost:{}", relay.port()),
                "control_plane_tls": {"ca_file": ca_file, "cert_file": node_cert, "key_file": node_key}
            }
        })),
    )
    .await?;
    let version = control_plane_version(&admin).await?;
    dp.wait_version(version).await?;
    let wire = captured.lock().unwrap().clone();
    ensure!(
        wire.len() > 1000,
        "only {} bytes crossed the relay",
        wire.len()
    );
    ensure!(
        !contains(&wire, SECRET.as_bytes()),
        "the provider secret crossed the network in clear"
    );
    let cache = std::fs::read(dp.snapshot_cache())?;
    ensure!(
        !contains(&cache, SECRET.as_bytes()),
        "the snapshot cache file holds the provider secret in clear"
    );

    let token = cp.node_token().expect("node token");
    // Plaintext: no snapshot.
    let plain = match channel(&format!("http://{}", cp.grpc_addr())).await {
        Ok(ch) => config_watch_first(ch, "node-plain", token).await?.is_ok(),
        Err(_) => false,
    };
    ensure!(!plain, "a plaintext client read a snapshot");
    // TLS without a client certificate: no snapshot.
    let anonymous = match tls_channel(cp.grpc_addr(), &pki.ca_pem(), None).await {
        Ok(ch) => config_watch_first(ch, "node-anon", token).await?.is_ok(),
        Err(_) => false,
    };
    ensure!(!anonymous, "a client without a certificate read a snapshot");
    // The stolen shared token with a certificate from another CA: no snapshot.
    let rogue = Pki::new("rogue CA").issue(&["node-tls"], &[]);
    let stolen = match tls_channel(cp.grpc_addr(), &pki.ca_pem(), Some(&rogue)).await {
        Ok(ch) => config_watch_first(ch, "node-rogue", token).await?.is_ok(),
        Err(_) => false,
    };
    ensure!(!stolen, "a certificate from another CA read a snapshot");
    // A real node certificate cannot speak for another node.
    let other = tls_channel(cp.grpc_addr(), &pki.ca_pem(), Some(&node)).await?;
    let status = config_watch_first(other, "node-other", token)
        .await?
        .expect_err("a certificate for node-tls read a snapshot as node-other");
    ensure!(status.code() == tonic::Code::PermissionDenied, "{status:?}");
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A configuration of over 20 MiB (200 models, 1,800 api keys each allowed
/// every model) reaches three nodes: tonic's default 4 MiB message limit
/// would have kept it from every node for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twenty_mib_configuration_reaches_three_nodes() -> Result<()> {
    use aigw_tests::fixtures::{api_key, model_on};
    use aigw_tests::metrics::scrape_value;
    use futures::StreamExt;

    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &provider_key_at("azure-prod", "k", "https://example.openai.azure.com"),
        )
        .await?;
    let aliases: Vec<String> = (0..200)
        .map(|i| format!("team-{i:03}-gpt-4o-with-a-long-descriptive-alias-name-for-routing"))
        .collect();
    futures::stream::iter(aliases.iter())
        .map(|a| {
            let (admin, pk) = (admin.clone(), pk.clone());
            async move {
                admin
                    .create("models", &model_on(a, "gpt4o-prod", &pk))
                    .await
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let allowed: Vec<&str> = aliases.iter().map(String::as_str).collect();
    futures::stream::iter(0..1800)
        .map(|i| {
            let (admin, body) = (admin.clone(), api_key(&format!("sk-bulk-{i}"), &allowed));
            async move { admin.create("apikeys", &body).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let version = control_plane_version(&admin).await?;
    let metrics = format!("{}/metrics", cp.admin_url());
    let bytes = poll_until(
        "the snapshot of the last write",
        600,
        Duration::from_millis(100),
        || async {
            let b = scrape_value(&metrics, "aigw_cp_snapshot_bytes", &[]).await?;
            Ok((b >= 20.0 * 1024.0 * 1024.0).then_some(b))
        },
    )
    .await?;

    let started = std::time::Instant::now();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            DataPlane::start(DataPlaneOptions::for_control_plane(
                &cp,
                &format!("node-{i}"),
            ))
            .await?,
        );
    }
    for dp in &nodes {
        dp.wait_version(version).await?;
    }
    let took = started.elapsed();
    eprintln!(
        "a {:.1} MiB configuration (v{version}) reached 3 nodes {} ms after they started",
        bytes / 1024.0 / 1024.0,
        took.as_millis()
    );
    // The nodes serve it: the last key may call the last alias.
    let resp = nodes[2].client(Some("sk-bulk-1799")).models().await?;
    ensure!(resp.status == 200, "{}", resp.text);
    ensure!(resp.text.contains(&aliases[199]), "last alias missing");
    Ok(())
}

/// A node credential issued through the admin API: shown once, speaks for
/// its node id only (and the shared token no longer does), the provider
/// secrets it receives cross even a plaintext stream sealed, and revoking it
/// ends the node's live stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_credentials_are_issued_once_seal_the_stream_and_can_be_revoked() -> Result<()> {
    use aigw_tests::data_plane::chat_body;
    use aigw_tests::fixtures::{seed_azure, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT};
    use aigw_tests::mock_azure::MockAzure;

    let mock = MockAzure::start().await;
    mock.set_api_key(SECRET);
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o");
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    seed_azure(&admin, &mock.base_url(), SECRET).await?;

    let issued = admin
        .post(
            "/admin/v1/nodes",
            &json!({"node_id": "node-own", "description": "rack 7"}),
        )
        .await?
        .expect(201)?;
    let token = issued["token"].as_str().expect("a token").to_string();
    let credential_id = issued["credential_id"].as_str().expect("an id").to_string();
    // Shown once: neither reads nor the audit log hold it.
    let shown = admin.get("/admin/v1/nodes/node-own").await?.expect(200)?;
    ensure!(
        shown["credentials"][0]["id"] == credential_id.as_str(),
        "{shown}"
    );
    ensure!(shown["connected"] == false, "{shown}");
    let audit = admin.events("resource=nodes").await?;
    ensure!(
        audit.len() == 1 && audit[0]["type"] == "NodeCredentialIssued",
        "{audit:?}"
    );
    for text in [shown.to_string(), json!(audit).to_string()] {
        ensure!(!text.contains(&token), "the token was shown again: {text}");
    }

    // The shared token no longer speaks for node-own, nor the credential for another id.
    let shared = cp.node_token().expect("node token");
    for (node_id, presented) in [("node-own", shared), ("node-else", token.as_str())] {
        let status = config_watch_first(channel(&cp.grpc_url()).await?, node_id, presented)
            .await?
            .expect_err("a snapshot for the wrong credential");
        ensure!(
            status.code() == tonic::Code::Unauthenticated,
            "{node_id}: {status:?}"
        );
    }

    // The node with its credential, over plaintext gRPC through a recording relay.
    let (relay, captured) = capturing_relay(cp.grpc_addr()).await?;
    let mut opts = DataPlaneOptions::for_control_plane(&cp, "node-own");
    opts.node_token = token.clone();
    opts.control_plane_url = format!("http://{relay}");
    let dp = DataPlane::start_ready(opts).await?;
    dp.wait_version(control_plane_version(&admin).await?)
        .await?;
    let wire = captured.lock().unwrap().clone();
    ensure!(wire.len() > 1000, "only {} bytes crossed", wire.len());
    ensure!(
        !contains(&wire, SECRET.as_bytes()),
        "the provider secret crossed a plaintext stream in clear"
    );
    // Yet the node opened it: the upstream got the key.
    dp.client(Some(SEED_CALLER_KEY))
        .chat(&chat_body(SEED_ALIAS, "hello"))
        .await?
        .expect(200)?;
    let upstream = mock.last_request(SEED_DEPLOYMENT).expect("a call upstream");
    ensure!(upstream.header("api-key") == Some(SECRET));

    // Revoked: the live stream ends and the token opens nothing any more.
    admin
        .delete(&format!(
            "/admin/v1/nodes/node-own/credentials/{credential_id}"
        ))
        .await?
        .expect(200)?;
    poll_until(
        "the revoked node's stream ended",
        200,
        Duration::from_millis(25),
        || async {
            Ok(node_entry(&cp, "node-own")
                .await?
                .filter(|n| n["connected"] == false && n["credentials"] == json!([])))
        },
    )
    .await?;
    let status = config_watch_first(channel(&cp.grpc_url()).await?, "node-own", &token)
        .await?
        .expect_err("a revoked credential read a snapshot");
    ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}");
    Ok(())
}

/// Rotation without downtime: a second credential is issued while the first
/// is in use, the node moves to it, the first is revoked; a third waits.
#[tokio::test]
async fn node_credentials_rotate_two_at_a_time() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let issue = || async {
        admin
            .post("/admin/v1/nodes", &json!({"node_id": "node-rot"}))
            .await
    };
    let first = issue().await?.expect(201)?;
    let second = issue().await?.expect(201)?;
    let refused = issue().await?.expect_error(400)?;
    ensure!(refused.contains("revoke one"), "{refused}");
    // Both open the stream (one at a time: the id is claimed while live).
    for (i, c) in [&first, &second].into_iter().enumerate() {
        let node_id = "node-rot";
        let token = c["token"].as_str().expect("token");
        let got = poll_until(
            "the stream of the previous check released",
            200,
            Duration::from_millis(25),
            || async {
                let answer =
                    config_watch_first(channel(&cp.grpc_url()).await?, node_id, token).await?;
                Ok(match answer {
                    Err(s) if s.code() == tonic::Code::AlreadyExists => None,
                    other => Some(other),
                })
            },
        )
        .await?;
        ensure!(got.is_ok(), "credential {i}: {got:?}");
    }
    let first_id = first["credential_id"].as_str().expect("id");
    admin
        .delete(&format!("/admin/v1/nodes/node-rot/credentials/{first_id}"))
        .await?
        .expect(200)?;
    issue().await?.expect(201)?;
    // Deleting the node revokes all; the events tell the story.
    admin
        .delete("/admin/v1/nodes/node-rot")
        .await?
        .expect(200)?;
    let types: Vec<String> = admin
        .events("resource=nodes&resource_id=node-rot")
        .await?
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect();
    ensure!(
        types
            == [
                "NodeCredentialIssued",
                "NodeCredentialIssued",
                "NodeCredentialRevoked",
                "NodeCredentialIssued",
                "NodeCredentialRevoked"
            ],
        "{types:?}"
    );
    let entry = node_entry(&cp, "node-rot")
        .await?
        .expect("seen on the stream");
    ensure!(entry["credentials"] == json!([]), "{entry}");
    Ok(())
}

//! A fleet: one control plane and three `aigw-data-plane` processes.
//!
//! - Config changes are enforced on every node fast: 100 changes (new model
//!   aliases and revoked api keys, alternately), each timed from the admin
//!   call to the moment all three nodes enforce it; p50/p99 are printed and
//!   p99 must stay under the design's 1 s.
//! - Nodes outlive the control plane: after `kill -9` they keep serving, a
//!   node restarted meanwhile boots from its snapshot cache, and all of them
//!   reconnect when the control plane comes back.

use aigw_tests::data_plane::{
    chat_body, control_plane_version, DataPlane, DataPlaneOptions, ProxyClient,
};
use aigw_tests::fixtures::{self, seed_azure, SEED_ALIAS, SEED_CALLER_KEY, SEED_DEPLOYMENT};
use aigw_tests::mock_azure::{MockAzure, DEFAULT_API_KEY};
use aigw_tests::process::free_addr;
use aigw_tests::{AdminClient, ControlPlane, Options};
use anyhow::{bail, ensure, Context, Result};
use futures::future::try_join_all;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const NODES: usize = 3;
/// Changes timed in the latency test.
const CHANGES: usize = 100;
/// How often a node is probed while waiting for a change.
const PROBE_EVERY: Duration = Duration::from_millis(2);
/// Longest a change may take to be enforced before the test gives up.
const PROBE_LIMIT: Duration = Duration::from_secs(10);
/// A caller key allowed every alias.
const FLEET_KEY: &str = "sk-fleet-all";

async fn start_nodes(cp: &ControlPlane) -> Result<Vec<DataPlane>> {
    try_join_all((1..=NODES).map(|i| {
        DataPlane::start_ready(DataPlaneOptions::for_control_plane(
            cp,
            &format!("node-{i}"),
        ))
    }))
    .await
}

/// Waits until `/admin/v1/nodes` lists exactly `nodes`, all connected, at
/// the control plane's current version, each with its proxy address.
async fn wait_nodes_in_sync(admin: &AdminClient, nodes: &[DataPlane]) -> Result<u64> {
    let version = control_plane_version(admin).await?;
    let mut last = Value::Null;
    // 20 s in all: reconnecting nodes back off for up to 5 s.
    for _ in 0..800 {
        let body = admin.get("/admin/v1/nodes").await?.expect(200)?;
        let list = body["list"].as_array().context("no list")?;
        ensure!(
            body["total"].as_u64() == Some(list.len() as u64),
            "total does not match the list: {body}"
        );
        let in_sync = list.len() == nodes.len()
            && nodes.iter().all(|dp| {
                list.iter().any(|n| {
                    n["node_id"] == dp.node_id()
                        && n["connected"] == true
                        && n["applied_version"].as_u64() == Some(version)
                        && n["address"] == dp.proxy_addr().to_string()
                })
            });
        if in_sync {
            return Ok(version);
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the nodes never all reported version {version}; last node list: {last}")
}

/// Probes `check` on one node until it returns true; the time it took.
async fn until_enforced<F, Fut>(started: Instant, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    loop {
        if check().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > PROBE_LIMIT {
            bail!("not enforced after {PROBE_LIMIT:?}");
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

#[tokio::test]
async fn config_changes_are_enforced_on_every_node_within_a_second() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let seeded = seed_azure(&admin, &mock.base_url(), DEFAULT_API_KEY).await?;
    admin
        .create_id("apikeys", &fixtures::api_key(FLEET_KEY, &["*"]))
        .await?;
    // Keys to revoke, one per revocation.
    let mut revocable = Vec::new();
    for i in 0..CHANGES / 2 {
        let key = format!("sk-revoke-{i}");
        let id = admin
            .create_id("apikeys", &fixtures::api_key(&key, &["*"]))
            .await?;
        revocable.push((key, id));
    }
    let nodes = start_nodes(&cp).await?;
    let version = wait_nodes_in_sync(&admin, &nodes).await?;
    ensure!(version as usize >= 4 + CHANGES / 2, "version {version}");
    let clients: Vec<ProxyClient> = nodes.iter().map(|dp| dp.client(Some(FLEET_KEY))).collect();
    for c in &clients {
        c.with_key(Some(SEED_CALLER_KEY))
            .chat(&chat_body(SEED_ALIAS, "hi"))
            .await?
            .expect(200)?;
    }

    let mut latencies = Vec::with_capacity(CHANGES);
    // How long the admin call itself took (append + fsync + answer).
    let mut admin_times = Vec::with_capacity(CHANGES);
    let mut per_node: Vec<Vec<Duration>> =
        (0..NODES).map(|_| Vec::with_capacity(CHANGES)).collect();
    for i in 0..CHANGES {
        let started;
        let took: Vec<Duration> = if i % 2 == 0 {
            // A new model alias: 404 before, 200 after.
            let alias = format!("alias-{i}");
            for c in &clients {
                let r = c.chat(&chat_body(&alias, "hi")).await?;
                ensure!(
                    r.status == 404,
                    "alias {alias} before creation: {}",
                    r.status
                );
            }
            started = Instant::now();
            admin
                .create_id(
                    "models",
                    &fixtures::model_on(&alias, SEED_DEPLOYMENT, &seeded.provider_key_id),
                )
                .await?;
            admin_times.push(started.elapsed());
            try_join_all(clients.iter().map(|c| {
                let body = chat_body(&alias, "hi");
                until_enforced(started, move || {
                    let (c, body) = (c.clone(), body.clone());
                    async move {
                        let r = c.chat(&body).await?;
                        match r.status.as_u16() {
                            404 => Ok(false),
                            200 => Ok(true),
                            s => bail!("unexpected {s} while waiting for a new alias: {}", r.text),
                        }
                    }
                })
            }))
            .await
            .with_context(|| format!("change {i}: new alias {alias}"))?
        } else {
            // Revoke a key: 200 before, 401 after.
            let (key, id) = &revocable[i / 2];
            let probes: Vec<ProxyClient> = clients.iter().map(|c| c.with_key(Some(key))).collect();
            for c in &probes {
                c.models().await?.expect(200)?;
            }
            let mut body = fixtures::api_key(key, &["*"]);
            body["disabled"] = json!(true);
            started = Instant::now();
            admin
                .put(&format!("{}/{id}", fixtures::APIKEYS), &body)
                .await?
                .expect(200)?;
            admin_times.push(started.elapsed());
            try_join_all(probes.iter().map(|c| {
                until_enforced(started, move || {
                    let c = c.clone();
                    async move {
                        let r = c.models().await?;
                        match r.status.as_u16() {
                            200 => Ok(false),
                            401 => Ok(true),
                            s => bail!("unexpected {s} while waiting for a revocation: {}", r.text),
                        }
                    }
                })
            }))
            .await
            .with_context(|| format!("change {i}: revoking {key}"))?
        };
        for (n, t) in took.iter().enumerate() {
            per_node[n].push(*t);
        }
        latencies.push(took.into_iter().max().expect("three nodes"));
    }

    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        *latencies.last().expect("latencies"),
    );
    let report = format!(
        "config change -> enforced on all {NODES} nodes, over {CHANGES} changes \
         (admin call included): p50 {p50:?}, p99 {p99:?}, max {max:?}, min {:?}",
        latencies[0]
    );
    admin_times.sort();
    let report = format!(
        "{report}\n  of which the admin call (event appended and flushed): p50 {:?}, p99 {:?}",
        percentile(&admin_times, 50.0),
        percentile(&admin_times, 99.0)
    );
    println!("{report}");
    eprintln!("{report}");
    for (n, mut l) in per_node.into_iter().enumerate() {
        l.sort();
        eprintln!(
            "  node-{}: p50 {:?}, p99 {:?}",
            n + 1,
            percentile(&l, 50.0),
            percentile(&l, 99.0)
        );
    }
    ensure!(
        p99 < Duration::from_secs(1),
        "p99 change-to-enforced latency {p99:?} exceeds the 1 s target ({report})"
    );

    // The node list agrees: every node acknowledged the newest version.
    let final_version = wait_nodes_in_sync(&admin, &nodes).await?;
    assert_eq!(final_version, version + CHANGES as u64);
    for dp in &nodes {
        assert_eq!(dp.readyz().await?, (200, Some(final_version)));
    }
    Ok(())
}

#[tokio::test]
async fn nodes_keep_serving_without_the_control_plane() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    // A fixed gRPC address, so the nodes find the control plane again after
    // its restart.
    let grpc = free_addr();
    let mut cp = ControlPlane::start_with(
        Options::default().with_config(json!({"control_plane": {"grpc_listen": grpc.to_string()}})),
    )
    .await?;
    let admin = cp.rest();
    seed_azure(&admin, &mock.base_url(), DEFAULT_API_KEY).await?;
    let mut nodes = start_nodes(&cp).await?;
    let version = wait_nodes_in_sync(&admin, &nodes).await?;
    for dp in &nodes {
        ensure!(
            dp.snapshot_cache().is_file(),
            "{} wrote no snapshot cache",
            dp.node_id()
        );
    }

    cp.kill9();
    ensure!(!cp.is_running(), "the control plane survived kill -9");

    // 200 calls spread over the nodes: not one error.
    let clients: Vec<ProxyClient> = nodes
        .iter()
        .map(|dp| dp.client(Some(SEED_CALLER_KEY)))
        .collect();
    let before = mock.requests(SEED_DEPLOYMENT);
    let mut failures = Vec::new();
    for i in 0..200 {
        let r = clients[i % NODES]
            .chat(&chat_body(SEED_ALIAS, &format!("call {i}")))
            .await?;
        if r.status != 200 || r.json().map(|v| v["model"] == SEED_ALIAS).ok() != Some(true) {
            failures.push(format!(
                "call {i} on node-{}: {} {}",
                i % NODES + 1,
                r.status,
                r.text
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of 200 calls failed without the control plane: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(mock.requests(SEED_DEPLOYMENT) - before, 200);
    for dp in &nodes {
        assert_eq!(dp.readyz().await?, (200, Some(version)), "{}", dp.node_id());
    }

    // A node restarted while the control plane is down boots from its cache.
    nodes[0].restart().await?;
    let booted = nodes[0].wait_ready().await?;
    assert_eq!(booted, version, "node-1 should boot at the cached version");
    assert_eq!(nodes[0].readyz().await?, (200, Some(version)));
    let r = nodes[0]
        .client(Some(SEED_CALLER_KEY))
        .chat(&chat_body(SEED_ALIAS, "after restart"))
        .await?;
    assert_eq!(r.expect(200)?["model"], SEED_ALIAS);
    let r = nodes[0]
        .client(Some("sk-unknown"))
        .chat(&chat_body(SEED_ALIAS, "after restart"))
        .await?;
    assert_eq!(r.status, 401, "the cached snapshot still authenticates");

    // The control plane comes back on the same gRPC address: every node
    // reconnects, at the same version.
    cp.restart().await?;
    let admin = cp.rest();
    let again = wait_nodes_in_sync(&admin, &nodes).await?;
    assert_eq!(again, version, "a replayed control plane keeps its version");

    // ... and follows new changes again.
    let pk = admin.list("provider_keys").await?[0]["id"]
        .as_str()
        .context("provider key id")?
        .to_string();
    admin
        .create_id(
            "models",
            &fixtures::model_on("after-restart", SEED_DEPLOYMENT, &pk),
        )
        .await?;
    admin
        .create_id("apikeys", &fixtures::api_key(FLEET_KEY, &["*"]))
        .await?;
    let newest = wait_nodes_in_sync(&admin, &nodes).await?;
    assert_eq!(newest, version + 2);
    for dp in &nodes {
        dp.wait_version(newest).await?;
        dp.client(Some(FLEET_KEY))
            .chat(&chat_body("after-restart", "hi"))
            .await?
            .expect(200)?;
    }
    Ok(())
}

/// Where `node` is connected, from each control plane's node list.
async fn connected_to(admins: &[&AdminClient], node: &str) -> Result<Vec<bool>> {
    let mut out = Vec::new();
    for admin in admins {
        let body = admin.get("/admin/v1/nodes").await?.expect(200)?;
        out.push(body["list"].as_array().is_some_and(|l| {
            l.iter()
                .any(|n| n["node_id"] == node && n["connected"] == true)
        }));
    }
    Ok(out)
}

/// The node's whole stdout log (`logs()` is only its tail).
fn full_log(dp: &DataPlane) -> String {
    dp.process().map(|p| p.stdout()).unwrap_or_default()
}

/// Polls the node's log until it holds `needle`.
async fn wait_log(dp: &DataPlane, needle: &str) -> Result<()> {
    for _ in 0..400 {
        if full_log(dp).contains(needle) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the node never logged {needle:?}:\n{}", dp.logs())
}

fn applies(dp: &DataPlane) -> usize {
    full_log(dp).matches("applied config snapshot").count()
}

/// `data_plane.control_plane_urls`: a node whose control plane dies moves to
/// another within 2 s, serving throughout; it does not re-apply the version
/// it has, and holds back a snapshot older than its own (a replica still
/// catching up) instead of going back in time.
#[tokio::test]
async fn a_node_fails_over_between_control_plane_replicas() -> Result<()> {
    let mock = MockAzure::start().await;
    mock.add_deployment(SEED_DEPLOYMENT, "gpt-4o-2024-08-06");
    let token = aigw_tests::control_plane::random_token("node");
    let grpc = [free_addr(), free_addr()];
    let mut cps = Vec::new();
    for addr in grpc {
        let mut opts = Options::default()
            .with_config(json!({"control_plane": {"grpc_listen": addr.to_string()}}));
        opts.node_token = Some(token.clone());
        let cp = ControlPlane::start_with(opts).await?;
        // The same three writes on each: both at the same version.
        seed_azure(&cp.rest(), &mock.base_url(), DEFAULT_API_KEY).await?;
        cps.push(cp);
    }
    let version = control_plane_version(&cps[0].rest()).await?;
    assert_eq!(control_plane_version(&cps[1].rest()).await?, version);

    let mut opts = DataPlaneOptions::for_control_plane(&cps[0], "node-ha");
    opts.control_plane_urls = cps.iter().map(ControlPlane::grpc_url).collect();
    let dp = DataPlane::start_ready(opts).await?;
    assert_eq!(dp.wait_version(version).await?, version);
    let admins = [cps[0].rest(), cps[1].rest()];
    let admin_refs = [&admins[0], &admins[1]];
    let mut on = Vec::new();
    for _ in 0..400 {
        on = connected_to(&admin_refs, "node-ha").await?;
        if on.iter().filter(|c| **c).count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let primary = on
        .iter()
        .position(|c| *c)
        .context("the node is connected to neither control plane")?;
    let other = 1 - primary;
    assert_eq!(applies(&dp), 1, "{}", dp.logs());

    // Calls keep flowing while the primary dies.
    let client = dp.client(Some(SEED_CALLER_KEY));
    let calls = tokio::spawn(async move {
        let mut failed = Vec::new();
        for i in 0..300 {
            match client
                .chat(&chat_body(SEED_ALIAS, &format!("ha {i}")))
                .await
            {
                Ok(r) if r.status == 200 => {}
                Ok(r) => failed.push(format!("{} {}", r.status, r.text)),
                Err(e) => failed.push(e.to_string()),
            }
        }
        failed
    });

    let killed = Instant::now();
    cps[primary].kill9();
    let took = loop {
        if connected_to(&[admin_refs[other]], "node-ha").await?[0] {
            break killed.elapsed();
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(10),
            "the node never reached the other control plane:\n{}",
            dp.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("failover to the other control plane took {took:?}");
    ensure!(took < Duration::from_secs(2), "failover took {took:?}");
    // Same version there: not sent again, so not applied again (the count
    // after the next change proves it).
    assert_eq!(dp.readyz().await?, (200, Some(version)));
    let failed = calls.await?;
    ensure!(
        failed.is_empty(),
        "calls failed during the failover: {failed:?}"
    );

    // A change on the survivor reaches the node.
    let pk = admins[other].list("provider_keys").await?[0]["id"]
        .as_str()
        .context("provider key id")?
        .to_string();
    admins[other]
        .create_id(
            "models",
            &fixtures::model_on("ha-new", SEED_DEPLOYMENT, &pk),
        )
        .await?;
    assert_eq!(dp.wait_version(version + 1).await?, version + 1);
    assert_eq!(
        applies(&dp),
        2,
        "only the new version was applied:\n{}",
        dp.logs()
    );

    // The old primary comes back behind the node (at `version`), the
    // survivor dies: the node holds its newer snapshot rather than going
    // back, then takes the next version the old primary reaches.
    cps[primary].restart().await?;
    cps[other].kill9();
    wait_log(&dp, "the control plane is behind this node").await?;
    assert_eq!(dp.readyz().await?, (200, Some(version + 1)));
    let admin = cps[primary].rest();
    let pk = admin.list("provider_keys").await?[0]["id"]
        .as_str()
        .context("provider key id")?
        .to_string();
    admin
        .create_id("models", &fixtures::model_on("ha-a", SEED_DEPLOYMENT, &pk))
        .await?;
    admin
        .create_id("models", &fixtures::model_on("ha-b", SEED_DEPLOYMENT, &pk))
        .await?;
    assert_eq!(dp.wait_version(version + 2).await?, version + 2);
    dp.client(Some(SEED_CALLER_KEY))
        .chat(&chat_body(SEED_ALIAS, "after"))
        .await?
        .expect(200)?;
    Ok(())
}

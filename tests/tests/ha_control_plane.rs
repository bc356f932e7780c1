//! A highly available control plane (#22): three replicas over one event log
//! of record in a 3-node NATS JetStream cluster (R3) started by the test.
//! Admin writes go to any replica while one replica is killed with -9 and
//! later one NATS server: every acknowledged write is in the log exactly
//! once, gapless; every replica reaches the same state; the data planes keep
//! serving. Usage is counted exactly once on every replica.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, DataPlane, DataPlaneOptions, ProxyClient};
use aigw_tests::fixtures::{api_key, model_on, provider_key_at};
use aigw_tests::mock_azure::{expected_usage, MockAzure};
use aigw_tests::nats::NatsCluster;
use aigw_tests::process::poll_until;
use aigw_tests::usage::{assert_totals, wait_budget_refused, Totals};
use aigw_tests::{sha256_hex, AdminClient};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ALIAS: &str = "gpt-4o-azure";
const CALLER: &str = "sk-ha-caller";
const REPLICAS: usize = 3;
/// USD per 1k tokens: exact in nano-USD.
const IN_PER_1K: f64 = 0.5;
const OUT_PER_1K: f64 = 1.5;

struct Ha {
    mock: MockAzure,
    nats: NatsCluster,
    cps: Vec<ControlPlane>,
}

/// Options of replica `i`: the same admin key, master key and node token
/// for all (replicas apply each other's sealed events).
fn replica(base: &Options, urls: &str, i: usize) -> Options {
    base.clone().with_config(json!({
        "nats": {"url": urls},
        "control_plane": {
            // Snapshots while the test runs, so restarts start from one.
            "snapshot_every": 250,
            "replication": {"stream": "AIGW_EVENTS", "replicas": REPLICAS, "replica_id": format!("cp-{i}")},
        },
    }))
}

async fn ha() -> Result<Ha> {
    let mock = MockAzure::start().await;
    mock.add_deployment("gpt4o-prod", "gpt-4o-mini-2024-07-18");
    let nats = NatsCluster::start(3).await?;
    let base = Options::default();
    let mut cps = Vec::new();
    for i in 0..REPLICAS {
        cps.push(ControlPlane::start_with(replica(&base, &nats.urls(), i)).await?);
    }
    // Written on one replica, read on another.
    let admin = cps[0].rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &provider_key_at("azure-prod", "test-azure-key", &mock.base_url()),
        )
        .await?;
    let mut m = model_on(ALIAS, "gpt4o-prod", &pk);
    m["cost"] = json!({"input_per_1k": IN_PER_1K, "output_per_1k": OUT_PER_1K});
    admin.create("models", &m).await?;
    let created = admin
        .post("/admin/v1/apikeys", &api_key(CALLER, &[ALIAS]))
        .await?;
    created.expect(201)?;
    let seq: u64 = created
        .header("x-aigw-seq")
        .context("a write answers with X-Aigw-Seq")?
        .parse()?;
    let other = cps[2]
        .rest()
        .request(reqwest::Method::GET, "/admin/v1/apikeys")
        .header("x-aigw-min-seq", seq.to_string());
    let listed = AdminClient::send(other).await?.expect(200)?;
    ensure!(
        listed["total"] == 1,
        "replica 2 reads its peer's write: {listed}"
    );
    Ok(Ha { mock, nats, cps })
}

/// A node following `cps` (failing over in that order), publishing usage
/// to the cluster.
async fn node(cps: &[&ControlPlane], id: &str, urls: &str) -> Result<DataPlane> {
    let mut opts =
        DataPlaneOptions::for_control_plane(cps[0], id).with_config(json!({"nats": {"url": urls}}));
    opts.control_plane_urls = cps.iter().map(|cp| cp.grpc_url()).collect();
    DataPlane::start_ready(opts).await
}

/// The sequence a replica's answers reflect.
async fn seq_of(admin: &AdminClient) -> Result<u64> {
    let r = admin.get("/admin/v1/models").await?;
    r.expect(200)?;
    Ok(r.header("x-aigw-seq").context("X-Aigw-Seq")?.parse()?)
}

/// A hash of a replica's projection at `seq` (every collection as listed,
/// revisions included) and its event log, checked gapless.
async fn projection(admin: &AdminClient, seq: u64) -> Result<(String, Vec<Value>)> {
    let mut text = String::new();
    for c in ["provider_keys", "models", "apikeys", "jwt_providers"] {
        let rb = admin
            .request(reqwest::Method::GET, &format!("/admin/v1/{c}"))
            .header("x-aigw-min-seq", seq.to_string());
        let r = AdminClient::send(rb).await?;
        let v = r.expect(200)?;
        ensure!(
            r.header("x-aigw-seq") == Some(&seq.to_string()),
            "{c} read at {:?}, wanted {seq}",
            r.header("x-aigw-seq")
        );
        text.push_str(&v.to_string());
    }
    let events = admin.all_events().await?;
    for (i, e) in events.iter().enumerate() {
        ensure!(
            e["seq"].as_u64() == Some(i as u64 + 1),
            "the log has a gap at {i}: {e}"
        );
    }
    ensure!(
        events.len() as u64 == seq,
        "{} events, seq {seq}",
        events.len()
    );
    Ok((sha256_hex(&text), events))
}

#[derive(Default)]
struct WriteStats {
    /// Acknowledged creates: id → key hash.
    acked: Mutex<HashMap<String, String>>,
    /// Key hashes whose create had an unknown outcome and then existed.
    unacked: Mutex<Vec<String>>,
    count: AtomicUsize,
    /// Longest time one mutation took from first try to acknowledgement (ms).
    longest_ms: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

/// Writer `w`: `n` creates spread over the replicas, each retried on the
/// next live replica until acknowledged.
async fn writer(
    w: usize,
    n: usize,
    admins: Vec<AdminClient>,
    alive: Arc<Vec<AtomicBool>>,
    stats: Arc<WriteStats>,
) -> Result<()> {
    for j in 0..n {
        let caller = format!("sk-w{w}-{j}");
        let body = api_key(&caller, &[ALIAS]);
        let started = Instant::now();
        let mut uncertain = false;
        let mut attempt = 0usize;
        let mut last: String;
        loop {
            let i = (w + j + attempt) % admins.len();
            attempt += 1;
            if !alive[i].load(Ordering::Acquire) {
                continue;
            }
            let t = Instant::now();
            match admins[i].post("/admin/v1/apikeys", &body).await {
                Ok(r) if r.status.as_u16() == 201 => {
                    let id = r.json()?["id"].as_str().context("created id")?.to_string();
                    stats
                        .latencies_us
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_micros() as u64);
                    stats.acked.lock().unwrap().insert(id, sha256_hex(&caller));
                    break;
                }
                Ok(r) if r.status.as_u16() == 409 && uncertain => {
                    // An earlier try landed but its answer was lost.
                    stats.unacked.lock().unwrap().push(sha256_hex(&caller));
                    break;
                }
                Ok(r) if r.status.is_server_error() => {
                    uncertain = true;
                    last = format!("replica {i}: {} {}", r.status, r.text);
                }
                Ok(r) => bail!("writer {w} create {j}: {} {}", r.status, r.text),
                Err(e) => {
                    uncertain = true;
                    last = format!("replica {i}: {e:#}");
                }
            }
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "writer {w} create {j} not acknowledged within 60 s (last: {last})"
            );
            // Backoff before the next replica, not synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ms = started.elapsed().as_millis() as u64;
        stats.longest_ms.fetch_max(ms, Ordering::Relaxed);
        stats.count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Calls through `client` until `stop`; returns (ok, failed).
async fn proxy_load(client: ProxyClient, stop: Arc<AtomicBool>) -> (u64, u64, Vec<String>) {
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    let mut i = 0u64;
    // Paced (50 calls/s per node): a steady stream of calls, not a load
    // test that starves the writers on a small machine.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        i += 1;
        match client.chat(&chat_body(ALIAS, &format!("call {i}"))).await {
            Ok(r) if r.status.as_u16() == 200 => ok += 1,
            Ok(r) => {
                failed += 1;
                errors.push(format!("{} {}", r.status, r.text));
            }
            Err(e) => {
                failed += 1;
                errors.push(e.to_string());
            }
        }
    }
    (ok, failed, errors)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_any_replica_survive_a_replica_and_a_nats_server_dying() -> Result<()> {
    const WRITERS: usize = 8;
    const MUTATIONS: usize = 2_000;
    let started = Instant::now();
    let Ha {
        mock: _mock,
        mut nats,
        mut cps,
    } = ha().await?;
    let urls = nats.urls();
    // node-0 starts on the replica that dies and fails over.
    let dps = vec![
        node(&[&cps[0], &cps[1], &cps[2]], "node-0", &urls).await?,
        node(&[&cps[1], &cps[2], &cps[0]], "node-1", &urls).await?,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = dps
        .iter()
        .map(|dp| tokio::spawn(proxy_load(dp.client(Some(CALLER)), stop.clone())))
        .collect();

    let admins: Vec<AdminClient> = cps.iter().map(ControlPlane::rest).collect();
    let alive = Arc::new(
        (0..REPLICAS)
            .map(|_| AtomicBool::new(true))
            .collect::<Vec<_>>(),
    );
    let stats = Arc::new(WriteStats::default());
    let failed_writer = Arc::new(Mutex::new(None::<String>));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (admins, alive, stats, failed) = (
                admins.clone(),
                alive.clone(),
                stats.clone(),
                failed_writer.clone(),
            );
            tokio::spawn(async move {
                let r = writer(w, MUTATIONS / WRITERS, admins, alive, stats).await;
                if let Err(e) = &r {
                    *failed.lock().unwrap() = Some(format!("{e:#}"));
                }
                r
            })
        })
        .collect();

    // A replica dies a quarter of the way in, a NATS server at two thirds.
    let reached = |n: usize| {
        let (stats, failed) = (stats.clone(), failed_writer.clone());
        async move {
            poll_until(
                "writes to progress",
                6000,
                Duration::from_millis(20),
                || {
                    let (stats, failed) = (stats.clone(), failed.clone());
                    async move {
                        if let Some(e) = failed.lock().unwrap().clone() {
                            bail!("a writer failed: {e}");
                        }
                        Ok((stats.count.load(Ordering::Relaxed) >= n).then_some(()))
                    }
                },
            )
            .await
        }
    };
    reached(MUTATIONS / 4).await?;
    alive[0].store(false, Ordering::Release);
    cps[0].kill9();
    eprintln!(
        "killed replica cp-0 after {} writes",
        stats.count.load(Ordering::Relaxed)
    );
    reached(MUTATIONS * 2 / 3).await?;
    nats.kill(1);
    eprintln!(
        "killed NATS server n1 after {} writes",
        stats.count.load(Ordering::Relaxed)
    );
    for w in writers {
        w.await??;
    }
    let write_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let mut calls = 0;
    for l in loads {
        let (ok, failed, errors) = l.await?;
        ensure!(
            failed == 0,
            "{failed} failed proxy calls: {:?}",
            &errors[..errors.len().min(5)]
        );
        calls += ok;
    }

    // Every surviving replica reaches the same state.
    let survivors = [&admins[1], &admins[2]];
    let mut version = 0;
    for a in survivors {
        version = version.max(seq_of(a).await?);
    }
    let (hash, events) = projection(&admins[1], version).await?;
    let (hash2, events2) = projection(&admins[2], version).await?;
    ensure!(hash == hash2, "replicas 1 and 2 differ at seq {version}");
    ensure!(events == events2, "the replicas' logs differ");

    // Every acknowledged write is in the log exactly once.
    let mut created: BTreeMap<String, usize> = BTreeMap::new();
    let mut hashes: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        if e["type"] == "ApiKeyCreated" {
            *created
                .entry(e["resource_id"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
            *hashes
                .entry(
                    e["payload"]["value"]["key_hash"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
                .or_default() += 1;
        }
    }
    let acked = stats.acked.lock().unwrap().clone();
    ensure!(acked.len() + stats.unacked.lock().unwrap().len() == MUTATIONS);
    for (id, key_hash) in &acked {
        ensure!(
            created.get(id) == Some(&1),
            "acknowledged {id} is in the log {:?} times",
            created.get(id)
        );
        ensure!(
            hashes.get(key_hash) == Some(&1),
            "key {key_hash} created {:?} times",
            hashes.get(key_hash)
        );
    }
    ensure!(hashes.values().all(|n| *n == 1), "a key was created twice");

    // Any replica lists every node, wherever its config stream is.
    for a in survivors {
        poll_until(
            "every node on every replica",
            100,
            Duration::from_millis(100),
            || async {
                let v = a.get("/admin/v1/nodes").await?.expect(200)?;
                let connected = v["list"]
                    .as_array()
                    .map(|l| l.iter().filter(|n| n["connected"] == true).count())
                    .unwrap_or(0);
                Ok((connected == 2).then_some(()))
            },
        )
        .await?;
    }

    // The killed replica comes back from its sled copy and the stream's tail.
    cps[0].restart().await?;
    let (hash0, events0) = projection(&cps[0].rest(), version).await?;
    ensure!(
        hash0 == hash && events0 == events,
        "the restarted replica differs"
    );

    // The nodes applied the final version.
    for dp in &dps {
        dp.wait_version(version).await?;
    }

    let mut lat = stats.latencies_us.lock().unwrap().clone();
    lat.sort_unstable();
    eprintln!(
        "HA fleet: {MUTATIONS} writes by {WRITERS} writers in {write_secs:.1} s ({:.0}/s), seq {version}, \
         {} unacknowledged-but-landed; one write p50 {} µs, p99 {} µs; longest write stall {} ms; \
         {calls} proxy calls, 0 failed; test {:.1} s",
        MUTATIONS as f64 / write_secs,
        stats.unacked.lock().unwrap().len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        stats.longest_ms.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn nanos(prompt: u64, completion: u64) -> u64 {
    prompt * (IN_PER_1K * 1e6) as u64 + completion * (OUT_PER_1K * 1e6) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_is_exact_on_every_replica_across_a_replica_restart() -> Result<()> {
    use futures::StreamExt;
    const CALLS: usize = 10_000;
    let started = Instant::now();
    let Ha {
        mock: _mock,
        nats,
        mut cps,
    } = ha().await?;
    let urls = nats.urls();
    // node-0 starts on the replica that is killed and restarted.
    let dps = [
        node(&[&cps[1], &cps[0], &cps[2]], "node-0", &urls).await?,
        node(&[&cps[2], &cps[0], &cps[1]], "node-1", &urls).await?,
    ];
    let clients: Vec<ProxyClient> = dps.iter().map(|d| d.client(Some(CALLER))).collect();
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let done = done.clone();
        tokio::spawn(async move {
            let results: Vec<Result<Totals>> = futures::stream::iter(0..CALLS)
                .map(|i| {
                    let client = clients[i % clients.len()].clone();
                    let done = done.clone();
                    async move {
                        let body = chat_body(ALIAS, &"word ".repeat(1 + i % 37));
                        let r = client.chat(&body).await?;
                        ensure!(
                            r.status.as_u16() == 200,
                            "call {i}: {} {}",
                            r.status,
                            r.text
                        );
                        done.fetch_add(1, Ordering::Relaxed);
                        let (prompt, completion) = expected_usage(&body);
                        Ok(Totals {
                            requests: 1,
                            errors: 0,
                            prompt,
                            completion,
                            cost_nanos: nanos(prompt, completion),
                        })
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let mut t = Totals::default();
            for r in results {
                t += r?;
            }
            Ok::<_, anyhow::Error>(t)
        })
    };
    let reached = |n: usize| {
        let done = done.clone();
        async move {
            poll_until("calls to progress", 6000, Duration::from_millis(20), || {
                let done = done.clone();
                async move { Ok((done.load(Ordering::Relaxed) >= n).then_some(())) }
            })
            .await
        }
    };
    reached(CALLS / 4).await?;
    cps[1].kill9();
    eprintln!(
        "killed replica cp-1 after {} calls",
        done.load(Ordering::Relaxed)
    );
    reached(CALLS / 2).await?;
    cps[1].restart().await?;
    eprintln!(
        "restarted replica cp-1 after {} calls",
        done.load(Ordering::Relaxed)
    );
    let expected = load.await??;
    let call_secs = started.elapsed().as_secs_f64();
    for cp in &cps {
        assert_totals(&cp.rest(), expected, 600).await?;
    }
    eprintln!(
        "HA usage: {CALLS} calls, totals exact on {} replicas ({expected:?}); test {:.1} s (calls done at {call_secs:.1} s)",
        cps.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Turning replication on: a control plane with a sled history and an empty
/// stream publishes its history; a new replica catches up from the stream;
/// one whose sled copy holds another history refuses to start, in one line.
#[tokio::test]
async fn an_existing_log_migrates_and_a_disagreeing_copy_is_refused() -> Result<()> {
    use aigw_tests::fixtures::provider_key;
    use aigw_tests::nats::NatsServer;
    let nats = NatsServer::start().await?;
    let base = Options::default();
    let replicated = |id: &str| {
        json!({
            "nats": {"url": nats.url()},
            "control_plane": {"replication": {"replicas": 1, "replica_id": id}},
        })
    };

    // Sled only first, with a history.
    let mut a = ControlPlane::start_with(base.clone()).await?;
    let pk = a
        .rest()
        .create_id("provider_keys", &provider_key("azure-a", "secret-a"))
        .await?;
    for i in 0..5 {
        a.rest()
            .create("models", &model_on(&format!("m{i}"), "d", &pk))
            .await?;
    }
    let version = seq_of(&a.rest()).await?;
    let (hash, events) = projection(&a.rest(), version).await?;

    // The same data dir with replication: the history goes to the stream.
    aigw_tests::control_plane::merge(&mut a.options_mut().config, replicated("a"));
    a.restart().await?;
    ensure!(projection(&a.rest(), version).await? == (hash.clone(), events.clone()));

    // A new replica starts from the stream alone.
    let b = ControlPlane::start_with(base.clone().with_config(replicated("b"))).await?;
    ensure!(
        projection(&b.rest(), version).await? == (hash.clone(), events.clone()),
        "the new replica differs"
    );
    // And writes through it are read on the first.
    let id = b
        .rest()
        .create_id("models", &model_on("from-b", "d", &pk))
        .await?;
    let rb = a
        .rest()
        .request(reqwest::Method::GET, &format!("/admin/v1/models/{id}"))
        .header("x-aigw-min-seq", (version + 1).to_string());
    AdminClient::send(rb).await?.expect(200)?;

    // Another history in sled (same master key): refused against this stream.
    let mut c = ControlPlane::start_with(base.clone()).await?;
    c.rest()
        .create_id("provider_keys", &provider_key("azure-c", "secret-c"))
        .await?;
    aigw_tests::control_plane::merge(&mut c.options_mut().config, replicated("c"));
    let refused = c.restart().await;
    ensure!(refused.is_err(), "a disagreeing replica started");
    let stderr = c.stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("aigw-control-plane:"))
        .collect();
    ensure!(
        lines.len() == 1 && lines[0].contains("disagrees") && lines[0].contains("seq 1"),
        "expected one line naming the first differing seq: {stderr}"
    );
    Ok(())
}

/// Budgets with replicas: every replica aggregates every usage event, so a
/// crossed budget is refused on every node within 2 s while a replica (the
/// one a node was on) is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crossed_budget_is_refused_on_every_node_with_a_replica_down() -> Result<()> {
    const BUDGETED: &str = "sk-ha-budgeted";
    let Ha {
        mock: _mock,
        nats,
        mut cps,
    } = ha().await?;
    let urls = nats.urls();
    // $0.01 a day, written on replica 1: one call crosses it.
    let mut k = api_key(BUDGETED, &[ALIAS]);
    k["budget"] = json!({"max_usd": 0.01, "period": "day"});
    let created = cps[1].rest().post("/admin/v1/apikeys", &k).await?;
    created.expect(201)?;
    let seq: u64 = created
        .header("x-aigw-seq")
        .context("a write answers with X-Aigw-Seq")?
        .parse()?;
    let dps = [
        node(&[&cps[0], &cps[1], &cps[2]], "node-0", &urls).await?,
        node(&[&cps[2], &cps[1], &cps[0]], "node-1", &urls).await?,
    ];
    for d in &dps {
        d.wait_version(seq).await?;
    }
    // node-0's replica dies; node-0 moves on to cp-1.
    cps[0].kill9();
    let clients: Vec<ProxyClient> = dps.iter().map(|d| d.client(Some(BUDGETED))).collect();
    let mut spent = 0u64;
    let mut i = 0usize;
    let crossed = loop {
        let body = chat_body(ALIAS, &"word ".repeat(1 + i % 37));
        let r = clients[i % clients.len()].chat(&body).await?;
        ensure!(
            r.status.as_u16() == 200,
            "call {i} before the budget: {} {}",
            r.status,
            r.text
        );
        let (prompt, completion) = expected_usage(&body);
        spent += nanos(prompt, completion);
        i += 1;
        if spent >= 10_000_000 {
            break Instant::now();
        }
    };
    wait_budget_refused(&clients, ALIAS).await?;
    let took = crossed.elapsed();
    eprintln!("budget refused on both nodes {took:?} after {i} calls crossed it, cp-0 down");
    ensure!(
        took < Duration::from_secs(2),
        "budget enforced on all nodes after {took:?}"
    );
    Ok(())
}

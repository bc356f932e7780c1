//! Crash durability: every acknowledged write survives `kill -9` and a
//! restart on the same data dir, with the log gapless and the state identical.

use aigw_tests::fixtures::{self, APIKEYS, MODELS, PROVIDER_KEYS};
use aigw_tests::rest::assert_gapless;
use aigw_tests::{AdminClient, ControlPlane, Options};
use anyhow::{ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Collections whose lists must survive a crash unchanged.
const COLLECTIONS: [&str; 3] = ["provider_keys", "models", "apikeys"];

async fn lists(admin: &AdminClient) -> Result<Vec<Vec<Value>>> {
    let mut out = Vec::new();
    for c in COLLECTIONS {
        out.push(admin.list(c).await?);
    }
    Ok(out)
}

/// Drives `n` acknowledged, mixed writes (creates, full replaces, deletes
/// across all three collections) and returns how many were acknowledged.
async fn burst(admin: &AdminClient, n: usize, seed: u64) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pks: Vec<String> = Vec::new();
    // (model id, provider key id)
    let mut models: Vec<(String, String)> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut acked = 0u64;
    for i in 0..n {
        let roll = rng.gen_range(0..100);
        let resp = if pks.is_empty() || roll < 12 {
            let r = admin
                .post(
                    PROVIDER_KEYS,
                    &fixtures::provider_key(&format!("pk-{seed}-{i}"), &format!("sk-{i}")),
                )
                .await?;
            if r.status == 201 {
                pks.push(r.json()?["id"].as_str().context("id")?.to_string());
            }
            r
        } else if roll < 22 {
            let pk = &pks[rng.gen_range(0..pks.len())];
            let body = fixtures::provider_key(
                &format!("pk-{seed}-{i}-renamed"),
                &format!("sk-rotated-{i}"),
            );
            admin.put(&format!("{PROVIDER_KEYS}/{pk}"), &body).await?
        } else if roll < 37 {
            let pk = pks[rng.gen_range(0..pks.len())].clone();
            let r = admin
                .post(MODELS, &fixtures::model(&format!("m-{seed}-{i}"), &pk))
                .await?;
            if r.status == 201 {
                models.push((r.json()?["id"].as_str().context("id")?.to_string(), pk));
            }
            r
        } else if roll < 45 && !models.is_empty() {
            let idx = rng.gen_range(0..models.len());
            let pk = pks[rng.gen_range(0..pks.len())].clone();
            let mut body = fixtures::model(&format!("m-{seed}-{i}-moved"), &pk);
            body["cost"] = json!({"input_per_1k": 0.005, "output_per_1k": 0.015});
            let r = admin
                .put(&format!("{MODELS}/{}", models[idx].0), &body)
                .await?;
            models[idx].1 = pk;
            r
        } else if roll < 50 && !models.is_empty() {
            let (id, _) = models.swap_remove(rng.gen_range(0..models.len()));
            admin.delete(&format!("{MODELS}/{id}")).await?
        } else if roll < 53 && pks.len() > 1 {
            // Delete a provider key no model uses, if there is one.
            match pks
                .iter()
                .position(|p| !models.iter().any(|(_, used)| used == p))
            {
                Some(idx) => {
                    let id = pks.swap_remove(idx);
                    admin.delete(&format!("{PROVIDER_KEYS}/{id}")).await?
                }
                None => {
                    let r = admin
                        .post(
                            APIKEYS,
                            &fixtures::api_key(&format!("sk-{seed}-{i}"), &["*"]),
                        )
                        .await?;
                    if r.status == 201 {
                        keys.push(r.json()?["id"].as_str().context("id")?.to_string());
                    }
                    r
                }
            }
        } else if roll < 70 || keys.is_empty() {
            let r = admin
                .post(
                    APIKEYS,
                    &fixtures::api_key(&format!("sk-{seed}-{i}"), &["*"]),
                )
                .await?;
            if r.status == 201 {
                keys.push(r.json()?["id"].as_str().context("id")?.to_string());
            }
            r
        } else if roll < 90 {
            let id = &keys[rng.gen_range(0..keys.len())];
            let mut body = fixtures::api_key(&format!("sk-{seed}-{i}-rotated"), &["gpt-4o-azure"]);
            body["rate_limit"] = json!({"rpm": 60 + i, "tpm": 100_000});
            body["budget"] = json!({"max_usd": 12.5, "period": "day"});
            body["expires_at"] = json!("2030-01-02T03:04:05Z");
            admin.put(&format!("{APIKEYS}/{id}"), &body).await?
        } else {
            let id = keys.swap_remove(rng.gen_range(0..keys.len()));
            admin.delete(&format!("{APIKEYS}/{id}")).await?
        };
        ensure!(
            resp.status.is_success(),
            "write #{i} was not acknowledged: {} {}",
            resp.status,
            resp.text
        );
        acked += 1;
    }
    Ok(acked)
}

async fn crash_and_compare(mut cp: ControlPlane, writes: usize, seed: u64) -> Result<()> {
    let admin = cp.rest();
    let mut acked = burst(&admin, writes - 1, seed).await?;
    let mut before = lists(&admin).await?;
    let events_before = admin.all_events().await?;
    assert_gapless(&events_before, acked)?;

    // The last write; its answer says what it stored. SIGKILL the moment it
    // is acknowledged: no graceful shutdown, no time for a background flush.
    let last = admin
        .create(
            "apikeys",
            &fixtures::api_key(&format!("sk-last-{seed}"), &["*"]),
        )
        .await?;
    cp.kill9();
    acked += 1;
    assert_eq!(acked, writes as u64);
    before[2].push(last.clone());
    let by_id = |a: &Value, b: &Value| a["id"].as_str().cmp(&b["id"].as_str());
    before[2].sort_by(by_id);
    ensure!(
        before.iter().map(Vec::len).sum::<usize>() > 1,
        "the burst should leave resources behind"
    );

    cp.restart().await?;
    let admin = cp.rest();

    let events_after = admin.all_events().await?;
    assert_gapless(&events_after, acked)
        .context("acknowledged events lost or duplicated by the crash")?;
    assert_eq!(
        events_after[..events_before.len()],
        events_before[..],
        "the event log changed across the crash"
    );
    let tail = &events_after[events_before.len()];
    assert_eq!(tail["type"], "ApiKeyCreated");
    assert_eq!(tail["resource_id"], last["id"]);
    let mut after = lists(&admin).await?;
    after[2].sort_by(by_id);
    for (c, (b, a)) in COLLECTIONS.iter().zip(before.iter().zip(&after)) {
        assert_eq!(a, b, "{c} differ after kill -9 and restart");
    }

    // The restarted process keeps numbering and keeps enforcing uniqueness.
    let taken = before[0][0]["value"]["display_name"]
        .as_str()
        .context("name")?
        .to_string();
    admin
        .post(PROVIDER_KEYS, &fixtures::provider_key(&taken, "sk"))
        .await?
        .expect_error(409)?;
    admin
        .create(
            "provider_keys",
            &fixtures::provider_key("after-restart", "sk"),
        )
        .await?;
    let tail = admin.events(&format!("from_seq={}", acked + 1)).await?;
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0]["seq"].as_u64(), Some(acked + 1));
    Ok(())
}

#[tokio::test]
async fn kill9_after_300_acknowledged_writes_loses_nothing() -> Result<()> {
    let cp = ControlPlane::start().await?;
    crash_and_compare(cp, 300, 7).await
}

#[tokio::test]
async fn kill9_with_compacted_snapshots_replays_snapshot_plus_tail() -> Result<()> {
    // A snapshot every 37 events: the restart loads the newest snapshot and
    // replays the events after it.
    let opts = Options::default().with_config(json!({"control_plane": {"snapshot_every": 37}}));
    let cp = ControlPlane::start_with(opts).await?;
    crash_and_compare(cp, 300, 11).await
}

#[tokio::test]
async fn repeated_crashes_keep_every_acknowledged_write() -> Result<()> {
    let opts = Options::default().with_config(json!({"control_plane": {"snapshot_every": 10}}));
    let mut cp = ControlPlane::start_with(opts).await?;
    let mut total = 0u64;
    for round in 0..4u64 {
        let admin = cp.rest();
        total += burst(&admin, 40, 100 + round).await?;
        let before = lists(&admin).await?;
        cp.kill9();
        cp.restart().await?;
        let admin = cp.rest();
        assert_gapless(&admin.all_events().await?, total)
            .with_context(|| format!("after crash {round}"))?;
        assert_eq!(lists(&admin).await?, before, "state after crash {round}");
    }
    Ok(())
}

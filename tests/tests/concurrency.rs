//! Concurrent writers: the log stays gapless, every acknowledged write is in
//! it exactly once, and the final state is what the writers did.

use aigw_tests::fixtures::{self, APIKEYS, PROVIDER_KEYS};
use aigw_tests::rest::assert_gapless;
use aigw_tests::{sha256_hex, AdminClient, ControlPlane};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use tokio::task::JoinSet;

const WRITERS: usize = 8;
const MUTATIONS_PER_WRITER: usize = 250;

/// What one writer expects each of its api keys to hold at the end.
struct Expected {
    id: String,
    key_hash: String,
    display_name: String,
    allowed_models: Vec<String>,
    revision: u64,
}

/// Writer `w`: creates 125 api keys with unique hashes and replaces each once
/// (250 mutations), every one of them acknowledged.
async fn writer(admin: AdminClient, w: usize) -> Result<Vec<Expected>> {
    let mut mine: Vec<Expected> = Vec::new();
    for i in 0..MUTATIONS_PER_WRITER {
        if i % 2 == 0 {
            let caller = format!("sk-writer-{w}-{i}");
            let body = json!({
                "key_hash": sha256_hex(&caller),
                "display_name": format!("w{w}-k{i}"),
                "allowed_models": [format!("m-{w}")],
            });
            let rec = admin
                .create("apikeys", &body)
                .await
                .with_context(|| format!("writer {w} create #{i}"))?;
            mine.push(Expected {
                id: rec["id"].as_str().context("id")?.to_string(),
                key_hash: sha256_hex(&caller),
                display_name: format!("w{w}-k{i}"),
                allowed_models: vec![format!("m-{w}")],
                revision: 1,
            });
        } else {
            let e = mine.last_mut().context("nothing to update")?;
            let allowed = vec![format!("m-{w}"), format!("updated-{i}")];
            let body = json!({
                "key_hash": e.key_hash,
                "display_name": format!("{}-v2", e.display_name),
                "allowed_models": allowed,
                "rate_limit": {"rpm": i + 1},
            });
            let rec = admin
                .put(&format!("{APIKEYS}/{}", e.id), &body)
                .await?
                .expect(200)
                .with_context(|| format!("writer {w} update #{i}"))?;
            ensure!(rec["revision"] == 2, "writer {w} update #{i}: {rec}");
            e.display_name = format!("{}-v2", e.display_name);
            e.allowed_models = allowed;
            e.revision = 2;
        }
    }
    Ok(mine)
}

#[tokio::test]
async fn eight_writers_2000_mutations_make_a_gapless_log_and_the_right_state() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let mut set = JoinSet::new();
    for w in 0..WRITERS {
        set.spawn(writer(admin.clone(), w));
    }
    let mut expected: Vec<Expected> = Vec::new();
    while let Some(done) = set.join_next().await {
        expected.extend(done??);
    }
    let total = (WRITERS * MUTATIONS_PER_WRITER) as u64;
    assert_eq!(expected.len(), WRITERS * MUTATIONS_PER_WRITER / 2);

    // The log, paged with from_seq & limit (and in one page of the max size).
    let events = admin.all_events().await?;
    assert_gapless(&events, total)?;
    let one_page = admin.events("limit=10000").await?;
    assert_eq!(one_page, events);
    let mut paged: Vec<Value> = Vec::new();
    let mut from = 1;
    while from <= total {
        let page = admin.events(&format!("from_seq={from}&limit=300")).await?;
        ensure!(!page.is_empty(), "empty page at {from}");
        from = page.last().and_then(|e| e["seq"].as_u64()).context("seq")? + 1;
        paged.extend(page);
    }
    assert_eq!(
        paged, events,
        "paging with from_seq/limit must give the same log"
    );

    // Per resource: exactly one create then one update, in that order.
    let mut per_id: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in &events {
        per_id
            .entry(e["resource_id"].as_str().unwrap_or_default())
            .or_default()
            .push(e["type"].as_str().unwrap_or_default());
    }
    assert_eq!(per_id.len(), expected.len());
    for x in &expected {
        assert_eq!(
            per_id.get(x.id.as_str()).map(Vec::as_slice),
            Some(&["ApiKeyCreated", "ApiKeyUpdated"][..]),
            "events of {}",
            x.id
        );
    }

    // Final state matches what the writers did.
    let list = admin.list("apikeys").await?;
    assert_eq!(list.len(), expected.len());
    let by_id: BTreeMap<&str, &Value> = list
        .iter()
        .map(|r| (r["id"].as_str().unwrap_or_default(), r))
        .collect();
    for x in &expected {
        let r = by_id
            .get(x.id.as_str())
            .with_context(|| format!("{} missing", x.id))?;
        assert_eq!(r["revision"], x.revision, "{r}");
        assert_eq!(r["value"]["key_hash"], x.key_hash.as_str(), "{r}");
        assert_eq!(r["value"]["display_name"], x.display_name.as_str(), "{r}");
        assert_eq!(r["value"]["allowed_models"], json!(x.allowed_models), "{r}");
    }
    Ok(())
}

#[tokio::test]
async fn conditional_updates_admit_one_writer_per_revision() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    let id = admin
        .create_id("provider_keys", &fixtures::provider_key("contended", "sk"))
        .await?;
    let path = format!("{PROVIDER_KEYS}/{id}");
    let mut set = JoinSet::new();
    for w in 0..WRITERS {
        let admin = admin.clone();
        let path = path.clone();
        set.spawn(async move {
            let (mut won, mut lost) = (Vec::new(), 0u64);
            for i in 0..25 {
                let rev = admin.get(&path).await?.expect(200)?["revision"]
                    .as_u64()
                    .context("revision")?;
                let body = fixtures::provider_key("contended", &format!("sk-{w}-{i}"));
                let r = admin.put_if_match(&path, &rev.to_string(), &body).await?;
                match r.status.as_u16() {
                    200 => {
                        let new = r.json()?["revision"].as_u64().context("revision")?;
                        ensure!(new > rev, "revision went from {rev} to {new}");
                        won.push(rev);
                    }
                    409 => lost += 1,
                    other => anyhow::bail!("unexpected {other}: {}", r.text),
                }
            }
            anyhow::Ok((won, lost))
        });
    }
    let mut won_at: Vec<u64> = Vec::new();
    let mut lost = 0;
    while let Some(done) = set.join_next().await {
        let (w, l) = done??;
        won_at.extend(w);
        lost += l;
    }
    assert_eq!(won_at.len() as u64 + lost, (WRITERS * 25) as u64);
    // No revision was won twice.
    won_at.sort_unstable();
    let before = won_at.len();
    won_at.dedup();
    assert_eq!(won_at.len(), before, "two writers won the same revision");
    let wins = won_at.len() as u64;
    let rec = admin.get(&path).await?.expect(200)?;
    assert_eq!(rec["revision"].as_u64(), Some(1 + wins));
    let events = admin.all_events().await?;
    assert_gapless(&events, 1 + wins)?;
    Ok(())
}

#[tokio::test]
async fn concurrent_creates_of_one_name_admit_exactly_one() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.rest();
    for round in 0..5 {
        let mut set = JoinSet::new();
        for w in 0..WRITERS {
            let admin = admin.clone();
            set.spawn(async move {
                let mut body = fixtures::api_key(&format!("sk-race-{round}-{w}"), &["*"]);
                body["display_name"] = json!(format!("race-{round}"));
                admin.post(APIKEYS, &body).await
            });
        }
        let mut statuses = Vec::new();
        while let Some(done) = set.join_next().await {
            statuses.push(done??.status.as_u16());
        }
        statuses.sort_unstable();
        let mut want = vec![409; WRITERS - 1];
        want.insert(0, 201);
        assert_eq!(statuses, want, "round {round}");
    }
    assert_eq!(admin.list("apikeys").await?.len(), 5);
    assert_gapless(&admin.all_events().await?, 5)?;
    Ok(())
}

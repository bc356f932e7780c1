//! Multi-deployment routing against three mock Azure deployments: a broken
//! target is routed around with zero caller errors, weights hold, a 429
//! cools its target for exactly the hinted time, priority groups fail over,
//! and nothing available is a 503 with `retry-after`.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{api_key, mock_provider_key};
use aigw_tests::mock_azure::{Behaviour, MockAzure};
use anyhow::{ensure, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ALIAS: &str = "multi";
const CALLER: &str = "sk-routing-caller";
const DEPLOYMENTS: [&str; 3] = ["east", "west", "north"];

struct Setup {
    mock: MockAzure,
    _cp: ControlPlane,
    client: ProxyClient,
}

/// A standalone gateway whose alias `multi` routes to `targets`
/// (deployment, priority, weight) with `routing`.
async fn setup(targets: &[(&str, u32, u32)], routing: Value) -> Result<Setup> {
    let mock = MockAzure::start().await;
    for d in DEPLOYMENTS {
        mock.add_deployment(d, "gpt-4o-mini-2024-07-18");
    }
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    let targets: Vec<Value> = targets
        .iter()
        .map(
            |(d, p, w)| json!({"provider_key_id": pk, "model_name": d, "priority": p, "weight": w}),
        )
        .collect();
    admin
        .create(
            "models",
            &json!({"display_name": ALIAS, "targets": targets, "routing": routing}),
        )
        .await?;
    admin.create("apikeys", &api_key(CALLER, &[ALIAS])).await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    Ok(Setup {
        mock,
        _cp: cp,
        client,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_target_is_routed_around_with_zero_caller_errors() -> Result<()> {
    let s = setup(
        &[("east", 0, 1), ("west", 0, 1), ("north", 0, 1)],
        json!({"retries": 2, "cooldown": "1s"}),
    )
    .await?;
    s.mock.set_behaviour(
        "north",
        Behaviour::Fail {
            status: 500,
            body: r#"{"error":{"code":"500","message":"down"}}"#.into(),
        },
    );
    let started = Instant::now();
    let concurrency = 8;
    let by = s.client.served_by_counts(ALIAS, 2000, concurrency).await?;
    let elapsed = started.elapsed();
    assert_eq!(
        by.get("north"),
        None,
        "the broken target never answered a caller"
    );
    assert_eq!(by.values().sum::<usize>(), 2000);
    // Five failures open the circuit (some more may already be in flight);
    // after that only one half-open probe per cooldown second.
    let bound = 5 + concurrency + elapsed.as_secs() as usize + 2;
    let seen = s.mock.requests("north");
    println!("broken target saw {seen} attempts over {elapsed:?} (bound {bound})");
    ensure!(
        seen <= bound,
        "broken target saw {seen} attempts, bound {bound}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_three_to_one_hold_within_three_percent() -> Result<()> {
    let s = setup(
        &[("east", 0, 3), ("west", 0, 1)],
        json!({"strategy": "weighted"}),
    )
    .await?;
    let by = s.client.served_by_counts(ALIAS, 4000, 16).await?;
    let east = *by.get("east").unwrap_or(&0) as f64 / 4000.0;
    println!("east share {east:.4} (want 0.75 ± 0.03): {by:?}");
    ensure!((east - 0.75).abs() <= 0.03, "east share {east}");
    assert_eq!(s.mock.requests("east") + s.mock.requests("west"), 4000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_alternates_strictly() -> Result<()> {
    let s = setup(
        &[("east", 0, 1), ("west", 0, 1), ("north", 0, 1)],
        json!({"strategy": "round_robin"}),
    )
    .await?;
    let by = s.client.served_by_counts(ALIAS, 300, 1).await?;
    for d in DEPLOYMENTS {
        assert_eq!(by.get(d), Some(&100), "{by:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_cools_its_target_for_the_hinted_time() -> Result<()> {
    let s = setup(
        &[("east", 0, 1), ("west", 0, 1)],
        json!({"retries": 2, "cooldown": "30s"}),
    )
    .await?;
    s.mock.set_behaviour(
        "east",
        Behaviour::RateLimited {
            retry_after_ms: Some(2000),
            retry_after: None,
        },
    );
    // Until east has been hit once; every caller still gets a 200 (retried on west).
    let mut n = 0;
    while s.mock.requests("east") == 0 {
        s.client.served_by_counts(ALIAS, 1, 1).await?;
        n += 1;
        ensure!(n < 200, "east never chosen");
    }
    let hit = Instant::now();
    s.mock.set_behaviour("east", Behaviour::Normal);
    // No traffic to east while it cools (the cooldown began just before `hit`).
    while hit.elapsed() < Duration::from_millis(1850) {
        s.client.served_by_counts(ALIAS, 4, 4).await?;
        assert_eq!(
            s.mock.requests("east"),
            1,
            "east got traffic {:?} after its 429",
            hit.elapsed()
        );
    }
    // Then it comes back.
    while s.mock.requests("east") == 1 {
        s.client.served_by_counts(ALIAS, 2, 2).await?;
        ensure!(
            hit.elapsed() < Duration::from_secs(4),
            "east still cooling after {:?}",
            hit.elapsed()
        );
    }
    let back = hit.elapsed();
    println!("east back after {back:?}");
    ensure!(
        back >= Duration::from_millis(1850),
        "east came back after only {back:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priority_groups_fail_over_to_the_next_group_only_when_needed() -> Result<()> {
    // PTU first (east), pay-as-you-go after (west, north).
    let s = setup(
        &[("east", 0, 1), ("west", 1, 1), ("north", 1, 1)],
        json!({"retries": 2, "cooldown": "10s"}),
    )
    .await?;
    let by = s.client.served_by_counts(ALIAS, 50, 4).await?;
    assert_eq!(by.get("east"), Some(&50), "{by:?}");
    s.mock.set_behaviour(
        "east",
        Behaviour::Fail {
            status: 503,
            body: "{}".into(),
        },
    );
    let by = s.client.served_by_counts(ALIAS, 100, 4).await?;
    assert_eq!(by.get("east"), None, "{by:?}");
    assert_eq!(
        by.get("west").unwrap_or(&0) + by.get("north").unwrap_or(&0),
        100
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_available_is_503_with_retry_after() -> Result<()> {
    let s = setup(
        &[("east", 0, 1), ("west", 0, 1)],
        json!({"retries": 2, "cooldown": "10s"}),
    )
    .await?;
    for d in ["east", "west"] {
        s.mock.set_behaviour(
            d,
            Behaviour::RateLimited {
                retry_after_ms: Some(3000),
                retry_after: None,
            },
        );
    }
    // The first call tries both and reports Azure's 429.
    let r = s.client.chat(&chat_body(ALIAS, "a")).await?;
    ensure!(r.status.as_u16() == 429, "{} {}", r.status, r.text);
    // Now both cool down: nothing to try.
    let r = s.client.chat(&chat_body(ALIAS, "b")).await?;
    let err = aigw_tests::data_plane::expect_openai_error(&r, 503, "all_targets_unavailable")?;
    let retry_after: u64 = r.header("retry-after").unwrap_or_default().parse()?;
    ensure!(
        (1..=3).contains(&retry_after),
        "retry-after {retry_after}: {err}"
    );
    assert_eq!(
        s.mock.requests("east") + s.mock.requests("west"),
        2,
        "no attempt while all cool down"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_errors_are_not_retried() -> Result<()> {
    let s = setup(&[("east", 0, 1), ("west", 0, 1)], json!({"retries": 2})).await?;
    for d in ["east", "west"] {
        s.mock.set_behaviour(d, Behaviour::ContentFilter);
    }
    let r = s.client.chat(&chat_body(ALIAS, "blocked")).await?;
    aigw_tests::data_plane::expect_openai_error(&r, 400, "content_filter")?;
    assert_eq!(s.mock.total_requests(), 1, "a 400 goes to one target only");
    Ok(())
}

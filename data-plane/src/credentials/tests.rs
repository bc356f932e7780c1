//! Token cache tests with a counting fake token source. Time is tokio's
//! paused clock, so "an hour later" is exact and instant.

use super::provider::BACKOFF_MIN;
use super::*;
use crate::config::{Runtime, TargetAuth};
use aigw_shared::snapshot::ConfigSnapshot;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Weak;
use tokio::sync::Semaphore;

/// Counts fetches; can hold them at a gate and fail the first few.
struct FakeState {
    fetches: AtomicUsize,
    lifetime: Duration,
    /// Fetches wait for a permit when set.
    gate: Option<Arc<Semaphore>>,
    fail_first: usize,
}

struct FakeSource(Arc<FakeState>);

impl TokenSource for FakeSource {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn fetch(&self) -> BoxFuture<'static, Result<FetchedToken, TokenError>> {
        let st = self.0.clone();
        Box::pin(async move {
            if let Some(gate) = &st.gate {
                gate.acquire().await.expect("gate").forget();
            }
            let n = st.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= st.fail_first {
                return Err(TokenError {
                    message: "AADSTS7000215: Invalid client secret provided.".into(),
                    code: Some("AADSTS7000215".into()),
                });
            }
            Ok(FetchedToken {
                secret: format!("token-{n}"),
                expires_in: st.lifetime,
            })
        })
    }
}

fn fake(lifetime: Duration) -> Arc<FakeState> {
    Arc::new(FakeState {
        fetches: AtomicUsize::new(0),
        lifetime,
        gate: None,
        fail_first: 0,
    })
}

fn provider(st: &Arc<FakeState>, metrics: &Arc<Metrics>) -> TokenProvider {
    TokenProvider::new(
        "pk-1",
        [0; 32],
        Arc::new(FakeSource(st.clone())),
        metrics.clone(),
    )
}

fn token_of(b: &Bearer) -> String {
    b.header().to_str().unwrap().to_string()
}

/// Lets spawned tasks run until `cond` holds (bounded; no wall-clock sleeps).
async fn settle(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("gave up waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_cold_callers_cause_one_fetch() {
    let gate = Arc::new(Semaphore::new(0));
    let st = Arc::new(FakeState {
        fetches: AtomicUsize::new(0),
        lifetime: Duration::from_secs(3600),
        gate: Some(gate.clone()),
        fail_first: 0,
    });
    let metrics = Arc::new(Metrics::default());
    let p = Arc::new(provider(&st, &metrics));
    let callers: Vec<_> = (0..200)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.bearer().await })
        })
        .collect();
    // All 200 are waiting on the one fetch, which is held at the gate.
    settle("200 waiting callers", || p.waiters() == 200).await;
    gate.add_permits(1000);
    let mut tokens = Vec::new();
    for c in callers {
        tokens.push(token_of(&c.await.unwrap().unwrap()));
    }
    assert_eq!(st.fetches.load(Ordering::SeqCst), 1);
    assert!(tokens.iter().all(|t| t == "Bearer token-1"));
    assert!(metrics
        .render(0, true)
        .contains("aigw_entra_token_refreshes_total 1"));
}

#[tokio::test(start_paused = true)]
async fn refreshes_ahead_of_expiry_while_in_use() {
    let st = fake(Duration::from_secs(3600));
    let metrics = Arc::new(Metrics::default());
    let p = provider(&st, &metrics);
    let first = p.bearer().await.unwrap();
    assert_eq!(token_of(&first), "Bearer token-1");
    // 5 minutes before expiry at the latest.
    let refresh_in = first.refresh_at() - tokio::time::Instant::now();
    assert_eq!(refresh_in, Duration::from_secs(3300));

    // In use until shortly before refresh time: served from the cache.
    tokio::time::advance(Duration::from_secs(3299)).await;
    assert_eq!(token_of(&p.bearer().await.unwrap()), "Bearer token-1");
    assert_eq!(st.fetches.load(Ordering::SeqCst), 1);

    // At refresh time the background task fetches without any caller waiting.
    tokio::time::advance(Duration::from_secs(2)).await;
    settle("the background refresh", || p.attempts() == 2).await;
    assert_eq!(st.fetches.load(Ordering::SeqCst), 2);
    // Well before the first token expired.
    assert_eq!(token_of(&p.bearer().await.unwrap()), "Bearer token-2");
}

#[tokio::test(start_paused = true)]
async fn short_lived_tokens_refresh_at_three_quarters_of_their_life() {
    let st = fake(Duration::from_secs(8));
    let metrics = Arc::new(Metrics::default());
    let p = provider(&st, &metrics);
    // Steady use: one call every 100 ms for 30 s; never waits for a fetch
    // after the first, and each token is replaced 2 s before it expires.
    for _ in 0..300 {
        p.bearer().await.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    let n = st.fetches.load(Ordering::SeqCst);
    assert!((4..=6).contains(&n), "{n} fetches in 30 s of 8 s tokens");
}

#[tokio::test(start_paused = true)]
async fn an_unused_key_is_not_refreshed_until_it_is_used_again() {
    let st = fake(Duration::from_secs(100));
    let metrics = Arc::new(Metrics::default());
    let p = provider(&st, &metrics);
    p.bearer().await.unwrap();
    tokio::time::advance(Duration::from_secs(80)).await;
    settle("the task to go quiet", || true).await;
    assert_eq!(st.fetches.load(Ordering::SeqCst), 1);
    // Past refresh time but still usable: served, and refreshed behind it.
    assert_eq!(token_of(&p.bearer().await.unwrap()), "Bearer token-1");
    settle("the refresh", || p.attempts() == 2).await;
    assert_eq!(token_of(&p.bearer().await.unwrap()), "Bearer token-2");
}

#[tokio::test(start_paused = true)]
async fn failures_reach_callers_at_once_and_are_retried_with_backoff() {
    let st = Arc::new(FakeState {
        fetches: AtomicUsize::new(0),
        lifetime: Duration::from_secs(3600),
        gate: None,
        fail_first: 2,
    });
    let metrics = Arc::new(Metrics::default());
    let p = provider(&st, &metrics);
    let err = p.bearer().await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("AADSTS7000215"));
    let shown = err
        .to_upstream_error("azure-aad-prod", "client secret")
        .to_string();
    assert!(
        shown.contains("`azure-aad-prod`") && shown.contains("AADSTS7000215"),
        "{shown}"
    );
    // During backoff callers get the last error without another request.
    assert!(p.bearer().await.is_err());
    assert_eq!(st.fetches.load(Ordering::SeqCst), 1);

    // The task retries by itself: after ~1 s (fails again), then ~2 s later.
    tokio::time::advance(BACKOFF_MIN.mul_f64(1.25)).await;
    settle("the first retry", || p.attempts() == 2).await;
    tokio::time::advance((BACKOFF_MIN * 2).mul_f64(1.25)).await;
    settle("the second retry", || p.attempts() == 3).await;
    assert_eq!(token_of(&p.bearer().await.unwrap()), "Bearer token-3");
    let text = metrics.render(0, true);
    assert!(text.contains("aigw_entra_token_failures_total 2"), "{text}");
    assert!(
        text.contains("aigw_entra_token_refreshes_total 1"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_replaced_once_for_many_callers() {
    let st = fake(Duration::from_secs(3600));
    let metrics = Arc::new(Metrics::default());
    let p = Arc::new(provider(&st, &metrics));
    let first = p.bearer().await.unwrap();
    first.mark_accepted();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (p, used) = (p.clone(), first.clone());
        tasks.push(tokio::spawn(async move {
            p.reject(&used);
            p.bearer().await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(token_of(&t.await.unwrap()), "Bearer token-2");
    }
    assert_eq!(st.fetches.load(Ordering::SeqCst), 2);
    assert!(metrics
        .render(0, true)
        .contains("aigw_entra_forced_refreshes_total 1"));
}

fn snapshot(version: u64, client_secret: Option<&str>) -> ConfigSnapshot {
    let mut pks = serde_json::Map::new();
    if let Some(secret) = client_secret {
        pks.insert(
            "pk-entra".into(),
            json!({
                "display_name": "azure-aad-prod",
                "adapter": "azure-openai",
                "api_base": "https://acme.openai.azure.com",
                "api_version": "2024-10-21",
                "credential": {"kind": "client_secret", "tenant_id": "t", "client_id": "c",
                               "client_secret": secret, "authority_host": null},
            }),
        );
    }
    pks.insert(
        "pk-key".into(),
        json!({
            "display_name": "azure-key",
            "adapter": "azure-openai",
            "api_base": "https://acme.openai.azure.com",
            "api_version": "2024-10-21",
            "credential": {"kind": "api_key", "key": "k"},
        }),
    );
    let mut models = serde_json::Map::new();
    if client_secret.is_some() {
        models.insert(
            "m-entra".into(),
            json!({"display_name": "gpt-aad", "provider_key_id": "pk-entra", "model_name": "chat"}),
        );
    }
    models.insert(
        "m-key".into(),
        json!({"display_name": "gpt-key", "provider_key_id": "pk-key", "model_name": "chat"}),
    );
    serde_json::from_value(json!({
        "format": aigw_shared::snapshot::SNAPSHOT_FORMAT,
        "version": version,
        "provider_keys": pks,
        "models": models,
        "api_keys": {},
    }))
    .unwrap()
}

fn entra_provider(rt: &Runtime) -> Arc<TokenProvider> {
    match &rt.route("gpt-aad").unwrap().targets[0].auth {
        TargetAuth::Entra(p) => p.clone(),
        other => panic!("expected Entra auth, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_cache_survives_snapshots_until_the_credential_changes_or_goes() {
    let sources: Arc<std::sync::Mutex<Vec<Arc<FakeState>>>> = Arc::default();
    let made = sources.clone();
    let registry = CredentialRegistry::with_factory(Arc::default(), move |_| {
        let st = fake(Duration::from_secs(3600));
        made.lock().unwrap().push(st.clone());
        Ok(Arc::new(FakeSource(st)) as Arc<dyn TokenSource>)
    });
    let mut services = crate::node::Services::new(Arc::default()).unwrap();
    services.credentials = Arc::new(registry);
    let node = crate::node::Node {
        installed: Default::default(),
        services: Arc::new(services),
        config: Arc::default(),
    };
    let registry = node.services.credentials.clone();
    let apply = |snap| {
        node.install(snap).unwrap();
        node.config.load().unwrap()
    };

    let v1 = apply(snapshot(1, Some("secret-1")));
    let p1 = entra_provider(&v1);
    assert_eq!(registry.len(), 1, "only Entra keys have a token cache");
    assert_eq!(token_of(&p1.bearer().await.unwrap()), "Bearer token-1");

    // Same credential in a new snapshot: same cache, no new fetch.
    let v2 = apply(snapshot(2, Some("secret-1")));
    assert!(Arc::ptr_eq(&p1, &entra_provider(&v2)));
    assert_eq!(
        token_of(&entra_provider(&v2).bearer().await.unwrap()),
        "Bearer token-1"
    );
    assert_eq!(sources.lock().unwrap().len(), 1);
    assert_eq!(sources.lock().unwrap()[0].fetches.load(Ordering::SeqCst), 1);

    // A rejected snapshot changes nothing.
    let mut bad = snapshot(3, Some("secret-2"));
    bad.format = 999;
    assert!(Runtime::compile(bad, node.services.compile_with()).is_err());
    assert!(Arc::ptr_eq(&p1, &registry.get("pk-entra").unwrap()));

    // New client secret: a new cache, which fetches anew.
    let v3 = apply(snapshot(3, Some("secret-2")));
    let p3 = entra_provider(&v3);
    assert!(!Arc::ptr_eq(&p1, &p3));
    assert!(Arc::ptr_eq(&p3, &registry.get("pk-entra").unwrap()));
    p3.bearer().await.unwrap();
    assert_eq!(sources.lock().unwrap()[1].fetches.load(Ordering::SeqCst), 1);

    // Once no snapshot uses the old cache, it is gone and its task has stopped.
    let old = Arc::downgrade(&p1);
    let old_source = sources.lock().unwrap()[0].clone();
    drop((v1, v2, p1));
    assert!(Weak::upgrade(&old).is_none());
    // Held by `sources` and `old_source` only.
    settle("the old task to stop", || {
        Arc::strong_count(&old_source) == 2
    })
    .await;

    // Key removed: dropped from the registry.
    let removed = Arc::downgrade(&p3);
    drop((v3, p3));
    let v4 = apply(snapshot(4, None));
    assert!(v4.route("gpt-aad").is_none());
    assert!(registry.get("pk-entra").is_none());
    assert!(registry.is_empty());
    assert!(Weak::upgrade(&removed).is_none());
    let removed_source = sources.lock().unwrap()[1].clone();
    settle("the removed key's task to stop", || {
        Arc::strong_count(&removed_source) == 2
    })
    .await;
}

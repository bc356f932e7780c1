//! The engine over a real sled store in a temporary directory: replay after a
//! reopen, compacted snapshots, the master-key check and gap detection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: helpers outside #[test] fail the test by panicking"
)]

use aigw_control_plane::engine::{replay, Engine};
use aigw_control_plane::events::{
    Command, DomainEvent, ResourceValue, State, StoredEvent, StoredProviderKey,
};
use aigw_control_plane::secrets::Cipher;
use aigw_control_plane::store::{EventStore, SledStore};
use aigw_control_plane::Error;
use aigw_shared::domain::{ApiKey, Model, ProviderKey, ResourceKind, Target};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

const KEY: [u8; 32] = [7; 32];

fn cipher() -> Cipher {
    Cipher::new(&KEY)
}

async fn open(dir: &Path, snapshot_every: u64) -> Arc<Engine> {
    let store = Arc::new(SledStore::open(dir).unwrap());
    match Engine::open(store, cipher(), snapshot_every).await {
        Ok(e) => e,
        Err(e) => panic!("opening the engine: {e:?}"),
    }
}

/// An [`EventStore`] that records what replay asks of the store beneath.
struct Recording {
    inner: SledStore,
    read_from: Mutex<Vec<u64>>,
    events_read: Arc<AtomicU64>,
}

impl Recording {
    fn open(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            inner: SledStore::open(dir).unwrap(),
            read_from: Mutex::new(Vec::new()),
            events_read: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl EventStore for Recording {
    fn append(&self, events: &[StoredEvent]) -> Result<(), Error> {
        self.inner.append(events)
    }
    fn read_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<StoredEvent, Error>> + Send + '_> {
        self.read_from.lock().unwrap().push(from);
        let counter = self.events_read.clone();
        Box::new(self.inner.read_from(from).inspect(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        }))
    }
    fn last_seq(&self) -> Result<u64, Error> {
        self.inner.last_seq()
    }
    fn save_snapshot(&self, seq: u64, state: &[u8]) -> Result<(), Error> {
        self.inner.save_snapshot(seq, state)
    }
    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, Error> {
        self.inner.latest_snapshot()
    }
    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.inner.meta_get(key)
    }
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.inner.meta_put(key, value)
    }
}

fn api_key(n: u64, name: Option<&str>) -> ApiKey {
    ApiKey {
        key_hash: format!("{n:064x}"),
        allowed_models: vec!["*".into()],
        display_name: name.map(Into::into),
        rate_limit: None,
        budget: None,
        expires_at: Some(OffsetDateTime::from_unix_timestamp(1_767_225_600 + n as i64).unwrap()),
        disabled: false,
        ..Default::default()
    }
}

fn create_key(n: u64) -> Command {
    Command::Create {
        id: format!("ak-{n}"),
        value: ResourceValue::ApiKey(api_key(n, Some(&format!("key {n}")))),
    }
}

fn provider_key(engine: &Engine, id: &str, name: &str, secret: &str) -> ResourceValue {
    let value = ProviderKey {
        display_name: name.into(),
        provider: "azure".into(),
        adapter: "azure-openai".into(),
        secret: secret.into(),
        api_base: "https://example.openai.azure.com".into(),
        api_version: "2024-10-21".into(),
        ca_pem: None,
        allow_insecure_upstream: false,
    };
    let sealed = engine.cipher().seal(id, secret).unwrap();
    ResourceValue::ProviderKey(StoredProviderKey::new(value, sealed))
}

fn model(name: &str, targets: &[&str]) -> Model {
    Model {
        display_name: name.into(),
        provider: "azure".into(),
        model_name: None,
        provider_key_id: None,
        targets: targets
            .iter()
            .map(|p| Target {
                provider_key_id: (*p).into(),
                model_name: format!("{name}-on-{p}"),
                priority: 0,
                weight: 1,
                context_window: None,
            })
            .collect(),
        routing: None,
        rate_limit: None,
        cost: None,
        cache: None,
        log_payloads: false,
        context_window: None,
        fallbacks: Default::default(),
    }
}

/// A mixed history: creates, updates, a rename, deletes and a recreate.
async fn write_history(engine: &Engine) {
    let run = |c: Command| async move { engine.execute(c, "admin:test").await.unwrap() };
    run(Command::Create {
        id: "pk1".into(),
        value: provider_key(engine, "pk1", "east", "sk-east"),
    })
    .await;
    run(Command::Create {
        id: "pk2".into(),
        value: provider_key(engine, "pk2", "west", "sk-west"),
    })
    .await;
    run(Command::Create {
        id: "m1".into(),
        value: ResourceValue::Model(model("gpt", &["pk1", "pk2"])),
    })
    .await;
    run(Command::Update {
        id: "m1".into(),
        value: ResourceValue::Model(model("gpt-renamed", &["pk1"])),
        expected_revision: Some(1),
        upsert: false,
    })
    .await;
    run(Command::Delete {
        kind: ResourceKind::ProviderKey,
        id: "pk2".into(),
        expected_revision: None,
    })
    .await;
    for n in 1..=5 {
        run(create_key(n)).await;
    }
    run(Command::Update {
        id: "ak-3".into(),
        value: ResourceValue::ApiKey(api_key(33, None)),
        expected_revision: Some(1),
        upsert: false,
    })
    .await;
    run(Command::Delete {
        kind: ResourceKind::ApiKey,
        id: "ak-4".into(),
        expected_revision: Some(1),
    })
    .await;
    run(create_key(4)).await;
    run(Command::Update {
        id: "upserted".into(),
        value: ResourceValue::ApiKey(api_key(99, Some("upserted"))),
        expected_revision: None,
        upsert: true,
    })
    .await;
}

#[tokio::test]
async fn replay_after_reopen_gives_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let before: State = {
        let engine = open(dir.path(), 10_000).await;
        write_history(&engine).await;
        // A refused command leaves no trace.
        let err = engine
            .execute(create_key(1), "admin:test")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Duplicate(_)), "{err:?}");
        let state = engine.read().clone();
        assert_eq!(state.version, 14);
        assert_eq!(engine.store().last_seq().unwrap(), 14);
        assert_eq!(*engine.subscribe().borrow(), 14);
        assert!(engine.store().latest_snapshot().unwrap().is_none());
        state
    };
    let engine = open(dir.path(), 10_000).await;
    let after = engine.read().clone();
    assert_eq!(after, before);
    assert_eq!(replay(engine.store()).unwrap(), before);
    assert_eq!(*engine.subscribe().borrow(), 14);

    // Secrets survive sealed and open with the same key, bound to their id.
    let sealed = &after.provider_keys["pk1"].value.secret;
    assert_eq!(engine.cipher().open("pk1", sealed).unwrap(), "sk-east");
    assert!(engine.cipher().open("pk2", sealed).is_err());
    // The index works after a reopen (the rename and the delete included).
    assert_eq!(after.id_by_name(ResourceKind::Model, "gpt"), None);
    assert_eq!(
        after.id_by_name(ResourceKind::Model, "gpt-renamed"),
        Some("m1")
    );
    assert_eq!(after.id_by_key_hash(&format!("{:064x}", 3)), None);
    assert_eq!(after.id_by_key_hash(&format!("{:064x}", 33)), Some("ak-3"));
    assert_eq!(after.revision(ResourceKind::ApiKey, "ak-4"), Some(1));

    // And the log goes on from where it was.
    let stored = engine.execute(create_key(6), "admin:test").await.unwrap();
    assert_eq!(stored[0].seq, 15);
}

#[tokio::test]
async fn the_log_keeps_actor_time_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 10_000).await;
    let t0 = OffsetDateTime::now_utc();
    write_history(&engine).await;
    let events: Vec<StoredEvent> = engine
        .store()
        .read_from(1)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=14).collect::<Vec<_>>()
    );
    assert!(events.iter().all(|e| e.actor == "admin:test" && e.at >= t0));
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(matches!(events[4].event, DomainEvent::ProviderKeyDeleted { ref id } if id == "pk2"));
    // read_from starts where asked.
    assert_eq!(engine.store().read_from(10).count(), 5);
    assert_eq!(engine.store().read_from(15).count(), 0);
}

#[tokio::test]
async fn compacted_snapshots_replay_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let engine = open(dir.path(), 100).await;
        for n in 1..=250 {
            engine.execute(create_key(n), "admin:test").await.unwrap();
            // A snapshot is written as the version crosses each multiple of 100.
            let latest = engine
                .store()
                .latest_snapshot()
                .unwrap()
                .map(|(seq, _)| seq);
            assert_eq!(
                latest,
                (n >= 100).then_some(n / 100 * 100),
                "after write {n}"
            );
        }
        let state = engine.read().clone();
        state
    };
    assert_eq!(before.version, 250);
    assert_eq!(before.api_keys.len(), 250);

    let store = Recording::open(dir.path());
    let (seq, _) = store.latest_snapshot().unwrap().expect("a snapshot");
    assert_eq!(seq, 200);
    let engine = Engine::open(store.clone(), cipher(), 100).await.unwrap();
    assert_eq!(*engine.read(), before);
    assert_eq!(*store.read_from.lock().unwrap(), vec![201]);
    assert_eq!(store.events_read.load(Ordering::Relaxed), 50);
}

#[tokio::test]
async fn an_unreadable_snapshot_falls_back_to_full_replay() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let engine = open(dir.path(), 100).await;
        for n in 1..=120 {
            engine.execute(create_key(n), "admin:test").await.unwrap();
        }
        let state = engine.read().clone();
        state
    };

    // Each kind of bad newest snapshot: not JSON, another format, a state
    // whose version is not the snapshot's seq.
    let other_format = format!(
        r#"{{"format":99,"state":{}}}"#,
        serde_json::to_string(&State::default()).unwrap()
    );
    let wrong_version = format!(
        r#"{{"format":1,"state":{}}}"#,
        serde_json::to_string(&State::default()).unwrap()
    );
    for (i, bad) in [
        b"\x00garbage{".to_vec(),
        other_format.into_bytes(),
        wrong_version.into_bytes(),
    ]
    .into_iter()
    .enumerate()
    {
        let store = Recording::open(dir.path());
        // Newer than the good snapshot at 100, so it is the one replay picks.
        store.save_snapshot(110 + i as u64, &bad).unwrap();
        assert_eq!(store.latest_snapshot().unwrap().unwrap().0, 110 + i as u64);
        let engine = Engine::open(store.clone(), cipher(), 100).await.unwrap();
        assert_eq!(*engine.read(), before, "bad snapshot #{i}");
        assert_eq!(
            *store.read_from.lock().unwrap(),
            vec![1],
            "bad snapshot #{i}"
        );
        assert_eq!(
            store.events_read.load(Ordering::Relaxed),
            120,
            "bad snapshot #{i}"
        );
    }
}

#[tokio::test]
async fn a_wrong_master_key_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), 100).await;
        engine
            .execute(
                Command::Create {
                    id: "pk1".into(),
                    value: provider_key(&engine, "pk1", "east", "sk-east"),
                },
                "admin:test",
            )
            .await
            .unwrap();
    }
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    match Engine::open(store, Cipher::new(&[8; 32]), 100).await {
        Err(Error::Crypto(m)) => assert!(m.contains("master key"), "{m}"),
        Err(e) => panic!("expected Error::Crypto, got {e:?}"),
        Ok(_) => panic!("opened with the wrong master key"),
    }
    // The right key still opens it, and nothing was overwritten.
    let engine = open(dir.path(), 100).await;
    assert_eq!(engine.read().version, 1);
}

#[tokio::test]
async fn append_refuses_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let ev = |seq: u64| StoredEvent {
        seq,
        at: OffsetDateTime::now_utc(),
        actor: "test".into(),
        event: DomainEvent::ApiKeyCreated {
            id: format!("ak-{seq}"),
            value: api_key(seq, None),
        },
    };
    let refused = |r: Result<(), Error>| matches!(r, Err(Error::Storage(m)) if m.contains("gap"));

    assert!(refused(store.append(&[ev(2)])), "an empty log starts at 1");
    store.append(&[]).unwrap();
    store.append(&[ev(1), ev(2)]).unwrap();
    assert!(refused(store.append(&[ev(4)])), "skipped seq 3");
    assert!(refused(store.append(&[ev(3), ev(5)])), "gap inside a batch");
    assert!(
        refused(store.append(&[ev(3), ev(3)])),
        "repeat inside a batch"
    );
    assert!(refused(store.append(&[ev(2)])), "rewriting history");
    assert_eq!(
        store.last_seq().unwrap(),
        2,
        "refused batches leave no trace"
    );
    store.append(&[ev(3)]).unwrap();
    assert_eq!(store.last_seq().unwrap(), 3);
    let seqs: Vec<u64> = store.read_from(1).map(|e| e.unwrap().seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[tokio::test]
async fn replay_detects_a_gap_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), 10_000).await;
        for n in 1..=5 {
            engine.execute(create_key(n), "admin:test").await.unwrap();
        }
    }
    // Knock out event 3 behind the store's back (tree `events`, key = big-endian seq).
    {
        let db = sled::open(dir.path().join("events.sled")).unwrap();
        let events = db.open_tree("events").unwrap();
        assert!(events.remove(3u64.to_be_bytes()).unwrap().is_some());
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    match replay(&store) {
        Err(Error::Storage(m)) => assert!(
            m.contains("gap") && m.contains('3') && m.contains('4'),
            "{m}"
        ),
        other => panic!("expected a gap error, got {other:?}"),
    }
    drop(store);
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    assert!(matches!(
        Engine::open(store, cipher(), 10_000).await,
        Err(Error::Storage(m)) if m.contains("gap")
    ));
}

#[tokio::test]
async fn concurrent_writers_get_gapless_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let engine = open(dir.path(), 16).await;
        let tasks: Vec<_> = (0..8u64)
            .map(|w| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..10 {
                        let stored = engine
                            .execute(create_key(w * 100 + i), &format!("w{w}"))
                            .await
                            .unwrap();
                        seqs.push(stored[0].seq);
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=80).collect::<Vec<_>>());
        assert_eq!(engine.store().latest_snapshot().unwrap().unwrap().0, 80);
        let state = engine.read().clone();
        state
    };
    let engine = open(dir.path(), 16).await;
    assert_eq!(*engine.read(), before);
}

/// A master key rotation: the data dir opens with the new key while the old
/// one is given as the previous key, every secret is sealed again with the
/// new key (provider keys and node seal keys), and from then on the new key
/// alone opens it and the old one no longer does.
#[tokio::test]
async fn a_master_key_rotation_reseals_every_secret_and_retires_the_old_key() {
    use aigw_control_plane::events::NodeCredential;
    let dir = tempfile::tempdir().unwrap();
    let old = cipher();
    let new = Cipher::new(&[42; 32]);
    let owner = aigw_control_plane::admin::node_seal_owner("dp-1", "c1");
    {
        let engine = open(dir.path(), 100).await;
        for (id, name) in [("pk1", "east"), ("pk2", "west")] {
            let value = provider_key(&engine, id, name, &format!("sk-{name}"));
            engine
                .execute(
                    Command::Create {
                        id: id.into(),
                        value,
                    },
                    "admin:test",
                )
                .await
                .unwrap();
        }
        let credential = NodeCredential {
            id: "c1".into(),
            token_sha256: "00".repeat(32),
            seal_key: old.seal(&owner, "node-seal-key").unwrap(),
            issued_at: "2026-12-01T00:00:00Z".into(),
            description: None,
        };
        engine
            .execute(
                Command::IssueNodeCredential {
                    node_id: "dp-1".into(),
                    credential,
                },
                "admin:test",
            )
            .await
            .unwrap();
    }
    let store = || Arc::new(SledStore::open(dir.path()).unwrap()) as Arc<dyn EventStore>;
    let (engine, rotating) = Engine::open_rotating(store(), new.clone(), Some(old.clone()), 100)
        .await
        .unwrap();
    assert!(rotating);
    assert_eq!(engine.finish_rotation(&old).await.unwrap(), 3);
    {
        let state = engine.read();
        for (id, secret) in [("pk1", "sk-east"), ("pk2", "sk-west")] {
            let sealed = &state.provider_keys[id].value.secret;
            assert_eq!(new.open(id, sealed).unwrap(), secret);
            assert!(old.open(id, sealed).is_err());
        }
        let seal_key = &state.nodes["dp-1"].value.credentials[0].seal_key;
        assert_eq!(new.open(&owner, seal_key).unwrap(), "node-seal-key");
    }
    let resealed = engine
        .store()
        .read_from(1)
        .map(|e| e.unwrap())
        .filter(|e| e.actor == "system:master-key-rotation")
        .count();
    assert_eq!(resealed, 3, "one event per re-sealed secret");
    // Repeating it finds nothing left to do.
    assert_eq!(engine.finish_rotation(&old).await.unwrap(), 0);
    drop(engine);
    // The new key alone opens the data dir; the old one no longer does.
    let (_, rotating) = Engine::open_rotating(store(), new.clone(), Some(old.clone()), 100)
        .await
        .unwrap();
    assert!(!rotating);
    match Engine::open(store(), old, 100).await {
        Err(Error::Crypto(m)) => assert!(m.contains("previous_master_key"), "{m}"),
        Err(e) => panic!("expected Error::Crypto, got {e:?}"),
        Ok(_) => panic!("the retired key still opens the data dir"),
    }
    Engine::open(store(), new, 100).await.unwrap();
}

//! Given/when/then tests of the pure command handler and the fold, in the
//! cqrs-es style: `given(past events).when(command).then_expect(new events)`.
//! Also the stored envelope: encode/decode, upcasting and masking.

use super::*;
use crate::secrets::Sealed;
use aigw_shared::domain::{
    Budget, BudgetPeriod, CacheConfig, ClaimMappings, Cost, HumanDuration, JwtProvider, RateLimit,
    Routing, RoutingStrategy, Target,
};
use std::time::Duration;
use time::macros::datetime;

// ---------------------------------------------------------------- harness

/// The fixed instant every test event happened at.
const AT: OffsetDateTime = datetime!(2025-06-01 12:34:56.123456789 UTC);

/// Folds `events` (numbered 1, 2, ...) into a fresh state.
fn given(events: impl IntoIterator<Item = DomainEvent>) -> Given {
    let mut state = State::default();
    for event in events {
        apply_checked(&mut state, event);
    }
    Given { state }
}

/// Applies one event as the next in the log, and checks that the derived
/// index is exactly what a rebuild from the maps would give.
fn apply_checked(state: &mut State, event: DomainEvent) {
    let seq = state.version + 1;
    state.apply(&StoredEvent {
        seq,
        at: AT,
        actor: "test".into(),
        event,
    });
    assert_index_consistent(state);
}

fn assert_index_consistent(state: &State) {
    let mut rebuilt = state.clone();
    rebuilt.reindex();
    assert_eq!(
        rebuilt.index, state.index,
        "incremental index drifted from reindex()"
    );
}

struct Given {
    state: State,
}

impl Given {
    fn when(self, command: Command) -> When {
        let result = handle(&self.state, &command);
        When {
            state: self.state,
            result,
        }
    }

    fn state(self) -> State {
        self.state
    }
}

struct When {
    state: State,
    result: Result<Vec<DomainEvent>, Error>,
}

impl When {
    /// The command succeeds with exactly these events, which then apply cleanly.
    fn then_expect(self, expected: Vec<DomainEvent>) -> State {
        let mut state = self.state;
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected);
                for e in events {
                    apply_checked(&mut state, e);
                }
                state
            }
            Err(e) => panic!("expected events {expected:?}, got error: {e:?}"),
        }
    }

    /// The command fails and the error passes `check`; returns the error for
    /// further checks on its text.
    fn then_expect_error(self, check: impl FnOnce(&Error) -> bool) -> Error {
        match self.result {
            Ok(events) => panic!("expected an error, got events {events:?}"),
            Err(e) => {
                assert!(check(&e), "unexpected error: {e:?}");
                e
            }
        }
    }
}

// ---------------------------------------------------------------- fixtures

fn sealed(tag: &str) -> Sealed {
    Sealed {
        nonce: format!("NONCE-{tag}"),
        ciphertext: format!("CIPHERTEXT-{tag}"),
    }
}

fn pk(name: &str) -> StoredProviderKey {
    StoredProviderKey {
        display_name: name.into(),
        provider: "azure".into(),
        adapter: "azure-openai".into(),
        secret: sealed(name),
        api_base: "https://example.openai.azure.com".into(),
        api_version: "2024-10-21".into(),
        ca_pem: None,
        allow_insecure_upstream: false,
    }
}

/// A model in the single-deployment form.
fn model(name: &str, provider_key_id: &str) -> Model {
    Model {
        display_name: name.into(),
        provider: "azure".into(),
        model_name: Some(format!("{name}-deployment")),
        provider_key_id: Some(provider_key_id.into()),
        targets: vec![],
        routing: None,
        rate_limit: None,
        cost: None,
        cache: None,
        log_payloads: false,
        context_window: None,
        fallbacks: Default::default(),
    }
}

/// A model in the targets form.
fn model_targets(name: &str, provider_key_ids: &[&str]) -> Model {
    Model {
        model_name: None,
        provider_key_id: None,
        targets: provider_key_ids
            .iter()
            .enumerate()
            .map(|(i, p)| Target {
                provider_key_id: (*p).into(),
                model_name: format!("{name}-{i}"),
                priority: i as u32,
                weight: 1,
                context_window: None,
            })
            .collect(),
        ..model(name, "unused")
    }
}

fn hash(n: u64) -> String {
    format!("{n:064x}")
}

fn api_key(n: u64, name: Option<&str>) -> ApiKey {
    ApiKey {
        key_hash: hash(n),
        allowed_models: vec!["*".into()],
        display_name: name.map(Into::into),
        rate_limit: None,
        budget: None,
        expires_at: None,
        disabled: false,
        ..Default::default()
    }
}

fn pk_created(id: &str, name: &str) -> DomainEvent {
    DomainEvent::ProviderKeyCreated {
        id: id.into(),
        value: pk(name),
    }
}

fn model_created(id: &str, value: Model) -> DomainEvent {
    DomainEvent::ModelCreated {
        id: id.into(),
        value,
    }
}

fn ak_created(id: &str, value: ApiKey) -> DomainEvent {
    DomainEvent::ApiKeyCreated {
        id: id.into(),
        value,
    }
}

fn jwt_provider(name: &str, issuer: &str) -> JwtProvider {
    JwtProvider {
        display_name: name.into(),
        issuer: issuer.into(),
        audiences: vec!["api://aigw".into()],
        jwks_uri: None,
        claim_mappings: ClaimMappings::default(),
        clock_skew: HumanDuration(Duration::from_secs(60)),
    }
}

fn jp_created(id: &str, value: JwtProvider) -> DomainEvent {
    DomainEvent::JwtProviderCreated {
        id: id.into(),
        value,
    }
}

/// An api key binding a JWT identity of `provider`.
fn jwt_key(provider: &str, subject: Option<&str>, claims: &[(&str, &str)]) -> ApiKey {
    ApiKey {
        allowed_models: vec!["*".into()],
        jwt_provider_id: Some(provider.into()),
        jwt_subject: subject.map(Into::into),
        jwt_claims: claims
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn create(id: &str, value: ResourceValue) -> Command {
    Command::Create {
        id: id.into(),
        value,
    }
}

fn update(id: &str, value: ResourceValue, expected_revision: Option<u64>, upsert: bool) -> Command {
    Command::Update {
        id: id.into(),
        value,
        expected_revision,
        upsert,
    }
}

fn delete(kind: ResourceKind, id: &str, expected_revision: Option<u64>) -> Command {
    Command::Delete {
        kind,
        id: id.into(),
        expected_revision,
    }
}

fn is_duplicate(e: &Error) -> bool {
    matches!(e, Error::Duplicate(_))
}

fn is_reference(e: &Error) -> bool {
    matches!(e, Error::Reference(_))
}

// ---------------------------------------------------------------- create

#[test]
fn create_provider_key() {
    given([])
        .when(create("pk1", ResourceValue::ProviderKey(pk("east"))))
        .then_expect(vec![pk_created("pk1", "east")]);
}

#[test]
fn create_model_single_and_targets_form() {
    let state = given([pk_created("pk1", "east"), pk_created("pk2", "west")])
        .when(create("m1", ResourceValue::Model(model("gpt", "pk1"))))
        .then_expect(vec![model_created("m1", model("gpt", "pk1"))]);
    Given { state }
        .when(create(
            "m2",
            ResourceValue::Model(model_targets("multi", &["pk1", "pk2"])),
        ))
        .then_expect(vec![model_created(
            "m2",
            model_targets("multi", &["pk1", "pk2"]),
        )]);
}

#[test]
fn create_api_key() {
    given([])
        .when(create("ak1", ResourceValue::ApiKey(api_key(1, Some("ci")))))
        .then_expect(vec![ak_created("ak1", api_key(1, Some("ci")))]);
    // A display name is optional, and two unnamed keys do not clash.
    given([ak_created("ak1", api_key(1, None))])
        .when(create("ak2", ResourceValue::ApiKey(api_key(2, None))))
        .then_expect(vec![ak_created("ak2", api_key(2, None))]);
}

#[test]
fn create_with_an_existing_id_is_duplicate() {
    given([pk_created("pk1", "east")])
        .when(create("pk1", ResourceValue::ProviderKey(pk("other"))))
        .then_expect_error(is_duplicate);
}

// ---------------------------------------------------------------- uniqueness

#[test]
fn duplicate_display_name_per_kind() {
    let past = || {
        [
            pk_created("pk1", "east"),
            model_created("m1", model("gpt", "pk1")),
            ak_created("ak1", api_key(1, Some("ci"))),
        ]
    };
    let e = given(past())
        .when(create("pk2", ResourceValue::ProviderKey(pk("east"))))
        .then_expect_error(is_duplicate);
    assert!(e.to_string().contains("pk1"), "{e}");
    given(past())
        .when(create("m2", ResourceValue::Model(model("gpt", "pk1"))))
        .then_expect_error(is_duplicate);
    given(past())
        .when(create("ak2", ResourceValue::ApiKey(api_key(2, Some("ci")))))
        .then_expect_error(is_duplicate);
    // A PUT-upsert of a new id is checked the same way.
    given(past())
        .when(update(
            "pk2",
            ResourceValue::ProviderKey(pk("east")),
            None,
            true,
        ))
        .then_expect_error(is_duplicate);
}

#[test]
fn same_name_across_kinds_is_fine() {
    let state = given([])
        .when(create("pk1", ResourceValue::ProviderKey(pk("shared"))))
        .then_expect(vec![pk_created("pk1", "shared")]);
    let state = Given { state }
        .when(create("m1", ResourceValue::Model(model("shared", "pk1"))))
        .then_expect(vec![model_created("m1", model("shared", "pk1"))]);
    let state = Given { state }
        .when(create(
            "ak1",
            ResourceValue::ApiKey(api_key(1, Some("shared"))),
        ))
        .then_expect(vec![ak_created("ak1", api_key(1, Some("shared")))]);
    assert_eq!(
        state.id_by_name(ResourceKind::ProviderKey, "shared"),
        Some("pk1")
    );
    assert_eq!(state.id_by_name(ResourceKind::Model, "shared"), Some("m1"));
    assert_eq!(
        state.id_by_name(ResourceKind::ApiKey, "shared"),
        Some("ak1")
    );
}

#[test]
fn duplicate_key_hash() {
    let e = given([ak_created("ak1", api_key(7, Some("a")))])
        .when(create("ak2", ResourceValue::ApiKey(api_key(7, Some("b")))))
        .then_expect_error(is_duplicate);
    assert!(e.to_string().contains("key_hash"), "{e}");
    // Also when another key is updated to take the hash.
    given([
        ak_created("ak1", api_key(7, None)),
        ak_created("ak2", api_key(8, None)),
    ])
    .when(update(
        "ak2",
        ResourceValue::ApiKey(api_key(7, None)),
        None,
        false,
    ))
    .then_expect_error(is_duplicate);
}

// ---------------------------------------------------------------- update

#[test]
fn update_keeping_own_name_is_ok() {
    let past = || {
        [
            pk_created("pk1", "east"),
            model_created("m1", model("gpt", "pk1")),
            ak_created("ak1", api_key(1, Some("ci"))),
        ]
    };
    let mut renamed_pk = pk("east");
    renamed_pk.api_version = "2025-01-01".into();
    given(past())
        .when(update(
            "pk1",
            ResourceValue::ProviderKey(renamed_pk.clone()),
            None,
            false,
        ))
        .then_expect(vec![DomainEvent::ProviderKeyUpdated {
            id: "pk1".into(),
            value: renamed_pk,
        }]);
    let m = model_targets("gpt", &["pk1"]);
    given(past())
        .when(update(
            "m1",
            ResourceValue::Model(m.clone()),
            Some(1),
            false,
        ))
        .then_expect(vec![DomainEvent::ModelUpdated {
            id: "m1".into(),
            value: m,
        }]);
    // Same name and same hash as itself.
    let mut k = api_key(1, Some("ci"));
    k.disabled = true;
    let state = given(past())
        .when(update(
            "ak1",
            ResourceValue::ApiKey(k.clone()),
            Some(1),
            true,
        ))
        .then_expect(vec![DomainEvent::ApiKeyUpdated {
            id: "ak1".into(),
            value: k,
        }]);
    assert_eq!(state.revision(ResourceKind::ApiKey, "ak1"), Some(2));
}

#[test]
fn update_to_another_resources_name_is_duplicate() {
    given([pk_created("pk1", "east"), pk_created("pk2", "west")])
        .when(update(
            "pk2",
            ResourceValue::ProviderKey(pk("east")),
            None,
            false,
        ))
        .then_expect_error(is_duplicate);
}

#[test]
fn update_missing_without_upsert_is_not_found() {
    let e = given([])
        .when(update(
            "ak1",
            ResourceValue::ApiKey(api_key(1, None)),
            None,
            false,
        ))
        .then_expect_error(
            |e| matches!(e, Error::NotFound { kind: ResourceKind::ApiKey, id } if id == "ak1"),
        );
    assert!(e.to_string().contains("ak1"));
    given([])
        .when(update(
            "ak1",
            ResourceValue::ApiKey(api_key(1, None)),
            Some(1),
            false,
        ))
        .then_expect_error(|e| matches!(e, Error::NotFound { .. }));
}

#[test]
fn update_missing_with_upsert_creates() {
    let state = given([])
        .when(update(
            "pk1",
            ResourceValue::ProviderKey(pk("east")),
            None,
            true,
        ))
        .then_expect(vec![pk_created("pk1", "east")]);
    assert_eq!(state.revision(ResourceKind::ProviderKey, "pk1"), Some(1));
    // An upsert that expects an existing revision of a missing resource is stale.
    given([])
        .when(update(
            "pk1",
            ResourceValue::ProviderKey(pk("east")),
            Some(3),
            true,
        ))
        .then_expect_error(|e| {
            matches!(
                e,
                Error::StaleRevision {
                    expected: 3,
                    current: 0
                }
            )
        });
}

#[test]
fn stale_expected_revision_on_update() {
    let past = || {
        [
            pk_created("pk1", "east"),
            DomainEvent::ProviderKeyUpdated {
                id: "pk1".into(),
                value: pk("east2"),
            },
        ]
    };
    for upsert in [false, true] {
        given(past())
            .when(update(
                "pk1",
                ResourceValue::ProviderKey(pk("east3")),
                Some(1),
                upsert,
            ))
            .then_expect_error(|e| {
                matches!(
                    e,
                    Error::StaleRevision {
                        expected: 1,
                        current: 2
                    }
                )
            });
    }
    given(past())
        .when(update(
            "pk1",
            ResourceValue::ProviderKey(pk("east3")),
            Some(2),
            false,
        ))
        .then_expect(vec![DomainEvent::ProviderKeyUpdated {
            id: "pk1".into(),
            value: pk("east3"),
        }]);
}

// ---------------------------------------------------------------- delete

#[test]
fn stale_expected_revision_on_delete() {
    let past = || {
        [
            ak_created("ak1", api_key(1, None)),
            DomainEvent::ApiKeyUpdated {
                id: "ak1".into(),
                value: api_key(1, Some("renamed")),
            },
        ]
    };
    given(past())
        .when(delete(ResourceKind::ApiKey, "ak1", Some(1)))
        .then_expect_error(|e| {
            matches!(
                e,
                Error::StaleRevision {
                    expected: 1,
                    current: 2
                }
            )
        });
    given(past())
        .when(delete(ResourceKind::ApiKey, "ak1", Some(2)))
        .then_expect(vec![DomainEvent::ApiKeyDeleted { id: "ak1".into() }]);
    given(past())
        .when(delete(ResourceKind::ApiKey, "ak1", None))
        .then_expect(vec![DomainEvent::ApiKeyDeleted { id: "ak1".into() }]);
}

#[test]
fn delete_missing_is_not_found() {
    // Ids are per kind: a provider key `x` is no model `x`.
    given([pk_created("x", "east")])
        .when(delete(ResourceKind::Model, "x", None))
        .then_expect_error(|e| {
            matches!(
                e,
                Error::NotFound {
                    kind: ResourceKind::Model,
                    ..
                }
            )
        });
}

#[test]
fn delete_each_kind() {
    let past = || {
        [
            pk_created("pk1", "east"),
            model_created("m1", model("gpt", "pk1")),
            ak_created("ak1", api_key(1, None)),
        ]
    };
    given(past())
        .when(delete(ResourceKind::Model, "m1", Some(1)))
        .then_expect(vec![DomainEvent::ModelDeleted { id: "m1".into() }]);
    let state = given(past())
        .when(delete(ResourceKind::ApiKey, "ak1", None))
        .then_expect(vec![DomainEvent::ApiKeyDeleted { id: "ak1".into() }]);
    assert!(state.api_keys.is_empty());
}

// ---------------------------------------------------------------- references

#[test]
fn model_with_dangling_provider_key_single_form() {
    let e = given([pk_created("pk1", "east")])
        .when(create("m1", ResourceValue::Model(model("gpt", "nope"))))
        .then_expect_error(is_reference);
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn model_with_dangling_provider_key_targets_form() {
    let e = given([pk_created("pk1", "east")])
        .when(create(
            "m1",
            ResourceValue::Model(model_targets("multi", &["pk1", "gone"])),
        ))
        .then_expect_error(is_reference);
    assert!(e.to_string().contains("gone"), "{e}");
    // Updates are checked too.
    given([
        pk_created("pk1", "east"),
        model_created("m1", model("gpt", "pk1")),
    ])
    .when(update(
        "m1",
        ResourceValue::Model(model_targets("gpt", &["gone"])),
        None,
        false,
    ))
    .then_expect_error(is_reference);
}

#[test]
fn a_provider_key_id_is_not_a_model_or_api_key_id() {
    given([ak_created("k", api_key(1, None))])
        .when(create("m1", ResourceValue::Model(model("gpt", "k"))))
        .then_expect_error(is_reference);
}

#[test]
fn deleting_a_provider_key_used_by_a_model_names_the_model() {
    let e = given([
        pk_created("pk1", "east"),
        model_created("m1", model("gpt-4o", "pk1")),
    ])
    .when(delete(ResourceKind::ProviderKey, "pk1", None))
    .then_expect_error(is_reference);
    let text = e.to_string();
    assert!(
        text.contains("gpt-4o") && text.contains("m1") && text.contains("pk1"),
        "{text}"
    );

    // Targets form, used by the second target only.
    let e = given([
        pk_created("pk1", "east"),
        pk_created("pk2", "west"),
        model_created("m9", model_targets("multi", &["pk1", "pk2"])),
    ])
    .when(delete(ResourceKind::ProviderKey, "pk2", None))
    .then_expect_error(is_reference);
    assert!(e.to_string().contains("multi"), "{e}");

    // Once the model is gone, so is the reference.
    given([
        pk_created("pk1", "east"),
        model_created("m1", model("gpt-4o", "pk1")),
        DomainEvent::ModelDeleted { id: "m1".into() },
    ])
    .when(delete(ResourceKind::ProviderKey, "pk1", None))
    .then_expect(vec![DomainEvent::ProviderKeyDeleted { id: "pk1".into() }]);
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn delete_then_recreate_a_name() {
    let state = given([
        pk_created("pk1", "east"),
        DomainEvent::ProviderKeyDeleted { id: "pk1".into() },
        ak_created("ak1", api_key(5, Some("ci"))),
        DomainEvent::ApiKeyDeleted { id: "ak1".into() },
    ])
    .state();
    let state = Given { state }
        .when(create("pk2", ResourceValue::ProviderKey(pk("east"))))
        .then_expect(vec![pk_created("pk2", "east")]);
    // The name and the hash of the deleted key are both free again.
    let state = Given { state }
        .when(create("ak2", ResourceValue::ApiKey(api_key(5, Some("ci")))))
        .then_expect(vec![ak_created("ak2", api_key(5, Some("ci")))]);
    // Even the old id can come back, at revision 1.
    let state = Given { state }
        .when(create("pk1", ResourceValue::ProviderKey(pk("west"))))
        .then_expect(vec![pk_created("pk1", "west")]);
    assert_eq!(state.revision(ResourceKind::ProviderKey, "pk1"), Some(1));
    assert_eq!(
        state.id_by_name(ResourceKind::ProviderKey, "east"),
        Some("pk2")
    );
    assert_eq!(state.id_by_key_hash(&hash(5)), Some("ak2"));
}

#[test]
fn apply_bumps_revision_and_version() {
    let mut state = State::default();
    assert_eq!(state.version, 0);
    let stored = |seq, event| StoredEvent {
        seq,
        at: AT,
        actor: "test".into(),
        event,
    };
    state.apply(&stored(1, pk_created("pk1", "east")));
    assert_eq!(
        (
            state.version,
            state.revision(ResourceKind::ProviderKey, "pk1")
        ),
        (1, Some(1))
    );
    for (seq, rev) in [(2, 2), (3, 3)] {
        state.apply(&stored(
            seq,
            DomainEvent::ProviderKeyUpdated {
                id: "pk1".into(),
                value: pk("east"),
            },
        ));
        assert_eq!(
            (
                state.version,
                state.revision(ResourceKind::ProviderKey, "pk1")
            ),
            (seq, Some(rev))
        );
    }
    // Other resources keep their own revisions.
    state.apply(&stored(4, ak_created("ak1", api_key(1, None))));
    assert_eq!(state.revision(ResourceKind::ApiKey, "ak1"), Some(1));
    assert_eq!(state.revision(ResourceKind::ProviderKey, "pk1"), Some(3));
    // The version is the seq of the last event, whatever it is.
    state.apply(&stored(
        5,
        DomainEvent::ProviderKeyDeleted { id: "pk1".into() },
    ));
    assert_eq!(
        (
            state.version,
            state.revision(ResourceKind::ProviderKey, "pk1")
        ),
        (5, None)
    );
    state.apply(&stored(6, pk_created("pk1", "east")));
    assert_eq!(
        (
            state.version,
            state.revision(ResourceKind::ProviderKey, "pk1")
        ),
        (6, Some(1))
    );
    assert_index_consistent(&state);
}

#[test]
fn index_consistent_after_rename() {
    let state = given([
        pk_created("pk1", "old"),
        DomainEvent::ProviderKeyUpdated {
            id: "pk1".into(),
            value: pk("new"),
        },
        model_created("m1", model("old-model", "pk1")),
        DomainEvent::ModelUpdated {
            id: "m1".into(),
            value: model("new-model", "pk1"),
        },
        ak_created("ak1", api_key(1, Some("old-key"))),
        DomainEvent::ApiKeyUpdated {
            id: "ak1".into(),
            value: api_key(2, Some("new-key")),
        },
        // Dropping the display name frees it.
        ak_created("ak2", api_key(3, Some("dropped"))),
        DomainEvent::ApiKeyUpdated {
            id: "ak2".into(),
            value: api_key(3, None),
        },
    ])
    .state();
    use ResourceKind::*;
    assert_eq!(state.id_by_name(ProviderKey, "old"), None);
    assert_eq!(state.id_by_name(ProviderKey, "new"), Some("pk1"));
    assert_eq!(state.id_by_name(Model, "old-model"), None);
    assert_eq!(state.id_by_name(Model, "new-model"), Some("m1"));
    assert_eq!(state.id_by_name(ApiKey, "old-key"), None);
    assert_eq!(state.id_by_name(ApiKey, "new-key"), Some("ak1"));
    assert_eq!(state.id_by_name(ApiKey, "dropped"), None);
    assert_eq!(state.id_by_key_hash(&hash(1)), None);
    assert_eq!(state.id_by_key_hash(&hash(2)), Some("ak1"));
    assert_eq!(state.id_by_key_hash(&hash(3)), Some("ak2"));

    // And the handler agrees: old values are free, new ones are taken.
    let g = || Given {
        state: state.clone(),
    };
    g().when(create("pk2", ResourceValue::ProviderKey(pk("old"))))
        .then_expect(vec![pk_created("pk2", "old")]);
    g().when(create("pk2", ResourceValue::ProviderKey(pk("new"))))
        .then_expect_error(is_duplicate);
    g().when(create(
        "m2",
        ResourceValue::Model(model("old-model", "pk1")),
    ))
    .then_expect(vec![model_created("m2", model("old-model", "pk1"))]);
    g().when(create(
        "m2",
        ResourceValue::Model(model("new-model", "pk1")),
    ))
    .then_expect_error(is_duplicate);
    g().when(create(
        "ak3",
        ResourceValue::ApiKey(api_key(1, Some("old-key"))),
    ))
    .then_expect(vec![ak_created("ak3", api_key(1, Some("old-key")))]);
    g().when(create(
        "ak3",
        ResourceValue::ApiKey(api_key(9, Some("new-key"))),
    ))
    .then_expect_error(is_duplicate);
    g().when(create("ak3", ResourceValue::ApiKey(api_key(2, None))))
        .then_expect_error(is_duplicate);
    g().when(create(
        "ak3",
        ResourceValue::ApiKey(api_key(9, Some("dropped"))),
    ))
    .then_expect(vec![ak_created("ak3", api_key(9, Some("dropped")))]);
}

#[test]
fn index_consistent_after_delete() {
    let state = given([
        pk_created("pk1", "east"),
        model_created("m1", model("gpt", "pk1")),
        ak_created("ak1", api_key(1, Some("ci"))),
        DomainEvent::ModelDeleted { id: "m1".into() },
        DomainEvent::ProviderKeyDeleted { id: "pk1".into() },
        DomainEvent::ApiKeyDeleted { id: "ak1".into() },
    ])
    .state();
    assert_eq!(state.index, Default::default());
    assert!(state.provider_keys.is_empty() && state.models.is_empty() && state.api_keys.is_empty());
    assert_eq!(state.version, 6);
    for kind in ResourceKind::ALL {
        for name in ["east", "gpt", "ci"] {
            assert_eq!(state.id_by_name(kind, name), None);
        }
    }
    assert_eq!(state.id_by_key_hash(&hash(1)), None);
}

/// A state with some of everything, renames and deletes included.
fn busy_state() -> State {
    given([
        pk_created("pk1", "east"),
        pk_created("pk2", "west"),
        DomainEvent::ProviderKeyUpdated {
            id: "pk2".into(),
            value: pk("west-2"),
        },
        model_created("m1", model("gpt", "pk1")),
        model_created("m2", model_targets("multi", &["pk1", "pk2"])),
        ak_created("ak1", api_key(1, Some("ci"))),
        ak_created("ak2", api_key(2, None)),
        ak_created("ak3", api_key(3, Some("doomed"))),
        DomainEvent::ApiKeyDeleted { id: "ak3".into() },
        DomainEvent::ApiKeyUpdated {
            id: "ak1".into(),
            value: api_key(4, Some("ci-renamed")),
        },
    ])
    .state()
}

#[test]
fn reindex_after_serde_round_trip_gives_the_same_answers() {
    let original = busy_state();
    let json = serde_json::to_string(&original).unwrap();
    let mut loaded: State = serde_json::from_str(&json).unwrap();
    // The index is not serialized...
    assert_eq!(loaded.id_by_name(ResourceKind::ProviderKey, "east"), None);
    assert_ne!(loaded, original);
    // ...and reindex() rebuilds exactly what the fold built.
    loaded.reindex();
    assert_eq!(loaded, original);

    use ResourceKind::*;
    for (kind, name) in [
        (ProviderKey, "east"),
        (ProviderKey, "west"),
        (ProviderKey, "west-2"),
        (Model, "gpt"),
        (Model, "multi"),
        (ApiKey, "ci"),
        (ApiKey, "ci-renamed"),
        (ApiKey, "doomed"),
    ] {
        assert_eq!(
            loaded.id_by_name(kind, name),
            original.id_by_name(kind, name),
            "{kind} {name}"
        );
    }
    for n in 1..=5 {
        assert_eq!(
            loaded.id_by_key_hash(&hash(n)),
            original.id_by_key_hash(&hash(n))
        );
    }
    // The handler decides the same way on both.
    let commands = [
        create("pk9", ResourceValue::ProviderKey(pk("west-2"))),
        create("pk9", ResourceValue::ProviderKey(pk("west"))),
        create("ak9", ResourceValue::ApiKey(api_key(4, None))),
        create("ak9", ResourceValue::ApiKey(api_key(1, Some("ci")))),
        update(
            "m2",
            ResourceValue::Model(model("gpt", "pk1")),
            Some(1),
            false,
        ),
        delete(ResourceKind::ProviderKey, "pk2", None),
        delete(ResourceKind::ApiKey, "ak3", None),
    ];
    for c in commands {
        let a = handle(&original, &c).map_err(|e| e.to_string());
        let b = handle(&loaded, &c).map_err(|e| e.to_string());
        assert_eq!(a, b, "{c:?}");
    }
}

// ---------------------------------------------------------------- jwt providers

#[test]
fn create_jwt_provider_and_bind_identities() {
    let p = jwt_provider("entra", "https://login.example/t1/v2.0");
    let state = given([])
        .when(create("jp1", ResourceValue::JwtProvider(p.clone())))
        .then_expect(vec![jp_created("jp1", p)]);
    assert_eq!(
        state.id_by_name(ResourceKind::JwtProvider, "entra"),
        Some("jp1")
    );
    // Two identities of one provider: neither holds a key hash, so they do not clash.
    let by_subject = jwt_key("jp1", Some("oid-1"), &[]);
    let by_role = jwt_key("jp1", None, &[("roles", "Aigw.Caller")]);
    let state = Given { state }
        .when(create("ak1", ResourceValue::ApiKey(by_subject.clone())))
        .then_expect(vec![ak_created("ak1", by_subject)]);
    let state = Given { state }
        .when(create("ak2", ResourceValue::ApiKey(by_role.clone())))
        .then_expect(vec![ak_created("ak2", by_role)]);
    assert_eq!(state.id_by_key_hash(""), None);
    // A plain key still gets its hash checked.
    Given { state }
        .when(create("ak3", ResourceValue::ApiKey(api_key(1, None))))
        .then_expect(vec![ak_created("ak3", api_key(1, None))]);
}

#[test]
fn jwt_provider_names_and_issuers_are_unique() {
    let issuer = "https://login.example/t1/v2.0";
    let past = [jp_created("jp1", jwt_provider("entra", issuer))];
    let err = given(past.clone())
        .when(create(
            "jp2",
            ResourceValue::JwtProvider(jwt_provider("entra", "https://other.example")),
        ))
        .then_expect_error(is_duplicate);
    assert!(err.to_string().contains("display_name"), "{err}");
    let err = given(past.clone())
        .when(create(
            "jp2",
            ResourceValue::JwtProvider(jwt_provider("second", issuer)),
        ))
        .then_expect_error(is_duplicate);
    assert!(err.to_string().contains("issuer"), "{err}");
    // Updating itself with the same issuer is fine.
    let mut same = jwt_provider("entra", issuer);
    same.audiences.push("api://other".into());
    given(past)
        .when(update(
            "jp1",
            ResourceValue::JwtProvider(same.clone()),
            Some(1),
            false,
        ))
        .then_expect(vec![DomainEvent::JwtProviderUpdated {
            id: "jp1".into(),
            value: same,
        }]);
}

#[test]
fn jwt_bindings_reference_a_provider_and_one_subject_binds_one_key() {
    let err = given([])
        .when(create(
            "ak1",
            ResourceValue::ApiKey(jwt_key("nope", Some("oid-1"), &[])),
        ))
        .then_expect_error(is_reference);
    assert!(err.to_string().contains("jwt_provider_id"), "{err}");
    let past = [
        jp_created(
            "jp1",
            jwt_provider("entra", "https://login.example/t1/v2.0"),
        ),
        ak_created("ak1", jwt_key("jp1", Some("oid-1"), &[])),
    ];
    let err = given(past.clone())
        .when(create(
            "ak2",
            ResourceValue::ApiKey(jwt_key("jp1", Some("oid-1"), &[("roles", "x")])),
        ))
        .then_expect_error(is_duplicate);
    assert!(err.to_string().contains("jwt_subject"), "{err}");
    // Re-saving the same key is not a clash with itself.
    let again = jwt_key("jp1", Some("oid-1"), &[("roles", "x")]);
    given(past)
        .when(update(
            "ak1",
            ResourceValue::ApiKey(again.clone()),
            None,
            false,
        ))
        .then_expect(vec![DomainEvent::ApiKeyUpdated {
            id: "ak1".into(),
            value: again,
        }]);
}

#[test]
fn deleting_a_jwt_provider_in_use_names_the_api_key() {
    let mut named = jwt_key("jp1", Some("oid-1"), &[]);
    named.display_name = Some("payments-app".into());
    let past = [
        jp_created(
            "jp1",
            jwt_provider("entra", "https://login.example/t1/v2.0"),
        ),
        ak_created("ak1", named),
    ];
    let err = given(past.clone())
        .when(delete(ResourceKind::JwtProvider, "jp1", None))
        .then_expect_error(is_reference);
    assert!(err.to_string().contains("payments-app"), "{err}");
    let state = given(past)
        .when(delete(ResourceKind::ApiKey, "ak1", None))
        .then_expect(vec![DomainEvent::ApiKeyDeleted { id: "ak1".into() }]);
    let state = Given { state }
        .when(delete(ResourceKind::JwtProvider, "jp1", Some(1)))
        .then_expect(vec![DomainEvent::JwtProviderDeleted { id: "jp1".into() }]);
    assert!(state.jwt_providers.is_empty());
    assert_eq!(state.index, Default::default());
}

// ---------------------------------------------------------------- envelope

/// One of every event, with every optional field filled.
fn every_variant() -> Vec<DomainEvent> {
    let full_model = Model {
        routing: Some(Routing {
            strategy: RoutingStrategy::LeastLatency,
            retries: Some(2),
            retry_backoff: Some(HumanDuration(Duration::from_millis(250))),
            timeout: Some(HumanDuration(Duration::from_secs(30))),
            stream_idle_timeout: Some(HumanDuration(Duration::from_secs(90))),
            cooldown: Some(HumanDuration(Duration::from_secs(5))),
            first_token_timeout: Some(HumanDuration(Duration::from_secs(2))),
            health_check: Some(Box::new(aigw_shared::domain::HealthCheck {
                path: Some("/status-0123456789abcdef".into()),
                interval: Some(HumanDuration(Duration::from_secs(10))),
                timeout: Some(HumanDuration(Duration::from_secs(2))),
                unhealthy_after: Some(3),
                healthy_after: Some(2),
            })),
        }),
        rate_limit: Some(RateLimit {
            rpm: Some(60),
            tpm: Some(10_000),
            rpd: None,
            tpd: Some(1_000_000),
            concurrency: Some(4),
        }),
        cost: Some(Cost {
            input_per_1k: 0.0025,
            output_per_1k: 0.01,
        }),
        cache: Some(CacheConfig {
            enabled: true,
            ttl_seconds: Some(600),
            max_entries: Some(1000),
            max_bytes: None,
        }),
        ..model_targets("full", &["pk1", "pk2"])
    };
    let full_key = ApiKey {
        key_hash: hash(0xabc),
        allowed_models: vec!["gpt".into(), "multi".into()],
        display_name: Some("full".into()),
        rate_limit: Some(RateLimit {
            rpm: Some(10),
            ..Default::default()
        }),
        budget: Some(Budget {
            max_usd: 12.5,
            period: BudgetPeriod::Day,
        }),
        expires_at: Some(datetime!(2026-01-01 00:00:00 UTC)),
        disabled: true,
        ..Default::default()
    };
    let mut updated_key = full_key.clone();
    updated_key.expires_at = Some(datetime!(2027-03-04 05:06:07.5 +02:00));
    let mut pk_with_ca = pk("east-2");
    pk_with_ca.ca_pem =
        Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into());
    vec![
        pk_created("pk1", "east"),
        DomainEvent::ProviderKeyUpdated {
            id: "pk1".into(),
            value: pk_with_ca,
        },
        DomainEvent::ProviderKeyDeleted { id: "pk1".into() },
        model_created("m1", full_model.clone()),
        DomainEvent::ModelUpdated {
            id: "m1".into(),
            value: model("gpt", "pk1"),
        },
        DomainEvent::ModelDeleted { id: "m1".into() },
        ak_created("ak1", full_key),
        DomainEvent::ApiKeyUpdated {
            id: "ak1".into(),
            value: updated_key,
        },
        DomainEvent::ApiKeyDeleted { id: "ak1".into() },
        jp_created(
            "jp1",
            jwt_provider("entra", "https://login.example/t1/v2.0"),
        ),
        DomainEvent::JwtProviderUpdated {
            id: "jp1".into(),
            value: JwtProvider {
                jwks_uri: Some("https://login.example/t1/keys".into()),
                claim_mappings: ClaimMappings {
                    caller_id: vec!["appid".into()],
                },
                clock_skew: HumanDuration(Duration::from_secs(120)),
                ..jwt_provider("entra", "https://login.example/t1/v2.0")
            },
        },
        ak_created(
            "ak2",
            jwt_key("jp1", Some("oid-1"), &[("roles", "Aigw.Caller")]),
        ),
        DomainEvent::JwtProviderDeleted { id: "jp1".into() },
        node_issued("dp-1", "c1"),
        DomainEvent::NodeCredentialResealed {
            id: "dp-1".into(),
            credential_id: "c1".into(),
            seal_key: sealed("c1-new"),
        },
        DomainEvent::NodeCredentialRevoked {
            id: "dp-1".into(),
            credential_id: Some("c1".into()),
        },
    ]
}

fn node_credential(id: &str) -> NodeCredential {
    NodeCredential {
        id: id.into(),
        token_sha256: format!("{:0>64}", id),
        seal_key: sealed(id),
        issued_at: "2025-06-01T12:34:56Z".into(),
        description: None,
    }
}

fn node_issued(node: &str, credential: &str) -> DomainEvent {
    DomainEvent::NodeCredentialIssued {
        id: node.into(),
        credential: node_credential(credential),
    }
}

fn issue(node: &str, credential: &str) -> Command {
    Command::IssueNodeCredential {
        node_id: node.into(),
        credential: node_credential(credential),
    }
}

#[test]
fn a_node_holds_at_most_two_credentials_for_a_rotation() {
    let state = given([])
        .when(issue("dp-1", "c1"))
        .then_expect(vec![node_issued("dp-1", "c1")]);
    let state = given_state(state)
        .when(issue("dp-1", "c2"))
        .then_expect(vec![node_issued("dp-1", "c2")]);
    assert_eq!(state.nodes["dp-1"].value.credentials.len(), 2);
    assert_eq!(state.revision(ResourceKind::Node, "dp-1"), Some(2));
    let err = given_state(state.clone())
        .when(issue("dp-1", "c3"))
        .then_expect_error(|e| matches!(e, Error::Invalid(_)));
    assert!(err.to_string().contains("revoke one"), "{err}");
    // The old one revoked, a new one may follow.
    let state = given_state(state)
        .when(Command::RevokeNodeCredential {
            node_id: "dp-1".into(),
            credential_id: "c1".into(),
            expected_revision: Some(2),
        })
        .then_expect(vec![DomainEvent::NodeCredentialRevoked {
            id: "dp-1".into(),
            credential_id: Some("c1".into()),
        }]);
    let ids: Vec<&str> = state.nodes["dp-1"]
        .value
        .credentials
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(ids, ["c2"]);
    given_state(state)
        .when(issue("dp-1", "c3"))
        .then_expect(vec![node_issued("dp-1", "c3")]);
}

#[test]
fn node_credentials_are_unique_and_revocations_name_what_exists() {
    let given_two = || given([node_issued("dp-1", "c1")]);
    // The same credential id or token for another node is refused.
    given_two()
        .when(issue("dp-2", "c1"))
        .then_expect_error(is_duplicate);
    given_two()
        .when(Command::RevokeNodeCredential {
            node_id: "dp-1".into(),
            credential_id: "nope".into(),
            expected_revision: None,
        })
        .then_expect_error(|e| matches!(e, Error::NotFound { .. }));
    given_two()
        .when(Command::RevokeNodeCredential {
            node_id: "dp-1".into(),
            credential_id: "c1".into(),
            expected_revision: Some(7),
        })
        .then_expect_error(|e| matches!(e, Error::StaleRevision { current: 1, .. }));
    // Deleting the node revokes all of them; the node id is gone.
    let state = given([node_issued("dp-1", "c1"), node_issued("dp-1", "c2")])
        .when(delete(ResourceKind::Node, "dp-1", None))
        .then_expect(vec![DomainEvent::NodeCredentialRevoked {
            id: "dp-1".into(),
            credential_id: None,
        }]);
    assert!(state.nodes.is_empty());
    given_state(state)
        .when(delete(ResourceKind::Node, "dp-1", None))
        .then_expect_error(|e| matches!(e, Error::NotFound { .. }));
}

#[test]
fn node_credential_digests_and_keys_are_masked_in_the_audit_log() {
    let stored = StoredEvent {
        seq: 1,
        at: AT,
        actor: "admin".into(),
        event: node_issued("dp-1", "c1"),
    };
    let shown = stored.masked_payload().to_string();
    assert!(
        !shown.contains("CIPHERTEXT") && !shown.contains("000c1"),
        "{shown}"
    );
    assert!(shown.contains("dp-1"), "{shown}");
}

fn given_state(state: State) -> Given {
    Given { state }
}

#[test]
fn encode_decode_round_trips_every_variant() {
    let mut seen = [false; 15];
    for (i, event) in every_variant().into_iter().enumerate() {
        // Exhaustive on purpose: a new variant must be added to every_variant().
        let slot = match &event {
            DomainEvent::ProviderKeyCreated { .. } => 0,
            DomainEvent::ProviderKeyUpdated { .. } => 1,
            DomainEvent::ProviderKeyDeleted { .. } => 2,
            DomainEvent::ModelCreated { .. } => 3,
            DomainEvent::ModelUpdated { .. } => 4,
            DomainEvent::ModelDeleted { .. } => 5,
            DomainEvent::ApiKeyCreated { .. } => 6,
            DomainEvent::ApiKeyUpdated { .. } => 7,
            DomainEvent::ApiKeyDeleted { .. } => 8,
            DomainEvent::JwtProviderCreated { .. } => 9,
            DomainEvent::JwtProviderUpdated { .. } => 10,
            DomainEvent::JwtProviderDeleted { .. } => 11,
            DomainEvent::NodeCredentialIssued { .. } => 12,
            DomainEvent::NodeCredentialRevoked { .. } => 13,
            DomainEvent::NodeCredentialResealed { .. } => 14,
        };
        seen[slot] = true;
        let stored = StoredEvent {
            seq: 1000 + i as u64,
            at: AT,
            actor: "admin:ops".into(),
            event,
        };
        let bytes = stored.encode().unwrap();
        let env: Value = serde_json::from_slice(&bytes).unwrap();
        let type_name = stored.event.type_name();
        assert_eq!(env["type"], type_name);
        assert_eq!(env["version"], schema_version(type_name));
        assert_eq!(env["seq"], stored.seq);
        assert_eq!(env["actor"], "admin:ops");
        assert_eq!(env["at"], "2025-06-01T12:34:56.123456789Z");
        assert_eq!(env["payload"]["id"], stored.event.resource().1);
        let back = StoredEvent::decode(&bytes).unwrap();
        assert_eq!(back, stored);
        assert_eq!(back.encode().unwrap(), bytes, "re-encoding is stable");
    }
    assert!(
        seen.iter().all(|s| *s),
        "every_variant() misses a variant: {seen:?}"
    );
}

#[test]
fn decode_rejects_garbage_and_unknown_types() {
    assert!(matches!(
        StoredEvent::decode(b"not json"),
        Err(Error::Storage(_))
    ));
    let env = serde_json::json!({
        "seq": 1, "at": "2025-01-01T00:00:00Z", "actor": "x",
        "type": "Nonsense", "version": 1, "payload": {"id": "a"},
    });
    assert!(matches!(
        StoredEvent::decode(&serde_json::to_vec(&env).unwrap()),
        Err(Error::Storage(_))
    ));
}

#[test]
fn decodes_a_provider_key_event_written_before_ca_pem() {
    let env = serde_json::json!({
        "seq": 3, "at": "2025-01-01T00:00:00Z", "actor": "admin:old",
        "type": "ProviderKeyCreated", "version": 1,
        "payload": {"id": "pk1", "value": {
            "display_name": "east", "provider": "azure", "adapter": "azure-openai",
            "secret": {"nonce": "NONCE-east", "ciphertext": "CIPHERTEXT-east"},
            "api_base": "https://example.openai.azure.com", "api_version": "2024-10-21",
        }},
    });
    let decoded = StoredEvent::decode(&serde_json::to_vec(&env).unwrap()).unwrap();
    assert_eq!(decoded.event, pk_created("pk1", "east"));
    // And it is written back the same way (no `ca_pem: null`), as v2.
    let mut again: Value = serde_json::from_slice(&decoded.encode().unwrap()).unwrap();
    assert_eq!(again["version"], 2);
    again["version"] = 1.into();
    assert_eq!(again, env);
}

fn v1_api_key_envelope(type_name: &str, expires_at: Value) -> Vec<u8> {
    let mut value = serde_json::json!({
        "key_hash": hash(42),
        "allowed_models": ["*"],
        "display_name": "legacy",
        "disabled": false,
    });
    if !expires_at.is_null() {
        value["expires_at"] = expires_at;
    }
    serde_json::to_vec(&serde_json::json!({
        "seq": 17,
        "at": "2025-02-03T04:05:06Z",
        "actor": "admin:legacy",
        "type": type_name,
        "version": 1,
        "payload": { "id": "ak-legacy", "value": value },
    }))
    .unwrap()
}

#[test]
fn upcasts_v1_api_key_epoch_seconds_to_rfc3339() {
    for type_name in ["ApiKeyCreated", "ApiKeyUpdated"] {
        let decoded =
            StoredEvent::decode(&v1_api_key_envelope(type_name, 1_767_225_600.into())).unwrap();
        assert_eq!(decoded.seq, 17);
        assert_eq!(decoded.at, datetime!(2025-02-03 04:05:06 UTC));
        assert_eq!(decoded.actor, "admin:legacy");
        let (DomainEvent::ApiKeyCreated { id, value } | DomainEvent::ApiKeyUpdated { id, value }) =
            &decoded.event
        else {
            panic!("decoded as {decoded:?}");
        };
        assert_eq!(decoded.event.type_name(), type_name);
        assert_eq!(id, "ak-legacy");
        assert_eq!(value.expires_at, Some(datetime!(2026-01-01 00:00:00 UTC)));
        assert_eq!(value.display_name.as_deref(), Some("legacy"));

        // Written back, it is a v2 event with RFC 3339 text.
        let env: Value = serde_json::from_slice(&decoded.encode().unwrap()).unwrap();
        assert_eq!(env["version"], 2);
        assert_eq!(
            env["payload"]["value"]["expires_at"],
            "2026-01-01T00:00:00Z"
        );
    }
    // No expiry in v1 stays none.
    let decoded = StoredEvent::decode(&v1_api_key_envelope("ApiKeyCreated", Value::Null)).unwrap();
    let DomainEvent::ApiKeyCreated { value, .. } = decoded.event else {
        panic!()
    };
    assert_eq!(value.expires_at, None);
}

#[test]
fn v1_provider_keys_on_plain_http_keep_working_after_the_upcast() {
    // Given keys stored before plain http needed `allow_insecure_upstream`,
    for (base, allowed) in [
        ("http://127.0.0.1:8080", Some(true)),
        ("HTTP://mock:80", Some(true)),
        ("https://acme.openai.azure.com", None),
        ("acme", None),
    ] {
        let payload = serde_json::json!({"id": "pk", "value": {"api_base": base}});
        // when they are read with this build,
        let up = upcast("ProviderKeyUpdated", 1, payload).unwrap();
        // then only the http ones are marked as allowed, and nothing else changes.
        assert_eq!(
            up["value"]["allow_insecure_upstream"].as_bool(),
            allowed,
            "{base}"
        );
        assert_eq!(up["value"]["api_base"], base);
    }
}

#[test]
fn upcast_helper_directly() {
    let payload = serde_json::json!({"id": "a", "value": {"expires_at": 0}});
    let up = upcast("ApiKeyUpdated", 1, payload).unwrap();
    assert_eq!(up["value"]["expires_at"], "1970-01-01T00:00:00Z");
    // Current version: untouched.
    let payload = serde_json::json!({"id": "a", "value": {"expires_at": "2026-01-01T00:00:00Z"}});
    assert_eq!(
        upcast("ApiKeyCreated", 2, payload.clone()).unwrap(),
        payload
    );
    // Out-of-range seconds are an error, not a panic.
    let payload = serde_json::json!({"id": "a", "value": {"expires_at": i64::MAX}});
    assert!(matches!(
        upcast("ApiKeyCreated", 1, payload),
        Err(Error::Storage(_))
    ));
}

#[test]
fn a_version_newer_than_this_build_is_an_error() {
    let stored = StoredEvent {
        seq: 1,
        at: AT,
        actor: "x".into(),
        event: ak_created("ak1", api_key(1, None)),
    };
    let mut env: Value = serde_json::from_slice(&stored.encode().unwrap()).unwrap();
    env["version"] = 3.into();
    let err = StoredEvent::decode(&serde_json::to_vec(&env).unwrap()).unwrap_err();
    assert!(
        matches!(&err, Error::Storage(m) if m.contains("newer")),
        "{err:?}"
    );

    // Likewise for an event type still at v1.
    let stored = StoredEvent {
        event: DomainEvent::ModelDeleted { id: "m".into() },
        ..stored
    };
    let mut env: Value = serde_json::from_slice(&stored.encode().unwrap()).unwrap();
    assert_eq!(env["version"], 1);
    env["version"] = 2.into();
    assert!(matches!(
        StoredEvent::decode(&serde_json::to_vec(&env).unwrap()),
        Err(Error::Storage(_))
    ));
}

#[test]
fn masked_payload_never_contains_the_sealed_secret() {
    for event in every_variant() {
        let stored = StoredEvent {
            seq: 1,
            at: AT,
            actor: "x".into(),
            event,
        };
        let masked = stored.masked_payload();
        let text = masked.to_string();
        assert!(!text.contains("NONCE-"), "{text}");
        assert!(!text.contains("CIPHERTEXT-"), "{text}");
        let mut raw = serde_json::to_value(&stored.event).unwrap()["payload"].take();
        match &stored.event {
            DomainEvent::ProviderKeyCreated { .. } | DomainEvent::ProviderKeyUpdated { .. } => {
                assert_eq!(masked["value"]["secret"], MASKED);
                // Everything else is shown as stored.
                raw["value"]["secret"] = MASKED.into();
                assert_eq!(masked, raw);
                // The stored envelope does carry the sealed secret (sealed, never clear).
                let stored_text = String::from_utf8(stored.encode().unwrap()).unwrap();
                assert!(stored_text.contains("CIPHERTEXT-"));
            }
            DomainEvent::NodeCredentialResealed { .. } => {
                raw["seal_key"] = MASKED.into();
                assert_eq!(masked, raw);
            }
            DomainEvent::NodeCredentialIssued { .. } => {
                raw["credential"]["token_sha256"] = MASKED.into();
                raw["credential"]["seal_key"] = MASKED.into();
                assert_eq!(masked, raw);
            }
            _ => assert_eq!(masked, raw),
        }
    }
}

// ---------------------------------------------------------------- fallbacks

/// Model `name` on pk1 falling back (when unavailable) to `to`.
fn falling_back(name: &str, to: &[&str]) -> Model {
    let mut m = model(name, "pk1");
    m.fallbacks.unavailable = to.iter().map(|s| (*s).to_string()).collect();
    m
}

fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::Invalid(_))
}

#[test]
fn a_fallback_must_name_an_existing_model() {
    let e = given([pk_created("pk1", "east")])
        .when(create("a", ResourceValue::Model(falling_back("a", &["b"]))))
        .then_expect_error(is_reference);
    assert!(e.to_string().contains("`b`"), "{e}");
    given([
        pk_created("pk1", "east"),
        model_created("b", model("b", "pk1")),
    ])
    .when(create("a", ResourceValue::Model(falling_back("a", &["b"]))))
    .then_expect(vec![model_created("a", falling_back("a", &["b"]))]);
}

#[test]
fn fallback_cycles_are_refused() {
    let e = given([
        pk_created("pk1", "east"),
        model_created("b", model("b", "pk1")),
        model_created("a", falling_back("a", &["b"])),
    ])
    .when(update(
        "b",
        ResourceValue::Model(falling_back("b", &["a"])),
        None,
        false,
    ))
    .then_expect_error(is_invalid);
    assert!(e.to_string().contains("cycle"), "{e}");
}

#[test]
fn fallback_chains_are_at_most_three_deep() {
    let base = || {
        vec![
            pk_created("pk1", "east"),
            model_created("e", model("e", "pk1")),
            model_created("d", falling_back("d", &["e"])),
            model_created("c", falling_back("c", &["d"])),
        ]
    };
    // b → c → d → e: three hops.
    given(base())
        .when(create("b", ResourceValue::Model(falling_back("b", &["c"]))))
        .then_expect(vec![model_created("b", falling_back("b", &["c"]))]);
    let mut four = base();
    four.push(model_created("b", falling_back("b", &["c"])));
    let e = given(four)
        .when(create("a", ResourceValue::Model(falling_back("a", &["b"]))))
        .then_expect_error(is_invalid);
    assert!(e.to_string().contains("4 deep"), "{e}");
}

#[test]
fn a_model_named_as_a_fallback_cannot_be_deleted_or_renamed_away() {
    let given_pair = || {
        given([
            pk_created("pk1", "east"),
            model_created("b", model("b", "pk1")),
            model_created("a", falling_back("a", &["b"])),
        ])
    };
    given_pair()
        .when(delete(ResourceKind::Model, "b", None))
        .then_expect_error(is_reference);
    given_pair()
        .when(update(
            "b",
            ResourceValue::Model(model("b2", "pk1")),
            None,
            false,
        ))
        .then_expect_error(is_reference);
    // The model that falls back may go.
    given_pair()
        .when(delete(ResourceKind::Model, "a", None))
        .then_expect(vec![DomainEvent::ModelDeleted { id: "a".into() }]);
}

use super::*;

const T0: u64 = 1_800_000_000_000;

fn rl(f: impl FnOnce(&mut RateLimit)) -> RateLimit {
    let mut r = RateLimit::default();
    f(&mut r);
    r
}

struct Node {
    limiter: Limiter,
    key: Arc<Scope>,
    model: Arc<Scope>,
    key_limits: RateLimit,
    model_limits: RateLimit,
}

impl Node {
    fn new(key_limits: RateLimit, model_limits: RateLimit) -> Self {
        let limiter = Limiter::default();
        let key = limiter.scope("key/k1", &key_limits);
        let model = limiter.scope("model/gpt", &model_limits);
        Self {
            limiter,
            key,
            model,
            key_limits,
            model_limits,
        }
    }

    fn checks(&self) -> [Check<'_>; 2] {
        [
            Check {
                scope: &self.key,
                limits: &self.key_limits,
                what: "api key",
                id: "k1",
            },
            Check {
                scope: &self.model,
                limits: &self.model_limits,
                what: "model",
                id: "gpt",
            },
        ]
    }

    fn call(&self, tokens: u64, now: u64) -> Result<Permit, Rejection> {
        self.limiter.acquire_at(&self.checks(), tokens, now)
    }

    fn synced(self, nodes: u64) -> Self {
        self.limiter.fleet.set_synced(true);
        self.limiter.fleet.set_nodes(nodes);
        self
    }
}

#[test]
fn rpm_admits_the_limit_then_refuses_until_the_oldest_call_leaves_the_window() {
    let n = Node::new(rl(|r| r.rpm = Some(5)), RateLimit::default());
    for i in 0..5 {
        // One call every 2 s: the first leaves the window at T0 + 60 s.
        std::mem::forget(n.call(0, T0 + i * 2_000).expect("under the limit"));
    }
    let r = n.call(0, T0 + 10_000).unwrap_err();
    assert_eq!((r.what, r.limit, r.value), ("api key", "rpm", 5));
    assert_eq!(r.retry_after, Duration::from_millis(50_000));
    assert!(r.to_string().contains("5 requests per minute"), "{r}");
    assert!(n.call(0, T0 + 59_999).is_err());
    assert!(n.call(0, T0 + 60_000).is_ok(), "the first call has left");
    assert!(n.call(0, T0 + 60_001).is_err(), "and only it");
}

#[test]
fn every_limit_must_pass_and_a_refusal_counts_nothing() {
    let n = Node::new(rl(|r| r.rpm = Some(10)), rl(|r| r.rpm = Some(2)));
    let _a = n.call(0, T0).unwrap();
    let _b = n.call(0, T0).unwrap();
    let r = n.call(0, T0).unwrap_err();
    assert_eq!((r.what, r.id.as_str()), ("model", "gpt"));
    // The key was not charged for the refused call: 8 of its 10 remain.
    let n2 = Node {
        model_limits: RateLimit::default(),
        ..n
    };
    for _ in 0..8 {
        std::mem::forget(n2.call(0, T0).unwrap());
    }
    assert_eq!(n2.call(0, T0).unwrap_err().what, "api key");
}

#[test]
fn tokens_are_reserved_then_corrected_to_the_real_count() {
    let n = Node::new(rl(|r| r.tpm = Some(1_000)), RateLimit::default());
    let mut p = n.call(600, T0).unwrap();
    assert_eq!(p.headers().tokens, Some((1_000, 400)));
    assert_eq!(
        n.call(500, T0).unwrap_err().limit,
        "tpm",
        "600 reserved + 500 > 1000"
    );
    // The call used 100 tokens, not 600: 900 are free again.
    p.settle(100);
    p.settle(50); // settles once
    let q = n.call(900, T0 + 100).unwrap();
    assert_eq!(q.headers().tokens, Some((1_000, 0)));
    // At the limit even a call estimated at 0 tokens is refused.
    assert!(n.call(0, T0 + 200).is_err());
}

#[test]
fn the_most_constraining_limit_goes_in_the_headers() {
    let n = Node::new(
        rl(|r| {
            r.rpm = Some(100);
            r.rpd = Some(3);
        }),
        rl(|r| r.rpm = Some(10)),
    );
    let p = n.call(0, T0).unwrap();
    assert_eq!(p.headers().requests, Some((3, 2)));
    assert_eq!(p.headers().tokens, None);
}

#[test]
fn concurrency_slots_are_released_when_permits_drop() {
    let n = Node::new(rl(|r| r.concurrency = Some(4)), RateLimit::default());
    let held: Vec<Permit> = (0..4).map(|_| n.call(0, T0).unwrap()).collect();
    let r = n.call(0, T0).unwrap_err();
    assert_eq!(r.limit, "concurrency");
    assert_eq!(n.key.in_flight(), (4, 4));
    drop(held);
    assert_eq!(n.key.in_flight(), (0, 4));
    assert!(n.call(0, T0).is_ok());
    assert_eq!(
        n.key.in_flight().0,
        0,
        "the temporary permit dropped at once"
    );
}

#[test]
fn without_the_fleet_a_node_takes_an_even_share() {
    let n = Node::new(rl(|r| r.rpm = Some(600)), RateLimit::default());
    n.limiter.fleet.set_nodes(3);
    let admitted = (0..1_000)
        .filter_map(|i| n.call(0, T0 + i).ok())
        .map(std::mem::forget)
        .count();
    assert_eq!(admitted, 200);
}

/// Three nodes exchanging their counts every sync interval, as `sync` does
/// over NATS, with calls arriving at all of them.
struct Fleet3 {
    nodes: Vec<Node>,
    peers: Vec<Arc<str>>,
}

impl Fleet3 {
    fn new(key_limits: RateLimit) -> Self {
        Self {
            nodes: (0..3)
                .map(|_| Node::new(key_limits, RateLimit::default()).synced(3))
                .collect(),
            peers: (0..3).map(|i| Arc::from(format!("n{i}/s"))).collect(),
        }
    }

    /// One broadcast round: everybody sends its changes, everybody mirrors them.
    fn sync(&self, full: bool) {
        for (i, from) in self.nodes.iter().enumerate() {
            let (windows, in_flight) = from.limiter.collect(full);
            let msg = aigw_shared::proto::limits::v1::LimitSync {
                node_id: format!("n{i}"),
                session: "s".into(),
                full,
                windows,
                in_flight,
                ..Default::default()
            };
            for (j, to) in self.nodes.iter().enumerate() {
                if i != j {
                    to.limiter.apply(&self.peers[i], &msg);
                }
            }
            from.limiter.fleet.next_epoch();
        }
    }
}

#[test]
fn a_synced_fleet_admits_the_limit_across_nodes() {
    // 1,800 calls a minute offered, evenly over three nodes, for two
    // minutes; 5 sync rounds a second (slower than the real 20).
    let f = Fleet3::new(rl(|r| r.rpm = Some(600)));
    let mut admitted_at = Vec::new();
    for tick in 0..600u64 {
        let now = T0 + tick * 200;
        for _ in 0..2 {
            for (i, n) in f.nodes.iter().enumerate() {
                if n.call(0, now + i as u64).map(std::mem::forget).is_ok() {
                    admitted_at.push(now);
                }
            }
        }
        f.sync(tick % 5 == 0);
    }
    for minute in 0..2 {
        let start = T0 + minute * 60_000;
        let n = admitted_at
            .iter()
            .filter(|&&t| (start..start + 60_000).contains(&t))
            .count();
        assert!((598..=602).contains(&n), "minute {minute}: {n} admitted");
    }
    // Any 60 s span, not just whole minutes, stays within the bound.
    for start in (T0..T0 + 60_000).step_by(1_000) {
        let n = admitted_at
            .iter()
            .filter(|&&t| (start..start + 60_000).contains(&t))
            .count();
        assert!(n <= 602, "{n} admitted in the 60 s from {start}");
    }
}

#[test]
fn tokens_settled_on_one_node_free_room_on_the_others() {
    let f = Fleet3::new(rl(|r| r.tpm = Some(1_000)));
    let mut p = f.nodes[0].call(900, T0).unwrap();
    f.sync(false);
    assert!(f.nodes[1].call(200, T0 + 10).is_err(), "900 of 1000 in use");
    p.settle(100);
    f.sync(false);
    assert!(f.nodes[1].call(800, T0 + 20).is_ok());
}

#[test]
fn a_full_state_replaces_what_a_lost_message_left_stale() {
    let f = Fleet3::new(rl(|r| r.rpm = Some(10)));
    // Five calls each on two nodes, over several sync intervals (a node
    // takes at most a third of what is left per interval)...
    let admit = |n: &Node| {
        for _ in 0..5 {
            let p = n.call(0, T0).or_else(|_| {
                n.limiter.fleet.next_epoch();
                n.call(0, T0)
            });
            std::mem::forget(p.unwrap());
        }
    };
    admit(&f.nodes[0]);
    // ...whose incremental broadcasts are lost...
    let _ = f.nodes[0].limiter.collect(false);
    admit(&f.nodes[1]);
    let _ = f.nodes[1].limiter.collect(false);
    // ...but the next full state carries everything.
    f.sync(true);
    assert!(
        f.nodes[2].call(0, T0 + 1).is_err(),
        "10 of 10 across the fleet"
    );
}

#[test]
fn peers_in_flight_count_and_are_forgotten_with_the_peer() {
    let f = Fleet3::new(rl(|r| r.concurrency = Some(2)));
    let a = f.nodes[0].call(0, T0).unwrap();
    let b = f.nodes[1].call(0, T0).unwrap();
    f.sync(false);
    assert_eq!(f.nodes[2].call(0, T0).unwrap_err().limit, "concurrency");
    drop(a);
    f.sync(false);
    let c = f.nodes[2].call(0, T0).unwrap();
    drop((b, c));
    f.sync(false);
    let held: Vec<_> = (0..2).map(|_| f.nodes[2].call(0, T0).unwrap()).collect();
    f.sync(false);
    assert!(f.nodes[0].call(0, T0).is_err());
    f.nodes[0].limiter.forget_peer(&f.peers[2]);
    assert!(
        f.nodes[0].call(0, T0).is_ok(),
        "a silent peer's calls are gone"
    );
    drop(held);
}

#[test]
fn mirrors_of_departed_peers_go_once_their_counts_expire() {
    let f = Fleet3::new(rl(|r| r.rpm = Some(100)));
    std::mem::forget(f.nodes[1].call(0, T0).unwrap());
    std::mem::forget(f.nodes[2].call(0, T0).unwrap());
    f.sync(false);
    let peers = |n: &Node| {
        lock(&n.key.state).windows[Kind::RequestsPerMinute.index()]
            .as_ref()
            .map_or(0, |w| w.peers.len())
    };
    assert_eq!(peers(&f.nodes[0]), 2);
    // Node 2 leaves; its admission still counts while it is in the window.
    let live = |p: &Arc<str>| p.as_ref() != "n2/s";
    f.nodes[0].limiter.prune(&live, T0 + 1_000);
    assert_eq!(peers(&f.nodes[0]), 2);
    f.nodes[0].limiter.prune(&live, T0 + 61_000);
    assert_eq!(
        peers(&f.nodes[0]),
        1,
        "the live peer stays, even with nothing counted"
    );
}

#[test]
fn a_huge_token_estimate_never_switches_the_token_limit_off() {
    // Issue 17 row 2: 2^63 tokens was cast to a negative reservation.
    for huge in [1u64 << 63, u64::MAX, i64::MAX as u64] {
        let n = Node::new(rl(|r| r.tpm = Some(1_000)), RateLimit::default());
        assert_eq!(n.call(huge, T0).unwrap_err().limit, "tpm", "{huge}");
        let _first = n.call(900, T0).unwrap();
        assert_eq!(
            n.call(900, T0).unwrap_err().limit,
            "tpm",
            "a second 900-token call does not fit in 1,000 ({huge})"
        );
    }
    // Synced with peers too, and a settle with a bogus usage report.
    let n = Node::new(rl(|r| r.tpm = Some(1_000)), RateLimit::default()).synced(3);
    assert!(n.call(u64::MAX, T0).is_err());
    let mut p = n.call(300, T0).unwrap();
    p.settle(u64::MAX);
    assert!(
        n.call(1, T0 + 100).is_err(),
        "the huge usage fills the window"
    );
}

#[test]
fn hostile_peer_counts_are_clamped_not_wrapped() {
    use aigw_shared::proto::limits::v1::{LimitSync, Measure, WindowCounts};
    let n = Node::new(rl(|r| r.tpm = Some(1_000)), RateLimit::default()).synced(2);
    let bucket = Kind::TokensPerMinute.bucket_of(T0);
    let msg = |counts: Vec<i64>, first_bucket: u64| LimitSync {
        full: false,
        windows: vec![WindowCounts {
            scope: "key/k1".into(),
            measure: Measure::TokensPerMinute as i32,
            first_bucket,
            counts,
        }],
        ..Default::default()
    };
    let peers: [Arc<str>; 2] = [Arc::from("p1"), Arc::from("p2")];
    n.limiter
        .apply(&peers[0], &msg(vec![i64::MAX, i64::MAX], bucket - 1));
    n.limiter.apply(&peers[1], &msg(vec![i64::MAX], bucket));
    n.limiter.apply(&peers[1], &msg(vec![1], u64::MAX));
    assert_eq!(n.call(1, T0).unwrap_err().limit, "tpm");
    n.limiter
        .apply(&peers[0], &msg(vec![i64::MIN, i64::MIN], bucket - 1));
    n.limiter.apply(&peers[1], &msg(vec![i64::MIN], bucket));
    let p = n.call(900, T0);
    assert!(
        p.is_ok(),
        "negative counts never make room beyond the limit"
    );
    assert!(n.call(200, T0).is_err());
}

mod properties {
    //! The limiter's arithmetic on any input: no panic (tests build with
    //! overflow checks), a window's total is its buckets' sum, and what one
    //! node admits into a minute never exceeds its limit.
    use super::*;
    use proptest::prelude::*;

    /// Token counts: ordinary ones and the edges of `u64` / `i64`.
    fn tokens() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..2_000,
            Just(u64::MAX),
            Just(1u64 << 63),
            Just(i64::MAX as u64),
            any::<u64>(),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Call(u64),
        Settle(usize, u64),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            tokens().prop_map(Op::Call),
            (any::<usize>(), tokens()).prop_map(|(i, t)| Op::Settle(i, t)),
            any::<usize>().prop_map(Op::Drop),
        ]
    }

    proptest! {
        #[test]
        fn one_minute_never_admits_more_than_the_limit(
            limit in prop_oneof![1u64..5_000, Just(u64::MAX), any::<u64>()],
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let n = Node::new(rl(|r| r.tpm = Some(limit)), RateLimit::default());
            // Each permit with what the window counts for it: the estimate,
            // then the reported usage once settled.
            let mut held: Vec<(Permit, i128, bool)> = Vec::new();
            let mut forgotten: i128 = 0;
            for op in ops {
                let counted = forgotten + held.iter().map(|h| h.1).sum::<i128>();
                match op {
                    Op::Call(t) => {
                        if let Ok(p) = n.call(t, T0) {
                            let cost = i128::from(window::cost_of(t));
                            prop_assert!(
                                cost == 0 || counted + cost <= i128::from(limit),
                                "admitted {cost} on top of {counted} under {limit}"
                            );
                            held.push((p, cost, false));
                        }
                    }
                    Op::Settle(i, t) if !held.is_empty() => {
                        let len = held.len();
                        let h = &mut held[i % len];
                        h.0.settle(t);
                        if !std::mem::replace(&mut h.2, true) {
                            h.1 = i128::from(window::cost_of(t));
                        }
                    }
                    Op::Drop(i) if !held.is_empty() => {
                        // A dropped permit's tokens stay counted.
                        forgotten += held.swap_remove(i % held.len()).1;
                    }
                    _ => {}
                }
            }
        }

        #[test]
        fn a_ring_total_is_the_sum_of_its_buckets(
            ops in proptest::collection::vec((0u64..1_500, any::<i64>(), any::<bool>()), 1..80),
        ) {
            let mut r = Ring::new(Kind::TokensPerMinute);
            for (bucket, v, set) in ops {
                if set {
                    r.set(bucket, v);
                } else {
                    r.add(bucket, v);
                }
                let sum: i128 = (r.oldest()..=r.head()).map(|b| i128::from(r.get(b))).sum();
                prop_assert_eq!(i128::from(r.total()), sum.max(0));
            }
        }
    }
}

//! The whole fleet as processes on this machine: one control plane, three
//! data planes and a real `nats-server` (JetStream). Admin setup, calls
//! through every node, then a rolling restart of the data planes under
//! continuous load: each node in turn leaves the client's rotation (as a load
//! balancer does when readiness/endpoints change), gets SIGTERM, must drain
//! its in-flight streams and exit 0, is started again on the same config and
//! rejoins once ready. Zero failed calls; usage totals exact.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, control_plane_version, start_fleet, ProxyClient};
use aigw_tests::fixtures::{api_key, model_on, provider_key_at};
use aigw_tests::mock_azure::{expected_answer, expected_usage, Behaviour, MockAzure};
use aigw_tests::nats::NatsServer;
use aigw_tests::process::poll_until;
use aigw_tests::usage::{assert_totals, Totals};
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FAST: &str = "gpt-4o-azure";
/// Streams with a pause between SSE events, so streams are in flight when a
/// node gets SIGTERM.
const SLOW: &str = "gpt-4o-slow-stream";
const CALLER: &str = "sk-fleet-caller";
const NODES: usize = 3;
const WORKERS: usize = 12;
/// USD per 1k tokens: exact in nano-USD.
const IN_PER_1K: f64 = 0.5;
const OUT_PER_1K: f64 = 1.5;

fn nanos(prompt: u64, completion: u64) -> u64 {
    prompt * (IN_PER_1K * 1e6) as u64 + completion * (OUT_PER_1K * 1e6) as u64
}

/// Call `i`: every 2nd streams from the slow deployment, every 4th streams
/// from the fast one, the rest are plain JSON; lengths vary. (Periods 2 and 4
/// are coprime with the 3 nodes of the round robin, so every node gets every
/// kind.)
fn call_body(i: usize) -> Value {
    let text = "word ".repeat(1 + i % 23);
    let slow = i.is_multiple_of(2);
    let mut body = chat_body(if slow { SLOW } else { FAST }, &text);
    if slow || i % 4 == 1 {
        body["stream"] = json!(true);
    }
    body
}

/// Checks a finished call's answer; returns what it must add to usage.
fn check(i: usize, body: &Value, status: u16, text: &str) -> Result<Totals> {
    ensure!(status == 200, "call {i}: HTTP {status}: {text}");
    if body["stream"] == json!(true) {
        ensure!(
            text.ends_with("data: [DONE]\n\n"),
            "call {i}: unterminated stream: {text}"
        );
    } else {
        let v: Value = serde_json::from_str(text).with_context(|| format!("call {i}: {text}"))?;
        ensure!(
            v["choices"][0]["message"]["content"] == json!(expected_answer(body)),
            "call {i}: wrong answer {v}"
        );
    }
    let (prompt, completion) = expected_usage(body);
    Ok(Totals {
        requests: 1,
        errors: 0,
        prompt,
        completion,
        cost_nanos: nanos(prompt, completion),
    })
}

/// One call, read whole.
async fn call(client: &ProxyClient, i: usize) -> Result<Totals> {
    let body = call_body(i);
    let r = client.chat(&body).await?;
    check(i, &body, r.status.as_u16(), &r.text)
}

/// A node as the client-side load balancer sees it.
struct Slot {
    client: ProxyClient,
    in_rotation: bool,
    /// Calls sent to this node that have no response headers yet: the node
    /// may not have accepted them. A node leaves only when this is zero.
    dispatching: usize,
    /// Calls sent to this node and not finished (headers or not).
    open: usize,
    /// Calls finished on this node.
    served: usize,
}

#[derive(Default)]
struct Balancer {
    slots: Mutex<Vec<Slot>>,
    next: AtomicUsize,
}

impl Balancer {
    /// The next node in rotation (round robin); marks the call dispatching.
    fn pick(&self) -> Option<(usize, ProxyClient)> {
        let mut slots = self.slots.lock().unwrap();
        let n = slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let idx = (start + k) % n;
            let s = &mut slots[idx];
            if s.in_rotation {
                s.dispatching += 1;
                s.open += 1;
                return Some((idx, s.client.clone()));
            }
        }
        None
    }

    fn with<T>(&self, idx: usize, f: impl FnOnce(&mut Slot) -> T) -> T {
        f(&mut self.slots.lock().unwrap()[idx])
    }
}

#[derive(Default)]
struct LoadState {
    stop: AtomicBool,
    next_call: AtomicUsize,
    done: AtomicUsize,
    totals: Mutex<Totals>,
    failures: Mutex<Vec<String>>,
}

/// A load worker: calls through the balancer until told to stop. Every
/// failure is recorded (the test requires none).
async fn worker(lb: Arc<Balancer>, st: Arc<LoadState>) {
    while !st.stop.load(Ordering::Relaxed) {
        let Some((node, client)) = lb.pick() else {
            st.failures
                .lock()
                .unwrap()
                .push("no node in rotation".into());
            return;
        };
        let i = st.next_call.fetch_add(1, Ordering::Relaxed);
        let body = call_body(i);
        let sent = client
            .request(Method::POST, "/v1/chat/completions")
            .json(&body)
            .send()
            .await;
        lb.with(node, |s| s.dispatching -= 1);
        let result = match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.text().await {
                    Ok(text) => check(i, &body, status, &text),
                    Err(e) => {
                        Err(anyhow::Error::new(e).context(format!("call {i}: reading the body")))
                    }
                }
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("call {i}: sending"))),
        };
        lb.with(node, |s| {
            s.open -= 1;
            s.served += 1;
        });
        match result {
            Ok(t) => *st.totals.lock().unwrap() += t,
            Err(e) => st
                .failures
                .lock()
                .unwrap()
                .push(format!("node-{node}: {e:#}")),
        }
        st.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits until `n` more calls than now have finished.
async fn progress(st: &LoadState, n: usize) -> Result<()> {
    let target = st.done.load(Ordering::Relaxed) + n;
    poll_until(
        &format!("{n} more calls"),
        1500,
        Duration::from_millis(20),
        || {
            let d = st.done.load(Ordering::Relaxed);
            let failed = !st.failures.lock().unwrap().is_empty();
            async move {
                ensure!(!failed, "a call failed");
                Ok((d >= target).then_some(()))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_of_three_nodes_under_load_fails_nothing_and_loses_no_usage() -> Result<()>
{
    let started = Instant::now();
    let mock = MockAzure::start().await;
    mock.add_deployment("gpt4o-prod", "gpt-4o-mini-2024-07-18");
    mock.add_deployment("slow", "gpt-4o-mini-2024-07-18");
    mock.set_behaviour(
        "slow",
        Behaviour::SlowStream {
            chunk_delay: Duration::from_millis(15),
        },
    );
    let nats = NatsServer::start().await?;
    let cp = ControlPlane::start_with(
        Options::default().with_config(json!({"nats": {"url": nats.url()}})),
    )
    .await?;

    // Admin setup.
    let admin = cp.rest();
    let pk = admin
        .create_id(
            "provider_keys",
            &provider_key_at("azure-prod", "test-azure-key", &mock.base_url()),
        )
        .await?;
    for (alias, dep) in [(FAST, "gpt4o-prod"), (SLOW, "slow")] {
        let mut m = model_on(alias, dep, &pk);
        m["cost"] = json!({"input_per_1k": IN_PER_1K, "output_per_1k": OUT_PER_1K});
        admin.create("models", &m).await?;
    }
    admin
        .create("apikeys", &api_key(CALLER, &[FAST, SLOW]))
        .await?;

    let mut nodes = start_fleet(&cp, &nats.url(), NODES).await?;
    let version = control_plane_version(&admin).await?;

    // Calls through every node.
    let mut expected = Totals::default();
    let mut i = 0;
    for dp in &nodes {
        let c = dp.client(Some(CALLER));
        for _ in 0..30 {
            expected += call(&c, i).await?;
            i += 1;
        }
    }
    let warmup = i;

    // Continuous load through a client-side balancer over the three nodes.
    let lb = Arc::new(Balancer::default());
    *lb.slots.lock().unwrap() = nodes
        .iter()
        .map(|dp| Slot {
            client: dp.client(Some(CALLER)),
            in_rotation: true,
            dispatching: 0,
            open: 0,
            served: 0,
        })
        .collect();
    let st = Arc::new(LoadState::default());
    st.next_call.store(warmup, Ordering::Relaxed);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(worker(lb.clone(), st.clone())))
        .collect();
    progress(&st, 200).await?;

    // Rolling restart, one node at a time.
    let mut drained = Vec::new();
    for (idx, dp) in nodes.iter_mut().enumerate() {
        // Leave the rotation at a moment when the node has accepted calls
        // still in flight (mostly slow streams), so SIGTERM must drain them.
        poll_until(
            "the node to have accepted calls in flight",
            1500,
            Duration::from_millis(2),
            || {
                let left = lb.with(idx, |s| {
                    let leave = s.open > s.dispatching;
                    if leave {
                        s.in_rotation = false;
                    }
                    leave
                });
                async move { Ok(left.then_some(())) }
            },
        )
        .await?;
        // Every call already sent to it has reached it (has headers): from
        // here on it only has in-flight work, no new calls.
        poll_until(
            "calls dispatched to the leaving node to be accepted",
            1500,
            Duration::from_millis(2),
            || {
                let n = lb.with(idx, |s| s.dispatching);
                async move { Ok((n == 0).then_some(())) }
            },
        )
        .await?;
        let in_flight = lb.with(idx, |s| s.open);
        let t0 = Instant::now();
        let status = dp.terminate().await?;
        ensure!(
            status.success(),
            "node-{idx} exited with {status} after SIGTERM\n{}",
            dp.logs()
        );
        let stop_took = t0.elapsed();
        ensure!(
            lb.with(idx, |s| s.open) == 0,
            "node-{idx} exited with calls still open"
        );
        dp.start_again().await?;
        dp.wait_version(version).await?;
        let served_before = lb.with(idx, |s| {
            s.client = dp.client(Some(CALLER));
            s.in_rotation = true;
            s.served
        });
        drained.push((in_flight, stop_took));
        println!("node-{idx}: {in_flight} calls in flight at SIGTERM, exited 0 after {stop_took:?}, back in rotation");
        progress(&st, 150).await?;
        ensure!(
            lb.with(idx, |s| s.served) > served_before,
            "node-{idx} served nothing after its restart"
        );
    }

    st.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    let failures = st.failures.lock().unwrap().clone();
    ensure!(
        failures.is_empty(),
        "{} failed calls, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let in_flight_total: usize = drained.iter().map(|d| d.0).sum();
    ensure!(
        in_flight_total > 0,
        "no call was in flight at any SIGTERM, so draining was not exercised"
    );

    let load = *st.totals.lock().unwrap();
    expected += load;
    let calls = st.done.load(Ordering::Relaxed);
    assert_totals(&admin, expected, 600).await?;
    let served: Vec<usize> = lb.slots.lock().unwrap().iter().map(|s| s.served).collect();
    println!(
        "{} calls ({warmup} warm-up + {calls} under load, per node {served:?}), 0 failed; \
         {in_flight_total} in flight across the 3 SIGTERMs; usage exact: {expected:?}; took {:?}",
        warmup + calls,
        started.elapsed()
    );
    Ok(())
}

//! The Responses API end to end (issue 20, part 2), against the mock
//! Azure's Responses endpoints (`aigw_tests::mock_azure`, OpenAI's wire
//! format as Azure serves it).
//!
//! - one gateway: JSON and SSE (event order kept, usage accounted exactly
//!   from `response.completed`), follow-ups, reads by id, input items,
//!   background + polling, cancel, delete, Azure's preview route, retries
//!   before the first byte, never cached, and ids that are not the caller's
//!   (another key's, forged, tampered, truncated) refused with a 404 that
//!   never reaches Azure;
//! - a 3-node fleet over two Azure resources: follow-ups and reads served
//!   by other nodes after the node that created the responses is gone reach
//!   the resource that stores each response.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{
    expect_openai_error, start_fleet, wait_standalone_synced, ProxyClient,
};
use aigw_tests::fixtures::{api_key, mock_provider_key, model_on, provider_key_at};
use aigw_tests::mock_azure::{
    expected_response_text, expected_response_usage, Behaviour, MockAzure, DEFAULT_API_KEY,
};
use aigw_tests::nats::NatsServer;
use aigw_tests::process::poll_until;
use aigw_tests::rest::AdminClient;
use aigw_tests::usage::{assert_totals, Totals};
use aigw_tests::Resp;
use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const DEP: &str = "resp-dep";
const AZURE_MODEL: &str = "gpt-4o-2024-11-20";
/// The seed's alias for the Responses API, with the response cache on (it
/// must never be used).
const RESP: &str = "gpt-4o-resp";
/// Two targets: a failing one first, then `DEP`.
const RETRY: &str = "gpt-4o-retry";
const FLAKY: &str = "resp-flaky";
/// On a deployment whose streams are cut before `response.completed`.
const CUT: &str = "gpt-4o-cut";
const CUT_DEP: &str = "resp-cut";
/// On a provider key pinned to a dated preview version.
const PREVIEW: &str = "gpt-4o-preview";
const PREVIEW_VERSION: &str = "2025-04-01-preview";
const CALLER: &str = "sk-responses";
const OTHER: &str = "sk-responses-other";
/// Used only for the calls whose usage is checked exactly.
const ACCOUNTED: &str = "sk-responses-accounted";

fn create(model: &str, input: &str) -> Value {
    json!({"model": model, "input": input})
}

async fn post(client: &ProxyClient, path: &str, body: &Value) -> Result<Resp> {
    client.post_json(path, body).await
}

async fn call(client: &ProxyClient, method: Method, path: &str) -> Result<Resp> {
    ProxyClient::send(client.request(method, path)).await
}

fn ok(resp: &Resp) -> Result<Value> {
    ensure!(
        resp.status.as_u16() == 200,
        "expected 200, got {}: {}",
        resp.status,
        resp.text
    );
    resp.json()
}

fn output_text(v: &Value) -> &str {
    v["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
}

/// `(event name, data)` of each event of a Responses stream.
fn events(text: &str) -> Result<Vec<(String, Value)>> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .with_context(|| format!("no event name: {e}"))?;
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .with_context(|| format!("no data: {e}"))?;
            Ok((name.to_string(), serde_json::from_str(data)?))
        })
        .collect()
}

/// Usage totals of one api key (`group_by=api_key`).
async fn usage_of(admin: &AdminClient, api_key_id: &str) -> Result<Totals> {
    let v: Value = admin
        .get("/admin/v1/usage?group_by=api_key")
        .await?
        .expect(200)?;
    let mut t = Totals::default();
    for row in v["rows"].as_array().cloned().unwrap_or_default() {
        if row["group"]["api_key"] != api_key_id {
            continue;
        }
        t.requests += row["requests"].as_u64().unwrap_or(0);
        t.errors += row["errors"].as_u64().unwrap_or(0);
        t.prompt += row["prompt_tokens"].as_u64().unwrap_or(0);
        t.completion += row["completion_tokens"].as_u64().unwrap_or(0);
    }
    Ok(t)
}

async fn wait_usage(admin: &AdminClient, api_key_id: &str, requests: u64) -> Result<Totals> {
    poll_until(
        "the usage of the key to count its calls",
        100,
        Duration::from_millis(100),
        || async {
            let t = usage_of(admin, api_key_id).await?;
            Ok((t.requests >= requests).then_some(t))
        },
    )
    .await
}

struct Gateway {
    mock: MockAzure,
    cp: ControlPlane,
    client: ProxyClient,
    accounted_id: String,
}

async fn gateway() -> Result<Gateway> {
    let mock = MockAzure::start().await;
    for d in [DEP, FLAKY, CUT_DEP] {
        mock.add_deployment(d, AZURE_MODEL);
    }
    mock.set_behaviour(CUT_DEP, Behaviour::StreamNoDone);
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    let mut resp = model_on(RESP, DEP, &pk);
    resp["cache"] = json!({"enabled": true, "ttl_seconds": 300});
    admin.create("models", &resp).await?;
    admin
        .create(
            "models",
            &json!({"display_name": RETRY, "provider": "azure", "routing": {"retries": 2},
            "targets": [
                {"provider_key_id": pk, "model_name": FLAKY, "priority": 0},
                {"provider_key_id": pk, "model_name": DEP, "priority": 1},
            ]}),
        )
        .await?;
    admin.create("models", &model_on(CUT, CUT_DEP, &pk)).await?;
    let mut preview_key = provider_key_at("azure-preview", DEFAULT_API_KEY, &mock.base_url());
    preview_key["api_version"] = json!(PREVIEW_VERSION);
    let preview_pk = admin.create_id("provider_keys", &preview_key).await?;
    admin
        .create("models", &model_on(PREVIEW, DEP, &preview_pk))
        .await?;
    admin
        .create("apikeys", &api_key(CALLER, &[RESP, RETRY, CUT, PREVIEW]))
        .await?;
    admin.create("apikeys", &api_key(OTHER, &[RESP])).await?;
    let accounted_id = admin
        .create_id("apikeys", &api_key(ACCOUNTED, &[RESP]))
        .await?;
    wait_standalone_synced(&cp).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    Ok(Gateway {
        mock,
        cp,
        client,
        accounted_id,
    })
}

#[tokio::test]
async fn responses_on_one_gateway() -> Result<()> {
    let g = gateway().await?;
    let (mock, client) = (&g.mock, &g.client);

    // JSON: the caller's id is sealed, `model` is the alias, Azure got the
    // deployment in the body on its v1 route.
    let body = create(RESP, "hello there");
    let first = ok(&post(client, "/v1/responses", &body).await?)?;
    let id = first["id"].as_str().context("id")?.to_string();
    ensure!(id.starts_with("resp_") && id.len() > 60, "{id}");
    ensure!(first["model"] == RESP, "{first}");
    ensure!(
        output_text(&first) == expected_response_text(&body),
        "{first}"
    );
    let up = mock.last_request(DEP).context("no upstream call")?;
    ensure!(
        up.path == "/openai/v1/responses" && up.query.is_empty(),
        "{up:?}"
    );
    ensure!(up.json()["model"] == DEP, "{}", up.json());
    ensure!(!up.json().to_string().contains(RESP));

    // Never cached, even deterministic and on a caching model.
    let det = json!({"model": RESP, "input": "same", "temperature": 0});
    let before = mock.requests(DEP);
    for _ in 0..2 {
        let r = post(client, "/v1/responses", &det).await?;
        ok(&r)?;
        ensure!(r.header("x-aigw-cache").is_none(), "{:?}", r.headers);
    }
    ensure!(mock.requests(DEP) == before + 2, "both calls reached Azure");

    // Follow-up: Azure gets its own id; the caller sees its own back.
    let next = json!({"model": RESP, "input": "and again", "previous_response_id": id});
    let second = ok(&post(client, "/openai/v1/responses", &next).await?)?;
    ensure!(second["previous_response_id"] == id.as_str(), "{second}");
    let up_prev = mock.last_request(DEP).context("upstream")?.json()["previous_response_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(up_prev != id && mock.stores_response(&up_prev), "{up_prev}");

    // Reads by id, input items.
    let got = ok(&call(client, Method::GET, &format!("/v1/responses/{id}")).await?)?;
    ensure!(got["id"] == id.as_str() && got["model"] == RESP, "{got}");
    ensure!(output_text(&got) == expected_response_text(&body), "{got}");
    let items = ok(&call(
        client,
        Method::GET,
        &format!("/v1/responses/{id}/input_items?limit=10"),
    )
    .await?)?;
    ensure!(items["object"] == "list", "{items}");
    ensure!(
        items["data"][0]["content"][0]["text"] == "hello there",
        "{items}"
    );
    ensure!(mock.last_request(DEP).context("upstream")?.query == "limit=10");

    // Ids that are not this caller's: 404, and Azure never asked.
    let calls = mock.total_requests();
    let other = client.with_key(Some(OTHER));
    let r = call(&other, Method::GET, &format!("/v1/responses/{id}")).await?;
    expect_openai_error(&r, 404, "response_not_found")?;
    let r = call(&other, Method::DELETE, &format!("/v1/responses/{id}")).await?;
    expect_openai_error(&r, 404, "response_not_found")?;
    let mut tampered: Vec<char> = id.chars().collect();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    for bad in [
        tampered.as_str(),
        &id[..id.len() - 4],
        "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "nope",
    ] {
        let r = call(client, Method::GET, &format!("/v1/responses/{bad}")).await?;
        expect_openai_error(&r, 404, "response_not_found")?;
        let r = call(client, Method::POST, &format!("/v1/responses/{bad}/cancel")).await?;
        expect_openai_error(&r, 404, "response_not_found")?;
        let forged = json!({"model": RESP, "input": "x", "previous_response_id": bad});
        let r = post(client, "/v1/responses", &forged).await?;
        let e = expect_openai_error(&r, 404, "response_not_found")?;
        ensure!(e["param"] == "previous_response_id", "{e}");
    }
    let r = post(
        &other,
        "/v1/responses",
        &json!({"model": RESP, "input": "x", "previous_response_id": id}),
    )
    .await?;
    expect_openai_error(&r, 404, "response_not_found")?;
    ensure!(mock.total_requests() == calls, "a refused id reached Azure");

    // Malformed bodies.
    for bad in [
        json!({"model": RESP}),
        json!({"model": RESP, "input": 3}),
        json!({"model": RESP, "input": "x", "max_output_tokens": 0}),
        json!({"model": RESP, "input": "x", "background": "yes"}),
    ] {
        let r = post(client, "/v1/responses", &bad).await?;
        ensure!(r.status.as_u16() == 400, "{bad}: {} {}", r.status, r.text);
    }

    // Stream: the events in Azure's order, ids sealed alike in every event.
    let streamed = json!({"model": RESP, "input": "stream this please", "stream": true});
    let r = post(client, "/v1/responses", &streamed).await?;
    ensure!(r.status.as_u16() == 200, "{}", r.text);
    ensure!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        r.headers
    );
    ensure!(!r.text.contains("[DONE]"), "{}", r.text);
    let ev = events(&r.text)?;
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        names.first() == Some(&"response.created")
            && names.get(1) == Some(&"response.in_progress")
            && names.last() == Some(&"response.completed"),
        "{names:?}"
    );
    for (i, (name, data)) in ev.iter().enumerate() {
        ensure!(
            data["type"] == name.as_str() && data["sequence_number"] == i,
            "{data}"
        );
    }
    let text: String = ev
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    ensure!(text == expected_response_text(&streamed), "{text}");
    let (created, completed) = (&ev[0].1["response"], &ev[ev.len() - 1].1["response"]);
    ensure!(created["id"] == completed["id"], "{created} {completed}");
    ensure!(completed["model"] == RESP, "{completed}");
    let streamed_id = completed["id"].as_str().unwrap_or_default();
    let got = ok(&call(client, Method::GET, &format!("/v1/responses/{streamed_id}")).await?)?;
    ensure!(got["status"] == "completed", "{got}");

    // A stream cut before `response.completed` ends with an error event.
    let r = post(
        client,
        "/v1/responses",
        &json!({"model": CUT, "input": "cut me", "stream": true}),
    )
    .await?;
    let ev = events(&r.text)?;
    ensure!(
        ev.last()
            .is_some_and(|(n, d)| n == "error" && d["type"] == "error"),
        "{}",
        r.text
    );

    // Background: queued, then polled to completion; cancel; delete.
    let bg = json!({"model": RESP, "input": "in the background", "background": true});
    let queued = ok(&post(client, "/v1/responses", &bg).await?)?;
    ensure!(
        queued["status"] == "queued" && queued["usage"].is_null(),
        "{queued}"
    );
    let bg_id = queued["id"].as_str().unwrap_or_default().to_string();
    let done = poll_until(
        "the background response to complete",
        100,
        Duration::from_millis(50),
        || async {
            let v = ok(&call(client, Method::GET, &format!("/v1/responses/{bg_id}")).await?)?;
            Ok((v["status"] == "completed").then_some(v))
        },
    )
    .await?;
    ensure!(output_text(&done) == expected_response_text(&bg), "{done}");
    ensure!(done["id"] == bg_id.as_str(), "{done}");
    let to_cancel = ok(&post(client, "/v1/responses", &bg).await?)?;
    let cancel_id = to_cancel["id"].as_str().unwrap_or_default();
    let cancelled = ok(&call(
        client,
        Method::POST,
        &format!("/v1/responses/{cancel_id}/cancel"),
    )
    .await?)?;
    ensure!(
        cancelled["status"] == "cancelled" && cancelled["id"] == cancel_id,
        "{cancelled}"
    );
    let deleted = ok(&call(client, Method::DELETE, &format!("/v1/responses/{bg_id}")).await?)?;
    ensure!(
        deleted == json!({"id": bg_id, "object": "response.deleted", "deleted": true}),
        "{deleted}"
    );
    let r = call(client, Method::GET, &format!("/v1/responses/{bg_id}")).await?;
    expect_openai_error(&r, 404, "response_not_found")?;
    // A follow-up of a deleted response: unknown to Azure, so to the caller.
    let r = post(
        client,
        "/v1/responses",
        &json!({"model": RESP, "input": "x", "previous_response_id": bg_id}),
    )
    .await?;
    let e = expect_openai_error(&r, 404, "response_not_found")?;
    ensure!(e["param"] == "previous_response_id", "{e}");
    ensure!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains(&bg_id[..20])),
        "{e}"
    );

    // Retries before the first byte: the first target fails, the next answers.
    mock.set_behaviour(
        FLAKY,
        Behaviour::Fail {
            status: 503,
            body: "{}".into(),
        },
    );
    let r = post(client, "/v1/responses", &create(RETRY, "retry me")).await?;
    let v = ok(&r)?;
    ensure!(output_text(&v) == expected_response_text(&create(RETRY, "retry me")));
    ensure!(
        r.header("x-aigw-served-by") == Some("azure/resp-dep"),
        "{:?}",
        r.headers
    );
    ensure!(mock.requests(FLAKY) == 1, "one failed attempt");
    // A follow-up of it goes to its provider key (the same resource).
    let r = post(
        client,
        "/v1/responses",
        &json!({"model": RETRY, "input": "more", "previous_response_id": v["id"]}),
    )
    .await?;
    ok(&r)?;

    // Azure's preview route, Azure's shape; the key's preview api-version upstream.
    let anon = ProxyClient::new(&g.cp.proxy_url(), None);
    let az = |rb: reqwest::RequestBuilder| rb.header("api-key", CALLER);
    let r = ProxyClient::send(
        az(anon.request(
            Method::POST,
            "/openai/responses?api-version=2025-03-01-preview",
        ))
        .json(&create(PREVIEW, "via azure")),
    )
    .await?;
    let v = ok(&r)?;
    ensure!(
        v["model"] == AZURE_MODEL,
        "Azure's model on Azure's route: {v}"
    );
    let up = mock.last_request(DEP).context("upstream")?;
    ensure!(
        up.path == "/openai/responses" && up.query == format!("api-version={PREVIEW_VERSION}"),
        "{up:?}"
    );
    let az_id = v["id"].as_str().unwrap_or_default();
    let r = ProxyClient::send(az(anon.request(
        Method::GET,
        &format!("/openai/responses/{az_id}?api-version=2025-03-01-preview"),
    )))
    .await?;
    ensure!(ok(&r)?["id"] == az_id);
    let r = ProxyClient::send(az(anon.request(
        Method::GET,
        "/openai/responses/resp_forged?api-version=2025-03-01-preview",
    )))
    .await?;
    ensure!(r.status.as_u16() == 404, "{}", r.text);
    ensure!(
        r.json()?["error"]["code"] == "404",
        "Azure's error shape: {}",
        r.text
    );

    // Usage, exactly as Azure reported it: JSON, stream, follow-up, a read.
    let acct = client.with_key(Some(ACCOUNTED));
    let mut expected = Totals::default();
    let a = create(RESP, "count me exactly");
    let v = ok(&post(&acct, "/v1/responses", &a).await?)?;
    let s = json!({"model": RESP, "input": "and me as a stream", "stream": true});
    let r = post(&acct, "/v1/responses", &s).await?;
    ensure!(
        r.status.as_u16() == 200 && r.text.contains("response.completed"),
        "{}",
        r.text
    );
    let f = json!({"model": RESP, "input": "and me after", "previous_response_id": v["id"]});
    ok(&post(&acct, "/v1/responses", &f).await?)?;
    ok(&call(
        &acct,
        Method::GET,
        &format!("/v1/responses/{}", v["id"].as_str().unwrap_or_default()),
    )
    .await?)?;
    for b in [&a, &s, &f] {
        let (p, c) = expected_response_usage(b);
        expected.prompt += p;
        expected.completion += c;
    }
    expected.requests = 4;
    let got = wait_usage(&g.cp.rest(), &g.accounted_id, 4).await?;
    ensure!(got == expected, "usage {got:?} != {expected:?}");
    // Totals over every key: nothing counted twice.
    let all = aigw_tests::usage::usage_totals(&g.cp.rest()).await?;
    assert_totals(&g.cp.rest(), all, 5).await?;
    Ok(())
}

/// A 3-node fleet over two Azure resources: responses created through
/// node 0 are followed up through node 1 and read through node 2 once node 0
/// is gone, each reaching the resource that stores it.
#[tokio::test]
async fn follow_ups_reach_the_storing_resource_from_any_node() -> Result<()> {
    let west = MockAzure::start().await;
    let east = MockAzure::start().await;
    for m in [&west, &east] {
        m.add_deployment(DEP, AZURE_MODEL);
    }
    let nats = NatsServer::start().await?;
    let cp = ControlPlane::start_with(
        Options::default().with_config(json!({"nats": {"url": nats.url()}})),
    )
    .await?;
    let admin = cp.rest();
    let pk_west = admin
        .create_id(
            "provider_keys",
            &provider_key_at("west", DEFAULT_API_KEY, &west.base_url()),
        )
        .await?;
    let pk_east = admin
        .create_id(
            "provider_keys",
            &provider_key_at("east", DEFAULT_API_KEY, &east.base_url()),
        )
        .await?;
    admin
        .create(
            "models",
            &json!({"display_name": RESP, "provider": "azure", "routing": {"strategy": "round_robin"},
                "targets": [
                    {"provider_key_id": pk_west, "model_name": DEP},
                    {"provider_key_id": pk_east, "model_name": DEP},
                ]}),
        )
        .await?;
    admin.create("apikeys", &api_key(CALLER, &[RESP])).await?;
    admin.create("apikeys", &api_key(OTHER, &[RESP])).await?;
    let mut nodes = start_fleet(&cp, &nats.url(), 3).await?;
    let urls: Vec<String> = nodes.iter().map(|n| n.proxy_url()).collect();
    let client = |i: usize, key: &str| ProxyClient::new(&urls[i], Some(key));

    let mut expected = Totals::default();
    let count = |expected: &mut Totals, body: &Value| {
        let (p, c) = expected_response_usage(body);
        expected.requests += 1;
        expected.prompt += p;
        expected.completion += c;
    };
    let mut created: HashMap<String, String> = HashMap::new();
    let first = client(0, CALLER);
    for i in 0..6 {
        let body = create(RESP, &format!("turn one of conversation {i}"));
        let r = post(&first, "/v1/responses", &body).await?;
        let v = ok(&r)?;
        let served = r
            .header("x-aigw-served-by")
            .context("served by")?
            .to_string();
        created.insert(v["id"].as_str().context("id")?.to_string(), served);
        count(&mut expected, &body);
    }
    let regions: std::collections::HashSet<&String> = created.values().collect();
    ensure!(
        regions.len() == 2,
        "both resources store responses: {created:?}"
    );
    ensure!(west.stored_responses() + east.stored_responses() == 6);
    nodes[0].terminate().await?;

    let second = client(1, CALLER);
    let third = client(2, CALLER);
    for (id, served) in &created {
        let body = json!({"model": RESP, "input": "turn two", "previous_response_id": id});
        let r = post(&second, "/v1/responses", &body).await?;
        let v = ok(&r)?;
        ensure!(
            r.header("x-aigw-served-by") == Some(served.as_str()),
            "follow-up of {served}'s response served by {:?}",
            r.header("x-aigw-served-by")
        );
        ensure!(v["previous_response_id"] == id.as_str(), "{v}");
        count(&mut expected, &body);
        let r = call(&third, Method::GET, &format!("/v1/responses/{id}")).await?;
        ensure!(ok(&r)?["id"] == id.as_str());
        ensure!(r.header("x-aigw-served-by") == Some(served.as_str()));
        expected.requests += 1;
    }
    ensure!(west.stored_responses() + east.stored_responses() == 12);
    // Another key's caller cannot read them, from any node.
    let (id, _) = created.iter().next().context("one")?;
    let r = call(
        &client(2, OTHER),
        Method::GET,
        &format!("/v1/responses/{id}"),
    )
    .await?;
    expect_openai_error(&r, 404, "response_not_found")?;
    expected.requests += 1;
    expected.errors += 1;
    assert_totals(&admin, expected, 100).await
}

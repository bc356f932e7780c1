//! Rate limits through the real binaries: requests and tokens per minute
//! with the `x-ratelimit-*` headers and 429 `rate_limit_exceeded`, tokens
//! estimated then corrected with the real usage, concurrency that never
//! exceeds its limit and never leaks across cancellations.

use aigw_tests::control_plane::{ControlPlane, Options};
use aigw_tests::data_plane::{chat_body, expect_openai_error, wait_standalone_synced, ProxyClient};
use aigw_tests::fixtures::{api_key, mock_provider_key, model_on};
use aigw_tests::mock_azure::{Behaviour, MockAzure};
use aigw_tests::process::poll_until;
use aigw_tests::rest::Resp;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

const ALIAS: &str = "gpt-4o-limited";
const DEP: &str = "gpt4o-prod";
const CALLER: &str = "sk-limited-caller";

/// A standalone gateway with one model and one key carrying `key_limit`
/// (and the model `model_limit`).
async fn setup(key_limit: Value, model_limit: Value) -> Result<(MockAzure, ControlPlane)> {
    let mock = MockAzure::start().await;
    mock.add_deployment(DEP, "gpt-4o-2024-11-20");
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    let admin = cp.rest();
    let pk = mock_provider_key(&admin, &mock).await?;
    let mut m = model_on(ALIAS, DEP, &pk);
    if !model_limit.is_null() {
        m["rate_limit"] = model_limit;
    }
    admin.create("models", &m).await?;
    let mut k = api_key(CALLER, &[ALIAS]);
    if !key_limit.is_null() {
        k["rate_limit"] = key_limit;
    }
    admin.create("apikeys", &k).await?;
    wait_standalone_synced(&cp).await?;
    Ok((mock, cp))
}

fn header(r: &Resp, name: &str) -> Result<u64> {
    r.headers
        .get(name)
        .with_context(|| format!("no {name} header ({} {})", r.status, r.text))?
        .to_str()?
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

async fn metrics(cp: &ControlPlane) -> Result<String> {
    Ok(
        reqwest::get(format!("{}/metrics", cp.data_plane_metrics_url()))
            .await?
            .text()
            .await?,
    )
}

#[tokio::test]
async fn rpm_answers_429_with_retry_after_and_counts_down_in_headers() -> Result<()> {
    let (mock, cp) = setup(json!({"rpm": 3}), Value::Null).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    for remaining in [2, 1, 0] {
        let r = client.chat(&chat_body(ALIAS, "hello")).await?;
        ensure!(r.status == 200, "{} {}", r.status, r.text);
        ensure!(header(&r, "x-ratelimit-limit-requests")? == 3);
        ensure!(header(&r, "x-ratelimit-remaining-requests")? == remaining);
        ensure!(r.headers.get("x-ratelimit-limit-tokens").is_none());
    }
    let r = client.chat(&chat_body(ALIAS, "hello")).await?;
    let err = expect_openai_error(&r, 429, "rate_limit_exceeded")?;
    ensure!(err["type"] == "rate_limit_error", "{err}");
    let msg = err["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("api key") && msg.contains("3 requests per minute"),
        "{msg}"
    );
    let retry = header(&r, "retry-after")?;
    ensure!((1..=60).contains(&retry), "retry-after {retry}");
    ensure!(header(&r, "retry-after-ms")? <= 60_000);
    ensure!(header(&r, "x-ratelimit-remaining-requests")? == 0);
    ensure!(mock.requests(DEP) == 3, "the refused call reached Azure");
    // The refusal is a rejection in the metrics and a 429 in usage.
    let text = metrics(&cp).await?;
    ensure!(
        text.contains("aigw_rejections_total{reason=\"rate_limit\"} 1"),
        "{text}"
    );
    ensure!(text.contains("aigw_ratelimit_fleet_sync 0"), "{text}");
    Ok(())
}

#[tokio::test]
async fn tokens_are_reserved_from_the_estimate_and_corrected_with_real_usage() -> Result<()> {
    let (mock, cp) = setup(Value::Null, json!({"tpm": 2000})).await?;
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    let mut body = chat_body(ALIAS, "How many tokens will this prompt take?");
    body["max_tokens"] = json!(500);

    let first = client.chat(&body).await?;
    ensure!(first.status == 200, "{}", first.text);
    ensure!(header(&first, "x-ratelimit-limit-tokens")? == 2000);
    let estimate = 2000 - header(&first, "x-ratelimit-remaining-tokens")?;
    // o200k: the prompt is ~10 tokens, plus framing, plus max_tokens.
    ensure!(
        (510..=530).contains(&estimate),
        "estimate {estimate} for a 10-token prompt and max_tokens 500"
    );
    let used = first.json()?["usage"]["total_tokens"]
        .as_u64()
        .context("usage")?;
    ensure!(used < estimate);

    // The first call was settled at its real usage before the second was
    // admitted: only `used` tokens of it still count.
    let second = client.chat(&body).await?;
    ensure!(second.status == 200, "{}", second.text);
    ensure!(
        header(&second, "x-ratelimit-remaining-tokens")? == 2000 - used - estimate,
        "remaining {} after a call that used {used}",
        header(&second, "x-ratelimit-remaining-tokens")?
    );

    // A call whose estimate alone is over the limit is refused up front.
    body["max_tokens"] = json!(5000);
    let r = client.chat(&body).await?;
    let err = expect_openai_error(&r, 429, "rate_limit_exceeded")?;
    ensure!(
        err["message"].as_str().is_some_and(
            |m| m.contains("model `gpt-4o-limited`") && m.contains("tokens per minute")
        ),
        "{err}"
    );
    ensure!(mock.requests(DEP) == 2);

    // A cache-less streamed call is settled too, from its usage chunk.
    body["max_tokens"] = json!(100);
    body["stream"] = json!(true);
    let r = client.chat(&body).await?;
    ensure!(r.status == 200 && r.text.ends_with("data: [DONE]\n\n"));
    let before = header(&r, "x-ratelimit-remaining-tokens")?;
    body["stream"] = json!(false);
    let r = client.chat(&body).await?;
    let streamed_estimate = 2000 - used * 2 - before;
    let after = header(&r, "x-ratelimit-remaining-tokens")?;
    ensure!(
        before - after < streamed_estimate,
        "the stream's estimate ({streamed_estimate}) was not corrected: {before} → {after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_never_exceeds_the_limit_across_cancellations() -> Result<()> {
    let (mock, cp) = setup(json!({"concurrency": 4}), Value::Null).await?;
    // Streams of a dozen chunks 30 ms apart: ~0.4 s in flight each.
    mock.set_behaviour(
        DEP,
        Behaviour::SlowStream {
            chunk_delay: Duration::from_millis(30),
        },
    );
    let client = ProxyClient::new(&cp.proxy_url(), Some(CALLER));
    let mut body = chat_body(ALIAS, "count slowly to twelve please");
    body["stream"] = json!(true);

    // Eight rounds of ten simultaneous calls; every admitted call with an
    // odd index is abandoned after its first chunk, the rest read whole.
    let (mut admitted, mut refused) = (0, 0);
    for round in 0..8 {
        let calls = (0..10).map(|i| {
            let rb = client
                .request(reqwest::Method::POST, "/v1/chat/completions")
                .json(&body);
            async move {
                let resp = rb.send().await?;
                let status = resp.status().as_u16();
                if status != 200 {
                    let text = resp.text().await?;
                    return Ok::<_, anyhow::Error>((status, text));
                }
                let mut resp = resp;
                if (i + round) % 2 == 1 {
                    resp.chunk().await?;
                    return Ok((499, String::new()));
                }
                let mut text = Vec::new();
                while let Some(chunk) = resp.chunk().await? {
                    text.extend_from_slice(&chunk);
                }
                Ok((200, String::from_utf8(text)?))
            }
        });
        for r in futures::future::join_all(calls).await {
            let (status, text) = r?;
            match status {
                200 | 499 => admitted += 1,
                429 => {
                    ensure!(text.contains("calls in flight"), "{text}");
                    refused += 1
                }
                s => anyhow::bail!("unexpected {s}: {text}"),
            }
        }
    }
    ensure!(
        admitted > 8 && refused > 0,
        "{admitted} admitted, {refused} refused"
    );

    // Every slot was released, and the gateway never had five in flight.
    poll_until("no call in flight", 500, Duration::from_millis(10), || {
        let cp = &cp;
        async move {
            let text = metrics(cp).await?;
            Ok(text
                .lines()
                .any(|l| l.starts_with("aigw_ratelimit_in_flight{") && l.ends_with(" 0"))
                .then_some(()))
        }
    })
    .await?;
    let text = metrics(&cp).await?;
    let peak = text
        .lines()
        .find(|l| l.starts_with("aigw_ratelimit_in_flight_peak{scope=\"key/"))
        .and_then(|l| l.rsplit(' ').next())
        .with_context(|| format!("no peak gauge in\n{text}"))?;
    ensure!(peak == "4", "peak in flight {peak}");

    // Nothing leaked: four calls fit again, a fifth does not.
    let calls = (0..4).map(|_| client.chat(&body));
    let first4 = futures::future::join_all(calls);
    let fifth = async {
        // Sent once the four are in flight.
        ensure!(
            mock.wait_open_responses(4, Duration::from_secs(5)).await,
            "four calls in flight"
        );
        client.chat(&body).await
    };
    let (four, fifth) = tokio::join!(first4, fifth);
    for r in four {
        let r = r?;
        ensure!(r.status == 200, "{} {}", r.status, r.text);
    }
    expect_openai_error(&fifth?, 429, "rate_limit_exceeded")?;
    Ok(())
}

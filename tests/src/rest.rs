//! A small client for the REST admin API (`/admin/v1/...`).

use anyhow::{bail, ensure, Context, Result};
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// Largest `limit` the events API accepts.
pub const MAX_EVENTS_PAGE: u64 = 10_000;

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    /// The body as JSON; fails if it is not JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.text)
            .with_context(|| format!("{} response is not JSON: {:?}", self.status, self.text))
    }

    /// Fails unless the status is `want`; returns the JSON body.
    pub fn expect(&self, want: u16) -> Result<Value> {
        ensure!(
            self.status.as_u16() == want,
            "expected HTTP {want}, got {}: {}",
            self.status,
            self.text
        );
        self.json()
    }

    /// Fails unless the status is `want` and the body is exactly
    /// `{"error_msg": "<non-empty text>"}`; returns the message.
    pub fn expect_error(&self, want: u16) -> Result<String> {
        let body = self.expect(want)?;
        let obj = body.as_object().context("error body is not an object")?;
        ensure!(obj.len() == 1, "error body has extra fields: {body}");
        let msg = obj
            .get("error_msg")
            .and_then(Value::as_str)
            .with_context(|| format!("error body has no string error_msg: {body}"))?;
        ensure!(!msg.trim().is_empty(), "error_msg is empty: {body}");
        Ok(msg.to_string())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// REST admin client. Sends `Authorization: Bearer <key>` when it has a key.
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl AdminClient {
    pub fn new(base: &str, key: Option<&str>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("building the HTTP client");
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            key: key.map(str::to_string),
        }
    }

    /// The same client with another key (or none).
    pub fn with_key(&self, key: Option<&str>) -> Self {
        Self {
            key: key.map(str::to_string),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` (e.g. `/admin/v1/models`) with the key attached.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    pub async fn send(rb: RequestBuilder) -> Result<Resp> {
        let r = rb.send().await.context("sending request")?;
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.context("reading response body")?;
        Ok(Resp {
            status,
            headers,
            text,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        Self::send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Resp> {
        Self::send(self.request(Method::POST, path).json(body)).await
    }

    /// POST with a raw body (sent as `application/json`).
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Result<Resp> {
        Self::send(
            self.request(Method::POST, path)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Resp> {
        Self::send(self.request(Method::PUT, path).json(body)).await
    }

    pub async fn put_if_match(&self, path: &str, if_match: &str, body: &Value) -> Result<Resp> {
        Self::send(
            self.request(Method::PUT, path)
                .header("if-match", if_match)
                .json(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> Result<Resp> {
        Self::send(self.request(Method::DELETE, path)).await
    }

    pub async fn delete_if_match(&self, path: &str, if_match: &str) -> Result<Resp> {
        Self::send(
            self.request(Method::DELETE, path)
                .header("if-match", if_match),
        )
        .await
    }

    /// POST to `/admin/v1/<collection>`, expecting 201; returns the record.
    pub async fn create(&self, collection: &str, value: &Value) -> Result<Value> {
        self.post(&format!("/admin/v1/{collection}"), value)
            .await?
            .expect(201)
            .with_context(|| format!("creating in {collection}: {value}"))
    }

    /// POST and return only the new id.
    pub async fn create_id(&self, collection: &str, value: &Value) -> Result<String> {
        let rec = self.create(collection, value).await?;
        rec["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("record without id: {rec}"))
    }

    /// GET `/admin/v1/<collection>` → the `list` array (checking `total`).
    pub async fn list(&self, collection: &str) -> Result<Vec<Value>> {
        let body = self
            .get(&format!("/admin/v1/{collection}"))
            .await?
            .expect(200)?;
        let list = body["list"]
            .as_array()
            .with_context(|| format!("no list array: {body}"))?
            .clone();
        ensure!(
            body["total"].as_u64() == Some(list.len() as u64),
            "total does not match the list length: {body}"
        );
        Ok(list)
    }

    /// GET `/admin/v1/events?<query>` → the `list` array (checking `total`).
    pub async fn events(&self, query: &str) -> Result<Vec<Value>> {
        let body = self
            .get(&format!("/admin/v1/events?{query}"))
            .await?
            .expect(200)?;
        let list = body["list"]
            .as_array()
            .with_context(|| format!("no list array: {body}"))?
            .clone();
        ensure!(
            body["total"].as_u64() == Some(list.len() as u64),
            "total does not match the list length"
        );
        Ok(list)
    }

    /// Every event in the log, paging with `from_seq` and `limit`.
    pub async fn all_events(&self) -> Result<Vec<Value>> {
        let mut out: Vec<Value> = Vec::new();
        let mut from = 1u64;
        loop {
            let page = self
                .events(&format!("from_seq={from}&limit={MAX_EVENTS_PAGE}"))
                .await?;
            let Some(last) = page.last() else { break };
            let last_seq = last["seq"].as_u64().context("event without seq")?;
            if last_seq < from {
                bail!("events page starting at {from} ended at {last_seq}");
            }
            from = last_seq + 1;
            let full = page.len() as u64 == MAX_EVENTS_PAGE;
            out.extend(page);
            if !full {
                break;
            }
        }
        Ok(out)
    }
}

/// Lower-case hex sha256, as `key_hash` wants it.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Asserts that events are numbered exactly `1..=n`, in order.
pub fn assert_gapless(events: &[Value], n: u64) -> Result<()> {
    ensure!(
        events.len() as u64 == n,
        "expected {n} events, found {}",
        events.len()
    );
    for (i, e) in events.iter().enumerate() {
        let want = i as u64 + 1;
        ensure!(
            e["seq"].as_u64() == Some(want),
            "event #{i} has seq {} (expected {want}): {e}",
            e["seq"]
        );
    }
    Ok(())
}

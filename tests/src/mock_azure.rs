//! A faithful mock of the Azure OpenAI data plane, for end-to-end tests.
//!
//! The wire shapes (JSON bodies, SSE events, error bodies, headers) follow the recorded
//! traffic in `azure-wire.md`. The server is a hyper 1 server (HTTP/1.1 and h2c, chosen
//! per connection) bound to `127.0.0.1:0` and run on tokio tasks; it stops when the
//! [`MockAzure`] is dropped.
//!
//! # Routes
//! * `POST /openai/deployments/{deployment}/chat/completions?api-version=...`
//!   (also `/embeddings` and `/completions`). Without a non-empty `api-version` query
//!   parameter: 404 [`RESOURCE_NOT_FOUND_BODY`].
//! * `POST /openai/v1/chat/completions` (also `/embeddings`, `/completions`): no
//!   api-version; the deployment is the body's `"model"`.
//! * The Responses API: `POST /openai/v1/responses`, `POST /openai/responses?api-version=…`
//!   (deployment in the body's `model`), and calls by id on both prefixes; see
//!   [`responses`](self::responses) for its rules.
//! * Anything else (other paths, other methods): 404 [`RESOURCE_NOT_FOUND_BODY`].
//!
//! Checks happen in this order: route, api-version, auth (401 [`UNAUTHORIZED_BODY`]),
//! deployment exists (404 [`DEPLOYMENT_NOT_FOUND_BODY`]; on the v1 path a body without
//! a string `model` gives 400), then the deployment's [`Behaviour`].
//!
//! # Deterministic answers (so tests can compute expected values)
//! * Chat answer ([`expected_answer`]): `"Hello from Azure OpenAI!"` if the last
//!   `user` message has no text, else `"Hello from Azure OpenAI! You said: <text>"`,
//!   where `<text>` is that message's content (a string, or the concatenation of the
//!   `text` of its parts) trimmed. If `max_completion_tokens` (or else `max_tokens`) is a
//!   number `n >= 1` smaller than the answer's word count, the answer is cut to its first
//!   `n` whitespace-separated words joined by single spaces and `finish_reason` is
//!   `"length"` (otherwise `"stop"`).
//! * Chat usage ([`expected_usage`]): `prompt_tokens = max(1, C / 4)` where `C` is the
//!   total number of characters (Unicode scalar values) of the text content of all
//!   messages; `completion_tokens` = number of whitespace-separated words of the
//!   answer; `total_tokens` = the sum.
//! * Completions: the same rules with the `prompt` (a string, or an array of strings
//!   joined with `"\n"`) as the text: the answer is
//!   `"Hello from Azure OpenAI! You said: <prompt trimmed>"` and
//!   `prompt_tokens = max(1, chars(prompt) / 4)`; [`expected_usage`] also accepts a
//!   completions body (it looks for `messages`, else `prompt`).
//! * Embeddings ([`expected_embedding_tokens`]): one entry per input (a string, an
//!   array of strings, a token array, or an array of token arrays); each string counts
//!   `max(1, chars / 4)` tokens, each token array its length. Vectors have `dimensions`
//!   (default 8) deterministic floats in `[-1, 1]` derived from the input.
//! * `"model"` in responses is the deployment's model name given to
//!   [`MockAzure::add_deployment`], never the deployment name.
//!
//! # Headers
//! Every response to a request on a deployment route carries `apim-request-id`,
//! `x-request-id` (random UUIDs) and `x-ms-region: East US`; once the deployment is
//! known also `x-ms-deployment-name`. Successful and 429 responses carry
//! `x-ratelimit-limit-requests` ([`RATE_LIMIT_REQUESTS`]), `x-ratelimit-limit-tokens`
//! ([`RATE_LIMIT_TOKENS`]), `x-ratelimit-remaining-requests` (limit minus the requests
//! counted for the deployment so far, this one included) and
//! `x-ratelimit-remaining-tokens` (token limit minus this request's estimate: prompt
//! tokens plus `max_tokens`/`max_completion_tokens`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

mod responses;
pub use responses::{expected_response_text, expected_response_usage, BACKGROUND_DELAY};

/// The `api-key` accepted until [`MockAzure::set_api_key`] is called.
pub const DEFAULT_API_KEY: &str = "test-azure-key";
/// A GA api-version to use in tests.
pub const API_VERSION: &str = "2024-10-21";
/// Value of the `x-ms-region` header.
pub const REGION: &str = "East US";
/// Value of `x-ratelimit-limit-requests`.
pub const RATE_LIMIT_REQUESTS: u64 = 1000;
/// Value of `x-ratelimit-limit-tokens`.
pub const RATE_LIMIT_TOKENS: u64 = 1_000_000;
/// `system_fingerprint` of chat responses.
pub const SYSTEM_FINGERPRINT: &str = "fp_efad92c60b";
/// The fixed start of every answer.
pub const GREETING: &str = "Hello from Azure OpenAI!";

/// 401 body for a bad or missing key (recorded).
pub const UNAUTHORIZED_BODY: &str = r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#;
/// 404 body for unknown paths and a missing api-version (recorded, including the space).
pub const RESOURCE_NOT_FOUND_BODY: &str =
    r#"{"error":{"code":"404","message": "Resource not found"}}"#;
/// 404 body for an unknown deployment (recorded).
pub const DEPLOYMENT_NOT_FOUND_BODY: &str = r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}"#;
/// 400 body for a prompt blocked by the content filter (recorded).
pub const CONTENT_FILTER_BODY: &str = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":true,"severity":"medium"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}}}"#;
/// 401 body for an Entra principal without a data-plane role (recorded).
pub const PERMISSION_DENIED_BODY: &str = r#"{"error":{"code":"PermissionDenied","message":"Principal does not have access to API/Operation."}}"#;
/// 400 body for a prompt over the deployment's context window (the OpenAI
/// error Azure passes through for `context_length_exceeded`).
pub const CONTEXT_LENGTH_BODY: &str = r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130017 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded","status":400}}"#;
/// The health probe path Azure Front Door uses on an Azure OpenAI endpoint.
pub const PROBE_PATH: &str = "/status-0123456789abcdef";

/// Body of [`Behaviour::Garbage`] responses.
pub const GARBAGE_BODY: &str = "<html><body><h1>502 Bad Gateway</h1></body></html> {\"error\": ";

const INVALID_JSON_BODY: &str = r#"{"error":{"message":"We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)","type":"invalid_request_error","param":null,"code":null}}"#;

/// How a deployment answers (see [`MockAzure::set_behaviour`]).
#[derive(Clone, Debug, Default)]
pub enum Behaviour {
    /// Answer normally (the default).
    #[default]
    Normal,
    /// Wait, then answer normally.
    Delay(Duration),
    /// Any status with a raw body (`content-type: application/json`).
    Fail { status: u16, body: String },
    /// 429 with the recorded body; `retry-after-ms` / `retry-after` headers only when
    /// given. The message says "Try again in N seconds" with N from `retry_after`, else
    /// `retry_after_ms` rounded up, else 2.
    RateLimited {
        retry_after_ms: Option<u64>,
        retry_after: Option<u64>,
    },
    /// 400 with [`CONTENT_FILTER_BODY`], plain JSON even for `stream: true`.
    ContentFilter,
    /// 401 with [`UNAUTHORIZED_BODY`].
    Unauthorized,
    /// Accept the request and never answer (until the client disconnects).
    Hang,
    /// 200 with `content-type: application/json` and the non-JSON [`GARBAGE_BODY`].
    Garbage,
    /// For `stream: true`, wait `chunk_delay` between SSE events (the first event is sent
    /// at once). Non-streaming requests are answered normally.
    SlowStream { chunk_delay: Duration },
    /// Stream without the final `data: [DONE]` and without the usage chunk.
    /// Non-streaming requests are answered normally.
    StreamNoDone,
    /// Answer normally but without a `content-type` header (some
    /// Azure-compatible proxies and simulators stream so).
    NoContentType,
    /// 400 with [`CONTEXT_LENGTH_BODY`], plain JSON even for `stream: true`.
    ContextLengthExceeded,
    /// Stall before the first byte: a JSON answer comes after the delay; a
    /// stream sends its headers at once and its first event after the delay.
    StallFirstByte(Duration),
    /// Exactly this status, these headers (no others, not even a content
    /// type) and these body frames, whatever the request.
    Raw {
        status: u16,
        headers: Vec<(&'static str, String)>,
        frames: Vec<Bytes>,
    },
}

/// A request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string without `?` (empty when none).
    pub query: String,
    /// Header names are lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// First value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Tables {
    api_key: String,
    bearer_tokens: HashSet<String>,
    /// Bearer tokens that stop being accepted at the given instant.
    bearer_expiry: HashMap<String, Instant>,
    /// Requests that carried a bearer token the mock did not (or no longer) accept.
    bearer_refusals: usize,
    /// deployment -> model name
    deployments: HashMap<String, String>,
    behaviours: HashMap<String, Behaviour>,
    counts: HashMap<String, usize>,
    last: HashMap<String, RecordedRequest>,
    /// Status the probe path answers; `None`: 200.
    probe_status: Option<u16>,
    /// Probe requests received, and the last one.
    probes: usize,
    last_probe: Option<RecordedRequest>,
    /// Responses API: stored responses by id.
    responses: HashMap<String, responses::Stored>,
}

struct Shared {
    tables: Mutex<Tables>,
    total: AtomicUsize,
    open: AtomicUsize,
    open_changed: Notify,
}

impl Shared {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a response as open from the moment its handler starts until its body has been
/// produced completely or dropped (client gone).
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        shared.open_changed.notify_waiters();
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.open_changed.notify_waiters();
    }
}

type InnerBody = UnsyncBoxBody<Bytes, Infallible>;

/// Response body that releases its [`OpenGuard`] when finished or dropped.
struct MockBody {
    inner: InnerBody,
    guard: Option<OpenGuard>,
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.guard = None,
            Poll::Ready(Some(_)) if this.inner.is_end_stream() => this.guard = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Registers bearer tokens with a [`MockAzure`] (see [`MockAzure::bearers`]).
#[derive(Clone)]
pub struct BearerTokens(Arc<Shared>);

impl BearerTokens {
    /// Accept `token` until `expires`.
    pub fn accept_until(&self, token: &str, expires: Instant) {
        let mut t = self.0.tables();
        t.bearer_tokens.insert(token.to_string());
        t.bearer_expiry.insert(token.to_string(), expires);
    }

    pub fn revoke(&self, token: &str) {
        let mut t = self.0.tables();
        t.bearer_tokens.remove(token);
        t.bearer_expiry.remove(token);
    }
}

/// The mock server. Dropping it stops the server and closes its connections.
pub struct MockAzure {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for MockAzure {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockAzure {
    /// Binds `127.0.0.1:0` and serves on a tokio task.
    pub async fn start() -> MockAzure {
        let shared = Arc::new(Shared {
            tables: Mutex::new(Tables {
                api_key: DEFAULT_API_KEY.to_string(),
                ..Tables::default()
            }),
            total: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            open_changed: Notify::new(),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock azure: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock azure: local addr");
        let server_shared = shared.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting this task closes them all.
            let mut connections = JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = server_shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockAzure { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `{base}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21`.
    pub fn chat_url(&self, deployment: &str) -> String {
        format!(
            "{}/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}",
            self.base_url()
        )
    }

    /// Sets the accepted `api-key` header value (default [`DEFAULT_API_KEY`]).
    pub fn set_api_key(&self, key: &str) {
        self.shared.tables().api_key = key.to_string();
    }

    /// Also accept `Authorization: Bearer <token>`.
    pub fn accept_bearer(&self, token: &str) {
        self.shared.tables().bearer_tokens.insert(token.to_string());
    }

    /// Accept `Authorization: Bearer <token>` until `expires` (like an Entra ID
    /// token's lifetime); afterwards such requests get 401.
    pub fn accept_bearer_until(&self, token: &str, expires: Instant) {
        self.bearers().accept_until(token, expires);
    }

    /// Stop accepting `token` (as if revoked): requests carrying it get 401.
    pub fn revoke_bearer(&self, token: &str) {
        self.bearers().revoke(token);
    }

    /// Requests whose bearer token was unknown, expired or revoked.
    pub fn bearer_refusals(&self) -> usize {
        self.shared.tables().bearer_refusals
    }

    /// A handle through which a token issuer (the mock Entra ID) registers
    /// the tokens it hands out.
    pub fn bearers(&self) -> BearerTokens {
        BearerTokens(self.shared.clone())
    }

    /// Adds (or renames the model of) a deployment, e.g. `("chat", "gpt-4o-mini-2024-07-18")`.
    pub fn add_deployment(&self, name: &str, model: &str) {
        self.shared
            .tables()
            .deployments
            .insert(name.to_string(), model.to_string());
    }

    /// Sets how `deployment` answers from now on (may be called before `add_deployment`;
    /// unknown deployments still answer 404).
    pub fn set_behaviour(&self, deployment: &str, b: Behaviour) {
        self.shared
            .tables()
            .behaviours
            .insert(deployment.to_string(), b);
    }

    /// Makes the health probe path ([`PROBE_PATH`]) answer 200 (healthy) or
    /// 503 (not).
    pub fn set_probe_healthy(&self, healthy: bool) {
        self.shared.tables().probe_status = (!healthy).then_some(503);
    }

    /// Health probe requests received so far.
    pub fn probes(&self) -> usize {
        self.shared.tables().probes
    }

    pub fn last_probe(&self) -> Option<RecordedRequest> {
        self.shared.tables().last_probe.clone()
    }

    /// Requests received for `deployment` (counted on arrival, whatever the outcome,
    /// including 401s and unknown deployments).
    pub fn requests(&self, deployment: &str) -> usize {
        self.shared
            .tables()
            .counts
            .get(deployment)
            .copied()
            .unwrap_or(0)
    }

    /// All requests received, on any path.
    pub fn total_requests(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }

    pub fn last_request(&self, deployment: &str) -> Option<RecordedRequest> {
        self.shared.tables().last.get(deployment).cloned()
    }

    /// Whether this mock (this Azure resource) stores the Responses API
    /// response `id` (Azure's own id).
    pub fn stores_response(&self, id: &str) -> bool {
        self.shared.tables().responses.contains_key(id)
    }

    /// How many Responses API responses this mock stores.
    pub fn stored_responses(&self) -> usize {
        self.shared.tables().responses.len()
    }

    /// Responses whose handler has started and whose body is not finished or dropped yet.
    pub fn open_responses(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Waits until [`open_responses`](Self::open_responses) equals `n`; false on timeout.
    pub async fn wait_open_responses(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.open_changed.notified();
            if self.open_responses() == n {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(step, notified).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------------------

/// Text of a message `content`: a string, or the concatenated `text` of its parts.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn tokens_for_chars(chars: usize) -> u64 {
    ((chars / 4) as u64).max(1)
}

fn word_count(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn max_output_tokens(body: &Value) -> Option<u64> {
    body.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
}

/// `(answer, finish_reason)` for an echoed text under the max-token rule.
fn answer_for(echo: &str, body: &Value) -> (String, &'static str) {
    let echo = echo.trim();
    let full = if echo.is_empty() {
        GREETING.to_string()
    } else {
        format!("{GREETING} You said: {echo}")
    };
    match max_output_tokens(body) {
        Some(n) if n >= 1 && n < word_count(&full) => (
            full.split_whitespace()
                .take(n as usize)
                .collect::<Vec<_>>()
                .join(" "),
            "length",
        ),
        _ => (full, "stop"),
    }
}

fn completions_prompt(body: &Value) -> String {
    match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn chat_prompt_chars(body: &Value) -> usize {
    body.get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .map(|m| {
                    m.get("content")
                        .map(content_text)
                        .unwrap_or_default()
                        .chars()
                        .count()
                })
                .sum()
        })
        .unwrap_or(0)
}

fn last_user_text(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|msgs| {
            msgs.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .map(content_text)
        .unwrap_or_default()
}

/// The answer the mock gives to a chat request body (or a completions body: one with
/// `prompt` and no `messages`). See the module docs for the rules.
pub fn expected_answer(request_body: &Value) -> String {
    answer_and_finish(request_body).0
}

/// The `finish_reason` the mock gives: `"length"` when the answer was cut by
/// `max_completion_tokens`/`max_tokens`, else `"stop"`.
pub fn expected_finish_reason(request_body: &Value) -> &'static str {
    answer_and_finish(request_body).1
}

fn answer_and_finish(body: &Value) -> (String, &'static str) {
    if body.get("messages").is_some() {
        answer_for(&last_user_text(body), body)
    } else {
        answer_for(&completions_prompt(body), body)
    }
}

/// `(prompt_tokens, completion_tokens)` the mock reports for a chat request body
/// (`max(1, chars of all message text / 4)`, words of the answer); also works for a
/// completions body (`max(1, chars of prompt / 4)`). `total_tokens` is their sum.
pub fn expected_usage(request_body: &Value) -> (u64, u64) {
    let prompt = if request_body.get("messages").is_some() {
        tokens_for_chars(chat_prompt_chars(request_body))
    } else {
        tokens_for_chars(completions_prompt(request_body).chars().count())
    };
    (prompt, word_count(&expected_answer(request_body)))
}

/// Embedding inputs as (text to hash, token count).
fn embedding_inputs(body: &Value) -> Vec<(String, u64)> {
    let one_string = |s: &str| (s.to_string(), tokens_for_chars(s.chars().count()));
    let token_array = |a: &[Value]| {
        (
            a.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(","),
            a.len() as u64,
        )
    };
    match body.get("input") {
        Some(Value::String(s)) => vec![one_string(s)],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![token_array(items)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => one_string(s),
                Value::Array(a) => token_array(a),
                other => one_string(&other.to_string()),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `prompt_tokens` (= `total_tokens`) the mock reports for an embeddings request body.
pub fn expected_embedding_tokens(request_body: &Value) -> u64 {
    embedding_inputs(request_body).iter().map(|(_, t)| t).sum()
}

/// Deterministic vector in [-1, 1] for a text.
fn embedding_vector(text: &str, dims: usize) -> Vec<f64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..dims)
        .map(|i| {
            let mut x = hash ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 33;
            ((x % 2001) as f64) / 1000.0 - 1.0
        })
        .collect()
}

/// The answer split into 2+ streaming pieces (whitespace-inclusive words).
fn stream_pieces(answer: &str) -> Vec<String> {
    let mut pieces: Vec<String> = answer
        .split_inclusive(char::is_whitespace)
        .map(str::to_string)
        .collect();
    if pieces.len() < 2 {
        let chars: Vec<char> = answer.chars().collect();
        if chars.len() >= 2 {
            let mid = chars.len() / 2;
            pieces = vec![chars[..mid].iter().collect(), chars[mid..].iter().collect()];
        }
    }
    pieces
}

// ---------------------------------------------------------------------------------------
// JSON fragments (recorded shapes)
// ---------------------------------------------------------------------------------------

fn safe() -> Value {
    json!({"filtered": false, "severity": "safe"})
}

fn not_detected() -> Value {
    json!({"filtered": false, "detected": false})
}

fn prompt_filter_results() -> Value {
    json!([{
        "prompt_index": 0,
        "content_filter_results": {
            "hate": safe(), "jailbreak": not_detected(), "self_harm": safe(),
            "sexual": safe(), "violence": safe()
        }
    }])
}

fn completion_filter_results() -> Value {
    json!({
        "hate": safe(), "protected_material_code": not_detected(),
        "protected_material_text": not_detected(), "self_harm": safe(),
        "sexual": safe(), "violence": safe()
    })
}

fn stream_filter_results() -> Value {
    json!({"hate": safe(), "self_harm": safe(), "sexual": safe(), "violence": safe()})
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "completion_tokens": completion,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0, "audio_tokens": 0,
            "reasoning_tokens": 0, "rejected_prediction_tokens": 0
        },
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": prompt + completion
    })
}

fn random_alnum(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn random_uuid() -> String {
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

// ---------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Chat,
    Embeddings,
    Completions,
    /// Responses API creation (`/openai/v1/responses`, `/openai/responses`).
    Responses,
}

/// Parsed route: (deployment from the path, or None for v1), operation.
fn parse_route(method: &Method, path: &str) -> Option<(Option<String>, Op)> {
    if method != Method::POST {
        return None;
    }
    let op_of = |rest: &[&str]| match rest {
        ["chat", "completions"] => Some(Op::Chat),
        ["embeddings"] => Some(Op::Embeddings),
        ["completions"] => Some(Op::Completions),
        _ => None,
    };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segments.as_slice() {
        ["", "openai", "deployments", deployment, rest @ ..] if !deployment.is_empty() => {
            op_of(rest).map(|op| (Some(deployment.to_string()), op))
        }
        ["", "openai", "v1", "responses"] | ["", "openai", "responses"] => {
            Some((None, Op::Responses))
        }
        ["", "openai", "v1", rest @ ..] => op_of(rest).map(|op| (None, op)),
        _ => None,
    }
}

fn has_api_version(query: &str) -> bool {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| k == "api-version" && !v.is_empty())
}

/// A response under construction (body not yet wrapped with the guard).
type Reply = Response<InnerBody>;

fn full(body: impl Into<Bytes>) -> InnerBody {
    Full::new(body.into()).boxed_unsync()
}

fn json_reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn set_header(resp: &mut Reply, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<MockBody> {
    let guard = OpenGuard::new(shared.clone());
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    shared.total.fetch_add(1, Ordering::SeqCst);
    let reply = route(&shared, &parts.method, recorded).await;
    reply.map(|inner| MockBody {
        inner,
        guard: Some(guard),
    })
}

async fn route(shared: &Shared, method: &Method, recorded: RecordedRequest) -> Reply {
    if method == Method::GET && recorded.path == PROBE_PATH {
        let mut t = shared.tables();
        t.probes += 1;
        t.last_probe = Some(recorded);
        let status = t.probe_status.unwrap_or(200);
        return json_reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            if status == 200 {
                r#"{"status":"ok"}"#
            } else {
                r#"{"error":{"code":"ServiceUnavailable","message":"The service is temporarily unavailable."}}"#
            },
        );
    }
    if let Some(responses::Route::ById { preview, id, what }) =
        responses::parse(method, &recorded.path)
    {
        let mut reply = responses::by_id(shared, &recorded, preview, &id, what);
        let request_id = random_uuid();
        set_header(&mut reply, "apim-request-id", &request_id);
        set_header(&mut reply, "x-request-id", &request_id);
        set_header(&mut reply, "x-ms-region", REGION);
        return reply;
    }
    // Azure's preview Responses route takes an api-version; its v1 one none.
    let preview = matches!(
        responses::parse(method, &recorded.path),
        Some(responses::Route::Create { preview: true })
    );
    let Some((path_deployment, op)) = parse_route(method, &recorded.path) else {
        return json_reply(StatusCode::NOT_FOUND, RESOURCE_NOT_FOUND_BODY);
    };
    let v1 = path_deployment.is_none();
    let body_json: Option<Value> = serde_json::from_slice(&recorded.body).ok();
    let deployment = path_deployment.or_else(|| {
        body_json
            .as_ref()
            .and_then(|b| b.get("model"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });

    // Record and count on arrival, whatever the outcome.
    let (count, key, bearers, model, behaviour) = {
        let mut t = shared.tables();
        let count = match &deployment {
            Some(d) => {
                let c = t.counts.entry(d.clone()).or_insert(0);
                *c += 1;
                let c = *c;
                t.last.insert(d.clone(), recorded.clone());
                c
            }
            None => 0,
        };
        let model = deployment
            .as_ref()
            .and_then(|d| t.deployments.get(d).cloned());
        let behaviour = deployment
            .as_ref()
            .and_then(|d| t.behaviours.get(d).cloned())
            .unwrap_or_default();
        let now = Instant::now();
        let bearers: HashSet<String> = t
            .bearer_tokens
            .iter()
            .filter(|b| t.bearer_expiry.get(*b).is_none_or(|exp| now < *exp))
            .cloned()
            .collect();
        if bearer_of(&recorded).is_some_and(|b| !bearers.contains(&b)) {
            t.bearer_refusals += 1;
        }
        (count, t.api_key.clone(), bearers, model, behaviour)
    };

    let mut reply = answer(
        shared,
        &recorded,
        op,
        v1 && !preview,
        deployment.as_deref(),
        count,
        &key,
        &bearers,
        model,
        behaviour,
        body_json,
    )
    .await;
    let request_id = random_uuid();
    set_header(&mut reply, "apim-request-id", &request_id);
    set_header(&mut reply, "x-request-id", &request_id);
    set_header(&mut reply, "x-ms-region", REGION);
    reply
}

fn authorized(recorded: &RecordedRequest, key: &str, bearers: &HashSet<String>) -> bool {
    if recorded.header("api-key") == Some(key) {
        return true;
    }
    bearer_of(recorded).is_some_and(|token| bearers.contains(&token))
}

/// The token of an `Authorization: Bearer` header.
fn bearer_of(recorded: &RecordedRequest) -> Option<String> {
    recorded.header("authorization").and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string())
    })
}

fn rate_limit_headers(reply: &mut Reply, count: usize, body: Option<&Value>, op: Op) {
    let estimate = body
        .map(|b| {
            let prompt = match op {
                Op::Embeddings => expected_embedding_tokens(b),
                _ => expected_usage(b).0,
            };
            prompt + max_output_tokens(b).unwrap_or(0)
        })
        .unwrap_or(0);
    set_header(
        reply,
        "x-ratelimit-limit-requests",
        RATE_LIMIT_REQUESTS.to_string(),
    );
    set_header(
        reply,
        "x-ratelimit-limit-tokens",
        RATE_LIMIT_TOKENS.to_string(),
    );
    set_header(
        reply,
        "x-ratelimit-remaining-requests",
        RATE_LIMIT_REQUESTS.saturating_sub(count as u64).to_string(),
    );
    set_header(
        reply,
        "x-ratelimit-remaining-tokens",
        RATE_LIMIT_TOKENS.saturating_sub(estimate).to_string(),
    );
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    shared: &Shared,
    recorded: &RecordedRequest,
    op: Op,
    v1: bool,
    deployment: Option<&str>,
    count: usize,
    key: &str,
    bearers: &HashSet<String>,
    model: Option<String>,
    behaviour: Behaviour,
    body_json: Option<Value>,
) -> Reply {
    if !v1 && !has_api_version(&recorded.query) {
        return json_reply(StatusCode::NOT_FOUND, RESOURCE_NOT_FOUND_BODY);
    }
    if !authorized(recorded, key, bearers) {
        return json_reply(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY);
    }
    let Some(deployment) = deployment else {
        let status = StatusCode::BAD_REQUEST;
        if body_json.is_none() {
            return json_reply(status, INVALID_JSON_BODY);
        }
        return json_reply(
            status,
            json!({"error": {"message": "Missing required parameter: 'model'.",
                "type": "invalid_request_error", "param": "model",
                "code": "missing_required_parameter"}})
            .to_string(),
        );
    };
    let Some(model) = model else {
        return json_reply(StatusCode::NOT_FOUND, DEPLOYMENT_NOT_FOUND_BODY);
    };

    let mut chunk_delay = Duration::ZERO;
    let mut first_delay = Duration::ZERO;
    let mut no_done = false;
    let mut no_content_type = false;
    let mut reply = match behaviour {
        Behaviour::Normal => None,
        Behaviour::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Behaviour::Fail { status, body } => Some(json_reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )),
        Behaviour::RateLimited {
            retry_after_ms,
            retry_after,
        } => {
            let secs = retry_after
                .or(retry_after_ms.map(|ms| ms.div_ceil(1000)))
                .unwrap_or(2);
            let body = json!({"error": {"code": "429",
                "message": format!("Rate limit is exceeded. Try again in {secs} seconds.")}});
            let mut r = json_reply(StatusCode::TOO_MANY_REQUESTS, body.to_string());
            if let Some(ms) = retry_after_ms {
                set_header(&mut r, "retry-after-ms", ms.to_string());
            }
            if let Some(s) = retry_after {
                set_header(&mut r, "retry-after", s.to_string());
            }
            rate_limit_headers(&mut r, count, body_json.as_ref(), op);
            Some(r)
        }
        Behaviour::ContentFilter => Some(json_reply(StatusCode::BAD_REQUEST, CONTENT_FILTER_BODY)),
        Behaviour::ContextLengthExceeded => {
            Some(json_reply(StatusCode::BAD_REQUEST, CONTEXT_LENGTH_BODY))
        }
        Behaviour::StallFirstByte(d) => {
            let stream = body_json
                .as_ref()
                .and_then(|b| b.get("stream"))
                .and_then(Value::as_bool)
                == Some(true);
            if stream {
                first_delay = d;
            } else {
                tokio::time::sleep(d).await;
            }
            None
        }
        Behaviour::Unauthorized => Some(json_reply(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY)),
        Behaviour::Hang => std::future::pending().await,
        Behaviour::Garbage => Some(json_reply(StatusCode::OK, GARBAGE_BODY)),
        Behaviour::SlowStream { chunk_delay: d } => {
            chunk_delay = d;
            None
        }
        Behaviour::StreamNoDone => {
            no_done = true;
            None
        }
        Behaviour::NoContentType => {
            no_content_type = true;
            None
        }
        Behaviour::Raw {
            status,
            headers,
            frames,
        } => {
            let frames = futures::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<_, Infallible>(Frame::data(f))),
            );
            let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            for (name, value) in headers {
                set_header(&mut r, name, value);
            }
            return r;
        }
    };
    if reply.is_none() {
        reply = Some(match body_json {
            None => json_reply(StatusCode::BAD_REQUEST, INVALID_JSON_BODY),
            Some(body) if op == Op::Responses => {
                let mut r =
                    responses::create(shared, deployment, &model, &body, chunk_delay, no_done);
                if r.status().is_success() {
                    rate_limit_headers(&mut r, count, Some(&body), op);
                }
                r
            }
            Some(body) => {
                let mut r = normal(op, &model, &body, chunk_delay, first_delay, no_done);
                if r.status().is_success() {
                    rate_limit_headers(&mut r, count, Some(&body), op);
                }
                r
            }
        });
    }
    let mut reply = reply.expect("reply set above");
    if no_content_type {
        reply.headers_mut().remove(http::header::CONTENT_TYPE);
    }
    set_header(&mut reply, "x-ms-deployment-name", deployment);
    reply
}

fn invalid_request(message: &str) -> Reply {
    json_reply(
        StatusCode::BAD_REQUEST,
        json!({"error": {"message": message, "type": "invalid_request_error",
            "param": null, "code": null}})
        .to_string(),
    )
}

fn normal(
    op: Op,
    model: &str,
    body: &Value,
    chunk_delay: Duration,
    first_delay: Duration,
    no_done: bool,
) -> Reply {
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    match op {
        Op::Chat => {
            if !body.get("messages").is_some_and(Value::is_array) {
                return invalid_request("'messages' is a required property");
            }
            if stream {
                sse_reply(
                    chat_stream_events(model, body, include_usage && !no_done),
                    !no_done,
                    chunk_delay,
                    first_delay,
                )
            } else {
                json_reply(StatusCode::OK, chat_json(model, body).to_string())
            }
        }
        Op::Completions => {
            if body.get("prompt").is_none() {
                return invalid_request("'prompt' is a required property");
            }
            if stream {
                sse_reply(
                    completions_stream_events(model, body, include_usage && !no_done),
                    !no_done,
                    chunk_delay,
                    first_delay,
                )
            } else {
                json_reply(StatusCode::OK, completions_json(model, body).to_string())
            }
        }
        Op::Embeddings => {
            if body.get("input").is_none() {
                return invalid_request("'input' is a required property");
            }
            json_reply(StatusCode::OK, embeddings_json(model, body).to_string())
        }
        // Answered by `responses::create` (it needs the store).
        Op::Responses => invalid_request("unreachable"),
    }
}

fn chat_json(model: &str, body: &Value) -> Value {
    let (answer, finish) = answer_and_finish(body);
    let (prompt, completion) = expected_usage(body);
    json!({
        "choices": [{
            "content_filter_results": completion_filter_results(),
            "finish_reason": finish,
            "index": 0,
            "logprobs": null,
            "message": {"annotations": [], "content": answer, "refusal": null, "role": "assistant"}
        }],
        "created": now_secs(),
        "id": format!("chatcmpl-{}", random_alnum(29)),
        "model": model,
        "object": "chat.completion",
        "prompt_filter_results": prompt_filter_results(),
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage_json(prompt, completion)
    })
}

fn chat_stream_events(model: &str, body: &Value, include_usage: bool) -> Vec<Bytes> {
    let (answer, finish) = answer_and_finish(body);
    let (prompt, completion) = expected_usage(body);
    let id = format!("chatcmpl-{}", random_alnum(29));
    let created = now_secs();
    let chunk = |choices: Value| {
        let mut v = json!({
            "choices": choices,
            "created": created,
            "id": id,
            "model": model,
            "obfuscation": random_alnum(12),
            "object": "chat.completion.chunk",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut events = vec![sse_event(&json!({
        "choices": [], "created": 0, "id": "", "model": "", "object": "",
        "prompt_filter_results": prompt_filter_results()
    }))];
    events.push(sse_event(&chunk(json!([{
        "content_filter_results": {},
        "delta": {"content": "", "refusal": null, "role": "assistant"},
        "finish_reason": null, "index": 0, "logprobs": null
    }]))));
    for piece in stream_pieces(&answer) {
        events.push(sse_event(&chunk(json!([{
            "content_filter_results": stream_filter_results(),
            "delta": {"content": piece},
            "finish_reason": null, "index": 0, "logprobs": null
        }]))));
    }
    events.push(sse_event(&chunk(json!([{
        "content_filter_results": {},
        "delta": {},
        "finish_reason": finish, "index": 0, "logprobs": null
    }]))));
    events.push(sse_event(&json!({
        "choices": [{
            "content_filter_offsets": {
                "check_offset": 0, "start_offset": 0, "end_offset": answer.len()
            },
            "content_filter_results": completion_filter_results(),
            "finish_reason": null,
            "index": 0
        }],
        "created": 0, "id": "", "model": "", "object": ""
    })));
    if include_usage {
        let mut usage = chunk(json!([]));
        usage["usage"] = usage_json(prompt, completion);
        events.push(sse_event(&usage));
    }
    events
}

fn completions_json(model: &str, body: &Value) -> Value {
    let (answer, finish) = answer_and_finish(body);
    let (prompt, completion) = expected_usage(body);
    json!({
        "choices": [{
            "content_filter_results": completion_filter_results(),
            "finish_reason": finish,
            "index": 0,
            "logprobs": null,
            "text": answer
        }],
        "created": now_secs(),
        "id": format!("cmpl-{}", random_alnum(29)),
        "model": model,
        "object": "text_completion",
        "prompt_filter_results": prompt_filter_results(),
        "usage": {"completion_tokens": completion, "prompt_tokens": prompt,
            "total_tokens": prompt + completion}
    })
}

fn completions_stream_events(model: &str, body: &Value, include_usage: bool) -> Vec<Bytes> {
    let (answer, finish) = answer_and_finish(body);
    let (prompt, completion) = expected_usage(body);
    let id = format!("cmpl-{}", random_alnum(29));
    let created = now_secs();
    let chunk = |choices: Value| {
        json!({"choices": choices, "created": created, "id": id, "model": model,
            "object": "text_completion"})
    };
    let mut events = vec![sse_event(&json!({
        "choices": [], "created": 0, "id": "", "model": "", "object": "",
        "prompt_filter_results": prompt_filter_results()
    }))];
    for piece in stream_pieces(&answer) {
        events.push(sse_event(&chunk(json!([{
            "content_filter_results": stream_filter_results(),
            "finish_reason": null, "index": 0, "logprobs": null, "text": piece
        }]))));
    }
    events.push(sse_event(&chunk(json!([{
        "content_filter_results": {},
        "finish_reason": finish, "index": 0, "logprobs": null, "text": ""
    }]))));
    if include_usage {
        let mut usage = chunk(json!([]));
        usage["usage"] = json!({"completion_tokens": completion, "prompt_tokens": prompt,
            "total_tokens": prompt + completion});
        events.push(sse_event(&usage));
    }
    events
}

fn embeddings_json(model: &str, body: &Value) -> Value {
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .filter(|d| *d >= 1)
        .unwrap_or(8) as usize;
    let inputs = embedding_inputs(body);
    let tokens: u64 = inputs.iter().map(|(_, t)| t).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, (text, _))| {
            json!({"object": "embedding", "index": i, "embedding": embedding_vector(text, dims)})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    })
}

/// An SSE response whose events are sent as separate body frames, `chunk_delay` apart.
fn sse_reply(
    mut events: Vec<Bytes>,
    done: bool,
    chunk_delay: Duration,
    first_delay: Duration,
) -> Reply {
    if done {
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    let frames =
        futures::stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
            if i > 0 && !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            if i == 0 && !first_delay.is_zero() {
                tokio::time::sleep(first_delay).await;
            }
            Ok::<_, Infallible>(Frame::data(event))
        });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "gpt-4o-mini-2024-07-18";

    async fn mock() -> MockAzure {
        let m = MockAzure::start().await;
        m.add_deployment("chat", MODEL);
        m.add_deployment("emb", "text-embedding-3-small");
        m
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    fn url(m: &MockAzure, deployment: &str, op: &str) -> String {
        format!(
            "{}/openai/deployments/{deployment}/{op}?api-version={API_VERSION}",
            m.base_url()
        )
    }

    fn chat_body() -> Value {
        json!({"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 4200 + 42?"}
        ]})
    }

    async fn post(url: &str, body: &Value) -> reqwest::Response {
        client()
            .post(url)
            .header("api-key", DEFAULT_API_KEY)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Parses an SSE body into its `data:` payloads.
    fn sse_data(text: &str) -> Vec<String> {
        assert!(
            text.ends_with("\n\n"),
            "events end with a blank line: {text:?}"
        );
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("event without data prefix: {e:?}"))
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn deterministic_functions() {
        let body = chat_body();
        assert_eq!(
            expected_answer(&body),
            "Hello from Azure OpenAI! You said: What is 4200 + 42?"
        );
        // "You are terse." (14) + "What is 4200 + 42?" (18) = 32 chars -> 8 tokens; 11 words.
        assert_eq!(expected_usage(&body), (8, 11));
        let short = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
        assert_eq!(expected_answer(&short), "Hello from Azure");
        assert_eq!(expected_finish_reason(&short), "length");
        assert_eq!(expected_usage(&short), (1, 3));
        let parts = json!({"messages": [{"role": "user",
            "content": [{"type": "text", "text": "abcd"}, {"type": "text", "text": "efgh"}]}]});
        assert_eq!(expected_usage(&parts), (2, 7));
        assert_eq!(
            expected_embedding_tokens(&json!({"input": ["abcdefgh", "a"]})),
            3
        );
        assert_eq!(expected_embedding_tokens(&json!({"input": [1, 2, 3]})), 3);
        assert_eq!(stream_pieces("ab"), vec!["a", "b"]);
    }

    #[tokio::test]
    async fn normal_chat_json_shape() {
        let m = mock().await;
        let body = chat_body();
        let resp = post(&url(&m, "chat", "chat/completions"), &body).await;
        assert_eq!(resp.status(), 200);
        let h = resp.headers().clone();
        assert_eq!(h["content-type"], "application/json");
        assert!(h.contains_key("apim-request-id"));
        assert!(h.contains_key("x-request-id"));
        assert_eq!(h["x-ms-region"], REGION);
        assert_eq!(h["x-ms-deployment-name"], "chat");
        assert_eq!(h["x-ratelimit-limit-requests"], "1000");
        assert_eq!(h["x-ratelimit-limit-tokens"], "1000000");
        assert_eq!(h["x-ratelimit-remaining-requests"], "999");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "999992");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], MODEL);
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(v["system_fingerprint"], SYSTEM_FINGERPRINT);
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["index"], 0);
        assert!(choice["logprobs"].is_null());
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], expected_answer(&body));
        assert!(choice["message"]["refusal"].is_null());
        assert_eq!(choice["message"]["annotations"], json!([]));
        assert_eq!(choice["content_filter_results"]["hate"]["filtered"], false);
        assert_eq!(
            choice["content_filter_results"]["protected_material_text"]["detected"],
            false
        );
        assert_eq!(v["prompt_filter_results"][0]["prompt_index"], 0);
        assert_eq!(
            v["prompt_filter_results"][0]["content_filter_results"]["jailbreak"]["detected"],
            false
        );
        let (p, c) = expected_usage(&body);
        assert_eq!(v["usage"]["prompt_tokens"], p);
        assert_eq!(v["usage"]["completion_tokens"], c);
        assert_eq!(v["usage"]["total_tokens"], p + c);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"],
            0
        );

        let r = m.last_request("chat").unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/openai/deployments/chat/chat/completions");
        assert_eq!(r.query, format!("api-version={API_VERSION}"));
        assert_eq!(r.header("API-KEY"), Some(DEFAULT_API_KEY));
        assert_eq!(r.json(), body);
        assert!(m.wait_open_responses(0, Duration::from_secs(5)).await);
    }

    async fn stream_events(m: &MockAzure, body: &Value) -> Vec<String> {
        let resp = post(&url(m, "chat", "chat/completions"), body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        sse_data(&resp.text().await.unwrap())
    }

    fn check_stream_prefix(events: &[String], body: &Value) -> usize {
        let parsed: Vec<Value> = events
            .iter()
            .take_while(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        // 1. prompt filter results, empty choices.
        assert_eq!(parsed[0]["choices"], json!([]));
        assert_eq!(parsed[0]["id"], "");
        assert_eq!(parsed[0]["prompt_filter_results"][0]["prompt_index"], 0);
        // 2. role chunk.
        assert_eq!(parsed[1]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(parsed[1]["choices"][0]["delta"]["content"], "");
        assert_eq!(parsed[1]["object"], "chat.completion.chunk");
        assert_eq!(parsed[1]["model"], MODEL);
        // 3. content chunks.
        let mut i = 2;
        let mut content = String::new();
        while let Some(piece) = parsed[i]["choices"][0]["delta"]["content"].as_str() {
            assert!(parsed[i]["choices"][0]["finish_reason"].is_null());
            assert_eq!(
                parsed[i]["choices"][0]["content_filter_results"]["hate"]["severity"],
                "safe"
            );
            content.push_str(piece);
            i += 1;
        }
        assert!(i - 2 >= 2, "at least two content chunks");
        assert_eq!(content, expected_answer(body));
        // 4. finish chunk.
        assert_eq!(parsed[i]["choices"][0]["finish_reason"], "stop");
        assert_eq!(parsed[i]["choices"][0]["delta"], json!({}));
        assert_eq!(parsed[i]["id"], parsed[1]["id"]);
        // 5. async filter annotation.
        i += 1;
        assert!(parsed[i]["choices"][0]["content_filter_offsets"].is_object());
        assert_eq!(parsed[i]["id"], "");
        assert_eq!(parsed[i]["model"], "");
        i + 1
    }

    #[tokio::test]
    async fn stream_with_include_usage() {
        let m = mock().await;
        let mut body = chat_body();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = stream_events(&m, &body).await;
        let next = check_stream_prefix(&events, &body);
        assert_eq!(events.len(), next + 2);
        let usage: Value = serde_json::from_str(&events[next]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        let (p, c) = expected_usage(&body);
        assert_eq!(usage["usage"]["prompt_tokens"], p);
        assert_eq!(usage["usage"]["completion_tokens"], c);
        assert_eq!(usage["usage"]["total_tokens"], p + c);
        assert_eq!(events[next + 1], "[DONE]");
        assert!(m.wait_open_responses(0, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn stream_without_include_usage() {
        let m = mock().await;
        let mut body = chat_body();
        body["stream"] = json!(true);
        let events = stream_events(&m, &body).await;
        let next = check_stream_prefix(&events, &body);
        assert_eq!(events.len(), next + 1);
        assert_eq!(events[next], "[DONE]");
        assert!(!events.iter().any(|e| e.contains("\"usage\"")));
    }

    #[tokio::test]
    async fn stream_no_done() {
        let m = mock().await;
        m.set_behaviour("chat", Behaviour::StreamNoDone);
        let mut body = chat_body();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = stream_events(&m, &body).await;
        let next = check_stream_prefix(&events, &body);
        assert_eq!(events.len(), next);
        assert!(!events.iter().any(|e| e.contains("[DONE]")));
        assert!(!events.iter().any(|e| e.contains("prompt_tokens")));
    }

    #[tokio::test]
    async fn unknown_deployment_is_404() {
        let m = mock().await;
        let resp = post(&url(&m, "nope", "chat/completions"), &chat_body()).await;
        assert_eq!(resp.status(), 404);
        assert!(resp.headers().contains_key("apim-request-id"));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "DeploymentNotFound");
        assert_eq!(m.requests("nope"), 1);
    }

    #[tokio::test]
    async fn bad_key_is_401_and_bearer_works() {
        let m = mock().await;
        let u = url(&m, "chat", "chat/completions");
        let resp = client()
            .post(&u)
            .header("api-key", "wrong")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.text().await.unwrap(), UNAUTHORIZED_BODY);
        let resp = client().post(&u).json(&chat_body()).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        // Bearer: rejected until accepted.
        let bearer = || {
            client()
                .post(&u)
                .bearer_auth("entra-token")
                .json(&chat_body())
                .send()
        };
        assert_eq!(bearer().await.unwrap().status(), 401);
        m.accept_bearer("entra-token");
        assert_eq!(bearer().await.unwrap().status(), 200);
        // Custom key.
        m.set_api_key("other-key");
        assert_eq!(post(&u, &chat_body()).await.status(), 401);
        let resp = client()
            .post(&u)
            .header("api-key", "other-key")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(m.requests("chat"), 6);
    }

    #[tokio::test]
    async fn missing_api_version_and_unknown_paths_are_404() {
        let m = mock().await;
        let u = format!("{}/openai/deployments/chat/chat/completions", m.base_url());
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.text().await.unwrap(), RESOURCE_NOT_FOUND_BODY);
        let resp = post(&format!("{u}?api-version="), &chat_body()).await;
        assert_eq!(resp.status(), 404);
        for path in ["/openai/deployments/chat/images", "/", "/openai/v1/models"] {
            let resp = post(&format!("{}{path}", m.base_url()), &chat_body()).await;
            assert_eq!(resp.status(), 404, "{path}");
            assert_eq!(resp.text().await.unwrap(), RESOURCE_NOT_FOUND_BODY);
        }
        let resp = client()
            .get(url(&m, "chat", "chat/completions"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(m.requests("chat"), 2);
        assert_eq!(m.total_requests(), 6);
    }

    #[tokio::test]
    async fn rate_limited_headers() {
        let m = mock().await;
        let u = url(&m, "chat", "chat/completions");
        m.set_behaviour(
            "chat",
            Behaviour::RateLimited {
                retry_after_ms: Some(1500),
                retry_after: Some(2),
            },
        );
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after-ms"], "1500");
        assert_eq!(resp.headers()["retry-after"], "2");
        assert!(resp
            .headers()
            .contains_key("x-ratelimit-remaining-requests"));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "429");
        assert_eq!(
            v["error"]["message"],
            "Rate limit is exceeded. Try again in 2 seconds."
        );

        m.set_behaviour(
            "chat",
            Behaviour::RateLimited {
                retry_after_ms: None,
                retry_after: None,
            },
        );
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 429);
        assert!(!resp.headers().contains_key("retry-after-ms"));
        assert!(!resp.headers().contains_key("retry-after"));
    }

    #[tokio::test]
    async fn content_filter_is_plain_json_even_for_stream() {
        let m = mock().await;
        m.set_behaviour("chat", Behaviour::ContentFilter);
        let mut body = chat_body();
        body["stream"] = json!(true);
        let resp = post(&url(&m, "chat", "chat/completions"), &body).await;
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "content_filter");
        assert_eq!(v["error"]["param"], "prompt");
        assert_eq!(
            v["error"]["innererror"]["code"],
            "ResponsibleAIPolicyViolation"
        );
        assert_eq!(
            v["error"]["innererror"]["content_filter_result"]["self_harm"]["filtered"],
            true
        );
    }

    #[tokio::test]
    async fn other_behaviours() {
        let m = mock().await;
        let u = url(&m, "chat", "chat/completions");
        m.set_behaviour("chat", Behaviour::Unauthorized);
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.text().await.unwrap(), UNAUTHORIZED_BODY);

        m.set_behaviour("chat", Behaviour::Garbage);
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());

        m.set_behaviour(
            "chat",
            Behaviour::Fail {
                status: 503,
                body: "upstream down".into(),
            },
        );
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.text().await.unwrap(), "upstream down");

        m.set_behaviour("chat", Behaviour::Delay(Duration::from_millis(300)));
        let start = std::time::Instant::now();
        let resp = post(&u, &chat_body()).await;
        assert_eq!(resp.status(), 200);
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn request_counting() {
        let m = mock().await;
        let u = url(&m, "chat", "chat/completions");
        assert_eq!(m.requests("chat"), 0);
        assert!(m.last_request("chat").is_none());
        post(&u, &chat_body()).await;
        post(&u, &chat_body()).await;
        m.set_behaviour(
            "chat",
            Behaviour::Fail {
                status: 500,
                body: "{}".into(),
            },
        );
        post(&u, &chat_body()).await;
        post(&url(&m, "emb", "embeddings"), &json!({"input": "x"})).await;
        assert_eq!(m.requests("chat"), 3);
        assert_eq!(m.requests("emb"), 1);
        assert_eq!(m.requests("other"), 0);
        assert_eq!(m.total_requests(), 4);
    }

    #[tokio::test]
    async fn open_responses_back_to_zero_after_client_drops_slow_stream() {
        let m = mock().await;
        m.set_behaviour(
            "chat",
            Behaviour::SlowStream {
                chunk_delay: Duration::from_millis(300),
            },
        );
        let mut body = chat_body();
        body["stream"] = json!(true);
        let mut resp = post(&url(&m, "chat", "chat/completions"), &body).await;
        assert_eq!(resp.status(), 200);
        let first = resp.chunk().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: {\"choices\":[]"));
        let second = resp.chunk().await.unwrap().unwrap();
        assert!(
            String::from_utf8_lossy(&second).contains("\"role\":\"assistant\""),
            "second frame arrives separately"
        );
        assert_eq!(m.open_responses(), 1);
        drop(resp);
        assert!(m.wait_open_responses(0, Duration::from_secs(10)).await);
    }

    #[tokio::test]
    async fn hang_is_released_when_client_gives_up() {
        let m = mock().await;
        m.set_behaviour("chat", Behaviour::Hang);
        let err = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap()
            .post(url(&m, "chat", "chat/completions"))
            .header("api-key", DEFAULT_API_KEY)
            .json(&chat_body())
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout());
        assert_eq!(m.requests("chat"), 1);
        assert!(m.wait_open_responses(0, Duration::from_secs(10)).await);
    }

    #[tokio::test]
    async fn v1_path_takes_deployment_from_model() {
        let m = mock().await;
        let mut body = chat_body();
        body["model"] = json!("chat");
        let u = format!("{}/openai/v1/chat/completions", m.base_url());
        let resp = post(&u, &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-ms-deployment-name"], "chat");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["model"], MODEL);
        assert_eq!(
            v["choices"][0]["message"]["content"],
            expected_answer(&body)
        );
        assert_eq!(m.requests("chat"), 1);
        assert_eq!(
            m.last_request("chat").unwrap().path,
            "/openai/v1/chat/completions"
        );

        body["model"] = json!("missing");
        assert_eq!(post(&u, &body).await.status(), 404);
        assert_eq!(post(&u, &chat_body()).await.status(), 400);
    }

    #[tokio::test]
    async fn embeddings_shape() {
        let m = mock().await;
        let body = json!({"input": ["first text", "second"]});
        let resp = post(&url(&m, "emb", "embeddings"), &body).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "text-embedding-3-small");
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
        assert_ne!(v["data"][0]["embedding"], v["data"][1]["embedding"]);
        let n = expected_embedding_tokens(&body);
        assert_eq!(n, 3);
        assert_eq!(v["usage"], json!({"prompt_tokens": n, "total_tokens": n}));

        let resp = post(&url(&m, "emb", "embeddings"), &json!({"input": "one"})).await;
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn completions_shape() {
        let m = mock().await;
        let body = json!({"prompt": "Say hi"});
        let resp = post(&url(&m, "chat", "completions"), &body).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], MODEL);
        assert_eq!(v["choices"][0]["text"], expected_answer(&body));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["choices"][0]["content_filter_results"]["violence"]["filtered"],
            false
        );
        assert_eq!(v["prompt_filter_results"][0]["prompt_index"], 0);
        let (p, c) = expected_usage(&body);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
        );

        let mut body = body;
        body["stream"] = json!(true);
        let resp = post(&url(&m, "chat", "completions"), &body).await;
        let events = sse_data(&resp.text().await.unwrap());
        assert_eq!(events.last().unwrap(), "[DONE]");
        let text: String = events[1..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(text, expected_answer(&body));
    }

    #[tokio::test]
    async fn h2c_works() {
        let m = mock().await;
        let stream = tokio::net::TcpStream::connect(m.addr()).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post(url(&m, "chat", "chat/completions"))
            .header("api-key", DEFAULT_API_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(chat_body().to_string())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            expected_answer(&chat_body())
        );
        assert!(m.wait_open_responses(0, Duration::from_secs(5)).await);
    }
}

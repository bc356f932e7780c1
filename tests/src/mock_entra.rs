//! Mock Microsoft Entra ID token endpoints, for end-to-end tests of the
//! gateway's Entra ID authentication to Azure OpenAI.
//!
//! - [`MockEntra`]: the client-credentials token endpoint,
//!   `POST /{tenant}/oauth2/v2.0/token`, over **TLS** (the `azure_identity`
//!   crate refuses `http` authority hosts) with a certificate from a fresh
//!   [`TestCa`]; give the gateway [`MockEntra::origin`] as `authority_host` and
//!   [`MockEntra::ca_pem`] as the provider key's `ca_pem`. It takes client
//!   secrets (`client_secret`) and federated credentials (`client_assertion`,
//!   as AKS workload identity sends them), answers like Entra (recorded shapes
//!   in `azure-wire.md`), including `AADSTS` errors.
//! - [`MockIdentityEndpoint`]: the App Service / Container Apps managed
//!   identity endpoint (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`) over plain
//!   http, answering with a **string** `expires_on`.
//!
//! Both count token requests and can register every token they issue with a
//! [`MockAzure`] for the token's lifetime, so the mock Azure accepts exactly
//! the tokens the mock identity provider issued, until they expire.

use crate::mock_azure::{BearerTokens, MockAzure};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The scope the gateway must ask for.
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// The resource managed identity endpoints are asked for.
pub const COGNITIVE_SERVICES_RESOURCE: &str = "https://cognitiveservices.azure.com";
/// `client_assertion_type` of a federated credential.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Default `expires_in` of issued tokens (what Entra usually says).
pub const DEFAULT_EXPIRES_IN: u64 = 3599;

/// A throwaway certificate authority and a server certificate it signed for
/// `127.0.0.1` and `localhost`.
pub struct TestCa {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca = crate::pki::Pki::new("aigw test CA");
        let leaf = ca.issue(&["localhost"], &[[127, 0, 0, 1].into()]);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.cert_der, ca.ca_der()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.into()),
            )
            .expect("server TLS config");
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TestCa {
            ca_pem: ca.ca_pem(),
            server: Arc::new(server),
        }
    }

    /// The CA certificate (PEM), to trust.
    pub fn pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A token request as the mock received it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    /// Query parameters (managed identity) or form fields (token endpoint).
    pub params: HashMap<String, String>,
    /// Header names lower case.
    pub headers: HashMap<String, String>,
}

impl TokenRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// A token the mock handed out.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: String,
    pub issued_at: Instant,
    pub expires_in: Duration,
}

impl IssuedToken {
    pub fn expires_at(&self) -> Instant {
        self.issued_at + self.expires_in
    }
}

#[derive(Default)]
struct State {
    /// (tenant, client_id) -> client secret
    secrets: HashMap<(String, String), String>,
    /// (tenant, client_id) -> federated token (client assertion)
    assertions: HashMap<(String, String), String>,
    expires_in: Option<u64>,
    delay: Duration,
    /// Answer every token request with this status and body (endpoint trouble).
    outage: Option<(u16, String)>,
    azure: Option<BearerTokens>,
    requests: Vec<TokenRequest>,
    issued: Vec<IssuedToken>,
}

struct Shared {
    state: Mutex<State>,
    token_requests: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::default()),
            token_requests: AtomicUsize::new(0),
        })
    }

    /// Records a request; returns the configured delay.
    fn record(&self, req: TokenRequest) -> Duration {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let mut st = self.state();
        st.requests.push(req);
        st.delay
    }

    /// Issues a token and registers it with the mock Azure, if any.
    fn issue(&self) -> IssuedToken {
        let mut st = self.state();
        let expires_in = Duration::from_secs(st.expires_in.unwrap_or(DEFAULT_EXPIRES_IN));
        let token = format!("entra-{}", random_string(40));
        let issued = IssuedToken {
            token,
            issued_at: Instant::now(),
            expires_in,
        };
        if let Some(azure) = &st.azure {
            azure.accept_until(&issued.token, issued.expires_at());
        }
        st.issued.push(issued.clone());
        issued
    }
}

fn random_string(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Entra's error body: `error`, `error_description` (starting with the
/// `AADSTS` code, then trace lines), `error_codes`, ids and a timestamp.
fn entra_error(status: StatusCode, error: &str, code: u32, text: &str) -> Response<Full<Bytes>> {
    let trace_id = random_uuid();
    let correlation_id = random_uuid();
    let timestamp = "2026-11-05 10:00:00Z";
    json_response(
        status,
        json!({
            "error": error,
            "error_description": format!(
                "AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
            ),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

fn random_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// Serves `handler` on `listener` (through TLS when `tls` is given) until the
/// returned task is aborted.
fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, handler: Handler) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Connections live in the set, so aborting this task closes them all.
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (handler, tls) = (handler.clone(), tls.clone());
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    })
}

async fn read_request(req: Request<Incoming>, form: bool) -> TokenRequest {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let source: &[u8] = if form {
        &body
    } else {
        parts.uri.query().unwrap_or_default().as_bytes()
    };
    TokenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        params: url::form_urlencoded::parse(source).into_owned().collect(),
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
    }
}

/// The mock Entra ID token endpoint (TLS). Dropping it stops the server.
pub struct MockEntra {
    addr: SocketAddr,
    ca: TestCa,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for MockEntra {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockEntra {
    /// Binds `127.0.0.1:0` with a certificate from a fresh [`TestCa`].
    pub async fn start() -> MockEntra {
        let ca = TestCa::new();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock entra: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock entra: local addr");
        let shared = Shared::new();
        let handler_shared = shared.clone();
        let handler: Handler = Arc::new(move |req| {
            let shared = handler_shared.clone();
            Box::pin(async move { token_endpoint(&shared, req).await })
        });
        let task = serve(listener, Some(ca.acceptor()), handler);
        MockEntra {
            addr,
            ca,
            shared,
            task,
        }
    }

    /// `https://127.0.0.1:PORT`: the authority host.
    pub fn origin(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The test CA that signed the server certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    /// Accept `client_secret` for `client_id` in `tenant`.
    pub fn add_client(&self, tenant: &str, client_id: &str, client_secret: &str) {
        self.shared.state().secrets.insert(
            (tenant.to_string(), client_id.to_string()),
            client_secret.to_string(),
        );
    }

    /// Accept the federated token `assertion` (e.g. an AKS service account
    /// token) for `client_id` in `tenant`.
    pub fn add_federated(&self, tenant: &str, client_id: &str, assertion: &str) {
        self.shared.state().assertions.insert(
            (tenant.to_string(), client_id.to_string()),
            assertion.to_string(),
        );
    }

    /// `expires_in` of tokens issued from now on (default [`DEFAULT_EXPIRES_IN`]).
    pub fn set_expires_in(&self, seconds: u64) {
        self.shared.state().expires_in = Some(seconds);
    }

    /// Wait this long before answering each token request.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// Answer every token request with `status` and `body` (`None` ends it).
    pub fn set_outage(&self, outage: Option<(u16, &str)>) {
        self.shared.state().outage = outage.map(|(s, b)| (s, b.to_string()));
    }

    /// Register every token issued from now on with `azure`, for its lifetime.
    pub fn issue_to(&self, azure: &MockAzure) {
        self.shared.state().azure = Some(azure.bearers());
    }

    /// Token requests received (counted on arrival, whatever the outcome).
    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.state().requests.clone()
    }

    pub fn issued(&self) -> Vec<IssuedToken> {
        self.shared.state().issued.clone()
    }
}

async fn token_endpoint(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let tenant = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
        .filter(|t| !t.is_empty() && !t.contains('/'))
        .map(str::to_string);
    let (Some(tenant), Method::POST) = (tenant, method) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "error_description": "no such endpoint"}),
        );
    };
    let form = read_request(req, true).await;
    let delay = shared.record(form.clone());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some((status, body)) = shared.state().outage.clone() {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return r;
    }
    let is_form = form
        .headers
        .get("content-type")
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        );
    }
    if form.param("grant_type") != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if form.param("scope").is_none_or(str::is_empty) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid.",
        );
    }
    let client_id = form.param("client_id").unwrap_or_default().to_string();
    let key = (tenant.clone(), client_id.clone());
    let (secret, assertion, tenant_known) = {
        let st = shared.state();
        let known = st
            .secrets
            .keys()
            .chain(st.assertions.keys())
            .any(|(t, _)| *t == tenant);
        (
            st.secrets.get(&key).cloned(),
            st.assertions.get(&key).cloned(),
            known,
        )
    };
    if !tenant_known {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
        );
    }
    if secret.is_none() && assertion.is_none() {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'."),
        );
    }
    let authenticated = match (form.param("client_secret"), form.param("client_assertion")) {
        (Some(given), _) => secret.as_deref() == Some(given),
        (None, Some(given)) => {
            if form.param("client_assertion_type") != Some(JWT_BEARER) {
                return entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    50027,
                    "Invalid client_assertion_type.",
                );
            }
            if assertion.as_deref() != Some(given) {
                return entra_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    70021,
                    "No matching federated identity record found for presented assertion.",
                );
            }
            true
        }
        (None, None) => false,
    };
    if !authenticated {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."),
        );
    }
    let issued = shared.issue();
    json_response(
        StatusCode::OK,
        json!({
            "token_type": "Bearer",
            "expires_in": issued.expires_in.as_secs(),
            "ext_expires_in": issued.expires_in.as_secs(),
            "access_token": issued.token,
        }),
    )
}

/// The App Service / Container Apps managed identity endpoint (plain http):
/// `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=...[&client_id=...]`
/// with header `x-identity-header: {IDENTITY_HEADER}`. Dropping it stops it.
pub struct MockIdentityEndpoint {
    addr: SocketAddr,
    header: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for MockIdentityEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockIdentityEndpoint {
    /// Binds `127.0.0.1:0`; requests must carry a fresh random identity header.
    pub async fn start() -> MockIdentityEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock identity endpoint: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let header = random_string(24);
        let shared = Shared::new();
        let (handler_shared, expected) = (shared.clone(), header.clone());
        let handler: Handler = Arc::new(move |req| {
            let (shared, expected) = (handler_shared.clone(), expected.clone());
            Box::pin(async move { identity_endpoint(&shared, &expected, req).await })
        });
        let task = serve(listener, None, handler);
        MockIdentityEndpoint {
            addr,
            header,
            shared,
            task,
        }
    }

    /// `IDENTITY_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/msi/token", self.addr)
    }

    /// `IDENTITY_HEADER`.
    pub fn identity_header(&self) -> &str {
        &self.header
    }

    /// The two variables `ManagedIdentityCredential` reads on App Service.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("IDENTITY_ENDPOINT".into(), self.endpoint()),
            ("IDENTITY_HEADER".into(), self.header.clone()),
        ]
    }

    pub fn set_expires_in(&self, seconds: u64) {
        self.shared.state().expires_in = Some(seconds);
    }

    pub fn issue_to(&self, azure: &MockAzure) {
        self.shared.state().azure = Some(azure.bearers());
    }

    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.state().requests.clone()
    }

    pub fn issued(&self) -> Vec<IssuedToken> {
        self.shared.state().issued.clone()
    }
}

async fn identity_endpoint(
    shared: &Shared,
    expected_header: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET || req.uri().path() != "/msi/token" {
        return json_response(StatusCode::NOT_FOUND, json!({"error": "not found"}));
    }
    let r = read_request(req, false).await;
    shared.record(r.clone());
    if r.headers.get("x-identity-header").map(String::as_str) != Some(expected_header) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"statusCode": 401, "message": "Unauthorized: missing or wrong X-IDENTITY-HEADER"}),
        );
    }
    if r.param("api-version") != Some("2019-08-01") {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"statusCode": 400, "message": "Unsupported api-version"}),
        );
    }
    let Some(resource) = r.param("resource").filter(|s| !s.is_empty()) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"statusCode": 400, "message": "resource is required"}),
        );
    };
    let resource = resource.to_string();
    let issued = shared.issue();
    let expires_on = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + issued.expires_in.as_secs();
    json_response(
        StatusCode::OK,
        json!({
            "access_token": issued.token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": r.param("client_id").unwrap_or("system-assigned"),
        }),
    )
}

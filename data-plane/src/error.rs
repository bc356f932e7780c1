use thiserror::Error;

/// Everything that can go wrong in the data plane. Proxy errors become an
/// OpenAI error envelope in one place: `proxy::edge`.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    InvalidApiKey(&'static str),
    /// A JWT bearer was refused (expired, bad signature, audience, issuer).
    #[error("{0}")]
    Jwt(crate::jwt::JwtError),
    #[error("this API key may not use model `{0}`")]
    PermissionDenied(String),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
        code: Option<&'static str>,
    },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// No operation serves the request's path.
    #[error("no such route: {0}")]
    UnknownPath(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A Responses API id this caller cannot use: unknown, forged, tampered,
    /// truncated or another api key's, all alike (`param`: where it was).
    #[error("{}response with id '{id}' not found", if param.is_some() { "previous " } else { "" })]
    ResponseNotFound {
        id: String,
        param: Option<&'static str>,
    },
    /// The provider key that stores a response is no longer a target of
    /// any model (or not of the model asked for).
    #[error("{0}")]
    ResponseTargetGone(String),
    /// The control plane sent no key for Responses API ids.
    #[error("the Responses API is not available: the control plane sent no response id key (upgrade the control plane)")]
    ResponsesUnavailable,
    #[error("the gateway has no configuration yet; try again shortly")]
    NotReady,
    /// Azure blocked the prompt; `details` carries Azure's filter result.
    #[error("{message}")]
    ContentFilter {
        message: String,
        details: serde_json::Value,
    },
    /// One of the gateway's own rate limits refused the call.
    #[error("{0}")]
    RateLimited(crate::limits::Rejection),
    #[error("this API key has used up its budget for the current period")]
    BudgetExceeded,
    #[error("{message}")]
    UpstreamRateLimited {
        message: String,
        retry_after: Option<http::HeaderValue>,
        /// Azure's hint (`retry-after-ms` or `retry-after`), for the cooldown.
        wait: Option<std::time::Duration>,
    },
    /// The upstream host could not be reached (DNS, connect, TLS).
    #[error("{0}")]
    UpstreamConnect(String),
    #[error("no deployment of this model can take the request now; retry after {}s", retry_after.as_secs_f64().ceil())]
    AllTargetsUnavailable { retry_after: std::time::Duration },
    /// Azure refused the gateway's own credential.
    #[error("{0}")]
    UpstreamAuth(String),
    /// Wrong host, deployment or API version of the target.
    #[error("{0}")]
    TargetMisconfigured(String),
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Timeout(String),
    /// No first byte (JSON) or first stream chunk within the model's
    /// `first_token_timeout`: the target is abandoned for another.
    #[error("{0}")]
    FirstTokenTimeout(String),
    // Start-up and background failures.
    #[error("config: {0}")]
    Config(String),
    /// The on-disk copy of the last snapshot (`config::SnapshotFile`).
    #[error("snapshot file: {0}")]
    SnapshotFile(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Shared(#[from] aigw_shared::Error),
}

impl From<crate::jwt::Refusal> for Error {
    fn from(r: crate::jwt::Refusal) -> Self {
        use crate::jwt::Refusal;
        match r {
            Refusal::Jwt(e) => Self::Jwt(e),
            Refusal::NotAllowed => Self::InvalidApiKey("invalid API key or token"),
            Refusal::Malformed => Self::InvalidApiKey("malformed token"),
        }
    }
}

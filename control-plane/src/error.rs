use aigw_shared::domain::ResourceKind;
use thiserror::Error;

/// Everything that can go wrong in the control plane. Converted to an HTTP
/// answer or a `tonic::Status` in one place: `admin::edge`.
#[derive(Debug, Error)]
pub enum Error {
    /// The request is malformed or a value breaks a rule; the text names the field.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "unknown resource collection `{0}`; use provider_keys, models, apikeys, jwt_providers"
    )]
    UnknownCollection(String),
    #[error("{kind} `{id}` not found")]
    NotFound { kind: ResourceKind, id: String },
    /// Another resource already holds a unique value.
    #[error("{0}")]
    Duplicate(String),
    /// A reference to a resource that does not exist, or a delete of one still in use.
    #[error("{0}")]
    Reference(String),
    #[error("revision mismatch: expected {expected}, current is {current}")]
    StaleRevision { expected: u64, current: u64 },
    #[error("missing or invalid admin key")]
    Unauthenticated,
    /// A console sign-in that did not succeed (bad key, failed single sign-on).
    #[error("{0}")]
    SignIn(String),
    /// Signed in, but not allowed (a viewer's write, a form without its CSRF token).
    #[error("{0}")]
    Forbidden(String),
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("event store: {0}")]
    Storage(String),
    /// Retrying may help: the replicated log (JetStream) is out of reach, or
    /// this replica has not caught up with a requested sequence yet.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("secrets: {0}")]
    Crypto(String),
    #[error(transparent)]
    Config(aigw_shared::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// Validation failures from the shared crate are the caller's fault (400);
/// configuration failures are ours.
impl From<aigw_shared::Error> for Error {
    fn from(e: aigw_shared::Error) -> Self {
        match e {
            aigw_shared::Error::Validation { .. } => Self::Invalid(e.to_string()),
            aigw_shared::Error::Crypto(m) => Self::Crypto(m),
            other => Self::Config(other),
        }
    }
}

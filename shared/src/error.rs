use thiserror::Error;

/// Errors of the shared crate: loading configuration and validating resources.
#[derive(Debug, Error)]
pub enum Error {
    #[error("config: cannot read {path}: {source}")]
    ConfigRead {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {path} is not valid YAML: {message}")]
    ConfigSyntax { path: String, message: String },
    #[error("config: {key}: {message}")]
    ConfigInvalid { key: String, message: String },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    /// Sealing failed, or the key or data are wrong; never says which.
    #[error("{0}")]
    Crypto(String),
    #[error("nats {url}: {message}")]
    Nats { url: String, message: String },
    /// A resource value that breaks a rule; `field` names the offending field.
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
}

impl Error {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }
}

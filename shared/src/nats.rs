//! One way to open a NATS connection, for both planes: the URL, one
//! authentication method and TLS from [`NatsConfig`], so a deployment that
//! locks NATS down (accounts, permissions, TLS) configures it once.

use crate::config::NatsConfig;
use crate::error::Error;
use std::time::Duration;

/// How a process connects.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// Fail when the server is unreachable now (the caller retries).
    Now,
    /// Return at once and keep trying in the background (data planes spool
    /// usage meanwhile).
    Background,
}

/// Connects with the configured credentials and TLS as client `name`.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    start: Start,
) -> Result<async_nats::Client, Error> {
    let url = cfg.url.as_deref().ok_or_else(|| Error::ConfigInvalid {
        key: "nats.url".into(),
        message: "not set".into(),
    })?;
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .name(name);
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let Some(seed) = &cfg.nkey_seed {
        opts = opts.nkey(seed.trim().to_string());
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| Error::ConfigInvalid {
                key: "nats.creds_file".into(),
                message: format!("{}: {e}", path.display()),
            })?;
    }
    let tls = &cfg.tls;
    if let Some(ca) = &tls.ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        opts = opts
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if matches!(start, Start::Background) {
        opts = opts.retry_on_initial_connect();
    }
    // Several servers of one cluster, comma-separated: tried in turn, and
    // the client fails over between them (and those the cluster announces).
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    opts.connect(urls.as_slice())
        .await
        .map_err(|e| Error::Nats {
            url: url.to_string(),
            message: e.to_string(),
        })
}

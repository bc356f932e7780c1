//! TLS material for the gRPC listener (the config stream carries provider
//! secrets): certificates and keys read from PEM files, one crypto provider
//! (aws-lc-rs, as everywhere in the tree), HTTP/2 by ALPN.

use crate::config::{invalid, GrpcServerTls};
use crate::error::Error;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::Path;
use std::sync::Arc;

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{}: no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?
        .ok_or_else(|| invalid(key, format!("{}: no PEM private key", path.display())))
}

/// The gRPC listener's TLS configuration, or `None` for plaintext.
pub fn grpc_server_config(tls: &GrpcServerTls) -> Result<Option<Arc<rustls::ServerConfig>>, Error> {
    let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = read_certs(cert, "control_plane.grpc_tls.cert_file")?;
    let key = read_key(key, "control_plane.grpc_tls.key_file")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("control_plane.grpc_tls", e.to_string()))?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca, "control_plane.grpc_tls.client_ca_file")? {
                roots
                    .add(c)
                    .map_err(|e| invalid("control_plane.grpc_tls.client_ca_file", e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("control_plane.grpc_tls.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("control_plane.grpc_tls", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(config)))
}

//! Helpers for end-to-end tests that start the real aigw binaries.
//!
//! - [`process`]: locate a binary in `target/<profile>/`, free ports, child
//!   processes with output captured to files (killed on drop), bounded polling.
//! - [`browser`]: chromedriver on a free port and headless Chromium (WebDriver),
//!   screenshots beside the binaries, for the console tests.
//! - [`control_plane`]: start `aigw-control-plane` on free ports with its own
//!   temp data dir; kill -9 and restart it on the same data dir.
//! - [`rest`]: a REST admin client; [`grpc`]: gRPC admin and reflection clients.
//! - [`fixtures`]: admin resource bodies shaped like the seed's curl calls.
//! - [`data_plane`]: start `aigw-data-plane` nodes; an OpenAI-API client for
//!   the proxy, OpenAI error-envelope and SSE checks.
//! - [`mock_azure`]: a mock Azure OpenAI upstream.
//! - [`mock_entra`]: mock Entra ID token endpoint (TLS, test CA), App Service
//!   managed identity endpoint, for Entra ID authentication upstream.
//! - [`mock_oidc`]: a local OpenID issuer (discovery document, JWKS, test
//!   RSA/EC keys) and token signing, for caller JWTs.
//! - [`nats`]: a real `nats-server` with JetStream on a free port.
//! - [`metrics`]: reading Prometheus text.
//! - [`pki`]: a throwaway CA issuing server and client certificates.
//! - [`usage`]: usage totals from the admin API, exact comparison.
//! - [`otlp_receiver`]: a real OTLP/gRPC trace receiver collecting exported spans.
//!
//! Every test starts its own processes, so tests can run in parallel.

pub mod browser;
pub mod control_plane;
pub mod data_plane;
pub mod fixtures;
pub mod grpc;
pub mod metrics;
pub mod mock_azure;
pub mod mock_entra;
pub mod mock_oidc;
pub mod nats;
pub mod otlp_receiver;
pub mod pki;
pub mod process;
pub mod rest;
pub mod usage;

pub use control_plane::{ControlPlane, Options};
pub use rest::{sha256_hex, AdminClient, Resp};

//! The life of every aigw binary, written once: a configuration error exits
//! with status 2 (nothing started), then a tokio runtime, telemetry (flushed
//! before the process exits, whatever the outcome), the binary's own work
//! until a signal or an error, and the exit status.

use crate::config::TelemetryConfig;
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// What a binary is called in its messages and in exported traces.
pub struct Binary {
    /// Prefix of every message on stderr (`aigw-data-plane: …`).
    pub name: &'static str,
    /// `service.name` of exported spans.
    pub service: &'static str,
}

impl Binary {
    /// Runs `work` on a fresh multi-threaded runtime with telemetry set up
    /// from `telemetry(&config)` (its section and the node id). `{:#}` shows
    /// an error's whole chain of causes.
    pub fn run<C, E, Fut>(
        &self,
        loaded: Result<C, impl Display>,
        telemetry: impl FnOnce(&C) -> (&TelemetryConfig, String),
        work: impl FnOnce(C) -> Fut,
    ) -> ExitCode
    where
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: {e:#}", self.name);
                return ExitCode::from(2);
            }
        };
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{}: cannot start the runtime: {e}", self.name);
                return ExitCode::FAILURE;
            }
        };
        let mut exporter = {
            let (section, node_id) = telemetry(&config);
            crate::telemetry::init(section, self.service, &node_id)
        };
        let result = runtime.block_on(work(config));
        exporter.shutdown();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}: {e:#}", self.name);
                ExitCode::FAILURE
            }
        }
    }
}

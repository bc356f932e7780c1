use aigw_control_plane::{Config, ControlPlane};
use aigw_shared::config::ProcessConfig;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// aigw control plane: admin API, event log, config snapshots.
#[derive(Parser)]
#[command(name = "aigw-control-plane", version)]
struct Args {
    /// YAML config file; every key can be overridden with AIGW__SECTION__KEY.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Standalone mode moved to the `aigw` binary; refused with that hint.
    #[arg(long, hide = true)]
    standalone: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.standalone {
        eprintln!(
            "aigw-control-plane: --standalone: standalone mode (control plane and one data plane \
             in one process) is the `aigw` binary: run `aigw --config FILE` (cargo run -p aigw)"
        );
        return ExitCode::from(2);
    }
    let config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aigw-control-plane: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aigw-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Flushed before the process exits.
    let mut telemetry = aigw_shared::telemetry::init(
        &config.telemetry,
        "aigw-control-plane",
        &aigw_shared::node::hostname(),
    );
    let result = runtime.block_on(async {
        ControlPlane::start(config)
            .await?
            .run_until(aigw_shared::telemetry::shutdown_signal())
            .await
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aigw-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

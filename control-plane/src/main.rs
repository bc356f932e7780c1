use aigw_control_plane::{Config, ControlPlane};
use aigw_shared::config::ProcessConfig;
use aigw_shared::process::Binary;
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
    Binary {
        name: "aigw-control-plane",
        service: "aigw-control-plane",
    }
    .run(
        Config::load(args.config.as_deref(), std::env::vars()),
        |c| (&c.telemetry, aigw_shared::node::hostname()),
        |config| async {
            ControlPlane::start(config)
                .await?
                .run_until(aigw_shared::telemetry::shutdown_signal())
                .await
        },
    )
}

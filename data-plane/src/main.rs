use aigw_data_plane::{Config, DataPlane, Settings};
use aigw_shared::config::ProcessConfig;
use aigw_shared::process::Binary;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// aigw data plane: the OpenAI-compatible proxy to Azure OpenAI.
#[derive(Parser)]
#[command(name = "aigw-data-plane", version)]
struct Args {
    /// YAML config file; every key can be overridden with AIGW__SECTION__KEY.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = Config::load(args.config.as_deref(), std::env::vars())
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok((Settings::new(&c, None)?, c)));
    Binary {
        name: "aigw-data-plane",
        service: "aigw-data-plane",
    }
    .run(
        loaded,
        |(settings, config)| (&config.telemetry, settings.node_id.clone()),
        |(settings, _)| async {
            DataPlane::start(settings)
                .await?
                .run_until(aigw_shared::telemetry::shutdown_signal())
                .await;
            Ok::<_, aigw_data_plane::Error>(())
        },
    )
}

use aigw_data_plane::{Config, DataPlane, Settings};
use aigw_shared::config::ProcessConfig;
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
    let (settings, config) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("aigw-data-plane: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aigw-data-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Flushed before the process exits.
    let mut telemetry =
        aigw_shared::telemetry::init(&config.telemetry, "aigw-data-plane", &settings.node_id);
    let result = runtime.block_on(async {
        let dp = DataPlane::start(settings).await?;
        dp.run_until(aigw_shared::telemetry::shutdown_signal())
            .await;
        Ok::<_, aigw_data_plane::Error>(())
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aigw-data-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

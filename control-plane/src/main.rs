use aigw_shared::config::Config;
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
    /// Also run one data plane in this process.
    #[arg(long)]
    standalone: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), std::env::vars()).and_then(|mut c| {
        c.standalone |= args.standalone;
        c.validate().map(|()| c)
    }) {
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
    // Flushed before the process exits; a standalone control plane's
    // in-process data plane shares it.
    let node_id = config
        .data_plane
        .node_id
        .clone()
        .unwrap_or_else(aigw_data_plane::hostname);
    let mut telemetry =
        aigw_shared::telemetry::init(&config.telemetry, "aigw-control-plane", &node_id);
    let result = runtime.block_on(async {
        aigw_control_plane::ControlPlane::start(config)
            .await?
            .run_until(shutdown_signal())
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

//! `aigw`: the whole gateway in one process, the embedded default. It
//! composes the two planes and nothing else: the control plane, one data
//! plane fed through the same gRPC config stream as any other node, and the
//! in-process usage bus when no NATS is configured.

mod config;

use aigw_shared::process::Binary;
use anyhow::Context;
use clap::Parser;
use config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// aigw standalone: control plane and one data plane in one process.
#[derive(Parser)]
#[command(name = "aigw", version)]
struct Args {
    /// YAML config file (the control plane's sections and the data plane's);
    /// every key can be overridden with AIGW__SECTION__KEY.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Accepted for scripts written for `aigw-control-plane --standalone`.
    #[arg(long, hide = true)]
    standalone: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // One exporter for both planes.
    Binary {
        name: "aigw",
        service: "aigw-control-plane",
    }
    .run(
        Config::load_parts(args.config.as_deref()),
        |(control_plane, data_plane)| (&control_plane.telemetry, data_plane.node_id()),
        |(control_plane, data_plane)| run(control_plane, data_plane),
    )
}

/// Starts the control plane, then the node against its gRPC address; on a
/// signal the node drains first, so its last usage events still reach the
/// control plane's aggregator.
async fn run(
    control_plane: aigw_control_plane::Config,
    data_plane: aigw_data_plane::Config,
) -> anyhow::Result<()> {
    let cp = aigw_control_plane::ControlPlane::start(control_plane)
        .await
        .context("control plane")?;
    let mut settings =
        aigw_data_plane::Settings::new(&data_plane, cp.node_token().map(str::to_string))
            .context("data plane")?;
    settings.control_plane_urls = vec![format!("http://{}", cp.grpc_addr)];
    settings.usage_bus = cp.in_process_bus();
    let dp = aigw_data_plane::DataPlane::start(settings)
        .await
        .context("data plane")?;
    cp.run_until(async move {
        aigw_shared::telemetry::shutdown_signal().await;
        dp.stop().await;
    })
    .await
    .context("control plane")
}

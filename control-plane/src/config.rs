//! The control plane's process configuration: the sections of the config file
//! it takes. Standalone mode (control plane plus one node in one process) is
//! the `aigw` binary, whose file adds the data plane's sections.

use aigw_shared::config::{
    AdminConfig, ControlPlaneConfig, NatsConfig, NodesConfig, ProcessConfig, Retired,
    SecretsConfig, TelemetryConfig,
};
use aigw_shared::Error;
use serde::Deserialize;

/// The control plane's config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub admin: AdminConfig,
    pub secrets: SecretsConfig,
    pub control_plane: ControlPlaneConfig,
    pub nodes: NodesConfig,
    pub nats: NatsConfig,
    pub telemetry: TelemetryConfig,
    /// Set by the `aigw` binary, never by the file: a node runs in this
    /// process, so the master key and node token may be generated.
    #[serde(skip)]
    pub embedded_node: bool,
}

/// What to run instead, for a file written for standalone mode.
const STANDALONE: &str =
    "standalone mode (control plane and one data plane in one process) is the \
`aigw` binary: run `aigw --config FILE` (cargo run -p aigw), or remove this section to run the \
control plane alone";

impl ProcessConfig for Config {
    const RETIRED: &'static [Retired] = &[
        Retired {
            key: "standalone",
            instead: STANDALONE,
        },
        Retired {
            key: "data_plane",
            instead: STANDALONE,
        },
    ];

    fn validate(&self) -> Result<(), Error> {
        self.admin.validate()?;
        self.secrets.validate()?;
        self.control_plane.validate()?;
        self.nodes.validate(!self.embedded_node)?;
        self.nats.validate()?;
        self.telemetry.validate()
    }
}

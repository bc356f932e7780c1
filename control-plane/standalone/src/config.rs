//! The standalone file: the union of the control plane's sections and the
//! data plane's, split into each plane's own config and validated by each.

use aigw_shared::config::{
    AdminConfig, ControlPlaneConfig, DataPlaneConfig, NatsConfig, NodesConfig, ProcessConfig,
    SecretsConfig, TelemetryConfig,
};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The key older standalone files carry; `false` is a mistake worth naming.
    pub standalone: Option<bool>,
    pub admin: AdminConfig,
    pub secrets: SecretsConfig,
    pub control_plane: ControlPlaneConfig,
    pub data_plane: DataPlaneConfig,
    pub nodes: NodesConfig,
    pub nats: NatsConfig,
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// Loads the file with its environment overrides and splits it.
    pub fn load_parts(
        path: Option<&Path>,
    ) -> Result<(aigw_control_plane::Config, aigw_data_plane::Config), aigw_shared::Error> {
        let file = Self::load(path, std::env::vars())?;
        Ok(file.split())
    }

    fn split(mut self) -> (aigw_control_plane::Config, aigw_data_plane::Config) {
        // The console's playground calls this process's own node unless told otherwise.
        if self.admin.console.playground_url.is_none() {
            let mut listen = self.data_plane.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            self.admin.console.playground_url = Some(format!("http://{listen}"));
        }
        let control_plane = aigw_control_plane::Config {
            admin: self.admin,
            secrets: self.secrets,
            control_plane: self.control_plane,
            nodes: self.nodes.clone(),
            nats: self.nats.clone(),
            telemetry: self.telemetry.clone(),
            embedded_node: true,
        };
        let data_plane = aigw_data_plane::Config {
            data_plane: self.data_plane,
            nodes: self.nodes,
            nats: self.nats,
            telemetry: self.telemetry,
        };
        (control_plane, data_plane)
    }
}

impl ProcessConfig for Config {
    fn validate(&self) -> Result<(), aigw_shared::Error> {
        if self.standalone == Some(false) {
            return Err(aigw_shared::Error::ConfigInvalid {
                key: "standalone".into(),
                message: "`aigw` always runs standalone; run `aigw-control-plane` for a control \
                          plane alone, or remove this key"
                    .into(),
            });
        }
        let (control_plane, data_plane) = self.clone().split();
        control_plane.validate()?;
        // The node's token comes from the control plane in this process.
        data_plane.data_plane.validate()?;
        data_plane.telemetry.validate()
    }
}

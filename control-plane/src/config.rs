//! The control plane's process configuration: the sections of the config file
//! it takes. Standalone mode (control plane plus one node in one process) is
//! the `aigw` binary, whose file adds the data plane's sections.

use aigw_shared::config::{
    refuse_well_known, AdminConfig, ControlPlaneConfig, NatsConfig, NodesConfig, ProcessConfig,
    Retired, SecretsConfig, TelemetryConfig,
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
        // Without a shared token only node credentials issued through the
        // admin API open the config stream.
        self.nodes.validate(false)?;
        let cp = &self.control_plane;
        for key in &self.admin.keys {
            refuse_well_known("admin.keys", key, cp.admin_listen)?;
            refuse_well_known("admin.keys", key, cp.grpc_listen)?;
        }
        if let Some(token) = &self.nodes.token {
            refuse_well_known("nodes.token", token, cp.grpc_listen)?;
        }
        self.nats.validate()?;
        if cp.replication.is_some() && self.nats.url.is_none() {
            return Err(Error::ConfigInvalid {
                key: "control_plane.replication".into(),
                message: "the replicated log lives in NATS JetStream: set nats.url".into(),
            });
        }
        self.telemetry.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin_listen: &str, key: &str, token: &str) -> Config {
        let mut cfg = Config::default();
        cfg.admin.keys = vec![key.into()];
        cfg.nodes.token = Some(token.into());
        cfg.control_plane.admin_listen = admin_listen.parse().unwrap();
        cfg.control_plane.grpc_tls.insecure = true;
        cfg
    }

    #[test]
    fn published_defaults_are_refused_beyond_loopback() {
        let err = config("0.0.0.0:3001", "admin-local-only-change-me", "t0k3n-x")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.keys") && err.contains("published default"),
            "{err}"
        );
        // On loopback they stay usable for a local try-out.
        config("127.0.0.1:3001", "admin-local-only-change-me", "t0k3n-x")
            .validate()
            .unwrap();
        // Own secrets are fine anywhere.
        config("0.0.0.0:3001", "0f9a8e7d6c5b4a39", "t0k3n-x")
            .validate()
            .unwrap();
    }

    #[test]
    fn console_sso_settings_are_checked() {
        let with = |oidc: serde_json::Value| {
            let mut cfg = config("127.0.0.1:3001", "own-key-123", "t0k3n-x");
            cfg.admin.console.oidc = Some(serde_json::from_value(oidc).unwrap());
            cfg.validate().map_err(|e| e.to_string())
        };
        let good = serde_json::json!({
            "issuer": "https://login.microsoftonline.com/t/v2.0",
            "client_id": "c",
            "redirect_url": "https://gw.example/console/oidc/callback",
            "admin_values": ["aigw.admin"],
        });
        with(good.clone()).unwrap();
        let bad = |patch: serde_json::Value, key: &str| {
            let mut v = good.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            let err = with(v).unwrap_err();
            assert!(err.contains(key), "{err}");
        };
        bad(
            serde_json::json!({"issuer": "http://login.example"}),
            "admin.console.oidc.issuer",
        );
        bad(
            serde_json::json!({"redirect_url": "https://gw.example/elsewhere"}),
            "redirect_url",
        );
        bad(serde_json::json!({"client_id": ""}), "client_id");
        bad(serde_json::json!({"scopes": ["profile"]}), "scopes");
        bad(serde_json::json!({"admin_values": []}), "admin_values");
        // A local issuer over http is fine (tests, a dev IdP).
        let mut local = good.clone();
        local["issuer"] = serde_json::json!("http://127.0.0.1:5556");
        with(local).unwrap();

        let mut cfg = config("127.0.0.1:3001", "own-key-123", "t0k3n-x");
        cfg.admin.console.session_ttl =
            aigw_shared::domain::HumanDuration(std::time::Duration::from_secs(5));
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("session_ttl"));
    }

    #[test]
    fn a_published_node_token_is_refused_on_a_public_grpc_listener() {
        let mut cfg = config(
            "127.0.0.1:3001",
            "own-key-123",
            "compose-node-token-change-me",
        );
        cfg.control_plane.grpc_listen = ([0, 0, 0, 0], 50051).into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("nodes.token"), "{err}");
    }
}

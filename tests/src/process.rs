//! Running the real binaries: finding them, free ports, child processes whose
//! output goes to files, and bounded polling.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to the running test executable.
///
/// A test runs as `target/<profile>/deps/<test>-<hash>`, so the binaries are
/// two directories up, in `target/<profile>/`. `AIGW_<NAME>_BIN` (e.g.
/// `AIGW_CONTROL_PLANE_BIN`) overrides the location.
///
/// # Panics
/// If the binary does not exist: build it first (`cargo build --workspace`).
pub fn binary(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{var} points at {}, which is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("cannot locate the running test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is not inside target/<profile>/deps");
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}.\n\
         Build it first: `cargo build -p {name}` (or run the whole workspace with \
         `cargo nextest run --workspace`), or point {var} at it.",
        path.display()
    );
    path
}

/// A loopback address with a port that was free a moment ago.
///
/// The port is found by binding `127.0.0.1:0` and dropping the listener, so
/// another process can take it before the child binds it; starters retry on
/// "address in use".
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    l.local_addr().expect("listener has no address")
}

/// Polls `check` until it yields `Some`, at most `attempts` times with `every`
/// between attempts. Use it to wait for a condition, never for time to pass.
/// An `Err` from `check` is final and returned at once; map transient
/// failures (e.g. connection refused) to `Ok(None)`.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    attempts: u32,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    for _ in 0..attempts.max(1) {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        tokio::time::sleep(every).await;
    }
    bail!(
        "gave up waiting for {what} after {attempts} attempts ({:?})",
        started.elapsed()
    )
}

/// A child process whose stdout and stderr go to files. Killed on drop; its
/// output is then printed to the test's stderr, which test runners show only
/// for failing tests.
pub struct Process {
    name: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Spawns `cmd` with stdout/stderr redirected to `<log_dir>/<label>.stdout.log`
    /// and `.stderr.log`. Inherited `AIGW_*` and `RUST_LOG` variables are
    /// removed first so a developer's shell cannot change what a test sees;
    /// set what the test needs on `cmd` afterwards via `envs`.
    pub fn spawn(
        mut cmd: Command,
        log_dir: &Path,
        label: &str,
        envs: &[(String, String)],
    ) -> Result<Self> {
        let stdout = log_dir.join(format!("{label}.stdout.log"));
        let stderr = log_dir.join(format!("{label}.stderr.log"));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("AIGW_") || k == "RUST_LOG" {
                cmd.env_remove(k.as_ref());
            }
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).context("creating stdout log")?)
            .stderr(File::create(&stderr).context("creating stderr log")?);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self {
            name: label.to_string(),
            child: Some(child),
            stdout,
            stderr,
            exit: None,
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited (without blocking).
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.exit = Some(status);
                    self.child = None;
                }
            }
        }
        Ok(self.exit)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Waits for the process to exit on its own, polling at most `attempts`
    /// times 20 ms apart; kills it and fails if it is still running then.
    pub async fn wait_exit(&mut self, attempts: u32) -> Result<ExitStatus> {
        let waited = poll_until(
            &format!("{} to exit", self.name),
            attempts,
            Duration::from_millis(20),
            || {
                let r = self.try_exit();
                async move { r }
            },
        )
        .await;
        match waited {
            Ok(s) => Ok(s),
            Err(e) => {
                self.kill();
                Err(e.context(format!("{} kept running; killed it", self.name)))
            }
        }
    }

    /// SIGTERM (via `kill -TERM <pid>`), then waits for the process to exit on
    /// its own, polling at most `attempts` times 20 ms apart (see
    /// [`Process::wait_exit`]: killed and an error if it is still running).
    /// Returns the exit status; an already exited process returns its status.
    pub async fn terminate(&mut self, attempts: u32) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        let pid = self.id().context("no child process")?;
        let out = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .output()
            .context("running `kill -TERM`")?;
        if !out.status.success() {
            // It may have exited between try_exit and kill.
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            bail!(
                "kill -TERM {pid} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.wait_exit(attempts).await
    }

    /// SIGKILL on unix (`Child::kill`): no chance to flush or clean up. Reaps
    /// the child so its ports and files are released when this returns.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.exit = Some(status);
            }
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn log_paths(&self) -> (&Path, &Path) {
        (&self.stdout, &self.stderr)
    }

    /// The tail of both logs, for error messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {name} stdout ({}) ---\n{}\n--- {name} stderr ({}) ---\n{}",
            self.stdout.display(),
            tail(&self.stdout(), 200),
            self.stderr.display(),
            tail(&self.stderr(), 200),
            name = self.name,
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        // Captured by the test runner: shown only when the test fails.
        eprintln!("{}", self.logs());
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS` in `/proc/PID/status`),
/// or `None` when it cannot be read (no such process, not Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size of process `pid` in KiB (`VmHWM`): the most it
/// ever held, so a short spike between two polls is not missed.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time a process has used so far (user + system), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines ...]\n"));
    }
    out.push_str(&all[skip..].join("\n"));
    out
}

/// Start-up polls of a child's health URL: up to 600 × 50 ms (30 s; the
/// machine may be busy compiling).
pub const READY_ATTEMPTS: u32 = 600;
pub const READY_EVERY: Duration = Duration::from_millis(50);

/// Polls `url` until it answers 2xx; fails at once if `process` exits first,
/// and appends the process's logs to any failure.
pub async fn wait_healthy(process: &mut Process, url: &str, what: &str) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let waited = poll_until(
        &format!("{what} to answer {url}"),
        READY_ATTEMPTS,
        READY_EVERY,
        || {
            let exited = process.try_exit();
            let req = http.get(url).send();
            async move {
                if let Some(status) = exited? {
                    bail!("{what} exited during start-up with {status}");
                }
                Ok(match req.await {
                    Ok(r) if r.status().is_success() => Some(()),
                    _ => None,
                })
            }
        },
    )
    .await;
    waited.map_err(|e| anyhow!("{e:#}\n{}", process.logs()))
}

//! A real browser for the console tests: `chromedriver` started on a free
//! port (killed with the test), headless Chromium with a fresh profile, and
//! a WebDriver client (fantoccini). Missing Chromium or chromedriver is a
//! test failure with the packages to install, never a skip.

use crate::process::{free_addr, poll_until, Process};
use anyhow::{bail, Context, Result};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// How long a page element may take to appear.
pub const WAIT: Duration = Duration::from_secs(20);

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A headless Chromium driven through chromedriver.
pub struct Browser {
    pub client: Client,
    _driver: Process,
    _profile: TempDir,
    shots: PathBuf,
}

impl Browser {
    pub async fn start() -> Result<Self> {
        let Some(driver_bin) = find_program(&["chromedriver"]) else {
            bail!(
                "chromedriver not found on PATH: the console's browser tests need it. \
                 Install the Debian packages: apt-get install -y chromium chromium-driver \
                 (.ci/run does this)"
            );
        };
        let Some(chromium) = find_program(&["chromium", "chromium-browser", "google-chrome"])
        else {
            bail!(
                "Chromium not found on PATH: apt-get install -y chromium chromium-driver \
                 (.ci/run does this)"
            );
        };
        let profile = tempfile::tempdir()?;
        let addr = free_addr();
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={}", addr.port()))
            .arg("--allowed-ips=127.0.0.1");
        let driver = Process::spawn(cmd, profile.path(), "chromedriver", &[])?;
        let url = format!("http://{addr}");
        let http = reqwest::Client::new();
        poll_until(
            "chromedriver /status",
            100,
            Duration::from_millis(100),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    Ok(match http.get(format!("{url}/status")).send().await {
                        Ok(r) if r.status().is_success() => Some(()),
                        _ => None,
                    })
                }
            },
        )
        .await
        .with_context(|| format!("chromedriver did not start: {}", driver.logs()))?;
        let user_data = profile.path().join("chromium-profile");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", user_data.display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .with_context(|| format!("starting a Chromium session: {}", driver.logs()))?;
        Ok(Self {
            client,
            _driver: driver,
            _profile: profile,
            shots: screenshot_dir(),
        })
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("goto {url}"))
    }

    /// Waits for the element `css` to appear; the failure shows the page it was not on.
    pub async fn wait(&self, css: &str) -> Result<Element> {
        match self
            .client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => Ok(e),
            Err(e) => {
                let url = self
                    .client
                    .current_url()
                    .await
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                let body = match self.client.find(Locator::Css("body")).await {
                    Ok(b) => b.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                bail!("waiting for `{css}` on {url}: {e}\npage text:\n{body}")
            }
        }
    }

    pub async fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        Ok(self.client.find_all(Locator::Css(css)).await?)
    }

    /// Types `text` into the input `css` (after clearing it).
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let e = self.wait(css).await?;
        e.clear().await?;
        e.send_keys(text).await?;
        Ok(())
    }

    pub async fn click(&self, css: &str) -> Result<()> {
        self.wait(css).await?.click().await?;
        Ok(())
    }

    /// The element's text. A page that re-renders between finding the
    /// element and reading it (a streamed answer replacing the result block)
    /// leaves a stale reference: find it again, a few times at most.
    pub async fn text(&self, css: &str) -> Result<String> {
        let mut tries = 0;
        loop {
            match self.wait(css).await?.text().await {
                Err(fantoccini::error::CmdError::Standard(e))
                    if e.error == fantoccini::error::ErrorStatus::StaleElementReference
                        && tries < 5 =>
                {
                    tries += 1;
                }
                r => return Ok(r?),
            }
        }
    }

    /// Saves a PNG of the page as `<name>.png` in the screenshot dir.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.client.screenshot().await?;
        std::fs::create_dir_all(&self.shots)?;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    /// Runs `fetch` in the page (with its cookies) and returns the status.
    pub async fn fetch_status(&self, url: &str, body: &str) -> Result<u16> {
        let v = self
            .client
            .execute_async(
                "const [url, body, done] = arguments;
                 fetch(url, {method: 'POST', credentials: 'same-origin',
                             headers: {'content-type': 'application/x-www-form-urlencoded'}, body})
                   .then(r => done(r.status), e => done(String(e)));",
                vec![json!(url), json!(body)],
            )
            .await?;
        v.as_u64()
            .map(|s| s as u16)
            .with_context(|| format!("fetch {url}: {v}"))
    }

    pub async fn close(self) -> Result<()> {
        self.client.close().await?;
        Ok(())
    }
}

/// `target/<profile>/console-screenshots`: beside the binaries, never committed.
pub fn screenshot_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir)
        .join("console-screenshots")
}

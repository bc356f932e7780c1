//! Configuration: a bad file or override makes the binary exit non-zero with
//! one clear line naming the key; good overrides take effect.

use aigw_tests::control_plane::{run_binary_until_exit, run_until_exit, Exited, STANDALONE_BINARY};
use aigw_tests::data_plane::{DataPlane, DataPlaneOptions};
use aigw_tests::{AdminClient, ControlPlane, Options};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// A change to a generated config.
type Edit = Box<dyn FnOnce(&mut Value)>;

/// A valid config (free ports, data in a temp dir) changed by `edit`.
fn config_with(dir: &tempfile::TempDir, edit: impl FnOnce(&mut Value)) -> Result<String> {
    let mut cfg = Options::default().render(dir.path());
    edit(&mut cfg);
    Ok(serde_yaml::to_string(&cfg)?)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The run failed with exactly one line on stderr that contains every `needle`.
fn assert_rejected(out: &Exited, needles: &[&str]) -> Result<()> {
    ensure!(
        !out.status.success(),
        "expected a non-zero exit, got {}\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    ensure!(
        out.status.code().is_some(),
        "killed by a signal, not an orderly exit: {}",
        out.status
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        lines.len() == 1,
        "expected one line on stderr, got {}:\n{}",
        lines.len(),
        out.stderr
    );
    for n in needles {
        ensure!(
            lines[0].contains(n),
            "stderr line does not name {n:?}: {}",
            lines[0]
        );
    }
    Ok(())
}

async fn run(yaml: &str, envs: &[(&str, &str)]) -> Result<Exited> {
    run_until_exit(yaml, &[], &env(envs)).await
}

#[tokio::test]
async fn unknown_keys_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: Vec<(Edit, &[&str])> = vec![
        (
            Box::new(|c| c["admin"]["kyes"] = json!(["k"])),
            &["admin.kyes"],
        ),
        (Box::new(|c| c["colour"] = json!("blue")), &["colour"]),
        (
            Box::new(|c| c["control_plane"]["data_dri"] = json!("/tmp")),
            &["control_plane.data_dri"],
        ),
        (
            Box::new(|c| c["telemetry"]["otlp"] = json!("http://x")),
            &["telemetry.otlp"],
        ),
    ];
    for (edit, needles) in cases {
        let yaml = config_with(&dir, edit)?;
        assert_rejected(&run(&yaml, &[]).await?, needles).with_context(|| yaml.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn wrong_types_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| c["control_plane"]["admin_listen"] = json!("nope")),
            "control_plane.admin_listen",
        ),
        (
            Box::new(|c| c["control_plane"]["snapshot_every"] = json!("many")),
            "control_plane.snapshot_every",
        ),
        (
            Box::new(|c| c["standalone"] = json!("yes please")),
            "standalone",
        ),
        (
            Box::new(|c| c["admin"]["keys"] = json!("just-one-key")),
            "admin.keys",
        ),
        (Box::new(|c| c["admin"] = json!(["k"])), "admin"),
        (
            Box::new(|c| c["telemetry"]["sample_ratio"] = json!(2.5)),
            "telemetry.sample_ratio",
        ),
        (
            Box::new(|c| c["telemetry"]["log_format"] = json!("xml")),
            "telemetry.log_format",
        ),
        (
            Box::new(|c| c["telemetry"]["access_log_flush_ms"] = json!(3_600_000)),
            "telemetry.access_log_flush_ms",
        ),
        (
            Box::new(|c| c["telemetry"]["access_log_flush_ms"] = json!(-1)),
            "telemetry.access_log_flush_ms",
        ),
    ];
    for (edit, key) in cases {
        let yaml = config_with(&dir, edit)?;
        assert_rejected(&run(&yaml, &[]).await?, &[key]).with_context(|| yaml.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn missing_admin_keys_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: Vec<Edit> = vec![
        Box::new(|c| {
            c.as_object_mut().map(|o| o.remove("admin"));
        }),
        Box::new(|c| c["admin"]["keys"] = json!([])),
        Box::new(|c| c["admin"]["keys"] = json!(["   "])),
    ];
    for edit in cases {
        let yaml = config_with(&dir, edit)?;
        assert_rejected(&run(&yaml, &[]).await?, &["admin.keys"]).with_context(|| yaml.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn bad_master_keys_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for bad in [
        "c2hvcnQ=",
        "not base64 at all!",
        "",
        "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=",
    ] {
        let yaml = config_with(&dir, |c| c["secrets"]["master_key"] = json!(bad))?;
        assert_rejected(&run(&yaml, &[]).await?, &["secrets.master_key"])
            .with_context(|| format!("master_key {bad:?}"))?;
    }
    // The same through AIGW_MASTER_KEY.
    let yaml = config_with(&dir, |c| {
        c.as_object_mut().map(|o| o.remove("secrets"));
    })?;
    assert_rejected(
        &run(&yaml, &[("AIGW_MASTER_KEY", "c2hvcnQ=")]).await?,
        &["secrets.master_key"],
    )?;
    // Outside standalone a master key is required at all.
    assert_rejected(&run(&yaml, &[]).await?, &["secrets.master_key"])?;
    Ok(())
}

#[tokio::test]
async fn bad_environment_overrides_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let yaml = config_with(&dir, |_| {})?;
    assert_rejected(
        &run(
            &yaml,
            &[("AIGW__CONTROL_PLANE__GRPC_LISTEN", "not-an-address")],
        )
        .await?,
        &["control_plane.grpc_listen"],
    )?;
    assert_rejected(&run(&yaml, &[("AIGW__ADMIN__NOPE", "1")]).await?, &["nope"])?;
    assert_rejected(
        &run(&yaml, &[("AIGW__SECRETS__MASTER_KEY", "dG9vIHNob3J0")]).await?,
        &["secrets.master_key"],
    )?;
    Ok(())
}

/// Without `nodes.token` a control plane accepts only node credentials
/// issued through the admin API; a blank token is a mistake and refused.
#[tokio::test]
async fn without_a_node_token_only_issued_credentials_open_the_config_stream() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let yaml = config_with(&dir, |c| c["nodes"]["token"] = json!(" "))?;
    assert_rejected(&run(&yaml, &[]).await?, &["nodes.token"])?;

    let cp = ControlPlane::start_with(Options {
        node_token: None,
        ..Options::default()
    })
    .await?;
    let url = cp.grpc_url();
    let channel = || aigw_tests::grpc::channel(&url);
    let refused = aigw_tests::grpc::config_watch_first(channel().await?, "node-a", "guess")
        .await?
        .expect_err("a snapshot without a credential");
    ensure!(
        refused.code() == tonic::Code::Unauthenticated,
        "{refused:?}"
    );
    let issued = cp
        .rest()
        .post("/admin/v1/nodes", &json!({"node_id": "node-a"}))
        .await?
        .expect(201)?;
    let token = issued["token"].as_str().unwrap_or_default();
    let snapshot = aigw_tests::grpc::config_watch_first(channel().await?, "node-a", token).await?;
    ensure!(snapshot.is_ok(), "{snapshot:?}");
    Ok(())
}

#[tokio::test]
async fn unreadable_or_malformed_files_are_reported() -> Result<()> {
    let out = run_until_exit_missing_file().await?;
    assert_rejected(&out, &["does-not-exist.yaml"])?;
    let out = run("admin:\n  keys: [k\n  nope: {\n", &[]).await?;
    assert_rejected(&out, &["YAML"])?;
    Ok(())
}

async fn run_until_exit_missing_file() -> Result<Exited> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("does-not-exist.yaml");
    let mut cmd = std::process::Command::new(aigw_tests::process::binary(
        aigw_tests::control_plane::BINARY,
    ));
    cmd.arg("--config").arg(&missing);
    let mut p = aigw_tests::process::Process::spawn(cmd, dir.path(), "missing", &[])?;
    let status = p.wait_exit(1000).await?;
    Ok(Exited {
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    })
}

#[tokio::test]
async fn environment_overrides_take_effect() -> Result<()> {
    let env_key = aigw_tests::control_plane::random_token("env-admin");
    let opts = Options::default().with_env("AIGW__ADMIN__KEYS", format!("[{env_key}]"));
    // The key written to the config file, which the override replaces.
    let file_key = opts.admin_keys[0].clone();
    let cp = ControlPlane::start_with(opts).await?;
    let url = cp.admin_url();
    AdminClient::new(&url, Some(&env_key))
        .get("/admin/v1/provider_keys")
        .await?
        .expect(200)?;
    AdminClient::new(&url, Some(&file_key))
        .get("/admin/v1/provider_keys")
        .await?
        .expect_error(401)?;
    Ok(())
}

#[tokio::test]
async fn standalone_files_and_flags_point_at_the_aigw_binary() -> Result<()> {
    // A standalone file (no node token, no master key, a data_plane section)
    // runs under `aigw`, which generates the master key and node token.
    let cp = ControlPlane::start_with(Options::standalone()).await?;
    assert!(cp.data_dir().join("master.key").is_file());
    assert!(cp.data_dir().join("node.token").is_file());
    cp.rest()
        .get("/admin/v1/provider_keys")
        .await?
        .expect(200)?;

    // The control-plane binary refuses it with one line naming `aigw`:
    // for the file's `data_plane` section, `standalone: true`, and the flag.
    let dir = tempfile::tempdir()?;
    let cfg = Options::standalone().render(dir.path());
    let yaml = serde_yaml::to_string(&cfg)?;
    assert_rejected(&run(&yaml, &[]).await?, &["data_plane", "`aigw"])?;
    let mut with_key = cfg.clone();
    with_key["standalone"] = json!(true);
    assert_rejected(
        &run(&serde_yaml::to_string(&with_key)?, &[]).await?,
        &["standalone", "`aigw"],
    )?;
    let plain = config_with(&dir, |_| {})?;
    assert_rejected(
        &run_until_exit(&plain, &["--standalone"], &[]).await?,
        &["--standalone", "`aigw"],
    )?;

    // `aigw` takes an old file's `standalone: true`, and names `false`.
    let mut off = cfg;
    off["standalone"] = json!(false);
    let out =
        run_binary_until_exit(STANDALONE_BINARY, &serde_yaml::to_string(&off)?, &[], &[]).await?;
    assert_rejected(&out, &["standalone", "aigw-control-plane"])?;
    Ok(())
}

#[tokio::test]
async fn a_data_plane_needs_no_admin_section() -> Result<()> {
    // The documented node file (data_plane, nodes, telemetry) joins a
    // control plane and applies its snapshot.
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start_with(Options::default()).await?;
    let opts = DataPlaneOptions::for_control_plane(&cp, "dp-noadmin");
    let node = DataPlane::start_ready(opts.clone()).await?;
    ensure!(
        !node
            .config()
            .as_object()
            .is_some_and(|o| o.contains_key("admin")),
        "the harness's node file has an admin section"
    );

    // A control plane's section on a node is named with what to do instead.
    let base = opts.render(dir.path());
    for (section, value, needle) in [
        ("admin", json!({"keys": ["k"]}), "no admin keys"),
        ("secrets", json!({"master_key": "x"}), "no master key"),
        ("control_plane", json!({}), "control_plane_url"),
        ("standalone", json!(true), "`aigw`"),
    ] {
        let mut cfg = base.clone();
        cfg[section] = value;
        let out = run_binary_until_exit(
            aigw_tests::data_plane::BINARY,
            &serde_yaml::to_string(&cfg)?,
            &[],
            &[],
        )
        .await?;
        assert_rejected(&out, &[section, needle]).with_context(|| section.to_string())?;
    }
    Ok(())
}

//! The `aigw-data-plane` binary refuses bad configuration with one line
//! naming the key, before binding anything.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: helpers outside #[test] fail the test by panicking"
)]

use std::process::Command;

fn run(yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aigw-data-plane"));
    cmd.arg("--config").arg(&file);
    for (k, _) in std::env::vars() {
        if k.starts_with("AIGW_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_node_token_is_named() {
    let (code, err) = run("", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nodes.token"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn unknown_and_mistyped_keys_are_named() {
    let (code, err) = run("nodes: {token: t}\ndata_plane: {lisen: 1}\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("data_plane") && err.contains("lisen"), "{err}");
    let (code, err) = run(
        "nodes: {token: t}\n",
        &[("AIGW__DATA_PLANE__MAX_BODY_BYTES", "lots")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("data_plane.max_body_bytes"), "{err}");
}

#[test]
fn bad_control_plane_url_is_named() {
    let (code, err) = run(
        "nodes: {token: t}\ndata_plane: {control_plane_url: 'ftp://x'}\n",
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("data_plane.control_plane_url"), "{err}");
}

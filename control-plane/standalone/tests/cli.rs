//! The `aigw` binary refuses a configuration it cannot run safely with one
//! line naming the key (exit code 2), before binding anything. Having an
//! integration test here also makes `cargo nextest run --workspace` build the
//! `aigw` binary the end-to-end tests start.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: helpers outside #[test] fail the test by panicking"
)]

use std::process::Command;

fn run(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aigw"));
    cmd.arg("--config").arg(&file);
    for (k, _) in std::env::vars() {
        if k.starts_with("AIGW_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_published_admin_key_on_a_public_address_is_refused() {
    let (code, err) = run(
        "admin: {keys: [admin-local-only-change-me]}\ncontrol_plane: {admin_listen: \"0.0.0.0:0\"}\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("admin.keys") && err.contains("published default"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn standalone_false_is_named() {
    let (code, err) = run("standalone: false\nadmin: {keys: [k-0123456789]}\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("standalone"), "{err}");
}

//! The binary's command line, run as a process: what a shell user sees.

use std::process::{Command, Stdio};

fn repo_file(rel: &str) -> String {
    format!("{}/../../{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// `simulate ... | head -1`: the reader goes away before the report is written. The report must
/// not end in a panic about a broken pipe, and the exit status must be success.
#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qoe-router"))
        .args([
            "simulate",
            "--fleet",
            &repo_file("bench/fleets/hetero-4.toml"),
            "--workload",
            &repo_file("bench/workloads/smoke.toml"),
            "--policies",
            "qoe,roundrobin",
            "--quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `serve --print-config` prints the settings and exits without listening.
#[test]
fn print_config_prints_the_settings_and_exits() {
    let out = Command::new(env!("CARGO_BIN_EXE_qoe-router"))
        .args([
            "serve",
            "--print-config",
            "--port",
            "0",
            "--target-ttft",
            "250",
        ])
        .env("QOE_API_KEYS", "sk-secret-one")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("target_ttft = 250.0"), "{stdout}");
    assert!(stdout.contains("[qoe]"), "{stdout}");
    assert!(
        stdout.contains("# api_keys: 1 set, not printed"),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-secret-one"), "{stdout}");
}

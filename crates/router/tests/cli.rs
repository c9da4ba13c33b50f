//! The binary's command line, run as a process: what a shell user sees.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// `simulate --config FILE` with a tokenizer set: the simulator does not read it (its engines
/// count by the estimate rule), so it neither needs the file nor a build with the feature, and
/// the report says the setting was not simulated.
#[test]
fn simulate_ignores_the_routers_tokenizer_and_says_so() {
    let out = simulate_with_config("sim-tok", "tokenizer = \"/nonexistent/tokenizer.json\"\n");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("tokenizer = [\"/nonexistent/tokenizer.json\"]"),
        "{stdout}"
    );
}

/// `simulate --config FILE` refuses a file `serve` would refuse at start, [[backends]] included
/// (the fleet file, not they, is simulated).
#[test]
fn simulate_refuses_a_config_file_serve_would_refuse() {
    let out = simulate_with_config("sim-bad", "[[backends]]\nurl = \"not a url\"\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("backend 1: 'not a url' is not a valid URL"),
        "{stderr}"
    );
}

/// `simulate` of the smoke workload on `hetero-4` (roundrobin) with `--config` a file holding
/// `text` (its directory tagged `tag`).
fn simulate_with_config(tag: &str, text: &str) -> Output {
    let (dir, config) = config_file(tag, text);
    let out = run_bounded(
        &[
            "simulate",
            "--fleet",
            &repo_file("bench/fleets/hetero-4.toml"),
            "--workload",
            &repo_file("bench/workloads/smoke.toml"),
            "--policies",
            "roundrobin",
            "--quiet",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A directory of this test process's own (tagged `tag`) holding `router.toml` with `text`.
fn config_file(tag: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("qoe-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Runs the binary with `args`; a process still running after 20 s (a server that should have
/// exited) is killed and fails the test.
fn run_bounded(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qoe-router"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("{args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `serve --print-config` prints the settings and exits without listening.
#[test]
fn print_config_prints_the_settings_and_exits() {
    let out = run_bounded(
        &[
            "serve",
            "--print-config",
            "--port",
            "0",
            "--target-ttft",
            "250",
        ],
        &[("QOE_API_KEYS", "sk-secret-one")],
    );
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

/// With a config file too: the file's settings are printed, and the flag still means print.
#[test]
fn print_config_with_a_config_file_prints_the_file_and_exits() {
    let (dir, path) = config_file("print", "routing_logic = \"session\"\nport = 0\n");
    let out = print_config_of(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("routing_logic = \"session\""), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `serve --print-config --config PATH`.
fn print_config_of(path: &std::path::Path) -> Output {
    run_bounded(
        &[
            "serve",
            "--print-config",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    )
}

/// `--print-config` checks the file's `[[backends]]` as `serve` does: a bad one fails it.
#[test]
fn print_config_refuses_a_bad_backend_in_the_file() {
    for (tag, entry, says) in [
        ("port", "url = \"http://127.0.0.1:99999\"", "99999"),
        (
            "role",
            "url = \"http://127.0.0.1:1\"\nrole = \"kv_both\"",
            "kv_both",
        ),
    ] {
        let (dir, path) = config_file(tag, &format!("[[backends]]\n{entry}\n"));
        let out = print_config_of(&path);
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tag}: accepted");
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// A free port on 127.0.0.1 (free when asked: the router binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `qoe-router serve` on `port` with `args`, its output discarded, once `/health` answers.
fn serving(port: u16, args: &[&str]) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qoe-router"))
        .args(["serve", "--port", &port.to_string(), "--log-level", "warn"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !healthy(port) {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("never served");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Whether the router on `port` answers `/health` with 200.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let answer = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    answer().is_some_and(|a| a.starts_with("HTTP/1.1 200"))
}

/// `kill -HUP` (what `systemctl reload` sends) re-reads the config file, and without one it is
/// logged and ignored: its default action would end the router.
#[cfg(unix)]
#[test]
fn sighup_without_a_config_file_does_not_stop_the_router() {
    let port = free_port();
    let mut child = serving(
        port,
        &[
            "--static-backends",
            "http://127.0.0.1:9",
            "--static-models",
            "m",
        ],
    );
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // Whatever the signal does, it has done it once the router answers again or has exited.
    let mut alive = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        alive = healthy(port);
    }
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        exited.is_none() && alive,
        "the router ended on SIGHUP: {exited:?}"
    );
}

/// Logs written to a pipe or file are plain text: no colour escapes to strip from a journal.
#[test]
fn logs_to_a_pipe_are_not_coloured() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qoe-router"))
        .args([
            "serve",
            "--port",
            "0",
            "--static-backends",
            "http://127.0.0.1:9",
            "--static-models",
            "m",
        ])
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let listening = line.contains("listening");
            let _ = tx.send(line);
            if listening {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let listening = line.contains("listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("qoe-router listening")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains('\u{1b}')), "{lines:?}");
}

/// SIGTERM starts a drain that waits for the requests in flight; a second SIGTERM ends the
/// process at once (status 1), without waiting for them.
#[cfg(unix)]
#[test]
fn a_second_sigterm_exits_without_waiting_for_the_drain() {
    use std::io::{Read, Write};
    // An engine that reads what it is sent and never answers; it reports each request line.
    let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let engine_url = format!("http://{}", engine.local_addr().unwrap());
    let (seen_tx, seen) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for mut conn in engine.incoming().map_while(Result::ok) {
            let mut head = [0u8; 256];
            let n = conn.read(&mut head).unwrap_or(0);
            let line = String::from_utf8_lossy(&head[..n]);
            let _ = seen_tx.send(line.lines().next().unwrap_or_default().to_string());
            open.push(conn);
        }
    });
    let port = free_port();
    let mut child = serving(
        port,
        &[
            "--static-backends",
            &engine_url,
            "--static-models",
            "m",
            "--engine-stats-interval",
            "0.2",
            "--shutdown-timeout-ms",
            "600000",
        ],
    );
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"model":"m","prompt":"x","max_tokens":2}"#;
    write!(
        client,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // In flight once it reached the engine.
    loop {
        let line = seen
            .recv_timeout(Duration::from_secs(20))
            .expect("the request reached the engine");
        if line.starts_with("POST /v1/completions") {
            break;
        }
    }
    let pid = child.id().to_string();
    let term = || {
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
    };
    term();
    // Draining once it stops listening: it waits for the request in flight.
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "draining, not exited");
    term();
    let mut status = None;
    for _ in 0..1000 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{status:?}");
}

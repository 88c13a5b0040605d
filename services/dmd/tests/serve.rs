//! `dmd all` and `dmd <service>` as operators run them: a configuration file, the embedded default's
//! warning, a clear refusal for a lone service without NATS, and a clean stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const CONFIG: &str = r#"
[deployment]
name = "dms1"
server_id = "dms1.operator.example"

[[peer]]
server_id = "dms2.enterprise.example"
endpoint = "https://dms2.enterprise.example/delegation"
ca = "PEER_CA"
spki_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
types = ["Partial"]
scopes = ["./Vendor"]

[admin]
listen = "127.0.0.1:0"
token_env = "DMD_TEST_TOKEN"

[health]
listen = "127.0.0.1:0"

[auth]
dm_address = "http://127.0.0.1:9/dm"

[acceptance]
offered_types = ["Partial"]

[provisioning]
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:9/dm"
push_url = "http://127.0.0.1:9"
"#;

/// The status of a plain HTTP GET.
fn get_status(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    answer.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes the configuration (and the peer's CA file it names) into the temporary directory.
fn write_config(tag: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir();
    let ca = dir.join(format!("dmd-serve-{tag}-{}-ca.pem", std::process::id()));
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = dir.join(format!("dmd-serve-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, text.replace("PEER_CA", &ca.display().to_string())).unwrap();
    path
}

#[test]
fn all_runs_in_process_with_a_warning_and_stops_on_sigterm() {
    let path = write_config("all", CONFIG);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["all", "--config"])
        .arg(&path)
        .env("DMD_TEST_TOKEN", "t0k3n")
        // The default level says what the process serves (issue 11).
        .env_remove("RUST_LOG")
        .env_remove("DMD_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait until it says it started (or fails), with a deadline.
    let mut warned = false;
    let mut health = None;
    let serving = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("dmd all to report its start");
        warned |= line.contains("in-process bus");
        if line.contains("health endpoints listening") {
            health = line.split("addr=").nth(1).map(|a| a.trim().to_string());
        }
        if line.contains("serving") {
            break line;
        }
    };
    for what in [
        "deployment=dms1",
        "services=orchestrator,auth,notification,provisioning",
        "peer_endpoint=",
        "device_endpoint=127.0.0.1:",
        "admin_api=127.0.0.1:",
        "bus=in-process",
    ] {
        assert!(serving.contains(what), "{what} in {serving}");
    }
    assert!(
        warned,
        "the embedded default must say loudly that nothing is kept"
    );
    // Probes: alive, and ready once every service started.
    let health = health.expect("the health address in the log");
    for path in ["/livez", "/readyz"] {
        assert_eq!(get_status(&health, path), 200, "{path}");
    }
    // SIGTERM: it drains and exits 0.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dmd all did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code:?}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_lone_service_needs_nats_and_says_so() {
    let path = write_config("lone", CONFIG);
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["auth", "--config"])
        .arg(&path)
        .env("DMD_TEST_TOKEN", "t0k3n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("nats_url"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_bad_configuration_is_refused_before_anything_starts() {
    let path = write_config(
        "bad",
        &CONFIG.replace(
            "offered_types = [\"Partial\"]",
            "offered_types = [\"Whole\"]",
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["all", "--config"])
        .arg(&path)
        .env("DMD_TEST_TOKEN", "t0k3n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("[acceptance]"), "{err}");
    assert!(err.contains("line 25"), "the file's own line: {err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn config_check_resolves_every_reference_and_names_the_place() {
    let good = write_config("check-good", CONFIG);
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["config", "check"])
        .arg(&good)
        .env("DMD_TEST_TOKEN", "t0k3n")
        .output()
        .unwrap();
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("peers [dms2.enterprise.example]"), "{said}");
    // The token's variable unset: the place is the key that names it.
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["config", "check"])
        .arg(&good)
        .env_remove("DMD_TEST_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with(&format!("{}:16:13: ", good.display())),
        "{err}"
    );
    assert!(err.contains("DMD_TEST_TOKEN"), "{err}");
    // A peer's CA file that is not there.
    let bad = write_config(
        "check-bad",
        &CONFIG.replace("PEER_CA", "/nonexistent/ca.pem"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["config", "check"])
        .arg(&bad)
        .env("DMD_TEST_TOKEN", "t0k3n")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(":9:6: [[peer]] ca: cannot read /nonexistent/ca.pem"),
        "{err}"
    );
    for p in [good, bad] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let path = write_config("json", CONFIG);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["--log-format", "json", "all", "--config"])
        .arg(&path)
        .env("DMD_TEST_TOKEN", "t0k3n")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let serving = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("dmd all to report its start");
        // The embedded default's warning is the one plain line (printed before logging matters).
        if line.starts_with("WARNING") {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if value["fields"]["message"] == "serving" {
            break value;
        }
    };
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["fields"]["deployment"], "dms1");
    assert_eq!(serving["fields"]["bus"], "in-process");
    assert!(
        serving["fields"]["health"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(path);
}

//! `dmd all` on a NATS server that asks for TLS and an nkey (issue 13, "Channels"): with the `[nats]`
//! table it connects and serves; with another user's seed it stops with a clear error that does not repeat
//! the seed; on NATS without a master key it refuses to start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dm_bus::testing::{NatsServer, ServerAuth, ServerSecurity, ServerTls, user_nkey};

/// A directory removed on drop.
struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Path, name: &str, url: &str, seed_file: &Path, master_key: bool) -> PathBuf {
    let pki = dir.join("pki");
    let master = if master_key {
        "master_key_env = \"DMD_TEST_MASTER\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"[deployment]
name = "dms1"
server_id = "dms1.operator.example"
nats_url = "{url}"

[nats]
ca = "{ca}"
nkey_seed_file = "{seed}"

[admin]
listen = "127.0.0.1:0"
token_env = "DMD_TEST_TOKEN"

[auth]
dm_address = "http://127.0.0.1:9/dm"
{master}
[acceptance]
offered_types = ["Partial"]
"#,
        ca = pki.join("ca.pem").display(),
        seed = seed_file.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `dmd all`; returns (stopped by itself with this status, every stderr line) once it served
/// (then it is killed) or exited, within 60 s.
fn run(file: &Path) -> (Option<std::process::ExitStatus>, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmd"))
        .args(["all", "--config"])
        .arg(file)
        .env("DMD_TEST_TOKEN", "t0k3n")
        .env(
            "DMD_TEST_MASTER",
            "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=",
        )
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let serving = line.contains("serving");
                lines.push(line);
                if serving {
                    let _ = child.kill();
                    let _ = child.wait();
                    return (None, lines);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return (Some(child.wait().unwrap()), lines);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dmd all neither served nor stopped in 60 s: {lines:?}");
        }
    }
}

#[test]
fn dmd_connects_over_tls_with_an_nkey_and_is_refused_without_the_right_one() {
    let dir = Dir(std::env::temp_dir().join(format!("dmd-nats-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let pki = dmd::pki::generate(&dir.0.join("pki"), &["localhost"]).unwrap();
    let server = pki.files("localhost").unwrap();
    let (seed, public) = user_nkey();
    let nats = NatsServer::start_secured(ServerSecurity {
        tls: Some(ServerTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: None,
        }),
        auth: Some(ServerAuth::Nkey(public)),
    })
    .expect("a nats-server for the tests (scripts/test installs one)");

    let right = dir.0.join("seed");
    std::fs::write(&right, format!("{seed}\n")).unwrap();
    let (stopped, lines) = run(&config(&dir.0, "right", nats.url(), &right, true));
    assert!(stopped.is_none(), "dmd all did not serve: {lines:?}");
    let serving = lines.last().unwrap();
    assert!(serving.contains("(TLS, nkey)"), "{serving}");

    // Another user's seed: a clear error, no seed in it.
    let (other, _) = user_nkey();
    let wrong = dir.0.join("other-seed");
    std::fs::write(&wrong, format!("{other}\n")).unwrap();
    let (stopped, lines) = run(&config(&dir.0, "wrong", nats.url(), &wrong, true));
    let status = stopped.expect("dmd all served with another user's seed");
    assert!(!status.success());
    let text = lines.join("\n");
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(!text.contains(&other) && !text.contains(&seed), "{text}");

    // On NATS without a master key: refused before connecting (secrets would not survive a restart).
    let (stopped, lines) = run(&config(&dir.0, "keyless", nats.url(), &right, false));
    let status = stopped.expect("dmd all started on NATS without a master key");
    assert!(!status.success());
    let text = lines.join("\n");
    assert!(text.contains("[auth] master_key"), "{text}");
}

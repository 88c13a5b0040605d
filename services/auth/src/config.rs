//! The auth service's configuration, read from TOML text (the caller reads the file; tests pass text).
//!
//! ```toml
//! deployment = "dms1"                                  # names on the bus (dmd.dms1.v1.…)
//! server_id = "dms1.operator.example"                  # this DM Server's ServerID
//! dm_address = "https://dm.dms1.operator.example/dm"   # where devices reach this server (its DMAcc Addr)
//! master_key = "base64 of 32 bytes"                    # absent: a random key per process (embedded default)
//! temp_key_ttl_secs = 3600                             # an unused TEMP_DELEGATION_KEY expires (default 1 h)
//!
//! [[peer]]
//! server_id = "dms2.enterprise.example"
//! endpoint = "https://dms2.enterprise.example/delegation"
//! spki_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! allowed_types = ["Partial", "Temporary"]
//! allowed_scopes = ["./Vendor/Acme"]
//! max_temporary_secs = 604800
//! ```

use std::time::Duration;

use dm_bus::Names;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::registry::{PeerToml, TrustRegistry};
use dm_seal::MasterKey;

/// The default time an unused TEMP_DELEGATION_KEY lives (A.6 "an unused TEMP key expires").
pub const DEFAULT_TEMP_KEY_TTL: Duration = Duration::from_secs(3600);
/// How long a command may stay unacknowledged before it is delivered again.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// How often expired TEMP keys are swept (besides at start and at every fetch).
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// A configuration that cannot be used. Messages name the field and the rule, never a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML text could not be read into the expected shape (the reader's message, without the
    /// source line, so that a secret value is never repeated).
    #[error("configuration, line {line}: {message}")]
    Toml { line: usize, message: String },
    #[error("configuration field {field}: {reason}")]
    Field { field: String, reason: String },
}

impl ConfigError {
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub(crate) fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| {
            text.get(..s.start).map_or(0, |t| t.matches('\n').count()) + 1
        });
        ConfigError::Toml {
            line,
            message: e.message().to_string(),
        }
    })
}

/// How the auth service of one deployment is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub names: Names,
    /// This server's ServerID and its trusted peers.
    pub registry: TrustRegistry,
    /// This server's DM endpoint for devices: the `Addr` of the DM Account it sends in DELEGATION_START.
    pub dm_address: String,
    /// Wraps every delegation's data key.
    pub master_key: MasterKey,
    /// An unused TEMP_DELEGATION_KEY older than this is refused and deleted.
    pub temp_key_ttl: Duration,
    pub ack_wait: Duration,
    pub sweep_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    deployment: String,
    server_id: String,
    dm_address: String,
    master_key: Option<String>,
    temp_key_ttl_secs: Option<u64>,
    ack_wait_secs: Option<u64>,
    sweep_interval_secs: Option<u64>,
    #[serde(default)]
    peer: Vec<PeerToml>,
}

fn positive_secs(
    field: &str,
    value: Option<u64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::field(field, "must be greater than 0")),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

impl Config {
    /// A configuration with the defaults, a random master key (nothing outlives the process) and the
    /// given registry: the embedded default.
    pub fn new(
        names: Names,
        registry: TrustRegistry,
        dm_address: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let dm_address = dm_address.into();
        check_dm_address(&dm_address)?;
        Ok(Self {
            names,
            registry,
            dm_address,
            master_key: MasterKey::random(),
            temp_key_ttl: DEFAULT_TEMP_KEY_TTL,
            ack_wait: DEFAULT_ACK_WAIT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        })
    }

    /// Reads and validates a configuration (see the module documentation for the format).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: ConfigToml = parse_toml(text)?;
        let names = Names::new(&file.deployment)
            .map_err(|e| ConfigError::field("deployment", e.to_string()))?;
        let registry = TrustRegistry::from_parts(file.server_id, file.peer)?;
        let mut config = Self::new(names, registry, file.dm_address)?;
        if let Some(text) = &file.master_key {
            config.master_key = MasterKey::from_base64(text)
                .map_err(|reason| ConfigError::field("master_key", reason))?;
        }
        config.temp_key_ttl = positive_secs(
            "temp_key_ttl_secs",
            file.temp_key_ttl_secs,
            DEFAULT_TEMP_KEY_TTL,
        )?;
        config.ack_wait = positive_secs("ack_wait_secs", file.ack_wait_secs, DEFAULT_ACK_WAIT)?;
        config.sweep_interval = positive_secs(
            "sweep_interval_secs",
            file.sweep_interval_secs,
            DEFAULT_SWEEP_INTERVAL,
        )?;
        Ok(config)
    }
}

fn check_dm_address(url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let host = rest
        .and_then(|r| r.split(['/', '?', '#']).next())
        .unwrap_or_default();
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::field(
            "dm_address",
            "must be an http:// or https:// URL with a host (where devices reach this server)",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const BASE: &str = r#"
deployment = "dms1"
server_id = "dms1.example"
dm_address = "http://127.0.0.1:8080/dm"
"#;

    #[test]
    fn defaults_and_values() {
        let c = Config::from_toml(BASE).unwrap();
        assert_eq!(c.names.deployment(), "dms1");
        assert_eq!(c.registry.server_id(), "dms1.example");
        assert!(c.registry.peers().is_empty());
        assert_eq!(c.temp_key_ttl, DEFAULT_TEMP_KEY_TTL);
        let key = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        let c = Config::from_toml(&format!(
            "{BASE}master_key = \"{key}\"\ntemp_key_ttl_secs = 60\n"
        ))
        .unwrap();
        assert_eq!(c.temp_key_ttl, Duration::from_secs(60));
        assert_eq!(c.master_key, MasterKey::from_bytes([b'A'; 32]));
        assert!(!c.master_key.is_ephemeral());
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(key) && !shown.contains("AAAAAAAA"),
            "{shown}"
        );
        assert!(Config::from_toml(BASE).unwrap().master_key.is_ephemeral());
    }

    #[test]
    fn errors_name_the_field_and_never_the_key() {
        let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
        for (extra, field) in [
            (format!("master_key = \"{secret}\"\n"), "master_key"),
            ("master_key = \"not base64!\"\n".to_string(), "master_key"),
            ("temp_key_ttl_secs = 0\n".to_string(), "temp_key_ttl_secs"),
            ("colour = \"blue\"\n".to_string(), "colour"),
        ] {
            let e = Config::from_toml(&format!("{BASE}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{field}: {e}");
            assert!(!e.contains(secret), "{e}");
        }
        // A syntax error on the key's line does not repeat the line.
        let e = Config::from_toml(&format!("{BASE}master_key = \"{secret}\n"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains(secret), "{e}");
        assert!(e.contains("line 5"), "{e}");
        let e = Config::from_toml(&BASE.replace("dms1\"", "dms.1\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("deployment"), "{e}");
        let e = Config::from_toml(&BASE.replace("http://127.0.0.1:8080/dm", "127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dm_address"), "{e}");
    }
}

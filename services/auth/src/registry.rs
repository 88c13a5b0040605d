//! The trust registry (PROTOCOL.md A.2): the peer DM Servers this server trusts, how their TLS
//! certificates are recognized (an SPKI SHA-256 pin, or a CA and the subject alternative name the
//! certificate must carry), where their delegation endpoint is, and the policy for each of them.
//!
//! Other services use these types too: the gateway (TLS acceptance and endpoints), notification (the
//! acceptance policy of step 1). [`TrustRegistry::from_toml`] reads the registry from the same file as the
//! auth service's configuration (other keys are ignored there).

use std::fmt;
use std::time::Duration;

use dm_protocol::delegation::DelType;
use dm_protocol::types::DmUri;
use serde::Deserialize;

use crate::config::{ConfigError, parse_toml};

/// How a peer's certificate is recognized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    SpkiPin([u8; 32]),
    /// The certificate chains to the CA named `ca` (a name the TLS layer maps to CA certificates) and
    /// carries `subject_alt_name` among its DNS or URI subject alternative names.
    CaSan {
        ca: String,
        subject_alt_name: String,
    },
}

impl PeerIdentity {
    /// Whether a presented certificate is the one this entry describes.
    pub fn matches(&self, cert: &PresentedCertificate) -> bool {
        match self {
            PeerIdentity::SpkiPin(pin) => parse_pin(&cert.spki_sha256).is_ok_and(|p| &p == pin),
            PeerIdentity::CaSan {
                ca,
                subject_alt_name,
            } => {
                !cert.issuer_ca.is_empty()
                    && cert.issuer_ca == *ca
                    && cert
                        .subject_alt_names
                        .iter()
                        .any(|san| san.eq_ignore_ascii_case(subject_alt_name))
            }
        }
    }
}

/// What the TLS layer learned of a client certificate (the fields of `IdentityCheck`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresentedCertificate {
    /// SHA-256 of the SubjectPublicKeyInfo, hex (either case, `:` between bytes allowed).
    pub spki_sha256: String,
    /// The DNS and URI subject alternative names.
    pub subject_alt_names: Vec<String>,
    /// The configured CA the certificate chained to; empty when it chained to none.
    pub issuer_ca: String,
}

/// What a peer may ask for or be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// The delegation types allowed with this peer.
    pub allowed_types: Vec<DelType>,
    /// Scope URIs must be one of these or lie under one of them (`.` allows every scope).
    pub allowed_scopes: Vec<DmUri>,
    /// The longest Temporary delegation (from now to `NotAfter`). Required when Temporary is allowed.
    pub max_temporary: Option<Duration>,
}

/// Why a delegation is outside a peer's policy (a 403). The text names the rule, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyRefusal(pub String);

impl PeerPolicy {
    pub fn allows_type(&self, del_type: DelType) -> bool {
        self.allowed_types.contains(&del_type)
    }

    /// Whether `uri` is one of the allowed scope prefixes or lies under one.
    pub fn allows_uri(&self, uri: &DmUri) -> bool {
        self.allowed_scopes.iter().any(|p| p.contains(uri))
    }

    /// Checks a delegation against the policy: its type, every URI of its scope, and for Temporary the
    /// time from `now_ms` to `not_after_ms` (milliseconds since the epoch).
    pub fn check(
        &self,
        del_type: DelType,
        scope: &[DmUri],
        not_after_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), PolicyRefusal> {
        if !self.allows_type(del_type) {
            return Err(PolicyRefusal(format!(
                "{del_type} delegations are not allowed with this peer"
            )));
        }
        if scope.is_empty() {
            return Err(PolicyRefusal("the scope is empty".into()));
        }
        if let Some(uri) = scope.iter().find(|u| !self.allows_uri(u)) {
            return Err(PolicyRefusal(format!(
                "scope '{uri}' is outside the scopes allowed with this peer"
            )));
        }
        if del_type == DelType::Temporary {
            let Some(not_after_ms) = not_after_ms else {
                return Err(PolicyRefusal(
                    "a Temporary delegation needs NotAfter".into(),
                ));
            };
            let left = not_after_ms.saturating_sub(now_ms);
            if left <= 0 {
                return Err(PolicyRefusal("NotAfter has already passed".into()));
            }
            let max = self
                .max_temporary
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            if left > max {
                return Err(PolicyRefusal(format!(
                    "a Temporary delegation with this peer lasts at most {} s",
                    max / 1000
                )));
            }
        }
        Ok(())
    }
}

/// One trusted peer DM Server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its ServerID (the `DMServerID` of its messages).
    pub server_id: String,
    /// Its delegation endpoint (`https://…`).
    pub endpoint: String,
    pub identity: PeerIdentity,
    pub policy: PeerPolicy,
}

/// Why a certificate may not speak as a `DMServerID` (the gateway answers 403). The text never carries
/// secrets; it names the ServerID the message claimed, which the peer sent itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityRefusal {
    #[error("the certificate matches no entry of the trust registry")]
    UnknownCertificate,
    #[error("the certificate's trust registry entry is not the one of DMServerID '{0}'")]
    OtherServer(String),
}

/// This server's ServerID and its trusted peers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRegistry {
    server_id: String,
    peers: Vec<Peer>,
}

impl TrustRegistry {
    /// Validates and builds a registry: ServerIDs usable in ACLs, distinct peers (by ServerID, pin and
    /// CA + SAN), `https://` endpoints, policies that can be met.
    pub fn new(server_id: impl Into<String>, peers: Vec<Peer>) -> Result<Self, ConfigError> {
        let server_id = server_id.into();
        check_server_id("server_id", &server_id)?;
        for (i, peer) in peers.iter().enumerate() {
            let at = format!("peer[{i}]");
            check_server_id(&format!("{at}.server_id"), &peer.server_id)?;
            if peer.server_id == server_id {
                return Err(ConfigError::field(
                    format!("{at}.server_id"),
                    "is this server's own ServerID",
                ));
            }
            check_endpoint(&format!("{at}.endpoint"), &peer.endpoint)?;
            if let PeerIdentity::CaSan {
                ca,
                subject_alt_name,
            } = &peer.identity
            {
                if ca.trim().is_empty() {
                    return Err(ConfigError::field(format!("{at}.ca"), "must not be empty"));
                }
                if subject_alt_name.trim().is_empty() {
                    return Err(ConfigError::field(
                        format!("{at}.subject_alt_name"),
                        "must not be empty",
                    ));
                }
            }
            check_policy(&at, &peer.policy)?;
            for (j, other) in peers.iter().take(i).enumerate() {
                if other.server_id == peer.server_id {
                    return Err(ConfigError::field(
                        format!("{at}.server_id"),
                        format!("'{}' is already the ServerID of peer[{j}]", peer.server_id),
                    ));
                }
                let same_identity = match (&other.identity, &peer.identity) {
                    (PeerIdentity::SpkiPin(a), PeerIdentity::SpkiPin(b)) => a == b,
                    (
                        PeerIdentity::CaSan {
                            ca: ca_a,
                            subject_alt_name: san_a,
                        },
                        PeerIdentity::CaSan {
                            ca: ca_b,
                            subject_alt_name: san_b,
                        },
                    ) => ca_a == ca_b && san_a.eq_ignore_ascii_case(san_b),
                    _ => false,
                };
                if same_identity {
                    return Err(ConfigError::field(
                        at,
                        format!("has the same certificate identity as peer[{j}]"),
                    ));
                }
            }
        }
        Ok(Self { server_id, peers })
    }

    /// Reads the registry (`server_id` and the `[[peer]]` entries) from TOML; other keys are ignored.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: RegistryToml = parse_toml(text)?;
        Self::from_parts(file.server_id, file.peer)
    }

    pub(crate) fn from_parts(server_id: String, peers: Vec<PeerToml>) -> Result<Self, ConfigError> {
        let peers = peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.into_peer(i))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(server_id, peers)
    }

    /// This server's ServerID.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The peer with this ServerID.
    pub fn peer(&self, server_id: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.server_id == server_id)
    }

    /// The names of the CAs that entries rely on (for the TLS layer).
    pub fn ca_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .peers
            .iter()
            .filter_map(|p| match &p.identity {
                PeerIdentity::CaSan { ca, .. } => Some(ca.as_str()),
                PeerIdentity::SpkiPin(_) => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Whether some entry pins this SubjectPublicKeyInfo digest (for the TLS layer).
    pub fn is_pinned(&self, spki_sha256: &[u8; 32]) -> bool {
        self.peers
            .iter()
            .any(|p| p.identity == PeerIdentity::SpkiPin(*spki_sha256))
    }

    /// The entries a certificate matches.
    pub fn matching(&self, cert: &PresentedCertificate) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(move |p| p.identity.matches(cert))
    }

    /// A.2: the entry matching the certificate must have ServerID == `dm_server_id`.
    pub fn check_identity(
        &self,
        cert: &PresentedCertificate,
        dm_server_id: &str,
    ) -> Result<&Peer, IdentityRefusal> {
        let mut any = false;
        for peer in self.matching(cert) {
            if peer.server_id == dm_server_id {
                return Ok(peer);
            }
            any = true;
        }
        if any {
            Err(IdentityRefusal::OtherServer(dm_server_id.to_string()))
        } else {
            Err(IdentityRefusal::UnknownCertificate)
        }
    }
}

/// A ServerID must be usable in ACLs (B.3) and in a package #0 (at most 255 bytes).
fn check_server_id(field: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() {
        return Err(ConfigError::field(field, "must not be empty"));
    }
    if id.len() > 255 {
        return Err(ConfigError::field(field, "must be at most 255 bytes"));
    }
    if id
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '&' | '*' | '+'))
    {
        return Err(ConfigError::field(
            field,
            "must be usable in an ACL: no white space, '=', '&', '*' or '+'",
        ));
    }
    Ok(())
}

fn check_endpoint(field: &str, url: &str) -> Result<(), ConfigError> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(ConfigError::field(
            field,
            "must be an https:// URL (A.2: mutual TLS)",
        ));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::field(
            field,
            "must be an https:// URL with a host and no white space",
        ));
    }
    Ok(())
}

fn check_policy(at: &str, policy: &PeerPolicy) -> Result<(), ConfigError> {
    if policy.allowed_types.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.allowed_types"),
            "must name at least one of Partial, Full, Final, Temporary",
        ));
    }
    if policy.allowed_scopes.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.allowed_scopes"),
            "must name at least one scope URI ('.' for all)",
        ));
    }
    if policy.allows_type(DelType::Full) && !policy.allowed_scopes.iter().any(DmUri::is_root) {
        return Err(ConfigError::field(
            format!("{at}.allowed_scopes"),
            "must contain '.' when allowed_types contains Full (a Full delegation's scope is '.')",
        ));
    }
    match policy.max_temporary {
        None if policy.allows_type(DelType::Temporary) => Err(ConfigError::field(
            format!("{at}.max_temporary_secs"),
            "is required when allowed_types contains Temporary",
        )),
        Some(d) if d.is_zero() => Err(ConfigError::field(
            format!("{at}.max_temporary_secs"),
            "must be greater than 0",
        )),
        _ => Ok(()),
    }
}

/// Parses a hex SHA-256 (64 hex digits, either case, optionally with `:` between bytes).
pub fn parse_pin(text: &str) -> Result<[u8; 32], &'static str> {
    let digits: Vec<u8> = text.trim().bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return Err("must be 64 hex digits (a SHA-256)");
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(digits.chunks(2)) {
        let hex = std::str::from_utf8(pair).map_err(|_| "must be hex digits")?;
        *slot = u8::from_str_radix(hex, 16).map_err(|_| "must be hex digits")?;
    }
    Ok(out)
}

/// Lower-case hex of a pin.
pub fn format_pin(pin: &[u8; 32]) -> String {
    pin.iter().fold(String::with_capacity(64), |mut s, b| {
        use fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The registry part of a configuration file.
#[derive(Debug, Deserialize)]
struct RegistryToml {
    server_id: String,
    #[serde(default)]
    peer: Vec<PeerToml>,
}

/// One `[[peer]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerToml {
    server_id: String,
    endpoint: String,
    spki_sha256: Option<String>,
    ca: Option<String>,
    subject_alt_name: Option<String>,
    allowed_types: Vec<String>,
    allowed_scopes: Vec<String>,
    max_temporary_secs: Option<u64>,
}

impl PeerToml {
    fn into_peer(self, i: usize) -> Result<Peer, ConfigError> {
        let at = format!("peer[{i}]");
        let identity = match (self.spki_sha256, self.ca, self.subject_alt_name) {
            (Some(pin), None, None) => PeerIdentity::SpkiPin(
                parse_pin(&pin).map_err(|r| ConfigError::field(format!("{at}.spki_sha256"), r))?,
            ),
            (None, Some(ca), Some(san)) => PeerIdentity::CaSan {
                ca,
                subject_alt_name: san,
            },
            (None, Some(_), None) => {
                return Err(ConfigError::field(
                    format!("{at}.subject_alt_name"),
                    "is required with ca",
                ));
            }
            (None, None, Some(_)) => {
                return Err(ConfigError::field(
                    format!("{at}.ca"),
                    "is required with subject_alt_name",
                ));
            }
            (None, None, None) => {
                return Err(ConfigError::field(
                    at,
                    "needs spki_sha256, or ca and subject_alt_name",
                ));
            }
            (Some(_), _, _) => {
                return Err(ConfigError::field(
                    format!("{at}.spki_sha256"),
                    "give either spki_sha256 or ca + subject_alt_name, not both",
                ));
            }
        };
        let mut allowed_types = Vec::new();
        for (k, name) in self.allowed_types.iter().enumerate() {
            let t: DelType = name
                .parse()
                .map_err(|r: String| ConfigError::field(format!("{at}.allowed_types[{k}]"), r))?;
            if !allowed_types.contains(&t) {
                allowed_types.push(t);
            }
        }
        let mut allowed_scopes = Vec::new();
        for (k, uri) in self.allowed_scopes.iter().enumerate() {
            let u: DmUri = uri.parse().map_err(|r: &str| {
                ConfigError::field(
                    format!("{at}.allowed_scopes[{k}]"),
                    format!("'{uri}' is not a DM tree URI: {r}"),
                )
            })?;
            allowed_scopes.push(u);
        }
        Ok(Peer {
            server_id: self.server_id,
            endpoint: self.endpoint,
            identity,
            policy: PeerPolicy {
                allowed_types,
                allowed_scopes,
                max_temporary: self.max_temporary_secs.map(Duration::from_secs),
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const PIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn registry() -> TrustRegistry {
        TrustRegistry::from_toml(&format!(
            r#"
server_id = "dms1.example"
something_else = "ignored here"

[[peer]]
server_id = "dms2.example"
endpoint = "https://dms2.example/delegation"
spki_sha256 = "{PIN}"
allowed_types = ["Partial", "Temporary"]
allowed_scopes = ["./Vendor/Acme"]
max_temporary_secs = 3600

[[peer]]
server_id = "dms3.example"
endpoint = "https://dms3.example:8443/delegation"
ca = "partners"
subject_alt_name = "dms3.example"
allowed_types = ["Full", "Final"]
allowed_scopes = ["."]
"#
        ))
        .unwrap()
    }

    fn cert(pin: &str, sans: &[&str], ca: &str) -> PresentedCertificate {
        PresentedCertificate {
            spki_sha256: pin.into(),
            subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
            issuer_ca: ca.into(),
        }
    }

    #[test]
    fn identity_by_pin_and_by_ca_and_san() {
        let r = registry();
        assert_eq!(r.server_id(), "dms1.example");
        // Pin, in either case and with colons.
        let by_pin = cert(&PIN.to_uppercase(), &[], "");
        assert_eq!(
            r.check_identity(&by_pin, "dms2.example").unwrap().server_id,
            "dms2.example"
        );
        let colons: Vec<String> = PIN
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        assert!(
            r.check_identity(&cert(&colons.join(":"), &[], ""), "dms2.example")
                .is_ok()
        );
        // The pinned certificate may not speak for another peer.
        assert_eq!(
            r.check_identity(&by_pin, "dms3.example").unwrap_err(),
            IdentityRefusal::OtherServer("dms3.example".into())
        );
        // CA + SAN.
        let by_ca = cert("", &["other.example", "DMS3.example"], "partners");
        assert!(r.check_identity(&by_ca, "dms3.example").is_ok());
        assert!(r.check_identity(&by_ca, "dms2.example").is_err());
        // Right SAN, wrong or no CA; right CA, wrong SAN.
        for c in [
            cert("", &["dms3.example"], "other-ca"),
            cert("", &["dms3.example"], ""),
            cert("", &["dms9.example"], "partners"),
            cert(&"ff".repeat(32), &[], ""),
            cert("not hex", &[], ""),
        ] {
            assert_eq!(
                r.check_identity(&c, "dms3.example").unwrap_err(),
                IdentityRefusal::UnknownCertificate
            );
        }
        assert_eq!(r.ca_names(), vec!["partners"]);
        assert!(r.is_pinned(&parse_pin(PIN).unwrap()));
        assert_eq!(format_pin(&parse_pin(PIN).unwrap()), PIN);
    }

    #[test]
    fn policy_checks_type_scope_and_duration() {
        let r = registry();
        let p = &r.peer("dms2.example").unwrap().policy;
        let uri = |s: &str| s.parse::<DmUri>().unwrap();
        let now = 1_000_000;
        assert!(
            p.check(DelType::Partial, &[uri("./Vendor/Acme/Apps")], None, now)
                .is_ok()
        );
        assert!(
            p.check(DelType::Partial, &[uri("./Vendor/Acme")], None, now)
                .is_ok()
        );
        // Segment-wise prefixes: ./Vendor/AcmeX is not under ./Vendor/Acme.
        assert!(
            p.check(DelType::Partial, &[uri("./Vendor/AcmeX")], None, now)
                .is_err()
        );
        assert!(p.check(DelType::Full, &[uri(".")], None, now).is_err());
        assert!(
            p.check(
                DelType::Temporary,
                &[uri("./Vendor/Acme")],
                Some(now + 3_600_000),
                now
            )
            .is_ok()
        );
        let too_long = p
            .check(
                DelType::Temporary,
                &[uri("./Vendor/Acme")],
                Some(now + 3_600_001),
                now,
            )
            .unwrap_err();
        assert!(too_long.0.contains("3600 s"), "{too_long}");
        assert!(
            p.check(DelType::Temporary, &[uri("./Vendor/Acme")], None, now)
                .is_err()
        );
        assert!(
            p.check(DelType::Temporary, &[uri("./Vendor/Acme")], Some(now), now)
                .is_err()
        );
        let full = &r.peer("dms3.example").unwrap().policy;
        assert!(full.check(DelType::Full, &[uri(".")], None, now).is_ok());
    }

    fn load_error(peer: &str) -> String {
        TrustRegistry::from_toml(&format!("server_id = \"dms1.example\"\n[[peer]]\n{peer}"))
            .unwrap_err()
            .to_string()
    }

    const OK_PEER: &str = r#"server_id = "dms2.example"
endpoint = "https://dms2.example/d"
allowed_types = ["Partial"]
allowed_scopes = ["./A"]
"#;

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        for (extra, field) in [
            (
                format!("spki_sha256 = \"{PIN}\"\nca = \"x\""),
                "peer[0].spki_sha256",
            ),
            ("spki_sha256 = \"abcd\"".to_string(), "peer[0].spki_sha256"),
            ("ca = \"x\"".to_string(), "peer[0].subject_alt_name"),
            ("subject_alt_name = \"x\"".to_string(), "peer[0].ca"),
            (String::new(), "peer[0]"),
            (format!("spki_sha256 = \"{PIN}\"\nspki = 1"), "spki"),
        ] {
            let e = load_error(&format!("{OK_PEER}{extra}"));
            assert!(e.contains(field), "{field}: {e}");
        }
        let with_pin = |text: &str| format!("{text}spki_sha256 = \"{PIN}\"\n");
        for (text, field) in [
            (
                OK_PEER.replace("https://dms2.example/d", "http://dms2.example/d"),
                "peer[0].endpoint",
            ),
            (
                OK_PEER.replace("\"Partial\"", "\"Partial\", \"Sometimes\""),
                "peer[0].allowed_types[1]",
            ),
            (
                OK_PEER.replace("\"./A\"", "\"A/B\""),
                "peer[0].allowed_scopes[0]",
            ),
            (OK_PEER.replace("[\"./A\"]", "[]"), "peer[0].allowed_scopes"),
            (
                OK_PEER.replace("[\"Partial\"]", "[]"),
                "peer[0].allowed_types",
            ),
            (
                OK_PEER.replace("\"Partial\"", "\"Full\""),
                "peer[0].allowed_scopes",
            ),
            (
                OK_PEER.replace("\"Partial\"", "\"Temporary\""),
                "peer[0].max_temporary_secs",
            ),
            (
                OK_PEER.replace("dms2.example\"", "dms1.example\""),
                "peer[0].server_id",
            ),
            (
                OK_PEER.replace("dms2.example\"", "dms 2\""),
                "peer[0].server_id",
            ),
            (OK_PEER.replace("allowed_types", "allowed"), "allowed"),
        ] {
            let e = load_error(&with_pin(&text));
            assert!(e.contains(field), "{field}: {e}");
        }
        // Two entries for one ServerID, or one certificate for two.
        let twice = format!(
            "server_id = \"dms1.example\"\n[[peer]]\n{}[[peer]]\n{}",
            with_pin(OK_PEER),
            with_pin(OK_PEER)
        );
        let e = TrustRegistry::from_toml(&twice).unwrap_err().to_string();
        assert!(e.contains("peer[1].server_id"), "{e}");
        let same_pin = format!(
            "server_id = \"dms1.example\"\n[[peer]]\n{}[[peer]]\n{}",
            with_pin(OK_PEER),
            with_pin(&OK_PEER.replace("dms2.example\"", "dms3.example\""))
        );
        let e = TrustRegistry::from_toml(&same_pin).unwrap_err().to_string();
        assert!(e.contains("peer[1]") && e.contains("peer[0]"), "{e}");
        // Missing required keys are named by the TOML reader.
        let e = TrustRegistry::from_toml("[[peer]]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server_id"), "{e}");
    }
}

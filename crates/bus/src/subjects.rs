//! Every subject, stream, consumer and bucket name of the system is built here and nowhere else
//! (ARCHITECTURE.md "The bus"; STYLE.md habit 2): `dmd.<deployment>.v1.<area>.<name>`. Each name carries the
//! deployment, so two deployments can share one NATS server (ARCHITECTURE rule 6).

use crate::BusError;

/// The areas of the subject space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    /// Messages from and to peer DM Servers (the gateway's in and out).
    Peer,
    /// Commands to a service (work-queue streams).
    Cmd,
    /// Events a service reports (work-queue streams).
    Evt,
    /// Request/reply between services (core NATS, not durable).
    Req,
    /// The audit trail.
    Audit,
}

impl Area {
    pub const ALL: [Area; 5] = [Area::Peer, Area::Cmd, Area::Evt, Area::Req, Area::Audit];

    fn token(self) -> &'static str {
        match self {
            Area::Peer => "peer",
            Area::Cmd => "cmd",
            Area::Evt => "evt",
            Area::Req => "req",
            Area::Audit => "audit",
        }
    }
}

/// The version of the subject space.
const VERSION: &str = "v1";

/// Names for one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    deployment: String,
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Names {
    /// `deployment` names this DM Server's deployment: letters, digits, `-` and `_`.
    pub fn new(deployment: &str) -> Result<Self, BusError> {
        if !valid_token(deployment) {
            return Err(BusError::InvalidName(format!(
                "deployment '{deployment}': use 1-64 letters, digits, '-' or '_'"
            )));
        }
        Ok(Self {
            deployment: deployment.to_string(),
        })
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// `dmd.<deployment>.v1.<area>.<name>`; `name` may have several dot-separated tokens.
    pub fn subject(&self, area: Area, name: &str) -> Result<String, BusError> {
        if name.split('.').any(|t| !valid_token(t)) {
            return Err(BusError::InvalidName(format!("subject name '{name}'")));
        }
        Ok(format!(
            "dmd.{}.{VERSION}.{}.{name}",
            self.deployment,
            area.token()
        ))
    }

    /// Every subject of an area: `dmd.<deployment>.v1.<area>.>`.
    pub fn area_wildcard(&self, area: Area) -> String {
        format!("dmd.{}.{VERSION}.{}.>", self.deployment, area.token())
    }

    /// The filter of one service's commands: `dmd.<deployment>.v1.cmd.<service>.>` (work-queue consumers
    /// of one stream must not overlap, so each service reads only its own).
    pub fn commands_for(&self, service: &str) -> Result<String, BusError> {
        if !valid_token(service) {
            return Err(BusError::InvalidName(format!("service '{service}'")));
        }
        Ok(format!("dmd.{}.{VERSION}.cmd.{service}.>", self.deployment))
    }

    /// The stream holding an area's durable messages: `DMD_<deployment>_<AREA>`.
    pub fn stream(&self, area: Area) -> String {
        format!(
            "DMD_{}_{}",
            self.deployment,
            area.token().to_ascii_uppercase()
        )
    }

    /// The work-queue stream of an area: all its subjects, msg-ids deduplicated for two minutes.
    pub fn work_queue(&self, area: Area) -> crate::WorkQueue {
        crate::WorkQueue {
            stream: self.stream(area),
            subjects: vec![self.area_wildcard(area)],
            duplicate_window: std::time::Duration::from_secs(120),
        }
    }

    /// A durable consumer shared by all replicas of a service: `<deployment>_<service>`.
    pub fn consumer(&self, service: &str) -> Result<String, BusError> {
        if !valid_token(service) {
            return Err(BusError::InvalidName(format!("service '{service}'")));
        }
        Ok(format!("{}_{service}", self.deployment))
    }

    /// A key-value bucket: `dmd_<deployment>_<name>`.
    pub fn bucket(&self, name: &str) -> Result<String, BusError> {
        if !valid_token(name) {
            return Err(BusError::InvalidName(format!("bucket '{name}'")));
        }
        Ok(format!("dmd_{}_{name}", self.deployment))
    }

    /// The queue group of a service's request handlers.
    pub fn queue_group(&self, service: &str) -> Result<String, BusError> {
        self.consumer(service)
    }
}

/// The deployment a subject belongs to (`dmd.<deployment>.v1.…`), for trace attributes.
pub fn deployment_of(subject: &str) -> Option<&str> {
    let mut tokens = subject.split('.');
    (tokens.next()? == "dmd").then_some(())?;
    let deployment = tokens.next()?;
    (tokens.next()? == VERSION).then_some(deployment)
}

/// Encodes any text as a key-value key: keys allow only `[-/_=.A-Za-z0-9]` (and no leading or trailing
/// `.`), so device ids like `IMEI:490154…` are written with `=XX` escapes (`=` itself is escaped too).
pub fn encode_key(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 8);
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("=00");
    }
    out
}

/// The key of a delegation in every bucket that keeps something per delegation (its state, its secrets):
/// (peer ServerID, SessionID), the SessionID in lower case (UUIDs are case-insensitive), encoded for key
/// syntax. SessionIDs are chosen by peers, so they are scoped by the peer's ServerID (ARCHITECTURE rule 8).
pub fn delegation_key(peer_server_id: &str, session_id: &str) -> String {
    // `/` inside either part is escaped, so that no two (peer, session) pairs share a key.
    let part = |s: &str| encode_key(s).replace('/', "=2F");
    format!(
        "{}/{}",
        part(peer_server_id),
        part(&session_id.to_ascii_lowercase())
    )
}

/// The inverse of [`encode_key`].
pub fn decode_key(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i) {
            Some(b'=') => {
                let hex = key.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            Some(b) => {
                out.push(*b);
                i += 1;
            }
            None => return None,
        }
    }
    if out == [0] {
        return Some(String::new());
    }
    String::from_utf8(out).ok()
}

/// Whether `key` is a valid key-value key (both implementations enforce the same rule).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
}

/// NATS subject matching with `*` (one token) and `>` (the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_deployment_and_version() {
        let n = Names::new("dms1").unwrap();
        assert_eq!(n.subject(Area::Peer, "in").unwrap(), "dmd.dms1.v1.peer.in");
        assert_eq!(
            n.subject(Area::Cmd, "provisioning.apply").unwrap(),
            "dmd.dms1.v1.cmd.provisioning.apply"
        );
        assert_eq!(n.stream(Area::Cmd), "DMD_dms1_CMD");
        assert_eq!(n.commands_for("auth").unwrap(), "dmd.dms1.v1.cmd.auth.>");
        assert_eq!(n.bucket("delegations").unwrap(), "dmd_dms1_delegations");
        assert_eq!(n.consumer("orchestrator").unwrap(), "dms1_orchestrator");
        assert!(Names::new("dms.1").is_err());
        assert!(Names::new("").is_err());
        assert!(n.subject(Area::Cmd, "a..b").is_err());
        assert!(n.subject(Area::Cmd, "a.*").is_err());
    }

    #[test]
    fn keys_round_trip_and_are_valid() {
        for raw in [
            "IMEI:490154203237518",
            "dms2.example/9d2f",
            "",
            "a=b",
            "é ü",
        ] {
            let k = encode_key(raw);
            assert!(valid_key(&k), "{raw} -> {k}");
            assert_eq!(decode_key(&k).unwrap(), raw);
        }
        assert!(!valid_key("IMEI:1"));
        assert!(!valid_key(".a"));
    }

    #[test]
    fn delegation_keys_do_not_collide() {
        assert_ne!(delegation_key("a/b", "c"), delegation_key("a", "b/c"));
        assert_eq!(delegation_key("p", "ABC"), delegation_key("p", "abc"));
        assert!(valid_key(&delegation_key(
            "dms2.example",
            "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11"
        )));
    }

    #[test]
    fn wildcards() {
        assert!(subject_matches("dmd.a.v1.cmd.>", "dmd.a.v1.cmd.x.y"));
        assert!(!subject_matches("dmd.a.v1.cmd.>", "dmd.a.v1.cmd"));
        assert!(subject_matches("dmd.*.v1.cmd.x", "dmd.b.v1.cmd.x"));
        assert!(!subject_matches("dmd.a.v1.cmd.x", "dmd.a.v1.cmd.y"));
    }
}

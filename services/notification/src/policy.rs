//! Step 1's acceptance policy (PROTOCOL.md A.1, A.4 status codes): whether this server takes an inbound
//! DELEGATION_NOTIF from a peer, by peer, delegation type, scope and duration. Pure: the bus glue is in
//! [`crate::acceptance`].

use std::collections::BTreeMap;

use dm_protocol::types::DmUri;
use dm_saga::pb::{DelType, NotifBody};
use serde::Deserialize;

/// The policy of this server, read from the `[acceptance]` part of its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptancePolicy {
    /// The delegation types this server offers at all (others: 406).
    pub offered_types: Vec<String>,
    /// Per peer ServerID: what that peer may propose (peers not listed: 403).
    #[serde(default)]
    pub peers: BTreeMap<String, PeerPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerPolicy {
    /// Types this peer may propose.
    pub types: Vec<String>,
    /// The scope must lie at or under one of these URIs (`.` allows everything).
    pub scope_prefixes: Vec<String>,
    /// The longest Temporary delegation accepted, in seconds.
    #[serde(default)]
    pub max_temporary_secs: Option<i64>,
}

/// The answer to a proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ack,
    Nack { status: u32, reason: String },
}

fn type_name(t: DelType) -> &'static str {
    match t {
        DelType::Partial => "Partial",
        DelType::Full => "Full",
        DelType::Final => "Final",
        DelType::Temporary => "Temporary",
        DelType::Unspecified => "",
    }
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("acceptance policy: {0}")]
pub struct PolicyError(String);

impl AcceptancePolicy {
    /// Reads the policy from TOML text, checking every type name and URI.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let policy: AcceptancePolicy =
            toml::from_str(text).map_err(|e| PolicyError(e.message().to_string()))?;
        policy.check()?;
        Ok(policy)
    }

    /// Checks every type name and URI (a policy built in code; [`AcceptancePolicy::from_toml`] does it).
    pub fn check(&self) -> Result<(), PolicyError> {
        let known = ["Partial", "Full", "Final", "Temporary"];
        for t in &self.offered_types {
            if !known.contains(&t.as_str()) {
                return Err(PolicyError(format!(
                    "offered_types: '{t}' is not one of {known:?}"
                )));
            }
        }
        for (peer, p) in &self.peers {
            for t in &p.types {
                if !known.contains(&t.as_str()) {
                    return Err(PolicyError(format!(
                        "peers.{peer}.types: '{t}' is not one of {known:?}"
                    )));
                }
            }
            for prefix in &p.scope_prefixes {
                prefix.parse::<DmUri>().map_err(|e| {
                    PolicyError(format!("peers.{peer}.scope_prefixes: '{prefix}' {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// Decides on a proposal from `peer` at `now_ms`.
    pub fn decide(&self, peer: &str, notif: &NotifBody, now_ms: i64) -> Verdict {
        let nack = |status: u32, reason: String| Verdict::Nack { status, reason };
        let t = type_name(notif.del_type());
        if !self.offered_types.iter().any(|o| o == t) {
            return nack(406, format!("this server does not offer {t} delegations"));
        }
        let Some(p) = self.peers.get(peer) else {
            return nack(403, "this peer may not propose delegations here".into());
        };
        if !p.types.iter().any(|o| o == t) {
            return nack(403, format!("{t} delegations are not offered to this peer"));
        }
        let prefixes: Vec<DmUri> = p
            .scope_prefixes
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        for uri in &notif.scope {
            let Ok(uri) = uri.parse::<DmUri>() else {
                return nack(400, format!("scope URI '{uri}' is not valid"));
            };
            if !prefixes.iter().any(|prefix| prefix.contains(&uri)) {
                return nack(403, format!("scope {uri} not offered"));
            }
        }
        if notif.del_type() == DelType::Temporary {
            let Some(not_after) = notif.not_after_ms else {
                return nack(400, "a Temporary delegation needs NotAfter".into());
            };
            if let Some(max) = p.max_temporary_secs
                && not_after.saturating_sub(now_ms) > max.saturating_mul(1000)
            {
                return nack(
                    403,
                    format!("a Temporary delegation here lasts at most {max} s"),
                );
            }
        }
        Verdict::Ack
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
offered_types = ["Partial", "Temporary", "Final"]

[peers."dms1.operator.example"]
types = ["Partial", "Temporary"]
scope_prefixes = ["./Vendor/Acme"]
max_temporary_secs = 86400
"#;

    fn notif(t: DelType, scope: &[&str], not_after_ms: Option<i64>) -> NotifBody {
        let mut n = NotifBody {
            scope: scope.iter().map(|s| s.to_string()).collect(),
            not_after_ms,
            ..Default::default()
        };
        n.set_del_type(t);
        n
    }

    #[test]
    fn decides_by_type_peer_scope_and_duration() {
        let p = AcceptancePolicy::from_toml(POLICY).unwrap();
        let peer = "dms1.operator.example";
        let now = 1_000_000;
        assert_eq!(
            p.decide(
                peer,
                &notif(DelType::Partial, &["./Vendor/Acme/Apps"], None),
                now
            ),
            Verdict::Ack
        );
        let status = |v: Verdict| match v {
            Verdict::Ack => 0,
            Verdict::Nack { status, .. } => status,
        };
        assert_eq!(
            status(p.decide(peer, &notif(DelType::Full, &["."], None), now)),
            406
        );
        assert_eq!(
            status(p.decide(peer, &notif(DelType::Final, &["./Vendor/Acme"], None), now)),
            403
        );
        assert_eq!(
            status(p.decide(
                "stranger",
                &notif(DelType::Partial, &["./Vendor/Acme"], None),
                now
            )),
            403
        );
        assert_eq!(
            status(p.decide(
                peer,
                &notif(DelType::Partial, &["./Vendor/Other"], None),
                now
            )),
            403
        );
        assert_eq!(
            status(p.decide(
                peer,
                &notif(DelType::Partial, &["./Vendor/AcmeX"], None),
                now
            )),
            403
        );
        let day = 86_400_000;
        assert_eq!(
            status(p.decide(
                peer,
                &notif(DelType::Temporary, &["./Vendor/Acme"], Some(now + day)),
                now
            )),
            0
        );
        assert_eq!(
            status(p.decide(
                peer,
                &notif(DelType::Temporary, &["./Vendor/Acme"], Some(now + day + 1)),
                now
            )),
            403
        );
    }

    #[test]
    fn bad_policies_are_refused_at_load() {
        assert!(AcceptancePolicy::from_toml("offered_types = [\"Partial\", \"Total\"]").is_err());
        assert!(
            AcceptancePolicy::from_toml(
                "offered_types = []\n[peers.x]\ntypes=[]\nscope_prefixes=[\"Vendor\"]"
            )
            .is_err()
        );
        assert!(AcceptancePolicy::from_toml("offered_types = []\nextra = 1").is_err());
    }
}

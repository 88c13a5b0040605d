//! Between the wire (`dm_protocol::delegation`) and the saga's protobuf types (`dm_saga::pb`).
//!
//! Inbound: a decoded [`Message`] becomes a [`pb::PeerMessage`] without its secrets (START's account and
//! PREPARED's key go to auth, not on the bus). Outbound: a [`pb::SendMessage`] plus the secret fetched
//! from auth becomes a [`Message`]. Times are milliseconds since the epoch on the bus, RFC 3339 on the wire.

use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use dm_protocol::acl::Acl;
use dm_protocol::delegation::{
    self as wire, Answer, Body, Client, Confirm, Failure, Message, Notif, Prepared, Res, Revoke,
    RevokeReason, ServerCred, Start, TempDelegationKey,
};
use dm_protocol::tnds::MgmtTree;
use dm_protocol::types::{DmUri, UtcTime, Uuid};
use dm_saga::pb::{self, peer_message, send_message};

/// `AAuthType` of the server credential announced in DELEGATION_PREPARED: the TEMP_DELEGATION_KEY is a
/// SRVCRED digest secret (package #0 digest and `syncml:auth-md5`, B.1).
pub const SERVER_CRED_AUTH_TYPE: &str = "DIGEST";

pub(crate) fn to_ms(t: UtcTime) -> i64 {
    t.unix_seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000))
}

pub(crate) fn from_ms(ms: i64) -> UtcTime {
    UtcTime {
        unix_seconds: ms.div_euclid(1000),
        nanos: u32::try_from(ms.rem_euclid(1000)).unwrap_or(0) * 1_000_000,
    }
}

fn del_type_to_pb(t: wire::DelType) -> pb::DelType {
    match t {
        wire::DelType::Partial => pb::DelType::Partial,
        wire::DelType::Full => pb::DelType::Full,
        wire::DelType::Final => pb::DelType::Final,
        wire::DelType::Temporary => pb::DelType::Temporary,
    }
}

fn del_type_from_pb(t: pb::DelType) -> Result<wire::DelType, String> {
    match t {
        pb::DelType::Partial => Ok(wire::DelType::Partial),
        pb::DelType::Full => Ok(wire::DelType::Full),
        pb::DelType::Final => Ok(wire::DelType::Final),
        pb::DelType::Temporary => Ok(wire::DelType::Temporary),
        pb::DelType::Unspecified => Err("the delegation type is unspecified".into()),
    }
}

/// The secret-free saga form of an inbound message. The sender is the envelope's `DMServerID`.
pub fn peer_message(m: &Message) -> pb::PeerMessage {
    let body = match &m.body {
        Body::Notif(n) => {
            let mut b = pb::NotifBody {
                device: Some(pb::Device {
                    dev_id: n.client.dev_id.clone(),
                    man: n.client.man.clone().unwrap_or_default(),
                    model: n.client.model.clone().unwrap_or_default(),
                }),
                scope: n.scope.iter().map(|u| u.as_str().to_string()).collect(),
                not_after_ms: n.not_after.map(to_ms),
                ..Default::default()
            };
            b.set_del_type(del_type_to_pb(n.del_type));
            b.set_sender_role(match n.sender_role {
                wire::Role::Delegating => pb::Role::Delegating,
                wire::Role::Delegated => pb::Role::Delegated,
            });
            peer_message::Body::Notif(b)
        }
        Body::Res(r) => peer_message::Body::Res(pb::ResBody {
            ack: r.result == Answer::Ack,
            status_code: r.status_code.map_or(0, u32::from),
            reason: r.reason.clone().unwrap_or_default(),
        }),
        // The account itself was lodged with auth.
        Body::Start(_) => peer_message::Body::Start(pb::StartBody {}),
        // The key was lodged with auth; the plan travels.
        Body::Prepared(p) => {
            let mut b = pb::PreparedBody {
                plan: Some(pb::PlanOutcome {
                    account_uri: p.account_uri.as_str().to_string(),
                    acl_results: p
                        .acl_results
                        .iter()
                        .map(|a| pb::AclResult {
                            uri: a.uri.as_str().to_string(),
                            value: a.value.to_string(),
                        })
                        .collect(),
                    server_nonce_b64: B64.encode(&p.server_cred.nonce),
                }),
                not_after_ms: p.not_after.map(to_ms),
                ..Default::default()
            };
            b.set_del_type(del_type_to_pb(p.del_type));
            peer_message::Body::Prepared(b)
        }
        Body::Confirm(c) => peer_message::Body::Confirm(pb::ConfirmBody {
            session_established_ms: to_ms(c.session_established),
        }),
        Body::Failure(f) => peer_message::Body::Failure(pb::FailureBody {
            status_code: u32::from(f.status_code),
            step: u32::from(f.step),
            reason: f.reason.clone(),
        }),
        Body::Revoke(r) => {
            let mut b = pb::RevokeBody::default();
            b.set_reason(match r.reason {
                RevokeReason::Revoked => pb::EndReason::Revoked,
                RevokeReason::Expired => pb::EndReason::Expired,
                RevokeReason::Released => pb::EndReason::Released,
            });
            peer_message::Body::Revoke(b)
        }
        Body::Release => peer_message::Body::Release(pb::ReleaseBody {}),
    };
    pb::PeerMessage {
        msg_id: m.msg_id.to_string(),
        sender: m.dm_server_id.clone(),
        session_id: m.session_id.to_string(),
        stale: String::new(),
        body: Some(body),
    }
}

/// The secret an outbound message needs, fetched from auth at send time.
pub(crate) enum Secret {
    /// This server's DM Account for DELEGATION_START, decoded from TNDS.
    OwnAccount(MgmtTree),
    /// The TEMP_DELEGATION_KEY for DELEGATION_PREPARED.
    TempKey(TempDelegationKey),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::OwnAccount(_) => f.write_str("Secret::OwnAccount(<redacted>)"),
            Secret::TempKey(_) => f.write_str("Secret::TempKey(<redacted>)"),
        }
    }
}

/// Which secret a message body needs from auth.
pub(crate) fn secret_needed(body: &send_message::Body) -> Option<dm_proto::bus::v1::fetch::What> {
    use dm_proto::bus::v1::fetch::What;
    match body {
        send_message::Body::Start(_) => Some(What::OwnAccount),
        send_message::Body::Prepared(_) => Some(What::TempKey),
        _ => None,
    }
}

fn uri(field: &str, text: &str) -> Result<DmUri, String> {
    DmUri::from_str(text).map_err(|e| format!("{field} '{text}' {e}"))
}

/// The delegation message for a send command. `sender` is this server's ServerID, `peer` the receiver's
/// (it names the server credential of DELEGATION_PREPARED), `now` the timestamp.
pub(crate) fn outbound_message(
    sender: &str,
    peer: &str,
    session_id: &str,
    send: &pb::SendMessage,
    secret: Option<Secret>,
    now: UtcTime,
) -> Result<Message, String> {
    let msg_id = Uuid::from_str(&send.msg_id).map_err(|e| format!("MsgID {e}"))?;
    let session_id = Uuid::from_str(session_id).map_err(|e| format!("SessionID {e}"))?;
    let body = send
        .body
        .as_ref()
        .ok_or_else(|| "the send command has no message body".to_string())?;
    let body = match body {
        send_message::Body::Notif(n) => {
            let device = n.device.clone().unwrap_or_default();
            let non_empty = |s: String| if s.is_empty() { None } else { Some(s) };
            Body::Notif(Notif {
                del_type: del_type_from_pb(n.del_type())?,
                sender_role: match n.sender_role() {
                    pb::Role::Delegating => wire::Role::Delegating,
                    pb::Role::Delegated => wire::Role::Delegated,
                    pb::Role::Unspecified => return Err("the sender role is unspecified".into()),
                },
                client: Client {
                    dev_id: device.dev_id,
                    man: non_empty(device.man),
                    model: non_empty(device.model),
                },
                scope: n
                    .scope
                    .iter()
                    .map(|s| uri("Scope URI", s))
                    .collect::<Result<_, _>>()?,
                not_after: n.not_after_ms.map(from_ms),
            })
        }
        send_message::Body::Res(r) => Body::Res(Res {
            result: if r.ack { Answer::Ack } else { Answer::Nack },
            status_code: if r.ack {
                None
            } else {
                Some(u16::try_from(r.status_code).map_err(|_| "status code out of range")?)
            },
            reason: if r.reason.is_empty() {
                None
            } else {
                Some(r.reason.clone())
            },
        }),
        send_message::Body::Start(_) => match secret {
            Some(Secret::OwnAccount(dm_acc)) => Body::Start(Start { dm_acc }),
            _ => return Err("DELEGATION_START needs this server's DM Account".into()),
        },
        send_message::Body::Prepared(p) => {
            let Some(Secret::TempKey(temp_delegation_key)) = secret else {
                return Err("DELEGATION_PREPARED needs the TEMP_DELEGATION_KEY".into());
            };
            let plan = p.plan.clone().unwrap_or_default();
            Body::Prepared(Prepared {
                del_type: del_type_from_pb(p.del_type())?,
                account_uri: uri("AccountURI", &plan.account_uri)?,
                temp_delegation_key,
                server_cred: ServerCred {
                    aauth_name: peer.to_string(),
                    aauth_type: SERVER_CRED_AUTH_TYPE.to_string(),
                    nonce: B64
                        .decode(&plan.server_nonce_b64)
                        .map_err(|_| "the plan's server nonce is not base64")?,
                },
                acl_results: plan
                    .acl_results
                    .iter()
                    .map(|a| {
                        Ok(wire::AclResult {
                            uri: uri("ACL URI", &a.uri)?,
                            value: Acl::from_str(&a.value)
                                .map_err(|e| format!("ACL of '{}': {e}", a.uri))?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                not_after: p.not_after_ms.map(from_ms),
            })
        }
        send_message::Body::Confirm(c) => Body::Confirm(Confirm {
            session_established: from_ms(c.session_established_ms),
        }),
        send_message::Body::Failure(f) => Body::Failure(Failure {
            status_code: u16::try_from(f.status_code).map_err(|_| "status code out of range")?,
            step: u8::try_from(f.step).map_err(|_| "step out of range")?,
            reason: f.reason.clone(),
        }),
        send_message::Body::Revoke(r) => Body::Revoke(Revoke {
            reason: match r.reason() {
                pb::EndReason::Revoked => RevokeReason::Revoked,
                pb::EndReason::Expired => RevokeReason::Expired,
                pb::EndReason::Released => RevokeReason::Released,
                pb::EndReason::Unspecified => return Err("the revoke reason is unspecified".into()),
            },
        }),
        send_message::Body::Release(_) => Body::Release,
    };
    Ok(Message {
        version: wire::VERSION,
        msg_id,
        session_id,
        dm_server_id: sender.to_string(),
        timestamp: now,
        body,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip() {
        for ms in [0, 1, 999, 1_000, 1_764_000_000_123, -1, -1_001] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
        let t: UtcTime = "2026-11-21T22:40:10.5Z".parse().unwrap();
        assert_eq!(to_ms(t) % 1000, 500);
    }

    #[test]
    fn every_plain_body_goes_out_and_comes_back_the_same() {
        let session = "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11";
        let mut notif = pb::NotifBody {
            device: Some(pb::Device {
                dev_id: "IMEI:490154203237518".into(),
                man: "Acme".into(),
                model: String::new(),
            }),
            scope: vec!["./Vendor/Acme/Apps".into()],
            not_after_ms: Some(4_102_444_800_000),
            ..Default::default()
        };
        notif.set_del_type(pb::DelType::Temporary);
        notif.set_sender_role(pb::Role::Delegating);
        let mut revoke = pb::RevokeBody::default();
        revoke.set_reason(pb::EndReason::Expired);
        let bodies = vec![
            send_message::Body::Notif(notif),
            send_message::Body::Res(pb::ResBody {
                ack: false,
                status_code: 403,
                reason: "scope not offered".into(),
            }),
            send_message::Body::Res(pb::ResBody {
                ack: true,
                ..Default::default()
            }),
            send_message::Body::Confirm(pb::ConfirmBody {
                session_established_ms: 1_795_300_812_000,
            }),
            send_message::Body::Failure(pb::FailureBody {
                status_code: 507,
                step: 4,
                reason: "atomic failed".into(),
            }),
            send_message::Body::Revoke(revoke),
            send_message::Body::Release(pb::ReleaseBody {}),
        ];
        for (i, body) in bodies.into_iter().enumerate() {
            let send = pb::SendMessage {
                msg_id: dm_saga::message_id(session, pb::Role::Delegating, i as u64),
                seq: i as u64,
                body: Some(body.clone()),
            };
            let m = outbound_message(
                "dms1.example",
                "dms2.example",
                session,
                &send,
                None,
                UtcTime::from_unix(1_795_300_000),
            )
            .unwrap();
            let decoded = wire::decode(wire::encode(&m).as_bytes()).unwrap();
            let back = peer_message(&decoded);
            assert_eq!(back.msg_id, send.msg_id);
            assert_eq!(back.sender, "dms1.example");
            assert_eq!(back.session_id, session);
            let same = match (back.body.unwrap(), body) {
                (peer_message::Body::Notif(a), send_message::Body::Notif(b)) => a == b,
                (peer_message::Body::Res(a), send_message::Body::Res(b)) => a == b,
                (peer_message::Body::Confirm(a), send_message::Body::Confirm(b)) => a == b,
                (peer_message::Body::Failure(a), send_message::Body::Failure(b)) => a == b,
                (peer_message::Body::Revoke(a), send_message::Body::Revoke(b)) => a == b,
                (peer_message::Body::Release(a), send_message::Body::Release(b)) => a == b,
                _ => false,
            };
            assert!(same, "body {i} changed on the way");
        }
    }

    #[test]
    fn start_and_prepared_need_their_secret() {
        let session = "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11";
        for body in [
            send_message::Body::Start(pb::StartBody {}),
            send_message::Body::Prepared(pb::PreparedBody::default()),
        ] {
            let send = pb::SendMessage {
                msg_id: dm_saga::message_id(session, pb::Role::Delegating, 1),
                seq: 1,
                body: Some(body),
            };
            let err = outbound_message(
                "dms1.example",
                "dms2.example",
                session,
                &send,
                None,
                UtcTime::from_unix(0),
            )
            .unwrap_err();
            assert!(err.contains("needs"), "{err}");
        }
    }
}

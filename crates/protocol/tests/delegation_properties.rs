//! Property tests of the delegation codec: generated messages of every kind survive encode/decode, and
//! arbitrary, truncated or mutated input is refused with an error, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dm_protocol::acl::{Acl, AclCommand, AclEntry};
use dm_protocol::delegation::{
    self, AclResult, Answer, Body, Client, Confirm, DelType, Failure, Message, Notif, Prepared,
    Res, Revoke, RevokeReason, Role, ServerCred, Start, TempDelegationKey, Version,
};
use dm_protocol::tnds::{MgmtTree, Node};
use dm_protocol::types::{DmUri, UtcTime, Uuid};
use proptest::prelude::*;

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid)
}

fn time() -> impl Strategy<Value = UtcTime> {
    (
        0i64..4_102_444_800,
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
    )
        .prop_map(|(unix_seconds, nanos)| UtcTime {
            unix_seconds,
            nanos,
        })
}

fn server_id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9.:_-]{0,20}"
}

/// Free text as it survives XML: no control characters, no surrounding white space.
fn text(min: usize) -> impl Strategy<Value = String> {
    "[a-zA-Z0-9<>&'\" é€/.:-]{0,24}"
        .prop_map(|s| s.trim().to_string())
        .prop_filter("long enough", move |s| s.len() >= min)
}

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,8}"
}

/// Non-overlapping sub-trees: each begins with its own first segment `S<i>`.
fn subtrees() -> impl Strategy<Value = Vec<DmUri>> {
    prop::collection::vec(prop::collection::vec(segment(), 0..3), 1..4).prop_map(|roots| {
        roots
            .into_iter()
            .enumerate()
            .map(|(i, rest)| {
                let mut uri = format!("./S{i}");
                for seg in rest {
                    uri.push('/');
                    uri.push_str(&seg);
                }
                uri.parse().unwrap()
            })
            .collect()
    })
}

fn scope_for(del_type: DelType) -> BoxedStrategy<Vec<DmUri>> {
    match del_type {
        DelType::Full => Just(vec![DmUri::root()]).boxed(),
        DelType::Partial => subtrees().boxed(),
        DelType::Final | DelType::Temporary => {
            prop_oneof![Just(vec![DmUri::root()]), subtrees()].boxed()
        }
    }
}

fn del_type() -> impl Strategy<Value = DelType> {
    prop::sample::select(DelType::ALL.to_vec())
}

fn notif() -> impl Strategy<Value = Body> {
    del_type().prop_flat_map(|del_type| {
        (
            prop::sample::select(Role::ALL.to_vec()),
            text(1),
            prop::option::of(text(0)),
            prop::option::of(text(0)),
            scope_for(del_type),
            time(),
        )
            .prop_map(move |(sender_role, dev_id, man, model, scope, t)| {
                Body::Notif(Notif {
                    del_type,
                    sender_role,
                    client: Client { dev_id, man, model },
                    scope,
                    not_after: (del_type == DelType::Temporary).then_some(t),
                })
            })
    })
}

fn acl() -> impl Strategy<Value = Acl> {
    prop::collection::vec(
        (
            prop::sample::select(AclCommand::ALL.to_vec()),
            prop::collection::vec(prop_oneof![Just("*".to_string()), server_id()], 1..3),
        )
            .prop_map(|(command, servers)| AclEntry { command, servers }),
        0..5,
    )
    .prop_map(|entries| Acl { entries })
}

fn prepared() -> impl Strategy<Value = Body> {
    (
        del_type(),
        segment(),
        any::<[u8; 32]>(),
        server_id(),
        text(1),
        prop::collection::vec(any::<u8>(), 0..24),
        prop::collection::vec((subtrees(), acl()), 0..3),
        time(),
    )
        .prop_map(
            |(del_type, account, key, aauth_name, aauth_type, nonce, acls, t)| {
                Body::Prepared(Prepared {
                    del_type,
                    account_uri: format!("./DMAcc/{account}").parse().unwrap(),
                    temp_delegation_key: TempDelegationKey::from_bytes(key),
                    server_cred: ServerCred {
                        aauth_name,
                        aauth_type,
                        nonce,
                    },
                    acl_results: acls
                        .into_iter()
                        .map(|(uris, value)| AclResult {
                            uri: uris[0].clone(),
                            value,
                        })
                        .collect(),
                    not_after: (del_type == DelType::Temporary).then_some(t),
                })
            },
        )
}

/// A DM Account for `server`, as DELEGATION_START carries it.
fn account(server: &str, name: &str, addr: &str) -> MgmtTree {
    let mut node = Node::interior(
        "acc",
        vec![
            Node::leaf("AppID", "w7"),
            Node::leaf("ServerID", server),
            Node::leaf("Name", name),
            Node::interior(
                "AppAddr",
                vec![Node::interior(
                    "a1",
                    vec![Node::leaf("Addr", addr), Node::leaf("AddrType", "URI")],
                )],
            ),
            Node::interior(
                "AppAuth",
                vec![Node::interior(
                    "srv",
                    vec![
                        Node::leaf("AAuthLevel", "SRVCRED"),
                        Node::leaf("AAuthType", "DIGEST"),
                        Node::leaf("AAuthName", server),
                    ],
                )],
            ),
        ],
    );
    node.path = Some("./DMAcc".to_string());
    MgmtTree {
        ver_dtd: "1.2".to_string(),
        man: None,
        model: None,
        nodes: vec![node],
    }
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        notif(),
        (
            prop::sample::select(Answer::ALL.to_vec()),
            400u16..600,
            prop::option::of(text(0))
        )
            .prop_map(|(result, code, reason)| Body::Res(Res {
                result,
                status_code: (result == Answer::Nack).then_some(code),
                reason,
            })),
        (text(0), text(1)).prop_map(|(name, addr)| Body::Start(Start {
            // The sender is patched in below: the account's ServerID must equal DMServerID.
            dm_acc: account("", &name, &addr),
        })),
        prepared(),
        time().prop_map(|t| Body::Confirm(Confirm {
            session_established: t
        })),
        (400u16..600, 1u8..10, text(0)).prop_map(|(status_code, step, reason)| Body::Failure(
            Failure {
                status_code,
                step,
                reason
            }
        )),
        prop::sample::select(RevokeReason::ALL.to_vec())
            .prop_map(|reason| Body::Revoke(Revoke { reason })),
        Just(Body::Release),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (uuid(), uuid(), server_id(), time(), body()).prop_map(
        |(msg_id, session_id, dm_server_id, timestamp, mut body)| {
            if let Body::Start(start) = &mut body {
                let name = start.dm_acc.nodes[0]
                    .find("Name")
                    .unwrap()
                    .value()
                    .unwrap()
                    .to_string();
                let addr = start.dm_acc.nodes[0]
                    .find("AppAddr/a1/Addr")
                    .unwrap()
                    .value()
                    .unwrap()
                    .to_string();
                start.dm_acc = account(&dm_server_id, &name, &addr);
            }
            Message {
                version: Version { major: 1, minor: 0 },
                msg_id,
                session_id,
                dm_server_id,
                timestamp,
                body,
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_of_encode_is_identity(m in message()) {
        let xml = delegation::encode(&m);
        let back = delegation::decode(xml.as_bytes());
        prop_assert_eq!(back.as_ref(), Ok(&m), "{}", xml);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = delegation::decode(&bytes);
        let _ = delegation::decode_error(&bytes);
    }

    #[test]
    fn truncated_and_mutated_messages_never_panic(m in message(), cut in any::<prop::sample::Index>(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
        let xml = delegation::encode(&m).into_bytes();
        // Every cut before the root's end tag leaves an incomplete document.
        let at = cut.index(xml.len() - "</DelegationMessage>\n".len());
        let truncated = xml.get(..at).unwrap();
        prop_assert!(delegation::decode(truncated).is_err(), "a truncated message was accepted");
        let mut mutated = xml.clone();
        for (i, b) in flips {
            let len = mutated.len();
            mutated[i.index(len)] = b;
        }
        let _ = delegation::decode(&mutated);
    }
}

#[test]
fn every_prefix_of_every_example_is_refused_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        // examples/config/ holds configuration files, not documents.
        if path.is_dir() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        if !String::from_utf8_lossy(&bytes).contains("<DelegationMessage") {
            continue;
        }
        // The document ends with "</DelegationMessage>\n": every cut before that closing tag is an error.
        let end = bytes.len() - "</DelegationMessage>\n".len();
        for cut in 0..end {
            assert!(
                delegation::decode(&bytes[..cut]).is_err(),
                "{} cut at {cut} was accepted",
                path.display()
            );
        }
    }
}

//! Device claims without scans (ARCHITECTURE rule 9, issue 9): a start costs the same number of key-value
//! entries with 10 or 10,000 delegations stored; one delegation in progress per device; an ended delegation
//! frees its device; and two replicas racing for one device never both get it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use dm_bus::testing::NatsServer;
use dm_bus::{Bus, Kv, Names};
use dm_orchestrator::{Config, Orchestrator, delegation_key};
use dm_proto::bus::v1::StoredDelegation;
use dm_saga::Answer;
use dm_saga::pb::{self, Event, Phase, Role, event, peer_message};
use prost::Message as _;

const PEER: &str = "dms2.example";

fn config() -> Config {
    Config {
        names: Names::new("dms1").unwrap(),
        server_id: "dms1.example".into(),
        saga: dm_saga::Config::default(),
        ack_wait: Duration::from_secs(5),
    }
}

fn session(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn start(dev_id: &str, scope: &str, session_id: &str) -> Event {
    support::partial_start(PEER, session_id, dev_id, scope)
}

/// Stores `count` Active delegations of other devices directly, as earlier runs would have left them.
async fn fill(delegations: &Kv, from: u64, count: u64) {
    for n in from..from + count {
        let mut state = pb::DelegationState {
            session_id: session(n),
            peer_server_id: PEER.into(),
            device: Some(pb::Device {
                dev_id: format!("IMEI:{n}"),
                ..Default::default()
            }),
            scope: vec!["./Vendor".into()],
            ..Default::default()
        };
        state.set_phase(Phase::Active);
        state.set_role(Role::Delegating);
        let stored = StoredDelegation {
            state: Some(state),
            outbox: Vec::new(),
        };
        delegations
            .create(
                &delegation_key(PEER, &session(n)),
                Bytes::from(stored.encode_to_vec()),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_start_costs_the_same_with_ten_or_ten_thousand_delegations_stored() {
    let bus = Bus::in_process();
    let o = Orchestrator::new(config(), bus.clone()).await.unwrap();
    let names = Names::new("dms1").unwrap();
    let delegations = bus
        .kv(&names.bucket("delegations").unwrap(), 1)
        .await
        .unwrap();
    let claims = bus.kv(&names.bucket("claims").unwrap(), 1).await.unwrap();
    let touched = || delegations.entries_touched().unwrap() + claims.entries_touched().unwrap();
    let cost = |n: u64| {
        let o = o.clone();
        let touched = &touched;
        async move {
            let before = touched();
            let applied = o
                .apply(
                    PEER,
                    &session(1_000_000 + n),
                    &start(
                        &format!("IMEI:new-{n}"),
                        "./Vendor",
                        &session(1_000_000 + n),
                    ),
                )
                .await
                .unwrap();
            assert_eq!(applied.answer, Answer::Accepted);
            touched() - before
        }
    };
    fill(&delegations, 0, 10).await;
    let with_ten = cost(1).await;
    fill(&delegations, 10, 9_990).await;
    let with_ten_thousand = cost(2).await;
    assert_eq!(with_ten, with_ten_thousand);
}

fn failure(session_id: &str) -> Event {
    Event {
        kind: Some(event::Kind::Peer(pb::PeerMessage {
            msg_id: "f1".into(),
            sender: PEER.into(),
            session_id: session_id.into(),
            stale: String::new(),
            body: Some(peer_message::Body::Failure(pb::FailureBody {
                status_code: 500,
                step: 1,
                reason: "peer gave up".into(),
            })),
        })),
    }
}

#[tokio::test]
async fn one_delegation_in_progress_per_device_and_an_ended_one_frees_it() {
    let bus = Bus::in_process();
    let o = Orchestrator::new(config(), bus).await.unwrap();
    let first = o
        .apply(PEER, &session(1), &start("IMEI:1", "./Vendor", &session(1)))
        .await
        .unwrap();
    assert_eq!(first.answer, Answer::Accepted);
    // In progress: the whole device is held, whatever the scope.
    let second = o
        .apply(PEER, &session(2), &start("IMEI:1", "./Other", &session(2)))
        .await
        .unwrap();
    assert_eq!(second.answer.http_status(), 409);
    assert_eq!(o.get(PEER, &session(2)).await.unwrap(), None);
    // Another device is free.
    let other = o
        .apply(PEER, &session(3), &start("IMEI:2", "./Vendor", &session(3)))
        .await
        .unwrap();
    assert_eq!(other.answer, Answer::Accepted);
    // The first one fails: its device is free again.
    let failed = o
        .apply(PEER, &session(1), &failure(&session(1)))
        .await
        .unwrap();
    assert_eq!(failed.state.unwrap().phase(), Phase::Failed);
    let again = o
        .apply(PEER, &session(4), &start("IMEI:1", "./Vendor", &session(4)))
        .await
        .unwrap();
    assert_eq!(again.answer, Answer::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_claim_one_device_twice() {
    // Two orchestrator replicas of one deployment on a real nats-server, racing starts for 200 devices
    // (five sessions per device, split between them): exactly one start per device wins.
    let server = NatsServer::start().unwrap();
    let a = Orchestrator::new(config(), Bus::connect(server.url()).await.unwrap())
        .await
        .unwrap();
    let b = Orchestrator::new(config(), Bus::connect(server.url()).await.unwrap())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for device in 0..200u64 {
        for attempt in 0..5u64 {
            let replica = if (device + attempt) % 2 == 0 {
                a.clone()
            } else {
                b.clone()
            };
            let id = session(device * 10 + attempt);
            tasks.spawn(async move {
                let dev_id = format!("IMEI:{device}");
                let applied = replica
                    .apply(PEER, &id, &start(&dev_id, "./Vendor", &id))
                    .await
                    .unwrap();
                (device, applied.answer)
            });
        }
    }
    let mut won = vec![0u32; 200];
    while let Some(done) = tasks.join_next().await {
        let (device, answer) = done.unwrap();
        match answer {
            Answer::Accepted => won[usize::try_from(device).unwrap()] += 1,
            other => assert_eq!(other.http_status(), 409, "{other:?}"),
        }
    }
    assert!(won.iter().all(|w| *w == 1), "{won:?}");
    let stored = a.list().await.unwrap();
    assert_eq!(stored.len(), 200);
}

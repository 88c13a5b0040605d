//! Timers across replicas (issue 10): a deadline armed by one orchestrator replica is fired by another
//! one that was already running when it was armed (it sees every write through a watch of the bucket),
//! and the decider's fence keeps it to one effect.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use dm_bus::testing::NatsServer;
use dm_bus::{Bus, Names};
use dm_orchestrator::{Config, Orchestrator};
use dm_saga::pb::{self, Event, Phase, event};

const PEER: &str = "dms2.example";
const SESSION: &str = "3b0f5a8e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
const DEADLINE: Duration = Duration::from_secs(20);

fn config() -> Config {
    Config {
        names: Names::new("dms1").unwrap(),
        server_id: "dms1.example".into(),
        saga: dm_saga::Config {
            // The peer never answers the notification: the deadline is what happens next.
            await_res_ms: 400,
            ..dm_saga::Config::default()
        },
        ack_wait: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_armed_by_one_replica_is_fired_by_another() {
    let server = NatsServer::start().unwrap();
    // B runs (and has indexed what was stored when it started: nothing).
    let b = Orchestrator::new(config(), Bus::connect(server.url()).await.unwrap())
        .await
        .unwrap();
    let running = b.clone();
    tokio::spawn(async move { running.run(std::future::pending()).await.unwrap() });
    let mut changes = b.subscribe();
    // A decides the start and arms the deadline, then is gone (its run loop never runs).
    let a = Orchestrator::new(config(), Bus::connect(server.url()).await.unwrap())
        .await
        .unwrap();
    let applied = a
        .apply(
            PEER,
            SESSION,
            &support::partial_start(PEER, SESSION, "IMEI:1", "./Vendor"),
        )
        .await
        .unwrap();
    assert_eq!(applied.state.unwrap().phase(), Phase::NotifSent);
    drop(a);
    // B fires it: the delegation fails at step 1 with 408.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let state = loop {
        let state = b.get(PEER, SESSION).await.unwrap().unwrap();
        if state.phase() == Phase::Failed {
            break state;
        }
        assert!(
            tokio::time::timeout_at(deadline, changes.recv())
                .await
                .is_ok(),
            "the deadline armed by the other replica never fired: {:?}",
            state.phase()
        );
    };
    let fault = state.fault.unwrap();
    assert_eq!((fault.step, fault.status_code), (1, 408), "{fault:?}");
}

/// The state a replica keeps of the delegations it decided is only a shortcut: when another replica
/// moved the delegation on, an answer is never given from the old state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_never_answers_from_a_state_another_replica_moved_on() {
    let bus = dm_bus::Bus::in_process();
    let a = Orchestrator::new(config(), bus.clone()).await.unwrap();
    let b = Orchestrator::new(config(), bus).await.unwrap();
    let started = a
        .apply(
            PEER,
            SESSION,
            &support::partial_start(PEER, SESSION, "IMEI:2", "./Vendor"),
        )
        .await
        .unwrap();
    assert_eq!(started.state.unwrap().phase(), Phase::NotifSent);
    // B takes the peer's acceptance: Verifying.
    let res = Event {
        kind: Some(event::Kind::Peer(pb::PeerMessage {
            msg_id: "r1".into(),
            sender: PEER.into(),
            session_id: SESSION.into(),
            stale: String::new(),
            body: Some(pb::peer_message::Body::Res(pb::ResBody {
                ack: true,
                ..Default::default()
            })),
        })),
    };
    let moved = b.apply(PEER, SESSION, &res).await.unwrap();
    assert_eq!(moved.state.unwrap().phase(), Phase::Verifying);
    // A, which last saw NotifSent, gets the verification's result: it is taken, not ignored.
    let mut verified = pb::WorkResult {
        ok: true,
        ..Default::default()
    };
    verified.set_work(pb::Work::VerifyPeer);
    let applied = a
        .apply(
            PEER,
            SESSION,
            &Event {
                kind: Some(event::Kind::Work(verified)),
            },
        )
        .await
        .unwrap();
    assert_eq!(applied.answer, dm_saga::Answer::Accepted);
    assert_eq!(applied.state.unwrap().phase(), Phase::AwaitStart);
}

//! The secret of a peer's DELEGATION_START goes to auth only once the orchestrator's decision accepted the
//! message, and before that decision is committed (issue 13): a START for an unknown SessionID (404), a
//! late one (409) or a repeated one puts nothing on `req.auth.lodge`; a secret auth does not keep commits
//! nothing (503, the peer sends the message again). A real orchestrator on the in-process bus; auth is a
//! stand-in that records what it is asked to keep and the phase stored at that moment.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Area, Bus, Headers, Names};
use dm_orchestrator::{Config, Orchestrator};
use dm_proto::bus::v1::{
    DelegationRef, InboundAnswer, InboundPeerMessage, Lodge, LodgeAnswer, lodge,
};
use dm_saga::pb::{self, Event, Phase, Work, event, peer_message};
use prost::Message as _;
use support::{DEADLINE, partial_start};

const D2: &str = "dms2.example";
const SESSION: &str = "6a0d2c1e-3b4f-4a5e-9c7d-8e9f0a1b2c3d";
const UNKNOWN: &str = "0f1e2d3c-4b5a-4968-8776-655443322110";

fn msg_id(n: u8) -> String {
    format!("00000000-0000-4000-8000-0000000000{n:02}")
}

/// What the stand-in of auth was asked to keep: the session, and the phase stored when it was asked.
type Lodged = Arc<Mutex<Vec<(String, Option<Phase>)>>>;

async fn stand_in_auth(bus: &Bus, names: &Names, o: Orchestrator, keep: Arc<AtomicBool>) -> Lodged {
    let lodged: Lodged = Arc::default();
    let mut requests = bus
        .serve(
            &names.subject(Area::Req, "auth.lodge").unwrap(),
            &names.queue_group("auth").unwrap(),
        )
        .await
        .unwrap();
    let seen = lodged.clone();
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            let l = Lodge::decode(r.message.payload.clone()).unwrap();
            let d = l.delegation.unwrap();
            let stored = o
                .get(&d.peer_server_id, &d.session_id)
                .await
                .unwrap()
                .map(|s| s.phase());
            seen.lock().unwrap().push((d.session_id.clone(), stored));
            let ok = keep.load(Ordering::SeqCst);
            let answer = LodgeAnswer {
                ok,
                reason: if ok { String::new() } else { "not now".into() },
            };
            let _ = r
                .respond(Headers::new(), Bytes::from(answer.encode_to_vec()))
                .await;
        }
    });
    lodged
}

/// DMS-2's START as the gateway hands it on: the message, and its account sealed for auth (the bytes
/// do not matter here: the orchestrator never opens them).
async fn start(bus: &Bus, names: &Names, session: &str, msg_id: &str) -> u32 {
    let mut d = DelegationRef {
        peer_server_id: D2.into(),
        session_id: session.into(),
        ..Default::default()
    };
    d.set_role(pb::Role::Delegating);
    let inbound = InboundPeerMessage {
        message: Some(pb::PeerMessage {
            msg_id: msg_id.into(),
            sender: D2.into(),
            session_id: session.into(),
            stale: String::new(),
            body: Some(peer_message::Body::Start(pb::StartBody {})),
        }),
        lodge: Some(Lodge {
            delegation: Some(d),
            secret: Some(lodge::Secret::SealedStartAccount(
                b"sealed account".to_vec(),
            )),
        }),
    };
    // Retried while the orchestrator is not serving yet.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match bus
            .request(
                &names.subject(Area::Req, "orchestrator.peer").unwrap(),
                Headers::new(),
                Bytes::from(inbound.encode_to_vec()),
                DEADLINE,
            )
            .await
        {
            Ok(answer) => return InboundAnswer::decode(answer.payload).unwrap().http_status,
            Err(dm_bus::BusError::NoResponders(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn peer(msg_id: &str, body: peer_message::Body) -> Event {
    Event {
        kind: Some(event::Kind::Peer(pb::PeerMessage {
            msg_id: msg_id.into(),
            sender: D2.into(),
            session_id: SESSION.into(),
            stale: String::new(),
            body: Some(body),
        })),
    }
}

fn verified() -> Event {
    let mut r = pb::WorkResult {
        ok: true,
        ..Default::default()
    };
    r.set_work(Work::VerifyPeer);
    Event {
        kind: Some(event::Kind::Work(r)),
    }
}

async fn phase(o: &Orchestrator) -> Option<Phase> {
    o.get(D2, SESSION).await.unwrap().map(|s| s.phase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_is_lodged_only_once_accepted_and_before_its_decision_is_stored() {
    let bus = Bus::in_process();
    let names = Names::new("dms1").unwrap();
    let o = Orchestrator::new(
        Config {
            names: names.clone(),
            server_id: "dms1.example".into(),
            saga: dm_saga::Config::default(),
            ack_wait: Duration::from_secs(30),
        },
        bus.clone(),
    )
    .await
    .unwrap();
    let runner = o.clone();
    tokio::spawn(async move { runner.run(std::future::pending()).await.unwrap() });
    let keep = Arc::new(AtomicBool::new(true));
    let lodged = stand_in_auth(&bus, &names, o.clone(), keep.clone()).await;

    // A START for a SessionID nobody knows: 404, nothing asked of auth, nothing stored.
    assert_eq!(start(&bus, &names, UNKNOWN, &msg_id(1)).await, 404);
    assert!(lodged.lock().unwrap().is_empty());
    assert!(o.get(D2, UNKNOWN).await.unwrap().is_none());

    // A delegation of DMS-1's waiting for DMS-2's START.
    o.apply(
        D2,
        SESSION,
        &partial_start(D2, SESSION, "IMEI:1", "./Vendor/Acme"),
    )
    .await
    .unwrap();
    let ack = peer_message::Body::Res(pb::ResBody {
        ack: true,
        ..Default::default()
    });
    o.apply(D2, SESSION, &peer(&msg_id(2), ack)).await.unwrap();
    o.apply(D2, SESSION, &verified()).await.unwrap();
    assert_eq!(phase(&o).await, Some(Phase::AwaitStart));

    // Auth does not keep the secret: 503, and the decision is not stored.
    keep.store(false, Ordering::SeqCst);
    assert_eq!(start(&bus, &names, SESSION, &msg_id(3)).await, 503);
    assert_eq!(phase(&o).await, Some(Phase::AwaitStart));
    assert_eq!(lodged.lock().unwrap().len(), 1);

    // The peer sends it again (same MsgID): kept, then stored; auth was asked while AwaitStart was
    // still the stored phase.
    keep.store(true, Ordering::SeqCst);
    assert_eq!(start(&bus, &names, SESSION, &msg_id(3)).await, 202);
    assert_ne!(phase(&o).await, Some(Phase::AwaitStart));
    assert_eq!(
        *lodged.lock().unwrap(),
        [
            (SESSION.to_string(), Some(Phase::AwaitStart)),
            (SESSION.to_string(), Some(Phase::AwaitStart)),
        ]
    );

    // A repeat of the accepted START gets its answer again; a late START (another MsgID) is refused.
    // Neither reaches auth.
    assert_eq!(start(&bus, &names, SESSION, &msg_id(3)).await, 202);
    assert_eq!(start(&bus, &names, SESSION, &msg_id(4)).await, 409);
    assert_eq!(lodged.lock().unwrap().len(), 2);
}

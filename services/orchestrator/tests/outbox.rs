//! The outbox (ARCHITECTURE rule 2) without a second write per decision: while a delegation is in
//! progress its published outbox stays until the next decision's write replaces it; one that comes to rest
//! has it cleared; and an outbox this replica did not see published is published (same ids) before the
//! next decision.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Area, Bus, ConsumerConfig, Kv, Names};
use dm_orchestrator::{Config, Orchestrator, delegation_key};
use dm_proto::bus::v1::{CommandEnvelope, StoredDelegation};
use dm_saga::pb::{self, DelType, Event, Phase, Role, command, event, peer_message};
use prost::Message as _;

const PEER: &str = "dms2.example";
const SESSION: &str = "00000000-0000-4000-8000-000000000001";

fn config() -> Config {
    Config {
        names: Names::new("dms1").unwrap(),
        server_id: "dms1.example".into(),
        saga: dm_saga::Config::default(),
        ack_wait: Duration::from_secs(5),
    }
}

fn start() -> Event {
    support::partial_start(PEER, SESSION, "IMEI:1", "./Vendor")
}

fn res(ack: bool) -> Event {
    Event {
        kind: Some(event::Kind::Peer(pb::PeerMessage {
            msg_id: format!("res-{ack}"),
            sender: PEER.into(),
            session_id: SESSION.into(),
            stale: String::new(),
            body: Some(peer_message::Body::Res(pb::ResBody {
                ack,
                status_code: if ack { 0 } else { 403 },
                reason: String::new(),
            })),
        })),
    }
}

async fn stored(kv: &Kv) -> (StoredDelegation, u64) {
    let entry = kv
        .get(&delegation_key(PEER, SESSION))
        .await
        .unwrap()
        .unwrap();
    (
        StoredDelegation::decode(entry.value).unwrap(),
        entry.revision,
    )
}

#[tokio::test]
async fn an_outbox_stays_while_in_progress_and_is_cleared_at_rest() {
    let bus = Bus::in_process();
    let o = Orchestrator::new(config(), bus.clone()).await.unwrap();
    let kv = bus
        .kv(&config().names.bucket("delegations").unwrap(), 1)
        .await
        .unwrap();
    o.apply(PEER, SESSION, &start()).await.unwrap();
    let (record, _) = stored(&kv).await;
    assert_eq!(record.state.unwrap().phase(), Phase::NotifSent);
    assert!(
        !record.outbox.is_empty(),
        "in progress: left for the next decision"
    );
    o.apply(PEER, SESSION, &res(false)).await.unwrap();
    let (record, _) = stored(&kv).await;
    assert_eq!(record.state.unwrap().phase(), Phase::Declined);
    assert!(record.outbox.is_empty(), "at rest: cleared");
}

#[tokio::test]
async fn an_outbox_not_seen_published_is_published_before_the_next_decision() {
    let bus = Bus::in_process();
    let names = config().names;
    let o = Orchestrator::new(config(), bus.clone()).await.unwrap();
    let mut probe = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("probe").unwrap(),
            filter: names.area_wildcard(Area::Cmd),
            ack_wait: Duration::from_secs(5),
        })
        .await
        .unwrap();
    // A decision another replica (or a crashed one) committed and did not publish.
    let mut state = pb::DelegationState {
        session_id: SESSION.into(),
        peer_server_id: PEER.into(),
        initiator: true,
        device: Some(pb::Device {
            dev_id: "IMEI:1".into(),
            ..Default::default()
        }),
        scope: vec!["./Vendor".into()],
        ..Default::default()
    };
    state.set_role(Role::Delegating);
    state.set_del_type(DelType::Partial);
    state.set_phase(Phase::NotifSent);
    let left = StoredDelegation {
        state: Some(state),
        outbox: vec![pb::Command {
            kind: Some(command::Kind::CreateTempKey(pb::CreateTempKey {})),
        }],
    };
    let kv = bus
        .kv(&names.bucket("delegations").unwrap(), 1)
        .await
        .unwrap();
    let key = delegation_key(PEER, SESSION);
    let rev = kv
        .create(&key, Bytes::from(left.encode_to_vec()))
        .await
        .unwrap();
    let applied = o.apply(PEER, SESSION, &res(true)).await.unwrap();
    assert_eq!(applied.state.unwrap().phase(), Phase::Verifying);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), probe.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ids.push(
            CommandEnvelope::decode(d.message.payload.clone())
                .unwrap()
                .outbox_id,
        );
        d.ack().await.unwrap();
    }
    assert_eq!(
        ids,
        [format!("{key}:{rev}:0"), format!("{key}:{}:0", rev + 1)]
    );
}

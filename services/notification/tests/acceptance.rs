//! The acceptance policy answering the saga over the bus, in-process and on a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, ConsumerConfig, Headers, Names};
use dm_notification::policy::AcceptancePolicy;
use dm_proto::bus::v1::{CommandEnvelope, DelegationRef, EventEnvelope};
use dm_saga::pb::{AskAcceptance, Command, DelType, Device, NotifBody, Role, Work, command, event};
use prost::Message as _;

const POLICY: &str = r#"
offered_types = ["Partial", "Full"]
[peers."dms1.example"]
types = ["Partial"]
scope_prefixes = ["./Vendor"]
"#;

async fn ask_and_hear(bus: Bus) {
    let names = Names::new("dms2").unwrap();
    for area in [Area::Cmd, Area::Evt] {
        bus.ensure_work_queue(&names.work_queue(area))
            .await
            .unwrap();
    }
    let policy = AcceptancePolicy::from_toml(POLICY).unwrap();
    tokio::spawn(dm_notification::acceptance::run(
        policy,
        bus.clone(),
        names.clone(),
        std::future::pending(),
    ));
    let mut events = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Evt),
            durable: names.consumer("test").unwrap(),
            filter: names.area_wildcard(Area::Evt),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    for (i, (peer, del_type, scope, expected)) in [
        ("dms1.example", DelType::Partial, "./Vendor/Acme", (true, 0)),
        ("dms1.example", DelType::Full, ".", (false, 403)),
        ("dms1.example", DelType::Final, "./Vendor", (false, 406)),
        (
            "stranger.example",
            DelType::Partial,
            "./Vendor",
            (false, 403),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut notif = NotifBody {
            scope: vec![scope.into()],
            ..Default::default()
        };
        notif.set_del_type(del_type);
        let env = CommandEnvelope {
            delegation: Some(DelegationRef {
                peer_server_id: peer.into(),
                session_id: format!("s{i}"),
                ..Default::default()
            }),
            command: Some(Command {
                kind: Some(command::Kind::AskAcceptance(AskAcceptance {
                    notif: Some(notif),
                })),
            }),
            outbox_id: format!("k{i}:1:0"),
            ..Default::default()
        };
        bus.publish(
            &names.subject(Area::Cmd, "notification.ask").unwrap(),
            Headers::new(),
            Bytes::from(env.encode_to_vec()),
            &env.outbox_id,
        )
        .await
        .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("a verdict in time")
            .unwrap()
            .unwrap();
        let outcome = EventEnvelope::decode(d.message.payload.clone()).unwrap();
        assert_eq!(outcome.delegation.unwrap().session_id, format!("s{i}"));
        let Some(event::Kind::Work(w)) = outcome.event.unwrap().kind else {
            panic!("not a work result")
        };
        assert_eq!(w.work(), Work::Acceptance);
        assert_eq!(
            (w.ok, w.status_code),
            expected,
            "{peer} {del_type:?} {scope}: {}",
            w.reason
        );
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn verdicts_over_the_in_process_bus() {
    ask_and_hear(Bus::in_process()).await;
}

#[tokio::test]
async fn verdicts_over_nats() {
    let server = NatsServer::start().unwrap();
    ask_and_hear(Bus::connect(server.url()).await.unwrap()).await;
}

/// A peer that asks to be delegated to (SenderRole Delegated) makes this server the delegating one: the
/// device must be in its inventory (the `devices` bucket), or the proposal is refused at step 1 with 404.
async fn unknown_devices_are_refused(bus: Bus) {
    let names = Names::new("dms1").unwrap();
    for area in [Area::Cmd, Area::Evt] {
        bus.ensure_work_queue(&names.work_queue(area))
            .await
            .unwrap();
    }
    let devices = bus.kv(&names.bucket("devices").unwrap(), 1).await.unwrap();
    // Presence is what counts: the value is sealed, and never opened here.
    devices
        .create("IMEI=3A1", Bytes::from_static(b"sealed"))
        .await
        .unwrap();
    let policy = AcceptancePolicy::from_toml(
        "offered_types = [\"Partial\"]\n[peers.\"dms2.example\"]\ntypes = [\"Partial\"]\nscope_prefixes = [\".\"]\n",
    )
    .unwrap();
    tokio::spawn(dm_notification::acceptance::run(
        policy,
        bus.clone(),
        names.clone(),
        std::future::pending(),
    ));
    let mut events = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Evt),
            durable: names.consumer("test").unwrap(),
            filter: names.area_wildcard(Area::Evt),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    for (i, (role, dev_id, expected)) in [
        (Role::Delegated, "IMEI:1", (true, 0)),
        (Role::Delegated, "IMEI:2", (false, 404)),
        // This server would be the delegated one: it needs no inventory entry.
        (Role::Delegating, "IMEI:2", (true, 0)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut notif = NotifBody {
            scope: vec!["./Vendor".into()],
            device: Some(Device {
                dev_id: dev_id.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        notif.set_del_type(DelType::Partial);
        notif.set_sender_role(role);
        let env = CommandEnvelope {
            delegation: Some(DelegationRef {
                peer_server_id: "dms2.example".into(),
                session_id: format!("u{i}"),
                ..Default::default()
            }),
            command: Some(Command {
                kind: Some(command::Kind::AskAcceptance(AskAcceptance {
                    notif: Some(notif),
                })),
            }),
            outbox_id: format!("u{i}:1:0"),
            ..Default::default()
        };
        bus.publish(
            &names.subject(Area::Cmd, "notification.ask").unwrap(),
            Headers::new(),
            Bytes::from(env.encode_to_vec()),
            &env.outbox_id,
        )
        .await
        .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("a verdict in time")
            .unwrap()
            .unwrap();
        let outcome = EventEnvelope::decode(d.message.payload.clone()).unwrap();
        let Some(event::Kind::Work(w)) = outcome.event.unwrap().kind else {
            panic!("not a work result")
        };
        assert_eq!(
            (w.ok, w.status_code),
            expected,
            "{role:?} {dev_id}: {}",
            w.reason
        );
        if !w.ok {
            assert!(w.reason.contains("not managed"), "{}", w.reason);
        }
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn unknown_devices_are_refused_in_process() {
    unknown_devices_are_refused(Bus::in_process()).await;
}

#[tokio::test]
async fn unknown_devices_are_refused_over_nats() {
    let server = NatsServer::start().unwrap();
    unknown_devices_are_refused(Bus::connect(server.url()).await.unwrap()).await;
}

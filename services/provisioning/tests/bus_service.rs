//! The provisioning service driven over the bus as the orchestrator drives it: an ApplyPlan command (the
//! peer's account and the TEMP key fetched from auth — here a stand-in answering on `req.auth.fetch`), the
//! device woken by package #0 and provisioned over HTTP, the outcome published as an event; then a restore.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Area, Bus, ConsumerConfig, Headers, Names};
use dm_notification::{HttpPushChannel, Package0Channel};
use dm_proto::bus::v1::{CommandEnvelope, DelegationRef, EventEnvelope, Fetch, FetchAnswer, fetch};
use dm_provisioning::{Config, Provisioning};
use dm_saga::pb::{self, Command, DelType, Role, Work, command, event};
use prost::Message as _;

mod support;

const D1: &str = "dms1.operator.example";
const D2: &str = "dms2.enterprise.example";
const DEV: &str = "IMEI:490154203237518";
const TEMP_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";

fn start_xml_account_tnds() -> Vec<u8> {
    let xml = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/start.xml"
    ))
    .unwrap();
    let dm_protocol::delegation::Body::Start(start) =
        dm_protocol::delegation::decode(&xml).unwrap().body
    else {
        panic!("examples/start.xml is a DELEGATION_START");
    };
    dm_protocol::tnds::encode(&start.dm_acc).into_bytes()
}

fn command(outbox_id: &str, kind: command::Kind) -> CommandEnvelope {
    let mut d = DelegationRef {
        peer_server_id: D2.into(),
        session_id: "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11".into(),
        dev_id: DEV.into(),
        ..Default::default()
    };
    d.set_role(Role::Delegating);
    CommandEnvelope {
        delegation: Some(d),
        command: Some(Command { kind: Some(kind) }),
        outbox_id: outbox_id.into(),
        ..Default::default()
    }
}

/// The deployment's bus key (from a fixed master key).
fn bus_key() -> dm_seal::BusKey {
    dm_seal::MasterKey::from_bytes([5; 32]).bus_key()
}

/// The deployment's work queues, and auth's part: the secrets of the delegation, on `req.auth.fetch`.
async fn work_queues_and_auth(bus: &Bus, names: &Names) {
    for area in [Area::Cmd, Area::Evt] {
        bus.ensure_work_queue(&names.work_queue(area))
            .await
            .unwrap();
    }
    let mut fetches = bus
        .serve(&names.subject(Area::Req, "auth.fetch").unwrap(), "auth")
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(r) = fetches.next().await {
            let f = Fetch::decode(r.message.payload.clone()).unwrap();
            let (field, value) = match f.what() {
                fetch::What::PeerAccount => {
                    (dm_seal::field::PEER_ACCOUNT, start_xml_account_tnds())
                }
                fetch::What::TempKey => (dm_seal::field::TEMP_KEY, TEMP_KEY.as_bytes().to_vec()),
                _ => (dm_seal::field::OWN_ACCOUNT, Vec::new()),
            };
            // Sealed as auth hands it out.
            let d = f.delegation.clone().unwrap_or_default();
            let key = dm_bus::subjects::delegation_key(&d.peer_server_id, &d.session_id);
            let answer = FetchAnswer {
                found: !value.is_empty(),
                sealed_value: bus_key()
                    .seal(&key, field, dm_seal::Direction::FromAuth, &value)
                    .unwrap(),
                reason: String::new(),
            };
            r.respond(Headers::new(), Bytes::from(answer.encode_to_vec()))
                .await
                .unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_restore_over_the_bus() {
    let bus = Bus::in_process();
    let names = Names::new("dms1").unwrap();
    work_queues_and_auth(&bus, &names).await;
    // The device and DMS-1's provisioning.
    let (fleet, fleet_url) = support::serve_fleet().await;
    let (listener, url) = support::dm_listener().await;
    let (p1, outcomes) = Provisioning::new(Config::new(D1, url.clone()), support::push(&fleet_url));
    let p1 = p1.with_bus_key(bus_key());
    tokio::spawn(p1.clone().serve(listener, std::future::pending()));
    let creds = support::add_device(&fleet, DEV, D1, &url);
    p1.register_device(DEV, creds);
    tokio::spawn(dm_provisioning::service::run(
        p1,
        outcomes,
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
    let before = fleet.export(DEV).unwrap();

    let mut apply = pb::ApplyPlan {
        scope: vec!["./Vendor/Acme/Apps".into()],
        ..Default::default()
    };
    apply.set_del_type(DelType::Partial);
    for (outbox_id, kind, work) in [
        ("k:1:0", command::Kind::ApplyPlan(apply), Work::ApplyPlan),
        (
            "k:2:0",
            command::Kind::RestoreDevice(pb::RestoreDevice {
                authority_only: true,
            }),
            Work::Restore,
        ),
    ] {
        let env = command(outbox_id, kind);
        bus.publish(
            &names.subject(Area::Cmd, "provisioning.x").unwrap(),
            Headers::new(),
            Bytes::from(env.encode_to_vec()),
            outbox_id,
        )
        .await
        .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an outcome in time")
            .unwrap()
            .unwrap();
        let outcome = EventEnvelope::decode(d.message.payload.clone()).unwrap();
        let Some(event::Kind::Work(w)) = outcome.event.unwrap().kind else {
            panic!("not a work result")
        };
        assert_eq!(w.work(), work);
        assert!(w.ok, "{work:?}: {} {}", w.status_code, w.reason);
        if work == Work::ApplyPlan {
            let plan = w.plan.unwrap();
            assert_eq!(plan.account_uri, "./DMAcc/dms2_enterprise_example");
            assert!(
                plan.acl_results
                    .iter()
                    .any(|a| a.uri == "./Vendor/Acme/Apps")
            );
            assert!(!plan.server_nonce_b64.is_empty());
            let has_account = fleet
                .with_device(DEV, |dv| dv.account_uri(D2).is_some())
                .unwrap();
            assert!(has_account, "DMS-2's account is on the device");
        }
        d.ack().await.unwrap();
    }
    let has_account = fleet
        .with_device(DEV, |dv| dv.account_uri(D2).is_some())
        .unwrap();
    assert!(!has_account, "restored: DMS-2's account is gone");
    let after = fleet.export(DEV).unwrap();
    assert_eq!(after.nodes.len(), before.nodes.len());
}

/// ARCHITECTURE rule 1: the snapshot is stored before the plan reaches the device, so a provisioning
/// service started again, or another replica (a new instance on a new address, that never saw the plan),
/// still restores the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_restores_from_the_stored_snapshot() {
    use dm_provisioning::{Job, JobSuccess, PlanRequest};
    let bus = Bus::in_process();
    let store = bus.kv("dmd_dms1_snapshots", 1).await.unwrap();
    let (fleet, fleet_url) = support::serve_fleet().await;
    let start = |store: dm_bus::Kv| {
        let fleet_url = fleet_url.clone();
        async move {
            let (listener, url) = support::dm_listener().await;
            let (p, outcomes) =
                Provisioning::new(Config::new(D1, url.clone()), support::push(&fleet_url));
            let p = p.with_snapshot_store(store).with_bus_key(bus_key());
            tokio::spawn(p.clone().serve(listener, std::future::pending()));
            (p, outcomes, url)
        }
    };
    let (p1, mut outcomes1, url1) = start(store.clone()).await;
    let creds = support::add_device(&fleet, DEV, D1, &url1);
    p1.register_device(DEV, creds);
    let before = fleet.export(DEV).unwrap();
    let tnds = start_xml_account_tnds();
    let request = PlanRequest {
        account_key: "dms2".into(),
        account: dm_protocol::dmacc::DmAccount::from_tnds(
            &dm_protocol::tnds::decode(&tnds).unwrap(),
        )
        .unwrap(),
        delegating: D1.into(),
        delegated: D2.into(),
        del_type: dm_protocol::delegation::DelType::Partial,
        scope: vec!["./Vendor/Acme/Apps".parse().unwrap()],
        not_after: None,
        temp_key_b64: dm_protocol::dmacc::Secret::new(TEMP_KEY),
    };
    let id = p1
        .enqueue(
            DEV,
            Job::Apply {
                plan_id: "plan-1".into(),
                request: Box::new(request),
            },
        )
        .await
        .unwrap();
    let applied = tokio::time::timeout(Duration::from_secs(20), outcomes1.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(applied.job_id, id);
    assert!(
        matches!(applied.result, Ok(JobSuccess::Applied { .. })),
        "{:?}",
        applied.result
    );
    assert_eq!(
        store.keys().await.unwrap().len(),
        1,
        "the snapshot is in the store"
    );

    // A new instance: it reads the snapshot from the store when the restore comes (the device's
    // credentials come from where the server keeps them; here, from the first instance).
    let (p2, mut outcomes2, url2) = start(store.clone()).await;
    p2.register_device(DEV, p1.credentials(DEV).unwrap());
    let key = support::account(DEV, D1, &url2).account_key();
    fleet
        .with_device_mut(DEV, |d| {
            let addr = format!("./DMAcc/{key}/AppAddr/1/Addr").parse().unwrap();
            d.tree_mut().replace_value(&addr, &url2).unwrap();
        })
        .unwrap();
    p2.enqueue(
        DEV,
        Job::Restore {
            plan_id: "plan-1".into(),
        },
    )
    .await
    .unwrap();
    let restored = tokio::time::timeout(Duration::from_secs(20), outcomes2.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored.result, Ok(JobSuccess::Restored));
    assert!(
        !fleet
            .with_device(DEV, |d| d.account_uri(D2).is_some())
            .unwrap()
    );
    let after = fleet.export(DEV).unwrap();
    assert_eq!(after.nodes.len(), before.nodes.len());
}

/// A channel whose devices never get their package #0 (a device out of reach), telling when it was tried.
struct Unreachable(tokio::sync::Notify);

impl Package0Channel for Unreachable {
    fn deliver<'a>(
        &'a self,
        _: &'a str,
        _: Vec<u8>,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), dm_notification::ChannelError>> + Send + 'a,
        >,
    > {
        Box::pin(async move {
            self.0.notify_one();
            Ok(())
        })
    }
}

/// Issue 10: a command is acknowledged only once its outcome is published. A replica that stops while its
/// device job runs leaves the command to the next one, which carries it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_by_a_stopped_replica_is_carried_out_by_the_next() {
    let bus = Bus::in_process();
    let names = Names::new("dms1").unwrap();
    work_queues_and_auth(&bus, &names).await;
    let (fleet, fleet_url) = support::serve_fleet().await;
    let (listener, url) = support::dm_listener().await;
    let creds = support::add_device(&fleet, DEV, D1, &url);
    let config = || {
        let mut c = Config::new(D1, url.clone());
        c.command_ack_wait = Duration::from_secs(1);
        c
    };

    // The first replica takes the command, but its device cannot be reached; it stops.
    let tried = Arc::new(Unreachable(tokio::sync::Notify::new()));
    let (first, first_outcomes) = Provisioning::new(config(), tried.clone());
    let first = first.with_bus_key(bus_key());
    first.register_device(DEV, creds.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first_run = tokio::spawn(dm_provisioning::service::run(
        first,
        first_outcomes,
        bus.clone(),
        names.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut apply = pb::ApplyPlan {
        scope: vec!["./Vendor/Acme/Apps".into()],
        ..Default::default()
    };
    apply.set_del_type(DelType::Partial);
    let env = command("k:1:0", command::Kind::ApplyPlan(apply));
    bus.publish(
        &names.subject(Area::Cmd, "provisioning.apply").unwrap(),
        Headers::new(),
        Bytes::from(env.encode_to_vec()),
        "k:1:0",
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), tried.0.notified())
        .await
        .expect("the first replica took the command");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), first_run)
        .await
        .expect("the first replica stops")
        .unwrap()
        .unwrap();

    // The next replica (the device reachable now) gets the command again and carries it out.
    let channel: Arc<dyn Package0Channel> = Arc::new(HttpPushChannel::new(&fleet_url));
    let (next, next_outcomes) = Provisioning::new(config(), channel);
    let next = next.with_bus_key(bus_key());
    next.register_device(DEV, creds);
    tokio::spawn(next.clone().serve(listener, std::future::pending()));
    tokio::spawn(dm_provisioning::service::run(
        next,
        next_outcomes,
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
    let d = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("an outcome in time")
        .unwrap()
        .unwrap();
    let outcome = EventEnvelope::decode(d.message.payload.clone()).unwrap();
    let Some(event::Kind::Work(w)) = outcome.event.unwrap().kind else {
        panic!("not a work result")
    };
    assert_eq!(w.work(), Work::ApplyPlan);
    assert!(w.ok, "{} {}", w.status_code, w.reason);
    assert!(
        fleet
            .with_device(DEV, |dv| dv.account_uri(D2).is_some())
            .unwrap()
    );
}

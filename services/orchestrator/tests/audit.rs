//! The audit trail (issue 13, "Channels"; ARCHITECTURE rule 12): every admin call, refused ones too, and
//! every stored change of a delegation, with caller, method, target and outcome, never the token. Read
//! back from the audit stream of a real nats-server after calls over real gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, ConsumerConfig, Names};
use dm_orchestrator::{Config, Orchestrator, admin, audit};
use dm_proto::admin::v1::admin_client::AdminClient;
use dm_proto::admin::v1::{DelegationId, ListDelegationsRequest, StartDelegationRequest};
use dm_proto::bus::v1::AuditEvent;
use dm_saga::pb::{self, DelType, Device, Event, Phase, Role, event};
use tonic::transport::Channel;

const TOKEN: &str = "operator-token-for-the-audit-test";

fn with_token<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn start(dev_id: &str) -> StartDelegationRequest {
    let mut r = StartDelegationRequest {
        peer_server_id: "dms2.example".into(),
        device: Some(Device {
            dev_id: dev_id.into(),
            ..Default::default()
        }),
        scope: vec!["./Vendor/Acme/Apps".into()],
        ..Default::default()
    };
    r.set_role(Role::Delegating);
    r.set_del_type(DelType::Partial);
    r
}

fn config(names: &Names) -> Config {
    Config {
        names: names.clone(),
        server_id: "dms1.example".into(),
        saga: dm_saga::Config::default(),
        ack_wait: Duration::from_secs(5),
    }
}

/// The records of one message of the audit stream (batched or not, by its type header).
fn records_of(delivery: &dm_bus::Delivery) -> Vec<AuditEvent> {
    let type_name = delivery
        .message
        .headers
        .get(dm_orchestrator::TYPE_HEADER)
        .unwrap_or_default()
        .to_string();
    audit::records_of(&type_name, &delivery.message.payload).unwrap()
}

/// A Partial start of `dev_id` with dms2.example, straight through `Orchestrator::apply` (no admin call).
async fn start_directly(
    orchestrator: &Orchestrator,
    session: &str,
    dev_id: &str,
) -> Result<dm_orchestrator::Applied, dm_orchestrator::OrchestratorError> {
    let mut direct = pb::OperatorStart {
        session_id: session.into(),
        peer_server_id: "dms2.example".into(),
        device: Some(Device {
            dev_id: dev_id.into(),
            ..Default::default()
        }),
        scope: vec!["./Vendor/Acme/Apps".into()],
        ..Default::default()
    };
    direct.set_role(Role::Delegating);
    direct.set_del_type(DelType::Partial);
    orchestrator
        .apply(
            "dms2.example",
            session,
            &Event {
                kind: Some(event::Kind::OperatorStart(direct)),
            },
        )
        .await
}

/// Reads the audit stream until `done` holds for what was read, or fails after 20 s.
async fn read_audit(
    bus: &Bus,
    names: &Names,
    done: impl Fn(&[pb::AuditRecord]) -> bool,
) -> Vec<(AuditEvent, pb::AuditRecord)> {
    let mut consumer = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Audit),
            durable: "audit-test".into(),
            filter: names.area_wildcard(Area::Audit),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let records: Vec<pb::AuditRecord> = seen
            .iter()
            .map(|(_, r): &(AuditEvent, pb::AuditRecord)| r.clone())
            .collect();
        if done(&records) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "audit records missing; read: {records:#?}"
        );
        let next = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await;
        if let Ok(Ok(Some(delivery))) = next {
            let text = String::from_utf8_lossy(&delivery.message.payload).to_string();
            assert!(!text.contains(TOKEN), "the token is in the audit trail");
            for event in records_of(&delivery) {
                let record = event.record.clone().unwrap();
                seen.push((event, record));
            }
            delivery.ack().await.unwrap();
        }
    }
}

#[tokio::test]
async fn admin_calls_and_stored_changes_are_audited_with_caller_method_target_and_outcome() {
    let nats =
        NatsServer::start().expect("a nats-server for the tests (scripts/test installs one)");
    let bus = Bus::connect(nats.url()).await.unwrap();
    let names = Names::new("dms1").unwrap();
    let orchestrator = Orchestrator::new(config(&names), bus.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = admin::server(orchestrator.clone(), TOKEN.into());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let mut client = AdminClient::new(Channel::from_shared(url).unwrap().connect().await.unwrap());

    // One call that succeeds (and stores a delegation), one refused for want of a token, one refused
    // by the decider (revoking before Active: 409).
    let started = client
        .start_delegation(with_token(tonic::Request::new(start("IMEI:1"))))
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    let target = format!("delegation dms2.example/{}", started.session_id);
    client
        .list_delegations(ListDelegationsRequest::default())
        .await
        .unwrap_err();
    let id = DelegationId {
        peer_server_id: "dms2.example".into(),
        session_id: started.session_id.clone(),
    };
    client
        .revoke_delegation(with_token(tonic::Request::new(id)))
        .await
        .unwrap_err();
    // A change made through `Orchestrator::apply` directly (no admin call) is audited too.
    let other = "0b6c0f55-5d2e-4c3f-9a55-3c2b1d0e9f10";
    start_directly(&orchestrator, other, "IMEI:2")
        .await
        .unwrap();

    let token_id = admin::token_id(TOKEN);
    let call = |method: &'static str| {
        move |r: &pb::AuditRecord| r.what == "operator call" && r.method == method
    };
    let records = read_audit(&bus, &names, |rs| {
        rs.iter().any(call("StartDelegation"))
            && rs.iter().any(call("ListDelegations"))
            && rs.iter().any(call("RevokeDelegation"))
            && rs.iter().filter(|r| r.what != "operator call").count() >= 2
    })
    .await;
    let find = |f: &dyn Fn(&pb::AuditRecord) -> bool| {
        records
            .iter()
            .find(|(_, r)| f(r))
            .map(|(e, r)| (e.clone(), r.clone()))
            .unwrap_or_else(|| panic!("no such record in {records:#?}"))
    };

    let (_, r) = find(&call("StartDelegation"));
    assert_eq!(
        (r.caller.as_str(), r.target.as_str(), r.outcome.as_str()),
        (token_id.as_str(), target.as_str(), "ok")
    );
    let (_, r) = find(&call("ListDelegations"));
    assert_eq!(r.caller, "unauthenticated");
    assert!(
        r.outcome.starts_with("unauthenticated: no operator token"),
        "{r:?}"
    );
    let (e, r) = find(&call("RevokeDelegation"));
    assert_eq!(r.caller, token_id);
    assert!(r.outcome.starts_with("AlreadyExists: 409"), "{r:?}");
    assert_eq!(e.delegation.unwrap().session_id, started.session_id);

    // The stored changes: the admin's start names the operator's token id; the direct one "operator".
    let (e, r) = find(&|r| r.what != "operator call" && r.target.contains("IMEI:1"));
    assert_eq!(r.caller, token_id);
    assert_eq!(r.method, "operator_start");
    assert_eq!(r.target, format!("{target} device IMEI:1"));
    assert_eq!(r.outcome, "ok");
    assert_eq!(r.to(), Phase::NotifSent);
    assert!(e.revision > 0);
    let (_, r) = find(&|r| r.what != "operator call" && r.target.contains("IMEI:2"));
    assert_eq!(
        (r.caller.as_str(), r.method.as_str()),
        ("operator", "operator_start")
    );
    assert_eq!(r.to(), Phase::NotifSent);
    // No record carries the token.
    for (_, r) in &records {
        assert!(!format!("{r:?}").contains(TOKEN));
    }
}

/// Records ready together go in one write, and each is in the stream once, whole (group commit).
#[tokio::test(flavor = "current_thread")]
async fn records_ready_together_share_one_write_and_none_is_lost() {
    let nats =
        NatsServer::start().expect("a nats-server for the tests (scripts/test installs one)");
    let bus = Bus::connect(nats.url()).await.unwrap();
    let names = Names::new("dms1").unwrap();
    // The orchestrator creates the audit stream.
    let _orchestrator = Orchestrator::new(config(&names), bus.clone())
        .await
        .unwrap();
    let writer = audit::AuditWriter::start(
        bus.clone(),
        names.subject(Area::Audit, "delegation").unwrap(),
    );
    // On one thread, all forty are queued before the writer runs again.
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..40 {
        let writer = writer.clone();
        writes.spawn(async move {
            writer
                .write(AuditEvent {
                    record: Some(pb::AuditRecord {
                        what: "stored".into(),
                        ..Default::default()
                    }),
                    revision: i,
                    outbox_id: format!("k{i}:{i}:0"),
                    ..Default::default()
                })
                .await
        });
    }
    while let Some(done) = writes.join_next().await {
        done.unwrap().unwrap();
    }

    let mut consumer = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Audit),
            durable: "batch-test".into(),
            filter: names.subject(Area::Audit, "delegation").unwrap(),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut messages, mut ids) = (0, Vec::new());
    while ids.len() < 40 {
        assert!(Instant::now() < deadline, "records missing: {ids:?}");
        let Ok(Ok(Some(delivery))) =
            tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        else {
            continue;
        };
        for event in records_of(&delivery) {
            ids.push(event.outbox_id);
        }
        messages += 1;
        delivery.ack().await.unwrap();
    }
    ids.sort();
    let mut expected: Vec<String> = (0..40).map(|i| format!("k{i}:{i}:0")).collect();
    expected.sort();
    assert_eq!(ids, expected, "every record once");
    assert!(
        messages < 40,
        "{messages} writes for 40 records: nothing was batched"
    );
}

/// A decision whose commands the bus does not take at once (here: the audit stream gone, as while a
/// JetStream leader is elected after a node died) stands: the call succeeds, and its commands and audit
/// record go out once the stream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_decision_stands_while_its_commands_wait_for_the_bus() {
    let nats =
        NatsServer::start().expect("a nats-server for the tests (scripts/test installs one)");
    let bus = Bus::connect(nats.url()).await.unwrap();
    let names = Names::new("dms1").unwrap();
    let orchestrator = Orchestrator::new(config(&names), bus.clone())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_stream(names.stream(Area::Audit)).await.unwrap();

    let session = "5d6c0f55-5d2e-4c3f-9a55-3c2b1d0e9f11";
    let applied = start_directly(&orchestrator, session, "IMEI:3")
        .await
        .expect("the decision stands although its audit record cannot be written yet");
    assert_eq!(applied.state.unwrap().phase(), Phase::NotifSent);

    // The stream back (as a new leader would be), made here: no orchestrator starts (which would publish
    // stored outboxes itself); the record follows from the one that stored the decision.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: names.stream(Area::Audit),
        subjects: vec![names.area_wildcard(Area::Audit)],
        ..Default::default()
    })
    .await
    .unwrap();
    let records = read_audit(&bus, &names, |rs| {
        rs.iter()
            .any(|r| r.what != "operator call" && r.target.contains("IMEI:3"))
    })
    .await;
    let (event, _) = records
        .iter()
        .find(|(_, r)| r.target.contains("IMEI:3"))
        .unwrap();
    assert_eq!(event.delegation.as_ref().unwrap().session_id, session);
}

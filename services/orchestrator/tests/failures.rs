//! A failure at each step, from either side (issue 10): two orchestrators on a real nats-server, the other
//! services played by stand-ins that can fail one kind of work or lose one kind of peer message. Each case
//! ends both sides (Failed, Declined for a refused proposal, Revoked for a DMS-2 whose CONFIRM was lost)
//! with the step and code of the fault, the delegating side restores the device when it had touched it, and the device is free again: a
//! new delegation of it then reaches Active on both sides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::testing::NatsServer;
use dm_bus::{Area, Bus, ConsumerConfig, Headers, Names};
use dm_orchestrator::{Config, Orchestrator};
use dm_proto::bus::v1::{CommandEnvelope, EventEnvelope, InboundAnswer, InboundPeerMessage};
use dm_saga::pb::{self, DelType, Event, Phase, Role, Work, command, event};
use prost::Message as _;

const DEADLINE: Duration = Duration::from_secs(20);
const D1: &str = "dms1.example";
const D2: &str = "dms2.example";

/// What goes wrong in a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// This side's stand-in reports this work failed.
    Work(&'static str, Work),
    /// This side's gateway never delivers messages of this kind (the peer's deadline ends it).
    Lose(&'static str, &'static str),
}

/// Restores carried out by DMS-1's stand-in, by session.
type Restores = Arc<Mutex<Vec<String>>>;

fn kind_of(body: &Option<pb::send_message::Body>) -> &'static str {
    match body {
        Some(pb::send_message::Body::Notif(_)) => "NOTIF",
        Some(pb::send_message::Body::Res(_)) => "RES",
        Some(pb::send_message::Body::Start(_)) => "START",
        Some(pb::send_message::Body::Prepared(_)) => "PREPARED",
        Some(pb::send_message::Body::Confirm(_)) => "CONFIRM",
        Some(pb::send_message::Body::Failure(_)) => "FAILURE",
        _ => "OTHER",
    }
}

async fn stand_ins(
    bus: Bus,
    names: Names,
    me: &'static str,
    peer: Names,
    fault: Arc<Mutex<Fault>>,
    restores: Restores,
) {
    let mut commands = bus
        .consumer(&ConsumerConfig {
            stream: names.stream(Area::Cmd),
            durable: names.consumer("standins").unwrap(),
            filter: names.area_wildcard(Area::Cmd),
            ack_wait: Duration::from_secs(30),
        })
        .await
        .unwrap();
    while let Ok(Some(d)) = commands.next().await {
        let env = CommandEnvelope::decode(d.message.payload.clone()).unwrap();
        let delegation = env.delegation.clone().unwrap();
        let now = *fault.lock().unwrap();
        let done = |w: Work, plan: Option<pb::PlanOutcome>| {
            let failed = now == Fault::Work(me, w);
            let mut r = pb::WorkResult {
                ok: !failed,
                status_code: if failed { 500 } else { 0 },
                reason: if failed {
                    "stand-in failure".into()
                } else {
                    String::new()
                },
                plan: plan.filter(|_| !failed),
                ..Default::default()
            };
            r.set_work(w);
            Some(r)
        };
        let work = match env.command.as_ref().and_then(|c| c.kind.clone()) {
            Some(command::Kind::Send(m)) => {
                if now != Fault::Lose(me, kind_of(&m.body)) {
                    let inbound = InboundPeerMessage {
                        message: Some(pb::PeerMessage {
                            msg_id: m.msg_id,
                            sender: me.into(),
                            session_id: delegation.session_id.clone(),
                            body: m.body.map(dm_saga::as_received),
                        }),
                    };
                    // The gateway: 503 is tried again with the same MsgID; other answers are final.
                    let deadline = tokio::time::Instant::now() + DEADLINE;
                    loop {
                        let answer = bus
                            .request(
                                &peer.subject(Area::Req, "orchestrator.peer").unwrap(),
                                Headers::new(),
                                Bytes::from(inbound.encode_to_vec()),
                                DEADLINE,
                            )
                            .await
                            .unwrap();
                        let answer = InboundAnswer::decode(answer.payload).unwrap();
                        if answer.http_status != 503 || tokio::time::Instant::now() > deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                None
            }
            Some(command::Kind::AskAcceptance(_)) => done(Work::Acceptance, None),
            Some(command::Kind::VerifyPeer(_)) => done(Work::VerifyPeer, None),
            Some(command::Kind::CreateTempKey(_)) => done(Work::CreateKey, None),
            Some(command::Kind::ApplyPlan(_)) => done(
                Work::ApplyPlan,
                Some(pb::PlanOutcome {
                    account_uri: "./DMAcc/dms2".into(),
                    ..Default::default()
                }),
            ),
            Some(command::Kind::RestoreDevice(_)) => {
                restores.lock().unwrap().push(delegation.session_id.clone());
                let mut r = pb::WorkResult {
                    ok: true,
                    ..Default::default()
                };
                r.set_work(Work::Restore);
                Some(r)
            }
            Some(command::Kind::RunFirstSession(_)) => done(Work::FirstSession, None),
            _ => None,
        };
        if let Some(work) = work {
            let evt = EventEnvelope {
                delegation: Some(delegation),
                event: Some(Event {
                    kind: Some(event::Kind::Work(work)),
                }),
            };
            bus.publish(
                &names.subject(Area::Evt, "work.done").unwrap(),
                Headers::new(),
                Bytes::from(evt.encode_to_vec()),
                &format!("{}:done", env.outbox_id),
            )
            .await
            .unwrap();
        }
        d.ack().await.unwrap();
    }
}

/// DMS-1 waits briefly for the peer's messages (a lost one ends its delegation within a test's patience),
/// DMS-2 as long as by default: so DMS-1's deadline decides, and tells DMS-2.
fn config(deployment: &str, server_id: &str) -> Config {
    const SHORT: i64 = 1_500;
    let saga = if server_id == D1 {
        dm_saga::Config {
            await_res_ms: SHORT,
            await_start_ms: SHORT,
            await_confirm_ms: SHORT,
            ..dm_saga::Config::default()
        }
    } else {
        dm_saga::Config::default()
    };
    Config {
        names: Names::new(deployment).unwrap(),
        server_id: server_id.into(),
        saga,
        ack_wait: Duration::from_secs(30),
    }
}

async fn deploy(bus: &Bus, deployment: &str, server_id: &str) -> Orchestrator {
    let o = Orchestrator::new(config(deployment, server_id), bus.clone())
        .await
        .unwrap();
    let runner = o.clone();
    tokio::spawn(async move { runner.run(std::future::pending()).await.unwrap() });
    o
}

async fn wait_until(
    o: &Orchestrator,
    peer: &str,
    session: &str,
    done: impl Fn(Phase) -> bool,
) -> pb::DelegationState {
    let mut changes = o.subscribe();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(s) = o.get(peer, session).await.unwrap()
            && done(s.phase())
        {
            return s;
        }
        let now = o.get(peer, session).await.unwrap().map(|s| s.phase());
        assert!(
            tokio::time::timeout_at(deadline, changes.recv())
                .await
                .is_ok(),
            "{peer}/{session}: stuck at {now:?}"
        );
    }
}

fn start(dev_id: &str, session: &str) -> Event {
    let mut s = pb::OperatorStart {
        session_id: session.into(),
        peer_server_id: D2.into(),
        device: Some(pb::Device {
            dev_id: dev_id.into(),
            ..Default::default()
        }),
        scope: vec!["./Vendor/Acme".into()],
        ..Default::default()
    };
    s.set_role(Role::Delegating);
    s.set_del_type(DelType::Partial);
    Event {
        kind: Some(event::Kind::OperatorStart(s)),
    }
}

fn session(n: u64) -> String {
    format!("7e57f00d-0000-4000-8000-{n:012x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_each_step_from_either_side_ends_both_and_frees_the_device() {
    let server = NatsServer::start().unwrap();
    let bus = Bus::connect(server.url()).await.unwrap();
    let (n1, n2) = (Names::new("dms1").unwrap(), Names::new("dms2").unwrap());
    let d1 = deploy(&bus, "dms1", D1).await;
    let d2 = deploy(&bus, "dms2", D2).await;
    let fault = Arc::new(Mutex::new(Fault::None));
    let restores: Restores = Arc::default();
    tokio::spawn(stand_ins(
        bus.clone(),
        n1.clone(),
        D1,
        n2.clone(),
        fault.clone(),
        restores.clone(),
    ));
    tokio::spawn(stand_ins(
        bus.clone(),
        n2,
        D2,
        n1,
        fault.clone(),
        restores.clone(),
    ));

    // (fault, the step both sides record, its status, whether DMS-1 had touched the device, DMS-2's end)
    let cases = [
        (
            Fault::Work(D2, Work::Acceptance),
            1,
            500,
            false,
            Phase::Declined,
        ),
        (Fault::Lose(D2, "RES"), 1, 408, false, Phase::Failed),
        (
            Fault::Work(D1, Work::VerifyPeer),
            2,
            401,
            false,
            Phase::Failed,
        ),
        (
            Fault::Work(D2, Work::VerifyPeer),
            2,
            401,
            false,
            Phase::Failed,
        ),
        (Fault::Lose(D2, "START"), 3, 408, false, Phase::Failed),
        (
            Fault::Work(D1, Work::CreateKey),
            4,
            500,
            false,
            Phase::Failed,
        ),
        (
            Fault::Work(D1, Work::ApplyPlan),
            4,
            500,
            true,
            Phase::Failed,
        ),
        (Fault::Lose(D1, "PREPARED"), 9, 408, true, Phase::Failed),
        (
            Fault::Work(D2, Work::FirstSession),
            7,
            500,
            true,
            Phase::Failed,
        ),
        // DMS-2 sent CONFIRM and is Active, where a FAILURE is refused: DMS-1 revokes as well.
        (Fault::Lose(D2, "CONFIRM"), 9, 408, true, Phase::Revoked),
    ];
    for (n, (case, step, status, touched, d2_end)) in cases.into_iter().enumerate() {
        let n = n as u64;
        let dev = format!("IMEI:{n}");
        *fault.lock().unwrap() = case;
        let failing = session(2 * n);
        let applied = d1
            .apply(D2, &failing, &start(&dev, &failing))
            .await
            .unwrap();
        assert_eq!(applied.answer, dm_saga::Answer::Accepted, "{case:?}");
        let s1 = wait_until(&d1, D2, &failing, |p| {
            matches!(p, Phase::Failed | Phase::Declined)
        })
        .await;
        let s2 = wait_until(&d2, D1, &failing, |p| p == d2_end || p == Phase::Failed).await;
        assert_eq!(s2.phase(), d2_end, "{case:?}: DMS-2 {:?}", s2.fault);
        let faulted: &[(&str, &pb::DelegationState)] = if d2_end == Phase::Revoked {
            &[("DMS-1", &s1)]
        } else {
            &[("DMS-1", &s1), ("DMS-2", &s2)]
        };
        for (side, s) in faulted.iter().copied() {
            let f = s
                .fault
                .clone()
                .unwrap_or_else(|| panic!("{case:?}: {side} has no fault"));
            assert_eq!(
                (f.step, f.status_code),
                (step, status),
                "{case:?}: {side} {f:?}"
            );
        }
        assert_eq!(
            restores.lock().unwrap().contains(&failing),
            touched,
            "{case:?}: restore of the device"
        );
        // The device is free again: the next delegation goes all the way.
        *fault.lock().unwrap() = Fault::None;
        let next = session(2 * n + 1);
        let applied = d1.apply(D2, &next, &start(&dev, &next)).await.unwrap();
        assert_eq!(
            applied.answer,
            dm_saga::Answer::Accepted,
            "{case:?}: the device stayed claimed"
        );
        wait_until(&d1, D2, &next, |p| p == Phase::Active).await;
        wait_until(&d2, D1, &next, |p| p == Phase::Active).await;
    }
}

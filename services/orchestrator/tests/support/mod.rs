//! The services around two orchestrators, played by stand-ins that answer each command with its outcome,
//! and a gateway stand-in that hands each peer message to the other deployment's orchestrator by
//! request/reply (503 tried again with the same MsgID, as the gateway does). They can fail one kind of
//! work, lose one kind of message, or hold the peer check back; they record the answers the peer gave and
//! the restores asked for. Shared by the orchestrator's tests.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dm_bus::{Area, Bus, ConsumerConfig, Headers, Names};
use dm_proto::bus::v1::{
    CommandEnvelope, DelegationRef, EventEnvelope, InboundAnswer, InboundPeerMessage,
};
use dm_saga::pb::{self, Event, Work, command, event};
use prost::Message as _;
use tokio::sync::Notify;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// An operator's start of a Partial delegation of `dev_id` over `scope`, this side delegating.
pub fn partial_start(peer: &str, session_id: &str, dev_id: &str, scope: &str) -> Event {
    let mut s = pb::OperatorStart {
        session_id: session_id.into(),
        peer_server_id: peer.into(),
        device: Some(pb::Device {
            dev_id: dev_id.into(),
            ..Default::default()
        }),
        scope: vec![scope.into()],
        ..Default::default()
    };
    s.set_role(pb::Role::Delegating);
    s.set_del_type(pb::DelType::Partial);
    Event {
        kind: Some(event::Kind::OperatorStart(s)),
    }
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// This side's stand-in reports this work failed (500).
    Work(&'static str, Work),
    /// This side's gateway never delivers messages of this kind.
    Lose(&'static str, &'static str),
    /// This side's stand-in never reports this work (a device that does not answer, say).
    Hang(&'static str, Work),
}

/// What the stand-ins saw: each peer message's kind and the status it was answered with, in order, and
/// the sessions whose device was restored.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub answers: Arc<Mutex<Vec<(String, u32)>>>,
    pub restores: Arc<Mutex<Vec<String>>>,
}

pub struct StandIns {
    pub bus: Bus,
    pub names: Names,
    pub me: &'static str,
    pub peer: Names,
    pub fault: Arc<Mutex<Fault>>,
    /// The peer check waits for this (or the deadline).
    pub hold_verify: Option<Arc<Notify>>,
    /// Notified when a START got 503.
    pub early_start: Option<Arc<Notify>>,
    pub seen: Seen,
}

pub fn kind_of(body: &Option<pb::send_message::Body>) -> &'static str {
    match body {
        Some(pb::send_message::Body::Notif(_)) => "NOTIF",
        Some(pb::send_message::Body::Res(_)) => "RES",
        Some(pb::send_message::Body::Start(_)) => "START",
        Some(pb::send_message::Body::Prepared(_)) => "PREPARED",
        Some(pb::send_message::Body::Confirm(_)) => "CONFIRM",
        Some(pb::send_message::Body::Failure(_)) => "FAILURE",
        Some(pb::send_message::Body::Revoke(_)) => "REVOKE",
        Some(pb::send_message::Body::Release(_)) => "RELEASE",
        None => "",
    }
}

impl StandIns {
    /// Stand-ins that do everything right.
    pub fn new(bus: Bus, names: Names, me: &'static str, peer: Names) -> Self {
        Self {
            bus,
            names,
            me,
            peer,
            fault: Arc::new(Mutex::new(Fault::None)),
            hold_verify: None,
            early_start: None,
            seen: Seen::default(),
        }
    }

    pub async fn run(self) {
        let mut commands = self
            .bus
            .consumer(&ConsumerConfig {
                stream: self.names.stream(Area::Cmd),
                durable: self.names.consumer("standins").unwrap(),
                filter: self.names.area_wildcard(Area::Cmd),
                ack_wait: Duration::from_secs(30),
            })
            .await
            .unwrap();
        while let Ok(Some(d)) = commands.next().await {
            let env = CommandEnvelope::decode(d.message.payload.clone()).unwrap();
            let delegation = env.delegation.clone().unwrap();
            let now = *self.fault.lock().unwrap();
            let done = |w: Work, plan: Option<pb::PlanOutcome>| {
                if now == Fault::Hang(self.me, w) {
                    return None;
                }
                let failed = now == Fault::Work(self.me, w);
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
                    if now != Fault::Lose(self.me, kind_of(&m.body)) {
                        self.send(&delegation, m).await;
                    }
                    None
                }
                Some(command::Kind::AskAcceptance(_)) => done(Work::Acceptance, None),
                Some(command::Kind::VerifyPeer(_)) => {
                    if let Some(hold) = &self.hold_verify {
                        let _ = tokio::time::timeout(DEADLINE, hold.notified()).await;
                    }
                    done(Work::VerifyPeer, None)
                }
                Some(command::Kind::CreateTempKey(_)) => done(Work::CreateKey, None),
                Some(command::Kind::ApplyPlan(_)) => done(
                    Work::ApplyPlan,
                    Some(pb::PlanOutcome {
                        account_uri: "./DMAcc/dms2".into(),
                        ..Default::default()
                    }),
                ),
                Some(command::Kind::RestoreDevice(_)) => {
                    self.seen
                        .restores
                        .lock()
                        .unwrap()
                        .push(delegation.session_id.clone());
                    done(Work::Restore, None)
                }
                Some(command::Kind::RunFirstSession(_)) => done(Work::FirstSession, None),
                Some(command::Kind::FinalizeDevice(_)) => done(Work::Finalize, None),
                _ => None,
            };
            if let Some(work) = work {
                let evt = EventEnvelope {
                    delegation: Some(delegation),
                    event: Some(Event {
                        kind: Some(event::Kind::Work(work)),
                    }),
                };
                self.bus
                    .publish(
                        &self.names.subject(Area::Evt, "work.done").unwrap(),
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

    /// The gateway: the peer's orchestrator decides; 503 is retried with the same MsgID (A.2).
    async fn send(&self, delegation: &DelegationRef, m: pb::SendMessage) {
        let kind = kind_of(&m.body);
        let inbound = InboundPeerMessage {
            message: Some(pb::PeerMessage {
                msg_id: m.msg_id,
                sender: self.me.into(),
                session_id: delegation.session_id.clone(),
                stale: String::new(),
                body: m.body.map(dm_saga::as_received),
            }),
            lodge: None,
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let asked = self
                .bus
                .request(
                    &self.peer.subject(Area::Req, "orchestrator.peer").unwrap(),
                    Headers::new(),
                    Bytes::from(inbound.encode_to_vec()),
                    DEADLINE,
                )
                .await;
            let answer = match asked {
                Ok(answer) => answer,
                // Nobody answers yet (the peer's orchestrator is starting): a network error, retried
                // like a 503 until the deadline, as a sender does (A.2).
                Err(_) if tokio::time::Instant::now() <= deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => panic!("{kind}: the peer's orchestrator never answered: {e}"),
            };
            let answer = InboundAnswer::decode(answer.payload).unwrap();
            self.seen
                .answers
                .lock()
                .unwrap()
                .push((kind.to_string(), answer.http_status));
            if answer.http_status != 503 || tokio::time::Instant::now() > deadline {
                return;
            }
            if kind == "START"
                && let Some(early) = &self.early_start
            {
                early.notify_one();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

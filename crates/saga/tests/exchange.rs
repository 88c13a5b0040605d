//! Two deciders wired back to back through an in-memory exchange, with the other services played by a
//! small in-memory world (no IO): the peer messages one side sends are the events of the other; work
//! commands are answered by the world; timers fire when nothing else is left to do, in time order.
//! All four types with both initiators reach Active; a failure injected at each step leaves both sides
//! ended and purged, and the device as it was.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::VecDeque;

use common::*;
use dm_saga::pb::{
    self, DelType, DelegationState, Phase, Role, Timer, Work, WorkResult, command, event,
    send_message,
};
use dm_saga::{Answer, Decider};

const D1: &str = "dms1.example";
const D2: &str = "dms2.example";

/// What can go wrong, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The acceptance policy of the receiver of NOTIF says no.
    Nack,
    /// This work fails on the side that does it.
    WorkFails(Work),
    /// The first message of this kind is lost (and so are its retries: the step's deadline passes).
    Lost(&'static str),
}

#[derive(Debug, Default)]
struct Device {
    /// The plan is applied (DMAcc for DMS-2, ACLs moved, delegation record).
    applied: bool,
    /// Final: DMS-1 gave up its remaining rights.
    finalized: bool,
}

#[derive(Debug)]
struct Side {
    server_id: &'static str,
    state: Option<DelegationState>,
    timer: Option<Timer>,
    key_held: bool,
    purged: bool,
}

impl Side {
    fn new(server_id: &'static str) -> Self {
        Self {
            server_id,
            state: None,
            timer: None,
            key_held: false,
            purged: false,
        }
    }

    fn phase(&self) -> Phase {
        self.state
            .as_ref()
            .map_or(Phase::Unspecified, |s| s.phase())
    }
}

fn body_name(b: &send_message::Body) -> &'static str {
    match b {
        send_message::Body::Notif(_) => "NOTIF",
        send_message::Body::Res(_) => "RES",
        send_message::Body::Start(_) => "START",
        send_message::Body::Prepared(_) => "PREPARED",
        send_message::Body::Confirm(_) => "CONFIRM",
        send_message::Body::Failure(_) => "FAILURE",
        send_message::Body::Revoke(_) => "REVOKE",
        send_message::Body::Release(_) => "RELEASE",
    }
}

struct World {
    decider: Decider,
    now: i64,
    /// Index 0: DMS-1 (delegating), 1: DMS-2 (delegated).
    sides: [Side; 2],
    device: Device,
    queue: VecDeque<(usize, pb::Event)>,
    fault: Fault,
    fault_used: bool,
    log: Vec<String>,
}

impl World {
    fn new(fault: Fault) -> Self {
        Self {
            decider: Decider::default(),
            now: NOW,
            sides: [Side::new(D1), Side::new(D2)],
            device: Device::default(),
            queue: VecDeque::new(),
            fault,
            fault_used: false,
            log: Vec::new(),
        }
    }

    fn inject(&mut self, wanted: Fault) -> bool {
        if !self.fault_used && self.fault == wanted {
            self.fault_used = true;
            return true;
        }
        false
    }

    fn work(&mut self, side: usize, w: Work, plan: Option<pb::PlanOutcome>) {
        let fails = self.inject(Fault::WorkFails(w));
        let mut r = WorkResult {
            ok: !fails,
            status_code: if fails { 507 } else { 0 },
            reason: if fails {
                "injected".into()
            } else {
                String::new()
            },
            plan,
            ..Default::default()
        };
        r.set_work(w);
        self.queue.push_back((side, ev(event::Kind::Work(r))));
    }

    fn execute(&mut self, side: usize, commands: Vec<pb::Command>) {
        for c in commands {
            match c.kind.unwrap() {
                command::Kind::Send(m) => {
                    let body = m.body.unwrap();
                    let name = body_name(&body);
                    if self.inject(Fault::Lost(name)) {
                        self.log.push(format!("{} lost", name));
                        continue;
                    }
                    let session_id = self.sides[side].state.as_ref().unwrap().session_id.clone();
                    let event = ev(event::Kind::Peer(pb::PeerMessage {
                        msg_id: m.msg_id,
                        sender: self.sides[side].server_id.into(),
                        session_id,
                        stale: String::new(),
                        body: Some(dm_saga::as_received(body)),
                    }));
                    self.queue.push_back((1 - side, event));
                }
                command::Kind::AskAcceptance(_) => {
                    let nack = self.inject(Fault::Nack);
                    let mut r = WorkResult {
                        ok: !nack,
                        status_code: if nack { 403 } else { 0 },
                        reason: if nack {
                            "not offered".into()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    };
                    r.set_work(Work::Acceptance);
                    self.queue.push_back((side, ev(event::Kind::Work(r))));
                }
                command::Kind::VerifyPeer(_) => self.work(side, Work::VerifyPeer, None),
                command::Kind::CreateTempKey(_) => {
                    self.sides[side].key_held = true;
                    self.work(side, Work::CreateKey, None);
                }
                command::Kind::ForgetTempKey(_) => self.sides[side].key_held = false,
                command::Kind::ApplyPlan(_) => {
                    // A failed Atomic is rolled back by the device itself; a successful one is applied.
                    let fails = self.fault == Fault::WorkFails(Work::ApplyPlan) && !self.fault_used;
                    self.device.applied = !fails;
                    self.work(side, Work::ApplyPlan, Some(plan()));
                }
                command::Kind::RestoreDevice(_) => {
                    self.device.applied = false;
                    self.device.finalized = false;
                    self.work(side, Work::Restore, None);
                }
                command::Kind::RunFirstSession(_) => {
                    // DMS-2 receives the key in PREPARED and uses it in the first session.
                    self.sides[side].key_held = true;
                    self.work(side, Work::FirstSession, None);
                }
                command::Kind::FinalizeDevice(_) => {
                    self.device.finalized = true;
                    self.work(side, Work::Finalize, None);
                }
                command::Kind::ArmTimer(a) => self.sides[side].timer = a.timer,
                command::Kind::CancelTimer(c) => {
                    if self.sides[side].timer.is_some_and(|t| t.id == c.id) {
                        self.sides[side].timer = None;
                    }
                }
                command::Kind::Audit(a) => self.log.push(format!(
                    "{}: {:?} -> {:?}: {}",
                    self.sides[side].server_id,
                    a.from(),
                    a.to(),
                    a.what
                )),
                command::Kind::Purge(_) => {
                    self.sides[side].purged = true;
                    self.sides[side].key_held = false;
                }
            }
        }
    }

    fn deliver(&mut self, side: usize, event: pb::Event) {
        let state = self.sides[side].state.take();
        let d = self.decider.decide(state, &event, self.now);
        if let Answer::Rejected { status, reason } = &d.answer {
            self.log.push(format!(
                "{} answered {status}: {reason}",
                self.sides[side].server_id
            ));
        }
        self.sides[side].state = d.state;
        self.execute(side, d.commands);
    }

    /// Runs until nothing is queued and no timer is armed, or a step limit.
    fn run(&mut self) {
        for _ in 0..500 {
            if let Some((side, event)) = self.queue.pop_front() {
                self.deliver(side, event);
                continue;
            }
            // Nothing left to do now: jump to the earliest armed timer.
            let next = (0..2)
                .filter_map(|i| self.sides[i].timer.map(|t| (t.at_ms, i, t.id)))
                .min();
            match next {
                Some((at, side, id)) => {
                    self.now = self.now.max(at);
                    self.sides[side].timer = None;
                    self.deliver(side, timer(id));
                }
                None => return,
            }
        }
        panic!("no quiescence:\n{}", self.log.join("\n"));
    }

    fn start(&mut self, initiator: Role, t: DelType) {
        let side = if initiator == Role::Delegating { 0 } else { 1 };
        let mut start = operator_start(initiator, t);
        if let Some(event::Kind::OperatorStart(s)) = &mut start.kind {
            s.peer_server_id = self.sides[1 - side].server_id.into();
        }
        self.deliver(side, start);
        self.run();
    }
}

const TYPES: [DelType; 4] = [
    DelType::Partial,
    DelType::Full,
    DelType::Final,
    DelType::Temporary,
];

#[test]
fn all_four_types_with_both_initiators_reach_active() {
    for t in TYPES {
        for initiator in [Role::Delegating, Role::Delegated] {
            let mut w = World::new(Fault::None);
            // Temporary: stop before NotAfter, to look at the Active state.
            w.decider.config.await_confirm_ms = 1000;
            let side = if initiator == Role::Delegating { 0 } else { 1 };
            let mut start = operator_start(initiator, t);
            if let Some(event::Kind::OperatorStart(s)) = &mut start.kind {
                s.peer_server_id = w.sides[1 - side].server_id.into();
            }
            w.deliver(side, start);
            while let Some((side, event)) = w.queue.pop_front() {
                w.deliver(side, event);
            }
            let label = format!("{t:?} initiated by {initiator:?}:\n{}", w.log.join("\n"));
            let finalizing = t == DelType::Final;
            if finalizing {
                // The retry timer of Finalizing is armed, but the finalize work already came back.
                assert!(w.device.finalized, "{label}");
            }
            assert_eq!(w.sides[0].phase(), Phase::Active, "{label}");
            assert_eq!(w.sides[1].phase(), Phase::Active, "{label}");
            assert!(w.device.applied, "{label}");
            assert!(
                !w.sides[0].key_held && !w.sides[1].key_held,
                "TEMP key forgotten: {label}"
            );
            assert!(!w.sides[0].purged && !w.sides[1].purged, "{label}");
            assert_eq!(w.sides[0].state.as_ref().unwrap().role(), Role::Delegating);
            assert_eq!(w.sides[1].state.as_ref().unwrap().role(), Role::Delegated);
            assert_eq!(
                w.sides[0].state.as_ref().unwrap().session_id,
                w.sides[1].state.as_ref().unwrap().session_id
            );
            if t == DelType::Temporary {
                // Both sides then end by themselves at NotAfter; the device's authority is restored.
                w.run();
                assert_eq!(w.sides[0].phase(), Phase::Expired, "{label}");
                assert_eq!(w.sides[1].phase(), Phase::Expired, "{label}");
                assert!(!w.device.applied);
                assert!(w.sides[0].purged && w.sides[1].purged);
            }
        }
    }
}

fn injected_faults() -> Vec<Fault> {
    vec![
        Fault::Nack,
        Fault::WorkFails(Work::VerifyPeer),
        Fault::WorkFails(Work::CreateKey),
        Fault::WorkFails(Work::ApplyPlan),
        Fault::WorkFails(Work::FirstSession),
        Fault::Lost("NOTIF"),
        Fault::Lost("RES"),
        Fault::Lost("START"),
        Fault::Lost("PREPARED"),
    ]
}

#[test]
fn a_failure_at_any_step_leaves_both_sides_ended_purged_and_the_device_undone() {
    for t in TYPES {
        for initiator in [Role::Delegating, Role::Delegated] {
            for fault in injected_faults() {
                let mut w = World::new(fault);
                w.start(initiator, t);
                let label = format!(
                    "{t:?} initiated by {initiator:?} with {fault:?}:\n{}",
                    w.log.join("\n")
                );
                assert!(w.fault_used, "the fault never happened: {label}");
                for side in &w.sides {
                    let phase = side.phase();
                    // A lost NOTIF leaves the receiver with nothing at all.
                    if side.state.is_none() {
                        assert_eq!(fault, Fault::Lost("NOTIF"), "{label}");
                        continue;
                    }
                    assert!(
                        matches!(phase, Phase::Failed | Phase::Declined),
                        "{} ended {phase:?}: {label}",
                        side.server_id
                    );
                    assert!(side.purged, "{} not purged: {label}", side.server_id);
                    assert!(
                        !side.key_held,
                        "{} still holds the key: {label}",
                        side.server_id
                    );
                    assert!(side.timer.is_none(), "{label}");
                }
                assert!(!w.device.applied, "device not restored: {label}");
            }
        }
    }
}

#[test]
fn revocation_and_release_restore_the_device_and_end_both_sides() {
    for (t, who) in [(DelType::Partial, "revoke"), (DelType::Full, "release")] {
        let mut w = World::new(Fault::None);
        w.start(Role::Delegating, t);
        assert_eq!(w.sides[0].phase(), Phase::Active);
        if who == "revoke" {
            w.deliver(0, operator_revoke());
        } else {
            w.deliver(1, operator_release());
        }
        w.run();
        let expected = if who == "revoke" {
            Phase::Revoked
        } else {
            Phase::Released
        };
        assert_eq!(w.sides[0].phase(), expected, "{}", w.log.join("\n"));
        assert_eq!(w.sides[1].phase(), expected, "{}", w.log.join("\n"));
        assert!(!w.device.applied);
        assert!(w.sides.iter().all(|s| s.purged));
    }
}

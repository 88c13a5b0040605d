//! Builders shared by the saga's tests: events, representative states, and a compact rendering of
//! commands so that expectations read like the protocol.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dm_saga::pb::{
    self, DelType, DelegationState, Device, EndReason, Event, Phase, PlanOutcome, Role, Timer,
    TimerKind, Work, WorkResult, command, event, peer_message, send_message,
};

pub const SESSION: &str = "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11";
pub const PEER: &str = "peer.example";
pub const NOW: i64 = 1_800_000_000_000;
pub const DEVICE: &str = "IMEI:490154203237518";

pub fn device() -> Device {
    Device {
        dev_id: DEVICE.into(),
        man: "Acme".into(),
        model: "X100".into(),
    }
}

pub fn scope_of(t: DelType) -> Vec<String> {
    match t {
        DelType::Full => vec![".".into()],
        _ => vec!["./Vendor/Acme/Apps".into()],
    }
}

pub fn not_after_of(t: DelType) -> Option<i64> {
    (t == DelType::Temporary).then_some(NOW + 86_400_000)
}

pub fn ev(kind: event::Kind) -> Event {
    Event { kind: Some(kind) }
}

pub fn operator_start(role: Role, t: DelType) -> Event {
    let mut s = pb::OperatorStart {
        session_id: SESSION.into(),
        peer_server_id: PEER.into(),
        device: Some(device()),
        scope: scope_of(t),
        not_after_ms: not_after_of(t),
        ..Default::default()
    };
    s.set_role(role);
    s.set_del_type(t);
    ev(event::Kind::OperatorStart(s))
}

pub fn peer(msg_id: &str, body: peer_message::Body) -> Event {
    ev(event::Kind::Peer(pb::PeerMessage {
        msg_id: msg_id.into(),
        sender: PEER.into(),
        session_id: SESSION.into(),
        body: Some(body),
        ..Default::default()
    }))
}

pub fn notif(sender_role: Role, t: DelType) -> peer_message::Body {
    let mut n = pb::NotifBody {
        device: Some(device()),
        scope: scope_of(t),
        not_after_ms: not_after_of(t),
        ..Default::default()
    };
    n.set_del_type(t);
    n.set_sender_role(sender_role);
    peer_message::Body::Notif(n)
}

pub fn plan() -> PlanOutcome {
    PlanOutcome {
        account_uri: "./DMAcc/peer".into(),
        acl_results: vec![pb::AclResult {
            uri: "./Vendor/Acme/Apps".into(),
            value: "Get=peer.example".into(),
        }],
        server_nonce_b64: "bm9uY2U=".into(),
    }
}

pub fn prepared(t: DelType) -> peer_message::Body {
    let mut p = pb::PreparedBody {
        plan: Some(plan()),
        not_after_ms: not_after_of(t),
        ..Default::default()
    };
    p.set_del_type(t);
    peer_message::Body::Prepared(p)
}

pub fn revoke(reason: EndReason) -> peer_message::Body {
    let mut r = pb::RevokeBody::default();
    r.set_reason(reason);
    peer_message::Body::Revoke(r)
}

pub fn failure(code: u32, step: u32) -> peer_message::Body {
    peer_message::Body::Failure(pb::FailureBody {
        status_code: code,
        step,
        reason: "peer gave up".into(),
    })
}

pub fn work(w: Work, ok: bool) -> Event {
    let mut r = WorkResult {
        ok,
        status_code: if ok { 0 } else { 507 },
        reason: if ok { String::new() } else { "refused".into() },
        failed_command: if ok {
            String::new()
        } else {
            "Replace ./Vendor/Acme/Apps?prop=ACL".into()
        },
        plan: (ok && w == Work::ApplyPlan).then(plan),
        ..Default::default()
    };
    r.set_work(w);
    ev(event::Kind::Work(r))
}

pub fn timer(id: u64) -> Event {
    ev(event::Kind::Timer(pb::TimerFired { id }))
}

pub fn operator_revoke() -> Event {
    ev(event::Kind::OperatorRevoke(pb::OperatorRevoke {}))
}

pub fn operator_release() -> Event {
    ev(event::Kind::OperatorRelease(pb::OperatorRelease {}))
}

pub const ALL_PHASES: [Phase; 19] = [
    Phase::NotifSent,
    Phase::Deciding,
    Phase::Verifying,
    Phase::AwaitStart,
    Phase::StartSent,
    Phase::KeyPending,
    Phase::Applying,
    Phase::PreparedSent,
    Phase::Sessioning,
    Phase::Finalizing,
    Phase::Active,
    Phase::Revoking,
    Phase::Releasing,
    Phase::Compensating,
    Phase::Declined,
    Phase::Failed,
    Phase::Revoked,
    Phase::Expired,
    Phase::Released,
];

pub fn is_terminal(p: Phase) -> bool {
    matches!(
        p,
        Phase::Declined | Phase::Failed | Phase::Revoked | Phase::Expired | Phase::Released
    )
}

/// The timer a state in `phase` has armed, as the decider would have left it.
pub fn timer_kind_of(phase: Phase, t: DelType) -> Option<TimerKind> {
    match phase {
        Phase::Compensating | Phase::Revoking | Phase::Finalizing => Some(TimerKind::Retry),
        Phase::Active if t == DelType::Temporary => Some(TimerKind::Expiry),
        Phase::Active => None,
        p if is_terminal(p) => None,
        _ => Some(TimerKind::Deadline),
    }
}

/// The armed timer's id in representative states.
pub const TIMER_ID: u64 = 7;

/// A representative stored state of `role` in `phase`.
pub fn state(role: Role, phase: Phase, t: DelType) -> DelegationState {
    let touched = role == Role::Delegating
        && matches!(
            phase,
            Phase::Applying
                | Phase::PreparedSent
                | Phase::Finalizing
                | Phase::Active
                | Phase::Revoking
                | Phase::Compensating
        );
    let mut s = DelegationState {
        session_id: SESSION.into(),
        initiator: true,
        peer_server_id: PEER.into(),
        device: Some(device()),
        scope: scope_of(t),
        not_after_ms: not_after_of(t),
        device_touched: touched,
        last_timer_id: TIMER_ID,
        sent: 3,
        created_ms: NOW - 1000,
        ..Default::default()
    };
    s.set_role(role);
    s.set_phase(phase);
    s.set_del_type(t);
    if let Some(kind) = timer_kind_of(phase, t) {
        let mut timer = Timer {
            id: TIMER_ID,
            at_ms: NOW,
            ..Default::default()
        };
        timer.set_kind(kind);
        s.timer = Some(timer);
    }
    if matches!(phase, Phase::Revoking | Phase::Releasing) {
        s.set_ending(EndReason::Revoked);
    }
    s
}

/// Commands in a compact form; audit records are left out (checked separately).
pub fn render(commands: &[pb::Command]) -> Vec<String> {
    commands
        .iter()
        .filter_map(|c| {
            Some(match c.kind.as_ref()? {
                command::Kind::Send(m) => match m.body.as_ref()? {
                    send_message::Body::Notif(_) => "send:NOTIF".into(),
                    send_message::Body::Res(r) if r.ack => "send:RES+".into(),
                    send_message::Body::Res(_) => "send:RES-".into(),
                    send_message::Body::Start(_) => "send:START".into(),
                    send_message::Body::Prepared(_) => "send:PREPARED".into(),
                    send_message::Body::Confirm(_) => "send:CONFIRM".into(),
                    send_message::Body::Failure(_) => "send:FAILURE".into(),
                    send_message::Body::Revoke(_) => "send:REVOKE".into(),
                    send_message::Body::Release(_) => "send:RELEASE".into(),
                },
                command::Kind::AskAcceptance(_) => "ask".into(),
                command::Kind::VerifyPeer(_) => "verify".into(),
                command::Kind::CreateTempKey(_) => "key".into(),
                command::Kind::ForgetTempKey(_) => "forget".into(),
                command::Kind::ApplyPlan(_) => "apply".into(),
                command::Kind::RestoreDevice(r) if r.authority_only => "restore-authority".into(),
                command::Kind::RestoreDevice(_) => "restore".into(),
                command::Kind::RunFirstSession(_) => "session".into(),
                command::Kind::FinalizeDevice(_) => "finalize".into(),
                command::Kind::ArmTimer(a) => match a.timer?.kind() {
                    TimerKind::Deadline => "arm:deadline".into(),
                    TimerKind::Expiry => "arm:expiry".into(),
                    TimerKind::Retry => "arm:retry".into(),
                    TimerKind::Unspecified => "arm:?".into(),
                },
                command::Kind::CancelTimer(_) => "cancel".into(),
                command::Kind::Audit(_) => return None,
                command::Kind::Purge(_) => "purge".into(),
            })
        })
        .collect()
}

pub fn audits(commands: &[pb::Command]) -> usize {
    commands
        .iter()
        .filter(|c| matches!(c.kind, Some(command::Kind::Audit(_))))
        .count()
}

pub fn work_kinds() -> [Work; 7] {
    [
        Work::Acceptance,
        Work::VerifyPeer,
        Work::CreateKey,
        Work::ApplyPlan,
        Work::Restore,
        Work::FirstSession,
        Work::Finalize,
    ]
}

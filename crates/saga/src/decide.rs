//! The transition function. Read `decide` top-down: dedupe and party checks, then one match per event kind,
//! each arm naming the phases where the event is valid. Everything else is answered 409 (peer messages and
//! operator requests) or ignored (stale work results and timers), and changes nothing.

use dm_protocol::delegation::{self, DelType as WireDelType};
use dm_protocol::types::{DmUri, Uuid};

use crate::Config;
use crate::msgid::message_id;
use crate::pb::{
    self, ApplyPlan, ArmTimer, AskAcceptance, AuditRecord, CancelTimer, Command, ConfirmBody,
    CreateTempKey, DelType, DelegationState, EndReason, Event, FailureBody, Fault, FinalizeDevice,
    ForgetTempKey, NotifBody, PeerMessage, Phase, Purge, ReleaseBody, ResBody, RestoreDevice,
    RevokeBody, Role, RunFirstSession, SeenMessage, SendMessage, StartBody, Timer, TimerKind,
    VerifyPeer, Work, WorkResult, command, event, peer_message, send_message,
};

/// What the sender of the event is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Taken: a peer message is answered 202, an operator request succeeds.
    Accepted,
    /// A peer message seen before (same MsgID): the answer the first copy got, and no second effect.
    Repeat(u32),
    /// Refused with a status code (400, 403, 404, 405, 409; 503: not yet, retry): nothing changed.
    Rejected { status: u32, reason: String },
    /// A work result or timer that no longer matters (stale, or for another phase): nothing changed.
    Ignored,
}

impl Answer {
    /// The HTTP status a peer message gets (A.2).
    pub fn http_status(&self) -> u32 {
        match self {
            Answer::Accepted | Answer::Ignored => 202,
            Answer::Repeat(status) => *status,
            Answer::Rejected { status, .. } => *status,
        }
    }

    fn rejected(status: u32, reason: impl Into<String>) -> Self {
        Answer::Rejected {
            status,
            reason: reason.into(),
        }
    }
}

/// The outcome of one event: the state to store (`None` when there was none and none was created), the
/// commands to store with it and carry out, and the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub state: Option<DelegationState>,
    pub commands: Vec<Command>,
    pub answer: Answer,
}

impl Decision {
    fn unchanged(state: Option<DelegationState>, answer: Answer) -> Self {
        Self {
            state,
            commands: Vec::new(),
            answer,
        }
    }
}

/// The decider, with its deadlines.
#[derive(Debug, Clone, Default)]
pub struct Decider {
    pub config: Config,
}

/// The step a waiting phase is waiting for, named in a DELEGATION_FAILURE sent when its deadline passes.
pub(crate) fn waiting_step(phase: Phase) -> u32 {
    match phase {
        Phase::NotifSent | Phase::Deciding => 1,
        Phase::Verifying => 2,
        Phase::AwaitStart => 3,
        Phase::KeyPending => 4,
        Phase::Applying => 5,
        Phase::StartSent => 6,
        Phase::Sessioning => 8,
        Phase::PreparedSent => 9,
        _ => 0,
    }
}

pub(crate) fn is_terminal(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Declined | Phase::Failed | Phase::Revoked | Phase::Expired | Phase::Released
    )
}

/// Phases before Active in which DELEGATION_FAILURE may still be sent or received.
fn is_before_active(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::NotifSent
            | Phase::Deciding
            | Phase::Verifying
            | Phase::AwaitStart
            | Phase::StartSent
            | Phase::KeyPending
            | Phase::Applying
            | Phase::PreparedSent
            | Phase::Sessioning
    )
}

fn wire_del_type(t: DelType) -> Option<WireDelType> {
    match t {
        DelType::Partial => Some(WireDelType::Partial),
        DelType::Full => Some(WireDelType::Full),
        DelType::Final => Some(WireDelType::Final),
        DelType::Temporary => Some(WireDelType::Temporary),
        DelType::Unspecified => None,
    }
}

/// Checks the delegation parameters an operator or a peer proposes (A.4), as a reason on failure.
fn check_proposal(
    del_type: DelType,
    scope: &[String],
    not_after_ms: Option<i64>,
    now: i64,
) -> Result<(), String> {
    let wire = wire_del_type(del_type).ok_or("the delegation type is missing")?;
    let uris = scope
        .iter()
        .map(|s| {
            s.parse::<DmUri>()
                .map_err(|e| format!("scope URI '{s}' {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    delegation::check_scope(wire, &uris)?;
    match (del_type, not_after_ms) {
        (DelType::Temporary, None) => Err("a Temporary delegation needs NotAfter".into()),
        (DelType::Temporary, Some(t)) if t <= now => Err("NotAfter is not in the future".into()),
        (DelType::Temporary, Some(_)) => Ok(()),
        (_, Some(_)) => Err("NotAfter is only for a Temporary delegation".into()),
        (_, None) => Ok(()),
    }
}

impl Decider {
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Decides one event. `state` is the stored state of the delegation the event belongs to, or `None`
    /// when the store has none (a new delegation, or an unknown SessionID).
    pub fn decide(&self, state: Option<DelegationState>, event: &Event, now_ms: i64) -> Decision {
        let Some(kind) = &event.kind else {
            return Decision::unchanged(state, Answer::rejected(400, "empty event"));
        };
        match (state, kind) {
            (None, event::Kind::OperatorStart(start)) => self.operator_start(start, now_ms),
            (Some(s), event::Kind::OperatorStart(_)) => Decision::unchanged(
                Some(s),
                Answer::rejected(409, "a delegation with this SessionID exists"),
            ),
            (None, event::Kind::Peer(msg)) if !msg.stale.is_empty() => {
                Decision::unchanged(None, Answer::rejected(400, msg.stale.clone()))
            }
            (None, event::Kind::Peer(msg)) => self.first_peer_message(msg, now_ms),
            (None, _) => Decision::unchanged(None, Answer::rejected(404, "unknown delegation")),
            (Some(s), event::Kind::Peer(msg)) => self.peer_message(s, msg, now_ms),
            (Some(s), other) => {
                let mut step = Step::new(&self.config, s, now_ms);
                let answer = step.on_local(other);
                step.finish(answer)
            }
        }
    }

    fn operator_start(&self, start: &pb::OperatorStart, now: i64) -> Decision {
        let role = start.role();
        let device = start.device.clone().unwrap_or_default();
        let problem = if role == Role::Unspecified {
            Some("the role is missing".to_string())
        } else if start.session_id.parse::<Uuid>().is_err() {
            Some("the SessionID must be a UUID".to_string())
        } else if start.peer_server_id.is_empty() {
            Some("the peer ServerID is missing".to_string())
        } else if device.dev_id.is_empty() {
            Some("the device id is missing".to_string())
        } else {
            check_proposal(start.del_type(), &start.scope, start.not_after_ms, now).err()
        };
        if let Some(reason) = problem {
            return Decision::unchanged(None, Answer::rejected(400, reason));
        }
        let mut s = DelegationState {
            session_id: start.session_id.to_ascii_lowercase(),
            role: start.role,
            initiator: true,
            peer_server_id: start.peer_server_id.clone(),
            device: Some(device.clone()),
            del_type: start.del_type,
            scope: start.scope.clone(),
            not_after_ms: start.not_after_ms,
            created_ms: now,
            ..Default::default()
        };
        s.set_phase(Phase::Unspecified);
        let mut step = Step::new(&self.config, s, now);
        let notif = NotifBody {
            del_type: start.del_type,
            sender_role: start.role,
            device: Some(device),
            scope: start.scope.clone(),
            not_after_ms: start.not_after_ms,
        };
        step.send(send_message::Body::Notif(notif));
        step.enter(Phase::NotifSent, "operator started the delegation");
        step.finish(Answer::Accepted)
    }

    /// A peer message for which no delegation exists: only DELEGATION_NOTIF creates one.
    fn first_peer_message(&self, msg: &PeerMessage, now: i64) -> Decision {
        let Some(peer_message::Body::Notif(notif)) = &msg.body else {
            return Decision::unchanged(None, Answer::rejected(404, "unknown SessionID"));
        };
        // The receiver plays the other role than the sender announces.
        let role = match notif.sender_role() {
            Role::Delegating => Role::Delegated,
            Role::Delegated => Role::Delegating,
            Role::Unspecified => {
                return Decision::unchanged(None, Answer::rejected(400, "SenderRole is missing"));
            }
        };
        if msg.session_id.parse::<Uuid>().is_err() {
            return Decision::unchanged(
                None,
                Answer::rejected(400, "the SessionID must be a UUID"),
            );
        }
        let mut s = DelegationState {
            session_id: msg.session_id.to_ascii_lowercase(),
            initiator: false,
            peer_server_id: msg.sender.clone(),
            device: notif.device.clone(),
            del_type: notif.del_type,
            scope: notif.scope.clone(),
            not_after_ms: notif.not_after_ms,
            created_ms: now,
            ..Default::default()
        };
        s.set_role(role);
        s.set_phase(Phase::Unspecified);
        let mut step = Step::new(&self.config, s, now);
        step.seen(msg, 202);
        match check_proposal(notif.del_type(), &notif.scope, notif.not_after_ms, now) {
            // Well-formed but not acceptable as a proposal (e.g. NotAfter already passed): a nack.
            Err(reason) => {
                step.send(send_message::Body::Res(ResBody {
                    ack: false,
                    status_code: 400,
                    reason,
                }));
                step.enter(Phase::Declined, "refused a malformed proposal");
            }
            Ok(()) => {
                step.cmd(command::Kind::AskAcceptance(AskAcceptance {
                    notif: Some(notif.clone()),
                }));
                step.enter(Phase::Deciding, "peer proposed a delegation");
            }
        }
        step.finish(Answer::Accepted)
    }

    fn peer_message(&self, s: DelegationState, msg: &PeerMessage, now: i64) -> Decision {
        if let Some(seen) = s
            .seen
            .iter()
            .find(|m| m.msg_id.eq_ignore_ascii_case(&msg.msg_id))
        {
            let answer = Answer::Repeat(seen.answer);
            return Decision::unchanged(Some(s), answer);
        }
        if msg.sender != s.peer_server_id {
            return Decision::unchanged(
                Some(s),
                Answer::rejected(403, "the sender is not a party of this delegation"),
            );
        }
        if !msg.stale.is_empty() {
            // Not a copy of a message seen: a replay, or a message held back past the window.
            return Decision::unchanged(Some(s), Answer::rejected(400, msg.stale.clone()));
        }
        let mut step = Step::new(&self.config, s, now);
        let answer = step.on_peer(msg);
        if answer == Answer::Accepted {
            step.seen(msg, 202);
        }
        step.finish(answer)
    }
}

/// One decision in the making: the state being changed and the commands gathered.
struct Step<'a> {
    cfg: &'a Config,
    now: i64,
    s: DelegationState,
    cmds: Vec<Command>,
    changed: bool,
}

impl<'a> Step<'a> {
    fn new(cfg: &'a Config, s: DelegationState, now: i64) -> Self {
        Self {
            cfg,
            now,
            s,
            cmds: Vec::new(),
            changed: false,
        }
    }

    fn finish(mut self, answer: Answer) -> Decision {
        match answer {
            Answer::Accepted => {
                if self.changed || !self.cmds.is_empty() {
                    self.s.updated_ms = self.now;
                }
                Decision {
                    state: Some(self.s),
                    commands: self.cmds,
                    answer,
                }
            }
            // Nothing changes on a refusal or a stale event, whatever was started.
            other => Decision::unchanged(Some(self.s), other),
        }
    }

    fn phase(&self) -> Phase {
        self.s.phase()
    }

    fn role(&self) -> Role {
        self.s.role()
    }

    fn cmd(&mut self, kind: command::Kind) {
        self.cmds.push(Command { kind: Some(kind) });
    }

    fn seen(&mut self, msg: &PeerMessage, answer: u32) {
        self.s.seen.push(SeenMessage {
            msg_id: msg.msg_id.to_ascii_lowercase(),
            answer,
        });
        self.changed = true;
    }

    /// Sends a message to the peer, with the next deterministic MsgID.
    fn send(&mut self, body: send_message::Body) {
        let seq = self.s.sent;
        let msg_id = message_id(&self.s.session_id, self.role(), seq);
        self.s.sent += 1;
        self.cmd(command::Kind::Send(SendMessage {
            msg_id,
            seq,
            body: Some(body),
        }));
    }

    fn deadline_of(&self, phase: Phase) -> Option<i64> {
        let c = self.cfg;
        Some(match phase {
            Phase::NotifSent => c.await_res_ms,
            Phase::Deciding => c.decide_ms,
            Phase::Verifying => c.verify_ms,
            Phase::AwaitStart => c.await_start_ms,
            Phase::StartSent => c.await_prepared_ms,
            Phase::KeyPending => c.create_key_ms,
            Phase::Applying => c.apply_ms,
            Phase::PreparedSent => c.await_confirm_ms,
            Phase::Sessioning => c.first_session_ms,
            Phase::Releasing => c.await_release_ms,
            _ => return None,
        })
    }

    fn retry_delay(&self) -> i64 {
        let factor = 1i64 << self.s.retries.min(20);
        self.cfg
            .retry_min_ms
            .saturating_mul(factor)
            .min(self.cfg.retry_max_ms)
    }

    fn arm(&mut self, kind: TimerKind, at_ms: i64) {
        if let Some(old) = self.s.timer.take() {
            self.cmd(command::Kind::CancelTimer(CancelTimer { id: old.id }));
        }
        self.s.last_timer_id += 1;
        let mut timer = Timer {
            id: self.s.last_timer_id,
            at_ms,
            ..Default::default()
        };
        timer.set_kind(kind);
        self.s.timer = Some(timer);
        self.cmd(command::Kind::ArmTimer(ArmTimer { timer: Some(timer) }));
    }

    fn disarm(&mut self) {
        if let Some(old) = self.s.timer.take() {
            self.cmd(command::Kind::CancelTimer(CancelTimer { id: old.id }));
        }
    }

    /// Moves to `to`: audit record, the old timer cancelled, the new phase's timer armed, and on a
    /// terminal phase the secrets purged.
    fn enter(&mut self, to: Phase, what: &str) {
        let from = self.phase();
        self.disarm();
        self.s.set_phase(to);
        self.s.retries = 0;
        self.changed = true;
        let mut audit = AuditRecord {
            what: what.to_string(),
            ..Default::default()
        };
        audit.set_from(from);
        audit.set_to(to);
        self.cmd(command::Kind::Audit(audit));
        if let Some(after) = self.deadline_of(to) {
            self.arm(TimerKind::Deadline, self.now.saturating_add(after));
        }
        match to {
            Phase::Active if self.s.del_type() == DelType::Temporary => {
                if let Some(at) = self.s.not_after_ms {
                    self.arm(TimerKind::Expiry, at);
                }
            }
            Phase::Compensating | Phase::Revoking | Phase::Finalizing => {
                let at = self.now.saturating_add(self.retry_delay());
                self.arm(TimerKind::Retry, at);
            }
            _ => {}
        }
        if is_terminal(to) {
            self.cmd(command::Kind::Purge(Purge {}));
        }
    }

    /// Retry the device work of a phase that must not give up, with a longer delay each time.
    fn retry_later(&mut self) {
        self.s.retries = self.s.retries.saturating_add(1);
        self.changed = true;
        let at = self.now.saturating_add(self.retry_delay());
        self.arm(TimerKind::Retry, at);
    }

    /// The failure path (A.5): tell the peer (unless it told us), forget the key, restore what was done to
    /// the device (delegating side), otherwise end as Failed.
    fn fail(&mut self, status_code: u32, step: u32, reason: &str, from_peer: bool) {
        if !from_peer {
            self.send(send_message::Body::Failure(FailureBody {
                status_code,
                step,
                reason: reason.to_string(),
            }));
        }
        self.s.fault = Some(Fault {
            status_code,
            step,
            reason: reason.to_string(),
            from_peer,
        });
        self.cmd(command::Kind::ForgetTempKey(ForgetTempKey {}));
        if self.role() == Role::Delegating && self.s.device_touched {
            self.cmd(command::Kind::RestoreDevice(RestoreDevice {
                authority_only: false,
            }));
            self.enter(Phase::Compensating, "failed: restoring the device");
        } else {
            self.enter(Phase::Failed, "failed");
        }
    }

    /// Authority ends on the delegating side: restore the device's authority, then DELEGATION_REVOKE.
    fn begin_revoke(&mut self, reason: EndReason, what: &str) {
        self.s.set_ending(reason);
        self.cmd(command::Kind::RestoreDevice(RestoreDevice {
            authority_only: true,
        }));
        self.enter(Phase::Revoking, what);
    }

    fn end_phase(reason: EndReason) -> Phase {
        match reason {
            EndReason::Expired => Phase::Expired,
            EndReason::Released => Phase::Released,
            EndReason::Revoked | EndReason::Unspecified => Phase::Revoked,
        }
    }

    fn not_valid(&self) -> Answer {
        Answer::rejected(
            409,
            format!(
                "not valid while the delegation is {}",
                self.phase().as_str_name()
            ),
        )
    }

    // ---- peer messages ---------------------------------------------------------------------------------

    fn on_peer(&mut self, msg: &PeerMessage) -> Answer {
        let Some(body) = &msg.body else {
            return Answer::rejected(400, "empty message");
        };
        let phase = self.phase();
        let role = self.role();
        match body {
            // A NOTIF for an existing (peer, SessionID) pair.
            peer_message::Body::Notif(_) => {
                Answer::rejected(409, "a delegation with this SessionID exists")
            }
            peer_message::Body::Res(res) if phase == Phase::NotifSent => {
                if res.ack {
                    self.cmd(command::Kind::VerifyPeer(VerifyPeer {}));
                    self.enter(Phase::Verifying, "peer accepted");
                } else {
                    self.s.fault = Some(Fault {
                        status_code: res.status_code,
                        step: 1,
                        reason: res.reason.clone(),
                        from_peer: true,
                    });
                    self.enter(Phase::Declined, "peer declined");
                }
                Answer::Accepted
            }
            // Both sides check each other at once: DMS-2 may send START as soon as it has verified us,
            // before our verification of it is stored. Not yet, but soon: 503 makes the peer retry with
            // the same MsgID (A.2), where 409 would end the delegation at the peer's deadline.
            peer_message::Body::Start(_)
                if role == Role::Delegating && phase == Phase::Verifying =>
            {
                Answer::rejected(
                    503,
                    "DELEGATION_START came before this server finished checking the peer; retry",
                )
            }
            // Two messages the peer sends one right after the other may arrive in the other order when
            // its gateway runs as several replicas: RES then START, CONFIRM then RELEASE. The later one
            // waits (503, retried with the same MsgID) until the earlier one is in.
            peer_message::Body::Start(_)
                if role == Role::Delegating && phase == Phase::NotifSent =>
            {
                Answer::rejected(503, "DELEGATION_START came before DELEGATION_RES; retry")
            }
            peer_message::Body::Release(_)
                if role == Role::Delegating && phase == Phase::PreparedSent =>
            {
                Answer::rejected(
                    503,
                    "DELEGATION_RELEASE came before DELEGATION_CONFIRM; retry",
                )
            }
            peer_message::Body::Start(_)
                if role == Role::Delegating && phase == Phase::AwaitStart =>
            {
                self.cmd(command::Kind::CreateTempKey(CreateTempKey {}));
                self.enter(Phase::KeyPending, "peer sent its DM Account");
                Answer::Accepted
            }
            peer_message::Body::Prepared(p)
                if role == Role::Delegated && phase == Phase::StartSent =>
            {
                let mismatch = if p.del_type != self.s.del_type {
                    Some("Del_Type differs from the notification's")
                } else if p.not_after_ms != self.s.not_after_ms {
                    Some("NotAfter differs from the notification's")
                } else {
                    None
                };
                match mismatch {
                    Some(reason) => self.fail(400, 6, reason, false),
                    None => {
                        // The plan travels in the command (and the outbox), not in the state: no later
                        // decision reads it, and it was 4 KB of every stored delegation.
                        self.cmd(command::Kind::RunFirstSession(RunFirstSession {
                            plan: p.plan.clone(),
                        }));
                        self.enter(Phase::Sessioning, "device prepared by the peer");
                    }
                }
                Answer::Accepted
            }
            peer_message::Body::Confirm(_)
                if role == Role::Delegating && phase == Phase::PreparedSent =>
            {
                self.cmd(command::Kind::ForgetTempKey(ForgetTempKey {}));
                if self.s.del_type() == DelType::Final {
                    self.cmd(command::Kind::FinalizeDevice(FinalizeDevice {}));
                    self.enter(Phase::Finalizing, "confirmed: giving up remaining rights");
                } else {
                    self.enter(Phase::Active, "confirmed by the peer");
                }
                Answer::Accepted
            }
            peer_message::Body::Failure(f) if phase == Phase::Applying => {
                // A.5 with ARCHITECTURE rule 5: wait for the apply's outcome, then compensate.
                self.s.fault = Some(Fault {
                    status_code: f.status_code,
                    step: f.step,
                    reason: f.reason.clone(),
                    from_peer: true,
                });
                self.changed = true;
                Answer::Accepted
            }
            peer_message::Body::Failure(f) if is_before_active(phase) => {
                self.fail(f.status_code, f.step, &f.reason, true);
                Answer::Accepted
            }
            // Failures crossing ours: nothing more to do.
            peer_message::Body::Failure(_)
                if matches!(phase, Phase::Compensating | Phase::Failed) =>
            {
                Answer::Accepted
            }
            peer_message::Body::Revoke(_)
                if role == Role::Delegated
                    && phase == Phase::Active
                    && self.s.del_type() == DelType::Final =>
            {
                Answer::rejected(409, "a Final delegation cannot be revoked")
            }
            peer_message::Body::Revoke(r)
                if role == Role::Delegated && matches!(phase, Phase::Active | Phase::Releasing) =>
            {
                let reason = match (phase, r.reason()) {
                    (Phase::Releasing, _) => EndReason::Released,
                    (_, EndReason::Unspecified) => EndReason::Revoked,
                    (_, reason) => reason,
                };
                self.s.set_ending(reason);
                self.enter(Self::end_phase(reason), "authority taken back by the peer");
                Answer::Accepted
            }
            // Our own expiry came first; the peer's REVOKE (expired) confirms it.
            peer_message::Body::Revoke(_) if role == Role::Delegated && phase == Phase::Expired => {
                Answer::Accepted
            }
            peer_message::Body::Release(_)
                if role == Role::Delegating
                    && matches!(phase, Phase::Active | Phase::Finalizing)
                    && self.s.del_type() == DelType::Final =>
            {
                Answer::rejected(405, "a Final delegation cannot be released")
            }
            peer_message::Body::Release(_)
                if role == Role::Delegating && phase == Phase::Active =>
            {
                self.begin_revoke(EndReason::Released, "peer released the delegation");
                Answer::Accepted
            }
            _ => self.not_valid(),
        }
    }

    // ---- work results, timers and operator requests ----------------------------------------------------

    fn on_local(&mut self, kind: &event::Kind) -> Answer {
        match kind {
            event::Kind::Work(w) => self.on_work(w),
            event::Kind::Timer(t) => match self.s.timer {
                Some(armed) if armed.id == t.id => self.on_timer(armed),
                // A timer of an older arming: fenced off.
                _ => Answer::Ignored,
            },
            event::Kind::OperatorRevoke(_) => self.on_operator_revoke(),
            event::Kind::OperatorRelease(_) => self.on_operator_release(),
            event::Kind::OperatorStart(_) | event::Kind::Peer(_) => Answer::Ignored,
        }
    }

    fn on_work(&mut self, w: &WorkResult) -> Answer {
        let phase = self.phase();
        let role = self.role();
        let delegating = role == Role::Delegating;
        match (w.work(), phase) {
            (Work::Acceptance, Phase::Deciding) => {
                if w.ok {
                    self.send(send_message::Body::Res(ResBody {
                        ack: true,
                        status_code: 0,
                        reason: String::new(),
                    }));
                    self.cmd(command::Kind::VerifyPeer(VerifyPeer {}));
                    self.enter(Phase::Verifying, "accepted the proposal");
                } else {
                    let status_code = if (400..600).contains(&w.status_code) {
                        w.status_code
                    } else {
                        403
                    };
                    self.send(send_message::Body::Res(ResBody {
                        ack: false,
                        status_code,
                        reason: w.reason.clone(),
                    }));
                    self.s.fault = Some(Fault {
                        status_code,
                        step: 1,
                        reason: w.reason.clone(),
                        from_peer: false,
                    });
                    self.enter(Phase::Declined, "declined the proposal");
                }
            }
            (Work::VerifyPeer, Phase::Verifying) => {
                if !w.ok {
                    self.fail(401, 2, "mutual authentication failed", false);
                } else if role == Role::Delegating {
                    self.enter(Phase::AwaitStart, "peer authenticated");
                } else {
                    self.send(send_message::Body::Start(StartBody {}));
                    self.enter(Phase::StartSent, "peer authenticated: sent the DM Account");
                }
            }
            (Work::CreateKey, Phase::KeyPending) if delegating => {
                if w.ok {
                    self.s.device_touched = true;
                    self.cmd(command::Kind::ApplyPlan(ApplyPlan {
                        del_type: self.s.del_type,
                        scope: self.s.scope.clone(),
                        not_after_ms: self.s.not_after_ms,
                    }));
                    self.enter(Phase::Applying, "provisioning the device");
                } else {
                    self.fail(
                        500,
                        4,
                        "the temporary delegation key could not be created",
                        false,
                    );
                }
            }
            (Work::ApplyPlan, Phase::Applying) if delegating => {
                if let Some(fault) = self.s.fault.clone().filter(|f| f.from_peer) {
                    // The peer failed the delegation while the device was being changed.
                    self.fail(fault.status_code, fault.step, &fault.reason, true);
                } else if w.ok {
                    // Sent, not stored in the state (see the PREPARED arm above).
                    self.send(send_message::Body::Prepared(pb::PreparedBody {
                        del_type: self.s.del_type,
                        plan: Some(w.plan.clone().unwrap_or_default()),
                        not_after_ms: self.s.not_after_ms,
                    }));
                    self.enter(Phase::PreparedSent, "device prepared");
                } else {
                    let status = if (400..600).contains(&w.status_code) {
                        w.status_code
                    } else {
                        507
                    };
                    let reason = if w.failed_command.is_empty() {
                        format!("provisioning failed on the client: {}", w.reason)
                    } else {
                        format!(
                            "provisioning failed on the client at {}: {}",
                            w.failed_command, w.reason
                        )
                    };
                    self.fail(status, 4, &reason, false);
                }
            }
            (Work::FirstSession, Phase::Sessioning) if !delegating => {
                if w.ok {
                    self.send(send_message::Body::Confirm(ConfirmBody {
                        session_established_ms: self.now,
                    }));
                    self.cmd(command::Kind::ForgetTempKey(ForgetTempKey {}));
                    self.enter(Phase::Active, "first session done: delegation active");
                } else {
                    let status = if (400..600).contains(&w.status_code) {
                        w.status_code
                    } else {
                        500
                    };
                    self.fail(
                        status,
                        7,
                        "the first DM session with the device failed",
                        false,
                    );
                }
            }
            (Work::Finalize, Phase::Finalizing) if delegating => {
                if w.ok {
                    self.s.finalized = true;
                    self.enter(Phase::Active, "final: remaining rights given up");
                } else {
                    self.retry_later();
                }
            }
            (Work::Restore, Phase::Compensating) if delegating => {
                if w.ok {
                    // Given up waiting for CONFIRM (step 9): the peer may have sent it and be Active,
                    // where a FAILURE is refused (A.1). Authority is back with us, so tell it as a
                    // revocation too; a peer that was not Active refuses that one instead.
                    let waited_for_confirm = self
                        .s
                        .fault
                        .as_ref()
                        .is_some_and(|f| f.step == 9 && !f.from_peer);
                    if waited_for_confirm {
                        self.send(send_message::Body::Revoke(RevokeBody {
                            reason: EndReason::Revoked as i32,
                        }));
                    }
                    self.enter(Phase::Failed, "device restored");
                } else {
                    self.retry_later();
                }
            }
            (Work::Restore, Phase::Revoking) if delegating => {
                if w.ok {
                    let reason = self.s.ending();
                    self.send(send_message::Body::Revoke(RevokeBody {
                        reason: reason as i32,
                    }));
                    self.enter(Self::end_phase(reason), "authority restored");
                } else {
                    self.retry_later();
                }
            }
            _ => return Answer::Ignored,
        }
        Answer::Accepted
    }

    fn on_timer(&mut self, armed: Timer) -> Answer {
        let phase = self.phase();
        let delegating = self.role() == Role::Delegating;
        match (armed.kind(), phase) {
            (TimerKind::Deadline, Phase::Deciding) => {
                self.send(send_message::Body::Res(ResBody {
                    ack: false,
                    status_code: 408,
                    reason: "no acceptance decision in time".into(),
                }));
                self.enter(Phase::Declined, "acceptance decision timed out");
            }
            (TimerKind::Deadline, Phase::Releasing) if !delegating => {
                // DMS-2 has given authority back whether or not DMS-1 answers.
                self.s.set_ending(EndReason::Released);
                self.enter(Phase::Released, "no DELEGATION_REVOKE after release");
            }
            (TimerKind::Deadline, Phase::Applying)
                if self.s.fault.as_ref().is_some_and(|f| f.from_peer) =>
            {
                // The peer already failed the delegation; the apply's outcome never came: restore anyway.
                let fault = self.s.fault.clone().unwrap_or_default();
                self.fail(fault.status_code, fault.step, &fault.reason, true);
            }
            (TimerKind::Deadline, p) if is_before_active(p) => {
                let reason = format!("deadline passed in {}", p.as_str_name());
                self.fail(408, waiting_step(p), &reason, false);
            }
            (TimerKind::Retry, Phase::Compensating) if delegating => {
                self.cmd(command::Kind::RestoreDevice(RestoreDevice {
                    authority_only: false,
                }));
                self.retry_later();
            }
            (TimerKind::Retry, Phase::Revoking) if delegating => {
                self.cmd(command::Kind::RestoreDevice(RestoreDevice {
                    authority_only: true,
                }));
                self.retry_later();
            }
            (TimerKind::Retry, Phase::Finalizing) if delegating => {
                self.cmd(command::Kind::FinalizeDevice(FinalizeDevice {}));
                self.retry_later();
            }
            (TimerKind::Expiry, Phase::Active) => {
                if self.role() == Role::Delegating {
                    self.begin_revoke(EndReason::Expired, "NotAfter passed: taking authority back");
                } else {
                    self.s.set_ending(EndReason::Expired);
                    self.enter(
                        Phase::Expired,
                        "NotAfter passed: stopped managing the device",
                    );
                }
            }
            // `enter` disarms on every phase change, so an armed timer always belongs to its phase.
            _ => return Answer::Ignored,
        }
        Answer::Accepted
    }

    fn on_operator_revoke(&mut self) -> Answer {
        if self.role() != Role::Delegating {
            return Answer::rejected(409, "only the delegating server revokes; use release");
        }
        match self.phase() {
            Phase::Active | Phase::Finalizing if self.s.del_type() == DelType::Final => {
                Answer::rejected(405, "a Final delegation cannot be revoked")
            }
            Phase::Active => {
                self.begin_revoke(EndReason::Revoked, "operator revoked the delegation");
                Answer::Accepted
            }
            _ => self.not_valid(),
        }
    }

    fn on_operator_release(&mut self) -> Answer {
        if self.role() != Role::Delegated {
            return Answer::rejected(409, "only the delegated server releases; use revoke");
        }
        match self.phase() {
            Phase::Active if self.s.del_type() == DelType::Final => {
                Answer::rejected(405, "a Final delegation cannot be released")
            }
            Phase::Active => {
                self.send(send_message::Body::Release(ReleaseBody {}));
                self.s.set_ending(EndReason::Released);
                self.enter(Phase::Releasing, "operator released the delegation");
                Answer::Accepted
            }
            _ => self.not_valid(),
        }
    }
}

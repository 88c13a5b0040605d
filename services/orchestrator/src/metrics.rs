//! What a committed decision tells the metrics (`dmd_delegation*`): a delegation started, left a phase,
//! reached Active, ended. Recorded by the replica whose compare-and-set write made the change, so every
//! change counts once across replicas.

use std::time::Duration;

use dm_saga::pb::{self, DelType, DelegationState, Phase, Role};

fn role(state: &DelegationState) -> &'static str {
    match state.role() {
        Role::Delegating => "delegating",
        Role::Delegated => "delegated",
        Role::Unspecified => "unspecified",
    }
}

fn del_type(state: &DelegationState) -> &'static str {
    match state.del_type() {
        DelType::Partial => "partial",
        DelType::Full => "full",
        DelType::Final => "final",
        DelType::Temporary => "temporary",
        DelType::Unspecified => "unspecified",
    }
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Unspecified => "unspecified",
        Phase::NotifSent => "notif_sent",
        Phase::Deciding => "deciding",
        Phase::Verifying => "verifying",
        Phase::AwaitStart => "await_start",
        Phase::StartSent => "start_sent",
        Phase::KeyPending => "key_pending",
        Phase::Applying => "applying",
        Phase::PreparedSent => "prepared_sent",
        Phase::Sessioning => "sessioning",
        Phase::Finalizing => "finalizing",
        Phase::Active => "active",
        Phase::Revoking => "revoking",
        Phase::Releasing => "releasing",
        Phase::Compensating => "compensating",
        Phase::Declined => "declined",
        Phase::Failed => "failed",
        Phase::Revoked => "revoked",
        Phase::Expired => "expired",
        Phase::Released => "released",
    }
}

/// The outcome of a terminal phase, `None` for the others.
fn ended(p: Phase) -> Option<&'static str> {
    matches!(
        p,
        Phase::Declined | Phase::Failed | Phase::Revoked | Phase::Expired | Phase::Released
    )
    .then(|| phase(p))
}

fn since(from_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(now_ms.saturating_sub(from_ms)).unwrap_or(0))
}

/// Records the change from `before` (none: a new delegation) to `after`, stored at `now_ms`.
pub(crate) fn record(
    deployment: &str,
    before: Option<&DelegationState>,
    after: &DelegationState,
    now_ms: i64,
) {
    let m = dm_metrics::global();
    let (role, del_type) = (role(after), del_type(after));
    let Some(before) = before else {
        m.delegation_started(deployment, role, del_type);
        return;
    };
    let (from, to) = (before.phase(), after.phase());
    if from == to {
        return;
    }
    // The phase waited for one thing (a peer, a service, the device): its last change marks its start.
    let entered = before.updated_ms.max(before.created_ms);
    m.step_done(deployment, role, phase(from), since(entered, now_ms));
    if to == Phase::Active {
        m.delegation_established(deployment, role, del_type, since(after.created_ms, now_ms));
    }
    if ended(from).is_none()
        && let Some(outcome) = ended(to)
    {
        let fault = after
            .fault
            .as_ref()
            .map(|f: &pb::Fault| (f.status_code, f.step));
        m.delegation_ended(deployment, role, del_type, outcome, fault);
    }
}

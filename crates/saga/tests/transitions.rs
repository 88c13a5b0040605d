//! Every (phase, event) pair of both roles, for a Partial delegation: the table lists the pairs that do
//! something, with the next phase and the commands; every other pair must change nothing and be answered
//! 409 (peer messages, operator requests) or ignored (work results, timers). A second table covers what
//! only Final and Temporary delegations do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use dm_saga::pb::{DelType, EndReason, Phase, ResBody, Role, StartBody, Work, event, peer_message};
use dm_saga::{Answer, Decider};

fn events(t: DelType) -> Vec<(&'static str, dm_saga::pb::Event)> {
    let mut v = vec![
        ("operator_start", operator_start(Role::Delegating, t)),
        ("operator_revoke", operator_revoke()),
        ("operator_release", operator_release()),
        ("notif", peer("a1", notif(Role::Delegating, t))),
        (
            "res_ack",
            peer(
                "a2",
                peer_message::Body::Res(ResBody {
                    ack: true,
                    ..Default::default()
                }),
            ),
        ),
        (
            "res_nack",
            peer(
                "a3",
                peer_message::Body::Res(ResBody {
                    ack: false,
                    status_code: 403,
                    reason: "no".into(),
                }),
            ),
        ),
        ("start", peer("a4", peer_message::Body::Start(StartBody {}))),
        ("prepared", peer("a5", prepared(t))),
        (
            "confirm",
            peer(
                "a6",
                peer_message::Body::Confirm(dm_saga::pb::ConfirmBody {
                    session_established_ms: NOW,
                }),
            ),
        ),
        ("failure", peer("a7", failure(500, 4))),
        ("revoke", peer("a8", revoke(EndReason::Revoked))),
        (
            "release",
            peer(
                "a9",
                peer_message::Body::Release(dm_saga::pb::ReleaseBody {}),
            ),
        ),
        ("timer", timer(TIMER_ID)),
        ("stale_timer", timer(TIMER_ID - 1)),
    ];
    for (w, ok_name, fail_name) in [
        (Work::Acceptance, "acceptance_ok", "acceptance_fail"),
        (Work::VerifyPeer, "verify_ok", "verify_fail"),
        (Work::CreateKey, "key_ok", "key_fail"),
        (Work::ApplyPlan, "apply_ok", "apply_fail"),
        (Work::Restore, "restore_ok", "restore_fail"),
        (Work::FirstSession, "session_ok", "session_fail"),
        (Work::Finalize, "finalize_ok", "finalize_fail"),
    ] {
        v.push((ok_name, work(w, true)));
        v.push((fail_name, work(w, false)));
    }
    v
}

/// (roles: "B" both, "D" delegating, "d" delegated; phase; event; next phase; commands)
type Row = (&'static str, Phase, &'static str, Phase, &'static str);

const PARTIAL: &[Row] = &[
    (
        "B",
        Phase::NotifSent,
        "res_ack",
        Phase::Verifying,
        "verify cancel arm:deadline",
    ),
    (
        "B",
        Phase::NotifSent,
        "res_nack",
        Phase::Declined,
        "cancel purge",
    ),
    (
        "B",
        Phase::NotifSent,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "B",
        Phase::NotifSent,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "B",
        Phase::Deciding,
        "acceptance_ok",
        Phase::Verifying,
        "send:RES+ verify cancel arm:deadline",
    ),
    (
        "B",
        Phase::Deciding,
        "acceptance_fail",
        Phase::Declined,
        "send:RES- cancel purge",
    ),
    (
        "B",
        Phase::Deciding,
        "timer",
        Phase::Declined,
        "send:RES- cancel purge",
    ),
    (
        "B",
        Phase::Deciding,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "D",
        Phase::Verifying,
        "verify_ok",
        Phase::AwaitStart,
        "cancel arm:deadline",
    ),
    (
        "d",
        Phase::Verifying,
        "verify_ok",
        Phase::StartSent,
        "send:START cancel arm:deadline",
    ),
    (
        "B",
        Phase::Verifying,
        "verify_fail",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "B",
        Phase::Verifying,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "B",
        Phase::Verifying,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "D",
        Phase::AwaitStart,
        "start",
        Phase::KeyPending,
        "key cancel arm:deadline",
    ),
    (
        "B",
        Phase::AwaitStart,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "B",
        Phase::AwaitStart,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "d",
        Phase::StartSent,
        "prepared",
        Phase::Sessioning,
        "session cancel arm:deadline",
    ),
    (
        "B",
        Phase::StartSent,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "B",
        Phase::StartSent,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "D",
        Phase::KeyPending,
        "key_ok",
        Phase::Applying,
        "apply cancel arm:deadline",
    ),
    (
        "D",
        Phase::KeyPending,
        "key_fail",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "B",
        Phase::KeyPending,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "B",
        Phase::KeyPending,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "D",
        Phase::Applying,
        "apply_ok",
        Phase::PreparedSent,
        "send:PREPARED cancel arm:deadline",
    ),
    (
        "D",
        Phase::Applying,
        "apply_fail",
        Phase::Compensating,
        "send:FAILURE forget restore cancel arm:retry",
    ),
    // The peer's failure waits for the apply's outcome (ARCHITECTURE rule 5).
    ("B", Phase::Applying, "failure", Phase::Applying, ""),
    (
        "D",
        Phase::Applying,
        "timer",
        Phase::Compensating,
        "send:FAILURE forget restore cancel arm:retry",
    ),
    (
        "d",
        Phase::Applying,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "D",
        Phase::PreparedSent,
        "confirm",
        Phase::Active,
        "forget cancel",
    ),
    (
        "D",
        Phase::PreparedSent,
        "failure",
        Phase::Compensating,
        "forget restore cancel arm:retry",
    ),
    (
        "d",
        Phase::PreparedSent,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "D",
        Phase::PreparedSent,
        "timer",
        Phase::Compensating,
        "send:FAILURE forget restore cancel arm:retry",
    ),
    (
        "d",
        Phase::PreparedSent,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "d",
        Phase::Sessioning,
        "session_ok",
        Phase::Active,
        "send:CONFIRM forget cancel",
    ),
    (
        "d",
        Phase::Sessioning,
        "session_fail",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "B",
        Phase::Sessioning,
        "failure",
        Phase::Failed,
        "forget cancel purge",
    ),
    (
        "B",
        Phase::Sessioning,
        "timer",
        Phase::Failed,
        "send:FAILURE forget cancel purge",
    ),
    (
        "D",
        Phase::Finalizing,
        "finalize_ok",
        Phase::Active,
        "cancel",
    ),
    (
        "D",
        Phase::Finalizing,
        "finalize_fail",
        Phase::Finalizing,
        "cancel arm:retry",
    ),
    (
        "D",
        Phase::Finalizing,
        "timer",
        Phase::Finalizing,
        "finalize cancel arm:retry",
    ),
    (
        "D",
        Phase::Active,
        "operator_revoke",
        Phase::Revoking,
        "restore-authority arm:retry",
    ),
    (
        "D",
        Phase::Active,
        "release",
        Phase::Revoking,
        "restore-authority arm:retry",
    ),
    (
        "d",
        Phase::Active,
        "operator_release",
        Phase::Releasing,
        "send:RELEASE arm:deadline",
    ),
    ("d", Phase::Active, "revoke", Phase::Revoked, "purge"),
    (
        "D",
        Phase::Revoking,
        "restore_ok",
        Phase::Revoked,
        "send:REVOKE cancel purge",
    ),
    (
        "D",
        Phase::Revoking,
        "restore_fail",
        Phase::Revoking,
        "cancel arm:retry",
    ),
    (
        "D",
        Phase::Revoking,
        "timer",
        Phase::Revoking,
        "restore-authority cancel arm:retry",
    ),
    (
        "d",
        Phase::Releasing,
        "revoke",
        Phase::Released,
        "cancel purge",
    ),
    (
        "d",
        Phase::Releasing,
        "timer",
        Phase::Released,
        "cancel purge",
    ),
    (
        "D",
        Phase::Compensating,
        "restore_ok",
        Phase::Failed,
        "cancel purge",
    ),
    (
        "D",
        Phase::Compensating,
        "restore_fail",
        Phase::Compensating,
        "cancel arm:retry",
    ),
    (
        "D",
        Phase::Compensating,
        "timer",
        Phase::Compensating,
        "restore cancel arm:retry",
    ),
    // A failure crossing ours changes nothing more.
    ("B", Phase::Compensating, "failure", Phase::Compensating, ""),
    ("B", Phase::Failed, "failure", Phase::Failed, ""),
    // The delegated side expired by itself first; the peer's REVOKE (expired) is taken quietly.
    ("d", Phase::Expired, "revoke", Phase::Expired, ""),
];

fn applies(roles: &str, role: Role) -> bool {
    match roles {
        "B" => true,
        "D" => role == Role::Delegating,
        "d" => role == Role::Delegated,
        _ => panic!("bad roles {roles}"),
    }
}

fn check_table(t: DelType, table: &[Row]) {
    let decider = Decider::default();
    let mut failures = Vec::new();
    let mut covered = 0;
    for role in [Role::Delegating, Role::Delegated] {
        for phase in ALL_PHASES {
            for (name, event) in events(t) {
                let before = state(role, phase, t);
                let d = decider.decide(Some(before.clone()), &event, NOW);
                let row = table
                    .iter()
                    .find(|(roles, p, e, _, _)| applies(roles, role) && *p == phase && *e == name);
                let label = format!("{role:?} {phase:?} + {name}");
                match row {
                    Some((_, _, _, next, cmds)) => {
                        covered += 1;
                        let after = d.state.clone().unwrap();
                        if d.answer != Answer::Accepted {
                            failures.push(format!("{label}: answer {:?}", d.answer));
                        }
                        if after.phase() != *next {
                            failures.push(format!(
                                "{label}: phase {:?}, expected {next:?}",
                                after.phase()
                            ));
                        }
                        let got = render(&d.commands).join(" ");
                        if got != *cmds {
                            failures.push(format!("{label}: commands '{got}', expected '{cmds}'"));
                        }
                        let audits = audits(&d.commands);
                        let expected_audits = usize::from(after.phase() != phase);
                        if audits != expected_audits {
                            failures.push(format!("{label}: {audits} audit records"));
                        }
                    }
                    None => {
                        // Nothing may change; the answer says why.
                        if d.state.as_ref() != Some(&before) || !d.commands.is_empty() {
                            failures.push(format!(
                                "{label}: changed something: {:?}",
                                render(&d.commands)
                            ));
                        }
                        let is_local = matches!(
                            event.kind,
                            Some(event::Kind::Work(_)) | Some(event::Kind::Timer(_))
                        );
                        // A message that overtook an earlier one (or our own check of the peer):
                        // retry, not refuse.
                        let early_start = role == Role::Delegating
                            && matches!(
                                (phase, name),
                                (Phase::Verifying | Phase::NotifSent, "start")
                                    | (Phase::PreparedSent, "release")
                            );
                        let ok = if is_local {
                            d.answer == Answer::Ignored
                        } else if early_start {
                            matches!(d.answer, Answer::Rejected { status: 503, .. })
                        } else {
                            matches!(
                                d.answer,
                                Answer::Rejected {
                                    status: 405 | 409,
                                    ..
                                }
                            )
                        };
                        if !ok {
                            failures.push(format!("{label}: answer {:?}", d.answer));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the pairs are wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(covered > 0);
}

#[test]
fn every_phase_and_event_of_a_partial_delegation() {
    check_table(DelType::Partial, PARTIAL);
}

#[test]
fn every_phase_and_event_of_a_full_delegation() {
    check_table(DelType::Full, PARTIAL);
}

/// The Partial table with the rows about `phases` replaced by `rows`.
fn variant(drop: &[(Phase, &str)], rows: &[Row]) -> Vec<Row> {
    PARTIAL
        .iter()
        .filter(|(_, p, e, _, _)| !drop.iter().any(|(dp, de)| dp == p && de == e))
        .chain(rows)
        .copied()
        .collect()
}

#[test]
fn every_phase_and_event_of_a_temporary_delegation() {
    let rows: &[Row] = &[
        (
            "D",
            Phase::PreparedSent,
            "confirm",
            Phase::Active,
            "forget cancel arm:expiry",
        ),
        (
            "d",
            Phase::Sessioning,
            "session_ok",
            Phase::Active,
            "send:CONFIRM forget cancel arm:expiry",
        ),
        (
            "D",
            Phase::Finalizing,
            "finalize_ok",
            Phase::Active,
            "cancel arm:expiry",
        ),
        (
            "D",
            Phase::Active,
            "operator_revoke",
            Phase::Revoking,
            "restore-authority cancel arm:retry",
        ),
        (
            "D",
            Phase::Active,
            "release",
            Phase::Revoking,
            "restore-authority cancel arm:retry",
        ),
        (
            "D",
            Phase::Active,
            "timer",
            Phase::Revoking,
            "restore-authority cancel arm:retry",
        ),
        (
            "d",
            Phase::Active,
            "operator_release",
            Phase::Releasing,
            "send:RELEASE cancel arm:deadline",
        ),
        ("d", Phase::Active, "revoke", Phase::Revoked, "cancel purge"),
        ("d", Phase::Active, "timer", Phase::Expired, "cancel purge"),
    ];
    let drop = [
        (Phase::PreparedSent, "confirm"),
        (Phase::Sessioning, "session_ok"),
        (Phase::Finalizing, "finalize_ok"),
        (Phase::Active, "operator_revoke"),
        (Phase::Active, "release"),
        (Phase::Active, "operator_release"),
        (Phase::Active, "revoke"),
    ];
    check_table(DelType::Temporary, &variant(&drop, rows));
}

#[test]
fn every_phase_and_event_of_a_final_delegation() {
    // After CONFIRM, DMS-1 gives up its remaining rights before Active (A.6); revocation and release are
    // refused (the fallback check: 405 or 409, nothing changed).
    let rows: &[Row] = &[(
        "D",
        Phase::PreparedSent,
        "confirm",
        Phase::Finalizing,
        "forget finalize cancel arm:retry",
    )];
    let drop = [
        (Phase::PreparedSent, "confirm"),
        (Phase::Active, "operator_revoke"),
        (Phase::Active, "release"),
        (Phase::Active, "operator_release"),
        (Phase::Active, "revoke"),
    ];
    check_table(DelType::Final, &variant(&drop, rows));
}

#[test]
fn final_delegations_refuse_revoke_and_release_with_the_contract_codes() {
    let decider = Decider::default();
    for (role, event, status) in [
        (Role::Delegating, operator_revoke(), 405),
        (
            Role::Delegating,
            peer(
                "r1",
                peer_message::Body::Release(dm_saga::pb::ReleaseBody {}),
            ),
            405,
        ),
        (Role::Delegated, operator_release(), 405),
        (Role::Delegated, peer("r2", revoke(EndReason::Revoked)), 409),
    ] {
        let before = state(role, Phase::Active, DelType::Final);
        let d = decider.decide(Some(before.clone()), &event, NOW);
        assert_eq!(d.answer.http_status(), status, "{role:?} {event:?}");
        assert_eq!(d.state, Some(before));
        assert!(d.commands.is_empty());
    }
}

#[test]
fn temporary_delegations_expire_on_both_sides() {
    let decider = Decider::default();
    // Delegating: NotAfter passes → restore authority, then DELEGATION_REVOKE (expired).
    let s = state(Role::Delegating, Phase::Active, DelType::Temporary);
    let d = decider.decide(Some(s), &timer(TIMER_ID), NOW);
    let s = d.state.unwrap();
    assert_eq!(s.phase(), Phase::Revoking);
    assert_eq!(
        render(&d.commands).join(" "),
        "restore-authority cancel arm:retry"
    );
    let d = decider.decide(Some(s), &work(Work::Restore, true), NOW);
    assert_eq!(d.state.as_ref().unwrap().phase(), Phase::Expired);
    assert_eq!(render(&d.commands).join(" "), "send:REVOKE cancel purge");
    // Delegated: it stops managing at NotAfter by itself, and takes the late REVOKE (expired) quietly.
    let s = state(Role::Delegated, Phase::Active, DelType::Temporary);
    let d = decider.decide(Some(s), &timer(TIMER_ID), NOW);
    let s = d.state.unwrap();
    assert_eq!(s.phase(), Phase::Expired);
    assert_eq!(render(&d.commands).join(" "), "cancel purge");
    let d = decider.decide(
        Some(s.clone()),
        &peer("late", revoke(EndReason::Expired)),
        NOW,
    );
    assert_eq!(d.answer, Answer::Accepted);
    assert_eq!(d.state.unwrap().phase(), Phase::Expired);
    // Reaching Active arms the expiry at NotAfter.
    let s = state(Role::Delegated, Phase::Sessioning, DelType::Temporary);
    let d = decider.decide(Some(s), &work(Work::FirstSession, true), NOW);
    assert_eq!(
        render(&d.commands).join(" "),
        "send:CONFIRM forget cancel arm:expiry"
    );
    assert_eq!(
        d.state.unwrap().timer.unwrap().at_ms,
        not_after_of(DelType::Temporary).unwrap()
    );
}

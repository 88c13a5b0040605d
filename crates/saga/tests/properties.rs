//! Property tests of the decider: random event sequences never panic and keep the invariants; once
//! timers fire (and device work eventually succeeds), every delegation comes to rest; and every path that
//! touched the device and then failed contains the restore.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use dm_saga::pb::{
    self, Command, DelType, DelegationState, EndReason, Phase, ResBody, Role, StartBody, Work,
    command, event, peer_message,
};
use dm_saga::{Answer, Decider};
use proptest::prelude::*;

fn del_type() -> impl Strategy<Value = DelType> {
    prop::sample::select(vec![
        DelType::Partial,
        DelType::Full,
        DelType::Final,
        DelType::Temporary,
    ])
}

fn role() -> impl Strategy<Value = Role> {
    prop::sample::select(vec![Role::Delegating, Role::Delegated])
}

/// Any event the decider can be given, with message ids from a small pool so that duplicates happen.
fn any_event() -> impl Strategy<Value = pb::Event> {
    let msg_id = prop::sample::select(vec!["m1", "m2", "m3", "m4", "m5", "m6"]);
    prop_oneof![
        (role(), del_type()).prop_map(|(r, t)| operator_start(r, t)),
        Just(operator_revoke()),
        Just(operator_release()),
        (msg_id.clone(), role(), del_type()).prop_map(|(m, r, t)| peer(m, notif(r, t))),
        (msg_id.clone(), any::<bool>(), 400u32..600).prop_map(|(m, ack, code)| peer(
            m,
            peer_message::Body::Res(ResBody {
                ack,
                status_code: if ack { 0 } else { code },
                reason: String::new()
            })
        )),
        msg_id
            .clone()
            .prop_map(|m| peer(m, peer_message::Body::Start(StartBody {}))),
        (msg_id.clone(), del_type()).prop_map(|(m, t)| peer(m, prepared(t))),
        msg_id
            .clone()
            .prop_map(|m| peer(m, peer_message::Body::Confirm(Default::default()))),
        (msg_id.clone(), 400u32..600, 1u32..10).prop_map(|(m, c, s)| peer(m, failure(c, s))),
        (
            msg_id.clone(),
            prop::sample::select(vec![
                EndReason::Revoked,
                EndReason::Expired,
                EndReason::Released
            ])
        )
            .prop_map(|(m, r)| peer(m, revoke(r))),
        msg_id.prop_map(|m| peer(m, peer_message::Body::Release(Default::default()))),
        (prop::sample::select(work_kinds().to_vec()), any::<bool>())
            .prop_map(|(w, ok)| work(w, ok)),
        (0u64..12).prop_map(timer),
    ]
}

/// Feeds events to one delegation: each step is either a guided event for the current phase or one from
/// `noise`; a timer event moves time to the timer. Returns the state, every command and the time.
fn run(
    decider: &Decider,
    first: &pb::Event,
    steps: &[(bool, u8)],
    noise: &[pb::Event],
) -> (Option<DelegationState>, Vec<Command>, i64) {
    let mut now = NOW;
    let mut all = Vec::new();
    let d = decider.decide(None, first, now);
    check_decision(&None, &d);
    let mut state = d.state;
    all.extend(d.commands);
    for (n, (use_noise, pick)) in steps.iter().enumerate() {
        let Some(s) = &state else { break };
        let e = if *use_noise && !noise.is_empty() {
            noise[usize::from(*pick) % noise.len()].clone()
        } else {
            guided(s, *pick, n)
        };
        if let (Some(event::Kind::Timer(t)), Some(armed)) = (&e.kind, s_timer(s))
            && armed.id == t.id
        {
            now = now.max(armed.at_ms);
        }
        let d = decider.decide(state.clone(), &e, now);
        check_decision(&state, &d);
        state = d.state;
        all.extend(d.commands);
        now += 1000;
    }
    (state, all, now)
}

fn s_timer(s: &DelegationState) -> Option<pb::Timer> {
    s.timer
}

/// Invariants of every single decision.
fn check_decision(before: &Option<DelegationState>, d: &dm_saga::Decision) {
    match &d.answer {
        Answer::Accepted => {}
        _ => {
            assert_eq!(
                &d.state, before,
                "a refused or ignored event changed the state"
            );
            assert!(
                d.commands.is_empty(),
                "a refused or ignored event produced commands"
            );
        }
    }
    if let Some(s) = &d.state {
        if is_terminal(s.phase()) {
            assert!(
                s.timer.is_none(),
                "terminal with an armed timer: {:?}",
                s.phase()
            );
        }
        let arms: Vec<_> = d
            .commands
            .iter()
            .filter_map(|c| match &c.kind {
                Some(command::Kind::ArmTimer(a)) => a.timer,
                _ => None,
            })
            .collect();
        // The stored timer is the last one armed, and ids only grow.
        if let Some(last) = arms.last() {
            assert_eq!(s.timer, Some(*last));
        }
        if let (Some(b), Some(t)) = (before.as_ref().and_then(|b| b.timer), s.timer)
            && t != b
        {
            assert!(t.id > b.id, "timer ids must grow");
        }
        let phase_before = before.as_ref().map_or(Phase::Unspecified, |b| b.phase());
        assert_eq!(
            audits(&d.commands),
            usize::from(phase_before != s.phase()),
            "one audit record per phase change"
        );
    }
}

/// Events that make sense in the state's phase, so that random runs reach every phase; `pick` chooses.
fn guided(s: &DelegationState, pick: u8, n: usize) -> pb::Event {
    let id = format!("g{n}");
    let t = s.del_type();
    let armed = s.timer.map_or(0, |t| t.id);
    let menu: Vec<pb::Event> = match s.phase() {
        Phase::NotifSent => vec![
            peer(
                &id,
                peer_message::Body::Res(ResBody {
                    ack: true,
                    ..Default::default()
                }),
            ),
            peer(
                &id,
                peer_message::Body::Res(ResBody {
                    ack: false,
                    status_code: 403,
                    reason: String::new(),
                }),
            ),
        ],
        Phase::Deciding => vec![work(Work::Acceptance, true), work(Work::Acceptance, false)],
        Phase::Verifying => vec![work(Work::VerifyPeer, true), work(Work::VerifyPeer, false)],
        Phase::AwaitStart => vec![peer(&id, peer_message::Body::Start(StartBody {}))],
        Phase::StartSent => vec![peer(&id, prepared(t))],
        Phase::KeyPending => vec![work(Work::CreateKey, true), work(Work::CreateKey, false)],
        Phase::Applying => vec![work(Work::ApplyPlan, true), work(Work::ApplyPlan, false)],
        Phase::PreparedSent => vec![peer(&id, peer_message::Body::Confirm(Default::default()))],
        Phase::Sessioning => vec![
            work(Work::FirstSession, true),
            work(Work::FirstSession, false),
        ],
        Phase::Finalizing => vec![work(Work::Finalize, true), work(Work::Finalize, false)],
        Phase::Active => vec![
            operator_revoke(),
            operator_release(),
            peer(&id, revoke(EndReason::Revoked)),
            peer(&id, peer_message::Body::Release(Default::default())),
        ],
        Phase::Revoking | Phase::Compensating => {
            vec![work(Work::Restore, true), work(Work::Restore, false)]
        }
        Phase::Releasing => vec![peer(&id, revoke(EndReason::Released))],
        _ => vec![],
    };
    // Mostly progress (the first item of each menu); now and then another outcome, the deadline, or the
    // peer giving up.
    match pick % 16 {
        _ if menu.is_empty() => timer(armed),
        0 => timer(armed),
        1 => peer(&id, failure(503, 4)),
        2..=4 => menu[usize::from(pick / 16) % menu.len()].clone(),
        _ => menu[0].clone(),
    }
}

/// Lets the armed timers fire, answering device work with success, until the delegation rests.
fn settle(
    decider: &Decider,
    mut state: DelegationState,
    mut now: i64,
    all: &mut Vec<Command>,
) -> DelegationState {
    for _ in 0..60 {
        let phase = state.phase();
        if is_terminal(phase) || (phase == Phase::Active && state.timer.is_none()) {
            return state;
        }
        let event = match phase {
            Phase::Compensating | Phase::Revoking if state.role() == Role::Delegating => {
                work(Work::Restore, true)
            }
            Phase::Finalizing if state.role() == Role::Delegating => work(Work::Finalize, true),
            _ => {
                let Some(t) = state.timer else {
                    panic!("{phase:?} waits for nothing: {state:?}");
                };
                now = now.max(t.at_ms);
                timer(t.id)
            }
        };
        let d = decider.decide(Some(state.clone()), &event, now);
        check_decision(&Some(state.clone()), &d);
        all.extend(d.commands);
        state = d.state.unwrap();
    }
    panic!("did not settle: {:?}", state);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_sequences_keep_the_invariants_and_settle(
        first in prop_oneof![
            (role(), del_type()).prop_map(|(r, t)| operator_start(r, t)),
            (role(), del_type()).prop_map(|(r, t)| peer("m0", notif(r, t))),
        ],
        steps in prop::collection::vec((prop::bool::weighted(0.2), any::<u8>()), 0..40),
        noise in prop::collection::vec(any_event(), 1..10),
    ) {
        let decider = Decider::default();
        let (state, mut all, now) = run(&decider, &first, &steps, &noise);
        let Some(state) = state else { return Ok(()) };
        let state = settle(&decider, state, now, &mut all);
        let phase = state.phase();
        prop_assert!(is_terminal(phase) || phase == Phase::Active, "{phase:?}");

        // Every path that applied something to the device and then ended contains the restore, after
        // the last apply.
        let last_apply = all.iter().rposition(|c| matches!(c.kind, Some(command::Kind::ApplyPlan(_))));
        let restore_after = |authority_only: bool| {
            last_apply.is_some_and(|at| {
                all[at..].iter().any(|c| matches!(&c.kind,
                    Some(command::Kind::RestoreDevice(r)) if r.authority_only == authority_only))
            })
        };
        if last_apply.is_some() && state.role() == Role::Delegating {
            match phase {
                Phase::Failed => prop_assert!(restore_after(false), "failed without restore"),
                Phase::Revoked | Phase::Expired | Phase::Released => {
                    prop_assert!(restore_after(true), "{phase:?} without restoring authority")
                }
                _ => {}
            }
        }
        // Ended delegations purged their secrets.
        if is_terminal(phase) {
            prop_assert!(all.iter().any(|c| matches!(c.kind, Some(command::Kind::Purge(_)))));
        }
    }
}

#[test]
fn a_duplicate_message_gets_the_first_answer_and_no_second_effect() {
    let decider = Decider::default();
    let s = state(Role::Delegating, Phase::AwaitStart, DelType::Partial);
    let start = peer("dup-1", peer_message::Body::Start(StartBody {}));
    let first = decider.decide(Some(s), &start, NOW);
    assert_eq!(first.answer, Answer::Accepted);
    let s = first.state.unwrap();
    let again = decider.decide(Some(s.clone()), &start, NOW + 5);
    assert_eq!(again.answer, Answer::Repeat(202));
    assert_eq!(again.state, Some(s));
    assert!(again.commands.is_empty());
}

#[test]
fn a_message_from_a_third_party_is_refused_with_403() {
    let decider = Decider::default();
    let s = state(Role::Delegating, Phase::AwaitStart, DelType::Partial);
    let mut e = peer("x", peer_message::Body::Start(StartBody {}));
    if let Some(event::Kind::Peer(m)) = &mut e.kind {
        m.sender = "intruder.example".into();
    }
    let d = decider.decide(Some(s.clone()), &e, NOW);
    assert_eq!(d.answer.http_status(), 403);
    assert_eq!(d.state, Some(s));
}

#[test]
fn unknown_sessions_and_bad_starts_are_refused() {
    let decider = Decider::default();
    let d = decider.decide(
        None,
        &peer("x", peer_message::Body::Start(StartBody {})),
        NOW,
    );
    assert_eq!(d.answer.http_status(), 404);
    assert!(d.state.is_none());
    let d = decider.decide(None, &operator_revoke(), NOW);
    assert_eq!(d.answer.http_status(), 404);
    // A Partial delegation of the whole tree, a Temporary one already expired: 400, nothing created.
    let mut bad = operator_start(Role::Delegating, DelType::Partial);
    if let Some(event::Kind::OperatorStart(s)) = &mut bad.kind {
        s.scope = vec![".".into()];
    }
    assert_eq!(decider.decide(None, &bad, NOW).answer.http_status(), 400);
    let mut expired = operator_start(Role::Delegating, DelType::Temporary);
    if let Some(event::Kind::OperatorStart(s)) = &mut expired.kind {
        s.not_after_ms = Some(NOW - 1);
    }
    let d = decider.decide(None, &expired, NOW);
    assert_eq!(d.answer.http_status(), 400);
    assert!(d.state.is_none());
    // A peer proposing an expired Temporary delegation gets a nack, not silence.
    let mut n = notif(Role::Delegating, DelType::Temporary);
    if let peer_message::Body::Notif(b) = &mut n {
        b.not_after_ms = Some(NOW - 1);
    }
    let d = decider.decide(None, &peer("n", n), NOW);
    assert_eq!(d.state.unwrap().phase(), Phase::Declined);
    assert_eq!(render(&d.commands), ["send:RES-", "purge"]);
}

#[test]
fn a_stale_timer_does_nothing() {
    let decider = Decider::default();
    let s = state(Role::Delegated, Phase::StartSent, DelType::Partial);
    for id in [TIMER_ID - 1, TIMER_ID + 1, 0] {
        let d = decider.decide(Some(s.clone()), &timer(id), NOW + 10_000_000);
        assert_eq!(d.answer, Answer::Ignored);
        assert_eq!(d.state, Some(s.clone()));
    }
}

/// The guided generator above reaches every phase of both roles: the property covers the whole machine.
#[test]
fn the_guided_runs_reach_every_phase() {
    let decider = Decider::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for run_no in 0..400 {
        let t = [
            DelType::Partial,
            DelType::Full,
            DelType::Final,
            DelType::Temporary,
        ][run_no % 4];
        let r = [Role::Delegating, Role::Delegated][(run_no / 4) % 2];
        let first = if run_no % 16 < 8 {
            operator_start(r, t)
        } else {
            peer("m0", notif(r, t))
        };
        let steps: Vec<(bool, u8)> = (0..30).map(|_| (false, (next() % 256) as u8)).collect();
        let mut state = decider.decide(None, &first, NOW).state;
        let mut now = NOW;
        for (n, (_, pick)) in steps.iter().enumerate() {
            let Some(s) = &state else { break };
            seen.insert((s.role, s.phase));
            let e = guided(s, *pick, n);
            if let Some(event::Kind::Timer(_)) = e.kind {
                now = now.max(s.timer.map_or(now, |t| t.at_ms));
            }
            state = decider.decide(state.clone(), &e, now).state;
        }
        if let Some(s) = &state {
            seen.insert((s.role, s.phase));
        }
    }
    let delegating_only = [
        Phase::AwaitStart,
        Phase::KeyPending,
        Phase::Applying,
        Phase::PreparedSent,
        Phase::Finalizing,
        Phase::Revoking,
        Phase::Compensating,
    ];
    let delegated_only = [Phase::StartSent, Phase::Sessioning, Phase::Releasing];
    for phase in ALL_PHASES {
        for role in [Role::Delegating, Role::Delegated] {
            let impossible = match role {
                Role::Delegated => delegating_only.contains(&phase),
                _ => delegated_only.contains(&phase),
            };
            if !impossible {
                assert!(
                    seen.contains(&(role as i32, phase as i32)),
                    "{role:?} never reached {phase:?}"
                );
            }
        }
    }
}

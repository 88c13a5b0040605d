//! The MsgIDs a delegation took from its peer are its dedupe record (ARCHITECTURE rule 2). They have no
//! expiry: the record lives as long as the delegation's state, which is never deleted, so it outlives the
//! gateway's `Timestamp` window (5 min by default) by far, and a copy that passed the window check is
//! always recognized. A message the gateway marks stale (its `Timestamp` outside the window) gets the
//! first answer when it is such a copy, and 400 otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use dm_saga::pb::{DelType, Event, Phase, Role, StartBody, event, peer_message};
use dm_saga::{Answer, Decider};

const YEAR_MS: i64 = 365 * 24 * 3600 * 1000;

#[test]
fn a_copy_of_the_message_that_opened_a_delegation_is_recognized_a_year_after_it_ended() {
    let decider = Decider::default();
    let opening = peer("notif-1", notif(Role::Delegating, DelType::Partial));
    let first = decider.decide(None, &opening, NOW);
    assert_eq!(first.answer, Answer::Accepted);
    let mut s = first.state.unwrap();
    // The delegation ended long ago; its record stays.
    s.set_phase(Phase::Declined);
    let again = decider.decide(Some(s.clone()), &opening, NOW + YEAR_MS);
    assert_eq!(again.answer, Answer::Repeat(202));
    assert_eq!(again.state, Some(s));
    assert!(again.commands.is_empty(), "{:?}", again.commands);
}

#[test]
fn every_taken_message_stays_in_the_record() {
    let decider = Decider::default();
    let s = state(Role::Delegating, Phase::AwaitStart, DelType::Partial);
    let start = peer("start-1", peer_message::Body::Start(StartBody {}));
    let s = decider.decide(Some(s), &start, NOW).state.unwrap();
    assert!(
        s.seen
            .iter()
            .any(|m| m.msg_id == "start-1" && m.answer == 202)
    );
    let again = decider.decide(Some(s.clone()), &start, NOW + YEAR_MS);
    assert_eq!(again.answer, Answer::Repeat(202));
    assert!(again.commands.is_empty());
}

/// `e` as the gateway passes on a message whose `Timestamp` is outside its window.
fn stale(mut e: Event) -> Event {
    if let Some(event::Kind::Peer(m)) = &mut e.kind {
        m.stale = "Timestamp 2026-11-21T22:40:10Z is far behind".into();
    }
    e
}

#[test]
fn a_stale_copy_of_a_taken_message_gets_its_first_answer_and_any_other_stale_message_400() {
    let decider = Decider::default();
    let s = state(Role::Delegating, Phase::AwaitStart, DelType::Partial);
    let start = peer("start-1", peer_message::Body::Start(StartBody {}));
    let taken = decider.decide(Some(s.clone()), &start, NOW).state.unwrap();
    // A peer retrying with its first bytes after the window: the first answer, no second effect.
    let again = decider.decide(Some(taken.clone()), &stale(start.clone()), NOW + YEAR_MS);
    assert_eq!(again.answer, Answer::Repeat(202));
    assert_eq!(again.state, Some(taken));
    assert!(again.commands.is_empty());
    // Not a copy (the record lost, or a replay under another MsgID): refused, nothing changes.
    let refused = decider.decide(Some(s.clone()), &stale(start), NOW);
    assert_eq!(
        refused.answer,
        Answer::Rejected {
            status: 400,
            reason: "Timestamp 2026-11-21T22:40:10Z is far behind".into()
        }
    );
    assert_eq!(refused.state, Some(s));
    assert!(refused.commands.is_empty());
    // A stale NOTIF creates nothing.
    let opening = stale(peer("notif-1", notif(Role::Delegating, DelType::Partial)));
    let refused = decider.decide(None, &opening, NOW);
    assert!(
        matches!(refused.answer, Answer::Rejected { status: 400, .. }),
        "{:?}",
        refused.answer
    );
    assert_eq!(refused.state, None);
}

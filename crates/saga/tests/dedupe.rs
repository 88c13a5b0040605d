//! The MsgIDs a delegation took from its peer are its dedupe record (ARCHITECTURE rule 2). They have no
//! expiry: the record lives as long as the delegation's state, which is never deleted, so it outlives the
//! gateway's `Timestamp` window (5 min by default) by far, and a copy that passed the window check is
//! always recognized. (A copy older than the window never reaches the saga: the gateway answers it 400.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use dm_saga::pb::{DelType, Phase, Role, StartBody, peer_message};
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

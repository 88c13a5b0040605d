//! The delegation saga as a pure decider, for both roles (PROTOCOL.md A.1, A.5, A.6).
//!
//! [`Decider::decide`] takes the stored state of one delegation (or none), one event and the current time,
//! and returns the next state, the commands to carry out and the answer for whoever sent the event. No IO,
//! no clock, no randomness: the orchestrator loads the state, calls the decider, stores the state and the
//! commands in one compare-and-set write (the outbox), then publishes the commands. Deadlines are data
//! (an armed timer in the state, fenced by a growing id), so they survive restarts and every transition is
//! a plain unit test.
//!
//! The state, events and commands are the protobuf messages of `proto/dmd/saga/v1/saga.proto`.

mod claim;
mod decide;
mod msgid;

pub use claim::{Claim, claim_of, start_conflicts};
pub use decide::{Answer, Decider, Decision};
pub use dm_proto::saga::v1 as pb;
pub use msgid::message_id;

/// A message as one side sends it (a command's body) is the message the other side receives: the two
/// oneofs of the proto carry the same bodies.
pub fn as_received(body: pb::send_message::Body) -> pb::peer_message::Body {
    use pb::peer_message::Body as In;
    use pb::send_message::Body as Out;
    match body {
        Out::Notif(x) => In::Notif(x),
        Out::Res(x) => In::Res(x),
        Out::Start(x) => In::Start(x),
        Out::Prepared(x) => In::Prepared(x),
        Out::Confirm(x) => In::Confirm(x),
        Out::Failure(x) => In::Failure(x),
        Out::Revoke(x) => In::Revoke(x),
        Out::Release(x) => In::Release(x),
    }
}

/// How long each waiting phase may last before the delegation fails with 408, and how device work that
/// must not give up (restores, Final's last session) is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Initiator waiting for DELEGATION_RES.
    pub await_res_ms: i64,
    /// Acceptance policy deciding on an inbound DELEGATION_NOTIF.
    pub decide_ms: i64,
    /// Auth recording the mutual authentication (step 2).
    pub verify_ms: i64,
    /// Delegating side waiting for DELEGATION_START.
    pub await_start_ms: i64,
    /// Delegated side waiting for DELEGATION_PREPARED (DMS-1 provisions the device meanwhile).
    pub await_prepared_ms: i64,
    /// Auth creating the TEMP_DELEGATION_KEY.
    pub create_key_ms: i64,
    /// The device plan: package #0, the device connecting, the Atomic and the read-back.
    pub apply_ms: i64,
    /// Delegating side waiting for DELEGATION_CONFIRM (DMS-2's first session happens meanwhile).
    pub await_confirm_ms: i64,
    /// Delegated side's first DM session with the device.
    pub first_session_ms: i64,
    /// Delegated side waiting for DELEGATION_REVOKE (released) after sending DELEGATION_RELEASE.
    pub await_release_ms: i64,
    /// First delay before retrying a restore or finalize; doubled on each retry up to the maximum.
    pub retry_min_ms: i64,
    pub retry_max_ms: i64,
}

impl Default for Config {
    fn default() -> Self {
        const MINUTE: i64 = 60_000;
        Self {
            await_res_ms: 5 * MINUTE,
            decide_ms: 5 * MINUTE,
            verify_ms: MINUTE,
            await_start_ms: 5 * MINUTE,
            await_prepared_ms: 60 * MINUTE,
            create_key_ms: MINUTE,
            apply_ms: 30 * MINUTE,
            await_confirm_ms: 60 * MINUTE,
            first_session_ms: 30 * MINUTE,
            await_release_ms: 60 * MINUTE,
            retry_min_ms: 30_000,
            retry_max_ms: 60 * MINUTE,
        }
    }
}

//! Deterministic MsgIDs: the n-th message a side sends in a delegation always gets the same UUID, so a
//! decision replayed after a crash, or a retry of the same send, carries the same MsgID and the peer's
//! dedupe recognizes it (PROTOCOL.md A.2 item 5).

use md5::{Digest, Md5};

use dm_protocol::types::Uuid;

use crate::pb::Role;

/// The MsgID of the `index`-th message sent by `role` in the delegation `session_id`.
pub fn message_id(session_id: &str, role: Role, index: u64) -> String {
    let mut h = Md5::new();
    h.update(b"dmd-msgid-v1:");
    h.update(session_id.to_ascii_lowercase().as_bytes());
    h.update(b":");
    h.update(role.as_str_name().as_bytes());
    h.update(b":");
    h.update(index.to_be_bytes());
    let digest: [u8; 16] = h.finalize().into();
    Uuid::from_random_bytes(digest).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_distinct_and_valid_uuids() {
        let s = "9d2f0f7e-2b8a-4d6e-8a51-2a7e6b0c4d11";
        let a = message_id(s, Role::Delegating, 0);
        assert_eq!(a, message_id(&s.to_uppercase(), Role::Delegating, 0));
        assert_ne!(a, message_id(s, Role::Delegating, 1));
        assert_ne!(a, message_id(s, Role::Delegated, 0));
        assert!(a.parse::<Uuid>().is_ok());
        assert_eq!(a.as_bytes()[14], b'4', "version 4 layout: {a}");
    }
}

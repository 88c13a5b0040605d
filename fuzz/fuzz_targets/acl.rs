//! The ACL parser (node ACLs in TNDS, DELEGATION_PREPARED results, device read-backs): any text gives an
//! ACL or a typed error, never a panic; a parsed ACL formats back to exactly the text it came from, and
//! evaluating it for the servers it names agrees with what it lists.

#![no_main]

use dm_protocol::acl::{Acl, AclCommand};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(acl) = text.parse::<Acl>() else {
        return;
    };
    assert_eq!(acl.to_string(), text, "format(parse(text)) != text");
    for command in AclCommand::ALL {
        for server in acl.servers(command) {
            assert!(
                acl.allows(command, server),
                "{command:?} lists {server} but does not allow it"
            );
        }
    }
});

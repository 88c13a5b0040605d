//! The TNDS decoder (the account of DELEGATION_START, read-backs of a device's tree): any bytes give a
//! tree or a typed error, never a panic; a tree survives encode → decode; a tree that reads as a DM
//! account survives account → TNDS → account.

#![no_main]

use dm_protocol::dmacc::DmAccount;
use dm_protocol::tnds;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tree) = tnds::decode(data) else {
        return;
    };
    let text = tnds::encode(&tree);
    match tnds::decode(text.as_bytes()) {
        Ok(again) => assert_eq!(again, tree, "encode → decode changed the tree"),
        Err(e) => panic!("our own encoding does not decode: {e}\n{text}"),
    }
    if let Ok(account) = DmAccount::from_tnds(&tree) {
        let back = DmAccount::from_tnds(&account.to_tnds("fuzz"));
        assert!(
            back.as_ref().is_ok_and(|b| *b == account),
            "account → TNDS → account changed it"
        );
    }
});

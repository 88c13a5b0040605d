//! The package #0 decoder (the simulated devices run it on every push): any bytes give a notification or
//! a typed error, never a panic; a decoded notification, encoded again with some credentials, verifies
//! with them and decodes to the same notification (as version 12, the only one we send).

#![no_main]

use dm_protocol::package0::{self, VERSION_DM12};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A digest that does not verify is an error, not a panic, whatever the bytes.
    let _ = package0::verify(data, "dms1", "secret", b"nonce");
    let Ok((_, notification)) = package0::decode(data) else {
        return;
    };
    let mut expected = notification.clone();
    expected.version = VERSION_DM12;
    let bytes = match package0::encode(&notification, "dms1", "secret", b"nonce") {
        Ok(b) => b,
        Err(e) => panic!("a decoded notification does not encode: {e}"),
    };
    match package0::verify(&bytes, "dms1", "secret", b"nonce") {
        Ok(again) => assert_eq!(again, expected, "encode → decode changed the notification"),
        Err(e) => panic!("our own encoding does not verify: {e}"),
    }
    assert!(
        package0::verify(&bytes, "dms1", "other", b"nonce").is_err(),
        "a digest verified with the wrong password"
    );
});

//! The SyncML DM 1.2 decoder, as the provisioning endpoint runs it on every device message: any bytes
//! give a message or a typed error, never a panic; what decodes survives encode → decode unchanged.

#![no_main]

use dm_protocol::syncml;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = syncml::decode(data) else {
        return;
    };
    let text = syncml::encode(&message);
    match syncml::decode(text.as_bytes()) {
        Ok(again) => assert_eq!(again, message, "encode → decode changed the message"),
        Err(e) => panic!("our own encoding does not decode: {e}\n{text}"),
    }
});

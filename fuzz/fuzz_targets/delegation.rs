//! The delegation (peer XML) decoder, as the gateway runs it on every inbound body: any bytes give a
//! message or a typed error, never a panic; what decodes survives encode → decode unchanged. The same
//! bytes go through the `<DelegationError>` decoder (the outbound side reads peers' error answers).

#![no_main]

use dm_protocol::delegation;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = delegation::decode(data) {
        let text = delegation::encode(&message);
        match delegation::decode(text.as_bytes()) {
            Ok(again) => assert_eq!(again, message, "encode → decode changed the message"),
            Err(e) => panic!("our own encoding does not decode: {e}\n{text}"),
        }
    }
    if let Ok(error) = delegation::decode_error(data) {
        let text = delegation::encode_error(&error);
        match delegation::decode_error(text.as_bytes()) {
            Ok(again) => assert_eq!(again, error, "encode → decode changed the error"),
            Err(e) => panic!("our own error encoding does not decode: {e}\n{text}"),
        }
    }
});

//! The device endpoint's authentication inputs (PROTOCOL.md B.1): the `x-syncml-hmac` header, a `Cred`'s
//! data and a `NextNonce`. Any text gives a value or a typed error, never a panic; a parsed header
//! formats back to the same header; a header computed for its user name verifies, and with another
//! password it does not.

#![no_main]

use dm_protocol::auth::{self, HmacHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = auth::decode_nonce(text);
    let _ = auth::basic_name(text);
    let _ = auth::verify_basic(text, "dms1", "secret");
    let _ = auth::verify_md5(text, "dms1", "secret", b"nonce");
    let Ok(header) = HmacHeader::parse(text) else {
        return;
    };
    let again = HmacHeader::parse(&header.to_header_value());
    assert!(
        again.as_ref().is_ok_and(|a| *a == header),
        "parse → format → parse changed the header"
    );
    let _ = header.verify(&header.username, "secret", b"nonce", data);
    let computed = HmacHeader::compute(&header.username, "secret", b"nonce", data);
    let parsed = match HmacHeader::parse(&computed.to_header_value()) {
        Ok(p) => p,
        Err(e) => panic!("our own header does not parse: {e}"),
    };
    assert!(
        parsed
            .verify(&header.username, "secret", b"nonce", data)
            .is_ok()
    );
    assert!(
        parsed
            .verify(&header.username, "other", b"nonce", data)
            .is_err()
    );
});

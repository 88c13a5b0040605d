//! The package #0 notification (`application/vnd.syncml.notification`, PROTOCOL.md B.1): the binary
//! message a server sends to ask a client to open a management session.
//!
//! Layout: a 16-byte MD5 digest, then the header: version (10 bits), ui-mode (2), initiator (1), future use
//! (27, zero), session id (16, big-endian), server-identifier length (8), the server identifier, then an
//! optional vendor body. Header and body together are the *trigger*.
//!
//! Digest = `H(B64(H(name:password)):nonce:B64(H(trigger)))`, H = MD5, B64 = padded base64, where `name`,
//! `password` and `nonce` are the server credential of that server's account on the client: the SRVCRED
//! `AAuthName`, `AAuthSecret` and `AAuthData` of `./DMAcc/<x>/AppAuth/<y>`. Keep `AAuthName` equal to the
//! ServerID (B.6): some clients take the name from elsewhere.

use crate::auth::{b64, b64_h_name_password, constant_time_eq, md5};
use crate::error::{DecodeError, ErrorKind, Result};

/// The media type of a package #0.
pub const CONTENT_TYPE: &str = "application/vnd.syncml.notification";
/// Version field value for DM 1.2, the one [`encode`] writes.
pub const VERSION_DM12: u16 = 12;
/// Version field value for DM 1.1, accepted by [`decode`].
pub const VERSION_DM11: u16 = 11;

/// Length of the digest.
pub const DIGEST_LEN: usize = 16;
/// Length of the fixed part of the header (before the server identifier).
const FIXED_HEADER_LEN: usize = 8;

/// The ui-mode field (2 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UiMode {
    /// 0: not specified.
    NotSpecified,
    /// 1: background, no user interaction.
    Background,
    /// 2: informative, the user is told.
    Informative,
    /// 3: user interaction, the user must accept.
    UserInteraction,
}

impl UiMode {
    pub fn bits(self) -> u8 {
        match self {
            UiMode::NotSpecified => 0,
            UiMode::Background => 1,
            UiMode::Informative => 2,
            UiMode::UserInteraction => 3,
        }
    }

    /// The mode for the low two bits of `bits`.
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            1 => UiMode::Background,
            2 => UiMode::Informative,
            3 => UiMode::UserInteraction,
            _ => UiMode::NotSpecified,
        }
    }
}

/// The initiator bit: who asked for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Initiator {
    /// 0: the client side (user initiated).
    Client,
    /// 1: the server.
    Server,
}

impl Initiator {
    pub fn bit(self) -> u8 {
        match self {
            Initiator::Client => 0,
            Initiator::Server => 1,
        }
    }

    /// The initiator for the low bit of `bit`.
    pub fn from_bit(bit: u8) -> Self {
        if bit & 1 == 1 {
            Initiator::Server
        } else {
            Initiator::Client
        }
    }
}

/// A decoded (or to be encoded) notification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notification {
    /// The version read by [`decode`] (11 or 12). [`encode`] always writes 12 and ignores this field.
    pub version: u16,
    pub ui_mode: UiMode,
    pub initiator: Initiator,
    pub session_id: u16,
    /// The ServerID of the account the client is to use (1 to 255 bytes of UTF-8).
    pub server_id: String,
    /// The optional vendor-specific body.
    pub vendor_body: Vec<u8>,
}

impl Notification {
    /// A DM 1.2, server-initiated notification with no ui-mode preference and no vendor body.
    pub fn new(server_id: impl Into<String>, session_id: u16) -> Self {
        Self {
            version: VERSION_DM12,
            ui_mode: UiMode::NotSpecified,
            initiator: Initiator::Server,
            session_id,
            server_id: server_id.into(),
            vendor_body: Vec::new(),
        }
    }
}

fn error(kind: ErrorKind, field: &str, reason: &str) -> DecodeError {
    DecodeError::new(kind, format!("package0/{field}"), reason)
}

/// The digest of a trigger (header and body bytes): `H(B64(H(name:password)):nonce:B64(H(trigger)))`.
/// `name`, `password` and `nonce` are the SRVCRED `AAuthName`, `AAuthSecret` and `AAuthData` of the
/// server's account on the client.
pub fn digest(name: &str, password: &str, nonce: &[u8], trigger: &[u8]) -> [u8; DIGEST_LEN] {
    let mut input = b64_h_name_password(name, password).into_bytes();
    input.push(b':');
    input.extend_from_slice(nonce);
    input.push(b':');
    input.extend_from_slice(b64(&md5(trigger)).as_bytes());
    md5(&input)
}

/// Encodes a notification with version 12 and its digest. `name`, `password` and `nonce` are the SRVCRED
/// `AAuthName`, `AAuthSecret` and `AAuthData` of the server's account on the client.
///
/// Errors ([`ErrorKind::InvalidValue`]) when the server identifier is empty or longer than 255 bytes.
pub fn encode(n: &Notification, name: &str, password: &str, nonce: &[u8]) -> Result<Vec<u8>> {
    let server_id = n.server_id.as_bytes();
    let id_len = u8::try_from(server_id.len()).map_err(|_| {
        error(
            ErrorKind::InvalidValue,
            "server_id",
            "the server identifier is longer than 255 bytes",
        )
    })?;
    if id_len == 0 {
        return Err(error(
            ErrorKind::InvalidValue,
            "server_id",
            "the server identifier is empty",
        ));
    }
    let mut trigger = Vec::with_capacity(FIXED_HEADER_LEN + server_id.len() + n.vendor_body.len());
    let version = VERSION_DM12;
    // version (10) | ui-mode (2) | initiator (1) | future use (27) | session id (16) | length (8)
    let [version_hi, version_lo] = (version << 6).to_be_bytes();
    trigger.push(version_hi);
    trigger.push(version_lo | (n.ui_mode.bits() << 4) | (n.initiator.bit() << 3));
    trigger.extend_from_slice(&[0, 0, 0]);
    trigger.extend_from_slice(&n.session_id.to_be_bytes());
    trigger.push(id_len);
    trigger.extend_from_slice(server_id);
    trigger.extend_from_slice(&n.vendor_body);
    let mut out = Vec::with_capacity(DIGEST_LEN + trigger.len());
    out.extend_from_slice(&digest(name, password, nonce, &trigger));
    out.extend_from_slice(&trigger);
    Ok(out)
}

/// Decodes a notification without checking its digest. Accepts versions 11 and 12; the future-use bits are
/// ignored. Errors on truncation, a server-identifier length past the end, an empty or non-UTF-8 server
/// identifier, and other versions ([`ErrorKind::UnsupportedVersion`]).
pub fn decode(bytes: &[u8]) -> Result<([u8; DIGEST_LEN], Notification)> {
    let (digest, rest) = bytes.split_first_chunk::<DIGEST_LEN>().ok_or_else(|| {
        error(
            ErrorKind::NotWellFormed,
            "digest",
            "truncated: shorter than the 16-byte digest",
        )
    })?;
    let (header, rest) = rest
        .split_first_chunk::<FIXED_HEADER_LEN>()
        .ok_or_else(|| {
            error(
                ErrorKind::NotWellFormed,
                "header",
                "truncated: shorter than the 8-byte header",
            )
            .at(DIGEST_LEN as u64)
        })?;
    let [b0, b1, _, _, _, sid_hi, sid_lo, id_len] = *header;
    let version = (u16::from(b0) << 2) | u16::from(b1 >> 6);
    if version != VERSION_DM11 && version != VERSION_DM12 {
        return Err(error(
            ErrorKind::UnsupportedVersion,
            "version",
            "unsupported notification version (11 or 12 expected)",
        )
        .at(DIGEST_LEN as u64));
    }
    let ui_mode = UiMode::from_bits(b1 >> 4);
    let initiator = Initiator::from_bit(b1 >> 3);
    let session_id = u16::from_be_bytes([sid_hi, sid_lo]);
    let id_offset = (DIGEST_LEN + FIXED_HEADER_LEN) as u64;
    if id_len == 0 {
        return Err(error(
            ErrorKind::Missing,
            "server_id",
            "the server identifier is empty",
        )
        .at(id_offset));
    }
    let id_len = usize::from(id_len);
    if id_len > rest.len() {
        return Err(error(
            ErrorKind::NotWellFormed,
            "server_id",
            "truncated: the server identifier length goes past the end",
        )
        .at(id_offset));
    }
    let (server_id, vendor_body) = rest.split_at(id_len);
    let server_id = std::str::from_utf8(server_id).map_err(|_| {
        error(
            ErrorKind::InvalidValue,
            "server_id",
            "the server identifier is not UTF-8",
        )
        .at(id_offset)
    })?;
    Ok((
        *digest,
        Notification {
            version,
            ui_mode,
            initiator,
            session_id,
            server_id: server_id.to_string(),
            vendor_body: vendor_body.to_vec(),
        },
    ))
}

/// Decodes a notification and checks its digest against the SRVCRED `AAuthName` (`name`), `AAuthSecret`
/// (`password`) and `AAuthData` (`nonce`) of the server's account. A mismatch is [`ErrorKind::BadDigest`].
pub fn verify(bytes: &[u8], name: &str, password: &str, nonce: &[u8]) -> Result<Notification> {
    let (received, notification) = decode(bytes)?;
    let trigger = bytes.get(DIGEST_LEN..).unwrap_or_default();
    let expected = digest(name, password, nonce, trigger);
    if constant_time_eq(&received, &expected) {
        Ok(notification)
    } else {
        Err(error(
            ErrorKind::BadDigest,
            "digest",
            "the digest does not verify",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Computed independently with Python (struct, hashlib, base64): server id "dm.example.com", session
    /// 0x1234, ui-mode 3, server initiated, vendor body 01 02 "vendor", credential srv / srvsecret,
    /// nonce "nonce0".
    const VECTOR: &str = "04024d7167ba03a418a123546fb647e4033800000012340e646d2e6578616d706c652e636f6d010276656e646f72";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn sample() -> Notification {
        Notification {
            version: VERSION_DM12,
            ui_mode: UiMode::UserInteraction,
            initiator: Initiator::Server,
            session_id: 0x1234,
            server_id: "dm.example.com".to_string(),
            vendor_body: b"\x01\x02vendor".to_vec(),
        }
    }

    #[test]
    fn encodes_the_known_vector() {
        let bytes = encode(&sample(), "srv", "srvsecret", b"nonce0").unwrap();
        assert_eq!(bytes, hex(VECTOR));
    }

    #[test]
    fn decodes_and_verifies_the_known_vector() {
        let bytes = hex(VECTOR);
        let (digest, n) = decode(&bytes).unwrap();
        assert_eq!(digest[..], bytes[..16]);
        assert_eq!(n, sample());
        assert_eq!(
            verify(&bytes, "srv", "srvsecret", b"nonce0").unwrap(),
            sample()
        );
        for (name, password, nonce) in [
            ("srv", "srvsecret", &b"nonce1"[..]),
            ("srv", "wrong", b"nonce0"),
            ("other", "srvsecret", b"nonce0"),
        ] {
            let e = verify(&bytes, name, password, nonce).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadDigest);
        }
        let mut tampered = bytes.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            verify(&tampered, "srv", "srvsecret", b"nonce0")
                .unwrap_err()
                .kind,
            ErrorKind::BadDigest
        );
    }

    #[test]
    fn header_bits() {
        let mut n = Notification::new("s", 0xBEEF);
        n.ui_mode = UiMode::Informative;
        n.initiator = Initiator::Client;
        let bytes = encode(&n, "s", "p", b"").unwrap();
        let header = &bytes[16..24];
        // version 12 = 0b0000001100 → 00000011 | 00 (10 bits), ui-mode 10, initiator 0, future 0…
        assert_eq!(header, &[0x03, 0b0010_0000, 0, 0, 0, 0xBE, 0xEF, 1]);
        assert_eq!(&bytes[24..], b"s");
    }

    #[test]
    fn accepts_version_11_and_ignores_future_bits() {
        let mut bytes = hex(VECTOR);
        // version 11 = 0b0000001011: byte0 = 0b00000010, top two bits of byte1 = 0b11.
        bytes[16] = 0b0000_0010;
        bytes[17] = (bytes[17] & 0x3F) | 0b1100_0000 | 0b0000_0111;
        bytes[18] = 0xFF;
        let (_, n) = decode(&bytes).unwrap();
        assert_eq!(n.version, VERSION_DM11);
        assert_eq!(n.ui_mode, UiMode::UserInteraction);
        assert_eq!(n.initiator, Initiator::Server);
        assert_eq!(n.session_id, 0x1234);
    }

    #[test]
    fn rejects_bad_input() {
        let bytes = hex(VECTOR);
        // Truncation anywhere before the end of the server id.
        for cut in 0..(16 + 8 + 14) {
            let e = decode(&bytes[..cut]).unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotWellFormed, "cut at {cut}");
        }
        // Unsupported versions.
        for version in [0u16, 10, 13, 1023] {
            let mut b = bytes.clone();
            b[16] = (version >> 2) as u8;
            b[17] = (b[17] & 0x3F) | (((version & 3) as u8) << 6);
            assert_eq!(decode(&b).unwrap_err().kind, ErrorKind::UnsupportedVersion);
        }
        // Length past the end.
        let mut b = bytes.clone();
        b[23] = 200;
        assert_eq!(decode(&b).unwrap_err().kind, ErrorKind::NotWellFormed);
        // Empty server id.
        let mut b = bytes.clone();
        b[23] = 0;
        assert_eq!(decode(&b).unwrap_err().kind, ErrorKind::Missing);
        // Non-UTF-8 server id.
        let mut b = bytes.clone();
        b[24] = 0xFF;
        assert_eq!(decode(&b).unwrap_err().kind, ErrorKind::InvalidValue);
        // Encoding limits.
        let long = Notification::new("x".repeat(256), 1);
        assert_eq!(
            encode(&long, "a", "b", b"").unwrap_err().kind,
            ErrorKind::InvalidValue
        );
        assert!(encode(&Notification::new("x".repeat(255), 1), "a", "b", b"").is_ok());
        assert!(encode(&Notification::new("", 1), "a", "b", b"").is_err());
    }

    fn notification() -> impl Strategy<Value = Notification> {
        (
            0u8..4,
            any::<bool>(),
            any::<u16>(),
            "[a-zA-Z0-9.:/é-]{1,60}",
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(
                |(ui, server, session_id, server_id, vendor_body)| Notification {
                    version: VERSION_DM12,
                    ui_mode: UiMode::from_bits(ui),
                    initiator: if server {
                        Initiator::Server
                    } else {
                        Initiator::Client
                    },
                    session_id,
                    server_id,
                    vendor_body,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip(
            n in notification(),
            name in "[ -~]{0,12}",
            password in "[ -~]{0,12}",
            nonce in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let bytes = encode(&n, &name, &password, &nonce).unwrap();
            let (digest, back) = decode(&bytes).unwrap();
            prop_assert_eq!(&back, &n);
            prop_assert_eq!(digest, super::digest(&name, &password, &nonce, &bytes[16..]));
            prop_assert_eq!(verify(&bytes, &name, &password, &nonce).unwrap(), n);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
            let _ = verify(&bytes, "a", "b", b"c");
        }
    }
}

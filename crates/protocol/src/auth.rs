//! SyncML DM authentication (PROTOCOL.md B.1): `syncml:auth-basic`, `syncml:auth-md5` and the
//! `x-syncml-hmac` header of `syncml:auth-MAC`. H = MD5, B64 = standard base64 with padding.
//!
//! Nonces are raw bytes: a `NextNonce` travels base64-encoded in a `Chal` ([`decode_nonce`]) and is stored
//! as `AAuthData` of the DM account. Every check compares in constant time, and no error message or `Debug`
//! output carries a password, a credential or a digest.

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use md5::{Digest, Md5};

use crate::error::{DecodeError, ErrorKind, Result};
use crate::syncml::{Cred, Meta};

/// `Meta/Type` of a basic credential.
pub const AUTH_BASIC: &str = "syncml:auth-basic";
/// `Meta/Type` of an MD5 digest credential.
pub const AUTH_MD5: &str = "syncml:auth-md5";
/// `Meta/Type` announcing the `x-syncml-hmac` header.
pub const AUTH_MAC: &str = "syncml:auth-MAC";
/// `Meta/Format` of credentials.
pub const FORMAT_B64: &str = "b64";
/// The HTTP header carrying the MAC of a message.
pub const HMAC_HEADER: &str = "x-syncml-hmac";

/// Base64 decoding that accepts the value with or without padding.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// H: MD5.
pub(crate) fn md5(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

/// B64: standard base64 with padding.
pub(crate) fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// `B64(H(name:password))`, the first step of the digest, the MAC and the package #0 digest.
pub(crate) fn b64_h_name_password(name: &str, password: &str) -> String {
    let mut hasher = Md5::new();
    hasher.update(name.as_bytes());
    hasher.update(b":");
    hasher.update(password.as_bytes());
    let digest: [u8; 16] = hasher.finalize().into();
    b64(&digest)
}

/// Compares two byte strings in time independent of their contents (the lengths are not secret).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Decodes a base64 nonce (a `NextNonce`) to its bytes; padding optional.
pub fn decode_nonce(b64_nonce: &str) -> Result<Vec<u8>> {
    LENIENT.decode(b64_nonce.trim()).map_err(|_| {
        DecodeError::new(
            ErrorKind::InvalidValue,
            "NextNonce",
            "the nonce is not valid base64",
        )
    })
}

/// Encodes nonce bytes for a `NextNonce`.
pub fn encode_nonce(nonce: &[u8]) -> String {
    b64(nonce)
}

/// The `syncml:auth-basic` credential: `B64(name:password)`.
pub fn basic(name: &str, password: &str) -> String {
    b64(format!("{name}:{password}").as_bytes())
}

/// The `syncml:auth-md5` credential: `B64(H(B64(H(name:password)):nonce))`.
pub fn md5_digest(name: &str, password: &str, nonce: &[u8]) -> String {
    b64(&md5_digest_raw(name, password, nonce))
}

fn md5_digest_raw(name: &str, password: &str, nonce: &[u8]) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(b64_h_name_password(name, password).as_bytes());
    hasher.update(b":");
    hasher.update(nonce);
    hasher.finalize().into()
}

/// Checks a basic credential (the `Data` of a `Cred`) against a name and password, in constant time.
pub fn verify_basic(data: &str, name: &str, password: &str) -> bool {
    let Ok(decoded) = LENIENT.decode(data.trim()) else {
        return false;
    };
    constant_time_eq(&decoded, format!("{name}:{password}").as_bytes())
}

/// Checks an MD5 digest credential against a name, password and the nonce the verifier issued.
pub fn verify_md5(data: &str, name: &str, password: &str, nonce: &[u8]) -> bool {
    let Ok(decoded) = LENIENT.decode(data.trim()) else {
        return false;
    };
    constant_time_eq(&decoded, &md5_digest_raw(name, password, nonce))
}

/// The name in a basic credential (the text before the first `:`), to look the account up before
/// verifying. The password part is never returned.
pub fn basic_name(data: &str) -> Result<String> {
    let invalid = |reason: &str| DecodeError::new(ErrorKind::InvalidValue, "Cred/Data", reason);
    let decoded = LENIENT
        .decode(data.trim())
        .map_err(|_| invalid("the basic credential is not valid base64"))?;
    let colon = decoded
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| invalid("the basic credential has no ':' separator"))?;
    let name = decoded.get(..colon).unwrap_or_default();
    String::from_utf8(name.to_vec()).map_err(|_| invalid("the basic credential name is not UTF-8"))
}

/// The MAC of `syncml:auth-MAC`: `B64(H(B64(H(name:password)):nonce:B64(H(body))))` over the exact body
/// bytes (not RFC 2104 HMAC).
pub fn hmac_mac(name: &str, password: &str, nonce: &[u8], body: &[u8]) -> String {
    b64(&hmac_mac_raw(name, password, nonce, body))
}

fn hmac_mac_raw(name: &str, password: &str, nonce: &[u8], body: &[u8]) -> [u8; 16] {
    let mut hasher = Md5::new();
    hasher.update(b64_h_name_password(name, password).as_bytes());
    hasher.update(b":");
    hasher.update(nonce);
    hasher.update(b":");
    hasher.update(b64(&md5(body)).as_bytes());
    hasher.finalize().into()
}

/// The value of an `x-syncml-hmac` header: `algorithm=MD5, username="<name>", mac=<m>`.
/// `Debug` and serialization do not show the MAC (it is a digest of the password).
#[derive(Clone, PartialEq, Eq, serde::Serialize)]
pub struct HmacHeader {
    /// Always `MD5` (the only algorithm defined; the default when the parameter is absent).
    pub algorithm: String,
    pub username: String,
    /// The base64 MAC.
    #[serde(serialize_with = "redacted")]
    pub mac: String,
}

fn redacted<S: serde::Serializer>(_: &String, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("<redacted>")
}

impl std::fmt::Debug for HmacHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacHeader")
            .field("algorithm", &self.algorithm)
            .field("username", &self.username)
            .field("mac", &"<redacted>")
            .finish()
    }
}

impl HmacHeader {
    /// Computes the header for a body.
    pub fn compute(name: &str, password: &str, nonce: &[u8], body: &[u8]) -> Self {
        Self {
            algorithm: "MD5".to_string(),
            username: name.to_string(),
            mac: hmac_mac(name, password, nonce, body),
        }
    }

    /// Formats the header value.
    pub fn to_header_value(&self) -> String {
        let username = self.username.replace('\\', "\\\\").replace('"', "\\\"");
        format!(
            "algorithm={}, username=\"{username}\", mac={}",
            self.algorithm, self.mac
        )
    }

    /// Parses a header value: comma-separated `key=value` pairs in any order, keys case-insensitive,
    /// values quoted or not, white space around tokens ignored, unknown keys ignored. `username` and `mac`
    /// are required; `algorithm` defaults to MD5 and must be MD5.
    pub fn parse(value: &str) -> Result<Self> {
        let err = |kind, field: &str, reason: &str| {
            DecodeError::new(kind, format!("{HMAC_HEADER}/{field}"), reason)
        };
        let mut algorithm = None;
        let mut username = None;
        let mut mac = None;
        for (key, val) in parse_params(value)? {
            let slot = if key.eq_ignore_ascii_case("algorithm") {
                &mut algorithm
            } else if key.eq_ignore_ascii_case("username") {
                &mut username
            } else if key.eq_ignore_ascii_case("mac") {
                &mut mac
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(err(
                    ErrorKind::InvalidValue,
                    &key.to_ascii_lowercase(),
                    "the parameter is repeated",
                ));
            }
            *slot = Some(val);
        }
        let algorithm = algorithm.unwrap_or_else(|| "MD5".to_string());
        if !algorithm.eq_ignore_ascii_case("MD5") {
            return Err(err(
                ErrorKind::InvalidValue,
                "algorithm",
                "only the MD5 algorithm is supported",
            ));
        }
        let username =
            username.ok_or_else(|| err(ErrorKind::Missing, "username", "username is missing"))?;
        let mac = mac.ok_or_else(|| err(ErrorKind::Missing, "mac", "mac is missing"))?;
        if mac.is_empty() || LENIENT.decode(&mac).is_err() {
            return Err(err(
                ErrorKind::InvalidValue,
                "mac",
                "the mac is not valid base64",
            ));
        }
        Ok(Self {
            algorithm,
            username,
            mac,
        })
    }

    /// Checks the header against the expected name, the password, the nonce and the exact body bytes.
    /// A different user name or MAC is [`ErrorKind::BadDigest`].
    pub fn verify(&self, name: &str, password: &str, nonce: &[u8], body: &[u8]) -> Result<()> {
        let bad = || {
            DecodeError::new(
                ErrorKind::BadDigest,
                format!("{HMAC_HEADER}/mac"),
                "the MAC does not verify",
            )
        };
        let mac = LENIENT.decode(&self.mac).map_err(|_| bad())?;
        let name_ok = constant_time_eq(self.username.as_bytes(), name.as_bytes());
        let mac_ok = constant_time_eq(&mac, &hmac_mac_raw(name, password, nonce, body));
        if name_ok && mac_ok {
            Ok(())
        } else {
            Err(bad())
        }
    }
}

impl std::fmt::Display for HmacHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_header_value())
    }
}

/// Splits `k=v, k="v", …` into pairs. Quoted values may contain commas and `\"`.
fn parse_params(value: &str) -> Result<Vec<(String, String)>> {
    let malformed = |reason: &str| DecodeError::new(ErrorKind::InvalidValue, HMAC_HEADER, reason);
    let mut pairs = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') || key.is_empty() {
            return Err(malformed("expected key=value parameters"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some(escaped) => val.push(escaped),
                        None => break,
                    },
                    other => val.push(other),
                }
            }
            if !closed {
                return Err(malformed("unterminated quoted value"));
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            match chars.peek() {
                None | Some(',') => {}
                Some(_) => return Err(malformed("unexpected text after a quoted value")),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
            let trimmed = val.trim_end();
            if trimmed.is_empty() {
                return Err(malformed("empty parameter value"));
            }
            if trimmed.chars().any(char::is_whitespace) {
                return Err(malformed("white space inside an unquoted value"));
            }
            val = trimmed.to_string();
        }
        pairs.push((key, val));
    }
    Ok(pairs)
}

/// The authentication scheme of a `Cred`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthScheme {
    Basic,
    Md5,
}

impl AuthScheme {
    /// The scheme named by a `Meta/Type` (case-insensitive).
    pub fn from_meta_type(type_: &str) -> Option<Self> {
        let type_ = type_.trim();
        if type_.eq_ignore_ascii_case(AUTH_BASIC) {
            Some(AuthScheme::Basic)
        } else if type_.eq_ignore_ascii_case(AUTH_MD5) {
            Some(AuthScheme::Md5)
        } else {
            None
        }
    }

    pub fn meta_type(self) -> &'static str {
        match self {
            AuthScheme::Basic => AUTH_BASIC,
            AuthScheme::Md5 => AUTH_MD5,
        }
    }
}

/// A `syncml:auth-basic` `Cred` (format b64).
pub fn cred_basic(name: &str, password: &str) -> Cred {
    Cred {
        meta: Meta::format_type(FORMAT_B64, AUTH_BASIC),
        data: basic(name, password),
    }
}

/// A `syncml:auth-md5` `Cred` (format b64) over the nonce the peer gave.
pub fn cred_md5(name: &str, password: &str, nonce: &[u8]) -> Cred {
    Cred {
        meta: Meta::format_type(FORMAT_B64, AUTH_MD5),
        data: md5_digest(name, password, nonce),
    }
}

/// Verifies a `Cred` (`syncml:auth-basic` or `syncml:auth-md5`, format `b64` or absent) against a name,
/// password and the nonce the verifier issued (unused for basic). Returns the scheme that verified.
///
/// Errors: no `Type` is [`ErrorKind::Missing`]; another type or format is [`ErrorKind::InvalidValue`]
/// (answer 401 with a `Chal` naming the scheme wanted); a credential that does not match is
/// [`ErrorKind::BadDigest`]. A policy that refuses basic is the caller's business.
pub fn verify_cred(cred: &Cred, name: &str, password: &str, nonce: &[u8]) -> Result<AuthScheme> {
    let type_ = cred.meta.type_.as_deref().ok_or_else(|| {
        DecodeError::new(ErrorKind::Missing, "Cred/Meta/Type", "no credential type")
    })?;
    let scheme = AuthScheme::from_meta_type(type_).ok_or_else(|| {
        DecodeError::new(
            ErrorKind::InvalidValue,
            "Cred/Meta/Type",
            "unsupported credential type (expected syncml:auth-basic or syncml:auth-md5)",
        )
    })?;
    if let Some(format) = cred.meta.format.as_deref()
        && !format.trim().eq_ignore_ascii_case(FORMAT_B64)
    {
        return Err(DecodeError::new(
            ErrorKind::InvalidValue,
            "Cred/Meta/Format",
            "credential format must be b64",
        ));
    }
    let ok = match scheme {
        AuthScheme::Basic => verify_basic(&cred.data, name, password),
        AuthScheme::Md5 => verify_md5(&cred.data, name, password, nonce),
    };
    if ok {
        Ok(scheme)
    } else {
        Err(DecodeError::new(
            ErrorKind::BadDigest,
            "Cred/Data",
            "the credential does not verify",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NAME: &str = "dmclient";
    const PASSWORD: &str = "secret";
    const NONCE: [u8; 4] = [0, 1, 2, 3];
    const BODY: &[u8] = b"<SyncML>hello</SyncML>";

    // Expected values computed independently with Python's hashlib and base64 modules:
    //   B(H(B(H(b"dmclient:secret")) + b":" + bytes([0,1,2,3])))
    const BASIC: &str = "ZG1jbGllbnQ6c2VjcmV0";
    const MD5: &str = "1+yaRJkMyZGKyHCH5gvBTw==";
    const MAC: &str = "PG1afFPZAMcIV2g/9YqaGA==";

    #[test]
    fn known_vectors() {
        assert_eq!(basic(NAME, PASSWORD), BASIC);
        assert_eq!(md5_digest(NAME, PASSWORD, &NONCE), MD5);
        assert_eq!(hmac_mac(NAME, PASSWORD, &NONCE, BODY), MAC);
    }

    #[test]
    fn md5_digest_step_by_step() {
        // The same formula spelled out with the crates, to guard the helper's composition.
        let inner = STANDARD.encode(Md5::digest(b"alice:pw"));
        let mut outer = inner.into_bytes();
        outer.extend_from_slice(b":");
        outer.extend_from_slice(b"nonce");
        let expected = STANDARD.encode(Md5::digest(&outer));
        assert_eq!(md5_digest("alice", "pw", b"nonce"), expected);
        assert!(verify_md5(&expected, "alice", "pw", b"nonce"));
        assert!(!verify_md5(&expected, "alice", "pw", b"other"));
        assert!(!verify_md5("not base64!", "alice", "pw", b"nonce"));
    }

    #[test]
    fn verify_basic_and_md5() {
        assert!(verify_basic(BASIC, NAME, PASSWORD));
        assert!(verify_basic("ZG1jbGllbnQ6c2VjcmV0", NAME, PASSWORD));
        assert!(!verify_basic(BASIC, NAME, "Secret"));
        assert!(!verify_basic("%%%", NAME, PASSWORD));
        assert!(verify_md5(MD5, NAME, PASSWORD, &NONCE));
        assert!(verify_md5("1+yaRJkMyZGKyHCH5gvBTw", NAME, PASSWORD, &NONCE));
        assert!(!verify_md5(MD5, NAME, PASSWORD, &[0, 1, 2]));
        assert_eq!(basic_name(BASIC).unwrap(), NAME);
        assert!(basic_name("bm9jb2xvbg==").is_err()); // "nocolon"
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn nonce_round_trip() {
        assert_eq!(decode_nonce("AAECAw==").unwrap(), NONCE);
        assert_eq!(decode_nonce("AAECAw").unwrap(), NONCE);
        assert_eq!(encode_nonce(&NONCE), "AAECAw==");
        assert_eq!(
            decode_nonce("!!").unwrap_err().kind,
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn hmac_header_format_parse_verify() {
        let header = HmacHeader::compute(NAME, PASSWORD, &NONCE, BODY);
        let value = header.to_header_value();
        assert_eq!(
            value,
            format!("algorithm=MD5, username=\"{NAME}\", mac={MAC}")
        );
        let parsed = HmacHeader::parse(&value).unwrap();
        assert_eq!(parsed, header);
        parsed.verify(NAME, PASSWORD, &NONCE, BODY).unwrap();
        let e = parsed
            .verify(NAME, PASSWORD, &NONCE, b"<SyncML>hellO</SyncML>")
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadDigest);
        assert!(!e.to_string().contains(MAC));
        assert_eq!(
            parsed
                .verify("other", PASSWORD, &NONCE, BODY)
                .unwrap_err()
                .kind,
            ErrorKind::BadDigest
        );
        assert_eq!(
            parsed.verify(NAME, "wrong", &NONCE, BODY).unwrap_err().kind,
            ErrorKind::BadDigest
        );
    }

    #[test]
    fn hmac_header_parse_is_tolerant() {
        for value in [
            format!("mac={MAC},username=\"{NAME}\",algorithm=MD5"),
            format!("  Username = {NAME} ,  MAC = \"{MAC}\"  "),
            format!("algorithm=md5, username=\"{NAME}\", mac={MAC}, extra=\"a, b\""),
        ] {
            let parsed = HmacHeader::parse(&value).unwrap();
            assert_eq!(parsed.username, NAME, "{value}");
            assert_eq!(parsed.mac, MAC, "{value}");
            parsed.verify(NAME, PASSWORD, &NONCE, BODY).unwrap();
        }
        let quoted = HmacHeader {
            algorithm: "MD5".into(),
            username: "we\"ird, name".into(),
            mac: MAC.into(),
        };
        assert_eq!(
            HmacHeader::parse(&quoted.to_header_value()).unwrap(),
            quoted
        );
    }

    #[test]
    fn hmac_header_parse_errors() {
        let cases = [
            ("", ErrorKind::Missing),
            ("username=\"a\"", ErrorKind::Missing),
            (&format!("mac={MAC}") as &str, ErrorKind::Missing),
            (
                "algorithm=SHA1, username=a, mac=AAAA",
                ErrorKind::InvalidValue,
            ),
            ("username=a, mac=not base64!", ErrorKind::InvalidValue),
            ("username=a, mac=", ErrorKind::InvalidValue),
            ("username=\"a, mac=AAAA", ErrorKind::InvalidValue),
            ("username", ErrorKind::InvalidValue),
            ("=x", ErrorKind::InvalidValue),
            ("username=a, username=b, mac=AAAA", ErrorKind::InvalidValue),
            ("username=\"a\"x, mac=AAAA", ErrorKind::InvalidValue),
        ];
        for (value, kind) in cases {
            assert_eq!(
                HmacHeader::parse(value).unwrap_err().kind,
                kind,
                "{value:?}"
            );
        }
    }

    #[test]
    fn cred_helpers() {
        let cred = cred_basic(NAME, PASSWORD);
        assert_eq!(
            verify_cred(&cred, NAME, PASSWORD, &[]).unwrap(),
            AuthScheme::Basic
        );
        let cred = cred_md5(NAME, PASSWORD, &NONCE);
        assert_eq!(cred.data, MD5);
        assert_eq!(
            verify_cred(&cred, NAME, PASSWORD, &NONCE).unwrap(),
            AuthScheme::Md5
        );
        let e = verify_cred(&cred, NAME, PASSWORD, &[9]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadDigest);
        assert_eq!(e.status(), 401);
        assert!(!e.to_string().contains(MD5));

        // Types compare case-insensitively, the format may be absent.
        let mut cred = cred_md5(NAME, PASSWORD, &NONCE);
        cred.meta.type_ = Some("SYNCML:AUTH-MD5".into());
        cred.meta.format = None;
        assert!(verify_cred(&cred, NAME, PASSWORD, &NONCE).is_ok());

        cred.meta.format = Some("bin".into());
        assert_eq!(
            verify_cred(&cred, NAME, PASSWORD, &NONCE).unwrap_err().kind,
            ErrorKind::InvalidValue
        );
        cred.meta = Meta::format_type("b64", AUTH_MAC);
        assert_eq!(
            verify_cred(&cred, NAME, PASSWORD, &NONCE).unwrap_err().kind,
            ErrorKind::InvalidValue
        );
        cred.meta = Meta::default();
        assert_eq!(
            verify_cred(&cred, NAME, PASSWORD, &NONCE).unwrap_err().kind,
            ErrorKind::Missing
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn computed_credentials_verify(
            name in "[ -~]{0,16}",
            password in "[ -~]{0,16}",
            nonce in proptest::collection::vec(any::<u8>(), 0..16),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assert!(verify_basic(&basic(&name, &password), &name, &password));
            prop_assert!(verify_md5(&md5_digest(&name, &password, &nonce), &name, &password, &nonce));
            let header = HmacHeader::compute(&name, &password, &nonce, &body);
            let parsed = HmacHeader::parse(&header.to_header_value());
            prop_assert_eq!(parsed.as_ref().ok(), Some(&header));
            prop_assert!(header.verify(&name, &password, &nonce, &body).is_ok());
        }

        #[test]
        fn header_parse_never_panics(value in "\\PC{0,64}") {
            let _ = HmacHeader::parse(&value);
        }
    }
}

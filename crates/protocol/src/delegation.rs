//! The server-to-server delegation messages (PROTOCOL.md Part A, A.3 and A.4).
//!
//! [`decode`] enforces the whole lexical contract: UTF-8, no DTD, only predefined entities, depth and size
//! limits, namespaces by URI (any prefix), envelope and message elements in their fixed order, enum values,
//! UUIDs, RFC 3339 UTC times, scope rules and the per-type rules (e.g. `NotAfter` exactly for Temporary).
//! Every rejection is a [`DecodeError`] naming the field, the reason and the status code to answer.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use crate::acl::Acl;
use crate::error::{DecodeError, ErrorKind, Result};
use crate::tnds::{MgmtTree, TNDS_NS, TreeReader};
use crate::types::{DmUri, UtcTime, Uuid};
use crate::xml::{DoctypePolicy, Ns, XmlReader, XmlWriter};

/// The namespace of delegation messages.
pub const NAMESPACE: &str = "urn:oma:xml:dm:delegation:1.0";
/// The IANA media type of delegation messages.
pub const CONTENT_TYPE: &str = "application/vnd.dm.delegation+xml";
/// The protocol version this implementation writes.
pub const VERSION: Version = Version { major: 1, minor: 0 };

const NAMESPACES: &[&str] = &[NAMESPACE, TNDS_NS];
const D: Ns = Ns::Known(0);

/// Every element name of the delegation namespace: in a message of a higher minor version, elements
/// outside this list are skipped; in a 1.0 message they are a 400.
const VOCABULARY: &[&str] = &[
    "DelegationMessage",
    "MsgID",
    "SessionID",
    "DMServerID",
    "Timestamp",
    "DELEGATION_NOTIF",
    "DELEGATION_RES",
    "DELEGATION_START",
    "DELEGATION_PREPARED",
    "DELEGATION_CONFIRM",
    "DELEGATION_FAILURE",
    "DELEGATION_REVOKE",
    "DELEGATION_RELEASE",
    "Del_Type",
    "Del_Info",
    "SenderRole",
    "Client",
    "DevID",
    "Man",
    "Mod",
    "Scope",
    "URI",
    "NotAfter",
    "Result",
    "StatusCode",
    "Reason",
    "DMAcc",
    "AccountURI",
    "TEMP_DELEGATION_KEY",
    "ServerCred",
    "AAuthName",
    "AAuthType",
    "Nonce",
    "ACLResults",
    "ACL",
    "Value",
    "SessionEstablished",
    "Step",
];

/// Size and nesting limits (A.2, A.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted body in bytes; larger is a 413.
    pub max_bytes: usize,
    /// Deepest accepted nesting; the root counts as 1 and the embedded `MgmtTree` counts.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
            max_depth: 32,
        }
    }
}

/// The `Version` attribute: major 1 is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for Version {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "must be <major>.<minor>, e.g. 1.0";
        let (major, minor) = s.split_once('.').ok_or(FORM)?;
        // A number too large for u16 is still a number: `1.99999` is a higher minor version.
        let number = |p: &str| -> Result<u16, &'static str> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FORM);
            }
            Ok(p.parse().unwrap_or(u16::MAX))
        };
        Ok(Self {
            major: number(major)?,
            minor: number(minor)?,
        })
    }
}

/// One delegation message: the envelope and exactly one message element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub version: Version,
    /// Unique per message; the dedupe key.
    pub msg_id: Uuid,
    /// Names the delegation process in every message of both sides.
    pub session_id: Uuid,
    /// The sender's ServerID.
    pub dm_server_id: String,
    pub timestamp: UtcTime,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "message")]
pub enum Body {
    #[serde(rename = "DELEGATION_NOTIF")]
    Notif(Notif),
    #[serde(rename = "DELEGATION_RES")]
    Res(Res),
    #[serde(rename = "DELEGATION_START")]
    Start(Start),
    #[serde(rename = "DELEGATION_PREPARED")]
    Prepared(Prepared),
    #[serde(rename = "DELEGATION_CONFIRM")]
    Confirm(Confirm),
    #[serde(rename = "DELEGATION_FAILURE")]
    Failure(Failure),
    #[serde(rename = "DELEGATION_REVOKE")]
    Revoke(Revoke),
    #[serde(rename = "DELEGATION_RELEASE")]
    Release,
}

impl Body {
    /// The message element's name, e.g. `DELEGATION_NOTIF`.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Notif(_) => "DELEGATION_NOTIF",
            Body::Res(_) => "DELEGATION_RES",
            Body::Start(_) => "DELEGATION_START",
            Body::Prepared(_) => "DELEGATION_PREPARED",
            Body::Confirm(_) => "DELEGATION_CONFIRM",
            Body::Failure(_) => "DELEGATION_FAILURE",
            Body::Revoke(_) => "DELEGATION_REVOKE",
            Body::Release => "DELEGATION_RELEASE",
        }
    }
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "'{s}' is not one of {}",
                        [$($text),+].join(" | ")
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// The four delegation types (A.1).
    DelType { Partial = "Partial", Full = "Full", Final = "Final", Temporary = "Temporary" }
);
text_enum!(
    /// The sender's role in a DELEGATION_NOTIF.
    Role { Delegating = "Delegating", Delegated = "Delegated" }
);
text_enum!(
    /// The answer in a DELEGATION_RES.
    Answer { Ack = "ack", Nack = "nack" }
);
text_enum!(
    /// Why a DELEGATION_REVOKE was sent.
    RevokeReason { Revoked = "revoked", Expired = "expired", Released = "released" }
);

/// The device a delegation is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Client {
    pub dev_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub man: Option<String>,
    #[serde(rename = "mod", skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notif {
    pub del_type: DelType,
    pub sender_role: Role,
    pub client: Client,
    /// The delegated sub-trees (`S`); validated per A.4.
    pub scope: Vec<DmUri>,
    /// Required for Temporary, absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<UtcTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Res {
    pub result: Answer,
    /// Required with nack (400-599), absent with ack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// DELEGATION_START: DMS-2's DM Account as TNDS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Start {
    pub dm_acc: MgmtTree,
}

/// The temporary delegation key: exactly 32 random bytes, written as padded standard base64.
/// Its `Debug` and serialized forms never show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TempDelegationKey([u8; 32]);

impl TempDelegationKey {
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key bytes. Call sites that need them are few and explicit.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// The base64 text as it travels and as it is stored on the client as `AAuthSecret` (A.4).
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
}

impl FromStr for TempDelegationKey {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = B64
            .decode(s)
            .map_err(|_| "must be padded standard base64")?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "must encode exactly 32 bytes")?;
        Ok(Self(key))
    }
}

impl fmt::Debug for TempDelegationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TempDelegationKey(<redacted>)")
    }
}

impl Serialize for TempDelegationKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// What DMS-2 needs for step 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerCred {
    pub aauth_name: String,
    pub aauth_type: String,
    /// The server nonce stored on the client, decoded from base64.
    #[serde(serialize_with = "as_base64")]
    pub nonce: Vec<u8>,
}

fn as_base64<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&B64.encode(bytes))
}

/// One ACL changed on the client, as it is after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AclResult {
    pub uri: DmUri,
    #[serde(serialize_with = "acl_as_text")]
    pub value: Acl,
}

fn acl_as_text<S: serde::Serializer>(acl: &Acl, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(acl)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prepared {
    pub del_type: DelType,
    /// Where DMS-2's account was created: `./DMAcc/<x>`.
    pub account_uri: DmUri,
    pub temp_delegation_key: TempDelegationKey,
    pub server_cred: ServerCred,
    pub acl_results: Vec<AclResult>,
    /// Temporary only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<UtcTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Confirm {
    pub session_established: UtcTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// A DM status code, 400-599.
    pub status_code: u16,
    /// The step (1-9) that failed or was being waited for.
    pub step: u8,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revoke {
    pub reason: RevokeReason,
}

/// The body of an error answer (`<DelegationError>`), in the delegation namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DelegationError {
    pub status_code: u16,
    pub reason: String,
}

impl DelegationError {
    /// The error answer for a rejected document.
    pub fn from_decode_error(e: &DecodeError) -> Self {
        Self {
            status_code: e.status(),
            reason: format!("{}: {}", e.field, e.reason),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

fn input_text<'a>(input: &'a [u8], limits: &Limits) -> Result<&'a str> {
    if input.len() > limits.max_bytes {
        return Err(DecodeError::new(
            ErrorKind::TooLarge,
            "",
            format!(
                "body of {} bytes is larger than the limit of {} bytes",
                input.len(),
                limits.max_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(input).map_err(|e| {
        DecodeError::new(
            ErrorKind::NotWellFormed,
            "",
            "the document is not valid UTF-8",
        )
        .at(e.valid_up_to() as u64)
    })?;
    // The XML reader skips one byte-order mark.
    Ok(text)
}

/// Reads a text element and parses it, naming the element on failure.
fn parse_element<T, E: fmt::Display>(
    r: &mut XmlReader<'_>,
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T> {
    let text = r.text_element(D, name)?;
    // Back at the parent: the child's path is built only when there is an error to report.
    parse(&text).map_err(|e| {
        r.error_at(
            ErrorKind::InvalidValue,
            r.child_path(name),
            format!("{name} {e}"),
        )
    })
}

fn parse_opt_element<T, E: fmt::Display>(
    r: &mut XmlReader<'_>,
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>> {
    match r.peek()? {
        Some((ns, found)) if found == name && ns == D => parse_element(r, name, parse).map(Some),
        _ => Ok(None),
    }
}

fn non_empty(s: &str) -> Result<String, &'static str> {
    if s.is_empty() {
        Err("must not be empty")
    } else {
        Ok(s.to_string())
    }
}

/// A ServerID must be usable in an ACL (B.3): printable, no white space, none of `= & * +`.
fn server_id(s: &str) -> Result<String, &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '&' | '*' | '+'))
    {
        return Err("must be usable as an ACL server name (no white space, '=', '&', '*' or '+')");
    }
    Ok(s.to_string())
}

fn status_code(s: &str) -> Result<u16, &'static str> {
    match s.parse::<u16>() {
        Ok(code) if (400..=599).contains(&code) && s.len() == 3 => Ok(code),
        _ => Err("must be a status code from 400 to 599"),
    }
}

fn uuid(s: &str) -> Result<Uuid, &'static str> {
    s.parse()
}

fn utc(s: &str) -> Result<UtcTime, &'static str> {
    s.parse()
}

/// Where a refused root element was, for the error reason.
fn namespace_of(ns: Ns) -> &'static str {
    match ns {
        Ns::None => "in no namespace",
        Ns::Known(1) => "in the TNDS namespace",
        Ns::Known(_) => "in the delegation namespace",
        Ns::Other => "in another namespace",
    }
}

/// Decodes a delegation message with the default limits (64 KiB, depth 32).
pub fn decode(input: &[u8]) -> Result<Message> {
    decode_with_limits(input, &Limits::default())
}

pub fn decode_with_limits(input: &[u8], limits: &Limits) -> Result<Message> {
    let text = input_text(input, limits)?;
    let mut r = XmlReader::new(text, NAMESPACES, DoctypePolicy::Refuse, limits.max_depth);
    let root = r.root()?;
    if root.name != "DelegationMessage" || root.ns != D {
        return Err(r.error(
            ErrorKind::Unexpected,
            format!(
                "root element must be <DelegationMessage> in namespace {NAMESPACE}, not <{}> {}",
                root.name,
                namespace_of(root.ns)
            ),
        ));
    }
    let version = root_version(&r, &root.attrs)?;
    if version.minor > VERSION.minor {
        r.skip_unknown = Some((0, VOCABULARY));
    } else {
        // The 1.0 vocabulary has no attribute below the root.
        r.refuse_plain_attributes = Some(0);
    }
    let msg_id = parse_element(&mut r, "MsgID", uuid)?;
    let session_id = parse_element(&mut r, "SessionID", uuid)?;
    let dm_server_id = parse_element(&mut r, "DMServerID", server_id)?;
    let timestamp = parse_element(&mut r, "Timestamp", utc)?;
    let body = read_body(&mut r)?;
    r.close()?;
    r.finish()?;
    let message = Message {
        version,
        msg_id,
        session_id,
        dm_server_id,
        timestamp,
        body,
    };
    check_message(&message)?;
    Ok(message)
}

fn root_version(r: &XmlReader<'_>, attrs: &[crate::xml::Attr]) -> Result<Version> {
    let field = "DelegationMessage/@Version";
    let mut version = None;
    for attr in attrs {
        match (attr.ns, attr.name.as_str()) {
            (Ns::None, "Version") => version = Some(crate::xml::trim_xml(&attr.value)),
            (Ns::None, other) => {
                return Err(r.error_at(
                    ErrorKind::Unexpected,
                    format!("DelegationMessage/@{other}"),
                    format!("attribute '{other}' is not allowed"),
                ));
            }
            // Attributes of other vocabularies (e.g. xsi:schemaLocation) do not change the meaning.
            _ => {}
        }
    }
    let text = version.ok_or_else(|| {
        r.error_at(
            ErrorKind::Missing,
            field.to_string(),
            "required attribute Version is missing",
        )
    })?;
    let version: Version = text.parse().map_err(|e: &str| {
        r.error_at(
            ErrorKind::InvalidValue,
            field.to_string(),
            format!("Version {e}"),
        )
    })?;
    if version.major != VERSION.major {
        return Err(r.error_at(
            ErrorKind::UnsupportedVersion,
            field.to_string(),
            format!("Version {version} is not supported: major version 1 is required"),
        ));
    }
    Ok(version)
}

fn read_body(r: &mut XmlReader<'_>) -> Result<Body> {
    let Some((ns, name)) = r.peek()? else {
        return Err(r.error_at(
            ErrorKind::Missing,
            r.child_path("DELEGATION_*"),
            "the message element (DELEGATION_NOTIF, DELEGATION_RES, …) is missing",
        ));
    };
    if ns != D {
        return Err(r.error_at(
            ErrorKind::Unexpected,
            r.child_path(name),
            format!("element <{name}> is not a delegation message"),
        ));
    }
    let body = match name {
        "DELEGATION_NOTIF" => {
            r.open(D, name)?;
            Body::Notif(read_notif(r)?)
        }
        "DELEGATION_RES" => {
            r.open(D, name)?;
            Body::Res(read_res(r)?)
        }
        "DELEGATION_START" => {
            r.open(D, name)?;
            Body::Start(read_start(r)?)
        }
        "DELEGATION_PREPARED" => {
            r.open(D, name)?;
            Body::Prepared(read_prepared(r)?)
        }
        "DELEGATION_CONFIRM" => {
            r.open(D, name)?;
            Body::Confirm(Confirm {
                session_established: parse_element(r, "SessionEstablished", utc)?,
            })
        }
        "DELEGATION_FAILURE" => {
            r.open(D, name)?;
            Body::Failure(Failure {
                status_code: parse_element(r, "StatusCode", status_code)?,
                step: parse_element(r, "Step", |s| match s.parse::<u8>() {
                    Ok(step) if (1..=9).contains(&step) && s.len() == 1 => Ok(step),
                    _ => Err("must be a step number from 1 to 9"),
                })?,
                reason: r.text_element(D, "Reason")?.into_owned(),
            })
        }
        "DELEGATION_REVOKE" => {
            r.open(D, name)?;
            Body::Revoke(Revoke {
                reason: parse_element(r, "Reason", str::parse)?,
            })
        }
        "DELEGATION_RELEASE" => {
            r.open(D, name)?;
            Body::Release
        }
        other => {
            return Err(r.error_at(
                ErrorKind::Unexpected,
                r.child_path(other),
                format!("<{other}> is not a delegation message"),
            ));
        }
    };
    r.close()?;
    Ok(body)
}

fn read_notif(r: &mut XmlReader<'_>) -> Result<Notif> {
    let del_type = parse_element(r, "Del_Type", str::parse)?;
    r.open(D, "Del_Info")?;
    let sender_role = parse_element(r, "SenderRole", str::parse)?;
    r.open(D, "Client")?;
    let client = Client {
        dev_id: parse_element(r, "DevID", non_empty)?,
        man: r.opt_text_element(D, "Man")?.map(|s| s.into_owned()),
        model: r.opt_text_element(D, "Mod")?.map(|s| s.into_owned()),
    };
    r.close()?;
    r.open(D, "Scope")?;
    let mut scope = vec![parse_element(r, "URI", DmUri::from_str)?];
    while let Some(uri) = parse_opt_element(r, "URI", DmUri::from_str)? {
        scope.push(uri);
    }
    r.close()?;
    let not_after = parse_opt_element(r, "NotAfter", utc)?;
    r.close()?;
    Ok(Notif {
        del_type,
        sender_role,
        client,
        scope,
        not_after,
    })
}

fn read_res(r: &mut XmlReader<'_>) -> Result<Res> {
    Ok(Res {
        result: parse_element(r, "Result", str::parse)?,
        status_code: parse_opt_element(r, "StatusCode", status_code)?,
        reason: r.opt_text_element(D, "Reason")?.map(|s| s.into_owned()),
    })
}

fn read_start(r: &mut XmlReader<'_>) -> Result<Start> {
    r.open(D, "DMAcc")?;
    let tnds = Ns::Known(1);
    match r.peek()? {
        Some((ns, "MgmtTree")) if ns == tnds => {
            r.next_start()?;
        }
        Some((_, "MgmtTree")) => {
            return Err(r.error_at(
                ErrorKind::Unexpected,
                r.child_path("MgmtTree"),
                format!("<MgmtTree> must be in the TNDS namespace {TNDS_NS}"),
            ));
        }
        _ => {
            return Err(r.error_at(
                ErrorKind::Missing,
                r.child_path("MgmtTree"),
                "DMAcc must hold the DM Account as a TNDS <MgmtTree>",
            ));
        }
    }
    let dm_acc = TreeReader {
        ns: 1,
        allow_no_namespace: false,
    }
    .read_tree(r)?;
    r.close()?;
    Ok(Start { dm_acc })
}

fn base64_bytes(s: &str) -> Result<Vec<u8>, &'static str> {
    B64.decode(s).map_err(|_| "must be padded standard base64")
}

fn read_prepared(r: &mut XmlReader<'_>) -> Result<Prepared> {
    let del_type = parse_element(r, "Del_Type", str::parse)?;
    let account_uri = parse_element(r, "AccountURI", |s| {
        let uri = DmUri::from_str(s)?;
        let segments: Vec<&str> = uri.segments().collect();
        if matches!(segments.as_slice(), ["DMAcc", _]) {
            Ok(uri)
        } else {
            Err("must be an account under ./DMAcc, e.g. ./DMAcc/dms2")
        }
    })?;
    let temp_delegation_key = parse_element(r, "TEMP_DELEGATION_KEY", TempDelegationKey::from_str)?;
    r.open(D, "ServerCred")?;
    let server_cred = ServerCred {
        aauth_name: parse_element(r, "AAuthName", server_id)?,
        aauth_type: parse_element(r, "AAuthType", non_empty)?,
        nonce: parse_element(r, "Nonce", base64_bytes)?,
    };
    r.close()?;
    r.open(D, "ACLResults")?;
    let mut acl_results = Vec::new();
    while r.open_if(D, "ACL")?.is_some() {
        let uri = parse_element(r, "URI", DmUri::from_str)?;
        let value = parse_element(r, "Value", Acl::from_str)?;
        if uri.is_root() && value.is_empty() {
            return Err(r.error_at(
                ErrorKind::InvalidValue,
                r.child_path("Value"),
                "the root's ACL always has a value (B.3)",
            ));
        }
        r.close()?;
        acl_results.push(AclResult { uri, value });
    }
    r.close()?;
    let not_after = parse_opt_element(r, "NotAfter", utc)?;
    Ok(Prepared {
        del_type,
        account_uri,
        temp_delegation_key,
        server_cred,
        acl_results,
        not_after,
    })
}

/// The rules that span several fields (A.1, A.4).
fn check_message(m: &Message) -> Result<()> {
    let base = format!("DelegationMessage/{}", m.body.name());
    let invalid = |field: &str, reason: String| {
        Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!("{base}/{field}"),
            reason,
        ))
    };
    match &m.body {
        Body::Notif(n) => {
            check_not_after(
                n.del_type,
                n.not_after.is_some(),
                &format!("{base}/Del_Info"),
            )?;
            if let Err(reason) = check_scope(n.del_type, &n.scope) {
                return invalid("Del_Info/Scope", reason);
            }
        }
        Body::Res(res) => match (res.result, res.status_code) {
            (Answer::Nack, None) => {
                return Err(DecodeError::new(
                    ErrorKind::Missing,
                    format!("{base}/StatusCode"),
                    "StatusCode is required with nack",
                ));
            }
            (Answer::Ack, Some(_)) => {
                return invalid("StatusCode", "StatusCode must be absent with ack".into());
            }
            _ => {}
        },
        Body::Prepared(p) => {
            check_not_after(p.del_type, p.not_after.is_some(), &base)?;
        }
        Body::Start(start) => check_start_account(&m.dm_server_id, start, &base)?,
        Body::Confirm(_) | Body::Failure(_) | Body::Revoke(_) | Body::Release => {}
    }
    Ok(())
}

fn check_not_after(del_type: DelType, present: bool, parent: &str) -> Result<()> {
    match (del_type, present) {
        (DelType::Temporary, false) => Err(DecodeError::new(
            ErrorKind::Missing,
            format!("{parent}/NotAfter"),
            "NotAfter is required for a Temporary delegation",
        )),
        (DelType::Partial | DelType::Full | DelType::Final, true) => Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!("{parent}/NotAfter"),
            format!("NotAfter is allowed only for Temporary, not for {del_type}"),
        )),
        _ => Ok(()),
    }
}

/// Scope rules of A.4. Returns the reason on failure.
pub fn check_scope(del_type: DelType, scope: &[DmUri]) -> Result<(), String> {
    if scope.is_empty() {
        return Err("Scope needs at least one URI".into());
    }
    for (i, uri) in scope.iter().enumerate() {
        if uri.segments().next() == Some("DMAcc") {
            return Err(format!(
                "'{uri}' is at or under ./DMAcc, which cannot be delegated"
            ));
        }
        for other in scope.iter().take(i) {
            if other == uri {
                return Err(format!("'{uri}' appears twice"));
            }
            if other.contains(uri) || uri.contains(other) {
                return Err(format!(
                    "'{uri}' and '{other}' overlap: no URI may lie under another"
                ));
            }
        }
    }
    let whole_tree = scope.iter().any(DmUri::is_root);
    match del_type {
        DelType::Full if !(whole_tree && scope.len() == 1) => {
            Err("a Full delegation's scope is exactly '.'".into())
        }
        DelType::Partial if whole_tree => Err("a Partial delegation's scope is never '.'".into()),
        _ => Ok(()),
    }
}

fn check_start_account(sender: &str, start: &Start, base: &str) -> Result<()> {
    let account = crate::dmacc::DmAccount::from_tnds(&start.dm_acc).map_err(|mut e| {
        e.field = format!("{base}/{}", e.field);
        e
    })?;
    if account.server_id != sender {
        return Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!("{base}/DMAcc"),
            format!(
                "the account's ServerID '{}' is not the sender's DMServerID '{sender}'",
                account.server_id
            ),
        ));
    }
    Ok(())
}

/// Decodes a `<DelegationError>` answer body.
pub fn decode_error(input: &[u8]) -> Result<DelegationError> {
    let limits = Limits::default();
    let text = input_text(input, &limits)?;
    let mut r = XmlReader::new(text, NAMESPACES, DoctypePolicy::Refuse, limits.max_depth);
    let root = r.root()?;
    if root.name != "DelegationError" || root.ns != D {
        return Err(r.error(
            ErrorKind::Unexpected,
            format!(
                "root element must be <DelegationError> in namespace {NAMESPACE}, not <{}> {}",
                root.name,
                namespace_of(root.ns)
            ),
        ));
    }
    let status_code = parse_element(&mut r, "StatusCode", status_code)?;
    let reason = r.text_element(D, "Reason")?.into_owned();
    r.close()?;
    r.finish()?;
    Ok(DelegationError {
        status_code,
        reason,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Encodes a message as UTF-8 XML in the default namespace.
pub fn encode(m: &Message) -> String {
    let mut w = XmlWriter::new();
    let version = m.version.to_string();
    w.start_with(
        "DelegationMessage",
        &[("xmlns", NAMESPACE), ("Version", &version)],
    );
    w.text_element("MsgID", &m.msg_id.to_string());
    w.text_element("SessionID", &m.session_id.to_string());
    w.text_element("DMServerID", &m.dm_server_id);
    w.text_element("Timestamp", &m.timestamp.to_string());
    let name = m.body.name();
    match &m.body {
        Body::Notif(n) => {
            w.start(name);
            w.text_element("Del_Type", n.del_type.as_str());
            w.start("Del_Info");
            w.text_element("SenderRole", n.sender_role.as_str());
            w.start("Client");
            w.text_element("DevID", &n.client.dev_id);
            w.opt_text_element("Man", n.client.man.as_deref());
            w.opt_text_element("Mod", n.client.model.as_deref());
            w.end("Client");
            w.start("Scope");
            for uri in &n.scope {
                w.text_element("URI", uri.as_str());
            }
            w.end("Scope");
            if let Some(t) = n.not_after {
                w.text_element("NotAfter", &t.to_string());
            }
            w.end("Del_Info");
            w.end(name);
        }
        Body::Res(res) => {
            w.start(name);
            w.text_element("Result", res.result.as_str());
            if let Some(code) = res.status_code {
                w.text_element("StatusCode", &code.to_string());
            }
            w.opt_text_element("Reason", res.reason.as_deref());
            w.end(name);
        }
        Body::Start(start) => {
            w.start(name);
            w.start("DMAcc");
            crate::tnds::write_tree(&mut w, &start.dm_acc);
            w.end("DMAcc");
            w.end(name);
        }
        Body::Prepared(p) => {
            w.start(name);
            w.text_element("Del_Type", p.del_type.as_str());
            w.text_element("AccountURI", p.account_uri.as_str());
            w.text_element("TEMP_DELEGATION_KEY", &p.temp_delegation_key.to_base64());
            w.start("ServerCred");
            w.text_element("AAuthName", &p.server_cred.aauth_name);
            w.text_element("AAuthType", &p.server_cred.aauth_type);
            w.text_element("Nonce", &B64.encode(&p.server_cred.nonce));
            w.end("ServerCred");
            w.start("ACLResults");
            for acl in &p.acl_results {
                w.start("ACL");
                w.text_element("URI", acl.uri.as_str());
                w.text_element("Value", &acl.value.to_string());
                w.end("ACL");
            }
            w.end("ACLResults");
            if let Some(t) = p.not_after {
                w.text_element("NotAfter", &t.to_string());
            }
            w.end(name);
        }
        Body::Confirm(c) => {
            w.start(name);
            w.text_element("SessionEstablished", &c.session_established.to_string());
            w.end(name);
        }
        Body::Failure(f) => {
            w.start(name);
            w.text_element("StatusCode", &f.status_code.to_string());
            w.text_element("Step", &f.step.to_string());
            w.text_element("Reason", &f.reason);
            w.end(name);
        }
        Body::Revoke(rv) => {
            w.start(name);
            w.text_element("Reason", rv.reason.as_str());
            w.end(name);
        }
        Body::Release => w.empty(name),
    }
    w.end("DelegationMessage");
    w.finish()
}

/// Encodes an error answer body.
pub fn encode_error(e: &DelegationError) -> String {
    let mut w = XmlWriter::new();
    w.start_with("DelegationError", &[("xmlns", NAMESPACE)]);
    w.text_element("StatusCode", &e.status_code.to_string());
    w.text_element("Reason", &e.reason);
    w.end("DelegationError");
    w.finish()
}

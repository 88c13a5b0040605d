//! Typed SyncML DM 1.2 messages in the XML encoding (PROTOCOL.md B.1, B.4, B.6).
//!
//! [`decode`] reads a message strictly but tolerates what deployed clients do: children in any order, a
//! `<!DOCTYPE>` with an external identifier instead of a namespace (never fetched), `Meta` children in the
//! `syncml:metinf` namespace, in no namespace or in the SyncML namespace, and `Data` as CDATA. Unknown
//! elements, repeated singletons, missing required children and non-numeric codes are errors.
//!
//! [`encode`] writes the SyncML 1.2 DTD order, `xmlns="SYNCML:SYNCML1.2"` on the root and
//! `xmlns="syncml:metinf"` on each `Meta` child, and `<Data/>` for an empty value (B.6: a real client
//! crashes on an `Add`/`Replace` item without `Data`).
//!
//! Text values are trimmed of surrounding white space when decoded, so `decode(encode(m)) == m` holds for
//! messages whose text values have none (and contain only characters XML allows).

use std::fmt;

use crate::codes::{AlertCode, StatusCode};
use crate::error::{DecodeError, ErrorKind, Result};
use crate::xml::{DoctypePolicy, Ns, XmlReader, XmlWriter};

/// The DM media type in the XML encoding.
pub const CONTENT_TYPE_XML: &str = "application/vnd.syncml.dm+xml";
/// The DM media type in the WBXML encoding.
pub const CONTENT_TYPE_WBXML: &str = "application/vnd.syncml.dm+wbxml";
/// The SyncML (DS) media type some DM clients post with (B.6).
pub const CONTENT_TYPE_DS_XML: &str = "application/vnd.syncml+xml";
/// The SyncML (DS) WBXML media type.
pub const CONTENT_TYPE_DS_WBXML: &str = "application/vnd.syncml+wbxml";

/// The SyncML 1.2 namespace written on the root.
pub const NAMESPACE: &str = "SYNCML:SYNCML1.2";
/// The meta-information namespace written on `Meta` children.
pub const METINF_NAMESPACE: &str = "syncml:metinf";

/// `VerDTD` of SyncML DM 1.2.
pub const VER_DTD: &str = "1.2";
/// `VerProto` of SyncML DM 1.2.
pub const VER_PROTO: &str = "DM/1.2";

/// The deepest element nesting accepted (room for nested `Atomic`/`Sequence`).
pub const MAX_DEPTH: usize = 32;

/// The namespaces a message may use, compared without case: SyncML 1.2, then meta-information.
const NAMESPACES: &[&str] = &[NAMESPACE, METINF_NAMESPACE];

/// The two encodings of a SyncML message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Xml,
    Wbxml,
}

/// The encoding a `Content-Type` header value announces, if it is a SyncML type a DM server accepts:
/// `application/vnd.syncml.dm+xml`, `…dm+wbxml`, and the DS types `application/vnd.syncml+xml` /
/// `…+wbxml` that some DM clients use (B.6). Parameters (`; charset=…`) and case are ignored.
pub fn content_type_encoding(content_type: &str) -> Option<Encoding> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let eq = |known: &str| essence.eq_ignore_ascii_case(known);
    if eq(CONTENT_TYPE_XML) || eq(CONTENT_TYPE_DS_XML) {
        Some(Encoding::Xml)
    } else if eq(CONTENT_TYPE_WBXML) || eq(CONTENT_TYPE_DS_WBXML) {
        Some(Encoding::Wbxml)
    } else {
        None
    }
}

/// Whether a `Content-Type` is one a DM server accepts (see [`content_type_encoding`]).
pub fn is_dm_content_type(content_type: &str) -> bool {
    content_type_encoding(content_type).is_some()
}

/// A SyncML message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncMl {
    pub hdr: SyncHdr,
    pub body: SyncBody,
}

/// The `SyncHdr` of a message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncHdr {
    pub ver_dtd: String,
    pub ver_proto: String,
    pub session_id: String,
    pub msg_id: String,
    pub target: Location,
    pub source: Location,
    pub resp_uri: Option<String>,
    pub no_resp: bool,
    pub cred: Option<Cred>,
    pub meta: Option<Box<Meta>>,
}

impl SyncHdr {
    /// A DM 1.2 header (`VerDTD` 1.2, `VerProto` DM/1.2) without credential or meta.
    pub fn new(
        session_id: impl Into<String>,
        msg_id: impl Into<String>,
        target: Location,
        source: Location,
    ) -> Self {
        Self {
            ver_dtd: VER_DTD.to_string(),
            ver_proto: VER_PROTO.to_string(),
            session_id: session_id.into(),
            msg_id: msg_id.into(),
            target,
            source,
            resp_uri: None,
            no_resp: false,
            cred: None,
            meta: None,
        }
    }
}

/// A `Target` or `Source`: `LocURI` and optional `LocName`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Location {
    pub loc_uri: String,
    pub loc_name: Option<String>,
}

impl Location {
    pub fn new(loc_uri: impl Into<String>) -> Self {
        Self {
            loc_uri: loc_uri.into(),
            loc_name: None,
        }
    }
}

/// A credential (`Cred`): its `Meta` says the scheme (`Type`) and `Format`; `data` is the credential itself.
/// Neither `Debug` nor serialization shows `data`.
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Cred {
    pub meta: Meta,
    #[serde(serialize_with = "redacted")]
    pub data: String,
}

fn redacted<S: serde::Serializer>(_: &String, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("<redacted>")
}

impl fmt::Debug for Cred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cred")
            .field("meta", &self.meta)
            .field("data", &"<redacted>")
            .finish()
    }
}

/// Meta information (`Meta` with children of the `syncml:metinf` namespace); every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Meta {
    pub format: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `Mark` (e.g. the severity of a generic alert, 1226).
    pub mark: Option<String>,
    pub size: Option<u64>,
    pub next_nonce: Option<String>,
    pub max_msg_size: Option<u64>,
    pub max_obj_size: Option<u64>,
}

impl Meta {
    /// A `Meta` with `Format` and `Type`.
    pub fn format_type(format: impl Into<String>, type_: impl Into<String>) -> Self {
        Self {
            format: Some(format.into()),
            type_: Some(type_.into()),
            ..Self::default()
        }
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The `SyncBody`: commands in order, and whether `Final` is present.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SyncBody {
    pub commands: Vec<Command>,
    #[serde(rename = "final")]
    pub final_: bool,
}

/// A SyncML DM command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Command {
    Alert(Alert),
    Add(ItemCommand),
    Replace(ItemCommand),
    Delete(ItemCommand),
    Get(ItemCommand),
    Exec(Exec),
    Copy(ItemCommand),
    Atomic(Container),
    Sequence(Container),
    Status(Status),
    Results(Results),
}

impl Command {
    /// The element name (`"Add"`, `"Status"`, …), as a `Status` refers to it in `Cmd`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Alert(_) => "Alert",
            Command::Add(_) => "Add",
            Command::Replace(_) => "Replace",
            Command::Delete(_) => "Delete",
            Command::Get(_) => "Get",
            Command::Exec(_) => "Exec",
            Command::Copy(_) => "Copy",
            Command::Atomic(_) => "Atomic",
            Command::Sequence(_) => "Sequence",
            Command::Status(_) => "Status",
            Command::Results(_) => "Results",
        }
    }

    /// The `CmdID`.
    pub fn cmd_id(&self) -> &str {
        match self {
            Command::Alert(c) => &c.cmd_id,
            Command::Add(c)
            | Command::Replace(c)
            | Command::Delete(c)
            | Command::Get(c)
            | Command::Copy(c) => &c.cmd_id,
            Command::Exec(c) => &c.cmd_id,
            Command::Atomic(c) | Command::Sequence(c) => &c.cmd_id,
            Command::Status(c) => &c.cmd_id,
            Command::Results(c) => &c.cmd_id,
        }
    }

    /// Whether `NoResp` is set (always false for `Status` and `Results`).
    pub fn no_resp(&self) -> bool {
        match self {
            Command::Alert(c) => c.no_resp,
            Command::Add(c)
            | Command::Replace(c)
            | Command::Delete(c)
            | Command::Get(c)
            | Command::Copy(c) => c.no_resp,
            Command::Exec(c) => c.no_resp,
            Command::Atomic(c) | Command::Sequence(c) => c.no_resp,
            Command::Status(_) | Command::Results(_) => false,
        }
    }

    /// The items the command carries directly (none for `Atomic` and `Sequence`).
    pub fn items(&self) -> &[Item] {
        match self {
            Command::Alert(c) => &c.items,
            Command::Add(c)
            | Command::Replace(c)
            | Command::Delete(c)
            | Command::Get(c)
            | Command::Copy(c) => &c.items,
            Command::Exec(c) => std::slice::from_ref(&c.item),
            Command::Atomic(_) | Command::Sequence(_) => &[],
            Command::Status(c) => &c.items,
            Command::Results(c) => &c.items,
        }
    }

    /// The nested commands of an `Atomic` or `Sequence` (empty for the others).
    pub fn children(&self) -> &[Command] {
        match self {
            Command::Atomic(c) | Command::Sequence(c) => &c.commands,
            _ => &[],
        }
    }
}

/// An `Alert`: the alert code in `Data`, optional `Correlator` (DM 1.2, generic alerts) and items.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Alert {
    pub cmd_id: String,
    pub no_resp: bool,
    pub data: AlertCode,
    pub correlator: Option<String>,
    pub items: Vec<Item>,
}

impl Alert {
    pub fn new(cmd_id: impl Into<String>, data: AlertCode) -> Self {
        Self {
            cmd_id: cmd_id.into(),
            no_resp: false,
            data,
            correlator: None,
            items: Vec::new(),
        }
    }
}

/// `Add`, `Replace`, `Delete`, `Get` or `Copy`: at least one item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ItemCommand {
    pub cmd_id: String,
    pub no_resp: bool,
    pub meta: Option<Box<Meta>>,
    pub items: Vec<Item>,
}

impl ItemCommand {
    pub fn new(cmd_id: impl Into<String>, items: Vec<Item>) -> Self {
        Self {
            cmd_id: cmd_id.into(),
            no_resp: false,
            meta: None,
            items,
        }
    }
}

/// `Exec`: exactly one item, optional `Correlator`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Exec {
    pub cmd_id: String,
    pub no_resp: bool,
    pub meta: Option<Box<Meta>>,
    pub correlator: Option<String>,
    pub item: Item,
}

/// `Atomic` or `Sequence`: at least one nested command (not `Status` or `Results`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Container {
    pub cmd_id: String,
    pub no_resp: bool,
    pub meta: Option<Box<Meta>>,
    pub commands: Vec<Command>,
}

impl Container {
    pub fn new(cmd_id: impl Into<String>, commands: Vec<Command>) -> Self {
        Self {
            cmd_id: cmd_id.into(),
            no_resp: false,
            meta: None,
            commands,
        }
    }
}

/// A `Status`: the answer to a command (`CmdRef`, `Cmd`) or to the header (`CmdRef` 0, `Cmd` SyncHdr).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub cmd_id: String,
    pub msg_ref: String,
    pub cmd_ref: String,
    pub cmd: String,
    pub target_refs: Vec<String>,
    pub source_refs: Vec<String>,
    pub chal: Option<Chal>,
    pub data: StatusCode,
    pub items: Vec<Item>,
}

impl Status {
    pub fn new(
        cmd_id: impl Into<String>,
        msg_ref: impl Into<String>,
        cmd_ref: impl Into<String>,
        cmd: impl Into<String>,
        data: StatusCode,
    ) -> Self {
        Self {
            cmd_id: cmd_id.into(),
            msg_ref: msg_ref.into(),
            cmd_ref: cmd_ref.into(),
            cmd: cmd.into(),
            target_refs: Vec::new(),
            source_refs: Vec::new(),
            chal: None,
            data,
            items: Vec::new(),
        }
    }
}

/// A challenge (`Chal`): its `Meta` carries `Type`, `Format` and `NextNonce`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Chal {
    pub meta: Meta,
}

/// `Results` of a `Get`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Results {
    pub cmd_id: String,
    pub msg_ref: Option<String>,
    pub cmd_ref: String,
    pub meta: Option<Box<Meta>>,
    pub target_refs: Vec<String>,
    pub source_refs: Vec<String>,
    pub items: Vec<Item>,
}

/// An `Item`. `data` is `None` when there is no `Data` element and `Some("")` for an empty one.
///
/// `Debug` and serialization hide `data` when the item addresses a secret node (see [`Item::is_secret`]).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Item {
    pub target: Option<Location>,
    pub source: Option<Location>,
    pub meta: Option<Box<Meta>>,
    pub data: Option<String>,
    /// `MoreData`: the data is a chunk of a large object, more follows.
    pub more_data: bool,
}

/// Last path segments of DM Account nodes that hold secrets (B.2): their values never go to logs.
const SECRET_NODES: [&str; 2] = ["AAuthSecret", "AAuthData"];

impl Item {
    /// Whether the item's `Target` or `Source` is a secret node (`…/AAuthSecret`, `…/AAuthData`).
    pub fn is_secret(&self) -> bool {
        [&self.target, &self.source]
            .into_iter()
            .flatten()
            .any(|location| {
                let path = location.loc_uri.split('?').next().unwrap_or("");
                let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
                SECRET_NODES.contains(&last)
            })
    }

    fn shown_data(&self) -> Option<&str> {
        match &self.data {
            Some(_) if self.is_secret() => Some("<redacted>"),
            data => data.as_deref(),
        }
    }

    /// An item with a `Target`.
    pub fn target(uri: impl Into<String>) -> Self {
        Self {
            target: Some(Location::new(uri)),
            ..Self::default()
        }
    }

    /// An item with a `Source`.
    pub fn source(uri: impl Into<String>) -> Self {
        Self {
            source: Some(Location::new(uri)),
            ..Self::default()
        }
    }

    pub fn with_data(mut self, data: impl Into<String>) -> Self {
        self.data = Some(data.into());
        self
    }

    pub fn with_meta(mut self, meta: Meta) -> Self {
        self.meta = Some(Box::new(meta));
        self
    }
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Item")
            .field("target", &self.target)
            .field("source", &self.source)
            .field("meta", &self.meta)
            .field("data", &self.shown_data())
            .field("more_data", &self.more_data)
            .finish()
    }
}

impl serde::Serialize for Item {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut item = serializer.serialize_struct("Item", 5)?;
        item.serialize_field("target", &self.target)?;
        item.serialize_field("source", &self.source)?;
        item.serialize_field("meta", &self.meta)?;
        item.serialize_field("data", &self.shown_data())?;
        item.serialize_field("more_data", &self.more_data)?;
        item.end()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------------------

/// Decodes a SyncML DM 1.2 message in the XML encoding. Never panics.
pub fn decode(input: &[u8]) -> Result<SyncMl> {
    // The device channel only (B.6): white space and byte-order marks that a client left in front of
    // the XML declaration are skipped. Offsets in errors still count from the first byte received.
    let skipped = input.len() - device_prologue(input).len();
    decode_at(device_prologue(input)).map_err(|mut e| {
        if let Some(at) = e.offset.as_mut() {
            *at += skipped as u64;
        }
        e
    })
}

/// `input` without the XML white space and UTF-8 byte-order marks before its first other byte.
fn device_prologue(mut input: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = input.strip_prefix(b"\xEF\xBB\xBF") {
            input = rest;
        } else if let Some((first, rest)) = input.split_first()
            && matches!(first, b' ' | b'\t' | b'\r' | b'\n')
        {
            input = rest;
        } else {
            return input;
        }
    }
}

fn decode_at(input: &[u8]) -> Result<SyncMl> {
    let text = std::str::from_utf8(input).map_err(|e| {
        DecodeError::new(ErrorKind::NotWellFormed, "", "the document is not UTF-8")
            .at(e.valid_up_to() as u64)
    })?;
    let mut r = XmlReader::new(text, NAMESPACES, DoctypePolicy::ExternalOnly, MAX_DEPTH)
        .ignore_namespace_case();
    let root = r.root()?;
    if root.name != "SyncML" {
        return Err(r.error(
            ErrorKind::Unexpected,
            format!("the root element must be <SyncML>, not <{}>", root.name),
        ));
    }
    if !is_syncml_ns(root.ns) {
        return Err(r.error(
            ErrorKind::Unexpected,
            "the root element is not in the SyncML 1.2 namespace",
        ));
    }
    let mut hdr = None;
    let mut body = None;
    while let Some(name) = next_child(&mut r)? {
        match name {
            "SyncHdr" => {
                once(&r, &hdr, name)?;
                r.next_start()?;
                hdr = Some(read_hdr(&mut r)?);
            }
            "SyncBody" => {
                once(&r, &body, name)?;
                r.next_start()?;
                body = Some(read_body(&mut r)?);
            }
            _ => return Err(unexpected(&r, name)),
        }
    }
    let hdr = required(&r, hdr, "SyncHdr")?;
    let body = required(&r, body, "SyncBody")?;
    r.close()?;
    r.finish()?;
    Ok(SyncMl { hdr, body })
}

type Reader<'a> = XmlReader<'a>;

fn is_syncml_ns(ns: Ns) -> bool {
    match ns {
        Ns::None => true,
        Ns::Known(index) => index == 0,
        Ns::Other => false,
    }
}

/// The name of the next child element, checked to be in the SyncML namespace (or none).
fn next_child<'a>(r: &mut Reader<'a>) -> Result<Option<&'a str>> {
    match r.peek()? {
        None => Ok(None),
        Some((ns, name)) if is_syncml_ns(ns) => Ok(Some(name)),
        Some((_, name)) => Err(r.error_at(
            ErrorKind::Unexpected,
            r.child_path(name),
            format!("element <{name}> is not in the SyncML namespace"),
        )),
    }
}

/// The name of the next child of a `Meta`: metinf namespace, SyncML namespace or none.
fn next_meta_child<'a>(r: &mut Reader<'a>) -> Result<Option<&'a str>> {
    match r.peek()? {
        None => Ok(None),
        Some((Ns::Other, name)) => Err(r.error_at(
            ErrorKind::Unexpected,
            r.child_path(name),
            format!("element <{name}> is not in the syncml:metinf namespace"),
        )),
        Some((_, name)) => Ok(Some(name)),
    }
}

fn unexpected(r: &Reader<'_>, name: &str) -> DecodeError {
    let parent = r.path();
    let parent = parent.rsplit('/').next().unwrap_or("");
    r.error_at(
        ErrorKind::Unexpected,
        r.child_path(name),
        format!("element <{name}> is not allowed in <{parent}>"),
    )
}

fn repeated(r: &Reader<'_>, name: &str) -> DecodeError {
    r.error_at(
        ErrorKind::Unexpected,
        r.child_path(name),
        format!("element <{name}> may appear only once"),
    )
}

fn once<T>(r: &Reader<'_>, slot: &Option<T>, name: &str) -> Result<()> {
    match slot {
        Some(_) => Err(repeated(r, name)),
        None => Ok(()),
    }
}

fn required<T>(r: &Reader<'_>, slot: Option<T>, name: &str) -> Result<T> {
    slot.ok_or_else(|| {
        r.error_at(
            ErrorKind::Missing,
            r.child_path(name),
            format!("required element <{name}> is missing"),
        )
    })
}

/// Consumes the peeked child and returns its text.
fn text_child(r: &mut Reader<'_>) -> Result<String> {
    r.next_start()?;
    Ok(r.text()?.into_owned())
}

fn set_text(r: &mut Reader<'_>, slot: &mut Option<String>, name: &str) -> Result<()> {
    once(r, slot, name)?;
    *slot = Some(text_child(r)?);
    Ok(())
}

/// A required identifier or reference (`CmdID`, `MsgID`, `CmdRef`, …): text that is not empty.
fn set_id(r: &mut Reader<'_>, slot: &mut Option<String>, name: &str) -> Result<()> {
    once(r, slot, name)?;
    let text = text_child(r)?;
    // Back at the parent: the child's path is built only when there is an error to report.
    if text.is_empty() {
        return Err(r.error_at(
            ErrorKind::InvalidValue,
            r.child_path(name),
            format!("<{name}> must not be empty"),
        ));
    }
    *slot = Some(text);
    Ok(())
}

fn set_flag(r: &mut Reader<'_>, slot: &mut bool, name: &str) -> Result<()> {
    if *slot {
        return Err(repeated(r, name));
    }
    let text = text_child(r)?;
    if !text.is_empty() {
        return Err(r.error_at(
            ErrorKind::InvalidValue,
            r.child_path(name),
            format!("<{name}> must be empty"),
        ));
    }
    *slot = true;
    Ok(())
}

/// Parses the text of the child `name` just read (the reader is back at the parent).
fn parse_decimal<T: std::str::FromStr>(r: &Reader<'_>, text: &str, name: &str) -> Result<T> {
    let parsed = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<T>().ok()
    } else {
        None
    };
    parsed.ok_or_else(|| {
        r.error_at(
            ErrorKind::InvalidValue,
            r.child_path(name),
            "expected a decimal number in range",
        )
    })
}

fn set_number(r: &mut Reader<'_>, slot: &mut Option<u64>, name: &str) -> Result<()> {
    once(r, slot, name)?;
    let text = text_child(r)?;
    *slot = Some(parse_decimal(r, &text, name)?);
    Ok(())
}

/// Reads a code element (`Data` of `Status` / `Alert`).
fn code_child(r: &mut Reader<'_>, name: &str) -> Result<u16> {
    let text = text_child(r)?;
    parse_decimal(r, &text, name)
}

fn set_meta(r: &mut Reader<'_>, slot: &mut Option<Box<Meta>>, name: &str) -> Result<()> {
    once(r, slot, name)?;
    r.next_start()?;
    *slot = Some(Box::new(read_meta(r)?));
    Ok(())
}

fn read_hdr(r: &mut Reader<'_>) -> Result<SyncHdr> {
    let mut ver_dtd = None;
    let mut ver_proto = None;
    let mut session_id = None;
    let mut msg_id = None;
    let mut target = None;
    let mut source = None;
    let mut resp_uri = None;
    let mut no_resp = false;
    let mut cred = None;
    let mut meta = None;
    while let Some(name) = next_child(r)? {
        match name {
            "VerDTD" => set_id(r, &mut ver_dtd, name)?,
            "VerProto" => set_id(r, &mut ver_proto, name)?,
            "SessionID" => set_id(r, &mut session_id, name)?,
            "MsgID" => set_id(r, &mut msg_id, name)?,
            "Target" => set_location(r, &mut target, name)?,
            "Source" => set_location(r, &mut source, name)?,
            "RespURI" => set_text(r, &mut resp_uri, name)?,
            "NoResp" => set_flag(r, &mut no_resp, name)?,
            "Cred" => {
                once(r, &cred, name)?;
                r.next_start()?;
                cred = Some(read_cred(r)?);
            }
            "Meta" => set_meta(r, &mut meta, name)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let hdr = SyncHdr {
        ver_dtd: required(r, ver_dtd, "VerDTD")?,
        ver_proto: required(r, ver_proto, "VerProto")?,
        session_id: required(r, session_id, "SessionID")?,
        msg_id: required(r, msg_id, "MsgID")?,
        target: required(r, target, "Target")?,
        source: required(r, source, "Source")?,
        resp_uri,
        no_resp,
        cred,
        meta,
    };
    r.close()?;
    Ok(hdr)
}

fn set_location(r: &mut Reader<'_>, slot: &mut Option<Location>, name: &str) -> Result<()> {
    once(r, slot, name)?;
    r.next_start()?;
    let mut loc_uri = None;
    let mut loc_name = None;
    while let Some(name) = next_child(r)? {
        match name {
            "LocURI" => set_text(r, &mut loc_uri, name)?,
            "LocName" => set_text(r, &mut loc_name, name)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let location = Location {
        loc_uri: required(r, loc_uri, "LocURI")?,
        loc_name,
    };
    r.close()?;
    *slot = Some(location);
    Ok(())
}

fn read_cred(r: &mut Reader<'_>) -> Result<Cred> {
    let mut meta = None;
    let mut data = None;
    while let Some(name) = next_child(r)? {
        match name {
            "Meta" => set_meta(r, &mut meta, name)?,
            "Data" => set_text(r, &mut data, name)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let cred = Cred {
        meta: meta.map(|m| *m).unwrap_or_default(),
        data: required(r, data, "Data")?,
    };
    r.close()?;
    Ok(cred)
}

fn read_meta(r: &mut Reader<'_>) -> Result<Meta> {
    let mut meta = Meta::default();
    while let Some(name) = next_meta_child(r)? {
        match name {
            "Format" => set_text(r, &mut meta.format, name)?,
            "Type" => set_text(r, &mut meta.type_, name)?,
            "Mark" => set_text(r, &mut meta.mark, name)?,
            "Size" => set_number(r, &mut meta.size, name)?,
            "NextNonce" => set_text(r, &mut meta.next_nonce, name)?,
            "MaxMsgSize" => set_number(r, &mut meta.max_msg_size, name)?,
            "MaxObjSize" => set_number(r, &mut meta.max_obj_size, name)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    r.close()?;
    Ok(meta)
}

fn read_item(r: &mut Reader<'_>) -> Result<Item> {
    let mut item = Item::default();
    while let Some(name) = next_child(r)? {
        match name {
            "Target" => set_location(r, &mut item.target, name)?,
            "Source" => set_location(r, &mut item.source, name)?,
            "Meta" => set_meta(r, &mut item.meta, name)?,
            "Data" => set_text(r, &mut item.data, name)?,
            "MoreData" => set_flag(r, &mut item.more_data, name)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    r.close()?;
    Ok(item)
}

fn push_item(r: &mut Reader<'_>, items: &mut Vec<Item>) -> Result<()> {
    r.next_start()?;
    items.push(read_item(r)?);
    Ok(())
}

fn read_body(r: &mut Reader<'_>) -> Result<SyncBody> {
    let mut body = SyncBody::default();
    while let Some(name) = next_child(r)? {
        match name {
            "Final" => set_flag(r, &mut body.final_, name)?,
            "Status" => {
                r.next_start()?;
                body.commands.push(Command::Status(read_status(r)?));
            }
            "Results" => {
                r.next_start()?;
                body.commands.push(Command::Results(read_results(r)?));
            }
            _ => match read_command(r, name)? {
                Some(command) => body.commands.push(command),
                None => return Err(unexpected(r, name)),
            },
        }
    }
    r.close()?;
    Ok(body)
}

/// Reads a request command (`Alert` … `Sequence`) if `name` is one; `None` (nothing consumed) otherwise.
fn read_command(r: &mut Reader<'_>, name: &str) -> Result<Option<Command>> {
    let wrap: fn(ItemCommand) -> Command = match name {
        "Add" => Command::Add,
        "Replace" => Command::Replace,
        "Delete" => Command::Delete,
        "Get" => Command::Get,
        "Copy" => Command::Copy,
        "Alert" => {
            r.next_start()?;
            return read_alert(r).map(|c| Some(Command::Alert(c)));
        }
        "Exec" => {
            r.next_start()?;
            return read_exec(r).map(|c| Some(Command::Exec(c)));
        }
        "Atomic" => {
            r.next_start()?;
            return read_container(r).map(|c| Some(Command::Atomic(c)));
        }
        "Sequence" => {
            r.next_start()?;
            return read_container(r).map(|c| Some(Command::Sequence(c)));
        }
        _ => return Ok(None),
    };
    r.next_start()?;
    read_item_command(r).map(|c| Some(wrap(c)))
}

fn read_alert(r: &mut Reader<'_>) -> Result<Alert> {
    let mut cmd_id = None;
    let mut no_resp = false;
    let mut data = None;
    let mut correlator = None;
    let mut items = Vec::new();
    while let Some(name) = next_child(r)? {
        match name {
            "CmdID" => set_id(r, &mut cmd_id, name)?,
            "NoResp" => set_flag(r, &mut no_resp, name)?,
            "Data" => {
                once(r, &data, name)?;
                data = Some(AlertCode::from_code(code_child(r, name)?));
            }
            "Correlator" => set_text(r, &mut correlator, name)?,
            "Item" => push_item(r, &mut items)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let alert = Alert {
        cmd_id: required(r, cmd_id, "CmdID")?,
        no_resp,
        data: required(r, data, "Data")?,
        correlator,
        items,
    };
    r.close()?;
    Ok(alert)
}

fn read_item_command(r: &mut Reader<'_>) -> Result<ItemCommand> {
    let mut cmd_id = None;
    let mut no_resp = false;
    let mut meta = None;
    let mut items = Vec::new();
    while let Some(name) = next_child(r)? {
        match name {
            "CmdID" => set_id(r, &mut cmd_id, name)?,
            "NoResp" => set_flag(r, &mut no_resp, name)?,
            "Meta" => set_meta(r, &mut meta, name)?,
            "Item" => push_item(r, &mut items)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let cmd_id = required(r, cmd_id, "CmdID")?;
    if items.is_empty() {
        return Err(r.error_at(
            ErrorKind::Missing,
            r.child_path("Item"),
            "at least one <Item> is required",
        ));
    }
    r.close()?;
    Ok(ItemCommand {
        cmd_id,
        no_resp,
        meta,
        items,
    })
}

fn read_exec(r: &mut Reader<'_>) -> Result<Exec> {
    let mut cmd_id = None;
    let mut no_resp = false;
    let mut meta = None;
    let mut correlator = None;
    let mut item = None;
    while let Some(name) = next_child(r)? {
        match name {
            "CmdID" => set_id(r, &mut cmd_id, name)?,
            "NoResp" => set_flag(r, &mut no_resp, name)?,
            "Meta" => set_meta(r, &mut meta, name)?,
            "Correlator" => set_text(r, &mut correlator, name)?,
            "Item" => {
                once(r, &item, name)?;
                r.next_start()?;
                item = Some(read_item(r)?);
            }
            _ => return Err(unexpected(r, name)),
        }
    }
    let exec = Exec {
        cmd_id: required(r, cmd_id, "CmdID")?,
        no_resp,
        meta,
        correlator,
        item: required(r, item, "Item")?,
    };
    r.close()?;
    Ok(exec)
}

fn read_container(r: &mut Reader<'_>) -> Result<Container> {
    let mut cmd_id = None;
    let mut no_resp = false;
    let mut meta = None;
    let mut commands = Vec::new();
    while let Some(name) = next_child(r)? {
        match name {
            "CmdID" => set_id(r, &mut cmd_id, name)?,
            "NoResp" => set_flag(r, &mut no_resp, name)?,
            "Meta" => set_meta(r, &mut meta, name)?,
            _ => match read_command(r, name)? {
                Some(command) => commands.push(command),
                None => return Err(unexpected(r, name)),
            },
        }
    }
    let cmd_id = required(r, cmd_id, "CmdID")?;
    if commands.is_empty() {
        return Err(r.error(
            ErrorKind::Missing,
            "at least one nested command is required",
        ));
    }
    r.close()?;
    Ok(Container {
        cmd_id,
        no_resp,
        meta,
        commands,
    })
}

fn read_status(r: &mut Reader<'_>) -> Result<Status> {
    let mut cmd_id = None;
    let mut msg_ref = None;
    let mut cmd_ref = None;
    let mut cmd = None;
    let mut target_refs = Vec::new();
    let mut source_refs = Vec::new();
    let mut chal = None;
    let mut data = None;
    let mut items = Vec::new();
    while let Some(name) = next_child(r)? {
        match name {
            "CmdID" => set_id(r, &mut cmd_id, name)?,
            "MsgRef" => set_id(r, &mut msg_ref, name)?,
            "CmdRef" => set_id(r, &mut cmd_ref, name)?,
            "Cmd" => set_id(r, &mut cmd, name)?,
            "TargetRef" => target_refs.push(text_child(r)?),
            "SourceRef" => source_refs.push(text_child(r)?),
            "Chal" => {
                once(r, &chal, name)?;
                r.next_start()?;
                chal = Some(read_chal(r)?);
            }
            "Data" => {
                once(r, &data, name)?;
                data = Some(StatusCode::from_code(code_child(r, name)?));
            }
            "Item" => push_item(r, &mut items)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let status = Status {
        cmd_id: required(r, cmd_id, "CmdID")?,
        msg_ref: required(r, msg_ref, "MsgRef")?,
        cmd_ref: required(r, cmd_ref, "CmdRef")?,
        cmd: required(r, cmd, "Cmd")?,
        target_refs,
        source_refs,
        chal,
        data: required(r, data, "Data")?,
        items,
    };
    r.close()?;
    Ok(status)
}

fn read_chal(r: &mut Reader<'_>) -> Result<Chal> {
    let mut meta = None;
    while let Some(name) = next_child(r)? {
        match name {
            "Meta" => set_meta(r, &mut meta, name)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let chal = Chal {
        meta: *required(r, meta, "Meta")?,
    };
    r.close()?;
    Ok(chal)
}

fn read_results(r: &mut Reader<'_>) -> Result<Results> {
    let mut cmd_id = None;
    let mut msg_ref = None;
    let mut cmd_ref = None;
    let mut meta = None;
    let mut target_refs = Vec::new();
    let mut source_refs = Vec::new();
    let mut items = Vec::new();
    while let Some(name) = next_child(r)? {
        match name {
            "CmdID" => set_id(r, &mut cmd_id, name)?,
            "MsgRef" => set_id(r, &mut msg_ref, name)?,
            "CmdRef" => set_id(r, &mut cmd_ref, name)?,
            "Meta" => set_meta(r, &mut meta, name)?,
            "TargetRef" => target_refs.push(text_child(r)?),
            "SourceRef" => source_refs.push(text_child(r)?),
            "Item" => push_item(r, &mut items)?,
            _ => return Err(unexpected(r, name)),
        }
    }
    let results = Results {
        cmd_id: required(r, cmd_id, "CmdID")?,
        msg_ref,
        cmd_ref: required(r, cmd_ref, "CmdRef")?,
        meta,
        target_refs,
        source_refs,
        items,
    };
    r.close()?;
    Ok(results)
}

// ---------------------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------------------

/// Encodes a message in the XML encoding, in the SyncML 1.2 DTD order.
pub fn encode(msg: &SyncMl) -> String {
    let mut w = XmlWriter::new();
    w.start_with("SyncML", &[("xmlns", NAMESPACE)]);
    write_hdr(&mut w, &msg.hdr);
    w.start("SyncBody");
    for command in &msg.body.commands {
        write_command(&mut w, command);
    }
    if msg.body.final_ {
        w.empty("Final");
    }
    w.end("SyncBody");
    w.end("SyncML");
    // Nothing after the root's end tag: a deployed client carries such bytes into its next message,
    // in front of its XML declaration (PROTOCOL.md B.6).
    let mut out = w.finish();
    out.truncate(out.trim_end().len());
    out
}

fn write_hdr(w: &mut XmlWriter, hdr: &SyncHdr) {
    w.start("SyncHdr");
    w.text_element("VerDTD", &hdr.ver_dtd);
    w.text_element("VerProto", &hdr.ver_proto);
    w.text_element("SessionID", &hdr.session_id);
    w.text_element("MsgID", &hdr.msg_id);
    write_location(w, "Target", &hdr.target);
    write_location(w, "Source", &hdr.source);
    w.opt_text_element("RespURI", hdr.resp_uri.as_deref());
    write_flag(w, "NoResp", hdr.no_resp);
    if let Some(cred) = &hdr.cred {
        w.start("Cred");
        if !cred.meta.is_empty() {
            write_meta(w, &cred.meta);
        }
        w.text_element("Data", &cred.data);
        w.end("Cred");
    }
    write_opt_meta(w, hdr.meta.as_deref());
    w.end("SyncHdr");
}

fn write_location(w: &mut XmlWriter, name: &str, location: &Location) {
    w.start(name);
    w.text_element("LocURI", &location.loc_uri);
    w.opt_text_element("LocName", location.loc_name.as_deref());
    w.end(name);
}

fn write_flag(w: &mut XmlWriter, name: &str, set: bool) {
    if set {
        w.empty(name);
    }
}

fn write_opt_meta(w: &mut XmlWriter, meta: Option<&Meta>) {
    if let Some(meta) = meta {
        write_meta(w, meta);
    }
}

fn write_meta(w: &mut XmlWriter, meta: &Meta) {
    w.start("Meta");
    let size = meta.size.map(|n| n.to_string());
    let max_msg_size = meta.max_msg_size.map(|n| n.to_string());
    let max_obj_size = meta.max_obj_size.map(|n| n.to_string());
    let children = [
        ("Format", meta.format.as_deref()),
        ("Type", meta.type_.as_deref()),
        ("Mark", meta.mark.as_deref()),
        ("Size", size.as_deref()),
        ("NextNonce", meta.next_nonce.as_deref()),
        ("MaxMsgSize", max_msg_size.as_deref()),
        ("MaxObjSize", max_obj_size.as_deref()),
    ];
    // Real servers put the meta-information namespace on each child; so do we.
    for (name, value) in children {
        if let Some(value) = value {
            w.text_element_with(name, &[("xmlns", METINF_NAMESPACE)], value);
        }
    }
    w.end("Meta");
}

fn write_data(w: &mut XmlWriter, data: Option<&str>) {
    match data {
        None => {}
        Some("") => w.empty("Data"),
        Some(text) => w.text_element("Data", text),
    }
}

fn write_item(w: &mut XmlWriter, item: &Item) {
    w.start("Item");
    if let Some(target) = &item.target {
        write_location(w, "Target", target);
    }
    if let Some(source) = &item.source {
        write_location(w, "Source", source);
    }
    write_opt_meta(w, item.meta.as_deref());
    write_data(w, item.data.as_deref());
    write_flag(w, "MoreData", item.more_data);
    w.end("Item");
}

fn write_items(w: &mut XmlWriter, items: &[Item]) {
    for item in items {
        write_item(w, item);
    }
}

fn write_command(w: &mut XmlWriter, command: &Command) {
    let name = command.name();
    w.start(name);
    match command {
        Command::Alert(c) => {
            w.text_element("CmdID", &c.cmd_id);
            write_flag(w, "NoResp", c.no_resp);
            w.text_element("Data", &c.data.code().to_string());
            w.opt_text_element("Correlator", c.correlator.as_deref());
            write_items(w, &c.items);
        }
        Command::Add(c)
        | Command::Replace(c)
        | Command::Delete(c)
        | Command::Get(c)
        | Command::Copy(c) => {
            w.text_element("CmdID", &c.cmd_id);
            write_flag(w, "NoResp", c.no_resp);
            write_opt_meta(w, c.meta.as_deref());
            write_items(w, &c.items);
        }
        Command::Exec(c) => {
            w.text_element("CmdID", &c.cmd_id);
            write_flag(w, "NoResp", c.no_resp);
            write_opt_meta(w, c.meta.as_deref());
            w.opt_text_element("Correlator", c.correlator.as_deref());
            write_item(w, &c.item);
        }
        Command::Atomic(c) | Command::Sequence(c) => {
            w.text_element("CmdID", &c.cmd_id);
            write_flag(w, "NoResp", c.no_resp);
            write_opt_meta(w, c.meta.as_deref());
            for nested in &c.commands {
                write_command(w, nested);
            }
        }
        Command::Status(c) => {
            w.text_element("CmdID", &c.cmd_id);
            w.text_element("MsgRef", &c.msg_ref);
            w.text_element("CmdRef", &c.cmd_ref);
            w.text_element("Cmd", &c.cmd);
            for target_ref in &c.target_refs {
                w.text_element("TargetRef", target_ref);
            }
            for source_ref in &c.source_refs {
                w.text_element("SourceRef", source_ref);
            }
            if let Some(chal) = &c.chal {
                w.start("Chal");
                write_meta(w, &chal.meta);
                w.end("Chal");
            }
            w.text_element("Data", &c.data.code().to_string());
            write_items(w, &c.items);
        }
        Command::Results(c) => {
            w.text_element("CmdID", &c.cmd_id);
            w.opt_text_element("MsgRef", c.msg_ref.as_deref());
            w.text_element("CmdRef", &c.cmd_ref);
            write_opt_meta(w, c.meta.as_deref());
            for target_ref in &c.target_refs {
                w.text_element("TargetRef", target_ref);
            }
            for source_ref in &c.source_refs {
                w.text_element("SourceRef", source_ref);
            }
            write_items(w, &c.items);
        }
    }
    w.end(name);
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Package #1 shaped like a real DM 1.2 client's (B.1, B.6): DOCTYPE with an external identifier and no
    /// namespace, Alert 1201, Replace of ./DevInfo, auth-basic Cred, MaxMsgSize and no MaxObjSize.
    const PACKAGE1: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE SyncML PUBLIC "-//SYNCML//DTD SyncML 1.2//EN" "http://www.openmobilealliance.org/tech/DTD/OMA-TS-SyncML_RepPro_DTD-V1_2.dtd">
<SyncML>
 <SyncHdr>
  <VerDTD>1.2</VerDTD>
  <VerProto>DM/1.2</VerProto>
  <SessionID>1</SessionID>
  <MsgID>1</MsgID>
  <Target><LocURI>https://dm.example.com/dm</LocURI></Target>
  <Source><LocURI>IMEI:493005100592800</LocURI><LocName>dmclient</LocName></Source>
  <Cred>
   <Meta>
    <Format xmlns="syncml:metinf">b64</Format>
    <Type xmlns="syncml:metinf">syncml:auth-basic</Type>
   </Meta>
   <Data>ZG1jbGllbnQ6c2VjcmV0</Data>
  </Cred>
  <Meta><MaxMsgSize xmlns="syncml:metinf">4096</MaxMsgSize></Meta>
 </SyncHdr>
 <SyncBody>
  <Alert>
   <CmdID>1</CmdID>
   <Data>1201</Data>
  </Alert>
  <Replace>
   <CmdID>2</CmdID>
   <Item><Source><LocURI>./DevInfo/DevId</LocURI></Source><Data>IMEI:493005100592800</Data></Item>
   <Item><Source><LocURI>./DevInfo/Man</LocURI></Source><Data>Example Inc.</Data></Item>
   <Item><Source><LocURI>./DevInfo/Mod</LocURI></Source><Data>Model X &amp; Y</Data></Item>
   <Item><Source><LocURI>./DevInfo/DmV</LocURI></Source><Data>1.0</Data></Item>
   <Item><Source><LocURI>./DevInfo/Lang</LocURI></Source><Data><![CDATA[en-US]]></Data></Item>
  </Replace>
  <Final/>
 </SyncBody>
</SyncML>
"#;

    fn devinfo(node: &str, value: &str) -> Item {
        Item::source(format!("./DevInfo/{node}")).with_data(value)
    }

    #[test]
    fn nothing_follows_the_root_of_an_encoded_message() {
        let msg = decode(PACKAGE1.as_bytes()).unwrap();
        let out = encode(&msg);
        assert!(out.ends_with("</SyncML>"), "{:?}", &out[out.len() - 20..]);
    }

    #[test]
    fn white_space_and_byte_order_marks_before_the_declaration_are_skipped() {
        // B.6: a deployed client puts the bytes that followed the server's root in front of its next
        // message.
        for prefix in [
            "\n",
            "\r\n  \t",
            "\u{feff}",
            "\n\u{feff}",
            "\u{feff}\r\n\u{feff} ",
        ] {
            let input = format!("{prefix}{PACKAGE1}");
            let msg = decode(input.as_bytes()).unwrap_or_else(|e| panic!("{prefix:?}: {e}"));
            assert_eq!(msg.hdr.source.loc_uri, "IMEI:493005100592800");
        }
        // Anything else before the declaration is still an error.
        let input = format!("x{PACKAGE1}");
        assert_eq!(decode(input.as_bytes()).unwrap_err().status(), 400);
    }

    #[test]
    fn a_nul_in_data_is_refused_with_its_byte_offset() {
        // B.6: a client's child list ending in NUL. The offset counts from the first byte received,
        // skipped prologue included.
        let body = PACKAGE1.replace("<Data>1.0</Data>", "<Data>a/b\0</Data>");
        let input = format!("\n{body}");
        let at = input.find('\0').unwrap() as u64;
        let e = decode(input.as_bytes()).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.offset, Some(at), "{e}");
        assert!(e.reason.contains("U+0000"), "{e}");
    }

    #[test]
    fn decodes_a_real_client_package1() {
        let msg = decode(PACKAGE1.as_bytes()).unwrap();
        let hdr = &msg.hdr;
        assert_eq!(hdr.ver_dtd, "1.2");
        assert_eq!(hdr.ver_proto, "DM/1.2");
        assert_eq!(hdr.session_id, "1");
        assert_eq!(hdr.msg_id, "1");
        assert_eq!(hdr.target, Location::new("https://dm.example.com/dm"));
        assert_eq!(hdr.source.loc_uri, "IMEI:493005100592800");
        assert_eq!(hdr.source.loc_name.as_deref(), Some("dmclient"));
        let cred = hdr.cred.as_ref().unwrap();
        assert_eq!(cred.meta, Meta::format_type("b64", "syncml:auth-basic"));
        assert_eq!(cred.data, "ZG1jbGllbnQ6c2VjcmV0");
        let meta = hdr.meta.as_ref().unwrap();
        assert_eq!(meta.max_msg_size, Some(4096));
        assert_eq!(meta.max_obj_size, None);
        assert!(msg.body.final_);
        assert_eq!(msg.body.commands.len(), 2);
        assert_eq!(
            msg.body.commands[0],
            Command::Alert(Alert::new("1", AlertCode::ClientInitiatedMgmt))
        );
        let expected_replace = ItemCommand::new(
            "2",
            vec![
                devinfo("DevId", "IMEI:493005100592800"),
                devinfo("Man", "Example Inc."),
                devinfo("Mod", "Model X & Y"),
                devinfo("DmV", "1.0"),
                devinfo("Lang", "en-US"),
            ],
        );
        assert_eq!(msg.body.commands[1], Command::Replace(expected_replace));
        assert_eq!(msg.body.commands[1].cmd_id(), "2");
        assert_eq!(decode(encode(&msg).as_bytes()).unwrap(), msg);
    }

    #[test]
    fn decodes_namespaced_message_in_any_order() {
        // Namespace in another case, header children out of DTD order, Final before a command, Meta children
        // in the SyncML namespace and with no namespace.
        let xml = r#"<SyncML xmlns="syncml:syncml1.2"><SyncBody><Final></Final>
            <Status><Data>401</Data><Cmd>SyncHdr</Cmd><CmdRef>0</CmdRef><MsgRef>1</MsgRef><CmdID>1</CmdID>
              <TargetRef>IMEI:1</TargetRef><SourceRef>https://s/dm</SourceRef>
              <Chal><Meta><Type xmlns="syncml:metinf">syncml:auth-md5</Type><Format>b64</Format>
                <NextNonce xmlns="SYNCML:METINF">AAECAw==</NextNonce></Meta></Chal></Status>
            </SyncBody>
            <SyncHdr><Source><LocURI>https://s/dm</LocURI></Source><MsgID>1</MsgID><SessionID>1</SessionID>
              <Target><LocURI>IMEI:1</LocURI></Target><VerProto>DM/1.2</VerProto><VerDTD>1.2</VerDTD>
              <RespURI>https://s/dm?s=1</RespURI><Meta><MaxMsgSize>10000</MaxMsgSize></Meta></SyncHdr>
            </SyncML>"#;
        let msg = decode(xml.as_bytes()).unwrap();
        assert!(msg.body.final_);
        let Command::Status(status) = &msg.body.commands[0] else {
            panic!("not a status")
        };
        assert_eq!(status.data, StatusCode::InvalidCredentials);
        assert_eq!(status.cmd, "SyncHdr");
        assert_eq!(status.target_refs, vec!["IMEI:1".to_string()]);
        let chal = status.chal.as_ref().unwrap();
        assert_eq!(chal.meta.type_.as_deref(), Some("syncml:auth-md5"));
        assert_eq!(chal.meta.format.as_deref(), Some("b64"));
        assert_eq!(chal.meta.next_nonce.as_deref(), Some("AAECAw=="));
        assert_eq!(msg.hdr.resp_uri.as_deref(), Some("https://s/dm?s=1"));
        assert_eq!(msg.hdr.meta.as_ref().unwrap().max_msg_size, Some(10000));
    }

    fn server_package2() -> SyncMl {
        let mut hdr = SyncHdr::new(
            "1",
            "1",
            Location::new("IMEI:493005100592800"),
            Location::new("https://dm.example.com/dm"),
        );
        hdr.cred = Some(Cred {
            meta: Meta::format_type("b64", "syncml:auth-md5"),
            data: "c2VjcmV0ZGlnZXN0".to_string(),
        });
        let mut status = Status::new("1", "1", "0", "SyncHdr", StatusCode::AuthenticationAccepted);
        status.chal = Some(Chal {
            meta: Meta {
                next_nonce: Some("AAECAw==".to_string()),
                ..Meta::format_type("b64", "syncml:auth-md5")
            },
        });
        SyncMl {
            hdr,
            body: SyncBody {
                commands: vec![
                    Command::Status(status),
                    Command::Add(ItemCommand::new(
                        "2",
                        vec![
                            Item::target("./DMAcc/x")
                                .with_meta(Meta::format_type("node", "text/plain"))
                                .with_data(""),
                        ],
                    )),
                    Command::Get(ItemCommand::new(
                        "3",
                        vec![Item::target("./DMAcc/x?prop=ACL")],
                    )),
                ],
                final_: true,
            },
        }
    }

    #[test]
    fn encodes_dtd_order_namespaces_and_empty_data() {
        let msg = server_package2();
        let xml = encode(&msg);
        assert!(
            xml.contains(r#"<SyncML xmlns="SYNCML:SYNCML1.2">"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<Format xmlns="syncml:metinf">node</Format>"#),
            "{xml}"
        );
        assert!(xml.contains(r#"<NextNonce xmlns="syncml:metinf">AAECAw==</NextNonce>"#));
        assert!(xml.contains("<Data/>"), "{xml}");
        let hdr_order = [
            "<VerDTD>",
            "<VerProto>",
            "<SessionID>",
            "<MsgID>",
            "<Target>",
            "<Source>",
            "<Cred>",
        ];
        let positions: Vec<usize> = hdr_order.iter().map(|t| xml.find(t).unwrap()).collect();
        assert!(positions.windows(2).all(|p| p[0] < p[1]), "{xml}");
        let status = &xml[xml.find("<Status>").unwrap()..];
        let order = [
            "<CmdID>", "<MsgRef>", "<CmdRef>", "<Cmd>", "<Chal>", "<Data>",
        ];
        let positions: Vec<usize> = order.iter().map(|t| status.find(t).unwrap()).collect();
        assert!(positions.windows(2).all(|p| p[0] < p[1]), "{status}");
        assert!(xml.find("</SyncBody>").unwrap() > xml.find("<Final/>").unwrap());
        assert_eq!(decode(xml.as_bytes()).unwrap(), msg);
    }

    #[test]
    fn absent_and_empty_data_differ() {
        let msg = server_package2();
        let back = decode(encode(&msg).as_bytes()).unwrap();
        assert_eq!(back.body.commands[1].items()[0].data.as_deref(), Some(""));
        assert_eq!(back.body.commands[2].items()[0].data, None);
    }

    #[test]
    fn cred_debug_and_json_hide_data() {
        let msg = server_package2();
        let debug = format!("{msg:?}");
        assert!(!debug.contains("c2VjcmV0ZGlnZXN0"), "{debug}");
        let json = serde_json::to_string(&msg).unwrap();
        assert!(!json.contains("c2VjcmV0ZGlnZXN0"), "{json}");
        assert!(json.contains("\"final\":true"));
    }

    #[test]
    fn secret_item_data_is_hidden_from_debug_and_json() {
        let secret = Item::target("./DMAcc/srv/AppAuth/1/AAuthSecret").with_data("hunter2");
        let nonce =
            Item::source("./DMAcc/srv/AppAuth/1/AAuthData?prop=Format").with_data("bm9uY2U=");
        let plain = Item::target("./DMAcc/srv/AppAuth/1/AAuthName").with_data("srv-name");
        assert!(secret.is_secret() && nonce.is_secret() && !plain.is_secret());
        for item in [&secret, &nonce] {
            let debug = format!("{item:?}");
            let json = serde_json::to_string(item).unwrap();
            let value = item.data.as_deref().unwrap();
            assert!(
                !debug.contains(value) && !json.contains(value),
                "{debug} {json}"
            );
        }
        assert!(format!("{plain:?}").contains("srv-name"));
        assert!(serde_json::to_string(&plain).unwrap().contains("srv-name"));
        // Encoding is not affected.
        let msg = SyncMl {
            body: SyncBody {
                commands: vec![Command::Replace(ItemCommand::new("2", vec![secret]))],
                final_: true,
            },
            ..server_package2()
        };
        assert!(encode(&msg).contains("<Data>hunter2</Data>"));
    }

    #[test]
    fn content_types() {
        assert!(is_dm_content_type("application/vnd.syncml.dm+xml"));
        assert!(is_dm_content_type(
            "application/vnd.syncml+xml; charset=UTF-8"
        ));
        assert!(is_dm_content_type("Application/VND.SyncML.DM+WBXML"));
        assert!(!is_dm_content_type("application/xml"));
        assert!(!is_dm_content_type("application/vnd.syncml.notification"));
        assert_eq!(
            content_type_encoding(CONTENT_TYPE_WBXML),
            Some(Encoding::Wbxml)
        );
        assert_eq!(
            content_type_encoding(CONTENT_TYPE_DS_XML),
            Some(Encoding::Xml)
        );
    }

    fn replace_in_package1(from: &str, to: &str) -> String {
        assert!(PACKAGE1.contains(from), "{from}");
        PACKAGE1.replacen(from, to, 1)
    }

    fn error_of(xml: &str) -> DecodeError {
        decode(xml.as_bytes()).unwrap_err()
    }

    #[test]
    fn rejects_unknown_repeated_missing_and_bad_codes() {
        let e = error_of(&replace_in_package1(
            "<MsgID>1</MsgID>",
            "<MsgID>1</MsgID><Foo/>",
        ));
        assert_eq!(e.kind, ErrorKind::Unexpected);
        assert_eq!(e.field, "SyncML/SyncHdr/Foo");

        let e = error_of(&replace_in_package1(
            "<MsgID>1</MsgID>",
            "<MsgID>1</MsgID><MsgID>2</MsgID>",
        ));
        assert_eq!(e.kind, ErrorKind::Unexpected);
        assert_eq!(e.field, "SyncML/SyncHdr/MsgID");

        let e = error_of(&replace_in_package1("<MsgID>1</MsgID>", ""));
        assert_eq!(e.kind, ErrorKind::Missing);
        assert_eq!(e.field, "SyncML/SyncHdr/MsgID");

        let e = error_of(&replace_in_package1(
            "<Data>1201</Data>",
            "<Data>abc</Data>",
        ));
        assert_eq!(e.kind, ErrorKind::InvalidValue);
        assert_eq!(e.field, "SyncML/SyncBody/Alert/Data");

        let e = error_of(&replace_in_package1(
            "<Data>1201</Data>",
            "<Data>99999</Data>",
        ));
        assert_eq!(e.kind, ErrorKind::InvalidValue);

        let e = error_of(&replace_in_package1("<Data>1201</Data>", ""));
        assert_eq!(e.kind, ErrorKind::Missing);
        assert_eq!(e.field, "SyncML/SyncBody/Alert/Data");

        let e = error_of(&replace_in_package1("<Final/>", "<Final/><Final/>"));
        assert_eq!(e.kind, ErrorKind::Unexpected);

        let e = error_of(&replace_in_package1(
            "<MaxMsgSize xmlns=\"syncml:metinf\">4096",
            "<MaxMsgSize xmlns=\"syncml:metinf\">big",
        ));
        assert_eq!(e.kind, ErrorKind::InvalidValue);
        assert_eq!(e.field, "SyncML/SyncHdr/Meta/MaxMsgSize");

        let e = error_of(&replace_in_package1(
            "<Data>1.0</Data>",
            "<Data><b>1.0</b></Data>",
        ));
        assert_eq!(e.kind, ErrorKind::Unexpected);

        let e = error_of(&replace_in_package1("<CmdID>2</CmdID>", ""));
        assert_eq!(e.kind, ErrorKind::Missing);
        assert_eq!(e.field, "SyncML/SyncBody/Replace/CmdID");

        let e = error_of(&replace_in_package1("<CmdID>2</CmdID>", "<CmdID></CmdID>"));
        assert_eq!(e.kind, ErrorKind::InvalidValue);

        let e = error_of(&replace_in_package1("<Final/>", "<Final>yes</Final>"));
        assert_eq!(e.kind, ErrorKind::InvalidValue);

        let e = error_of(&replace_in_package1(
            "<Final/>",
            "<Status><CmdID>9</CmdID></Status>",
        ));
        assert_eq!(e.kind, ErrorKind::Missing);
    }

    #[test]
    fn rejects_structure_errors() {
        // Internal DTD subset.
        let e = error_of(r#"<!DOCTYPE SyncML [<!ENTITY x "y">]><SyncML/>"#);
        assert_eq!(e.kind, ErrorKind::Doctype);
        // Foreign namespace on the root, or on a child.
        let e = error_of(r#"<SyncML xmlns="urn:other"/>"#);
        assert_eq!(e.kind, ErrorKind::Unexpected);
        let e = error_of(&replace_in_package1(
            "<MsgID>1</MsgID>",
            "<MsgID xmlns=\"syncml:metinf\">1</MsgID>",
        ));
        assert_eq!(e.kind, ErrorKind::Unexpected);
        let e = error_of(&replace_in_package1(
            "<Format xmlns=\"syncml:metinf\">",
            "<Format xmlns=\"urn:x\">",
        ));
        assert_eq!(e.kind, ErrorKind::Unexpected);
        // Wrong root, missing header, empty containers, Status inside Atomic.
        assert_eq!(error_of("<Foo/>").kind, ErrorKind::Unexpected);
        assert_eq!(
            error_of("<SyncML><SyncBody/></SyncML>").kind,
            ErrorKind::Missing
        );
        let e = error_of(&replace_in_package1(
            "<Final/>",
            "<Atomic><CmdID>5</CmdID></Atomic>",
        ));
        assert_eq!(e.kind, ErrorKind::Missing);
        let e = error_of(&replace_in_package1(
            "<Final/>",
            "<Atomic><CmdID>5</CmdID><Status/></Atomic>",
        ));
        assert_eq!(e.kind, ErrorKind::Unexpected);
        let e = error_of(&replace_in_package1(
            "<Final/>",
            "<Add><CmdID>5</CmdID></Add>",
        ));
        assert_eq!(e.kind, ErrorKind::Missing);
        assert_eq!(e.field, "SyncML/SyncBody/Add/Item");
        // Unknown entity, not UTF-8, truncated.
        assert_eq!(
            error_of(&replace_in_package1("Example Inc.", "&foo;")).kind,
            ErrorKind::Entity
        );
        assert_eq!(
            decode(b"<SyncML>\xff</SyncML>").unwrap_err().kind,
            ErrorKind::NotWellFormed
        );
        for cut in [0, 10, 200, PACKAGE1.len() / 2, PACKAGE1.len() - 12] {
            assert!(decode(&PACKAGE1.as_bytes()[..cut]).is_err(), "cut at {cut}");
        }
        // Too deep.
        let mut deep = String::from("<SyncML><SyncBody>");
        for i in 0..40 {
            deep.push_str(&format!("<Atomic><CmdID>{i}</CmdID>"));
        }
        assert_eq!(error_of(&deep).kind, ErrorKind::TooDeep);
    }

    #[test]
    fn accepts_bom_and_nested_atomic() {
        let xml = replace_in_package1(
            "<Final/>",
            "<Atomic><CmdID>3</CmdID><Sequence><CmdID>4</CmdID><Exec><CmdID>5</CmdID><Correlator>c1</Correlator>\
             <Item><Target><LocURI>./FUMO/Update</LocURI></Target></Item></Exec></Sequence>\
             <Delete><CmdID>6</CmdID><NoResp/><Item><Target><LocURI>./A</LocURI></Target></Item></Delete></Atomic><Final/>",
        );
        let mut bytes = "\u{FEFF}".as_bytes().to_vec();
        bytes.extend_from_slice(xml.as_bytes());
        let msg = decode(&bytes).unwrap();
        let atomic = &msg.body.commands[2];
        assert_eq!(atomic.name(), "Atomic");
        assert_eq!(atomic.children().len(), 2);
        let sequence = &atomic.children()[0];
        let Command::Exec(exec) = &sequence.children()[0] else {
            panic!("not exec")
        };
        assert_eq!(exec.correlator.as_deref(), Some("c1"));
        assert_eq!(exec.item.target, Some(Location::new("./FUMO/Update")));
        assert!(atomic.children()[1].no_resp());
        assert_eq!(decode(encode(&msg).as_bytes()).unwrap(), msg);
    }

    #[test]
    fn deepest_nesting_decodes_on_a_small_stack() {
        // Up to the depth limit, decoding recursion must fit comfortably in a worker thread's stack.
        let mut xml = replace_in_package1("<Final/>", "@");
        let mut nested = String::new();
        let levels = MAX_DEPTH - 6;
        for i in 0..levels {
            nested.push_str(&format!("<Atomic><CmdID>{i}</CmdID>"));
        }
        nested.push_str(
            "<Get><CmdID>x</CmdID><Item><Target><LocURI>./a</LocURI></Target></Item></Get>",
        );
        for _ in 0..levels {
            nested.push_str("</Atomic>");
        }
        xml = xml.replace('@', &nested);
        let decoded = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || decode(xml.as_bytes()))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        let mut command = &decoded.body.commands[2];
        let mut depth = 0;
        while let Some(child) = command.children().first() {
            command = child;
            depth += 1;
        }
        assert_eq!(depth, levels);
        assert_eq!(command.name(), "Get");
    }

    // --- property tests ---------------------------------------------------------------------------------

    fn text() -> impl Strategy<Value = String> {
        // No surrounding white space (decode trims it), XML special characters and non-ASCII included.
        "[a-zA-Z0-9./:?=&<>\"'é_-]([a-zA-Z0-9 ./:?=&<>\"'é_-]{0,10}[a-zA-Z0-9./?=&<>é_-])?"
    }

    fn id() -> impl Strategy<Value = String> {
        "[1-9][0-9]{0,3}"
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    fn location() -> impl Strategy<Value = Location> {
        (text(), opt_text()).prop_map(|(loc_uri, loc_name)| Location { loc_uri, loc_name })
    }

    fn meta() -> BoxedStrategy<Meta> {
        (
            opt_text(),
            opt_text(),
            opt_text(),
            proptest::option::of(any::<u64>()),
            opt_text(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(format, type_, mark, size, next_nonce, max_msg_size, max_obj_size)| Meta {
                    format,
                    type_,
                    mark,
                    size,
                    next_nonce,
                    max_msg_size,
                    max_obj_size,
                },
            )
            .boxed()
    }

    fn data() -> impl Strategy<Value = Option<String>> {
        prop_oneof![Just(None), Just(Some(String::new())), text().prop_map(Some)]
    }

    fn item() -> BoxedStrategy<Item> {
        (
            proptest::option::of(location()),
            proptest::option::of(location()),
            proptest::option::of(meta().prop_map(Box::new)),
            data(),
            any::<bool>(),
        )
            .prop_map(|(target, source, meta, data, more_data)| Item {
                target,
                source,
                meta,
                data,
                more_data,
            })
            .boxed()
    }

    fn items(min: usize) -> impl Strategy<Value = Vec<Item>> {
        proptest::collection::vec(item(), min..3)
    }

    fn item_command() -> BoxedStrategy<ItemCommand> {
        (
            id(),
            any::<bool>(),
            proptest::option::of(meta().prop_map(Box::new)),
            items(1),
        )
            .prop_map(|(cmd_id, no_resp, meta, items)| ItemCommand {
                cmd_id,
                no_resp,
                meta,
                items,
            })
            .boxed()
    }

    fn leaf_command() -> BoxedStrategy<Command> {
        prop_oneof![
            (id(), any::<bool>(), any::<u16>(), opt_text(), items(0)).prop_map(
                |(cmd_id, no_resp, code, correlator, items)| Command::Alert(Alert {
                    cmd_id,
                    no_resp,
                    data: AlertCode::from_code(code),
                    correlator,
                    items,
                })
            ),
            item_command().prop_map(Command::Add),
            item_command().prop_map(Command::Replace),
            item_command().prop_map(Command::Delete),
            item_command().prop_map(Command::Get),
            item_command().prop_map(Command::Copy),
            (
                id(),
                any::<bool>(),
                proptest::option::of(meta().prop_map(Box::new)),
                opt_text(),
                item()
            )
                .prop_map(|(cmd_id, no_resp, meta, correlator, item)| Command::Exec(
                    Exec {
                        cmd_id,
                        no_resp,
                        meta,
                        correlator,
                        item,
                    }
                )),
        ]
        .boxed()
    }

    fn request_command() -> BoxedStrategy<Command> {
        leaf_command()
            .prop_recursive(3, 12, 3, |inner| {
                (
                    id(),
                    any::<bool>(),
                    proptest::option::of(meta().prop_map(Box::new)),
                    proptest::collection::vec(inner, 1..3),
                    any::<bool>(),
                )
                    .prop_map(|(cmd_id, no_resp, meta, commands, atomic)| {
                        let container = Container {
                            cmd_id,
                            no_resp,
                            meta,
                            commands,
                        };
                        if atomic {
                            Command::Atomic(container)
                        } else {
                            Command::Sequence(container)
                        }
                    })
            })
            .boxed()
    }

    fn status() -> BoxedStrategy<Command> {
        (
            (id(), id(), id(), text()),
            proptest::collection::vec(text(), 0..2),
            proptest::collection::vec(text(), 0..2),
            proptest::option::of(meta().prop_map(|meta| Chal { meta })),
            any::<u16>(),
            items(0),
        )
            .prop_map(
                |((cmd_id, msg_ref, cmd_ref, cmd), target_refs, source_refs, chal, code, items)| {
                    Command::Status(Status {
                        cmd_id,
                        msg_ref,
                        cmd_ref,
                        cmd,
                        target_refs,
                        source_refs,
                        chal,
                        data: StatusCode::from_code(code),
                        items,
                    })
                },
            )
            .boxed()
    }

    fn results() -> BoxedStrategy<Command> {
        (
            (id(), proptest::option::of(id()), id()),
            proptest::option::of(meta().prop_map(Box::new)),
            proptest::collection::vec(text(), 0..2),
            proptest::collection::vec(text(), 0..2),
            items(0),
        )
            .prop_map(
                |((cmd_id, msg_ref, cmd_ref), meta, target_refs, source_refs, items)| {
                    Command::Results(Results {
                        cmd_id,
                        msg_ref,
                        cmd_ref,
                        meta,
                        target_refs,
                        source_refs,
                        items,
                    })
                },
            )
            .boxed()
    }

    fn cred() -> impl Strategy<Value = Cred> {
        (meta(), text()).prop_map(|(meta, data)| Cred { meta, data })
    }

    fn hdr() -> BoxedStrategy<SyncHdr> {
        (
            (text(), text(), id(), id()),
            location(),
            location(),
            opt_text(),
            any::<bool>(),
            proptest::option::of(cred()),
            proptest::option::of(meta().prop_map(Box::new)),
        )
            .prop_map(
                |(
                    (ver_dtd, ver_proto, session_id, msg_id),
                    target,
                    source,
                    resp_uri,
                    no_resp,
                    cred,
                    meta,
                )| {
                    SyncHdr {
                        ver_dtd,
                        ver_proto,
                        session_id,
                        msg_id,
                        target,
                        source,
                        resp_uri,
                        no_resp,
                        cred,
                        meta,
                    }
                },
            )
            .boxed()
    }

    fn message() -> BoxedStrategy<SyncMl> {
        let command = prop_oneof![3 => request_command(), 1 => status(), 1 => results()];
        (
            hdr(),
            proptest::collection::vec(command, 0..5),
            any::<bool>(),
        )
            .prop_map(|(hdr, commands, final_)| SyncMl {
                hdr,
                body: SyncBody { commands, final_ },
            })
            .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decode_inverts_encode(msg in message()) {
            let xml = encode(&msg);
            let back = decode(xml.as_bytes());
            prop_assert_eq!(back.as_ref().ok(), Some(&msg), "{}\n{:?}", xml, back.as_ref().err());
        }

        #[test]
        fn decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_messages(
            cut in 0usize..2000,
            at in 0usize..2000,
            byte in any::<u8>(),
        ) {
            let mut bytes = PACKAGE1.as_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            bytes.truncate(cut.min(bytes.len()));
            let _ = decode(&bytes);
        }
    }
}

//! Recognizes which kind of protocol document a byte string is, and decodes it with the right codec.
//! Used by `dmd validate` and by tests that walk folders of mixed documents.

use serde::Serialize;

use crate::delegation::{self, Body, DelegationError, Message};
use crate::error::{DecodeError, ErrorKind};
use crate::package0::{self, Notification};
use crate::syncml::{self, SyncMl};
use crate::tnds::{self, MgmtTree, NodeContent};

/// The kinds of document this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    DelegationMessage,
    DelegationError,
    Tnds,
    SyncMl,
    Package0,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::DelegationMessage => "delegation message",
            Kind::DelegationError => "DelegationError answer",
            Kind::Tnds => "TNDS document",
            Kind::SyncMl => "SyncML DM message",
            Kind::Package0 => "package #0 notification",
        }
    }
}

/// A decoded document of any kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "document", rename_all = "snake_case")]
// One value per inspected document: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Document {
    DelegationMessage(Message),
    DelegationError(DelegationError),
    Tnds(MgmtTree),
    SyncMl(SyncMl),
    /// The digest cannot be checked without the server's credentials; the structure is.
    Package0(Notification),
}

/// A document that could not be decoded: its kind when it could be told, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub kind: Option<Kind>,
    pub error: DecodeError,
    pub status: u16,
}

/// Tells the kind of a document from its root element (XML) or its framing (binary package #0).
pub fn sniff(bytes: &[u8]) -> Option<Kind> {
    let text = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let first = text.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'<' {
        // Package #0 starts with a 16-byte digest, then the version bits of DM 1.1/1.2.
        return package0::decode(bytes).ok().map(|_| Kind::Package0);
    }
    let text = std::str::from_utf8(text).ok()?;
    let mut reader = quick_xml::Reader::from_str(text);
    loop {
        match reader.read_event().ok()? {
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                let name = e.local_name();
                return match name.into_inner() {
                    "DelegationMessage" => Some(Kind::DelegationMessage),
                    "DelegationError" => Some(Kind::DelegationError),
                    "MgmtTree" => Some(Kind::Tnds),
                    "SyncML" => Some(Kind::SyncMl),
                    _ => None,
                };
            }
            quick_xml::events::Event::Eof => return None,
            _ => {}
        }
    }
}

/// Decodes a document of any kind this crate reads.
pub fn inspect(bytes: &[u8]) -> Result<Document, Rejected> {
    let kind = sniff(bytes);
    let reject = |error: DecodeError| Rejected {
        kind,
        status: error.status(),
        error,
    };
    match kind {
        Some(Kind::DelegationMessage) => delegation::decode(bytes)
            .map(Document::DelegationMessage)
            .map_err(reject),
        Some(Kind::DelegationError) => delegation::decode_error(bytes)
            .map(Document::DelegationError)
            .map_err(reject),
        Some(Kind::Tnds) => tnds::decode(bytes).map(Document::Tnds).map_err(reject),
        Some(Kind::SyncMl) => syncml::decode(bytes).map(Document::SyncMl).map_err(reject),
        Some(Kind::Package0) => package0::decode(bytes)
            .map(|(_, n)| Document::Package0(n))
            .map_err(reject),
        None => Err(reject(DecodeError::new(
            ErrorKind::NotWellFormed,
            "",
            "not a delegation message, DelegationError, TNDS document, SyncML DM message or package #0",
        ))),
    }
}

impl Document {
    pub fn kind(&self) -> Kind {
        match self {
            Document::DelegationMessage(_) => Kind::DelegationMessage,
            Document::DelegationError(_) => Kind::DelegationError,
            Document::Tnds(_) => Kind::Tnds,
            Document::SyncMl(_) => Kind::SyncMl,
            Document::Package0(_) => Kind::Package0,
        }
    }

    /// A one-line summary: the kind and the key fields.
    pub fn summary(&self) -> String {
        match self {
            Document::DelegationMessage(m) => delegation_summary(m),
            Document::DelegationError(e) => {
                format!("DelegationError: status {} ({})", e.status_code, e.reason)
            }
            Document::Tnds(t) => tnds_summary(t),
            Document::SyncMl(s) => syncml_summary(s),
            Document::Package0(n) => format!(
                "package #0: version {}, server {}, session {}, ui-mode {:?}, initiator {:?}, {} byte(s) of vendor data",
                n.version,
                n.server_id,
                n.session_id,
                n.ui_mode,
                n.initiator,
                n.vendor_body.len()
            ),
        }
    }
}

fn delegation_summary(m: &Message) -> String {
    let head = format!(
        "{} (version {}) from {} session {} msg {} at {}",
        m.body.name(),
        m.version,
        m.dm_server_id,
        m.session_id,
        m.msg_id,
        m.timestamp
    );
    let detail = match &m.body {
        Body::Notif(n) => {
            let scope: Vec<&str> = n.scope.iter().map(|u| u.as_str()).collect();
            let mut s = format!(
                "{} delegation of {} by the {} server, scope {}",
                n.del_type,
                n.client.dev_id,
                n.sender_role.as_str().to_lowercase(),
                scope.join(" ")
            );
            if let Some(t) = n.not_after {
                s.push_str(&format!(", not after {t}"));
            }
            s
        }
        Body::Res(r) => match r.status_code {
            Some(code) => format!("{} {code}", r.result),
            None => r.result.to_string(),
        },
        Body::Start(s) => match crate::dmacc::DmAccount::from_tnds(&s.dm_acc) {
            Ok(account) => format!(
                "DM Account of {} at {}",
                account.server_id,
                account.address().unwrap_or("(no address)")
            ),
            Err(_) => "DM Account".to_string(),
        },
        Body::Prepared(p) => format!(
            "{} delegation prepared, account {}, {} ACL(s) changed",
            p.del_type,
            p.account_uri,
            p.acl_results.len()
        ),
        Body::Confirm(c) => format!("session established at {}", c.session_established),
        Body::Failure(f) => format!("status {} at step {}: {}", f.status_code, f.step, f.reason),
        Body::Revoke(r) => format!("reason {}", r.reason),
        Body::Release => "authority handed back".to_string(),
    };
    format!("{head}: {detail}")
}

fn tnds_summary(t: &MgmtTree) -> String {
    fn count(nodes: &[tnds::Node], interior: &mut usize, leaves: &mut usize) {
        for n in nodes {
            match &n.content {
                NodeContent::Value(_) => *leaves += 1,
                NodeContent::Children(c) => {
                    *interior += 1;
                    count(c, interior, leaves);
                }
            }
        }
    }
    let (mut interior, mut leaves) = (0, 0);
    count(&t.nodes, &mut interior, &mut leaves);
    let top: Vec<&str> = t.nodes.iter().map(|n| n.name.as_str()).collect();
    format!(
        "TNDS document (VerDTD {}): {interior} interior node(s), {leaves} leaf node(s), top: {}",
        t.ver_dtd,
        top.join(", ")
    )
}

fn syncml_summary(s: &SyncMl) -> String {
    let commands: Vec<&str> = s.body.commands.iter().map(|c| c.name()).collect();
    format!(
        "SyncML DM message ({}) session {} msg {} from {} to {}: {}{}",
        s.hdr.ver_proto,
        s.hdr.session_id,
        s.hdr.msg_id,
        s.hdr.source.loc_uri,
        s.hdr.target.loc_uri,
        if commands.is_empty() {
            "no commands".to_string()
        } else {
            commands.join(", ")
        },
        if s.body.final_ { ", Final" } else { "" }
    )
}

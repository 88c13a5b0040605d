//! The DM Account management object `urn:oma:mo:oma-dm-dmacc:1.0` (PROTOCOL.md B.2).
//!
//! `./DMAcc/<x>/`: `AppID` ("w7"), `ServerID`, `Name`, `PrefConRef`, `AppAddr/<x>/{Addr, AddrType,
//! Port/<x>/PortNbr}`, `AAuthPref`, `AppAuth/<x>/{AAuthLevel, AAuthType, AAuthName, AAuthSecret,
//! AAuthData}`, `Ext`.
//!
//! Decoding choices (where the spec leaves room):
//! - Unknown child nodes are tolerated and ignored, at the account level and inside `AppAddr/<x>`,
//!   `Port/<x>` and `AppAuth/<x>`: vendors and later DM versions extend DMAcc, and a server reading an
//!   account back must not fail on them. They are not kept (re-encoding drops them). The nodes this
//!   module knows are validated strictly: shape (leaf or interior), mandatory presence, enumerated values.
//! - `Ext` is kept whole as TNDS nodes, whatever it holds.
//! - A node with neither a value nor children where a leaf is expected reads as an empty value.
//! - Two children with the same name are an error (TNDS forbids them; a document built in code may not).
//! - Error fields name the node path with the real keys, e.g. `DMAcc/dms1/AppAuth/srv/AAuthType`.
//!   They never carry the value of `AAuthSecret`.

use std::fmt;

use serde::Serialize;

use crate::acl::Acl;
use crate::error::{DecodeError, ErrorKind};
use crate::tnds::{MgmtTree, Node, NodeContent, NodeType, RtProperties};

/// The DDF name of the account node (carried as its `Type`).
pub const DMACC_DDF_NAME: &str = "urn:oma:mo:oma-dm-dmacc:1.0";
/// The only `AppID` of a DM account.
pub const APP_ID: &str = "w7";
/// The URI of the node that holds the accounts.
pub const DMACC_URI: &str = "./DMAcc";

/// A secret value (`AAuthSecret`). Debug and Serialize print `<redacted>`; read it with [`Secret::expose`];
/// wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Never log or print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The value is wiped from memory when the secret is dropped.
impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// `AppAddr/<x>/AddrType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AddrType {
    #[serde(rename = "URI")]
    Uri,
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl AddrType {
    pub const ALL: [AddrType; 3] = [AddrType::Uri, AddrType::Ipv4, AddrType::Ipv6];

    pub fn as_str(self) -> &'static str {
        match self {
            AddrType::Uri => "URI",
            AddrType::Ipv4 => "IPv4",
            AddrType::Ipv6 => "IPv6",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// `AppAuth/<x>/AAuthLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AuthLevel {
    /// The client's credential, presented to the server.
    #[serde(rename = "CLCRED")]
    Clcred,
    /// The server's credential, presented to the client (and used for package #0).
    #[serde(rename = "SRVCRED")]
    Srvcred,
    #[serde(rename = "OBEX")]
    Obex,
    #[serde(rename = "HTTP")]
    Http,
}

impl AuthLevel {
    pub const ALL: [AuthLevel; 4] = [
        AuthLevel::Clcred,
        AuthLevel::Srvcred,
        AuthLevel::Obex,
        AuthLevel::Http,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthLevel::Clcred => "CLCRED",
            AuthLevel::Srvcred => "SRVCRED",
            AuthLevel::Obex => "OBEX",
            AuthLevel::Http => "HTTP",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

/// `AppAddr/<x>/Port/<x>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppPort {
    /// The `<x>` node name.
    pub key: String,
    pub port_nbr: u16,
}

/// `AppAddr/<x>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppAddr {
    /// The `<x>` node name.
    pub key: String,
    pub addr: String,
    pub addr_type: AddrType,
    pub ports: Vec<AppPort>,
}

/// `AppAuth/<x>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppAuth {
    /// The `<x>` node name.
    pub key: String,
    pub level: AuthLevel,
    /// `HTTP-BASIC`, `HTTP-DIGEST`, `BASIC`, `DIGEST`, `HMAC`, `X509`, … (open-ended, never empty).
    pub auth_type: String,
    pub name: Option<String>,
    pub secret: Option<Secret>,
    /// The nonce.
    pub data: Option<String>,
}

/// One DM account (`./DMAcc/<x>`).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct DmAccount {
    pub app_id: String,
    pub server_id: String,
    pub name: Option<String>,
    pub pref_con_ref: Option<String>,
    pub app_addrs: Vec<AppAddr>,
    pub aauth_pref: Option<String>,
    pub app_auths: Vec<AppAuth>,
    /// The `Ext` node and its subtree, as received.
    pub ext: Option<Node>,
}

/// Secrets are printed as `<redacted>`, in `AppAuth` and in `Ext` alike.
impl fmt::Debug for DmAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmAccount")
            .field("app_id", &self.app_id)
            .field("server_id", &self.server_id)
            .field("name", &self.name)
            .field("pref_con_ref", &self.pref_con_ref)
            .field("app_addrs", &self.app_addrs)
            .field("aauth_pref", &self.aauth_pref)
            .field("app_auths", &self.app_auths)
            .field("ext", &self.ext)
            .finish()
    }
}

// ---- reading ----

fn missing(field: &str) -> DecodeError {
    let name = field.rsplit('/').next().unwrap_or(field);
    DecodeError::new(
        ErrorKind::Missing,
        field,
        format!("required node {name} is missing"),
    )
}

fn invalid(field: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::new(ErrorKind::InvalidValue, field, reason)
}

/// Refuses two children with the same name.
fn check_unique(node: &Node, path: &str) -> Result<(), DecodeError> {
    let children = node.children();
    for (i, child) in children.iter().enumerate() {
        if children.iter().take(i).any(|c| c.name == child.name) {
            return Err(DecodeError::new(
                ErrorKind::Unexpected,
                format!("{path}/{}", child.name),
                "two nodes have this name",
            ));
        }
    }
    Ok(())
}

/// The value of the leaf child `name`, if present.
fn opt_leaf<'a>(node: &'a Node, path: &str, name: &str) -> Result<Option<&'a str>, DecodeError> {
    match node.child(name).map(|c| &c.content) {
        None => Ok(None),
        Some(NodeContent::Value(v)) => Ok(Some(v)),
        Some(NodeContent::Children(c)) if c.is_empty() => Ok(Some("")),
        Some(NodeContent::Children(_)) => Err(invalid(
            &format!("{path}/{name}"),
            format!("{name} must be a leaf"),
        )),
    }
}

fn leaf<'a>(node: &'a Node, path: &str, name: &str) -> Result<&'a str, DecodeError> {
    opt_leaf(node, path, name)?.ok_or_else(|| missing(&format!("{path}/{name}")))
}

/// The interior child `name`, if present (checked for duplicate children).
fn opt_interior<'a>(
    node: &'a Node,
    path: &str,
    name: &str,
) -> Result<Option<&'a Node>, DecodeError> {
    match node.child(name) {
        None => Ok(None),
        Some(child) if child.value().is_some() => Err(invalid(
            &format!("{path}/{name}"),
            format!("{name} must be an interior node"),
        )),
        Some(child) => {
            check_unique(child, &format!("{path}/{name}"))?;
            Ok(Some(child))
        }
    }
}

/// The `<x>` children of an interior node; each must be interior and is checked for duplicates.
fn entries<'a>(
    node: &'a Node,
    path: &'a str,
) -> impl Iterator<Item = Result<(&'a Node, String), DecodeError>> + 'a {
    node.children().iter().map(move |entry| {
        let entry_path = format!("{path}/{}", entry.name);
        if entry.value().is_some() {
            return Err(invalid(
                &entry_path,
                "an entry <x> must be an interior node",
            ));
        }
        check_unique(entry, &entry_path)?;
        Ok((entry, entry_path))
    })
}

fn check_server_id(field: &str, id: &str) -> Result<(), DecodeError> {
    let usable = id != "*"
        && format!("Get={id}")
            .parse::<Acl>()
            .is_ok_and(|acl| acl.servers(crate::acl::AclCommand::Get) == [id]);
    if usable {
        Ok(())
    } else {
        Err(invalid(
            field,
            "ServerID must be non-empty and usable in an ACL (no white space, '=', '&', '*' or '+')",
        ))
    }
}

fn read_addr(entry: &Node, path: &str) -> Result<AppAddr, DecodeError> {
    let addr = leaf(entry, path, "Addr")?;
    if addr.is_empty() {
        return Err(invalid(&format!("{path}/Addr"), "Addr must not be empty"));
    }
    let type_text = leaf(entry, path, "AddrType")?;
    let addr_type = AddrType::from_name(type_text).ok_or_else(|| {
        invalid(
            &format!("{path}/AddrType"),
            format!("AddrType '{type_text}' is not URI, IPv4 or IPv6"),
        )
    })?;
    let mut ports = Vec::new();
    if let Some(port_node) = opt_interior(entry, path, "Port")? {
        let port_path = format!("{path}/Port");
        for item in entries(port_node, &port_path) {
            let (port, p) = item?;
            let text = leaf(port, &p, "PortNbr")?;
            let port_nbr = text.parse::<u16>().map_err(|_| {
                invalid(
                    &format!("{p}/PortNbr"),
                    format!("PortNbr '{text}' is not a port number (0-65535)"),
                )
            })?;
            ports.push(AppPort {
                key: port.name.clone(),
                port_nbr,
            });
        }
    }
    Ok(AppAddr {
        key: entry.name.clone(),
        addr: addr.to_string(),
        addr_type,
        ports,
    })
}

fn read_auth(entry: &Node, path: &str) -> Result<AppAuth, DecodeError> {
    let level_text = leaf(entry, path, "AAuthLevel")?;
    let level = AuthLevel::from_name(level_text).ok_or_else(|| {
        invalid(
            &format!("{path}/AAuthLevel"),
            format!("AAuthLevel '{level_text}' is not CLCRED, SRVCRED, OBEX or HTTP"),
        )
    })?;
    let auth_type = leaf(entry, path, "AAuthType")?;
    if auth_type.is_empty() {
        return Err(invalid(
            &format!("{path}/AAuthType"),
            "AAuthType must not be empty",
        ));
    }
    Ok(AppAuth {
        key: entry.name.clone(),
        level,
        auth_type: auth_type.to_string(),
        name: opt_leaf(entry, path, "AAuthName")?.map(String::from),
        secret: opt_leaf(entry, path, "AAuthSecret")?.map(Secret::new),
        data: opt_leaf(entry, path, "AAuthData")?.map(String::from),
    })
}

/// `./DMAcc` read leniently: `./DMAcc`, `DMAcc`, `./DMAcc/`.
fn is_dmacc_path(path: &str) -> bool {
    let p = path.trim();
    let p = p.strip_suffix('/').unwrap_or(p);
    p == DMACC_URI || p == "DMAcc"
}

fn is_root_path(path: &str) -> bool {
    matches!(path.trim(), "." | "./" | "")
}

impl DmAccount {
    /// Reads an account from its TNDS node (the `<x>` node; its name is the key).
    pub fn from_node(node: &Node) -> Result<DmAccount, DecodeError> {
        let path = format!("DMAcc/{}", node.name);
        if node.value().is_some() {
            return Err(invalid(&path, "an account must be an interior node"));
        }
        check_unique(node, &path)?;
        let app_id = leaf(node, &path, "AppID")?;
        if app_id != APP_ID {
            return Err(invalid(
                &format!("{path}/AppID"),
                format!("AppID must be '{APP_ID}', not '{app_id}'"),
            ));
        }
        let server_id = leaf(node, &path, "ServerID")?;
        check_server_id(&format!("{path}/ServerID"), server_id)?;

        let addr_path = format!("{path}/AppAddr");
        let mut app_addrs = Vec::new();
        if let Some(addrs) = opt_interior(node, &path, "AppAddr")? {
            for item in entries(addrs, &addr_path) {
                let (entry, entry_path) = item?;
                app_addrs.push(read_addr(entry, &entry_path)?);
            }
        }
        if app_addrs.is_empty() {
            return Err(DecodeError::new(
                ErrorKind::Missing,
                addr_path,
                "at least one AppAddr/<x> with Addr and AddrType is required",
            ));
        }

        let auth_path = format!("{path}/AppAuth");
        let mut app_auths = Vec::new();
        if let Some(auths) = opt_interior(node, &path, "AppAuth")? {
            for item in entries(auths, &auth_path) {
                let (entry, entry_path) = item?;
                app_auths.push(read_auth(entry, &entry_path)?);
            }
        }

        Ok(DmAccount {
            app_id: app_id.to_string(),
            server_id: server_id.to_string(),
            name: opt_leaf(node, &path, "Name")?.map(String::from),
            pref_con_ref: opt_leaf(node, &path, "PrefConRef")?.map(String::from),
            app_addrs,
            aauth_pref: opt_leaf(node, &path, "AAuthPref")?.map(String::from),
            app_auths,
            ext: node.child("Ext").cloned(),
        })
    }

    /// Reads an account from a TNDS document holding either the account itself as the single top-level
    /// node (no `Path`, or `Path` `./DMAcc`), or a single `DMAcc` node (no `Path` or `Path` `.`) holding
    /// exactly one account. A top-level node named `DMAcc` without a `./DMAcc` Path is taken as the
    /// container, not as an account keyed `DMAcc`.
    pub fn from_tnds(doc: &MgmtTree) -> Result<DmAccount, DecodeError> {
        let [node] = doc.nodes.as_slice() else {
            return Err(DecodeError::new(
                ErrorKind::Unexpected,
                "MgmtTree/Node",
                format!(
                    "expected exactly one top-level Node (an account or ./DMAcc), found {}",
                    doc.nodes.len()
                ),
            ));
        };
        match node.path.as_deref() {
            Some(p) if is_dmacc_path(p) => Self::from_node(node),
            None | Some(_)
                if node.name == "DMAcc" && node.path.as_deref().is_none_or(is_root_path) =>
            {
                check_unique(node, "DMAcc")?;
                match node.children() {
                    [account] => Self::from_node(account),
                    other => Err(DecodeError::new(
                        ErrorKind::Unexpected,
                        "DMAcc",
                        format!(
                            "expected exactly one account under DMAcc, found {}",
                            other.len()
                        ),
                    )),
                }
            }
            None => Self::from_node(node),
            Some(_) => Err(invalid(
                "MgmtTree/Node/Path",
                "an account's Path must be ./DMAcc",
            )),
        }
    }

    /// The account as its TNDS node named `key`, with `Type` = the DMAcc DDF name, children in DDF order.
    /// Absent optional nodes are left out, and so is `AppAuth` when there is no credential.
    pub fn to_node(&self, key: &str) -> Node {
        let mut children = vec![
            Node::leaf("AppID", self.app_id.as_str()),
            Node::leaf("ServerID", self.server_id.as_str()),
        ];
        let opt = |children: &mut Vec<Node>, name: &str, value: &Option<String>| {
            if let Some(v) = value {
                children.push(Node::leaf(name, v.as_str()));
            }
        };
        opt(&mut children, "Name", &self.name);
        opt(&mut children, "PrefConRef", &self.pref_con_ref);
        let addrs = self
            .app_addrs
            .iter()
            .map(|a| {
                let mut kids = vec![
                    Node::leaf("Addr", a.addr.as_str()),
                    Node::leaf("AddrType", a.addr_type.as_str()),
                ];
                if !a.ports.is_empty() {
                    let ports = a
                        .ports
                        .iter()
                        .map(|p| {
                            Node::interior(
                                p.key.as_str(),
                                vec![Node::leaf("PortNbr", p.port_nbr.to_string())],
                            )
                        })
                        .collect();
                    kids.push(Node::interior("Port", ports));
                }
                Node::interior(a.key.as_str(), kids)
            })
            .collect();
        children.push(Node::interior("AppAddr", addrs));
        opt(&mut children, "AAuthPref", &self.aauth_pref);
        if !self.app_auths.is_empty() {
            let auths = self
                .app_auths
                .iter()
                .map(|a| {
                    let mut kids = vec![
                        Node::leaf("AAuthLevel", a.level.as_str()),
                        Node::leaf("AAuthType", a.auth_type.as_str()),
                    ];
                    opt(&mut kids, "AAuthName", &a.name);
                    if let Some(secret) = &a.secret {
                        kids.push(Node::leaf("AAuthSecret", secret.expose()));
                    }
                    opt(&mut kids, "AAuthData", &a.data);
                    Node::interior(a.key.as_str(), kids)
                })
                .collect();
            children.push(Node::interior("AppAuth", auths));
        }
        if let Some(ext) = &self.ext {
            let mut ext = ext.clone();
            ext.name = "Ext".to_string();
            ext.path = None;
            children.push(ext);
        }
        let mut node = Node::interior(key, children);
        node.props = Some(RtProperties {
            node_type: Some(NodeType::DdfName(DMACC_DDF_NAME.to_string())),
            ..RtProperties::default()
        });
        node
    }

    /// A TNDS document holding the account node named `key` with `Path` `./DMAcc`.
    pub fn to_tnds(&self, key: &str) -> MgmtTree {
        MgmtTree {
            ver_dtd: "1.2".to_string(),
            man: None,
            model: None,
            nodes: vec![self.to_node(key).with_path(DMACC_URI)],
        }
    }

    /// The first credential of the given level.
    pub fn credential(&self, level: AuthLevel) -> Option<&AppAuth> {
        self.app_auths.iter().find(|a| a.level == level)
    }

    /// The server's credential (`SRVCRED`): what the client checks, and what signs package #0.
    pub fn server_credential(&self) -> Option<&AppAuth> {
        self.credential(AuthLevel::Srvcred)
    }

    /// The client's credential (`CLCRED`).
    pub fn client_credential(&self) -> Option<&AppAuth> {
        self.credential(AuthLevel::Clcred)
    }

    /// The server's address: the first `AppAddr`'s `Addr`.
    pub fn address(&self) -> Option<&str> {
        self.app_addrs.first().map(|a| a.addr.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::tnds::{decode, encode};

    fn account() -> DmAccount {
        DmAccount {
            app_id: APP_ID.into(),
            server_id: "dms1.example.com".into(),
            name: Some("Operator DM".into()),
            pref_con_ref: None,
            app_addrs: vec![AppAddr {
                key: "1".into(),
                addr: "https://dms1.example.com/dm".into(),
                addr_type: AddrType::Uri,
                ports: vec![AppPort {
                    key: "1".into(),
                    port_nbr: 443,
                }],
            }],
            aauth_pref: Some("HTTP-DIGEST".into()),
            app_auths: vec![
                AppAuth {
                    key: "srv".into(),
                    level: AuthLevel::Srvcred,
                    auth_type: "DIGEST".into(),
                    name: Some("dms1.example.com".into()),
                    secret: Some(Secret::new("s3cr3t-server")),
                    data: Some("bm9uY2U=".into()),
                },
                AppAuth {
                    key: "cli".into(),
                    level: AuthLevel::Clcred,
                    auth_type: "DIGEST".into(),
                    name: Some("IMEI:493005100592800".into()),
                    secret: Some(Secret::new("s3cr3t-client")),
                    data: None,
                },
            ],
            ext: Some(Node::interior(
                "Ext",
                vec![Node::interior(
                    "Delegation",
                    vec![Node::leaf("Type", "Partial")],
                )],
            )),
        }
    }

    #[test]
    fn round_trip() {
        let acc = account();
        assert_eq!(DmAccount::from_node(&acc.to_node("dms1")).unwrap(), acc);
        let doc = acc.to_tnds("dms1");
        assert_eq!(doc.nodes.first().unwrap().path.as_deref(), Some("./DMAcc"));
        let xml = encode(&doc);
        assert_eq!(
            DmAccount::from_tnds(&decode(xml.as_bytes()).unwrap()).unwrap(),
            acc
        );
        // Also inside a DMAcc container.
        let container = MgmtTree {
            nodes: vec![Node::interior("DMAcc", vec![acc.to_node("dms1")])],
            ..doc.clone()
        };
        assert_eq!(DmAccount::from_tnds(&container).unwrap(), acc);
        // Minimal account: no optional nodes.
        let minimal = DmAccount {
            name: None,
            aauth_pref: None,
            app_auths: vec![],
            ext: None,
            ..acc.clone()
        };
        let node = minimal.to_node("m");
        assert!(node.child("AppAuth").is_none());
        assert_eq!(DmAccount::from_node(&node).unwrap(), minimal);
        // Accessors.
        assert_eq!(acc.server_credential().unwrap().key, "srv");
        assert_eq!(
            acc.client_credential()
                .unwrap()
                .secret
                .as_ref()
                .unwrap()
                .expose(),
            "s3cr3t-client"
        );
        assert_eq!(acc.address(), Some("https://dms1.example.com/dm"));
    }

    fn kids(node: &mut Node) -> Option<&mut Vec<Node>> {
        match &mut node.content {
            NodeContent::Children(c) => Some(c),
            NodeContent::Value(_) => None,
        }
    }

    /// Removes the descendant at `relative` (e.g. `AppAuth/srv/AAuthType`).
    fn remove(node: &mut Node, relative: &str) {
        let (parent, name) = match relative.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, relative),
        };
        let mut target = node;
        if let Some(parent) = parent {
            for seg in parent.split('/') {
                target = kids(target)
                    .unwrap()
                    .iter_mut()
                    .find(|n| n.name == seg)
                    .unwrap();
            }
        }
        let c = kids(target).unwrap();
        let before = c.len();
        c.retain(|n| n.name != name);
        assert_eq!(c.len(), before - 1, "{relative}");
    }

    #[test]
    fn each_missing_mandatory_node_is_named() {
        for (relative, field) in [
            ("AppID", "DMAcc/dms1/AppID"),
            ("ServerID", "DMAcc/dms1/ServerID"),
            ("AppAddr", "DMAcc/dms1/AppAddr"),
            ("AppAddr/1", "DMAcc/dms1/AppAddr"),
            ("AppAddr/1/Addr", "DMAcc/dms1/AppAddr/1/Addr"),
            ("AppAddr/1/AddrType", "DMAcc/dms1/AppAddr/1/AddrType"),
            (
                "AppAddr/1/Port/1/PortNbr",
                "DMAcc/dms1/AppAddr/1/Port/1/PortNbr",
            ),
            (
                "AppAuth/srv/AAuthLevel",
                "DMAcc/dms1/AppAuth/srv/AAuthLevel",
            ),
            ("AppAuth/cli/AAuthType", "DMAcc/dms1/AppAuth/cli/AAuthType"),
        ] {
            let mut node = account().to_node("dms1");
            remove(&mut node, relative);
            let err = DmAccount::from_node(&node).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Missing, "{relative}: {err}");
            assert_eq!(err.field, field, "{relative}: {err}");
            assert_eq!(err.status(), 400);
        }
        // Optional nodes may go.
        for relative in [
            "Name",
            "AAuthPref",
            "Ext",
            "AppAuth",
            "AppAddr/1/Port",
            "AppAuth/srv/AAuthSecret",
            "AppAuth/srv/AAuthData",
            "AppAuth/srv/AAuthName",
        ] {
            let mut node = account().to_node("dms1");
            remove(&mut node, relative);
            DmAccount::from_node(&node).unwrap();
        }
    }

    #[test]
    fn invalid_values_are_refused() {
        let set = |relative: &str, value: &str| {
            let mut acc = account().to_node("dms1");
            let mut target = &mut acc;
            for seg in relative.split('/') {
                target = kids(target)
                    .unwrap()
                    .iter_mut()
                    .find(|n| n.name == seg)
                    .unwrap();
            }
            target.content = NodeContent::Value(value.to_string());
            DmAccount::from_node(&acc).unwrap_err()
        };
        for (relative, value) in [
            ("AppID", "w8"),
            ("ServerID", ""),
            ("ServerID", "a b"),
            ("ServerID", "*"),
            ("AppAddr/1/AddrType", "IPX"),
            ("AppAddr/1/Addr", ""),
            ("AppAddr/1/Port/1/PortNbr", "70000"),
            ("AppAuth/srv/AAuthLevel", "srvcred"),
            ("AppAuth/srv/AAuthType", ""),
            ("AppAddr", "leaf"),
            ("AppAuth/srv", "leaf"),
        ] {
            let err = set(relative, value);
            assert_eq!(
                err.kind,
                ErrorKind::InvalidValue,
                "{relative}={value}: {err}"
            );
            assert!(err.field.ends_with(relative), "{relative}: {err}");
        }
        // A duplicate child.
        let mut node = account().to_node("dms1");
        if let NodeContent::Children(c) = &mut node.content {
            c.push(Node::leaf("AppID", "w7"));
        }
        assert_eq!(
            DmAccount::from_node(&node).unwrap_err().kind,
            ErrorKind::Unexpected
        );
        // A leaf account.
        assert!(DmAccount::from_node(&Node::leaf("dms1", "x")).is_err());
    }

    #[test]
    fn document_shapes() {
        let acc = account();
        let doc = |nodes: Vec<Node>| MgmtTree {
            ver_dtd: "1.2".into(),
            man: None,
            model: None,
            nodes,
        };
        // The account without Path.
        assert_eq!(
            DmAccount::from_tnds(&doc(vec![acc.to_node("x")])).unwrap(),
            acc
        );
        for (bad, why) in [
            (doc(vec![]), "no node"),
            (
                doc(vec![acc.to_node("a"), acc.to_node("b")]),
                "two top-level nodes",
            ),
            (
                doc(vec![acc.to_node("a").with_path("./Other")]),
                "wrong path",
            ),
            (doc(vec![Node::interior("DMAcc", vec![])]), "empty DMAcc"),
            (
                doc(vec![Node::interior(
                    "DMAcc",
                    vec![acc.to_node("a"), acc.to_node("b")],
                )]),
                "two accounts",
            ),
        ] {
            assert!(DmAccount::from_tnds(&bad).is_err(), "{why}");
        }
    }

    /// Written by hand after OMA-TS-DM_StdObj (DMAcc) and OMA-TS-DM_TND (TNDS), not by our encoder:
    /// RTProperties on some nodes, Format and Type, a vendor node the MO does not define.
    const HAND_WRITTEN: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE MgmtTree PUBLIC "-//OMA//DTD-DM-DDF 1.2//EN" "http://www.openmobilealliance.org/tech/DTD/DM_DDF-V1_2.dtd">
<MgmtTree>
  <VerDTD>1.2</VerDTD>
  <Man>Example Devices</Man>
  <Mod>Sim-1</Mod>
  <Node>
    <NodeName>DMAcc</NodeName>
    <RTProperties>
      <ACL>Get=*&amp;Replace=com.example.dms1</ACL>
      <Format><node/></Format>
    </RTProperties>
    <Node>
      <NodeName>ExampleDMS</NodeName>
      <RTProperties>
        <ACL>Get=com.example.dms1&amp;Replace=com.example.dms1&amp;Delete=com.example.dms1</ACL>
        <Format><node/></Format>
        <Type><DDFName>urn:oma:mo:oma-dm-dmacc:1.0</DDFName></Type>
      </RTProperties>
      <Node><NodeName>AppID</NodeName><RTProperties><Format><chr/></Format></RTProperties><Value>w7</Value></Node>
      <Node><NodeName>ServerID</NodeName><Value>com.example.dms1</Value></Node>
      <Node><NodeName>Name</NodeName><Value>Example Operator</Value></Node>
      <Node><NodeName>PrefConRef</NodeName><Value>./ConMO/Internet</Value></Node>
      <Node>
        <NodeName>AppAddr</NodeName>
        <Node>
          <NodeName>SrvAddr</NodeName>
          <Node><NodeName>Addr</NodeName><Value>https://dm.example.com:8443/dm</Value></Node>
          <Node><NodeName>AddrType</NodeName><Value>URI</Value></Node>
          <Node>
            <NodeName>Port</NodeName>
            <Node>
              <NodeName>Port1</NodeName>
              <Node><NodeName>PortNbr</NodeName><RTProperties><Format><int/></Format></RTProperties><Value>8443</Value></Node>
            </Node>
          </Node>
        </Node>
      </Node>
      <Node><NodeName>AAuthPref</NodeName><Value>HTTP-DIGEST</Value></Node>
      <Node>
        <NodeName>AppAuth</NodeName>
        <Node>
          <NodeName>ClientSide</NodeName>
          <Node><NodeName>AAuthLevel</NodeName><Value>CLCRED</Value></Node>
          <Node><NodeName>AAuthType</NodeName><Value>DIGEST</Value></Node>
          <Node><NodeName>AAuthName</NodeName><Value>IMEI:493005100592800</Value></Node>
          <Node><NodeName>AAuthSecret</NodeName><Value>clientpwd-1234</Value></Node>
          <Node><NodeName>AAuthData</NodeName><RTProperties><Format><bin/></Format></RTProperties><Value>MTIzNDU2Nzg5MGFiY2RlZg==</Value></Node>
        </Node>
        <Node>
          <NodeName>ServerSide</NodeName>
          <Node><NodeName>AAuthLevel</NodeName><Value>SRVCRED</Value></Node>
          <Node><NodeName>AAuthType</NodeName><Value>DIGEST</Value></Node>
          <Node><NodeName>AAuthName</NodeName><Value>com.example.dms1</Value></Node>
          <Node><NodeName>AAuthSecret</NodeName><Value>serverpwd-5678</Value></Node>
          <Node><NodeName>AAuthData</NodeName><Value>ZmVkY2JhOTg3NjU0MzIxMA==</Value></Node>
        </Node>
        <Node>
          <NodeName>Transport</NodeName>
          <Node><NodeName>AAuthLevel</NodeName><Value>HTTP</Value></Node>
          <Node><NodeName>AAuthType</NodeName><Value>HTTP-BASIC</Value></Node>
          <Node><NodeName>AAuthName</NodeName><Value>device</Value></Node>
        </Node>
      </Node>
      <Node>
        <NodeName>Ext</NodeName>
        <Node><NodeName>VendorFlag</NodeName><Value>1</Value></Node>
      </Node>
      <Node><NodeName>X-Vendor-Unknown</NodeName><Value>ignored</Value></Node>
    </Node>
  </Node>
</MgmtTree>
"#;

    #[test]
    fn hand_written_account_decodes() {
        let doc = decode(HAND_WRITTEN.as_bytes()).unwrap();
        let acc = DmAccount::from_tnds(&doc).unwrap();
        assert_eq!(acc.server_id, "com.example.dms1");
        assert_eq!(acc.name.as_deref(), Some("Example Operator"));
        assert_eq!(acc.pref_con_ref.as_deref(), Some("./ConMO/Internet"));
        assert_eq!(acc.address(), Some("https://dm.example.com:8443/dm"));
        assert_eq!(acc.app_addrs.first().unwrap().key, "SrvAddr");
        assert_eq!(acc.app_addrs.first().unwrap().addr_type, AddrType::Uri);
        assert_eq!(
            acc.app_addrs.first().unwrap().ports,
            [AppPort {
                key: "Port1".into(),
                port_nbr: 8443
            }]
        );
        assert_eq!(acc.aauth_pref.as_deref(), Some("HTTP-DIGEST"));
        assert_eq!(acc.app_auths.len(), 3);
        let srv = acc.server_credential().unwrap();
        assert_eq!(srv.key, "ServerSide");
        assert_eq!(srv.name.as_deref(), Some("com.example.dms1"));
        assert_eq!(srv.secret.as_ref().unwrap().expose(), "serverpwd-5678");
        assert_eq!(srv.data.as_deref(), Some("ZmVkY2JhOTg3NjU0MzIxMA=="));
        let cli = acc.client_credential().unwrap();
        assert_eq!(cli.auth_type, "DIGEST");
        assert_eq!(acc.credential(AuthLevel::Http).unwrap().secret, None);
        assert_eq!(
            acc.ext
                .as_ref()
                .unwrap()
                .find("VendorFlag")
                .unwrap()
                .value(),
            Some("1")
        );
        // Re-encoding keeps everything but the unknown node.
        let again = DmAccount::from_tnds(&acc.to_tnds("ExampleDMS")).unwrap();
        assert_eq!(again, acc);
        assert!(
            acc.to_node("ExampleDMS")
                .child("X-Vendor-Unknown")
                .is_none()
        );
    }

    #[test]
    fn debug_and_serialize_hide_secrets() {
        let mut acc = account();
        if let Some(NodeContent::Children(c)) = acc.ext.as_mut().map(|e| &mut e.content) {
            c.push(Node::leaf("AAuthSecret", "ext-secret"));
        }
        let shown = format!("{acc:?} {acc:#?} {}", serde_json::to_string(&acc).unwrap());
        for secret in ["s3cr3t-server", "s3cr3t-client", "ext-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("dms1.example.com"));
        // Errors never carry the secret either.
        let mut node = acc.to_node("dms1");
        remove(&mut node, "AppAuth/srv/AAuthLevel");
        let err = DmAccount::from_node(&node).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("s3cr3t"));
    }
}

//! The run-time DM tree of one device and the access decisions on it (PROTOCOL.md B.3, B.5, B.7).
//!
//! Used both by the simulated DM client (which holds the tree) and by the server side (which keeps a
//! model of what it believes the device holds, and compares TNDS exports after a restore).
//!
//! # Storage
//!
//! A nested tree: every node owns its name, its own ACL (empty = inherit), its optional `Format` and
//! `Type`, the rarer run-time properties (`Name`, `Size`, `Title`, `TStamp`, `VerNo`) boxed only when
//! present, and either a leaf value or its children. Children are kept **sorted by name** (byte order):
//! sibling order carries no meaning in a DM tree, lookups are binary searches, and every export is
//! canonical. No per-node maps; a small idle device tree takes a few KiB ([`DmTree::approx_heap_bytes`]).
//!
//! The tree is never deeper than [`MAX_DEPTH`] levels below the root, so every recursive walk is bounded.
//!
//! # Operations and checks
//!
//! The operations ([`DmTree::add_leaf`], [`DmTree::replace_value`], …) do no access control; the caller
//! asks [`DmTree::check`], [`DmTree::check_acl_change`] and [`DmTree::check_root_acl_change`] first.
//!
//! # TNDS export shape
//!
//! [`DmTree::to_tnds`] gives `MgmtTree { VerDTD 1.2, no Man, no Mod }` with exactly one top-level `Node`:
//! the root, `NodeName` `.`, no `Path`, holding the whole tree. Children appear sorted by name. A node has
//! `RTProperties` only when it carries at least one property; the `ACL` element appears on every node whose
//! own ACL has a value (always on the root). `Format` and `Type` appear as stored (as received). Leaves have
//! a `Value` (possibly empty); interior nodes have none. [`DmTree::export_subtree`] gives the same shape
//! for one node, with `Path` = the URI of its parent, so [`DmTree::from_tnds`] puts it back in place.

use std::fmt;
use std::sync::LazyLock;

use serde::Serialize;

use crate::acl::{Acl, AclCommand};
use crate::tnds::{Format, MgmtTree, Node, NodeContent, NodeType, RtProperties, SECRET_NODE_NAMES};
use crate::types::DmUri;

/// How many levels below the root the tree may grow (`./a/b` is 2 levels). Deeper URIs get 414.
pub const MAX_DEPTH: usize = 64;

/// The node name that stands for the root in a TNDS document.
pub const ROOT_NAME: &str = ".";

/// Node names whose value is a server nonce (B.7: ignored when comparing restored accounts).
pub const NONCE_NODE_NAME: &str = "AAuthData";

static DEFAULT_ROOT_ACL: LazyLock<Acl> = LazyLock::new(Acl::default_root);

fn is_secret(name: &str) -> bool {
    SECRET_NODE_NAMES.contains(&name)
}

/// Why a tree operation failed, with the DM status code to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum TreeError {
    /// No node at this URI (404). For an add, the missing node is the parent.
    #[error("{0}: no such node")]
    NotFound(DmUri),
    /// A node already exists at this URI (418).
    #[error("{0}: the node already exists")]
    AlreadyExists(DmUri),
    /// The node is a leaf where an interior node is needed, e.g. as a parent (405).
    #[error("{0}: is a leaf, not an interior node")]
    NotInterior(DmUri),
    /// The node is interior where a leaf is needed, e.g. to replace a value (405).
    #[error("{0}: is an interior node, not a leaf")]
    NotLeaf(DmUri),
    /// An operation the root does not allow, e.g. deleting it (405).
    #[error("the root node cannot be {0}")]
    Root(&'static str),
    /// The URI is more than [`MAX_DEPTH`] levels deep (414, URI too long).
    #[error("{0}: deeper than {MAX_DEPTH} levels")]
    TooDeep(String),
    /// A TNDS document that does not describe a tree (400): bad name or path, duplicate node, …
    #[error("{path}: {reason}")]
    InvalidTnds { path: String, reason: String },
}

impl TreeError {
    /// The DM status code (B.4) to answer for this error.
    pub fn status(&self) -> u16 {
        match self {
            TreeError::NotFound(_) => 404,
            TreeError::AlreadyExists(_) => 418,
            TreeError::NotInterior(_) | TreeError::NotLeaf(_) | TreeError::Root(_) => 405,
            TreeError::TooDeep(_) => 414,
            TreeError::InvalidTnds { .. } => 400,
        }
    }

    fn invalid(path: impl fmt::Display, reason: impl Into<String>) -> Self {
        TreeError::InvalidTnds {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// Why an access check refused a command, with the DM status code to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "denied", rename_all = "snake_case")]
pub enum Denied {
    /// No node at this URI (404). For an Add, the URI is the missing parent.
    #[error("{0}: no such node")]
    NotFound(DmUri),
    /// The ACL in force does not grant the right (425).
    #[error("{server} has no {command} right on {uri}")]
    Permission {
        server: String,
        command: AclCommand,
        uri: DmUri,
    },
    /// A root ACL whose `Add` entry is not `*` (405).
    #[error("the root ACL's Add entry must stay '*'")]
    RootAddMustBeStar,
    /// The node is too deep to exist (414).
    #[error("{0}: deeper than {MAX_DEPTH} levels")]
    TooDeep(DmUri),
}

impl Denied {
    /// The DM status code (B.4) to answer.
    pub fn status(&self) -> u16 {
        match self {
            Denied::NotFound(_) => 404,
            Denied::Permission { .. } => 425,
            Denied::RootAddMustBeStar => 405,
            Denied::TooDeep(_) => 414,
        }
    }
}

/// Run-time properties that are rare enough to be boxed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ExtraProps {
    name: Option<String>,
    size: Option<String>,
    title: Option<String>,
    tstamp: Option<String>,
    ver_no: Option<String>,
}

impl ExtraProps {
    fn from_props(p: &RtProperties) -> Option<Box<Self>> {
        let extra = Self {
            name: p.name.clone(),
            size: p.size.clone(),
            title: p.title.clone(),
            tstamp: p.tstamp.clone(),
            ver_no: p.ver_no.clone(),
        };
        (extra != Self::default()).then(|| Box::new(extra))
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Content {
    Leaf(Box<str>),
    Interior(Vec<DmNode>),
}

/// One node of a [`DmTree`]. Read it through the accessors; change it through the tree.
#[derive(Clone, PartialEq, Eq)]
pub struct DmNode {
    name: Box<str>,
    acl: Acl,
    format: Option<Format>,
    node_type: Option<Box<NodeType>>,
    extra: Option<Box<ExtraProps>>,
    content: Content,
}

impl DmNode {
    fn new(name: &str, content: Content) -> Self {
        Self {
            name: name.into(),
            acl: Acl::empty(),
            format: None,
            node_type: None,
            extra: None,
            content,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_leaf(&self) -> bool {
        matches!(self.content, Content::Leaf(_))
    }

    /// The leaf's value; `None` for an interior node.
    pub fn value(&self) -> Option<&str> {
        match &self.content {
            Content::Leaf(v) => Some(v),
            Content::Interior(_) => None,
        }
    }

    /// The node's own ACL (empty = inherits).
    pub fn acl(&self) -> &Acl {
        &self.acl
    }

    pub fn format(&self) -> Option<Format> {
        self.format
    }

    pub fn node_type(&self) -> Option<&NodeType> {
        self.node_type.as_deref()
    }

    /// The children, sorted by name; empty for a leaf.
    pub fn children(&self) -> &[DmNode] {
        match &self.content {
            Content::Leaf(_) => &[],
            Content::Interior(c) => c,
        }
    }

    pub fn child(&self, name: &str) -> Option<&DmNode> {
        let children = self.children();
        children
            .binary_search_by(|c| (*c.name).cmp(name))
            .ok()
            .and_then(|at| children.get(at))
    }

    fn child_mut(&mut self, name: &str) -> Option<&mut DmNode> {
        match &mut self.content {
            Content::Leaf(_) => None,
            Content::Interior(children) => {
                let at = children.binary_search_by(|c| (*c.name).cmp(name)).ok()?;
                children.get_mut(at)
            }
        }
    }

    fn props(&self) -> Option<RtProperties> {
        let extra = self.extra.as_deref().cloned().unwrap_or_default();
        let props = RtProperties {
            acl: (!self.acl.is_empty()).then(|| self.acl.clone()),
            format: self.format,
            name: extra.name,
            size: extra.size,
            title: extra.title,
            tstamp: extra.tstamp,
            node_type: self.node_type.as_deref().cloned(),
            ver_no: extra.ver_no,
        };
        (props != RtProperties::default()).then_some(props)
    }

    /// This node and its subtree as a TNDS node (no `Path`), in the canonical export shape.
    pub fn to_tnds(&self) -> Node {
        Node {
            name: self.name.to_string(),
            path: None,
            props: self.props(),
            content: match &self.content {
                Content::Leaf(v) => NodeContent::Value(v.to_string()),
                Content::Interior(c) => {
                    NodeContent::Children(c.iter().map(DmNode::to_tnds).collect())
                }
            },
        }
    }

    fn count(&self) -> usize {
        1 + self.children().iter().map(DmNode::count).sum::<usize>()
    }

    fn heap_bytes(&self) -> usize {
        let acl: usize = self.acl.entries.capacity() * size_of::<crate::acl::AclEntry>()
            + self
                .acl
                .entries
                .iter()
                .map(|e| {
                    e.servers.capacity() * size_of::<String>()
                        + e.servers.iter().map(String::capacity).sum::<usize>()
                })
                .sum::<usize>();
        let node_type = self.node_type.as_deref().map_or(0, |t| {
            size_of::<NodeType>()
                + match t {
                    NodeType::Mime(s) | NodeType::DdfName(s) => s.capacity(),
                }
        });
        let extra = self.extra.as_deref().map_or(0, |e| {
            size_of::<ExtraProps>()
                + [&e.name, &e.size, &e.title, &e.tstamp, &e.ver_no]
                    .into_iter()
                    .flatten()
                    .map(String::capacity)
                    .sum::<usize>()
        });
        let content = match &self.content {
            Content::Leaf(v) => v.len(),
            Content::Interior(c) => {
                (c.capacity() - c.len()) * size_of::<DmNode>()
                    + c.iter()
                        .map(|n| size_of::<DmNode>() + n.heap_bytes())
                        .sum::<usize>()
            }
        };
        self.name.len() + acl + node_type + extra + content
    }
}

/// Prints values, except those of secret nodes (`AAuthSecret`).
impl fmt::Debug for DmNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DmNode");
        d.field("name", &&*self.name);
        if !self.acl.is_empty() {
            d.field("acl", &format_args!("{}", self.acl));
        }
        if let Some(format) = self.format {
            d.field("format", &format);
        }
        if let Some(t) = &self.node_type {
            d.field("type", t);
        }
        if let Some(e) = &self.extra {
            d.field("props", e);
        }
        match &self.content {
            Content::Leaf(_) if is_secret(&self.name) => d.field("value", &"<redacted>"),
            Content::Leaf(v) => d.field("value", v),
            Content::Interior(c) => d.field("children", c),
        };
        d.finish()
    }
}

/// Serialized as its TNDS node (secret values redacted by [`Node`]'s serializer).
impl Serialize for DmNode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_tnds().serialize(s)
    }
}

/// The DM tree of one device. See the module documentation for storage and export shape.
#[derive(Clone, PartialEq, Eq)]
pub struct DmTree {
    root: DmNode,
}

impl fmt::Debug for DmTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmTree").field("root", &self.root).finish()
    }
}

/// Serialized as its TNDS export (secret values redacted).
impl Serialize for DmTree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_tnds().serialize(s)
    }
}

impl Default for DmTree {
    fn default() -> Self {
        Self::new()
    }
}

fn depth_of(uri: &DmUri) -> usize {
    if uri.is_root() {
        0
    } else {
        uri.segments().count()
    }
}

/// Reads a TNDS `Path` leniently: `./A`, `A`, `./A/` and `.` are accepted.
fn parse_path(path: &str) -> Result<DmUri, TreeError> {
    let trimmed = path.trim();
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let text = if trimmed.is_empty() || trimmed == "." {
        ".".to_string()
    } else if trimmed.starts_with("./") {
        trimmed.to_string()
    } else {
        format!("./{trimmed}")
    };
    text.parse::<DmUri>()
        .map_err(|reason| TreeError::invalid(format!("Path '{path}'"), reason))
}

/// Builds a node (and its subtree) from TNDS. `uri` is where it will live.
fn convert(node: &Node, uri: &DmUri) -> Result<DmNode, TreeError> {
    if depth_of(uri) > MAX_DEPTH {
        return Err(TreeError::TooDeep(uri.to_string()));
    }
    let name = uri.name().unwrap_or(ROOT_NAME);
    let props = node.props.as_ref();
    let format = props.and_then(|p| p.format);
    let content = match &node.content {
        NodeContent::Value(v) => Content::Leaf(v.as_str().into()),
        // A node with neither value nor children is a leaf with an empty value when its Format says so.
        NodeContent::Children(c) if c.is_empty() && format.is_some_and(|f| f != Format::Node) => {
            Content::Leaf("".into())
        }
        NodeContent::Children(_) => Content::Interior(Vec::new()),
    };
    let mut out = DmNode::new(name, content);
    if let Some(p) = props {
        out.acl = p.acl.clone().unwrap_or_default();
        out.format = p.format;
        out.node_type = p.node_type.clone().map(Box::new);
        out.extra = ExtraProps::from_props(p);
    }
    for child in node.children() {
        let child_uri = uri.join(&child.name).map_err(|reason| {
            TreeError::invalid(uri, format!("child NodeName '{}' {reason}", child.name))
        })?;
        let converted = convert(child, &child_uri)?;
        graft(&mut out, uri, converted, &mut Vec::new())?;
    }
    Ok(out)
}

/// Inserts `incoming` under `parent` (at `parent_uri`). A node already there is an error, unless it was
/// created implicitly for a `Path` (listed in `implicit`) and `incoming` is interior: then `incoming`
/// claims it (takes its properties) and their children are merged by the same rule.
fn graft(
    parent: &mut DmNode,
    parent_uri: &DmUri,
    incoming: DmNode,
    implicit: &mut Vec<DmUri>,
) -> Result<(), TreeError> {
    let uri = parent_uri
        .join(&incoming.name)
        .map_err(|reason| TreeError::invalid(parent_uri, reason))?;
    let Content::Interior(children) = &mut parent.content else {
        return Err(TreeError::invalid(
            parent_uri,
            "a leaf cannot have child nodes",
        ));
    };
    match children.binary_search_by(|c| (*c.name).cmp(&incoming.name)) {
        Err(at) => {
            children.insert(at, incoming);
            Ok(())
        }
        Ok(at) => {
            let claimable = implicit.iter().position(|u| *u == uri);
            let (Some(pos), Some(existing)) = (claimable, children.get_mut(at)) else {
                return Err(TreeError::invalid(&uri, "two nodes describe the same URI"));
            };
            // Taken off the list first: claiming may remove (and so move) other entries.
            implicit.swap_remove(pos);
            claim(existing, &uri, incoming, implicit)
        }
    }
}

/// `existing` (interior, created implicitly) takes `incoming`'s properties and children.
fn claim(
    existing: &mut DmNode,
    uri: &DmUri,
    incoming: DmNode,
    implicit: &mut Vec<DmUri>,
) -> Result<(), TreeError> {
    let Content::Interior(kids) = incoming.content else {
        return Err(TreeError::invalid(
            uri,
            "a leaf is placed where the document already has an interior node",
        ));
    };
    existing.acl = incoming.acl;
    existing.format = incoming.format;
    existing.node_type = incoming.node_type;
    existing.extra = incoming.extra;
    for kid in kids {
        graft(existing, uri, kid, implicit)?;
    }
    Ok(())
}

impl DmTree {
    /// A tree with only the root, whose ACL is the default `Add=*&Get=*`.
    pub fn new() -> Self {
        let mut root = DmNode::new(ROOT_NAME, Content::Interior(Vec::new()));
        root.acl = Acl::default_root();
        Self { root }
    }

    /// Builds a tree from a TNDS document.
    ///
    /// - A top-level node without `Path` whose `NodeName` is empty or `.` is the root itself (at most one;
    ///   it must be interior; an absent or empty ACL on it means the default root ACL).
    /// - Any other top-level node without `Path` is a child of the root.
    /// - A node with a `Path` goes under that URI (`./DMAcc`; `DMAcc`, `./DMAcc/` and `.` are accepted too);
    ///   missing interior parents are created with an empty ACL. A later node may describe such an implicit
    ///   parent (then it gives it its properties); any other second description of a URI is an error.
    /// - Node names must be valid URI segments (non-empty, not `.`/`..`, no `/` or `?`).
    /// - A node with neither `Value` nor children whose `Format` is other than `node` is an empty leaf.
    pub fn from_tnds(doc: &MgmtTree) -> Result<DmTree, TreeError> {
        let mut tree = DmTree::new();
        let mut root_claimed = false;
        let mut implicit: Vec<DmUri> = Vec::new();
        let root_uri = DmUri::root();
        for (i, node) in doc.nodes.iter().enumerate() {
            let is_root = node.path.is_none() && (node.name.is_empty() || node.name == ROOT_NAME);
            if is_root {
                if root_claimed {
                    return Err(TreeError::invalid(
                        format!("MgmtTree/Node[{i}]"),
                        "the document describes the root twice",
                    ));
                }
                root_claimed = true;
                let incoming = convert(node, &root_uri)?;
                if incoming.is_leaf() {
                    return Err(TreeError::invalid(".", "the root must be an interior node"));
                }
                claim(&mut tree.root, &root_uri, incoming, &mut implicit)?;
                if tree.root.acl.is_empty() {
                    tree.root.acl = Acl::default_root();
                }
                continue;
            }
            let parent_uri = match &node.path {
                None => root_uri.clone(),
                Some(path) => parse_path(path)?,
            };
            let uri = parent_uri.join(&node.name).map_err(|reason| {
                TreeError::invalid(
                    format!("MgmtTree/Node[{i}]"),
                    format!("NodeName '{}' {reason}", node.name),
                )
            })?;
            let converted = convert(node, &uri)?;
            let parent = tree.make_interior_path(&parent_uri, &mut implicit)?;
            graft(parent, &parent_uri, converted, &mut implicit)?;
        }
        Ok(tree)
    }

    /// The interior node at `uri`, creating missing interior nodes (recorded in `implicit`).
    fn make_interior_path(
        &mut self,
        uri: &DmUri,
        implicit: &mut Vec<DmUri>,
    ) -> Result<&mut DmNode, TreeError> {
        if depth_of(uri) > MAX_DEPTH {
            return Err(TreeError::TooDeep(uri.to_string()));
        }
        let mut node = &mut self.root;
        let mut here = DmUri::root();
        for seg in uri.segments() {
            here = here
                .join(seg)
                .map_err(|reason| TreeError::invalid(uri, reason))?;
            let Content::Interior(children) = &mut node.content else {
                return Err(TreeError::invalid(&here, "the Path goes through a leaf"));
            };
            let at = match children.binary_search_by(|c| (*c.name).cmp(seg)) {
                Ok(at) => at,
                Err(at) => {
                    children.insert(at, DmNode::new(seg, Content::Interior(Vec::new())));
                    implicit.push(here.clone());
                    at
                }
            };
            node = children
                .get_mut(at)
                .ok_or_else(|| TreeError::NotFound(here.clone()))?;
        }
        if node.is_leaf() {
            return Err(TreeError::invalid(uri, "the Path names a leaf"));
        }
        Ok(node)
    }

    /// The canonical TNDS export of the whole tree (shape in the module documentation).
    pub fn to_tnds(&self) -> MgmtTree {
        MgmtTree {
            ver_dtd: "1.2".to_string(),
            man: None,
            model: None,
            nodes: vec![self.root.to_tnds()],
        }
    }

    /// The TNDS export of the subtree at `uri`: one top-level node whose `Path` is the parent's URI
    /// (the whole export, as [`DmTree::to_tnds`], for the root).
    pub fn export_subtree(&self, uri: &DmUri) -> Result<MgmtTree, TreeError> {
        let node = self.get(uri)?;
        let mut out = node.to_tnds();
        out.path = uri.parent().map(|p| p.to_string());
        Ok(MgmtTree {
            ver_dtd: "1.2".to_string(),
            man: None,
            model: None,
            nodes: vec![out],
        })
    }

    pub fn root(&self) -> &DmNode {
        &self.root
    }

    fn node(&self, uri: &DmUri) -> Option<&DmNode> {
        uri.segments()
            .try_fold(&self.root, |node, seg| node.child(seg))
    }

    fn node_mut(&mut self, uri: &DmUri) -> Option<&mut DmNode> {
        uri.segments()
            .try_fold(&mut self.root, |node, seg| node.child_mut(seg))
    }

    fn node_mut_or_404(&mut self, uri: &DmUri) -> Result<&mut DmNode, TreeError> {
        self.node_mut(uri)
            .ok_or_else(|| TreeError::NotFound(uri.clone()))
    }

    /// The node at `uri` (404 when absent).
    pub fn get(&self, uri: &DmUri) -> Result<&DmNode, TreeError> {
        self.node(uri)
            .ok_or_else(|| TreeError::NotFound(uri.clone()))
    }

    pub fn exists(&self, uri: &DmUri) -> bool {
        self.node(uri).is_some()
    }

    /// A leaf's value (404 absent, 405 interior).
    pub fn value(&self, uri: &DmUri) -> Result<&str, TreeError> {
        self.get(uri)?
            .value()
            .ok_or_else(|| TreeError::NotLeaf(uri.clone()))
    }

    /// The names of an interior node's children, sorted (404 absent, 405 leaf).
    pub fn children(&self, uri: &DmUri) -> Result<Vec<&str>, TreeError> {
        match &self.get(uri)?.content {
            Content::Interior(c) => Ok(c.iter().map(DmNode::name).collect()),
            Content::Leaf(_) => Err(TreeError::NotInterior(uri.clone())),
        }
    }

    /// Inserts `node` (named by the last segment of `uri`) under its parent.
    /// 418 if the node exists, 404 if the parent does not, 405 if the parent is a leaf.
    fn insert(&mut self, uri: &DmUri, mut node: DmNode) -> Result<(), TreeError> {
        let (Some(parent_uri), Some(name)) = (uri.parent(), uri.name()) else {
            return Err(TreeError::AlreadyExists(uri.clone()));
        };
        if depth_of(uri) > MAX_DEPTH {
            return Err(TreeError::TooDeep(uri.to_string()));
        }
        let parent = self
            .node_mut(&parent_uri)
            .ok_or_else(|| TreeError::NotFound(parent_uri.clone()))?;
        let Content::Interior(children) = &mut parent.content else {
            return Err(TreeError::NotInterior(parent_uri));
        };
        match children.binary_search_by(|c| (*c.name).cmp(name)) {
            Ok(_) => Err(TreeError::AlreadyExists(uri.clone())),
            Err(at) => {
                node.name = name.into();
                children.insert(at, node);
                Ok(())
            }
        }
    }

    /// Adds an interior node with an empty ACL (B.3: a new node starts with an empty ACL).
    pub fn add_interior(&mut self, uri: &DmUri) -> Result<(), TreeError> {
        self.insert(uri, DmNode::new("", Content::Interior(Vec::new())))
    }

    /// Adds a leaf with an empty ACL.
    pub fn add_leaf(
        &mut self,
        uri: &DmUri,
        value: impl Into<String>,
        format: Option<Format>,
        node_type: Option<NodeType>,
    ) -> Result<(), TreeError> {
        let mut node = DmNode::new("", Content::Leaf(value.into().into_boxed_str()));
        node.format = format;
        node.node_type = node_type.map(Box::new);
        self.insert(uri, node)
    }

    /// Adds a TNDS node (and its subtree, with the properties it carries) under `parent`; its `Path` is
    /// ignored. Returns the new node's URI. Same statuses as the other adds, 400 for an invalid subtree.
    pub fn add_subtree(&mut self, parent: &DmUri, node: &Node) -> Result<DmUri, TreeError> {
        let uri = parent.join(&node.name).map_err(|reason| {
            TreeError::invalid(parent, format!("NodeName '{}' {reason}", node.name))
        })?;
        let converted = convert(node, &uri)?;
        self.insert(&uri, converted)?;
        Ok(uri)
    }

    /// Replaces a leaf's value (404 absent, 405 interior). A stored `Size` follows the new value.
    pub fn replace_value(
        &mut self,
        uri: &DmUri,
        value: impl Into<String>,
    ) -> Result<(), TreeError> {
        let node = self.node_mut_or_404(uri)?;
        let Content::Leaf(old) = &mut node.content else {
            return Err(TreeError::NotLeaf(uri.clone()));
        };
        *old = value.into().into_boxed_str();
        let len = old.len();
        if let Some(size) = node.extra.as_mut().and_then(|e| e.size.as_mut()) {
            *size = len.to_string();
        }
        Ok(())
    }

    /// Sets the `Format` property (404 absent).
    pub fn set_format(&mut self, uri: &DmUri, format: Option<Format>) -> Result<(), TreeError> {
        self.node_mut_or_404(uri)?.format = format;
        Ok(())
    }

    /// Sets the `Type` property (404 absent).
    pub fn set_node_type(
        &mut self,
        uri: &DmUri,
        node_type: Option<NodeType>,
    ) -> Result<(), TreeError> {
        self.node_mut_or_404(uri)?.node_type = node_type.map(Box::new);
        Ok(())
    }

    /// Deletes the node and its subtree (404 absent, 405 for the root).
    pub fn delete(&mut self, uri: &DmUri) -> Result<(), TreeError> {
        let (Some(parent_uri), Some(name)) = (uri.parent(), uri.name()) else {
            return Err(TreeError::Root("deleted"));
        };
        let parent = self
            .node_mut(&parent_uri)
            .ok_or_else(|| TreeError::NotFound(uri.clone()))?;
        let Content::Interior(children) = &mut parent.content else {
            return Err(TreeError::NotFound(uri.clone()));
        };
        let at = children
            .binary_search_by(|c| (*c.name).cmp(name))
            .map_err(|_| TreeError::NotFound(uri.clone()))?;
        children.remove(at);
        Ok(())
    }

    /// The node's own ACL (empty = inherits; never empty on the root).
    pub fn acl(&self, uri: &DmUri) -> Result<&Acl, TreeError> {
        Ok(&self.get(uri)?.acl)
    }

    /// Sets the node's own ACL, without checks. Setting the root's ACL to empty sets the default.
    pub fn set_acl(&mut self, uri: &DmUri, acl: Acl) -> Result<(), TreeError> {
        let acl = if uri.is_root() && acl.is_empty() {
            Acl::default_root()
        } else {
            acl
        };
        self.node_mut_or_404(uri)?.acl = acl;
        Ok(())
    }

    /// The ACL in force at `uri` (B.3): the node's own ACL if it has a value, else the nearest ancestor's,
    /// whole (never merged per command). The root always has a value.
    pub fn effective_acl(&self, uri: &DmUri) -> Result<&Acl, TreeError> {
        let mut node = &self.root;
        let mut acl: &Acl = if node.acl.is_empty() {
            &DEFAULT_ROOT_ACL
        } else {
            &node.acl
        };
        for seg in uri.segments() {
            node = node
                .child(seg)
                .ok_or_else(|| TreeError::NotFound(uri.clone()))?;
            if !node.acl.is_empty() {
                acl = &node.acl;
            }
        }
        Ok(acl)
    }

    fn allows(&self, server: &str, command: AclCommand, uri: &DmUri) -> Result<bool, Denied> {
        let acl = self
            .effective_acl(uri)
            .map_err(|_| Denied::NotFound(uri.clone()))?;
        Ok(acl.allows(command, server))
    }

    /// May `server` run `command` on `uri`? 404 when the node (for `Add`: its parent) does not exist,
    /// 425 when the ACL in force does not grant the right. For `Add` the right is checked on the parent,
    /// since the node to be created does not exist yet (an `Add` of the root is checked on the root).
    pub fn check(&self, server: &str, command: AclCommand, uri: &DmUri) -> Result<(), Denied> {
        if depth_of(uri) > MAX_DEPTH {
            return Err(Denied::TooDeep(uri.clone()));
        }
        let target = match command {
            AclCommand::Add => uri.parent().unwrap_or_else(DmUri::root),
            _ => uri.clone(),
        };
        if self.allows(server, command, &target)? {
            Ok(())
        } else {
            Err(Denied::Permission {
                server: server.to_string(),
                command,
                uri: target,
            })
        }
    }

    /// May `server` change the ACL of `uri` (B.3)? Yes if it has `Replace` on an interior node itself
    /// (a leaf's own `Replace` does not cover its ACL), or `Replace` on the parent (any node). The root has
    /// no parent. 404 when the node does not exist, 425 otherwise.
    pub fn check_acl_change(&self, server: &str, uri: &DmUri) -> Result<(), Denied> {
        let node = self
            .node(uri)
            .ok_or_else(|| Denied::NotFound(uri.clone()))?;
        if !node.is_leaf() && self.allows(server, AclCommand::Replace, uri)? {
            return Ok(());
        }
        if let Some(parent) = uri.parent()
            && self.allows(server, AclCommand::Replace, &parent)?
        {
            return Ok(());
        }
        Err(Denied::Permission {
            server: server.to_string(),
            command: AclCommand::Replace,
            uri: uri.clone(),
        })
    }

    /// Is `new_acl` acceptable as the root's ACL? Its `Add` entry must stay `*` (405 otherwise); an empty
    /// ACL is accepted since it means the default.
    pub fn check_root_acl_change(new_acl: &Acl) -> Result<(), Denied> {
        if new_acl.is_empty() || new_acl.servers(AclCommand::Add).contains(&"*") {
            Ok(())
        } else {
            Err(Denied::RootAddMustBeStar)
        }
    }

    /// Both checks for an ACL change: [`DmTree::check_acl_change`], and for the root
    /// [`DmTree::check_root_acl_change`].
    pub fn check_set_acl(&self, server: &str, uri: &DmUri, new_acl: &Acl) -> Result<(), Denied> {
        self.check_acl_change(server, uri)?;
        if uri.is_root() {
            Self::check_root_acl_change(new_acl)?;
        }
        Ok(())
    }

    /// Removes `server` from every entry of the root ACL; an entry left without servers becomes `*` (B.3).
    pub fn remove_server_from_root_acl(&mut self, server: &str) {
        let acl = &mut self.root.acl;
        for command in AclCommand::ALL {
            let servers = acl.servers(command);
            if !servers.contains(&server) {
                continue;
            }
            let mut rest: Vec<String> = servers
                .into_iter()
                .filter(|s| *s != server)
                .map(String::from)
                .collect();
            if rest.is_empty() {
                rest.push("*".to_string());
            }
            acl.set(command, rest);
        }
        if acl.is_empty() {
            *acl = Acl::default_root();
        }
    }

    /// How many nodes, the root included.
    pub fn node_count(&self) -> usize {
        self.root.count()
    }

    /// An estimate of the memory the tree holds (heap plus the root itself), for capacity planning.
    pub fn approx_heap_bytes(&self) -> usize {
        size_of::<DmTree>() + self.root.heap_bytes()
    }

    /// The first difference between two trees under the B.7 rules (see [`same_tree`]), `None` if the same.
    pub fn first_difference(
        &self,
        other: &DmTree,
        ignore_nonces_of: &[DmUri],
    ) -> Option<Difference> {
        diff_node(&self.root, &other.root, &DmUri::root(), ignore_nonces_of)
    }
}

/// Which of the two compared documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    First,
    Second,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::First => "first",
            Side::Second => "second",
        })
    }
}

/// What differs at a URI. Values of secret nodes (`AAuthSecret`) are never carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiffKind {
    /// The node exists only in the first tree.
    OnlyInFirst,
    /// The node exists only in the second tree.
    OnlyInSecond,
    /// A leaf in one tree, an interior node in the other.
    LeafVsInterior { first_is_leaf: bool },
    /// A value or property differs: `property` is `Value`, `ACL`, `Format`, `Type`, `Name`, `Title` or
    /// `Size`; the texts are the compared forms (`<redacted>` for secret values).
    Property {
        property: &'static str,
        first: Option<String>,
        second: Option<String>,
    },
    /// A document that does not describe a tree.
    Invalid { side: Side, reason: String },
}

impl fmt::Display for DiffKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".to_string());
        match self {
            DiffKind::OnlyInFirst => f.write_str("only in the first tree"),
            DiffKind::OnlyInSecond => f.write_str("only in the second tree"),
            DiffKind::LeafVsInterior { first_is_leaf } => write!(
                f,
                "a leaf in the {} tree, an interior node in the other",
                if *first_is_leaf { "first" } else { "second" }
            ),
            DiffKind::Property {
                property,
                first,
                second,
            } => write!(
                f,
                "{property} differs: '{}' vs '{}'",
                show(first),
                show(second)
            ),
            DiffKind::Invalid { side, reason } => {
                write!(f, "the {side} document is not a valid tree: {reason}")
            }
        }
    }
}

/// The first difference found between two trees: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{uri}: {what}")]
pub struct Difference {
    pub uri: DmUri,
    pub what: DiffKind,
}

/// B.7: are two TNDS exports of a device tree the same?
///
/// Both documents are read as trees ([`DmTree::from_tnds`]), so `Path` placement and sibling order do
/// not matter. Compared: the node set, leaf/interior kind, values, ACLs, `Format`, `Type`, `Name`,
/// `Title`, `Size`. Ignored: `TStamp`, `VerNo`, `Man`/`Mod` of the document, and the value (and `Size`)
/// of every `AAuthData` node under one of the `ignore_nonces_of` URIs (the accounts that existed before).
/// ACLs are compared as sets of servers per command (entry and server order do not matter); a missing
/// `Format` counts as the default (`chr` for a leaf, `node` for an interior node).
/// The first difference in depth-first, name order is reported.
pub fn same_tree(a: &MgmtTree, b: &MgmtTree, ignore_nonces_of: &[DmUri]) -> Result<(), Difference> {
    let read = |doc: &MgmtTree, side: Side| {
        DmTree::from_tnds(doc).map_err(|e| Difference {
            uri: DmUri::root(),
            what: DiffKind::Invalid {
                side,
                reason: e.to_string(),
            },
        })
    };
    let a = read(a, Side::First)?;
    let b = read(b, Side::Second)?;
    match a.first_difference(&b, ignore_nonces_of) {
        None => Ok(()),
        Some(d) => Err(d),
    }
}

/// An ACL as sorted, de-duplicated servers per command: `Add=*&Get=a+b`.
fn canonical_acl(acl: &Acl) -> String {
    let mut out = Acl::empty();
    for command in AclCommand::ALL {
        let mut servers: Vec<String> = acl.servers(command).into_iter().map(String::from).collect();
        servers.sort();
        out.set(command, servers);
    }
    out.to_string()
}

fn type_text(t: Option<&NodeType>) -> Option<String> {
    t.map(|t| match t {
        NodeType::Mime(m) => format!("MIME {m}"),
        NodeType::DdfName(d) => format!("DDFName {d}"),
    })
}

fn diff_node(a: &DmNode, b: &DmNode, uri: &DmUri, ignore: &[DmUri]) -> Option<Difference> {
    let at = |what| {
        Some(Difference {
            uri: uri.clone(),
            what,
        })
    };
    let prop = |property, first: Option<String>, second: Option<String>| {
        (first != second).then(|| Difference {
            uri: uri.clone(),
            what: DiffKind::Property {
                property,
                first,
                second,
            },
        })
    };
    let ignored_nonce = a.is_leaf()
        && &*a.name == NONCE_NODE_NAME
        && ignore.iter().any(|account| account.contains(uri));
    match (&a.content, &b.content) {
        (Content::Leaf(x), Content::Leaf(y)) if !ignored_nonce && x != y => {
            let (x, y) = if is_secret(&a.name) {
                ("<redacted>".to_string(), "<redacted>".to_string())
            } else {
                (x.to_string(), y.to_string())
            };
            return at(DiffKind::Property {
                property: "Value",
                first: Some(x),
                second: Some(y),
            });
        }
        (Content::Leaf(_), Content::Interior(_)) | (Content::Interior(_), Content::Leaf(_)) => {
            return at(DiffKind::LeafVsInterior {
                first_is_leaf: a.is_leaf(),
            });
        }
        _ => {}
    }
    let acl_of = |n: &DmNode| (!n.acl.is_empty()).then(|| canonical_acl(&n.acl));
    let format_of = |n: &DmNode| {
        let default = if n.is_leaf() {
            Format::Chr
        } else {
            Format::Node
        };
        Some(n.format.unwrap_or(default).as_str().to_string())
    };
    let extra = |n: &DmNode, pick: fn(&ExtraProps) -> &Option<String>| {
        n.extra.as_deref().and_then(|e| pick(e).clone())
    };
    let size = |n: &DmNode| {
        if ignored_nonce {
            None
        } else {
            extra(n, |e| &e.size)
        }
    };
    if let Some(d) = prop("ACL", acl_of(a), acl_of(b))
        .or_else(|| prop("Format", format_of(a), format_of(b)))
        .or_else(|| {
            prop(
                "Type",
                type_text(a.node_type.as_deref()),
                type_text(b.node_type.as_deref()),
            )
        })
        .or_else(|| prop("Name", extra(a, |e| &e.name), extra(b, |e| &e.name)))
        .or_else(|| prop("Title", extra(a, |e| &e.title), extra(b, |e| &e.title)))
        .or_else(|| prop("Size", size(a), size(b)))
    {
        return Some(d);
    }
    // Both children lists are sorted by name: walk them together.
    let (xs, ys) = (a.children(), b.children());
    let (mut i, mut j) = (0, 0);
    loop {
        let child_uri = |n: &DmNode| uri.join(&n.name).unwrap_or_else(|_| uri.clone());
        match (xs.get(i), ys.get(j)) {
            (None, None) => return None,
            (Some(x), None) => {
                return Some(Difference {
                    uri: child_uri(x),
                    what: DiffKind::OnlyInFirst,
                });
            }
            (None, Some(y)) => {
                return Some(Difference {
                    uri: child_uri(y),
                    what: DiffKind::OnlyInSecond,
                });
            }
            (Some(x), Some(y)) => match x.name.cmp(&y.name) {
                std::cmp::Ordering::Less => {
                    return Some(Difference {
                        uri: child_uri(x),
                        what: DiffKind::OnlyInFirst,
                    });
                }
                std::cmp::Ordering::Greater => {
                    return Some(Difference {
                        uri: child_uri(y),
                        what: DiffKind::OnlyInSecond,
                    });
                }
                std::cmp::Ordering::Equal => {
                    if let Some(d) = diff_node(x, y, &child_uri(x), ignore) {
                        return Some(d);
                    }
                    i += 1;
                    j += 1;
                }
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::tnds::{decode, encode};
    use proptest::prelude::*;

    fn u(s: &str) -> DmUri {
        s.parse().unwrap()
    }

    fn acl(s: &str) -> Acl {
        s.parse().unwrap()
    }

    /// ./A (ACL Get=*&Replace=dms1) with ./A/B (ACL Get=dms2) holding leaf ./A/B/L, and leaf ./A/C.
    fn sample() -> DmTree {
        let mut t = DmTree::new();
        t.add_interior(&u("./A")).unwrap();
        t.set_acl(&u("./A"), acl("Get=*&Replace=dms1")).unwrap();
        t.add_interior(&u("./A/B")).unwrap();
        t.set_acl(&u("./A/B"), acl("Get=dms2")).unwrap();
        t.add_leaf(&u("./A/B/L"), "v", Some(Format::Chr), None)
            .unwrap();
        t.add_leaf(&u("./A/C"), "c", None, None).unwrap();
        t
    }

    #[test]
    fn new_tree_has_the_default_root_acl() {
        let t = DmTree::new();
        assert_eq!(t.acl(&DmUri::root()).unwrap().to_string(), "Add=*&Get=*");
        assert!(t.check("anyone", AclCommand::Add, &u("./X")).is_ok());
        assert_eq!(
            t.check("anyone", AclCommand::Replace, &DmUri::root())
                .unwrap_err()
                .status(),
            425
        );
    }

    #[test]
    fn inheritance_is_whole_acl() {
        let t = sample();
        // ./A/C inherits ./A's ACL.
        assert!(t.check("dms1", AclCommand::Replace, &u("./A/C")).is_ok());
        assert!(t.check("x", AclCommand::Get, &u("./A/C")).is_ok());
        // ./A/B has its own ACL: dms1's Replace on ./A does not reach it, nor ./A/B/L.
        assert_eq!(
            t.effective_acl(&u("./A/B/L")).unwrap().to_string(),
            "Get=dms2"
        );
        let err = t
            .check("dms1", AclCommand::Replace, &u("./A/B"))
            .unwrap_err();
        assert_eq!(err.status(), 425);
        assert_eq!(
            t.check("dms1", AclCommand::Replace, &u("./A/B/L"))
                .unwrap_err()
                .status(),
            425
        );
        assert_eq!(
            t.check("dms1", AclCommand::Get, &u("./A/B/L"))
                .unwrap_err()
                .status(),
            425
        );
        assert!(t.check("dms2", AclCommand::Get, &u("./A/B/L")).is_ok());
        // Missing node: 404.
        assert_eq!(
            t.check("dms1", AclCommand::Get, &u("./A/Z"))
                .unwrap_err()
                .status(),
            404
        );
    }

    #[test]
    fn add_is_checked_on_the_parent() {
        let t = sample();
        // ./A grants no Add to anyone: adding under it is refused even though the root grants Add=*.
        assert_eq!(
            t.check("dms1", AclCommand::Add, &u("./A/New"))
                .unwrap_err()
                .status(),
            425
        );
        assert!(t.check("dms1", AclCommand::Add, &u("./New")).is_ok());
        // Missing parent: 404 naming the parent.
        assert_eq!(
            t.check("dms1", AclCommand::Add, &u("./Nope/New"))
                .unwrap_err(),
            Denied::NotFound(u("./Nope"))
        );
    }

    #[test]
    fn acl_change_rule_for_interior_and_leaf() {
        let mut t = DmTree::new();
        t.add_interior(&u("./P")).unwrap();
        t.add_interior(&u("./P/I")).unwrap();
        t.add_leaf(&u("./P/L"), "x", None, None).unwrap();
        t.set_acl(&u("./P"), acl("Get=*")).unwrap();
        t.set_acl(&u("./P/I"), acl("Replace=dms1")).unwrap();
        t.set_acl(&u("./P/L"), acl("Replace=dms1")).unwrap();
        // Without Replace on the parent: the interior node's own Replace covers its ACL, a leaf's does not.
        assert!(t.check_acl_change("dms1", &u("./P/I")).is_ok());
        let err = t.check_acl_change("dms1", &u("./P/L")).unwrap_err();
        assert_eq!(err.status(), 425);
        // With Replace on the parent: both.
        t.set_acl(&u("./P"), acl("Get=*&Replace=dms1")).unwrap();
        assert!(t.check_acl_change("dms1", &u("./P/I")).is_ok());
        assert!(t.check_acl_change("dms1", &u("./P/L")).is_ok());
        // Replace on the parent only (the child's own ACL names someone else).
        t.set_acl(&u("./P/I"), acl("Replace=dms2")).unwrap();
        t.set_acl(&u("./P/L"), acl("Replace=dms2")).unwrap();
        assert!(t.check_acl_change("dms1", &u("./P/I")).is_ok());
        assert!(t.check_acl_change("dms1", &u("./P/L")).is_ok());
        assert!(t.check_acl_change("dms3", &u("./P/L")).is_err());
        // The root has no parent: only its own Replace.
        assert!(t.check_acl_change("dms1", &DmUri::root()).is_err());
        t.set_acl(&DmUri::root(), acl("Add=*&Get=*&Replace=dms1"))
            .unwrap();
        assert!(t.check_acl_change("dms1", &DmUri::root()).is_ok());
        assert_eq!(
            t.check_acl_change("dms1", &u("./Q")).unwrap_err().status(),
            404
        );
    }

    #[test]
    fn root_add_stays_star() {
        assert!(DmTree::check_root_acl_change(&acl("Add=*&Get=*&Replace=dms1")).is_ok());
        assert!(DmTree::check_root_acl_change(&acl("Add=dms1+*")).is_ok());
        assert!(DmTree::check_root_acl_change(&Acl::empty()).is_ok());
        assert_eq!(
            DmTree::check_root_acl_change(&acl("Add=dms1&Get=*"))
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            DmTree::check_root_acl_change(&acl("Get=*"))
                .unwrap_err()
                .status(),
            405
        );
        let mut t = DmTree::new();
        t.set_acl(&DmUri::root(), acl("Add=*&Get=*&Replace=dms1"))
            .unwrap();
        assert_eq!(
            t.check_set_acl("dms1", &DmUri::root(), &acl("Add=dms1&Replace=dms1"))
                .unwrap_err(),
            Denied::RootAddMustBeStar
        );
        // Empty root ACL means the default.
        t.set_acl(&DmUri::root(), Acl::empty()).unwrap();
        assert_eq!(t.acl(&DmUri::root()).unwrap(), &Acl::default_root());
    }

    #[test]
    fn removing_a_server_from_the_root_acl() {
        let mut t = DmTree::new();
        t.set_acl(
            &DmUri::root(),
            acl("Add=*&Get=*&Replace=dms1&Exec=dms1+dms2"),
        )
        .unwrap();
        t.remove_server_from_root_acl("dms1");
        assert_eq!(
            t.acl(&DmUri::root()).unwrap().to_string(),
            "Add=*&Get=*&Replace=*&Exec=dms2"
        );
    }

    #[test]
    fn operation_statuses() {
        let mut t = sample();
        assert_eq!(t.add_interior(&u("./A")).unwrap_err().status(), 418);
        assert_eq!(
            t.add_leaf(&u("./A/C"), "x", None, None)
                .unwrap_err()
                .status(),
            418
        );
        assert_eq!(
            t.add_leaf(&u("./Z/C"), "x", None, None).unwrap_err(),
            TreeError::NotFound(u("./Z"))
        );
        assert_eq!(
            t.add_leaf(&u("./A/C/D"), "x", None, None)
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(t.add_interior(&DmUri::root()).unwrap_err().status(), 418);
        assert_eq!(t.replace_value(&u("./A"), "x").unwrap_err().status(), 405);
        assert_eq!(t.replace_value(&u("./A/Z"), "x").unwrap_err().status(), 404);
        t.replace_value(&u("./A/C"), "new").unwrap();
        assert_eq!(t.value(&u("./A/C")).unwrap(), "new");
        assert_eq!(t.value(&u("./A")).unwrap_err().status(), 405);
        assert_eq!(t.children(&u("./A")).unwrap(), ["B", "C"]);
        assert_eq!(t.children(&u("./A/C")).unwrap_err().status(), 405);
        assert_eq!(t.delete(&DmUri::root()).unwrap_err().status(), 405);
        assert_eq!(t.delete(&u("./A/Z")).unwrap_err().status(), 404);
        assert_eq!(t.delete(&u("./A/C/Z")).unwrap_err().status(), 404);
        t.delete(&u("./A/B")).unwrap();
        assert!(!t.exists(&u("./A/B/L")));
        assert_eq!(t.get(&u("./A/B/L")).unwrap_err().status(), 404);
        assert_eq!(
            t.set_acl(&u("./Q"), Acl::empty()).unwrap_err().status(),
            404
        );
        // New nodes start with an empty ACL.
        t.add_leaf(&u("./A/N"), "", None, None).unwrap();
        assert!(t.acl(&u("./A/N")).unwrap().is_empty());
        // Too deep.
        let mut deep = DmUri::root();
        for _ in 0..=MAX_DEPTH {
            deep = deep.join("d").unwrap();
        }
        assert_eq!(t.add_interior(&deep).unwrap_err().status(), 414);
        assert_eq!(
            t.check("x", AclCommand::Get, &deep).unwrap_err().status(),
            414
        );
    }

    const PPS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tnds/PerProviderSubscription.xml"
    );

    #[test]
    fn real_world_document_round_trips() {
        let doc = decode(&std::fs::read(PPS).unwrap()).unwrap();
        let tree = DmTree::from_tnds(&doc).unwrap();
        let pps = u("./PerProviderSubscription");
        assert_eq!(
            tree.value(&u("./PerProviderSubscription/i001/HomeSP/FQDN"))
                .unwrap(),
            "mi6.co.uk"
        );
        assert!(matches!(
            tree.get(&pps).unwrap().node_type(),
            Some(NodeType::DdfName(d)) if d == "urn:wfa:mo:hotspot2dot0-perprovidersubscription:1.0"
        ));
        // Root ACL is the default; nothing else has an ACL.
        assert_eq!(tree.acl(&DmUri::root()).unwrap(), &Acl::default_root());
        let export = tree.to_tnds();
        assert_eq!(export.nodes.len(), 1);
        assert_eq!(export.nodes.first().unwrap().name, ".");
        assert_eq!(DmTree::from_tnds(&export).unwrap(), tree);
        // Through XML as well.
        let again = DmTree::from_tnds(&decode(encode(&export).as_bytes()).unwrap()).unwrap();
        assert_eq!(again, tree);
        // The export is the same tree as the original document (B.7), whose order differs.
        same_tree(&doc, &export, &[]).unwrap();
        // A subtree export goes back in place.
        let sub = tree
            .export_subtree(&u("./PerProviderSubscription/i001"))
            .unwrap();
        assert_eq!(
            sub.nodes.first().unwrap().path.as_deref(),
            Some("./PerProviderSubscription")
        );
        let placed = DmTree::from_tnds(&sub).unwrap();
        assert_eq!(
            placed
                .value(&u("./PerProviderSubscription/i001/HomeSP/FQDN"))
                .unwrap(),
            "mi6.co.uk"
        );
        assert!(placed.acl(&pps).unwrap().is_empty());
    }

    #[test]
    fn from_tnds_placement_rules() {
        let doc = |body: &str| {
            decode(
                format!(
                    r#"<MgmtTree xmlns="syncml:dmddf1.2"><VerDTD>1.2</VerDTD>{body}</MgmtTree>"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        // Path creates missing parents; a later node may describe an implicit parent.
        let t = DmTree::from_tnds(&doc(
            "<Node><NodeName>dms1</NodeName><Path>./DMAcc</Path><Node><NodeName>ServerID</NodeName><Value>dms1</Value></Node></Node>\
             <Node><NodeName>DMAcc</NodeName><RTProperties><ACL>Get=*</ACL></RTProperties></Node>\
             <Node><NodeName>.</NodeName><RTProperties><ACL>Add=*&amp;Get=*&amp;Replace=dms1</ACL></RTProperties></Node>",
        ))
        .unwrap();
        assert_eq!(t.value(&u("./DMAcc/dms1/ServerID")).unwrap(), "dms1");
        assert_eq!(t.acl(&u("./DMAcc")).unwrap().to_string(), "Get=*");
        assert_eq!(
            t.acl(&DmUri::root()).unwrap().to_string(),
            "Add=*&Get=*&Replace=dms1"
        );
        // Nested implicit parents claimed by one later node.
        let t = DmTree::from_tnds(&doc(
            "<Node><NodeName>X</NodeName><Path>./A/B/C</Path><Value>x</Value></Node>\
             <Node><NodeName>Y</NodeName><Path>./A/D</Path><Value>y</Value></Node>\
             <Node><NodeName>A</NodeName><RTProperties><ACL>Get=a</ACL></RTProperties>\
             <Node><NodeName>D</NodeName><RTProperties><ACL>Get=d</ACL></RTProperties></Node>\
             <Node><NodeName>B</NodeName><RTProperties><ACL>Get=b</ACL></RTProperties>\
             <Node><NodeName>C</NodeName><RTProperties><ACL>Get=c</ACL></RTProperties><Node><NodeName>Z</NodeName><Value>z</Value></Node></Node>\
             </Node></Node>",
        ))
        .unwrap();
        for (uri, acl_text) in [
            ("./A", "Get=a"),
            ("./A/B", "Get=b"),
            ("./A/B/C", "Get=c"),
            ("./A/D", "Get=d"),
        ] {
            assert_eq!(t.acl(&u(uri)).unwrap().to_string(), acl_text, "{uri}");
        }
        assert_eq!(t.value(&u("./A/B/C/X")).unwrap(), "x");
        assert_eq!(t.value(&u("./A/B/C/Z")).unwrap(), "z");
        assert_eq!(t.value(&u("./A/D/Y")).unwrap(), "y");
        // Lenient Path forms.
        for path in ["DMAcc", "./DMAcc/", " ./DMAcc "] {
            let t = DmTree::from_tnds(&doc(&format!(
                "<Node><NodeName>x</NodeName><Path>{path}</Path><Value>1</Value></Node>"
            )))
            .unwrap();
            assert_eq!(t.value(&u("./DMAcc/x")).unwrap(), "1", "{path}");
        }
        // Empty leaf by Format.
        let t = DmTree::from_tnds(&doc(
            "<Node><NodeName>e</NodeName><RTProperties><Format><chr/></Format></RTProperties></Node>",
        ))
        .unwrap();
        assert_eq!(t.value(&u("./e")).unwrap(), "");
        // Errors.
        for (body, why) in [
            (
                "<Node><NodeName>A</NodeName><Value>1</Value></Node><Node><NodeName>B</NodeName><Path>./A</Path></Node>",
                "under a leaf",
            ),
            (
                "<Node><NodeName/></Node><Node><NodeName>.</NodeName></Node>",
                "root twice",
            ),
            (
                "<Node><NodeName>.</NodeName><Value>1</Value></Node>",
                "leaf root",
            ),
            ("<Node><NodeName>a/b</NodeName></Node>", "slash in name"),
            (
                "<Node><NodeName>A</NodeName><Node><NodeName>..</NodeName></Node></Node>",
                "dot-dot",
            ),
            (
                "<Node><NodeName>x</NodeName><Path>./A//B</Path></Node>",
                "bad path",
            ),
            (
                "<Node><NodeName></NodeName><Path>./A</Path></Node>",
                "empty name with path",
            ),
        ] {
            let err = DmTree::from_tnds(&doc(body)).unwrap_err();
            assert_eq!(err.status(), 400, "{why}: {err}");
        }
        // Built in code (the TNDS decoder already refuses same-named siblings).
        let twice = MgmtTree {
            ver_dtd: "1.2".into(),
            man: None,
            model: None,
            nodes: vec![Node::leaf("A", "1"), Node::leaf("A", "2")],
        };
        assert_eq!(DmTree::from_tnds(&twice).unwrap_err().status(), 400);
        // The same URI spelled by two Paths (the TNDS decoder refuses these siblings too).
        let same_uri = MgmtTree {
            nodes: vec![
                Node::interior("A", vec![]),
                Node::interior("B", vec![]).with_path("."),
                Node::interior("A", vec![]).with_path("."),
            ],
            ..twice.clone()
        };
        assert_eq!(DmTree::from_tnds(&same_uri).unwrap_err().status(), 400);
        let nested_twice = MgmtTree {
            nodes: vec![Node::interior(
                "P",
                vec![Node::leaf("A", "1"), Node::leaf("A", "2")],
            )],
            ..twice.clone()
        };
        assert_eq!(DmTree::from_tnds(&nested_twice).unwrap_err().status(), 400);
    }

    #[test]
    fn comparison_ignores_what_b7_says() {
        let mut a = DmTree::new();
        a.add_interior(&u("./DMAcc")).unwrap();
        a.add_interior(&u("./DMAcc/dms1")).unwrap();
        a.add_interior(&u("./DMAcc/dms1/AppAuth")).unwrap();
        a.add_interior(&u("./DMAcc/dms1/AppAuth/srv")).unwrap();
        a.add_leaf(
            &u("./DMAcc/dms1/AppAuth/srv/AAuthData"),
            "bm9uY2Ux",
            None,
            None,
        )
        .unwrap();
        a.add_leaf(
            &u("./DMAcc/dms1/AppAuth/srv/AAuthSecret"),
            "hunter2",
            None,
            None,
        )
        .unwrap();
        a.set_acl(&u("./DMAcc"), acl("Get=dms1&Replace=dms1"))
            .unwrap();
        let mut b = a.clone();
        let accounts = [u("./DMAcc/dms1")];
        b.replace_value(&u("./DMAcc/dms1/AppAuth/srv/AAuthData"), "other")
            .unwrap();
        let mut ea = a.to_tnds();
        let mut eb = b.to_tnds();
        // TStamp and VerNo are ignored.
        eb.nodes.first_mut().unwrap().props.as_mut().unwrap().tstamp =
            Some("20260101T000000Z".into());
        eb.nodes.first_mut().unwrap().props.as_mut().unwrap().ver_no = Some("7".into());
        same_tree(&ea, &eb, &accounts).unwrap();
        // The nonce only under the given accounts.
        let d = same_tree(&ea, &eb, &[]).unwrap_err();
        assert_eq!(d.uri, u("./DMAcc/dms1/AppAuth/srv/AAuthData"));
        // ACL entry order does not matter; content does.
        b.set_acl(&u("./DMAcc"), acl("Replace=dms1&Get=dms1"))
            .unwrap();
        same_tree(&a.to_tnds(), &b.to_tnds(), &accounts).unwrap();
        b.set_acl(&u("./DMAcc"), acl("Get=dms1")).unwrap();
        let d = same_tree(&a.to_tnds(), &b.to_tnds(), &accounts).unwrap_err();
        assert_eq!(d.uri, u("./DMAcc"));
        assert!(matches!(
            d.what,
            DiffKind::Property {
                property: "ACL",
                ..
            }
        ));
        // A secret value is never shown.
        let mut c = a.clone();
        c.replace_value(&u("./DMAcc/dms1/AppAuth/srv/AAuthSecret"), "swordfish")
            .unwrap();
        let d = a.first_difference(&c, &accounts).unwrap();
        let shown = format!("{d} {d:?} {}", serde_json::to_string(&d).unwrap());
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
        // Missing nodes on either side.
        let mut e = a.clone();
        e.delete(&u("./DMAcc/dms1/AppAuth/srv/AAuthSecret"))
            .unwrap();
        assert_eq!(
            a.first_difference(&e, &[]).unwrap().what,
            DiffKind::OnlyInFirst
        );
        assert_eq!(
            e.first_difference(&a, &[]).unwrap().what,
            DiffKind::OnlyInSecond
        );
        // An invalid document.
        ea.nodes.push(Node::leaf("a/b", "x"));
        assert!(matches!(
            same_tree(&ea, &eb, &[]).unwrap_err().what,
            DiffKind::Invalid {
                side: Side::First,
                ..
            }
        ));
    }

    #[test]
    fn debug_and_serialize_hide_secrets() {
        let mut t = DmTree::new();
        t.add_leaf(&u("./AAuthSecret"), "hunter2", None, None)
            .unwrap();
        let shown = format!("{t:?} {}", serde_json::to_string(&t).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn a_small_device_tree_is_small() {
        let mut t = DmTree::new();
        for (uri, value) in [
            ("./DevInfo", None),
            ("./DevInfo/DevId", Some("IMEI:493005100592800")),
            ("./DevInfo/Man", Some("Example Devices")),
            ("./DevInfo/Mod", Some("Sim-1")),
            ("./DevInfo/DmV", Some("1.2")),
            ("./DevInfo/Lang", Some("en-US")),
            ("./DevDetail", None),
            ("./DevDetail/FwV", Some("1.0.0")),
            ("./DevDetail/SwV", Some("1.0.0")),
            ("./DevDetail/HwV", Some("A")),
            ("./DMAcc", None),
            ("./DMAcc/dms1", None),
            ("./DMAcc/dms1/AppID", Some("w7")),
            ("./DMAcc/dms1/ServerID", Some("dms1.example.com")),
            ("./DMAcc/dms1/Name", Some("Operator DM")),
            ("./DMAcc/dms1/AppAddr", None),
            ("./DMAcc/dms1/AppAddr/1", None),
            (
                "./DMAcc/dms1/AppAddr/1/Addr",
                Some("https://dms1.example.com/dm"),
            ),
            ("./DMAcc/dms1/AppAddr/1/AddrType", Some("URI")),
            ("./DMAcc/dms1/AppAuth", None),
            ("./DMAcc/dms1/AppAuth/srv", None),
            ("./DMAcc/dms1/AppAuth/srv/AAuthLevel", Some("SRVCRED")),
            ("./DMAcc/dms1/AppAuth/srv/AAuthType", Some("DIGEST")),
            (
                "./DMAcc/dms1/AppAuth/srv/AAuthName",
                Some("dms1.example.com"),
            ),
            (
                "./DMAcc/dms1/AppAuth/srv/AAuthSecret",
                Some("0123456789abcdef"),
            ),
            (
                "./DMAcc/dms1/AppAuth/srv/AAuthData",
                Some("MTIzNDU2Nzg5MGFiY2RlZg=="),
            ),
            ("./DMAcc/dms1/AppAuth/cli", None),
            ("./DMAcc/dms1/AppAuth/cli/AAuthLevel", Some("CLCRED")),
            ("./DMAcc/dms1/AppAuth/cli/AAuthType", Some("DIGEST")),
            (
                "./DMAcc/dms1/AppAuth/cli/AAuthName",
                Some("IMEI:493005100592800"),
            ),
            (
                "./DMAcc/dms1/AppAuth/cli/AAuthSecret",
                Some("fedcba9876543210"),
            ),
            (
                "./DMAcc/dms1/AppAuth/cli/AAuthData",
                Some("MTIzNDU2Nzg5MGFiY2RlZg=="),
            ),
        ] {
            match value {
                None => t.add_interior(&u(uri)).unwrap(),
                Some(v) => t.add_leaf(&u(uri), v, None, None).unwrap(),
            }
        }
        t.set_acl(&u("./DMAcc"), acl("Get=dms1&Replace=dms1"))
            .unwrap();
        t.set_acl(&u("./DMAcc/dms1"), acl("Get=dms1&Replace=dms1&Delete=dms1"))
            .unwrap();
        t.set_acl(&u("./DevInfo"), acl("Get=*")).unwrap();
        assert_eq!(t.node_count(), 33);
        let bytes = t.approx_heap_bytes();
        assert!(bytes < 8 * 1024, "{bytes} bytes");
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    enum Op {
        AddInterior(String),
        AddLeaf(String, String, Option<Format>),
        Replace(String, String),
        Delete(String),
        SetAcl(String, Acl),
        RemoveServer(String),
        Check(String, AclCommand, String),
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..4).prop_map(|segs| {
            std::iter::once(".")
                .chain(segs)
                .collect::<Vec<_>>()
                .join("/")
        })
    }

    fn server() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["*".to_string(), "dms1".into(), "dms2".into()])
    }

    fn any_acl() -> impl Strategy<Value = Acl> {
        prop::collection::vec(
            (
                prop::sample::select(AclCommand::ALL.to_vec()),
                prop::collection::vec(server(), 1..3),
            ),
            0..4,
        )
        .prop_map(|entries| {
            let mut acl = Acl::empty();
            for (command, servers) in entries {
                acl.set(command, servers);
            }
            acl
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            path().prop_map(Op::AddInterior),
            (
                path(),
                "[a-z0-9&<]{0,6}",
                prop::option::of(prop::sample::select(Format::ALL.to_vec()))
            )
                .prop_map(|(p, v, f)| Op::AddLeaf(p, v, f)),
            (path(), "[a-z0-9]{0,6}").prop_map(|(p, v)| Op::Replace(p, v)),
            path().prop_map(Op::Delete),
            (path(), any_acl()).prop_map(|(p, a)| Op::SetAcl(p, a)),
            server().prop_map(Op::RemoveServer),
            (
                server(),
                prop::sample::select(AclCommand::ALL.to_vec()),
                path()
            )
                .prop_map(|(s, c, p)| Op::Check(s, c, p)),
        ]
    }

    fn run(t: &mut DmTree, op: &Op) {
        let _ = match op {
            Op::AddInterior(p) => t.add_interior(&u(p)).map(|_| ()),
            Op::AddLeaf(p, v, f) => t.add_leaf(&u(p), v.as_str(), *f, None),
            Op::Replace(p, v) => t.replace_value(&u(p), v.as_str()),
            Op::Delete(p) => t.delete(&u(p)),
            Op::SetAcl(p, a) => t.set_acl(&u(p), a.clone()),
            Op::RemoveServer(s) => {
                t.remove_server_from_root_acl(s);
                Ok(())
            }
            Op::Check(s, c, p) => {
                let _ = t.check(s, *c, &u(p));
                let _ = t.check_acl_change(s, &u(p));
                let _ = t.effective_acl(&u(p));
                Ok(())
            }
        };
    }

    fn any_node(depth: u32) -> impl Strategy<Value = Node> {
        let name = prop::sample::select(vec!["", ".", "a", "b", "a/b", ".."]);
        let leaf = (name.clone(), "[a-z]{0,3}").prop_map(|(n, v)| Node::leaf(n, v));
        leaf.prop_recursive(depth, 24, 4, move |inner| {
            (
                prop::sample::select(vec!["", ".", "a", "b", "c"]),
                prop::option::of(prop::sample::select(vec![
                    ".", "./a", "a", "./a/b", "x//y", "",
                ])),
                prop::collection::vec(inner, 0..4),
            )
                .prop_map(|(n, p, children)| {
                    let mut node = Node::interior(n, children);
                    node.path = p.map(String::from);
                    node
                })
        })
    }

    proptest! {
        #[test]
        fn random_operations_never_panic_and_export_round_trips(ops in prop::collection::vec(op(), 0..40)) {
            let mut t = DmTree::new();
            for op in &ops {
                run(&mut t, op);
                prop_assert!(!t.acl(&DmUri::root()).unwrap().is_empty());
            }
            let export = t.to_tnds();
            prop_assert_eq!(&DmTree::from_tnds(&export).unwrap(), &t);
            let xml = encode(&export);
            let back = DmTree::from_tnds(&decode(xml.as_bytes()).unwrap()).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(t.first_difference(&back, &[]), None);
            same_tree(&export, &back.to_tnds(), &[]).unwrap();
        }

        #[test]
        fn from_tnds_never_panics(nodes in prop::collection::vec(any_node(4), 0..4)) {
            let doc = MgmtTree { ver_dtd: "1.2".into(), man: None, model: None, nodes };
            if let Ok(t) = DmTree::from_tnds(&doc) {
                prop_assert_eq!(DmTree::from_tnds(&t.to_tnds()).unwrap(), t);
            }
        }
    }
}

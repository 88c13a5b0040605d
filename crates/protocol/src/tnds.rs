//! TNDS, the Tree and Description Serialization of a DM (sub)tree (PROTOCOL.md B.5).
//!
//! `MgmtTree` (`VerDTD`, optional `Man`, `Mod`, then `Node`s); a `Node` has a `NodeName` (possibly empty),
//! an optional `Path`, optional `RTProperties`, then either a `Value` (a leaf) or child `Node`s. Real-world
//! documents put `RTProperties` on some nodes only and often omit `Path`; both are accepted.

use serde::Serialize;

use crate::acl::Acl;
use crate::error::{DecodeError, ErrorKind, Result};
use crate::xml::{DoctypePolicy, Ns, XmlReader, XmlWriter};

/// The TNDS namespace.
pub const TNDS_NS: &str = "syncml:dmddf1.2";
/// The media type of a standalone TNDS document.
pub const CONTENT_TYPE: &str = "application/vnd.syncml.dmtnds+xml";
/// Deepest nesting accepted in a standalone document (the delegation envelope has its own, lower limit).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MgmtTree {
    pub ver_dtd: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub man: Option<String>,
    #[serde(rename = "mod", skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub nodes: Vec<Node>,
}

/// `Debug` prints the values of secret nodes (`AAuthSecret`) as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub path: Option<String>,
    pub props: Option<RtProperties>,
    pub content: NodeContent,
}

/// A leaf's value, or an interior node's children (possibly none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeContent {
    Value(String),
    Children(Vec<Node>),
}

/// Node names whose values are secrets: never printed, logged or serialized for display.
pub const SECRET_NODE_NAMES: [&str; 1] = ["AAuthSecret"];

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Node");
        d.field("name", &self.name);
        if let Some(path) = &self.path {
            d.field("path", path);
        }
        if let Some(props) = &self.props {
            d.field("props", props);
        }
        match &self.content {
            NodeContent::Value(_) if SECRET_NODE_NAMES.contains(&self.name.as_str()) => {
                d.field("value", &"<redacted>")
            }
            NodeContent::Value(v) => d.field("value", v),
            NodeContent::Children(c) => d.field("children", c),
        };
        d.finish()
    }
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        if let Some(path) = &self.path {
            map.serialize_entry("path", path)?;
        }
        if let Some(props) = &self.props {
            map.serialize_entry("props", props)?;
        }
        match &self.content {
            NodeContent::Value(_) if SECRET_NODE_NAMES.contains(&self.name.as_str()) => {
                map.serialize_entry("value", "<redacted>")?
            }
            NodeContent::Value(v) => map.serialize_entry("value", v)?,
            NodeContent::Children(children) => map.serialize_entry("children", children)?,
        }
        map.end()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RtProperties {
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "acl_text")]
    pub acl: Option<Acl>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tstamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", rename = "type")]
    pub node_type: Option<NodeType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ver_no: Option<String>,
}

fn acl_text<S: serde::Serializer>(acl: &Option<Acl>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match acl {
        Some(acl) => s.collect_str(acl),
        None => s.serialize_none(),
    }
}

/// The `Format` run-time property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    B64,
    Bin,
    Bool,
    Chr,
    Int,
    Node,
    Null,
    Xml,
    Date,
    Time,
    Float,
}

impl Format {
    pub const ALL: [Format; 11] = [
        Format::B64,
        Format::Bin,
        Format::Bool,
        Format::Chr,
        Format::Int,
        Format::Node,
        Format::Null,
        Format::Xml,
        Format::Date,
        Format::Time,
        Format::Float,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::B64 => "b64",
            Format::Bin => "bin",
            Format::Bool => "bool",
            Format::Chr => "chr",
            Format::Int => "int",
            Format::Node => "node",
            Format::Null => "null",
            Format::Xml => "xml",
            Format::Date => "date",
            Format::Time => "time",
            Format::Float => "float",
        }
    }

    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// The `Type` run-time property: a MIME type (leaves) or a DDF name (interior nodes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NodeType {
    #[serde(rename = "mime")]
    Mime(String),
    #[serde(rename = "ddf_name")]
    DdfName(String),
}

impl Node {
    pub fn leaf(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            path: None,
            props: None,
            content: NodeContent::Value(value.into()),
        }
    }

    pub fn interior(name: impl Into<String>, children: Vec<Node>) -> Self {
        Self {
            name: name.into(),
            path: None,
            props: None,
            content: NodeContent::Children(children),
        }
    }

    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    pub fn value(&self) -> Option<&str> {
        match &self.content {
            NodeContent::Value(v) => Some(v),
            NodeContent::Children(_) => None,
        }
    }

    pub fn children(&self) -> &[Node] {
        match &self.content {
            NodeContent::Value(_) => &[],
            NodeContent::Children(c) => c,
        }
    }

    /// The child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children().iter().find(|n| n.name == name)
    }

    /// The descendant at a relative path `a/b/c`.
    pub fn find(&self, relative: &str) -> Option<&Node> {
        relative
            .split('/')
            .filter(|s| !s.is_empty())
            .try_fold(self, |node, seg| node.child(seg))
    }

    /// The ACL property, when the node carries one.
    pub fn acl(&self) -> Option<&Acl> {
        self.props.as_ref().and_then(|p| p.acl.as_ref())
    }
}

/// Element names of the TNDS vocabulary.
const NODE_CHILDREN: [&str; 5] = ["NodeName", "Path", "RTProperties", "Value", "Node"];

/// Reads TNDS elements: `ns` is the namespace index the caller's reader gives `syncml:dmddf1.2`;
/// `allow_no_namespace` accepts DTD-style documents without a namespace.
pub(crate) struct TreeReader {
    pub ns: usize,
    pub allow_no_namespace: bool,
}

impl TreeReader {
    fn check_ns(&self, r: &XmlReader<'_>, ns: Ns, name: &str) -> Result<()> {
        let ok = ns == Ns::Known(self.ns) || (self.allow_no_namespace && ns == Ns::None);
        if ok {
            Ok(())
        } else {
            Err(r.error(
                ErrorKind::Unexpected,
                format!("element <{name}> must be in the TNDS namespace {TNDS_NS}"),
            ))
        }
    }

    /// Opens the next child, which must be in the TNDS namespace; returns its local name.
    fn next<'a>(&self, r: &mut XmlReader<'a>) -> Result<Option<&'a str>> {
        match r.peek()? {
            None => Ok(None),
            Some((ns, name)) => {
                r.next_start()?;
                self.check_ns(r, ns, name)?;
                Ok(Some(name))
            }
        }
    }

    /// Reads the children of an already opened `MgmtTree` element and closes it.
    pub fn read_tree(&self, r: &mut XmlReader<'_>) -> Result<MgmtTree> {
        let mut ver_dtd = None;
        let mut man = None;
        let mut model = None;
        let mut nodes = Vec::new();
        let mut seen_node = false;
        while let Some(name) = self.next(r)? {
            match name {
                "VerDTD" if ver_dtd.is_none() && !seen_node => {
                    let v = r.text()?;
                    if v != "1.2" {
                        return Err(r.error_at(
                            ErrorKind::UnsupportedVersion,
                            r.child_path("VerDTD"),
                            "VerDTD must be 1.2",
                        ));
                    }
                    ver_dtd = Some(v.into_owned());
                }
                "Man" if man.is_none() && !seen_node => man = Some(r.text()?.into_owned()),
                "Mod" if model.is_none() && !seen_node => model = Some(r.text()?.into_owned()),
                "Node" => {
                    seen_node = true;
                    nodes.push(self.read_node(r)?);
                }
                other => {
                    return Err(r.error(
                        ErrorKind::Unexpected,
                        format!("element <{other}> is not allowed here"),
                    ));
                }
            }
        }
        let ver_dtd = ver_dtd.ok_or_else(|| {
            r.error_at(
                ErrorKind::Missing,
                r.child_path("VerDTD"),
                "required element <VerDTD> is missing",
            )
        })?;
        check_unique(r, &nodes, "MgmtTree")?;
        r.close()?;
        Ok(MgmtTree {
            ver_dtd,
            man,
            model,
            nodes,
        })
    }

    /// Reads an opened `Node` up to and including its end tag.
    /// Order: `NodeName`, `Path`?, `RTProperties`?, then one `Value` or any number of `Node`s.
    fn read_node(&self, r: &mut XmlReader<'_>) -> Result<Node> {
        // How far into the fixed order we are: 0 nothing, 1 name, 2 path, 3 properties, 4 content.
        let mut stage = 0;
        let mut name = String::new();
        let mut path = None;
        let mut props = None;
        let mut value: Option<String> = None;
        let mut children: Vec<Node> = Vec::new();
        while let Some(el) = self.next(r)? {
            match (el, stage) {
                ("NodeName", 0) => name = r.text()?.into_owned(),
                (_, 0) => {
                    return Err(r.error(ErrorKind::Missing, "a Node must begin with <NodeName>"));
                }
                ("Path", 1) => path = Some(r.text()?.into_owned()),
                ("RTProperties", 1 | 2) => props = Some(self.read_props(r)?),
                ("Value", 1..=3) => value = Some(r.text()?.into_owned()),
                ("Node", 1..=3) => children.push(self.read_node(r)?),
                ("Node", 4) if value.is_none() => children.push(self.read_node(r)?),
                ("Value", 4) if value.is_some() => {
                    return Err(r.error(
                        ErrorKind::Unexpected,
                        format!("node '{name}' has more than one Value"),
                    ));
                }
                ("Value" | "Node", 4) => {
                    return Err(r.error(
                        ErrorKind::InvalidValue,
                        format!("node '{name}' has both a Value and child nodes"),
                    ));
                }
                (other, _) if NODE_CHILDREN.contains(&other) => {
                    return Err(r.error(
                        ErrorKind::Unexpected,
                        format!("element <{other}> is repeated or out of order"),
                    ));
                }
                (other, _) => {
                    return Err(r.error(
                        ErrorKind::Unexpected,
                        format!("element <{other}> is not allowed in a Node"),
                    ));
                }
            }
            stage = match el {
                "NodeName" => 1,
                "Path" => 2,
                "RTProperties" => 3,
                _ => 4,
            };
        }
        if stage == 0 {
            return Err(r.error_at(
                ErrorKind::Missing,
                r.child_path("NodeName"),
                "a Node must have a <NodeName>",
            ));
        }
        check_unique(r, &children, &name)?;
        r.close()?;
        let content = match value {
            Some(v) => NodeContent::Value(v),
            None => NodeContent::Children(children),
        };
        Ok(Node {
            name,
            path,
            props,
            content,
        })
    }

    fn read_props(&self, r: &mut XmlReader<'_>) -> Result<RtProperties> {
        let mut p = RtProperties::default();
        let mut seen: Vec<&str> = Vec::new();
        while let Some(el) = self.next(r)? {
            if seen.contains(&el) {
                return Err(r.error(ErrorKind::Unexpected, format!("element <{el}> is repeated")));
            }
            seen.push(el);
            match el {
                "ACL" => {
                    let text = r.text()?;
                    let acl = text.parse::<Acl>().map_err(|e| {
                        r.error_at(ErrorKind::InvalidValue, r.child_path("ACL"), e.to_string())
                    })?;
                    p.acl = Some(acl);
                }
                "Format" => {
                    let Some(format) = self.next(r)? else {
                        return Err(r.error(ErrorKind::Missing, "Format names no format element"));
                    };
                    let f = Format::from_name(format).ok_or_else(|| {
                        r.error(
                            ErrorKind::InvalidValue,
                            format!("unknown format <{format}>"),
                        )
                    })?;
                    r.skip_rest()?;
                    r.close()?;
                    p.format = Some(f);
                }
                "Name" => p.name = Some(r.text()?.into_owned()),
                "Size" => p.size = Some(r.text()?.into_owned()),
                "Title" => p.title = Some(r.text()?.into_owned()),
                "TStamp" => p.tstamp = Some(r.text()?.into_owned()),
                "VerNo" => p.ver_no = Some(r.text()?.into_owned()),
                "Type" => {
                    let Some(kind) = self.next(r)? else {
                        return Err(r.error(ErrorKind::Missing, "Type needs <MIME> or <DDFName>"));
                    };
                    let text = r.text()?.into_owned();
                    p.node_type = Some(match kind {
                        "MIME" => NodeType::Mime(text),
                        "DDFName" => NodeType::DdfName(text),
                        other => {
                            return Err(r.error(
                                ErrorKind::Unexpected,
                                format!("Type holds <MIME> or <DDFName>, not <{other}>"),
                            ));
                        }
                    });
                    r.close()?;
                }
                other => {
                    return Err(r.error(
                        ErrorKind::Unexpected,
                        format!("element <{other}> is not a run-time property"),
                    ));
                }
            }
        }
        r.close()?;
        Ok(p)
    }
}

/// Where a `Path` puts a node, spelled one way: `./A`, `A` and `./A/` are the same place, and no
/// `Path`, `.` and `./` are the root.
fn path_key(path: Option<&str>) -> &str {
    let p = crate::xml::trim_xml(path.unwrap_or_default());
    let p = p.strip_suffix('/').unwrap_or(p);
    if p == "." {
        ""
    } else {
        p.strip_prefix("./").unwrap_or(p)
    }
}

fn check_unique(r: &XmlReader<'_>, nodes: &[Node], parent: &str) -> Result<()> {
    for (i, node) in nodes.iter().enumerate() {
        if nodes.iter().take(i).any(|other| {
            other.name == node.name
                && path_key(other.path.as_deref()) == path_key(node.path.as_deref())
        }) {
            return Err(r.error(
                ErrorKind::InvalidValue,
                format!("'{parent}' has two child nodes named '{}'", node.name),
            ));
        }
    }
    Ok(())
}

/// Decodes a standalone TNDS document (namespace `syncml:dmddf1.2`, or none with a DTD reference).
pub fn decode(input: &[u8]) -> Result<MgmtTree> {
    let text = std::str::from_utf8(input).map_err(|e| {
        DecodeError::new(ErrorKind::NotWellFormed, "", format!("not UTF-8: {e}"))
            .at(e.valid_up_to() as u64)
    })?;
    const NAMESPACES: &[&str] = &[TNDS_NS];
    let mut r = XmlReader::new(text, NAMESPACES, DoctypePolicy::ExternalOnly, MAX_DEPTH);
    let root = r.root()?;
    // A DTD-style document has no namespace at all; one whose root is in the TNDS namespace has it
    // on every element.
    let reader = TreeReader {
        ns: 0,
        allow_no_namespace: root.ns == Ns::None,
    };
    if root.name != "MgmtTree" {
        return Err(r.error(
            ErrorKind::Unexpected,
            format!("root element must be <MgmtTree>, not <{}>", root.name),
        ));
    }
    reader.check_ns(&r, root.ns, root.name)?;
    let tree = reader.read_tree(&mut r)?;
    r.finish()?;
    Ok(tree)
}

/// Encodes a standalone TNDS document.
pub fn encode(tree: &MgmtTree) -> String {
    let mut w = XmlWriter::new();
    write_tree(&mut w, tree);
    w.finish()
}

/// Writes `MgmtTree` (with its namespace declaration) into a larger document.
pub(crate) fn write_tree(w: &mut XmlWriter, tree: &MgmtTree) {
    w.start_with("MgmtTree", &[("xmlns", TNDS_NS)]);
    w.text_element("VerDTD", &tree.ver_dtd);
    w.opt_text_element("Man", tree.man.as_deref());
    w.opt_text_element("Mod", tree.model.as_deref());
    for node in &tree.nodes {
        write_node(w, node);
    }
    w.end("MgmtTree");
}

fn write_node(w: &mut XmlWriter, node: &Node) {
    w.start("Node");
    w.text_element("NodeName", &node.name);
    w.opt_text_element("Path", node.path.as_deref());
    if let Some(p) = &node.props {
        w.start("RTProperties");
        if let Some(acl) = &p.acl {
            w.text_element("ACL", &acl.to_string());
        }
        if let Some(f) = p.format {
            w.start("Format");
            w.empty(f.as_str());
            w.end("Format");
        }
        w.opt_text_element("Name", p.name.as_deref());
        w.opt_text_element("Size", p.size.as_deref());
        w.opt_text_element("Title", p.title.as_deref());
        w.opt_text_element("TStamp", p.tstamp.as_deref());
        match &p.node_type {
            Some(NodeType::Mime(m)) => {
                w.start("Type");
                w.text_element("MIME", m);
                w.end("Type");
            }
            Some(NodeType::DdfName(d)) => {
                w.start("Type");
                w.text_element("DDFName", d);
                w.end("Type");
            }
            None => {}
        }
        w.opt_text_element("VerNo", p.ver_no.as_deref());
        w.end("RTProperties");
    }
    match &node.content {
        NodeContent::Value(v) => w.text_element("Value", v),
        NodeContent::Children(children) => {
            for child in children {
                write_node(w, child);
            }
        }
    }
    w.end("Node");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tnds");

    #[test]
    fn real_world_document_is_accepted() {
        let bytes = std::fs::read(format!("{TESTDATA}/PerProviderSubscription.xml")).unwrap();
        let tree = decode(&bytes).unwrap();
        assert_eq!(tree.ver_dtd, "1.2");
        let root = &tree.nodes[0];
        assert_eq!(root.name, "PerProviderSubscription");
        assert!(matches!(
            root.props.as_ref().and_then(|p| p.node_type.clone()),
            Some(NodeType::DdfName(d)) if d == "urn:wfa:mo:hotspot2dot0-perprovidersubscription:1.0"
        ));
        assert_eq!(
            root.find("i001/HomeSP/FQDN").and_then(Node::value),
            Some("mi6.co.uk")
        );
        assert!(root.find("i001/HomeSP").unwrap().props.is_none());
        // What we write reads back the same.
        assert_eq!(decode(encode(&tree).as_bytes()).unwrap(), tree);
    }

    #[test]
    fn node_with_value_and_children_is_refused() {
        let bytes = std::fs::read(format!(
            "{TESTDATA}/PerProviderSubscription_InvalidNode.xml"
        ))
        .unwrap();
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(
            err.reason
                .contains("'FQDN' has both a Value and child nodes"),
            "{err}"
        );
    }

    fn doc(body: &str) -> String {
        format!(r#"<MgmtTree xmlns="syncml:dmddf1.2"><VerDTD>1.2</VerDTD>{body}</MgmtTree>"#)
    }

    #[test]
    fn structural_rules() {
        let dup = doc(
            "<Node><NodeName>A</NodeName><Node><NodeName>x</NodeName></Node><Node><NodeName>x</NodeName></Node></Node>",
        );
        assert!(
            decode(dup.as_bytes())
                .unwrap_err()
                .reason
                .contains("two child nodes named 'x'")
        );
        let no_name = doc("<Node><Value>1</Value></Node>");
        assert!(
            decode(no_name.as_bytes())
                .unwrap_err()
                .reason
                .contains("NodeName")
        );
        let empty_name = doc("<Node><NodeName/><Value>1</Value></Node>");
        assert_eq!(decode(empty_name.as_bytes()).unwrap().nodes[0].name, "");
        let children_then_value = doc(
            "<Node><NodeName>A</NodeName><Node><NodeName>b</NodeName></Node><Value>1</Value></Node>",
        );
        assert!(decode(children_then_value.as_bytes()).is_err());
        let bad_acl =
            doc("<Node><NodeName>A</NodeName><RTProperties><ACL>Get=</ACL></RTProperties></Node>");
        assert!(
            decode(bad_acl.as_bytes())
                .unwrap_err()
                .reason
                .contains("no server")
        );
        let ddf = doc("<Node><NodeName>A</NodeName><DFProperties/></Node>");
        assert!(decode(ddf.as_bytes()).is_err());
        let internal_subset = format!("<!DOCTYPE MgmtTree [<!ENTITY x \"y\">]>{}", doc(""));
        assert_eq!(
            decode(internal_subset.as_bytes()).unwrap_err().kind,
            ErrorKind::Doctype
        );
        let external = format!(
            "<!DOCTYPE MgmtTree PUBLIC \"-//OMA//DTD-DM-DDF 1.2//EN\" \"http://www.openmobilealliance.org/tech/DTD/DM_DDF-V1_2.dtd\">{}",
            "<MgmtTree><VerDTD>1.2</VerDTD></MgmtTree>"
        );
        assert!(decode(external.as_bytes()).is_ok());
    }

    #[test]
    fn properties_round_trip() {
        let text = doc(
            "<Node><NodeName>A</NodeName><Path>./Vendor</Path><RTProperties><ACL>Get=*&amp;Replace=dms1</ACL><Format><node/></Format><TStamp>x</TStamp><Type><DDFName>urn:x</DDFName></Type></RTProperties><Node><NodeName>L</NodeName><RTProperties><Format><chr/></Format><Type><MIME>text/plain</MIME></Type></RTProperties><Value>v &amp; w</Value></Node></Node>",
        );
        let tree = decode(text.as_bytes()).unwrap();
        let a = &tree.nodes[0];
        assert_eq!(a.acl().unwrap().to_string(), "Get=*&Replace=dms1");
        assert_eq!(a.props.as_ref().unwrap().format, Some(Format::Node));
        assert_eq!(a.child("L").unwrap().value(), Some("v & w"));
        assert_eq!(decode(encode(&tree).as_bytes()).unwrap(), tree);
    }
}

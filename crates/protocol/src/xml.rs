//! A strict pull reader over quick-xml's namespace-resolving event stream, and a small writer.
//!
//! The decoders of this crate read documents element by element in the order the contract fixes, so the
//! rules of PROTOCOL.md A.3 (namespaces by URI, element order, depth, no DTD, no custom entities) are enforced
//! in one place. Names are borrowed from the input, not copied: a typed decode stays close to a raw scan.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{PrefixDeclaration, ResolveResult};

use crate::error::{DecodeError, ErrorKind, Result};

/// Which namespace an element is in, relative to the namespaces a decoder declared it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    /// No namespace bound.
    None,
    /// The index of a namespace in the list given to [`XmlReader::new`].
    Known(usize),
    /// Some other namespace.
    Other,
}

/// How a document type declaration is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DoctypePolicy {
    /// Any `<!DOCTYPE` is an error (delegation messages).
    Refuse,
    /// Accept one with an external identifier only, never fetch it; an internal subset is an error
    /// (TNDS and SyncML documents, PROTOCOL.md B.5).
    ExternalOnly,
}

/// An attribute of an element, other than namespace declarations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attr {
    pub ns: Ns,
    pub name: String,
    pub value: String,
}

/// A start tag, with its local name borrowed from the input.
#[derive(Debug, Clone)]
pub(crate) struct Start<'a> {
    pub ns: Ns,
    pub name: &'a str,
    pub attrs: Vec<Attr>,
}

#[derive(Debug)]
enum Token<'a> {
    Start(Start<'a>),
    End,
    Text(Cow<'a, str>),
    Eof,
}

fn classify(namespaces: &[&str], ignore_case: bool, resolved: &ResolveResult<'_>) -> Ns {
    match resolved {
        ResolveResult::Unbound => Ns::None,
        ResolveResult::Bound(ns) => {
            let uri = ns.into_inner();
            let same = |known: &&str| {
                if ignore_case {
                    known.eq_ignore_ascii_case(uri)
                } else {
                    *known == uri
                }
            };
            match namespaces.iter().position(same) {
                Some(index) => Ns::Known(index),
                None => Ns::Other,
            }
        }
        ResolveResult::Unknown(_) => Ns::Other,
    }
}

pub(crate) struct XmlReader<'a> {
    input: &'a str,
    inner: NsReader<&'a [u8]>,
    namespaces: &'static [&'static str],
    /// XML compares namespace URIs exactly; SyncML's are compared without case (deployed clients differ).
    ignore_namespace_case: bool,
    doctype: DoctypePolicy,
    max_depth: usize,
    /// Local names of the open elements, root first: used for depth and for error paths.
    stack: Vec<&'a str>,
    peeked: Option<Token<'a>>,
    /// Offset of the last token read, for error positions.
    offset: u64,
    root_closed: bool,
    /// A document type declaration was read (only one may be).
    doctype_seen: bool,
    /// When set, elements of the namespace with this index may not carry unqualified attributes
    /// (delegation messages of version 1.0, whose vocabulary has no attributes below the root).
    pub refuse_plain_attributes: Option<usize>,
    /// When set, elements not in `vocabulary` (or in a foreign namespace) are skipped instead of refused:
    /// a receiver may ignore unknown elements only in a higher minor version (A.3).
    /// The pair is (index of the namespace the vocabulary belongs to, its element names); elements of the
    /// other known namespaces are never skipped.
    pub skip_unknown: Option<(usize, &'static [&'static str])>,
}

impl std::fmt::Debug for XmlReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmlReader")
            .field("path", &self.path())
            .finish()
    }
}

const PREDEFINED_ENTITIES: [(&str, char); 5] = [
    ("lt", '<'),
    ("gt", '>'),
    ("amp", '&'),
    ("apos", '\''),
    ("quot", '"'),
];

/// XML's white space (production `S`): space, tab, CR and LF, not Unicode's wider set.
pub(crate) fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// A text value with XML white space around it removed (A.3).
pub(crate) fn trim_xml(s: &str) -> &str {
    s.trim_matches(is_xml_space)
}

/// XML 1.0 `Char`: what a document may contain, literally or through a character reference.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Byte offset of the first character that XML 1.0 does not allow anywhere in a document.
fn first_illegal_char(input: &str) -> Option<usize> {
    // Byte-wise first: in ASCII only the control characters other than tab, CR and LF are illegal, and
    // a per-character walk of every message was 11% of decoding a 28 KB SyncML message.
    if input.is_ascii() {
        return input
            .bytes()
            .position(|b| b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'));
    }
    input
        .char_indices()
        .find(|(_, c)| !is_xml_char(*c))
        .map(|(at, _)| at)
}

/// XML 1.0 (fifth edition) `NameStartChar`, without the colon (namespaces use it as a separator).
fn is_name_start_char(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
        | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}'
        | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}'
        | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}' | '\u{10000}'..='\u{EFFFF}')
}

fn is_name_char(c: char) -> bool {
    is_name_start_char(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// An `NCName` of XML Namespaces: a name without colons.
fn is_ncname(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(is_name_start_char) && chars.all(is_name_char)
}

/// A `QName`: `NCName` or `prefix:NCName`.
fn is_qname(name: &str) -> bool {
    match name.split_once(':') {
        Some((prefix, local)) => is_ncname(prefix) && is_ncname(local),
        None => is_ncname(name),
    }
}

/// Well-formedness of the raw attribute list of a start tag, which quick-xml does not fully check:
/// white space before each attribute, qualified names, quoted values without `<`.
fn check_raw_attributes(raw: &str) -> Result<(), &'static str> {
    let mut rest = raw;
    loop {
        let trimmed = rest.trim_start_matches(is_xml_space);
        if trimmed.is_empty() {
            return Ok(());
        }
        if trimmed.len() == rest.len() {
            return Err("attributes must be separated by white space");
        }
        let (name, after) = trimmed
            .split_once('=')
            .ok_or("an attribute must have a value")?;
        if !is_qname(trim_xml(name)) {
            return Err("an attribute name is not a valid XML name");
        }
        let after = after.trim_start_matches(is_xml_space);
        let quote = after
            .chars()
            .next()
            .filter(|q| matches!(q, '"' | '\''))
            .ok_or("an attribute value must be quoted")?;
        let body = after.get(1..).unwrap_or_default();
        let (value, tail) = body
            .split_once(quote)
            .ok_or("an attribute value is not closed")?;
        if value.contains('<') {
            return Err("'<' is not allowed in an attribute value");
        }
        rest = tail;
    }
}

/// The XML declaration's pseudo-attributes: `version` (1.x) first, then optional `encoding` and
/// `standalone` (yes | no), in this order and nothing else. The encoding itself is checked by the caller.
fn check_decl(content: &str) -> Result<(), &'static str> {
    const MALFORMED: &str = "malformed XML declaration";
    let mut rest = content.strip_prefix("xml").ok_or(MALFORMED)?;
    let mut expected = ["version", "encoding", "standalone"].into_iter();
    let mut first = true;
    loop {
        let trimmed = rest.trim_start_matches(is_xml_space);
        if trimmed.is_empty() {
            return if first {
                Err("the XML declaration must give a version")
            } else {
                Ok(())
            };
        }
        if trimmed.len() == rest.len() {
            return Err(MALFORMED);
        }
        let (name, after) = trimmed.split_once('=').ok_or(MALFORMED)?;
        let name = trim_xml(name);
        if first && name != "version" {
            return Err("the XML declaration must give a version first");
        }
        if !expected.any(|known| known == name) {
            return Err(MALFORMED);
        }
        first = false;
        let after = after.trim_start_matches(is_xml_space);
        let quote = after
            .chars()
            .next()
            .filter(|q| matches!(q, '"' | '\''))
            .ok_or(MALFORMED)?;
        let (value, tail) = after
            .get(1..)
            .unwrap_or_default()
            .split_once(quote)
            .ok_or(MALFORMED)?;
        let valid = match name {
            "version" => value.strip_prefix("1.").is_some_and(|minor| {
                !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit())
            }),
            "standalone" => matches!(value, "yes" | "no"),
            _ => !value.is_empty(),
        };
        if !valid {
            return Err(MALFORMED);
        }
        rest = tail;
    }
}

impl<'a> XmlReader<'a> {
    /// A reader over `input`; one leading byte-order mark is skipped.
    pub fn new(
        input: &'a str,
        namespaces: &'static [&'static str],
        doctype: DoctypePolicy,
        max_depth: usize,
    ) -> Self {
        let input = input.strip_prefix('\u{feff}').unwrap_or(input);
        let mut inner = NsReader::from_str(input);
        let config = inner.config_mut();
        config.expand_empty_elements = true;
        config.check_end_names = true;
        config.check_comments = true;
        config.trim_text(false);
        Self {
            input,
            inner,
            namespaces,
            ignore_namespace_case: false,
            doctype,
            max_depth,
            stack: Vec::with_capacity(16),
            peeked: None,
            offset: 0,
            root_closed: false,
            doctype_seen: false,
            refuse_plain_attributes: None,
            skip_unknown: None,
        }
    }

    /// Compares namespace URIs without regard to ASCII case (SyncML's `SYNCML:SYNCML1.2` is spelled
    /// several ways in the field).
    pub fn ignore_namespace_case(mut self) -> Self {
        self.ignore_namespace_case = true;
        self
    }

    /// Slash-separated local names of the open elements, e.g. `DelegationMessage/MsgID`.
    pub fn path(&self) -> String {
        self.stack.join("/")
    }

    /// The path of a child of the current element.
    pub fn child_path(&self, name: &str) -> String {
        if self.stack.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.path())
        }
    }

    pub fn error(&self, kind: ErrorKind, reason: impl Into<String>) -> DecodeError {
        DecodeError::new(kind, self.path(), reason).at(self.offset)
    }

    pub fn error_at(
        &self,
        kind: ErrorKind,
        field: String,
        reason: impl Into<String>,
    ) -> DecodeError {
        DecodeError::new(kind, field, reason).at(self.offset)
    }

    /// Borrow a name slice from the input when it points into it (it always does for a `&str` reader).
    fn borrow_from_input(&self, name: &str) -> &'a str {
        let base = self.input.as_ptr() as usize;
        let at = (name.as_ptr() as usize).wrapping_sub(base);
        match self.input.get(at..at.saturating_add(name.len())) {
            Some(slice) if slice.as_ptr() == name.as_ptr() => slice,
            // Not reachable with a borrowed reader; leaking is not an option, so fall back to a
            // vocabulary-free placeholder that can never match a real element name.
            _ => "\u{FFFD}",
        }
    }

    fn start_token(&mut self, ns: Ns, tag: &BytesStart<'a>) -> Result<Start<'a>> {
        let qname = tag.local_name();
        let name = self.borrow_from_input(qname.into_inner());
        let mut attrs = Vec::new();
        // Most elements have no attributes: skip the attribute iterator for them.
        let has_attributes = !tag.attributes_raw().trim_ascii().is_empty();
        for attr in tag
            .attributes()
            .take(if has_attributes { usize::MAX } else { 0 })
        {
            let attr = attr.map_err(|e| {
                self.error(
                    ErrorKind::NotWellFormed,
                    format!("malformed attribute: {e}"),
                )
            })?;
            let key = attr.key;
            match key.as_namespace_binding() {
                Some(PrefixDeclaration::Named(prefix)) if attr.value.is_empty() => {
                    return Err(self.error(
                        ErrorKind::NotWellFormed,
                        format!("the namespace prefix '{prefix}' cannot be bound to an empty name"),
                    ));
                }
                Some(_) => continue,
                None => {}
            }
            let (resolved, local) = self.inner.resolver().resolve_attribute(key);
            if let ResolveResult::Unknown(prefix) = &resolved {
                return Err(self.error(
                    ErrorKind::NotWellFormed,
                    format!("the namespace prefix '{prefix}' is not declared"),
                ));
            }
            let attr_ns = classify(self.namespaces, self.ignore_namespace_case, &resolved);
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| {
                    self.error(
                        ErrorKind::Entity,
                        format!("attribute value not allowed: {e}"),
                    )
                })?;
            if !value.chars().all(is_xml_char) {
                return Err(self.error(
                    ErrorKind::NotWellFormed,
                    "a character reference in an attribute value is not a legal XML character",
                ));
            }
            attrs.push(Attr {
                ns: attr_ns,
                name: local.into_inner().to_string(),
                value: value.into_owned(),
            });
        }
        Ok(Start { ns, name, attrs })
    }

    /// Reads the next token that matters: start, end, text (references resolved), or end of input.
    fn read_token(&mut self) -> Result<Token<'a>> {
        let mut text: Option<Cow<'a, str>> = None;
        loop {
            self.offset = self.inner.buffer_position();
            // Text may arrive in several events (around references and CDATA): merge them first.
            let (resolved, event) = match self.inner.read_resolved_event() {
                Ok(pair) => pair,
                Err(e) => {
                    return Err(
                        self.error(ErrorKind::NotWellFormed, format!("not well-formed: {e}"))
                    );
                }
            };
            if let (ResolveResult::Unknown(prefix), Event::Start(_)) = (&resolved, &event) {
                return Err(self.error(
                    ErrorKind::NotWellFormed,
                    format!("the namespace prefix '{prefix}' is not declared"),
                ));
            }
            let ns = classify(self.namespaces, self.ignore_namespace_case, &resolved);
            let piece: Cow<'a, str> = match event {
                Event::Text(t) => {
                    let piece = t.xml10_content();
                    if piece.contains("]]>") {
                        return Err(self.error(
                            ErrorKind::NotWellFormed,
                            "not well-formed: ']]>' is not allowed in text",
                        ));
                    }
                    piece
                }
                Event::CData(c) => c.xml10_content(),
                Event::GeneralRef(r) if r.is_char_ref() => {
                    match r
                        .resolve_char_ref()
                        .ok()
                        .flatten()
                        .filter(|c| is_xml_char(*c))
                    {
                        Some(c) => Cow::Owned(c.to_string()),
                        None => {
                            return Err(self.error(
                                ErrorKind::NotWellFormed,
                                format!(
                                    "character reference &{}; is not a legal XML character",
                                    &*r
                                ),
                            ));
                        }
                    }
                }
                Event::GeneralRef(r) => {
                    let resolved = PREDEFINED_ENTITIES
                        .iter()
                        .find(|(name, _)| *name == &*r)
                        .map(|(_, c)| *c);
                    match resolved {
                        Some(c) => Cow::Owned(c.to_string()),
                        None => {
                            return Err(self.error(
                                ErrorKind::Entity,
                                format!(
                                    "entity reference &{}; is not allowed: only the five predefined entities and character references",
                                    &*r
                                ),
                            ));
                        }
                    }
                }
                other => {
                    if let Some(t) = text.take() {
                        // Put the structural event back by handling it after the text: we cannot
                        // un-read, so stash it as a peeked token after returning the text.
                        let next = self.structural(ns, other)?;
                        if let Some(next) = next {
                            self.peeked = Some(next);
                            return Ok(Token::Text(t));
                        }
                        text = Some(t);
                        continue;
                    }
                    match self.structural(ns, other)? {
                        Some(tok) => return Ok(tok),
                        None => continue,
                    }
                }
            };
            text = Some(match text {
                None => piece,
                Some(mut acc) => {
                    acc.to_mut().push_str(&piece);
                    acc
                }
            });
        }
    }

    /// Handles a non-text event. `None` means "nothing to report" (comment, PI, declaration).
    fn structural(&mut self, ns: Ns, event: Event<'a>) -> Result<Option<Token<'a>>> {
        match event {
            Event::Start(tag) => {
                if self.root_closed {
                    return Err(
                        self.error(ErrorKind::NotWellFormed, "content after the root element")
                    );
                }
                if !is_qname(tag.name().into_inner()) {
                    return Err(self.error(
                        ErrorKind::NotWellFormed,
                        "not well-formed: an element name is not a valid XML name",
                    ));
                }
                check_raw_attributes(tag.attributes_raw()).map_err(|e| {
                    self.error(ErrorKind::NotWellFormed, format!("not well-formed: {e}"))
                })?;
                let start = self.start_token(ns, &tag)?;
                if self.stack.len() >= self.max_depth {
                    return Err(self.error(
                        ErrorKind::TooDeep,
                        format!("elements nested deeper than {} levels", self.max_depth),
                    ));
                }
                if let Some(index) = self.refuse_plain_attributes
                    && start.ns == Ns::Known(index)
                    && let Some(attr) = start.attrs.iter().find(|a| a.ns == Ns::None)
                {
                    return Err(self.error_at(
                        ErrorKind::Unexpected,
                        format!("{}/@{}", self.child_path(start.name), attr.name),
                        format!("attribute '{}' is not allowed here", attr.name),
                    ));
                }
                Ok(Some(Token::Start(start)))
            }
            Event::End(_) => Ok(Some(Token::End)),
            Event::Empty(_) => {
                Err(self.error(ErrorKind::NotWellFormed, "unexpanded empty element"))
            }
            Event::DocType(dt) => {
                if !self.stack.is_empty() || self.root_closed || self.doctype_seen {
                    return Err(self.error(ErrorKind::NotWellFormed, "misplaced DOCTYPE"));
                }
                self.doctype_seen = true;
                match self.doctype {
                    DoctypePolicy::Refuse => Err(self.error(
                        ErrorKind::Doctype,
                        "a DOCTYPE is not allowed in this document",
                    )),
                    DoctypePolicy::ExternalOnly => {
                        if dt.xml10_content().contains('[') {
                            Err(self.error(
                                ErrorKind::Doctype,
                                "a DOCTYPE with an internal subset is not allowed",
                            ))
                        } else {
                            Ok(None)
                        }
                    }
                }
            }
            Event::Decl(decl) => {
                if self.offset != 0 {
                    return Err(self.error(
                        ErrorKind::NotWellFormed,
                        "the XML declaration must be at the very beginning of the document",
                    ));
                }
                check_decl(&decl).map_err(|e| self.error(ErrorKind::NotWellFormed, e))?;
                if let Some(Ok(enc)) = decl.encoding()
                    && !enc.eq_ignore_ascii_case("utf-8")
                {
                    return Err(self.error(
                        ErrorKind::InvalidValue,
                        "the document must be encoded in UTF-8",
                    ));
                }
                Ok(None)
            }
            Event::PI(pi) => {
                let target = pi.target();
                if !is_ncname(target) || target.eq_ignore_ascii_case("xml") {
                    return Err(self.error(
                        ErrorKind::NotWellFormed,
                        "not well-formed: a processing instruction needs a target other than 'xml'",
                    ));
                }
                Ok(None)
            }
            Event::Comment(_) => Ok(None),
            Event::Eof => Ok(Some(Token::Eof)),
            Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => Ok(None),
        }
    }

    fn next_token(&mut self) -> Result<Token<'a>> {
        match self.peeked.take() {
            Some(tok) => Ok(tok),
            None => self.read_token(),
        }
    }

    /// Skips white space between elements; text anywhere else is an error.
    fn next_structural(&mut self) -> Result<Token<'a>> {
        loop {
            match self.next_token()? {
                Token::Text(t) if trim_xml(&t).is_empty() => continue,
                Token::Text(_) => {
                    return Err(self.error(
                        ErrorKind::Unexpected,
                        "text is not allowed here, only elements",
                    ));
                }
                tok => return Ok(tok),
            }
        }
    }

    fn is_unknown(start: &Start<'_>, (ns, vocabulary): (usize, &[&str])) -> bool {
        match start.ns {
            Ns::Known(i) if i == ns => !vocabulary.contains(&start.name),
            Ns::Known(_) => false,
            Ns::None | Ns::Other => true,
        }
    }

    /// Looks at the next child element of the current element without consuming it.
    /// `None` when the current element ends next.
    pub fn peek(&mut self) -> Result<Option<(Ns, &'a str)>> {
        loop {
            let tok = self.next_structural()?;
            match tok {
                Token::Start(start) => {
                    if let Some(vocabulary) = self.skip_unknown
                        && Self::is_unknown(&start, vocabulary)
                    {
                        self.stack.push(start.name);
                        self.skip_rest()?;
                        continue;
                    }
                    let out = (start.ns, start.name);
                    self.peeked = Some(Token::Start(start));
                    return Ok(Some(out));
                }
                Token::End => {
                    self.peeked = Some(Token::End);
                    return Ok(None);
                }
                Token::Eof => {
                    self.peeked = Some(Token::Eof);
                    return Ok(None);
                }
                // `next_structural` never yields text.
                Token::Text(_) => continue,
            }
        }
    }

    /// Consumes the next child start tag, whatever it is. Errors at the end of the parent.
    pub fn next_start(&mut self) -> Result<Start<'a>> {
        // Fast path: the start was peeked already (the usual `peek`, then consume).
        if let Some(Token::Start(start)) = self.peeked.take() {
            self.stack.push(start.name);
            return Ok(start);
        }
        if self.peek()?.is_none() {
            return Err(self.error(ErrorKind::Missing, "an element was expected here"));
        }
        match self.next_token()? {
            Token::Start(start) => {
                self.stack.push(start.name);
                Ok(start)
            }
            _ => Err(self.error(ErrorKind::Missing, "an element was expected here")),
        }
    }

    /// Opens the document's root element. Refuses first any character XML does not allow.
    pub fn root(&mut self) -> Result<Start<'a>> {
        if let Some(at) = first_illegal_char(self.input) {
            let c = self.input.get(at..).and_then(|s| s.chars().next());
            return Err(DecodeError::new(
                ErrorKind::NotWellFormed,
                "",
                format!(
                    "not well-formed: a character that XML does not allow (U+{:04X})",
                    c.map_or(0, u32::from)
                ),
            )
            .at(at as u64));
        }
        if self.input.starts_with('\u{feff}') {
            return Err(DecodeError::new(
                ErrorKind::NotWellFormed,
                "",
                "not well-formed: more than one byte-order mark",
            ));
        }
        match self.next_structural()? {
            Token::Start(start) => {
                self.stack.push(start.name);
                Ok(start)
            }
            Token::Eof => Err(self.error(ErrorKind::NotWellFormed, "empty document")),
            _ => Err(self.error(ErrorKind::NotWellFormed, "no root element")),
        }
    }

    /// Consumes a child element that must be `name` in namespace `ns`.
    pub fn open(&mut self, ns: Ns, name: &str) -> Result<Start<'a>> {
        match self.peek()? {
            Some((found_ns, found)) if found == name && found_ns == ns => self.next_start(),
            Some((_, found)) if found == name => Err(self.error_at(
                ErrorKind::Unexpected,
                self.child_path(name),
                format!("element <{name}> is in the wrong namespace"),
            )),
            Some((_, found)) => Err(self.error_at(
                ErrorKind::Missing,
                self.child_path(name),
                format!("required element <{name}> is missing (found <{found}>)"),
            )),
            None => Err(self.error_at(
                ErrorKind::Missing,
                self.child_path(name),
                format!("required element <{name}> is missing"),
            )),
        }
    }

    /// Consumes a child element `name` if it comes next.
    pub fn open_if(&mut self, ns: Ns, name: &str) -> Result<Option<Start<'a>>> {
        match self.peek()? {
            Some((found_ns, found)) if found == name && found_ns == ns => {
                self.next_start().map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Ends the current element: the next token must be its end tag.
    pub fn close(&mut self) -> Result<()> {
        match self.peek()? {
            None => {}
            Some((_, found)) => {
                return Err(self.error_at(
                    ErrorKind::Unexpected,
                    self.child_path(found),
                    format!("element <{found}> is not allowed here"),
                ));
            }
        }
        match self.next_token()? {
            Token::End => {
                self.stack.pop();
                if self.stack.is_empty() {
                    self.root_closed = true;
                }
                Ok(())
            }
            _ => Err(self.error(ErrorKind::NotWellFormed, "unexpected end of document")),
        }
    }

    /// Reads the text content of the current element up to its end tag, trimmed. Child elements are an error.
    pub fn text(&mut self) -> Result<Cow<'a, str>> {
        let mut acc: Option<Cow<'a, str>> = None;
        loop {
            match self.next_token()? {
                Token::Text(t) => {
                    acc = Some(match acc {
                        None => t,
                        Some(mut a) => {
                            a.to_mut().push_str(&t);
                            a
                        }
                    })
                }
                Token::End => {
                    self.stack.pop();
                    if self.stack.is_empty() {
                        self.root_closed = true;
                    }
                    return Ok(match acc {
                        None => Cow::Borrowed(""),
                        Some(Cow::Borrowed(s)) => Cow::Borrowed(trim_xml(s)),
                        Some(Cow::Owned(s)) => {
                            let trimmed = trim_xml(&s);
                            if trimmed.len() == s.len() {
                                Cow::Owned(s)
                            } else {
                                Cow::Owned(trimmed.to_string())
                            }
                        }
                    });
                }
                Token::Start(start) => {
                    return Err(self.error(
                        ErrorKind::Unexpected,
                        format!(
                            "element <{}> is not allowed inside a text value",
                            start.name
                        ),
                    ));
                }
                Token::Eof => {
                    return Err(self.error(ErrorKind::NotWellFormed, "unexpected end of document"));
                }
            }
        }
    }

    /// Opens `name`, reads its text and closes it.
    pub fn text_element(&mut self, ns: Ns, name: &str) -> Result<Cow<'a, str>> {
        self.open(ns, name)?;
        self.text()
    }

    /// Like [`Self::text_element`], for an optional element.
    pub fn opt_text_element(&mut self, ns: Ns, name: &str) -> Result<Option<Cow<'a, str>>> {
        match self.open_if(ns, name)? {
            Some(_) => self.text().map(Some),
            None => Ok(None),
        }
    }

    /// Skips the rest of the element most recently opened, whatever it contains.
    pub fn skip_rest(&mut self) -> Result<()> {
        let target = self.stack.len().saturating_sub(1);
        loop {
            match self.next_token()? {
                Token::End => {
                    self.stack.pop();
                    if self.stack.len() == target {
                        if self.stack.is_empty() {
                            self.root_closed = true;
                        }
                        return Ok(());
                    }
                }
                Token::Start(start) => self.stack.push(start.name),
                Token::Text(_) => {}
                Token::Eof => {
                    return Err(self.error(ErrorKind::NotWellFormed, "unexpected end of document"));
                }
            }
        }
    }

    /// After the root was closed: only comments, PIs and white space may follow.
    pub fn finish(&mut self) -> Result<()> {
        match self.next_structural()? {
            Token::Eof => Ok(()),
            _ => Err(self.error(ErrorKind::NotWellFormed, "content after the root element")),
        }
    }
}

/// Escapes text for element content and attribute values.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    quick_xml::escape::escape(text)
}

/// A minimal indenting XML writer over a `String`.
#[derive(Debug, Default)]
pub(crate) struct XmlWriter {
    out: String,
    depth: usize,
}

impl XmlWriter {
    pub fn new() -> Self {
        let mut out = String::with_capacity(1024);
        out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        Self { out, depth: 0 }
    }

    fn indent(&mut self) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
    }

    /// `<name attr="v" …>`
    pub fn start_with(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        self.push_attrs(attrs);
        self.out.push_str(">\n");
        self.depth += 1;
    }

    fn push_attrs(&mut self, attrs: &[(&str, &str)]) {
        for (key, value) in attrs {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("=\"");
            self.out.push_str(&escape(value));
            self.out.push('"');
        }
    }

    pub fn start(&mut self, name: &str) {
        self.start_with(name, &[]);
    }

    pub fn end(&mut self, name: &str) {
        self.depth = self.depth.saturating_sub(1);
        self.indent();
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    /// `<name/>`
    pub fn empty(&mut self, name: &str) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        self.out.push_str("/>\n");
    }

    /// `<name>text</name>`
    pub fn text_element(&mut self, name: &str, text: &str) {
        self.text_element_with(name, &[], text);
    }

    /// `<name attr="v" …>text</name>`
    pub fn text_element_with(&mut self, name: &str, attrs: &[(&str, &str)], text: &str) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        self.push_attrs(attrs);
        self.out.push('>');
        self.out.push_str(&escape(text));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    pub fn opt_text_element(&mut self, name: &str, text: Option<&str>) {
        if let Some(text) = text {
            self.text_element(name, text);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_xml_and_namespaces() {
        for good in ["a", "_a", "a.b-c_1", "d:Node", "Fée", "x\u{B7}y"] {
            assert!(is_qname(good), "{good}");
        }
        for bad in ["", "1a", "-a", ":a", "a:", "a:b:c", "a b", "a<b", "\u{D7}"] {
            assert!(!is_qname(bad), "{bad}");
        }
    }

    #[test]
    fn characters_and_white_space_are_xml_ones() {
        assert_eq!(first_illegal_char("a\tb\r\nc\u{85}\u{FFFD}\u{10000}"), None);
        assert_eq!(first_illegal_char("ab\u{1}"), Some(2));
        // The ASCII fast path: DEL is legal, unit separator is not.
        assert_eq!(first_illegal_char("a\tb\r\n\u{7f} x\u{1f}"), Some(8));
        assert_eq!(first_illegal_char("<a>\u{7f}</a>"), None);
        assert_eq!(first_illegal_char("\u{FFFE}"), Some(0));
        assert_eq!(trim_xml(" \t\r\nx \n"), "x");
        assert_eq!(trim_xml("\u{A0}x\u{3000}"), "\u{A0}x\u{3000}");
    }

    #[test]
    fn raw_attribute_lists() {
        for good in [
            "",
            " ",
            " a=\"1\"",
            " a = '1'  b=\"x=y>\"\n",
            "\tx:a=\"it's\"",
        ] {
            assert_eq!(check_raw_attributes(good), Ok(()), "{good:?}");
        }
        for bad in [
            " a=\"1\"b=\"2\"",
            " a",
            " a=1",
            " a=\"1",
            " a=\"<\"",
            " 1a=\"x\"",
        ] {
            assert!(check_raw_attributes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn xml_declarations() {
        for good in [
            "xml version=\"1.0\"",
            "xml version='1.0' encoding='UTF-8'",
            "xml version=\"1.1\" encoding=\"utf-8\" standalone=\"no\"",
            "xml version=\"1.0\" standalone=\"yes\" ",
        ] {
            assert_eq!(check_decl(good), Ok(()), "{good}");
        }
        for bad in [
            "xml",
            "xml encoding=\"UTF-8\"",
            "xml version=\"2.0\"",
            "xml version=\"1.\"",
            "xml version=\"1.0\" standalone=\"maybe\"",
            "xml version=\"1.0\" foo=\"bar\"",
            "xml standalone=\"yes\" version=\"1.0\"",
            "xml version=\"1.0\" standalone=\"yes\" encoding=\"UTF-8\"",
            "xml version=\"1.0\"encoding=\"UTF-8\"",
        ] {
            assert!(check_decl(bad).is_err(), "{bad}");
        }
    }
}

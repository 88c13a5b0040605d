//! A strict pull reader over quick-xml's namespace-resolving event stream, and a small writer.
//!
//! The decoders of this crate read documents element by element in the order the contract fixes, so the
//! rules of PROTOCOL.md A.3 (namespaces by URI, element order, depth, no DTD, no custom entities) are enforced
//! in one place. Names are borrowed from the input, not copied: a typed decode stays close to a raw scan.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;

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

impl<'a> XmlReader<'a> {
    pub fn new(
        input: &'a str,
        namespaces: &'static [&'static str],
        doctype: DoctypePolicy,
        max_depth: usize,
    ) -> Self {
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
            if key.as_namespace_binding().is_some() {
                continue;
            }
            let (resolved, local) = self.inner.resolver().resolve_attribute(key);
            let attr_ns = classify(self.namespaces, self.ignore_namespace_case, &resolved);
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| {
                    self.error(
                        ErrorKind::Entity,
                        format!("attribute value not allowed: {e}"),
                    )
                })?;
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
            let ns = classify(self.namespaces, self.ignore_namespace_case, &resolved);
            let piece: Cow<'a, str> = match event {
                Event::Text(t) => t.xml10_content(),
                Event::CData(c) => c.xml10_content(),
                Event::GeneralRef(r) => {
                    let resolved = if r.is_char_ref() {
                        r.resolve_char_ref().ok().flatten()
                    } else {
                        PREDEFINED_ENTITIES
                            .iter()
                            .find(|(name, _)| *name == &*r)
                            .map(|(_, c)| *c)
                    };
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
                let start = self.start_token(ns, &tag)?;
                if self.stack.len() >= self.max_depth {
                    return Err(self.error(
                        ErrorKind::TooDeep,
                        format!("elements nested deeper than {} levels", self.max_depth),
                    ));
                }
                Ok(Some(Token::Start(start)))
            }
            Event::End(_) => Ok(Some(Token::End)),
            Event::Empty(_) => {
                Err(self.error(ErrorKind::NotWellFormed, "unexpanded empty element"))
            }
            Event::DocType(dt) => {
                if !self.stack.is_empty() || self.root_closed {
                    return Err(self.error(ErrorKind::NotWellFormed, "misplaced DOCTYPE"));
                }
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
            Event::Comment(_) | Event::PI(_) => Ok(None),
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
                Token::Text(t) if t.trim().is_empty() => continue,
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

    /// Opens the document's root element.
    pub fn root(&mut self) -> Result<Start<'a>> {
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
                        Some(Cow::Borrowed(s)) => Cow::Borrowed(s.trim()),
                        Some(Cow::Owned(s)) => {
                            let trimmed = s.trim();
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

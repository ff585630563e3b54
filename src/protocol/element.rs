//! A small owned XML element tree: what one stanza parses into.
//!
//! The tree keeps qualified names and attributes exactly as the peer wrote
//! them, plus the resolved namespace of every element, so a stanza can be
//! forwarded byte-for-byte equivalent after the router rewrites `from`/`to`.
//! Parsing is done by quick-xml on one complete stanza that the [`Framer`]
//! already delimited and size-checked; this module never sees a partial
//! document and never does IO.
//!
//! [`Framer`]: super::framer::Framer

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use quick_xml::events::{BytesStart, Event};

use super::ns;

/// Deepest nesting accepted inside one stanza. Recursion in drop, clone and
/// serialisation is bounded by this, so a hostile `<a><a><a>…` cannot
/// overflow the stack.
pub const MAX_DEPTH: usize = 48;

/// A resolved namespace URI.
///
/// Reference-counted so that every element in a scope shares the one
/// copy its declaration produced: a long `xmlns` inherited by thousands
/// of children costs its bytes once, not once per child.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ns(Arc<str>);

impl Ns {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Ns {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Ns {
    fn from(s: &str) -> Ns {
        Ns(Arc::from(s))
    }
}

impl From<String> for Ns {
    fn from(s: String) -> Ns {
        Ns(Arc::from(s))
    }
}

impl From<Ns> for String {
    fn from(n: Ns) -> String {
        n.0.to_string()
    }
}

impl PartialEq<str> for Ns {
    fn eq(&self, o: &str) -> bool {
        &*self.0 == o
    }
}

impl PartialEq<&str> for Ns {
    fn eq(&self, o: &&str) -> bool {
        &*self.0 == *o
    }
}

impl PartialEq<String> for Ns {
    fn eq(&self, o: &String) -> bool {
        *self.0 == **o
    }
}

impl std::fmt::Display for Ns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A child of an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// An XML element with resolved namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Qualified name as written (`message`, `stream:error`).
    pub name: String,
    /// Resolved namespace URI.
    pub ns: Ns,
    /// Attributes as written, including `xmlns` declarations.
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

/// Why a stanza could not be turned into a tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    #[error("restricted XML: {0}")]
    Restricted(&'static str),
    #[error("element nesting too deep")]
    TooDeep,
    #[error("too many elements in one stanza")]
    TooManyElements,
    #[error("too many attributes on one element")]
    TooManyAttributes,
    #[error("undeclared namespace prefix {0}")]
    BadPrefix(String),
}

impl Element {
    /// Creates an element whose namespace is declared with an `xmlns`
    /// attribute, so it serialises correctly in any context.
    pub fn new(name: &str, ns: &str) -> Element {
        Element {
            name: name.to_string(),
            ns: Ns::from(ns),
            attrs: vec![("xmlns".to_string(), ns.to_string())],
            children: Vec::new(),
        }
    }

    /// Creates a stanza-level element in `jabber:client` without an
    /// `xmlns` attribute: it inherits the stream's default namespace.
    pub fn stanza(name: &str) -> Element {
        Element { name: name.to_string(), ns: Ns::from(ns::CLIENT), attrs: Vec::new(), children: Vec::new() }
    }

    /// Local part of the qualified name.
    pub fn local_name(&self) -> &str {
        match self.name.rfind(':') {
            Some(i) => &self.name[i + 1..],
            None => &self.name,
        }
    }

    pub fn is(&self, local: &str, ns: &str) -> bool {
        self.local_name() == local && self.ns == ns
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Sets (or replaces) an attribute.
    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        if let Some(slot) = self.attrs.iter_mut().find(|(k, _)| k == name) {
            slot.1 = value;
        } else {
            self.attrs.push((name.to_string(), value));
        }
    }

    pub fn remove_attr(&mut self, name: &str) {
        self.attrs.retain(|(k, _)| k != name);
    }

    /// Builder form of [`Element::set_attr`].
    pub fn with_attr(mut self, name: &str, value: impl Into<String>) -> Element {
        self.set_attr(name, value);
        self
    }

    pub fn with_child(mut self, child: Element) -> Element {
        self.children.push(Node::Element(child));
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Element {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn push(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn child(&self, local: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(local, ns))
    }

    pub fn child_mut(&mut self, local: &str, ns: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.is(local, ns) => Some(e),
            _ => None,
        })
    }

    pub fn has_child(&self, local: &str, ns: &str) -> bool {
        self.child(local, ns).is_some()
    }

    /// Removes every direct child matching the name and namespace.
    pub fn remove_children(&mut self, local: &str, ns: &str) {
        self.children.retain(|n| !matches!(n, Node::Element(e) if e.is(local, ns)));
    }

    /// Concatenated text of the direct children.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }

    /// The first child element (the payload of an iq).
    pub fn first_element(&self) -> Option<&Element> {
        self.elements().next()
    }

    /// Appends the XML serialisation of this element to `out`.
    ///
    /// The output is well-formed whatever the tree holds: text and values
    /// go through [`escape_into`], which cannot emit a character XML
    /// forbids, and a name that is not a valid `QName` (only code could
    /// build one; the parser refuses them) is written as a placeholder, an
    /// attribute with such a name is left out.
    pub fn write_to(&self, out: &mut String) {
        out.push('<');
        push_name(&self.name, out);
        for (k, v) in &self.attrs {
            if !is_qname(k) {
                continue;
            }
            out.push(' ');
            out.push_str(k);
            out.push_str("=\"");
            escape_into(v, out, true);
            out.push('"');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for c in &self.children {
            match c {
                Node::Element(e) => e.write_to(out),
                Node::Text(t) => escape_into(t, out, false),
            }
        }
        out.push_str("</");
        push_name(&self.name, out);
        out.push('>');
    }

    /// Serialises to a fresh string.
    pub fn to_xml(&self) -> String {
        let mut s = String::with_capacity(128);
        self.write_to(&mut s);
        s
    }
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_xml())
    }
}

/// Element names that are not `QName`s are written as this.
const INVALID_NAME: &str = "invalid-name";

fn push_name(name: &str, out: &mut String) {
    out.push_str(if is_qname(name) { name } else { INVALID_NAME });
}

/// Escapes text or attribute content.
///
/// Characters outside the XML `Char` production (C0 controls other than
/// tab, newline and carriage return; U+FFFE and U+FFFF) become U+FFFD, so
/// nothing written through here can make a peer's parser reject the
/// stream. Carriage returns, and in attributes tabs and newlines, are
/// written as character references so the receiver reads back the same
/// value rather than a normalised one.
pub fn escape_into(s: &str, out: &mut String, attr: bool) {
    let bytes = s.as_bytes();
    let mut last = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let (rep, len) = match b {
            b'<' => ("&lt;", 1),
            b'>' => ("&gt;", 1),
            b'&' => ("&amp;", 1),
            b'"' if attr => ("&quot;", 1),
            b'\'' if attr => ("&apos;", 1),
            b'\r' => ("&#xD;", 1),
            b'\n' if attr => ("&#xA;", 1),
            b'\t' if attr => ("&#x9;", 1),
            b'\t' | b'\n' => {
                i += 1;
                continue;
            }
            0..=0x1F => ("\u{FFFD}", 1),
            // U+FFFE and U+FFFF: EF BF BE / EF BF BF.
            0xEF if bytes.get(i + 1) == Some(&0xBF) && matches!(bytes.get(i + 2), Some(0xBE | 0xBF)) => ("\u{FFFD}", 3),
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[last..i]);
        out.push_str(rep);
        i += len;
        last = i;
    }
    out.push_str(&s[last..]);
}

/// Returns `s` with every character outside the XML `Char` production
/// replaced by U+FFFD, borrowing when there is none (the common case).
///
/// For serialised XML produced before input was checked: replacing a
/// character keeps the document's structure, so it stays the same stanza.
pub fn repair_xml_chars(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().all(is_xml_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(s.chars().map(|c| if is_xml_char(c) { c } else { '\u{FFFD}' }).collect())
}

/// Escapes into a new string.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    escape_into(s, &mut o, true);
    o
}

/// Limits on the shape of one stanza, on top of its size in bytes. They
/// keep the memory of a parsed tree within a small multiple of the bytes
/// that produced it: an empty `<a/>` is four bytes on the wire but an
/// element in memory, and an attribute `a=''` likewise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// Elements in one stanza, the root included.
    pub max_elements: usize,
    /// Attributes (namespace declarations included) on one element.
    pub max_attributes: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits { max_elements: 4096, max_attributes: 64 }
    }
}

/// Namespace scope in effect where a stanza starts (the stream's default
/// namespace and its declared prefixes).
#[derive(Clone, Debug)]
pub struct Scope {
    pub default_ns: Ns,
    pub prefixes: Vec<(String, Ns)>,
}

impl Scope {
    /// The scope in effect inside a client stream.
    pub fn client_stream() -> Scope {
        Scope {
            default_ns: Ns::from(ns::CLIENT),
            prefixes: vec![("stream".to_string(), Ns::from(ns::STREAM)), ("xml".to_string(), Ns::from(ns::XML))],
        }
    }
}

/// The namespace bindings in effect while one stanza is parsed.
///
/// Declarations are pushed when their element opens and popped when it
/// closes, so an element never copies its parent's scope: a lookup is one
/// hash probe and the total work is linear in the number of declarations.
/// URIs are [`Ns`] handles, so every element in a scope shares one copy.
struct Bindings<'a> {
    base: &'a Scope,
    defaults: Vec<Ns>,
    prefixes: HashMap<String, Vec<Ns>>,
    /// What each open element declared, in order: `None` is a default
    /// namespace, `Some(p)` a prefix. `marks` holds where each open
    /// element's entries start.
    undo: Vec<Option<String>>,
    marks: Vec<usize>,
}

impl<'a> Bindings<'a> {
    fn new(base: &'a Scope) -> Self {
        Bindings { base, defaults: Vec::new(), prefixes: HashMap::new(), undo: Vec::new(), marks: Vec::new() }
    }

    fn lookup(&self, prefix: &str) -> Option<&Ns> {
        if let Some(u) = self.prefixes.get(prefix).and_then(|v| v.last()) {
            return Some(u);
        }
        self.base.prefixes.iter().rev().find(|(p, _)| p == prefix).map(|(_, u)| u)
    }

    fn default_ns(&self) -> &Ns {
        self.defaults.last().unwrap_or(&self.base.default_ns)
    }

    /// Opens an element: applies its declarations and resolves the
    /// namespaces of its name and prefixed attributes.
    fn enter(&mut self, qname: &str, attrs: &[(String, String)]) -> Result<Ns, ParseError> {
        self.marks.push(self.undo.len());
        for (k, v) in attrs {
            if k == "xmlns" {
                if v == ns::XML || v == XMLNS_URI {
                    return Err(ParseError::NotWellFormed("reserved namespace as default".into()));
                }
                self.defaults.push(Ns::from(v.as_str()));
                self.undo.push(None);
            } else if let Some(p) = k.strip_prefix("xmlns:") {
                if v.is_empty() {
                    return Err(ParseError::NotWellFormed(format!("empty namespace for prefix {p}")));
                }
                let reserved = p == "xmlns" || (p == "xml") != (v == ns::XML) || v == XMLNS_URI;
                if reserved {
                    return Err(ParseError::NotWellFormed(format!("reserved prefix or namespace {p}")));
                }
                self.prefixes.entry(p.to_string()).or_default().push(Ns::from(v.as_str()));
                self.undo.push(Some(p.to_string()));
            }
        }
        for (k, _) in attrs {
            if let Some((p, _)) = k.split_once(':')
                && p != "xmlns"
                && self.lookup(p).is_none()
            {
                return Err(ParseError::BadPrefix(p.to_string()));
            }
        }
        match qname.split_once(':') {
            Some(("xmlns", _)) => Err(ParseError::NotWellFormed("element with prefix xmlns".into())),
            Some((p, _)) => self.lookup(p).cloned().ok_or_else(|| ParseError::BadPrefix(p.to_string())),
            None => Ok(self.default_ns().clone()),
        }
    }

    /// Closes the innermost open element, dropping its declarations.
    fn leave(&mut self) {
        let mark = self.marks.pop().unwrap_or(0);
        while self.undo.len() > mark {
            match self.undo.pop() {
                Some(None) => {
                    self.defaults.pop();
                }
                Some(Some(p)) => {
                    if let Some(v) = self.prefixes.get_mut(&p) {
                        v.pop();
                    }
                }
                None => break,
            }
        }
    }
}

/// The namespace of `xmlns` declarations, which nothing may bind.
const XMLNS_URI: &str = "http://www.w3.org/2000/xmlns/";

fn nwf(e: impl std::fmt::Display) -> ParseError {
    ParseError::NotWellFormed(e.to_string())
}

/// Parses a start tag's name and attributes, checking names against the
/// XML `Name` production (as namespace-qualified names), values against
/// `Char` (after character references are decoded), the attribute count
/// and uniqueness (one hash set, so linear in the attributes).
fn start_parts(s: &BytesStart<'_>, limits: &ParseLimits) -> Result<(String, Vec<(String, String)>), ParseError> {
    let name = std::str::from_utf8(s.name().as_ref()).map_err(nwf)?.to_string();
    if !is_qname(&name) {
        return Err(ParseError::NotWellFormed("invalid element name".into()));
    }
    let mut attrs: Vec<(String, String)> = Vec::new();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let mut it = s.attributes();
    it.with_checks(false);
    for a in it {
        let a = a.map_err(nwf)?;
        if attrs.len() >= limits.max_attributes {
            return Err(ParseError::TooManyAttributes);
        }
        let key = a.key.into_inner();
        if !seen.insert(key) {
            return Err(ParseError::NotWellFormed("duplicate attribute".into()));
        }
        let k = std::str::from_utf8(key).map_err(nwf)?;
        if !is_qname(k) {
            return Err(ParseError::NotWellFormed("invalid attribute name".into()));
        }
        let v = a.normalized_value(quick_xml::XmlVersion::Implicit1_0).map_err(nwf)?.into_owned();
        if let Some(c) = v.chars().find(|c| !is_xml_char(*c)) {
            return Err(ParseError::NotWellFormed(format!("illegal character U+{:04X} in attribute", c as u32)));
        }
        attrs.push((k.to_string(), v));
    }
    Ok((name, attrs))
}

/// Parses a lone start tag such as a stream header (`<stream:stream …>`),
/// returning the element with no children.
pub fn parse_start_tag(tag: &[u8], scope: &Scope) -> Result<Element, ParseError> {
    let mut r = quick_xml::Reader::from_reader(tag);
    r.config_mut().check_end_names = false;
    let limits = ParseLimits::default();
    loop {
        match r.read_event().map_err(nwf)? {
            Event::Start(s) | Event::Empty(s) => {
                let (name, attrs) = start_parts(&s, &limits)?;
                let ns = Bindings::new(scope).enter(&name, &attrs)?;
                return Ok(Element { name, ns, attrs, children: Vec::new() });
            }
            Event::Decl(_) | Event::Text(_) => continue,
            Event::Eof => return Err(ParseError::NotWellFormed("empty tag".into())),
            _ => return Err(ParseError::Restricted("unexpected markup in stream header")),
        }
    }
}

/// Parses exactly one complete element (a stanza) from `bytes` with the
/// default [`ParseLimits`].
///
/// # Errors
/// See [`parse_element_with`].
pub fn parse_element(bytes: &[u8], scope: &Scope) -> Result<Element, ParseError> {
    parse_element_with(bytes, scope, &ParseLimits::default())
}

/// Parses exactly one complete element (a stanza) from `bytes`.
///
/// Time and memory are linear in `bytes.len()`: namespace scopes are
/// shared, not copied, every check is a single pass, and `limits` bound
/// the elements and attributes that a few bytes each could otherwise
/// multiply into large trees.
///
/// # Errors
/// Anything other than a single well-formed element with predefined or
/// character entities only: DTDs, processing instructions and comments are
/// [`ParseError::Restricted`], too many elements or attributes
/// [`ParseError::TooManyElements`] / [`ParseError::TooManyAttributes`],
/// everything else malformed is [`ParseError::NotWellFormed`].
pub fn parse_element_with(bytes: &[u8], scope: &Scope, limits: &ParseLimits) -> Result<Element, ParseError> {
    let mut r = quick_xml::Reader::from_reader(bytes);
    {
        let c = r.config_mut();
        c.check_end_names = true;
        c.check_comments = true;
        c.expand_empty_elements = false;
        c.trim_text(false);
    }
    let mut scopes = Bindings::new(scope);
    let mut stack: Vec<Element> = Vec::new();
    let mut done: Option<Element> = None;
    let mut elements = 0usize;
    loop {
        let ev = r.read_event().map_err(nwf)?;
        let empty = matches!(ev, Event::Empty(_));
        match ev {
            Event::Start(_) | Event::Empty(_) if done.is_some() => {
                return Err(ParseError::NotWellFormed("more than one root".into()));
            }
            Event::Start(s) | Event::Empty(s) => {
                elements += 1;
                if elements > limits.max_elements {
                    return Err(ParseError::TooManyElements);
                }
                if !empty && stack.len() >= MAX_DEPTH {
                    return Err(ParseError::TooDeep);
                }
                let (name, attrs) = start_parts(&s, limits)?;
                let ns = scopes.enter(&name, &attrs)?;
                let el = Element { name, ns, attrs, children: Vec::new() };
                if empty {
                    scopes.leave();
                    match stack.last_mut() {
                        Some(p) => p.children.push(Node::Element(el)),
                        None => done = Some(el),
                    }
                } else {
                    stack.push(el);
                }
            }
            Event::End(_) => {
                let el = stack.pop().ok_or_else(|| ParseError::NotWellFormed("unbalanced end tag".into()))?;
                scopes.leave();
                match stack.last_mut() {
                    Some(p) => p.children.push(Node::Element(el)),
                    None => done = Some(el),
                }
            }
            Event::Text(t) => {
                let s = t.xml10_content().map_err(nwf)?;
                push_text(&mut stack, &s, done.is_some())?;
            }
            Event::CData(t) => {
                let s = t.decode().map_err(nwf)?;
                push_text(&mut stack, &s, done.is_some())?;
            }
            Event::GeneralRef(g) => {
                let ch = match g.resolve_char_ref().map_err(nwf)? {
                    Some(c) => c,
                    None => match g.decode().map_err(nwf)?.as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "quot" => '"',
                        "apos" => '\'',
                        _ => return Err(ParseError::Restricted("undefined entity")),
                    },
                };
                if !is_xml_char(ch) {
                    return Err(ParseError::NotWellFormed("illegal character reference".into()));
                }
                let mut b = [0u8; 4];
                push_text(&mut stack, ch.encode_utf8(&mut b), done.is_some())?;
            }
            Event::Comment(_) => return Err(ParseError::Restricted("comment")),
            Event::PI(_) | Event::Decl(_) => {
                return Err(ParseError::Restricted("processing instruction"));
            }
            Event::DocType(_) => return Err(ParseError::Restricted("DTD")),
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(ParseError::NotWellFormed("unclosed element".into()));
    }
    done.ok_or_else(|| ParseError::NotWellFormed("no element".into()))
}

fn push_text(stack: &mut [Element], s: &str, after_root: bool) -> Result<(), ParseError> {
    if let Some(c) = s.chars().find(|c| !is_xml_char(*c)) {
        return Err(ParseError::NotWellFormed(format!("illegal character U+{:04X}", c as u32)));
    }
    match stack.last_mut() {
        Some(p) => {
            if let Some(Node::Text(prev)) = p.children.last_mut() {
                prev.push_str(s);
            } else if !s.is_empty() {
                p.children.push(Node::Text(s.to_string()));
            }
            Ok(())
        }
        None if s.trim().is_empty() || !after_root => {
            if s.trim().is_empty() {
                Ok(())
            } else {
                Err(ParseError::NotWellFormed("text outside element".into()))
            }
        }
        None => Err(ParseError::NotWellFormed("text outside element".into())),
    }
}

/// XML 1.0 `NameStartChar` without `:` (namespaces reserve it).
fn is_name_start_char(c: char) -> bool {
    matches!(c as u32,
        0x41..=0x5A | 0x5F | 0x61..=0x7A | 0xC0..=0xD6 | 0xD8..=0xF6 | 0xF8..=0x2FF | 0x370..=0x37D
        | 0x37F..=0x1FFF | 0x200C..=0x200D | 0x2070..=0x218F | 0x2C00..=0x2FEF | 0x3001..=0xD7FF
        | 0xF900..=0xFDCF | 0xFDF0..=0xFFFD | 0x10000..=0xEFFFF)
}

/// XML 1.0 `NameChar` without `:`.
fn is_name_char(c: char) -> bool {
    is_name_start_char(c) || matches!(c as u32, 0x2D | 0x2E | 0x30..=0x39 | 0xB7 | 0x300..=0x36F | 0x203F..=0x2040)
}

/// Namespaces in XML `NCName`: an XML `Name` without colons.
pub fn is_ncname(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(is_name_start_char) && cs.all(is_name_char)
}

/// Namespaces in XML `QName`: `NCName` or `NCName:NCName`.
pub fn is_qname(s: &str) -> bool {
    match s.split_once(':') {
        Some((p, l)) => is_ncname(p) && is_ncname(l),
        None => is_ncname(s),
    }
}

/// XML 1.0 `Char` production.
pub fn is_xml_char(c: char) -> bool {
    matches!(c as u32, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

/// Formats a unix timestamp as an XEP-0082 UTC date-time
/// (`1970-01-01T00:00:00Z`, or with milliseconds when non-zero).
pub fn xep82_datetime(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), valid for all u64 inputs we produce.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let mut s = String::with_capacity(24);
    let _ = write!(s, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, (rem / 60) % 60, rem % 60);
    if ms != 0 {
        let _ = write!(s, ".{ms:03}");
    }
    s.push('Z');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Element, ParseError> {
        parse_element(s.as_bytes(), &Scope::client_stream())
    }

    #[test]
    fn parses_message_with_namespaces() {
        let e = p(
            "<message to='a@b' type='chat'><body>hi &amp; &#x41;</body><x:req xmlns:x='urn:xmpp:receipts'/></message>",
        )
        .unwrap();
        assert_eq!(e.ns, ns::CLIENT);
        assert_eq!(e.attr("to"), Some("a@b"));
        assert_eq!(e.child("body", ns::CLIENT).unwrap().text(), "hi & A");
        assert!(e.has_child("req", "urn:xmpp:receipts"));
    }

    #[test]
    fn round_trips_escaping() {
        let e = p("<message to='a&amp;b'><body>&lt;x&gt; \"q\"</body></message>").unwrap();
        let s = e.to_xml();
        assert_eq!(p(&s).unwrap(), e);
        assert!(s.contains("&lt;x&gt;"));
    }

    #[test]
    fn refuses_restricted_xml() {
        assert!(matches!(p("<a><!-- c --></a>"), Err(ParseError::Restricted(_))));
        assert!(matches!(p("<a><?pi x?></a>"), Err(ParseError::Restricted(_))));
        assert!(matches!(p("<a>&lol;</a>"), Err(ParseError::Restricted(_))));
    }

    #[test]
    fn refuses_malformed() {
        assert!(p("<a><b></a>").is_err());
        assert!(p("<a x='1' x='2'/>").is_err());
        assert!(p("<a>&#0;</a>").is_err());
        assert!(matches!(p("<p:a/>"), Err(ParseError::BadPrefix(_))));
    }

    #[test]
    fn bounds_depth() {
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert_eq!(p(&deep), Err(ParseError::TooDeep));
    }

    #[test]
    fn refuses_forbidden_characters_and_names() {
        for bad in [
            "<message id='&#1;x'/>",
            "<message id='\u{1}'/>",
            "<a>&#xFFFE;</a>",
            "<a>\u{1b}</a>",
            "<a b='&#x1F;'/>",
            "<1a/>",
            "<a 1b='x'/>",
            "<a:b:c xmlns:a='u'/>",
            "<a xmlns:b=''/>",
            "<xmlns:a/>",
            "<a xmlns:xml='urn:other'/>",
            "<a b:c='1'/>",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
        assert!(p("<a xmlns:b='urn:b' b:c='1' d-e.f_g='&#x10000;'>\t&#xD;\u{E000}</a>").is_ok());
    }

    #[test]
    fn caps_elements_and_attributes() {
        let limits = ParseLimits { max_elements: 10, max_attributes: 3 };
        let sc = Scope::client_stream();
        let ten = format!("<a>{}</a>", "<b/>".repeat(9));
        assert!(parse_element_with(ten.as_bytes(), &sc, &limits).is_ok());
        let eleven = format!("<a>{}</a>", "<b/>".repeat(10));
        assert_eq!(parse_element_with(eleven.as_bytes(), &sc, &limits), Err(ParseError::TooManyElements));
        assert!(parse_element_with(b"<a x='1' y='2' z='3'/>", &sc, &limits).is_ok());
        let four = parse_element_with(b"<a x='1' y='2' z='3' w='4'/>", &sc, &limits);
        assert_eq!(four, Err(ParseError::TooManyAttributes));
    }

    #[test]
    fn duplicate_attributes_among_many() {
        let mut attrs: Vec<String> = (0..60).map(|i| format!("a{i}='v'")).collect();
        assert!(p(&format!("<x {}/>", attrs.join(" "))).is_ok());
        attrs.push("a17='again'".into());
        assert!(matches!(p(&format!("<x {}/>", attrs.join(" "))), Err(ParseError::NotWellFormed(_))));
    }

    /// The uniqueness check is linear in the attributes: 200,000 of them
    /// (the cap raised) parse in well under the time a pairwise check
    /// would take (2 * 10^10 comparisons).
    #[test]
    fn duplicate_attribute_check_is_linear() {
        let limits = ParseLimits { max_elements: 10, max_attributes: 1 << 20 };
        let attrs: String = (0..200_000).map(|i| format!(" a{i}='v'")).collect();
        let t = std::time::Instant::now();
        let e = parse_element_with(format!("<x{attrs}/>").as_bytes(), &Scope::client_stream(), &limits).unwrap();
        let elapsed = t.elapsed();
        assert_eq!(e.attrs.len(), 200_000);
        assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn namespaces_are_scoped_and_shared() {
        let uri = format!("urn:{}", "n".repeat(1000));
        let e =
            p(&format!("<a xmlns:p='urn:p'><q:b xmlns:q='{uri}'><q:c/><d xmlns='urn:d'><q:e/></d></q:b><p:f/></a>"))
                .unwrap();
        let b = e.first_element().unwrap();
        let c = b.first_element().unwrap();
        assert_eq!(b.ns, uri.as_str());
        // One copy of the URI for every element in its scope.
        assert_eq!(b.ns.as_str().as_ptr(), c.ns.as_str().as_ptr());
        let d = b.elements().nth(1).unwrap();
        assert_eq!(d.ns, "urn:d");
        assert_eq!(d.first_element().unwrap().ns.as_str().as_ptr(), b.ns.as_str().as_ptr());
        assert_eq!(e.elements().nth(1).unwrap().ns, "urn:p");
        // A prefix declared inside b is gone after it closes.
        assert!(matches!(p("<a><q:b xmlns:q='urn:q'/><q:c/></a>"), Err(ParseError::BadPrefix(_))));
        // An inner redeclaration shadows, then the outer binding returns.
        let e = p("<p:a xmlns:p='urn:1'><p:b xmlns:p='urn:2'/><p:c/></p:a>").unwrap();
        let ns: Vec<&str> = e.elements().map(|x| x.ns.as_str()).collect();
        assert_eq!(ns, ["urn:2", "urn:1"]);
    }

    #[test]
    fn serialiser_never_writes_forbidden_characters() {
        let e = Element::stanza("message")
            .with_attr("id", "a\u{1}b\u{FFFF}\t\n\r")
            .with_attr("bad name", "dropped")
            .with_child(Element::stanza("body").with_text("x\u{0}y\u{FFFE}\r\n\u{8}"));
        let xml = e.to_xml();
        assert!(xml.chars().all(is_xml_char), "{xml:?}");
        assert!(!xml.contains("bad name"));
        let back = p(&xml).unwrap();
        assert_eq!(back.attr("id"), Some("a\u{FFFD}b\u{FFFD}\t\n\r"));
        assert_eq!(back.child("body", ns::CLIENT).unwrap().text(), "x\u{FFFD}y\u{FFFD}\r\n\u{FFFD}");
        let mut odd = Element::stanza("x");
        odd.name = "1<bad".into();
        assert!(p(&odd.to_xml()).is_ok());
        assert_eq!(repair_xml_chars("<a id='\u{1}'/>"), "<a id='\u{FFFD}'/>");
        assert!(matches!(repair_xml_chars("<a/>"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn formats_dates() {
        assert_eq!(xep82_datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(xep82_datetime(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(xep82_datetime(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}

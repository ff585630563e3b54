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

use std::fmt::Write as _;

use quick_xml::events::{BytesStart, Event};

use super::ns;

/// Deepest nesting accepted inside one stanza. Recursion in drop, clone and
/// serialisation is bounded by this, so a hostile `<a><a><a>…` cannot
/// overflow the stack.
pub const MAX_DEPTH: usize = 48;

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
    pub ns: String,
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
    #[error("undeclared namespace prefix {0}")]
    BadPrefix(String),
}

impl Element {
    /// Creates an element whose namespace is declared with an `xmlns`
    /// attribute, so it serialises correctly in any context.
    pub fn new(name: &str, ns: &str) -> Element {
        Element {
            name: name.to_string(),
            ns: ns.to_string(),
            attrs: vec![("xmlns".to_string(), ns.to_string())],
            children: Vec::new(),
        }
    }

    /// Creates a stanza-level element in `jabber:client` without an
    /// `xmlns` attribute: it inherits the stream's default namespace.
    pub fn stanza(name: &str) -> Element {
        Element { name: name.to_string(), ns: ns::CLIENT.to_string(), attrs: Vec::new(), children: Vec::new() }
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
    pub fn write_to(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
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
        out.push_str(&self.name);
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

/// Escapes text or attribute content.
pub fn escape_into(s: &str, out: &mut String, attr: bool) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'&' => "&amp;",
            b'"' if attr => "&quot;",
            b'\'' if attr => "&apos;",
            _ => continue,
        };
        out.push_str(&s[last..i]);
        out.push_str(rep);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

/// Escapes into a new string.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    escape_into(s, &mut o, true);
    o
}

/// Namespace scope: prefix → uri bindings in effect for one element.
#[derive(Clone, Debug)]
pub struct Scope {
    pub default_ns: String,
    pub prefixes: Vec<(String, String)>,
}

impl Scope {
    /// The scope in effect inside a client stream.
    pub fn client_stream() -> Scope {
        Scope {
            default_ns: ns::CLIENT.to_string(),
            prefixes: vec![("stream".to_string(), ns::STREAM.to_string()), ("xml".to_string(), ns::XML.to_string())],
        }
    }

    fn lookup(&self, prefix: &str) -> Option<&str> {
        self.prefixes.iter().rev().find(|(p, _)| p == prefix).map(|(_, u)| u.as_str())
    }

    /// Derives the child scope from a start tag's attributes and resolves
    /// the element's own namespace.
    fn enter(&self, qname: &str, attrs: &[(String, String)]) -> Result<(Scope, String), ParseError> {
        let mut scope = self.clone();
        for (k, v) in attrs {
            if k == "xmlns" {
                scope.default_ns = v.clone();
            } else if let Some(p) = k.strip_prefix("xmlns:") {
                scope.prefixes.push((p.to_string(), v.clone()));
            }
        }
        let ns = match qname.split_once(':') {
            Some((p, _)) => scope.lookup(p).ok_or_else(|| ParseError::BadPrefix(p.to_string()))?.to_string(),
            None => scope.default_ns.clone(),
        };
        Ok((scope, ns))
    }
}

fn nwf(e: impl std::fmt::Display) -> ParseError {
    ParseError::NotWellFormed(e.to_string())
}

/// Parses a start tag's name and attributes.
fn start_parts(s: &BytesStart<'_>) -> Result<(String, Vec<(String, String)>), ParseError> {
    let name = std::str::from_utf8(s.name().as_ref()).map_err(nwf)?.to_string();
    let mut attrs: Vec<(String, String)> = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(nwf)?;
        let k = std::str::from_utf8(a.key.as_ref()).map_err(nwf)?.to_string();
        let v = a.normalized_value(quick_xml::XmlVersion::Implicit1_0).map_err(nwf)?.into_owned();
        if attrs.iter().any(|(x, _)| *x == k) {
            return Err(ParseError::NotWellFormed(format!("duplicate attribute {k}")));
        }
        attrs.push((k, v));
    }
    Ok((name, attrs))
}

/// Parses a lone start tag such as a stream header (`<stream:stream …>`),
/// returning the element with no children.
pub fn parse_start_tag(tag: &[u8], scope: &Scope) -> Result<Element, ParseError> {
    let mut r = quick_xml::Reader::from_reader(tag);
    r.config_mut().check_end_names = false;
    loop {
        match r.read_event().map_err(nwf)? {
            Event::Start(s) | Event::Empty(s) => {
                let (name, attrs) = start_parts(&s)?;
                let (_, ns) = scope.enter(&name, &attrs)?;
                return Ok(Element { name, ns, attrs, children: Vec::new() });
            }
            Event::Decl(_) | Event::Text(_) => continue,
            Event::Eof => return Err(ParseError::NotWellFormed("empty tag".into())),
            _ => return Err(ParseError::Restricted("unexpected markup in stream header")),
        }
    }
}

/// Parses exactly one complete element (a stanza) from `bytes`.
///
/// # Errors
/// Anything other than a single well-formed element with predefined or
/// character entities only: DTDs, processing instructions and comments are
/// [`ParseError::Restricted`], everything else malformed is
/// [`ParseError::NotWellFormed`].
pub fn parse_element(bytes: &[u8], scope: &Scope) -> Result<Element, ParseError> {
    let mut r = quick_xml::Reader::from_reader(bytes);
    {
        let c = r.config_mut();
        c.check_end_names = true;
        c.check_comments = true;
        c.expand_empty_elements = false;
        c.trim_text(false);
    }
    // Stack of open elements with their scopes.
    let mut stack: Vec<(Element, Scope)> = Vec::new();
    let mut done: Option<Element> = None;
    loop {
        let ev = r.read_event().map_err(nwf)?;
        match ev {
            Event::Start(s) | Event::Empty(s) if done.is_some() => {
                let _ = s;
                return Err(ParseError::NotWellFormed("more than one root".into()));
            }
            Event::Start(s) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(ParseError::TooDeep);
                }
                let (name, attrs) = start_parts(&s)?;
                let parent = stack.last().map(|(_, sc)| sc).unwrap_or(scope);
                let (sc, ns) = parent.enter(&name, &attrs)?;
                stack.push((Element { name, ns, attrs, children: Vec::new() }, sc));
            }
            Event::Empty(s) => {
                let (name, attrs) = start_parts(&s)?;
                let parent = stack.last().map(|(_, sc)| sc).unwrap_or(scope);
                let (_, ns) = parent.enter(&name, &attrs)?;
                let el = Element { name, ns, attrs, children: Vec::new() };
                match stack.last_mut() {
                    Some((p, _)) => p.children.push(Node::Element(el)),
                    None => done = Some(el),
                }
            }
            Event::End(_) => {
                let (el, _) = stack.pop().ok_or_else(|| ParseError::NotWellFormed("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some((p, _)) => p.children.push(Node::Element(el)),
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

fn push_text(stack: &mut [(Element, Scope)], s: &str, after_root: bool) -> Result<(), ParseError> {
    if let Some(c) = s.chars().find(|c| !is_xml_char(*c)) {
        return Err(ParseError::NotWellFormed(format!("illegal character U+{:04X}", c as u32)));
    }
    match stack.last_mut() {
        Some((p, _)) => {
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
    fn formats_dates() {
        assert_eq!(xep82_datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(xep82_datetime(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(xep82_datetime(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}

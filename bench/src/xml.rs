//! Small element trees for the stream handshake (features, SASL, bind).
//! The message hot path never builds these; see `session.rs`.

use anyhow::{Result, anyhow, bail};
use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use tokio::io::BufReader;
use tokio::net::tcp::OwnedReadHalf;

pub type XmlReader = quick_xml::Reader<BufReader<OwnedReadHalf>>;

pub fn new_reader(inner: BufReader<OwnedReadHalf>) -> XmlReader {
    let mut r = quick_xml::Reader::from_reader(inner);
    let c = r.config_mut();
    c.trim_text(true);
    c.check_end_names = false;
    c.expand_empty_elements = false;
    r
}

#[derive(Debug, Default, Clone)]
pub struct Elem {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Elem>,
    pub text: String,
}

impl Elem {
    pub fn from_start(e: &BytesStart<'_>) -> Result<Elem> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let mut attrs = Vec::new();
        for a in e.attributes().with_checks(false) {
            let a = a.map_err(|e| anyhow!("bad attribute: {e}"))?;
            let k = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let v = a.normalized_value(XmlVersion::Implicit1_0).map_err(|e| anyhow!("bad attribute value: {e}"))?;
            attrs.push((k, v.into_owned()));
        }
        Ok(Elem { name, attrs, ..Default::default() })
    }

    pub fn local(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Namespace declared on this element (default namespace only).
    pub fn ns(&self) -> Option<&str> {
        self.attr("xmlns")
    }

    pub fn child(&self, local: &str) -> Option<&Elem> {
        self.children.iter().find(|c| c.local() == local)
    }

    pub fn child_ns(&self, local: &str, ns: &str) -> Option<&Elem> {
        self.children.iter().find(|c| c.local() == local && c.ns() == Some(ns))
    }
}

fn entity(name: &[u8]) -> Option<char> {
    Some(match name {
        b"amp" => '&',
        b"lt" => '<',
        b"gt" => '>',
        b"quot" => '"',
        b"apos" => '\'',
        _ => {
            let s = std::str::from_utf8(name).ok()?;
            let n = if let Some(h) = s.strip_prefix("#x") {
                u32::from_str_radix(h, 16).ok()?
            } else {
                s.strip_prefix('#')?.parse().ok()?
            };
            char::from_u32(n)?
        }
    })
}

/// Reads until the opening `<stream:stream>` tag; returns it.
pub async fn read_stream_open(r: &mut XmlReader, buf: &mut Vec<u8>) -> Result<Elem> {
    loop {
        buf.clear();
        match r.read_event_into_async(buf).await? {
            Event::Start(e) => {
                let el = Elem::from_start(&e)?;
                if el.local() != "stream" {
                    bail!("expected stream header, got <{}>", el.name);
                }
                return Ok(el);
            }
            Event::Empty(e) => bail!("expected stream header, got <{}/>", String::from_utf8_lossy(e.name().as_ref())),
            Event::Eof => bail!("connection closed before stream header"),
            _ => {}
        }
    }
}

/// Reads one complete child element of the stream.
pub async fn read_element(r: &mut XmlReader, buf: &mut Vec<u8>) -> Result<Elem> {
    let mut stack: Vec<Elem> = Vec::new();
    loop {
        buf.clear();
        let done = match r.read_event_into_async(buf).await? {
            Event::Start(e) => {
                stack.push(Elem::from_start(&e)?);
                None
            }
            Event::Empty(e) => Some(Elem::from_start(&e)?),
            Event::End(_) => match stack.pop() {
                Some(el) => Some(el),
                None => bail!("server closed the stream"),
            },
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content().map_err(|e| anyhow!("bad text: {e}"))?);
                }
                None
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
                None
            }
            Event::GeneralRef(e) => {
                if let (Some(top), Some(c)) = (stack.last_mut(), entity(&e)) {
                    top.text.push(c);
                }
                None
            }
            Event::Eof => bail!("connection closed"),
            _ => None,
        };
        if let Some(el) = done {
            match stack.last_mut() {
                Some(parent) => parent.children.push(el),
                None => return Ok(el),
            }
        }
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Text of a `<stream:error>` or SASL `<failure>`: the first child's name.
pub fn condition(e: &Elem) -> String {
    let cond = e.children.iter().find(|c| c.local() != "text").map(|c| c.local().to_string()).unwrap_or_default();
    match e.child("text") {
        Some(t) if !t.text.is_empty() => format!("{cond} ({})", t.text),
        _ => cond,
    }
}

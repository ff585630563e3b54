//! Incremental XMPP stream framer: bytes in, stream header / stanzas out.
//!
//! The framer is a byte state machine in the style of a wire-protocol
//! parser: [`Framer::feed`] appends whatever the socket produced and
//! [`Framer::next_frame`] returns `Ok(None)` until a complete top-level
//! element is buffered. It only finds element boundaries (tracking depth,
//! quotes and CDATA); the complete stanza is then handed to
//! [`parse_element`] which validates it strictly. Doing the cheap boundary
//! scan first lets the size limit apply *before* any tree is built, so an
//! oversized stanza costs at most `max_stanza` bytes of memory.
//!
//! What it refuses, per RFC 6120 §11: DTDs, comments, processing
//! instructions (other than the XML declaration before the header) and
//! undefined entities — which is what makes "billion laughs" impossible.

use memchr::memchr;

use super::element::{Element, ParseError, ParseLimits, Scope, parse_element_with, parse_start_tag};
use super::ns;

/// Longest stream header accepted.
const MAX_HEADER: usize = 4096;

/// One unit produced by the framer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// `<stream:stream …>` opened (attributes in the element).
    Header(Element),
    /// A complete first-level child of the stream.
    Stanza(Element),
    /// `</stream:stream>`.
    Close,
}

/// Stream-level failures, each mapping to one RFC 6120 stream error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not-well-formed: {0}")]
    NotWellFormed(String),
    #[error("restricted-xml: {0}")]
    Restricted(&'static str),
    #[error("policy-violation: stanza exceeds {0} bytes")]
    TooBig(usize),
    #[error("policy-violation: elements nested too deeply")]
    TooDeep,
    #[error("policy-violation: {0}")]
    TooMany(&'static str),
    #[error("invalid-namespace: {0}")]
    InvalidNamespace(&'static str),
}

impl FrameError {
    /// The defined condition element name for `<stream:error/>`.
    pub fn condition(&self) -> &'static str {
        match self {
            FrameError::NotWellFormed(_) => "not-well-formed",
            FrameError::Restricted(_) => "restricted-xml",
            FrameError::TooBig(_) | FrameError::TooDeep | FrameError::TooMany(_) => "policy-violation",
            FrameError::InvalidNamespace(_) => "invalid-namespace",
        }
    }
}

impl From<ParseError> for FrameError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Restricted(r) => FrameError::Restricted(r),
            ParseError::TooDeep => FrameError::TooDeep,
            ParseError::TooManyElements => FrameError::TooMany("too many elements in one stanza"),
            ParseError::TooManyAttributes => FrameError::TooMany("too many attributes on one element"),
            ParseError::BadPrefix(p) => FrameError::NotWellFormed(format!("undeclared prefix {p}")),
            ParseError::NotWellFormed(s) => FrameError::NotWellFormed(s),
        }
    }
}

/// The incremental framer. One per stream; call [`Framer::reset`] on a
/// stream restart (after STARTTLS and SASL).
pub struct Framer {
    buf: Vec<u8>,
    /// Scan position in `buf`; everything before it has been classified.
    pos: usize,
    /// 0 before the header, 1 inside the stream, ≥2 inside a stanza.
    depth: usize,
    /// Start of the top-level element being scanned.
    start: Option<usize>,
    max_stanza: usize,
    /// Whether anything but whitespace was seen (XML decl allowed before).
    seen_markup: bool,
    /// Bytes at the front of `buf` already returned; dropped lazily on the
    /// next `feed`, so many stanzas in one read cost one move, not one each.
    consumed: usize,
    /// Where the scan of the incomplete construct at `pos` (a tag, CDATA
    /// section or XML declaration) stopped, 0 when none: the next read
    /// continues from there, so a construct arriving in many small reads
    /// is scanned once, not once per read.
    resume: usize,
    /// Inside that tag scan: the open quote character, or 0.
    quote: u8,
    limits: ParseLimits,
}

impl Framer {
    pub fn new(max_stanza: usize) -> Framer {
        Framer::with_limits(max_stanza, ParseLimits::default())
    }

    /// A framer whose stanzas are also bounded in elements and attributes.
    pub fn with_limits(max_stanza: usize, limits: ParseLimits) -> Framer {
        Framer {
            buf: Vec::new(),
            pos: 0,
            depth: 0,
            start: None,
            max_stanza,
            seen_markup: false,
            consumed: 0,
            resume: 0,
            quote: 0,
            limits,
        }
    }

    /// Changes the stanza size limit, e.g. once a resource is bound: before
    /// that nothing a client must send is more than a few KiB.
    pub fn set_max_stanza(&mut self, max_stanza: usize) {
        self.max_stanza = max_stanza;
    }

    /// Forgets everything: a new stream starts with the next byte.
    pub fn reset(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
        self.depth = 0;
        self.start = None;
        self.seen_markup = false;
        self.consumed = 0;
        self.resume = 0;
        self.quote = 0;
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Drops the bytes of frames already returned.
    fn compact(&mut self) {
        if self.consumed > 0 {
            let c = self.consumed;
            self.buf.drain(..c);
            self.pos -= c;
            self.start = self.start.map(|s| s - c);
            if self.resume > 0 {
                self.resume -= c;
            }
            self.consumed = 0;
        }
    }

    /// The buffer to read socket bytes into (appended at its end), with
    /// room reserved. Lets the connection read without a buffer of its own.
    pub fn read_buffer(&mut self) -> &mut Vec<u8> {
        self.compact();
        self.buf.reserve(8192);
        &mut self.buf
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// The bytes buffered but not yet returned as a frame.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.consumed..]
    }

    /// Releases the buffer's capacity when nothing is pending, so idle
    /// connections hold no read memory.
    pub fn shrink_if_idle(&mut self) {
        if self.buffered() == 0 && self.buf.capacity() > 0 {
            self.buf = Vec::new();
            self.pos = 0;
            self.consumed = 0;
            self.start = None;
            self.resume = 0;
            self.quote = 0;
        }
    }

    fn consume(&mut self, upto: usize) {
        self.consumed = upto;
        self.pos = upto;
        self.start = None;
        self.resume = 0;
        self.quote = 0;
    }

    /// Records that the construct at `pos` is incomplete and its scan may
    /// continue at `at`.
    fn suspend(&mut self, at: usize) -> Result<Option<Frame>, FrameError> {
        self.resume = at.max(self.pos + 1);
        self.check_size(self.buf.len())?;
        Ok(None)
    }

    fn limit(&self) -> usize {
        if self.depth == 0 { MAX_HEADER } else { self.max_stanza }
    }

    /// Fails when the element being scanned already spans more than the
    /// limit up to `upto`: the scan position after a complete construct,
    /// or the end of the buffer inside an incomplete one. Bytes buffered
    /// after a complete construct may belong to later stanzas and do not
    /// count.
    fn check_size(&self, upto: usize) -> Result<(), FrameError> {
        if let Some(s) = self.start
            && upto.saturating_sub(s) > self.limit()
        {
            return Err(FrameError::TooBig(self.limit()));
        }
        Ok(())
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are
    /// needed.
    ///
    /// # Errors
    /// A [`FrameError`] is final: the stream must be closed with the
    /// matching stream error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.start.is_none() {
                // Between top-level elements: only whitespace may appear.
                while self.pos < self.buf.len() && self.buf[self.pos].is_ascii_whitespace() {
                    self.pos += 1;
                }
                if self.pos >= self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                    self.consumed = 0;
                    return Ok(None);
                }
                if self.buf[self.pos] != b'<' {
                    return Err(FrameError::NotWellFormed("text outside stanza".into()));
                }
                self.start = Some(self.pos);
            }
            // Inside a top-level element (or its start tag).
            let Some(lt) = memchr(b'<', &self.buf[self.pos..]).map(|i| i + self.pos) else {
                self.pos = self.buf.len();
                self.check_size(self.buf.len())?;
                return Ok(None);
            };
            self.pos = lt;
            let Some(&next) = self.buf.get(lt + 1) else {
                self.check_size(self.buf.len())?;
                return Ok(None);
            };
            match next {
                b'/' => {
                    let from = self.resume.max(lt);
                    let Some(gt) = memchr(b'>', &self.buf[from..]).map(|i| i + from) else {
                        return self.suspend(self.buf.len());
                    };
                    // The same limit whether the tag arrived in one read or many.
                    self.check_size(gt + 1)?;
                    self.pos = gt + 1;
                    self.resume = 0;
                    self.depth = self.depth.saturating_sub(1);
                    match self.depth {
                        0 => {
                            self.consume(gt + 1);
                            return Ok(Some(Frame::Close));
                        }
                        1 => return self.finish_stanza(gt + 1).map(Some),
                        _ => {}
                    }
                }
                b'?' => {
                    if self.depth == 0 && !self.seen_markup && self.buf[lt..].starts_with(b"<?xml") {
                        let from = self.resume.max(lt);
                        let Some(end) = memchr::memmem::find(&self.buf[from..], b"?>").map(|i| i + from) else {
                            return self.suspend(self.buf.len() - 1);
                        };
                        self.check_size(end + 2)?;
                        self.seen_markup = true;
                        self.consume(end + 2);
                        continue;
                    }
                    if self.depth == 0 && b"<?xml".starts_with(&self.buf[lt..]) {
                        return Ok(None);
                    }
                    return Err(FrameError::Restricted("processing instruction"));
                }
                b'!' => {
                    const CDATA: &[u8] = b"<![CDATA[";
                    let have = &self.buf[lt..];
                    if self.depth >= 2 && have.len() < CDATA.len() && CDATA.starts_with(have) {
                        return Ok(None);
                    }
                    if self.depth >= 2 && have.starts_with(CDATA) {
                        let from = self.resume.max(lt + CDATA.len());
                        let Some(end) = memchr::memmem::find(&self.buf[from..], b"]]>").map(|i| i + from) else {
                            return self.suspend(self.buf.len().saturating_sub(2));
                        };
                        self.pos = end + 3;
                        self.resume = 0;
                        continue;
                    }
                    if have.starts_with(b"<!--") {
                        return Err(FrameError::Restricted("comment"));
                    }
                    if have.starts_with(b"<![") {
                        return Err(FrameError::Restricted("CDATA outside a stanza"));
                    }
                    return Err(FrameError::Restricted("DTD"));
                }
                _ => {
                    let from = self.resume.max(lt + 1);
                    let Some(gt) = find_tag_end(&self.buf, from, &mut self.quote)? else {
                        return self.suspend(self.buf.len());
                    };
                    self.check_size(gt + 1)?;
                    self.resume = 0;
                    self.quote = 0;
                    self.seen_markup = true;
                    let empty = self.buf[gt - 1] == b'/';
                    self.pos = gt + 1;
                    if self.depth == 0 {
                        if empty {
                            return Err(FrameError::NotWellFormed("empty stream header".into()));
                        }
                        let header = parse_start_tag(&self.buf[lt..=gt], client_scope())?;
                        if header.local_name() != "stream" || header.ns != ns::STREAM {
                            return Err(FrameError::InvalidNamespace("stream element"));
                        }
                        let default_ns = header.attr("xmlns").unwrap_or("");
                        if default_ns != ns::CLIENT {
                            return Err(FrameError::InvalidNamespace("default namespace"));
                        }
                        self.depth = 1;
                        self.consume(gt + 1);
                        return Ok(Some(Frame::Header(header)));
                    }
                    if empty {
                        if self.depth == 1 {
                            return self.finish_stanza(gt + 1).map(Some);
                        }
                    } else {
                        self.depth += 1;
                    }
                }
            }
            self.check_size(self.pos)?;
        }
    }

    fn finish_stanza(&mut self, end: usize) -> Result<Frame, FrameError> {
        let start = self.start.unwrap_or(self.consumed);
        if end - start > self.max_stanza {
            return Err(FrameError::TooBig(self.max_stanza));
        }
        let el = parse_element_with(&self.buf[start..end], client_scope(), &self.limits)?;
        self.consume(end);
        Ok(Frame::Stanza(el))
    }
}

/// The namespace scope of a client stream, built once per process rather
/// than once per connection.
fn client_scope() -> &'static Scope {
    static SCOPE: std::sync::OnceLock<Scope> = std::sync::OnceLock::new();
    SCOPE.get_or_init(Scope::client_stream)
}

/// Finds the `>` closing a start tag, skipping quoted attribute values,
/// scanning `buf` from `from` with the quote state `quote` left by the
/// previous call (updated in place when the tag is still incomplete).
fn find_tag_end(buf: &[u8], from: usize, quote: &mut u8) -> Result<Option<usize>, FrameError> {
    for (i, &b) in buf.iter().enumerate().skip(from) {
        if *quote != 0 {
            if b == *quote {
                *quote = 0;
            } else if b == b'<' {
                return Err(FrameError::NotWellFormed("'<' in attribute value".into()));
            }
            continue;
        }
        match b {
            b'"' | b'\'' => *quote = b,
            b'>' => return Ok(Some(i)),
            b'<' => return Err(FrameError::NotWellFormed("'<' inside tag".into())),
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    fn frames(chunks: &[&str]) -> Result<Vec<Frame>, FrameError> {
        let mut f = Framer::new(1024);
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c.as_bytes());
            while let Some(fr) = f.next_frame()? {
                out.push(fr);
            }
        }
        Ok(out)
    }

    #[test]
    fn header_stanzas_close_byte_by_byte() {
        let doc = format!(
            "{HDR} <message to='a@b'><body>x &gt; y<![CDATA[<z>]]></body></message>\n<presence/></stream:stream>"
        );
        let chunks: Vec<String> = doc.chars().map(|c| c.to_string()).collect();
        let refs: Vec<&str> = chunks.iter().map(|s| s.as_str()).collect();
        let out = frames(&refs).unwrap();
        assert_eq!(out.len(), 4);
        assert!(matches!(&out[0], Frame::Header(h) if h.attr("to") == Some("localhost")));
        match &out[1] {
            Frame::Stanza(m) => assert_eq!(m.child("body", ns::CLIENT).unwrap().text(), "x > y<z>"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[2], Frame::Stanza(p) if p.local_name() == "presence"));
        assert_eq!(out[3], Frame::Close);
    }

    #[test]
    fn many_stanzas_per_read_and_a_split_one() {
        let out = frames(&[
            HDR,
            "<message id='1'/><message id='2'><body>b</body></message>  <message id='3'><bo",
            "dy>c</body></message><presence/>",
        ])
        .unwrap();
        let ids: Vec<_> = out
            .iter()
            .filter_map(|f| match f {
                Frame::Stanza(e) => Some(e.attr("id").unwrap_or(e.local_name()).to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec!["1", "2", "3", "presence"]);
    }

    #[test]
    fn quoted_gt_in_attribute() {
        let out = frames(&[HDR, "<message id='a>b'/>"]).unwrap();
        assert!(matches!(&out[1], Frame::Stanza(m) if m.attr("id") == Some("a>b")));
    }

    #[test]
    fn oversized_stanza_is_policy_violation_before_completion() {
        let big = format!("<message><body>{}", "x".repeat(2000));
        assert_eq!(frames(&[HDR, &big]), Err(FrameError::TooBig(1024)));
    }

    /// Feeds `doc` one byte at a time and returns the frames.
    fn bytewise(f: &mut Framer, doc: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        for b in doc {
            f.feed(std::slice::from_ref(b));
            while let Some(fr) = f.next_frame()? {
                out.push(fr);
            }
        }
        Ok(out)
    }

    /// A 200 KB start tag and a 200 KB CDATA section arriving a byte per
    /// read are scanned once each: rescanning from the start on every read
    /// would be 2·10¹⁰ byte visits, minutes rather than well under a second.
    #[test]
    fn incomplete_constructs_resume_where_they_stopped() {
        let attrs: String = (0..2000).map(|i| format!(" a{i}='{}>'", "v".repeat(90))).collect();
        let tag = format!("{HDR}<message{attrs}/>");
        let cdata = format!("<message><body><![CDATA[{}]]]]></body></message>", "]".repeat(200_000));
        let t = std::time::Instant::now();
        let limits = ParseLimits { max_elements: 4096, max_attributes: 4096 };
        let out = bytewise(&mut Framer::with_limits(1 << 20, limits), format!("{tag}{cdata}").as_bytes()).unwrap();
        let elapsed = t.elapsed();
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[1], Frame::Stanza(m) if m.attrs.len() == 2000));
        assert!(matches!(&out[2], Frame::Stanza(m) if m.child("body", ns::CLIENT).unwrap().text().len() == 200_002));
        assert!(elapsed < std::time::Duration::from_secs(20), "{elapsed:?}");
    }

    #[test]
    fn split_declaration_end_tag_and_quotes() {
        let doc = format!("{HDR}<message id=\"a'>\" b='\">'><body>x</body></message>");
        let mut f = Framer::new(1024);
        let out = bytewise(&mut f, doc.as_bytes()).unwrap();
        assert!(matches!(&out[1], Frame::Stanza(m) if m.attr("id") == Some("a'>") && m.attr("b") == Some("\">")));
    }

    #[test]
    fn size_limit_can_grow_after_binding() {
        let body = format!("<message><body>{}</body></message>", "x".repeat(3000));
        let mut f = Framer::new(2048);
        f.feed(HDR.as_bytes());
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Header(_)))));
        f.set_max_stanza(8192);
        f.feed(body.as_bytes());
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Stanza(_)))));
        f.set_max_stanza(2048);
        f.feed(body.as_bytes());
        assert_eq!(f.next_frame(), Err(FrameError::TooBig(2048)));
    }

    #[test]
    fn element_and_attribute_caps_are_policy_violations() {
        let mut f = Framer::with_limits(1 << 20, ParseLimits { max_elements: 8, max_attributes: 4 });
        f.feed(HDR.as_bytes());
        let _ = f.next_frame();
        f.feed(format!("<iq>{}</iq>", "<a/>".repeat(8)).as_bytes());
        let e = f.next_frame().unwrap_err();
        assert_eq!(e.condition(), "policy-violation");
        let mut f = Framer::with_limits(1 << 20, ParseLimits { max_elements: 8, max_attributes: 4 });
        f.feed(HDR.as_bytes());
        let _ = f.next_frame();
        f.feed(b"<iq a='' b='' c='' d='' e=''/>");
        assert_eq!(f.next_frame().unwrap_err().condition(), "policy-violation");
    }

    /// Found by fuzzing: bytes of later stanzas already buffered counted
    /// against the size of the one being scanned, so a small stanza read
    /// together with much more was refused as too big.
    #[test]
    fn buffered_bytes_after_a_stanza_do_not_count_against_it() {
        let doc = format!("{HDR}<message><body>x</body></message>{}", "<presence/>".repeat(200));
        let out = frames(&[&doc]).unwrap();
        assert_eq!(out.len(), 202);
    }

    #[test]
    fn billion_laughs_refused() {
        let bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>]><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
        assert_eq!(frames(&[bomb]), Err(FrameError::Restricted("DTD")));
        assert!(matches!(frames(&[HDR, "<message><body>&lol;</body></message>"]), Err(FrameError::Restricted(_))));
    }

    #[test]
    fn comments_and_pis_refused() {
        assert_eq!(frames(&[HDR, "<!-- hi -->"]), Err(FrameError::Restricted("comment")));
        assert_eq!(frames(&[HDR, "<?foo?>"]), Err(FrameError::Restricted("processing instruction")));
    }

    #[test]
    fn malformed_and_namespace_errors() {
        assert!(matches!(frames(&[HDR, "<a></b>"]), Err(FrameError::NotWellFormed(_))));
        assert!(matches!(frames(&[HDR, "junk"]), Err(FrameError::NotWellFormed(_))));
        assert!(matches!(
            frames(&["<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>"]),
            Err(FrameError::InvalidNamespace(_))
        ));
        assert!(matches!(frames(&["<stream xmlns='jabber:client'>"]), Err(FrameError::InvalidNamespace(_))));
    }

    #[test]
    fn reset_starts_new_stream() {
        let mut f = Framer::new(1024);
        f.feed(HDR.as_bytes());
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Header(_)))));
        f.reset();
        f.feed(HDR.as_bytes());
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Header(_)))));
    }
}

//! Fuzz targets: functions of arbitrary bytes that must never panic and
//! whose invariants are asserted, so a violation is a crash the fuzzer
//! reports.
//!
//! They live in the library so that the coverage-guided harness in
//! `fuzz/` (cargo-afl) and the corpus replay in `tests/fuzz_corpus.rs`
//! run exactly the same code.

use std::sync::{Arc, OnceLock};

use crate::c2s::sasl::{Sasl, Step};
use crate::protocol::element::{ParseLimits, Scope, is_xml_char, parse_element};
use crate::protocol::{Frame, Framer, Jid, phone};

/// A client stream header, fed before the input so the input is read as
/// stanzas.
pub const STREAM_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

fn frames(data: &[u8], chunk: usize) -> (Vec<Frame>, bool) {
    let mut f = Framer::with_limits(16 * 1024, ParseLimits { max_elements: 256, max_attributes: 16 });
    let mut out = Vec::new();
    f.feed(STREAM_HEADER);
    for piece in data.chunks(chunk.max(1)) {
        f.feed(piece);
        loop {
            match f.next_frame() {
                Ok(Some(fr)) => out.push(fr),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

/// Framer and parser. The first byte chooses a read size, the rest is the
/// stream after its header. Asserts that:
/// - reading in small pieces yields the same frames as reading at once
///   (the resumable scan loses nothing);
/// - every stanza serialises to XML with only `Char` characters, which
///   parses back to the same tree.
pub fn framer(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else { return };
    let (whole, whole_err) = frames(body, body.len());
    let (pieces, pieces_err) = frames(body, usize::from(first % 16) + 1);
    assert_eq!(whole, pieces, "frames differ with read size");
    assert_eq!(whole_err, pieces_err, "error differs with read size");
    let scope = Scope::client_stream();
    for fr in &whole {
        let Frame::Stanza(el) = fr else { continue };
        let xml = el.to_xml();
        assert!(xml.chars().all(is_xml_char), "serialised an invalid character");
        let back = parse_element(xml.as_bytes(), &scope).expect("serialised stanza parses");
        assert_eq!(&back, el, "round trip changed the stanza");
    }
}

fn sasl_server() -> &'static Sasl {
    static SASL: OnceLock<Sasl> = OnceLock::new();
    SASL.get_or_init(|| {
        let s = crate::storage::Stores::memory();
        // The minimum iteration count keeps a PLAIN attempt cheap.
        let _ = s.users.put_user("15551234567", &crate::accounts::make_record("pencil", 4096, 0));
        Sasl::new(Arc::clone(&s.users), "localhost", [7u8; 32], 4096, Some(vec![9u8; 32]))
    })
}

/// SASL exchanges as chatd runs them. The first byte picks the mechanism
/// and transport; the rest is split at `\n` into the client's messages.
/// Credentials are verified as a connection would; only the one account
/// may come out authenticated.
pub fn sasl(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else { return };
    const MECHS: [&str; 5] = ["SCRAM-SHA-256", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "PLAIN"];
    let mech = MECHS[usize::from(first) % MECHS.len()];
    let server = sasl_server();
    let cb = server.bindings((first & 0x80 != 0).then(|| vec![5u8; 32]));
    let Ok(mut ex) = server.start(mech, Some(&cb), false) else { return };
    for msg in body.split(|&b| b == b'\n').take(4) {
        match ex.step(msg) {
            Step::Challenge(_) => {}
            Step::Verify(check) => {
                if ex.finish(&check).is_ok() {
                    assert_eq!(check.local, "15551234567", "authenticated as someone else");
                }
                return;
            }
            Step::Failure(_) => return,
        }
    }
}

/// JID parsing: no panic, and a parsed JID prints as a string that parses
/// back to the same JID.
pub fn jid(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(j) = Jid::parse(s) {
        let printed = j.to_string();
        assert_eq!(Jid::parse(&printed).as_ref(), Ok(&j), "JID {printed:?} does not parse back");
    }
}

/// Phone-number normalisation: no panic, and a normalised number is an
/// account localpart that normalises to itself.
pub fn phone(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    for region in [None, phone::region("US"), phone::region("DE")] {
        if let Ok(d) = phone::normalize(s, region) {
            assert!(phone::is_account_local(&d), "{d:?} is not a localpart");
            assert_eq!(phone::normalize(&d, None).as_deref(), Ok(d.as_str()), "not idempotent");
        }
    }
}

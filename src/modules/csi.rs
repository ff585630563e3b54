//! XEP-0352 Client State Indication. While a client says it is
//! `<inactive/>` (a phone in a pocket), presence updates and chat states
//! are held back — presence coalesced to the latest per sender — and
//! flushed when it turns `<active/>`. Messages, receipts and iq traffic
//! are always delivered at once, so inactivity never delays a message.

use std::sync::Arc;

use crate::c2s::session::Session;
use crate::protocol::Element;

pub const NS: &str = "urn:xmpp:csi:0";

/// Most stanzas held for an inactive client before they are flushed
/// anyway.
const MAX_HELD: usize = 256;

pub fn handle(s: &mut Session, el: &Element) {
    match el.local_name() {
        "inactive" => s.inactive = true,
        "active" => {
            s.inactive = false;
            flush(s);
        }
        _ => {}
    }
}

/// Whether an outbound stanza may wait while the client is inactive.
pub fn deferrable(xml: &str) -> bool {
    if xml.starts_with("<presence") {
        // Subscription requests and errors are not mere status updates.
        return !xml.contains("type=\"subscribe")
            && !xml.contains("type=\"unsubscribe")
            && !xml.contains("type=\"error\"");
    }
    xml.starts_with("<message") && xml.contains("http://jabber.org/protocol/chatstates") && !xml.contains("<body")
}

fn from_attr(xml: &str) -> Option<&str> {
    let i = xml.find(" from=\"")? + 7;
    let end = xml[i..].find('"')? + i;
    Some(&xml[i..end])
}

/// Holds `xml` for later; returns false if it must be sent now.
pub fn hold(s: &mut Session, xml: &Arc<str>) -> bool {
    if !s.inactive || !deferrable(xml) {
        return false;
    }
    if xml.starts_with("<presence") {
        let from = from_attr(xml).map(str::to_string);
        s.held.retain(|h| !(h.starts_with("<presence") && from_attr(h).map(str::to_string) == from));
    } else {
        let from = from_attr(xml).map(str::to_string);
        s.held.retain(|h| !(h.starts_with("<message") && from_attr(h).map(str::to_string) == from));
    }
    s.held.push(xml.clone());
    if s.held.len() >= MAX_HELD {
        flush(s);
    }
    true
}

fn flush(s: &mut Session) {
    for x in std::mem::take(&mut s.held) {
        s.send_xml(x, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_deferrable() {
        assert!(deferrable("<presence from=\"a@b/c\"/>"));
        assert!(!deferrable("<presence type=\"subscribe\" from=\"a@b\"/>"));
        assert!(deferrable(
            "<message from=\"a\"><composing xmlns=\"http://jabber.org/protocol/chatstates\"/></message>"
        ));
        assert!(!deferrable(
            "<message from=\"a\"><body>x</body><active xmlns=\"http://jabber.org/protocol/chatstates\"/></message>"
        ));
        assert_eq!(from_attr("<presence to=\"x\" from=\"a@b/c\"/>"), Some("a@b/c"));
    }
}

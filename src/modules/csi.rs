//! XEP-0352 Client State Indication. While a client says it is
//! `<inactive/>` (a phone in a pocket), presence updates and chat states
//! are held back — presence coalesced to the latest per sender — and
//! flushed when it turns `<active/>`. Messages, receipts and iq traffic
//! are always delivered at once, so inactivity never delays a message.

use std::sync::Arc;

use crate::session::Session;
use crate::hooks::{FeaturePhase, Hooks, Module};
use crate::protocol::Element;

pub const NS: &str = "urn:xmpp:csi:0";

pub const MODULE: Module = Module { name: "csi", specs: &["XEP-0352"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(NS);
    h.stream_feature(FeaturePhase::AfterAuth, |_| Some(Element::new("csi", NS)));
    h.nonza(NS, handle);
    h.outgoing(|s, xml| if hold(s, &xml) { None } else { Some(xml) });
}

/// What CSI keeps per session.
#[derive(Default)]
struct State {
    /// The client said it is inactive.
    inactive: bool,
    /// Stanzas held back while inactive.
    held: Vec<Arc<str>>,
}

/// Most stanzas held for an inactive client before they are flushed
/// anyway.
const MAX_HELD: usize = 256;

pub fn handle(s: &mut Session, el: &Element) {
    match el.local_name() {
        "inactive" => s.ext.get::<State>().inactive = true,
        "active" => {
            s.ext.get::<State>().inactive = false;
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
    if !s.ext.peek::<State>().is_some_and(|c| c.inactive) || !deferrable(xml) {
        return false;
    }
    let st = s.ext.get::<State>();
    let kind = if xml.starts_with("<presence") { "<presence" } else { "<message" };
    let from = from_attr(xml).map(str::to_string);
    st.held.retain(|h| !(h.starts_with(kind) && from_attr(h).map(str::to_string) == from));
    st.held.push(xml.clone());
    if st.held.len() >= MAX_HELD {
        flush(s);
    }
    true
}

fn flush(s: &mut Session) {
    for x in std::mem::take(&mut s.ext.get::<State>().held) {
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

//! XEP-0199 XMPP Ping: the server answers pings addressed to it or to an
//! account's bare JID. Server-initiated pings (liveness and the delivery
//! confirmation for clients without stream management) live in the
//! connection and in [`super::sm`].

use crate::c2s::session::Session;
use crate::protocol::Element;
use crate::protocol::stanza::iq_result;

pub fn handle(s: &mut Session, iq: &Element) {
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    s.send(&r);
}

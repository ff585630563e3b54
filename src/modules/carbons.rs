//! XEP-0280 Message Carbons: every device of an account sees the whole
//! conversation. A chat message sent from one resource is copied to the
//! account's other carbon-enabled resources (`<sent/>`), and a message
//! addressed to one full JID is copied to the others (`<received/>`).
//! Messages to the bare JID already reach every available resource.
//! Carbon copies are live only: a device that is offline relies on its
//! own queue, which held the original if it was addressed to the account.

use std::sync::Arc;

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, Module};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid};
use crate::router::{Audience, SessionUpdate};
use crate::server::Server;

pub const NS: &str = "urn:xmpp:carbons:2";
pub const FORWARD: &str = "urn:xmpp:forward:0";

pub const MODULE: Module = Module { name: "carbons", specs: &["XEP-0280"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(NS);
    for name in ["enable", "disable"] {
        h.iq_server(GET_SET, NS, name, |s, r| handle_iq(s, r.iq, r.payload));
    }
}

pub fn handle_iq(s: &mut Session, iq: &Element, q: &Element) {
    if iq.attr("type") != Some("set") {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    }
    let on = q.local_name() == "enable";
    s.srv.router.update_session(&s.local, s.id, SessionUpdate::Carbons(on));
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.remove_attr("from");
    s.send(&r);
}

/// XEP-0280 §6: chat messages, and normal messages with a body or a
/// receipt/marker, unless marked private or no-copy.
pub fn eligible(m: &Element) -> bool {
    if m.has_child("private", NS) || m.has_child("no-copy", super::message::HINTS) {
        return false;
    }
    if m.has_child("sent", NS) || m.has_child("received", NS) {
        return false;
    }
    match m.attr("type").unwrap_or("normal") {
        "chat" => true,
        "normal" => m
            .elements()
            .any(|c| c.local_name() == "body" || c.ns == "urn:xmpp:receipts" || c.ns == "urn:xmpp:chat-markers:0"),
        _ => false,
    }
}

fn wrap(kind: &str, account_bare: &str, to_full: &str, m: &Element) -> Arc<str> {
    let mut inner = m.clone();
    inner.set_attr("xmlns", crate::protocol::ns::CLIENT);
    Element::stanza("message")
        .with_attr("from", account_bare)
        .with_attr("to", to_full)
        .with_attr("type", m.attr("type").unwrap_or("normal"))
        .with_child(Element::new(kind, NS).with_child(Element::new("forwarded", FORWARD).with_child(inner)))
        .to_xml()
        .into()
}

/// Copies `m`, sent by session `from_id` of `local`, to the account's
/// other carbon-enabled sessions.
pub fn sent(srv: &Arc<Server>, local: &str, from_id: u64, m: &Element) {
    if !eligible(m) {
        return;
    }
    let bare = format!("{local}@{}", srv.domain());
    let copy = |h: &crate::router::SessionView| Some(wrap("sent", &bare, &format!("{bare}/{}", h.resource), m));
    srv.router.push(local, Audience::carbons().except(from_id), &copy);
}

/// Copies `m`, delivered to the full JID `to`, to the recipient
/// account's other carbon-enabled sessions.
pub fn received(srv: &Arc<Server>, to: &Jid, m: &Element) {
    let (Some(local), Some(res)) = (to.local.as_deref(), to.resource.as_deref()) else { return };
    if to.domain != srv.domain() || !eligible(m) {
        return;
    }
    let bare = to.bare_string();
    let copy = |h: &crate::router::SessionView| Some(wrap("received", &bare, &format!("{bare}/{}", h.resource), m));
    srv.router.push(local, Audience::carbons().and_available().except_resource(res), &copy);
}

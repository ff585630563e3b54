//! XEP-0030 Service Discovery for the server and for accounts.

use crate::c2s::session::Session;
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};

/// Features the server itself advertises.
pub const SERVER_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::PING,
    ns::VERSION,
    ns::STANZA_ID,
    ns::DELAY,
    "msgoffline",
    "urn:xmpp:csi:0",
    "urn:xmpp:carbons:2",
    "urn:xmpp:receipts",
    "urn:xmpp:blocking",
    "jabber:iq:last",
    "urn:chatd:privacy:0",
    "urn:chatd:discovery:0",
    "http://jabber.org/protocol/chatstates",
];

pub fn handle(s: &mut Session, iq: &Element, to: Option<&Jid>, q: &Element) {
    if iq.attr("type") != Some("get") {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    }
    if q.attr("node").is_some() {
        s.reply_error(iq, StanzaError::ItemNotFound);
        return;
    }
    let to_server = to.is_none_or(|j| j.local.is_none());
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    if let Some(t) = to {
        r.set_attr("from", t.to_string());
    }
    let mut query = Element::new("query", &q.ns);
    if q.ns == ns::DISCO_INFO {
        if to_server {
            query.push(
                Element::stanza("identity")
                    .with_attr("category", "server")
                    .with_attr("type", "im")
                    .with_attr("name", "chatd"),
            );
            for f in SERVER_FEATURES {
                query.push(Element::stanza("feature").with_attr("var", *f));
            }
            super::upload::disco_info(s, &mut query);
        } else {
            query.push(Element::stanza("identity").with_attr("category", "account").with_attr("type", "registered"));
            query.push(Element::stanza("identity").with_attr("category", "pubsub").with_attr("type", "pep"));
            query.push(Element::stanza("feature").with_attr("var", ns::DISCO_INFO));
            query.push(Element::stanza("feature").with_attr("var", "http://jabber.org/protocol/pubsub#publish"));
        }
    } else if to_server {
        // disco#items of the server: its services.
        query
            .push(Element::stanza("item").with_attr("jid", super::groups::service(&s.srv)).with_attr("name", "Groups"));
    }
    r.push(query);
    s.send(&r);
}

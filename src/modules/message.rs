//! Message routing (RFC 6121 §5 and §8.5) and what is stored: chat and
//! normal messages, including XEP-0184 receipts and XEP-0333 markers,
//! are durable; XEP-0085 chat states alone, headlines and errors are
//! delivered live only. Groupchat is not served by this module.

use crate::session::Session;
use crate::hooks::{Hooks, Module, Stage, priority};
use crate::protocol::stanza::StanzaError;
use crate::protocol::{Element, Jid, Node};
use crate::router::{Delivery, MessageClass};

pub const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
pub const HINTS: &str = "urn:xmpp:hints";
const RECEIPTS: &str = "urn:xmpp:receipts";
const MARKERS: &str = "urn:xmpp:chat-markers:0";

/// What a message costs of its sender's rate budget. Receipts, markers,
/// chat states and errors are small and come in bursts a person does not
/// type (a phone that reads a backlog of 2,000 messages acknowledges each),
/// so they cost a tenth.
pub fn rate_cost(m: &Element) -> f64 {
    let signal = m.attr("type") == Some("error")
        || m.elements().all(|c| matches!(c.ns.as_str(), RECEIPTS | MARKERS | CHATSTATES | HINTS));
    if signal { 0.1 } else { 1.0 }
}

/// Decides whether a message is stored until acknowledged.
pub fn classify(m: &Element) -> MessageClass {
    match m.attr("type").unwrap_or("normal") {
        "headline" | "error" => return MessageClass::LiveOnly,
        _ => {}
    }
    if m.has_child("no-store", HINTS) {
        return MessageClass::LiveOnly;
    }
    let has_text = m.children.iter().any(|n| matches!(n, Node::Text(t) if !t.trim().is_empty()));
    let substantive = m.elements().any(|c| c.ns != CHATSTATES && c.ns != HINTS);
    if !substantive && !has_text { MessageClass::LiveOnly } else { MessageClass::Durable }
}

pub const MODULE: Module = Module {
    name: "message",
    specs: &["RFC 6121 §5", "XEP-0184", "XEP-0333", "XEP-0085", "XEP-0334", "XEP-0359"],
    register,
};

fn register(h: &mut Hooks) {
    h.disco_feature(crate::protocol::ns::STANZA_ID);
    h.disco_feature(RECEIPTS);
    h.disco_feature(CHATSTATES);
    h.stanza(Stage::Message, priority::ADMIT, admit);
    h.stanza(Stage::Message, priority::DEFAULT, |s, m, to| {
        handle(s, m, to);
        None
    });
}

/// Checks the message type and takes it from the sender's rate budget,
/// before anything is stored or fanned out (a group message counts once).
fn admit(s: &mut Session, m: Element, to: Option<Jid>) -> Option<(Element, Option<Jid>)> {
    let typ = m.attr("type").unwrap_or("normal");
    if !matches!(typ, "normal" | "chat" | "groupchat" | "headline" | "error") {
        s.reply_error(&m, StanzaError::BadRequest);
        return None;
    }
    if !s.srv.router.admit_message(&s.local, rate_cost(&m)) {
        if typ != "error" {
            s.reply_error(&m, StanzaError::PolicyViolation);
        }
        return None;
    }
    Some((m, to))
}

/// Routes an admitted message to a local account.
pub fn handle(s: &mut Session, m: Element, to: Option<Jid>) {
    let typ = m.attr("type").unwrap_or("normal").to_string();
    let typ = typ.as_str();
    let Some(to) = to else {
        // A message to the server itself: nothing consumes it.
        s.reply_error(&m, StanzaError::ServiceUnavailable);
        return;
    };
    if to.domain != s.domain() {
        s.reply_error(&m, StanzaError::RemoteServerNotFound);
        return;
    }
    if to.local.is_none() || typ == "groupchat" {
        s.reply_error(&m, StanzaError::ServiceUnavailable);
        return;
    }
    if let Some(l) = to.local.as_deref() {
        let srv = s.srv.clone();
        if super::privacy::policy(&srv, &s.local).blocks(&to.bare_string()) {
            let e = super::blocking::blocked_error(s, &m);
            s.send(&e);
            return;
        }
        if super::privacy::policy(&srv, l).blocks(&s.bare().to_string()) {
            // Indistinguishable from a number that is not registered.
            if typ != "error" && super::contacts::charge(&srv, &s.local, l) {
                s.reply_error(&m, StanzaError::ServiceUnavailable);
            }
            return;
        }
    }
    let class = classify(&m);
    let original = m.clone();
    match s.srv.router.message(&to, m, class) {
        Ok(d) => {
            if let Delivery::Durable(t) = d {
                s.max_ticket = s.max_ticket.max(t);
            }
            super::carbons::sent(&s.srv, &s.local, s.id, &original);
            super::carbons::received(&s.srv, &to, &original);
        }
        Err(e) => {
            // "Not registered" answers draw on the contact-discovery
            // allowance; once it is spent they are not sent, so the
            // answer no longer tells registered numbers apart.
            let unknown = e == StanzaError::ServiceUnavailable;
            let local = to.local.as_deref().unwrap_or("");
            if typ != "error" && (!unknown || super::contacts::charge(&s.srv, &s.local, local)) {
                s.reply_error(&original, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::element::{Scope, parse_element};

    fn m(x: &str) -> Element {
        parse_element(x.as_bytes(), &Scope::client_stream()).unwrap()
    }

    #[test]
    fn receipts_cost_less_of_the_rate_budget() {
        assert_eq!(rate_cost(&m("<message type='chat'><body>x</body></message>")), 1.0);
        assert_eq!(rate_cost(&m("<message><received xmlns='urn:xmpp:receipts' id='1'/></message>")), 0.1);
        assert_eq!(
            rate_cost(&m(
                "<message><displayed xmlns='urn:xmpp:chat-markers:0' id='1'/><store xmlns='urn:xmpp:hints'/></message>"
            )),
            0.1
        );
        assert_eq!(rate_cost(&m("<message><x xmlns='jabber:x:conference' jid='g@x'/></message>")), 1.0);
    }

    #[test]
    fn classifies() {
        assert_eq!(classify(&m("<message type='chat'><body>x</body></message>")), MessageClass::Durable);
        assert_eq!(
            classify(&m("<message><received xmlns='urn:xmpp:receipts' id='1'/></message>")),
            MessageClass::Durable
        );
        assert_eq!(
            classify(&m("<message type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")),
            MessageClass::LiveOnly
        );
        assert_eq!(classify(&m("<message type='headline'><body>x</body></message>")), MessageClass::LiveOnly);
        assert_eq!(
            classify(&m("<message><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>")),
            MessageClass::LiveOnly
        );
    }
}

//! XEP-0199 XMPP Ping: the server answers pings addressed to it or to an
//! account's bare JID. Server-initiated pings (liveness and the delivery
//! confirmation for clients without stream management) live in the
//! connection and in [`super::sm`].

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, IqTarget, Module};
use crate::protocol::stanza::iq_result;
use crate::protocol::{Element, ns};

pub const MODULE: Module = Module { name: "ping", specs: &["XEP-0199"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(ns::PING);
    h.iq_server(GET_SET, ns::PING, "ping", |s, r| handle(s, r.iq));
    // A ping to an account's bare JID is answered by the server, for
    // accounts that exist.
    h.iq(IqTarget::Account, GET_SET, ns::PING, "ping", |s, r| {
        if r.to.and_then(|j| j.local.as_deref()).is_some_and(|l| s.srv.router.account_exists(l)) {
            handle(s, r.iq);
        } else {
            s.reply_error(r.iq, crate::protocol::stanza::StanzaError::ServiceUnavailable);
        }
    });
}

pub fn handle(s: &mut Session, iq: &Element) {
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    s.send(&r);
}

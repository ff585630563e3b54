//! XEP-0030 Service Discovery for the server and for accounts.

//! The features listed are those the modules registered
//! ([`crate::hooks::Hooks::disco_feature`]), so the answer cannot drift
//! from what the server implements.

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, IqRequest, IqTarget, Module};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};

pub const MODULE: Module = Module { name: "disco", specs: &["XEP-0030"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(ns::DISCO_INFO);
    h.disco_feature(ns::DISCO_ITEMS);
    h.account_disco_feature(ns::DISCO_INFO);
    for q in [ns::DISCO_INFO, ns::DISCO_ITEMS] {
        h.iq_server(GET_SET, q, "query", |s, r| handle(s, r.iq, r.to, r.payload));
        h.iq(IqTarget::Account, GET_SET, q, "query", account);
    }
}

/// disco of another account's bare JID, answered for accounts that exist.
fn account(s: &mut Session, r: &IqRequest<'_>) {
    if r.to.and_then(|j| j.local.as_deref()).is_some_and(|l| s.srv.router.account_exists(l)) {
        handle(s, r.iq, r.to, r.payload);
    } else {
        s.reply_error(r.iq, StanzaError::ServiceUnavailable);
    }
}

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
            let hooks = &s.srv.clone().hooks;
            for f in hooks.disco_features() {
                query.push(Element::stanza("feature").with_attr("var", *f));
            }
            for ext in hooks.disco_extensions() {
                ext(s, &mut query);
            }
        } else {
            query.push(Element::stanza("identity").with_attr("category", "account").with_attr("type", "registered"));
            query.push(Element::stanza("identity").with_attr("category", "pubsub").with_attr("type", "pep"));
            for f in s.srv.clone().hooks.account_disco_features() {
                query.push(Element::stanza("feature").with_attr("var", *f));
            }
        }
    } else if to_server {
        // disco#items of the server: its services.
        query
            .push(Element::stanza("item").with_attr("jid", super::groups::service(&s.srv)).with_attr("name", "Groups"));
    }
    r.push(query);
    s.send(&r);
}

//! XEP-0191 Blocking Command. A blocked account cannot message the
//! blocker (its messages get `service-unavailable`, as if the blocker did
//! not exist), cannot see the blocker's presence, last seen or profile,
//! and the blocker cannot send to it either (`not-acceptable` with
//! `<blocked xmlns='urn:xmpp:blocking:errors'/>`). Changes are pushed to
//! all of the blocker's sessions.

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, Module};
use crate::protocol::stanza::{StanzaError, error_reply, iq_result};
use crate::protocol::{Element, Jid};
use crate::router::Audience;

use super::privacy::{self, Policy};

pub const NS: &str = "urn:xmpp:blocking";
pub const ERRORS: &str = "urn:xmpp:blocking:errors";

/// Most entries in one block list.
const MAX_BLOCKED: usize = 10_000;

pub const MODULE: Module = Module { name: "blocking", specs: &["XEP-0191"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(NS);
    for name in ["blocklist", "block", "unblock"] {
        h.iq_server(GET_SET, NS, name, |s, r| handle_iq(s, r.iq, r.payload));
    }
}

pub fn handle_iq(s: &mut Session, iq: &Element, q: &Element) {
    let srv = s.srv.clone();
    match (iq.attr("type"), q.local_name()) {
        (Some("get"), "blocklist") => {
            let p = privacy::policy(&srv, &s.local);
            let mut list: Vec<&String> = p.blocked.iter().collect();
            list.sort();
            let mut bl = Element::new("blocklist", NS);
            for j in list {
                bl.push(Element::stanza("item").with_attr("jid", j.as_str()));
            }
            let mut r = iq_result(iq);
            r.set_attr("to", s.jid.to_string());
            r.remove_attr("from");
            r.push(bl);
            s.send(&r);
        }
        (Some("set"), kind @ ("block" | "unblock")) => {
            let mut jids = Vec::new();
            for it in q.elements().filter(|e| e.local_name() == "item") {
                match it.attr("jid").and_then(|j| Jid::parse(j).ok()) {
                    Some(j) => jids.push(j.bare().to_string()),
                    None => {
                        s.reply_error(iq, StanzaError::JidMalformed);
                        return;
                    }
                }
            }
            if kind == "block" && jids.is_empty() {
                s.reply_error(iq, StanzaError::BadRequest);
                return;
            }
            let mut p: Policy = (*privacy::policy(&srv, &s.local)).clone();
            if kind == "block" {
                if p.blocked.len() + jids.len() > MAX_BLOCKED {
                    s.reply_error(iq, StanzaError::ResourceConstraint);
                    return;
                }
                p.blocked.extend(jids.iter().cloned());
            } else if jids.is_empty() {
                p.blocked.clear();
            } else {
                for j in &jids {
                    p.blocked.remove(j);
                }
            }
            privacy::save(&srv, &s.local, p);
            if kind == "block" {
                // The blocked contacts see the blocker go offline.
                for j in &jids {
                    if let Ok(jid) = Jid::parse(j)
                        && jid.domain == srv.domain()
                        && let Some(l) = jid.local.as_deref()
                    {
                        for h in srv.router.sessions(&s.local).into_iter().filter(|h| h.available) {
                            let un: std::sync::Arc<str> = Element::stanza("presence")
                                .with_attr("type", "unavailable")
                                .with_attr("from", format!("{}/{}", s.bare(), h.resource))
                                .with_attr("to", j.as_str())
                                .to_xml()
                                .into();
                            srv.router.push(l, Audience::all(), &|_| Some(un.clone()));
                        }
                    }
                }
            }
            let mut r = iq_result(iq);
            r.set_attr("to", s.jid.to_string());
            r.remove_attr("from");
            s.send(&r);
            // Push to every session of the account (XEP-0191 §3.3).
            let mut push_el = Element::new(kind, NS);
            for j in &jids {
                push_el.push(Element::stanza("item").with_attr("jid", j.as_str()));
            }
            let bare = s.bare();
            let render = |h: &crate::router::SessionView| {
                let iqp = Element::stanza("iq")
                    .with_attr("type", "set")
                    .with_attr("id", format!("block{:x}", rand::random::<u32>()))
                    .with_attr("to", format!("{bare}/{}", h.resource))
                    .with_child(push_el.clone());
                Some(iqp.to_xml().into())
            };
            srv.router.push(&s.local, Audience::all(), &render);
        }
        _ => s.reply_error(iq, StanzaError::BadRequest),
    }
}

/// The error for a stanza the sender addressed to someone it blocked.
pub fn blocked_error(s: &Session, stanza: &Element) -> Element {
    let mut e = error_reply(stanza, StanzaError::NotAcceptable, None);
    e.set_attr("to", s.jid.to_string());
    if let Some(err) = e.child_mut("error", crate::protocol::ns::CLIENT) {
        err.push(Element::new("blocked", ERRORS));
    }
    e
}

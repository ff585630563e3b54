//! RFC 6121 §3–4 presence: broadcast to subscribers, probes answered
//! from the router's view of live sessions, directed presence, and the subscription state
//! machine (subscribe / subscribed / unsubscribe / unsubscribed) over the
//! roster. A subscription request to an offline account is kept as
//! `pending_in` on its roster and re-sent when it next comes online.
//!
//! Initial presence is also the moment a session starts receiving
//! messages: it attaches to the router and schedules the offline backlog.

use std::sync::Arc;

use crate::session::Session;
use crate::hooks::{Hooks, Module, Stage, priority};
use crate::protocol::{Element, Jid, ns};
use crate::router::{Audience, SessionUpdate};
use crate::server::Server;
use crate::storage::RosterItem;

pub const MODULE: Module = Module { name: "presence", specs: &["RFC 6121 §3", "RFC 6121 §4"], register };

fn register(h: &mut Hooks) {
    h.stanza(Stage::Presence, priority::DEFAULT, |s, p, to| {
        handle(s, p, to);
        None
    });
    h.session_ended(session_ended);
}

pub fn handle(s: &mut Session, p: Element, to: Option<Jid>) {
    let typ = p.attr("type").map(str::to_string);
    match (typ.as_deref(), to) {
        (None | Some("unavailable"), None) => broadcast(s, p, typ.is_none()),
        (None | Some("unavailable") | Some("error"), Some(to)) => {
            let blocked = to.local.as_deref().is_some_and(|l| super::privacy::blocked_between(&s.srv, &s.local, l));
            if to.domain == s.domain() && !blocked {
                let mut p = p;
                p.set_attr("to", to.to_string());
                s.srv.router.transient(&to, p.to_xml().into());
            }
        }
        (Some(t @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")), Some(to)) => {
            let t = t.to_string();
            let blocked = to.local.as_deref().is_some_and(|l| super::privacy::blocked_between(&s.srv, &s.local, l));
            // A blocked pair cannot start a subscription; ending one is
            // always allowed. Asking a stranger costs a contact-discovery
            // lookup, like any other question about a number.
            let allowed =
                t != "subscribe" || to.local.as_deref().is_none_or(|l| super::contacts::charge(&s.srv, &s.local, l));
            if (!blocked || t.starts_with("un")) && allowed {
                subscription(s, &t, &to.bare());
            }
        }
        (Some("probe"), _) => {}
        _ => s.reply_error(&p, crate::protocol::stanza::StanzaError::BadRequest),
    }
}

/// Delivers `xml` to every available session of the account `local`.
fn to_account(srv: &Arc<Server>, local: &str, xml: &Arc<str>) {
    srv.router.push(local, Audience::available(), &|_| Some(xml.clone()));
}

fn local_of<'a>(srv: &Server, j: &'a Jid) -> Option<&'a str> {
    if j.domain == srv.domain() { j.local.as_deref() } else { None }
}

/// Broadcasts the session's available or unavailable presence.
fn broadcast(s: &mut Session, mut p: Element, available: bool) {
    let srv = s.srv.clone();
    p.remove_attr("to");
    let priority = p.child("priority", ns::CLIENT).and_then(|e| e.text().trim().parse::<i8>().ok()).unwrap_or(0);
    let xml: Arc<str> = p.to_xml().into();
    let first = available && !s.available;
    let id = s.id;
    let stanza = available.then(|| xml.clone());
    srv.router.update_session(&s.local, id, SessionUpdate::Presence { stanza, priority });
    if !available && !s.available {
        return;
    }
    s.available = available;
    let roster = srv.stores.roster.roster(&s.local).unwrap_or_default();
    for item in roster.iter().filter(|i| i.subscription.has_from()) {
        if let Ok(j) = Jid::parse(&item.jid)
            && let Some(l) = local_of(&srv, &j)
            && (!available || super::privacy::may_see(&srv, &s.local, l))
        {
            to_account(&srv, l, &xml);
        }
    }
    // The account's other resources see it too.
    srv.router.push(&s.local, Audience::available().except(id), &|_| Some(xml.clone()));
    // And the resource that sent it (RFC 6121 §4.2.2, §4.4.2): clients
    // take the echo as confirmation that they are online.
    if available {
        s.send_xml(xml.clone(), None);
    }
    if first {
        let upto = srv.router.attach(&s.local, id);
        s.backlog = Some((s.max_seq_sent, upto));
        // Probes, answered from the router's view of live sessions.
        for item in roster.iter().filter(|i| i.subscription.has_to()) {
            if let Ok(j) = Jid::parse(&item.jid)
                && let Some(l) = local_of(&srv, &j)
                && super::privacy::may_see(&srv, l, &s.local)
            {
                for px in available_presences(&srv, l, None) {
                    s.send_xml(px, None);
                }
            }
        }
        for px in available_presences(&srv, &s.local, Some(id)) {
            s.send_xml(px, None);
        }
        // Subscription requests that arrived while offline.
        for item in roster.iter().filter(|i| i.pending_in) {
            let req = Element::stanza("presence")
                .with_attr("type", "subscribe")
                .with_attr("from", item.jid.as_str())
                .with_attr("to", s.bare().to_string());
            s.send(&req);
        }
    }
}

/// The last presence of each available session of `local` (but `except`).
fn available_presences(srv: &Server, local: &str, except: Option<u64>) -> Vec<Arc<str>> {
    let sessions = srv.router.sessions(local).into_iter();
    sessions.filter(|h| h.available && Some(h.id) != except).filter_map(|h| h.presence).collect()
}

/// Called when a session ends: it becomes unavailable to everyone.
pub fn session_ended(s: &mut Session) {
    super::privacy::record_last_seen(&s.srv, &s.local, crate::accounts::now_ms());
    if s.available {
        let p = Element::stanza("presence").with_attr("type", "unavailable").with_attr("from", s.jid.to_string());
        broadcast(s, p, false);
    }
}

fn item_of(srv: &Server, owner: &str, contact: &str) -> RosterItem {
    srv.stores.roster.roster_item(owner, contact).ok().flatten().unwrap_or_else(|| RosterItem {
        jid: contact.to_string(),
        hidden: true,
        ..Default::default()
    })
}

fn presence_from(from: &str, to: &str, typ: &str) -> Arc<str> {
    Element::stanza("presence").with_attr("type", typ).with_attr("from", from).with_attr("to", to).to_xml().into()
}

/// Sends the available presences of `from_local`'s sessions to `to_local`.
fn share_presence(srv: &Arc<Server>, from_local: &str, to_local: &str) {
    if !super::privacy::may_see(srv, from_local, to_local) {
        return;
    }
    for px in available_presences(srv, from_local, None) {
        to_account(srv, to_local, &px);
    }
}

/// Sends unavailable from each of `from_local`'s available sessions.
fn withdraw_presence(srv: &Arc<Server>, from_local: &str, to_local: &str) {
    for h in srv.router.sessions(from_local) {
        if h.available {
            let x = presence_from(
                &format!("{from_local}@{}/{}", srv.domain(), h.resource),
                &format!("{to_local}@{}", srv.domain()),
                "unavailable",
            );
            to_account(srv, to_local, &x);
        }
    }
}

/// The subscription state machine, for a presence of type `typ` sent
/// by the session's account (the owner) to `contact` (a bare JID): the
/// transitions of both roster items come from [`super::subscription`].
pub fn subscription(s: &mut Session, typ: &str, contact: &Jid) {
    use super::subscription::{Kind, inbound, outbound};
    let Some(kind) = Kind::parse(typ) else { return };
    let srv = s.srv.clone();
    let owner = s.local.clone();
    let owner_bare = s.bare().to_string();
    let cj = contact.to_string();
    let (mine, out) = outbound(&item_of(&srv, &owner, &cj), kind);
    if out.save {
        crate::modules::roster::save(&srv, &owner, &mine);
    }
    let Some(cl) = local_of(&srv, contact).filter(|l| srv.router.account_exists(l)) else { return };
    if out.forward {
        // The contact's side: its item for the owner, delivery, and the
        // answer its server gives by itself.
        let (theirs, inb) = inbound(&item_of(&srv, cl, &owner_bare), kind);
        if inb.save {
            crate::modules::roster::save(&srv, cl, &theirs);
        }
        if inb.forward {
            to_account(&srv, cl, &presence_from(&owner_bare, &cj, kind.as_str()));
        }
        if inb.send_unavailable {
            withdraw_presence(&srv, cl, &owner);
        }
        if inb.auto_subscribed {
            let (mine, back) = inbound(&mine, Kind::Subscribed);
            if back.save {
                crate::modules::roster::save(&srv, &owner, &mine);
            }
            if back.forward {
                to_account(&srv, &owner, &presence_from(&cj, &owner_bare, "subscribed"));
            }
        }
        if inb.send_presence {
            share_presence(&srv, cl, &owner);
        }
    }
    // The owner's presence follows the stanza it results from.
    if out.send_presence {
        share_presence(&srv, &owner, cl);
    }
    if out.send_unavailable {
        withdraw_presence(&srv, &owner, cl);
    }
}

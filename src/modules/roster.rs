//! RFC 6121 §2 roster management: get, set, remove and pushes to the
//! account's interested resources.

use std::sync::Arc;

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, Module};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};
use crate::router::{Audience, SessionUpdate};
use crate::server::Server;
use crate::storage::RosterItem;

/// `<item/>` for a roster item.
pub fn item_element(item: &RosterItem) -> Element {
    let mut el = Element::stanza("item")
        .with_attr("jid", item.jid.as_str())
        .with_attr("subscription", item.subscription.as_str());
    el.ns = ns::ROSTER.into();
    if let Some(n) = &item.name {
        el.set_attr("name", n.as_str());
    }
    if item.ask {
        el.set_attr("ask", "subscribe");
    }
    for g in &item.groups {
        let mut ge = Element::stanza("group").with_text(g.as_str());
        ge.ns = ns::ROSTER.into();
        el.push(ge);
    }
    el
}

/// Sends a roster push for `item` (or its removal) to every resource of
/// `owner` that requested the roster.
pub fn push(srv: &Arc<Server>, owner: &str, item: &Element) {
    let query = Element::new("query", ns::ROSTER).with_child(item.clone());
    let render = |h: &crate::router::SessionView| {
        let iq = Element::stanza("iq")
            .with_attr("type", "set")
            .with_attr("id", format!("push{:x}", rand::random::<u32>()))
            .with_attr("to", format!("{owner}@{}/{}", srv.domain(), h.resource))
            .with_child(query.clone());
        Some(iq.to_xml().into())
    };
    srv.router.push(owner, Audience::roster(), &render);
}

/// Whether `owner`'s roster has room for one more item
/// (`roster.max_items`, pending subscription requests included: they are
/// items too, and strangers create them).
pub fn has_room(srv: &Server, owner: &str) -> bool {
    srv.stores.roster.roster(owner).map(|v| v.len() < srv.cfg.roster.max_items).unwrap_or(false)
}

/// Saves an item (deleting it when it carries no state) and pushes it.
/// Returns false, saving nothing, when the item is new and the roster is
/// full.
pub fn save(srv: &Arc<Server>, owner: &str, item: &RosterItem) -> bool {
    let empty = item.hidden
        && item.subscription == crate::storage::Subscription::None
        && !item.ask
        && !item.pending_in
        && !item.approved;
    if !empty && matches!(srv.stores.roster.roster_item(owner, &item.jid), Ok(None)) && !has_room(srv, owner) {
        tracing::debug!(owner, "roster full");
        return false;
    }
    let r = if empty {
        srv.stores.roster.remove_roster_item(owner, &item.jid)
    } else {
        srv.stores.roster.put_roster_item(owner, item)
    };
    if let Err(e) = r {
        tracing::error!(owner, error = %e, "roster write failed");
    }
    if !item.hidden {
        push(srv, owner, &item_element(item));
    }
    true
}

pub const MODULE: Module = Module { name: "roster", specs: &["RFC 6121 §2"], register };

fn register(h: &mut Hooks) {
    h.iq_server(GET_SET, ns::ROSTER, "query", |s, r| handle_iq(s, r.iq, r.payload));
    h.account_erased(erase);
}

/// Erases an account's roster and the subscriptions other accounts hold
/// to it.
fn erase(
    stores: &crate::storage::Stores,
    srv: Option<&Server>,
    local: &str,
) -> crate::storage::Result<crate::storage::Ticket> {
    let domain = srv.map(|s| s.domain().to_string());
    for item in stores.roster.roster(local)? {
        let Some((other, d)) = item.jid.split_once('@') else { continue };
        if domain.as_deref().is_some_and(|dom| dom != d) {
            continue;
        }
        let me = format!("{local}@{d}");
        if let Some(mut theirs) = stores.roster.roster_item(other, &me)? {
            theirs.subscription = crate::storage::Subscription::None;
            theirs.ask = false;
            theirs.pending_in = false;
            theirs.approved = false;
            if theirs.hidden {
                stores.roster.remove_roster_item(other, &me)?;
            } else {
                stores.roster.put_roster_item(other, &theirs)?;
            }
        }
    }
    stores.roster.clear_roster(local)
}

pub fn handle_iq(s: &mut Session, iq: &Element, q: &Element) {
    match iq.attr("type") {
        Some("get") => {
            s.srv.router.update_session(&s.local, s.id, SessionUpdate::RosterRequested);
            let items = match s.srv.stores.roster.roster(&s.local) {
                Ok(v) => v,
                Err(_) => {
                    s.reply_error(iq, StanzaError::InternalServerError);
                    return;
                }
            };
            let mut query = Element::new("query", ns::ROSTER);
            for it in items.iter().filter(|i| !i.hidden) {
                query.push(item_element(it));
            }
            let mut r = iq_result(iq);
            r.set_attr("to", s.jid.to_string());
            r.remove_attr("from");
            r.push(query);
            s.send(&r);
        }
        Some("set") => set(s, iq, q),
        _ => s.reply_error(iq, StanzaError::BadRequest),
    }
}

fn set(s: &mut Session, iq: &Element, q: &Element) {
    let items: Vec<&Element> = q.elements().filter(|e| e.is("item", ns::ROSTER)).collect();
    if items.len() != 1 {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    }
    let it = items[0];
    let Some(contact) = it.attr("jid").and_then(|j| Jid::parse(j).ok()).map(|j| j.bare()) else {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    };
    if contact == s.bare() {
        s.reply_error(iq, StanzaError::NotAllowed);
        return;
    }
    let cjid = contact.to_string();
    let existing = s.srv.stores.roster.roster_item(&s.local, &cjid).ok().flatten();
    if it.attr("subscription") == Some("remove") {
        let Some(item) = existing else {
            s.reply_error(iq, StanzaError::ItemNotFound);
            return;
        };
        if item.subscription.has_to() || item.ask {
            super::presence::subscription(s, "unsubscribe", &contact);
        }
        if item.subscription.has_from() || item.pending_in {
            super::presence::subscription(s, "unsubscribed", &contact);
        }
        if let Err(e) = s.srv.stores.roster.remove_roster_item(&s.local, &cjid) {
            tracing::error!(error = %e, "roster remove failed");
        }
        let gone = Element::stanza("item").with_attr("jid", cjid.as_str()).with_attr("subscription", "remove");
        let mut gone = gone;
        gone.ns = ns::ROSTER.into();
        push(&s.srv, &s.local, &gone);
    } else {
        let mut item = existing.unwrap_or_else(|| RosterItem { jid: cjid.clone(), ..Default::default() });
        item.hidden = false;
        item.name = it.attr("name").map(str::to_string).filter(|n| !n.is_empty());
        let mut groups: Vec<String> = it.elements().filter(|g| g.is("group", ns::ROSTER)).map(|g| g.text()).collect();
        groups.sort();
        groups.dedup();
        if groups.iter().any(|g| g.is_empty() || g.len() > 1024) || item.name.as_ref().is_some_and(|n| n.len() > 1024) {
            s.reply_error(iq, StanzaError::NotAcceptable);
            return;
        }
        item.groups = groups;
        if !save(&s.srv, &s.local, &item) {
            s.reply_error(iq, StanzaError::ResourceConstraint);
            return;
        }
    }
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.remove_attr("from");
    s.send(&r);
}

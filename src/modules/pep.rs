//! Profiles through XEP-0163 Personal Eventing Protocol, for the nodes
//! a WhatsApp-style profile needs: nickname (XEP-0172,
//! `http://jabber.org/protocol/nick`) and avatar (XEP-0084,
//! `urn:xmpp:avatar:metadata` and `urn:xmpp:avatar:data`).
//!
//! Each node keeps its latest item. Publishing notifies the owner's other
//! devices and every contact with a presence subscription who is not
//! blocked; any account that is not blocked may fetch the items with
//! `<pubsub><items node='…'/></pubsub>` sent to the owner's bare JID.
//! Sizes are bounded: `profile.max_avatar_bytes` for avatar data, 4 KiB
//! for the other nodes.

use std::sync::Arc;

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, IqTarget, Module};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, Node};
use crate::router::Audience;
use crate::server::Server;

pub const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const EVENT: &str = "http://jabber.org/protocol/pubsub#event";
pub const NICK: &str = "http://jabber.org/protocol/nick";
pub const AVATAR_DATA: &str = "urn:xmpp:avatar:data";
pub const AVATAR_META: &str = "urn:xmpp:avatar:metadata";
pub const NODES: &[&str] = &[NICK, AVATAR_DATA, AVATAR_META];

fn key(node: &str) -> String {
    format!("pep:{node}")
}

fn max_size(srv: &Server, node: &str) -> usize {
    if node == AVATAR_DATA { srv.cfg.profile.max_avatar_bytes.saturating_mul(4) / 3 + 1024 } else { 4096 }
}

pub const MODULE: Module = Module { name: "pep", specs: &["XEP-0163", "XEP-0172", "XEP-0084"], register };

fn register(h: &mut Hooks) {
    h.account_disco_feature("http://jabber.org/protocol/pubsub#publish");
    h.iq_server(GET_SET, PUBSUB, "pubsub", |s, r| handle_iq(s, r.iq, r.to, r.payload));
    h.iq(IqTarget::Account, GET_SET, PUBSUB, "pubsub", |s, r| handle_iq(s, r.iq, r.to, r.payload));
}

/// Handles a pubsub iq addressed to the sender's own account (publish,
/// or reading its own items) or to another account (reading).
pub fn handle_iq(s: &mut Session, iq: &Element, to: Option<&Jid>, ps: &Element) {
    let srv = s.srv.clone();
    let owner = match to.and_then(|j| j.local.clone()) {
        Some(l) => l,
        None => s.local.clone(),
    };
    match iq.attr("type") {
        Some("set") if owner == s.local => publish(s, iq, ps),
        Some("get") => {
            let Some(items) = ps.child("items", PUBSUB) else {
                s.reply_error(iq, StanzaError::FeatureNotImplemented);
                return;
            };
            let node = items.attr("node").unwrap_or("");
            if !NODES.contains(&node) {
                s.reply_error(iq, StanzaError::ItemNotFound);
                return;
            }
            if owner != s.local
                && (!srv.router.account_exists(&owner) || super::privacy::blocked_between(&srv, &owner, &s.local))
            {
                s.reply_error(iq, StanzaError::ItemNotFound);
                return;
            }
            let stored = srv.stores.settings.get_setting(&owner, &key(node)).ok().flatten();
            let mut out_items = Element::new("items", PUBSUB).with_attr("node", node);
            if let Some(xml) = stored
                && let Ok(item) =
                    crate::protocol::element::parse_element(&xml, &crate::protocol::element::Scope::client_stream())
            {
                let mut item = item;
                item.ns = PUBSUB.into();
                out_items.push(item);
            }
            let mut r = iq_result(iq);
            r.set_attr("to", s.jid.to_string());
            r.push(Element::new("pubsub", PUBSUB).with_child(out_items));
            s.send(&r);
        }
        _ => s.reply_error(iq, StanzaError::Forbidden),
    }
}

fn publish(s: &mut Session, iq: &Element, ps: &Element) {
    let srv = s.srv.clone();
    let Some(p) = ps.child("publish", PUBSUB) else {
        s.reply_error(iq, StanzaError::FeatureNotImplemented);
        return;
    };
    let node = p.attr("node").unwrap_or("").to_string();
    if !NODES.contains(&node.as_str()) {
        s.reply_error(iq, StanzaError::FeatureNotImplemented);
        return;
    }
    let Some(item) = p.child("item", PUBSUB) else {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    };
    let id = item.attr("id").map(str::to_string).unwrap_or_else(|| format!("{:x}", rand::random::<u64>()));
    // Store the item as `<item id='…'>payload</item>` with the payload's
    // namespace declared, so it can be re-parsed on its own.
    let mut stored = Element::stanza("item").with_attr("id", id.as_str());
    for c in &item.children {
        if let Node::Element(e) = c {
            let mut e = e.clone();
            e.set_attr("xmlns", e.ns.clone());
            stored.push(e);
        }
    }
    let xml = stored.to_xml();
    if xml.len() > max_size(&srv, &node) {
        s.reply_error(iq, StanzaError::NotAcceptable);
        return;
    }
    if let Err(e) = srv.stores.settings.put_setting(&s.local, &key(&node), xml.as_bytes()) {
        tracing::error!(error = %e, "storing profile item failed");
        s.reply_error(iq, StanzaError::InternalServerError);
        return;
    }
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.remove_attr("from");
    r.push(
        Element::new("pubsub", PUBSUB).with_child(
            Element::stanza("publish")
                .with_attr("node", node.as_str())
                .with_child(Element::stanza("item").with_attr("id", id.as_str())),
        ),
    );
    // The stored copy's children carry their namespaces; re-tag for output.
    s.send(&r);
    notify(&srv, &s.local, &node, &stored);
}

/// Sends the new item to the owner's devices and visible subscribers.
fn notify(srv: &Arc<Server>, owner: &str, node: &str, item: &Element) {
    let bare = format!("{owner}@{}", srv.domain());
    let mut ev_item = item.clone();
    ev_item.ns = EVENT.into();
    let event =
        Element::new("event", EVENT).with_child(Element::stanza("items").with_attr("node", node).with_child(ev_item));
    let mut targets: Vec<String> = vec![owner.to_string()];
    for it in srv.stores.roster.roster(owner).unwrap_or_default() {
        if it.subscription.has_from()
            && let Ok(j) = Jid::parse(&it.jid)
            && j.domain == srv.domain()
            && let Some(l) = j.local
            && !super::privacy::blocked_between(srv, owner, &l)
        {
            targets.push(l);
        }
    }
    for t in targets {
        let render = |h: &crate::router::SessionView| {
            let m = Element::stanza("message")
                .with_attr("type", "headline")
                .with_attr("from", bare.as_str())
                .with_attr("to", format!("{t}@{}/{}", srv.domain(), h.resource))
                .with_child(event.clone());
            Some(m.to_xml().into())
        };
        srv.router.push(&t, Audience::available(), &render);
    }
}

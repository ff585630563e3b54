//! Everything a group stores for its members: group messages, occupant
//! messages (receipts, markers, private), announcements and invitations.
//!
//! Rules:
//! - **Blocking.** A member never receives, through any group path,
//!   anything from an account it blocked: group messages from
//!   `GROUP/<blocked number>`, occupant messages, announcements of its
//!   actions (except the member's own removal) and invitations.
//! - **Full queues are never skipped silently** (ARCHITECTURE.md rule 9).
//!   Members whose queue is full do not get the copy, and the sender
//!   learns which: a group message gets back an error
//!   (`resource-constraint`) carrying
//!   `<undelivered xmlns='urn:chatd:groups:0'><member jid='…'/></undelivered>`
//!   (every other member has it); a management iq carries the same
//!   `<undelivered/>` in its result for announcements and invitations.
//! - **Cost.** One admin action is one announcement per member, however
//!   many members it names: the event lists at most [`MAX_NAMED`] of them
//!   (with `count`), the rest is in `<info/>`. A group message is at most
//!   `groups.max_message_bytes`, since it is stored once per member, and
//!   what one account has stored through groups (size times recipients)
//!   is limited per minute by `groups.fanout_bytes_per_minute`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::session::Session;
use crate::protocol::stanza::{StanzaError, error_reply};
use crate::protocol::{Element, Jid, Node, ns};
use crate::server::Server;
use crate::storage::{Group, Ticket};

use super::{CONFERENCE, NS, account_jid, group_jid, load};
use crate::modules::privacy;

/// Bytes each account had stored through group messages in the current
/// minute. Only accounts that posted to a group have an entry; entries
/// older than the window are dropped once the map grows.
#[derive(Default)]
pub struct ByteBudget {
    windows: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ByteBudget {
    /// Takes `bytes` from `local`'s allowance of `max` per minute.
    pub fn take(&self, local: &str, bytes: u64, max: u64) -> bool {
        let Ok(mut w) = self.windows.lock() else { return false };
        let now = Instant::now();
        let window = Duration::from_secs(60);
        if w.len() > 10_000 {
            w.retain(|_, (t, _)| now.duration_since(*t) < window);
        }
        let e = w.entry(local.to_string()).or_insert((now, 0));
        if now.duration_since(e.0) >= window {
            *e = (now, 0);
        }
        if e.1.saturating_add(bytes) > max {
            return false;
        }
        e.1 += bytes;
        true
    }
}

/// Members named in one announcement; larger changes give the count and
/// leave the full list to `<info/>`, so an announcement stays small.
pub const MAX_NAMED: usize = 16;

/// What one durable fan-out left behind: its ticket, and the recipients
/// whose queue was full.
#[derive(Default)]
pub struct Outcome {
    pub ticket: Ticket,
    pub undelivered: Vec<String>,
}

impl Outcome {
    pub fn merge(&mut self, o: Outcome) {
        self.ticket = self.ticket.max(o.ticket);
        for l in o.undelivered {
            if !self.undelivered.contains(&l) {
                self.undelivered.push(l);
            }
        }
    }
}

/// `<undelivered xmlns='urn:chatd:groups:0'>` naming `locals`.
pub fn undelivered_element(srv: &Server, locals: &[String]) -> Element {
    let mut u = Element::new("undelivered", NS).with_attr("reason", "resource-constraint");
    for l in locals {
        u.push(Element::stanza("member").with_attr("jid", account_jid(srv, l)));
    }
    u
}

fn fanout(srv: &Server, what: &str, g: &Group, to: &[String], build: &dyn Fn(&str, u64) -> String) -> Outcome {
    if to.is_empty() {
        return Outcome::default();
    }
    match srv.router.fanout(to, build) {
        Ok((ticket, full)) => {
            if !full.is_empty() {
                tracing::debug!(group = %g.id, what, members = full.len(), "queues full; not delivered to some members");
            }
            Outcome { ticket, undelivered: full }
        }
        Err(e) => {
            tracing::error!(group = %g.id, what, error = ?e, "group delivery failed");
            Outcome { ticket: 0, undelivered: to.to_vec() }
        }
    }
}

/// An event element: `<event type actor count><member jid/>…</event>`.
/// With one member named it also carries `member='…'`.
pub fn event(srv: &Server, kind: &str, actor: &str, named: &[String]) -> Element {
    let mut e = Element::stanza("event").with_attr("type", kind).with_attr("actor", account_jid(srv, actor));
    if !named.is_empty() {
        e.set_attr("count", named.len().to_string());
    }
    if named.len() == 1 {
        e.set_attr("member", account_jid(srv, &named[0]));
    }
    for l in named.iter().take(MAX_NAMED) {
        e.push(Element::stanza("member").with_attr("jid", account_jid(srv, l)));
    }
    e
}

/// Announces one event to every member (durably), plus `removed`
/// (members just removed, who hear about it and nothing after). Members
/// who blocked `actor` are left out, except to learn of their own
/// removal.
pub fn announce(srv: &Server, g: &Group, actor: &str, event: Element, removed: &[String]) -> Outcome {
    let actor_bare = account_jid(srv, actor);
    let mut to: Vec<String> = g
        .members
        .iter()
        .map(|m| m.local.clone())
        .filter(|l| l == actor || !privacy::policy(srv, l).blocks(&actor_bare))
        .collect();
    to.extend(removed.iter().cloned());
    to.sort();
    to.dedup();
    let from = group_jid(srv, &g.id);
    let x = Element::new("x", NS).with_child(event);
    let build = |local: &str, seq: u64| {
        Element::stanza("message")
            .with_attr("from", from.as_str())
            .with_attr("to", account_jid(srv, local))
            .with_attr("type", "normal")
            .with_attr("id", format!("ev{seq}"))
            .with_child(x.clone())
            .with_child(
                Element::new("stanza-id", ns::STANZA_ID)
                    .with_attr("id", seq.to_string())
                    .with_attr("by", from.as_str()),
            )
            .to_xml()
    };
    fanout(srv, "announcement", g, &to, &build)
}

/// XEP-0249 direct invitations from `by`, stored like messages. Accounts
/// between which and `by` there is a block get nothing.
pub fn invite(srv: &Server, g: &Group, locals: &[String], by: &str) -> Outcome {
    let to: Vec<String> = locals.iter().filter(|l| !privacy::blocked_between(srv, l, by)).cloned().collect();
    let gj = group_jid(srv, &g.id);
    let by_jid = account_jid(srv, by);
    let build = |local: &str, seq: u64| {
        Element::stanza("message")
            .with_attr("from", by_jid.as_str())
            .with_attr("to", account_jid(srv, local))
            .with_attr("id", format!("inv{seq}"))
            .with_child(
                Element::new("x", CONFERENCE).with_attr("jid", gj.as_str()).with_attr("reason", g.subject.as_str()),
            )
            .with_child(
                Element::new("stanza-id", ns::STANZA_ID).with_attr("id", seq.to_string()).with_attr("by", gj.as_str()),
            )
            .to_xml()
    };
    fanout(srv, "invitation", g, &to, &build)
}

/// A message to a group (groupchat) or to an occupant (receipts, private).
pub fn handle_message(s: &mut Session, m: Element, to: &Jid) {
    let srv = s.srv.clone();
    if m.attr("type") == Some("error") {
        return;
    }
    let Some(id) = to.local.clone() else {
        s.reply_error(&m, StanzaError::ServiceUnavailable);
        return;
    };
    let Some(g) = load(&srv, &id) else {
        s.reply_error(&m, StanzaError::ItemNotFound);
        return;
    };
    if g.member(&s.local).is_none() {
        s.reply_error(&m, StanzaError::Forbidden);
        return;
    }
    let gj = group_jid(&srv, &g.id);
    let me_bare = account_jid(&srv, &s.local);
    match to.resource.as_deref() {
        None => {
            if m.attr("type") != Some("groupchat") {
                s.reply_error(&m, StanzaError::BadRequest);
                return;
            }
            if m.has_child("subject", ns::CLIENT) && !m.has_child("body", ns::CLIENT) {
                s.reply_error(&m, StanzaError::Forbidden);
                return;
            }
            let size = m.to_xml().len();
            if size > srv.cfg.groups.max_message_bytes {
                let text = format!("group messages are limited to {} bytes", srv.cfg.groups.max_message_bytes);
                // The error does not echo the oversized payload back.
                let mut head = m.clone();
                head.children.clear();
                let mut e = error_reply(&head, StanzaError::PolicyViolation, Some(&text));
                e.set_attr("to", s.jid.to_string());
                s.send(&e);
                return;
            }
            let from = format!("{gj}/{}", s.local);
            let payload: Vec<Element> = m
                .children
                .iter()
                .filter_map(|n| match n {
                    Node::Element(e) if e.ns != ns::STANZA_ID => Some(e.clone()),
                    _ => None,
                })
                .collect();
            let msg_id = m.attr("id").map(str::to_string);
            let build = |local: &str, seq: u64| {
                let mut out = Element::stanza("message")
                    .with_attr("from", from.as_str())
                    .with_attr("to", account_jid(&srv, local))
                    .with_attr("type", "groupchat");
                if let Some(i) = &msg_id {
                    out.set_attr("id", i.as_str());
                }
                for p in &payload {
                    out.push(p.clone());
                }
                out.push(
                    Element::new("stanza-id", ns::STANZA_ID)
                        .with_attr("id", seq.to_string())
                        .with_attr("by", gj.as_str()),
                );
                out.to_xml()
            };
            // Members who blocked the sender do not get its messages.
            let members: Vec<String> = g
                .members
                .iter()
                .map(|m| m.local.clone())
                .filter(|l| *l == s.local || !privacy::policy(&srv, l).blocks(&me_bare))
                .collect();
            let cost = (size as u64).saturating_mul(members.len() as u64);
            if !srv.group_bytes.take(&s.local, cost, srv.cfg.groups.fanout_bytes_per_minute) {
                let mut head = m.clone();
                head.children.clear();
                let text = "too many group message bytes this minute";
                let mut e = error_reply(&head, StanzaError::ResourceConstraint, Some(text));
                e.set_attr("to", s.jid.to_string());
                s.send(&e);
                return;
            }
            match srv.router.fanout(&members, &build) {
                Ok((t, full)) => {
                    s.max_ticket = s.max_ticket.max(t);
                    if !full.is_empty() {
                        let text = format!("not delivered to {} member(s) whose queue is full", full.len());
                        let mut e = error_reply(&m, StanzaError::ResourceConstraint, Some(&text));
                        e.set_attr("to", s.jid.to_string());
                        if let Some(err) = e.child_mut("error", ns::CLIENT) {
                            err.push(undelivered_element(&srv, &full));
                        }
                        s.send(&e);
                    }
                }
                Err(e) => s.reply_error(&m, e),
            }
        }
        Some(nick) => {
            // To one occupant: delivered to that member's account as from
            // the sender's occupant JID (receipts, markers, private).
            let Some(target) = g.member(nick).map(|m| m.local.clone()) else {
                s.reply_error(&m, StanzaError::ItemNotFound);
                return;
            };
            if privacy::policy(&srv, &target).blocks(&me_bare) {
                // Dropped, as the blocker never hears from the blocked.
                return;
            }
            let mut out = m.clone();
            out.set_attr("from", format!("{gj}/{}", s.local));
            out.set_attr("to", account_jid(&srv, &target));
            if let Ok(tj) = Jid::parse(&account_jid(&srv, &target)) {
                let class = crate::modules::message::classify(&out);
                match srv.router.message(&tj, out, class) {
                    Ok(crate::router::Delivery::Durable(t)) => s.max_ticket = s.max_ticket.max(t),
                    Ok(_) => {}
                    Err(e) => s.reply_error(&m, e),
                }
            }
        }
    }
}

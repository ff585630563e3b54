//! WhatsApp-style groups at `groups.<domain>`, also usable as XEP-0045
//! members-only persistent rooms.
//!
//! A group is defined by its membership, not by who is online: a message
//! to the group (`<message type='groupchat' to='ID@groups.DOMAIN'>`) is
//! stored for every member account in one batched durable write and
//! pushed to their online devices; offline members get it at login, in
//! order. The sender's account gets the copy too (MUC reflection), so its
//! other devices see what it sent. Each copy comes from
//! `ID@groups.DOMAIN/<sender's number>`.
//!
//! Receipts per member: a member acknowledges a group message by sending
//! an XEP-0184 receipt (or XEP-0333 marker) to the sender's occupant JID
//! `ID@groups.DOMAIN/<sender's number>`; the sender receives it from
//! `ID@groups.DOMAIN/<member's number>`, so it knows which member
//! received or read it. Receipts are stored like messages.
//!
//! Management is an iq protocol in `urn:chatd:groups:0` (see
//! docs in README): `create`/`list` on the service, and `info`, `add`,
//! `remove`, `promote`, `demote`, `leave`, `subject`, `description` on a
//! group. Only admins change membership or settings; every change is
//! announced to all members (durably) with an `<event/>`. New members also
//! get an XEP-0249 invitation.
//!
//! MUC mapping: presence to `ID@groups.DOMAIN/nick` by a member is
//! answered with the member list as occupants (affiliation owner for
//! admins, member otherwise), the member's own presence with status codes
//! 110, 100 and 210 (the nick is always the member's number) and the
//! subject. Delivery does not depend on joining: members receive group
//! messages on every device whether or not a MUC client joined.

use crate::c2s::session::Session;
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, Node, ns};
use crate::server::Server;
use crate::storage::{Group, GroupMember, GroupRole};

pub const NS: &str = "urn:chatd:groups:0";
pub const MUC: &str = "http://jabber.org/protocol/muc";
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const CONFERENCE: &str = "jabber:x:conference";

/// The service domain.
pub fn service(srv: &Server) -> String {
    if srv.cfg.groups.service.is_empty() { format!("groups.{}", srv.domain()) } else { srv.cfg.groups.service.clone() }
}

pub fn is_group_domain(srv: &Server, domain: &str) -> bool {
    domain == service(srv)
}

fn group_jid(srv: &Server, id: &str) -> String {
    format!("{id}@{}", service(srv))
}

fn account_jid(srv: &Server, local: &str) -> String {
    format!("{local}@{}", srv.domain())
}

/// Localpart of a JID of this server's domain.
fn local_of(srv: &Server, jid: &str) -> Option<String> {
    let j = Jid::parse(jid).ok()?;
    if j.domain != srv.domain() {
        return None;
    }
    j.local
}

fn load(srv: &Server, id: &str) -> Option<Group> {
    srv.stores.groups.get_group(id).ok().flatten()
}

fn reply(s: &mut Session, iq: &Element, payload: Option<Element>) {
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    if let Some(p) = payload {
        r.push(p);
    }
    s.send(&r);
}

/// Announces an event to every member (durably), plus `extra` recipients.
fn announce(srv: &Server, g: &Group, event: Element, extra: &[String]) {
    let mut to: Vec<String> = g.members.iter().map(|m| m.local.clone()).collect();
    to.extend(extra.iter().cloned());
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
    if let Err(e) = srv.router.fanout(&to, &build) {
        tracing::error!(group = %g.id, error = ?e, "announcing group event failed");
    }
}

fn event(kind: &str, actor: &str) -> Element {
    Element::stanza("event").with_attr("type", kind).with_attr("actor", actor)
}

fn save(s: &mut Session, iq: &Element, g: &Group, prev: Option<&Group>) -> bool {
    match s.srv.stores.groups.put_group(g, prev) {
        Ok(t) => {
            s.max_ticket = s.max_ticket.max(t);
            true
        }
        Err(e) => {
            tracing::error!(group = %g.id, error = %e, "saving group failed");
            s.reply_error(iq, StanzaError::InternalServerError);
            false
        }
    }
}

/// Member localparts named by `<member jid='…'/>` children, all of them
/// existing accounts.
fn members_named(s: &Session, el: &Element) -> Result<Vec<String>, StanzaError> {
    let mut out = Vec::new();
    for m in el.elements().filter(|e| e.local_name() == "member") {
        let local = m.attr("jid").and_then(|j| local_of(&s.srv, j)).ok_or(StanzaError::JidMalformed)?;
        if !s.srv.router.account_exists(&local) {
            return Err(StanzaError::ItemNotFound);
        }
        if !out.contains(&local) {
            out.push(local);
        }
    }
    Ok(out)
}

/// An iq for the service or a group.
pub fn handle_iq(s: &mut Session, iq: &Element, to: &Jid) {
    let Some(q) = iq.first_element().cloned() else {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    };
    if matches!(iq.attr("type"), Some("result") | Some("error")) {
        return;
    }
    if q.ns == ns::DISCO_INFO || q.ns == ns::DISCO_ITEMS {
        disco(s, iq, to, &q);
        return;
    }
    if q.ns != NS {
        s.reply_error(iq, StanzaError::ServiceUnavailable);
        return;
    }
    match &to.local {
        None => match (iq.attr("type"), q.local_name()) {
            (Some("set"), "create") => create(s, iq, &q),
            (Some("get"), "list") => list(s, iq),
            _ => s.reply_error(iq, StanzaError::BadRequest),
        },
        Some(id) => {
            let Some(g) = load(&s.srv, id) else {
                s.reply_error(iq, StanzaError::ItemNotFound);
                return;
            };
            if g.member(&s.local).is_none() {
                s.reply_error(iq, StanzaError::Forbidden);
                return;
            }
            manage(s, iq, &q, g);
        }
    }
}

fn create(s: &mut Session, iq: &Element, q: &Element) {
    let srv = s.srv.clone();
    let subject = q.attr("subject").unwrap_or("").trim().to_string();
    if subject.is_empty() || subject.len() > 256 {
        s.reply_error(iq, StanzaError::NotAcceptable);
        return;
    }
    let named = match members_named(s, q) {
        Ok(v) => v,
        Err(e) => {
            s.reply_error(iq, e);
            return;
        }
    };
    let mut members = vec![GroupMember { local: s.local.clone(), role: GroupRole::Admin }];
    members.extend(
        named.into_iter().filter(|l| *l != s.local).map(|local| GroupMember { local, role: GroupRole::Member }),
    );
    if members.len() > srv.cfg.groups.max_members {
        s.reply_error(iq, StanzaError::ResourceConstraint);
        return;
    }
    let g = Group {
        id: format!("g{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
        subject,
        description: q.attr("description").unwrap_or("").to_string(),
        created_ms: crate::accounts::now_ms(),
        members,
    };
    if !save(s, iq, &g, None) {
        return;
    }
    let me = account_jid(&srv, &s.local);
    reply(s, iq, Some(Element::new("group", NS).with_attr("jid", group_jid(&srv, &g.id))));
    announce(&srv, &g, event("created", &me).with_attr("subject", g.subject.as_str()), &[]);
    let invited: Vec<String> = g.members.iter().skip(1).map(|m| m.local.clone()).collect();
    invite(&srv, &g, &invited, &me);
}

/// XEP-0249 direct invitations, stored like messages.
fn invite(srv: &Server, g: &Group, locals: &[String], by: &str) {
    if locals.is_empty() {
        return;
    }
    let gj = group_jid(srv, &g.id);
    let build = |local: &str, seq: u64| {
        Element::stanza("message")
            .with_attr("from", by)
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
    let _ = srv.router.fanout(locals, &build);
}

fn list(s: &mut Session, iq: &Element) {
    let srv = s.srv.clone();
    let ids = srv.stores.groups.groups_of(&s.local).unwrap_or_default();
    let mut out = Element::new("list", NS);
    for id in ids {
        if let Some(g) = load(&srv, &id) {
            let role = if g.is_admin(&s.local) { "admin" } else { "member" };
            out.push(
                Element::stanza("group")
                    .with_attr("jid", group_jid(&srv, &g.id))
                    .with_attr("subject", g.subject.as_str())
                    .with_attr("role", role),
            );
        }
    }
    reply(s, iq, Some(out));
}

fn info_element(srv: &Server, g: &Group) -> Element {
    let mut info = Element::new("info", NS)
        .with_attr("jid", group_jid(srv, &g.id))
        .with_attr("subject", g.subject.as_str())
        .with_attr("description", g.description.as_str())
        .with_attr("created", crate::protocol::element::xep82_datetime(g.created_ms));
    for m in &g.members {
        info.push(
            Element::stanza("member")
                .with_attr("jid", account_jid(srv, &m.local))
                .with_attr("role", if m.role == GroupRole::Admin { "admin" } else { "member" }),
        );
    }
    info
}

/// Keeps at least one admin: the longest-standing member is promoted.
fn ensure_admin(g: &mut Group) {
    if !g.members.iter().any(|m| m.role == GroupRole::Admin)
        && let Some(m) = g.members.first_mut()
    {
        m.role = GroupRole::Admin;
    }
}

fn manage(s: &mut Session, iq: &Element, q: &Element, mut g: Group) {
    let srv = s.srv.clone();
    let me = account_jid(&srv, &s.local);
    let kind = q.local_name().to_string();
    if iq.attr("type") == Some("get") {
        if kind == "info" {
            reply(s, iq, Some(info_element(&srv, &g)));
        } else {
            s.reply_error(iq, StanzaError::BadRequest);
        }
        return;
    }
    if kind == "leave" {
        let prev = g.clone();
        g.members.retain(|m| m.local != s.local);
        ensure_admin(&mut g);
        if g.members.is_empty() {
            let _ = srv.stores.groups.delete_group(&prev);
            reply(s, iq, None);
            return;
        }
        if save(s, iq, &g, Some(&prev)) {
            reply(s, iq, None);
            announce(&srv, &g, event("left", &me).with_attr("member", me.as_str()), std::slice::from_ref(&s.local));
        }
        return;
    }
    if !g.is_admin(&s.local) {
        s.reply_error(iq, StanzaError::Forbidden);
        return;
    }
    let prev = g.clone();
    match kind.as_str() {
        "subject" | "description" => {
            let text = q.text().trim().to_string();
            if text.len() > if kind == "subject" { 256 } else { 2048 } || (kind == "subject" && text.is_empty()) {
                s.reply_error(iq, StanzaError::NotAcceptable);
                return;
            }
            if kind == "subject" {
                g.subject = text.clone();
            } else {
                g.description = text.clone();
            }
            if save(s, iq, &g, Some(&prev)) {
                reply(s, iq, None);
                announce(&srv, &g, event(&kind, &me).with_text(text), &[]);
            }
        }
        "add" | "remove" | "promote" | "demote" => {
            let named = match members_named(s, q) {
                Ok(v) if !v.is_empty() => v,
                Ok(_) => {
                    s.reply_error(iq, StanzaError::BadRequest);
                    return;
                }
                Err(e) => {
                    s.reply_error(iq, e);
                    return;
                }
            };
            let mut removed = Vec::new();
            let mut added = Vec::new();
            for l in &named {
                match kind.as_str() {
                    "add" if g.member(l).is_none() => {
                        g.members.push(GroupMember { local: l.clone(), role: GroupRole::Member });
                        added.push(l.clone());
                    }
                    "add" => {}
                    "remove" => {
                        if g.member(l).is_none() {
                            s.reply_error(iq, StanzaError::ItemNotFound);
                            return;
                        }
                        g.members.retain(|m| m.local != *l);
                        removed.push(l.clone());
                    }
                    "promote" | "demote" => {
                        let Some(m) = g.members.iter_mut().find(|m| m.local == *l) else {
                            s.reply_error(iq, StanzaError::ItemNotFound);
                            return;
                        };
                        m.role = if kind == "promote" { GroupRole::Admin } else { GroupRole::Member };
                    }
                    _ => {}
                }
            }
            if g.members.len() > srv.cfg.groups.max_members {
                s.reply_error(iq, StanzaError::ResourceConstraint);
                return;
            }
            if kind == "demote" && !g.members.iter().any(|m| m.role == GroupRole::Admin) {
                s.reply_error(iq, StanzaError::NotAllowed);
                return;
            }
            ensure_admin(&mut g);
            if g.members.is_empty() {
                let _ = srv.stores.groups.delete_group(&prev);
                reply(s, iq, None);
                return;
            }
            if !save(s, iq, &g, Some(&prev)) {
                return;
            }
            reply(s, iq, None);
            let past = match kind.as_str() {
                "add" => "added",
                "remove" => "removed",
                "promote" => "promoted",
                _ => "demoted",
            };
            for l in &named {
                // Removed members hear about their removal, then nothing more.
                announce(&srv, &g, event(past, &me).with_attr("member", account_jid(&srv, l)), &removed);
            }
            invite(&srv, &g, &added, &me);
        }
        _ => s.reply_error(iq, StanzaError::FeatureNotImplemented),
    }
}

/// disco#info / disco#items on the service or a group.
fn disco(s: &mut Session, iq: &Element, to: &Jid, q: &Element) {
    let srv = s.srv.clone();
    let mut out = Element::new("query", &q.ns);
    match (&to.local, q.ns == ns::DISCO_INFO) {
        (None, true) => {
            out.push(
                Element::stanza("identity")
                    .with_attr("category", "conference")
                    .with_attr("type", "text")
                    .with_attr("name", "Groups"),
            );
            for f in [ns::DISCO_INFO, ns::DISCO_ITEMS, MUC, NS] {
                out.push(Element::stanza("feature").with_attr("var", f));
            }
        }
        (None, false) => {
            for id in srv.stores.groups.groups_of(&s.local).unwrap_or_default() {
                if let Some(g) = load(&srv, &id) {
                    out.push(
                        Element::stanza("item")
                            .with_attr("jid", group_jid(&srv, &id))
                            .with_attr("name", g.subject.as_str()),
                    );
                }
            }
        }
        (Some(id), info) => {
            let Some(g) = load(&srv, id) else {
                s.reply_error(iq, StanzaError::ItemNotFound);
                return;
            };
            if info {
                out.push(
                    Element::stanza("identity")
                        .with_attr("category", "conference")
                        .with_attr("type", "text")
                        .with_attr("name", g.subject.as_str()),
                );
                for f in [
                    ns::DISCO_INFO,
                    MUC,
                    "muc_membersonly",
                    "muc_persistent",
                    "muc_nonanonymous",
                    "muc_unmoderated",
                    NS,
                ] {
                    out.push(Element::stanza("feature").with_attr("var", f));
                }
            } else if g.member(&s.local).is_none() {
                s.reply_error(iq, StanzaError::Forbidden);
                return;
            }
        }
    }
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.set_attr("from", to.to_string());
    r.push(out);
    s.send(&r);
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
            let members: Vec<String> = g.members.iter().map(|m| m.local.clone()).collect();
            match srv.router.fanout(&members, &build) {
                Ok((t, _full)) => s.max_ticket = s.max_ticket.max(t),
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
            let mut out = m.clone();
            out.set_attr("from", format!("{gj}/{}", s.local));
            out.set_attr("to", account_jid(&srv, &target));
            if let Ok(tj) = Jid::parse(&account_jid(&srv, &target)) {
                let class = super::message::classify(&out);
                match srv.router.message(&tj, out, class) {
                    Ok(crate::router::Delivery::Durable(t)) => s.max_ticket = s.max_ticket.max(t),
                    Ok(_) => {}
                    Err(e) => s.reply_error(&m, e),
                }
            }
        }
    }
}

/// MUC join/leave presence.
pub fn handle_presence(s: &mut Session, p: Element, to: &Jid) {
    let srv = s.srv.clone();
    let (Some(id), Some(_nick)) = (to.local.clone(), to.resource.clone()) else { return };
    let gj = group_jid(&srv, &id);
    let me_full = s.jid.to_string();
    let g = load(&srv, &id);
    let Some(g) = g.filter(|g| g.member(&s.local).is_some()) else {
        let mut e = crate::protocol::stanza::error_reply(&p, StanzaError::NotAllowed, None);
        e.set_attr("to", me_full.as_str());
        e.set_attr("from", to.to_string());
        // XEP-0045 §7.2.7: members-only room.
        if let Some(err) = e.child_mut("error", ns::CLIENT) {
            err.children.clear();
            err.set_attr("type", "auth");
            err.push(Element::new("registration-required", ns::STANZA_ERRORS));
        }
        s.send(&e);
        return;
    };
    let occupant = |m: &GroupMember, self_codes: bool, unavailable: bool| {
        let mut x = Element::new("x", MUC_USER).with_child(
            Element::stanza("item")
                .with_attr("affiliation", if m.role == GroupRole::Admin { "owner" } else { "member" })
                .with_attr("role", if unavailable { "none" } else { "participant" })
                .with_attr("jid", account_jid(&srv, &m.local)),
        );
        if self_codes {
            for c in ["100", "110", "210"] {
                x.push(Element::stanza("status").with_attr("code", c));
            }
        }
        let mut pres = Element::stanza("presence")
            .with_attr("from", format!("{gj}/{}", m.local))
            .with_attr("to", me_full.as_str())
            .with_child(x);
        if unavailable {
            pres.set_attr("type", "unavailable");
        }
        pres
    };
    if p.attr("type") == Some("unavailable") {
        if let Some(me) = g.member(&s.local).cloned() {
            let pres = occupant(&me, true, true);
            s.send(&pres);
        }
        return;
    }
    let me_local = s.local.clone();
    for m in g.members.iter().filter(|m| m.local != me_local) {
        let pres = occupant(m, false, false);
        s.send(&pres);
    }
    if let Some(me) = g.member(&s.local).cloned() {
        let pres = occupant(&me, true, false);
        s.send(&pres);
    }
    let subj = Element::stanza("message")
        .with_attr("type", "groupchat")
        .with_attr("from", gj.as_str())
        .with_attr("to", me_full.as_str())
        .with_child(Element::stanza("subject").with_text(g.subject.as_str()));
    s.send(&subj);
}

/// Drops an account from every group it belongs to (account deletion).
pub fn forget_account(stores: &crate::storage::Stores, local: &str) {
    for id in stores.groups.groups_of(local).unwrap_or_default() {
        if let Ok(Some(g)) = stores.groups.get_group(&id) {
            let prev = g.clone();
            let mut g = g;
            g.members.retain(|m| m.local != local);
            ensure_admin(&mut g);
            let _ = if g.members.is_empty() {
                stores.groups.delete_group(&prev)
            } else {
                stores.groups.put_group(&g, Some(&prev))
            };
        }
    }
}

//! WhatsApp-style groups at `groups.<domain>`, also usable as XEP-0045
//! members-only persistent rooms.
//!
//! A group is defined by its membership, not by who is online: a message
//! to the group (`<message type='groupchat' to='ID@groups.DOMAIN'>`) is
//! stored for every member account in one batched durable write and
//! pushed to their online devices; offline members get it at login, in
//! order. The sender's account gets the copy too (MUC reflection), so its
//! other devices see what it sent. Each copy comes from
//! `ID@groups.DOMAIN/<sender's number>`. Delivery, blocking and full
//! queues are in [`deliver`]; the MUC view is in [`muc`].
//!
//! Receipts per member: a member acknowledges a group message by sending
//! an XEP-0184 receipt (or XEP-0333 marker) to the sender's occupant JID
//! `ID@groups.DOMAIN/<sender's number>`; the sender receives it from
//! `ID@groups.DOMAIN/<member's number>`, so it knows which member
//! received or read it. Receipts are stored like messages.
//!
//! Management is an iq protocol in `urn:chatd:groups:0` (see README):
//! `create`/`list` on the service, and `info`, `add`, `remove`,
//! `promote`, `demote`, `leave`, `subject`, `description`, `join`,
//! `decline` on a group. Only admins change membership or settings; every
//! change is announced to all members (durably) with one `<event/>` each.
//!
//! Consent: nobody is put into a group against their "who can add me to
//! groups" setting (`everyone`, `contacts`, `nobody`; see
//! [`crate::modules::privacy`]). Whoever may not be added directly is
//! invited instead (XEP-0249, from the admin's JID) and becomes a member
//! only by accepting: a `<join/>` iq to the group, or joining the room as
//! a MUC client. `<decline/>` drops the invitation. Where either side
//! blocked the other, nothing is sent at all; the admin's answer is the
//! same as for an invitation, so it does not reveal the block.
//!
//! Costs a stranger controls are bounded: group creation per account per
//! hour, subject and description sizes, group message size, members and
//! pending invitations per group, and every named number that is not a
//! contact draws on the contact-discovery allowance (an add naming a
//! number says whether it is registered). Group ids are 128 random bits,
//! checked against existing groups.

pub mod deliver;
pub mod muc;
pub mod rules;

pub use deliver::handle_message;
pub use muc::handle_presence;

use crate::session::Session;
use crate::hooks::{Hooks, Module, Stage, priority};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};
use crate::server::Server;
use crate::storage::{Group, GroupMember, GroupRole};
use deliver::{Outcome, announce, event, invite};

pub const NS: &str = "urn:chatd:groups:0";
pub const MUC: &str = "http://jabber.org/protocol/muc";
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const CONFERENCE: &str = "jabber:x:conference";

pub const MODULE: Module = Module {
    name: "groups",
    specs: &["urn:chatd:groups:0", "XEP-0045 (members-only persistent rooms)", "XEP-0249"],
    register,
};

/// Everything addressed to the groups service is the module's, at every
/// stage, ahead of the handlers for accounts.
fn register(h: &mut Hooks) {
    h.stanza(Stage::Message, priority::INTERCEPT, |s, m, to| match to {
        Some(j) if is_group_domain(&s.srv, &j.domain) => {
            handle_message(s, m, &j);
            None
        }
        to => Some((m, to)),
    });
    h.stanza(Stage::Presence, priority::INTERCEPT, |s, p, to| match to {
        Some(j) if matches!(p.attr("type"), None | Some("unavailable")) && is_group_domain(&s.srv, &j.domain) => {
            handle_presence(s, p, &j);
            None
        }
        to => Some((p, to)),
    });
    h.account_erased(|stores, _, local| {
        forget_account(stores, local);
        Ok(0)
    });
    h.stanza(Stage::Iq, priority::INTERCEPT, |s, iq, to| match to {
        Some(j) if is_group_domain(&s.srv, &j.domain) => {
            handle_iq(s, &iq, &j);
            None
        }
        to => Some((iq, to)),
    });
}

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

/// Answers `iq`; when some members' queues were full, the result carries
/// `<undelivered/>` naming them (inside `payload`, if there is one).
fn reply(s: &mut Session, iq: &Element, payload: Option<Element>, outcome: &Outcome) {
    s.max_ticket = s.max_ticket.max(outcome.ticket);
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    let undelivered =
        (!outcome.undelivered.is_empty()).then(|| deliver::undelivered_element(&s.srv, &outcome.undelivered));
    match (payload, undelivered) {
        (Some(mut p), Some(u)) => {
            p.push(u);
            r.push(p);
        }
        (Some(p), None) => r.push(p),
        (None, Some(u)) => r.push(u),
        (None, None) => {}
    }
    s.send(&r);
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
/// existing accounts. Naming a number that is neither a contact nor
/// already in `group` (member or invited) costs a contact-discovery
/// lookup: the answer says whether it exists.
fn members_named(s: &Session, el: &Element, group: Option<&Group>) -> Result<Vec<String>, StanzaError> {
    let mut out = Vec::new();
    for m in el.elements().filter(|e| e.local_name() == "member") {
        let local = m.attr("jid").and_then(|j| local_of(&s.srv, j)).ok_or(StanzaError::JidMalformed)?;
        if out.contains(&local) {
            continue;
        }
        if out.len() >= s.srv.cfg.groups.max_members {
            return Err(StanzaError::ResourceConstraint);
        }
        let known = group.is_some_and(|g| g.member(&local).is_some() || g.invited.contains(&local));
        if !known && !crate::modules::contacts::charge(&s.srv, &s.local, &local) {
            return Err(StanzaError::ResourceConstraint);
        }
        if !s.srv.router.account_exists(&local) {
            return Err(StanzaError::ItemNotFound);
        }
        out.push(local);
    }
    Ok(out)
}

/// How the accounts an admin named are brought in.
#[derive(Default)]
struct Admission {
    /// Their setting lets the admin add them.
    direct: Vec<String>,
    /// To be invited.
    invite: Vec<String>,
}

/// Sorts named accounts by their "who can add me to groups" setting.
/// Accounts blocked either way end up in neither list: the admin is told
/// nothing different (see [`invited_element`]), and they hear nothing.
fn admit(srv: &Server, adder: &str, named: &[String], g: &Group) -> Admission {
    use crate::modules::privacy::{blocked_between, may_add_to_group};
    let mut a = Admission::default();
    for l in named {
        let blocked = || blocked_between(srv, l, adder);
        let allows = || may_add_to_group(srv, l, adder);
        match rules::admission(l == adder, g.member(l).is_some(), blocked, allows) {
            rules::Admission::Skip => {}
            rules::Admission::Direct => a.direct.push(l.clone()),
            rules::Admission::Invite => a.invite.push(l.clone()),
        }
    }
    a
}

/// `<invited/>` naming every account named that was not added directly,
/// blocked ones included, so the answer does not reveal a block.
fn invited_element(srv: &Server, named: &[String], a: &Admission, g: &Group) -> Option<Element> {
    let listed: Vec<&String> = named.iter().filter(|l| g.member(l).is_none() && !a.direct.contains(l)).collect();
    if listed.is_empty() {
        return None;
    }
    let mut e = Element::new("invited", NS);
    for l in listed {
        e.push(Element::stanza("member").with_attr("jid", account_jid(srv, l)));
    }
    Some(e)
}

/// Records invitations in the group (bounded by `groups.max_members`).
fn record_invitations(srv: &Server, g: &mut Group, locals: &[String]) -> Result<(), StanzaError> {
    for l in locals {
        if !g.invited.contains(l) {
            g.invited.push(l.clone());
        }
    }
    if g.invited.len() > srv.cfg.groups.max_members {
        return Err(StanzaError::ResourceConstraint);
    }
    Ok(())
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
        muc::disco(s, iq, to, &q);
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
            let standing = rules::Standing::of(&g, &s.local);
            if let Err(e) = rules::may(standing, iq.attr("type").unwrap_or(""), q.local_name()) {
                s.reply_error(iq, e);
                return;
            }
            if standing == rules::Standing::Invited {
                match q.local_name() {
                    "join" => {
                        let me = s.local.clone();
                        let before = s.max_ticket;
                        if let Some(g) = accept_invitation(s, g)
                            && g.member(&me).is_some()
                        {
                            let payload = info_element(&s.srv, &g);
                            let o = Outcome { ticket: s.max_ticket.max(before), undelivered: Vec::new() };
                            reply(s, iq, Some(payload), &o);
                        } else {
                            s.reply_error(iq, StanzaError::ResourceConstraint);
                        }
                    }
                    _ => {
                        let prev = g.clone();
                        let mut g = g;
                        g.invited.retain(|l| *l != s.local);
                        if save(s, iq, &g, Some(&prev)) {
                            reply(s, iq, None, &Outcome::default());
                        }
                    }
                }
                return;
            }
            manage(s, iq, &q, g);
        }
    }
}

/// Makes an invited account a member, announces it and returns the
/// group as saved (None when saving failed; unchanged when full).
pub(crate) fn accept_invitation(s: &mut Session, g: Group) -> Option<Group> {
    let srv = s.srv.clone();
    if g.members.len() >= srv.cfg.groups.max_members {
        return Some(g);
    }
    let prev = g.clone();
    let mut g = g;
    g.invited.retain(|l| *l != s.local);
    g.members.push(GroupMember { local: s.local.clone(), role: GroupRole::Member });
    match srv.stores.groups.put_group(&g, Some(&prev)) {
        Ok(t) => s.max_ticket = s.max_ticket.max(t),
        Err(e) => {
            tracing::error!(group = %g.id, error = %e, "saving group failed");
            return None;
        }
    }
    let me = s.local.clone();
    let o = announce(&srv, &g, &me, event(&srv, "joined", &me, std::slice::from_ref(&me)), &[]);
    s.max_ticket = s.max_ticket.max(o.ticket);
    Some(g)
}

/// A fresh group id: 128 random bits, never one already in use.
fn new_id(srv: &Server) -> Option<String> {
    for _ in 0..4 {
        let id = format!("g{:032x}", rand::random::<u128>());
        if matches!(srv.stores.groups.get_group(&id), Ok(None)) {
            return Some(id);
        }
    }
    None
}

fn text_ok(srv: &Server, kind: &str, text: &str) -> bool {
    match kind {
        "subject" => !text.is_empty() && text.len() <= srv.cfg.groups.max_subject_bytes,
        _ => text.len() <= srv.cfg.groups.max_description_bytes,
    }
}

fn create(s: &mut Session, iq: &Element, q: &Element) {
    let srv = s.srv.clone();
    let subject = q.attr("subject").unwrap_or("").trim().to_string();
    let description = q.attr("description").unwrap_or("").trim().to_string();
    if !text_ok(&srv, "subject", &subject) || !text_ok(&srv, "description", &description) {
        s.reply_error(iq, StanzaError::NotAcceptable);
        return;
    }
    let named = match members_named(s, q, None) {
        Ok(v) => v,
        Err(e) => {
            s.reply_error(iq, e);
            return;
        }
    };
    if named.iter().filter(|l| **l != s.local).count() + 1 > srv.cfg.groups.max_members {
        s.reply_error(iq, StanzaError::ResourceConstraint);
        return;
    }
    if !srv.group_creations.take(&s.local, 1, srv.cfg.groups.creations_per_hour) {
        s.reply_error(iq, StanzaError::ResourceConstraint);
        return;
    }
    let Some(id) = new_id(&srv) else {
        s.reply_error(iq, StanzaError::InternalServerError);
        return;
    };
    let mut g = Group {
        id,
        subject,
        description,
        created_ms: crate::accounts::now_ms(),
        members: vec![GroupMember { local: s.local.clone(), role: GroupRole::Admin }],
        invited: Vec::new(),
    };
    let adm = admit(&srv, &s.local, &named, &g);
    let invited = invited_element(&srv, &named, &adm, &g);
    g.members.extend(adm.direct.iter().map(|l| GroupMember { local: l.clone(), role: GroupRole::Member }));
    if let Err(e) = record_invitations(&srv, &mut g, &adm.invite) {
        s.reply_error(iq, e);
        return;
    }
    if !save(s, iq, &g, None) {
        return;
    }
    let me = s.local.clone();
    let mut o = announce(&srv, &g, &me, event(&srv, "created", &me, &[]).with_attr("subject", g.subject.as_str()), &[]);
    o.merge(invite(&srv, &g, &adm.direct, &me));
    o.merge(invite(&srv, &g, &adm.invite, &me));
    let mut payload = Element::new("group", NS).with_attr("jid", group_jid(&srv, &g.id));
    if let Some(i) = invited {
        payload.push(i);
    }
    reply(s, iq, Some(payload), &o);
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
    reply(s, iq, Some(out), &Outcome::default());
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
    let me = s.local.clone();
    let kind = q.local_name().to_string();
    // What gets here passed `rules::may`: `info` is the only get.
    if iq.attr("type") == Some("get") {
        reply(s, iq, Some(info_element(&srv, &g)), &Outcome::default());
        return;
    }
    if kind == "leave" {
        let prev = g.clone();
        g.members.retain(|m| m.local != s.local);
        ensure_admin(&mut g);
        if g.members.is_empty() {
            let _ = srv.stores.groups.delete_group(&prev);
            reply(s, iq, None, &Outcome::default());
            return;
        }
        if save(s, iq, &g, Some(&prev)) {
            let o =
                announce(&srv, &g, &me, event(&srv, "left", &me, std::slice::from_ref(&me)), std::slice::from_ref(&me));
            reply(s, iq, None, &o);
        }
        return;
    }
    let prev = g.clone();
    match kind.as_str() {
        "subject" | "description" => {
            let text = q.text().trim().to_string();
            if !text_ok(&srv, &kind, &text) {
                s.reply_error(iq, StanzaError::NotAcceptable);
                return;
            }
            if kind == "subject" {
                g.subject = text.clone();
            } else {
                g.description = text.clone();
            }
            if save(s, iq, &g, Some(&prev)) {
                let o = announce(&srv, &g, &me, event(&srv, &kind, &me, &[]).with_text(text), &[]);
                reply(s, iq, None, &o);
            }
        }
        "add" | "remove" | "promote" | "demote" => {
            let named = match members_named(s, q, Some(&g)) {
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
            let mut adm = Admission::default();
            let mut invited = None;
            match kind.as_str() {
                "add" => {
                    adm = admit(&srv, &me, &named, &g);
                    invited = invited_element(&srv, &named, &adm, &g);
                    g.members
                        .extend(adm.direct.iter().map(|l| GroupMember { local: l.clone(), role: GroupRole::Member }));
                    if let Err(e) = record_invitations(&srv, &mut g, &adm.invite) {
                        s.reply_error(iq, e);
                        return;
                    }
                }
                "remove" => {
                    for l in &named {
                        if g.member(l).is_some() {
                            g.members.retain(|m| m.local != *l);
                            removed.push(l.clone());
                        } else if g.invited.contains(l) {
                            // Withdraws a pending invitation.
                            g.invited.retain(|i| i != l);
                        } else {
                            s.reply_error(iq, StanzaError::ItemNotFound);
                            return;
                        }
                    }
                }
                _ => {
                    for l in &named {
                        let Some(m) = g.members.iter_mut().find(|m| m.local == *l) else {
                            s.reply_error(iq, StanzaError::ItemNotFound);
                            return;
                        };
                        m.role = if kind == "promote" { GroupRole::Admin } else { GroupRole::Member };
                    }
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
                reply(s, iq, None, &Outcome::default());
                return;
            }
            if !save(s, iq, &g, Some(&prev)) {
                return;
            }
            let past = match kind.as_str() {
                "add" => "added",
                "remove" => "removed",
                "promote" => "promoted",
                _ => "demoted",
            };
            // One announcement per member for the whole action; only the
            // accounts it actually changed are named.
            let changed: Vec<String> = match kind.as_str() {
                "add" => adm.direct.clone(),
                "remove" => removed.clone(),
                _ => named.clone(),
            };
            let mut o = Outcome::default();
            if !changed.is_empty() {
                o = announce(&srv, &g, &me, event(&srv, past, &me, &changed), &removed);
            }
            o.merge(invite(&srv, &g, &adm.direct, &me));
            o.merge(invite(&srv, &g, &adm.invite, &me));
            reply(s, iq, invited, &o);
        }
        _ => s.reply_error(iq, StanzaError::FeatureNotImplemented),
    }
}

/// Drops an account from every group it belongs to (account deletion,
/// or its number registered by a new owner).
pub fn forget_account(stores: &crate::storage::Stores, local: &str) {
    for id in stores.groups.groups_of(local).unwrap_or_default() {
        if let Ok(Some(g)) = stores.groups.get_group(&id) {
            let prev = g.clone();
            let mut g = g;
            g.members.retain(|m| m.local != local);
            g.invited.retain(|l| l != local);
            ensure_admin(&mut g);
            let _ = if g.members.is_empty() {
                stores.groups.delete_group(&prev)
            } else {
                stores.groups.put_group(&g, Some(&prev))
            };
        }
    }
}

//! The XEP-0045 view of groups for standard clients: disco on the service
//! and on groups, and join/leave presence. Each group is a members-only,
//! persistent, non-anonymous room whose occupants are its members.
//!
//! An account invited to a group (see [`super::invite`]) accepts the
//! invitation by joining the room, as XEP-0249 clients do, or with the
//! `<join/>` iq; anyone else is refused with `registration-required`.

use crate::session::Session;
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};
use crate::storage::{GroupMember, GroupRole};

use super::{MUC, MUC_USER, NS, account_jid, group_jid, load};

/// disco#info / disco#items on the service or a group.
pub(super) fn disco(s: &mut Session, iq: &Element, to: &Jid, q: &Element) {
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

/// MUC join/leave presence.
pub fn handle_presence(s: &mut Session, p: Element, to: &Jid) {
    let srv = s.srv.clone();
    let (Some(id), Some(_nick)) = (to.local.clone(), to.resource.clone()) else { return };
    let gj = group_jid(&srv, &id);
    let me_full = s.jid.to_string();
    let mut g = load(&srv, &id);
    if p.attr("type") != Some("unavailable")
        && let Some(found) = g.clone()
        && found.member(&s.local).is_none()
        && found.invited.contains(&s.local)
    {
        // Joining the room accepts an invitation (XEP-0249).
        g = super::accept_invitation(s, found);
    }
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

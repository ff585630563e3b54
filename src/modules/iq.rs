//! IQ dispatch (RFC 6120 §8.2.3, RFC 6121 §8.5): requests to the server
//! or to the sender's own account go to the module owning the payload
//! namespace; requests to another account's full JID are forwarded;
//! anything unknown gets `service-unavailable`.

use crate::c2s::session::Session;
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};

pub fn handle(s: &mut Session, iq: Element, to: Option<Jid>) {
    let typ = iq.attr("type").unwrap_or("");
    if !matches!(typ, "get" | "set" | "result" | "error") || iq.attr("id").is_none() {
        s.reply_error(&iq, StanzaError::BadRequest);
        return;
    }
    let domain = s.domain().to_string();
    if let Some(j) = &to
        && super::groups::is_group_domain(&s.srv, &j.domain)
    {
        super::groups::handle_iq(s, &iq, j);
        return;
    }
    let for_server = match &to {
        None => true,
        Some(j) => {
            j.domain == domain && (j.local.is_none() || (j.local.as_deref() == Some(&s.local) && j.resource.is_none()))
        }
    };
    if matches!(typ, "result" | "error") {
        if for_server {
            super::sm::iq_response(s, &iq);
        } else if let Some(j) = &to {
            // Nothing from (or to) a blocked account gets through, answers
            // included.
            let blocked = j.domain == domain
                && j.local.as_deref().is_some_and(|l| super::privacy::blocked_between(&s.srv, &s.local, l));
            if !blocked {
                forward(s, &iq, j);
            }
        }
        return;
    }
    if let Some(j) = &to
        && j.domain != domain
    {
        s.reply_error(&iq, StanzaError::RemoteServerNotFound);
        return;
    }
    let Some(payload) = iq.first_element().cloned() else {
        s.reply_error(&iq, StanzaError::BadRequest);
        return;
    };
    if for_server {
        match (payload.local_name(), payload.ns.as_str()) {
            ("query", ns::ROSTER) => super::roster::handle_iq(s, &iq, &payload),
            ("query", ns::DISCO_INFO) | ("query", ns::DISCO_ITEMS) => {
                super::disco::handle(s, &iq, to.as_ref(), &payload)
            }
            ("ping", ns::PING) => super::ping::handle(s, &iq),
            ("enable", super::carbons::NS) | ("disable", super::carbons::NS) => {
                super::carbons::handle_iq(s, &iq, &payload)
            }
            ("blocklist", super::blocking::NS) | ("block", super::blocking::NS) | ("unblock", super::blocking::NS) => {
                super::blocking::handle_iq(s, &iq, &payload)
            }
            ("privacy", super::privacy::NS) => super::privacy::handle_iq(s, &iq, &payload),
            ("request", super::upload::NS) => super::upload::handle(s, &iq, &payload),
            ("pubsub", super::pep::PUBSUB) => super::pep::handle_iq(s, &iq, to.as_ref(), &payload),
            ("query", super::register::NS) => super::register::post_auth(s, &iq, &payload),
            ("query", super::discovery::NS) => super::discovery::handle_iq(s, &iq, &payload),
            ("query", ns::VERSION) if to.as_ref().is_none_or(|j| j.local.is_none()) => super::version::handle(s, &iq),
            ("session", ns::SESSION) => {
                let mut r = iq_result(&iq);
                r.set_attr("to", s.jid.to_string());
                s.send(&r);
            }
            _ => s.reply_error(&iq, StanzaError::ServiceUnavailable),
        }
        return;
    }
    let Some(j) = to else { return };
    // Every answer below says something about whether the account exists
    // or is online: it costs the asker one contact-discovery lookup.
    if let Some(l) = j.local.as_deref()
        && !super::discovery::charge(&s.srv, &s.local, l)
    {
        s.reply_error(&iq, StanzaError::ResourceConstraint);
        return;
    }
    if let Some(l) = j.local.as_deref()
        && super::privacy::blocked_between(&s.srv, &s.local, l)
    {
        if super::privacy::policy(&s.srv, &s.local).blocks(&j.bare_string()) {
            let e = super::blocking::blocked_error(s, &iq);
            s.send(&e);
        } else {
            s.reply_error(&iq, StanzaError::ServiceUnavailable);
        }
        return;
    }
    if j.resource.is_none() {
        // A request to another account's bare JID is answered by the
        // server on the account's behalf.
        match (payload.local_name(), payload.ns.as_str()) {
            ("query", ns::DISCO_INFO) | ("query", ns::DISCO_ITEMS)
                if s.srv.router.account_exists(j.local.as_deref().unwrap_or("")) =>
            {
                super::disco::handle(s, &iq, Some(&j), &payload)
            }
            ("query", super::privacy::LAST) => super::privacy::handle_last(s, &iq, Some(&j)),
            ("pubsub", super::pep::PUBSUB) => super::pep::handle_iq(s, &iq, Some(&j), &payload),
            ("ping", ns::PING) if s.srv.router.account_exists(j.local.as_deref().unwrap_or("")) => {
                let mut r = iq_result(&iq);
                r.set_attr("to", s.jid.to_string());
                s.send(&r);
            }
            _ => s.reply_error(&iq, StanzaError::ServiceUnavailable),
        }
        return;
    }
    // A device's presence is only revealed to those allowed to see it:
    // for anyone else the answer is the same whether it is online or not.
    if let Some(l) = j.local.as_deref()
        && !super::privacy::may_see(&s.srv, l, &s.local)
    {
        let mut e = crate::protocol::stanza::error_reply(&iq, StanzaError::ServiceUnavailable, None);
        e.set_attr("to", s.jid.to_string());
        e.set_attr("from", j.to_string());
        s.send(&e);
        return;
    }
    forward(s, &iq, &j);
}

/// Forwards an iq to a full JID; a request nobody receives gets
/// `service-unavailable` (RFC 6121 §8.5.3.1).
fn forward(s: &mut Session, iq: &Element, to: &Jid) {
    let xml: std::sync::Arc<str> = iq.to_xml().into();
    let n = s.srv.router.transient(to, xml);
    if n == 0 && matches!(iq.attr("type"), Some("get") | Some("set")) {
        let mut e = crate::protocol::stanza::error_reply(iq, StanzaError::ServiceUnavailable, None);
        e.set_attr("to", s.jid.to_string());
        e.set_attr("from", to.to_string());
        s.send(&e);
    }
}

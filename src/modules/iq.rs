//! IQ dispatch (RFC 6120 §8.2.3, RFC 6121 §8.5): requests to the server,
//! to the sender's own account or to another account's bare JID go to the
//! handler a module registered for the payload (see [`crate::hooks`]);
//! requests to another account's full JID are forwarded; anything unknown
//! gets `service-unavailable`.

use crate::session::Session;
use crate::hooks::{FeaturePhase, Hooks, IqRequest, IqTarget, IqType, Module, Stage, priority};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, Jid, ns};

/// RFC 6120 iq handling as a module: the default handler of the iq stage,
/// and the legacy RFC 3921 session request.
pub const MODULE: Module =
    Module { name: "iq", specs: &["RFC 6120 §8.2.3", "RFC 6121 §8.5", "RFC 3921 §3"], register };

fn register(h: &mut Hooks) {
    h.stanza(Stage::Iq, priority::ADMIT, |s, iq, to| {
        let typ = iq.attr("type").unwrap_or("");
        if !matches!(typ, "get" | "set" | "result" | "error") || iq.attr("id").is_none() {
            s.reply_error(&iq, StanzaError::BadRequest);
            return None;
        }
        Some((iq, to))
    });
    h.stanza(Stage::Iq, priority::DEFAULT, |s, iq, to| {
        handle(s, iq, to);
        None
    });
    // RFC 3921 sessions are a no-op kept for old clients: offered as
    // optional (RFC 6121 Appendix E), answered with a result.
    h.stream_feature(FeaturePhase::AfterAuth, |_| {
        Some(Element::new("session", ns::SESSION).with_child(Element::stanza("optional")))
    });
    h.iq_server(crate::hooks::GET_SET, ns::SESSION, "session", |s, r| {
        let mut res = iq_result(r.iq);
        res.set_attr("to", s.jid.to_string());
        s.send(&res);
    });
}

/// Dispatches an admitted iq (type and id checked).
pub fn handle(s: &mut Session, iq: Element, to: Option<Jid>) {
    let typ = iq.attr("type").unwrap_or("");
    let domain = s.domain().to_string();
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
    let Some(iq_type) = IqType::parse(typ) else { return };
    if for_server {
        let target = if to.as_ref().is_some_and(|j| j.local.is_some()) { IqTarget::Own } else { IqTarget::Server };
        dispatch(s, &iq, &payload, to.as_ref(), target, iq_type);
        return;
    }
    let Some(j) = to else { return };
    // Every answer below says something about whether the account exists
    // or is online: it costs the asker one contact-discovery lookup.
    if let Some(l) = j.local.as_deref()
        && !super::contacts::charge(&s.srv, &s.local, l)
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
        dispatch(s, &iq, &payload, Some(&j), IqTarget::Account, iq_type);
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

/// Calls the handler a module registered for this request, or answers
/// `service-unavailable` (RFC 6120 §8.4).
fn dispatch(s: &mut Session, iq: &Element, payload: &Element, to: Option<&Jid>, target: IqTarget, typ: IqType) {
    let srv = s.srv.clone();
    match srv.hooks.iq_handler(target, typ, &payload.ns, payload.local_name()) {
        Some(f) => f(s, &IqRequest { iq, payload, to }),
        None => s.reply_error(iq, StanzaError::ServiceUnavailable),
    }
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

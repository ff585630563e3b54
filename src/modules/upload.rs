//! XEP-0363 HTTP File Upload: the server itself is the upload service.
//! A slot request (`<request xmlns='urn:xmpp:http:upload:0'/>` in an iq
//! get to the server) is answered with signed PUT and GET URLs on the
//! media service ([`crate::media`]); disco#info of the server carries the
//! `store/file` identity, the feature and the `max-file-size` form.

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, Module};
use crate::media::slot::Refusal;
use crate::protocol::stanza::{StanzaError, error_reply, iq_result};
use crate::protocol::{Element, ns};

pub const NS: &str = "urn:xmpp:http:upload:0";

const DATA_FORMS: &str = "jabber:x:data";

pub const MODULE: Module = Module { name: "upload", specs: &["XEP-0363"], register };

fn register(h: &mut Hooks) {
    h.disco_extension(disco_info);
    h.iq_server(GET_SET, NS, "request", |s, r| handle(s, r.iq, r.payload));
}

/// Adds the upload service to the server's disco#info, when slots are
/// issued on this node.
pub fn disco_info(s: &Session, query: &mut Element) {
    let Some(issuer) = s.srv.media.get() else {
        return;
    };
    query.push(
        Element::stanza("identity")
            .with_attr("category", "store")
            .with_attr("type", "file")
            .with_attr("name", "HTTP File Upload"),
    );
    query.push(Element::stanza("feature").with_attr("var", NS));
    let field = |var: &str, value: String| {
        Element::stanza("field").with_attr("var", var).with_child(Element::stanza("value").with_text(value))
    };
    let form = Element::new("x", DATA_FORMS)
        .with_attr("type", "result")
        .with_child(field("FORM_TYPE", NS.to_string()).with_attr("type", "hidden"))
        .with_child(field("max-file-size", issuer.max_file_bytes.to_string()));
    query.push(form);
}

/// Answers a slot request.
pub fn handle(s: &mut Session, iq: &Element, req: &Element) {
    if iq.attr("type") != Some("get") {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    }
    let Some(issuer) = s.srv.media.get().cloned() else {
        s.reply_error(iq, StanzaError::ServiceUnavailable);
        return;
    };
    let res = issuer.request(
        &s.local,
        req.attr("filename").unwrap_or(""),
        req.attr("size").unwrap_or(""),
        req.attr("content-type"),
    );
    let urls = match res {
        Ok(u) => u,
        Err(Refusal::TooLarge(max)) => {
            let mut e = error_reply(iq, StanzaError::NotAcceptable, Some("file too large"));
            if let Some(err) = e.child_mut("error", ns::CLIENT) {
                err.push(
                    Element::new("file-too-large", NS)
                        .with_child(Element::stanza("max-file-size").with_text(max.to_string())),
                );
            }
            e.set_attr("to", s.jid.to_string());
            if e.attr("from").is_none() {
                e.set_attr("from", s.domain().to_string());
            }
            s.send(&e);
            return;
        }
        Err(Refusal::BadRequest(why)) => return send_error(s, iq, StanzaError::BadRequest, why),
        Err(Refusal::Quota) => {
            return send_error(s, iq, StanzaError::ResourceConstraint, "media quota exhausted");
        }
        Err(Refusal::Internal) => {
            return send_error(s, iq, StanzaError::InternalServerError, "storage failure");
        }
    };
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    let slot = Element::new("slot", NS)
        .with_child(Element::stanza("put").with_attr("url", urls.put))
        .with_child(Element::stanza("get").with_attr("url", urls.get));
    r.push(slot);
    s.send(&r);
}

fn send_error(s: &mut Session, iq: &Element, cond: StanzaError, text: &str) {
    let mut e = error_reply(iq, cond, Some(text));
    e.set_attr("to", s.jid.to_string());
    if e.attr("from").is_none() {
        e.set_attr("from", s.domain().to_string());
    }
    s.send(&e);
}

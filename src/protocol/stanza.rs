//! Stanza and stream builders: headers, stream errors, stanza errors,
//! iq results. Pure functions over [`Element`].

use super::element::{Element, escape};
use super::ns;

/// RFC 6120 §8.3.3 defined conditions used by chatd, with their error type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StanzaError {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RecipientUnavailable,
    RemoteServerNotFound,
    ResourceConstraint,
    ServiceUnavailable,
    InternalServerError,
}

impl StanzaError {
    pub fn condition(self) -> &'static str {
        match self {
            StanzaError::BadRequest => "bad-request",
            StanzaError::Conflict => "conflict",
            StanzaError::FeatureNotImplemented => "feature-not-implemented",
            StanzaError::Forbidden => "forbidden",
            StanzaError::ItemNotFound => "item-not-found",
            StanzaError::JidMalformed => "jid-malformed",
            StanzaError::NotAcceptable => "not-acceptable",
            StanzaError::NotAllowed => "not-allowed",
            StanzaError::NotAuthorized => "not-authorized",
            StanzaError::PolicyViolation => "policy-violation",
            StanzaError::RecipientUnavailable => "recipient-unavailable",
            StanzaError::RemoteServerNotFound => "remote-server-not-found",
            StanzaError::ResourceConstraint => "resource-constraint",
            StanzaError::ServiceUnavailable => "service-unavailable",
            StanzaError::InternalServerError => "internal-server-error",
        }
    }

    /// The `type` attribute RFC 6120 pairs with the condition.
    pub fn error_type(self) -> &'static str {
        match self {
            StanzaError::BadRequest
            | StanzaError::JidMalformed
            | StanzaError::NotAcceptable
            | StanzaError::PolicyViolation => "modify",
            StanzaError::Forbidden | StanzaError::NotAuthorized => "auth",
            StanzaError::RecipientUnavailable | StanzaError::ResourceConstraint => "wait",
            _ => "cancel",
        }
    }
}

/// Turns `stanza` into the error reply RFC 6120 §8.3.1 describes: same
/// name and id, `to`/`from` swapped, original payload kept, plus an
/// `<error/>` child.
pub fn error_reply(stanza: &Element, err: StanzaError, text: Option<&str>) -> Element {
    let mut reply = Element::stanza(stanza.local_name());
    if let Some(id) = stanza.attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(from) = stanza.attr("from") {
        reply.set_attr("to", from);
    }
    if let Some(to) = stanza.attr("to") {
        reply.set_attr("from", to);
    }
    reply.set_attr("type", "error");
    // Keep the payload for messages/presence; iq errors keep the query.
    for c in stanza.elements() {
        if !c.is("error", ns::CLIENT) {
            reply.push(c.clone());
        }
    }
    let mut e = Element::stanza("error").with_attr("type", err.error_type());
    e.push(Element::new(err.condition(), ns::STANZA_ERRORS));
    if let Some(t) = text {
        e.push(Element::new("text", ns::STANZA_ERRORS).with_text(t));
    }
    reply.push(e);
    reply
}

/// An empty `type='result'` reply to an iq.
pub fn iq_result(iq: &Element) -> Element {
    let mut r = Element::stanza("iq").with_attr("type", "result");
    if let Some(id) = iq.attr("id") {
        r.set_attr("id", id);
    }
    if let Some(from) = iq.attr("from") {
        r.set_attr("to", from);
    }
    if let Some(to) = iq.attr("to") {
        r.set_attr("from", to);
    }
    r
}

/// Whether a stanza of type `error` — errors must never be answered with
/// errors (RFC 6120 §8.3.1), or two servers would ping-pong forever.
pub fn is_error(stanza: &Element) -> bool {
    stanza.attr("type") == Some("error")
}

/// The server's stream header in reply to a client's.
pub fn stream_header(domain: &str, id: &str, to: Option<&str>) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0' from='");
    s.push_str(&escape(domain));
    s.push_str("' id='");
    s.push_str(&escape(id));
    if let Some(to) = to {
        s.push_str("' to='");
        s.push_str(&escape(to));
    }
    s.push_str("' xml:lang='en'>");
    s
}

/// A stream error followed by the closing tag (RFC 6120 §4.9).
pub fn stream_error(condition: &str, text: Option<&str>) -> String {
    let mut s = String::from("<stream:error><");
    s.push_str(condition);
    s.push_str(" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>");
    if let Some(t) = text {
        s.push_str("<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>");
        s.push_str(&escape(t));
        s.push_str("</text>");
    }
    s.push_str("</stream:error></stream:stream>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::element::{Scope, parse_element};

    #[test]
    fn error_reply_swaps_addresses() {
        let m = parse_element(
            b"<message from='a@x/r' to='b@x' id='7' type='chat'><body>hi</body></message>",
            &Scope::client_stream(),
        )
        .unwrap();
        let e = error_reply(&m, StanzaError::ResourceConstraint, Some("queue full"));
        assert_eq!(e.attr("to"), Some("a@x/r"));
        assert_eq!(e.attr("from"), Some("b@x"));
        assert_eq!(e.attr("type"), Some("error"));
        let err = e.child("error", ns::CLIENT).unwrap();
        assert_eq!(err.attr("type"), Some("wait"));
        assert!(err.has_child("resource-constraint", ns::STANZA_ERRORS));
        assert!(e.has_child("body", ns::CLIENT));
    }

    #[test]
    fn stream_error_closes() {
        let s = stream_error("policy-violation", Some("too <big>"));
        assert!(s.contains("<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"));
        assert!(s.contains("too &lt;big&gt;"));
        assert!(s.ends_with("</stream:stream>"));
    }
}

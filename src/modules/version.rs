//! XEP-0092 Software Version.

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, IqTarget, Module};
use crate::protocol::stanza::iq_result;
use crate::protocol::{Element, ns};

pub const MODULE: Module = Module { name: "version", specs: &["XEP-0092"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(ns::VERSION);
    h.iq(IqTarget::Server, GET_SET, ns::VERSION, "query", |s, r| handle(s, r.iq));
}

pub fn handle(s: &mut Session, iq: &Element) {
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.push(
        Element::new("query", ns::VERSION)
            .with_child(Element::stanza("name").with_text("chatd"))
            .with_child(Element::stanza("version").with_text(env!("CARGO_PKG_VERSION"))),
    );
    s.send(&r);
}

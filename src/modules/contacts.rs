//! Contact discovery: which of these phone numbers use the service?
//!
//! ```xml
//! <iq type='get' to='DOMAIN' id='d1'>
//!   <query xmlns='urn:chatd:discovery:0'>
//!     <phone>+1 555 123 4567</phone>
//!     <phone>(555) 765-4321</phone>
//!   </query>
//! </iq>
//! ```
//! The answer lists only registered numbers, each with the number as the
//! client wrote it and the account's JID:
//! `<contact phone='+1 555 123 4567' jid='15551234567@DOMAIN'/>`.
//! Numbers are normalised with `phone.default_region`.
//!
//! Enumeration is throttled: at most `discovery.max_batch` numbers per
//! request and `discovery.max_per_hour` numbers per account per hour; over
//! the limit the request fails with `resource-constraint` (or
//! `policy-violation` for an oversized batch).
//!
//! Every other way of asking "is this number registered, is it online?"
//! after login (ping, disco or last activity to a bare JID, profile reads,
//! iqs to a full JID, errors to messages, subscription requests) draws on
//! the same allowance through [`charge`], unless the number is already on
//! the asker's roster: otherwise those answers would be an unthrottled
//! discovery service.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::session::Session;
use crate::hooks::{GET_SET, Hooks, Module};
use crate::protocol::stanza::{StanzaError, iq_result};
use crate::protocol::{Element, phone};
use crate::server::Server;

pub const NS: &str = "urn:chatd:discovery:0";

/// Numbers looked up per account in the current hour window.
#[derive(Default)]
pub struct Throttle {
    windows: Mutex<HashMap<String, (Instant, usize)>>,
}

impl Throttle {
    /// Takes `n` from `local`'s hourly allowance of `max`.
    pub fn take(&self, local: &str, n: usize, max: usize) -> bool {
        let Ok(mut w) = self.windows.lock() else { return false };
        let now = Instant::now();
        if w.len() > 100_000 {
            w.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(3600));
        }
        let e = w.entry(local.to_string()).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(3600) {
            *e = (now, 0);
        }
        if e.1 + n > max {
            return false;
        }
        e.1 += n;
        true
    }
}

/// Takes one lookup from `asker`'s hourly allowance for learning
/// something about `target`; free for the asker itself and its roster
/// contacts. False when the allowance is spent: the caller then answers
/// in a way that tells nothing about `target`.
pub fn charge(srv: &Server, asker: &str, target: &str) -> bool {
    if asker == target || super::privacy::is_contact(srv, asker, target) {
        return true;
    }
    srv.discovery.take(asker, 1, srv.cfg.discovery.max_per_hour)
}

pub const MODULE: Module = Module { name: "discovery", specs: &["urn:chatd:discovery:0"], register };

fn register(h: &mut Hooks) {
    h.disco_feature(NS);
    h.iq_server(GET_SET, NS, "query", |s, r| handle_iq(s, r.iq, r.payload));
}

pub fn handle_iq(s: &mut Session, iq: &Element, q: &Element) {
    let srv = s.srv.clone();
    if iq.attr("type") != Some("get") {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    }
    let phones: Vec<String> = q.elements().filter(|e| e.local_name() == "phone").map(|e| e.text()).collect();
    let lim = &srv.cfg.discovery;
    if phones.len() > lim.max_batch {
        s.reply_error(iq, StanzaError::PolicyViolation);
        return;
    }
    if !srv.discovery.take(&s.local, phones.len(), lim.max_per_hour) {
        s.reply_error(iq, StanzaError::ResourceConstraint);
        return;
    }
    let region = srv.cfg.region();
    let mut out = Element::new("query", NS);
    for p in phones {
        let Ok(local) = phone::normalize(&p, region) else { continue };
        if local != s.local && srv.router.account_exists(&local) {
            out.push(
                Element::stanza("contact")
                    .with_attr("phone", p.trim())
                    .with_attr("jid", format!("{local}@{}", srv.domain())),
            );
        }
    }
    let mut r = iq_result(iq);
    r.set_attr("to", s.jid.to_string());
    r.push(out);
    s.send(&r);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_limits_per_hour() {
        let t = Throttle::default();
        assert!(t.take("a", 60, 100));
        assert!(!t.take("a", 41, 100));
        assert!(t.take("a", 40, 100));
        assert!(t.take("b", 100, 100));
    }
}

//! XEP-0077 In-Band Registration, off unless `registration.in_band` is
//! set: before authentication a client may create an account whose
//! username is a phone number; after authentication it may change its
//! password or remove its account, which erases everything stored for it.
//! Registrations are limited per client IP per hour.

use std::net::IpAddr;

use crate::accounts::service::Request;
use crate::session::Session;
use crate::hooks::{FeaturePhase, GET_SET, Hooks, Module};
use crate::protocol::element::escape;
use crate::protocol::stanza::{StanzaError, error_reply, iq_result};
use crate::protocol::{Element, phone};
use crate::router::CloseReason;
use crate::server::Server;

pub const NS: &str = "jabber:iq:register";
pub const FEATURE: &str = "http://jabber.org/features/iq-register";

pub const MODULE: Module = Module { name: "register", specs: &["XEP-0077"], register };

fn register(h: &mut Hooks) {
    h.stream_feature(FeaturePhase::BeforeAuth, |srv| {
        srv.cfg.registration.in_band.then(|| Element::new("register", FEATURE))
    });
    h.iq_server(GET_SET, NS, "query", |s, r| post_auth(s, r.iq, r.payload));
}

/// Registrations per client IP (IPv6: per /64) in the current hour.
pub use crate::api::limit::IpLimit;

fn err(iq: &Element, e: StanzaError, text: &str) -> String {
    error_reply(iq, e, Some(text)).to_xml()
}

/// Handles a registration iq before authentication; returns the reply.
pub async fn pre_auth(srv: &Server, iq: &Element, q: &Element, ip: IpAddr) -> String {
    match iq.attr("type") {
        Some("get") => {
            let mut r = iq_result(iq);
            r.push(
                Element::new("query", NS)
                    .with_child(
                        Element::stanza("instructions").with_text("Username: your phone number in international form."),
                    )
                    .with_child(Element::stanza("username"))
                    .with_child(Element::stanza("password")),
            );
            r.to_xml()
        }
        Some("set") => {
            let username = q.child("username", NS).map(|e| e.text()).unwrap_or_default();
            let password = q.child("password", NS).map(|e| e.text()).unwrap_or_default();
            let Ok(local) = phone::normalize(&username, srv.cfg.region()) else {
                return err(iq, StanzaError::NotAcceptable, "username must be a phone number");
            };
            if password.is_empty() || password.len() > 1024 {
                return err(iq, StanzaError::NotAcceptable, "password must be 1 to 1024 bytes");
            }
            if srv.router.account_exists(&local) {
                return err(iq, StanzaError::Conflict, "account exists");
            }
            if !srv.ibr_limit.take(ip, srv.cfg.registration.in_band_per_ip_per_hour) {
                return err(iq, StanzaError::ResourceConstraint, "too many registrations");
            }
            let iters = srv.cfg.auth.scram_iterations;
            let rec = tokio::task::spawn_blocking(move || {
                crate::accounts::make_record(&password, iters, crate::accounts::now_ms())
            })
            .await;
            let Ok(rec) = rec else {
                return err(iq, StanzaError::InternalServerError, "");
            };
            let resp = crate::accounts::service::apply(
                &srv.stores,
                None,
                Request::Put { users: vec![(local.clone(), rec)], replace: false, must_exist: false },
            );
            if resp.ok {
                tracing::info!(account = %local, %ip, "registered in-band");
                iq_result(iq).to_xml()
            } else {
                err(iq, StanzaError::Conflict, &escape(resp.error.as_deref().unwrap_or("")))
            }
        }
        _ => err(iq, StanzaError::BadRequest, ""),
    }
}

/// Handles a registration iq from an authenticated session: password
/// change, or `<remove/>`.
pub fn post_auth(s: &mut Session, iq: &Element, q: &Element) {
    if !s.srv.cfg.registration.in_band || iq.attr("type") != Some("set") {
        s.reply_error(iq, StanzaError::ServiceUnavailable);
        return;
    }
    let srv = s.srv.clone();
    if q.has_child("remove", NS) {
        let mut r = iq_result(iq);
        r.set_attr("to", s.jid.to_string());
        r.remove_attr("from");
        s.send(&r);
        let resp = crate::accounts::service::apply(&srv.stores, Some(&srv), Request::Delete { local: s.local.clone() });
        if !resp.ok {
            tracing::error!(account = %s.local, error = ?resp.error, "in-band removal failed");
        }
        s.close("not-authorized", Some("account removed".into()));
        return;
    }
    let Some(pw) = q.child("password", NS).map(|e| e.text()).filter(|p| !p.is_empty() && p.len() <= 1024) else {
        s.reply_error(iq, StanzaError::BadRequest);
        return;
    };
    let mut rec = crate::accounts::make_record(&pw, srv.cfg.auth.scram_iterations, crate::accounts::now_ms());
    rec.key_generation = 1;
    let resp = crate::accounts::service::apply(
        &srv.stores,
        None,
        Request::Put { users: vec![(s.local.clone(), rec)], replace: true, must_exist: true },
    );
    if resp.ok {
        s.max_ticket = s.max_ticket.max(resp.ticket);
        // Every other session (parked ones included) authenticated with
        // the old password: it ends. This one proved it just now.
        srv.router.close_sessions(&s.local, CloseReason::AccountGone, Some(s.id));
        let mut r = iq_result(iq);
        r.set_attr("to", s.jid.to_string());
        r.remove_attr("from");
        s.send(&r);
    } else {
        s.reply_error(iq, StanzaError::InternalServerError);
    }
}

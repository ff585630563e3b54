//! Sign-up by SMS code, the WhatsApp way.
//!
//! `POST /v1/accounts/code` with `{"phone": "+1 555 123 4567", "method": "sms"}`
//! sends a 6-digit code (valid `sms.code_ttl_secs`, burnt after
//! `sms.max_attempts` wrong tries) and answers
//! `{"status":"sent","retry_after":60}`.
//!
//! `POST /v1/accounts/register` with `{"phone": "...", "code": "123456"}`
//! answers `{"jid":"15551234567@DOMAIN","password":"<device key>"}`. The
//! device key is random; registering the number again replaces it and ends
//! every session that used the old one — the number moved to a new phone.
//!
//! Errors are JSON `{"error": CODE, "message": TEXT}` with status 400
//! (`invalid_phone`, `bad_request`), 401 (`wrong_code`), 410 (`expired`:
//! no live code, or burnt) and 429 (`rate_limited`, with `Retry-After`).
//! Requests are limited per number and per client IP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use rand::Rng;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::sms::{Gateway, SmsConfig};
use crate::admin::{self, Request};
use crate::protocol::phone;
use crate::server::Server;

struct Pending {
    code: String,
    issued: Instant,
    attempts: u32,
}

/// Requests in the current hour window, and when the last one was.
#[derive(Default)]
struct Window {
    start: Option<Instant>,
    count: usize,
    last: Option<Instant>,
}

impl Window {
    fn roll(&mut self, now: Instant) {
        if self.start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(3600)) {
            self.start = Some(now);
            self.count = 0;
        }
    }
    fn retry_after(&self, now: Instant) -> u64 {
        self.start.map(|s| 3600u64.saturating_sub(now.duration_since(s).as_secs())).unwrap_or(0).max(1)
    }
}

pub struct AccountsApi {
    srv: Arc<Server>,
    cfg: SmsConfig,
    gateway: Arc<dyn Gateway>,
    pending: Mutex<HashMap<String, Pending>>,
    by_phone: Mutex<HashMap<String, Window>>,
    by_ip: Mutex<HashMap<IpAddr, Window>>,
}

/// The account routes.
///
/// # Errors
/// When the SMS gateway configuration is invalid.
pub fn routes(srv: Arc<Server>) -> anyhow::Result<Router> {
    let cfg = srv.cfg.sms.clone();
    let gateway = super::sms::gateway(&cfg, &srv.cfg.data_dir)?;
    let api = Arc::new(AccountsApi {
        srv,
        cfg,
        gateway,
        pending: Mutex::default(),
        by_phone: Mutex::default(),
        by_ip: Mutex::default(),
    });
    Ok(Router::new()
        .route("/v1/accounts/code", post(request_code))
        .route("/v1/accounts/register", post(register))
        .with_state(api))
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn limited(retry_after: u64) -> Response {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; try later");
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn json(v: serde_json::Value) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

#[derive(Deserialize)]
struct CodeRequest {
    phone: String,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Deserialize)]
struct RegisterRequest {
    phone: String,
    code: String,
}

async fn request_code(
    State(api): State<Arc<AccountsApi>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<CodeRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected {\"phone\": ..., \"method\": \"sms\"|\"voice\"}",
        );
    };
    let method = req.method.as_deref().unwrap_or("sms");
    if method != "sms" && method != "voice" {
        return error(StatusCode::BAD_REQUEST, "bad_request", "method must be sms or voice");
    }
    let Ok(local) = phone::normalize(&req.phone, api.srv.cfg.region()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_phone", "not a valid phone number");
    };
    let now = Instant::now();
    let ip = peer.ip();
    {
        let Ok(mut by_ip) = api.by_ip.lock() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "");
        };
        if by_ip.len() > 100_000 {
            by_ip.retain(|_, w| w.start.is_some_and(|s| now.duration_since(s) < Duration::from_secs(3600)));
        }
        let w = by_ip.entry(ip).or_default();
        w.roll(now);
        if w.count >= api.cfg.per_ip_per_hour {
            return limited(w.retry_after(now));
        }
        w.count += 1;
    }
    {
        let Ok(mut by_phone) = api.by_phone.lock() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "");
        };
        if by_phone.len() > 100_000 {
            by_phone.retain(|_, w| w.start.is_some_and(|s| now.duration_since(s) < Duration::from_secs(3600)));
        }
        let w = by_phone.entry(local.clone()).or_default();
        w.roll(now);
        if let Some(last) = w.last {
            let since = now.duration_since(last).as_secs();
            if since < api.cfg.resend_secs {
                return limited(api.cfg.resend_secs - since);
            }
        }
        if w.count >= api.cfg.per_phone_per_hour {
            return limited(w.retry_after(now));
        }
        w.count += 1;
        w.last = Some(now);
    }
    let code = format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32));
    if let Ok(mut p) = api.pending.lock() {
        p.retain(|_, v| now.duration_since(v.issued) < Duration::from_secs(api.cfg.code_ttl_secs));
        p.insert(local.clone(), Pending { code: code.clone(), issued: now, attempts: 0 });
    }
    api.gateway.send(&local, &code, method);
    json(serde_json::json!({ "status": "sent", "retry_after": api.cfg.resend_secs }))
}

async fn register(State(api): State<Arc<AccountsApi>>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<RegisterRequest>(&body) else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "expected {\"phone\": ..., \"code\": ...}");
    };
    let Ok(local) = phone::normalize(&req.phone, api.srv.cfg.region()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_phone", "not a valid phone number");
    };
    let now = Instant::now();
    {
        let Ok(mut p) = api.pending.lock() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "");
        };
        let Some(entry) = p.get_mut(&local) else {
            return error(StatusCode::GONE, "expired", "no valid code for this number; request a new one");
        };
        if now.duration_since(entry.issued) >= Duration::from_secs(api.cfg.code_ttl_secs) {
            p.remove(&local);
            return error(StatusCode::GONE, "expired", "the code expired; request a new one");
        }
        let ok = req.code.trim().len() == 6 && bool::from(req.code.trim().as_bytes().ct_eq(entry.code.as_bytes()));
        if !ok {
            entry.attempts += 1;
            if entry.attempts >= api.cfg.max_attempts {
                p.remove(&local);
                return error(StatusCode::GONE, "expired", "too many wrong codes; request a new one");
            }
            return error(StatusCode::UNAUTHORIZED, "wrong_code", "wrong code");
        }
        p.remove(&local);
    }
    let mut key = [0u8; 24];
    rand::rngs::OsRng.fill(&mut key);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key);
    let iters = api.srv.cfg.auth.scram_iterations;
    let pw = password.clone();
    let Ok(mut rec) =
        tokio::task::spawn_blocking(move || crate::accounts::make_record(&pw, iters, crate::accounts::now_ms())).await
    else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "");
    };
    let existed = matches!(api.srv.stores.users.get_user(&local), Ok(Some(_)));
    if existed {
        rec.key_generation = 1;
    }
    let srv = api.srv.clone();
    let l2 = local.clone();
    // A number registered again is a number that changed hands: nothing
    // of the previous owner may reach the new one.
    let req = if existed {
        Request::Reassign { local: l2, user: rec }
    } else {
        Request::Put { users: vec![(l2, rec)], replace: true, must_exist: false }
    };
    let resp = tokio::task::spawn_blocking(move || admin::execute(&srv.stores, Some(&srv), req)).await;
    match resp {
        Ok(r) if r.ok => {
            // The key is handed out only once it (and the erasure of a
            // previous owner) survives a crash.
            let mut committed = api.srv.stores.durability.committed();
            if crate::storage::wait_durable(&mut committed, r.ticket).await.is_err() {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not store the account");
            }
            tracing::info!(account = %local, new_device = existed, "registered by SMS code");
            json(serde_json::json!({ "jid": format!("{local}@{}", api.srv.domain()), "password": password }))
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not store the account"),
    }
}

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
//! Requests are limited per number, per client IP (IPv6: per /64; the
//! client is the TCP peer unless that is one of `api.trusted_proxies`,
//! see [`super::limit::client_ip`]) and by a global SMS budget per hour.
//! The limit maps cost O(1) amortised per request ([`super::limit`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use rand::Rng;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::limit::{Cidr, Windows, client_ip, client_key};
use super::sms::{Gateway, SmsConfig};
use crate::accounts::service::Request;
use crate::protocol::phone;
use crate::server::Server;

struct Pending {
    code: String,
    issued: Instant,
    attempts: u32,
}

pub struct AccountsApi {
    srv: Arc<Server>,
    cfg: SmsConfig,
    gateway: Arc<dyn Gateway>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Size of `pending` at which expired codes are next swept: twice
    /// what survived the last sweep, so sweeping is O(1) amortised.
    sweep_at: std::sync::atomic::AtomicUsize,
    by_phone: Windows<String>,
    by_ip: Windows<IpAddr>,
    /// Every code sent, for the global budget (one key).
    global: Windows<()>,
    trusted_proxies: Vec<Cidr>,
    born: Instant,
    /// The minute (since `born`, plus one) of the last budget warning.
    budget_warned: std::sync::atomic::AtomicU64,
}

/// The account routes.
///
/// # Errors
/// When the SMS gateway configuration is invalid.
pub fn routes(srv: Arc<Server>) -> anyhow::Result<Router> {
    let cfg = srv.cfg.sms.clone();
    let gateway = super::sms::gateway(&cfg, &srv.cfg.data_dir)?;
    let trusted_proxies = srv
        .cfg
        .api
        .trusted_proxies
        .iter()
        .map(|s| Cidr::parse(s).map_err(|e| anyhow::anyhow!("api.trusted_proxies: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api = Arc::new(AccountsApi {
        srv,
        cfg,
        gateway,
        pending: Mutex::default(),
        sweep_at: std::sync::atomic::AtomicUsize::new(1024),
        by_phone: Windows::hourly(),
        by_ip: Windows::hourly(),
        global: Windows::hourly(),
        trusted_proxies,
        born: Instant::now(),
        budget_warned: Default::default(),
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
    headers: HeaderMap,
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
    let xff = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let ip = client_key(client_ip(peer.ip(), xff, &api.trusted_proxies));
    if let Err(r) = api.by_ip.take(&ip, api.cfg.per_ip_per_hour, now) {
        return limited(r.retry_after);
    }
    let (resend, per_phone) = (api.cfg.resend_secs, api.cfg.per_phone_per_hour);
    let r = api.by_phone.take_with(&local, now, |w, left| {
        if let Some(last) = w.last {
            let since = now.saturating_duration_since(last).as_secs();
            if since < resend {
                return Err(resend - since);
            }
        }
        if w.count >= per_phone { Err(left.as_secs()) } else { Ok(()) }
    });
    if let Err(r) = r {
        return limited(r.retry_after);
    }
    // Last, so requests refused above do not spend the budget.
    if let Err(r) = api.global.take(&(), api.cfg.global_per_hour, now) {
        // One line per minute at most: the refusals are driven by strangers.
        let min = now.saturating_duration_since(api.born).as_secs() / 60 + 1;
        if api.budget_warned.swap(min, std::sync::atomic::Ordering::Relaxed) != min {
            tracing::warn!(budget = api.cfg.global_per_hour, "global SMS budget for this hour exhausted");
        }
        return limited(r.retry_after);
    }
    let code = format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32));
    if let Ok(mut p) = api.pending.lock() {
        use std::sync::atomic::Ordering::Relaxed;
        if p.len() >= api.sweep_at.load(Relaxed) {
            p.retain(|_, v| now.duration_since(v.issued) < Duration::from_secs(api.cfg.code_ttl_secs));
            api.sweep_at.store((p.len() * 2).max(1024), Relaxed);
        }
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
    let resp = tokio::task::spawn_blocking(move || crate::accounts::service::apply(&srv.stores, Some(&srv), req)).await;
    match resp {
        Ok(r) if r.ok => {
            // The key is handed out only once it (and the erasure of a
            // previous owner) survives a crash.
            if api.srv.durable.until(r.ticket).await.is_err() {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not store the account");
            }
            tracing::info!(account = %local, new_device = existed, "registered by SMS code");
            json(serde_json::json!({ "jid": format!("{local}@{}", api.srv.domain()), "password": password }))
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not store the account"),
    }
}

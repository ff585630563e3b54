//! HTTP side of the media service: `PUT`, `GET`/`HEAD` and `DELETE` on
//! `/media/{id}/{name}`.
//!
//! Every refusal is a plain-text error with a status that says what went
//! wrong (403 signature or expiry, 411/400/413 sizes, 415 type mismatch,
//! 408 too slow, 409 slot already used) and leaves nothing on disk.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::body::{FileBody, Part, RangeRequest, parse_range};
use super::slot::{self, Slot, VerifyError};
use super::sniff::{self, HEAD_BYTES};
use super::store::CommitError;
use super::{Media, MediaConfig};

/// The media routes, for [`crate::http::merge`].
pub fn routes(media: Arc<Media>) -> Router {
    Router::new().route("/media/{id}/{name}", get(download).put(upload).delete(remove)).with_state(media)
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut m = msg.into();
    m.push('\n');
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], m).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    err(StatusCode::INTERNAL_SERVER_ERROR, internal_msg(e))
}

fn internal_msg(e: impl std::fmt::Display) -> String {
    tracing::error!(error = %e, "media request failed");
    "internal error".into()
}

/// A refusal: status and message.
struct Refuse(StatusCode, String);

impl IntoResponse for Refuse {
    fn into_response(self) -> Response {
        err(self.0, self.1)
    }
}

fn verify(m: &Media, id: &str, name: &str, uri: &Uri, allow_expired: bool) -> Result<Slot, Refuse> {
    let now = super::now_ms() / 1000;
    let q = uri.query().unwrap_or("");
    let forbid = |m: &str| Refuse(StatusCode::FORBIDDEN, m.to_string());
    match slot::verify(&m.key, id, name, q, now) {
        Ok(s) => Ok(s),
        Err(VerifyError::Expired) if allow_expired => {
            slot::verify(&m.key, id, name, q, 0).map_err(|_| forbid("invalid signature"))
        }
        Err(VerifyError::Expired) => Err(forbid("this upload slot has expired; request a new one")),
        Err(VerifyError::BadSignature) => Err(forbid("invalid signature")),
        Err(VerifyError::Malformed(w)) => Err(forbid(&format!("not a valid upload URL: {w}"))),
    }
}

/// Removes a temporary file when dropped (error, cancellation, or after
/// the commit moved or deduplicated it).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads an upload body with an idle timeout and a minimum average rate.
struct Reader {
    start: Instant,
    idle: Duration,
    grace: Duration,
    min_rate: u64,
    received: u64,
    limit: u64,
}

impl Reader {
    fn new(cfg: &MediaConfig, limit: u64) -> Reader {
        Reader {
            start: Instant::now(),
            idle: Duration::from_secs(cfg.idle_timeout_secs),
            grace: Duration::from_secs(cfg.rate_grace_secs),
            min_rate: cfg.min_rate_bytes,
            received: 0,
            limit,
        }
    }

    /// The next data chunk, `None` at the end of the body.
    async fn next(&mut self, body: &mut Body) -> Result<Option<Bytes>, Refuse> {
        loop {
            let mut wait = self.idle;
            let mut by_rate = false;
            if self.min_rate > 0 {
                // The moment the average rate would fall below the minimum
                // if nothing more arrives.
                let owed =
                    Duration::try_from_secs_f64(self.received as f64 / self.min_rate as f64).unwrap_or(Duration::MAX);
                let due = self.start.checked_add(self.grace).and_then(|t| t.checked_add(owed));
                let left = due.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
                if left < wait {
                    wait = left;
                    by_rate = true;
                }
            }
            let frame = match tokio::time::timeout(wait, body.frame()).await {
                Err(_) if by_rate => {
                    return Err(Refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("upload too slow: less than {} bytes per second", self.min_rate),
                    ));
                }
                Err(_) => {
                    return Err(Refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("upload stalled: no data for {} seconds", self.idle.as_secs()),
                    ));
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(_))) => {
                    return Err(Refuse(StatusCode::BAD_REQUEST, "upload interrupted".into()));
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            self.received += data.len() as u64;
            if self.received > self.limit {
                return Err(Refuse(StatusCode::PAYLOAD_TOO_LARGE, "body longer than the slot size".into()));
            }
            return Ok(Some(data));
        }
    }
}

/// Checks made before any of the body is read.
fn precheck(m: &Media, id: &str, name: &str, uri: &Uri, headers: &HeaderMap) -> Result<Slot, Refuse> {
    let slot = verify(m, id, name, uri, false)?;
    let refuse = |st: StatusCode, msg: String| Err(Refuse(st, msg));
    let Some(cl) = headers.get(header::CONTENT_LENGTH) else {
        return refuse(StatusCode::LENGTH_REQUIRED, "Content-Length is required".into());
    };
    let Some(cl) = cl.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid Content-Length".into());
    };
    if cl > slot.size || cl > m.cfg.max_file_bytes {
        let msg = format!("Content-Length {cl} exceeds the slot's size of {} bytes", slot.size);
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, msg);
    }
    if cl < slot.size {
        let msg = format!("Content-Length {cl} does not match the slot's size of {} bytes", slot.size);
        return refuse(StatusCode::BAD_REQUEST, msg);
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let declared = ct.to_str().ok().and_then(sniff::essence);
        if declared.as_deref() != Some(slot.content_type.as_str()) {
            let msg = format!("Content-Type does not match the slot's {}", slot.content_type);
            return refuse(StatusCode::BAD_REQUEST, msg);
        }
    }
    // Once for life: a slot uploaded and then deleted stays used.
    match m.slot_taken(&slot.id) {
        Ok(true) => refuse(StatusCode::CONFLICT, "this upload slot has already been used".into()),
        Ok(false) => Ok(slot),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, internal_msg(e)),
    }
}

/// The response for a commit or reservation refusal.
fn commit_refusal(e: CommitError) -> Refuse {
    match e {
        CommitError::AlreadyUsed => Refuse(StatusCode::CONFLICT, "this upload slot has already been used".into()),
        CommitError::Busy => Refuse(StatusCode::CONFLICT, "this upload slot is being uploaded".into()),
        CommitError::Quota => Refuse(StatusCode::PAYLOAD_TOO_LARGE, "media quota exceeded for this account".into()),
        CommitError::TempFull => {
            Refuse(StatusCode::SERVICE_UNAVAILABLE, "too many uploads in progress; retry shortly".into())
        }
        e => Refuse(StatusCode::INTERNAL_SERVER_ERROR, internal_msg(e)),
    }
}

/// Reads and discards a small unread body (up to 1 MiB, for 2 seconds)
/// before an early refusal, so that an HTTP/1.1 client that did not ask
/// for `100-continue` receives the response instead of a reset.
async fn refuse_early(r: Refuse, headers: &HeaderMap, mut body: Body) -> Response {
    let expects = headers.contains_key(header::EXPECT);
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n <= 1 << 20);
    if small && !expects {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = body.frame().await {} }).await;
    }
    r.into_response()
}

async fn upload(
    State(m): State<Arc<Media>>,
    Path((id, name)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let slot = match precheck(&m, &id, &name, &uri, &headers) {
        Ok(s) => s,
        Err(r) => return refuse_early(r, &headers, body).await,
    };
    // Held until the commit is done: the bytes being received count
    // against the quota and the temporary-space cap meanwhile.
    let reservation = match m.reserve(&slot) {
        Ok(r) => r,
        Err(e) => {
            let temp_full = matches!(e, CommitError::TempFull);
            let mut r = refuse_early(commit_refusal(e), &headers, body).await;
            if temp_full {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            return r;
        }
    };
    let mut body = body;
    let mut reader = Reader::new(&m.cfg, slot.size);
    // Sniff the first bytes before anything touches the disk.
    let want = (slot.size as usize).min(HEAD_BYTES);
    let mut head = Vec::with_capacity(want);
    let mut rest: Option<Bytes> = None;
    while head.len() < want {
        match reader.next(&mut body).await {
            Ok(Some(chunk)) => {
                let take = (want - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                if take < chunk.len() {
                    rest = Some(chunk.slice(take..));
                }
            }
            Ok(None) => break,
            Err(r) => return r.into_response(),
        }
    }
    if let Err(why) = sniff::check(&slot.content_type, &head) {
        return err(StatusCode::UNSUPPORTED_MEDIA_TYPE, why);
    }
    let tier = sniff::tier_for(&slot.content_type);
    let temp = TempFile(m.temp_path(tier));
    let file = match tokio::fs::File::create(&temp.0).await {
        Ok(f) => f,
        Err(e) => return internal(e),
    };
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut hasher = Sha256::new();
    let mut first = vec![Bytes::from(head)];
    first.extend(rest);
    for c in first {
        hasher.update(&c);
        if let Err(e) = out.write_all(&c).await {
            return internal(e);
        }
    }
    loop {
        match reader.next(&mut body).await {
            Ok(Some(c)) => {
                hasher.update(&c);
                if let Err(e) = out.write_all(&c).await {
                    return internal(e);
                }
            }
            Ok(None) => break,
            Err(r) => return r.into_response(),
        }
    }
    if reader.received != slot.size {
        return err(StatusCode::BAD_REQUEST, "body shorter than the slot size");
    }
    if let Err(e) = out.flush().await {
        return internal(e);
    }
    let file = out.into_inner();
    if let Err(e) = file.sync_all().await {
        return internal(e);
    }
    drop(file);
    let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let m2 = m.clone();
    let res = tokio::task::spawn_blocking(move || {
        let r = m2.commit(&slot, tier, &sha, &temp.0);
        drop(temp);
        drop(reservation);
        r.map(|c| (c, sha))
    })
    .await;
    match res {
        Ok(Ok((c, sha))) => {
            tracing::debug!(id, tier = c.tier.as_str(), dedup = c.deduplicated, sha256 = %sha, "media stored");
            let mut r = err(StatusCode::CREATED, "created");
            if let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\"")) {
                r.headers_mut().insert(header::ETAG, v);
            }
            r
        }
        Ok(Err(e)) => commit_refusal(e).into_response(),
        Err(e) => internal(e),
    }
}

/// `DELETE` with the slot's signed PUT URL: the uploader withdraws the
/// file (its content goes once nothing else references it).
async fn remove(State(m): State<Arc<Media>>, Path((id, name)): Path<(String, String)>, uri: Uri) -> Response {
    let slot = match verify(&m, &id, &name, &uri, true) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    match m.index.get_ref(&slot.id) {
        Ok(Some(r)) if r.account == slot.account => {}
        Ok(_) => return err(StatusCode::NOT_FOUND, "not found"),
        Err(e) => return internal(e),
    }
    let m2 = m.clone();
    match tokio::task::spawn_blocking(move || m2.release(&[slot.id])).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// Files up to this size are read in one piece.
const SMALL_FILE: u64 = 256 * 1024;

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',').map(str::trim).any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

async fn download(
    State(m): State<Arc<Media>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !slot::valid_id(&id) {
        return err(StatusCode::NOT_FOUND, "not found");
    }
    let (r, path) = match m.locate(&id) {
        Ok(Some(x)) if x.0.filename == name => x,
        Ok(_) => return err(StatusCode::NOT_FOUND, "not found"),
        Err(e) => return internal(e),
    };
    let etag = format!("\"{}\"", r.sha256);
    let mut h = HeaderMap::new();
    let ct = HeaderValue::from_str(&r.content_type).unwrap_or(HeaderValue::from_static(sniff::OCTET_STREAM));
    let disposition = if r.content_type.starts_with("image/")
        || r.content_type.starts_with("audio/")
        || r.content_type.starts_with("video/")
    {
        "inline"
    } else {
        "attachment"
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    if let Ok(v) = HeaderValue::from_str(&format!("{disposition}; filename*=UTF-8''{}", slot::escape(&r.filename))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(inm) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok())
        && etag_matches(inm, &etag)
    {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    let len = r.size;
    let if_range_ok = headers.get(header::IF_RANGE).is_none_or(|v| v.to_str().is_ok_and(|v| v.trim() == etag));
    let ranges = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(spec) if if_range_ok => parse_range(spec, len),
        _ => RangeRequest::Full,
    };
    // One trip to the blocking pool: open, and read a small file whole.
    let whole = ranges == RangeRequest::Full && len <= SMALL_FILE;
    let p = path.clone();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, Option<Bytes>)> {
        let f = std::fs::File::open(&p)?;
        if !whole {
            return Ok((f, None));
        }
        let mut v = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut (&f).take(len), &mut v)?;
        Ok((f, Some(Bytes::from(v))))
    })
    .await;
    let (file, data) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), "indexed media file is missing");
            return err(StatusCode::NOT_FOUND, "not found");
        }
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    match ranges {
        RangeRequest::Full => {
            h.insert(header::CONTENT_TYPE, ct);
            set(&mut h, header::CONTENT_LENGTH, len.to_string());
            let body = match data {
                Some(d) if d.len() as u64 == len => Body::from(d),
                _ => Body::new(FileBody::new(file, vec![Part::File { offset: 0, len }])),
            };
            (StatusCode::OK, h, body).into_response()
        }
        RangeRequest::Unsatisfiable => {
            set(&mut h, header::CONTENT_RANGE, format!("bytes */{len}"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            (StatusCode::RANGE_NOT_SATISFIABLE, h, "requested range not satisfiable\n").into_response()
        }
        RangeRequest::Partial(rs) if rs.len() == 1 => {
            let (s, e) = rs[0];
            h.insert(header::CONTENT_TYPE, ct);
            set(&mut h, header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}"));
            set(&mut h, header::CONTENT_LENGTH, (e - s + 1).to_string());
            let parts = vec![Part::File { offset: s, len: e - s + 1 }];
            (StatusCode::PARTIAL_CONTENT, h, Body::new(FileBody::new(file, parts))).into_response()
        }
        RangeRequest::Partial(rs) => {
            let boundary = slot::new_id();
            let ctype = ct.to_str().unwrap_or(sniff::OCTET_STREAM).to_string();
            let mut parts = Vec::with_capacity(rs.len() * 2 + 1);
            let mut total = 0u64;
            for (s, e) in rs {
                let head =
                    format!("\r\n--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {s}-{e}/{len}\r\n\r\n");
                total += head.len() as u64 + (e - s + 1);
                parts.push(Part::Bytes(Bytes::from(head)));
                parts.push(Part::File { offset: s, len: e - s + 1 });
            }
            let tail = format!("\r\n--{boundary}--\r\n");
            total += tail.len() as u64;
            parts.push(Part::Bytes(Bytes::from(tail)));
            set(&mut h, header::CONTENT_TYPE, format!("multipart/byteranges; boundary={boundary}"));
            set(&mut h, header::CONTENT_LENGTH, total.to_string());
            (StatusCode::PARTIAL_CONTENT, h, Body::new(FileBody::new(file, parts))).into_response()
        }
    }
}

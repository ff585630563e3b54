//! Upload slots: signed, expiring PUT URLs.
//!
//! A slot is `PUT {base}/media/{id}/{name}?exp=…&size=…&type=…&acct=…&sig=…`
//! and `GET {base}/media/{id}/{name}`. `id` is 128 random bits, so GET URLs
//! cannot be guessed. `sig` is HMAC-SHA256 under the slot key over every
//! field (id, requesting account, file name, size, content type, expiry),
//! so none can be changed: the upload is charged to the account that asked
//! for it, must have exactly the announced size and type, and must start
//! before the expiry.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

use super::{Media, MediaConfig, sniff};

/// Characters escaped in URL path segments and query values.
const ESCAPE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Longest file name kept in a slot, in bytes.
pub const MAX_NAME: usize = 200;

/// Everything a signature covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub id: String,
    pub account: String,
    pub filename: String,
    pub size: u64,
    pub content_type: String,
    /// Unix seconds after which the PUT URL is refused.
    pub expires: u64,
}

/// Why a PUT URL is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyError {
    Malformed(&'static str),
    BadSignature,
    Expired,
}

fn mac(key: &[u8], s: &Slot) -> Option<Hmac<Sha256>> {
    // HMAC accepts keys of any length; `None` is not expected.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    m.update(b"chatd-media-put-v1");
    for f in [
        s.id.as_bytes(),
        s.account.as_bytes(),
        s.filename.as_bytes(),
        &s.size.to_be_bytes(),
        s.content_type.as_bytes(),
        &s.expires.to_be_bytes(),
    ] {
        m.update(&(f.len() as u32).to_be_bytes());
        m.update(f);
    }
    Some(m)
}

/// Percent-encodes one path segment or query value.
pub fn escape(s: &str) -> String {
    utf8_percent_encode(s, ESCAPE).to_string()
}

/// Whether `id` has the shape of a slot id (22 base64url characters).
pub fn valid_id(id: &str) -> bool {
    id.len() == 22 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh random slot id.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// The query string of a signed PUT URL.
pub fn sign(key: &[u8], s: &Slot) -> String {
    let sig = mac(key, s).map(|m| URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())).unwrap_or_default();
    format!("exp={}&size={}&type={}&acct={}&sig={sig}", s.expires, s.size, escape(&s.content_type), escape(&s.account))
}

/// Checks a PUT request's slot: `id` and `filename` from the (decoded)
/// path, `query` as received.
///
/// # Errors
/// A missing or malformed field, a wrong signature, or an expired slot.
pub fn verify(key: &[u8], id: &str, filename: &str, query: &str, now_secs: u64) -> Result<Slot, VerifyError> {
    let (mut exp, mut size, mut ctype, mut acct, mut sig) = (None, None, None, None, None);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v =
            percent_decode_str(v).decode_utf8().map_err(|_| VerifyError::Malformed("query is not UTF-8"))?.into_owned();
        let slot = match k {
            "exp" => &mut exp,
            "size" => &mut size,
            "type" => &mut ctype,
            "acct" => &mut acct,
            "sig" => &mut sig,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(VerifyError::Malformed("repeated query parameter"));
        }
    }
    let (Some(exp), Some(size), Some(ctype), Some(acct), Some(sig)) = (exp, size, ctype, acct, sig) else {
        return Err(VerifyError::Malformed("the URL is not a signed upload slot"));
    };
    if !valid_id(id) {
        return Err(VerifyError::Malformed("bad slot id"));
    }
    let s = Slot {
        id: id.to_string(),
        account: acct,
        filename: filename.to_string(),
        size: size.parse().map_err(|_| VerifyError::Malformed("bad size"))?,
        content_type: ctype,
        expires: exp.parse().map_err(|_| VerifyError::Malformed("bad expiry"))?,
    };
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| VerifyError::BadSignature)?;
    mac(key, &s).ok_or(VerifyError::BadSignature)?.verify_slice(&sig).map_err(|_| VerifyError::BadSignature)?;
    if now_secs > s.expires {
        return Err(VerifyError::Expired);
    }
    Ok(s)
}

/// Makes a client-supplied file name safe to sign and to put in a URL:
/// last path component, no control characters, at most [`MAX_NAME`]
/// bytes. `None` when nothing usable is left.
pub fn clean_filename(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out = String::new();
    for c in last.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_NAME {
            break;
        }
        out.push(c);
    }
    let out = out.trim().to_string();
    if out.is_empty() || out == "." || out == ".." { None } else { Some(out) }
}

/// Why a slot request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(&'static str),
    /// Larger than the limit (carries the limit).
    TooLarge(u64),
    /// The account's quota would be exceeded.
    Quota,
    Internal,
}

/// A granted slot's URLs.
#[derive(Debug, Clone)]
pub struct Urls {
    pub put: String,
    pub get: String,
}

/// Issues slots for the XMPP side.
pub struct Issuer {
    key: Vec<u8>,
    /// Media nodes' base URLs; each slot goes to one of them.
    bases: Vec<String>,
    pub max_file_bytes: u64,
    ttl_secs: u64,
    /// The local media service, for an early quota check (role `all`).
    local: Option<Arc<Media>>,
}

impl Issuer {
    /// `base` is one base URL or several separated by spaces.
    pub fn new(cfg: &MediaConfig, key: Vec<u8>, base: &str, local: Option<Arc<Media>>) -> Issuer {
        Issuer {
            key,
            bases: base.split_whitespace().map(|b| b.trim_end_matches('/').to_string()).collect(),
            max_file_bytes: cfg.max_file_bytes,
            ttl_secs: cfg.slot_ttl_secs,
            local,
        }
    }

    /// Grants a slot to `account`.
    ///
    /// # Errors
    /// Bad fields, a file over the limit, or an exhausted quota.
    pub fn request(
        &self,
        account: &str,
        filename: &str,
        size: &str,
        content_type: Option<&str>,
    ) -> Result<Urls, Refusal> {
        let filename = clean_filename(filename).ok_or(Refusal::BadRequest("missing or empty filename"))?;
        let size: u64 = size.trim().parse().map_err(|_| Refusal::BadRequest("size must be a number of bytes"))?;
        if size == 0 {
            return Err(Refusal::BadRequest("empty files cannot be uploaded"));
        }
        if size > self.max_file_bytes {
            return Err(Refusal::TooLarge(self.max_file_bytes));
        }
        let content_type = match content_type {
            None | Some("") => sniff::OCTET_STREAM.to_string(),
            Some(t) => sniff::essence(t).ok_or(Refusal::BadRequest("content-type is not a MIME type"))?,
        };
        if let Some(m) = &self.local {
            match m.would_exceed_quota(account, size) {
                Ok(false) => {}
                Ok(true) => return Err(Refusal::Quota),
                Err(e) => {
                    tracing::error!(error = %e, "media index read failed");
                    return Err(Refusal::Internal);
                }
            }
        }
        let slot = Slot {
            id: new_id(),
            account: account.to_string(),
            filename,
            size,
            content_type,
            expires: super::now_ms() / 1000 + self.ttl_secs,
        };
        let n = self.bases.len().max(1);
        let base = self.bases.get(rand::random::<usize>() % n).map_or("", String::as_str);
        let get = format!("{base}/media/{}/{}", slot.id, escape(&slot.filename));
        let put = format!("{get}?{}", sign(&self.key, &slot));
        Ok(Urls { put, get })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Slot {
        Slot {
            id: new_id(),
            account: "15551234567".into(),
            filename: "très cool.jpg".into(),
            size: 1234,
            content_type: "image/jpeg".into(),
            expires: 1000,
        }
    }

    #[test]
    fn round_trip_and_tamper() {
        let k = b"0123456789abcdef0123";
        let s = slot();
        let q = sign(k, &s);
        assert_eq!(verify(k, &s.id, &s.filename, &q, 999), Ok(s.clone()));
        assert_eq!(verify(k, &s.id, &s.filename, &q, 1001), Err(VerifyError::Expired));
        assert_eq!(verify(b"another key 12345", &s.id, &s.filename, &q, 999), Err(VerifyError::BadSignature));
        assert_eq!(verify(k, &s.id, "other.jpg", &q, 999), Err(VerifyError::BadSignature));
        let bigger = q.replace("size=1234", "size=1235");
        assert_eq!(verify(k, &s.id, &s.filename, &bigger, 999), Err(VerifyError::BadSignature));
        let other = q.replace("acct=15551234567", "acct=15550000000");
        assert_eq!(verify(k, &s.id, &s.filename, &other, 999), Err(VerifyError::BadSignature));
        let later = q.replace("exp=1000", "exp=99999");
        assert_eq!(verify(k, &s.id, &s.filename, &later, 999), Err(VerifyError::BadSignature));
        assert!(matches!(verify(k, &s.id, &s.filename, "exp=1", 0), Err(VerifyError::Malformed(_))));
        assert!(matches!(verify(k, "../../etc", &s.filename, &q, 0), Err(VerifyError::Malformed(_))));
        assert!(matches!(verify(k, &s.id, &s.filename, &format!("{q}&sig=x"), 0), Err(VerifyError::Malformed(_))));
    }

    #[test]
    fn filenames_are_cleaned() {
        assert_eq!(clean_filename("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(clean_filename("C:\\x\\a b.png").as_deref(), Some("a b.png"));
        assert_eq!(clean_filename("a\u{0}b\nc").as_deref(), Some("abc"));
        assert_eq!(clean_filename(".."), None);
        assert_eq!(clean_filename("dir/"), None);
        assert!(clean_filename(&"é".repeat(300)).is_some_and(|n| n.len() <= MAX_NAME));
    }

    #[test]
    fn ids_are_url_safe() {
        let id = new_id();
        assert!(valid_id(&id), "{id}");
        assert_ne!(id, new_id());
        assert_eq!(escape("a b/é"), "a%20b%2F%C3%A9");
    }
}

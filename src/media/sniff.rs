//! Content types: the declared type picks the tier, and the file's magic
//! bytes (read with the `infer` crate) must agree with it.
//!
//! - Declared `image/*`: the content must be an image of the same type.
//! - Declared `audio/*` or `video/*`: the content must be audio or video
//!   (containers such as MP4 and Ogg carry either).
//! - Anything else: the content must not be an image, audio or video,
//!   except under `application/octet-stream`, which may hold anything.

use serde::{Deserialize, Serialize};

pub const OCTET_STREAM: &str = "application/octet-stream";

/// Bytes of the upload read before the type is checked.
pub const HEAD_BYTES: usize = 8192;

/// Storage tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Images: fast storage (SSD).
    Fast,
    /// Audio, video and everything else: bulk storage.
    Bulk,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fast => "fast",
            Tier::Bulk => "bulk",
        }
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

/// The lower-cased `type/subtype` of a MIME type (parameters dropped),
/// or `None` if it is not one.
pub fn essence(ct: &str) -> Option<String> {
    let main = ct.split(';').next().unwrap_or("").trim();
    let (t, sub) = main.split_once('/')?;
    if !is_token(t) || !is_token(sub) || main.len() > 127 {
        return None;
    }
    Some(main.to_ascii_lowercase())
}

/// The tier a declared content type is stored in.
pub fn tier_for(content_type: &str) -> Tier {
    if content_type.starts_with("image/") { Tier::Fast } else { Tier::Bulk }
}

/// One name per image format, whatever the spelling.
fn canonical(mime: &str) -> &str {
    match mime {
        "image/jpg" | "image/pjpeg" => "image/jpeg",
        "image/heic" | "image/heic-sequence" | "image/heif-sequence" => "image/heif",
        "image/x-icon" => "image/vnd.microsoft.icon",
        "image/x-ms-bmp" => "image/bmp",
        other => other,
    }
}

fn is_av(mime: &str) -> bool {
    mime.starts_with("audio/") || mime.starts_with("video/")
}

/// Checks the first bytes of an upload against its declared type
/// (already an [`essence`]).
///
/// # Errors
/// A message saying what the content is and what was declared.
pub fn check(declared: &str, head: &[u8]) -> Result<(), String> {
    let found = infer::get(head).map(|t| t.mime_type());
    let media = |m: &str| m.starts_with("image/") || is_av(m);
    let ok = if declared.starts_with("image/") {
        found.is_some_and(|f| f.starts_with("image/") && canonical(f) == canonical(declared))
    } else if is_av(declared) {
        found.is_some_and(is_av)
    } else {
        declared == OCTET_STREAM || !found.is_some_and(media)
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the file's content is {} but the slot declares {declared}",
            found.unwrap_or("of an unrecognised type")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    const JPEG: &[u8] = b"\xff\xd8\xff\xe0\0\x10JFIF\0";
    const MP4: &[u8] = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom";
    const OGG: &[u8] = b"OggS\0\x02\0\0\0\0\0\0\0\0";

    #[test]
    fn essence_normalises() {
        assert_eq!(essence("Image/JPEG; q=1").as_deref(), Some("image/jpeg"));
        assert_eq!(essence("nonsense"), None);
        assert_eq!(essence("a/b/c"), None);
        assert_eq!(essence("text/ html"), None);
    }

    #[test]
    fn tiers() {
        assert_eq!(tier_for("image/png"), Tier::Fast);
        assert_eq!(tier_for("video/mp4"), Tier::Bulk);
        assert_eq!(tier_for("application/pdf"), Tier::Bulk);
    }

    #[test]
    fn sniffing() {
        assert!(check("image/png", PNG).is_ok());
        assert!(check("image/jpg", JPEG).is_ok());
        assert!(check("image/jpeg", PNG).is_err());
        assert!(check("image/png", b"hello").is_err());
        assert!(check("video/mp4", MP4).is_ok());
        assert!(check("audio/mp4", MP4).is_ok());
        assert!(check("audio/ogg", OGG).is_ok());
        assert!(check("video/mp4", PNG).is_err());
        assert!(check("text/plain", b"hello").is_ok());
        assert!(check("text/plain", PNG).is_err());
        assert!(check(OCTET_STREAM, PNG).is_ok());
        let e = check("image/jpeg", MP4).unwrap_err();
        assert!(e.contains("video/mp4") && e.contains("image/jpeg"), "{e}");
    }
}

//! Byte layouts of keys and values shared by the key-value engines.
//!
//! Keys put big-endian integers after a `\0` separator so that byte order
//! is numeric order: one recipient's queue is one contiguous, ordered
//! range.

use super::{Result, StoreError, StoredMessage};

/// `local \0 seq_be`.
pub fn offline_key(local: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(local.len() + 9);
    k.extend_from_slice(local.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `local \0`: the prefix of one queue (or one roster).
pub fn owner_prefix(local: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(local.len() + 1);
    k.extend_from_slice(local.as_bytes());
    k.push(0);
    k
}

/// `owner \0 name`: a record that belongs to one account — a roster item
/// (name = the contact's bare JID), a setting (name = the setting) or a
/// group-index entry (owner = the member, name = the group id). Prefix
/// scans over [`owner_prefix`] find all of one account's records.
pub fn owner_key(owner: &str, contact: &str) -> Vec<u8> {
    let mut k = owner_prefix(owner);
    k.extend_from_slice(contact.as_bytes());
    k
}

/// Sequence number from an offline key.
pub fn seq_of(key: &[u8]) -> Result<u64> {
    let tail: [u8; 8] = key
        .get(key.len().saturating_sub(8)..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("offline key too short".into()))?;
    Ok(u64::from_be_bytes(tail))
}

/// `"seq" \0 local`: the key of an account's sequence mark.
pub fn seq_mark_key(local: &str) -> Vec<u8> {
    let mut k = b"seq\0".to_vec();
    k.extend_from_slice(local.as_bytes());
    k
}

/// The bare JID in the root `from` attribute of a serialised stanza, as
/// written (escaped); empty if there is none. The root start tag ends at
/// the first `>` because attribute values are escaped.
pub fn sender_of(xml: &str) -> &str {
    let tag = &xml[..xml.find('>').unwrap_or(xml.len())];
    for pat in [" from=\"", " from='"] {
        if let Some(i) = tag.find(pat) {
            let rest = &tag[i + pat.len()..];
            let q = if pat.ends_with('"') { '"' } else { '\'' };
            let v = &rest[..rest.find(q).unwrap_or(rest.len())];
            return v.split('/').next().unwrap_or(v);
        }
    }
    ""
}

/// `ts_be(8) xml`.
pub fn encode_message(m: &StoredMessage) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + m.xml.len());
    v.extend_from_slice(&m.ts_ms.to_be_bytes());
    v.extend_from_slice(m.xml.as_bytes());
    v
}

pub fn decode_message(v: &[u8]) -> Result<StoredMessage> {
    if v.len() < 8 {
        return Err(StoreError::Corrupt("message record too short".into()));
    }
    let (ts, xml) = v.split_at(8);
    let ts_ms = u64::from_be_bytes(ts.try_into().map_err(|_| StoreError::Corrupt("ts".into()))?);
    let xml = String::from_utf8(xml.to_vec()).map_err(|_| StoreError::Corrupt("message not UTF-8".into()))?;
    Ok(StoredMessage { ts_ms, xml })
}

pub fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn from_json<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically() {
        assert!(offline_key("1555", 255) < offline_key("1555", 256));
        assert!(offline_key("1555", u64::MAX) < owner_prefix("15550"));
        assert_eq!(seq_of(&offline_key("x", 42)).unwrap(), 42);
    }

    #[test]
    fn sender_of_root() {
        assert_eq!(sender_of("<message from=\"1@x/r\" to=\"2@x\"><body>from='z'</body></message>"), "1@x");
        assert_eq!(sender_of("<message to='2@x' from='g@groups.x/3'/>"), "g@groups.x");
        assert_eq!(sender_of("<message to='2@x'><x from='a'/></message>"), "");
    }

    #[test]
    fn message_round_trip() {
        let m = StoredMessage { ts_ms: 7, xml: "<message/>".into() };
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
        assert!(decode_message(b"abc").is_err());
    }
}

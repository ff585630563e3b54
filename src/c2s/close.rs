//! How a connection ends. Everything that ends one goes through [`Close`],
//! so which bytes are written last and whether the session is parked for
//! resumption are decided in one place, whatever happened first.

use crate::protocol::stanza::{stream_error, stream_header};

/// A stream error: its condition and text.
pub type StreamError = (&'static str, Option<String>);

/// Where a connection is in its life. The first reason to end wins; a
/// later one can only add the stream error still worth sending.
#[derive(Debug, PartialEq, Eq)]
pub enum Close {
    Open,
    /// We end the stream with an error; the session ends.
    Closing {
        condition: &'static str,
        text: Option<String>,
    },
    /// The client sent `</stream:stream>`: we answer in kind (or with the
    /// error that arose meanwhile), and the session ends.
    PeerClosed {
        error: Option<StreamError>,
    },
    /// The transport failed (EOF, reset, write error, a failed TLS
    /// handshake) or the peer stopped answering pings. A session that
    /// enabled resumption is parked; a stream error is still tried.
    TransportFailed {
        error: Option<StreamError>,
    },
}

impl Close {
    pub fn is_open(&self) -> bool {
        matches!(self, Close::Open)
    }

    /// Ends the stream with an error, unless an error was chosen already.
    pub fn error(&mut self, condition: &'static str, text: Option<String>) {
        match self {
            Close::Open => *self = Close::Closing { condition, text },
            Close::PeerClosed { error: e @ None } | Close::TransportFailed { error: e @ None } => {
                *e = Some((condition, text));
            }
            _ => {}
        }
    }

    /// The transport is unusable. After a stream error of ours this keeps
    /// the error (it is still tried) and lets the session be parked; after
    /// the client's own close it changes nothing.
    pub fn transport_failed(&mut self) {
        match std::mem::replace(self, Close::Open) {
            Close::Open => *self = Close::TransportFailed { error: None },
            Close::Closing { condition, text } => *self = Close::TransportFailed { error: Some((condition, text)) },
            other => *self = other,
        }
    }

    pub fn peer_closed(&mut self) {
        if self.is_open() {
            *self = Close::PeerClosed { error: None };
        }
    }

    /// The last bytes to write: the stream error, preceded by a stream
    /// header when ours was not sent for the current stream, or the
    /// closing tag.
    pub fn tail(&self, domain: &str, stream_open: bool) -> Option<String> {
        match self {
            Close::Closing { condition, text }
            | Close::PeerClosed { error: Some((condition, text)) }
            | Close::TransportFailed { error: Some((condition, text)) } => {
                let mut t = String::new();
                if !stream_open {
                    t.push_str(&stream_header(domain, "0", None));
                }
                t.push_str(&stream_error(condition, text.as_deref()));
                Some(t)
            }
            Close::PeerClosed { error: None } => Some("</stream:stream>".to_string()),
            Close::TransportFailed { error: None } | Close::Open => None,
        }
    }

    /// Whether a session that enabled resumption is parked rather than
    /// ended: only when the client did not end the stream and we did not
    /// end it on a working transport.
    pub fn parks(&self) -> bool {
        matches!(self, Close::TransportFailed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(c: &Close) -> Option<String> {
        c.tail("example.com", true)
    }

    #[test]
    fn first_reason_wins() {
        let mut c = Close::Open;
        c.error("conflict", None);
        c.error("system-shutdown", None);
        c.peer_closed();
        assert_eq!(c, Close::Closing { condition: "conflict", text: None });
        assert!(tail(&c).unwrap().contains("<conflict "));
        assert!(!c.parks());
    }

    /// A dead peer (no answer to ping) gets the error and keeps its session
    /// resumable; so does one whose transport failed while we were closing.
    #[test]
    fn transport_failure_parks_and_keeps_the_error() {
        let mut c = Close::Open;
        c.transport_failed();
        c.error("connection-timeout", Some("no answer to ping".into()));
        assert!(c.parks());
        assert!(tail(&c).unwrap().contains("connection-timeout"));
        let mut c = Close::Open;
        c.error("policy-violation", None);
        c.transport_failed();
        assert!(c.parks());
        assert!(tail(&c).unwrap().contains("policy-violation"));
        let mut c = Close::Open;
        c.transport_failed();
        assert_eq!(tail(&c), None);
    }

    #[test]
    fn peer_close_is_answered_and_never_parks() {
        let mut c = Close::Open;
        c.peer_closed();
        assert_eq!(tail(&c).as_deref(), Some("</stream:stream>"));
        c.transport_failed();
        assert!(!c.parks());
        c.error("policy-violation", None);
        c.transport_failed();
        assert!(!c.parks());
        assert!(tail(&c).unwrap().contains("policy-violation"));
    }

    #[test]
    fn error_before_our_header_opens_the_stream_first() {
        let mut c = Close::Open;
        c.error("host-unknown", None);
        let t = c.tail("example.com", false).unwrap();
        assert!(t.starts_with("<?xml") && t.contains("<stream:error><host-unknown "), "{t}");
    }
}

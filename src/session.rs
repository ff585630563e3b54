//! A bound session: the per-device state after resource binding, and the
//! dispatch of its stanzas to feature modules.
//!
//! The session does no IO itself: it appends what must be written to
//! `out`, and the connection task writes it. Feature modules receive
//! `&mut Session` and reach other accounts only through the router.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::hooks::Stage;
use crate::modules;
use crate::modules::sm::Sm;
use crate::protocol::stanza::{StanzaError, error_reply};
use crate::protocol::{Element, Jid, ns};
use crate::router::{CloseReason, Outbound, OutboundRx};
use crate::server::Server;
use crate::storage::Ticket;

/// A parked or live session handed to a resuming connection: the
/// session state and its inbound channel.
pub type Handover = (Session, OutboundRx);

/// A request to hand a session over; the holder replies on the sender.
pub type Takeover = oneshot::Sender<Handover>;

/// Entry of the resumable-session table (XEP-0198 §5).
pub struct Resumable {
    /// Only the same account may resume.
    pub local: String,
    pub takeover: mpsc::Sender<Takeover>,
}

/// Why the connection must end, with the stream error to send.
#[derive(Debug, Clone)]
pub struct Closing {
    pub condition: &'static str,
    pub text: Option<String>,
}

pub struct Session {
    pub srv: Arc<Server>,
    pub id: u64,
    pub local: String,
    /// Full JID.
    pub jid: Jid,
    pub out: String,
    /// XEP-0198 state, once the client enabled it.
    pub sm: Option<Sm>,
    /// Stored messages written to a client without stream management,
    /// awaiting the answer to `ack_ping`.
    pub unconfirmed: Vec<u64>,
    /// Outstanding confirmation ping: its id and how many `unconfirmed`
    /// entries it covers.
    pub ack_ping: Option<(String, usize)>,
    /// Highest store ticket among stanzas received; `<a/>` waits for it.
    pub max_ticket: Ticket,
    /// Sent initial presence.
    pub available: bool,
    /// Offline queue still to be read: `(after, upto]`. While it is
    /// set, stored messages arriving live only raise `upto`: they are in
    /// the store, and are written after every stored message before them.
    pub backlog: Option<(u64, u64)>,
    pub closing: Option<Closing>,
    /// When the client last sent anything, on tokio's clock like the
    /// timers that wait for the ping deadline derived from it.
    pub last_rx: Instant,
    pub ping_counter: u64,
    /// A newer session bound the same resource: this one ends without
    /// broadcasting unavailable presence for the resource.
    pub replaced: bool,
    /// State modules keep about this session.
    pub ext: crate::hooks::Extensions,
    /// Highest offline sequence number written to this stream; a later
    /// initial presence (after going unavailable) reads the queue from
    /// here, so messages already on this stream are not sent twice.
    pub max_seq_sent: u64,
}

impl Session {
    pub fn new(srv: Arc<Server>, id: u64, jid: Jid) -> Session {
        Session {
            srv,
            id,
            local: jid.local.clone().unwrap_or_default(),
            jid,
            out: String::new(),
            sm: None,
            unconfirmed: Vec::new(),
            ack_ping: None,
            max_ticket: 0,
            available: false,
            backlog: None,
            closing: None,
            last_rx: Instant::now(),
            ping_counter: 0,
            replaced: false,
            ext: Default::default(),
            max_seq_sent: 0,
        }
    }

    pub fn domain(&self) -> &str {
        self.srv.domain()
    }

    pub fn bare(&self) -> Jid {
        self.jid.bare()
    }

    /// Writes a stanza to this client (counted by stream management).
    pub fn send(&mut self, el: &Element) {
        let xml: Arc<str> = el.to_xml().into();
        self.send_xml(xml, None);
    }

    /// Writes serialised stanza bytes; `seq` marks a stored message.
    pub fn send_xml(&mut self, xml: Arc<str>, seq: Option<u64>) {
        self.out.push_str(&xml);
        if let Some(q) = seq {
            self.max_seq_sent = self.max_seq_sent.max(q);
        }
        match self.sm.as_mut() {
            Some(sm) => {
                if let Err(n) = sm.sent(seq, xml) {
                    self.close("policy-violation", Some(format!("{n} bytes sent and not acknowledged")));
                }
            }
            None => {
                if let Some(s) = seq {
                    self.unconfirmed.push(s);
                }
            }
        }
    }

    /// Writes a nonza (SM elements, stream-level), not counted.
    pub fn send_nonza(&mut self, s: &str) {
        self.out.push_str(s);
    }

    /// Sends an error reply for `stanza` unless it is itself an error.
    pub fn reply_error(&mut self, stanza: &Element, err: StanzaError) {
        if crate::protocol::stanza::is_error(stanza) {
            return;
        }
        let mut e = error_reply(stanza, err, None);
        e.set_attr("to", self.jid.to_string());
        if e.attr("from").is_none() {
            e.set_attr("from", self.domain().to_string());
        }
        self.send(&e);
    }

    /// Applies one item from the router to this session.
    pub fn outbound(&mut self, o: Outbound) {
        match o {
            Outbound::Stanza(xml) => {
                let srv = self.srv.clone();
                if let Some(xml) = srv.hooks.run_outgoing(self, xml) {
                    self.send_xml(xml, None);
                }
            }
            Outbound::Stored { seq, xml } => match self.backlog.as_mut() {
                // Order (delivery rule 6): the backlog before it is still
                // being read, so it is read from the store after them.
                Some((_, upto)) => *upto = (*upto).max(seq),
                None => self.send_xml(xml, Some(seq)),
            },
            Outbound::Close(reason) => {
                let (cond, text) = match reason {
                    CloseReason::Replaced => {
                        self.replaced = true;
                        ("conflict", "replaced by a new connection")
                    }
                    CloseReason::AccountGone => ("not-authorized", "account removed or credentials changed"),
                    CloseReason::Shutdown => ("system-shutdown", "server shutting down"),
                };
                self.close(cond, Some(text.into()));
            }
        }
    }

    /// Ends the session for good: unavailable presence (unless replaced),
    /// registry and resumption table cleanup. Stored messages it had not
    /// had acknowledged stay in the store for the next login.
    pub fn end(mut self) {
        if !self.replaced {
            let srv = self.srv.clone();
            srv.hooks.run_session_ended(&mut self);
        }
        self.srv.router.unbind(&self.local, self.id);
        modules::sm::forget(&mut self);
    }

    pub fn close(&mut self, condition: &'static str, text: Option<String>) {
        if self.closing.is_none() {
            self.closing = Some(Closing { condition, text });
        }
    }

    /// Handles one stanza from the client. Every store write it causes
    /// is covered by the next `<a h/>` (see [`crate::storage::track_tickets`]).
    pub fn handle_stanza(&mut self, el: Element) {
        let ((), t) = crate::storage::track_tickets(|| self.dispatch(el));
        self.max_ticket = self.max_ticket.max(t);
    }

    fn dispatch(&mut self, mut el: Element) {
        if el.ns == ns::CLIENT && matches!(el.local_name(), "message" | "presence" | "iq") {
            if let Some(sm) = self.sm.as_mut() {
                sm.received();
            }
            // The server stamps `from`: a forged one is replaced.
            el.set_attr("from", self.jid.to_string());
            let to = match el.attr("to") {
                None | Some("") => None,
                Some(t) => match Jid::parse(t) {
                    Ok(j) => Some(j),
                    Err(_) => {
                        self.reply_error(&el, StanzaError::JidMalformed);
                        return;
                    }
                },
            };
            let stage = match el.local_name() {
                "message" => Stage::Message,
                "presence" => Stage::Presence,
                _ => Stage::Iq,
            };
            let srv = self.srv.clone();
            srv.hooks.run_stage(stage, self, el, to);
            return;
        }
        let srv = self.srv.clone();
        if let Some(f) = srv.hooks.nonza_handler(&el.ns) {
            f(self, &el);
            return;
        }
        self.close("unsupported-stanza-type", Some(format!("<{}/> in {}", el.local_name(), el.ns)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::element::{Scope, parse_element};
    use crate::storage::Stores;

    fn stanza(x: &str) -> Element {
        parse_element(x.as_bytes(), &Scope::client_stream()).unwrap()
    }

    /// `<a h/>` waits for every write the stanzas it counts caused: a
    /// roster set, a block, a profile publish, a privacy setting and a group
    /// creation each raise the ticket the next `<r/>` is answered after, to
    /// the store's latest write.
    #[test]
    fn every_write_of_a_stanza_is_covered_by_its_ack() {
        let dir = std::env::temp_dir().join(format!("chatd-ack-cover-{}", std::process::id()));
        let cfg = crate::config::Config { data_dir: dir.clone(), ..Default::default() };
        let stores = Stores::memory();
        stores.users.put_user("15550000001", &crate::accounts::make_record("pw", 4096, 0)).unwrap();
        let srv = Server::new(cfg, stores.clone()).unwrap();
        let mut s = Session::new(srv, 1, Jid::parse("15550000001@localhost/r").unwrap());
        s.sm = Some(Sm::new(1 << 20));
        let latest = || *stores.durability.committed().borrow();
        for x in [
            "<iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='15550000002@localhost' name='B'/></query></iq>",
            "<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='15550000003@localhost'/></block></iq>",
            "<iq type='set' id='p1'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='http://jabber.org/protocol/nick'><item id='current'><nick xmlns='http://jabber.org/protocol/nick'>Al</nick></item></publish></pubsub></iq>",
            "<iq type='set' id='v1'><privacy xmlns='urn:chatd:privacy:0' visibility='contacts'/></iq>",
            "<iq type='set' id='g1' to='groups.localhost'><create xmlns='urn:chatd:groups:0' subject='Team'/></iq>",
        ] {
            let before = latest();
            s.handle_stanza(stanza(x));
            assert!(latest() > before, "{x} wrote nothing");
            assert_eq!(s.max_ticket, latest(), "{x}: its write is not covered by the next <a h/>");
            crate::modules::sm::handle_nonza(&mut s, &stanza("<r xmlns='urn:xmpp:sm:3'/>"));
            assert_eq!(crate::modules::sm::ack_due(&s), Some(latest()));
            crate::modules::sm::release_acks(&mut s, latest());
        }
        assert!(stores.roster.roster_item("15550000001", "15550000002@localhost").unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

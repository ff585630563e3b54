//! Client side of the XMPP handshake: stream setup, SASL (SCRAM-SHA-256,
//! SCRAM-SHA-1, PLAIN), resource binding, XEP-0077 registration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use crate::metrics::Metrics;
use crate::scram::{ScramClient, ScramHash, parse_server_first, salted_password};
use crate::session::{self, Session};
use crate::xml::{Elem, XmlReader, condition, escape, new_reader, read_element, read_stream_open};

const SASL_NS: &str = "urn:ietf:params:xml:ns:xmpp-sasl";

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub domain: String,
    pub resource: String,
    /// Mechanism to insist on (otherwise the best offered).
    pub mechanism: Option<String>,
}

pub struct Conn {
    reader: Option<XmlReader>,
    writer: OwnedWriteHalf,
    buf: Vec<u8>,
    pub features: Elem,
    domain: String,
}

impl Conn {
    pub async fn connect(t: &Target) -> Result<Conn> {
        let stream = TcpStream::connect(t.addr).await.with_context(|| format!("connect {}", t.addr))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut c = Conn {
            reader: Some(new_reader(BufReader::with_capacity(8192, rd))),
            writer: wr,
            buf: Vec::with_capacity(1024),
            features: Elem::default(),
            domain: t.domain.clone(),
        };
        c.open_stream().await?;
        Ok(c)
    }

    fn reader(&mut self) -> &mut XmlReader {
        self.reader.as_mut().expect("reader present")
    }

    /// Sends a stream header (fresh parser) and reads the features.
    async fn open_stream(&mut self) -> Result<()> {
        let inner = self.reader.take().expect("reader present").into_inner();
        self.reader = Some(new_reader(inner));
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
            self.domain
        );
        self.send(&header).await?;
        let mut buf = std::mem::take(&mut self.buf);
        let r = read_stream_open(self.reader.as_mut().expect("reader present"), &mut buf).await;
        self.buf = buf;
        r?;
        let f = self.next().await?;
        if f.local() != "features" {
            bail!("expected stream features, got <{}>", f.name);
        }
        self.features = f;
        Ok(())
    }

    pub async fn send(&mut self, s: &str) -> Result<()> {
        self.writer.write_all(s.as_bytes()).await.context("write")
    }

    /// Next top-level element; stream errors become errors.
    pub async fn next(&mut self) -> Result<Elem> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = read_element(self.reader(), &mut buf).await;
        self.buf = buf;
        let e = r?;
        if e.local() == "error" && e.name.contains(':') {
            bail!("stream error: {}", condition(&e));
        }
        Ok(e)
    }

    pub fn mechanisms(&self) -> Vec<String> {
        self.features
            .child_ns("mechanisms", SASL_NS)
            .map(|m| {
                m.children.iter().filter(|c| c.local() == "mechanism").map(|c| c.text.trim().to_string()).collect()
            })
            .unwrap_or_default()
    }

    pub fn choose_mechanism(&self, wanted: Option<&str>) -> Result<String> {
        let offered = self.mechanisms();
        if let Some(w) = wanted {
            if offered.iter().any(|m| m.eq_ignore_ascii_case(w)) {
                return Ok(w.to_ascii_uppercase());
            }
            bail!("server does not offer {w} (offers {offered:?})");
        }
        for m in ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] {
            if offered.iter().any(|o| o == m) {
                return Ok(m.to_string());
            }
        }
        if self.features.child("starttls").and_then(|s| s.child("required")).is_some() {
            bail!("server requires STARTTLS; allow plaintext on the server");
        }
        bail!("no supported SASL mechanism offered: {offered:?}")
    }

    /// SASL authentication; on success the stream is restarted.
    pub async fn authenticate(&mut self, user: &str, password: &str, mech: &str) -> Result<()> {
        let hash = match mech {
            "SCRAM-SHA-256" => Some(ScramHash::Sha256),
            "SCRAM-SHA-1" => Some(ScramHash::Sha1),
            "PLAIN" => None,
            m => bail!("unsupported mechanism {m}"),
        };
        match hash {
            None => {
                let blob = B64.encode(format!("\0{user}\0{password}"));
                self.send(&format!("<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{blob}</auth>")).await?;
                let e = self.next().await?;
                if e.local() != "success" {
                    bail!("authentication failed: {}", condition(&e));
                }
            }
            Some(h) => {
                let mut sc = ScramClient::with_random_nonce(h, user, password);
                let first = B64.encode(sc.client_first());
                self.send(&format!("<auth xmlns='{SASL_NS}' mechanism='{mech}'>{first}</auth>")).await?;
                let e = self.next().await?;
                if e.local() != "challenge" {
                    bail!("authentication failed: {}", condition(&e));
                }
                let server_first = String::from_utf8(B64.decode(e.text.trim()).context("challenge base64")?)?;
                let fin = sc.client_final(&server_first).await?;
                self.send(&format!("<response xmlns='{SASL_NS}'>{}</response>", B64.encode(fin))).await?;
                let mut e = self.next().await?;
                if e.local() == "challenge" {
                    let v = String::from_utf8(B64.decode(e.text.trim())?)?;
                    sc.verify_server_final(&v)?;
                    self.send(&format!("<response xmlns='{SASL_NS}'/>")).await?;
                    e = self.next().await?;
                    if e.local() != "success" {
                        bail!("authentication failed: {}", condition(&e));
                    }
                } else if e.local() == "success" {
                    let t = e.text.trim();
                    if !t.is_empty() && t != "=" {
                        let v = String::from_utf8(B64.decode(t)?)?;
                        sc.verify_server_final(&v)?;
                    }
                } else {
                    bail!("authentication failed: {}", condition(&e));
                }
            }
        }
        self.open_stream().await
    }

    /// Fetches the SCRAM salt and iteration count for `user` and computes
    /// the salted password into the cache, then drops the connection.
    pub async fn prime_scram(mut self, user: &str, password: &str, mech: &str) -> Result<()> {
        let h = match mech {
            "SCRAM-SHA-256" => ScramHash::Sha256,
            "SCRAM-SHA-1" => ScramHash::Sha1,
            _ => return Ok(()),
        };
        let sc = ScramClient::with_random_nonce(h, user, password);
        let first = B64.encode(sc.client_first());
        self.send(&format!("<auth xmlns='{SASL_NS}' mechanism='{mech}'>{first}</auth>")).await?;
        let e = self.next().await?;
        if e.local() != "challenge" {
            bail!("unexpected answer to auth: {}", condition(&e));
        }
        let server_first = String::from_utf8(B64.decode(e.text.trim())?)?;
        let sf = parse_server_first(&server_first, sc.client_nonce())?;
        let _ = self.send(&format!("<abort xmlns='{SASL_NS}'/></stream:stream>")).await;
        drop(self);
        salted_password(h, password, &sf.salt, sf.iterations).await?;
        Ok(())
    }

    /// Binds a resource; returns the full JID.
    pub async fn bind(&mut self, resource: &str) -> Result<String> {
        if self.features.child("bind").is_none() {
            bail!("server offers no resource binding");
        }
        self.send(&format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{}</resource></bind></iq>",
            escape(resource)
        ))
        .await?;
        loop {
            let e = self.next().await?;
            if e.local() == "iq" && e.attr("id") == Some("bind1") {
                if e.attr("type") != Some("result") {
                    bail!("bind failed: {}", e.child("error").map(condition).unwrap_or_default());
                }
                return Ok(e.child("bind").and_then(|b| b.child("jid")).map(|j| j.text.clone()).unwrap_or_default());
            }
        }
    }

    /// XEP-0077 in-band registration. Returns false if the account exists.
    pub async fn register(&mut self, user: &str, password: &str, id: u64) -> Result<bool> {
        self.send(&format!(
            "<iq type='set' id='reg{id}'><query xmlns='jabber:iq:register'><username>{}</username><password>{}</password></query></iq>",
            escape(user),
            escape(password)
        ))
        .await?;
        let want = format!("reg{id}");
        loop {
            let e = self.next().await?;
            if e.local() != "iq" || e.attr("id") != Some(want.as_str()) {
                continue;
            }
            return match e.attr("type") {
                Some("result") => Ok(true),
                _ => {
                    let cond = e.child("error").map(condition).unwrap_or_default();
                    if cond.starts_with("conflict") { Ok(false) } else { Err(anyhow!("registration refused: {cond}")) }
                }
            };
        }
    }

    /// Finishes a login on a bound stream: optional session establishment,
    /// XEP-0198 enable, initial presence and a ping to know the server
    /// processed them. Hands the connection to the session tasks.
    pub async fn go_online(
        self,
        idx: usize,
        bare: String,
        metrics: Arc<Metrics>,
        want_sm: bool,
        timeout: Duration,
    ) -> Result<Arc<Session>> {
        let mut head = String::new();
        if let Some(s) = self.features.child("session")
            && s.child("optional").is_none()
        {
            head.push_str("<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>");
        }
        let sm = want_sm && self.features.child_ns("sm", "urn:xmpp:sm:3").is_some();
        if sm {
            head.push_str("<enable xmlns='urn:xmpp:sm:3'/>");
        }
        let sess = Session::new(idx, bare);
        let Conn { reader, writer, domain, .. } = self;
        session::spawn(sess.clone(), reader.expect("reader present"), writer, metrics);
        sess.send_raw(head.as_bytes(), 0);
        sess.send_raw(b"<presence/>", 1);
        let n = sess.ping(&domain);
        let ok = sess
            .wait_for(timeout, |s| {
                s.pong.load(std::sync::atomic::Ordering::Relaxed) >= n
                    && (!sm
                        || s.sm_on.load(std::sync::atomic::Ordering::Relaxed)
                        || s.sm_failed.load(std::sync::atomic::Ordering::Relaxed))
            })
            .await;
        if !ok {
            let why = sess.disconnect_reason.lock().expect("reason lock").clone();
            sess.close();
            bail!("no answer to initial presence/ping: {}", why.unwrap_or_else(|| "timeout".into()));
        }
        Ok(sess)
    }
}

/// Full login of one account: connect, authenticate, bind, go online.
pub async fn login(
    t: &Target,
    idx: usize,
    user: &str,
    password: &str,
    metrics: Arc<Metrics>,
    want_sm: bool,
    timeout: Duration,
) -> Result<(Arc<Session>, String)> {
    let fut = async {
        let mut c = Conn::connect(t).await?;
        let mech = c.choose_mechanism(t.mechanism.as_deref())?;
        c.authenticate(user, password, &mech).await?;
        c.bind(&t.resource).await?;
        let bare = format!("{user}@{}", t.domain);
        let s = c.go_online(idx, bare, metrics, want_sm, timeout).await?;
        Ok::<_, anyhow::Error>((s, mech))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| anyhow!("login timed out after {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Reads from `s` into `acc` until `needle` appears; returns what came
    /// before and including it.
    async fn until(s: &mut TcpStream, acc: &mut String, needle: &str) -> String {
        loop {
            if let Some(i) = acc.find(needle) {
                let rest = acc.split_off(i + needle.len());
                return std::mem::replace(acc, rest);
            }
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("read in time")
                .expect("read");
            assert!(n > 0, "client closed early; got {acc:?}");
            acc.push_str(std::str::from_utf8(&b[..n]).expect("utf8"));
        }
    }

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='x' from='localhost' version='1.0'>";

    /// A scripted server: PLAIN, bind, stream management, then traffic.
    async fn fake_server(l: TcpListener) -> String {
        let (mut s, _) = l.accept().await.unwrap();
        let mut acc = String::new();
        until(&mut s, &mut acc, "version='1.0'>").await;
        let f = "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
            <mechanism>PLAIN</mechanism></mechanisms></stream:features>";
        s.write_all(format!("{HEADER}{f}").as_bytes()).await.unwrap();
        let auth = until(&mut s, &mut acc, "</auth>").await;
        let blob = auth[auth.find("'>").unwrap() + 2..auth.len() - "</auth>".len()].to_string();
        assert_eq!(B64.decode(&blob).unwrap(), b"\x0015550000007\x00pw");
        s.write_all(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>").await.unwrap();
        until(&mut s, &mut acc, "version='1.0'>").await;
        let f = "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
            <sm xmlns='urn:xmpp:sm:3'/></stream:features>";
        s.write_all(format!("{HEADER}{f}").as_bytes()).await.unwrap();
        until(&mut s, &mut acc, "</iq>").await;
        s.write_all(
            b"<iq type='result' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
            <jid>15550000007@localhost/bench</jid></bind></iq>",
        )
        .await
        .unwrap();
        let online = until(&mut s, &mut acc, "</iq>").await;
        assert!(online.contains("<enable xmlns='urn:xmpp:sm:3'/>"), "{online}");
        assert!(online.contains("<presence/>"), "{online}");
        s.write_all(b"<enabled xmlns='urn:xmpp:sm:3'/><iq type='result' id='s1' from='localhost'/>").await.unwrap();
        // Traffic: a timed message, an ack request, a ping.
        let body = "0 0";
        s.write_all(
            format!(
                "<message from='15550000001@localhost/b' type='chat'><body>{body}</body></message>\
                 <r xmlns='urn:xmpp:sm:3'/>\
                 <iq type='get' id='p1' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // h counts the ping result after <enabled/> and the message.
        let a = until(&mut s, &mut acc, "h='2'/>").await;
        let pong = until(&mut s, &mut acc, "id='p1' to='localhost'/>").await;
        // The client sent presence, a ping and a ping result.
        s.write_all(b"<a xmlns='urn:xmpp:sm:3' h='3'/>").await.unwrap();
        let tail = until(&mut s, &mut acc, "</stream:stream>").await;
        s.write_all(b"</stream:stream>").await.unwrap();
        format!("{a}|{pong}|{tail}")
    }

    #[tokio::test]
    async fn login_and_session_protocol() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(fake_server(l));
        let t = Target { addr, domain: "localhost".into(), resource: "bench".into(), mechanism: None };
        let m = Arc::new(Metrics::new(1024, 1000));
        m.begin_window();
        let (s, mech) = login(&t, 7, "15550000007", "pw", m.clone(), true, Duration::from_secs(5)).await.unwrap();
        assert_eq!(mech, "PLAIN");
        assert!(s.sm_on.load(Relaxed));
        assert_eq!(s.jid, "15550000007@localhost");
        assert!(s.wait_for(Duration::from_secs(5), |s| s.acked.load(Relaxed) >= 3).await);
        assert_eq!(s.unacked(), 0);
        assert_eq!(m.received.load(Relaxed), 1);
        assert_eq!(s.in_count.load(Relaxed), 3);
        s.close();
        let log = server.await.unwrap();
        assert!(log.contains("<a xmlns='urn:xmpp:sm:3' h='2'/>"), "{log}");
        assert!(log.contains("<iq type='result' id='p1' to='localhost'/>"), "{log}");
        assert!(log.contains("h='3'/></stream:stream>"), "{log}");
        assert!(s.wait_for(Duration::from_secs(5), |s| !s.is_alive()).await || !s.is_alive());
    }
}

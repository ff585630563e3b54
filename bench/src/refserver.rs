//! A minimal in-memory XMPP router used to calibrate the generator: PLAIN
//! login, resource binding, XEP-0198 counters, pings, and message routing
//! by bare JID. No storage, no rosters; messages to offline users are
//! dropped. Whatever latency and CPU it shows is the floor the generator
//! and the kernel impose on every server.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::xml::{Elem, escape, new_reader, read_element, read_stream_open};

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Vec<u8>>>>>;

pub async fn serve(listener: TcpListener, domain: String) -> Result<()> {
    let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
    loop {
        let (sock, _) = listener.accept().await?;
        let (routes, domain) = (routes.clone(), domain.clone());
        tokio::spawn(async move {
            let _ = conn(sock, routes, domain).await;
        });
    }
}

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' id='r' from='{domain}' version='1.0'>"
    )
}

async fn conn(sock: TcpStream, routes: Routes, domain: String) -> Result<()> {
    sock.set_nodelay(true)?;
    let (rd, mut wr) = sock.into_split();
    let mut r = new_reader(BufReader::new(rd));
    let mut buf = Vec::new();
    read_stream_open(&mut r, &mut buf).await?;
    let feats = "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
                 <mechanism>PLAIN</mechanism></mechanisms></stream:features>";
    wr.write_all(format!("{}{feats}", header(&domain)).as_bytes()).await?;
    let auth = read_element(&mut r, &mut buf).await?;
    let plain = B64.decode(auth.text.trim())?;
    let user = plain.split(|&b| b == 0).nth(1).map(|u| String::from_utf8_lossy(u).into_owned()).unwrap_or_default();
    if auth.local() != "auth" || user.is_empty() {
        bail!("bad auth");
    }
    wr.write_all(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>").await?;
    let mut r = new_reader(r.into_inner());
    read_stream_open(&mut r, &mut buf).await?;
    let feats = "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
                 <sm xmlns='urn:xmpp:sm:3'/></stream:features>";
    wr.write_all(format!("{}{feats}", header(&domain)).as_bytes()).await?;
    let bare = format!("{user}@{domain}");
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    routes.lock().expect("routes").insert(bare.clone(), tx.clone());
    tokio::spawn(async move {
        while let Some(mut first) = rx.recv().await {
            while let Ok(more) = rx.try_recv() {
                first.extend_from_slice(&more);
            }
            if wr.write_all(&first).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let res = session(&mut r, &mut buf, &routes, &tx, &bare).await;
    let mut map = routes.lock().expect("routes");
    if map.get(&bare).is_some_and(|t| t.same_channel(&tx)) {
        map.remove(&bare);
    }
    res
}

async fn session(
    r: &mut crate::xml::XmlReader,
    buf: &mut Vec<u8>,
    routes: &Routes,
    me: &mpsc::UnboundedSender<Vec<u8>>,
    bare: &str,
) -> Result<()> {
    let mut sm = false;
    let mut h: u64 = 0;
    loop {
        let e: Elem = match read_element(r, buf).await {
            Ok(e) => e,
            Err(_) => {
                let _ = me.send(b"</stream:stream>".to_vec());
                return Ok(());
            }
        };
        let stanza = matches!(e.local(), "message" | "presence" | "iq");
        if sm && stanza {
            h += 1;
        }
        match e.local() {
            "message" => {
                let to = e.attr("to").unwrap_or_default();
                let to_bare = to.split('/').next().unwrap_or_default();
                let body = e.child("body").map(|b| b.text.as_str()).unwrap_or_default();
                let mut out = String::with_capacity(128);
                let _ = write!(
                    out,
                    "<message from='{bare}/bench' to='{}' type='chat'><body>{}</body></message>",
                    escape(to),
                    escape(body)
                );
                let dest = routes.lock().expect("routes").get(to_bare).cloned();
                if let Some(d) = dest {
                    let _ = d.send(out.into_bytes());
                }
            }
            "iq" => {
                let id = escape(e.attr("id").unwrap_or_default());
                let reply = if e.child("bind").is_some() {
                    format!(
                        "<iq type='result' id='{id}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                         <jid>{bare}/bench</jid></bind></iq>"
                    )
                } else if matches!(e.attr("type"), Some("get" | "set")) {
                    format!("<iq type='result' id='{id}'/>")
                } else {
                    continue;
                };
                let _ = me.send(reply.into_bytes());
            }
            "enable" => {
                sm = true;
                let _ = me.send(b"<enabled xmlns='urn:xmpp:sm:3'/>".to_vec());
            }
            "r" => {
                let _ = me.send(format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>").into_bytes());
            }
            _ => {}
        }
    }
}

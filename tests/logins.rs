//! Connections and logins as a stranger sees them: per-address caps on
//! unauthenticated connections and TLS handshakes, progressive delays after
//! failed logins, password hashing that does not stall other clients, and
//! the echo of initial presence (RFC 6121 §4.2.2).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Client, HEADER, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const A: &str = "15550000001";
const B: &str = "15550000002";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn users() -> Vec<(&'static str, &'static str)> {
    vec![("+15550000001", "pa"), ("+15550000002", "pb")]
}

/// Connects from a chosen loopback address (127.0.0.0/8 is all local).
async fn connect_from(src: &str, port: u16) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse::<SocketAddr>().unwrap()).unwrap();
    s.connect(([127, 0, 0, 1], port).into()).await.expect("connect")
}

/// Reads until `needle` appears, EOF, or `secs` pass; returns what came
/// and whether the peer closed.
async fn read_until(s: &mut TcpStream, needle: &str, secs: f64) -> (String, bool) {
    read_until_any(s, &[needle], secs).await
}

async fn read_until_any(s: &mut TcpStream, needles: &[&str], secs: f64) -> (String, bool) {
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut buf = [0u8; 8192];
    loop {
        if needles.iter().any(|n| String::from_utf8_lossy(&got).contains(n)) {
            return (String::from_utf8_lossy(&got).into_owned(), false);
        }
        let Some(left) = end.checked_duration_since(Instant::now()) else {
            return (String::from_utf8_lossy(&got).into_owned(), false);
        };
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// Opens a stream and reads the features.
async fn open(src: &str, port: u16) -> TcpStream {
    let mut s = connect_from(src, port).await;
    s.write_all(HEADER.as_bytes()).await.unwrap();
    let (got, _) = read_until(&mut s, "</stream:features>", 5.0).await;
    assert!(got.contains("</stream:features>"), "no features: {got}");
    s
}

/// One PLAIN attempt on an open stream: (success, seconds taken).
async fn plain(s: &mut TcpStream, local: &str, pw: &str) -> (bool, f64) {
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{pw}"));
    let t = Instant::now();
    s.write_all(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>").as_bytes())
        .await
        .unwrap();
    let (got, _) = read_until_any(s, &["</failure>", "</success>", "<success/>"], 60.0).await;
    let ok = got.contains("<success");
    assert!(ok || got.contains("</failure>"), "no SASL answer: {got}");
    (ok, t.elapsed().as_secs_f64())
}

#[test]
fn initial_presence_is_echoed_to_its_sender() {
    let srv = TestServer::start("login-echo", "", &users());
    rt().block_on(async {
        let mut c = Client::login(srv.port, A, "pa", "phone", true).await;
        let me = c.jid.clone();
        let p = c.expect(5, |e| e.local_name() == "presence" && e.attr("from") == Some(me.as_str())).await;
        let p = p.expect("initial presence not echoed to the resource that sent it");
        assert_eq!(p.attr("type"), None);
        // Later updates are echoed too.
        c.send("<presence><show>away</show></presence>").await;
        let p = c.expect(5, |e| e.local_name() == "presence" && e.attr("from") == Some(me.as_str())).await;
        assert!(p.expect("update echoed").to_xml().contains("away"));
    });
}

#[test]
fn unauthenticated_connections_are_capped_per_address() {
    let cfg = "[auth]\nmax_unauthenticated_per_ip = 3\n";
    let srv = TestServer::start("login-unauth", cfg, &users());
    rt().block_on(async {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(open("127.0.0.1", srv.port).await);
        }
        // The fourth from the same address is refused with a stream error.
        let mut s = connect_from("127.0.0.1", srv.port).await;
        s.write_all(HEADER.as_bytes()).await.unwrap();
        let (got, eof) = read_until(&mut s, "\u{0}", 5.0).await;
        assert!(eof && got.contains("policy-violation"), "fourth connection not refused: {got}");
        // Another address is not affected.
        let _other = open("127.0.0.2", srv.port).await;
        // Authenticating frees a slot.
        let (ok, _) = plain(&mut held[0], A, "pa").await;
        assert!(ok);
        let _again = open("127.0.0.1", srv.port).await;
        // Closing an unauthenticated connection frees its slot too.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _again2 = open("127.0.0.1", srv.port).await;
    });
}

#[test]
fn tls_handshakes_in_flight_are_capped_per_address() {
    let cfg = "[auth]\nmax_tls_handshakes_per_ip = 2\n";
    let srv = TestServer::start("login-tls", cfg, &users());
    rt().block_on(async {
        // Ask for TLS, then never send a ClientHello: the handshake stays
        // in flight until the handshake timeout.
        async fn stall(src: &str, port: u16) -> TcpStream {
            let mut s = open(src, port).await;
            s.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await.unwrap();
            let (got, _) = read_until(&mut s, "<proceed", 5.0).await;
            assert!(got.contains("<proceed"), "{got}");
            s
        }
        let mut first = stall("127.0.0.1", srv.port).await;
        let mut second = stall("127.0.0.1", srv.port).await;
        let mut third = stall("127.0.0.1", srv.port).await;
        let (_, closed) = read_until(&mut third, "\u{0}", 3.0).await;
        assert!(closed, "a third handshake in flight from one address was allowed");
        let (_, c1) = read_until(&mut first, "\u{0}", 0.5).await;
        let (_, c2) = read_until(&mut second, "\u{0}", 0.5).await;
        assert!(!c1 && !c2, "the first two handshakes must stay in flight");
        // Another address has its own budget.
        let mut other = stall("127.0.0.2", srv.port).await;
        let (_, c) = read_until(&mut other, "\u{0}", 1.0).await;
        assert!(!c, "another address was refused");
        // A finished (here: abandoned) handshake frees its slot.
        drop(first);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut fourth = stall("127.0.0.1", srv.port).await;
        let (_, c) = read_until(&mut fourth, "\u{0}", 1.0).await;
        assert!(!c, "slot not released after the handshake ended");
    });
}

#[test]
fn failed_logins_are_delayed_progressively_per_account_and_address() {
    let cfg = "[auth]\nfailures_before_delay = 1\nfailure_delay_ms = 300\nmax_failure_delay_secs = 10\n\
               max_failures_per_connection = 100\nmax_attempts_per_connection = 100\n";
    let srv = TestServer::start("login-throttle", cfg, &users());
    rt().block_on(async {
        let mut s = open("127.0.0.1", srv.port).await;
        let mut t = Vec::new();
        for _ in 0..4 {
            let (ok, secs) = plain(&mut s, A, "wrong").await;
            assert!(!ok);
            t.push(secs);
        }
        // Delays before attempts 2, 3, 4: 0.3 s, 0.6 s, 1.2 s.
        assert!(t[1] >= 0.25 && t[2] >= 0.5 && t[3] >= 1.0, "not progressive: {t:?}");
        assert!(t[3] > t[1] * 1.5 && t[0] < t[3] / 2.0, "not progressive: {t:?}");
        // Another account from another address: no delay.
        let mut o = open("127.0.0.2", srv.port).await;
        let (ok, fresh) = plain(&mut o, B, "pb").await;
        assert!(ok && fresh < t[3] / 2.0, "unrelated login delayed: {fresh} vs {t:?}");
        // After four failures the next check waits 2.4 s: for the same
        // account from another address (even with the right password), and
        // for another account from the same address.
        let mut o2 = open("127.0.0.3", srv.port).await;
        let mut o3 = open("127.0.0.1", srv.port).await;
        let ((ok2, acct), (ok3, ip)) = tokio::join!(plain(&mut o2, A, "pa"), plain(&mut o3, B, "pb"));
        assert!(ok2 && acct >= 1.5, "account delay not applied: {acct}");
        assert!(ok3 && ip >= 1.5, "address delay not applied: {ip}");
    });
}

#[test]
fn password_hashing_does_not_stall_other_clients() {
    // Expensive hashes, one hashing thread, no throttle: a PLAIN storm.
    let cfg = "[auth]\nscram_iterations = 200000\nhash_threads = 1\nfailures_before_delay = 100000\n\
               max_unauthenticated_per_ip = 0\n";
    let srv = TestServer::start("login-hash", cfg, &users());
    rt().block_on(async {
        let mut c = Client::login(srv.port, B, "pb", "pinger", false).await;
        // Baseline: one PLAIN login on a quiet server.
        let mut s = open("127.0.0.1", srv.port).await;
        let (ok, hash_secs) = plain(&mut s, A, "pa").await;
        assert!(ok);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut storm = Vec::new();
        for i in 0..6 {
            let stop = stop.clone();
            let port = srv.port;
            storm.push(tokio::spawn(async move {
                let src = format!("127.0.1.{}", i + 1);
                for _ in 0..10 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let mut s = open(&src, port).await;
                    for _ in 0..2 {
                        plain(&mut s, A, "wrong").await;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(hash_secs)).await;
        let mut rtt = Vec::new();
        for i in 0..10 {
            let t = Instant::now();
            c.iq(
                &format!("p{i}"),
                &format!("<iq type='get' id='p{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"),
            )
            .await;
            rtt.push(t.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in storm {
            let _ = h.await;
        }
        rtt.sort_by(f64::total_cmp);
        let median = rtt[rtt.len() / 2];
        eprintln!("hash {hash_secs:.3}s; ping rtt median {median:.4}s max {:.4}s", rtt[rtt.len() - 1]);
        assert!(
            median < hash_secs / 4.0 && rtt[rtt.len() - 1] < hash_secs,
            "pings stalled behind password hashing: hash {hash_secs}s, rtts {rtt:?}"
        );
    });
}

//! Idle HTTP connections are closed (`http.idle_timeout_secs`): HTTP/2
//! connections whose keep-alive pings would otherwise hold them (and a
//! connection permit) forever, and HTTP/1.1 keep-alive connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::TestServer;

const CFG: &str = "[http]\nidle_timeout_secs = 2\nheader_timeout_secs = 30\n";

/// Reads until EOF or `limit`; returns the bytes and when EOF came.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t.elapsed() < limit {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (out, Some(t.elapsed())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (out, Some(t.elapsed())),
        }
    }
    (out, None)
}

#[test]
fn idle_http2_connection_is_closed_with_goaway() {
    let srv = TestServer::start("http-idle-h2", CFG, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", srv.http_port)).unwrap();
    // HTTP/2 with prior knowledge: the preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let (bytes, closed) = read_until_closed(&mut s, Duration::from_secs(10));
    let closed = closed.expect("idle HTTP/2 connection still open after 10 s");
    assert!(closed < Duration::from_secs(8), "closed after {closed:?}");
    // Walk the frames: a GOAWAY (type 7) must be among them.
    let mut i = 0;
    let mut goaway = false;
    while i + 9 <= bytes.len() {
        let len = (usize::from(bytes[i]) << 16) | (usize::from(bytes[i + 1]) << 8) | usize::from(bytes[i + 2]);
        goaway |= bytes[i + 3] == 7;
        i += 9 + len;
    }
    assert!(goaway, "no GOAWAY frame in {bytes:?}");
}

#[test]
fn idle_http1_keepalive_connection_is_closed_but_busy_ones_are_not() {
    let srv = TestServer::start("http-idle-h1", CFG, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", srv.http_port)).unwrap();
    // Requests keep the connection in use: five, 1 s apart (5 s > 2 s).
    for _ in 0..5 {
        s.write_all(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"), "connection cut while in use");
        std::thread::sleep(Duration::from_millis(1000));
    }
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(10));
    let closed = closed.expect("idle HTTP/1.1 connection still open after 10 s");
    assert!(closed < Duration::from_secs(8), "closed after {closed:?}");
}

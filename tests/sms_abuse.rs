//! SMS pumping defences of the registration API, end to end: who the
//! client is behind a proxy, IPv6 clients per /64, and the global budget.

mod common;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// Requests a code for `phone` with an optional `X-Forwarded-For`;
/// returns the status.
async fn ask(port: u16, phone: &str, xff: Option<&str>) -> u16 {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let body = format!("{{\"phone\":\"{phone}\"}}");
    let xff = xff.map(|x| format!("X-Forwarded-For: {x}\r\n")).unwrap_or_default();
    let req = format!(
        "POST /v1/accounts/code HTTP/1.1\r\nHost: localhost\r\n{xff}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), sock.read_to_end(&mut resp)).await.unwrap().unwrap();
    String::from_utf8_lossy(&resp).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn phone(i: usize) -> String {
    format!("+1 555 123 45{:02}", i % 100)
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies_and_ipv6_counts_per_64() {
    let cfg = "[sms]\nresend_secs = 0\nper_ip_per_hour = 2\nper_phone_per_hour = 100\n[api]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let srv = TestServer::start("sms-proxy", cfg, &[]);
    rt().block_on(async {
        let p = srv.http_port;
        // Behind the (trusted) loopback proxy, clients are told apart.
        assert_eq!(ask(p, &phone(1), Some("198.51.100.1")).await, 200);
        assert_eq!(ask(p, &phone(2), Some("198.51.100.1")).await, 200);
        assert_eq!(ask(p, &phone(3), Some("198.51.100.1")).await, 429, "third from the same client");
        assert_eq!(ask(p, &phone(4), Some("198.51.100.2")).await, 200, "another client behind the proxy");
        // A client cannot pick its address by prepending to the header.
        assert_eq!(ask(p, &phone(5), Some("203.0.113.9, 198.51.100.1")).await, 429);
        // IPv6: one /64 is one client, whatever the interface id.
        assert_eq!(ask(p, &phone(6), Some("2001:db8:0:1::a")).await, 200);
        assert_eq!(ask(p, &phone(7), Some("2001:db8:0:1:ffff::b")).await, 200);
        assert_eq!(ask(p, &phone(8), Some("2001:db8:0:1:1234:5678:9abc:def0")).await, 429, "same /64");
        assert_eq!(ask(p, &phone(9), Some("2001:db8:0:2::a")).await, 200, "another /64");
    });
}

#[test]
fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let cfg = "[sms]\nresend_secs = 0\nper_ip_per_hour = 2\nper_phone_per_hour = 100\n";
    let srv = TestServer::start("sms-noproxy", cfg, &[]);
    rt().block_on(async {
        let p = srv.http_port;
        assert_eq!(ask(p, &phone(11), Some("198.51.100.1")).await, 200);
        assert_eq!(ask(p, &phone(12), Some("198.51.100.2")).await, 200);
        assert_eq!(ask(p, &phone(13), Some("198.51.100.3")).await, 429, "all from one peer");
    });
}

#[test]
fn a_global_budget_stops_pumping_across_numbers_and_addresses() {
    let cfg = "[sms]\nresend_secs = 0\nper_ip_per_hour = 100\nglobal_per_hour = 5\n[api]\ntrusted_proxies = [\"127.0.0.1\"]\n";
    let srv = TestServer::start("sms-budget", cfg, &[]);
    rt().block_on(async {
        let p = srv.http_port;
        for i in 0..5 {
            assert_eq!(ask(p, &phone(20 + i), Some(&format!("2001:db8:{i}::1"))).await, 200);
        }
        for i in 5..10 {
            assert_eq!(ask(p, &phone(20 + i), Some(&format!("2001:db8:{i}::1"))).await, 429, "budget spent");
        }
    });
    let outbox = std::fs::read_to_string(srv.data().join("sms-outbox.log")).unwrap();
    assert_eq!(outbox.lines().count(), 5, "exactly the budget was sent");
}

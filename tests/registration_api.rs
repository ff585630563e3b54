//! The SMS-code registration API end to end: request a code, read it from
//! the log gateway's outbox, register, log in over XMPP, discover a
//! contact and chat; plus the abuse cases (guessing, flooding, expiry,
//! invalid numbers) and re-registration on a new phone.

mod common;

use common::{Client, TestServer, http};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// The last code the log gateway wrote for `digits`.
fn code_for(srv: &TestServer, digits: &str) -> String {
    for _ in 0..50 {
        if let Ok(text) = std::fs::read_to_string(srv.data().join("sms-outbox.log"))
            && let Some(line) = text.lines().rev().find(|l| l.starts_with(&format!("{digits} ")))
        {
            return line.split_whitespace().nth(1).unwrap_or("").to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no code for {digits} in the outbox");
}

fn field(body: &str, k: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v[k].as_str().map(str::to_string).unwrap_or_else(|| v[k].to_string())
}

#[test]
fn sign_up_discover_and_chat() {
    let srv = TestServer::start("regapi", "[sms]\nresend_secs = 0\n", &[]);
    rt().block_on(async {
        let mut creds = Vec::new();
        for (phone, digits) in [("+1 555 123 4567", "15551234567"), ("(555) 765-4321", "15557654321")] {
            let (st, _, body) = http(srv.http_port, "POST", "/v1/accounts/code", &format!("{{\"phone\":\"{phone}\",\"method\":\"sms\"}}")).await;
            assert_eq!(st, 200, "{body}");
            assert_eq!(field(&body, "status"), "sent");
            assert_eq!(field(&body, "retry_after"), "0");
            let code = code_for(&srv, digits);
            assert_eq!(code.len(), 6);
            let (st, _, body) = http(srv.http_port, "POST", "/v1/accounts/register", &format!("{{\"phone\":\"{phone}\",\"code\":\"{code}\"}}")).await;
            assert_eq!(st, 200, "{body}");
            assert_eq!(field(&body, "jid"), format!("{digits}@localhost"));
            creds.push((digits, field(&body, "password")));
        }
        let mut a = Client::login(srv.port, creds[0].0, &creds[0].1, "phone", true).await;
        let mut b = Client::login(srv.port, creds[1].0, &creds[1].1, "phone", true).await;
        let r = a
            .iq("d", "<iq type='get' id='d' to='localhost'><query xmlns='urn:chatd:discovery:0'><phone>555-765-4321</phone><phone>+1 555 000 1111</phone></query></iq>")
            .await;
        let jid = r
            .child("query", "urn:chatd:discovery:0")
            .and_then(|q| q.elements().next())
            .and_then(|c| c.attr("jid"))
            .map(str::to_string)
            .expect("discovered contact");
        assert_eq!(jid, "15557654321@localhost");
        a.send(&format!("<message type='chat' to='{jid}'><body>found you</body></message>")).await;
        let m = b.expect(5, |e| e.local_name() == "message").await.expect("message");
        assert!(m.to_xml().contains("found you"));
    });
}

#[test]
fn code_guessing_expiry_and_bad_input() {
    let srv = TestServer::start("regabuse", "[sms]\nresend_secs = 0\ncode_ttl_secs = 2\nmax_attempts = 5\n", &[]);
    rt().block_on(async {
        let p = srv.http_port;
        let (st, _, body) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"hello\"}").await;
        assert_eq!((st, field(&body, "error").as_str()), (400, "invalid_phone"));
        let (st, _, _) = http(p, "POST", "/v1/accounts/code", "not json").await;
        assert_eq!(st, 400);
        let (st, _, _) =
            http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15551112222\",\"method\":\"pigeon\"}").await;
        assert_eq!(st, 400);

        // No code requested yet.
        let (st, _, body) =
            http(p, "POST", "/v1/accounts/register", "{\"phone\":\"+15551112222\",\"code\":\"000000\"}").await;
        assert_eq!((st, field(&body, "error").as_str()), (410, "expired"));

        // Five wrong guesses burn the code: even the right one is refused after.
        let (st, _, _) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15551112222\"}").await;
        assert_eq!(st, 200);
        let code = code_for(&srv, "15551112222");
        let wrong = if code == "000000" { "111111" } else { "000000" };
        for i in 1..=5 {
            let (st, _, body) = http(
                p,
                "POST",
                "/v1/accounts/register",
                &format!("{{\"phone\":\"+15551112222\",\"code\":\"{wrong}\"}}"),
            )
            .await;
            if i < 5 {
                assert_eq!((st, field(&body, "error").as_str()), (401, "wrong_code"), "try {i}");
            } else {
                assert_eq!((st, field(&body, "error").as_str()), (410, "expired"), "try {i} burns the code");
            }
        }
        let (st, _, _) =
            http(p, "POST", "/v1/accounts/register", &format!("{{\"phone\":\"+15551112222\",\"code\":\"{code}\"}}"))
                .await;
        assert_eq!(st, 410);

        // Expiry after code_ttl_secs.
        let (st, _, _) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15553334444\"}").await;
        assert_eq!(st, 200);
        let code = code_for(&srv, "15553334444");
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let (st, _, body) =
            http(p, "POST", "/v1/accounts/register", &format!("{{\"phone\":\"+15553334444\",\"code\":\"{code}\"}}"))
                .await;
        assert_eq!((st, field(&body, "error").as_str()), (410, "expired"));
    });
}

#[test]
fn flooding_is_rate_limited() {
    let cfg = "[sms]\nresend_secs = 30\nper_phone_per_hour = 5\nper_ip_per_hour = 4\n";
    let srv = TestServer::start("regflood", cfg, &[]);
    rt().block_on(async {
        let p = srv.http_port;
        let (st, _, _) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15550001000\"}").await;
        assert_eq!(st, 200);
        // Same number again within resend_secs.
        let (st, headers, body) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15550001000\"}").await;
        assert_eq!((st, field(&body, "error").as_str()), (429, "rate_limited"));
        let ra: u64 =
            headers.iter().find(|(k, _)| k == "retry-after").and_then(|(_, v)| v.parse().ok()).expect("Retry-After");
        assert!((1..=30).contains(&ra), "retry-after {ra}");
        // The IP allowance (4 per hour) runs out across numbers.
        let (st, _, _) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15550001001\"}").await;
        assert_eq!(st, 200);
        let (st, _, _) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15550001002\"}").await;
        assert_eq!(st, 200, "fourth request from this IP (the refused one counts too)");
        let (st, _, body) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15550001003\"}").await;
        assert_eq!((st, field(&body, "error").as_str()), (429, "rate_limited"), "fifth is over the IP limit");
    });
}

#[test]
fn registering_again_replaces_the_key_and_ends_old_sessions() {
    let srv = TestServer::start("regagain", "[sms]\nresend_secs = 0\n", &[]);
    rt().block_on(async {
        let p = srv.http_port;
        let register = || async {
            let (st, _, _) = http(p, "POST", "/v1/accounts/code", "{\"phone\":\"+15559998888\"}").await;
            assert_eq!(st, 200);
            let code = code_for(&srv, "15559998888");
            let (st, _, body) = http(
                p,
                "POST",
                "/v1/accounts/register",
                &format!("{{\"phone\":\"+15559998888\",\"code\":\"{code}\"}}"),
            )
            .await;
            assert_eq!(st, 200, "{body}");
            field(&body, "password")
        };
        let first = register().await;
        // The old phone is connected when the number moves to a new one.
        let mut old = Client::login(srv.port, "15559998888", &first, "old", true).await;
        let second = register().await;
        assert_ne!(first, second);
        let mut closed = false;
        for _ in 0..20 {
            match old.next(5).await {
                Some(chatd::protocol::Frame::Stanza(e)) if e.local_name() == "error" => {
                    assert!(e.to_xml().contains("not-authorized"), "{}", e.to_xml());
                }
                Some(chatd::protocol::Frame::Close) | None => {
                    closed = true;
                    break;
                }
                Some(_) => {}
            }
        }
        assert!(closed, "the old session was not ended");
        // The new key works; the old one does not.
        let _new = Client::login(srv.port, "15559998888", &second, "new", true).await;
        let mut c = Client::connect(srv.port).await;
        c.send(common::HEADER).await;
        c.next(5).await;
        c.next(5).await;
        use base64::Engine;
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("\015559998888\0{first}"));
        c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>")).await;
        match c.next(5).await {
            Some(chatd::protocol::Frame::Stanza(e)) => assert_eq!(e.local_name(), "failure"),
            other => panic!("old key still accepted: {other:?}"),
        }
    });
}

#[test]
fn webhook_gateway_posts_the_code() {
    use std::io::{Read, Write};
    // A one-shot HTTP endpoint standing in for an SMS provider bridge.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        let _ =
                            s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        let _ = tx.send(text);
                        break;
                    }
                }
            }
        }
    });
    let cfg = format!("[sms]\ngateway = \"webhook\"\nwebhook_url = \"http://{hook}/send\"\n");
    let srv = TestServer::start("regwebhook", &cfg, &[]);
    rt().block_on(async {
        let (st, _, _) =
            http(srv.http_port, "POST", "/v1/accounts/code", "{\"phone\":\"+15554443333\",\"method\":\"voice\"}").await;
        assert_eq!(st, 200);
    });
    let req = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("webhook called");
    assert!(req.starts_with("POST /send HTTP/1.1"), "{req}");
    let body = req.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["phone"], "+15554443333");
    assert_eq!(v["method"], "voice");
    assert_eq!(v["code"].as_str().map(|c| c.len()), Some(6));
    assert!(!srv.data().join("sms-outbox.log").exists(), "the log gateway is not used");
}

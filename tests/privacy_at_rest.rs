//! Privacy at rest, checked the way someone holding a copy of the data
//! directory would: a delivered message cannot be recovered from any file
//! in it (neither in clear nor with a key found there), files and
//! directories are private to the owner, SMS codes stay out of the INFO
//! log, and account passwords need not appear on a command line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use rand::RngCore;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

const ALICE: &str = "15550000101";
const BOB: &str = "15550000102";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// Every file under `dir`, recursively (directories included).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&p, out);
        }
    }
}

fn regular_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    walk(dir, &mut all);
    all.into_iter()
        .filter(|p| std::fs::symlink_metadata(p).map(|m| m.is_file()).unwrap_or(false))
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Tries to read `body` back from the data directory as an attacker with
/// a copy of it would: in clear in any file, or by decrypting any record
/// found in any file with any key from the key file. Returns where.
fn recover(data: &Path, body: &[u8]) -> Option<String> {
    let files = regular_files(data);
    for (p, b) in &files {
        if contains(b, body) {
            return Some(format!("in clear in {}", p.display()));
        }
    }
    let keys = std::fs::read(data.join("message-keys")).unwrap_or_default();
    for (p, b) in &files {
        for i in 0..b.len().saturating_sub(17) {
            if b[i] != 0xE1 {
                continue;
            }
            let slot = u64::from_be_bytes(b[i + 1..i + 9].try_into().unwrap());
            if slot >= (keys.len() / 32) as u64 {
                continue;
            }
            let off = slot as usize * 32;
            let key = &keys[off..off + 32];
            if key == [0u8; 32] || Sha256::digest(key)[..8] != b[i + 9..i + 17] {
                continue;
            }
            let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).unwrap());
            let start = i + 17;
            for end in start + 16..=b.len().min(start + 8192) {
                let mut buf = b[start..end].to_vec();
                if let Ok(plain) =
                    k.open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(&b[i..start]), &mut buf)
                    && contains(plain, body)
                {
                    return Some(format!("decrypted from {} with key slot {slot}", p.display()));
                }
            }
        }
    }
    None
}

#[test]
fn a_delivered_message_cannot_be_recovered_from_the_data_directory() {
    let mut s = TestServer::start("erasure", "", &[(&format!("+{ALICE}"), "pa"), (&format!("+{BOB}"), "pb")]);
    let data = s.data();
    let mut tag = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut tag);
    let body = format!("secret-{}", tag.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let rt = rt();

    // Alice sends to offline Bob; the XEP-0198 ack says it is durable.
    rt.block_on(async {
        let mut a = Client::login(s.port, ALICE, "pa", "phone", true).await;
        a.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
        a.expect(5, |e| e.local_name() == "enabled").await.expect("sm enabled");
        a.send(&format!(
            "<message to='{BOB}@localhost' type='chat' id='m1'><body>{body}</body></message><r xmlns='urn:xmpp:sm:3'/>"
        ))
        .await;
        let ack = a.expect(5, |e| e.local_name() == "a").await.expect("ack");
        assert_eq!(ack.attr("h"), Some("1"));
    });
    // Stored, but never in clear.
    let stored = recover(&data, body.as_bytes()).expect("the scanner finds the stored message with its key");
    assert!(stored.starts_with("decrypted"), "message stored in clear: {stored}");

    // kill -9 before delivery: the acked message (and its key) survive.
    let _ = s.child.kill();
    let _ = s.child.wait();
    let (child, port, _) = common::spawn(&data, &s.cfg);
    s.child = child;
    s.port = port;

    let (delivered_at, gone_after) = rt.block_on(async {
        let mut b = Client::login(s.port, BOB, "pb", "phone", true).await;
        let m = b
            .expect(10, |e| e.local_name() == "message" && e.child("body", "jabber:client").is_some())
            .await
            .expect("the message survives kill -9 and is delivered");
        let got = m.child("body", "jabber:client").map(|e| e.text()).unwrap_or_default();
        assert_eq!(got, body);
        // The server pings after sending stored messages; the answer
        // acknowledges them (ARCHITECTURE.md, delivery rule 3).
        let ping =
            b.expect(5, |e| e.local_name() == "iq" && e.attr("type") == Some("get")).await.expect("delivery ping");
        let id = ping.attr("id").unwrap_or("").to_string();
        b.send(&format!("<iq type='result' id='{id}' to='localhost'/>")).await;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(10);
        loop {
            if recover(&data, body.as_bytes()).is_none() {
                break (acked, acked.elapsed());
            }
            assert!(Instant::now() < deadline, "message still recoverable 10 s after its acknowledgement");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let _ = delivered_at;
    eprintln!(
        "erasure: the delivered message was unrecoverable {} ms after its acknowledgement",
        gone_after.as_millis()
    );

    // And it stays gone after a kill -9 (nothing resurrects the key).
    let _ = s.child.kill();
    let _ = s.child.wait();
    assert!(recover(&data, body.as_bytes()).is_none(), "recoverable after kill -9");
    let (child, port, _) = common::spawn(&data, &s.cfg);
    s.child = child;
    s.port = port;
    rt.block_on(async {
        let mut b = Client::login(s.port, BOB, "pb", "phone", true).await;
        let again = b.expect(3, |e| e.local_name() == "message" && e.child("body", "jabber:client").is_some()).await;
        assert!(again.is_none(), "an acknowledged message came back: {again:?}");
    });
    assert!(recover(&data, body.as_bytes()).is_none());
}

#[test]
fn data_directory_is_private_and_sms_codes_stay_out_of_info_logs() {
    let dir = std::env::temp_dir().join(format!("chatd-modes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("chatd.toml");
    std::fs::write(&cfg, "").unwrap();
    let data = dir.join("data");
    // The password comes from stdin, not the command line.
    let mut add = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["user", "add", &format!("+{ALICE}"), "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .env("CHATD_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        add.stdin.take().unwrap().write_all(b"from-stdin-pw\n").unwrap();
    }
    assert!(add.wait().unwrap().success(), "user add reads the password from stdin");

    let log = dir.join("server.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--domain",
            "localhost",
            "--c2s",
            "127.0.0.1:0",
            "--c2s-tls",
            "",
            "--http",
            "127.0.0.1:0",
            "--allow-plaintext",
        ])
        .env("CHATD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    let (mut c2s, mut http) = (0u16, 0u16);
    for l in lines.by_ref() {
        let l = l.unwrap();
        let port = |a: &str| a.rsplit(':').next().unwrap().parse().unwrap();
        if let Some(a) = l.strip_prefix("listening c2s ") {
            c2s = port(a);
        } else if let Some(a) = l.strip_prefix("listening http ") {
            http = port(a);
        }
        if c2s != 0 && http != 0 {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let rt = rt();
    rt.block_on(async {
        let mut a = Client::login(c2s, ALICE, "from-stdin-pw", "r", true).await;
        a.send(&format!("<message to='{BOB}@localhost' type='chat'><body>x</body></message>")).await;
        let (status, _, _) = common::http(http, "POST", "/v1/accounts/code", r#"{"phone":"+15550000103"}"#).await;
        assert_eq!(status, 200);
    });
    std::thread::sleep(Duration::from_millis(300));
    let outbox = std::fs::read_to_string(data.join("sms-outbox.log")).expect("outbox written");
    let code = outbox.split_whitespace().nth(1).expect("code in outbox").to_string();
    assert_eq!(code.len(), 6);

    let mut all = Vec::new();
    walk(&data, &mut all);
    for must in ["tls/key.pem", "admin.sock", "sms-outbox.log", "message-keys", "db"] {
        assert!(all.contains(&data.join(must)), "{must} exists");
    }
    let mut bad = Vec::new();
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dm = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    if dm != 0o700 {
        bad.push(format!("{} {dm:o}", data.display()));
    }
    for p in &all {
        let m = std::fs::symlink_metadata(p).unwrap();
        let mode = m.permissions().mode() & 0o777;
        let ok = if m.is_dir() {
            mode == 0o700
        } else if m.is_file() {
            mode == 0o600
        } else if m.file_type().is_socket() {
            mode & 0o077 == 0
        } else {
            true
        };
        if !ok {
            bad.push(format!("{} {mode:o}", p.display()));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(bad.is_empty(), "open to others: {bad:#?}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("sms outbox"), "the INFO log says a code was sent");
    assert!(!log_text.contains(&code), "the code is in the INFO log:\n{log_text}");
    let _ = std::fs::remove_dir_all(&dir);
}

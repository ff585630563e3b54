//! Group fan-out benchmark for chatd: one group of `--members` accounts,
//! `--online` of them connected, one member posting at stepped rates.
//!
//! Reports, per step: group messages/s accepted (acknowledged by the
//! server over XEP-0198, i.e. durably stored for every member), member
//! deliveries/s (stored copies written, online and offline), live
//! deliveries/s and end-to-end latency at the online members. Then a
//! batch of offline members logs in and drains its backlog: drain rate.
//!
//! Usage: start chatd with `--allow-plaintext`, import accounts
//! `PREFIX + 7-digit index` with `--password`, then
//! `chatd-groupbench --port P --members 1000 --online 200`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5222)]
    port: u16,
    #[arg(long, default_value = "localhost")]
    domain: String,
    #[arg(long, default_value = "1555")]
    prefix: String,
    #[arg(long, default_value = "bench-secret")]
    password: String,
    /// Group size, the poster included.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Members connected during the load (the poster is one of them).
    #[arg(long, default_value_t = 200)]
    online: usize,
    /// Group messages per second, stepped.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100,200,400")]
    rates: Vec<u64>,
    #[arg(long, default_value_t = 5)]
    step_secs: u64,
    /// Offline members that log in afterwards to measure the drain.
    #[arg(long, default_value_t = 100)]
    drainers: usize,
    /// Stop stepping when p99 exceeds this (ms).
    #[arg(long, default_value_t = 100.0)]
    max_p99_ms: f64,
}

fn local(a: &Args, i: usize) -> String {
    format!("{}{:07}", a.prefix, i)
}

/// A minimal client: PLAIN over plaintext, bind, optional SM, presence.
struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn login(a: &Args, i: usize, sm: bool) -> anyhow::Result<Conn> {
        let sock = TcpStream::connect((a.host.as_str(), a.port)).await?;
        sock.set_nodelay(true)?;
        let mut c = Conn { sock, buf: Vec::new() };
        let hdr = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
            a.domain
        );
        c.send(&hdr).await?;
        c.until("</stream:features>").await?;
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", local(a, i), a.password));
        c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>")).await?;
        let r = c.until("success").await?;
        if !r.contains("<success") {
            bail!("auth failed for {}", local(a, i));
        }
        c.buf.clear();
        c.send(&hdr).await?;
        c.until("</stream:features>").await?;
        c.send(
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>gb</resource></bind></iq>",
        )
        .await?;
        c.until("</iq>").await?;
        if sm {
            c.send("<enable xmlns='urn:xmpp:sm:3'/>").await?;
            c.until("enabled").await?;
        }
        c.buf.clear();
        Ok(c)
    }

    async fn send(&mut self, s: &str) -> anyhow::Result<()> {
        self.sock.write_all(s.as_bytes()).await?;
        Ok(())
    }

    /// Reads until `needle` appears; returns and clears the buffer.
    async fn until(&mut self, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = find(&self.buf, needle.as_bytes()) {
                let end = (i + needle.len()).min(self.buf.len());
                let out = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..end);
                return Ok(out);
            }
            let mut chunk = [0u8; 16384];
            let left = deadline.checked_duration_since(Instant::now()).context("timeout")?;
            let n = tokio::time::timeout(left, self.sock.read(&mut chunk)).await??;
            if n == 0 {
                bail!("closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Counts `<message` arrivals and records latency from the body stamp.
struct Receiver {
    count: AtomicU64,
    lat_us: Mutex<Vec<u64>>,
}

fn now_us(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

async fn read_loop(mut c: Conn, rx: Arc<Receiver>, t0: Instant, stop: Instant) {
    let mut handled: u32 = 0;
    let mut chunk = vec![0u8; 65536];
    let mut pending = Vec::new();
    while Instant::now() < stop {
        let left = stop.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, c.sock.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut ack = false;
        let mut pos = 0;
        while let Some(i) = find(&pending[pos..], b"<message") {
            let start = pos + i;
            let Some(j) = find(&pending[start..], b"</message>") else { break };
            let msg = &pending[start..start + j];
            handled = handled.wrapping_add(1);
            if let Some(b) = find(msg, b"<body>") {
                let rest = &msg[b + 6..];
                if let Some(e) = find(rest, b"</body>")
                    && let Ok(s) = std::str::from_utf8(&rest[..e])
                    && let Some(stamp) = s.split(' ').next().and_then(|t| t.parse::<u64>().ok())
                {
                    rx.count.fetch_add(1, Ordering::Relaxed);
                    let l = now_us(t0).saturating_sub(stamp);
                    rx.lat_us.lock().await.push(l);
                }
            }
            pos = start + j + 10;
        }
        if find(&pending, b"<r xmlns").is_some() {
            ack = true;
        }
        pending.drain(..pos);
        if pending.len() > 1 << 20 {
            pending.clear();
        }
        if ack {
            // Every stanza this bench receives after <enable/> is a message
            // or a ping; count messages only is enough while pings are rare.
            let _ = c.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>")).await;
        }
    }
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.online > a.members || a.online == 0 {
        bail!("--online must be between 1 and --members");
    }
    let t0 = Instant::now();
    // The poster (member 0) creates the group.
    let mut poster = Conn::login(&a, 0, true).await?;
    poster.send("<presence/>").await?;
    let members: String = (1..a.members).map(|i| format!("<member jid='{}@{}'/>", local(&a, i), a.domain)).collect();
    poster
        .send(&format!(
            "<iq type='set' id='mk' to='groups.{}'><create xmlns='urn:chatd:groups:0' subject='bench'>{members}</create></iq>",
            a.domain
        ))
        .await?;
    let r = poster.until("</iq>").await?;
    let gid = r
        .split("jid=\"")
        .nth(1)
        .or_else(|| r.split("jid='").nth(1))
        .and_then(|s| s.split(['"', '\'']).next())
        .context("no group jid in reply")?
        .to_string();
    eprintln!("group {gid} with {} members", a.members);
    // Online members.
    let rx = Arc::new(Receiver { count: AtomicU64::new(0), lat_us: Mutex::new(Vec::new()) });
    let total_secs = (a.step_secs + 3) * a.rates.len() as u64 + 30;
    let stop = Instant::now() + Duration::from_secs(total_secs);
    for i in 1..a.online {
        let mut c = Conn::login(&a, i, true).await?;
        c.send("<presence/>").await?;
        tokio::spawn(read_loop(c, rx.clone(), t0, stop));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Drain the creation events before measuring.
    rx.count.store(0, Ordering::Relaxed);
    rx.lat_us.lock().await.clear();
    let acked = Arc::new(AtomicU64::new(0));
    let (mut pr, mut pw) = poster.sock.into_split();
    {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 65536];
            let mut tail = String::new();
            while let Ok(n) = pr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                tail.push_str(&String::from_utf8_lossy(&chunk[..n]));
                while let Some(i) =
                    tail.find("<a xmlns='urn:xmpp:sm:3' h='").or_else(|| tail.find("<a xmlns=\"urn:xmpp:sm:3\" h=\""))
                {
                    let rest = &tail[i + 28..];
                    if let Some(e) = rest.find(['\'', '"']) {
                        if let Ok(h) = rest[..e].parse::<u64>() {
                            acked.store(h, Ordering::Relaxed);
                        }
                        tail = rest[e..].to_string();
                    } else {
                        break;
                    }
                }
                if tail.len() > 1 << 16 {
                    let keep = tail.len() - 256;
                    tail.drain(..keep);
                }
            }
        });
    }
    println!(
        "| group msgs/s target | accepted (acked) msgs/s | member deliveries/s | live deliveries/s | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|");
    // `presence` counted as stanza 1 after <enable/>.
    let mut sent: u64 = 1;
    let mut stamps: VecDeque<u64> = VecDeque::new();
    for &rate in &a.rates {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let base_acked = acked.load(Ordering::Relaxed);
        let base_rx = rx.count.load(Ordering::Relaxed);
        rx.lat_us.lock().await.clear();
        let start = Instant::now();
        let end = start + Duration::from_secs(a.step_secs);
        let mut next = start;
        let mut n = 0u64;
        while Instant::now() < end {
            let stamp = now_us(t0);
            let m = format!(
                "<message type='groupchat' to='{gid}'><body>{stamp} {n}</body></message><r xmlns='urn:xmpp:sm:3'/>"
            );
            pw.write_all(m.as_bytes()).await?;
            sent += 1;
            n += 1;
            stamps.push_back(stamp);
            next += interval;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                tokio::time::sleep(d).await;
            }
        }
        // Wait for the acks and deliveries of this step.
        let wait_until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < wait_until && acked.load(Ordering::Relaxed) < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let got_acks = acked.load(Ordering::Relaxed).saturating_sub(base_acked);
        let live = rx.count.load(Ordering::Relaxed) - base_rx;
        let mut lat = rx.lat_us.lock().await.clone();
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        let accepted = got_acks as f64 / secs;
        println!(
            "| {rate} | {accepted:.0} | {:.0} | {:.0} | {p50:.2} | {p99:.2} |",
            accepted * a.members as f64,
            live as f64 / secs
        );
        if p99 > a.max_p99_ms || got_acks < n {
            eprintln!("stopping: p99 {p99:.1} ms, acked {got_acks} of {n}");
            break;
        }
    }
    // Offline members log in and drain.
    let drainers: Vec<usize> = (a.online..a.members).take(a.drainers).collect();
    if !drainers.is_empty() {
        let expect = sent - 1;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for i in drainers.clone() {
            let a2 = a.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::login(&a2, i, true).await?;
                c.send("<presence/>").await?;
                let mut got = 0u64;
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut chunk = vec![0u8; 65536];
                let mut handled: u32 = 0;
                while got < expect && Instant::now() < deadline {
                    let n = match tokio::time::timeout(Duration::from_secs(5), c.sock.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => break,
                    };
                    let s = &chunk[..n];
                    let mut k = 0;
                    let mut p = 0;
                    while let Some(i) = find(&s[p..], b"<body>") {
                        k += 1;
                        p += i + 6;
                    }
                    got += k;
                    let msgs = s.windows(8).filter(|w| *w == b"<message").count() as u32;
                    handled = handled.wrapping_add(msgs);
                    if find(s, b"<r xmlns").is_some() {
                        c.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>")).await?;
                    }
                }
                anyhow::Ok(got)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "\noffline drain: {} members logged in and received {total} stored group messages in {secs:.2}s = {:.0} msgs/s",
            drainers.len(),
            total as f64 / secs
        );
    }
    Ok(())
}

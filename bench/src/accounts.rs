//! Phase (a): account creation, by chatd's CSV import or by XEP-0077
//! in-band registration.

use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{Conn, Target};
use crate::run::localpart;

/// Writes `phone,password` lines for `range`.
pub fn write_csv(path: &Path, prefix: &str, password: &str, range: Range<usize>) -> Result<()> {
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?);
    for i in range {
        writeln!(f, "{},{}", localpart(prefix, i), password)?;
    }
    f.flush()?;
    Ok(())
}

/// Runs `chatd user import CSV --data-dir DIR`.
pub fn chatd_import(chatd: &Path, data_dir: &Path, csv: &Path) -> Result<f64> {
    let start = Instant::now();
    let out = std::process::Command::new(chatd)
        .arg("user")
        .arg("import")
        .arg(csv)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .with_context(|| format!("run {}", chatd.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "chatd user import failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(secs)
}

pub struct IbrOutcome {
    pub created: usize,
    pub existed: usize,
    pub failed: usize,
    pub secs: f64,
    pub first_error: Option<String>,
}

/// Registers `range` over in-band registration with `concurrency`
/// connections, each registering several accounts in turn.
pub async fn register_ibr(
    t: &Target,
    prefix: &str,
    password: &str,
    range: Range<usize>,
    concurrency: usize,
    timeout: Duration,
) -> IbrOutcome {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(range.start));
    let created = Arc::new(AtomicUsize::new(0));
    let existed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (t, prefix, password) = (t.clone(), prefix.to_string(), password.to_string());
        let (next, created, existed, failed, first_error) =
            (next.clone(), created.clone(), existed.clone(), failed.clone(), first_error.clone());
        let end = range.end;
        set.spawn(async move {
            let mut conn: Option<Conn> = None;
            let mut on_conn = 0usize;
            let mut id = 0u64;
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= end {
                    break;
                }
                let user = localpart(&prefix, i);
                let mut done = false;
                for _attempt in 0..3 {
                    if conn.is_none() {
                        match tokio::time::timeout(timeout, Conn::connect(&t)).await {
                            Ok(Ok(c)) => {
                                conn = Some(c);
                                on_conn = 0;
                            }
                            Ok(Err(e)) => {
                                first_error.lock().expect("lock").get_or_insert(format!("{e:#}"));
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                            Err(_) => continue,
                        }
                    }
                    let c = conn.as_mut().expect("connected");
                    id += 1;
                    match tokio::time::timeout(timeout, c.register(&user, &password, id)).await {
                        Ok(Ok(true)) => {
                            created.fetch_add(1, Relaxed);
                            done = true;
                        }
                        Ok(Ok(false)) => {
                            existed.fetch_add(1, Relaxed);
                            done = true;
                        }
                        Ok(Err(e)) => {
                            // Some servers allow one registration per stream:
                            // retry on a fresh connection before giving up.
                            if on_conn == 0 {
                                first_error.lock().expect("lock").get_or_insert(format!("{user}: {e:#}"));
                            }
                            conn = None;
                            continue;
                        }
                        Err(_) => {
                            conn = None;
                            continue;
                        }
                    }
                    on_conn += 1;
                    break;
                }
                if !done {
                    failed.fetch_add(1, Relaxed);
                }
            }
            if let Some(mut c) = conn {
                let _ = c.send("</stream:stream>").await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    IbrOutcome {
        created: created.load(Relaxed),
        existed: existed.load(Relaxed),
        failed: failed.load(Relaxed),
        secs: start.elapsed().as_secs_f64(),
        first_error: first_error.lock().expect("lock").clone(),
    }
}

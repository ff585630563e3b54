//! Account administration that works with or without a running server.
//!
//! The server owns its data directory exclusively (the store is locked),
//! so `chatd user …` first tries the admin socket `DATA_DIR/admin.sock`
//! (mode 0600: only the owner of the data may use it). If no server
//! answers, the command opens the store directly. Either way the same
//! operations run, and CPU-heavy key derivation happens in the CLI
//! process, never in the server.
//!
//! # Format
//! One JSON object per line in each direction: a [`Request`], then a
//! [`Response`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::server::Server;
use crate::storage::Stores;

pub use crate::accounts::service::{Request, Response};

fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Binds the admin socket and serves it.
///
/// # Errors
/// When the socket cannot be bound.
pub async fn listen(srv: Arc<Server>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(&srv.cfg.data_dir);
    // The store lock is held, so any socket file here is stale.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let srv = srv.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let resp = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            let srv2 = srv.clone();
                            tokio::task::spawn_blocking(move || {
                                crate::accounts::service::apply(&srv2.stores, Some(&srv2), req)
                            })
                            .await
                            .unwrap_or_else(|_| Response {
                                ok: false,
                                error: Some("internal error".into()),
                                users: Vec::new(),
                                count: 0,
                                ticket: 0,
                            })
                        }
                        Err(e) => Response {
                            ok: false,
                            error: Some(format!("bad request: {e}")),
                            users: Vec::new(),
                            count: 0,
                            ticket: 0,
                        },
                    };
                    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    }))
}

/// Removes the socket file at shutdown.
pub fn cleanup(data_dir: &Path) {
    let _ = std::fs::remove_file(socket_path(data_dir));
}

/// Client side: runs `req` through a live server if one answers,
/// otherwise directly on the store.
///
/// # Errors
/// Store or socket failures, or the operation's own error.
pub fn run(data_dir: &Path, req: Request) -> anyhow::Result<Response> {
    let path = socket_path(data_dir);
    let resp = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(sock) => {
            use std::io::{BufRead, Write};
            let mut w = sock.try_clone()?;
            let mut line = serde_json::to_vec(&req)?;
            line.push(b'\n');
            w.write_all(&line)?;
            let mut r = std::io::BufReader::new(sock);
            let mut buf = String::new();
            r.read_line(&mut buf)?;
            serde_json::from_str::<Response>(&buf).context("reading the server's answer")?
        }
        Err(_) => {
            let stores = match Stores::open_fjall(data_dir) {
                Ok(s) => s,
                Err(crate::storage::StoreError::Locked) => {
                    bail!("a chatd server holds {} but its admin socket does not answer", data_dir.display())
                }
                Err(e) => return Err(anyhow!(e)).with_context(|| format!("opening {}", data_dir.display())),
            };
            let resp = crate::accounts::service::apply(&stores, None, req);
            stores.durability.shutdown();
            resp
        }
    };
    if !resp.ok {
        bail!(resp.error.clone().unwrap_or_else(|| "failed".into()));
    }
    Ok(resp)
}

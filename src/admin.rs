//! Account administration that works with or without a running server.
//!
//! The server owns its data directory exclusively (the store is locked),
//! so `chatd user …` first tries the admin socket `DATA_DIR/admin.sock`
//! (mode 0600: only the owner of the data may use it). If no server
//! answers, the command opens the store directly. Either way the same
//! operations run, and CPU-heavy key derivation happens in the CLI
//! process, never in the server.
//!
//! With `[cluster]` the accounts live in NATS, shared by every node, so
//! there is no data directory to lock or socket to try: [`Admin`] opens
//! the cluster stores, runs the request, and returns once NATS has
//! acknowledged its writes, whether or not any node runs.
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

/// Where `chatd user …` applies its requests.
pub enum Admin {
    /// The data directory: through its server's admin socket, or directly.
    Local(PathBuf),
    /// The cluster stores, opened once for every request of the command.
    Cluster(Stores),
}

/// How long `chatd user …` waits for NATS to acknowledge its writes.
const CLUSTER_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Admin {
    /// The cluster of `[cluster]` if there is one, else the data directory.
    ///
    /// # Errors
    /// NATS unreachable, or the bootstrap refused.
    pub fn open(cfg: &crate::config::Config) -> anyhow::Result<Admin> {
        match &cfg.cluster {
            None => Ok(Admin::Local(cfg.data_dir.clone())),
            Some(c) => Ok(Admin::Cluster(Stores::open_nats(c).context("opening the cluster store")?)),
        }
    }

    /// Runs `req`; on the cluster, returns once its writes are durable.
    ///
    /// # Errors
    /// Store, socket or NATS failures, or the operation's own error.
    pub fn run(&self, req: Request) -> anyhow::Result<Response> {
        let stores = match self {
            Admin::Local(dir) => return run(dir, req),
            Admin::Cluster(s) => s,
        };
        let resp = crate::accounts::service::apply(stores, None, req);
        if !resp.ok {
            bail!(resp.error.clone().unwrap_or_else(|| "failed".into()));
        }
        // A plain thread (the CLI's): a runtime of its own may block here.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        rt.block_on(async {
            let mut rx = stores.durability.committed();
            tokio::time::timeout(CLUSTER_ACK_TIMEOUT, crate::storage::wait_durable(&mut rx, resp.ticket)).await
        })
        .map_err(|_| anyhow!("NATS did not acknowledge the write within {} s", CLUSTER_ACK_TIMEOUT.as_secs()))?
        .context("the cluster store stopped before the write was acknowledged")?;
        Ok(resp)
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Admin::Cluster(s) = self {
            s.durability.shutdown();
        }
    }
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

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
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::server::Server;
use crate::storage::{Stores, UserRecord};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Creates accounts; fails if any exists unless `replace`.
    Put {
        users: Vec<(String, UserRecord)>,
        replace: bool,
        must_exist: bool,
    },
    Delete {
        local: String,
    },
    /// The number was registered again by whoever holds it now (a new
    /// SIM owner): the previous owner's sessions end and everything it
    /// left (queue, roster and the subscriptions others have to it,
    /// groups, profile, settings, block list) is erased before the new
    /// credentials are written.
    Reassign {
        local: String,
        user: UserRecord,
    },
    List,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub count: usize,
    /// Store ticket of the request's last write: the caller may wait for
    /// it to be durable before promising anything.
    #[serde(default)]
    pub ticket: u64,
}

impl Response {
    fn done(count: usize, ticket: u64) -> Response {
        Response { ok: true, error: None, users: Vec::new(), count, ticket }
    }
}

fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Executes a request against the stores (and the live server, if any).
pub fn execute(stores: &Stores, srv: Option<&Server>, req: Request) -> Response {
    let fail = |e: String| Response { ok: false, error: Some(e), users: Vec::new(), count: 0, ticket: 0 };
    match req {
        Request::Put { users, replace, must_exist } => {
            let mut replaced = Vec::new();
            for (local, _) in &users {
                let exists = match stores.users.get_user(local) {
                    Ok(x) => x.is_some(),
                    Err(e) => return fail(e.to_string()),
                };
                if must_exist && !exists {
                    return fail(format!("no account {local}"));
                }
                if !replace && exists {
                    return fail(format!("account {local} already exists"));
                }
                if exists {
                    replaced.push(local);
                }
            }
            let ticket = match stores.users.put_users(&users) {
                Ok(t) => t,
                Err(e) => return fail(e.to_string()),
            };
            if let Some(srv) = srv {
                // Sessions authenticated with the old key end, whichever
                // path changed it (passwd, import, re-registration).
                for local in replaced {
                    srv.kick_account(local);
                }
            }
            Response::done(users.len(), ticket)
        }
        Request::Delete { local } => {
            match stores.users.get_user(&local) {
                Ok(Some(_)) => {}
                Ok(None) => return fail(format!("no account {local}")),
                Err(e) => return fail(e.to_string()),
            }
            if let Some(srv) = srv {
                srv.kick_account(&local);
            }
            let r = stores.users.delete_user(&local).and_then(|_| erase_account_data(stores, srv, &local));
            match r {
                Ok(t) => Response::done(1, t),
                Err(e) => fail(e.to_string()),
            }
        }
        Request::Reassign { local, user } => {
            if let Some(srv) = srv {
                srv.kick_account(&local);
            }
            let r = erase_account_data(stores, srv, &local).and_then(|_| stores.users.put_user(&local, &user));
            if let Some(srv) = srv {
                // A session that logged in between the kick and the new
                // credentials used the old ones.
                srv.kick_account(&local);
            }
            match r {
                Ok(t) => Response::done(1, t),
                Err(e) => fail(e.to_string()),
            }
        }
        Request::List => match stores.users.list_users() {
            Ok(users) => Response { ok: true, error: None, count: users.len(), users, ticket: 0 },
            Err(e) => fail(e.to_string()),
        },
    }
}

/// Erases everything stored for `local` except its credentials: offline
/// queue, roster, settings (privacy, block list, profile, last seen),
/// group memberships and invitations, and the subscriptions other
/// accounts hold to it, so nothing of the account survives for whoever
/// holds the number next.
///
/// # Errors
/// The first store failure.
pub fn erase_account_data(stores: &Stores, srv: Option<&Server>, local: &str) -> crate::storage::Result<u64> {
    let domain = srv.map(|s| s.domain().to_string());
    for item in stores.roster.roster(local)? {
        let Some((other, d)) = item.jid.split_once('@') else { continue };
        if domain.as_deref().is_some_and(|dom| dom != d) {
            continue;
        }
        let me = format!("{local}@{d}");
        if let Some(mut theirs) = stores.roster.roster_item(other, &me)? {
            theirs.subscription = crate::storage::Subscription::None;
            theirs.ask = false;
            theirs.pending_in = false;
            theirs.approved = false;
            if theirs.hidden {
                stores.roster.remove_roster_item(other, &me)?;
            } else {
                stores.roster.put_roster_item(other, &theirs)?;
            }
        }
    }
    stores.offline.clear(local)?;
    stores.roster.clear_roster(local)?;
    crate::modules::groups::forget_account(stores, local);
    let ticket = stores.settings.clear_settings(local)?;
    if let Some(srv) = srv {
        srv.router.queue_changed(Some(local));
        srv.policies.forget(local);
    }
    Ok(ticket)
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
                            tokio::task::spawn_blocking(move || execute(&srv2.stores, Some(&srv2), req))
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
            let resp = execute(&stores, None, req);
            stores.durability.shutdown();
            resp
        }
    };
    if !resp.ok {
        bail!(resp.error.clone().unwrap_or_else(|| "failed".into()));
    }
    Ok(resp)
}

//! The account service: every change to accounts as a whole — create,
//! change credentials, delete, hand a number to a new owner — goes
//! through [`apply`], whichever door it came in by (`chatd user …` over
//! the admin socket or on the store directly, the SMS registration API,
//! in-band registration). So "a password change ends the other sessions"
//! and "a deleted or reassigned account leaves nothing behind" hold on
//! every path.

use serde::{Deserialize, Serialize};

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

/// Applies a request to the stores (and to the live server, if any).
pub fn apply(stores: &Stores, srv: Option<&Server>, req: Request) -> Response {
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
    let built;
    let hooks = match srv {
        Some(srv) => &srv.hooks,
        None => {
            built = crate::hooks::Hooks::build(crate::modules::ALL);
            &built
        }
    };
    let mut ticket = 0;
    for f in hooks.account_erased_hooks() {
        ticket = ticket.max(f(stores, srv, local)?);
    }
    // Settings hold documents of several modules (privacy, profile, last
    // seen): they go as one.
    Ok(ticket.max(stores.settings.clear_settings(local)?))
}

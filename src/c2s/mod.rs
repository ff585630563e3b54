//! Client-to-server connections (RFC 6120): accept loop, per-connection
//! task, stream negotiation (STARTTLS, SASL, bind) and the session's
//! stanza loop.
//!
//! Limits follow the mini-redis pattern: a connection permit is taken
//! from a semaphore *before* `accept`, so at most `max_connections`
//! sockets are open and further clients wait in the kernel backlog
//! instead of exhausting file descriptors.

pub mod backlog;
pub mod close;
pub mod conn;
pub mod guard;
pub mod negotiate;
pub mod resume;
pub mod sasl;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::server::Server;

/// What the client listeners share beyond the server: the SASL server,
/// the login guards and the connection limit. It lives here, not in
/// [`Server`], so that nothing below `c2s` — sessions, modules, the
/// router, the stores — depends on how clients connect: another
/// transport brings its own listener state and reaches the same session
/// code.
pub struct C2s {
    pub srv: Arc<Server>,
    pub sasl: sasl::Sasl,
    /// Per-address caps, login throttle and the password-hashing pool.
    pub guards: guard::Guards,
    /// Open client connections, at most `limits.max_connections`.
    pub connections: Arc<Semaphore>,
}

impl C2s {
    /// # Errors
    /// When the SCRAM secret cannot be read or created.
    pub fn new(srv: Arc<Server>) -> anyhow::Result<Arc<C2s>> {
        let cfg = &srv.cfg;
        let secret = sasl::load_secret(&cfg.data_dir)?;
        let sasl = sasl::Sasl::new(
            srv.stores.users.clone(),
            &cfg.domain,
            secret,
            cfg.auth.scram_iterations,
            srv.tls_end_point.clone(),
        );
        let guards = guard::Guards::new(&cfg.auth);
        let connections = Arc::new(Semaphore::new(cfg.limits.max_connections));
        Ok(Arc::new(C2s { sasl, guards, connections, srv }))
    }
}

/// Accepts connections on the STARTTLS and direct-TLS listeners until the
/// task is aborted.
///
/// One loop serves both listeners so that exactly one permit waits in
/// `accept` at a time: every one of `max_connections` permits can go to a
/// client, whichever listener it arrives on.
pub async fn accept_loop(c2s: Arc<C2s>, starttls: Option<TcpListener>, direct_tls: Option<TcpListener>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let Ok(permit) = c2s.connections.clone().acquire_owned().await else { return };
        let accepted = tokio::select! {
            r = accept_opt(starttls.as_ref()) => r.map(|(s, p)| (s, p, false)),
            r = accept_opt(direct_tls.as_ref()) => r.map(|(s, p)| (s, p, true)),
        };
        match accepted {
            Ok((sock, peer, tls)) => {
                backoff = Duration::from_millis(5);
                let _ = sock.set_nodelay(true);
                let ka = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(60))
                    .with_interval(Duration::from_secs(15));
                let _ = socket2::SockRef::from(&sock).set_tcp_keepalive(&ka);
                let c2s = c2s.clone();
                tokio::spawn(async move {
                    conn::run(c2s, sock, peer, tls).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                drop(permit);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn accept_opt(l: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

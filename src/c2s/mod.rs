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
pub mod session;
pub mod tls;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::server::Server;

/// Accepts connections on the STARTTLS and direct-TLS listeners until the
/// task is aborted.
///
/// One loop serves both listeners so that exactly one permit waits in
/// `accept` at a time: every one of `max_connections` permits can go to a
/// client, whichever listener it arrives on.
pub async fn accept_loop(srv: Arc<Server>, starttls: Option<TcpListener>, direct_tls: Option<TcpListener>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let Ok(permit) = srv.connections.clone().acquire_owned().await else { return };
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
                let srv = srv.clone();
                tokio::spawn(async move {
                    conn::run(srv, sock, peer, tls).await;
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

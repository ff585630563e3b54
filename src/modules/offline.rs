//! XEP-0160 offline messages with XEP-0203 delay stamps: the queue is
//! read when a session sends its initial presence (see
//! [`super::presence`]), in bounded batches by the connection loop.
//! This module runs the expiry reaper: undelivered messages older than
//! `offline.expiry_days` are deleted.

use std::sync::Arc;
use std::time::Duration;

use crate::hooks::{Hooks, Module};
use crate::server::Server;

pub const MODULE: Module = Module { name: "offline", specs: &["XEP-0160", "XEP-0203"], register };

fn register(h: &mut Hooks) {
    h.disco_feature("msgoffline");
    h.disco_feature(crate::protocol::ns::DELAY);
    h.account_erased(|stores, srv, local| {
        let t = stores.offline.clear(local)?;
        if let Some(srv) = srv {
            srv.router.queue_changed(Some(local));
        }
        Ok(t)
    });
}

/// Deletes expired messages every `reap_interval_secs`.
pub async fn reaper(srv: Arc<Server>) {
    let every = Duration::from_secs(srv.cfg.offline.reap_interval_secs.max(1));
    let ttl_ms = srv.cfg.offline.expiry_days.saturating_mul(86_400_000);
    loop {
        tokio::time::sleep(every).await;
        let cutoff = crate::accounts::now_ms().saturating_sub(ttl_ms);
        let offline = srv.stores.offline.clone();
        match tokio::task::spawn_blocking(move || offline.expire(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(expired = n, "offline messages expired");
                // Cached queue lengths are now too high; reload lazily.
                srv.router.queue_changed(None);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "offline expiry failed"),
            Err(_) => {}
        }
    }
}

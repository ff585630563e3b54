//! Media expiry: every `reap_interval_secs`, references uploaded more
//! than `expiry_days` ago are released, and blobs left without any
//! reference are deleted.

use std::sync::Arc;
use std::time::Duration;

use super::Media;

/// Runs forever.
pub async fn run(media: Arc<Media>) {
    let every = Duration::from_secs(media.cfg.reap_interval_secs.max(1));
    loop {
        tokio::time::sleep(every).await;
        let cutoff = super::now_ms().saturating_sub(media.cfg.expiry_ms());
        let m = media.clone();
        match tokio::task::spawn_blocking(move || m.expire(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(expired = n, "media links expired"),
            Ok(Err(e)) => tracing::error!(error = %e, "media expiry failed"),
            Err(_) => {}
        }
    }
}

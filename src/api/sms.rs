//! SMS gateways for registration codes.
//!
//! - `log` (default): writes the code to the log and appends
//!   `<phone> <code>` to `DATA_DIR/sms-outbox.log`, for development and
//!   for bridging by a separate process.
//! - `webhook`: POSTs `{"phone":"+15551234567","code":"123456","method":"sms"}`
//!   as JSON to `sms.webhook_url` (http:// or https://), retrying with
//!   backoff, so any SMS provider can be bridged.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[sms]` settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmsConfig {
    /// `log` or `webhook`.
    pub gateway: String,
    /// Where the `webhook` gateway POSTs codes.
    pub webhook_url: String,
    /// Attempts per code for the webhook.
    pub webhook_attempts: u32,
    /// PEM bundle of CAs trusted for an https webhook.
    pub webhook_ca_file: String,
    /// Seconds a code stays valid.
    pub code_ttl_secs: u64,
    /// Wrong guesses that burn a code.
    pub max_attempts: u32,
    /// Seconds before the same number may request another code.
    pub resend_secs: u64,
    /// Codes one number may request per hour.
    pub per_phone_per_hour: usize,
    /// Code requests one client IP (IPv6: one /64) may make per hour.
    pub per_ip_per_hour: usize,
    /// Codes the whole server may send per hour, whoever asks: the cap on
    /// what SMS pumping can cost.
    pub global_per_hour: usize,
}

impl Default for SmsConfig {
    fn default() -> Self {
        SmsConfig {
            gateway: "log".into(),
            webhook_url: String::new(),
            webhook_attempts: 3,
            webhook_ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
            code_ttl_secs: 600,
            max_attempts: 5,
            resend_secs: 60,
            per_phone_per_hour: 5,
            per_ip_per_hour: 20,
            global_per_hour: 1000,
        }
    }
}

/// Something that delivers a code to a phone.
pub trait Gateway: Send + Sync {
    /// Queues delivery; failures are logged, not returned, so the API
    /// answers at once and does not reveal gateway state.
    fn send(&self, phone_e164: &str, code: &str, method: &str);
}

/// Builds the configured gateway.
///
/// # Errors
/// Unknown gateway name or missing webhook URL.
pub fn gateway(cfg: &SmsConfig, data_dir: &std::path::Path) -> anyhow::Result<Arc<dyn Gateway>> {
    match cfg.gateway.as_str() {
        "log" => Ok(Arc::new(LogGateway { path: data_dir.join("sms-outbox.log"), lock: std::sync::Mutex::new(()) })),
        "webhook" => {
            if cfg.webhook_url.is_empty() {
                bail!("sms.gateway = \"webhook\" needs sms.webhook_url");
            }
            Ok(Arc::new(Webhook { cfg: cfg.clone() }))
        }
        other => bail!("unknown sms.gateway {other:?} (log or webhook)"),
    }
}

struct LogGateway {
    path: PathBuf,
    lock: std::sync::Mutex<()>,
}

impl Gateway for LogGateway {
    fn send(&self, phone: &str, code: &str, method: &str) {
        // The code is a credential: only debug logs may carry it; the
        // outbox file (0600) is where a bridge or a developer reads it.
        tracing::debug!(phone, code, method, "registration code (log gateway)");
        tracing::info!(phone, method, "registration code written to the sms outbox");
        let _g = self.lock.lock();
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{phone} {code}"));
        if let Err(e) = r {
            tracing::error!(path = %self.path.display(), error = %e, "writing sms outbox failed");
        }
    }
}

struct Webhook {
    cfg: SmsConfig,
}

impl Gateway for Webhook {
    fn send(&self, phone: &str, code: &str, method: &str) {
        let cfg = self.cfg.clone();
        let body = serde_json::json!({ "phone": format!("+{phone}"), "code": code, "method": method }).to_string();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            for attempt in 1..=cfg.webhook_attempts.max(1) {
                match post(&cfg, &body).await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(attempt, error = %e, "sms webhook failed"),
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            tracing::error!("sms webhook gave up");
        });
    }
}

/// One HTTP/1.1 POST; success is any 2xx status.
async fn post(cfg: &SmsConfig, body: &str) -> anyhow::Result<()> {
    let url = &cfg.webhook_url;
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("webhook_url must start with http:// or https://");
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().context("webhook port")?),
        None => (hostport, if tls { 443 } else { 80 }),
    };
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sock = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host, port))).await??;
    let mut resp = Vec::new();
    let io = async {
        if tls {
            let mut roots = rustls::RootCertStore::empty();
            use rustls_pki_types::pem::PemObject;
            for c in rustls_pki_types::CertificateDer::pem_file_iter(&cfg.webhook_ca_file)
                .with_context(|| format!("reading {}", cfg.webhook_ca_file))?
                .flatten()
            {
                let _ = roots.add(c);
            }
            let cc = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|_| anyhow!("bad host"))?;
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cc)).connect(name, sock).await?;
            s.write_all(req.as_bytes()).await?;
            s.read_to_end(&mut resp).await?;
        } else {
            let mut s = sock;
            s.write_all(req.as_bytes()).await?;
            s.read_to_end(&mut resp).await?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(15), io).await??;
    let status = String::from_utf8_lossy(&resp[..resp.len().min(32)]).to_string();
    let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if !(200..300).contains(&code) {
        bail!("webhook answered {status:?}");
    }
    Ok(())
}

//! TLS for client streams (rustls with the ring provider).
//!
//! With no certificate configured, a self-signed one for the domain is
//! generated on first start into `DATA_DIR/tls/` and reused afterwards,
//! and its SHA-256 fingerprint is logged so users can pin it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// Builds the rustls server configuration.
///
/// # Errors
/// Unreadable or invalid certificate/key, or generation failure.
pub fn server_config(cfg: &Config) -> anyhow::Result<Arc<ServerConfig>> {
    let (cert_path, key_path) = if cfg.tls.cert.is_empty() {
        let dir = cfg.data_dir.join("tls");
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        if !c.exists() || !k.exists() {
            generate(&cfg.domain, &dir, &c, &k)?;
        }
        (c, k)
    } else {
        (cfg.tls.cert.clone().into(), cfg.tls.key.clone().into())
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    let first = certs.first().ok_or_else(|| anyhow!("{} holds no certificate", cert_path.display()))?;
    let fp: String = Sha256::digest(first.as_ref()).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
    tracing::info!(cert = %cert_path.display(), sha256 = %fp, "TLS certificate");
    let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    sc.alpn_protocols = vec![b"xmpp-client".to_vec()];
    // No session tickets or cache: resumption saves little for persistent
    // connections and costs memory per connection.
    sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(sc))
}

fn generate(domain: &str, dir: &Path, cert: &Path, key: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ck = rcgen::generate_simple_self_signed(vec![domain.to_string()])?;
    std::fs::write(cert, ck.cert.pem())?;
    // Born 0600 (not chmodded afterwards): the key is never readable by
    // others, not even for an instant.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(key)?, ck.signing_key.serialize_pem().as_bytes())?;
    tracing::info!(domain, "generated a self-signed certificate");
    Ok(())
}

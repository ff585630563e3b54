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

/// Builds the rustls server configuration, and the certificate's
/// `tls-server-end-point` channel binding (see [`end_point_binding`]).
///
/// # Errors
/// Unreadable or invalid certificate/key, or generation failure.
pub fn server_config(cfg: &Config) -> anyhow::Result<(Arc<ServerConfig>, Option<Vec<u8>>)> {
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
    let end_point = end_point_binding(first.as_ref());
    if end_point.is_none() {
        tracing::info!("certificate signature algorithm defines no tls-server-end-point binding; not offered");
    }
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
    Ok((Arc::new(sc), end_point))
}

/// The `tls-server-end-point` channel binding of a certificate (RFC 5929
/// §4.1): its hash with the hash function of its signature algorithm,
/// SHA-256 for MD5 and SHA-1. `None` for algorithms that name no single
/// hash (Ed25519, RSA-PSS) or a certificate that cannot be read.
///
/// Unlike `tls-exporter` this binding exists on every TLS version, so
/// `-PLUS` can be offered on TLS 1.2 as well.
pub fn end_point_binding(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Sha384, Sha512};
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (cert, _) = der_tlv(der, 0x30)?;
    let (_, after_tbs) = der_tlv(cert, 0x30)?;
    let (alg, _) = der_tlv(after_tbs, 0x30)?;
    let (oid, _) = der_tlv(alg, 0x06)?;
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let bits = match oid {
        // md5WithRSA, sha1WithRSA, sha256WithRSA
        [p @ .., 4 | 5 | 11] if p == RSA => 256,
        [p @ .., 12] if p == RSA => 384,
        [p @ .., 13] if p == RSA => 512,
        // ecdsa-with-SHA1
        [p @ .., 1] if p == ECDSA => 256,
        // ecdsa-with-SHA256/384/512
        [p @ .., 3, 2] if p == ECDSA => 256,
        [p @ .., 3, 3] if p == ECDSA => 384,
        [p @ .., 3, 4] if p == ECDSA => 512,
        _ => return None,
    };
    Some(match bits {
        256 => Sha256::digest(der).to_vec(),
        384 => Sha384::digest(der).to_vec(),
        _ => Sha512::digest(der).to_vec(),
    })
}

/// Reads one DER element with tag `tag`: (contents, rest).
fn der_tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, b) = b.split_first()?;
    let (&l, mut b) = b.split_first()?;
    if t != tag {
        return None;
    }
    let len = if l < 0x80 {
        usize::from(l)
    } else {
        let n = usize::from(l & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let v = b[..n].iter().fold(0usize, |a, &x| (a << 8) | usize::from(x));
        b = &b[n..];
        v
    };
    (b.len() >= len).then(|| b.split_at(len))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_of_generated_certificate() {
        // rcgen signs with ECDSA P-256 / SHA-256 by default.
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = ck.cert.der().to_vec();
        assert_eq!(end_point_binding(&der), Some(Sha256::digest(&der).to_vec()));
        assert_eq!(end_point_binding(&der[..10]), None);
        assert_eq!(end_point_binding(b""), None);
    }
}

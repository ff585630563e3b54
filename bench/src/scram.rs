//! SCRAM client (RFC 5802 / RFC 7677) with a process-wide cache of salted
//! passwords, so repeated logins of the same account cost no PBKDF2 work.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut m = Hmac::<Sha1>::new_from_slice(key).expect("hmac accepts any key");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn salted(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut out = vec![0u8; 20];
                pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
                out
            }
            ScramHash::Sha256 => {
                let mut out = vec![0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out
            }
        }
    }
}

type CacheKey = (ScramHash, String, Vec<u8>, u32);

fn cache() -> &'static Mutex<HashMap<CacheKey, Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Vec<u8>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// SaltedPassword for (hash, password, salt, iterations), from the cache or
/// computed on the blocking pool and then cached.
pub async fn salted_password(hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> Result<Vec<u8>> {
    let key = (hash, password.to_string(), salt.to_vec(), iterations);
    if let Some(v) = cache().lock().expect("cache lock").get(&key) {
        return Ok(v.clone());
    }
    let (pw, s) = (password.to_string(), salt.to_vec());
    let v =
        tokio::task::spawn_blocking(move || hash.salted(pw.as_bytes(), &s, iterations)).await.context("pbkdf2 task")?;
    cache().lock().expect("cache lock").insert(key, v.clone());
    Ok(v)
}

/// Number of cached salted passwords.
pub fn cache_len() -> usize {
    cache().lock().expect("cache lock").len()
}

/// Parameters of a server-first-message.
#[derive(Debug, Clone)]
pub struct ServerFirst {
    pub nonce: String,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

pub fn parse_server_first(msg: &str, client_nonce: &str) -> Result<ServerFirst> {
    let (mut nonce, mut salt, mut iterations) = (None, None, None);
    for part in msg.split(',') {
        if let Some(v) = part.strip_prefix("r=") {
            nonce = Some(v.to_string());
        } else if let Some(v) = part.strip_prefix("s=") {
            salt = Some(B64.decode(v).context("salt is not base64")?);
        } else if let Some(v) = part.strip_prefix("i=") {
            iterations = Some(v.parse::<u32>().context("bad iteration count")?);
        } else if part.starts_with("m=") {
            bail!("server requires an unsupported SCRAM extension");
        }
    }
    let nonce = nonce.ok_or_else(|| anyhow!("server-first without nonce"))?;
    if !nonce.starts_with(client_nonce) {
        bail!("server nonce does not extend the client nonce");
    }
    Ok(ServerFirst {
        nonce,
        salt: salt.ok_or_else(|| anyhow!("server-first without salt"))?,
        iterations: iterations.ok_or_else(|| anyhow!("server-first without iterations"))?,
    })
}

fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// One SCRAM exchange.
pub struct ScramClient {
    hash: ScramHash,
    password: String,
    client_nonce: String,
    client_first_bare: String,
    server_signature: Vec<u8>,
}

impl ScramClient {
    pub fn new(hash: ScramHash, user: &str, password: &str, client_nonce: String) -> Self {
        let client_first_bare = format!("n={},r={}", saslname(user), client_nonce);
        ScramClient {
            hash,
            password: password.to_string(),
            client_nonce,
            client_first_bare,
            server_signature: Vec::new(),
        }
    }

    pub fn with_random_nonce(hash: ScramHash, user: &str, password: &str) -> Self {
        use rand::Rng;
        let bytes: [u8; 18] = rand::thread_rng().r#gen();
        Self::new(hash, user, password, B64.encode(bytes))
    }

    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    pub fn client_nonce(&self) -> &str {
        &self.client_nonce
    }

    /// Computes the client-final-message for a server-first-message.
    pub async fn client_final(&mut self, server_first: &str) -> Result<String> {
        let sf = parse_server_first(server_first, &self.client_nonce)?;
        let salted = salted_password(self.hash, &self.password, &sf.salt, sf.iterations).await?;
        Ok(self.finish(server_first, &sf.nonce, &salted))
    }

    fn finish(&mut self, server_first: &str, nonce: &str, salted: &[u8]) -> String {
        let h = self.hash;
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{},{}", self.client_first_bare, server_first, without_proof);
        let client_key = h.hmac(salted, b"Client Key");
        let stored_key = h.digest(&client_key);
        let client_sig = h.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(client_sig.iter()).map(|(a, b)| a ^ b).collect();
        let server_key = h.hmac(salted, b"Server Key");
        self.server_signature = h.hmac(&server_key, auth_message.as_bytes());
        format!("{without_proof},p={}", B64.encode(proof))
    }

    /// Checks the server-final-message (`v=...`).
    pub fn verify_server_final(&self, msg: &str) -> Result<()> {
        for part in msg.split(',') {
            if let Some(v) = part.strip_prefix("v=") {
                let sig = B64.decode(v).context("server signature is not base64")?;
                if sig == self.server_signature {
                    return Ok(());
                }
                bail!("server signature mismatch");
            }
            if let Some(e) = part.strip_prefix("e=") {
                bail!("server reported SCRAM error: {e}");
            }
        }
        bail!("server-final without verifier")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(hash: ScramHash, nonce: &str, server_first: &str, expect_final: &str, server_final: &str) {
        let mut c = ScramClient::new(hash, "user", "pencil", nonce.to_string());
        assert_eq!(c.client_first(), format!("n,,n=user,r={nonce}"));
        let cf = c.client_final(server_first).await.unwrap();
        assert_eq!(cf, expect_final);
        c.verify_server_final(server_final).unwrap();
        assert!(c.verify_server_final("v=AAAA").is_err());
    }

    #[tokio::test]
    async fn rfc5802_sha1_vector() {
        exchange(
            ScramHash::Sha1,
            "fyko+d2lbbFgONRv9qkxdawL",
            "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        )
        .await;
    }

    #[tokio::test]
    async fn rfc7677_sha256_vector() {
        exchange(
            ScramHash::Sha256,
            "rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        )
        .await;
        assert!(cache_len() >= 1);
    }

    #[test]
    fn rejects_foreign_nonce() {
        assert!(parse_server_first("r=other,s=QSXCR+Q6sek8bf92,i=4096", "fyko").is_err());
    }
}

//! SASL (RFC 6120 §6): SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802, RFC 7677),
//! their `-PLUS` variants, and PLAIN (RFC 4616).
//!
//! The SCRAM server is implemented here rather than taken from a SASL
//! library because a login server needs control over details that those
//! libraries fix:
//! - server nonces from an alphabet every client parses (alphanumerics;
//!   some SCRAM parsers break on `"` or `\`);
//! - which channel-binding types are accepted: `tls-exporter` (RFC 9266,
//!   TLS 1.3 only) and `tls-server-end-point` (RFC 5929, any TLS version);
//! - an answer for an unknown account that looks exactly like one for a
//!   real account (same salt length, a stable salt, same iteration count),
//!   so registered numbers cannot be told apart before login;
//! - a reason for every failure, and whether a password was actually
//!   checked (only those count towards the per-connection failure limit
//!   and the login throttle);
//! - password hashing (PLAIN) handed back to the caller as a [`Check`], so
//!   it can run off the async workers after the throttle's delay.
//!
//! Which mechanisms a connection sees depends on its transport:
//! - plaintext: SCRAM, and PLAIN only with `allow_plaintext`;
//! - TLS: `-PLUS` first (when at least one binding type is available),
//!   then SCRAM, then PLAIN.
//!
//! Downgrade protection (RFC 5802 §6): when `-PLUS` was offered, a client
//! that says it supports channel binding but thinks the server does not
//! (gs2 flag `y`) is refused.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::accounts;
use crate::storage::{ScramKeys, UserStore};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Length of the per-account salts [`accounts::make_record`] creates; an
/// unknown account gets a derived salt of the same length.
const SALT_LEN: usize = 16;
/// Server nonce length in alphanumerics (~190 bits).
const NONCE_LEN: usize = 32;
/// Longest SCRAM username accepted (phone numbers are far shorter).
const MAX_USER: usize = 256;

/// Channel-binding types, in the order they are advertised (XEP-0440).
pub const CB_EXPORTER: &str = "tls-exporter";
pub const CB_END_POINT: &str = "tls-server-end-point";

/// The channel-binding data of one TLS connection.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    /// TLS-Exporter("EXPORTER-Channel-Binding", "", 32); TLS 1.3 only.
    pub exporter: Option<Vec<u8>>,
    /// Hash of the server certificate (RFC 5929 §4.1).
    pub end_point: Option<Arc<Vec<u8>>>,
}

impl Bindings {
    /// Binding types this connection can verify.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.exporter.is_some() {
            v.push(CB_EXPORTER);
        }
        if self.end_point.is_some() {
            v.push(CB_END_POINT);
        }
        v
    }

    fn data(&self, name: &str) -> Option<&[u8]> {
        match name {
            CB_EXPORTER => self.exporter.as_deref(),
            CB_END_POINT => self.end_point.as_deref().map(|v| v.as_slice()),
            _ => None,
        }
    }

    fn any(&self) -> bool {
        self.exporter.is_some() || self.end_point.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC accepts keys of any length.
            let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Hash::Sha1 => run::<Hmac<Sha1>>(key, parts),
            Hash::Sha256 => run::<Hmac<Sha256>>(key, parts),
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => Sha1::digest(data).to_vec(),
            Hash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Hash::Sha1 => b"SCRAM-SHA-1",
            Hash::Sha256 => b"SCRAM-SHA-256",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mech {
    Scram { hash: Hash, plus: bool },
    Plain,
}

impl Mech {
    fn parse(name: &str) -> Option<Mech> {
        Some(match name {
            "SCRAM-SHA-256-PLUS" => Mech::Scram { hash: Hash::Sha256, plus: true },
            "SCRAM-SHA-1-PLUS" => Mech::Scram { hash: Hash::Sha1, plus: true },
            "SCRAM-SHA-256" => Mech::Scram { hash: Hash::Sha256, plus: false },
            "SCRAM-SHA-1" => Mech::Scram { hash: Hash::Sha1, plus: false },
            "PLAIN" => Mech::Plain,
            _ => return None,
        })
    }
}

/// Why an exchange failed: the `<failure/>` condition, a human-readable
/// `<text>`, and whether credentials were actually checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub condition: &'static str,
    pub text: String,
    /// A password or SCRAM proof was verified and was wrong (or named an
    /// unknown account). Only these count as failed logins.
    pub credentials: bool,
}

impl Failure {
    fn new(condition: &'static str, text: impl Into<String>) -> Failure {
        Failure { condition, text: text.into(), credentials: false }
    }

    fn malformed(text: impl Into<String>) -> Failure {
        Failure::new("malformed-request", text)
    }

    fn credentials() -> Failure {
        Failure { condition: "not-authorized", text: "wrong username or password".into(), credentials: true }
    }
}

/// Result of one SASL step.
#[derive(Debug)]
pub enum Step {
    Challenge(Vec<u8>),
    /// Credentials are ready to be verified: run [`Check::run`] (off the
    /// async workers for PLAIN) and then [`Exchange::finish`].
    Verify(Check),
    Failure(Failure),
}

/// Per-server SASL state.
pub struct Sasl {
    users: Arc<dyn UserStore>,
    domain: String,
    /// Key for the salts of accounts that do not exist.
    secret: [u8; 32],
    /// Iteration count shown for accounts that do not exist.
    iterations: u32,
    end_point: Option<Arc<Vec<u8>>>,
}

impl Sasl {
    /// `secret` keys the salts of unknown accounts (see [`load_secret`]);
    /// `end_point` is the `tls-server-end-point` binding of the server
    /// certificate, when its signature algorithm defines one.
    pub fn new(
        users: Arc<dyn UserStore>,
        domain: &str,
        secret: [u8; 32],
        iterations: u32,
        end_point: Option<Vec<u8>>,
    ) -> Sasl {
        Sasl { users, domain: domain.to_string(), secret, iterations, end_point: end_point.map(Arc::new) }
    }

    /// The channel bindings of a TLS connection; `exporter` is its
    /// TLS-Exporter value when it runs TLS 1.3.
    pub fn bindings(&self, exporter: Option<Vec<u8>>) -> Bindings {
        Bindings { exporter, end_point: self.end_point.clone() }
    }

    /// Mechanism names for `<mechanisms/>`. `cb` is `None` on plaintext.
    pub fn offered(&self, cb: Option<&Bindings>, allow_plain: bool) -> Vec<&'static str> {
        let mut v = Vec::new();
        if cb.is_some_and(Bindings::any) {
            v.extend(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"]);
        }
        v.extend(["SCRAM-SHA-256", "SCRAM-SHA-1"]);
        if cb.is_some() || allow_plain {
            v.push("PLAIN");
        }
        v
    }

    /// Starts an exchange on a connection whose transport offers
    /// `offered` (from [`Sasl::offered`]).
    ///
    /// # Errors
    /// `invalid-mechanism` when the mechanism is not offered here.
    pub fn start(&self, mech: &str, cb: Option<&Bindings>, allow_plain: bool) -> Result<Exchange, Failure> {
        let offered = self.offered(cb, allow_plain);
        let m = Mech::parse(mech).filter(|_| offered.contains(&mech)).ok_or_else(|| {
            Failure::new("invalid-mechanism", format!("mechanism not offered here; offered: {}", offered.join(" ")))
        })?;
        Ok(Exchange {
            mech: m,
            cb: cb.cloned().unwrap_or_default(),
            plus_offered: cb.is_some_and(Bindings::any),
            state: State::Start,
            users: self.users.clone(),
            domain: self.domain.clone(),
            secret: self.secret,
            iterations: self.iterations,
        })
    }
}

/// Reads the secret that keys unknown accounts' salts from
/// `DATA_DIR/scram-secret`, creating it (mode 0600) on first start. It
/// must persist: a salt that changed between two probes would give the
/// unknown account away.
///
/// # Errors
/// The file cannot be read or created, or has the wrong size.
pub fn load_secret(data_dir: &Path) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context;
    use std::io::Write;
    let path = data_dir.join("scram-secret");
    match std::fs::read(&path) {
        Ok(b) => b.try_into().map_err(|_| anyhow::anyhow!("{} must hold exactly 32 bytes", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            let tmp = data_dir.join("scram-secret.tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut f = o.open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&secret)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
            if let Ok(d) = std::fs::File::open(data_dir) {
                let _ = d.sync_all();
            }
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

enum State {
    Start,
    /// server-first sent; waiting for client-final.
    ServerFirst(Box<ServerFirst>),
    Done,
}

struct ServerFirst {
    hash: Hash,
    local: String,
    keys: ScramKeys,
    known: bool,
    gs2_header: String,
    cb_data: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// One running SASL exchange.
pub struct Exchange {
    mech: Mech,
    cb: Bindings,
    /// `-PLUS` was offered on this connection (downgrade detection).
    plus_offered: bool,
    state: State,
    users: Arc<dyn UserStore>,
    domain: String,
    secret: [u8; 32],
    iterations: u32,
}

/// Credentials waiting to be verified.
pub struct Check {
    /// The account the client named (it may not exist).
    pub local: String,
    kind: CheckKind,
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Check").field("local", &self.local).finish_non_exhaustive()
    }
}

enum CheckKind {
    Plain { password: String, keys: ScramKeys, known: bool },
    Scram { hash: Hash, keys: ScramKeys, auth_message: String, proof: Vec<u8>, known: bool },
}

impl Check {
    /// Whether verifying costs a password hash (PBKDF2): such checks run
    /// on the blocking pool.
    pub fn is_costly(&self) -> bool {
        matches!(self.kind, CheckKind::Plain { .. })
    }

    /// Verifies the credentials: `Ok(additional data for <success/>)`.
    ///
    /// # Errors
    /// A [`Failure`] with `credentials: true` when they are wrong.
    pub fn run(&self) -> Result<Vec<u8>, Failure> {
        match &self.kind {
            CheckKind::Plain { password, keys, known } => {
                // Unknown accounts cost the same derivation as real ones.
                let pw = accounts::prep_password(password);
                let got = accounts::derive_sha256(pw.as_bytes(), &keys.salt, keys.iterations);
                if bool::from(got.stored_key.ct_eq(&keys.stored_key)) && *known {
                    Ok(Vec::new())
                } else {
                    Err(Failure::credentials())
                }
            }
            CheckKind::Scram { hash, keys, auth_message, proof, known } => {
                let sig = hash.hmac(&keys.stored_key, &[auth_message.as_bytes()]);
                let client_key: Vec<u8> = proof.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
                if bool::from(hash.digest(&client_key).ct_eq(&keys.stored_key)) && *known {
                    let v = hash.hmac(&keys.server_key, &[auth_message.as_bytes()]);
                    Ok(format!("v={}", B64.encode(v)).into_bytes())
                } else {
                    Err(Failure::credentials())
                }
            }
        }
    }
}

impl Exchange {
    /// The mechanism's name, for logs.
    pub fn mechanism(&self) -> &'static str {
        match self.mech {
            Mech::Scram { hash: Hash::Sha256, plus: true } => "SCRAM-SHA-256-PLUS",
            Mech::Scram { hash: Hash::Sha1, plus: true } => "SCRAM-SHA-1-PLUS",
            Mech::Scram { hash: Hash::Sha256, plus: false } => "SCRAM-SHA-256",
            Mech::Scram { hash: Hash::Sha1, plus: false } => "SCRAM-SHA-1",
            Mech::Plain => "PLAIN",
        }
    }

    /// Feeds one client message (already base64-decoded).
    pub fn step(&mut self, input: &[u8]) -> Step {
        let r = match (std::mem::replace(&mut self.state, State::Done), self.mech) {
            (State::Start, _) if input.is_empty() => {
                // RFC 6120 §6.4.2: no initial response; ask for it.
                self.state = State::Start;
                return Step::Challenge(Vec::new());
            }
            (State::Start, Mech::Plain) => self.plain(input),
            (State::Start, Mech::Scram { hash, plus }) => self.client_first(hash, plus, input),
            (State::ServerFirst(st), _) => self.client_final(*st, input),
            (State::Done, _) => Err(Failure::malformed("the exchange is over")),
        };
        match r {
            Ok(s) => s,
            Err(f) => Step::Failure(f),
        }
    }

    /// The name the client logs in with, as an account localpart.
    fn check_authzid(&self, authzid: &str, local: &str) -> Result<(), Failure> {
        if authzid.is_empty() || authzid == local || authzid == format!("{local}@{}", self.domain) {
            Ok(())
        } else {
            Err(Failure::new("invalid-authzid", "an authorization identity may only name the account itself"))
        }
    }

    fn keys(&self, hash: Hash, local: &str) -> (ScramKeys, bool) {
        match self.users.get_user(local) {
            Ok(Some(rec)) => (if hash == Hash::Sha256 { rec.sha256 } else { rec.sha1 }, true),
            _ => (fake_keys(&self.secret, self.iterations, hash, local), false),
        }
    }

    fn plain(&mut self, input: &[u8]) -> Result<Step, Failure> {
        let mut parts = input.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Failure::malformed("PLAIN expects authzid NUL authcid NUL password"));
        };
        let (Ok(authzid), Ok(local)) = (std::str::from_utf8(authzid), std::str::from_utf8(authcid)) else {
            return Err(Failure::malformed("identities must be UTF-8"));
        };
        if local.is_empty() || local.len() > MAX_USER {
            return Err(Failure::malformed("empty or oversized username"));
        }
        self.check_authzid(authzid, local)?;
        let (keys, known) = self.keys(Hash::Sha256, local);
        let password = String::from_utf8_lossy(password).into_owned();
        Ok(Step::Verify(Check { local: local.to_string(), kind: CheckKind::Plain { password, keys, known } }))
    }

    fn client_first(&mut self, hash: Hash, plus: bool, input: &[u8]) -> Result<Step, Failure> {
        let s = std::str::from_utf8(input).map_err(|_| Failure::malformed("client-first is not UTF-8"))?;
        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let mut it = s.splitn(3, ',');
        let (Some(flag), Some(authz), Some(bare)) = (it.next(), it.next(), it.next()) else {
            return Err(Failure::malformed("client-first lacks a gs2 header"));
        };
        let gs2_header = &s[..flag.len() + authz.len() + 2];
        let cb_data = match (flag, plus) {
            ("n", false) => Vec::new(),
            ("y", false) if self.plus_offered => {
                return Err(Failure::new(
                    "not-authorized",
                    "channel binding downgrade: the client supports it and -PLUS was offered",
                ));
            }
            ("y", false) => Vec::new(),
            (f, true) if f.starts_with("p=") => {
                let name = &f[2..];
                match self.cb.data(name) {
                    Some(d) => d.to_vec(),
                    None => {
                        let offered = self.cb.names().join(" ");
                        return Err(Failure::new(
                            "not-authorized",
                            format!("channel binding type '{name}' is not supported here; supported: {offered}"),
                        ));
                    }
                }
            }
            (_, true) => return Err(Failure::malformed("a -PLUS mechanism needs gs2 flag p=<type>")),
            (f, false) if f.starts_with("p=") => {
                return Err(Failure::malformed("channel binding needs a -PLUS mechanism"));
            }
            _ => return Err(Failure::malformed("unknown gs2 channel-binding flag")),
        };
        let authzid = match authz {
            "" => String::new(),
            a if a.starts_with("a=") => unescape(&a[2..]).ok_or_else(|| Failure::malformed("bad authzid"))?,
            _ => return Err(Failure::malformed("bad authzid")),
        };
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or("");
        if user.starts_with("m=") {
            return Err(Failure::malformed("mandatory SCRAM extensions are not supported"));
        }
        let local = user
            .strip_prefix("n=")
            .and_then(unescape)
            .filter(|u| !u.is_empty() && u.len() <= MAX_USER)
            .ok_or_else(|| Failure::malformed("client-first needs n=<username>"))?;
        let cnonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| valid_nonce(n))
            .ok_or_else(|| Failure::malformed("client-first needs r=<nonce> of printable characters"))?;
        self.check_authzid(&authzid, &local)?;
        let (keys, known) = self.keys(hash, &local);
        let snonce: String =
            rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(NONCE_LEN).map(char::from).collect();
        let nonce = format!("{cnonce}{snonce}");
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&keys.salt), keys.iterations);
        let out = server_first.clone().into_bytes();
        self.state = State::ServerFirst(Box::new(ServerFirst {
            hash,
            local,
            keys,
            known,
            gs2_header: gs2_header.to_string(),
            cb_data,
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
        }));
        Ok(Step::Challenge(out))
    }

    fn client_final(&mut self, st: ServerFirst, input: &[u8]) -> Result<Step, Failure> {
        let ServerFirst { hash, local, keys, known, gs2_header, cb_data, client_first_bare, server_first, nonce } = st;
        let s = std::str::from_utf8(input).map_err(|_| Failure::malformed("client-final is not UTF-8"))?;
        let idx = s.rfind(",p=").ok_or_else(|| Failure::malformed("client-final needs p=<proof>"))?;
        let (without_proof, proof) = (&s[..idx], &s[idx + 3..]);
        let mut attrs = without_proof.split(',');
        let c = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or_else(|| Failure::malformed("client-final needs c=<channel binding>"))?;
        let r = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or_else(|| Failure::malformed("client-final needs r=<nonce>"))?;
        if r != nonce {
            return Err(Failure::malformed("nonce mismatch"));
        }
        let c = B64.decode(c).map_err(|_| Failure::malformed("c= is not base64"))?;
        let mut expected = gs2_header.into_bytes();
        expected.extend_from_slice(&cb_data);
        if c != expected {
            return Err(Failure::new("not-authorized", "channel binding data does not match this connection"));
        }
        let proof = B64.decode(proof).map_err(|_| Failure::malformed("p= is not base64"))?;
        if proof.len() != hash.len() {
            return Err(Failure::malformed("proof has the wrong length"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        Ok(Step::Verify(Check { local, kind: CheckKind::Scram { hash, keys, auth_message, proof, known } }))
    }

    /// Completes the exchange after [`Check::run`]: the `<success/>` data.
    pub fn finish(&mut self, check: &Check) -> Result<Vec<u8>, Failure> {
        self.state = State::Done;
        check.run()
    }
}

/// SCRAM `saslname` unescaping: `=2C` is `,` and `=3D` is `=`; any other
/// `=` is an error (RFC 5802 §5.1).
fn unescape(s: &str) -> Option<String> {
    if s.contains(',') {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("=2C") {
            out.push(',');
        } else if tail.starts_with("=3D") {
            out.push('=');
        } else {
            return None;
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Some(out)
}

/// RFC 5802 `printable`: `%x21-2B / %x2D-7E`.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Credentials for an account that does not exist: a salt derived from
/// the server secret and the name (stable across probes and restarts, the
/// same length as a real one) and the configured iteration count. The
/// keys are random, so no password matches.
fn fake_keys(secret: &[u8; 32], iterations: u32, hash: Hash, local: &str) -> ScramKeys {
    let mac = Hash::Sha256.hmac(secret, &[b"chatd unknown-account salt\0", hash.label(), b"\0", local.as_bytes()]);
    let mut rng = rand::thread_rng();
    let mut stored_key = vec![0u8; hash.len()];
    let mut server_key = vec![0u8; hash.len()];
    rng.fill_bytes(&mut stored_key);
    rng.fill_bytes(&mut server_key);
    ScramKeys { salt: mac[..SALT_LEN].to_vec(), iterations, stored_key, server_key }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Stores;

    const USER: &str = "15551234567";

    fn sasl() -> Sasl {
        let s = Stores::memory();
        s.users.put_user(USER, &accounts::make_record("pencil", 4096, 0)).unwrap();
        Sasl::new(s.users, "localhost", [7u8; 32], 4096, Some(vec![9u8; 32]))
    }

    fn tls13() -> Bindings {
        Bindings { exporter: Some(vec![5u8; 32]), end_point: Some(Arc::new(vec![9u8; 32])) }
    }

    fn run(e: &mut Exchange, input: &[u8]) -> Result<Vec<u8>, Failure> {
        match e.step(input) {
            Step::Verify(c) => e.finish(&c),
            Step::Failure(f) => Err(f),
            Step::Challenge(c) => panic!("unexpected challenge {c:?}"),
        }
    }

    /// A SCRAM client following RFC 5802, independent of the server code
    /// paths above except for the key derivation in `accounts`.
    fn scram_client(
        e: &mut Exchange,
        hash: Hash,
        user: &str,
        password: &str,
        gs2: &str,
        cb: &[u8],
    ) -> Result<(String, Vec<u8>), Failure> {
        let bare = format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL");
        let first = format!("{gs2}{bare}");
        let server_first = match e.step(first.as_bytes()) {
            Step::Challenge(c) => String::from_utf8(c).unwrap(),
            Step::Failure(f) => return Err(f),
            Step::Verify(_) => panic!("verify before proof"),
        };
        let mut f = server_first.split(',');
        let nonce = f.next().unwrap().strip_prefix("r=").unwrap().to_string();
        let salt = B64.decode(f.next().unwrap().strip_prefix("s=").unwrap()).unwrap();
        let iters: u32 = f.next().unwrap().strip_prefix("i=").unwrap().parse().unwrap();
        let keys = match hash {
            Hash::Sha1 => accounts::derive_sha1(password.as_bytes(), &salt, iters),
            Hash::Sha256 => accounts::derive_sha256(password.as_bytes(), &salt, iters),
        };
        let mut cbind = gs2.as_bytes().to_vec();
        cbind.extend_from_slice(cb);
        let without = format!("c={},r={nonce}", B64.encode(&cbind));
        let auth = format!("{bare},{server_first},{without}");
        // ClientKey = H^-1(StoredKey) is not available from ScramKeys, so
        // recompute it from the salted password.
        let mut salted = vec![0u8; hash.len()];
        match hash {
            Hash::Sha1 => pbkdf2::pbkdf2::<Hmac<Sha1>>(password.as_bytes(), &salt, iters, &mut salted).unwrap(),
            Hash::Sha256 => pbkdf2::pbkdf2::<Hmac<Sha256>>(password.as_bytes(), &salt, iters, &mut salted).unwrap(),
        }
        let client_key = hash.hmac(&salted, &[b"Client Key"]);
        let sig = hash.hmac(&keys.stored_key, &[auth.as_bytes()]);
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        let fin = format!("{without},p={}", B64.encode(proof));
        let v = run(e, fin.as_bytes())?;
        let expect = format!("v={}", B64.encode(hash.hmac(&keys.server_key, &[auth.as_bytes()])));
        assert_eq!(String::from_utf8(v.clone()).unwrap(), expect, "server signature");
        Ok((nonce, v))
    }

    #[test]
    fn offers_by_transport() {
        let s = sasl();
        assert_eq!(s.offered(None, false), ["SCRAM-SHA-256", "SCRAM-SHA-1"]);
        assert_eq!(s.offered(None, true), ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]);
        let cb = tls13();
        assert_eq!(s.offered(Some(&cb), false)[0], "SCRAM-SHA-256-PLUS");
        assert_eq!(s.offered(Some(&Bindings::default()), false), ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]);
        assert_eq!(s.start("PLAIN", None, false).err().unwrap().condition, "invalid-mechanism");
        assert_eq!(
            s.start("SCRAM-SHA-256-PLUS", Some(&Bindings::default()), false).err().unwrap().condition,
            "invalid-mechanism"
        );
    }

    #[test]
    fn plain_good_and_bad() {
        let s = sasl();
        let cb = Bindings::default();
        let mut e = s.start("PLAIN", Some(&cb), false).unwrap();
        assert_eq!(run(&mut e, b"\x0015551234567\x00pencil"), Ok(vec![]));
        let mut e = s.start("PLAIN", Some(&cb), false).unwrap();
        let f = run(&mut e, b"\x0015551234567\x00wrong").unwrap_err();
        assert!(f.credentials && f.condition == "not-authorized");
        let mut e = s.start("PLAIN", Some(&cb), false).unwrap();
        assert!(run(&mut e, b"\x0015550000000\x00pencil").unwrap_err().credentials);
        let mut e = s.start("PLAIN", Some(&cb), false).unwrap();
        let f = run(&mut e, b"someone-else\x0015551234567\x00pencil").unwrap_err();
        assert_eq!(f.condition, "invalid-authzid");
        assert!(!f.credentials);
    }

    #[test]
    fn scram_all_variants_log_in() {
        let s = sasl();
        let cb = tls13();
        for (mech, hash, gs2, data) in [
            ("SCRAM-SHA-256", Hash::Sha256, "n,,", &[][..]),
            ("SCRAM-SHA-1", Hash::Sha1, "n,,", &[][..]),
            ("SCRAM-SHA-256-PLUS", Hash::Sha256, "p=tls-exporter,,", &[5u8; 32][..]),
            ("SCRAM-SHA-1-PLUS", Hash::Sha1, "p=tls-server-end-point,,", &[9u8; 32][..]),
            ("SCRAM-SHA-256-PLUS", Hash::Sha256, "p=tls-server-end-point,a=15551234567,", &[9u8; 32][..]),
        ] {
            let mut e = s.start(mech, Some(&cb), false).unwrap();
            let (nonce, _) =
                scram_client(&mut e, hash, USER, "pencil", gs2, data).unwrap_or_else(|f| panic!("{mech} {gs2}: {f:?}"));
            let snonce = &nonce["fyko+d2lbbFgONRv9qkxdawL".len()..];
            assert!(snonce.len() >= 24 && snonce.bytes().all(|b| b.is_ascii_alphanumeric()), "{snonce}");
        }
    }

    #[test]
    fn scram_failures_say_why() {
        let s = sasl();
        let cb = tls13();
        // Wrong password: credentials checked.
        let mut e = s.start("SCRAM-SHA-256", Some(&cb), false).unwrap();
        let f = scram_client(&mut e, Hash::Sha256, USER, "wrong", "n,,", &[]).unwrap_err();
        assert!(f.credentials, "{f:?}");
        // Unknown account: the same failure, after the same exchange.
        let mut e = s.start("SCRAM-SHA-256", Some(&cb), false).unwrap();
        let f = scram_client(&mut e, Hash::Sha256, "15550000000", "pencil", "n,,", &[]).unwrap_err();
        assert!(f.credentials);
        // Downgrade: 'y' while -PLUS was offered. No password checked.
        let mut e = s.start("SCRAM-SHA-256", Some(&cb), false).unwrap();
        let f = scram_client(&mut e, Hash::Sha256, USER, "pencil", "y,,", &[]).unwrap_err();
        assert!(!f.credentials && f.text.contains("downgrade"), "{f:?}");
        // 'y' is fine where no -PLUS was offered.
        let mut e = s.start("SCRAM-SHA-256", Some(&Bindings::default()), false).unwrap();
        scram_client(&mut e, Hash::Sha256, USER, "pencil", "y,,", &[]).unwrap();
        // tls-unique is not available (undefined on TLS 1.3, not exposed on 1.2).
        let mut e = s.start("SCRAM-SHA-256-PLUS", Some(&cb), false).unwrap();
        let f = scram_client(&mut e, Hash::Sha256, USER, "pencil", "p=tls-unique,,", &[]).unwrap_err();
        assert!(!f.credentials && f.text.contains("tls-unique"), "{f:?}");
        // Right type, wrong data (a man in the middle).
        let mut e = s.start("SCRAM-SHA-256-PLUS", Some(&cb), false).unwrap();
        let f = scram_client(&mut e, Hash::Sha256, USER, "pencil", "p=tls-exporter,,", &[6u8; 32]).unwrap_err();
        assert!(!f.credentials && f.text.contains("does not match"), "{f:?}");
    }

    #[test]
    fn unknown_account_looks_like_a_real_one() {
        let s = sasl();
        let first = |user: &str, hash: &str| -> (Vec<u8>, u32) {
            let mut e = s.start(hash, None, false).unwrap();
            let Step::Challenge(c) = e.step(format!("n,,n={user},r=abc").as_bytes()) else { panic!() };
            let c = String::from_utf8(c).unwrap();
            let mut f = c.split(',').skip(1);
            let salt = B64.decode(f.next().unwrap().strip_prefix("s=").unwrap()).unwrap();
            (salt, f.next().unwrap().strip_prefix("i=").unwrap().parse().unwrap())
        };
        for hash in ["SCRAM-SHA-256", "SCRAM-SHA-1"] {
            let real = first(USER, hash);
            let (a1, a2) = (first("15550000001", hash), first("15550000001", hash));
            let b = first("15550000002", hash);
            assert_eq!(a1, a2, "stable salt per unknown user");
            assert_ne!(a1.0, b.0, "different unknown users get different salts");
            assert_eq!(a1.0.len(), real.0.len());
            assert_eq!(a1.1, real.1);
            // A restart with the same secret gives the same salt.
            let again = sasl();
            let mut e = again.start(hash, None, false).unwrap();
            let Step::Challenge(c) = e.step(b"n,,n=15550000001,r=abc") else { panic!() };
            assert!(String::from_utf8(c).unwrap().contains(&B64.encode(&a1.0)));
        }
    }

    #[test]
    fn hostile_scram_fails_cleanly() {
        let s = sasl();
        let cb = Bindings::default();
        for bad in [
            &b"n,,n"[..],
            b"y,,",
            b"p=tls-exporter,,n=x,r=y",
            b"\xff\xfe",
            b"n,,n=15551234567",
            b"n,,m=ext,n=a,r=b",
            b"n,,n=a=ZZ,r=b",
            b"n,,n=a,r=",
            b"x,,n=a,r=b",
            b"n,b=1,n=a,r=b",
        ] {
            let mut e = s.start("SCRAM-SHA-256", Some(&cb), false).unwrap();
            assert!(matches!(e.step(bad), Step::Failure(f) if !f.credentials), "{bad:?}");
        }
        for bad in [&b"c=biws"[..], b"c=biws,r=x,p=AAAA", b"p=", b",p=", b"c=!!,r=abc,p=AA"] {
            let mut e = s.start("SCRAM-SHA-256", Some(&cb), false).unwrap();
            assert!(matches!(e.step(b"n,,n=15551234567,r=abc"), Step::Challenge(_)));
            assert!(matches!(e.step(bad), Step::Failure(f) if !f.credentials), "{bad:?}");
        }
        // Client-final messages whose attributes are too short to parse.
        for bad in [&b""[..], b"c", b"c=biws,r", b"c=biws,r=x,,p=y", b"c=biws,r=x,p"] {
            let mut e = s.start("SCRAM-SHA-256", Some(&cb), false).unwrap();
            assert!(matches!(e.step(b"n,,n=15551234567,r=abcdef"), Step::Challenge(_)));
            assert!(matches!(e.step(bad), Step::Failure(f) if !f.credentials), "{bad:?}");
        }
    }

    #[test]
    fn saslname_unescaping() {
        assert_eq!(unescape("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(unescape("a=2"), None);
        assert_eq!(unescape("a=41"), None);
    }

    #[test]
    fn secret_persists() {
        let dir = std::env::temp_dir().join(format!("chatd-secret-{}", rand::random::<u64>()));
        let a = load_secret(&dir).unwrap();
        let b = load_secret(&dir).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(dir.join("scram-secret")).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

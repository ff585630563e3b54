//! Accounts: phone-number validation and SCRAM credentials.
//!
//! Passwords are never stored. [`make_record`] derives, per hash, the
//! RFC 5802 `StoredKey` and `ServerKey` from a SASLprep'ed password and a
//! random salt; SCRAM logins verify against them and PLAIN logins derive
//! them again and compare in constant time.

pub mod service;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::protocol::phone;
use crate::storage::{ScramKeys, UserRecord};

/// SASLprep (RFC 4013) of a password, or the password itself when it
/// contains prohibited characters (it will then never match anyway).
pub fn prep_password(p: &str) -> String {
    stringprep::saslprep(p).map(|c| c.into_owned()).unwrap_or_else(|_| p.to_owned())
}

macro_rules! derive_fn {
    ($name:ident, $hash:ty) => {
        /// Derives SCRAM keys for one hash function.
        pub fn $name(password: &[u8], salt: &[u8], iterations: u32) -> ScramKeys {
            let mut salted = vec![0u8; <$hash as Digest>::output_size()];
            // HMAC accepts keys of any length, so this cannot fail.
            let _ = pbkdf2::pbkdf2::<Hmac<$hash>>(password, salt, iterations, &mut salted);
            let hmac = |msg: &[u8]| -> Vec<u8> {
                let mut m = <Hmac<$hash> as Mac>::new_from_slice(&salted).unwrap_or_else(|_| unreachable!());
                m.update(msg);
                m.finalize().into_bytes().to_vec()
            };
            let client_key = hmac(b"Client Key");
            ScramKeys {
                salt: salt.to_vec(),
                iterations,
                stored_key: <$hash as Digest>::digest(&client_key).to_vec(),
                server_key: hmac(b"Server Key"),
            }
        }
    };
}

derive_fn!(derive_sha1, Sha1);
derive_fn!(derive_sha256, Sha256);

/// Creates a credential record for `password`.
pub fn make_record(password: &str, iterations: u32, now_ms: u64) -> UserRecord {
    let pw = prep_password(password);
    let mut rng = rand::thread_rng();
    let mut s1 = [0u8; 16];
    let mut s256 = [0u8; 16];
    rng.fill_bytes(&mut s1);
    rng.fill_bytes(&mut s256);
    UserRecord {
        sha1: derive_sha1(pw.as_bytes(), &s1, iterations),
        sha256: derive_sha256(pw.as_bytes(), &s256, iterations),
        created_ms: now_ms,
        key_generation: 0,
    }
}

/// Checks a cleartext password (SASL PLAIN) against a record, in
/// constant time.
pub fn verify_password(rec: &UserRecord, password: &str) -> bool {
    use subtle::ConstantTimeEq;
    let pw = prep_password(password);
    let k = &rec.sha256;
    let got = derive_sha256(pw.as_bytes(), &k.salt, k.iterations);
    bool::from(got.stored_key.ct_eq(&k.stored_key))
}

/// Normalises a phone number to an account localpart.
///
/// # Errors
/// When the input is not a valid phone number.
pub fn account_local(input: &str, region: Option<phonenumber::country::Id>) -> Result<String, phone::PhoneError> {
    phone::normalize(input, region)
}

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 §3: user / pencil, salt W22ZaJ0SNY7soEsUEjb6gQ==, i=4096.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let k = derive_sha256(b"pencil", &salt, 4096);
        // ServerSignature from the RFC is HMAC(ServerKey, AuthMessage); check
        // the ServerKey via that signature.
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&k.server_key).unwrap();
        m.update(auth.as_bytes());
        assert_eq!(b64.encode(m.finalize().into_bytes()), "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn plain_verification() {
        let r = make_record("s3cret", 4096, 0);
        assert!(verify_password(&r, "s3cret"));
        assert!(!verify_password(&r, "s3creT"));
        assert_ne!(r.sha1.salt, r.sha256.salt);
    }
}

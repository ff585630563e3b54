//! SASL (RFC 6120 §6) on top of rsasl: SCRAM-SHA-256, SCRAM-SHA-1, their
//! `-PLUS` variants bound to the TLS connection with `tls-exporter`
//! (RFC 9266), and PLAIN.
//!
//! Which mechanisms a connection sees depends on its transport:
//! - plaintext (only with `allow_plaintext`): SCRAM and PLAIN;
//! - TLS 1.3: `-PLUS` first, then SCRAM, then PLAIN;
//! - TLS 1.2 (no exporter binding guaranteed): SCRAM and PLAIN.
//!
//! One rsasl config per policy: a non-PLUS SCRAM server decides whether it
//! "supports channel binding" by whether its config lists `-PLUS`, which
//! is what lets it detect a downgrade (gs2 flag `y`).

use std::sync::Arc;

use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::plain::PLAIN;
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::mechanisms::scram::{SCRAM_SHA1, SCRAM_SHA1_PLUS, SCRAM_SHA256, SCRAM_SHA256_PLUS};
use rsasl::prelude::*;
use rsasl::property::{AuthId, AuthzId, Password};
use rsasl::validate::{Validate, ValidationError};

use crate::accounts;
use crate::storage::UserStore;

/// The validated outcome: the authenticated localpart.
pub struct AuthOutcome;
impl Validation for AuthOutcome {
    type Value = Result<String, &'static str>;
}

struct Callback {
    users: Arc<dyn UserStore>,
    domain: String,
}

/// SCRAM's `n=` arrives escaped (`=2C`, `=3D`).
fn scram_unescape(n: &str) -> String {
    n.replace("=2C", ",").replace("=3D", "=")
}

impl SessionCallback for Callback {
    fn callback(&self, sd: &SessionData, ctx: &Context, req: &mut Request) -> Result<(), SessionError> {
        let mech = sd.mechanism().mechanism.as_str();
        let Some(user) = ctx.get_ref::<AuthId>() else { return Ok(()) };
        let local = scram_unescape(user);
        let Ok(Some(rec)) = self.users.get_user(&local) else { return Ok(()) };
        let k = if mech.starts_with("SCRAM-SHA-256") {
            &rec.sha256
        } else if mech.starts_with("SCRAM-SHA-1") {
            &rec.sha1
        } else {
            return Ok(());
        };
        req.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
            k.iterations,
            &k.salt,
            &k.stored_key,
            &k.server_key,
        ))?;
        Ok(())
    }

    fn validate(&self, sd: &SessionData, ctx: &Context, v: &mut Validate<'_>) -> Result<(), ValidationError> {
        let mech = sd.mechanism().mechanism.as_str();
        let raw = ctx.get_ref::<AuthId>().ok_or(ValidationError::MissingRequiredProperty)?;
        let authid = if mech == "PLAIN" { raw.to_owned() } else { scram_unescape(raw) };
        // An authzid may only name the account itself (bare JID or localpart).
        let authzid = ctx.get_ref::<AuthzId>().filter(|z| !z.is_empty());
        let outcome = if authzid.is_some_and(|z| z != authid && z != format!("{authid}@{}", self.domain)) {
            Err("authzid")
        } else if mech == "PLAIN" {
            let pw = ctx.get_ref::<Password>().ok_or(ValidationError::MissingRequiredProperty)?;
            let pw = String::from_utf8_lossy(pw);
            match self.users.get_user(&authid) {
                Ok(Some(rec)) if accounts::verify_password(&rec, &pw) => Ok(authid),
                _ => Err("credentials"),
            }
        } else {
            Ok(authid)
        };
        v.finalize::<AuthOutcome>(outcome);
        Ok(())
    }
}

static MECHS_SCRAM: &[Mechanism] = &[SCRAM_SHA256, SCRAM_SHA1];
static MECHS_PLAIN: &[Mechanism] = &[SCRAM_SHA256, SCRAM_SHA1, PLAIN];
static MECHS_PLUS: &[Mechanism] = &[SCRAM_SHA256_PLUS, SCRAM_SHA1_PLUS, SCRAM_SHA256, SCRAM_SHA1, PLAIN];

/// What the transport offers for SASL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// No TLS: SCRAM only, PLAIN only if `allow_plaintext`.
    Cleartext { allow_plain: bool },
    /// TLS without exporter channel binding (TLS 1.2).
    Tls,
    /// TLS 1.3 with tls-exporter bytes available.
    TlsExporter,
}

/// Per-server SASL configuration.
pub struct Sasl {
    scram: Arc<SASLConfig>,
    plain: Arc<SASLConfig>,
    plus: Arc<SASLConfig>,
}

impl Sasl {
    /// # Errors
    /// Only if rsasl rejects the static mechanism lists.
    pub fn new(users: Arc<dyn UserStore>, domain: &str) -> anyhow::Result<Sasl> {
        let mk = |m: &'static [Mechanism]| {
            SASLConfig::builder()
                .with_registry(Registry::with_mechanisms(m))
                .with_callback(Callback { users: users.clone(), domain: domain.to_string() })
        };
        Ok(Sasl { scram: mk(MECHS_SCRAM)?, plain: mk(MECHS_PLAIN)?, plus: mk(MECHS_PLUS)? })
    }

    fn cfg(&self, t: Transport) -> Arc<SASLConfig> {
        match t {
            Transport::Cleartext { allow_plain: false } => self.scram.clone(),
            Transport::Cleartext { allow_plain: true } | Transport::Tls => self.plain.clone(),
            Transport::TlsExporter => self.plus.clone(),
        }
    }

    /// Mechanism names for `<mechanisms/>`.
    pub fn offered(&self, t: Transport) -> Vec<&'static str> {
        match t {
            Transport::Cleartext { allow_plain: false } => MECHS_SCRAM,
            Transport::Cleartext { allow_plain: true } | Transport::Tls => MECHS_PLAIN,
            Transport::TlsExporter => MECHS_PLUS,
        }
        .iter()
        .map(|m| m.mechanism.as_str())
        .collect()
    }

    /// Starts an exchange. `exporter` is this connection's
    /// TLS-Exporter("EXPORTER-Channel-Binding", "", 32).
    ///
    /// # Errors
    /// `None` when the mechanism is not offered on this transport.
    pub fn start(&self, t: Transport, mech: &str, exporter: Option<Vec<u8>>) -> Option<Exchange> {
        let name = Mechname::parse(mech.as_bytes()).ok()?;
        let session =
            SASLServer::<AuthOutcome, _>::with_cb(self.cfg(t), TlsExporter(exporter)).start_suggested(name).ok()?;
        Some(Exchange { session, plus: mech.ends_with("-PLUS"), scram: mech.starts_with("SCRAM-"), first: true })
    }
}

struct TlsExporter(Option<Vec<u8>>);
impl ChannelBindingCallback for TlsExporter {
    fn get_cb_data(&self, cbname: &str) -> Option<&[u8]> {
        if cbname == "tls-exporter" { self.0.as_deref() } else { None }
    }
}

/// Result of one SASL step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Challenge(Vec<u8>),
    Success { additional: Vec<u8>, local: String },
    Failure,
}

/// One running SASL exchange.
pub struct Exchange {
    session: Session<AuthOutcome, TlsExporter>,
    plus: bool,
    scram: bool,
    first: bool,
}

impl Exchange {
    /// Feeds one client message (already base64-decoded).
    pub fn step(&mut self, input: &[u8]) -> Step {
        if std::mem::take(&mut self.first) {
            if input.is_empty() {
                self.first = true;
                return Step::Challenge(Vec::new());
            }
            if self.scram && !valid_scram_first(input, self.plus) {
                return Step::Failure;
            }
        } else if self.scram && !valid_scram_attrs(input) {
            return Step::Failure;
        }
        let mut out = Vec::new();
        // rsasl's SCRAM parser is not trusted with hostile input: a panic
        // there must fail this login, not the connection task.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.session.step(Some(input), &mut out)));
        match r {
            Ok(Ok(State::Running)) => Step::Challenge(out),
            Ok(Ok(State::Finished(_))) => match self.session.validation() {
                Some(Ok(local)) => Step::Success { additional: out, local },
                _ => Step::Failure,
            },
            _ => Step::Failure,
        }
    }
}

/// Checks the gs2 header of a SCRAM client-first message: `p=` exactly
/// for `-PLUS`, and a well-formed `n=…,r=…` tail.
fn valid_scram_first(input: &[u8], plus: bool) -> bool {
    let Ok(s) = std::str::from_utf8(input) else { return false };
    if plus != s.starts_with("p=") {
        return false;
    }
    // gs2-header = cbflag "," [authzid] ","
    let mut parts = s.splitn(3, ',');
    let (Some(_), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if !(authzid.is_empty() || authzid.starts_with("a=")) || !valid_scram_attrs(bare.as_bytes()) {
        return false;
    }
    let mut attrs = bare.split(',');
    let user_ok = attrs.next().is_some_and(|a| a.len() > 2 && a.starts_with("n="));
    let nonce_ok = attrs.next().is_some_and(|a| a.len() > 2 && a.starts_with("r="));
    user_ok && nonce_ok
}

/// Whether every comma-separated attribute has the `x=value` form of
/// RFC 5802 §5.1. rsasl's parser slices the first two bytes of each
/// attribute without checking its length, so shorter ones are refused here
/// rather than left to its panic (which `catch_unwind` would contain, after
/// the panic hook had printed it).
fn valid_scram_attrs(attrs: &[u8]) -> bool {
    attrs.split(|&b| b == b',').all(|a| a.len() >= 2 && a[0].is_ascii_alphabetic() && a[1] == b'=')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Stores;

    fn sasl() -> Sasl {
        let s = Stores::memory();
        s.users.put_user("15551234567", &accounts::make_record("pencil", 4096, 0)).unwrap();
        Sasl::new(s.users, "localhost").unwrap()
    }

    #[test]
    fn offers_by_transport() {
        let s = sasl();
        assert_eq!(s.offered(Transport::Cleartext { allow_plain: false }), ["SCRAM-SHA-256", "SCRAM-SHA-1"]);
        assert!(s.offered(Transport::TlsExporter)[0].ends_with("-PLUS"));
        assert!(s.start(Transport::Cleartext { allow_plain: false }, "PLAIN", None).is_none());
    }

    #[test]
    fn plain_good_and_bad() {
        let s = sasl();
        let t = Transport::Tls;
        let mut e = s.start(t, "PLAIN", None).unwrap();
        assert_eq!(
            e.step(b"\x0015551234567\x00pencil"),
            Step::Success { additional: vec![], local: "15551234567".into() }
        );
        let mut e = s.start(t, "PLAIN", None).unwrap();
        assert_eq!(e.step(b"\x0015551234567\x00wrong"), Step::Failure);
        let mut e = s.start(t, "PLAIN", None).unwrap();
        assert_eq!(e.step(b"someone-else\x0015551234567\x00pencil"), Step::Failure);
    }

    #[test]
    fn hostile_scram_fails_cleanly() {
        let s = sasl();
        for bad in [
            &b"n,,n"[..],
            b"y,,",
            b"p=tls-exporter,,n=x,r=y",
            b"\xff\xfe",
            b"n,,n=15551234567",
            b"n,a,n=15551234567,r=abc",
            b"n,,n=15551234567,r=abc,",
            b"n,,n=15551234567,r=abc,x",
        ] {
            let mut e = s.start(Transport::Tls, "SCRAM-SHA-256", None).unwrap();
            assert_eq!(e.step(bad), Step::Failure, "{bad:?}");
        }
        // Client-final messages whose attributes are too short to parse.
        for bad in [&b""[..], b"c", b"c=biws,r", b"c=biws,r=x,,p=y", b"c=biws,r=x,p"] {
            let mut e = s.start(Transport::Tls, "SCRAM-SHA-256", None).unwrap();
            assert!(matches!(e.step(b"n,,n=15551234567,r=abcdef"), Step::Challenge(_)));
            assert_eq!(e.step(bad), Step::Failure, "{bad:?}");
        }
    }
}

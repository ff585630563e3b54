//! Configuration: a TOML file whose every key has a default, overridden
//! by command-line flags. `chatd.toml` at the repository root documents
//! each key; [`Config::default`] is the single source of the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The XMPP domain: accounts are `PHONE@domain`.
    pub domain: String,
    /// Where the store, certificate and admin socket live.
    pub data_dir: PathBuf,
    /// Which services this node runs: `all`, `chat` (XMPP only; upload
    /// slots point at `media.public_url`) or `media` (HTTPS media only).
    pub role: Role,
    pub listen: Listen,
    pub tls: Tls,
    pub limits: Limits,
    pub offline: Offline,
    pub auth: Auth,
    pub phone: Phone,
    pub discovery: Discovery,
    pub http: crate::http::HttpConfig,
    pub media: crate::media::MediaConfig,
    pub profile: Profile,
    pub registration: Registration,
    pub sms: crate::api::sms::SmsConfig,
    pub api: crate::api::ApiConfig,
    pub groups: Groups,
    pub delivery: Delivery,
    pub roster: Roster,
    /// Shared state in a NATS JetStream cluster instead of the embedded
    /// store. Absent (the default): single node, nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
}

/// The `[cluster]` section: where the shared state lives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// This node's name, unique in the cluster (letters, digits, `-`, `_`).
    pub node_id: String,
    /// NATS servers to connect to; the client fails over between them.
    pub nats_urls: Vec<String>,
    /// Copies of every bucket and stream: 3 (a quorum of 2 survives one
    /// lost server), or 1 for a single-server test setup.
    #[serde(default = "Cluster::default_replicas")]
    pub replicas: usize,
    /// Offline-queue streams (`Q00`…), fixed when the cluster is first
    /// set up: an account's partition is a hash of its name modulo this.
    #[serde(default = "Cluster::default_partitions")]
    pub partitions: u32,
    /// NATS credentials file (JWT and NKey seed). Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credentials: String,
    /// PEM CA certificate that signs the NATS servers' certificates; set,
    /// it makes the client require TLS. Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_ca: String,
}

impl Cluster {
    fn default_replicas() -> usize {
        3
    }
    fn default_partitions() -> u32 {
        32
    }

    /// Checks the section on its own.
    ///
    /// # Errors
    /// The first invalid value found.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || !self.node_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("cluster.node_id must be 1 to 64 letters, digits, '-' or '_'");
        }
        if self.nats_urls.is_empty() {
            bail!("cluster.nats_urls must name at least one NATS server");
        }
        if !matches!(self.replicas, 1 | 3 | 5) {
            bail!("cluster.replicas must be 1, 3 or 5");
        }
        if !(1..=256).contains(&self.partitions) {
            bail!("cluster.partitions must be between 1 and 256");
        }
        Ok(())
    }
}

/// Memory and rate bounds of message delivery to and from one session.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// Bytes of stanzas sent and not yet acknowledged (XEP-0198) one
    /// session may hold, live or parked for resumption; beyond it the
    /// stream is closed with `policy-violation` (stored messages stay
    /// stored). The offline backlog is read only while less than half of
    /// it is in use.
    pub max_unacked_bytes: usize,
    /// Bytes waiting in one session's outbound queue; beyond it the
    /// session is disconnected as a slow consumer.
    pub max_outbound_bytes: usize,
    /// Messages one account may send per second, sustained; beyond it
    /// the sender gets `policy-violation`.
    pub messages_per_sec: f64,
    /// Messages one account may send at once after a pause.
    pub messages_burst: f64,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            max_unacked_bytes: 2 << 20,
            max_outbound_bytes: 2 << 20,
            messages_per_sec: 50.0,
            messages_burst: 500.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Groups {
    /// Service domain for groups; empty means `groups.<domain>`.
    pub service: String,
    /// Members per group, the creator included.
    pub max_members: usize,
    /// Groups one account may create per hour.
    pub creations_per_hour: usize,
    /// Largest group subject, in bytes.
    pub max_subject_bytes: usize,
    /// Largest group description, in bytes.
    pub max_description_bytes: usize,
    /// Largest message to a group, in bytes: each one is stored once per
    /// member, so this is much smaller than `limits.max_stanza_bytes`.
    pub max_message_bytes: usize,
    /// Bytes one account may have stored through group messages per
    /// minute (message size times recipients).
    pub fanout_bytes_per_minute: u64,
}

impl Default for Groups {
    fn default() -> Self {
        Groups {
            service: String::new(),
            max_members: 1024,
            creations_per_hour: 20,
            max_subject_bytes: 256,
            max_description_bytes: 2048,
            max_message_bytes: 16 * 1024,
            fanout_bytes_per_minute: 64 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Roster {
    /// Items on one account's roster, pending subscription requests
    /// included; beyond it `resource-constraint`.
    pub max_items: usize,
}

impl Default for Roster {
    fn default() -> Self {
        Roster { max_items: 2000 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Largest avatar image (XEP-0084 data, decoded bytes).
    pub max_avatar_bytes: usize,
}

impl Default for Profile {
    fn default() -> Self {
        Profile { max_avatar_bytes: 96 * 1024 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registration {
    /// Allow XEP-0077 in-band registration (for development and standard
    /// clients; phones register through the SMS-code API).
    pub in_band: bool,
    /// In-band registrations accepted per client IP per hour.
    pub in_band_per_ip_per_hour: usize,
}

impl Default for Registration {
    fn default() -> Self {
        Registration { in_band: false, in_band_per_ip_per_hour: 10 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Discovery {
    /// Phone numbers in one contact-discovery request.
    pub max_batch: usize,
    /// Phone numbers one account may look up per hour.
    pub max_per_hour: usize,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery { max_batch: 500, max_per_hour: 2000 }
    }
}

/// Services run by one `chatd serve` process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// XMPP and the media service.
    #[default]
    All,
    /// XMPP only.
    Chat,
    /// The HTTPS media service only.
    Media,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// c2s with STARTTLS. Empty string disables the listener.
    pub c2s: String,
    /// c2s with direct TLS (XEP-0368). Empty string disables it.
    pub c2s_tls: String,
    /// HTTPS listener (registration API, media). Empty: off.
    pub http: String,
    /// Accept SASL without TLS. Only allowed when every c2s listener is
    /// on loopback.
    pub allow_plaintext: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain. Empty: a self-signed certificate is
    /// generated in `DATA_DIR/tls/` on first start.
    pub cert: String,
    /// PEM private key for `cert`.
    pub key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest stanza accepted; larger gets `policy-violation`.
    pub max_stanza_bytes: usize,
    /// Largest stanza accepted before a resource is bound (SASL, in-band
    /// registration, bind, resume): none of them needs more, and a small
    /// limit keeps what a stranger can make the server parse small.
    pub max_stanza_bytes_before_bind: usize,
    /// Elements in one stanza; more gets `policy-violation`.
    pub max_stanza_elements: usize,
    /// Attributes (namespace declarations included) on one element; more
    /// gets `policy-violation`.
    pub max_element_attributes: usize,
    /// Concurrent client connections.
    pub max_connections: usize,
    /// Seconds a connection may take to authenticate and bind.
    pub handshake_timeout_secs: u64,
    /// Seconds of silence from a client before the server pings it.
    pub ping_interval_secs: u64,
    /// Seconds to wait for that ping's answer before closing.
    pub ping_timeout_secs: u64,
    /// Resources (devices) per account.
    pub max_resources: usize,
    /// Outbound stanzas buffered for one session before it is treated as
    /// a slow consumer and disconnected (stored messages stay stored).
    pub session_queue: usize,
    /// Seconds a session that enabled XEP-0198 resumption waits for its
    /// client after the connection drops.
    pub resume_timeout_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Offline {
    /// Messages held per recipient; beyond it senders get
    /// `resource-constraint`.
    pub max_queue: usize,
    /// Bytes held per recipient, likewise.
    pub max_queue_bytes: usize,
    /// Percentage of `max_queue` and of `max_queue_bytes` one sender (an
    /// account, or a group) may hold in one recipient's queue, so that a
    /// flood from one sender leaves the inbox open to everyone else.
    pub sender_share_percent: u8,
    /// Days an undelivered message is kept.
    pub expiry_days: u64,
    /// How often the expiry reaper runs, in seconds.
    pub reap_interval_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// PBKDF2 iterations for new SCRAM keys (RFC 7677 minimum: 4096).
    pub scram_iterations: u32,
    /// Connections per client address (IPv6: per /64) that have not
    /// authenticated yet; 0 = no limit.
    pub max_unauthenticated_per_ip: usize,
    /// TLS handshakes in flight per client address; 0 = no limit.
    pub max_tls_handshakes_per_ip: usize,
    /// Wrong passwords per connection before the stream is closed.
    pub max_failures_per_connection: u32,
    /// SASL attempts of any outcome per connection (bounds exchanges that
    /// fail before a password is checked, such as unsupported
    /// channel-binding types).
    pub max_attempts_per_connection: u32,
    /// Failed logins (per account and per address) that cost no delay.
    pub failures_before_delay: u32,
    /// First delay after those, in ms; it doubles with each failure.
    pub failure_delay_ms: u64,
    /// Longest delay, in seconds.
    pub max_failure_delay_secs: u64,
    /// Password hashes computed at once on the blocking pool; 0 = half
    /// the CPU cores (at least 1).
    pub hash_threads: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Phone {
    /// Region (ISO 3166 code) for numbers written in national form.
    pub default_region: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: "localhost".into(),
            data_dir: PathBuf::from("./chatd-data"),
            role: Role::All,
            listen: Listen::default(),
            tls: Tls::default(),
            limits: Limits::default(),
            offline: Offline::default(),
            auth: Auth::default(),
            phone: Phone::default(),
            discovery: Discovery::default(),
            http: Default::default(),
            media: Default::default(),
            profile: Profile::default(),
            registration: Registration::default(),
            sms: Default::default(),
            api: Default::default(),
            groups: Groups::default(),
            delivery: Delivery::default(),
            roster: Roster::default(),
            cluster: None,
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            c2s: "0.0.0.0:5222".into(),
            c2s_tls: "0.0.0.0:5223".into(),
            http: String::new(),
            allow_plaintext: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_stanza_bytes_before_bind: 8 * 1024,
            max_stanza_elements: 4096,
            max_element_attributes: 64,
            max_connections: 19_000,
            handshake_timeout_secs: 30,
            ping_interval_secs: 120,
            ping_timeout_secs: 30,
            max_resources: 10,
            session_queue: 4096,
            resume_timeout_secs: 300,
        }
    }
}

impl Default for Offline {
    fn default() -> Self {
        Offline {
            max_queue: 10_000,
            max_queue_bytes: 64 << 20,
            sender_share_percent: 25,
            expiry_days: 30,
            reap_interval_secs: 3600,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            scram_iterations: 4096,
            max_unauthenticated_per_ip: 32,
            max_tls_handshakes_per_ip: 8,
            max_failures_per_connection: 3,
            max_attempts_per_connection: 8,
            failures_before_delay: 2,
            failure_delay_ms: 500,
            max_failure_delay_secs: 30,
            hash_threads: 0,
        }
    }
}

impl Default for Phone {
    fn default() -> Self {
        Phone { default_region: "US".into() }
    }
}

/// Flag overrides, applied on top of the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub domain: Option<String>,
    pub c2s: Option<String>,
    pub c2s_tls: Option<String>,
    pub http: Option<String>,
    pub allow_plaintext: bool,
    pub role: Option<Role>,
}

impl Config {
    /// Reads `path` (if given) and applies `ov`.
    ///
    /// # Errors
    /// Unreadable file, unknown keys, bad values.
    pub fn load(path: Option<&Path>, ov: &Overrides) -> anyhow::Result<Config> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<Config>(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => Config::default(),
        };
        if let Some(d) = &ov.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(d) = &ov.domain {
            cfg.domain = d.to_lowercase();
        }
        if let Some(a) = &ov.c2s {
            cfg.listen.c2s = a.clone();
        }
        if let Some(a) = &ov.c2s_tls {
            cfg.listen.c2s_tls = a.clone();
        }
        if let Some(a) = &ov.http {
            cfg.listen.http = a.clone();
        }
        cfg.listen.allow_plaintext |= ov.allow_plaintext;
        if let Some(r) = ov.role {
            cfg.role = r;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that would otherwise fail later or silently.
    ///
    /// # Errors
    /// The first invalid value found.
    pub fn validate(&self) -> anyhow::Result<()> {
        if crate::protocol::Jid::parse(&self.domain).map(|j| j.local.is_some() || j.resource.is_some()) != Ok(false) {
            bail!("invalid domain {:?}", self.domain);
        }
        if self.limits.max_stanza_bytes < 4096 {
            bail!("limits.max_stanza_bytes must be at least 4096");
        }
        if self.limits.max_stanza_bytes_before_bind < 4096 {
            bail!("limits.max_stanza_bytes_before_bind must be at least 4096");
        }
        if self.limits.max_stanza_elements < 64 || self.limits.max_element_attributes < 16 {
            bail!("limits.max_stanza_elements must be at least 64 and limits.max_element_attributes at least 16");
        }
        if self.auth.scram_iterations < 4096 {
            bail!("auth.scram_iterations must be at least 4096 (RFC 7677)");
        }
        if self.offline.max_queue == 0 {
            bail!("offline.max_queue must be positive");
        }
        if self.offline.max_queue_bytes < self.limits.max_stanza_bytes {
            bail!("offline.max_queue_bytes must be at least limits.max_stanza_bytes");
        }
        if !(1..=100).contains(&self.offline.sender_share_percent) {
            bail!("offline.sender_share_percent must be between 1 and 100");
        }
        if self.delivery.max_unacked_bytes < 2 * self.limits.max_stanza_bytes
            || self.delivery.max_outbound_bytes < self.limits.max_stanza_bytes
        {
            bail!(
                "delivery.max_unacked_bytes must be at least twice, max_outbound_bytes at least once limits.max_stanza_bytes"
            );
        }
        if !(self.delivery.messages_per_sec > 0.0 && self.delivery.messages_burst >= 1.0) {
            bail!("delivery.messages_per_sec must be positive and delivery.messages_burst at least 1");
        }
        if crate::protocol::phone::region(&self.phone.default_region).is_none() {
            bail!("phone.default_region {:?} is not a region code", self.phone.default_region);
        }
        self.media.validate()?;
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        for a in [&self.listen.c2s, &self.listen.c2s_tls, &self.listen.http] {
            if !a.is_empty() {
                parse_addr(a)?;
            }
        }
        Ok(())
    }

    /// The default region as a `phonenumber` id.
    pub fn region(&self) -> Option<phonenumber::country::Id> {
        crate::protocol::phone::region(&self.phone.default_region)
    }
}

/// Parses `HOST:PORT` (`localhost` allowed).
///
/// # Errors
/// When it is not an address.
pub fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let s2 = s.replace("localhost:", "127.0.0.1:");
    s2.parse::<SocketAddr>().with_context(|| format!("{s:?} is not HOST:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_matches_defaults() {
        let text = include_str!("../chatd.toml");
        let parsed: Config = toml::from_str(text).unwrap();
        let d = Config::default();
        assert_eq!(toml::to_string(&parsed).unwrap(), toml::to_string(&d).unwrap());
    }

    #[test]
    fn overrides_apply() {
        let ov = Overrides {
            domain: Some("Example.ORG".into()),
            c2s: Some("127.0.0.1:0".into()),
            allow_plaintext: true,
            ..Default::default()
        };
        let c = Config::load(None, &ov).unwrap();
        assert_eq!(c.domain, "example.org");
        assert_eq!(c.listen.c2s, "127.0.0.1:0");
        assert!(c.listen.allow_plaintext);
    }

    #[test]
    fn cluster_section_defaults_and_checks() {
        let c: Config = toml::from_str("[cluster]\nnode_id = \"n1\"\nnats_urls = [\"nats://127.0.0.1:4222\"]").unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!((cl.replicas, cl.partitions), (3, 32));
        assert!(c.validate().is_ok());
        let bad = |extra: &str| {
            let t = format!("[cluster]\nnode_id = \"n1\"\nnats_urls = [\"nats://x:1\"]\n{extra}");
            toml::from_str::<Config>(&t).map_err(anyhow::Error::from).and_then(|c| c.validate())
        };
        assert!(bad("replicas = 2").is_err(), "an even replica count has no majority advantage");
        assert!(bad("replicas = 1").is_ok());
        assert!(bad("partitions = 0").is_err());
        assert!(bad("nope = 1").is_err(), "unknown keys are refused in [cluster] too");
        assert!(toml::from_str::<Config>("[cluster]\nnode_id = \"a.b\"\nnats_urls = []").unwrap().validate().is_err());
        assert!(Config::default().cluster.is_none(), "without [cluster] the node is single");
    }

    #[test]
    fn rejects_unknown_keys() {
        assert!(toml::from_str::<Config>("nope = 1").is_err());
    }
}

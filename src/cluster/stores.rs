//! [`ClusterStore`]: the KV-backed stores (`UserStore`, `RosterStore`,
//! `SettingsStore`, `GroupStore`) and `Durability`, and the bootstrap
//! that creates buckets and streams. The offline queue is in
//! [`super::offline`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::engine::{Engine, Op, WireSettings};
use super::mirror::Mirror;
use super::{hex, unhex};
use crate::config::Cluster;
use crate::storage::{
    Durability, Group, GroupStore, Result, RosterItem, RosterStore, SettingsStore, StoreError, Ticket, UserRecord,
    UserStore,
};

/// Mirror indexes, in [`BUCKETS`] order.
pub const ACCOUNTS: usize = 0;
pub const ROSTER: usize = 1;
pub const SETTINGS: usize = 2;
pub const GROUPS: usize = 3;
pub const MARKS: usize = 4;
/// The KV buckets, by mirror index.
pub const BUCKETS: [&str; 5] = ["accounts", "roster", "settings", "groups", "queue_marks"];

/// How long opening may take: connecting, creating buckets and streams,
/// and loading the mirrors.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write may go unacknowledged (resent meanwhile) before the
/// store stops: longer than a stream leader election (4–9 s), so losing
/// one server of three stalls writes instead of stopping the node.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Every store of one node on the cluster.
pub struct ClusterStore {
    pub(crate) engine: Engine,
    pub(crate) mirrors: Arc<Vec<Mirror>>,
    pub(crate) partitions: u32,
}

impl ClusterStore {
    /// See [`super::open`].
    ///
    /// # Errors
    /// See [`super::open`].
    pub fn open(cfg: &Cluster) -> Result<ClusterStore> {
        Self::open_with(cfg, ACK_TIMEOUT)
    }

    /// [`ClusterStore::open`] with another PubAck timeout (tests make a
    /// dead NATS show in a second).
    ///
    /// # Errors
    /// See [`super::open`].
    pub fn open_with(cfg: &Cluster, ack_timeout: Duration) -> Result<ClusterStore> {
        cfg.validate().map_err(|e| StoreError::Engine(format!("{e:#}")))?;
        let mirrors: Arc<Vec<Mirror>> = Arc::new(
            BUCKETS
                .iter()
                .enumerate()
                .map(|(i, b)| if i == GROUPS { Mirror::with_member_index(b) } else { Mirror::new(b) })
                .collect(),
        );
        let settings = WireSettings {
            kv_prefixes: BUCKETS.iter().map(|b| format!("$KV.{b}.")).collect(),
            id_prefix: format!("{}.{:016x}", cfg.node_id, rand::random::<u64>()),
            ack_timeout,
        };
        let (c, m) = (cfg.clone(), mirrors.clone());
        let engine = Engine::start(move || bootstrap(c, m, ack_timeout), mirrors.clone(), settings, OPEN_TIMEOUT)?;
        tracing::info!(node = %cfg.node_id, servers = %cfg.nats_urls.join(","), "cluster store open");
        Ok(ClusterStore { engine, mirrors, partitions: cfg.partitions })
    }

    pub(crate) fn mirror(&self, i: usize) -> &Mirror {
        &self.mirrors[i]
    }

    /// PubAcks received so far.
    pub fn acks(&self) -> u64 {
        self.engine.acks.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn get<T: DeserializeOwned>(&self, bucket: usize, key: &str) -> Result<Option<T>> {
        self.mirror(bucket).get(key).map(|v| decode(self.mirror(bucket).bucket, key, &v)).transpose()
    }

    /// Writes (or with `None` deletes) `(key, value)` pairs of one bucket
    /// as one ticket.
    fn write(&self, bucket: usize, entries: Vec<(String, Option<Bytes>)>) -> Result<Ticket> {
        self.engine.submit(|t| {
            let m = self.mirror(bucket);
            Ok(entries
                .into_iter()
                .map(|(key, value)| {
                    m.own_write(&key, value.clone(), t);
                    match value {
                        Some(value) => Op::Put { bucket, key, value },
                        None => Op::Del { bucket, key },
                    }
                })
                .collect())
        })
    }

    /// Deletes every key of `bucket` under `prefix` that this node knows of.
    fn delete_prefix(&self, bucket: usize, prefix: &str) -> Result<Ticket> {
        let keys = self.mirror(bucket).keys(prefix);
        self.write(bucket, keys.into_iter().map(|k| (k, None)).collect())
    }
}

fn json<T: Serialize>(v: &T) -> Result<Bytes> {
    serde_json::to_vec(v).map(Bytes::from).map_err(|e| StoreError::Engine(format!("encoding: {e}")))
}

fn decode<T: DeserializeOwned>(bucket: &str, key: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(format!("{bucket}/{key}: {e}")))
}

/// `<hex(owner)>.`: the prefix of every key `owner` has in a bucket.
fn owner_prefix(owner: &str) -> String {
    format!("{}.", hex(owner))
}

fn pair_key(owner: &str, name: &str) -> String {
    format!("{}.{}", hex(owner), hex(name))
}

fn engine_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("{what}: {e}"))
}

/// Runs on the NATS thread: connect, create what is missing, load the
/// mirrors, start the watches.
async fn bootstrap(cfg: Cluster, mirrors: Arc<Vec<Mirror>>, ack_timeout: Duration) -> Result<jetstream::Context> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("chatd {}", cfg.node_id))
        .connection_timeout(Duration::from_secs(5))
        // A hung server is noticed in seconds, not minutes.
        .ping_interval(Duration::from_secs(5));
    if !cfg.credentials.is_empty() {
        opts = opts
            .credentials_file(&cfg.credentials)
            .await
            .map_err(|e| engine_err(&format!("reading cluster.credentials {}", cfg.credentials), e))?;
    }
    if !cfg.tls_ca.is_empty() {
        opts = opts.add_root_certificates(PathBuf::from(&cfg.tls_ca)).require_tls(true);
    }
    let addrs = cfg
        .nats_urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>().map_err(|e| engine_err(&format!("cluster.nats_urls {u:?}"), e)))
        .collect::<Result<Vec<_>>>()?;
    let client = opts
        .connect(addrs)
        .await
        .map_err(|e| StoreError::Engine(format!("cannot reach NATS at {}: {e}", cfg.nats_urls.join(", "))))?;
    // A PubAck future times out after the context's request timeout, not
    // after `ack_timeout` (which bounds only acks nobody awaits): one
    // attempt waits up to 5 s, resends go on until `ack_timeout`.
    let attempt = ack_timeout.min(Duration::from_secs(5));
    let js = jetstream::context::ContextBuilder::new().timeout(attempt).ack_timeout(attempt).build(client);
    for (i, m) in mirrors.iter().enumerate() {
        let store = js
            .create_or_update_key_value(kv::Config {
                bucket: m.bucket.to_string(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| engine_err(&format!("creating KV bucket {}", m.bucket), e))?;
        let watch = catch_up(&store, m).await?;
        tokio::spawn(follow(store, mirrors.clone(), i, watch));
    }
    for p in 0..cfg.partitions {
        let name = format!("Q{p:02}");
        js.create_or_update_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("q.{p:02}.*")],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| engine_err(&format!("creating stream {name}"), e))?;
    }
    Ok(js)
}

fn apply(m: &Mirror, e: kv::Entry) {
    let value = match e.operation {
        kv::Operation::Put => Some(e.value),
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    m.watched(&e.key, e.revision, value);
}

/// Starts the bucket's watch and applies it until the mirror holds the
/// bucket's current state.
async fn catch_up(store: &kv::Store, m: &Mirror) -> Result<kv::Watch> {
    // `watch_all` delivers only new writes; with history it starts
    // with the latest revision of every key.
    let mut watch =
        store.watch_with_history(">").await.map_err(|e| engine_err(&format!("watching {}", m.bucket), e))?;
    // Created after the watch: anything stored later arrives through it.
    let status = store.status().await.map_err(|e| engine_err(&format!("status of {}", m.bucket), e))?;
    if status.info.state.messages == 0 {
        return Ok(watch);
    }
    loop {
        match tokio::time::timeout(OPEN_TIMEOUT, watch.next()).await {
            Ok(Some(Ok(e))) => {
                let caught_up = e.delta == 0;
                apply(m, e);
                if caught_up {
                    return Ok(watch);
                }
            }
            Ok(Some(Err(e))) => return Err(engine_err(&format!("loading {}", m.bucket), e)),
            Ok(None) => return Err(StoreError::Engine(format!("the watch of {} ended while loading", m.bucket))),
            Err(_) => return Err(StoreError::Engine(format!("loading {} timed out", m.bucket))),
        }
    }
}

/// Applies the watch for as long as the engine runs; a watch that ends
/// is started again after the last revision seen.
async fn follow(store: kv::Store, mirrors: Arc<Vec<Mirror>>, i: usize, mut watch: kv::Watch) {
    let m = &mirrors[i];
    loop {
        match watch.next().await {
            Some(Ok(e)) => apply(m, e),
            Some(Err(e)) => tracing::warn!(bucket = m.bucket, error = %e, "cluster store watch"),
            None => loop {
                tracing::warn!(bucket = m.bucket, "cluster store watch ended; resuming");
                tokio::time::sleep(Duration::from_secs(1)).await;
                match store.watch_all_from_revision(m.watched_to() + 1).await {
                    Ok(w) => {
                        watch = w;
                        break;
                    }
                    Err(e) => tracing::warn!(bucket = m.bucket, error = %e, "cluster store watch"),
                }
            },
        }
    }
}

impl Durability for ClusterStore {
    fn committed(&self) -> watch::Receiver<Ticket> {
        self.engine.committed()
    }
    fn shutdown(&self) {
        self.engine.shutdown();
    }
}

impl UserStore for ClusterStore {
    fn get_user(&self, local: &str) -> Result<Option<UserRecord>> {
        self.get(ACCOUNTS, &hex(local))
    }
    fn has_user(&self, local: &str) -> Result<bool> {
        Ok(self.mirror(ACCOUNTS).get(&hex(local)).is_some())
    }
    fn put_user(&self, local: &str, rec: &UserRecord) -> Result<Ticket> {
        self.write(ACCOUNTS, vec![(hex(local), Some(json(rec)?))])
    }
    fn put_users(&self, recs: &[(String, UserRecord)]) -> Result<Ticket> {
        let entries = recs.iter().map(|(l, r)| Ok((hex(l), Some(json(r)?)))).collect::<Result<Vec<_>>>()?;
        self.write(ACCOUNTS, entries)
    }
    fn delete_user(&self, local: &str) -> Result<Ticket> {
        self.write(ACCOUNTS, vec![(hex(local), None)])
    }
    fn list_users(&self) -> Result<Vec<String>> {
        self.mirror(ACCOUNTS).keys("").iter().map(|k| unhex(k)).collect()
    }
}

impl RosterStore for ClusterStore {
    fn roster(&self, owner: &str) -> Result<Vec<RosterItem>> {
        let m = self.mirror(ROSTER);
        m.scan(&owner_prefix(owner)).iter().map(|(k, v)| decode(m.bucket, k, v)).collect()
    }
    fn roster_item(&self, owner: &str, contact: &str) -> Result<Option<RosterItem>> {
        self.get(ROSTER, &pair_key(owner, contact))
    }
    fn put_roster_item(&self, owner: &str, item: &RosterItem) -> Result<Ticket> {
        self.write(ROSTER, vec![(pair_key(owner, &item.jid), Some(json(item)?))])
    }
    fn remove_roster_item(&self, owner: &str, contact: &str) -> Result<Ticket> {
        self.write(ROSTER, vec![(pair_key(owner, contact), None)])
    }
    fn clear_roster(&self, owner: &str) -> Result<Ticket> {
        self.delete_prefix(ROSTER, &owner_prefix(owner))
    }
}

impl SettingsStore for ClusterStore {
    fn get_setting(&self, owner: &str, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.mirror(SETTINGS).get(&pair_key(owner, name)).map(|v| v.to_vec()))
    }
    fn put_setting(&self, owner: &str, name: &str, value: &[u8]) -> Result<Ticket> {
        self.write(SETTINGS, vec![(pair_key(owner, name), Some(Bytes::copy_from_slice(value)))])
    }
    fn clear_settings(&self, owner: &str) -> Result<Ticket> {
        self.delete_prefix(SETTINGS, &owner_prefix(owner))
    }
}

impl GroupStore for ClusterStore {
    fn get_group(&self, id: &str) -> Result<Option<Group>> {
        self.get(GROUPS, &hex(id))
    }
    /// One key: the member index is derived from the groups themselves,
    /// so `previous` is not needed.
    fn put_group(&self, group: &Group, _previous: Option<&Group>) -> Result<Ticket> {
        self.write(GROUPS, vec![(hex(&group.id), Some(json(group)?))])
    }
    fn delete_group(&self, group: &Group) -> Result<Ticket> {
        self.write(GROUPS, vec![(hex(&group.id), None)])
    }
    fn groups_of(&self, local: &str) -> Result<Vec<String>> {
        self.mirror(GROUPS).groups_of(local).iter().map(|k| unhex(k)).collect()
    }
}

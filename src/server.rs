//! Server assembly: open the store, build the shared [`Server`] state,
//! bind listeners, run background jobs, shut down cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::config::{Config, parse_addr};
use crate::router::CloseReason;
use crate::router::{LocalRouter, Router};
use crate::storage::Stores;

/// Accounts whose privacy policy one node keeps in memory.
const POLICY_CACHE_ENTRIES: usize = 1 << 16;

/// State shared by every connection and background task.
pub struct Server {
    pub cfg: Config,
    pub stores: Stores,
    pub router: Arc<dyn Router>,
    /// Handlers of every loaded module.
    pub hooks: crate::hooks::Hooks,
    /// The TLS configuration every listener uses (c2s and HTTPS).
    pub tls: Arc<rustls::ServerConfig>,
    /// `tls-server-end-point` channel binding of the certificate (RFC
    /// 5929), when its hash is known.
    pub tls_end_point: Option<Vec<u8>>,
    next_id: AtomicU64,
    pub shutdown: broadcast::Sender<()>,
    /// Sessions that enabled XEP-0198 resumption, by resumption id.
    pub resumable: std::sync::Mutex<std::collections::HashMap<String, crate::session::Resumable>>,
    /// XEP-0363 slot issuer, set once the HTTP side is up (see
    /// [`crate::http::start`]); unset when this node offers no uploads.
    pub media: std::sync::OnceLock<Arc<crate::media::slot::Issuer>>,
    /// Block lists and visibility settings of recently seen accounts.
    pub policies: crate::modules::privacy::PolicyCache,
    /// Contact-discovery allowance per account.
    pub discovery: crate::modules::contacts::Throttle,
    /// Group creations per account.
    pub group_creations: crate::modules::contacts::Throttle,
    /// Bytes stored through group messages per account.
    pub group_bytes: crate::modules::groups::deliver::ByteBudget,
    /// In-band registrations per client IP.
    pub ibr_limit: crate::modules::register::IpLimit,
    /// Sessions waiting for their stanzas to become durable.
    pub durable: Arc<crate::storage::waiters::Waiters>,
}

impl Server {
    /// Builds the shared state over already-opened stores.
    ///
    /// # Errors
    /// TLS material or store failures.
    pub fn new(cfg: Config, stores: Stores) -> anyhow::Result<Arc<Server>> {
        let router: Arc<dyn Router> = Arc::new(LocalRouter::new(
            &cfg.domain,
            stores.offline.clone(),
            stores.users.clone(),
            crate::router::Limits::from_config(&cfg),
        ));
        let (tls, tls_end_point) = crate::tls::server_config(&cfg)?;
        let srv = Arc::new(Server {
            cfg,
            stores,
            router,
            hooks: crate::hooks::Hooks::build(crate::modules::ALL),
            tls,
            tls_end_point,
            next_id: AtomicU64::new(1),
            shutdown: broadcast::channel(1).0,
            resumable: Default::default(),
            media: Default::default(),
            policies: crate::modules::privacy::PolicyCache::new(POLICY_CACHE_ENTRIES),
            discovery: Default::default(),
            group_creations: Default::default(),
            group_bytes: Default::default(),
            ibr_limit: Default::default(),
            durable: Default::default(),
        });
        // The durability waiters follow the engine's watermark for as long
        // as the server lives (a server built outside a runtime, in unit
        // tests, has none and must not wait for durability).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let w = srv.durable.clone();
            let rx = srv.stores.durability.committed();
            rt.spawn(async move { w.run(rx).await });
        }
        Ok(srv)
    }

    pub fn domain(&self) -> &str {
        &self.cfg.domain
    }

    /// A process-unique id for connections and sessions.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Ends every session of an account (deleted, or its password changed).
    pub fn kick_account(&self, local: &str) {
        self.router.close_sessions(local, CloseReason::AccountGone, None);
    }
}

/// Listeners bound by [`bind`], with their actual addresses.
pub struct Bound {
    pub c2s: Option<(TcpListener, SocketAddr)>,
    pub c2s_tls: Option<(TcpListener, SocketAddr)>,
}

async fn bind_one(addr: &str) -> anyhow::Result<Option<(TcpListener, SocketAddr)>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let a = parse_addr(addr)?;
    let l = TcpListener::bind(a).await.with_context(|| format!("binding {a}"))?;
    let local = l.local_addr()?;
    Ok(Some((l, local)))
}

/// Refuses plaintext auth on anything but loopback.
///
/// # Errors
/// When `allow_plaintext` is set and a c2s listener is not on loopback.
pub fn check_plaintext(cfg: &Config) -> anyhow::Result<()> {
    if !cfg.listen.allow_plaintext {
        return Ok(());
    }
    for a in [&cfg.listen.c2s, &cfg.listen.c2s_tls] {
        if a.is_empty() {
            continue;
        }
        let sa = parse_addr(a)?;
        if !sa.ip().is_loopback() {
            bail!("--allow-plaintext requires every c2s listener on loopback, but {a} is not");
        }
    }
    tracing::warn!("plaintext SASL allowed on loopback listeners: never use this in production");
    Ok(())
}

/// Makes every file and directory this process creates private to its
/// owner (directories 0700, files 0600) by setting the umask to 077.
///
/// It runs first thing in `main`, before any file exists, so there is no
/// window in which a key, a socket, the store or an SMS outbox is readable
/// by others (a `chmod` after creation leaves one). An existing data
/// directory from an older version is tightened to 0700 by
/// [`secure_data_dir`].
pub fn restrict_file_modes() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates the data directory (0700 under [`restrict_file_modes`]), or
/// tightens an existing one that others could enter.
///
/// # Errors
/// When the directory cannot be created or its mode read.
pub fn secure_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "data directory was open to others; setting 0700");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Runs the server until SIGINT/SIGTERM.
///
/// # Errors
/// Startup failures (store locked, ports in use, bad TLS material).
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    // A media node has no c2s listeners; its HTTP listener takes plain
    // HTTP on loopback only (see `http::Transport`).
    if cfg.role == crate::config::Role::Media {
        return serve_media(cfg).await;
    }
    if cfg.cluster.is_some() {
        // Refused rather than ignored: a node that silently ran alone on
        // its own data directory would split the accounts.
        anyhow::bail!(
            "`chatd serve` does not run with [cluster] yet (cross-node delivery is not built); \
             the cluster storage is usable through `chatd user … --config`. Remove [cluster] to serve a single node"
        );
    }
    check_plaintext(&cfg)?;
    secure_data_dir(&cfg.data_dir)?;
    let stores =
        Stores::open_fjall(&cfg.data_dir).with_context(|| format!("opening store in {}", cfg.data_dir.display()))?;
    let srv = Server::new(cfg, stores)?;
    let bound = Bound { c2s: bind_one(&srv.cfg.listen.c2s).await?, c2s_tls: bind_one(&srv.cfg.listen.c2s_tls).await? };
    let admin = crate::admin::listen(srv.clone()).await?;
    let mut tasks = Vec::new();
    // HTTP and media first: once a c2s line is printed, everything a
    // client can ask for (upload slots included) is ready.
    let api = crate::api::accounts::routes(srv.clone())?;
    tasks.extend(crate::http::start(&srv.cfg, &srv.tls, Some(&srv.media), vec![api]).await?);
    let starttls = bound.c2s.map(|(l, a)| {
        println!("listening c2s {a}");
        l
    });
    let direct = bound.c2s_tls.map(|(l, a)| {
        println!("listening c2s-tls {a}");
        l
    });
    if starttls.is_some() || direct.is_some() {
        let c2s = crate::c2s::C2s::new(srv.clone())?;
        tasks.push(tokio::spawn(crate::c2s::accept_loop(c2s, starttls, direct)));
    }
    tasks.push(tokio::spawn(crate::modules::offline::reaper(srv.clone())));
    tasks.push(admin);
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    tracing::info!(domain = %srv.cfg.domain, data_dir = %srv.cfg.data_dir.display(), "chatd started");

    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = srv.shutdown.send(());
    srv.router.close_all(CloseReason::Shutdown);
    for t in &tasks {
        t.abort();
    }
    // Give connections a moment to flush their closing stream errors.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    crate::admin::cleanup(&srv.cfg.data_dir);
    srv.stores.durability.shutdown();
    Ok(())
}

/// `--role media`: only the HTTPS media service, no XMPP and no chat
/// store.
async fn serve_media(cfg: Config) -> anyhow::Result<()> {
    secure_data_dir(&cfg.data_dir)?;
    let (tls, _) = crate::tls::server_config(&cfg)?;
    let tasks = crate::http::start(&cfg, &tls, None, Vec::new()).await?;
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    tracing::info!(data_dir = %cfg.data_dir.display(), "chatd media node started");
    wait_for_signal().await;
    for t in &tasks {
        t.abort();
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

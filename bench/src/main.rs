//! chatd-bench: a load generator for XMPP servers (chatd, ejabberd,
//! Prosody) speaking plain RFC 6120 over TCP.

mod accounts;
mod client;
mod metrics;
mod procstat;
mod refserver;
mod report;
mod results;
mod run;
mod scram;
mod session;
mod xml;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::Target;
use crate::metrics::Metrics;
use crate::results::RunResult;
use crate::run::Ctx;

#[derive(Parser)]
#[command(name = "chatd-bench", version, about = "Load generator for XMPP chat servers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the benchmark accounts (phase a).
    Accounts(Box<AccountsArgs>),
    /// Run benchmark phases against a running server (phases b-e).
    Run(Box<RunArgs>),
    /// Merge result JSON files into a Markdown table, JSON summary and PNG chart.
    Report(report::ReportArgs),
    /// A minimal in-memory XMPP router (any password, no storage) to measure
    /// the generator's own floor of latency and CPU.
    Refserver(RefserverArgs),
}

#[derive(Args)]
struct RefserverArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5222)]
    port: u16,
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Tokio worker threads (default: CPU count).
    #[arg(long)]
    threads: Option<usize>,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server c2s port (plain TCP).
    #[arg(long, default_value_t = 5222)]
    port: u16,
    /// XMPP domain of the accounts.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Localpart prefix; account N is PREFIX + N zero-padded to 7 digits.
    #[arg(long, default_value = "1555")]
    prefix: String,
    /// Password of every benchmark account.
    #[arg(long, default_value = "bench-secret")]
    password: String,
    /// Resource to bind.
    #[arg(long, default_value = "bench")]
    resource: String,
    /// Force a SASL mechanism (default: SCRAM-SHA-256, SCRAM-SHA-1, PLAIN).
    #[arg(long)]
    mechanism: Option<String>,
    /// Tokio worker threads of the generator (default: CPU count).
    #[arg(long)]
    threads: Option<usize>,
    /// Abort after this many seconds in total.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
}

impl ServerArgs {
    fn target(&self) -> Result<Target> {
        let addr: SocketAddr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolve {}", self.host))?
            .next()
            .ok_or_else(|| anyhow!("no address for {}", self.host))?;
        Ok(Target {
            addr,
            domain: self.domain.clone(),
            resource: self.resource.clone(),
            mechanism: self.mechanism.clone(),
        })
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum AccountMode {
    /// Write the CSV and run `chatd user import` (server must be stopped).
    Import,
    /// XEP-0077 in-band registration against a running server.
    Ibr,
    /// Only write the CSV.
    Csv,
}

#[derive(Args)]
struct AccountsArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long, value_enum, default_value = "ibr")]
    mode: AccountMode,
    /// Number of accounts (indices FIRST..FIRST+COUNT).
    #[arg(long, default_value_t = 11000)]
    count: usize,
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// CSV file to write (import/csv modes).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// chatd binary (import mode).
    #[arg(long, default_value = "target/release/chatd")]
    chatd_bin: PathBuf,
    /// chatd data directory (import mode).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Parallel registration connections (ibr mode).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Phase {
    Login,
    Idle,
    Steady,
    Offline,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Label of the server in the results.
    #[arg(long, default_value = "server")]
    server_name: String,
    /// Label of the scenario in the results.
    #[arg(long, default_value = "load")]
    scenario: String,
    /// PID to read CPU and memory from (default: the process listening on --port).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Phases to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "login,idle,steady")]
    phases: Vec<Phase>,
    /// Concurrent sessions (accounts FIRST..FIRST+SESSIONS).
    #[arg(long, default_value_t = 10000)]
    sessions: usize,
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Handshakes in flight at once during the login ramp.
    #[arg(long, default_value_t = 100)]
    login_concurrency: usize,
    /// Seconds one login may take.
    #[arg(long, default_value_t = 30)]
    login_timeout: u64,
    /// Do not fetch SCRAM salts before the measured logins.
    #[arg(long)]
    no_prime: bool,
    /// Do not enable XEP-0198 stream management.
    #[arg(long)]
    no_sm: bool,
    /// Seconds between client `<r/>` requests.
    #[arg(long, default_value_t = 1.0)]
    ack_interval: f64,
    /// Seconds to wait after logins before reading memory.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Target message rates (msgs/s) of the steady steps.
    #[arg(long, value_delimiter = ',', default_value = "200,500,1000,2000,5000,10000,20000,50000,100000,200000")]
    rates: Vec<f64>,
    /// Seconds each step sends.
    #[arg(long, default_value_t = 5.0)]
    step_secs: f64,
    /// Seconds to wait for a step's messages after it stops sending.
    #[arg(long, default_value_t = 5.0)]
    drain_secs: f64,
    /// Pause between steps.
    #[arg(long, default_value_t = 1.0)]
    pause_secs: f64,
    /// Unreported warm-up seconds before the first step.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Stop stepping once p99 latency exceeds this.
    #[arg(long, default_value_t = 10.0)]
    max_p99_ms: f64,
    /// Stop stepping once more messages than this are lost in a step.
    #[arg(long, default_value_t = 0)]
    max_lost: u64,
    /// Latency above which a delivered message counts as late.
    #[arg(long, default_value_t = 1000)]
    late_ms: u64,
    /// Message-sending tasks.
    #[arg(long, default_value_t = 4)]
    drivers: usize,
    /// Upper bound on messages sent in the whole run.
    #[arg(long, default_value_t = 20_000_000)]
    max_messages: u64,
    /// Offline users (accounts after the online ones unless --offline-first).
    #[arg(long, default_value_t = 1000)]
    offline_users: usize,
    #[arg(long)]
    offline_first: Option<usize>,
    /// Messages sent to offline users.
    #[arg(long, default_value_t = 20000)]
    offline_messages: u64,
    /// Online sessions sending the offline burst.
    #[arg(long, default_value_t = 100)]
    offline_senders: usize,
    /// Seconds to wait for all offline messages after the users log in.
    #[arg(long, default_value_t = 60)]
    offline_drain_timeout: u64,
    /// A few sessions for a few seconds: for smoke tests (implies --strict).
    #[arg(long)]
    smoke: bool,
    /// Exit with an error if a login failed, a session dropped or a message
    /// was lost.
    #[arg(long)]
    strict: bool,
    /// Write the results here (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let nofile = procstat::raise_nofile();
    let threads = match &cli.cmd {
        Cmd::Accounts(a) => a.server.threads,
        Cmd::Run(r) => r.server.threads,
        Cmd::Report(_) => Some(1),
        Cmd::Refserver(r) => r.threads,
    }
    .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        let r = match cli.cmd {
            Cmd::Accounts(a) => accounts_cmd(*a).await,
            Cmd::Run(r) => run_cmd(*r, threads, nofile).await,
            Cmd::Report(r) => report::report(&r),
            Cmd::Refserver(r) => refserver_cmd(r).await,
        };
        match r {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

async fn accounts_cmd(a: AccountsArgs) -> Result<()> {
    let range = a.first..a.first + a.count;
    let s = &a.server;
    match a.mode {
        AccountMode::Csv | AccountMode::Import => {
            let csv = a.csv.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("chatd-bench-accounts-{}.csv", std::process::id()))
            });
            accounts::write_csv(&csv, &s.prefix, &s.password, range.clone())?;
            eprintln!("wrote {} accounts to {}", a.count, csv.display());
            if a.mode == AccountMode::Import {
                let dir = a.data_dir.clone().ok_or_else(|| anyhow!("--data-dir is required for import"))?;
                let secs = accounts::chatd_import(&a.chatd_bin, &dir, &csv)?;
                eprintln!("imported {} accounts in {secs:.2}s ({:.0}/s)", a.count, a.count as f64 / secs);
                if a.csv.is_none() {
                    let _ = std::fs::remove_file(&csv);
                }
            }
            Ok(())
        }
        AccountMode::Ibr => {
            let t = s.target()?;
            let fut = accounts::register_ibr(&t, &s.prefix, &s.password, range, a.concurrency, Duration::from_secs(30));
            let o = tokio::time::timeout(Duration::from_secs(s.timeout), fut)
                .await
                .map_err(|_| anyhow!("registration timed out"))?;
            eprintln!(
                "registered {} new, {} existing, {} failed in {:.2}s ({:.0}/s)",
                o.created,
                o.existed,
                o.failed,
                o.secs,
                (o.created + o.existed) as f64 / o.secs
            );
            if o.failed > 0 {
                bail!("{} registrations failed; first error: {}", o.failed, o.first_error.unwrap_or_default());
            }
            Ok(())
        }
    }
}

async fn refserver_cmd(a: RefserverArgs) -> Result<()> {
    let l = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await?;
    println!("listening c2s {}", l.local_addr()?);
    match tokio::time::timeout(Duration::from_secs(a.timeout), refserver::serve(l, a.domain)).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

fn apply_smoke(r: &mut RunArgs) {
    r.strict = true;
    r.sessions = r.sessions.min(6);
    r.login_concurrency = r.login_concurrency.min(6);
    r.settle = r.settle.min(0.5);
    r.rates = vec![20.0, 50.0];
    r.step_secs = r.step_secs.min(1.0);
    r.drain_secs = r.drain_secs.min(3.0);
    r.pause_secs = r.pause_secs.min(0.2);
    r.warmup_secs = 0.0;
    r.offline_users = r.offline_users.min(3);
    r.offline_messages = r.offline_messages.min(30);
    r.offline_senders = r.offline_senders.min(3);
    r.offline_drain_timeout = r.offline_drain_timeout.min(10);
    r.server.timeout = r.server.timeout.min(60);
}

async fn run_cmd(mut r: RunArgs, threads: usize, nofile: u64) -> Result<()> {
    if r.smoke {
        apply_smoke(&mut r);
    }
    let target = r.server.target()?;
    let pid = r
        .server_pid
        .or_else(|| if target.addr.ip().is_loopback() { procstat::pid_listening_on(r.server.port) } else { None });
    let result = Arc::new(Mutex::new(RunResult {
        server: r.server_name.clone(),
        scenario: r.scenario.clone(),
        sessions: r.sessions,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        generator_threads: threads,
        server_pid: pid,
        server_nofile_limit: pid.and_then(procstat::nofile_limit),
        ..Default::default()
    }));
    eprintln!(
        "[{}] server pid {:?} (open files limit {:?}), generator: {threads} threads, open files limit {nofile}",
        r.server_name,
        pid,
        pid.and_then(procstat::nofile_limit)
    );
    let ctx = Arc::new(Ctx {
        target,
        prefix: r.server.prefix.clone(),
        password: r.server.password.clone(),
        pid,
        metrics: Arc::new(Metrics::new(r.max_messages, r.late_ms)),
        want_sm: !r.no_sm,
        login_timeout: Duration::from_secs(r.login_timeout),
        login_concurrency: r.login_concurrency,
        prime: !r.no_prime,
        registry: Arc::new(Mutex::new(Vec::new())),
    });
    let stop = Arc::new(AtomicBool::new(false));
    run::spawn_ack_ticker(ctx.registry.clone(), Duration::from_secs_f64(r.ack_interval.max(0.05)), stop.clone());
    let start = Instant::now();
    let timeout = Duration::from_secs(r.server.timeout);
    let out = tokio::time::timeout(timeout, phases(&ctx, &r, &result)).await;
    let outcome = match out {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!("run timed out after {}s", r.server.timeout)),
    };
    run::close_all(&ctx.registry, Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut res = result.lock().expect("result").clone();
    let outcome = match outcome {
        Ok(()) if r.strict => strict_check(&res),
        o => o,
    };
    res.total_secs = start.elapsed().as_secs_f64();
    res.completed = outcome.is_ok();
    if let Err(e) = &outcome {
        res.errors.push(format!("{e:#}"));
    }
    let json = serde_json::to_string_pretty(&res)?;
    match &r.out {
        Some(p) => {
            std::fs::write(p, &json).with_context(|| format!("write {}", p.display()))?;
            eprintln!("[{}] results written to {}", r.server_name, p.display());
        }
        None => println!("{json}"),
    }
    outcome
}

/// Failures that `--strict` turns into an error exit.
fn strict_check(res: &RunResult) -> Result<()> {
    let mut bad = Vec::new();
    if let Some(l) = &res.login
        && l.failed > 0
    {
        bad.push(format!("{} logins failed", l.failed));
    }
    if let Some(st) = &res.steady {
        for p in &st.steps {
            if p.lost > 0 || p.errors > 0 || p.sessions_alive < res.sessions {
                bad.push(format!(
                    "at {:.0}/s: {} lost, {} error replies, {} of {} sessions alive",
                    p.target_rate, p.lost, p.errors, p.sessions_alive, res.sessions
                ));
            }
        }
    }
    if let Some(o) = &res.offline
        && (o.lost > 0 || o.login_ok < o.users || o.confirmed_senders < o.senders)
    {
        bad.push(format!(
            "offline: {} of {} received, {} of {} users logged in, {} of {} senders confirmed",
            o.received, o.messages, o.login_ok, o.users, o.confirmed_senders, o.senders
        ));
    }
    if bad.is_empty() { Ok(()) } else { bail!("strict check failed: {}", bad.join("; ")) }
}

async fn phases(ctx: &Ctx, r: &RunArgs, result: &Mutex<RunResult>) -> Result<()> {
    let has = |p: Phase| r.phases.contains(&p);
    let online = r.first..r.first + r.sessions;
    let rss_before = ctx.pid.and_then(procstat::rss_kib);
    let mut sessions = Vec::new();
    if has(Phase::Login) || has(Phase::Idle) || has(Phase::Steady) {
        let mut res = result.lock().expect("result").clone();
        let s = run::phase_login(ctx, online.clone(), &mut res).await;
        *result.lock().expect("result") = res;
        sessions = s?;
    }
    if has(Phase::Idle) {
        let idle = run::phase_idle(ctx, &sessions, rss_before, Duration::from_secs_f64(r.settle)).await;
        result.lock().expect("result").idle = Some(idle);
    }
    if has(Phase::Steady) {
        let o = run::SteadyOpts {
            rates: r.rates.clone(),
            step: Duration::from_secs_f64(r.step_secs),
            drain: Duration::from_secs_f64(r.drain_secs),
            pause: Duration::from_secs_f64(r.pause_secs),
            warmup: Duration::from_secs_f64(r.warmup_secs),
            max_p99_ms: r.max_p99_ms,
            max_lost: r.max_lost,
            drivers: r.drivers,
        };
        let st = run::phase_steady(ctx, &sessions, &o).await;
        ctx.log(&format!("steady: max passing rate {:.0}/s, stopped: {}", st.max_ok_rate, st.stop_reason));
        result.lock().expect("result").steady = Some(st);
    }
    if has(Phase::Offline) {
        let n_senders = r.offline_senders.min(r.sessions).max(1);
        let senders = if sessions.is_empty() {
            let mut res = result.lock().expect("result").clone();
            let range = r.first..r.first + n_senders;
            let s = run::phase_login(ctx, range, &mut res).await;
            *result.lock().expect("result") = res;
            s?
        } else {
            sessions.iter().take(n_senders).cloned().collect()
        };
        let first = r.offline_first.unwrap_or(r.first + r.sessions);
        let o = run::OfflineOpts {
            users: first..first + r.offline_users,
            messages: r.offline_messages,
            confirm_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(r.offline_drain_timeout),
        };
        let off = run::phase_offline(ctx, &senders, &o).await;
        result.lock().expect("result").offline = Some(off);
    }
    Ok(())
}

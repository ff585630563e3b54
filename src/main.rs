//! The `chatd` command line: `serve` and `user …`.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use chatd::accounts::{self, make_record, now_ms};
use chatd::admin::{self, Request};
use chatd::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "chatd", version, about = "XMPP messaging server for phone-number accounts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// TOML configuration file (see chatd.toml for every key and default).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (store, certificate, admin socket).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        #[command(flatten)]
        common: Common,
        /// XMPP domain.
        #[arg(long)]
        domain: Option<String>,
        /// c2s (STARTTLS) listener, HOST:PORT; port 0 picks a free port.
        #[arg(long)]
        c2s: Option<String>,
        /// Direct-TLS c2s listener (XEP-0368), HOST:PORT.
        #[arg(long = "c2s-tls")]
        c2s_tls: Option<String>,
        /// HTTPS listener, HOST:PORT.
        #[arg(long)]
        http: Option<String>,
        /// Allow SASL without TLS (loopback listeners only); also accepts
        /// plain HTTP on a loopback HTTP listener.
        #[arg(long)]
        allow_plaintext: bool,
        /// Services to run: all, chat (XMPP only) or media (HTTPS media only).
        #[arg(long, value_enum)]
        role: Option<chatd::config::Role>,
    },
    /// Manage accounts (works with or without a running server).
    User {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        cmd: UserCmd,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create an account. Without --password the password is read from a
    /// prompt (no echo) or, when stdin is not a terminal, from its first line.
    Add {
        phone: String,
        /// For scripts only: other users can see it with `ps`. Prefer the
        /// prompt or stdin.
        #[arg(long)]
        password: Option<String>,
    },
    /// Delete an account and everything stored for it.
    Del { phone: String },
    /// Change an account's password; its sessions are closed. Without
    /// --password it is read from a prompt (no echo) or stdin.
    Passwd {
        phone: String,
        /// For scripts only: other users can see it with `ps`.
        #[arg(long)]
        password: Option<String>,
    },
    /// List accounts.
    List,
    /// Import accounts from a CSV file of `phone,password` lines.
    Import { file: PathBuf },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHATD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn,async_nats=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> std::process::ExitCode {
    // Before anything can create a file: keys, sockets, the store and the
    // SMS outbox are born private.
    chatd::server::restrict_file_modes();
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve { common, domain, c2s, c2s_tls, http, allow_plaintext, role } => {
            let ov = Overrides { data_dir: common.data_dir, domain, c2s, c2s_tls, http, allow_plaintext, role };
            let cfg = Config::load(common.config.as_deref(), &ov)?;
            raise_nofile_limit();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(chatd::server::serve(cfg))
        }
        Cmd::User { common, cmd } => {
            let ov = Overrides { data_dir: common.data_dir, ..Default::default() };
            let cfg = Config::load(common.config.as_deref(), &ov)?;
            user(&cfg, cmd)
        }
    }
}

fn local(cfg: &Config, phone: &str) -> anyhow::Result<String> {
    accounts::account_local(phone, cfg.region()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn user(cfg: &Config, cmd: UserCmd) -> anyhow::Result<()> {
    let adm = admin::Admin::open(cfg)?;
    let iters = cfg.auth.scram_iterations;
    match cmd {
        UserCmd::Add { phone, password } => {
            let l = local(cfg, &phone)?;
            let password = password_or_prompt(password)?;
            check_password(&password)?;
            let rec = make_record(&password, iters, now_ms());
            adm.run(Request::Put { users: vec![(l.clone(), rec)], replace: false, must_exist: false })?;
            println!("added {l}@{}", cfg.domain);
        }
        UserCmd::Del { phone } => {
            let l = local(cfg, &phone)?;
            adm.run(Request::Delete { local: l.clone() })?;
            println!("deleted {l}@{}", cfg.domain);
        }
        UserCmd::Passwd { phone, password } => {
            let l = local(cfg, &phone)?;
            let password = password_or_prompt(password)?;
            check_password(&password)?;
            let mut rec = make_record(&password, iters, now_ms());
            rec.key_generation = 1;
            adm.run(Request::Put { users: vec![(l.clone(), rec)], replace: true, must_exist: true })?;
            println!("password changed for {l}@{}", cfg.domain);
        }
        UserCmd::List => {
            let r = adm.run(Request::List)?;
            for u in r.users {
                println!("{u}@{}", cfg.domain);
            }
        }
        UserCmd::Import { file } => import(cfg, &adm, &file)?,
    }
    Ok(())
}

/// The password from `--password`, else from the terminal (asked twice,
/// not echoed), else the first line of stdin (for scripts that must not
/// put it on a command line, where `ps` shows it).
fn password_or_prompt(given: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = given {
        return Ok(p);
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let first = prompt_hidden("Password: ")?;
        let again = prompt_hidden("Repeat password: ")?;
        if first != again {
            bail!("the passwords do not match");
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Reads one line from the terminal with echo off, restoring the terminal
/// afterwards.
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::io::Write;
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios calls on our own stdin with a zeroed, then
        // filled-in struct.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        let have = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
        if have {
            let mut quiet = saved;
            quiet.c_lflag &= !libc::ECHO;
            quiet.c_lflag |= libc::ECHONL;
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
        }
        let r = std::io::stdin().lock().read_line(&mut line);
        if have {
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        }
        r.context("reading the password")?;
    }
    #[cfg(not(unix))]
    std::io::stdin().lock().read_line(&mut line).context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn check_password(p: &str) -> anyhow::Result<()> {
    if p.is_empty() || p.len() > 1024 {
        bail!("password must be 1 to 1024 bytes");
    }
    Ok(())
}

/// Imports `phone,password` rows: validates every row first (nothing is
/// written if one is bad), derives keys on all cores, writes in chunks.
fn import(cfg: &Config, adm: &admin::Admin, file: &std::path::Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((phone, pw)) = line.split_once(',') else {
            errors.push(format!("line {}: expected phone,password", i + 1));
            continue;
        };
        let (phone, pw) = (phone.trim().trim_matches('"'), pw.trim_matches('"'));
        if i == 0 && phone.eq_ignore_ascii_case("phone") {
            continue;
        }
        match local(cfg, phone) {
            Ok(l) if !pw.is_empty() => rows.push((l, pw.to_string())),
            Ok(_) => errors.push(format!("line {}: empty password", i + 1)),
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !errors.is_empty() {
        for e in errors.iter().take(10) {
            eprintln!("{e}");
        }
        bail!("{} invalid rows; nothing imported", errors.len());
    }
    let started = std::time::Instant::now();
    let iters = cfg.auth.scram_iterations;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = rows.len().div_ceil(threads).max(1);
    let now = now_ms();
    let mut records: Vec<(String, chatd::storage::UserRecord)> = Vec::with_capacity(rows.len());
    std::thread::scope(|sc| {
        let handles: Vec<_> = rows
            .chunks(chunk)
            .map(|part| {
                sc.spawn(move || part.iter().map(|(l, p)| (l.clone(), make_record(p, iters, now))).collect::<Vec<_>>())
            })
            .collect();
        for h in handles {
            if let Ok(v) = h.join() {
                records.extend(v);
            }
        }
    });
    let mut total = 0;
    for part in records.chunks(5000) {
        let r = adm.run(Request::Put { users: part.to_vec(), replace: true, must_exist: false })?;
        total += r.count;
    }
    eprintln!("imported {total} accounts in {:.1}s", started.elapsed().as_secs_f64());
    println!("imported {total}");
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: every client is a
/// file descriptor.
fn raise_nofile_limit() {
    #[cfg(unix)]
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

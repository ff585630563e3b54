//! The benchmark phases: login, idle, steady load, offline burst.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Conn, Target, login};
use crate::metrics::Metrics;
use crate::procstat::{self, CpuMark};
use crate::results::{IdleResult, LoginResult, OfflineResult, RunResult, SteadyResult, StepResult};
use crate::session::Session;

pub fn localpart(prefix: &str, idx: usize) -> String {
    format!("{prefix}{idx:07}")
}

/// Settings shared by all phases.
pub struct Ctx {
    pub target: Target,
    pub prefix: String,
    pub password: String,
    pub pid: Option<u32>,
    pub metrics: Arc<Metrics>,
    pub want_sm: bool,
    pub login_timeout: Duration,
    pub login_concurrency: usize,
    pub prime: bool,
    pub registry: Arc<Mutex<Vec<Arc<Session>>>>,
}

impl Ctx {
    pub fn log(&self, msg: &str) {
        eprintln!("[{}] {msg}", self.target.domain_label());
    }

    fn rss(&self) -> Option<u64> {
        self.pid.and_then(procstat::rss_kib)
    }
}

impl Target {
    fn domain_label(&self) -> String {
        format!("{}", self.addr)
    }
}

/// Sends `<r/>` on every session with unacknowledged stanzas, periodically.
pub fn spawn_ack_ticker(registry: Arc<Mutex<Vec<Arc<Session>>>>, every: Duration, stop: Arc<AtomicBool>) {
    crate::session::ACK_EVERY_NS.store(every.as_nanos() as u64, Relaxed);
    // Visit a slice of the sessions every 10 ms, so requests are spread
    // over the interval instead of arriving at the server in one burst.
    let slices = (every.as_millis() / 10).max(1) as usize;
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(every / slices as u32);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut k = 0usize;
        while !stop.load(Relaxed) {
            iv.tick().await;
            let part: Vec<Arc<Session>> = {
                let all = registry.lock().expect("registry");
                let n = all.len();
                all[n * k / slices..n * (k + 1) / slices].to_vec()
            };
            for s in part {
                s.maybe_request_ack();
            }
            k = (k + 1) % slices;
        }
    });
}

/// Finds which SASL mechanism the server will be asked for.
pub async fn probe_mechanism(t: &Target) -> Result<(String, bool)> {
    let c = Conn::connect(t).await?;
    let m = c.choose_mechanism(t.mechanism.as_deref())?;
    let register = c.features.child("register").is_some();
    Ok((m, register))
}

/// Fetches salts of `range` and fills the SCRAM cache (not measured).
pub async fn prime(ctx: &Ctx, range: Range<usize>, mech: &str) -> (usize, usize) {
    let sem = Arc::new(Semaphore::new(ctx.login_concurrency.max(1)));
    let mut set = JoinSet::new();
    for idx in range {
        let (t, user, pw, m, sem) =
            (ctx.target.clone(), localpart(&ctx.prefix, idx), ctx.password.clone(), mech.to_string(), sem.clone());
        let to = ctx.login_timeout;
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            let f = async {
                let c = Conn::connect(&t).await?;
                c.prime_scram(&user, &pw, &m).await
            };
            matches!(tokio::time::timeout(to, f).await, Ok(Ok(())))
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(true)) { ok += 1 } else { failed += 1 }
    }
    (ok, failed)
}

pub struct LoginOutcome {
    pub sessions: Vec<Arc<Session>>,
    pub failed: usize,
    pub errors: BTreeMap<String, usize>,
    pub mechanism: String,
    pub secs: f64,
}

/// Logs in every account of `range` with at most `login_concurrency`
/// handshakes in flight.
pub async fn login_range(ctx: &Ctx, range: Range<usize>) -> LoginOutcome {
    let sem = Arc::new(Semaphore::new(ctx.login_concurrency.max(1)));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for idx in range {
        let (t, user, pw, sem, m) =
            (ctx.target.clone(), localpart(&ctx.prefix, idx), ctx.password.clone(), sem.clone(), ctx.metrics.clone());
        let (sm, to) = (ctx.want_sm, ctx.login_timeout);
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            let mut last = None;
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                match login(&t, idx, &user, &pw, m.clone(), sm, to).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("an error"))
        });
    }
    let mut out =
        LoginOutcome { sessions: Vec::new(), failed: 0, errors: BTreeMap::new(), mechanism: String::new(), secs: 0.0 };
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((s, mech))) => {
                out.mechanism = mech;
                ctx.registry.lock().expect("registry").push(s.clone());
                out.sessions.push(s);
            }
            Ok(Err(e)) => {
                out.failed += 1;
                *out.errors.entry(format!("{e:#}")).or_default() += 1;
            }
            Err(e) => {
                out.failed += 1;
                *out.errors.entry(format!("task: {e}")).or_default() += 1;
            }
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    out.sessions.sort_by_key(|s| s.idx);
    out
}

fn note_errors(res: &mut RunResult, what: &str, errors: &BTreeMap<String, usize>) {
    for (e, n) in errors.iter().take(5) {
        res.errors.push(format!("{what}: {n} x {e}"));
    }
}

/// Phase (b): logins, with CPU accounting.
pub async fn phase_login(ctx: &Ctx, range: Range<usize>, res: &mut RunResult) -> Result<Vec<Arc<Session>>> {
    let (mech, _) = probe_mechanism(&ctx.target).await?;
    let mut prime_secs = 0.0;
    if ctx.prime && mech.starts_with("SCRAM") {
        let t = Instant::now();
        let (ok, failed) = prime(ctx, range.clone(), &mech).await;
        prime_secs = t.elapsed().as_secs_f64();
        ctx.log(&format!(
            "primed {ok} SCRAM salts ({failed} failed, {} cached) in {prime_secs:.1}s",
            crate::scram::cache_len()
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let attempted = range.len();
    ctx.log(&format!("logging in {attempted} sessions ({mech}, {} concurrent)", ctx.login_concurrency));
    let mark = CpuMark::take(ctx.pid);
    let out = login_range(ctx, range).await;
    let cpu = mark.since(ctx.pid);
    let (server_cpu, gen_cpu) = (cpu.server, cpu.generator);
    let ok = out.sessions.len();
    let sm = out.sessions.iter().filter(|s| s.sm_on.load(Relaxed)).count();
    let lr = LoginResult {
        attempted,
        ok,
        failed: out.failed,
        mechanism: out.mechanism.clone(),
        stream_management: sm,
        prime_secs,
        secs: out.secs,
        logins_per_s: ok as f64 / out.secs.max(1e-9),
        server_cpu_s: server_cpu,
        server_cpu_ms_per_login: server_cpu.map(|c| c * 1000.0 / ok.max(1) as f64),
        gen_cpu_s: gen_cpu,
        gen_cpu_ms_per_login: gen_cpu * 1000.0 / ok.max(1) as f64,
        other_cpu_pct: cpu.other.map(|o| cpu.pct(o)),
    };
    ctx.log(&format!(
        "logins: {ok}/{attempted} in {:.2}s = {:.0}/s, server CPU {} ms/login, generator CPU {:.3} ms/login, SM on {sm}",
        out.secs,
        lr.logins_per_s,
        lr.server_cpu_ms_per_login.map_or("?".into(), |v| format!("{v:.3}")),
        lr.gen_cpu_ms_per_login
    ));
    note_errors(res, "login", &out.errors);
    res.login = Some(lr);
    if ok == 0 {
        bail!("no session logged in: {:?}", out.errors.keys().next());
    }
    Ok(out.sessions)
}

/// Phase (c): memory per idle session after a settle period.
pub async fn phase_idle(ctx: &Ctx, sessions: &[Arc<Session>], rss_before: Option<u64>, settle: Duration) -> IdleResult {
    let mark = CpuMark::take(ctx.pid);
    tokio::time::sleep(settle).await;
    let cpu = mark.since(ctx.pid);
    let (wall, server_cpu) = (cpu.wall, cpu.server);
    let alive = sessions.iter().filter(|s| s.is_alive()).count();
    let after = ctx.rss();
    let per = match (rss_before, after) {
        (Some(b), Some(a)) if alive > 0 => Some((a as f64 - b as f64) / alive as f64),
        _ => None,
    };
    let r = IdleResult {
        sessions: alive,
        rss_before_kib: rss_before,
        rss_after_kib: after,
        kib_per_session: per,
        settle_secs: wall,
        server_cpu_pct: server_cpu.map(|c| c * 100.0 / wall),
    };
    ctx.log(&format!(
        "idle: {alive} sessions, RSS {:?} -> {:?} KiB = {} KiB/session, idle server CPU {}%",
        rss_before,
        after,
        per.map_or("?".into(), |v| format!("{v:.1}")),
        r.server_cpu_pct.map_or("?".into(), |v| format!("{v:.1}"))
    ));
    r
}

pub struct SteadyOpts {
    pub rates: Vec<f64>,
    pub step: Duration,
    pub drain: Duration,
    pub pause: Duration,
    pub warmup: Duration,
    pub max_p99_ms: f64,
    pub max_lost: u64,
    pub drivers: usize,
}

/// Phase (d): stepped message rates until latency or loss goes bad.
pub async fn phase_steady(ctx: &Ctx, sessions: &[Arc<Session>], o: &SteadyOpts) -> SteadyResult {
    let all: Arc<Vec<Arc<Session>>> = Arc::new(sessions.to_vec());
    let mut out = SteadyResult { max_p99_ms: o.max_p99_ms, ..Default::default() };
    if all.len() < 2 {
        out.stop_reason = "fewer than two sessions".into();
        return out;
    }
    if !o.warmup.is_zero() {
        let r = o.rates.first().copied().unwrap_or(100.0).min(500.0);
        let s = run_step(ctx, &all, r, o.warmup, o.drain, o.drivers).await;
        ctx.log(&format!("warm-up at {r:.0}/s: p99 {:.2} ms, lost {}", s.p99_ms, s.lost));
        tokio::time::sleep(o.pause).await;
    }
    out.stop_reason = "all rates passed".into();
    for &rate in &o.rates {
        let need = ctx.metrics.seq_issued() + (rate * o.step.as_secs_f64() * 1.3) as u64 + 1000;
        if need > ctx.metrics.seq_capacity() {
            out.stop_reason = "message budget exhausted".into();
            break;
        }
        let mut s = run_step(ctx, &all, rate, o.step, o.drain, o.drivers).await;
        let gen_limited = s.sent_rate < rate * 0.9;
        s.pass = s.p99_ms <= o.max_p99_ms && s.lost <= o.max_lost && !gen_limited && s.sessions_alive == all.len();
        ctx.log(&format!(
            "rate {rate:>8.0}/s: sent {:.0}/s delivered {:.0}/s p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms lost {} late {} server CPU {}% gen CPU {:.0}% other CPU {}% alive {}",
            s.sent_rate,
            s.delivered_rate,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.max_ms,
            s.lost,
            s.late,
            s.server_cpu_pct.map_or("?".into(), |v| format!("{v:.0}")),
            s.gen_cpu_pct,
            s.other_cpu_pct.map_or("?".into(), |v| format!("{v:.0}")),
            s.sessions_alive
        ));
        let pass = s.pass;
        if pass {
            out.max_ok_rate = out.max_ok_rate.max(s.delivered_rate.min(s.sent_rate));
        }
        out.steps.push(s.clone());
        if !pass {
            out.stop_reason = if s.sessions_alive < all.len() {
                format!("{} sessions disconnected", all.len() - s.sessions_alive)
            } else if s.lost > o.max_lost {
                format!("{} messages lost at {rate:.0}/s", s.lost)
            } else if s.p99_ms > o.max_p99_ms {
                format!("p99 {:.1} ms > {} ms at {rate:.0}/s", s.p99_ms, o.max_p99_ms)
            } else {
                format!("generator reached only {:.0}/s of {rate:.0}/s", s.sent_rate)
            };
            break;
        }
        tokio::time::sleep(o.pause).await;
    }
    out
}

async fn run_step(
    ctx: &Ctx,
    all: &Arc<Vec<Arc<Session>>>,
    rate: f64,
    dur: Duration,
    drain: Duration,
    drivers: usize,
) -> StepResult {
    let m = ctx.metrics.clone();
    let drivers = drivers.clamp(1, all.len());
    m.begin_window();
    let mark = CpuMark::take(ctx.pid);
    let mut set = JoinSet::new();
    for d in 0..drivers {
        let (all, m) = (all.clone(), m.clone());
        let per = rate / drivers as f64;
        set.spawn(async move {
            let mine: Vec<usize> = (d..all.len()).step_by(drivers).collect();
            let mut rng = SmallRng::from_entropy();
            let start = tokio::time::Instant::now();
            let mut iv = tokio::time::interval(Duration::from_millis(1));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut due_sent, mut sent, mut skipped) = (0u64, 0u64, 0u64);
            let cap = (per * 0.05).max(10.0) as u64;
            loop {
                iv.tick().await;
                let el = start.elapsed();
                let el = if el > dur { dur } else { el };
                let due = (per * el.as_secs_f64()) as u64;
                let mut n = due - due_sent;
                due_sent = due;
                if n > cap {
                    skipped += n - cap;
                    n = cap;
                }
                for _ in 0..n {
                    let p = mine[rng.gen_range(0..mine.len())];
                    let mut q = rng.gen_range(0..all.len() - 1);
                    if q >= p {
                        q += 1;
                    }
                    let (from, to) = (&all[p], &all[q]);
                    if !from.is_alive() || !to.is_alive() {
                        skipped += 1;
                        continue;
                    }
                    let seq = m.next_seq();
                    from.send_chat(&to.jid, m.now_ns(), seq);
                    sent += 1;
                }
                if el >= dur {
                    break;
                }
            }
            (sent, skipped)
        });
    }
    let mut sent = 0;
    while let Some(r) = set.join_next().await {
        if let Ok((s, _)) = r {
            sent += s;
        }
    }
    let in_window = m.received_while_open.load(Relaxed);
    m.close_window();
    let cpu = mark.since(ctx.pid);
    let (wall, server_cpu, gen_cpu) = (cpu.wall, cpu.server, cpu.generator);
    let drain_start = Instant::now();
    while m.received.load(Relaxed) < sent && drain_start.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let received = m.received.load(Relaxed);
    StepResult {
        target_rate: rate,
        secs: wall,
        sent,
        sent_rate: sent as f64 / wall,
        delivered_rate: in_window as f64 / wall,
        received,
        lost: sent.saturating_sub(received),
        late: m.late.load(Relaxed),
        stale: m.stale.load(Relaxed),
        dups: m.dups.load(Relaxed),
        errors: m.errors.load(Relaxed),
        p50_ms: m.hist.quantile_ms(0.50),
        p90_ms: m.hist.quantile_ms(0.90),
        p99_ms: m.hist.quantile_ms(0.99),
        max_ms: m.hist.max_ms(),
        drain_secs,
        server_cpu_pct: server_cpu.map(|c| c * 100.0 / wall),
        gen_cpu_pct: gen_cpu * 100.0 / wall,
        other_cpu_pct: cpu.other.map(|o| cpu.pct(o)),
        server_rss_kib: ctx.rss(),
        sessions_alive: all.iter().filter(|s| s.is_alive()).count(),
        pass: false,
    }
}

pub struct OfflineOpts {
    pub users: Range<usize>,
    pub messages: u64,
    pub confirm_timeout: Duration,
    pub drain_timeout: Duration,
}

/// Phase (e): messages to offline users, then those users log in.
pub async fn phase_offline(ctx: &Ctx, senders: &[Arc<Session>], o: &OfflineOpts) -> OfflineResult {
    let m = ctx.metrics.clone();
    let users: Vec<String> =
        o.users.clone().map(|i| format!("{}@{}", localpart(&ctx.prefix, i), ctx.target.domain)).collect();
    let senders: Vec<Arc<Session>> = senders.iter().filter(|s| s.is_alive()).cloned().collect();
    let mut r =
        OfflineResult { users: users.len(), senders: senders.len(), messages: o.messages, ..Default::default() };
    if users.is_empty() || senders.is_empty() {
        return r;
    }
    m.begin_window();
    let rss0 = ctx.rss();
    let mark = CpuMark::take(ctx.pid);
    let gen0 = procstat::self_cpu_secs();
    let start = Instant::now();
    for i in 0..o.messages {
        let s = &senders[(i as usize) % senders.len()];
        let to = &users[(i as usize) % users.len()];
        s.send_chat(to, m.now_ns(), m.next_seq());
    }
    let mut set = JoinSet::new();
    for s in senders.iter().cloned() {
        let (domain, to) = (ctx.target.domain.clone(), o.confirm_timeout);
        set.spawn(async move {
            if s.sm_on.load(Relaxed) {
                s.request_ack();
                s.wait_acked(to).await
            } else {
                let n = s.ping(&domain);
                s.wait_pong(n, to).await
            }
        });
    }
    while let Some(x) = set.join_next().await {
        if matches!(x, Ok(true)) {
            r.confirmed_senders += 1;
        }
    }
    r.store_secs = start.elapsed().as_secs_f64();
    r.store_rate = o.messages as f64 / r.store_secs.max(1e-9);
    r.store_server_cpu_s = mark.since(ctx.pid).server;
    r.rss_growth_kib = match (rss0, ctx.rss()) {
        (Some(a), Some(b)) => Some(b as i64 - a as i64),
        _ => None,
    };
    ctx.log(&format!(
        "offline store: {} msgs to {} users from {} senders in {:.2}s = {:.0}/s ({} senders confirmed), delivered early {}",
        o.messages,
        users.len(),
        senders.len(),
        r.store_secs,
        r.store_rate,
        r.confirmed_senders,
        m.received.load(Relaxed)
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mark = CpuMark::take(ctx.pid);
    let drain_start_ns = m.now_ns();
    let drain_start = Instant::now();
    let out = login_range(ctx, o.users.clone()).await;
    r.login_ok = out.sessions.len();
    r.login_secs = out.secs;
    while m.received.load(Relaxed) < o.messages && drain_start.elapsed() < o.drain_timeout {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r.received = m.received.load(Relaxed);
    r.dups = m.dups.load(Relaxed);
    r.lost = o.messages.saturating_sub(r.received);
    let last = m.last_recv_ns.load(Relaxed);
    r.drain_secs =
        if last > drain_start_ns { (last - drain_start_ns) as f64 / 1e9 } else { drain_start.elapsed().as_secs_f64() };
    r.drain_rate = r.received as f64 / r.drain_secs.max(1e-9);
    r.drain_server_cpu_s = mark.since(ctx.pid).server;
    r.gen_cpu_s = procstat::self_cpu_secs() - gen0;
    ctx.log(&format!(
        "offline drain: {} users logged in in {:.2}s, received {}/{} in {:.2}s = {:.0}/s, lost {}",
        r.login_ok, r.login_secs, r.received, o.messages, r.drain_secs, r.drain_rate, r.lost
    ));
    // Let the server see acks for what was delivered before streams close.
    let mut set = JoinSet::new();
    for s in out.sessions {
        set.spawn(async move {
            if s.sm_on.load(Relaxed) {
                let h = s.in_count.load(Relaxed);
                s.send_raw(format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>").as_bytes(), 0);
            }
        });
    }
    while set.join_next().await.is_some() {}
    r
}

/// Closes every registered session and waits (bounded) for the streams to end.
pub async fn close_all(registry: &Mutex<Vec<Arc<Session>>>, wait: Duration) {
    let all: Vec<Arc<Session>> = registry.lock().expect("registry").clone();
    for s in &all {
        s.close();
    }
    let start = Instant::now();
    while start.elapsed() < wait && all.iter().any(|s| s.is_alive()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

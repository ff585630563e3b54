//! Result records written as JSON by `run` and read back by `report`.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct RunResult {
    pub server: String,
    pub scenario: String,
    pub sessions: usize,
    pub started_unix: u64,
    pub generator_threads: usize,
    pub server_pid: Option<u32>,
    pub server_nofile_limit: Option<u64>,
    pub login: Option<LoginResult>,
    pub idle: Option<IdleResult>,
    pub steady: Option<SteadyResult>,
    pub offline: Option<OfflineResult>,
    pub errors: Vec<String>,
    pub total_secs: f64,
    pub completed: bool,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct LoginResult {
    pub attempted: usize,
    pub ok: usize,
    pub failed: usize,
    pub mechanism: String,
    pub stream_management: usize,
    pub prime_secs: f64,
    pub secs: f64,
    pub logins_per_s: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_ms_per_login: Option<f64>,
    pub gen_cpu_s: f64,
    pub gen_cpu_ms_per_login: f64,
    /// CPU of all other processes on the machine during the ramp (100 = one core).
    pub other_cpu_pct: Option<f64>,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct IdleResult {
    pub sessions: usize,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub kib_per_session: Option<f64>,
    pub settle_secs: f64,
    pub server_cpu_pct: Option<f64>,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct StepResult {
    pub target_rate: f64,
    pub secs: f64,
    pub sent: u64,
    pub sent_rate: f64,
    /// Messages received while the step was sending, per second.
    pub delivered_rate: f64,
    pub received: u64,
    pub lost: u64,
    pub late: u64,
    pub stale: u64,
    pub dups: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub drain_secs: f64,
    pub server_cpu_pct: Option<f64>,
    pub gen_cpu_pct: f64,
    /// CPU of all other processes on the machine (100 = one core); high
    /// values mean the figures were disturbed.
    pub other_cpu_pct: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub sessions_alive: usize,
    pub pass: bool,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct SteadyResult {
    pub steps: Vec<StepResult>,
    /// Highest delivered rate of a passing step.
    pub max_ok_rate: f64,
    pub stop_reason: String,
    pub max_p99_ms: f64,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct OfflineResult {
    pub users: usize,
    pub senders: usize,
    pub messages: u64,
    pub confirmed_senders: usize,
    pub store_secs: f64,
    pub store_rate: f64,
    pub store_server_cpu_s: Option<f64>,
    pub rss_growth_kib: Option<i64>,
    pub login_ok: usize,
    pub login_secs: f64,
    pub received: u64,
    pub lost: u64,
    pub dups: u64,
    pub drain_secs: f64,
    pub drain_rate: f64,
    pub drain_server_cpu_s: Option<f64>,
    pub gen_cpu_s: f64,
}

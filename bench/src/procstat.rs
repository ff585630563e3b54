//! Process figures read from /proc: CPU time, resident memory, and the
//! process that owns a listening TCP port.

use std::fs;

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of `pid` in seconds (all threads).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0; utime is field 14.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// CPU seconds (user + system) used by this process so far.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft "Max open files" limit of `pid`.
pub fn nofile_limit(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Socket inodes listening on `port` (any local address, IPv4 or IPv6).
fn listening_inodes(port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = fs::read_to_string(f) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Some(p) = cols[1].rsplit(':').next() else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                out.push(cols[9].to_string());
            }
        }
    }
    out
}

/// The process that holds the socket listening on `port`.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path())
                && targets.iter().any(|t| link.as_os_str() == t.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        }
        rl.rlim_cur
    }
}

/// CPU seconds the whole machine spent busy (not idle or waiting for I/O).
pub fn machine_busy_secs() -> Option<f64> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line.split_whitespace().take(8).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return None;
    }
    let total: f64 = v.iter().sum();
    Some((total - v[3] - v[4]) / clock_ticks())
}

/// A snapshot of a server's, this generator's and the machine's CPU time.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    pub at: std::time::Instant,
    pub server: Option<f64>,
    pub gen_secs: f64,
    pub machine: Option<f64>,
}

/// CPU used between two marks.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    pub wall: f64,
    pub server: Option<f64>,
    pub generator: f64,
    /// CPU seconds of every other process on the machine.
    pub other: Option<f64>,
}

impl CpuUse {
    pub fn pct(&self, secs: f64) -> f64 {
        secs * 100.0 / self.wall.max(1e-9)
    }
}

impl CpuMark {
    pub fn take(pid: Option<u32>) -> Self {
        CpuMark {
            at: std::time::Instant::now(),
            server: pid.and_then(cpu_secs),
            gen_secs: self_cpu_secs(),
            machine: machine_busy_secs(),
        }
    }

    pub fn since(&self, pid: Option<u32>) -> CpuUse {
        let now = CpuMark::take(pid);
        let server = match (self.server, now.server) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let generator = now.gen_secs - self.gen_secs;
        let other = match (self.machine, now.machine) {
            (Some(a), Some(b)) => Some((b - a - server.unwrap_or(0.0) - generator).max(0.0)),
            _ => None,
        };
        CpuUse { wall: now.at.duration_since(self.at).as_secs_f64(), server, generator, other }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(cpu_secs(pid).is_some());
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(nofile_limit(pid).unwrap() > 0);
        assert!(machine_busy_secs().unwrap() > 0.0);
    }

    #[test]
    fn finds_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
    }
}

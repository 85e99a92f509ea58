//! Pieces both fakes share: UTC timestamps in the agents' log formats, the test hooks
//! driven by environment variables (event log, crash on demand, unhealthy switch, start
//! delay), signal sending, and reading the body out of a recorded response file.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Broken-down UTC time. The recordings were made on a host in UTC (`+0000`), so the
/// fakes always log in UTC rather than pulling in a time-zone database.
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub min: u32,
    pub sec: u32,
    pub nanos: u32,
}

/// Converts a Unix time to a civil date (Howard Hinnant's days-from-civil inverse).
pub fn civil(t: SystemTime) -> Civil {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        min: ((rem % 3600) / 60) as u32,
        sec: (rem % 60) as u32,
        nanos: d.subsec_nanos(),
    }
}

/// Fluent Bit log timestamp with milliseconds: `2026/11/22 02:53:22.584` (A-cli.log).
pub fn fb_ts() -> String {
    let c = civil(SystemTime::now());
    format!(
        "{:04}/{:02}/{:02} {:02}:{:02}:{:02}.{:03}",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.min,
        c.sec,
        c.nanos / 1_000_000
    )
}

/// Fluent Bit signal-handler timestamp without milliseconds: `[2026/11/22 02:56:06]` (D3-SIGTERM.log).
pub fn fb_ts_sec() -> String {
    let c = civil(SystemTime::now());
    format!(
        "{:04}/{:02}/{:02} {:02}:{:02}:{:02}",
        c.year, c.month, c.day, c.hour, c.min, c.sec
    )
}

/// Fluentd log timestamp: `2026-11-22 02:51:58 +0000` (sig-SIGTERM.log).
pub fn fd_time(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} +0000",
        c.year, c.month, c.day, c.hour, c.min, c.sec
    )
}

/// cmetrics text timestamp: `2026-11-22T02:53:24.956567155Z` (A_v2_metrics.txt).
pub fn iso_nanos(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        c.year, c.month, c.day, c.hour, c.min, c.sec, c.nanos
    )
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Milliseconds from an environment variable, or `default` when unset or unparsable.
pub fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default),
    )
}

/// Appends one JSON line to `FAKE_EVENT_LOG` (if set). Tests count reloads, restarts,
/// signals and requests from it. Each line is written with a single `write` on an
/// O_APPEND file, so lines from the supervisor and worker processes never interleave.
pub fn event(agent: &str, mut fields: serde_json::Value) {
    let Ok(path) = std::env::var("FAKE_EVENT_LOG") else {
        return;
    };
    if let Some(obj) = fields.as_object_mut() {
        obj.insert("agent".into(), agent.into());
        obj.insert("pid".into(), std::process::id().into());
        obj.insert("ts_ms".into(), unix_millis(SystemTime::now()).into());
    }
    let mut line = fields.to_string();
    line.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// `FAKE_DRY_RUN_PASSES=1`: `-D` / `--dry-run` reports success without looking at the config.
/// Not a recorded behaviour: it stands in for a dry run that misses what the live load then
/// refuses, so a supervisor's "reload refused" path (Fluent Bit's halted reload, Fluentd's
/// "Failed to reload config file") can be reached behind its own dry run.
pub fn dry_run_passes() -> bool {
    std::env::var("FAKE_DRY_RUN_PASSES").as_deref() == Ok("1")
}

/// True while the file named by `FAKE_UNHEALTHY_FILE` exists.
pub fn unhealthy() -> bool {
    std::env::var_os("FAKE_UNHEALTHY_FILE").is_some_and(|p| Path::new(&p).exists())
}

/// Starts the crash-on-demand hooks: `FAKE_CRASH_AFTER_MS` (exit after N ms) and
/// `FAKE_CRASH_FILE` (exit as soon as the file exists), both with `FAKE_CRASH_CODE`
/// (default 1). Not a recorded behaviour: it stands in for a real agent dying at runtime.
pub fn spawn_crash_hooks(agent: &'static str) {
    let code: i32 = std::env::var("FAKE_CRASH_CODE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if let Some(after) = std::env::var("FAKE_CRASH_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            crash(agent, code, "after_ms");
        });
    }
    if let Some(file) = std::env::var_os("FAKE_CRASH_FILE") {
        tokio::spawn(async move {
            loop {
                if Path::new(&file).exists() {
                    crash(agent, code, "file");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

fn crash(agent: &str, code: i32, why: &str) -> ! {
    event(
        agent,
        serde_json::json!({"event": "crash", "code": code, "hook": why}),
    );
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// Sends a signal to a process. Used by the fake Fluentd supervisor to drive its worker
/// (TERM/USR1/USR2), as the real serverengine supervisor does.
pub fn send_signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// True if a process with this pid exists (kill with signal 0).
pub fn alive(pid: u32) -> bool {
    send_signal(pid, 0)
}

/// The host name, used for the `hostname` label of Fluent Bit's v2 metrics
/// (recorded as `hostname="vm"` on the recording host).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Body of a recorded HTTP response file (`METHOD URL`, `HTTP code`, headers, blank line,
/// body). The recorder added a newline after bodies that lack one; with a
/// `content-length` header the exact body is cut to that length, otherwise one trailing
/// newline is dropped (Fluentd recordings carry no content-length).
pub fn recorded_body(file: &str) -> &str {
    let (head, body) = file.split_once("\n\n").unwrap_or((file, ""));
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(n) if n <= body.len() => &body[..n],
        _ => body.strip_suffix('\n').unwrap_or(body),
    }
}

/// The (stdout, stderr) sections of a recorded command run (`C_*.txt`).
pub fn recorded_streams(file: &str) -> (&str, &str) {
    let out_start = file.find("--- stdout ---\n").map(|i| i + 15).unwrap_or(0);
    let err_marker = file.find("--- stderr ---\n").unwrap_or(file.len());
    let stdout = &file[out_start.min(err_marker)..err_marker];
    let stderr = file.get(err_marker + 15..).unwrap_or("");
    (stdout, stderr)
}

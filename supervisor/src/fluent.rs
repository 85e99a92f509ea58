//! What differs between Fluent Bit and Fluentd: the command line, the version, the dry run,
//! health from the agent's own API, and how a new config is loaded (Fluent Bit hot reload
//! confirmed through `hot_reload_count`; Fluentd `config.gracefulReload` confirmed through its
//! log) — with the traps of shared/reference/fluent-agents.md §4 handled.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_proto::ComponentHealth;
use serde_json::Value;

use crate::agent::{is_error_line, SharedTail};
use crate::config::{AgentKind, Config};

/// Why a reload did not take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReloadError {
    /// Hot reload is off (Fluent Bit answers 200 `{"status":-1}`) or there is no RPC endpoint:
    /// the caller restarts the agent instead.
    #[error("hot reload is not available: {0}")]
    Unavailable(String),
    /// The agent refused the new config; the message is the agent's own.
    #[error("{0}")]
    Rejected(String),
    /// The agent took the new config and could not start it (a Fluentd worker whose new
    /// pipeline cannot bind a port): it runs no pipeline now, so last-known-good must be
    /// loaded again. The message is the agent's own.
    #[error("{0}")]
    Broken(String),
}

/// How long a Fluentd worker's own verdict may follow its `restart fluentd worker` line
/// (graceful-reload-portclash.log: the same second).
const FLUENTD_VERDICT_SETTLE: Duration = Duration::from_secs(1);

/// The agent's own view of its health, from its HTTP API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probe {
    /// The API answered.
    pub reachable: bool,
    /// The agent's verdict and its components', combined.
    pub healthy: bool,
    /// Why not healthy (empty when healthy).
    pub last_error: String,
    /// Version the agent reports about itself.
    pub version: Option<String>,
    /// This probe read the per-plugin metrics (Fluent Bit's answer 404 for about a second
    /// after a start or reload; `components` then holds the last ones read).
    pub metrics: bool,
    /// Per plugin category (`input`, `filter`, `output`), per plugin.
    pub components: BTreeMap<String, ComponentHealth>,
}

/// Counters seen for one output at the last poll, to tell new failures from old ones.
#[derive(Debug, Clone, Default)]
struct Seen {
    bad: u64,
    last_increase: Option<Instant>,
}

/// How long an output stays unhealthy after its errors, failed retries or drops last grew
/// (Fluent Bit's own `HC_Period` default).
const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// Talks to one agent's local API.
#[derive(Debug)]
pub struct Fluent {
    pub kind: AgentKind,
    http: reqwest::Client,
    base: String,
    rpc: Option<String>,
    reload_timeout: Duration,
    seen: HashMap<String, Seen>,
    /// Components from the last successful metrics read (metrics 404 for ~1 s after a start
    /// or reload; the old view is better than none).
    last_components: BTreeMap<String, ComponentHealth>,
}

impl Fluent {
    pub fn new(cfg: &Config) -> Fluent {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("HTTP client");
        let base = match cfg.kind() {
            AgentKind::Fluentbit => format!("http://127.0.0.1:{}", cfg.agent.http_port),
            AgentKind::Fluentd => cfg.agent.monitor_url.trim_end_matches('/').to_string(),
        };
        Fluent {
            kind: cfg.kind(),
            http,
            base,
            rpc: cfg
                .agent
                .rpc_endpoint
                .as_ref()
                .map(|e| format!("http://{e}")),
            reload_timeout: Duration::from_secs(cfg.agent.reload_timeout_s),
            seen: HashMap::new(),
            last_components: BTreeMap::new(),
        }
    }

    /// The command line (without the executable).
    pub fn argv(cfg: &Config) -> Vec<String> {
        let a = &cfg.agent;
        let mut v = vec!["-c".to_string(), a.config_path.display().to_string()];
        if cfg.kind() == AgentKind::Fluentbit {
            // The HTTP server defaults to 0.0.0.0:2020. Command-line flags override the
            // config file's [SERVICE] keys on 5.1.1 (`-L` is accepted though not in `-h`), so
            // the API is always loopback-only on the port we poll; `-Y` turns hot reload on
            // so a remote config does not need a restart.
            v.extend(
                [
                    "-H",
                    "-L",
                    "127.0.0.1",
                    "-P",
                    &a.http_port.to_string(),
                    "-Y",
                ]
                .map(String::from),
            );
        }
        v.extend(a.args.iter().cloned());
        v
    }

    /// `<exe> --version`, reduced to the version number.
    pub async fn detect_version(cfg: &Config) -> Option<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(&cfg.agent.executable)
                .arg("--version")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .ok()?
        .ok()?;
        let text = format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        parse_version(&text)
    }

    /// Validates `config_file` with the agent's own dry run. Err carries the agent's message.
    pub async fn dry_run(cfg: &Config, config_file: &Path) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new(&cfg.agent.executable);
        match cfg.kind() {
            AgentKind::Fluentbit => cmd.arg("-D"),
            AgentKind::Fluentd => cmd.arg("--dry-run"),
        };
        cmd.arg("-c").arg(config_file);
        cmd.args(&cfg.agent.args)
            .envs(&cfg.agent.env)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(
            Duration::from_secs(cfg.agent.dry_run_timeout_s),
            cmd.output(),
        )
        .await
        .map_err(|_| {
            format!(
                "dry run did not finish within {} s",
                cfg.agent.dry_run_timeout_s
            )
        })?
        .map_err(|e| format!("cannot run the dry run: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let errors: Vec<&str> = lines.iter().copied().filter(|l| is_error_line(l)).collect();
        let pick = if errors.is_empty() {
            lines
                .iter()
                .rev()
                .take(3)
                .rev()
                .copied()
                .collect::<Vec<_>>()
        } else {
            errors.into_iter().take(4).collect()
        };
        Err(format!(
            "dry run failed (exit {}): {}",
            out.status
                .code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "by signal".into()),
            pick.join(" | ")
        ))
    }

    async fn get_json(&self, url: &str) -> Result<(u16, Value), String> {
        let r = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(|e| e.to_string())?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// Polls the agent's API.
    pub async fn probe(&mut self) -> Probe {
        match self.kind {
            AgentKind::Fluentbit => self.probe_fluentbit().await,
            AgentKind::Fluentd => self.probe_fluentd().await,
        }
    }

    async fn probe_fluentbit(&mut self) -> Probe {
        let mut p = Probe::default();
        let base = self.base.clone();
        match self.get_json(&format!("{base}/")).await {
            Ok((200, v)) => {
                p.reachable = true;
                p.version = v
                    .pointer("/fluent-bit/version")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            Ok((code, _)) => {
                p.last_error = format!("Fluent Bit API {base}/ answered HTTP {code}");
                return p;
            }
            Err(e) => {
                p.last_error = format!("Fluent Bit API {base} unreachable: {e}");
                return p;
            }
        }
        // Answers ~50 ms after start; only a liveness check (uptime resets on hot reload).
        let _ = self.get_json(&format!("{base}/api/v1/uptime")).await;
        let mut verdict: Result<(), String> = Ok(());
        match self.get_json(&format!("{base}/api/v2/health")).await {
            Ok((200, _)) => {}
            Ok((404, _)) => {
                // 4.x has no v2 health; v1 exists only with Health_Check On.
                if let Ok((500, _)) = self.get_json(&format!("{base}/api/v1/health")).await {
                    verdict = Err("Fluent Bit reports unhealthy (/api/v1/health: error)".into());
                }
            }
            Ok((code, v)) => {
                verdict = Err(format!(
                "Fluent Bit reports {} (HTTP {code}): errors={} retries_failed={} (limits {}/{})",
                v.get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("unhealthy"),
                v.get("errors").unwrap_or(&Value::Null),
                v.get("retries_failed").unwrap_or(&Value::Null),
                v.get("error_limit").unwrap_or(&Value::Null),
                v.get("retry_failure_limit").unwrap_or(&Value::Null),
            ))
            }
            Err(e) => verdict = Err(format!("Fluent Bit /api/v2/health: {e}")),
        }
        if let Ok((200, m)) = self.get_json(&format!("{base}/api/v1/metrics")).await {
            self.last_components = self.fluentbit_components(&m);
            p.metrics = true;
        }
        p.components = self.last_components.clone();
        finish(&mut p, verdict);
        p
    }

    fn fluentbit_components(&mut self, m: &Value) -> BTreeMap<String, ComponentHealth> {
        let now = Instant::now();
        let mut out = BTreeMap::new();
        for cat in ["input", "filter", "output"] {
            let Some(plugins) = m.get(cat).and_then(Value::as_object) else {
                continue;
            };
            let mut map = HashMap::new();
            for (name, v) in plugins {
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                let (healthy, status) = if cat == "output" {
                    let (errors, retries, failed, dropped) = (
                        n("errors"),
                        n("retries"),
                        n("retries_failed"),
                        n("dropped_records"),
                    );
                    let seen = self.seen.entry(format!("{cat}/{name}")).or_default();
                    let bad = errors + failed + dropped;
                    if bad > seen.bad {
                        seen.last_increase = Some(now);
                    }
                    seen.bad = bad;
                    let healthy = seen
                        .last_increase
                        .map(|t| now.duration_since(t) > FAILURE_MEMORY)
                        .unwrap_or(true);
                    (
                        healthy,
                        format!(
                            "errors={errors} retries={retries} retries_failed={failed} dropped_records={dropped}"
                        ),
                    )
                } else if cat == "filter" {
                    (true, format!("drop_records={}", n("drop_records")))
                } else {
                    (true, "running".to_string())
                };
                map.insert(
                    name.clone(),
                    ComponentHealth {
                        healthy,
                        status,
                        last_error: if healthy {
                            String::new()
                        } else {
                            format!(
                                "output {name}: errors, failed retries or dropped records grew in the last {} s",
                                FAILURE_MEMORY.as_secs()
                            )
                        },
                        ..Default::default()
                    },
                );
            }
            out.insert(cat.to_string(), group(map));
        }
        out
    }

    async fn probe_fluentd(&mut self) -> Probe {
        let mut p = Probe::default();
        let base = self.base.clone();
        match self.get_json(&format!("{base}/api/plugins.json")).await {
            Ok((200, v)) => {
                p.reachable = true;
                p.metrics = true;
                self.last_components = fluentd_components(&v);
            }
            Ok((code, _)) => {
                p.last_error = format!("Fluentd monitor_agent answered HTTP {code}");
                return p;
            }
            Err(e) => {
                // The worker may be crash-looping while the supervisor process lives on
                // (monitor port in use): only health polling can see that.
                p.last_error = format!("Fluentd monitor_agent {base} unreachable: {e}");
                return p;
            }
        }
        if let Ok((200, c)) = self.get_json(&format!("{base}/api/config.json")).await {
            p.version = c.get("version").and_then(Value::as_str).map(str::to_string);
        }
        p.components = self.last_components.clone();
        finish(&mut p, Ok(()));
        p
    }

    /// Loads the config file just written. Fluent Bit: hot reload confirmed by
    /// `hot_reload_count`; Fluentd: `config.gracefulReload` confirmed by the log.
    pub async fn reload(&self, tail: &SharedTail) -> Result<(), ReloadError> {
        match self.kind {
            AgentKind::Fluentbit => self.reload_fluentbit(tail).await,
            AgentKind::Fluentd => self.reload_fluentd(tail).await,
        }
    }

    async fn reload_count(&self) -> Option<u64> {
        match self.get_json(&format!("{}/api/v2/reload", self.base)).await {
            Ok((200, v)) => v.get("hot_reload_count").and_then(Value::as_u64),
            _ => None,
        }
    }

    async fn reload_fluentbit(&self, tail: &SharedTail) -> Result<(), ReloadError> {
        let before = self.reload_count().await.ok_or_else(|| {
            ReloadError::Unavailable("GET /api/v2/reload gave no hot_reload_count".into())
        })?;
        let cursor = tail.lock().expect("tail").cursor();
        let url = format!("{}/api/v2/reload", self.base);
        let mut attempts = 0;
        loop {
            attempts += 1;
            // Fluent Bit's HTTP server drops a POST without a Content-Length unanswered, and
            // a bodiless request goes out without one unless it is set
            // (H_v2_reload_POST_no_content_length.txt).
            let r = self
                .http
                .post(&url)
                .header(reqwest::header::CONTENT_LENGTH, "0")
                .send()
                .await
                .map_err(|e| ReloadError::Unavailable(format!("POST /api/v2/reload: {e}")))?;
            let code = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            // The HTTP code says little: "not enabled" is a 200. Read `status`.
            match v.get("status").and_then(Value::as_i64) {
                Some(0) => break,
                Some(-1) => {
                    return Err(ReloadError::Unavailable(
                        "Fluent Bit answered {\"reload\":\"not enabled\"}".into(),
                    ))
                }
                Some(-2) if attempts < 10 => {
                    // Another reload is running; it finishes within Grace + 1 s.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                _ => {
                    return Err(ReloadError::Unavailable(format!(
                        "POST /api/v2/reload answered HTTP {code} {v}"
                    )))
                }
            }
        }
        // "done" is said at once and even for a config that will be refused: only a higher
        // hot_reload_count proves the new pipeline runs.
        let deadline = Instant::now() + self.reload_timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(n) = self.reload_count().await {
                if n > before {
                    return Ok(());
                }
            }
            // A halted reload says so in the log at once (B-conf.log): no need to wait out
            // the timeout for a count that will not move.
            let lines = tail.lock().expect("tail").since(cursor);
            if lines.iter().any(|l| reload_halted(l)) {
                break;
            }
        }
        let lines = tail.lock().expect("tail").since(cursor);
        let errs: Vec<&String> = lines.iter().filter(|l| is_error_line(l)).collect();
        Err(ReloadError::Rejected(if errs.is_empty() {
            format!(
                "Fluent Bit did not confirm the reload within {} s (hot_reload_count stayed {before})",
                self.reload_timeout.as_secs()
            )
        } else {
            errs.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        }))
    }

    async fn reload_fluentd(&self, tail: &SharedTail) -> Result<(), ReloadError> {
        // Never SIGUSR2 (on 1.18 it replaces the supervisor process) and never SIGHUP / config.reload
        // (an invalid config there kills the whole fluentd with exit 2).
        let Some(rpc) = &self.rpc else {
            return Err(ReloadError::Unavailable(
                "no agent.rpc_endpoint configured".into(),
            ));
        };
        let cursor = tail.lock().expect("tail").cursor();
        let r = self
            .http
            .get(format!("{rpc}/api/config.gracefulReload"))
            .send()
            .await
            .map_err(|e| ReloadError::Unavailable(format!("Fluentd RPC {rpc}: {e}")))?;
        if !r.status().is_success() {
            return Err(ReloadError::Unavailable(format!(
                "Fluentd RPC answered HTTP {}",
                r.status()
            )));
        }
        // The RPC answers {"ok":true} whatever happens; the log tells, and monitor_agent.
        let deadline = Instant::now() + self.reload_timeout;
        let mut restarted: Option<Instant> = None;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let lines = tail.lock().expect("tail").since(cursor);
            match fluentd_reload_verdict(&lines) {
                FluentdReload::Refused(l) => return Err(ReloadError::Rejected(l)),
                FluentdReload::Broken(l) => return Err(ReloadError::Broken(l)),
                FluentdReload::Restarted => {
                    // The worker says "restart" before it starts the new pipeline; its
                    // failure to start follows (graceful-reload-portclash.log). Success
                    // needs the settle time without that line and monitor_agent answering.
                    let since = *restarted.get_or_insert_with(Instant::now);
                    if since.elapsed() >= FLUENTD_VERDICT_SETTLE
                        && matches!(
                            self.get_json(&format!("{}/api/plugins.json", self.base))
                                .await,
                            Ok((200, _))
                        )
                    {
                        return Ok(());
                    }
                }
                FluentdReload::Pending => {}
            }
        }
        if restarted.is_some() {
            // Restarted, yet its API never came back: it runs no pipeline.
            let errors = crate::agent::error_summary_since(tail, cursor, 3);
            return Err(ReloadError::Broken(format!(
                "Fluentd restarted its worker for the new config, but monitor_agent did not \
                 answer within {} s{}",
                self.reload_timeout.as_secs(),
                if errors.is_empty() {
                    String::new()
                } else {
                    format!("; agent log: {errors}")
                }
            )));
        }
        // No verdict in the log: the health gate decides.
        tracing::warn!("Fluentd logged no reload outcome; relying on the health gate");
        Ok(())
    }
}

/// What Fluentd's log says about a graceful reload so far.
#[derive(Debug, PartialEq)]
enum FluentdReload {
    Pending,
    /// Its supervisor refused the config (`[error]: Failed to reload config file: ...`); the
    /// old pipeline runs on.
    Refused(String),
    /// The worker restarted for it (`#0 restart fluentd worker`), no failure logged yet.
    Restarted,
    /// The worker could not start the new pipeline (`[error]: #0 failed to reload config: ...`,
    /// after the restart line); it runs nothing.
    Broken(String),
}

fn fluentd_reload_verdict(lines: &[String]) -> FluentdReload {
    // Case matters: the supervisor's refusal is capitalised, the worker's failure is not.
    if let Some(l) = lines.iter().find(|l| l.contains("Failed to reload config")) {
        return FluentdReload::Refused(l.trim().to_string());
    }
    if let Some(l) = lines.iter().find(|l| l.contains("failed to reload config")) {
        return FluentdReload::Broken(l.trim().to_string());
    }
    if lines
        .iter()
        .any(|l| l.contains("restart fluentd worker") || l.contains("reloaded config"))
    {
        return FluentdReload::Restarted;
    }
    FluentdReload::Pending
}

/// True for the log lines of a Fluent Bit hot reload that will not happen (B-conf.log):
/// `[reload] ... Reloading is halted`, or a syntax error, which is logged alone as
/// `[config] error in <file>:<line>: ...`.
fn reload_halted(line: &str) -> bool {
    line.contains("Reloading is halted")
        || (line.contains("[config]") && line.contains("error in "))
}

fn fluentd_components(v: &Value) -> BTreeMap<String, ComponentHealth> {
    let mut cats: BTreeMap<String, HashMap<String, ComponentHealth>> = BTreeMap::new();
    for p in v
        .get("plugins")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = p
            .get("plugin_id")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let cat = p
            .get("plugin_category")
            .and_then(Value::as_str)
            .unwrap_or("other")
            .to_string();
        let ty = p.get("type").and_then(Value::as_str).unwrap_or("?");
        let retrying = p
            .get("retry")
            .and_then(Value::as_object)
            .map(|o| !o.is_empty())
            .unwrap_or(false);
        let mut status = format!("type={ty}");
        for k in ["retry_count", "buffer_queue_length"] {
            if let Some(n) = p.get(k).and_then(Value::as_u64) {
                status.push_str(&format!(" {k}={n}"));
            }
        }
        let last_error = if retrying {
            format!(
                "{id} is retrying (retry_count={}, next at {})",
                p.get("retry_count").unwrap_or(&Value::Null),
                p.pointer("/retry/next_time")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            )
        } else {
            String::new()
        };
        cats.entry(cat).or_default().insert(
            id,
            ComponentHealth {
                healthy: !retrying,
                status,
                last_error,
                ..Default::default()
            },
        );
    }
    cats.into_iter().map(|(k, m)| (k, group(m))).collect()
}

fn group(map: HashMap<String, ComponentHealth>) -> ComponentHealth {
    let bad: Vec<String> = {
        let mut b: Vec<String> = map
            .iter()
            .filter(|(_, c)| !c.healthy)
            .map(|(k, _)| k.clone())
            .collect();
        b.sort();
        b
    };
    ComponentHealth {
        healthy: bad.is_empty(),
        status: if bad.is_empty() { "ok" } else { "degraded" }.into(),
        last_error: if bad.is_empty() {
            String::new()
        } else {
            format!("unhealthy: {}", bad.join(", "))
        },
        component_health_map: map,
        ..Default::default()
    }
}

/// Combines the agent's verdict with its components (a top level that ignores unhealthy
/// components was one of fluent-opamp's defects).
fn finish(p: &mut Probe, verdict: Result<(), String>) {
    let bad: Vec<String> = p
        .components
        .iter()
        .filter(|(_, c)| !c.healthy)
        .map(|(k, c)| format!("{k}: {}", c.last_error))
        .collect();
    match verdict {
        Err(e) => {
            p.healthy = false;
            p.last_error = e;
        }
        Ok(()) if !bad.is_empty() => {
            p.healthy = false;
            p.last_error = bad.join("; ");
        }
        Ok(()) => p.healthy = true,
    }
}

/// The first `N.N[.N]` in `text` ("Fluent Bit v5.1.1" → "5.1.1", "fluentd 1.18.0" → "1.18.0").
pub fn parse_version(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == 'v' || c == ',')
        .map(|t| t.trim_matches(|c: char| !c.is_ascii_alphanumeric()))
        .find(|t| {
            let parts: Vec<&str> = t.split('.').collect();
            parts.len() >= 2
                && parts
                    .iter()
                    .take(2)
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// MIME type reported for a config file, by extension.
pub fn content_type_for(name: &str) -> &'static str {
    if name.ends_with(".yaml") || name.ends_with(".yml") {
        "application/yaml"
    } else {
        "text/plain"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("Fluent Bit v5.1.1\n").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(parse_version("fluentd 1.18.0").as_deref(), Some("1.18.0"));
        assert_eq!(parse_version("no version"), None);
    }

    #[test]
    fn halted_reloads_are_recognised() {
        // B-conf.log
        assert!(reload_halted(
            "[2026/11/22 02:51:05.123] [error] [reload] reloaded config is invalid. Reloading is halted"
        ));
        assert!(reload_halted(
            "[2026/11/22 02:51:05.123] [error] [config] error in live.conf:47: bad header definition"
        ));
        assert!(!reload_halted("[ info] [reload] successful reload done."));
    }

    #[test]
    fn fluentd_reload_verdicts_follow_the_recordings() {
        let v = |lines: &[&str]| {
            fluentd_reload_verdict(&lines.iter().map(|l| l.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            v(&["2026-12-04 13:58:26 +0000 [info]: Reloading new config"]),
            FluentdReload::Pending
        );
        // fluentd.log: refused by the supervisor.
        assert!(matches!(
            v(&["2026-11-22 02:51:05 +0000 [error]: Failed to reload config file: expected '>' at live.conf line 31,11"]),
            FluentdReload::Refused(_)
        ));
        // graceful-reload-portclash.log: restart line first, then the worker's failure.
        let restart = "2026-12-04 13:58:27 +0000 [info]: #0 restart fluentd worker worker=0";
        assert_eq!(v(&[restart]), FluentdReload::Restarted);
        assert_eq!(
            v(&[restart, "2026-12-04 13:58:27 +0000 [error]: #0 failed to reload config: Address already in use - bind(2) for 127.0.0.1:9880"]),
            FluentdReload::Broken("2026-12-04 13:58:27 +0000 [error]: #0 failed to reload config: Address already in use - bind(2) for 127.0.0.1:9880".into())
        );
    }

    #[test]
    fn fluentd_components_from_fixture_shape() {
        let v: Value = serde_json::from_str(
            r#"{"plugins":[{"plugin_id":"sample_in","plugin_category":"input","type":"sample","retry_count":null},
            {"plugin_id":"fwd_out","plugin_category":"output","type":"forward","buffer_queue_length":1,"retry_count":3,
             "retry":{"start":"x","steps":2,"next_time":"2026-11-22 02:51:02 +0000"}}]}"#,
        )
        .unwrap();
        let c = fluentd_components(&v);
        assert!(c["input"].healthy);
        assert!(!c["output"].healthy);
        let fwd = &c["output"].component_health_map["fwd_out"];
        assert_eq!(
            fwd.status,
            "type=forward retry_count=3 buffer_queue_length=1"
        );
        assert!(fwd.last_error.contains("retrying"));
    }
}

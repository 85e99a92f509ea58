//! Runs the agent as a child in its own process group: captures its output line by line into
//! the supervisor's log, restarts it after an unexpected exit (exponential backoff + jitter),
//! reports crash loops, stops it gracefully (SIGTERM, grace, SIGKILL to the group), and keeps
//! tracking a Fluentd ≥ 1.18 whose supervisor process was replaced (SIGUSR2 zero-downtime
//! restart: the original child exits 0 while a new one keeps serving in the same group).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::config::AgentKind;

/// What the runner needs to start the agent.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: AgentKind,
    pub executable: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stop_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub crash_loop_threshold: u32,
    pub crash_loop_window: Duration,
}

/// Something that happened to the agent process.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Running (or, after a Fluentd supervisor replacement, running under a new pid).
    Started {
        pid: i32,
        start_time_ns: u64,
        /// Started by an explicit restart (command, config load): the exit history and the
        /// restart backoff were cleared, so an earlier crash loop is over.
        after_restart: bool,
        /// [`LogTail`] cursor taken just before the process was spawned: its own output comes
        /// after it. (Taken when the core reads this event, it would miss whatever the
        /// process printed meanwhile — often its first and only error.)
        log_cursor: u64,
    },
    /// Exited. `expected` is true for stops and restarts the supervisor asked for.
    Exited {
        pid: i32,
        /// Exit code, or `None` when killed by a signal or when an adopted process vanished.
        code: Option<i32>,
        signal: Option<i32>,
        expected: bool,
        /// Set when the agent keeps dying: a one-line description for health.
        crash_loop: Option<String>,
        /// Set when it died unexpectedly: what happened plus its last error lines.
        error: Option<String>,
        /// When it will be started again (unexpected exits only).
        restart_in: Option<Duration>,
    },
}

/// Requests to the runner.
#[derive(Debug)]
pub enum Ctl {
    /// Stop gracefully and start again at once (restart command, config that needs a restart).
    Restart(oneshot::Sender<()>),
    /// Stop gracefully and stay stopped (shutdown); answered when the group is gone.
    Stop(oneshot::Sender<()>),
}

/// The agent's recent output, for error messages and reload confirmation. Each line carries
/// the generation (one per spawn) of the process that wrote it, so a report about one
/// process never quotes another's words.
#[derive(Debug, Default)]
pub struct LogTail {
    lines: VecDeque<(u64, String)>,
    /// (generation, line) of the recent error lines; kept apart so a noisy process cannot
    /// push its own last error out of the general tail before its exit is reported.
    errors: VecDeque<(u64, String)>,
    next: u64,
}

const TAIL_LINES: usize = 200;
const TAIL_ERRORS: usize = 20;
/// Longest line kept; longer output is cut so a runaway record cannot grow memory.
const MAX_LINE: usize = 2 * 1024;

impl LogTail {
    /// Adds a line written by the process of generation `generation`.
    pub fn push(&mut self, generation: u64, line: &str) {
        self.lines.push_back((self.next, line.to_string()));
        self.next += 1;
        while self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
        if is_error_line(line) {
            self.errors.push_back((generation, line.to_string()));
            while self.errors.len() > TAIL_ERRORS {
                self.errors.pop_front();
            }
        }
    }

    /// Sequence number of the next line (a cursor for [`LogTail::since`]).
    pub fn cursor(&self) -> u64 {
        self.next
    }

    /// Lines pushed at or after `cursor`.
    pub fn since(&self, cursor: u64) -> Vec<String> {
        self.lines
            .iter()
            .filter(|(n, _)| *n >= cursor)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The last `n` error-looking lines among those pushed at or after `cursor`.
    pub fn errors_since(&self, cursor: u64, n: usize) -> Vec<String> {
        let errs: Vec<String> = self
            .lines
            .iter()
            .filter(|(i, l)| *i >= cursor && is_error_line(l))
            .map(|(_, l)| l.clone())
            .collect();
        errs[errs.len().saturating_sub(n)..].to_vec()
    }

    /// The last `n` error-looking lines the process of `generation` wrote.
    pub fn errors_of(&self, generation: u64, n: usize) -> Vec<String> {
        let errs: Vec<&String> = self
            .errors
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, l)| l)
            .collect();
        errs[errs.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }
}

/// Shared handle to the tail.
pub type SharedTail = Arc<Mutex<LogTail>>;

/// True for lines that explain a failure (Fluent Bit `[error]`, Fluentd `[error]:`, Ruby
/// backtraces' first line, "aborting", Fluentd's "Worker 0 finished unexpectedly"). The
/// frames of a logged backtrace (indented `[error]: #0 /path.rb:201:in `bind'`, as in
/// portconflict.log) explain nothing and would crowd the real message out of a summary.
pub fn is_error_line(line: &str) -> bool {
    if line.starts_with(char::is_whitespace) && line.contains(":in `") {
        return false;
    }
    let l = line.to_ascii_lowercase();
    l.contains("finished unexpectedly")
        || l.contains("[error]")
        || l.contains("[ error]")
        || l.contains("[fatal]")
        || l.contains("error_class=")
        || l.contains("aborting")
        || l.contains("is aborted")
        || l.contains("is halted")
        || l.contains("(fluent::")
        || l.contains("error:")
}

/// The last `n` error lines written at or after `cursor`, joined for a report.
pub fn error_summary_since(tail: &SharedTail, cursor: u64, n: usize) -> String {
    tail.lock()
        .expect("tail")
        .errors_since(cursor, n)
        .join(" | ")
}

/// Longest wait for a dead process's output to be read to the end before its exit is
/// reported (its last words are often the only explanation).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Called with the running agent's (pid, start ticks), or `None` once it is gone, so the pid
/// file in the data directory is always current.
pub type PidSink = Arc<dyn Fn(Option<(i32, u64)>) + Send + Sync>;

/// Handle used by the rest of the supervisor.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    ctl: mpsc::Sender<Ctl>,
    pub tail: SharedTail,
    /// Number of [`RestartHold`]s alive.
    hold: Arc<watch::Sender<u32>>,
}

/// While alive, an agent that dies is not restarted on its own (explicit restarts still
/// are). A config apply holds one from writing the new files until last-known-good is back:
/// an agent that exits 255 on the new config must not be auto-restarted with the bad files
/// still on disk before the applier restores them.
#[derive(Debug)]
pub struct RestartHold(Arc<watch::Sender<u32>>);

impl Drop for RestartHold {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl AgentHandle {
    /// Holds automatic restarts until the returned guard is dropped.
    pub fn hold_restarts(&self) -> RestartHold {
        self.hold.send_modify(|n| *n += 1);
        RestartHold(self.hold.clone())
    }

    /// True while any [`RestartHold`] is alive.
    pub fn restarts_held(&self) -> bool {
        *self.hold.borrow() > 0
    }

    /// A handle with no runner behind it (requests are answered at once), for unit tests of
    /// what only needs the handle.
    #[cfg(test)]
    pub fn detached() -> AgentHandle {
        let (ctl, _) = mpsc::channel(1);
        AgentHandle {
            ctl,
            tail: Arc::default(),
            hold: Arc::new(watch::channel(0u32).0),
        }
    }

    /// Stops the agent gracefully and starts it again; returns when the new process started.
    pub async fn restart(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Restart(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the agent gracefully and keeps it stopped; returns when its group is gone.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the runner task. Events go to `events`; the pid file is kept through `on_pid`.
pub fn spawn(spec: Spec, events: mpsc::Sender<AgentEvent>, on_pid: PidSink) -> AgentHandle {
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let (hold_tx, hold_rx) = watch::channel(0u32);
    let tail: SharedTail = Arc::new(Mutex::new(LogTail::default()));
    let runner = Runner {
        spec,
        events,
        ctl: ctl_rx,
        hold: hold_rx,
        tail: tail.clone(),
        on_pid,
        exits: VecDeque::new(),
        generation: 0,
        pumps: Vec::new(),
    };
    tokio::spawn(runner.run());
    AgentHandle {
        ctl: ctl_tx,
        tail,
        hold: Arc::new(hold_tx),
    }
}

struct Runner {
    spec: Spec,
    events: mpsc::Sender<AgentEvent>,
    ctl: mpsc::Receiver<Ctl>,
    /// Automatic restarts wait while this is above 0 (see [`RestartHold`]).
    hold: watch::Receiver<u32>,
    tail: SharedTail,
    on_pid: PidSink,
    /// Times of recent unexpected exits, for crash-loop detection.
    exits: VecDeque<Instant>,
    /// Counts spawns; the lines of the current process are tagged with it.
    generation: u64,
    /// The tasks copying the current process's output into the tail.
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

/// What the running agent is, from the runner's point of view.
enum Running {
    /// Our direct child.
    Child(Child, i32),
    /// A process of the agent's group we did not spawn (Fluentd's replacement supervisor).
    Adopted(i32),
}

/// How a wait on the running agent ended.
enum Outcome {
    Exited {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
    Ctl(Ctl),
    CtlClosed,
}

impl Runner {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.spec.backoff_initial, self.spec.backoff_max);
        let mut pending_reply: Option<oneshot::Sender<()>> = None;
        'outer: loop {
            let started = Instant::now();
            let log_cursor = self.tail.lock().expect("tail").cursor();
            self.generation += 1;
            let (mut running, pgid) = match self.start() {
                Ok((running, pgid, start_time_ns)) => {
                    // Awaited, not try_send: a dropped Started would leave the core
                    // believing the agent is down.
                    let _ = self
                        .events
                        .send(AgentEvent::Started {
                            pid: running.pid(),
                            start_time_ns,
                            after_restart: pending_reply.is_some(),
                            log_cursor,
                        })
                        .await;
                    (running, pgid)
                }
                Err(e) => {
                    // Not even started (binary gone, permissions): treat like a crash so the
                    // backoff and crash-loop reporting apply.
                    tracing::error!(error = %e, "cannot start the agent");
                    self.tail
                        .lock()
                        .expect("tail")
                        .push(self.generation, &format!("[error] {e}"));
                    if let Some(r) = pending_reply.take() {
                        let _ = r.send(());
                    }
                    match self
                        .after_unexpected_exit(0, None, None, Duration::ZERO, &mut backoff)
                        .await
                    {
                        Some(Ctl::Stop(reply)) => {
                            self.stopped(reply).await;
                            return;
                        }
                        Some(Ctl::Restart(reply)) => {
                            self.forget_exits(&mut backoff);
                            pending_reply = Some(reply);
                            continue 'outer;
                        }
                        None => continue 'outer,
                    }
                }
            };
            if let Some(r) = pending_reply.take() {
                let _ = r.send(());
            }
            loop {
                match self.wait(&mut running).await {
                    Outcome::Exited { pid, code, signal } => {
                        // Fluentd ≥ 1.18 zero-downtime restart: the old supervisor exits 0 and a
                        // new one, in the same process group, keeps running.
                        if let Some(new_pid) = self.survivor(pgid, pid) {
                            tracing::warn!(
                                old_pid = pid,
                                new_pid,
                                "the agent's main process exited but its process group lives on \
                                 (Fluentd zero-downtime restart replaces its supervisor); tracking the new process"
                            );
                            running = Running::Adopted(new_pid);
                            (self.on_pid)(Some((new_pid, proc_start_ticks(new_pid).unwrap_or(0))));
                            let _ = self
                                .events
                                .send(AgentEvent::Started {
                                    pid: new_pid,
                                    start_time_ns: proc_start_time_ns(new_pid)
                                        .unwrap_or_else(crate::state::now_ns),
                                    after_restart: false,
                                    // The same Fluentd carrying on: its errors since the
                                    // original start still explain its state.
                                    log_cursor,
                                })
                                .await;
                            continue;
                        }
                        // Nothing may outlive the agent unmanaged.
                        kill_group(pgid, libc::SIGKILL);
                        (self.on_pid)(None);
                        // Its last words explain the exit: read them to the end first.
                        self.drain_pumps().await;
                        let uptime = started.elapsed();
                        if uptime >= self.spec.crash_loop_window {
                            backoff.reset();
                            self.exits.clear();
                        }
                        match self
                            .after_unexpected_exit(pid, code, signal, uptime, &mut backoff)
                            .await
                        {
                            Some(Ctl::Stop(reply)) => {
                                self.stopped(reply).await;
                                return;
                            }
                            Some(Ctl::Restart(reply)) => {
                                // Asked for during the backoff (the file was fixed, say): a
                                // fresh start, not one more attempt of the loop.
                                self.forget_exits(&mut backoff);
                                pending_reply = Some(reply);
                                continue 'outer;
                            }
                            None => continue 'outer,
                        }
                    }
                    Outcome::Ctl(Ctl::Restart(reply)) => {
                        let pid = running.pid();
                        let (code, signal) = self.stop_group(&mut running, pgid).await;
                        (self.on_pid)(None);
                        let _ = self
                            .events
                            .send(AgentEvent::Exited {
                                pid,
                                code,
                                signal,
                                expected: true,
                                crash_loop: None,
                                error: None,
                                restart_in: Some(Duration::ZERO),
                            })
                            .await;
                        self.forget_exits(&mut backoff);
                        pending_reply = Some(reply);
                        continue 'outer;
                    }
                    Outcome::Ctl(Ctl::Stop(reply)) => {
                        let pid = running.pid();
                        let (code, signal) = self.stop_group(&mut running, pgid).await;
                        (self.on_pid)(None);
                        let _ = self
                            .events
                            .send(AgentEvent::Exited {
                                pid,
                                code,
                                signal,
                                expected: true,
                                crash_loop: None,
                                error: None,
                                restart_in: None,
                            })
                            .await;
                        self.stopped(reply).await;
                        return;
                    }
                    Outcome::CtlClosed => {
                        // The supervisor is going away without asking: still never leave the
                        // agent running unmanaged.
                        self.stop_group(&mut running, pgid).await;
                        (self.on_pid)(None);
                        return;
                    }
                }
            }
        }
    }

    /// An explicit restart starts afresh: earlier exits no longer count towards a crash loop
    /// and the restart delay starts again from its initial value.
    fn forget_exits(&mut self, backoff: &mut Backoff) {
        backoff.reset();
        self.exits.clear();
    }

    /// Waits (bounded) until the output of the process that just ended is read to its end.
    async fn drain_pumps(&mut self) {
        let pumps = std::mem::take(&mut self.pumps);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, futures_util::future::join_all(pumps)).await;
    }

    /// Answers a stop request and then only answers further requests (the agent stays down).
    async fn stopped(&mut self, reply: oneshot::Sender<()>) {
        let _ = reply.send(());
        while let Some(c) = self.ctl.recv().await {
            match c {
                Ctl::Restart(r) | Ctl::Stop(r) => {
                    let _ = r.send(());
                }
            }
        }
    }

    /// Reports an unexpected exit and sleeps the backoff; a control request cuts the sleep short.
    async fn after_unexpected_exit(
        &mut self,
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
        uptime: Duration,
        backoff: &mut Backoff,
    ) -> Option<Ctl> {
        let now = Instant::now();
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .map(|t| now.duration_since(*t) > self.spec.crash_loop_window)
            .unwrap_or(false)
        {
            self.exits.pop_front();
        }
        let delay = backoff.next_delay();
        let how = match (code, signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => format!("was killed by signal {s}"),
            (None, None) if pid == 0 => "could not be started".to_string(),
            (None, None) => "disappeared".to_string(),
        };
        // Only what this process wrote: an earlier one's errors explain nothing here.
        let errors = self
            .tail
            .lock()
            .expect("tail")
            .errors_of(self.generation, 5)
            .join(" | ");
        let mut error = format!(
            "agent (pid {pid}) {how} after {:.1} s",
            uptime.as_secs_f64()
        );
        if !errors.is_empty() {
            error.push_str("; last errors: ");
            error.push_str(&errors);
        }
        let crash_loop = (self.exits.len() as u32 >= self.spec.crash_loop_threshold).then(|| {
            format!(
                "crash loop: the agent {how} {} times within {} s; last errors: {}",
                self.exits.len(),
                self.spec.crash_loop_window.as_secs(),
                if errors.is_empty() {
                    "(none logged)"
                } else {
                    &errors
                }
            )
        });
        tracing::warn!(
            pid,
            code,
            signal,
            restart_in_ms = delay.as_millis() as u64,
            crash_loop = crash_loop.is_some(),
            "{error}"
        );
        let _ = self
            .events
            .send(AgentEvent::Exited {
                pid,
                code,
                signal,
                expected: false,
                crash_loop,
                error: Some(error),
                restart_in: Some(delay),
            })
            .await;
        let mut hold = self.hold.clone();
        let wait = async move {
            tokio::time::sleep(delay).await;
            if *hold.borrow() > 0 {
                tracing::info!(
                    "a config apply is in progress; the agent is restarted when it ends"
                );
            }
            let _ = hold.wait_for(|n| *n == 0).await;
        };
        tokio::select! {
            _ = wait => None,
            c = self.ctl.recv() => match c {
                Some(c) => Some(c),
                // Supervisor gone: do not start again.
                None => Some(Ctl::Stop(oneshot::channel().0)),
            },
        }
    }

    /// Spawns the agent: (the process, its group, its start time in ns since the epoch).
    fn start(&mut self) -> std::io::Result<(Running, i32, u64)> {
        let mut cmd = Command::new(&self.spec.executable);
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so stop/kill reach Fluentd's worker too and a Ctrl-C on the
            // supervisor's terminal does not hit the agent before the supervisor decides.
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and
        // exec. If the supervisor dies (even by SIGKILL) the agent gets SIGTERM instead of
        // running on unmanaged.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("supervisor exited during spawn"));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: {e}", self.spec.executable.display()))
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let name = self.spec.kind.name();
        let generation = self.generation;
        self.pumps.clear();
        if let Some(out) = child.stdout.take() {
            self.pumps.push(tokio::spawn(pump(
                out,
                "stdout",
                name,
                self.tail.clone(),
                generation,
            )));
        }
        if let Some(err) = child.stderr.take() {
            self.pumps.push(tokio::spawn(pump(
                err,
                "stderr",
                name,
                self.tail.clone(),
                generation,
            )));
        }
        // Wall clock at spawn: /proc's boot time + ticks drifts by up to a second from it.
        let start_time_ns = crate::state::now_ns();
        let ticks = proc_start_ticks(pid).unwrap_or(0);
        (self.on_pid)(Some((pid, ticks)));
        tracing::info!(pid, agent = name, "agent started");
        Ok((Running::Child(child, pid), pid, start_time_ns))
    }

    async fn wait(&mut self, running: &mut Running) -> Outcome {
        match running {
            Running::Child(child, pid) => {
                let pid = *pid;
                tokio::select! {
                    st = child.wait() => {
                        let (code, signal) = status_parts(st.ok());
                        Outcome::Exited { pid, code, signal }
                    }
                    c = self.ctl.recv() => match c { Some(c) => Outcome::Ctl(c), None => Outcome::CtlClosed },
                }
            }
            Running::Adopted(pid) => {
                let pid = *pid;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            if !alive(pid) {
                                return Outcome::Exited { pid, code: None, signal: None };
                            }
                        }
                        c = self.ctl.recv() => return match c { Some(c) => Outcome::Ctl(c), None => Outcome::CtlClosed },
                    }
                }
            }
        }
    }

    /// A live member of `pgid` other than `dead` that should be tracked as the agent, if any.
    fn survivor(&self, pgid: i32, dead: i32) -> Option<i32> {
        if self.spec.kind != AgentKind::Fluentd {
            return None;
        }
        // Give a replacing supervisor a moment to be visible; the old one exits ~10 s after
        // the new one started, so normally it is long there.
        // Orphaned workers (`--under-supervisor`) of a crashed supervisor are not an agent: they
        // are killed with the group instead of being adopted.
        let members: Vec<ProcInfo> = group_members(pgid)
            .into_iter()
            .filter(|p| p.pid != dead && p.state != 'Z' && !is_fluentd_worker(p.pid))
            .collect();
        // The replacement supervisor is the member whose parent is outside the group (init or
        // a subreaper); workers are children of a group member.
        members
            .iter()
            .find(|p| !members.iter().any(|q| q.pid == p.ppid))
            .map(|p| p.pid)
    }

    /// Graceful stop: SIGTERM, wait up to the stop timeout, SIGKILL the whole group.
    async fn stop_group(&mut self, running: &mut Running, pgid: i32) -> (Option<i32>, Option<i32>) {
        let pid = running.pid();
        let deadline = Instant::now() + self.spec.stop_timeout;
        match self.spec.kind {
            // Single process (plus threads): the group signal is the same as the pid's.
            AgentKind::Fluentbit => kill_group(pgid, libc::SIGTERM),
            // Signal only Fluentd's supervisor: it stops its workers in order after flushing;
            // a TERM straight to a worker races the supervisor respawning it.
            AgentKind::Fluentd => send_signal(pid, libc::SIGTERM),
        }
        tracing::info!(
            pid,
            timeout_s = self.spec.stop_timeout.as_secs(),
            "stopping the agent (SIGTERM)"
        );
        let mut result = (None, None);
        match running {
            Running::Child(child, _) => {
                match tokio::time::timeout_at(deadline.into(), child.wait()).await {
                    Ok(st) => result = status_parts(st.ok()),
                    Err(_) => {
                        tracing::warn!(
                            pid,
                            "the agent did not stop in time; SIGKILL to its process group"
                        );
                        kill_group(pgid, libc::SIGKILL);
                        result = status_parts(child.wait().await.ok());
                    }
                }
            }
            Running::Adopted(p) => {
                while alive(*p) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Stragglers (a worker whose supervisor died first) get the rest of the grace, then KILL.
        while !live_members(pgid).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !live_members(pgid).is_empty() {
            tracing::warn!(
                pgid,
                "agent processes left after the grace period; SIGKILL to the group"
            );
            kill_group(pgid, libc::SIGKILL);
        }
        result
    }
}

impl Running {
    fn pid(&self) -> i32 {
        match self {
            Running::Child(_, p) | Running::Adopted(p) => *p,
        }
    }
}

fn status_parts(st: Option<std::process::ExitStatus>) -> (Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Some(s) => (s.code(), s.signal()),
        None => (None, None),
    }
}

/// Copies one output stream into the log, line by line, tagged with the agent and stream.
async fn pump(
    stream: impl AsyncRead + Unpin,
    which: &'static str,
    agent: &'static str,
    tail: SharedTail,
    generation: u64,
) {
    let mut r = BufReader::new(stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if buf.len() > MAX_LINE {
                    buf.truncate(MAX_LINE);
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    continue;
                }
                // Fluent Bit announces where its API listens; anything but loopback means the
                // -L flag was not honoured and the API is exposed.
                if let Some(rest) = line.split("[http_server] listen iface=").nth(1) {
                    let iface = rest.split_whitespace().next().unwrap_or("");
                    if iface != "127.0.0.1" && iface != "::1" {
                        tracing::error!(iface, "Fluent Bit's HTTP API is not on loopback");
                    }
                }
                if is_error_line(line) {
                    tracing::warn!(target: "agent", agent, stream = which, "{line}");
                } else {
                    tracing::info!(target: "agent", agent, stream = which, "{line}");
                }
                tail.lock().expect("tail").push(generation, line);
            }
        }
    }
}

/// One process from `/proc/<pid>/stat`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub state: char,
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat` (the command name may contain spaces and parentheses).
pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

fn parse_stat(pid: i32, text: &str) -> Option<ProcInfo> {
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) ... starttime(22) → indexes 0,1,2,...,19.
    Some(ProcInfo {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

/// All processes in group `pgid`, zombies included.
pub fn group_members(pgid: i32) -> Vec<ProcInfo> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .filter(|p| p.pgid == pgid)
        .collect()
}

fn live_members(pgid: i32) -> Vec<ProcInfo> {
    group_members(pgid)
        .into_iter()
        .filter(|p| p.state != 'Z')
        .collect()
}

fn is_fluentd_worker(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|a| a == b"--under-supervisor"))
        .unwrap_or(false)
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    proc_info(pid).map(|p| p.state != 'Z').unwrap_or(false)
}

/// Start time of `pid` in clock ticks since boot (identifies a pid across reuse).
pub fn proc_start_ticks(pid: i32) -> Option<u64> {
    proc_info(pid).map(|p| p.start_ticks)
}

/// Real start time of `pid`, nanoseconds since the Unix epoch (boot time + start ticks).
pub fn proc_start_time_ns(pid: i32) -> Option<u64> {
    let ticks = proc_start_ticks(pid)?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(btime * 1_000_000_000 + ticks * (1_000_000_000 / hz))
}

pub fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: plain syscall; a negative pid addresses the process group.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

pub fn send_signal(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Stops an agent group left behind by a previous supervisor run (same pid *and* start time,
/// so a reused pid is never touched). Blocking, used once at start.
pub fn reap_leftover(pid: i32, start_ticks: u64, timeout: Duration) -> bool {
    match proc_info(pid) {
        Some(p) if p.start_ticks == start_ticks && p.state != 'Z' => {
            tracing::warn!(
                pid,
                "an agent from a previous supervisor run is still running; stopping it"
            );
            kill_group(p.pgid, libc::SIGTERM);
            let deadline = Instant::now() + timeout;
            while !live_members(p.pgid).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            kill_group(p.pgid, libc::SIGKILL);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_names() {
        let s = "1234 (fluent bit) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10 ...";
        let p = parse_stat(1234, s).unwrap();
        assert_eq!(p.ppid, 1);
        assert_eq!(p.pgid, 1234);
        assert_eq!(p.state, 'S');
        assert_eq!(p.start_ticks, 987654);
        let me = proc_info(std::process::id() as i32).unwrap();
        assert!(me.start_ticks > 0);
        assert!(proc_start_time_ns(std::process::id() as i32).unwrap() <= crate::state::now_ns());
    }

    #[tokio::test]
    async fn started_carries_a_cursor_from_before_the_spawn() {
        let (tx, mut rx) = mpsc::channel(8);
        let spec = Spec {
            kind: AgentKind::Fluentbit,
            executable: "/bin/sh".into(),
            // Its error is printed at once, before the core could read the event.
            args: vec![
                "-c".into(),
                "echo '[error] first words' >&2; exec sleep 30".into(),
            ],
            env: vec![],
            stop_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(100),
            crash_loop_threshold: 3,
            crash_loop_window: Duration::from_secs(60),
        };
        let h = spawn(spec, tx, Arc::new(|_| {}));
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("Started in time")
            .expect("event");
        let AgentEvent::Started { log_cursor, .. } = ev else {
            panic!("{ev:?}")
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !h
            .tail
            .lock()
            .unwrap()
            .since(0)
            .iter()
            .any(|l| l.contains("first words"))
        {
            assert!(Instant::now() < end, "the process's output never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Read now, the cursor would be past the line; the event's is before it.
        assert_eq!(
            h.tail.lock().unwrap().errors_since(log_cursor, 3),
            vec!["[error] first words"]
        );
        h.stop().await;
    }

    /// A runner of `script` (sh), run in `dir`, with a restart backoff from `backoff_ms`.
    fn script_runner(
        script: &str,
        dir: &std::path::Path,
        backoff_ms: u64,
        threshold: u32,
    ) -> (AgentHandle, mpsc::Receiver<AgentEvent>) {
        let (tx, rx) = mpsc::channel(32);
        let spec = Spec {
            kind: AgentKind::Fluentbit,
            executable: "/bin/sh".into(),
            args: vec!["-c".into(), format!("cd '{}' && {script}", dir.display())],
            env: vec![],
            stop_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(backoff_ms),
            backoff_max: Duration::from_secs(60),
            crash_loop_threshold: threshold,
            crash_loop_window: Duration::from_secs(120),
        };
        (spawn(spec, tx, Arc::new(|_| {})), rx)
    }

    async fn next_event(rx: &mut mpsc::Receiver<AgentEvent>) -> AgentEvent {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event in time")
            .expect("runner alive")
    }

    /// The next event, which must be an exit: (error, crash_loop, restart_in).
    async fn next_exit(
        rx: &mut mpsc::Receiver<AgentEvent>,
    ) -> (Option<String>, Option<String>, Option<Duration>) {
        match next_event(rx).await {
            AgentEvent::Exited {
                error,
                crash_loop,
                restart_in,
                ..
            } => (error, crash_loop, restart_in),
            ev => panic!("exit expected, got {ev:?}"),
        }
    }

    #[tokio::test]
    async fn an_exit_report_quotes_only_what_that_process_wrote() {
        let dir = tempfile::tempdir().unwrap();
        // The first process dies on a bind error; the second runs until it is killed.
        let script = "n=$(cat n 2>/dev/null || echo 0); echo $((n+1)) > n; \
             if [ \"$n\" = 0 ]; then echo '[error] bind(2) for 127.0.0.1:9880 by the first' >&2; exit 1; fi; \
             exec sleep 30";
        let (h, mut rx) = script_runner(script, dir.path(), 50, 2);
        assert!(matches!(
            next_event(&mut rx).await,
            AgentEvent::Started { .. }
        ));
        let (error, _, _) = next_exit(&mut rx).await;
        assert!(error.unwrap().contains("by the first"), "its own words");
        let AgentEvent::Started { pid, .. } = next_event(&mut rx).await else {
            panic!("start expected")
        };
        send_signal(pid, libc::SIGKILL);
        let (error, crash_loop, _) = next_exit(&mut rx).await;
        let error = error.unwrap();
        assert!(error.contains("killed by signal 9"), "{error}");
        assert!(!error.contains("by the first"), "{error}");
        // Two exits in the window: a crash loop, explained by the last process alone.
        let crash_loop = crash_loop.expect("crash loop");
        assert!(!crash_loop.contains("by the first"), "{crash_loop}");
        assert!(crash_loop.contains("(none logged)"), "{crash_loop}");
        h.stop().await;
    }

    #[tokio::test]
    async fn a_restart_during_the_crash_loop_backoff_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let script =
            "if [ ! -e fixed ]; then echo '[error] bad config' >&2; exit 1; fi; exec sleep 30";
        let (h, mut rx) = script_runner(script, dir.path(), 300, 3);
        // Three quick exits: a crash loop, with a growing delay.
        let mut last_delay = Duration::ZERO;
        for i in 1..=3 {
            assert!(matches!(
                next_event(&mut rx).await,
                AgentEvent::Started {
                    after_restart: false,
                    ..
                }
            ));
            let (_, crash_loop, restart_in) = next_exit(&mut rx).await;
            assert_eq!(crash_loop.is_some(), i == 3);
            last_delay = restart_in.unwrap();
        }
        assert!(last_delay >= Duration::from_millis(900), "{last_delay:?}");
        // The operator fixes the file and restarts during the backoff.
        std::fs::write(dir.path().join("fixed"), "").unwrap();
        h.restart().await;
        let AgentEvent::Started {
            pid, after_restart, ..
        } = next_event(&mut rx).await
        else {
            panic!("start expected")
        };
        assert!(after_restart);
        // One exit after that is one exit, with the first delay, not the fourth of a loop.
        send_signal(pid, libc::SIGKILL);
        let (_, crash_loop, restart_in) = next_exit(&mut rx).await;
        assert_eq!(crash_loop, None);
        assert!(
            restart_in.unwrap() <= Duration::from_millis(360),
            "{restart_in:?}"
        );
        h.stop().await;
    }

    #[test]
    fn tail_keeps_errors_and_cursor() {
        let mut t = LogTail::default();
        t.push(1, "[ info] starting");
        let c = t.cursor();
        t.push(1, "[error] [config] bad");
        t.push(1, "ok");
        assert_eq!(t.since(c), vec!["[error] [config] bad", "ok"]);
        assert_eq!(t.errors_of(1, 5), vec!["[error] [config] bad"]);
        assert!(t.errors_of(2, 5).is_empty(), "another process wrote it");
        t.push(1, "[error] second");
        assert_eq!(t.errors_since(c, 1), vec!["[error] second"]);
        assert!(t.errors_since(t.cursor(), 5).is_empty());
        assert!(is_error_line(
            "2026-11-22 02:51:05 +0000 [error]: Failed to reload config file: x"
        ));
        assert!(!is_error_line("[ info] [engine] started"));
        // portconflict.log: the message counts, its backtrace frames do not.
        assert!(is_error_line("2026-11-22 02:52:25 +0000 [error]: #0 unexpected error error_class=Errno::EADDRINUSE error=\"Address already in use - bind(2) for 127.0.0.1:24220\""));
        assert!(!is_error_line(
            "  2026-11-22 02:52:25 +0000 [error]: #0 /usr/lib/ruby/3.1.0/socket.rb:201:in `bind'"
        ));
        assert!(is_error_line(
            "2026-11-22 02:51:10 +0000 [info]: Worker 0 finished unexpectedly with status 1"
        ));
    }
}

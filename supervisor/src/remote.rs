//! Remote config with rollback: map the offered files onto the agent's config directory, dry-run
//! them in a staging copy, keep the current files as last-known-good (persisted before anything
//! is touched), write atomically, reload (hot reload or controlled restart), hold a health gate,
//! and either report APPLIED or put last-known-good back, reload again and report FAILED with
//! the agent's own words. Also: effective config, recovery after a crash mid-apply, and a
//! rollback that could not put last-known-good back (restarts stay held until it can).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::{AgentConfigFile, AgentConfigMap, EffectiveConfig};

use crate::agent::{AgentHandle, RestartHold};
use crate::config::Config;
use crate::fluent::{content_type_for, Fluent, ReloadError};
use crate::state::{write_atomic, PendingApply, State, StateError, StoredFile, StoredRemoteConfig};
use crate::view::SharedView;

/// Why an offered config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("data directory: {0}")]
    State(#[from] StateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where each offered file goes. A single file is the agent's main config whatever its name;
/// otherwise the file named like the main config (or with an empty name) is the main config and
/// the others are written next to it.
pub fn targets(
    cfg: &Config,
    files: &BTreeMap<String, StoredFile>,
) -> Result<BTreeMap<PathBuf, String>, ApplyError> {
    let main = cfg.agent.config_path.clone();
    let dir = main.parent().unwrap_or(Path::new(".")).to_path_buf();
    let main_name = main
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let mut out = BTreeMap::new();
    if files.is_empty() {
        return Err(ApplyError::Invalid("the remote config has no files".into()));
    }
    for (name, f) in files {
        let path = if files.len() == 1 || name.is_empty() || *name == main_name {
            main.clone()
        } else {
            // Names become paths: refuse anything that could leave the config directory.
            let ok = !name.starts_with('.')
                && !name.contains('/')
                && !name.contains('\\')
                && !name.contains('\0')
                && name.len() <= 255;
            if !ok {
                return Err(ApplyError::Invalid(format!(
                    "file name {name:?} is not a plain file name"
                )));
            }
            dir.join(name)
        };
        if out.insert(path.clone(), f.body.clone()).is_some() {
            return Err(ApplyError::Invalid(format!(
                "two files map to {}",
                path.display()
            )));
        }
    }
    Ok(out)
}

/// The agent's effective config: its main file plus the other files the last applied remote
/// config wrote.
pub fn effective_config(cfg: &Config, applied: Option<&StoredRemoteConfig>) -> EffectiveConfig {
    let mut map = std::collections::HashMap::new();
    let mut paths = vec![cfg.agent.config_path.clone()];
    if let Some(rc) = applied {
        if let Ok(t) = targets(cfg, &rc.files) {
            paths.extend(t.into_keys());
        }
    }
    for p in paths {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if map.contains_key(&name) {
            continue;
        }
        if let Ok(body) = std::fs::read(&p) {
            map.insert(
                name.clone(),
                AgentConfigFile {
                    body,
                    content_type: content_type_for(&name).into(),
                },
            );
        }
    }
    EffectiveConfig {
        config_map: Some(AgentConfigMap { config_map: map }),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies the config directory (regular files only) into `staging` and overlays the new files,
/// so relative includes resolve as they will in place.
fn stage(
    cfg: &Config,
    staging: &Path,
    new: &BTreeMap<PathBuf, String>,
) -> Result<PathBuf, ApplyError> {
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).map_err(io_err(staging))?;
    let dir = cfg
        .agent
        .config_path
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten().take(256) {
            let p = e.path();
            let small = e
                .metadata()
                .map(|m| m.is_file() && m.len() <= 8 * 1024 * 1024)
                .unwrap_or(false);
            if small {
                if let Some(n) = p.file_name() {
                    let _ = std::fs::copy(&p, staging.join(n));
                }
            }
        }
    }
    for (path, body) in new {
        let target = staging.join(path.file_name().unwrap_or_default());
        std::fs::write(&target, body).map_err(io_err(&target))?;
    }
    Ok(staging.join(cfg.agent.config_path.file_name().unwrap_or_default()))
}

/// Puts files back as they were (`None`: the file did not exist).
pub fn restore(previous: &BTreeMap<PathBuf, Option<String>>) -> Result<(), ApplyError> {
    for (path, body) in previous {
        match body {
            Some(b) => write_atomic(path, b.as_bytes())?,
            None => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path)(e)),
            },
        }
    }
    Ok(())
}

/// At start: finish what a crash interrupted. Returns a message if last-known-good was restored.
pub fn recover(state: &State) -> Result<Option<String>, ApplyError> {
    let Some(p) = state.pending_apply()? else {
        return Ok(None);
    };
    restore(&p.previous)?;
    state.set_pending_apply(None)?;
    let msg =
        "the supervisor stopped while applying this config; last-known-good restored".to_string();
    state.set_remote_status(&StoredRemoteConfig {
        hash: p.hash.clone(),
        files: BTreeMap::new(),
        status: "failed".into(),
        error_message: msg.clone(),
    })?;
    Ok(Some(msg))
}

/// At start: the agent runs with the last applied remote config even if its files were
/// changed (a package upgrade rewrote them) while the supervisor was down.
pub fn reinstate(cfg: &Config, state: &State) -> Result<(), ApplyError> {
    let Some(applied) = state.remote_config()? else {
        return Ok(());
    };
    for (path, body) in targets(cfg, &applied.files)? {
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() != Some(body.as_str()) {
            tracing::warn!(path = %path.display(), "config file differs from the last applied remote config; rewriting it");
            write_atomic(&path, body.as_bytes())?;
        }
    }
    Ok(())
}

/// What applying needs.
pub struct Applier {
    pub cfg: Arc<Config>,
    pub state: State,
    pub agent: AgentHandle,
    pub view: SharedView,
    /// Set while a failed config could not be rolled back.
    stuck: std::sync::Mutex<Option<Stuck>>,
}

/// A failed config whose last-known-good could not be put back: its files are still in place,
/// so an agent that dies must not be restarted on them.
#[derive(Debug)]
struct Stuck {
    hash: String,
    previous: BTreeMap<PathBuf, Option<String>>,
    /// Kept until last-known-good is back; dropping it would let the runner restart a dead
    /// agent on the bad files (and crash-loop there).
    hold: RestartHold,
}

/// Outcome of one apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Ok,
    Failed(String),
}

impl Applier {
    pub fn new(cfg: Arc<Config>, state: State, agent: AgentHandle, view: SharedView) -> Applier {
        Applier {
            cfg,
            state,
            agent,
            view,
            stuck: std::sync::Mutex::new(None),
        }
    }

    /// Restoring last-known-good failed: keep the restart hold (and `pending_apply`, so a
    /// restart of the supervisor retries the restore before starting the agent) and say so in
    /// health, until [`Applier::unstick`] gets the files back.
    fn stick(
        &self,
        hash: &str,
        previous: BTreeMap<PathBuf, Option<String>>,
        hold: RestartHold,
        why: &str,
    ) {
        tracing::error!(
            hash,
            "{why}; the agent is not restarted on its own until last-known-good is back"
        );
        self.view.lock().expect("view").rollback_stuck = Some(why.to_string());
        *self.stuck.lock().expect("stuck") = Some(Stuck {
            hash: hash.to_string(),
            previous,
            hold,
        });
    }

    /// Puts last-known-good back after `msg` failed an apply that wrote (some of) its files.
    /// `Ok`: the files are back, `pending_apply` is cleared and the hold is handed back (the
    /// agent may still need reloading on them). `Err`: they are not, the apply is stuck (see
    /// [`Applier::stick`]) and the message says both failures.
    fn roll_back(
        &self,
        hash: &str,
        previous: BTreeMap<PathBuf, Option<String>>,
        hold: RestartHold,
        msg: &str,
    ) -> Result<RestartHold, String> {
        if let Err(e) = restore(&previous) {
            let why = format!("{msg}; restoring last-known-good also failed: {e}");
            self.stick(hash, previous, hold, &why);
            return Err(why);
        }
        if let Err(e) = self.state.set_pending_apply(None) {
            tracing::warn!("cannot clear the pending apply record: {e}");
        }
        Ok(hold)
    }

    /// Before a new apply: tries again to put back the last-known-good of a stuck rollback.
    /// `Ok(Some(hold))`: restored; the hold goes on until the new apply loaded its config
    /// (the agent may be down, and the apply starts it). `Err`: still stuck.
    fn unstick(&self) -> Result<Option<RestartHold>, String> {
        let mut g = self.stuck.lock().expect("stuck");
        let Some(st) = g.as_ref() else {
            return Ok(None);
        };
        if let Err(e) = restore(&st.previous) {
            return Err(format!(
                "the files of config {} are still in place: restoring its last-known-good \
                 fails ({e}); nothing new is applied until that works",
                st.hash
            ));
        }
        let st = g.take().expect("checked");
        if let Err(e) = self.state.set_pending_apply(None) {
            tracing::warn!("cannot clear the pending apply record: {e}");
        }
        tracing::info!(hash = %st.hash, "last-known-good of the failed config restored at last");
        self.view.lock().expect("view").rollback_stuck = None;
        Ok(Some(st.hold))
    }

    /// Runs the whole pipeline for one offer. `on_applying` is called once the offer passed
    /// the cheap checks (the core reports APPLYING then).
    pub async fn apply(&self, hash: &str, files: &BTreeMap<String, StoredFile>) -> Applied {
        let result = self.apply_inner(hash, files).await;
        let (status, msg) = match &result {
            Applied::Ok => ("applied", String::new()),
            Applied::Failed(m) => ("failed", m.clone()),
        };
        if status == "applied" {
            let _ = self.state.set_remote_config(&StoredRemoteConfig {
                hash: hash.to_string(),
                files: files.clone(),
                status: "applied".into(),
                error_message: String::new(),
            });
        }
        if let Err(e) = self.state.set_remote_status(&StoredRemoteConfig {
            hash: hash.to_string(),
            files: BTreeMap::new(),
            status: status.into(),
            error_message: msg,
        }) {
            tracing::error!("cannot persist the remote config status: {e}");
        }
        result
    }

    async fn apply_inner(&self, hash: &str, files: &BTreeMap<String, StoredFile>) -> Applied {
        // Alive until this apply ends (see `unstick`).
        let _unstuck = match self.unstick() {
            Ok(h) => h,
            Err(e) => return Applied::Failed(e),
        };
        let new = match targets(&self.cfg, files) {
            Ok(t) => t,
            Err(e) => return Applied::Failed(e.to_string()),
        };
        // 1. Dry run in a staging copy: nothing in place changes if the agent refuses it.
        let staged = match stage(&self.cfg, &self.state.staging_dir(), &new) {
            Ok(p) => p,
            Err(e) => return Applied::Failed(format!("cannot stage the config: {e}")),
        };
        let dry = Fluent::dry_run(&self.cfg, &staged).await;
        let _ = std::fs::remove_dir_all(self.state.staging_dir());
        if let Err(e) = dry {
            tracing::warn!(hash, "remote config refused by the dry run: {e}");
            return Applied::Failed(e);
        }
        // 2. Last-known-good, persisted before any file is touched.
        let previous: BTreeMap<PathBuf, Option<String>> = new
            .keys()
            .map(|p| (p.clone(), std::fs::read_to_string(p).ok()))
            .collect();
        let pending = PendingApply {
            hash: hash.to_string(),
            previous: previous.clone(),
        };
        if let Err(e) = self.state.set_pending_apply(Some(&pending)) {
            return Applied::Failed(format!("cannot save last-known-good: {e}"));
        }
        let mut fluent = Fluent::new(&self.cfg);
        let before = fluent.probe().await;
        let exits_before = self.view.lock().expect("view").unexpected_exits;
        // From the first write until last-known-good is back in force, an agent that dies is
        // not restarted on its own: it would start on files about to be rolled back.
        let hold = self.agent.hold_restarts();
        // 3. Write in place, atomically.
        for (path, body) in &new {
            if let Err(e) = write_atomic(path, body.as_bytes()) {
                let msg = format!("cannot write {}: {e}", path.display());
                // Nothing was reloaded yet: once the files are back, the hold can go.
                return match self.roll_back(hash, previous, hold, &msg) {
                    Ok(_hold) => Applied::Failed(msg),
                    Err(why) => Applied::Failed(why),
                };
            }
        }
        // 4. Load it. A reload that kills the agent (Fluent Bit exits 255 when the new
        //    pipeline fails to start) ends the wait at once instead of at the timeout.
        let log_cursor = self.agent.tail.lock().expect("tail").cursor();
        let loaded = tokio::select! {
            r = self.load(&fluent) => r,
            e = self.wait_exit(exits_before) => Err(ReloadError::Rejected(e)),
        };
        let failure = match loaded {
            // Halted (Fluent Bit) or refused (Fluentd graceful reload): the old pipeline still
            // runs, unless the agent died meanwhile.
            Err(ReloadError::Rejected(msg)) => {
                let died = self.exited_since(exits_before).is_some()
                    || !self.view.lock().expect("view").running;
                Some((msg, died))
            }
            // Took the config and broke on it: nothing runs until last-known-good is loaded.
            Err(ReloadError::Unavailable(msg)) | Err(ReloadError::Broken(msg)) => Some((msg, true)),
            Ok(()) => self
                .gate(&mut fluent, before.healthy, exits_before, log_cursor)
                .await
                .err()
                .map(|m| (m, true)),
        };
        match failure {
            None => {
                let _ = self.state.set_pending_apply(None);
                tracing::info!(hash, "remote config applied");
                Applied::Ok
            }
            Some((msg, reload_again)) => {
                tracing::warn!(
                    hash,
                    "remote config failed, restoring last-known-good: {msg}"
                );
                let hold = match self.roll_back(hash, previous, hold, &msg) {
                    Ok(hold) => hold,
                    Err(why) => return Applied::Failed(why),
                };
                // A halted reload left the old pipeline running: nothing to reload then.
                if reload_again {
                    self.reload_last_known_good(&fluent, exits_before).await;
                }
                drop(hold);
                Applied::Failed(msg)
            }
        }
    }

    /// Hot reload when the agent can; a controlled restart otherwise.
    async fn load(&self, fluent: &Fluent) -> Result<(), ReloadError> {
        let running = self.view.lock().expect("view").running;
        if !running {
            // Down (crash loop with the old config): just start it with the new one.
            self.agent.restart().await;
            return Ok(());
        }
        match fluent.reload(&self.agent.tail).await {
            Err(ReloadError::Unavailable(why)) => {
                // A restart drops the data in flight that a reload would have kept: worth
                // an operator's attention every time.
                tracing::warn!(
                    "{why}; falling back to restarting the agent to load the new config"
                );
                self.agent.restart().await;
                Ok(())
            }
            other => other,
        }
    }

    /// The agent must stay up for the gate window and end it answering (and healthy, if it
    /// was healthy before: a config does not fail for an outage it did not cause).
    async fn gate(
        &self,
        fluent: &mut Fluent,
        was_healthy: bool,
        exits_before: u64,
        log_cursor: u64,
    ) -> Result<(), String> {
        let window = Duration::from_secs(self.cfg.agent.health_gate_s);
        let end = Instant::now() + window;
        let mut last = None;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(e) = self.exited_since(exits_before) {
                return Err(e);
            }
        }
        // The API may blink during a rebuild; a few tries before calling it down.
        for _ in 0..5 {
            let p = fluent.probe().await;
            if let Some(e) = self.exited_since(exits_before) {
                return Err(e);
            }
            if p.reachable && (p.healthy || !was_healthy) {
                return Ok(());
            }
            last = Some(p);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let p = last.unwrap_or_default();
        // What the agent said since the new config was loaded, not before.
        let errors = crate::agent::error_summary_since(&self.agent.tail, log_cursor, 3);
        Err(format!(
            "the agent is not healthy {} s after the new config: {}{}",
            window.as_secs(),
            p.last_error,
            if errors.is_empty() {
                String::new()
            } else {
                format!("; agent log: {errors}")
            }
        ))
    }

    /// Resolves (with the reason) once the agent exits unexpectedly.
    async fn wait_exit(&self, exits_before: u64) -> String {
        loop {
            if let Some(e) = self.exited_since(exits_before) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn exited_since(&self, exits_before: u64) -> Option<String> {
        let v = self.view.lock().expect("view");
        (v.unexpected_exits > exits_before).then(|| {
            format!(
                "the agent exited with the new config: {}",
                v.exit_error
                    .clone()
                    .unwrap_or_else(|| "no error logged".into())
            )
        })
    }

    async fn reload_last_known_good(&self, fluent: &Fluent, exits_before: u64) {
        let running = self.view.lock().expect("view").running;
        let died = self.exited_since(exits_before).is_some();
        let ok = running && !died && fluent.reload(&self.agent.tail).await.is_ok();
        if !ok {
            // Not running (exit 255 after an aborted reload) or reload refused: a restart
            // with last-known-good, cutting any restart backoff short.
            self.agent.restart().await;
        }
        // Wait (bounded) until the agent answers again so the FAILED report follows a
        // recovered agent.
        let mut f = Fluent::new(&self.cfg);
        let end = Instant::now() + Duration::from_secs(self.cfg.agent.health_gate_s.max(5));
        while Instant::now() < end {
            if f.probe().await.reachable {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tracing::warn!("the agent did not answer after restoring last-known-good");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> Config {
        let mut c = Config::default();
        c.agent.config_path = dir.join("fluent-bit.conf");
        c
    }

    fn f(body: &str) -> StoredFile {
        StoredFile {
            body: body.into(),
            content_type: String::new(),
        }
    }

    #[test]
    fn file_mapping() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let one: BTreeMap<_, _> = [("anything.yaml".to_string(), f("a"))].into();
        let t = targets(&c, &one).unwrap();
        assert_eq!(t.keys().next().unwrap(), &c.agent.config_path);
        let two: BTreeMap<_, _> = [
            ("fluent-bit.conf".to_string(), f("main")),
            ("parsers.conf".to_string(), f("p")),
        ]
        .into();
        let t = targets(&c, &two).unwrap();
        assert_eq!(t[&d.path().join("parsers.conf")], "p");
        let evil: BTreeMap<_, _> = [
            ("fluent-bit.conf".to_string(), f("main")),
            ("../etc/passwd".to_string(), f("x")),
        ]
        .into();
        assert!(targets(&c, &evil).is_err());
    }

    #[test]
    fn restore_and_recover() {
        let d = tempfile::tempdir().unwrap();
        let state = State::open(&d.path().join("data")).unwrap();
        let a = d.path().join("a.conf");
        let b = d.path().join("b.conf");
        std::fs::write(&a, "old").unwrap();
        let prev: BTreeMap<_, _> = [(a.clone(), Some("old".to_string())), (b.clone(), None)].into();
        state
            .set_pending_apply(Some(&PendingApply {
                hash: "ab".into(),
                previous: prev,
            }))
            .unwrap();
        std::fs::write(&a, "new").unwrap();
        std::fs::write(&b, "new").unwrap();
        assert!(recover(&state).unwrap().is_some());
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old");
        assert!(!b.exists());
        assert!(state.pending_apply().unwrap().is_none());
        assert_eq!(state.remote_status().unwrap().unwrap().status, "failed");
        assert!(recover(&state).unwrap().is_none());
    }

    /// An applier for a config file whose last-known-good is "good", with what it works on.
    struct Rig {
        /// Bound by name in the tests: the directory goes when this is dropped.
        _dir: tempfile::TempDir,
        c: Config,
        state: State,
        agent: AgentHandle,
        view: SharedView,
        a: Applier,
        previous: BTreeMap<PathBuf, Option<String>>,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let state = State::open(&dir.path().join("data")).unwrap();
        let agent = AgentHandle::detached();
        let view = SharedView::default();
        let a = Applier::new(
            Arc::new(c.clone()),
            state.clone(),
            agent.clone(),
            view.clone(),
        );
        let previous = [(c.agent.config_path.clone(), Some("good".to_string()))].into();
        Rig {
            _dir: dir,
            c,
            state,
            agent,
            view,
            a,
            previous,
        }
    }

    #[test]
    fn a_rollback_that_cannot_restore_keeps_restarts_held() {
        let Rig {
            c,
            agent,
            view,
            a,
            previous,
            _dir,
            ..
        } = rig();
        // Something stands where the file must go back: the restore cannot write it.
        std::fs::create_dir(&c.agent.config_path).unwrap();
        let e = restore(&previous).unwrap_err();
        a.stick("h1", previous, agent.hold_restarts(), &e.to_string());
        assert!(
            agent.restarts_held(),
            "bad files on disk: no automatic restart"
        );
        assert!(view.lock().unwrap().rollback_stuck.is_some());
        // A later apply tries again; while it fails, the hold stays.
        let e = a.unstick().unwrap_err();
        assert!(e.contains("h1"), "{e}");
        assert!(agent.restarts_held());
        // Once it works, last-known-good is back and the hold passes to that apply.
        std::fs::remove_dir(&c.agent.config_path).unwrap();
        let hold = a.unstick().unwrap().expect("the stuck hold");
        assert_eq!(
            std::fs::read_to_string(&c.agent.config_path).unwrap(),
            "good"
        );
        assert!(view.lock().unwrap().rollback_stuck.is_none());
        assert!(agent.restarts_held());
        drop(hold);
        assert!(!agent.restarts_held());
        assert!(a.unstick().unwrap().is_none(), "nothing stuck any more");
    }

    #[test]
    fn a_roll_back_that_cannot_restore_sticks() {
        let Rig {
            c,
            state,
            agent,
            view,
            a,
            previous,
            _dir,
            ..
        } = rig();
        let pending = PendingApply {
            hash: "h1".into(),
            previous: previous.clone(),
        };
        state.set_pending_apply(Some(&pending)).unwrap();
        std::fs::create_dir(&c.agent.config_path).unwrap();
        let why = a
            .roll_back(
                "h1",
                previous.clone(),
                agent.hold_restarts(),
                "cannot write x",
            )
            .unwrap_err();
        assert!(why.starts_with("cannot write x; "), "{why}");
        assert!(agent.restarts_held());
        assert!(view.lock().unwrap().rollback_stuck.is_some());
        assert!(
            state.pending_apply().unwrap().is_some(),
            "a supervisor restart must still retry the restore"
        );
        // Once the restore works, the record goes and the hold is handed back.
        std::fs::remove_dir(&c.agent.config_path).unwrap();
        drop(a.unstick().unwrap());
        state.set_pending_apply(Some(&pending)).unwrap();
        let hold = a
            .roll_back("h2", previous, agent.hold_restarts(), "cannot write y")
            .unwrap();
        assert!(state.pending_apply().unwrap().is_none());
        assert_eq!(
            std::fs::read_to_string(&c.agent.config_path).unwrap(),
            "good"
        );
        assert!(agent.restarts_held());
        drop(hold);
        assert!(!agent.restarts_held());
    }

    #[test]
    fn effective_config_names_files() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::write(&c.agent.config_path, "[SERVICE]\n").unwrap();
        let e = effective_config(&c, None);
        let m = e.config_map.unwrap().config_map;
        assert_eq!(m["fluent-bit.conf"].body, b"[SERVICE]\n");
        assert_eq!(m["fluent-bit.conf"].content_type, "text/plain");
    }
}

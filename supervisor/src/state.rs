//! What the supervisor keeps in its data directory across restarts: the instance uid, the ids of
//! commands already executed (so a restart never runs one twice), the last applied remote
//! config, an in-progress apply marker, and the running agent's pid. Every write is atomic
//! (temp file, fsync, rename) so a crash leaves either the old or the new version.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A data-directory problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt ({message}); move it away to start afresh")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` atomically: a temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.flotilla-tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    // Keep the mode of a file we replace (agent configs may be 0640 for a service user).
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One config file as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub body: String,
    #[serde(default)]
    pub content_type: String,
}

/// A remote config: the last applied one (`remote_config.json`, with its files) or the last
/// processed one (`remote_status.json`, status only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRemoteConfig {
    /// Hex of `AgentRemoteConfig.config_hash`.
    pub hash: String,
    /// Files keyed by the server's names.
    pub files: BTreeMap<String, StoredFile>,
    /// `applied` or `failed`.
    pub status: String,
    #[serde(default)]
    pub error_message: String,
}

/// Marker written before an apply touches the agent's files; its presence at start means the
/// supervisor died mid-apply and the last-known-good copies must be put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApply {
    pub hash: String,
    /// Target path → previous content (`None`: the file did not exist).
    pub previous: BTreeMap<PathBuf, Option<String>>,
}

/// An executed command: when, and the result message sent (re-sent if the same id shows up
/// again, because then the server may have missed it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutedCommand {
    pub at_unix_ms: u64,
    pub kind: String,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
}

/// Ids kept; far more than a server keeps in flight for one agent.
const MAX_EXECUTED: usize = 2000;

/// The data directory.
#[derive(Debug, Clone)]
pub struct State {
    dir: PathBuf,
    executed: BTreeMap<String, ExecutedCommand>,
}

impl State {
    /// Opens (creating) the data directory and loads the executed-command log.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut s = State {
            dir: dir.to_path_buf(),
            executed: BTreeMap::new(),
        };
        if let Some(map) = s.read_json::<BTreeMap<String, ExecutedCommand>>("commands.json")? {
            s.executed = map;
        }
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, v: &T) -> Result<(), StateError> {
        let data = serde_json::to_vec_pretty(v).expect("state serialises");
        write_atomic(&self.path(name), &data)
    }

    /// The persisted instance uid, generated (UUIDv7) and stored on first use.
    pub fn instance_uid(&self) -> Result<Uuid, StateError> {
        let path = self.path("instance_uid");
        match std::fs::read_to_string(&path) {
            Ok(text) => Uuid::parse_str(text.trim()).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let uid = Uuid::now_v7();
                self.set_instance_uid(uid)?;
                Ok(uid)
            }
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    /// Persists a (server-assigned) instance uid.
    pub fn set_instance_uid(&self, uid: Uuid) -> Result<(), StateError> {
        write_atomic(&self.path("instance_uid"), format!("{uid}\n").as_bytes())
    }

    /// The stored record if command `id` already ran.
    pub fn executed(&self, id: &str) -> Option<&ExecutedCommand> {
        self.executed.get(id)
    }

    /// Records that command `id` is being executed, before it runs: a crash mid-command must
    /// not make it run again (at most once beats at least once for restarts and POSTs).
    pub fn mark_executed(&mut self, id: &str, kind: &str) -> Result<(), StateError> {
        self.executed.insert(
            id.to_string(),
            ExecutedCommand {
                at_unix_ms: now_ms(),
                kind: kind.to_string(),
                result: None,
            },
        );
        if self.executed.len() > MAX_EXECUTED {
            // Drop the oldest entries; ids are only ever re-delivered shortly after sending.
            let mut by_age: Vec<(u64, String)> = self
                .executed
                .iter()
                .map(|(k, v)| (v.at_unix_ms, k.clone()))
                .collect();
            by_age.sort();
            for (_, k) in by_age.iter().take(self.executed.len() - MAX_EXECUTED) {
                self.executed.remove(k);
            }
        }
        self.write_json("commands.json", &self.executed)
    }

    /// Stores the result sent for command `id`.
    pub fn set_result(&mut self, id: &str, result: serde_json::Value) -> Result<(), StateError> {
        if let Some(e) = self.executed.get_mut(id) {
            e.result = Some(result);
        }
        self.write_json("commands.json", &self.executed)
    }

    pub fn remote_config(&self) -> Result<Option<StoredRemoteConfig>, StateError> {
        self.read_json("remote_config.json")
    }

    pub fn set_remote_config(&self, rc: &StoredRemoteConfig) -> Result<(), StateError> {
        self.write_json("remote_config.json", rc)
    }

    /// The last remote config processed (applied or failed); `files` is left empty.
    pub fn remote_status(&self) -> Result<Option<StoredRemoteConfig>, StateError> {
        self.read_json("remote_status.json")
    }

    pub fn set_remote_status(&self, rc: &StoredRemoteConfig) -> Result<(), StateError> {
        self.write_json("remote_status.json", rc)
    }

    pub fn pending_apply(&self) -> Result<Option<PendingApply>, StateError> {
        self.read_json("pending_apply.json")
    }

    pub fn set_pending_apply(&self, p: Option<&PendingApply>) -> Result<(), StateError> {
        match p {
            Some(p) => self.write_json("pending_apply.json", p),
            None => match std::fs::remove_file(self.path("pending_apply.json")) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StateError::Io {
                    path: self.path("pending_apply.json"),
                    source: e,
                }),
            },
        }
    }

    /// The agent process group left behind by a previous run (pid, start ticks).
    pub fn agent_pid(&self) -> Option<(i32, u64)> {
        let text = std::fs::read_to_string(self.path("agent.pid")).ok()?;
        let mut it = text.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    }

    pub fn set_agent_pid(&self, pid: Option<(i32, u64)>) {
        let path = self.path("agent.pid");
        let _ = match pid {
            Some((pid, ticks)) => write_atomic(&path, format!("{pid} {ticks}\n").as_bytes()),
            None => std::fs::remove_file(&path).map_err(io(&path)),
        };
    }

    /// Scratch directory for dry runs.
    pub fn staging_dir(&self) -> PathBuf {
        self.path("staging")
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_stable_and_replaceable() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let a = s.instance_uid().unwrap();
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(State::open(d.path()).unwrap().instance_uid().unwrap(), a);
        let b = Uuid::now_v7();
        s.set_instance_uid(b).unwrap();
        assert_eq!(State::open(d.path()).unwrap().instance_uid().unwrap(), b);
    }

    #[test]
    fn executed_ids_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(d.path()).unwrap();
        s.mark_executed("c1", "chatops").unwrap();
        s.set_result("c1", serde_json::json!({"status": "succeeded"}))
            .unwrap();
        let s2 = State::open(d.path()).unwrap();
        let e = s2.executed("c1").unwrap();
        assert_eq!(e.kind, "chatops");
        assert_eq!(e.result.as_ref().unwrap()["status"], "succeeded");
        assert!(s2.executed("c2").is_none());
    }

    #[test]
    fn corrupt_state_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("commands.json"), "{nope").unwrap();
        let e = State::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("commands.json") && e.contains("corrupt"), "{e}");
    }

    #[test]
    fn atomic_write_keeps_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.conf");
        std::fs::write(&p, "a").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "b");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
}

//! Confirmations of destructive tool calls, kept server-side.
//!
//! A destructive call that arrives unconfirmed is not executed: it gets a preview and a token.
//! The token is random (128 bits from the OS), stored here with a digest of the caller's
//! identity, the tool name and the exact arguments, expires after [`DEFAULT_TTL`], and is
//! spent by its owner's first presentation, matching or not, so a token can neither be replayed
//! nor probed for other arguments. Presented by anyone else it is refused and left alone: a
//! leaked or guessed token must not let another user cancel someone's pending confirmation. It also carries what was shown to the user (the preview and the
//! target set it named), handed back when the token is spent, so the confirmed call runs
//! against exactly what was confirmed. The same store backs the MRTR elicitation round trip of the
//! 2026-07-28 protocol, where the pending confirmation's token travels as `requestState`.
//!
//! Tokens live in memory: a restart forgets them, which only means asking again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// How long a confirmation token stays valid.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// Most outstanding confirmations kept, so callers cannot grow the map without bound.
const MAX_PENDING: usize = 10_000;
/// Most outstanding confirmations of one caller: beyond it that caller's own oldest is
/// dropped, so one caller can never push out another's.
pub const MAX_PENDING_PER_CALLER: usize = 64;

/// Why a presented token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    #[error("the confirmation token is unknown, already used or expired; call again without it to get a new one")]
    Unknown,
    #[error("the confirmation token was issued for different arguments; it is now spent — call again without it to get a new one")]
    Mismatch,
    #[error("the confirmation token was issued to another caller; only they can use it — call again without it to get your own")]
    OtherCaller,
}

struct Pending {
    digest: [u8; 32],
    /// SHA-256 of the caller's identity, for the per-caller cap.
    owner: [u8; 32],
    expires: Instant,
    payload: Value,
}

/// Outstanding confirmations. Shared by every session and transport of one server.
pub struct ConfirmStore {
    ttl: Duration,
    pending: Mutex<HashMap<String, Pending>>,
}

impl Default for ConfirmStore {
    fn default() -> Self {
        ConfirmStore::new(DEFAULT_TTL)
    }
}

/// Arguments in a canonical form (object keys sorted at every level) without the
/// confirmation fields themselves, so the digest depends on what would run and nothing else.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Removes the fields that steer confirmation rather than the operation, and spellings of a
/// default (`null`, `dry_run: false`), so a client that repeats the call with explicit defaults
/// still matches.
pub fn strip_confirmation_fields(args: &Map<String, Value>) -> Map<String, Value> {
    let mut a = args.clone();
    a.remove("confirmation_token");
    a.retain(|_, v| !v.is_null());
    if a.get("dry_run") == Some(&Value::Bool(false)) {
        a.remove("dry_run");
    }
    a
}

fn digest(identity: &str, tool: &str, args: &Map<String, Value>) -> [u8; 32] {
    let canon = canonical(&Value::Object(strip_confirmation_fields(args)));
    let mut h = Sha256::new();
    for part in [
        identity.as_bytes(),
        tool.as_bytes(),
        canon.to_string().as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Digests are not secret, but compare without an early exit anyway.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ConfirmStore {
    pub fn new(ttl: Duration) -> ConfirmStore {
        ConfirmStore {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a token for exactly this caller, tool and arguments; `payload` comes back from
    /// [`ConfirmStore::redeem`].
    pub fn issue(
        &self,
        identity: &str,
        tool: &str,
        args: &Map<String, Value>,
        payload: Value,
    ) -> String {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = format!("fc_{}", hex::encode(bytes));
        let owner: [u8; 32] = Sha256::digest(identity.as_bytes()).into();
        let now = Instant::now();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, v| v.expires > now);
        let oldest_of = |p: &HashMap<String, Pending>, who: &[u8; 32]| {
            p.iter()
                .filter(|(_, v)| &v.owner == who)
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| k.clone())
        };
        let mine = p.values().filter(|v| v.owner == owner).count();
        let evict = if mine >= MAX_PENDING_PER_CALLER {
            oldest_of(&p, &owner)
        } else if p.len() >= MAX_PENDING {
            // Full with many callers: the one holding the most gives up its oldest.
            let mut per: HashMap<[u8; 32], usize> = HashMap::new();
            for v in p.values() {
                *per.entry(v.owner).or_default() += 1;
            }
            per.into_iter()
                .max_by_key(|(_, n)| *n)
                .and_then(|(who, _)| oldest_of(&p, &who))
        } else {
            None
        };
        if let Some(k) = evict {
            p.remove(&k);
        }
        p.insert(
            token.clone(),
            Pending {
                digest: digest(identity, tool, args),
                owner,
                expires: now + self.ttl,
                payload,
            },
        );
        token
    }

    /// Spends `token`: its payload only if it is outstanding, unexpired and was issued for
    /// exactly this caller, tool and arguments. Its owner's presentation removes it, whatever
    /// the arguments; another caller's is refused ([`ConfirmError::OtherCaller`]) and leaves
    /// it outstanding.
    pub fn redeem(
        &self,
        token: &str,
        identity: &str,
        tool: &str,
        args: &Map<String, Value>,
    ) -> Result<Value, ConfirmError> {
        let now = Instant::now();
        let owner: [u8; 32] = Sha256::digest(identity.as_bytes()).into();
        let entry = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match p.get(token) {
                None => None,
                Some(e) if e.expires <= now => {
                    p.remove(token);
                    return Err(ConfirmError::Unknown);
                }
                Some(e) if !ct_eq(&e.owner, &owner) => return Err(ConfirmError::OtherCaller),
                Some(_) => p.remove(token),
            }
        };
        let Some(entry) = entry else {
            return Err(ConfirmError::Unknown);
        };
        if ct_eq(&digest(identity, tool, args), &entry.digest) {
            Ok(entry.payload)
        } else {
            Err(ConfirmError::Mismatch)
        }
    }

    /// Outstanding (unexpired) confirmations.
    pub fn outstanding(&self) -> usize {
        let now = Instant::now();
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.values().filter(|v| v.expires > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn single_use_bound_to_args_and_caller() {
        let s = ConfirmStore::default();
        let a = args(json!({"agent": "x", "kind": "restart", "params": {"b": 1, "a": 2}}));
        let t = s.issue("alice", "command_queue", &a, json!(1));
        // Key order and the token field itself do not matter.
        let mut same = args(
            json!({"params": {"a": 2, "b": 1}, "kind": "restart", "agent": "x",
                                   "dry_run": false, "query": null}),
        );
        same.insert("confirmation_token".into(), json!(t));
        assert_eq!(s.redeem(&t, "alice", "command_queue", &same), Ok(json!(1)));
        assert_eq!(
            s.redeem(&t, "alice", "command_queue", &same),
            Err(ConfirmError::Unknown)
        );

        // Another caller is refused and does not spend it: alice can still confirm.
        let t = s.issue("alice", "command_queue", &a, json!(1));
        assert_eq!(
            s.redeem(&t, "bob", "command_queue", &a),
            Err(ConfirmError::OtherCaller)
        );
        assert_eq!(s.redeem(&t, "alice", "command_queue", &a), Ok(json!(1)));

        // Its owner's mismatching presentation spends it.
        let t = s.issue("alice", "command_queue", &a, json!(1));
        assert_eq!(
            s.redeem(&t, "alice", "command_queue", &args(json!({"kind": "x"}))),
            Err(ConfirmError::Mismatch)
        );
        assert_eq!(
            s.redeem(&t, "alice", "command_queue", &a),
            Err(ConfirmError::Unknown)
        );

        let t = s.issue("alice", "command_queue", &a, json!(1));
        let other = args(json!({"agent": "y", "kind": "restart", "params": {"b": 1, "a": 2}}));
        assert_eq!(
            s.redeem(&t, "alice", "command_queue", &other),
            Err(ConfirmError::Mismatch)
        );
        let t = s.issue("alice", "command_queue", &a, json!(1));
        assert_eq!(
            s.redeem(&t, "alice", "remote_config_push", &a),
            Err(ConfirmError::Mismatch)
        );
    }

    #[test]
    fn one_caller_cannot_evict_another() {
        let s = ConfirmStore::default();
        let a = args(json!({"kind": "restart"}));
        let bobs = s.issue("bob", "command_queue", &a, json!("bob"));
        let first = s.issue("alice", "command_queue", &a, json!(0));
        for i in 1..=MAX_PENDING_PER_CALLER {
            s.issue("alice", "command_queue", &a, json!(i));
        }
        // Alice's flood pushed out only her own oldest token.
        assert_eq!(s.outstanding(), MAX_PENDING_PER_CALLER + 1);
        assert_eq!(
            s.redeem(&first, "alice", "command_queue", &a),
            Err(ConfirmError::Unknown)
        );
        assert_eq!(
            s.redeem(&bobs, "bob", "command_queue", &a),
            Ok(json!("bob"))
        );
    }

    #[test]
    fn tokens_expire() {
        let s = ConfirmStore::new(Duration::from_millis(1));
        let a = args(json!({"kind": "restart"}));
        let t = s.issue("alice", "command_queue", &a, json!(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            s.redeem(&t, "alice", "command_queue", &a),
            Err(ConfirmError::Unknown)
        );
        assert_eq!(s.outstanding(), 0);
    }
}

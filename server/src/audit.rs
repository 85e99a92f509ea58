//! The tamper-evident audit hash chain: how a record's hash is computed, the digest a queuing
//! record carries of the command it queued (so what is delivered is what was audited), and
//! verification.
//!
//! This module knows no SQL. Stores call [`record_hash`] when they append (it is the single
//! source of truth for the scheme) and [`verify`] walks any [`Store`] through
//! [`Store::audit_chain`].

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use std::collections::{HashMap, HashSet};

use crate::model::{AuditRecord, Command, CommandFilter, CommandKind, Millis};
use crate::store::{Store, StoreError};

/// The `prev_hash` of the first record: 64 zeros (the hex width of a SHA-256).
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records fetched per round trip while verifying.
const PAGE: usize = 1000;

/// The hash of one audit record, chained to the previous record's hash.
///
/// Scheme (version 1), stable across releases because stored chains depend on it:
///
/// ```text
/// hash = lowercase_hex( SHA-256( prev_hash_ascii ‖ canonical_json ) )
/// canonical_json = JSON array, compact (no whitespace), of
///     [id, ts, actor, channel, operation, targets, params, outcome, ref_id]
/// ```
///
/// where `id`, `ts` are integers, `channel` is its lowercase name (`"rest"`, ...), `targets`
/// is the array of strings in stored order, `params` is the JSON value, `ref_id` is an
/// integer or `null`. Object keys at every depth are sorted by byte order; strings use
/// serde_json's escaping; numbers use serde_json's rendering. `prev_hash` and `hash` are
/// not part of the content. The canonical form is written by hand rather than trusting
/// `serde_json::to_string`, so enabling serde_json's `preserve_order` feature anywhere in
/// the dependency graph cannot change existing hashes.
pub fn record_hash(prev_hash: &str, r: &AuditRecord) -> String {
    let content = serde_json::json!([
        r.id,
        r.ts,
        r.actor,
        r.channel.as_str(),
        r.operation,
        r.targets,
        r.params,
        r.outcome,
        r.ref_id,
    ]);
    let mut canonical = String::new();
    write_canonical(&content, &mut canonical);
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

/// The key under which a `command.queue` or `batch.queue` record's params carry the digest of
/// what it queued ([`queued_digest`]). Records from before it existed have none: "legacy".
pub const DIGEST_KEY: &str = "digest";

/// The digest a queuing audit record carries of the command it queued, so that the chain, which
/// covers the record, also covers what is delivered (the commands table itself is not chained).
///
/// Scheme (version 1): `lowercase_hex(SHA-256(canonical_json))` of
/// `["command", id, kind, params]` for a command queued alone, and of
/// `["batch", batch_id, kind, params]` for a fan-out (one record for the whole batch), where
/// `params` are the command's stored parameters, except that a batch `new_instance_uid`
/// leaves out `new_uid` (the server draws one per agent; the operator gave none). The target
/// agent is not in the digest: it is in the record's `targets`, which the chain covers too.
pub fn queued_digest(cmd: &Command) -> String {
    let content = match cmd.batch_id {
        None => serde_json::json!(["command", cmd.id, cmd.kind.as_str(), cmd.params]),
        Some(batch) => {
            let mut params = cmd.params.clone();
            if cmd.kind == CommandKind::NewInstanceUid {
                if let Some(o) = params.as_object_mut() {
                    o.remove("new_uid");
                }
            }
            serde_json::json!(["batch", batch, cmd.kind.as_str(), params])
        }
    };
    let mut canonical = String::new();
    write_canonical(&content, &mut canonical);
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// What a stored command's queuing record says about it ([`provenance`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Kind, parameters and target are what the record queued.
    Verified,
    /// The record predates parameter digests: the command cannot be checked.
    Legacy,
    /// The command's agent is not the record's target; it may have been renamed since
    /// (a `new_instance_uid` moves pending commands), which the caller checks.
    OtherAgent,
    /// Not what was audited; the reason says how.
    Mismatch(String),
}

/// Error of a command that does not match its queuing record (delivery and `audit verify`).
pub const MISMATCH: &str = "parameters do not match the audited record";

/// Checks `cmd` against `rec`, the record its `audit_id` names (`None`: no such record).
pub fn provenance(cmd: &Command, rec: Option<&AuditRecord>, targets: &HashSet<&str>) -> Provenance {
    let Some(rec) = rec else {
        return Provenance::Mismatch(match cmd.audit_id {
            None => "it names no audit record that queued it".into(),
            Some(id) => format!("its queuing audit record {id} does not exist"),
        });
    };
    let (op, owner) = match cmd.batch_id {
        None => ("command.queue", cmd.id.to_string()),
        Some(b) => ("batch.queue", b.to_string()),
    };
    // A single command's record names the command; a batch's names the batch first.
    let owned = match cmd.batch_id {
        None => targets.contains(owner.as_str()),
        Some(_) => rec.targets.first().is_some_and(|t| *t == owner),
    };
    if rec.operation != op || !owned {
        return Provenance::Mismatch(format!("audit record {} did not queue it", rec.id));
    }
    let Some(digest) = rec.params.get(DIGEST_KEY).and_then(Value::as_str) else {
        return Provenance::Legacy;
    };
    if digest != queued_digest(cmd) {
        return Provenance::Mismatch(format!("{MISMATCH} {}", rec.id));
    }
    if !targets.contains(cmd.agent_uid.to_string().as_str()) {
        return Provenance::OtherAgent;
    }
    Provenance::Verified
}

/// A record's targets as a set (a batch's can hold 100k agents).
pub fn target_set(rec: &AuditRecord) -> HashSet<&str> {
    rec.targets.iter().map(String::as_str).collect()
}

/// Checks `cmds` against their queuing records, read in one go. Returns, per command in order,
/// its provenance; [`Provenance::OtherAgent`] is resolved here: it holds if the agent was
/// renamed from the record's target (its `previous_uid`), else it is a mismatch.
pub async fn check_commands(
    store: &dyn Store,
    cmds: &[Command],
) -> Result<Vec<Provenance>, StoreError> {
    let mut ids: Vec<i64> = cmds.iter().filter_map(|c| c.audit_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let recs: HashMap<i64, AuditRecord> = store
        .audit_records(&ids)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let sets: HashMap<i64, HashSet<&str>> =
        recs.iter().map(|(id, r)| (*id, target_set(r))).collect();
    let empty = HashSet::new();
    let mut out = Vec::with_capacity(cmds.len());
    for c in cmds {
        let rec = c.audit_id.and_then(|id| recs.get(&id));
        let targets = c.audit_id.and_then(|id| sets.get(&id)).unwrap_or(&empty);
        let mut p = provenance(c, rec, targets);
        if p == Provenance::OtherAgent {
            let prev = store
                .get_agent(c.agent_uid)
                .await?
                .and_then(|a| a.previous_uid);
            p = match prev {
                Some(u) if targets.contains(u.to_string().as_str()) => Provenance::Verified,
                _ => Provenance::Mismatch(format!(
                    "{MISMATCH} {}: agent {} is not its target",
                    c.audit_id.unwrap_or_default(),
                    c.agent_uid
                )),
            };
        }
        out.push(p);
    }
    Ok(out)
}

/// What checking every command against its queuing record found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandsChecked {
    /// Commands whose record carries a digest and matches.
    pub verified: u64,
    /// Commands queued before digests existed (unverifiable).
    pub legacy: u64,
}

/// Checks every stored command against the record that queued it; the oldest mismatch is the
/// break (its id is the queuing record's, or 0 when the command names none).
pub async fn verify_commands(store: &dyn Store) -> Result<CommandsChecked, VerifyError> {
    let mut found = CommandsChecked::default();
    let mut first: Option<ChainBreak> = None;
    let mut before = None;
    loop {
        let page = store
            .list_commands(&CommandFilter {
                before,
                limit: PAGE,
                ..Default::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        for (c, p) in page.iter().zip(check_commands(store, &page).await?) {
            match p {
                Provenance::Verified => found.verified += 1,
                Provenance::Legacy => found.legacy += 1,
                Provenance::OtherAgent | Provenance::Mismatch(_) => {
                    let why = match p {
                        Provenance::Mismatch(w) => w,
                        _ => MISMATCH.to_string(),
                    };
                    // Newest first: the last one seen is the oldest.
                    first = Some(ChainBreak {
                        id: c.audit_id.unwrap_or(0),
                        reason: format!(
                            "command {} ({} for agent {}): {why} (the commands table or the trail was edited)",
                            c.id,
                            c.kind.as_str(),
                            c.agent_uid
                        ),
                    });
                }
            }
        }
        if page.len() < PAGE {
            break;
        }
    }
    match first {
        Some(b) => Err(VerifyError::Broken(b)),
        None => Ok(found),
    }
}

/// Whether a command queued by a legacy record (no digest) at `queued_at` may still be
/// delivered at `now`: only while a command could legitimately still wait (`max_wait_ms`, the
/// longest TTL). Past that, a "legacy" command can only be one written into the table since.
pub fn legacy_still_deliverable(queued_at: Millis, now: Millis, max_wait_ms: Millis) -> bool {
    now - queued_at <= max_wait_ms
}

/// Compact JSON with object keys sorted at every depth.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {
            // Scalars have a single serde_json rendering; serialising a scalar cannot fail.
            out.push_str(&serde_json::to_string(v).unwrap_or_default());
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                write_canonical(val, out);
            }
            out.push('}');
        }
    }
}

/// The first record at which the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// Id of the first record that fails a check.
    pub id: i64,
    pub reason: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {}", self.id, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("audit chain broken at {0}")]
    Broken(ChainBreak),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The last record of a verified chain: id and hash. Kept outside the database (a log line,
/// a ticket, another system), it proves later that the trail up to it is still whole: a chain
/// cut off before it, or rewritten from any point before it, no longer contains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub id: i64,
    pub hash: String,
}

impl fmt::Display for ChainHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.id, self.hash)
    }
}

impl std::str::FromStr for ChainHead {
    type Err = String;
    /// `ID:HASH`, as [`ChainHead`]'s `Display` writes it.
    fn from_str(s: &str) -> Result<ChainHead, String> {
        let (id, hash) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("anchor {s:?} must be ID:HASH (as `audit verify` prints it)"))?;
        let id: i64 = id
            .parse()
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| format!("anchor id {id:?} is not a positive record id"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("anchor hash {hash:?} is not 64 hex digits"));
        }
        Ok(ChainHead {
            id,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// What [`verify`] found in an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub count: u64,
    /// The last record (`None` for an empty trail).
    pub head: Option<ChainHead>,
    /// Every stored command checked against the record that queued it.
    pub commands: CommandsChecked,
}

/// Walks the whole audit trail in id order and checks every link and every hash, and, given
/// an `anchor` (a head recorded earlier), that the chain still holds that record unchanged.
///
/// Returns the count and head, or the first broken record. A deleted record cannot be seen
/// directly; it shows up as the next surviving record failing to link to its predecessor,
/// and the reason then names the missing ids. Deleting the newest records leaves a chain
/// that links; only an anchor from before the deletion reveals it. Then every command is
/// checked against its queuing record ([`verify_commands`]), so an edit of the commands
/// table is a break too.
pub async fn verify(
    store: &dyn Store,
    anchor: Option<&ChainHead>,
) -> Result<Verified, VerifyError> {
    let mut checked: u64 = 0;
    let mut prev: Option<(i64, String)> = None;
    let mut after = 0i64;
    let mut anchor_seen = false;
    loop {
        let page = store.audit_chain(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let short = page.len() < PAGE;
        for r in &page {
            if let Some(reason) = check(prev.as_ref(), r) {
                return Err(VerifyError::Broken(ChainBreak { id: r.id, reason }));
            }
            if let Some(a) = anchor.filter(|a| a.id == r.id) {
                if a.hash != r.hash {
                    return Err(VerifyError::Broken(ChainBreak {
                        id: r.id,
                        reason: format!(
                            "hash differs from the anchor {a}: the trail was rewritten from here or earlier"
                        ),
                    }));
                }
                anchor_seen = true;
            }
            prev = Some((r.id, r.hash.clone()));
            checked += 1;
        }
        if short {
            break;
        }
    }
    if let Some(a) = anchor.filter(|_| !anchor_seen) {
        return Err(VerifyError::Broken(ChainBreak {
            id: a.id,
            reason: format!(
                "the anchor's record is missing (the chain ends at {}): records were deleted from the end",
                prev.as_ref().map_or_else(|| "nothing".to_string(), |(id, _)| format!("record {id}"))
            ),
        }));
    }
    let commands = verify_commands(store).await?;
    Ok(Verified {
        count: checked,
        head: prev.map(|(id, hash)| ChainHead { id, hash }),
        commands,
    })
}

/// Why `r` does not follow `prev` (id and hash of the previous record), if it does not.
fn check(prev: Option<&(i64, String)>, r: &AuditRecord) -> Option<String> {
    match prev {
        None => {
            if r.prev_hash != GENESIS {
                return Some(if r.id > 1 {
                    format!(
                        "prev_hash is not the genesis hash; records 1..={} are missing (deleted?)",
                        r.id - 1
                    )
                } else {
                    "prev_hash is not the genesis hash".to_string()
                });
            }
        }
        Some((prev_id, prev_hash)) => {
            if r.id <= *prev_id {
                return Some(format!(
                    "id is not greater than the previous record's id {prev_id}"
                ));
            }
            if r.prev_hash != *prev_hash {
                return Some(if r.id > prev_id + 1 {
                    let missing = if r.id - 1 == prev_id + 1 {
                        format!("record {} is", prev_id + 1)
                    } else {
                        format!("records {}..={} are", prev_id + 1, r.id - 1)
                    };
                    format!(
                        "prev_hash does not link to record {prev_id}; {missing} missing (deleted?)"
                    )
                } else {
                    format!("prev_hash does not link to record {prev_id}")
                });
            }
        }
    }
    if record_hash(&r.prev_hash, r) != r.hash {
        return Some("content does not match its hash".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Caller, Channel, NewAudit};
    use crate::store::sqlite::SqliteStore;

    fn rec(params: Value) -> AuditRecord {
        AuditRecord {
            id: 7,
            ts: 1_700_000_000_000,
            actor: "alice".into(),
            channel: Channel::Rest,
            operation: "command.restart".into(),
            targets: vec!["b".into(), "a".into()],
            params,
            outcome: "ok".into(),
            ref_id: Some(3),
            prev_hash: GENESIS.into(),
            hash: String::new(),
        }
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_depth() {
        let mut out = String::new();
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), Value::from(1));
        inner.insert("a".into(), Value::from("x\"y"));
        let mut outer = serde_json::Map::new();
        outer.insert("k".into(), Value::Object(inner));
        outer.insert("b".into(), serde_json::json!([null, true, 1.5]));
        write_canonical(&Value::Object(outer), &mut out);
        assert_eq!(out, r#"{"b":[null,true,1.5],"k":{"a":"x\"y","z":1}}"#);
    }

    #[test]
    fn hash_is_deterministic_and_covers_every_field() {
        let base = rec(serde_json::json!({"delay": 5, "why": "upgrade"}));
        let h = record_hash(GENESIS, &base);
        assert_eq!(h.len(), 64);
        assert_eq!(h, record_hash(GENESIS, &base.clone()));
        // prev_hash and hash are links, not content: changing `hash` changes nothing.
        let mut same = base.clone();
        same.hash = "whatever".into();
        assert_eq!(h, record_hash(GENESIS, &same));

        type Change = Box<dyn Fn(&mut AuditRecord)>;
        let variants: Vec<Change> = vec![
            Box::new(|r| r.id += 1),
            Box::new(|r| r.ts += 1),
            Box::new(|r| r.actor.push('x')),
            Box::new(|r| r.channel = Channel::Cli),
            Box::new(|r| r.operation.push('x')),
            Box::new(|r| r.targets.reverse()),
            Box::new(|r| r.params = serde_json::json!({"delay": 6, "why": "upgrade"})),
            Box::new(|r| r.outcome = "error".into()),
            Box::new(|r| r.ref_id = None),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(record_hash(GENESIS, &r), h, "variant {i} not covered");
        }
        assert_ne!(record_hash(&"1".repeat(64), &base), h);
    }

    #[tokio::test]
    async fn verify_empty_and_intact_chains() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let empty = verify(&store, None).await.unwrap();
        assert_eq!((empty.count, empty.head), (0, None));
        let caller = Caller::system();
        for i in 0..5 {
            let mut a = NewAudit::new(&caller, "test.op");
            // Floats must survive the trip through the database bit-exactly for the hash.
            a.params = serde_json::json!({"i": i, "f": 0.1 + f64::from(i) / 3.0, "big": 1e300});
            a.targets = vec![format!("agent-{i}")];
            store.append_audit(a).await.unwrap();
        }
        let v = verify(&store, None).await.unwrap();
        assert_eq!(v.count, 5);
        let head = v.head.expect("a head");
        assert_eq!(head.id, 5);
        // The head, printed and parsed back, anchors a later verification.
        let anchor: ChainHead = head.to_string().parse().unwrap();
        assert_eq!(anchor, head);
        store
            .append_audit(NewAudit::new(&caller, "test.later"))
            .await
            .unwrap();
        assert_eq!(verify(&store, Some(&anchor)).await.unwrap().count, 6);
        store.close().await;
    }

    #[tokio::test]
    async fn an_anchor_reveals_records_deleted_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let caller = Caller::system();
        for _ in 0..4 {
            store
                .append_audit(NewAudit::new(&caller, "test.op"))
                .await
                .unwrap();
        }
        let anchor = verify(&store, None).await.unwrap().head.unwrap();
        // Cutting off the newest records leaves a chain that links…
        sqlx::query("DELETE FROM audit WHERE id >= 3")
            .execute(store.pool())
            .await
            .unwrap();
        assert_eq!(verify(&store, None).await.unwrap().count, 2);
        // …but not one that holds the anchor.
        match verify(&store, Some(&anchor)).await {
            Err(VerifyError::Broken(b)) => {
                assert_eq!(b.id, 4);
                assert!(b.reason.contains("deleted from the end"), "{}", b.reason);
            }
            other => panic!("expected a break, got {other:?}"),
        }
        // A rewritten anchor record is named too.
        let wrong = ChainHead {
            id: 2,
            hash: "0".repeat(64),
        };
        match verify(&store, Some(&wrong)).await {
            Err(VerifyError::Broken(b)) => assert_eq!(b.id, 2),
            other => panic!("expected a break, got {other:?}"),
        }
        for bad in ["", "7", "x:abc", "0:ab", &format!("3:{}", "g".repeat(64))] {
            assert!(bad.parse::<ChainHead>().is_err(), "{bad:?}");
        }
        store.close().await;
    }

    #[tokio::test]
    async fn verify_pages_through_long_chains() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let caller = Caller::system();
        for _ in 0..(PAGE + 5) {
            store
                .append_audit(NewAudit::new(&caller, "test.op"))
                .await
                .unwrap();
        }
        assert_eq!(verify(&store, None).await.unwrap().count, (PAGE + 5) as u64);
        // A break on the second page is still found.
        sqlx::query("UPDATE audit SET actor = 'mallory' WHERE id = ?")
            .bind((PAGE + 2) as i64)
            .execute(store.pool())
            .await
            .unwrap();
        match verify(&store, None).await {
            Err(VerifyError::Broken(b)) => assert_eq!(b.id, (PAGE + 2) as i64),
            other => panic!("expected a break, got {other:?}"),
        }
        store.close().await;
    }

    #[test]
    fn the_queued_digest_covers_id_kind_and_params_and_legacy_is_bounded() {
        let now = 1_700_000_000_000;
        let cmd = Command {
            id: uuid::Uuid::now_v7(),
            agent_uid: uuid::Uuid::now_v7(),
            batch_id: None,
            kind: CommandKind::Chatops,
            params: serde_json::json!({"tag": "flush", "attributes": {"a": 1}}),
            status: crate::model::CommandStatus::Queued,
            created_at: now,
            sent_at: None,
            finished_at: None,
            expires_at: now + 1,
            result: None,
            error: None,
            actor: "alice".into(),
            channel: Channel::Rest,
            audit_id: Some(7),
        };
        let d = queued_digest(&cmd);
        type Change = Box<dyn Fn(&mut Command)>;
        let variants: Vec<Change> = vec![
            Box::new(|c| c.id = uuid::Uuid::now_v7()),
            Box::new(|c| c.kind = CommandKind::Custom),
            Box::new(|c| c.params["tag"] = "drop".into()),
            Box::new(|c| c.params["attributes"]["a"] = 2.into()),
            Box::new(|c| c.batch_id = Some(uuid::Uuid::nil())),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut c = cmd.clone();
            change(&mut c);
            assert_ne!(queued_digest(&c), d, "variant {i} not covered");
        }
        // A batch's commands share one digest whatever their agent and id, and a batch
        // new_instance_uid's per-agent uid is left out (the server drew it).
        let mut b = cmd.clone();
        b.batch_id = Some(uuid::Uuid::nil());
        b.kind = CommandKind::NewInstanceUid;
        b.params = serde_json::json!({"new_uid": "x"});
        let mut other = b.clone();
        other.id = uuid::Uuid::now_v7();
        other.agent_uid = uuid::Uuid::now_v7();
        other.params = serde_json::json!({"new_uid": "y"});
        assert_eq!(queued_digest(&b), queued_digest(&other));

        // Against a record: its digest verifies; no digest is legacy; another record is not it.
        let mut r = rec(serde_json::json!({DIGEST_KEY: d}));
        r.id = 7;
        r.operation = "command.queue".into();
        r.targets = vec![cmd.agent_uid.to_string(), cmd.id.to_string()];
        assert_eq!(
            provenance(&cmd, Some(&r), &target_set(&r)),
            Provenance::Verified
        );
        let mut legacy = r.clone();
        legacy.params = serde_json::json!({"kind": "chatops"});
        assert_eq!(
            provenance(&cmd, Some(&legacy), &target_set(&legacy)),
            Provenance::Legacy
        );
        let mut moved = cmd.clone();
        moved.agent_uid = uuid::Uuid::now_v7();
        assert_eq!(
            provenance(&moved, Some(&r), &target_set(&r)),
            Provenance::OtherAgent
        );
        let mut alien = r.clone();
        alien.targets = vec![cmd.agent_uid.to_string()];
        assert!(matches!(
            provenance(&cmd, Some(&alien), &target_set(&alien)),
            Provenance::Mismatch(_)
        ));
        assert!(matches!(
            provenance(&cmd, None, &HashSet::new()),
            Provenance::Mismatch(_)
        ));
        assert!(legacy_still_deliverable(now, now + 1000, 1000));
        assert!(!legacy_still_deliverable(now, now + 1001, 1000));
    }

    #[test]
    fn reasons_name_missing_records() {
        let mut r = rec(Value::Null);
        r.id = 5;
        r.prev_hash = "f".repeat(64);
        let prev = (3, "e".repeat(64));
        let reason = check(Some(&prev), &r).unwrap();
        assert!(reason.contains("record 3") && reason.contains("record 4 is missing"));
        r.id = 9;
        let reason = check(Some(&prev), &r).unwrap();
        assert!(reason.contains("records 4..=8 are missing"), "{reason}");
        r.id = 3;
        let reason = check(Some(&prev), &r).unwrap();
        assert!(reason.contains("not greater"), "{reason}");
        let reason = check(None, &r).unwrap();
        assert!(
            reason.contains("genesis") && reason.contains("1..=2"),
            "{reason}"
        );
    }
}

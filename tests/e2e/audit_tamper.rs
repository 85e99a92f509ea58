//! The audit trail is tamper-evident: after real state-changing calls through the REST API,
//! `flotilla audit verify` passes (exit 0), and editing the SQLite file behind the server's
//! back — changing a middle record, deleting one, or forging one with a correctly recomputed
//! hash — makes it fail (exit 1) naming the first record that no longer fits. The database is
//! edited with Python's `sqlite3` module; the hash scheme is recomputed independently in Python
//! from its documentation in `server/src/audit.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_e2e::{audit_verify, audit_verify_anchored, python, sqlite, Home, HttpAgent, Server};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(15);

/// The documented hash of one record (scheme version 1): SHA-256 of `prev_hash` followed by
/// the compact, key-sorted JSON array `[id, ts, actor, channel, operation, targets, params,
/// outcome, ref_id]`. `rehash(row)` and `canon(row)` take a row selected in that column order
/// plus `prev_hash`.
const HASH_PY: &str = r#"
import hashlib, json, sqlite3, sys
COLS = "id, ts, actor, channel, operation, targets, params, outcome, ref_id, prev_hash"
def rehash(row):
    rid, ts, actor, channel, op, targets, params, outcome, ref_id, prev = row
    content = [rid, ts, actor, channel, op, json.loads(targets), json.loads(params), outcome, ref_id]
    canonical = json.dumps(content, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256((prev + canonical).encode("utf-8")).hexdigest()
"#;

/// A server's data dir after some audited operator work, stopped gracefully.
struct Trail {
    home: Home,
    /// Audit ids, ascending.
    ids: Vec<i64>,
}

async fn make_trail() -> Trail {
    let home = Home::new();
    let mut server = Server::start(&home).await;
    let mut agent = HttpAgent::fluent_like(&server.opamp_url(), "tamper-target");
    let uid = agent.uid_str();
    agent.send(agent.full_state()).await;
    server
        .wait_agent(&uid, "registered", T, |a| a["connected"] == true)
        .await;

    for (k, v) in [("env", "prod"), ("team", "observability"), ("tier", "edge")] {
        server
            .put(
                &format!("/api/v1/agents/{uid}/labels/{k}"),
                &json!({ "value": v }),
            )
            .await
            .expect(200, "PUT label");
    }
    let r = server
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/agents/{uid}/labels/tier"),
            Some(&home.tokens.operator),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "DELETE label: {}", r.body);
    server.queue(&uid, "restart", json!({})).await;
    let chat = server
        .queue(&uid, "chatops", json!({"tag": "rotate-logs"}))
        .await;
    let r = server
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/commands/{chat}"),
            Some(&home.tokens.operator),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "cancel: {}", r.body);

    let api_records = server.audit_records().await;
    assert!(
        api_records.len() >= 7,
        "3 label sets, 1 removal, 2 queues, 1 cancel are audited: {api_records:?}"
    );
    let status = server.terminate(T).await;
    assert_eq!(status.code(), Some(0), "graceful stop: {}", server.stderr());

    let rows = sqlite(&home.db(), "SELECT id FROM audit ORDER BY id");
    let ids: Vec<i64> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        api_records.keys().copied().collect::<Vec<_>>(),
        "the database holds exactly the records the API showed"
    );
    Trail { home, ids }
}

impl Trail {
    /// A copy of the database in a fresh data dir (inside the home), to tamper with.
    fn copy(&self, name: &str) -> PathBuf {
        let dir = self.home.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["flotilla.db", "flotilla.db-wal", "flotilla.db-shm"] {
            let src = self.home.data_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, dir.join(f)).unwrap();
            }
        }
        dir
    }

    /// The record in the middle of the chain, with its neighbours.
    fn middle(&self) -> (i64, i64, i64) {
        let i = self.ids.len() / 2;
        (self.ids[i - 1], self.ids[i], self.ids[i + 1])
    }
}

fn db(dir: &Path) -> String {
    dir.join("flotilla.db").to_str().unwrap().to_string()
}

#[tokio::test]
async fn audit_tampering_is_detected_and_located() {
    let trail = make_trail().await;
    let n = audit_verify(&trail.home.data_dir).await.intact_count();
    assert_eq!(n, trail.ids.len() as u64, "every record is verified");
    let (before, mid, after) = trail.middle();

    // 0. The documented scheme, recomputed independently, matches every stored hash; so the
    //    forgery below is a correct one.
    let check = python(
        &format!(
            "{HASH_PY}\nc = sqlite3.connect(sys.argv[1])\n\
             rows = c.execute(f'SELECT {{COLS}}, hash FROM audit ORDER BY id').fetchall()\n\
             print(json.dumps([[r[0], rehash(r[:10]) == r[10]] for r in rows]))"
        ),
        &[&db(&trail.home.data_dir)],
    );
    for r in check.as_array().unwrap() {
        assert_eq!(r[1], true, "record {} does not hash as documented", r[0]);
    }

    // 1. A middle record's outcome is changed: that record is named.
    let dir = trail.copy("updated");
    let res = sqlite(
        &dir.join("flotilla.db"),
        &format!("UPDATE audit SET outcome = 'denied' WHERE id = {mid}"),
    );
    assert_eq!(res["changes"], 1);
    let (id, reason) = audit_verify(&dir).await.broken_at();
    assert_eq!(id, mid, "the edited record is named ({reason})");
    assert!(reason.contains("does not match its hash"), "{reason}");

    // 2. A middle record is deleted: the next surviving record is named, and the reason says
    //    which one is missing.
    let dir = trail.copy("deleted");
    let res = sqlite(
        &dir.join("flotilla.db"),
        &format!("DELETE FROM audit WHERE id = {mid}"),
    );
    assert!(res["changes"].as_u64().unwrap() >= 1, "{res}");
    let (id, reason) = audit_verify(&dir).await.broken_at();
    assert_eq!(
        id, after,
        "the record after the deleted one is named ({reason})"
    );
    assert!(
        reason.contains(&format!("record {mid} is missing"))
            && reason.contains(&format!("link to record {before}")),
        "{reason}"
    );

    // 3. A forger changes a middle record and recomputes its hash: that record now checks out
    //    alone, but the next one no longer links to it.
    let dir = trail.copy("forged");
    let forged = python(
        &format!(
            "{HASH_PY}\nc = sqlite3.connect(sys.argv[1])\nrid = int(sys.argv[2])\n\
             c.execute('UPDATE audit SET actor = ? WHERE id = ?', ('someone-else', rid))\n\
             row = c.execute(f'SELECT {{COLS}} FROM audit WHERE id = ?', (rid,)).fetchone()\n\
             h = rehash(row)\n\
             c.execute('UPDATE audit SET hash = ? WHERE id = ?', (h, rid))\n\
             c.commit()\nprint(json.dumps(h))"
        ),
        &[&db(&dir), &mid.to_string()],
    );
    assert!(forged.as_str().is_some_and(|h| h.len() == 64), "{forged}");
    let (id, reason) = audit_verify(&dir).await.broken_at();
    assert_eq!(
        id, after,
        "the record after the forged one is named ({reason})"
    );
    assert!(
        reason.contains(&format!("prev_hash does not link to record {mid}")),
        "{reason}"
    );

    // 4. The newest records are deleted: what is left still links, so only the head printed
    //    by an earlier verification (kept outside the database) reveals it.
    let intact = audit_verify(&trail.home.data_dir).await;
    let anchor = intact.head().expect("a head line");
    let last = *trail.ids.last().unwrap();
    assert!(anchor.starts_with(&format!("{last}:")), "{anchor}");
    // (Only the newest record, the cancel: a command's queuing record cut off is caught
    // without an anchor, below.)
    let dir = trail.copy("truncated");
    let res = sqlite(
        &dir.join("flotilla.db"),
        &format!("DELETE FROM audit WHERE id >= {last}"),
    );
    assert!(res["changes"].as_u64().unwrap() >= 1, "{res}");
    assert_eq!(
        audit_verify(&dir).await.intact_count(),
        trail.ids.len() as u64 - 1
    );
    let (id, reason) = audit_verify_anchored(&dir, &anchor).await.broken_at();
    assert_eq!(id, last, "{reason}");
    assert!(reason.contains("deleted from the end"), "{reason}");

    // 5. Cutting off more, the records that queued the commands go too: the commands still in
    //    the database name records that no longer exist, so even without an anchor it fails.
    let dir = trail.copy("truncated-more");
    let res = sqlite(
        &dir.join("flotilla.db"),
        &format!("DELETE FROM audit WHERE id >= {after}"),
    );
    assert!(res["changes"].as_u64().unwrap() >= 1, "{res}");
    let (_, reason) = audit_verify(&dir).await.broken_at();
    assert!(
        reason.contains("does not exist") && reason.contains("queuing audit record"),
        "{reason}"
    );
    // The untouched trail holds its own anchor.
    assert_eq!(
        audit_verify_anchored(&trail.home.data_dir, &anchor)
            .await
            .intact_count(),
        trail.ids.len() as u64
    );
}

/// `verify` also works on the live database of a running server and names the edited record;
/// the API keeps serving the trail as stored (it is evidence, not a gate).
#[tokio::test]
async fn tampering_is_detected_while_the_server_runs() {
    let trail = make_trail().await;
    let (_, mid, _) = trail.middle();
    let server = Server::start(&trail.home).await;
    let res = sqlite(
        &trail.home.db(),
        &format!(
            "UPDATE audit SET params = '{{\"key\":\"env\",\"value\":\"dev\"}}' WHERE id = {mid}"
        ),
    );
    assert_eq!(res["changes"], 1);
    let (id, reason) = audit_verify(&trail.home.data_dir).await.broken_at();
    assert_eq!(id, mid, "{reason}");
    let records = server.audit_records().await;
    assert_eq!(
        records[&mid]["params"],
        json!({"key": "env", "value": "dev"})
    );
    let _: &Value = &records[&mid];
}

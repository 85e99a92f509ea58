//! The store test suite, run against every backend: SQLite in a temporary directory and
//! PostgreSQL in a fresh schema of the machine's server (`FLOTILLA_TEST_PG_URL`, default
//! `postgres://root@127.0.0.1:5432/test`). A PostgreSQL that cannot be reached fails the
//! PostgreSQL half loudly; nothing is skipped.

use std::sync::Arc;

use uuid::Uuid;

use flotilla_chat::core::planner::ThreadContext;
use flotilla_chat::core::state::{ChatState, Mute, PendingConfirmation, Subscription, ThreadState};
use flotilla_chat::{ChatUser, ConversationRef, Platform};
use serde_json::json;

use super::chat::StoreChatState;
use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::*;
use crate::model::{
    Agent, AuditFilter, AuditRecord, Batch, Channel, Command, CommandFilter, CommandKind,
    CommandStatus, DesiredConfig, Millis, NewAudit, Transport,
};

use flotilla_e2e::pg::PgSchema;

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(PgSchema),
}

/// One backend's store under test, with raw SQL access for tamper tests.
pub(crate) struct Db {
    pub store: Arc<dyn Store>,
    raw: Raw,
    place: Arc<Place>,
}

enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        Db::open(Arc::new(Place::Sqlite(dir))).await
    }

    async fn postgres() -> Db {
        Db::open(Arc::new(Place::Postgres(PgSchema::create().await))).await
    }

    async fn open(place: Arc<Place>) -> Db {
        let (store, raw): (Arc<dyn Store>, Raw) = match &*place {
            Place::Sqlite(dir) => {
                let s = SqliteStore::open(dir.path()).await.unwrap();
                let raw = Raw::Sqlite(s.pool().clone());
                (Arc::new(s), raw)
            }
            Place::Postgres(schema) => {
                let s = PgStore::open(&schema.url, None).await.unwrap();
                let raw = Raw::Postgres(s.pool().clone());
                (Arc::new(s), raw)
            }
        };
        Db { store, raw, place }
    }

    /// Closes this store and opens the same database again.
    async fn reopen(&self) -> Db {
        self.store.close().await;
        Db::open(self.place.clone()).await
    }

    /// A second, independent store (its own pool) on the same database, as another replica
    /// would open it.
    async fn another(&self) -> Db {
        Db::open(self.place.clone()).await
    }

    /// Runs `sql` (no parameters) behind the store's back; rows affected.
    async fn exec(&self, sql: &str) -> u64 {
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query(sql).execute(p).await.unwrap().rows_affected(),
            Raw::Postgres(p) => sqlx::query(sql).execute(p).await.unwrap().rows_affected(),
        }
    }

    /// One integer from `sql`.
    async fn scalar(&self, sql: &str) -> i64 {
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
            Raw::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        }
    }
}

/// Each listed `async fn(&Db)` becomes one test per backend: `sqlite::name` and
/// `postgres::name`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Db::postgres().await).await;
                }
            )*
        }
    };
}

on_every_backend!(
    agent_round_trips_every_field,
    list_agents_pages_in_uid_order,
    brief_listing_is_the_record_without_config_bodies,
    a_corrupt_record_fails_a_brief_page_loudly,
    touches_span_several_statement_chunks,
    touch_and_connection_state,
    rename_moves_record_and_pending_commands,
    reregistrations_are_found_by_identity_and_linked_once,
    enqueue_links_commands_batch_and_audit,
    a_claim_wins_exactly_once_and_answers_with_the_rows,
    a_claim_never_takes_a_command_newer_than_itself,
    unclaim_restores_a_queued_record_once,
    finish_command_is_compare_and_set,
    expiry_listing_and_counts,
    labels_are_set_and_audited_together,
    audit_filters,
    verify_accepts_intact_chain,
    verify_detects_updated_record,
    verify_detects_deleted_record,
    data_survives_close_and_reopen,
    chat_confirmations_threads_and_deliveries_survive_a_restart,
    chat_subscriptions_and_mutes_are_kept_removed_by_channel_and_audited,
    audit_appends_from_two_stores_form_one_chain,
    concurrent_claims_from_two_stores_deliver_each_command_once,
    the_agent_record_names_the_replica_holding_it,
);

use std::collections::BTreeMap;

use crate::audit::{self, verify, VerifyError};
use crate::model::{Caller, ConfigFile, Health, RemoteConfigState, Role, SkippedTarget};

fn alice() -> Caller {
    Caller {
        actor: "alice".into(),
        channel: Channel::Rest,
        role: Role::Operator,
    }
}

fn full_agent() -> Agent {
    let mut components = BTreeMap::new();
    components.insert(
        "pipeline:in".to_string(),
        Health {
            healthy: false,
            last_error: "boom".into(),
            status_time_unix_nano: u64::MAX,
            ..Health::default()
        },
    );
    let mut files = BTreeMap::new();
    files.insert(
        "fluent-bit.conf".to_string(),
        ConfigFile {
            content_type: "text/plain".into(),
            body: "[INPUT]\n  Name cpu\n".into(),
            encoding: None,
        },
    );
    files.insert(
        "blob".to_string(),
        ConfigFile {
            content_type: "application/octet-stream".into(),
            body: "AAEC".into(),
            encoding: Some("base64".into()),
        },
    );
    Agent {
        uid: Uuid::now_v7(),
        identifying: vec![
            ("service.name".into(), "fluent-bit".into()),
            ("host.name".into(), "web-1".into()),
        ],
        non_identifying: vec![("os.type".into(), "linux".into())],
        capabilities: u64::MAX,
        custom_capabilities: vec!["io.fluent.chatops".into()],
        health: Some(Health {
            healthy: true,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            last_error: String::new(),
            status: "running".into(),
            status_time_unix_nano: 42,
            components,
            attributes: [("k".to_string(), "v".to_string())].into(),
        }),
        effective_config: Some(files.clone()),
        remote_config_status: Some(RemoteConfigState {
            hash: "ab".repeat(32),
            status: "failed".into(),
            error: "bad config".into(),
        }),
        desired_config: Some(DesiredConfig {
            hash: "cd".repeat(32),
            files,
            command_id: Some(Uuid::now_v7()),
        }),
        labels: [("env".to_string(), "prod".to_string())].into(),
        transport: Some(Transport::Websocket),
        remote_addr: Some("10.0.0.1:5555".into()),
        first_seen: 1000,
        last_seen: 2000,
        connected: true,
        sequence_num: u64::MAX,
        heartbeat_interval_s: 30,
        previous_uid: Some(Uuid::now_v7()),
        replaces: None,
        replaced_by: None,
        departed: true,
        client_cert: Some(crate::tls::PeerCert {
            identity: "agent-7".into(),
            subject_cn: Some("agent-7".into()),
            sans: vec!["web-7.example".into(), "spiffe://example/agent/7".into()],
            sha256: "ef".repeat(32),
        }),
        replica: None,
    }
}

fn cmd(agent: Uuid, created_at: Millis, expires_at: Millis) -> Command {
    Command {
        id: Uuid::now_v7(),
        agent_uid: agent,
        batch_id: None,
        kind: CommandKind::Restart,
        params: serde_json::json!({"reason": "test"}),
        status: CommandStatus::Queued,
        created_at,
        sent_at: None,
        finished_at: None,
        expires_at,
        result: None,
        error: None,
        actor: "alice".into(),
        channel: Channel::Rest,
        audit_id: None,
    }
}

/// Marks one given command sent, as a claim of it would (claims pick the oldest).
async fn mark_sent(db: &Db, id: Uuid, at: Millis) -> bool {
    db.exec(&format!(
        "UPDATE commands SET status = 'sent', sent_at = {at} WHERE id = '{id}' AND status = 'queued'"
    ))
    .await
        == 1
}

fn op(operation: &str, targets: &[Uuid]) -> NewAudit {
    let mut a = NewAudit::new(&alice(), operation);
    a.targets = targets.iter().map(|t| t.to_string()).collect();
    a
}

fn finish(to: CommandStatus) -> Finish {
    Finish {
        to,
        result: Some(serde_json::json!({"exit": 0})),
        error: None,
        at: 5000,
    }
}

async fn agent_round_trips_every_field(db: &Db) {
    let s = &db.store;
    let a = full_agent();
    s.put_agent(&a).await.unwrap();
    assert_eq!(s.get_agent(a.uid).await.unwrap(), Some(a.clone()));
    // An update rewrites what the agent reports but keeps the server-owned fields
    // (labels, desired config), the first sighting and the known previous uid.
    let mut b = Agent::new(a.uid, 7, 60);
    b.sequence_num = (i64::MAX as u64) + 1;
    s.put_agent(&b).await.unwrap();
    let mut expect = b.clone();
    expect.labels = a.labels.clone();
    expect.desired_config = a.desired_config.clone();
    expect.first_seen = 7;
    expect.previous_uid = a.previous_uid;
    assert_eq!(s.get_agent(a.uid).await.unwrap(), Some(expect));
    assert_eq!(s.list_agents(None, 10).await.unwrap().len(), 1);

    s.set_desired_config(a.uid, None).await.unwrap();
    assert_eq!(
        s.get_agent(a.uid).await.unwrap().unwrap().desired_config,
        None
    );
    s.set_desired_config(a.uid, a.desired_config.as_ref())
        .await
        .unwrap();
    assert_eq!(
        s.get_agent(a.uid).await.unwrap().unwrap().desired_config,
        a.desired_config
    );
    assert_eq!(s.get_agent(Uuid::now_v7()).await.unwrap(), None);
}

async fn list_agents_pages_in_uid_order(db: &Db) {
    let s = &db.store;
    let mut uids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
    for u in &uids {
        s.put_agent(&Agent::new(*u, 1, 30)).await.unwrap();
    }
    uids.sort();
    // The brief listing, built as one JSON array per page, must cut the same pages.
    for brief in [false, true] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = if brief {
                s.list_agents_brief(after, 3).await.unwrap()
            } else {
                s.list_agents(after, 3).await.unwrap()
            };
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 3);
            after = page.last().map(|a| a.uid);
            seen.extend(page.into_iter().map(|a| a.uid));
        }
        assert_eq!(seen, uids, "brief: {brief}");
    }
}

async fn brief_listing_is_the_record_without_config_bodies(db: &Db) {
    let s = &db.store;
    let a = full_agent();
    s.put_agent(&a).await.unwrap();
    let brief = s.list_agents_brief(None, 10).await.unwrap();
    let mut expect = a.clone();
    expect.effective_config = None;
    expect.desired_config = None;
    // Listings do not show certificates; the agent's own record does.
    expect.client_cert = None;
    assert_eq!(brief, vec![expect]);
    assert_eq!(s.list_agents(None, 10).await.unwrap(), vec![a]);
}

async fn a_corrupt_record_fails_a_brief_page_loudly(db: &Db) {
    let s = &db.store;
    let mut uids = Vec::new();
    for _ in 0..3 {
        let a = Agent::new(Uuid::now_v7(), 1, 30);
        s.put_agent(&a).await.unwrap();
        uids.push(a.uid);
    }
    db.exec(&format!(
        "UPDATE agents SET labels = '{{not json' WHERE uid = '{}'",
        uids[1]
    ))
    .await;
    let err = s.list_agents_brief(None, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

async fn touches_span_several_statement_chunks(db: &Db) {
    let s = &db.store;
    let agents: Vec<Agent> = (0..4100)
        .map(|_| Agent::new(Uuid::now_v7(), 100, 30))
        .collect();
    for a in &agents {
        s.put_agent(a).await.unwrap();
    }
    let touches: Vec<Touch> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| Touch {
            uid: a.uid,
            last_seen: 1_000 + i as i64,
            sequence_num: i as u64 + 7,
            heartbeat_interval_s: None,
        })
        .collect();
    s.touch_agents(&touches).await.unwrap();
    for i in [0usize, 1999, 2000, 4099] {
        let got = s.get_agent(agents[i].uid).await.unwrap().unwrap();
        assert_eq!(
            (got.last_seen, got.sequence_num),
            (1_000 + i as i64, i as u64 + 7)
        );
    }
}

async fn touch_and_connection_state(db: &Db) {
    let s = &db.store;
    let a = Agent::new(Uuid::now_v7(), 100, 30);
    let b = Agent::new(Uuid::now_v7(), 100, 30);
    s.put_agent(&a).await.unwrap();
    s.put_agent(&b).await.unwrap();
    s.touch_agents(&[
        Touch {
            uid: a.uid,
            last_seen: 500,
            sequence_num: u64::MAX,
            heartbeat_interval_s: None,
        },
        Touch {
            uid: b.uid,
            last_seen: 600,
            sequence_num: 9,
            heartbeat_interval_s: Some(7),
        },
        // Unknown agents are ignored, not an error.
        Touch {
            uid: Uuid::now_v7(),
            last_seen: 1,
            sequence_num: 1,
            heartbeat_interval_s: None,
        },
    ])
    .await
    .unwrap();
    let got = s.get_agent(a.uid).await.unwrap().unwrap();
    assert_eq!(
        (got.last_seen, got.sequence_num, got.heartbeat_interval_s),
        (500, u64::MAX, 30),
        "no learnt interval: the stored one stays"
    );
    let got = s.get_agent(b.uid).await.unwrap().unwrap();
    assert_eq!(
        (got.last_seen, got.sequence_num, got.heartbeat_interval_s),
        (600, 9, 7)
    );
    // A stale touch does not roll the record back.
    s.touch_agents(&[Touch {
        uid: b.uid,
        last_seen: 550,
        sequence_num: 8,
        heartbeat_interval_s: Some(99),
    }])
    .await
    .unwrap();
    let got = s.get_agent(b.uid).await.unwrap().unwrap();
    assert_eq!(
        (got.last_seen, got.sequence_num, got.heartbeat_interval_s),
        (600, 9, 7)
    );

    s.set_connected(
        a.uid,
        true,
        Some(Transport::Http),
        Some("1.2.3.4:1".into()),
        700,
    )
    .await
    .unwrap();
    let got = s.get_agent(a.uid).await.unwrap().unwrap();
    assert!(got.connected);
    assert_eq!(got.transport, Some(Transport::Http));
    assert_eq!(got.remote_addr.as_deref(), Some("1.2.3.4:1"));
    assert_eq!(got.last_seen, 700);
    s.set_connected(a.uid, false, None, None, 800)
        .await
        .unwrap();
    let got = s.get_agent(a.uid).await.unwrap().unwrap();
    assert!(!got.connected);
    assert_eq!(got.transport, Some(Transport::Http));
    assert_eq!(got.last_seen, 700);

    // A goodbye is undone by the next sign of life, and only by that.
    let mut gone = s.get_agent(a.uid).await.unwrap().unwrap();
    gone.departed = true;
    s.put_agent(&gone).await.unwrap();
    s.mark_all_disconnected(850).await.unwrap();
    assert!(s.get_agent(a.uid).await.unwrap().unwrap().departed);
    s.set_connected(a.uid, true, None, None, 900).await.unwrap();
    assert!(!s.get_agent(a.uid).await.unwrap().unwrap().departed);
    s.set_connected(b.uid, true, None, None, 900).await.unwrap();
    // The goodbye of a connection that last heard the agent before its newest message
    // (it is back on another one) is not written.
    s.set_connected(a.uid, false, None, None, 850)
        .await
        .unwrap();
    assert!(s.get_agent(a.uid).await.unwrap().unwrap().connected);
    assert_eq!(s.mark_all_disconnected(1000).await.unwrap(), 2);
    assert_eq!(s.mark_all_disconnected(1000).await.unwrap(), 0);
    for u in [a.uid, b.uid] {
        assert!(!s.get_agent(u).await.unwrap().unwrap().connected);
    }
}

async fn rename_moves_record_and_pending_commands(db: &Db) {
    let s = &db.store;
    let mut a = full_agent();
    a.previous_uid = None;
    s.put_agent(&a).await.unwrap();
    let new = Uuid::now_v7();
    // Another agent's record under the new uid is never overwritten: refused, both kept.
    let other_agent = Agent::new(Uuid::now_v7(), 1, 1);
    s.put_agent(&other_agent).await.unwrap();
    assert!(!s
        .rename_agent(a.uid, other_agent.uid, op("agent.rename", &[a.uid]))
        .await
        .unwrap());
    assert_eq!(
        s.get_agent(other_agent.uid).await.unwrap(),
        Some(other_agent.clone())
    );
    assert!(s.get_agent(a.uid).await.unwrap().is_some());
    let queued = cmd(a.uid, 10, 10_000);
    let sent = cmd(a.uid, 11, 10_000);
    let done = cmd(a.uid, 12, 10_000);
    let other = cmd(Uuid::now_v7(), 13, 10_000);
    s.enqueue(
        None,
        &[queued.clone(), sent.clone(), done.clone(), other.clone()],
        op("command.restart", &[a.uid]),
    )
    .await
    .unwrap();
    assert!(mark_sent(db, sent.id, 20).await);
    assert!(s
        .finish_command(
            done.id,
            &[CommandStatus::Queued],
            finish(CommandStatus::Succeeded),
            None
        )
        .await
        .unwrap()
        .is_some());

    let audit_before = s.audit_chain(0, 100).await.unwrap().len();
    assert!(s
        .rename_agent(a.uid, new, op("agent.rename", &[a.uid, new]))
        .await
        .unwrap());
    let chain = s.audit_chain(0, 100).await.unwrap();
    assert_eq!(chain.len(), audit_before + 1, "the rename is audited");
    assert_eq!(chain.last().unwrap().operation, "agent.rename");
    assert_eq!(s.get_agent(a.uid).await.unwrap(), None);
    let moved = s.get_agent(new).await.unwrap().unwrap();
    let mut expect = a.clone();
    expect.uid = new;
    expect.previous_uid = Some(a.uid);
    assert_eq!(moved, expect);
    assert_eq!(s.list_agents(None, 10).await.unwrap().len(), 2);

    let q: Vec<Uuid> = s
        .queued_for(new, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(q, vec![queued.id]);
    let q: Vec<Uuid> = s
        .sent_for(new)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(q, vec![sent.id]);
    assert!(s.queued_for(a.uid, 10).await.unwrap().is_empty());
    let d = s.get_command(done.id).await.unwrap().unwrap();
    assert_eq!(d.agent_uid, a.uid);
    assert_eq!(
        s.get_command(other.id).await.unwrap().unwrap().agent_uid,
        other.agent_uid
    );

    assert!(!s
        .rename_agent(Uuid::now_v7(), Uuid::now_v7(), op("agent.rename", &[]))
        .await
        .unwrap());
    assert!(s
        .rename_agent(new, new, op("agent.rename", &[]))
        .await
        .unwrap());
    assert!(s.get_agent(new).await.unwrap().is_some());
}

async fn reregistrations_are_found_by_identity_and_linked_once(db: &Db) {
    let s = &db.store;
    let mut old = Agent::new(Uuid::now_v7(), 1, 30);
    old.identifying = vec![("service.instance.id".into(), "node-7".into())];
    old.non_identifying = vec![("hostname".into(), "node-7".into())];
    old.connected = true;
    s.put_agent(&old).await.unwrap();
    let mut other_host = old.clone();
    other_host.uid = Uuid::now_v7();
    other_host.non_identifying = vec![("hostname".into(), "node-8".into())];
    s.put_agent(&other_host).await.unwrap();
    let mut new = old.clone();
    new.uid = Uuid::now_v7();
    new.last_seen = 2;
    s.put_agent(&new).await.unwrap();
    let key = new.identity_key().unwrap();
    assert_eq!(
        s.same_identity(&key, new.uid, 4).await.unwrap(),
        vec![old.uid]
    );
    assert!(s
        .link_reregistration(
            old.uid,
            new.uid,
            op("agent.reregistered", &[old.uid, new.uid])
        )
        .await
        .unwrap());
    let o = s.get_agent(old.uid).await.unwrap().unwrap();
    assert_eq!(
        (o.replaced_by, o.connected, o.departed),
        (Some(new.uid), false, true)
    );
    assert_eq!(
        s.get_agent(new.uid).await.unwrap().unwrap().replaces,
        Some(old.uid)
    );
    // Replaced records are not candidates again, and a second link is refused.
    assert!(s.same_identity(&key, new.uid, 4).await.unwrap().is_empty());
    assert!(!s
        .link_reregistration(old.uid, other_host.uid, op("agent.reregistered", &[]))
        .await
        .unwrap());
    // put_agent by a session holding an old copy does not undo the link.
    s.put_agent(&old).await.unwrap();
    assert_eq!(
        s.get_agent(old.uid).await.unwrap().unwrap().replaced_by,
        Some(new.uid)
    );
    // No identity without both attributes.
    assert_eq!(Agent::new(Uuid::now_v7(), 1, 30).identity_key(), None);
}

async fn enqueue_links_commands_batch_and_audit(db: &Db) {
    let s = &db.store;
    let agents = [Uuid::now_v7(), Uuid::now_v7()];
    let batch = Batch {
        id: Uuid::now_v7(),
        query: "type:fluentbit".into(),
        kind: CommandKind::Restart,
        params: serde_json::json!({"reason": "test"}),
        created_at: 10,
        actor: "alice".into(),
        channel: Channel::Rest,
        skipped: vec![SkippedTarget {
            agent_uid: Uuid::now_v7(),
            reason: "offline".into(),
        }],
    };
    let mut cmds: Vec<Command> = agents.iter().map(|a| cmd(*a, 10, 1000)).collect();
    for c in &mut cmds {
        c.batch_id = Some(batch.id);
    }
    let first = s.append_audit(op("login", &[])).await.unwrap();
    let rec = s
        .enqueue(Some(&batch), &cmds, op("command.restart", &agents))
        .await
        .unwrap();
    assert_eq!(rec.id, first.id + 1);
    assert_eq!(rec.prev_hash, first.hash);
    assert_eq!(s.get_batch(batch.id).await.unwrap(), Some(batch.clone()));
    for c in &cmds {
        let mut expect = c.clone();
        expect.audit_id = Some(rec.id);
        assert_eq!(s.get_command(c.id).await.unwrap(), Some(expect));
    }
    let listed = s
        .list_commands(&CommandFilter {
            batch: Some(batch.id),
            ..CommandFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    // The returned record is exactly what is stored.
    assert_eq!(s.audit_chain(first.id, 10).await.unwrap(), vec![rec]);

    // A failing enqueue (duplicate command id) writes neither commands nor audit.
    let err = s
        .enqueue(None, &[cmds[0].clone()], op("command.restart", &agents))
        .await;
    assert!(err.is_err());
    assert_eq!(s.audit_chain(0, 100).await.unwrap().len(), 2);
}

async fn a_claim_wins_exactly_once_and_answers_with_the_rows(db: &Db) {
    let s = &db.store;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    // a: three live and one expired; b: one live.
    let mut cmds = vec![
        cmd(a, 1, 1000),
        cmd(a, 2, 1000),
        cmd(a, 3, 1000),
        cmd(b, 4, 1000),
    ];
    cmds.push(cmd(a, 5, 50));
    let batch = Batch {
        id: Uuid::now_v7(),
        query: "type:fluentbit".into(),
        kind: CommandKind::Restart,
        params: serde_json::json!({}),
        created_at: 1,
        actor: "alice".into(),
        channel: Channel::Rest,
        skipped: vec![],
    };
    for c in &mut cmds {
        c.batch_id = Some(batch.id);
    }
    s.enqueue(Some(&batch), &cmds, op("batch.queue", &[a, b]))
        .await
        .unwrap();
    let s = db.store.clone();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.claim_queued(&[a, b], 2, 100 + i).await
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap().unwrap());
    }
    // Every live command once; per agent, the oldest first and at most 2 per claim.
    let mut ids: Vec<Uuid> = got.iter().map(|c| c.id).collect();
    ids.sort();
    assert_eq!(ids, vec![cmds[0].id, cmds[1].id, cmds[2].id, cmds[3].id]);
    for c in &got {
        assert_eq!(c.status, CommandStatus::Sent);
        let stored = s.get_command(c.id).await.unwrap().unwrap();
        assert_eq!(stored.sent_at, c.sent_at);
        assert!(stored.finished_at.is_none());
    }
    // Expired stays queued for the sweeper.
    assert_eq!(
        s.get_command(cmds[4].id).await.unwrap().unwrap().status,
        CommandStatus::Queued
    );
    assert!(s.claim_queued(&[a, b], 5, 200).await.unwrap().is_empty());
    let counts = s.batch_counts(batch.id).await.unwrap();
    let n = |st| counts.iter().find(|(x, _)| *x == st).unwrap().1;
    assert_eq!((n(CommandStatus::Sent), n(CommandStatus::Queued)), (4, 1));
    assert_eq!(n(CommandStatus::Failed), 0, "every status is listed");
}

async fn a_claim_never_takes_a_command_newer_than_itself(db: &Db) {
    // A claim stamped before a command was queued (it waited for the writer meanwhile)
    // would record it as sent before it was created.
    let s = &db.store;
    let a = Uuid::now_v7();
    let c = cmd(a, 500, 10_000);
    s.enqueue(None, std::slice::from_ref(&c), op("command.restart", &[a]))
        .await
        .unwrap();
    assert!(s.claim_queued(&[a], 1, 499).await.unwrap().is_empty());
    let got = s.claim_queued(&[a], 1, 500).await.unwrap();
    assert_eq!((got.len(), got[0].sent_at), (1, Some(500)));
}

async fn unclaim_restores_a_queued_record_once(db: &Db) {
    let s = &db.store;
    let a = Uuid::now_v7();
    let c = cmd(a, 1, 10_000);
    s.enqueue(None, std::slice::from_ref(&c), op("command.restart", &[a]))
        .await
        .unwrap();
    let claimed = s.claim_queued(&[a], 1, 100).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // A stale claim (another sent_at) moves nothing.
    assert!(s.unclaim(&[(c.id, 99)]).await.unwrap().is_empty());
    assert_eq!(s.unclaim(&[(c.id, 100)]).await.unwrap(), vec![c.id]);
    assert!(
        s.unclaim(&[(c.id, 100)]).await.unwrap().is_empty(),
        "idempotent"
    );
    let back = s.get_command(c.id).await.unwrap().unwrap();
    assert_eq!(back.status, CommandStatus::Queued);
    assert_eq!((back.sent_at, back.finished_at), (None, None));
    assert_eq!(s.agents_with_queued(200, 1, 10).await.unwrap(), vec![a]);
    assert!(
        s.agents_with_queued(200, 0, 10).await.unwrap().is_empty(),
        "too new"
    );
    assert!(
        s.agents_with_queued(10_000, 1, 10)
            .await
            .unwrap()
            .is_empty(),
        "expired"
    );
    assert_eq!(
        s.claim_queued(&[a], 1, 300).await.unwrap()[0].sent_at,
        Some(300)
    );
}

async fn finish_command_is_compare_and_set(db: &Db) {
    let s = &db.store;
    let c = cmd(Uuid::now_v7(), 1, 1000);
    let q = s
        .enqueue(
            None,
            std::slice::from_ref(&c),
            op("command.restart", &[c.agent_uid]),
        )
        .await
        .unwrap();
    let mut outcome = op("command.result", &[c.agent_uid]);
    outcome.ref_id = Some(q.id);
    let from = [CommandStatus::Queued, CommandStatus::Sent];
    let done = s
        .finish_command(
            c.id,
            &from,
            finish(CommandStatus::Succeeded),
            Some(outcome.clone()),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, CommandStatus::Succeeded);
    assert_eq!(done.finished_at, Some(5000));
    assert_eq!(done.result, Some(serde_json::json!({"exit": 0})));
    let chain = s.audit_chain(0, 10).await.unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].ref_id, Some(q.id));

    let again = s
        .finish_command(c.id, &from, finish(CommandStatus::Failed), Some(outcome))
        .await
        .unwrap();
    assert_eq!(again, None);
    assert_eq!(s.audit_chain(0, 10).await.unwrap().len(), 2);
    assert_eq!(
        s.get_command(c.id).await.unwrap().unwrap().status,
        CommandStatus::Succeeded
    );
    assert_eq!(
        s.finish_command(Uuid::now_v7(), &from, finish(CommandStatus::Failed), None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.finish_command(c.id, &[], finish(CommandStatus::Failed), None)
            .await
            .unwrap(),
        None
    );
}

async fn expiry_listing_and_counts(db: &Db) {
    let s = &db.store;
    let agent = Uuid::now_v7();
    let expired_q = cmd(agent, 1, 100);
    let fresh_q = cmd(agent, 2, 10_000);
    let old_sent = cmd(agent, 3, 10_000);
    let new_sent = cmd(agent, 4, 10_000);
    let finished = cmd(agent, 5, 100);
    let all = [
        expired_q.clone(),
        fresh_q.clone(),
        old_sent.clone(),
        new_sent.clone(),
        finished.clone(),
    ];
    s.enqueue(None, &all, op("command.restart", &[agent]))
        .await
        .unwrap();
    assert!(mark_sent(db, old_sent.id, 200).await);
    assert!(mark_sent(db, new_sent.id, 900).await);
    s.finish_command(
        finished.id,
        &[CommandStatus::Queued],
        finish(CommandStatus::Cancelled),
        None,
    )
    .await
    .unwrap()
    .unwrap();
    let due: Vec<Uuid> = s
        .due_for_expiry(500, 300)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(due, vec![expired_q.id, old_sent.id]);

    let counts: BTreeMap<&str, u64> = s
        .command_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|(st, n)| (st.as_str(), n))
        .collect();
    assert_eq!(counts.len(), CommandStatus::ALL.len());
    assert_eq!(counts["queued"], 2);
    assert_eq!(counts["sent"], 2);
    assert_eq!(counts["cancelled"], 1);
    assert_eq!(counts["failed"], 0);

    // Newest first, cursor and limit honoured.
    let ids: Vec<Uuid> = all.iter().rev().map(|c| c.id).collect();
    let page = s
        .list_commands(&CommandFilter {
            agent: Some(agent),
            limit: 2,
            ..CommandFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|c| c.id).collect::<Vec<_>>(), ids[..2]);
    let page = s
        .list_commands(&CommandFilter {
            before: Some(ids[1]),
            ..CommandFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|c| c.id).collect::<Vec<_>>(), ids[2..]);
    let page = s
        .list_commands(&CommandFilter {
            status: Some(CommandStatus::Sent),
            kind: Some(CommandKind::Restart),
            ..CommandFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![new_sent.id, old_sent.id]
    );
    let none = s
        .list_commands(&CommandFilter {
            kind: Some(CommandKind::Shutdown),
            ..CommandFilter::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    let q: Vec<Uuid> = s
        .queued_for(agent, 1)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(q, vec![expired_q.id]);
}

async fn labels_are_set_and_audited_together(db: &Db) {
    let s = &db.store;
    let a = Agent::new(Uuid::now_v7(), 1, 30);
    s.put_agent(&a).await.unwrap();
    let rec = s
        .set_label(a.uid, "env", Some("prod"), op("label.set", &[a.uid]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.operation, "label.set");
    let got = s.get_agent(a.uid).await.unwrap().unwrap();
    assert_eq!(got.labels.get("env").map(String::as_str), Some("prod"));
    s.set_label(a.uid, "env", None, op("label.remove", &[a.uid]))
        .await
        .unwrap()
        .unwrap();
    assert!(s.get_agent(a.uid).await.unwrap().unwrap().labels.is_empty());
    let unknown = s
        .set_label(Uuid::now_v7(), "env", Some("x"), op("label.set", &[]))
        .await
        .unwrap();
    assert_eq!(unknown, None);
    assert_eq!(s.audit_chain(0, 10).await.unwrap().len(), 2);
}

async fn audit_filters(db: &Db) {
    let s = &db.store;
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let r1 = s
        .append_audit(op("command.restart", &[x, y]))
        .await
        .unwrap();
    let mut a = op("label.set", &[y]);
    a.actor = "bob".into();
    a.channel = Channel::Slack;
    let r2 = s.append_audit(a).await.unwrap();
    let r3 = s.append_audit(op("command.restart", &[x])).await.unwrap();
    // Pin timestamps so the time filters are deterministic (hashes are not checked here).
    for (id, ts) in [(r1.id, 1000), (r2.id, 2000), (r3.id, 3000)] {
        db.exec(&format!("UPDATE audit SET ts = {ts} WHERE id = {id}"))
            .await;
    }
    let ids = |f: AuditFilter| {
        let s = &s;
        async move {
            s.query_audit(&f)
                .await
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ids(AuditFilter::default()).await, vec![r3.id, r2.id, r1.id]);
    let f = AuditFilter {
        actor: Some("bob".into()),
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r2.id]);
    let f = AuditFilter {
        channel: Some(Channel::Rest),
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r3.id, r1.id]);
    let f = AuditFilter {
        agent: Some(y.to_string()),
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r2.id, r1.id]);
    let f = AuditFilter {
        agent: Some(x.to_string()),
        operation: Some("command.restart".into()),
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r3.id, r1.id]);
    let f = AuditFilter {
        since: Some(1500),
        until: Some(3000),
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r3.id, r2.id]);
    let f = AuditFilter {
        until: Some(2000),
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r2.id, r1.id]);
    let f = AuditFilter {
        before_id: Some(r3.id),
        limit: 1,
        ..AuditFilter::default()
    };
    assert_eq!(ids(f).await, vec![r2.id]);
    let f = AuditFilter {
        agent: Some("nobody".into()),
        ..AuditFilter::default()
    };
    assert!(ids(f).await.is_empty());
}

async fn chain_of(db: &Db, n: usize) -> Vec<AuditRecord> {
    let s = &db.store;
    let mut recs = Vec::new();
    for i in 0..n {
        let mut a = op("command.restart", &[Uuid::now_v7()]);
        a.params = serde_json::json!({"n": i, "nested": {"z": 1, "a": [1.25, "x"]}});
        recs.push(s.append_audit(a).await.unwrap());
    }
    recs
}

async fn verify_accepts_intact_chain(db: &Db) {
    let s = &db.store;
    let recs = chain_of(db, 5).await;
    assert_eq!(recs[0].prev_hash, audit::GENESIS);
    for w in recs.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    assert_eq!(verify(&**s, None).await.unwrap().count, 5);
}

async fn verify_detects_updated_record(db: &Db) {
    let s = &db.store;
    let recs = chain_of(db, 5).await;
    db.exec(&format!(
        "UPDATE audit SET outcome = 'error' WHERE id = {}",
        recs[2].id
    ))
    .await;
    match verify(&**s, None).await {
        Err(VerifyError::Broken(b)) => {
            assert_eq!(b.id, recs[2].id);
            assert!(b.reason.contains("does not match its hash"), "{b}");
        }
        other => panic!("expected a break, got {other:?}"),
    }
}

async fn verify_detects_deleted_record(db: &Db) {
    let s = &db.store;
    let recs = chain_of(db, 5).await;
    db.exec(&format!("DELETE FROM audit WHERE id = {}", recs[2].id))
        .await;
    match verify(&**s, None).await {
        Err(VerifyError::Broken(b)) => {
            assert_eq!(b.id, recs[3].id);
            assert!(
                b.reason
                    .contains(&format!("does not link to record {}", recs[1].id))
                    && b.reason
                        .contains(&format!("record {} is missing", recs[2].id)),
                "{b}"
            );
        }
        other => panic!("expected a break, got {other:?}"),
    }
}

async fn data_survives_close_and_reopen(db: &Db) {
    let a = full_agent();
    let c = cmd(a.uid, 1, 1000);
    let rec = {
        let s = &db.store;
        s.put_agent(&a).await.unwrap();
        let rec = s
            .enqueue(
                None,
                std::slice::from_ref(&c),
                // As the service queues it (without a digest: a legacy record to verify).
                op("command.queue", &[a.uid, c.id]),
            )
            .await
            .unwrap();
        s.close().await;
        rec
    };
    let db = db.reopen().await;
    let s = &db.store;
    assert_eq!(s.get_agent(a.uid).await.unwrap(), Some(a));
    assert_eq!(
        s.get_command(c.id).await.unwrap().unwrap().audit_id,
        Some(rec.id)
    );
    assert_eq!(s.audit_chain(0, 10).await.unwrap(), vec![rec.clone()]);
    // Appending after reopen continues the same chain.
    let next = s.append_audit(op("login", &[])).await.unwrap();
    assert_eq!(next.prev_hash, rec.hash);
    assert_eq!(verify(&**s, None).await.unwrap().count, 2);
    let version = db.scalar("SELECT MAX(version) FROM schema_version").await;
    assert_eq!(version, migrations::latest());
    s.close().await;
}

/// Two stores (two pools, as two replicas) append concurrently: one chain, no fork, every
/// record there.
async fn audit_appends_from_two_stores_form_one_chain(db: &Db) {
    let other = db.another().await;
    let mut tasks = Vec::new();
    for (i, s) in [db.store.clone(), other.store.clone()]
        .into_iter()
        .enumerate()
    {
        for j in 0..4 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..15 {
                    let mut a = op("label.set", &[]);
                    a.params = serde_json::json!({"store": i, "task": j, "n": k});
                    s.append_audit(a).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let verified = verify(&*db.store, None).await.unwrap();
    assert_eq!(verified.count, 2 * 4 * 15);
    let chain = db.store.audit_chain(0, 1000).await.unwrap();
    assert_eq!(chain.len(), 120);
    assert_eq!(chain[0].prev_hash, audit::GENESIS);
    for w in chain.windows(2) {
        assert_eq!(
            w[1].prev_hash, w[0].hash,
            "record {} forks the chain",
            w[1].id
        );
    }
}

/// Two stores claim the same agents' commands at once: every command is claimed by exactly
/// one of them.
async fn concurrent_claims_from_two_stores_deliver_each_command_once(db: &Db) {
    let other = db.another().await;
    let agents: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    let mut commands = Vec::new();
    for a in &agents {
        for _ in 0..4 {
            commands.push(cmd(*a, 10, i64::MAX));
        }
    }
    db.store
        .enqueue(None, &commands, op("command.restart", &[]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for s in [db.store.clone(), other.store.clone()] {
        for _ in 0..3 {
            let (s, agents) = (s.clone(), agents.clone());
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for at in 20..30 {
                    got.extend(s.claim_queued(&agents, 1, at).await.unwrap());
                }
                got
            }));
        }
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap().into_iter().map(|c| c.id));
    }
    let total = claimed.len();
    claimed.sort();
    claimed.dedup();
    assert_eq!(total, claimed.len(), "a command was claimed twice");
    assert_eq!(claimed.len(), commands.len(), "a command was never claimed");
    let counts = db.store.command_counts().await.unwrap();
    assert!(counts.contains(&(CommandStatus::Sent, 200)), "{counts:?}");
}

// ---- the chat gateways' state (ChatStore) ----

fn pending(id: &str, expires_at_ms: i64) -> PendingConfirmation {
    PendingConfirmation {
        id: id.into(),
        requester: ChatUser {
            id: "U1".into(),
            name: "Ada".into(),
            groups: vec![],
        },
        conversation: ConversationRef {
            platform: Platform::Slack,
            workspace: "T1".into(),
            channel: "C1".into(),
            thread: None,
        },
        tool: "command_queue".into(),
        args: json!({"agent": "u-1", "kind": "restart"}),
        expect_targets: json!({"count": 1, "digest": "d"}),
        target_count: 1,
        expires_at_ms,
    }
}

async fn chat_confirmations_threads_and_deliveries_survive_a_restart(db: &Db) {
    {
        let store = db.store.clone();
        let s = StoreChatState(store.clone().chat_store().unwrap());
        s.put_confirmation(&pending("c1", 2_000)).await.unwrap();
        s.put_confirmation(&pending("c2", 500)).await.unwrap();
        let mut t = ThreadState {
            context: ThreadContext::default(),
            last_used_ms: 1_000,
            conversation: None,
        };
        t.context.last_query = Some("type:fluentd".into());
        s.put_thread("slack/T1/C1/-", &t).await.unwrap();
        assert!(s.first_delivery("Ev1", 1_000).await.unwrap());
        store.close().await;
    }
    let db = db.reopen().await;
    let s = StoreChatState(db.store.clone().chat_store().unwrap());
    // A retry after the restart is still recognised.
    assert!(!s.first_delivery("Ev1", 1_500).await.unwrap());
    assert_eq!(s.expire_confirmations(1_000).await.unwrap(), 1);
    assert_eq!(
        s.take_confirmation("c1").await.unwrap(),
        Some(pending("c1", 2_000))
    );
    // Single use: the second take finds nothing.
    assert_eq!(s.take_confirmation("c1").await.unwrap(), None);
    assert_eq!(s.take_confirmation("c2").await.unwrap(), None);
    let t = s.get_thread("slack/T1/C1/-").await.unwrap().unwrap();
    assert_eq!(t.context.last_query.as_deref(), Some("type:fluentd"));
    let idle = s.take_idle_threads(1_001).await.unwrap();
    assert_eq!(idle.len(), 1);
    assert_eq!(s.get_thread("slack/T1/C1/-").await.unwrap(), None);
}

async fn chat_subscriptions_and_mutes_are_kept_removed_by_channel_and_audited(db: &Db) {
    let store = db.store.clone();
    let s = StoreChatState(store.clone().chat_store().unwrap());
    let conv = pending("x", 0).conversation;
    let ada = pending("x", 0).requester;
    let sub = Subscription {
        id: "s-1".into(),
        conversation: conv.clone(),
        query: "state:offline".into(),
        events: vec!["offline".into(), "recovered".into()],
        created_by: ada.clone(),
        created_at_ms: 5,
    };
    s.put_subscription(&sub).await.unwrap();
    assert_eq!(s.list_subscriptions().await.unwrap(), vec![sub.clone()]);
    let m = Mute {
        subscription: "s-1".into(),
        agent: "u-1".into(),
        until_ms: 10_000,
    };
    assert!(s.mute(&m, &ada).await.unwrap());
    let unknown = Mute {
        subscription: "s-nope".into(),
        ..m.clone()
    };
    assert!(!s.mute(&unknown, &ada).await.unwrap());
    assert_eq!(s.mutes(9_999).await.unwrap(), vec![m.clone()]);
    assert!(s.mutes(10_000).await.unwrap().is_empty(), "expired");
    assert!(s.mute(&m, &ada).await.unwrap());
    // Another channel cannot remove it.
    let other = ConversationRef {
        channel: "C2".into(),
        ..conv.clone()
    };
    assert_eq!(
        s.remove_subscription("s-1", &other, &ada).await.unwrap(),
        None
    );
    assert_eq!(
        s.remove_subscription("s-1", &conv, &ada).await.unwrap(),
        Some(sub)
    );
    assert!(s.list_subscriptions().await.unwrap().is_empty());
    assert!(
        s.mutes(0).await.unwrap().is_empty(),
        "its mutes went with it"
    );
    let trail = store
        .query_audit(&crate::model::AuditFilter::default())
        .await
        .unwrap();
    let ops: Vec<(&str, &str)> = trail
        .iter()
        .map(|r| (r.operation.as_str(), r.actor.as_str()))
        .collect();
    for op in ["chat.subscribe", "chat.mute", "chat.unsubscribe"] {
        assert!(ops.contains(&(op, "slack:T1/U1 (Ada)")), "{op}: {ops:?}");
    }
    // The refused mute and removal wrote nothing.
    assert_eq!(ops.len(), 4, "{ops:?}");
    let mute = trail.iter().find(|r| r.operation == "chat.mute").unwrap();
    assert_eq!(mute.targets, vec!["u-1".to_string()]);
}

fn connected_agent(at: Millis) -> Agent {
    let mut a = Agent::new(Uuid::now_v7(), at, 30);
    a.connected = true;
    a
}

async fn the_agent_record_names_the_replica_holding_it(db: &Db) {
    let s = &db.store;
    assert_eq!(s.start_replica("r-1", 1000, 0).await.unwrap(), 0);
    let a = connected_agent(1000);
    s.put_agent(&a).await.unwrap();
    assert_eq!(
        s.get_agent(a.uid)
            .await
            .unwrap()
            .unwrap()
            .replica
            .as_deref(),
        Some("r-1")
    );
    let brief = s.list_agents_brief(None, 10).await.unwrap();
    assert_eq!(brief[0].replica.as_deref(), Some("r-1"));
    s.replica_heartbeat(3, 2000, 0, 0).await.unwrap();
    let rows = s.replicas().await.unwrap();
    assert_eq!(
        rows,
        vec![ReplicaRow {
            id: "r-1".into(),
            started_at: 1000,
            heartbeat_at: 2000,
            connections: 3
        }]
    );
}

/// What only a store several processes share does: replicas and their wake-ups.
mod shared {
    use super::*;

    const STALE_MS: Millis = 15_000;

    async fn connected(db: &Db, uid: Uuid) -> (bool, Option<String>) {
        let a = db.store.get_agent(uid).await.unwrap().unwrap();
        (a.connected, a.replica)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_starting_replica_releases_only_agents_no_live_replica_holds() {
        let a = Db::postgres().await;
        let b = a.another().await;
        let t0: Millis = 1_000_000;
        a.store.start_replica("a", t0, t0 - STALE_MS).await.unwrap();
        b.store.start_replica("b", t0, t0 - STALE_MS).await.unwrap();
        let (x, y) = (connected_agent(t0), connected_agent(t0));
        a.store.put_agent(&x).await.unwrap();
        b.store.put_agent(&y).await.unwrap();
        let lost = connected_agent(t0);
        b.store.put_agent(&lost).await.unwrap();
        // `lost` moves to a: a connection on a replica names it.
        a.store
            .set_connected(lost.uid, true, None, None, t0 + 10)
            .await
            .unwrap();
        assert_eq!(connected(&a, x.uid).await, (true, Some("a".into())));
        assert_eq!(connected(&a, y.uid).await, (true, Some("b".into())));
        assert_eq!(connected(&a, lost.uid).await, (true, Some("a".into())));
        // b's old connection of `lost` closing says nothing about a's.
        b.store
            .set_connected(lost.uid, false, None, None, t0 + 20)
            .await
            .unwrap();
        assert!(connected(&a, lost.uid).await.0);

        // a restarts under its id: its own agents are released, b's are not.
        let a2 = a.another().await;
        let t1 = t0 + 1000;
        assert_eq!(
            a2.store
                .start_replica("a", t1, t1 - STALE_MS)
                .await
                .unwrap(),
            2
        );
        assert!(!connected(&a, x.uid).await.0);
        assert_eq!(connected(&a, y.uid).await, (true, Some("b".into())));

        // b beats once more, then falls silent: a's heartbeat releases b's agents once b is
        // stale, and forgets b later still.
        let released = b
            .store
            .replica_heartbeat(1, t1, t1 - STALE_MS, t1 - 600_000)
            .await
            .unwrap();
        assert!(released.is_empty());
        let t2 = t1 + STALE_MS - 1;
        let released = a2
            .store
            .replica_heartbeat(2, t2, t2 - STALE_MS, t2 - 600_000)
            .await
            .unwrap();
        assert!(released.is_empty(), "b is not stale yet: {released:?}");
        let t3 = t1 + STALE_MS + 1;
        let released = a2
            .store
            .replica_heartbeat(2, t3, t3 - STALE_MS, t3 - 600_000)
            .await
            .unwrap();
        assert_eq!(released, vec![y.uid]);
        assert!(!connected(&a, y.uid).await.0);
        let ids: Vec<String> = a
            .store
            .replicas()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "b"], "a dead replica stays listed for a while");
        let t4 = t1 + 600_001;
        a2.store
            .replica_heartbeat(0, t4, t4 - STALE_MS, t4 - 600_000)
            .await
            .unwrap();
        let rows = a.store.replicas().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (
                rows[0].id.as_str(),
                rows[0].heartbeat_at,
                rows[0].connections
            ),
            ("a", t4, 0)
        );
    }

    /// Waits until `n` connections listen on this schema's wake channel.
    async fn listening(db: &Db, n: i64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got = db
                .scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN \"flotilla_wake_'
                        || substr(md5(current_schema()), 1, 16) || '\"%'",
                )
                .await;
            if got == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{got} listeners, not {n}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn next(feed: &mut tokio::sync::mpsc::Receiver<Wakeup>) -> Wakeup {
        tokio::time::timeout(std::time::Duration::from_secs(10), feed.recv())
            .await
            .expect("a wake-up in time")
            .expect("the feed is open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wake_feed_names_agents_queued_elsewhere_and_survives_a_cut_connection() {
        let a = Db::postgres().await;
        let b = a.another().await;
        let mut feed = b
            .store
            .clone()
            .wake_feed()
            .expect("PostgreSQL has a wake feed");
        listening(&a, 1).await;
        let (u1, u2, u3) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // b's own queuing is not echoed back to it; a's is, once per agent.
        b.store
            .enqueue(None, &[cmd(u1, 1, i64::MAX)], op("command.queue", &[u1]))
            .await
            .unwrap();
        a.store
            .enqueue(
                None,
                &[cmd(u2, 1, i64::MAX), cmd(u2, 2, i64::MAX)],
                op("command.queue", &[u2]),
            )
            .await
            .unwrap();
        assert_eq!(next(&mut feed).await, Wakeup::Agents(vec![u2]));
        // A fan-out too large for one payload arrives whole, in several.
        let many: Vec<Uuid> = (0..450).map(|_| Uuid::now_v7()).collect();
        let cmds: Vec<Command> = many.iter().map(|u| cmd(*u, 1, i64::MAX)).collect();
        a.store
            .enqueue(None, &cmds, op("batch.queue", &[]))
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < many.len() {
            match next(&mut feed).await {
                Wakeup::Agents(u) => got.extend(u),
                other => panic!("{other:?}"),
            }
        }
        got.sort();
        assert_eq!(got, many);
        // A command put back after a claim nobody wrote wakes its agent wherever it is now.
        mark_sent(&a, cmds[0].id, 5).await;
        a.store.unclaim(&[(cmds[0].id, 5)]).await.unwrap();
        assert_eq!(next(&mut feed).await, Wakeup::Agents(vec![many[0]]));

        // The listening connection is cut: the feed says so once it listens again, and goes on.
        let cut = a
            .exec(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE \
                 'LISTEN \"flotilla_wake_' || substr(md5(current_schema()), 1, 16) || '\"%'",
            )
            .await;
        assert_eq!(cut, 1);
        assert_eq!(next(&mut feed).await, Wakeup::Resumed);
        listening(&a, 1).await;
        a.store
            .enqueue(None, &[cmd(u3, 1, i64::MAX)], op("command.queue", &[u3]))
            .await
            .unwrap();
        assert_eq!(next(&mut feed).await, Wakeup::Agents(vec![u3]));
        drop(feed);
        listening(&a, 0).await;
    }
}

//! The server on the PostgreSQL store, end to end: a real server with `store.url` pointing at
//! a fresh schema of the machine's PostgreSQL (`FLOTILLA_TEST_PG_URL`, default
//! `postgres://root@127.0.0.1:5432/test`), a WebSocket agent, a command delivered once, the
//! data surviving a restart, and `flotilla audit verify` on the same URL. An unreachable
//! PostgreSQL fails these tests; nothing is skipped.

use std::time::Duration;

use flotilla_proto::AgentCapabilities as AC;
use serde_json::json;
use sqlx::Connection;

use crate::opamp::{beat, full, new_uid, queue, wait_command, Ws};
use crate::support::TestServer;

use flotilla_e2e::pg::{pg_url, PgSchema as Schema};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgres_delivers_once_restarts_and_its_audit_chain_verifies() {
    let schema = Schema::create().await;
    let data = tempfile::tempdir().unwrap();
    let url = schema.url.clone();
    let server = TestServer::start_in(data.path().to_path_buf(), |c| {
        c.store.url = Some(url.clone())
    })
    .await;
    // Everything is in PostgreSQL: no SQLite file appears.
    let caps = AC::ReportsStatus as u64 | AC::AcceptsRestartCommand as u64;
    let uid = new_uid();
    let mut ws = Ws::connect(&server).await;
    ws.request(&full(uid, 0, caps)).await;
    let id = queue(&server, uid, "restart", json!({})).await;
    let pushed = ws.recv().await;
    let cmd = pushed.command.expect("the command is pushed to the agent");
    assert_eq!(cmd.r#type, 0, "restart");
    wait_command(&server, &id, "sent").await;
    // Exactly once: nothing more arrives, also not after a heartbeat.
    assert!(ws.silent_for(Duration::from_millis(700)).await);
    let r = ws.request(&beat(uid, 1)).await;
    assert!(r.command.is_none(), "delivered a second time: {r:?}");
    assert!(!data.path().join("flotilla.db").exists());
    drop(ws);
    server.stop().await;

    // A restart on the same database finds the agent and the command as they were.
    let url = schema.url.clone();
    let server = TestServer::start_in(data.path().to_path_buf(), |c| {
        c.store.url = Some(url.clone())
    })
    .await;
    let (status, body) = server.rest().get(&format!("/api/v1/agents/{uid}")).await;
    assert_eq!(status, 200, "{body}");
    wait_command(&server, &id, "sent").await;
    server.stop().await;

    // The offline verifier reads the same database (the URL from the environment).
    let empty = tempfile::tempdir().unwrap();
    let out = flotilla_e2e::server::run_flotilla(
        &[
            "audit",
            "verify",
            "--data-dir",
            empty.path().to_str().unwrap(),
        ],
        &[("FLOTILLA_STORE_URL", schema.url.as_str())],
        Duration::from_secs(60),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("intact"), "{stdout}");
    assert!(
        !stderr.contains("password") && !stdout.contains("password"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_refuses_a_database_without_flotilla_tables() {
    let schema = Schema::create().await;
    let empty = tempfile::tempdir().unwrap();
    let out = flotilla_e2e::server::run_flotilla(
        &[
            "audit",
            "verify",
            "--data-dir",
            empty.path().to_str().unwrap(),
        ],
        &[("FLOTILLA_STORE_URL", schema.url.as_str())],
        Duration::from_secs(60),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no Flotilla schema"), "{stderr}");
    // Nothing was created: an empty database must not "verify" later either.
    let mut admin = sqlx::PgConnection::connect(&pg_url()).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&schema.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(tables, 0);
}

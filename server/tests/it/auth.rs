//! Guard rails of issue 11 driven through the public interfaces: remote-config file names
//! refused at queue time, owner-only data files, confirmation tokens bound to their caller,
//! commands delivered only as audited, the admin role, token management and operator OIDC.

use flotilla_proto::AgentCapabilities as Cap;
use serde_json::{json, Value};

use crate::support::{register_agent, TestServer};

const RC_CAPS: u64 = Cap::ReportsStatus as u64 | Cap::AcceptsRemoteConfig as u64;

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Defect 3: every class of unsafe file name is refused with `invalid_params` naming the file,
/// nothing is queued, and a plain relative name (with a subdirectory) still is.
#[tokio::test]
async fn remote_config_file_names_are_checked_at_queue_time() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let a = register_agent(&server, &[("service.name", "fluent-bit")], RC_CAPS, &[]).await;
    let on = format!("/api/v1/agents/{a}/commands");
    let long = "a".repeat(5000);
    let bad: &[(&str, &str)] = &[
        ("../../etc/passwd", "'..'"),
        ("conf/../../x", "'..'"),
        ("..", "'..'"),
        ("/etc/passwd", "absolute"),
        ("", "empty"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("a\0b", "control"),
        ("a\nb", "control"),
        ("a\rb", "control"),
        ("..\\..\\windows\\system.ini", "backslash"),
        ("C:\\x", "backslash"),
        ("C:x", "':'"),
        (&long, "longer than 255"),
    ];
    for (name, why) in bad {
        let (s, v) = rest
            .post(
                &on,
                json!({"kind": "remote_config", "params": {"files": {*name: "x"}}}),
            )
            .await;
        assert_eq!((s, code(&v)), (400, "invalid_params"), "{name:?}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{name:?}: {msg}");
    }
    // A thousand files is refused as a whole.
    let many: serde_json::Map<String, Value> = (0..1000)
        .map(|i| (format!("f{i}.conf"), json!("x")))
        .collect();
    let (s, v) = rest
        .post(
            &on,
            json!({"kind": "remote_config", "params": {"files": many}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 64"));
    // A fan-out is refused the same way, before any target is touched.
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "service.name:fluent-bit", "kind": "remote_config",
                   "params": {"files": {"../x": "x"}}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    // Nothing was queued.
    let (s, v) = rest.get(&format!("/api/v1/commands?agent={a}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(0), "{v}");
    // Plain relative names still work.
    let (s, v) = rest
        .post(
            &on,
            json!({"kind": "remote_config", "params": {"files": {
                "fluent-bit.conf": "[SERVICE]\n", "parsers/extra.conf": "[PARSER]\n",
                ".env-free_name-1.conf": "x"}}}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    server.stop().await;
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Defect 4: the data directory is created 0700 and the database with its `-wal` and `-shm`
/// files 0600; an existing deployment's 0755/0644 files are tightened at start.
#[tokio::test]
async fn data_directory_and_database_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    // Created from nothing by the store.
    let fresh = tmp.path().join("fresh/data");
    let cfg = flotilla_server::config::Config {
        data_dir: fresh.clone(),
        ..Default::default()
    };
    let store = flotilla_server::open_store(&cfg).await.expect("store");
    let db = fresh.join("flotilla.db");
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&db), 0o600);
    for f in ["flotilla.db-wal", "flotilla.db-shm"] {
        assert_eq!(mode(&fresh.join(f)), 0o600, "{f}");
    }
    drop(store);

    // A running server, on a directory the harness made with the default umask, and after a
    // write (the WAL and shared-memory files exist then).
    let dir = tmp.path().join("served");
    std::fs::create_dir_all(&dir).unwrap();
    let server = TestServer::start_in(dir.clone(), |_| {}).await;
    register_agent(&server, &[("service.name", "fluent-bit")], RC_CAPS, &[]).await;
    assert_eq!(mode(&dir), 0o700);
    for f in ["flotilla.db", "flotilla.db-wal", "flotilla.db-shm"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    server.stop().await;

    // Files left open by an older version are tightened at the next start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = dir.join("flotilla.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = TestServer::start_in(dir.clone(), |_| {}).await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    server.stop().await;
}

/// Defect 6: a confirmation token presented by another user is refused and not spent; its
/// owner can still confirm with it, and only then is the command queued.
#[tokio::test]
async fn confirmation_token_of_another_caller_is_refused_unspent() {
    use crate::mcp::{call, connect, fail, ok, Revision};
    use crate::support::{ADMIN_TOKEN, OPERATOR_TOKEN};
    let server = TestServer::start().await;
    let caps = Cap::ReportsStatus as u64 | Cap::AcceptsRestartCommand as u64;
    let a = register_agent(&server, &[("host.name", "web-1")], caps, &[]).await;
    let handler = flotilla_e2e::mcp_client::ElicitingClient::default;
    let alice = connect(&server, OPERATOR_TOKEN, Revision::Session, handler()).await;
    let bob = connect(&server, ADMIN_TOKEN, Revision::Session, handler()).await;
    let args = json!({"agent": a.to_string(), "kind": "restart"});
    let v = ok(&call(&alice, "command_queue", args.clone()).await);
    assert_eq!(v["status"], "confirmation_required", "{v}");
    let mut with = args.clone();
    with["confirmation_token"] = v["confirmation_token"].clone();

    let (code, message) = fail(&call(&bob, "command_queue", with.clone()).await);
    assert_eq!(code, "confirmation_invalid");
    assert!(message.contains("another caller"), "{message}");
    let queued = |v: &Value| v["items"].as_array().map(Vec::len).unwrap_or(0);
    let (_, list) = server.rest().get("/api/v1/commands").await;
    assert_eq!(queued(&list), 0, "{list}");

    let v = ok(&call(&alice, "command_queue", with).await);
    assert_eq!(v["status"], "queued", "{v}");
    let (_, list) = server.rest().get("/api/v1/commands").await;
    assert_eq!(queued(&list), 1, "{list}");
    assert_eq!(list["items"][0]["actor"], "ops");
    alice.cancel().await.ok();
    bob.cancel().await.ok();
    server.stop().await;
}

/// Registers `hosts` as agents able to run `shutdown` (fluent-opamp's custom capability).
async fn shutdownable(server: &TestServer, hosts: &[&str]) -> Vec<uuid::Uuid> {
    let mut uids = Vec::new();
    for h in hosts {
        let caps = Cap::ReportsStatus as u64;
        let cap = flotilla_server::commands::CAP_SHUTDOWN;
        uids.push(register_agent(server, &[("host.name", h)], caps, &[cap]).await);
    }
    uids
}

/// Defect 7 over REST: a shutdown fan-out above `commands.admin_shutdown_above` and the audit
/// export need the admin role; an operator gets 403 naming it (dry run included, nothing
/// queued); one agent and small batches stay operator, reading and verifying stay viewer.
#[tokio::test]
async fn admin_role_guards_large_shutdowns_and_audit_export_over_rest() {
    use crate::support::{ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN};
    let server = TestServer::start_with(|c| c.commands.admin_shutdown_above = 2).await;
    let ops = server.rest_as(Some(OPERATOR_TOKEN));
    let admin = server.rest_as(Some(ADMIN_TOKEN));
    let viewer = server.rest_as(Some(VIEWER_TOKEN));
    let web = shutdownable(&server, &["web-1", "web-2", "web-3"]).await;
    shutdownable(&server, &["db-1", "db-2"]).await;
    let count = |v: &Value| v["items"].as_array().map(Vec::len).unwrap_or(0);

    let big = json!({"query": "host:web-*", "kind": "shutdown"});
    for body in [
        big.clone(),
        json!({"query": "host:web-*", "kind": "shutdown", "dry_run": true}),
    ] {
        let (s, v) = ops.post("/api/v1/commands", body.clone()).await;
        assert_eq!((s, code(&v)), (403, "forbidden"), "{body}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("ops (operator) may not shut down 3 agents")
                && m.contains("admin_shutdown_above = 2")
                && m.ends_with("it needs the admin role"),
            "{m}"
        );
    }
    let (_, list) = admin.get("/api/v1/commands").await;
    assert_eq!(count(&list), 0, "nothing queued by a refusal: {list}");

    // At the limit, and for one agent, an operator may.
    let (s, v) = ops
        .post(
            "/api/v1/commands",
            json!({"query": "host:db-*", "kind": "shutdown"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["queued"], 2, "{v}");
    let (s, v) = ops
        .post(
            &format!("/api/v1/agents/{}/commands", web[0]),
            json!({"kind": "shutdown"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    // Other kinds are not limited: restarting every web agent stays operator.
    let (s, v) = ops
        .post(
            "/api/v1/commands",
            json!({"query": "host:web-*", "kind": "force_resync", "dry_run": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // An admin may shut down the lot.
    let (s, v) = admin.post("/api/v1/commands", big).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["queued"], 3, "{v}");

    // Audit export: admin only; the listing and verification stay readable by everyone.
    for (who, rest) in [("ops (operator)", &ops), ("watcher (viewer)", &viewer)] {
        let (s, v) = rest.get("/api/v1/audit/export").await;
        assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert_eq!(
            m,
            format!("{who} may not export the audit trail: it needs the admin role")
        );
        assert_eq!(rest.get("/api/v1/audit").await.0, 200);
        assert_eq!(rest.get("/api/v1/audit/verify").await.0, 200);
    }
    let (s, all) = admin.get("/api/v1/audit/export").await;
    assert_eq!(s, 200, "{all}");
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{all}");
    assert_eq!(all["next_after"], Value::Null);
    assert_eq!(items[0]["id"], "1");
    assert_eq!(items[0]["prev_hash"], "0".repeat(64));
    for w in items.windows(2) {
        assert_eq!(w[1]["prev_hash"], w[0]["hash"], "chain order: {all}");
    }
    // Paged: `after=next_after` walks the same records.
    let (_, p1) = admin.get("/api/v1/audit/export?limit=2").await;
    assert_eq!(p1["next_after"], "2", "{p1}");
    let (_, p2) = admin.get("/api/v1/audit/export?limit=2&after=2").await;
    assert_eq!(p2["items"][0], items[2]);
    assert_eq!(p2["next_after"], Value::Null, "{p2}");
    let (s, v) = admin.get("/api/v1/audit/export?after=-1").await;
    assert_eq!((s, code(&v)), (400, "bad_request"), "{v}");
    server.stop().await;
}

/// Defect 7 over MCP (and so chat, which calls the same tools): the preview of a large
/// shutdown fan-out is refused for an operator with an error naming the admin role; an admin
/// gets the preview and queues it.
#[tokio::test]
async fn admin_role_guards_large_shutdowns_over_mcp() {
    use crate::mcp::{call, connect, fail, ok, Revision};
    use crate::support::{ADMIN_TOKEN, OPERATOR_TOKEN};
    let server = TestServer::start_with(|c| c.commands.admin_shutdown_above = 1).await;
    shutdownable(&server, &["web-1", "web-2"]).await;
    let handler = flotilla_e2e::mcp_client::ElicitingClient::default;
    let ops = connect(&server, OPERATOR_TOKEN, Revision::Modern, handler()).await;
    let admin = connect(&server, ADMIN_TOKEN, Revision::Session, handler()).await;
    let args = json!({"query": "host:web-*", "kind": "shutdown"});
    let (c, m) = fail(&call(&ops, "command_queue", args.clone()).await);
    assert_eq!(c, "forbidden");
    assert!(
        m.contains("may not shut down 2 agents") && m.ends_with("it needs the admin role"),
        "{m}"
    );
    let v = ok(&call(&admin, "command_queue", args.clone()).await);
    assert_eq!(v["status"], "confirmation_required", "{v}");
    let mut with = args;
    with["confirmation_token"] = v["confirmation_token"].clone();
    let v = ok(&call(&admin, "command_queue", with).await);
    assert_eq!(v["status"], "queued", "{v}");
    let (_, list) = server.rest().get("/api/v1/commands").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    assert!(items.iter().all(|c| c["actor"] == "admin"), "{list}");
    ops.cancel().await.ok();
    admin.cancel().await.ok();
    server.stop().await;
}

/// The database file behind a running test server, opened as an attacker with file access
/// would: a second SQLite connection editing tables behind the server's back.
async fn tamper(server: &TestServer, sql: &str) -> u64 {
    let url = format!("sqlite://{}", server.data_dir.join("flotilla.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the database");
    let n = sqlx::query(sql)
        .execute(&pool)
        .await
        .expect("tamper")
        .rows_affected();
    pool.close().await;
    n
}

/// One HTTP poll of agent `uid` (full status, so its capabilities stand): what the server sends.
async fn poll(
    server: &TestServer,
    uid: uuid::Uuid,
    seq: u64,
    custom: &[&str],
) -> flotilla_proto::ServerToAgent {
    let caps = Cap::ReportsStatus as u64 | Cap::AcceptsRestartCommand as u64;
    crate::support::opamp_post(
        server,
        &crate::support::agent_status(uid, seq, &[], caps, custom),
    )
    .await
}

/// Defect 8, one command: a command whose parameters were edited in the commands table after
/// it was queued is not delivered (failed, with an audit record), and the audit chain's
/// verification names it; an untouched command is delivered as before.
#[tokio::test]
async fn a_command_edited_after_it_was_audited_is_refused_at_delivery() {
    use flotilla_server::commands::CAP_CHATOPS;
    let server = TestServer::start().await;
    let rest = server.rest();
    let caps = Cap::ReportsStatus as u64 | Cap::AcceptsRestartCommand as u64;
    let a = register_agent(&server, &[("host.name", "web-1")], caps, &[CAP_CHATOPS]).await;
    let flush = || async {
        let (s, v) = rest
            .post(
                &format!("/api/v1/agents/{a}/commands"),
                json!({"kind": "chatops", "params": {"tag": "flush"}}),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        v["command_id"].as_str().unwrap().to_string()
    };
    let id = flush().await;
    let edited = tamper(
        &server,
        &format!(
            r#"UPDATE commands SET params = '{{"tag":"drop_all_outputs"}}' WHERE id = '{id}'"#
        ),
    )
    .await;
    assert_eq!(edited, 1);

    let r = poll(&server, a, 1, &[CAP_CHATOPS]).await;
    assert!(
        r.custom_message.is_none() && r.command.is_none(),
        "nothing reaches the agent: {r:?}"
    );
    let (_, c) = rest.get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(c["status"], "failed", "{c}");
    let err = c["error"].as_str().unwrap();
    assert!(
        err.starts_with("parameters do not match the audited record"),
        "{err}"
    );
    let (_, refused) = rest.get("/api/v1/audit?operation=command.refused").await;
    let rec = &refused["items"][0];
    assert_eq!(rec["ref_id"], c["audit_id"], "{refused}");
    assert_eq!(
        (rec["actor"].as_str(), rec["outcome"].as_str()),
        (Some("flotilla"), Some("failed"))
    );
    assert_eq!(rec["targets"][1], id.as_str());

    let (_, v) = rest.get("/api/v1/audit/verify").await;
    assert_eq!(v["intact"], false, "{v}");
    assert_eq!(v["broken_at"], c["audit_id"], "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("command {id} (chatops for agent {a})"))
            && reason.contains("do not match"),
        "{reason}"
    );

    // An untouched command is delivered as before.
    let good = flush().await;
    let r = poll(&server, a, 2, &[CAP_CHATOPS]).await;
    assert!(r.custom_message.is_some(), "delivered: {r:?}");
    let (_, c) = rest.get(&format!("/api/v1/commands/{good}")).await;
    assert_eq!(c["status"], "sent", "{c}");
    server.stop().await;
}

/// Defect 8, a fan-out (one audit record for the batch): a batch command moved to another
/// agent in the table is refused, the others of the batch are delivered; verification names
/// it. A command queued by a record from before digests existed is "legacy": delivered, and
/// counted as unverifiable by verification.
#[tokio::test]
async fn a_batch_command_moved_to_another_agent_is_refused_and_legacy_commands_still_go() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let caps = Cap::ReportsStatus as u64 | Cap::AcceptsRestartCommand as u64;
    let w1 = register_agent(&server, &[("host.name", "web-1")], caps, &[]).await;
    let w2 = register_agent(&server, &[("host.name", "web-2")], caps, &[]).await;
    let db = register_agent(&server, &[("host.name", "db-1")], caps, &[]).await;
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "host:web-*", "kind": "restart"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let batch = v["batch_id"].as_str().unwrap().to_string();
    let moved = tamper(
        &server,
        &format!("UPDATE commands SET agent_uid = '{db}' WHERE batch_id = '{batch}' AND agent_uid = '{w1}'"),
    )
    .await;
    assert_eq!(moved, 1);
    assert!(
        poll(&server, db, 1, &[]).await.command.is_none(),
        "db-1 was not a target"
    );
    assert!(
        poll(&server, w2, 1, &[]).await.command.is_some(),
        "web-2's restart is untouched"
    );
    let (_, b) = rest.get(&format!("/api/v1/batches/{batch}")).await;
    assert_eq!(
        (b["counts"]["failed"].as_u64(), b["counts"]["sent"].as_u64()),
        (Some(1), Some(1)),
        "{b}"
    );
    let failed = b["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "failed")
        .unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("is not its target"),
        "{failed}"
    );
    let (_, v) = rest.get("/api/v1/audit/verify").await;
    assert_eq!(v["intact"], false, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("restart for agent {db}")),
        "{v}"
    );

    // Legacy: queued as the server did before digests (a record without one).
    let store = server.fleet.store().clone();
    let fresh = register_agent(&server, &[("host.name", "old-1")], caps, &[]).await;
    let now = flotilla_server::model::now_ms();
    let cmd = flotilla_server::model::Command {
        id: uuid::Uuid::now_v7(),
        agent_uid: fresh,
        batch_id: None,
        kind: flotilla_server::model::CommandKind::Restart,
        params: json!({}),
        status: flotilla_server::model::CommandStatus::Queued,
        created_at: now,
        sent_at: None,
        finished_at: None,
        expires_at: now + 60_000,
        result: None,
        error: None,
        actor: "ops".into(),
        channel: flotilla_server::model::Channel::Rest,
        audit_id: None,
    };
    let caller = flotilla_server::model::Caller::system();
    let mut audit = flotilla_server::model::NewAudit::new(&caller, "command.queue");
    audit.targets = vec![fresh.to_string(), cmd.id.to_string()];
    audit.params = json!({"kind": "restart", "params": {}});
    store
        .enqueue(None, std::slice::from_ref(&cmd), audit)
        .await
        .unwrap();
    assert!(
        poll(&server, fresh, 1, &[]).await.command.is_some(),
        "legacy commands are delivered"
    );
    // Put the batch command back where it was: the chain holds, one command is legacy.
    tamper(&server, &format!("UPDATE commands SET agent_uid = '{w1}' WHERE batch_id = '{batch}' AND agent_uid = '{db}'")).await;
    let (_, v) = rest.get("/api/v1/audit/verify").await;
    assert_eq!(v["intact"], true, "{v}");
    assert_eq!(
        (
            v["commands_verified"].as_u64(),
            v["commands_legacy"].as_u64()
        ),
        (Some(2), Some(1)),
        "{v}"
    );
    server.stop().await;
}

/// `GET /api/v1/whoami`: the caller as the server audits it. A token marked `gateway` says so,
/// and acting for a chat user it is `<token> for <identity>` in the platform's channel with the
/// lower of the two roles; an ordinary token acting for anyone is refused (403).
#[tokio::test]
async fn whoami_names_the_caller_and_marks_gateway_tokens() {
    use crate::support::OPERATOR_TOKEN;
    const GATEWAY: &str = "gateway-secret-token-0123456789";
    let server = TestServer::start_with(|c| {
        let tokens = c.api.tokens_file.clone().unwrap();
        let mut text = std::fs::read_to_string(&tokens).unwrap();
        text.push_str(&format!("chatgw admin {GATEWAY} gateway\n"));
        flotilla_e2e::write_secret(&tokens, text);
    })
    .await;
    let (s, v) = server
        .rest_as(Some(OPERATOR_TOKEN))
        .get("/api/v1/whoami")
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"actor": "ops", "channel": "rest", "role": "operator", "gateway": false})
    );
    let (_, v) = server.rest_as(Some(GATEWAY)).get("/api/v1/whoami").await;
    assert_eq!(
        v,
        json!({"actor": "chatgw", "channel": "rest", "role": "admin", "gateway": true})
    );
    let http = reqwest::Client::new();
    let acting = |token: &str| {
        http.get(server.api_url("/api/v1/whoami"))
            .bearer_auth(token)
            .header(
                "X-Flotilla-Acting-For",
                "discord%3AG1%2F42%20%28Z%C3%B6e%29",
            )
            .header("X-Flotilla-Acting-Role", "operator")
            .send()
    };
    let r = acting(GATEWAY).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"actor": "chatgw for discord:G1/42 (Zöe)", "channel": "discord",
               "role": "operator", "gateway": true})
    );
    let r = acting(OPERATOR_TOKEN).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "forbidden", "{v}");
}

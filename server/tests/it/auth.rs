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

//! The stdio transport and [`RestBackend`] against the real `flotilla` binary: `flotilla serve`
//! with simulated OpAMP agents, and `flotilla mcp --server URL --token-file F` launched as a
//! child process and driven by rmcp's client, as Claude ElicitingClient or Codex would launch it.
//! Effects are checked on the server through its REST API.

use flotilla_e2e::agent::HttpAgent;
use flotilla_e2e::{flotilla_bin, Home, Server};
use flotilla_mcp::{AuditFilter, CommandsFilter, FleetBackend, QueueTarget, RestBackend};
use std::sync::atomic::Ordering;

use flotilla_e2e::mcp_client::ElicitingClient;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

async fn agent(server: &Server, name: &str) -> HttpAgent {
    let mut a = HttpAgent::fluent_like(&server.opamp_url(), name);
    let msg = a.full_state();
    a.send(msg).await;
    a
}

#[tokio::test]
async fn rest_backend_answers_exactly_like_rest() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let a = agent(&server, "alpha").await;
    let _b = agent(&server, "beta").await;
    let backend = RestBackend::new(&server.url(""), Some(home.tokens.operator.clone())).unwrap();

    let got = backend.search("alpha", Some(10), None, true).await.unwrap();
    let rest = server
        .get("/api/v1/agents?q=alpha&limit=10&total=true")
        .await
        .expect(200, "search");
    assert_eq!(got, rest);
    assert_eq!(got["total"], 1);
    // The agent view embeds live state (last_seen, state); compare its stable part.
    let got = backend.agent(&a.uid_str()).await.unwrap();
    assert_eq!(got["uid"], a.uid_str());
    assert_eq!(got["identifying_attributes"]["service.name"], "alpha");
    assert_eq!(backend.summary().await.unwrap()["total"], 2);
    let cat = backend.catalog().await.unwrap();
    assert_eq!(
        cat,
        server.get("/api/v1/catalog").await.expect(200, "catalog")
    );

    let q = backend
        .queue(
            &QueueTarget::Agent(a.uid_str()),
            "force_resync",
            &json!({}),
            None,
        )
        .await
        .unwrap();
    let id = q["command_id"].as_str().unwrap().to_string();
    assert_eq!(
        backend.command(&id).await.unwrap(),
        server
            .get(&format!("/api/v1/commands/{id}"))
            .await
            .expect(200, "command")
    );
    let fan = backend
        .queue(
            &QueueTarget::Query("type:fluentbit".into()),
            "force_resync",
            &json!({}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(fan["queued"], 2);
    // The plan is REST's dry run, and its expect_targets is honoured by queue.
    let target = QueueTarget::Query("type:fluentbit".into());
    let plan = backend
        .plan(&target, "force_resync", &json!({}))
        .await
        .unwrap();
    assert_eq!(
        plan,
        server
            .post(
                "/api/v1/commands",
                &json!({"query": "type:fluentbit", "kind": "force_resync", "dry_run": true}),
            )
            .await
            .expect(200, "dry run")
    );
    assert_eq!(plan["target_count"], 2);
    let stale = flotilla_mcp::ExpectedTargets {
        count: 1,
        digest: "00".into(),
    };
    let e = backend
        .queue(&target, "force_resync", &json!({}), Some(&stale))
        .await
        .unwrap_err();
    assert_eq!(e.code, "targets_changed", "{e}");
    let expect: flotilla_mcp::ExpectedTargets =
        serde_json::from_value(plan["expect_targets"].clone()).unwrap();
    assert_eq!(
        backend
            .queue(&target, "force_resync", &json!({}), Some(&expect))
            .await
            .unwrap()["queued"],
        2
    );
    let batch = fan["batch_id"].as_str().unwrap();
    assert_eq!(backend.batch(batch).await.unwrap()["counts"]["queued"], 2);
    let list = backend
        .commands(&CommandsFilter {
            agent: Some(a.uid_str()),
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    let cancelled = backend.cancel(&id).await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let audit = backend
        .audit(&AuditFilter {
            operation: Some("command.cancel".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(audit["items"][0]["actor"], flotilla_e2e::server::OPERATOR);
    // Relayed through REST, the call is still audited as coming over MCP.
    assert_eq!(audit["items"][0]["channel"], "mcp");

    // Errors carry the REST codes.
    let e = backend
        .agent(&uuid::Uuid::now_v7().to_string())
        .await
        .unwrap_err();
    assert_eq!(e.code, "not_found");
    let e = backend
        .search("bogus:key", None, None, false)
        .await
        .unwrap_err();
    assert_eq!(e.code, "invalid_query");
    let e = backend
        .queue(
            &QueueTarget::Agent(a.uid_str()),
            "explode",
            &json!({}),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "invalid_params");
    let viewer = RestBackend::new(&server.url(""), Some(home.tokens.viewer.clone())).unwrap();
    let e = viewer
        .queue(
            &QueueTarget::Agent(a.uid_str()),
            "force_resync",
            &json!({}),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "forbidden");
    let nobody = RestBackend::new(&server.url(""), Some("not-a-token-0123456789".into())).unwrap();
    assert_eq!(nobody.summary().await.unwrap_err().code, "unauthorized");
    let down = RestBackend::new("http://127.0.0.1:9", None).unwrap();
    assert_eq!(down.summary().await.unwrap_err().code, "unavailable");
    assert_ne!(backend.identity(), viewer.identity());
}

type Client = RunningService<RoleClient, ElicitingClient>;

fn mcp_command(
    server_url: &str,
    token_file: &std::path::Path,
    read_only: bool,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(flotilla_bin());
    cmd.args(["mcp", "--server", server_url])
        .arg("--token-file")
        .arg(token_file)
        .env("FLOTILLA_LOG", "warn")
        .env_remove("FLOTILLA_TOKEN");
    if read_only {
        cmd.arg("--read-only");
    }
    cmd
}

async fn stdio_client_with(
    server_url: &str,
    token_file: &std::path::Path,
    read_only: bool,
    handler: ElicitingClient,
) -> Client {
    handler
        .serve(
            TokioChildProcess::new(mcp_command(server_url, token_file, read_only))
                .expect("spawn flotilla mcp"),
        )
        .await
        .expect("MCP initialize over stdio")
}

async fn stdio_client(server: &Server, token_file: &std::path::Path, read_only: bool) -> Client {
    stdio_client_with(
        &server.url(""),
        token_file,
        read_only,
        ElicitingClient::default(),
    )
    .await
}

async fn call(c: &Client, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(m) = args else {
        panic!("args must be an object")
    };
    c.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(m))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

fn ok(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool error: {:?}", r.content);
    r.structured_content.clone().expect("structured content")
}

/// The stable code of a tool error: its text reads `error (<code>): <message>`; a tool error
/// carries no structured content (that is for the output schema of a success).
fn err_code(r: &CallToolResult) -> String {
    assert_eq!(r.is_error, Some(true), "expected an error: {:?}", r.content);
    assert!(r.structured_content.is_none(), "{:?}", r.structured_content);
    let text = r.content[0].as_text().expect("text content").text.clone();
    text.strip_prefix("error (")
        .and_then(|t| t.split_once("): "))
        .map(|(code, _)| code.to_string())
        .unwrap_or_else(|| panic!("not a tool error text: {text}"))
}

async fn commands(server: &Server) -> Vec<Value> {
    server
        .get("/api/v1/commands?limit=1000")
        .await
        .expect(200, "commands")["items"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn stdio_server_drives_every_tool() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let a = agent(&server, "alpha").await;
    let b = agent(&server, "beta").await;
    let token_file = home.path().join("operator.token");
    std::fs::write(&token_file, format!("{}\n", home.tokens.operator)).unwrap();
    let c = stdio_client(&server, &token_file, false).await;

    let tools = c.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 11);
    assert_eq!(c.list_all_prompts().await.unwrap().len(), 3);

    let v = ok(&call(&c, "agents_search", json!({"query": "type:fluentbit"})).await);
    assert_eq!(v["total"], 2);
    // HttpAgent reports host.name "<name>-host".
    let v = ok(&call(
        &c,
        "agent_get",
        json!({"agent": "alpha-host", "include": ["effective_config"]}),
    )
    .await);
    assert_eq!(v["uid"], a.uid_str());
    assert!(v["effective_config"]["fluent-bit.conf"].is_object(), "{v}");
    assert_eq!(ok(&call(&c, "fleet_summary", json!({})).await)["total"], 2);
    assert_eq!(
        ok(&call(&c, "commands_catalog", json!({})).await)["kinds"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let v = ok(&call(&c, "remote_config_get", json!({"agent": "beta"})).await);
    assert_eq!(v["uid"], b.uid_str());

    // Destructive without confirmation: nothing queued; with the token: exactly one.
    let args = json!({"agent": "alpha-host", "kind": "restart"});
    let v = ok(&call(&c, "command_queue", args.clone()).await);
    assert_eq!(v["status"], "confirmation_required");
    assert!(commands(&server).await.is_empty());
    let mut with = args.clone();
    with["confirmation_token"] = v["confirmation_token"].clone();
    let v = ok(&call(&c, "command_queue", with).await);
    assert_eq!(v["status"], "queued");
    let id = v["command_id"].as_str().unwrap().to_string();
    let all = commands(&server).await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0]["kind"].as_str(), all[0]["actor"].as_str()),
        (Some("restart"), Some(flotilla_e2e::server::OPERATOR))
    );

    let v = ok(&call(
        &c,
        "command_queue",
        json!({"query": "type:fluentbit", "kind": "force_resync", "dry_run": true}),
    )
    .await);
    assert_eq!(v["total_targets"], 2);
    assert_eq!(commands(&server).await.len(), 1);
    let v = ok(&call(&c, "command_status", json!({"command_id": id})).await);
    assert_eq!(v["kind"], "restart");
    let v = ok(&call(&c, "commands_list", json!({"agent": "alpha"})).await);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let v = ok(&call(&c, "command_cancel", json!({"command_id": id})).await);
    assert_eq!(v["status"], "cancelled");
    let push = json!({"agent": "beta-host", "files": {"fluent-bit.conf": "[SERVICE]\n"}});
    let v = ok(&call(&c, "remote_config_push", push.clone()).await);
    let mut with = push;
    with["confirmation_token"] = v["confirmation_token"].clone();
    assert_eq!(
        ok(&call(&c, "remote_config_push", with).await)["command"]["kind"],
        "remote_config"
    );
    assert_eq!(commands(&server).await.len(), 2);
    let v = ok(&call(&c, "audit_query", json!({"operation": "command.queue"})).await);
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    // Relayed through REST, every command and audit record still says it came over MCP.
    let all = commands(&server).await;
    assert!(all.iter().all(|c| c["channel"] == "mcp"), "{all:?}");
    let trail = server
        .get("/api/v1/audit?limit=1000")
        .await
        .expect(200, "audit")["items"]
        .as_array()
        .unwrap()
        .clone();
    let ops: Vec<&str> = trail
        .iter()
        .filter(|r| r["actor"] == flotilla_e2e::server::OPERATOR)
        .map(|r| {
            assert_eq!(r["channel"], "mcp", "{r}");
            r["operation"].as_str().unwrap()
        })
        .collect();
    for op in ["command.queue", "command.cancel"] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }

    assert_eq!(
        err_code(&call(&c, "agent_get", json!({"agent": "nope"})).await),
        "not_found"
    );
    assert_eq!(
        err_code(&call(&c, "agent_get", json!({})).await),
        "invalid_arguments"
    );
    let e = c
        .call_tool(CallToolRequestParams::new("nope"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown tool"), "{e}");
    c.cancel().await.unwrap();
}

#[tokio::test]
async fn stdio_read_only_and_bad_token() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let a = agent(&server, "alpha").await;
    let token_file = home.path().join("operator.token");
    std::fs::write(&token_file, &home.tokens.operator).unwrap();
    let c = stdio_client(&server, &token_file, true).await;
    let names: Vec<String> = c
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(names.len(), 8);
    // A command the read-only client must not be able to cancel.
    let queued = server
        .post(
            &format!("/api/v1/agents/{}/commands", a.uid_str()),
            &json!({"kind": "force_resync"}),
        )
        .await
        .expect(202, "queue")["command_id"]
        .as_str()
        .unwrap()
        .to_string();
    for (tool, args) in [
        (
            "command_queue",
            json!({"agent": a.uid_str(), "kind": "force_resync"}),
        ),
        ("command_cancel", json!({"command_id": queued})),
        (
            "remote_config_push",
            json!({"agent": a.uid_str(), "files": {"f.conf": "x"}}),
        ),
    ] {
        assert!(!names.iter().any(|n| n == tool), "{tool} listed");
        let e = c
            .call_tool(
                CallToolRequestParams::new(tool).with_arguments(args.as_object().unwrap().clone()),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-only"), "{tool}: {e}");
    }
    let all = commands(&server).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["status"], "queued");
    assert_eq!(c.list_all_prompts().await.unwrap().len(), 2);
    c.cancel().await.unwrap();

    let bad = home.path().join("bad.token");
    std::fs::write(&bad, "not-a-valid-token-0123456789").unwrap();
    let c = stdio_client(&server, &bad, false).await;
    assert_eq!(
        err_code(&call(&c, "fleet_summary", json!({})).await),
        "unauthorized"
    );
    c.cancel().await.unwrap();
}

#[tokio::test]
async fn stdio_elicitation_confirms_or_declines() {
    let home = Home::new();
    let server = Server::start(&home).await;
    let a = agent(&server, "alpha").await;
    let token_file = home.path().join("operator.token");
    std::fs::write(&token_file, &home.tokens.operator).unwrap();
    let args = json!({"agent": "alpha-host", "kind": "restart"});
    let mut queued = 0;
    for accept in [false, true] {
        let handler = ElicitingClient {
            elicit: Some(accept),
            ..Default::default()
        };
        let asked = handler.asked.clone();
        let c = stdio_client_with(&server.url(""), &token_file, false, handler).await;
        let v = ok(&call(&c, "command_queue", args.clone()).await);
        assert_eq!(asked.load(Ordering::SeqCst), 1, "the user was asked once");
        if accept {
            queued += 1;
            assert_eq!(v["status"], "queued", "{v}");
            assert_eq!(v["command"]["agent_uid"], a.uid_str());
        } else {
            assert_eq!(v["status"], "declined", "{v}");
        }
        let all = commands(&server).await;
        assert_eq!(all.len(), queued, "accept={accept}");
        c.cancel().await.unwrap();
    }
    let all = commands(&server).await;
    assert_eq!(
        (all[0]["kind"].as_str(), all[0]["channel"].as_str()),
        (Some("restart"), Some("mcp"))
    );
}

#[tokio::test]
async fn stdio_answers_at_once_when_the_server_is_unreachable() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = Home::new();
    let token_file = home.path().join("t.token");
    std::fs::write(&token_file, "some-token-0123456789").unwrap();
    // initialize is answered without waiting for the Flotilla server; tools are listed...
    let c = stdio_client_with(
        &format!("http://127.0.0.1:{port}"),
        &token_file,
        false,
        ElicitingClient::default(),
    )
    .await;
    assert_eq!(c.list_all_tools().await.unwrap().len(), 11);
    // ...and each call says clearly that the server cannot be reached.
    for (tool, args) in [
        ("fleet_summary", json!({})),
        ("agents_search", json!({"query": "type:fluentbit"})),
    ] {
        let r = call(&c, tool, args).await;
        assert_eq!(err_code(&r), "unavailable", "{tool}");
        let text = &r.content[0].as_text().unwrap().text;
        assert!(
            text.contains("cannot reach Flotilla") && text.contains(&port.to_string()),
            "{text}"
        );
    }
    c.cancel().await.unwrap();
}

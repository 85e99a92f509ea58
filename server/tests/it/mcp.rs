//! MCP over the operator listener, driven by real MCP clients: rmcp's client on streamable
//! HTTP (the 2026-07-28 stateless revision and the session-based revision) and the official
//! Python SDK (`tests/peers/python/mcp_client.py`) on streamable HTTP and legacy SSE. Every
//! assertion about an effect is made on the server's state (commands, audit), read back
//! through REST, not on the MCP reply alone.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use flotilla_e2e::mcp_client::ElicitingClient;
use flotilla_proto::AgentCapabilities as Cap;
use flotilla_server::commands::CAP_CHATOPS;
use rmcp::model::{CallToolRequestParams, CallToolResult, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{
    peers_dir, peers_python_in, register_agent, register_agent_with_health, repo_root, TestServer,
    ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN,
};

const STATUS: u64 = Cap::ReportsStatus as u64;
const ALL_CAPS: u64 = STATUS | Cap::AcceptsRestartCommand as u64 | Cap::AcceptsRemoteConfig as u64;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Revision {
    /// 2026-07-28: `server/discover`, stateless requests, MRTR for elicitation.
    Modern,
    /// `initialize` + `Mcp-Session-Id` (2025-11-25 and older).
    Session,
}

pub(crate) type Client = RunningService<RoleClient, ElicitingClient>;

pub(crate) async fn connect(
    server: &TestServer,
    token: &str,
    rev: Revision,
    handler: ElicitingClient,
) -> Client {
    let cfg = StreamableHttpClientTransportConfig::with_uri(server.api_url("/mcp"))
        .auth_header(token.to_string());
    let transport = StreamableHttpClientTransport::from_config(cfg);
    match rev {
        Revision::Session => handler.serve(transport).await.expect("MCP initialize"),
        Revision::Modern => handler
            .serve_with_lifecycle(
                transport,
                ClientLifecycleMode::Discover {
                    preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                },
            )
            .await
            .expect("MCP discover"),
    }
}

/// An operator's session without elicitation (the two-step token flow).
async fn operator(server: &TestServer, rev: Revision) -> Client {
    connect(server, OPERATOR_TOKEN, rev, ElicitingClient::default()).await
}

pub(crate) async fn call(c: &Client, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(m) = args else {
        panic!("args must be an object")
    };
    c.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(m))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// The structured answer of a successful call.
pub(crate) fn ok(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool error: {:?}", r.content);
    r.structured_content.clone().expect("structured content")
}

/// The error code and message of a failed call. A tool error is text only,
/// `error (<code>): <message>`: structured content would have to match the output schema,
/// which describes successes.
pub(crate) fn fail(r: &CallToolResult) -> (String, String) {
    assert_eq!(
        r.is_error,
        Some(true),
        "expected a tool error: {:?}",
        r.content
    );
    assert!(r.structured_content.is_none(), "{:?}", r.structured_content);
    let text = r.content[0].as_text().expect("text content").text.clone();
    parse_tool_error(&text)
}

fn parse_tool_error(text: &str) -> (String, String) {
    let (code, message) = text
        .strip_prefix("error (")
        .and_then(|t| t.split_once("): "))
        .unwrap_or_else(|| panic!("not a tool error text: {text}"));
    (code.to_string(), message.to_string())
}

struct Fleet {
    web1: Uuid,
    web3: Uuid,
    dup: [Uuid; 2],
}

async fn fleet(server: &TestServer) -> Fleet {
    let web1 = register_agent_with_health(
        server,
        &[
            ("service.name", "fluent-bit"),
            ("service.version", "5.1.1"),
            ("host.name", "web-1"),
        ],
        ALL_CAPS,
        &[CAP_CHATOPS],
        true,
    )
    .await;
    let web3 = register_agent_with_health(
        server,
        &[
            ("service.name", "fluentd"),
            ("service.version", "1.17.0"),
            ("host.name", "web-3"),
        ],
        ALL_CAPS,
        &[],
        false,
    )
    .await;
    let mut dup = [Uuid::nil(); 2];
    for d in &mut dup {
        *d = register_agent(
            server,
            &[("service.name", "fluent-bit"), ("host.name", "dup")],
            STATUS,
            &[],
        )
        .await;
    }
    Fleet { web1, web3, dup }
}

/// All commands of the fleet, newest first, through REST.
async fn commands(server: &TestServer) -> Vec<Value> {
    let (s, v) = server.rest().get("/api/v1/commands?limit=1000").await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().unwrap().clone()
}

async fn audit(server: &TestServer, query: &str) -> Vec<Value> {
    let (s, v) = server
        .rest()
        .get(&format!("/api/v1/audit?limit=1000&{query}"))
        .await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_tool_over_streamable_http_both_revisions() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    for rev in [Revision::Modern, Revision::Session] {
        let c = operator(&server, rev).await;
        let tools = c.list_all_tools().await.unwrap();
        assert_eq!(tools.len(), 11, "{rev:?}");
        let queue = tools.iter().find(|t| t.name == "command_queue").unwrap();
        let a = queue.annotations.as_ref().unwrap();
        assert_eq!(
            (a.read_only_hint, a.destructive_hint, a.idempotent_hint),
            (Some(false), Some(true), Some(false))
        );
        assert!(queue.output_schema.is_some());
        let search = tools.iter().find(|t| t.name == "agents_search").unwrap();
        assert_eq!(
            search.annotations.as_ref().unwrap().read_only_hint,
            Some(true)
        );

        // Read-only tools.
        let v = ok(&call(
            &c,
            "agents_search",
            json!({"query": "type:fluentd health:unhealthy"}),
        )
        .await);
        assert_eq!(v["total"], 1, "{v}");
        assert_eq!(v["items"][0]["uid"], f.web3.to_string());
        let v = ok(&call(&c, "agents_search", json!({"limit": 1})).await);
        assert_eq!(
            (v["total"].as_u64(), v["items"].as_array().unwrap().len()),
            (Some(4), 1)
        );
        let next = v["next_cursor"].as_str().unwrap().to_string();
        let v = ok(&call(&c, "agents_search", json!({"limit": 1, "cursor": next})).await);
        assert_eq!(v["items"].as_array().unwrap().len(), 1);

        let v = ok(&call(&c, "agent_get", json!({"agent": "web-3"})).await);
        assert_eq!(v["uid"], f.web3.to_string());
        assert_eq!(v["health"]["healthy"], false);
        assert!(v.get("effective_config").is_none());
        let v = ok(&call(
            &c,
            "agent_get",
            json!({"agent": f.web1.to_string(), "include": ["health", "recent_commands", "attributes", "effective_config"]}),
        )
        .await);
        assert_eq!(v["host"], "web-1");
        assert!(v["recent_commands"].is_array() && v["non_identifying_attributes"].is_object());

        let v = ok(&call(&c, "fleet_summary", json!({})).await);
        assert_eq!(v["total"], 4);
        assert_eq!(v["by_type"]["fluentd"], 1);
        let v = ok(&call(&c, "commands_catalog", json!({})).await);
        assert_eq!(v["kinds"].as_array().unwrap().len(), 7);
        let v = ok(&call(&c, "remote_config_get", json!({"agent": "web-1"})).await);
        assert_eq!(v["uid"], f.web1.to_string());

        // A non-destructive kind on one agent queues at once, as the caller, channel mcp.
        let before = commands(&server).await.len();
        let v = ok(&call(
            &c,
            "command_queue",
            json!({"agent": "web-1", "kind": "force_resync"}),
        )
        .await);
        assert_eq!(v["status"], "queued");
        let id = v["command_id"].as_str().unwrap().to_string();
        let all = commands(&server).await;
        assert_eq!(all.len(), before + 1);
        assert_eq!(all[0]["id"], id);
        assert_eq!(
            (all[0]["channel"].as_str(), all[0]["actor"].as_str()),
            (Some("mcp"), Some("ops"))
        );

        // Two-step confirmation: nothing, then exactly one command; the token is single use.
        let args = json!({"agent": "web-1", "kind": "restart"});
        let v = ok(&call(&c, "command_queue", args.clone()).await);
        assert_eq!(v["status"], "confirmation_required", "{v}");
        assert_eq!(v["preview"]["target"]["agent"]["uid"], f.web1.to_string());
        let token = v["confirmation_token"].as_str().unwrap().to_string();
        assert_eq!(
            commands(&server).await.len(),
            before + 1,
            "unconfirmed call queued"
        );
        let mut with = args.clone();
        with["confirmation_token"] = json!(token);
        let v = ok(&call(&c, "command_queue", with.clone()).await);
        assert_eq!(v["status"], "queued");
        let restart_id = v["command_id"].as_str().unwrap().to_string();
        let all = commands(&server).await;
        assert_eq!(all.len(), before + 2);
        assert_eq!(
            (all[0]["id"].as_str(), all[0]["kind"].as_str()),
            (Some(restart_id.as_str()), Some("restart"))
        );
        let (code, _) = fail(&call(&c, "command_queue", with).await);
        assert_eq!(code, "confirmation_invalid");
        // A token is bound to its arguments.
        let v = ok(&call(&c, "command_queue", args.clone()).await);
        let mut other = json!({"agent": "web-3", "kind": "restart"});
        other["confirmation_token"] = v["confirmation_token"].clone();
        assert_eq!(
            fail(&call(&c, "command_queue", other).await).0,
            "confirmation_invalid"
        );
        assert_eq!(commands(&server).await.len(), before + 2);

        // Fan-out: dry run shows targets, queues nothing; confirmed, one batch.
        let v = ok(&call(
            &c,
            "command_queue",
            json!({"query": "host:web-*", "kind": "force_resync", "dry_run": true}),
        )
        .await);
        assert_eq!(
            (v["status"].as_str(), v["total_targets"].as_u64()),
            (Some("dry_run"), Some(2))
        );
        assert_eq!(commands(&server).await.len(), before + 2);
        let fan = json!({"query": "host:web-*", "kind": "force_resync"});
        let v = ok(&call(&c, "command_queue", fan.clone()).await);
        assert_eq!(v["status"], "confirmation_required");
        let mut with = fan.clone();
        with["confirmation_token"] = v["confirmation_token"].clone();
        let v = ok(&call(&c, "command_queue", with).await);
        assert_eq!(
            (v["status"].as_str(), v["queued"].as_u64()),
            (Some("queued"), Some(2))
        );
        let batch = v["batch_id"].as_str().unwrap().to_string();
        assert_eq!(commands(&server).await.len(), before + 4);

        let v = ok(&call(&c, "command_status", json!({"command_id": restart_id})).await);
        assert_eq!(
            (v["kind"].as_str(), v["status"].as_str()),
            (Some("restart"), Some("queued"))
        );
        let v = ok(&call(&c, "command_status", json!({"batch_id": batch})).await);
        assert_eq!(v["counts"]["queued"], 2);
        let v = ok(&call(
            &c,
            "commands_list",
            json!({"agent": "web-1", "kind": "restart"}),
        )
        .await);
        assert!(v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == restart_id));

        let v = ok(&call(&c, "command_cancel", json!({"command_id": restart_id})).await);
        assert_eq!(v["status"], "cancelled");
        let (s, got) = server
            .rest()
            .get(&format!("/api/v1/commands/{restart_id}"))
            .await;
        assert_eq!((s, got["status"].as_str()), (200, Some("cancelled")));

        // Config push: confirmed through the token, one remote_config command.
        let push =
            json!({"agent": "web-1", "files": {"fluent-bit.conf": "[SERVICE]\n    flush 5\n"}});
        let v = ok(&call(&c, "remote_config_push", push.clone()).await);
        assert_eq!(v["status"], "confirmation_required");
        assert_eq!(
            v["preview"]["params"]["files"]["fluent-bit.conf"],
            "<22 bytes>"
        );
        let mut with = push.clone();
        with["confirmation_token"] = v["confirmation_token"].clone();
        let v = ok(&call(&c, "remote_config_push", with).await);
        assert_eq!(v["command"]["kind"], "remote_config");
        assert_eq!(commands(&server).await.len(), before + 5);

        // The audit trail names the MCP channel and the caller for every change.
        let v = ok(&call(&c, "audit_query", json!({"channel": "mcp", "limit": 100})).await);
        let ops: Vec<&str> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["operation"].as_str().unwrap())
            .collect();
        for op in ["command.queue", "batch.queue", "command.cancel"] {
            assert!(ops.contains(&op), "{op} missing from {ops:?}");
        }
        let recs = audit(&server, "channel=mcp").await;
        assert_eq!(recs.len(), v["items"].as_array().unwrap().len());
        assert!(recs.iter().all(|r| r["actor"] == "ops"));
        let v = ok(&call(
            &c,
            "audit_query",
            json!({"agent": "web-1", "operation": "command.queue"}),
        )
        .await);
        assert!(!v["items"].as_array().unwrap().is_empty());

        // The MCP backend renders records exactly as REST does (the backend contract).
        let (_, rest_cmd) = server.rest().get(&format!("/api/v1/commands/{id}")).await;
        assert_eq!(
            ok(&call(&c, "command_status", json!({"command_id": id})).await),
            rest_cmd
        );
        let (_, rest_batch) = server.rest().get(&format!("/api/v1/batches/{batch}")).await;
        assert_eq!(
            ok(&call(&c, "command_status", json!({"batch_id": batch})).await),
            rest_batch
        );
        let (_, rest_audit) = server.rest().get("/api/v1/audit?channel=mcp&limit=5").await;
        assert_eq!(
            ok(&call(&c, "audit_query", json!({"channel": "mcp", "limit": 5})).await),
            rest_audit
        );

        // Prompts and resources.
        let prompts = c.list_all_prompts().await.unwrap();
        assert_eq!(prompts.len(), 3);
        let resources = c.list_all_resources().await.unwrap();
        assert!(resources
            .iter()
            .any(|r| r.uri == format!("flotilla://agents/{}", f.web3)));
        let read = c
            .read_resource(rmcp::model::ReadResourceRequestParams::new(
                "flotilla://agents/web-3",
            ))
            .await
            .unwrap();
        let text = serde_json::to_value(&read.contents[0]).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["uid"],
            f.web3.to_string()
        );
        let _ = f.dup;
        c.cancel().await.unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gives_clear_errors() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    let c = operator(&server, Revision::Modern).await;
    let err = c
        .call_tool(CallToolRequestParams::new("restart_everything"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown tool") && err.contains("agents_search"),
        "{err}"
    );
    let (code, msg) = fail(&call(&c, "agents_search", json!({"limit": "many"})).await);
    assert_eq!(code, "invalid_arguments");
    assert!(msg.contains("limit"), "{msg}");
    let (code, msg) = fail(&call(&c, "agent_get", json!({"agent": "web-1", "typo": 1})).await);
    assert_eq!(code, "invalid_arguments");
    assert!(msg.contains("typo"), "{msg}");
    let (code, msg) = fail(&call(&c, "agent_get", json!({"agent": "web-404"})).await);
    assert_eq!(code, "not_found");
    assert!(msg.contains("web-404"), "{msg}");
    let (code, _) = fail(
        &call(
            &c,
            "agent_get",
            json!({"agent": Uuid::now_v7().to_string()}),
        )
        .await,
    );
    assert_eq!(code, "not_found");
    let (code, msg) = fail(
        &call(
            &c,
            "command_queue",
            json!({"agent": "dup", "kind": "force_resync"}),
        )
        .await,
    );
    assert_eq!(code, "ambiguous_agent");
    for d in f.dup {
        assert!(msg.contains(&d.to_string()), "{msg}");
    }
    let (code, _) = fail(&call(&c, "agents_search", json!({"query": "bogus:key"})).await);
    assert_eq!(code, "invalid_query");
    let (code, msg) = fail(
        &call(
            &c,
            "command_queue",
            json!({"agent": "web-1", "kind": "explode"}),
        )
        .await,
    );
    assert_eq!(code, "invalid_params");
    assert!(msg.contains("explode"), "{msg}");
    let (code, _) = fail(
        &call(
            &c,
            "command_queue",
            json!({"agent": "web-1", "query": "x", "kind": "restart"}),
        )
        .await,
    );
    assert_eq!(code, "invalid_arguments");
    assert!(commands(&server).await.is_empty());

    // Roles come from the service: a viewer can read, not queue.
    let v = connect(
        &server,
        VIEWER_TOKEN,
        Revision::Modern,
        ElicitingClient::default(),
    )
    .await;
    ok(&call(&v, "fleet_summary", json!({})).await);
    let (code, _) = fail(
        &call(
            &v,
            "command_queue",
            json!({"agent": f.web1.to_string(), "kind": "force_resync"}),
        )
        .await,
    );
    assert_eq!(code, "forbidden");
    assert!(commands(&server).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn read_only_mode_refuses_every_state_changing_tool() {
    let server = TestServer::start_with(|c| c.mcp.read_only = true).await;
    let f = fleet(&server).await;
    for rev in [Revision::Modern, Revision::Session] {
        let c = operator(&server, rev).await;
        let names: Vec<String> = c
            .list_all_tools()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        assert_eq!(names.len(), 8, "{names:?}");
        for t in ["command_queue", "command_cancel", "remote_config_push"] {
            assert!(
                !names.iter().any(|n| n == t),
                "{t} listed in read-only mode"
            );
            let args = json!({"agent": f.web1.to_string(), "kind": "force_resync", "command_id": Uuid::nil().to_string(),
                              "files": {"a": "b"}});
            let Value::Object(m) = args else {
                unreachable!()
            };
            let err = c
                .call_tool(CallToolRequestParams::new(t).with_arguments(m))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("read-only"), "{t}: {err}");
        }
        ok(&call(&c, "fleet_summary", json!({})).await);
        c.cancel().await.unwrap();
    }
    assert!(commands(&server).await.is_empty());
    assert!(audit(&server, "channel=mcp").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn elicitation_confirms_or_declines() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    let args = json!({"agent": f.web1.to_string(), "kind": "restart"});
    let mut queued = 0;
    // Modern revision: MRTR (input_required, then a retry carrying the answer); session
    // revision: a server-to-client elicitation request.
    for rev in [Revision::Modern, Revision::Session] {
        for accept in [false, true] {
            let handler = ElicitingClient {
                elicit: Some(accept),
                ..Default::default()
            };
            let asked = handler.asked.clone();
            let c = connect(&server, OPERATOR_TOKEN, rev, handler).await;
            let v = ok(&call(&c, "command_queue", args.clone()).await);
            assert_eq!(
                asked.load(Ordering::SeqCst),
                1,
                "{rev:?}: the user was asked once"
            );
            if accept {
                queued += 1;
                assert_eq!(v["status"], "queued", "{rev:?}: {v}");
            } else {
                assert_eq!(v["status"], "declined", "{rev:?}: {v}");
            }
            let all = commands(&server).await;
            assert_eq!(all.len(), queued, "{rev:?} accept={accept}");
            c.cancel().await.unwrap();
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn authentication_and_dns_rebinding_protection() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "0"}}});
    for (path, token) in [
        ("/mcp", None),
        ("/mcp", Some("wrong-token-0123456789")),
        ("/sse", None),
    ] {
        let mut req = if path == "/sse" {
            http.get(server.api_url(path))
        } else {
            http.post(server.api_url(path)).json(&init)
        }
        .header("Accept", "application/json, text/event-stream");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path}");
        assert!(resp.headers().contains_key("www-authenticate"));
    }
    // A rebinding page reaches us with its own host name, or a foreign Origin: refused.
    for (path, host, origin) in [
        ("/mcp", "evil.example", None),
        ("/sse", "evil.example", None),
        ("/mcp", "127.0.0.1", Some("http://evil.example")),
        ("/sse", "127.0.0.1", Some("http://evil.example")),
    ] {
        let mut req = if path == "/sse" {
            http.get(server.api_url(path))
        } else {
            http.post(server.api_url(path)).json(&init)
        }
        .bearer_auth(OPERATOR_TOKEN)
        .header("Host", host)
        .header("Accept", "application/json, text/event-stream");
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.status().as_u16(),
            403,
            "{path} host={host} origin={origin:?}"
        );
    }
    server.stop().await;
}

/// The token budget (issue 14): what every session pays for the tool list, and what the
/// catalog costs, measured on the wire. `docs/benchmark-mcp.md` has the figures.
const TOOLS_LIST_BUDGET: usize = 10 * 1024;
const CATALOG_BUDGET: usize = 4 * 1024;

#[tokio::test]
async fn the_tool_list_and_the_catalog_fit_their_token_budgets_losing_nothing() {
    let server = TestServer::start().await;
    fleet(&server).await;
    let sid = open_session(&server, OPERATOR_TOKEN, "2025-06-18").await;
    let post = |body: Value| session_post(&server, &sid, Some("2025-06-18"), body);
    let list = rpc_answer(post(rpc(2, "tools/list", json!({}))).await.unwrap(), 2).await;
    let list_bytes = list.to_string().len();
    let cat = rpc_answer(
        post(rpc(
            3,
            "tools/call",
            json!({"name": "commands_catalog", "arguments": {}}),
        ))
        .await
        .unwrap(),
        3,
    )
    .await;
    let cat_bytes = cat.to_string().len();
    let structured = &cat["result"]["structuredContent"];
    let structured_bytes = structured.to_string().len();
    eprintln!(
        "tools/list response {list_bytes} bytes; commands_catalog response {cat_bytes} bytes, \
         structured {structured_bytes} bytes"
    );
    assert!(
        list_bytes <= TOOLS_LIST_BUDGET,
        "tools/list is {list_bytes} bytes"
    );
    assert!(
        structured_bytes <= CATALOG_BUDGET,
        "commands_catalog is {structured_bytes} bytes"
    );

    // Nothing lost: every kind's parameters are the REST catalog's, the shared ones said once.
    let (_, full) = server.rest().get("/api/v1/catalog").await;
    let shared = structured["every_kind_takes"].as_object().unwrap();
    assert!(shared.contains_key("ttl_seconds"), "{structured}");
    assert_eq!(structured["params_refuse_unknown_keys"], true);
    let kinds = structured["kinds"].as_array().unwrap();
    assert_eq!(kinds.len(), full["kinds"].as_array().unwrap().len());
    let mut outcomes = std::collections::BTreeSet::new();
    for (compact, whole) in kinds.iter().zip(full["kinds"].as_array().unwrap()) {
        for k in [
            "kind",
            "description",
            "requires",
            "destructive",
            "capable_agents",
        ] {
            assert_eq!(compact[k], whole[k], "{k}: {compact}");
        }
        let whole_params = whole["params_schema"]["properties"].as_object().unwrap();
        let mut params: serde_json::Map<String, Value> = shared.clone();
        if let Some(p) = compact["params"]["properties"].as_object() {
            params.extend(p.clone());
        }
        assert_eq!(&params, whole_params, "{}", compact["kind"]);
        assert_eq!(
            compact["params"]["required"], whole["params_schema"]["required"],
            "{}",
            compact["kind"]
        );
        assert_eq!(whole["params_schema"]["additionalProperties"], false);
        // An outcome several kinds share is written out once, then referred to.
        match compact["outcome"].as_str().unwrap().strip_prefix("as for ") {
            Some(first) => {
                let first = kinds.iter().find(|k| k["kind"] == first).unwrap();
                assert_eq!(first["outcome"], whole["outcome"]);
            }
            None => {
                assert_eq!(compact["outcome"], whole["outcome"]);
                assert!(outcomes.insert(whole["outcome"].to_string()));
            }
        }
    }

    // command_queue's kind is one of the catalog's kinds, and its params are typed with
    // every parameter any kind takes.
    let queue = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "command_queue")
        .unwrap();
    let props = &queue["inputSchema"]["properties"];
    let catalog_kinds: Vec<&Value> = full["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["kind"])
        .collect();
    let enum_kinds: Vec<&Value> = props["kind"]["enum"].as_array().unwrap().iter().collect();
    assert_eq!(enum_kinds, catalog_kinds);
    for whole in full["kinds"].as_array().unwrap() {
        for (name, schema) in whole["params_schema"]["properties"].as_object().unwrap() {
            let typed = &props["params"]["properties"][name];
            assert!(
                typed.is_object(),
                "params.{name} is not in command_queue's schema"
            );
            if let Some(t) = schema.get("type") {
                assert_eq!(&typed["type"], t, "params.{name}");
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_confirmation_shows_what_will_actually_be_sent() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    let c = operator(&server, Revision::Session).await;
    // ChatOps: the tag (the route the record takes) and the attributes posted.
    let v = ok(&call(
        &c,
        "command_queue",
        json!({"agent": "web-1", "kind": "chatops",
               "params": {"tag": "flush", "attributes": {"reason": "disk full"}}}),
    )
    .await);
    assert_eq!(v["status"], "confirmation_required", "{v}");
    let sends = v["preview"]["sends"].as_str().unwrap();
    assert_eq!(
        sends, r#"chatops (tag "flush"; attributes {"reason":"disk full"})"#,
        "{v}"
    );
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains(sends) && message.contains("on agent web-1"),
        "{message}"
    );

    // A config: its files with their sizes, and the hash the agent will be sent.
    let body = "[SERVICE]\n    Flush 1\n";
    let args = json!({"agent": "web-3", "files": {"fluent-bit.conf": body}, "ttl_seconds": 90});
    let v = ok(&call(&c, "remote_config_push", args.clone()).await);
    assert_eq!(v["status"], "confirmation_required", "{v}");
    let sends = v["preview"]["sends"].as_str().unwrap().to_string();
    let mut confirmed = args.clone();
    confirmed["confirmation_token"] = v["confirmation_token"].clone();
    let q = ok(&call(&c, "remote_config_push", confirmed).await);
    assert_eq!(q["status"], "queued", "{q}");
    let hash = q["command"]["params"]["hash"].as_str().unwrap();
    assert_eq!(
        sends,
        format!(
            "remote_config (1 file, {} bytes: fluent-bit.conf ({} bytes); config hash {hash}; \
             expires after 90 s in the queue)",
            body.len(),
            body.len()
        )
    );

    // A fan-out that matches one agent says so.
    let v = ok(&call(
        &c,
        "command_queue",
        json!({"query": "host:web-3", "kind": "force_resync"}),
    )
    .await);
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains(r#"force_resync on the 1 agent matching "host:web-3""#),
        "{message}"
    );
    assert!(!message.contains("all 1 agents"), "{message}");
    assert_eq!(
        v["preview"]["target"]["sample"][0]["uid"],
        f.web3.to_string()
    );
    c.cancel().await.unwrap();
    server.stop().await;
}

/// Runs `tests/peers/node/mcp_oauth_probe.js`: the official TypeScript SDK connecting with
/// `token`, with an OAuth client provider (`oauth`) as the MCP Inspector connects.
async fn ts_sdk_probe(url: &str, token: &str, oauth: bool) -> Value {
    let modules = peers_dir().join("node/node_modules");
    assert!(
        modules.join("@modelcontextprotocol/sdk").is_dir(),
        "the MCP TypeScript SDK is not installed in {}. Run `bash tests/peers/install.sh` first.",
        modules.display()
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(repo_root().join("tests/peers/node/mcp_oauth_probe.js"))
        .args(["--url", url, "--token", token])
        .env("NODE_PATH", &modules)
        .kill_on_drop(true);
    if oauth {
        cmd.arg("--oauth");
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("the TypeScript MCP probe timed out")
        .expect("run node");
    assert!(
        out.status.success(),
        "TypeScript MCP probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad probe output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn mcp_sessions_close_cleanly_and_a_wrong_token_is_plainly_unauthorized() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let url = server.api_url("/mcp");

    // Closing a session answers 204 (it was 202, which the Python SDK logs as
    // "Session termination failed: 202"), and the session is gone.
    let sid = open_session(&server, OPERATOR_TOKEN, "2025-06-18").await;
    let session_req = |method: reqwest::Method| {
        http.request(method, &url)
            .bearer_auth(OPERATOR_TOKEN)
            .header("Accept", "application/json, text/event-stream")
            .header("Mcp-Session-Id", &sid)
            .header("MCP-Protocol-Version", "2025-06-18")
    };
    let resp = session_req(reqwest::Method::DELETE).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let resp = session_req(reqwest::Method::POST)
        .json(&rpc(2, "tools/list", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        404,
        "the closed session still answers"
    );
    // The official Python SDK closes its session without complaint (python_client checks its
    // log for "Session termination failed").
    let out = python_client(
        "http",
        &url,
        &json!([{"tool": "fleet_summary", "args": {}}]),
    )
    .await;
    assert_eq!(out["calls"][0]["result"]["structuredContent"]["total"], 0);

    // A wrong token: a 401 whose challenge points at no OAuth metadata and whose body is a
    // JSON-RPC error an MCP client can show.
    let resp = http
        .post(&url)
        .bearer_auth("wrong-token-0123456789")
        .header("Accept", "application/json, text/event-stream")
        .json(&initialize("2025-06-18"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    assert!(!challenge.contains("resource_metadata"), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["jsonrpc"], "2.0", "{body}");
    assert_eq!(body["error"]["code"], -32001, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Unauthorized: unknown token") && message.contains("Bearer"),
        "{message}"
    );
    // OAuth discovery finds nothing, and each answer says why.
    for (method, path) in [
        (
            reqwest::Method::GET,
            "/.well-known/oauth-protected-resource/mcp",
        ),
        (
            reqwest::Method::GET,
            "/.well-known/oauth-protected-resource",
        ),
        (
            reqwest::Method::GET,
            "/.well-known/oauth-authorization-server",
        ),
        (reqwest::Method::GET, "/.well-known/openid-configuration"),
        (reqwest::Method::POST, "/register"),
    ] {
        let resp = http
            .request(method.clone(), server.api_url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404, "{method} {path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "oauth_not_supported", "{path}: {v}");
        assert!(
            v["error_description"]
                .as_str()
                .unwrap()
                .contains("API token"),
            "{path}: {v}"
        );
    }

    // What SDK users see. Python: the server's sentence, not "Server returned an error
    // response".
    let (code, out, _) =
        python_client_run("http", &url, "wrong-token-0123456789", &json!([])).await;
    assert_eq!(code, Some(3), "{out}");
    let err = out["session_error"].as_str().unwrap();
    assert!(
        err.starts_with("Unauthorized: unknown token") && err.contains("Bearer <token>"),
        "{out}"
    );
    // TypeScript without OAuth: the same sentence.
    let ts = ts_sdk_probe(&url, "wrong-token-0123456789", false).await;
    assert_eq!(ts["connected"], false, "{ts}");
    assert!(
        ts["error"]
            .as_str()
            .unwrap()
            .contains("Unauthorized: unknown token"),
        "{ts}"
    );
    // TypeScript with an OAuth provider, as the MCP Inspector connects: it tries discovery and
    // registration, finds nothing, never redirects the user to an authorization page, and
    // ends with the server's explanation instead of an unparseable error.
    let ts = ts_sdk_probe(&url, "wrong-token-0123456789", true).await;
    assert_eq!(ts["connected"], false, "{ts}");
    assert_eq!(ts["oauth_events"], json!([]), "{ts}");
    let err = ts["error"].as_str().unwrap();
    assert!(
        err.contains("not an OAuth resource server") && err.contains("API token"),
        "{ts}"
    );
    // And the right token connects the same way.
    let ts = ts_sdk_probe(&url, OPERATOR_TOKEN, true).await;
    assert_eq!(ts["connected"], true, "{ts}");
    server.stop().await;
}

// ---- the official Python SDK ------------------------------------------------------------

fn peers_python() -> PathBuf {
    peers_python_in("the MCP Python SDK")
}

/// Runs `tests/peers/python/mcp_client.py` (the official Python SDK) with `token`: its exit
/// code, its JSON answer and its log (stderr).
async fn python_client_run(
    transport: &str,
    url: &str,
    token: &str,
    plan: &Value,
) -> (Option<i32>, Value, String) {
    use tokio::io::AsyncWriteExt;
    let script = repo_root().join("tests/peers/python/mcp_client.py");
    let mut child = tokio::process::Command::new(peers_python())
        .arg(script)
        .args(["--transport", transport, "--url", url, "--token", token])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the Python MCP client");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(plan.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .expect("the Python MCP client timed out")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad output {e}: {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), json, stderr)
}

/// A Python SDK session as the operator that must succeed and close cleanly: the SDK logs
/// "Session termination failed" when the session's DELETE is answered with anything but
/// 200/204 (it was 202), so every run checks the close too.
async fn python_client(transport: &str, url: &str, plan: &Value) -> Value {
    let (code, out, stderr) = python_client_run(transport, url, OPERATOR_TOKEN, plan).await;
    assert_eq!(
        code,
        Some(0),
        "Python MCP client ({transport}) failed: {out}\n{stderr}"
    );
    assert!(
        !stderr.contains("Session termination failed"),
        "the SDK could not close its {transport} session cleanly:\n{stderr}"
    );
    out
}

fn structured(call: &Value) -> &Value {
    assert_ne!(call["result"]["isError"], true, "{call}");
    &call["result"]["structuredContent"]
}

#[tokio::test]
async fn python_sdk_drives_every_tool_on_streamable_http_and_sse() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    for (transport, path) in [("http", "/mcp"), ("sse", "/sse")] {
        let before = commands(&server).await.len();
        let plan = json!([
            {"tool": "agents_search", "args": {"query": "type:fluentd health:unhealthy"}},
            {"tool": "agent_get", "args": {"agent": "web-3", "include": ["recent_commands"]}},
            {"tool": "fleet_summary", "args": {}},
            {"tool": "commands_catalog", "args": {}},
            {"tool": "remote_config_get", "args": {"agent": "web-1"}},
            {"tool": "command_queue", "args": {"agent": "web-1", "kind": "restart"}},
            {"tool": "command_queue", "args": {"agent": "web-1", "kind": "restart"}, "confirm": true},
            {"tool": "command_queue", "args": {"query": "host:web-*", "kind": "force_resync", "dry_run": true}},
            {"tool": "command_queue", "args": {"query": "host:web-*", "kind": "force_resync"}, "confirm": true},
            {"tool": "remote_config_push", "args": {"agent": "web-3", "files": {"fluent.conf": "<source>\n</source>\n"}}, "confirm": true},
            {"tool": "commands_list", "args": {"agent": "web-1"}},
            {"tool": "audit_query", "args": {"channel": "mcp"}},
            {"tool": "agent_get", "args": {"agent": "dup"}},
            {"tool": "no_such_tool", "args": {}},
            {"tool": "command_status", "args": {"command_id": "$6.command_id"}},
            {"tool": "command_status", "args": {"batch_id": "$8.batch_id"}},
            {"tool": "command_cancel", "args": {"command_id": "$6.command_id"}},
            {"tool": "remote_config_get", "args": {"query": "host:web-*"}},
        ]);
        let out = python_client(transport, &server.api_url(path), &plan).await;
        assert_eq!(out["tools"].as_array().unwrap().len(), 11, "{transport}");
        let q = out["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "command_queue")
            .unwrap();
        assert_eq!(q["annotations"]["destructiveHint"], true);
        assert_eq!(out["prompts"].as_array().unwrap().len(), 3);
        assert!(out["prompt_text"]
            .as_str()
            .unwrap()
            .contains("agents_search"));
        assert!(out["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == &json!(format!("flotilla://agents/{}", f.web1))));
        assert_eq!(out["resource_templates"][0], "flotilla://agents/{uid}");
        assert_eq!(out["summary_resource"]["total"], 4);

        let calls = out["calls"].as_array().unwrap();
        assert_eq!(structured(&calls[0])["total"], 1);
        assert_eq!(structured(&calls[1])["uid"], f.web3.to_string());
        assert_eq!(structured(&calls[2])["total"], 4);
        assert_eq!(structured(&calls[3])["kinds"].as_array().unwrap().len(), 7);
        assert_eq!(structured(&calls[4])["uid"], f.web1.to_string());
        assert_eq!(structured(&calls[5])["status"], "confirmation_required");
        assert_eq!(
            calls[6]["first"]["structuredContent"]["status"],
            "confirmation_required"
        );
        assert_eq!(structured(&calls[6])["status"], "queued");
        let restart = structured(&calls[6])["command_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(structured(&calls[7])["status"], "dry_run");
        assert_eq!(structured(&calls[8])["queued"], 2);
        assert_eq!(structured(&calls[9])["command"]["kind"], "remote_config");
        assert!(structured(&calls[10])["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == restart));
        assert!(!structured(&calls[11])["items"]
            .as_array()
            .unwrap()
            .is_empty());
        assert_eq!(calls[12]["result"]["isError"], true);
        assert!(calls[12]["result"].get("structuredContent").is_none());
        assert_eq!(
            parse_tool_error(calls[12]["result"]["content"][0]["text"].as_str().unwrap()).0,
            "ambiguous_agent"
        );
        assert!(
            calls[13]["protocol_error"]
                .as_str()
                .unwrap()
                .contains("unknown tool"),
            "{}",
            calls[13]
        );

        // The follow-ups: status of the command and of the batch, then the cancel. The SDK
        // validated each structured result against the tool's output schema.
        assert_eq!(
            (
                structured(&calls[14])["id"].as_str(),
                structured(&calls[14])["status"].as_str()
            ),
            (Some(restart.as_str()), Some("queued"))
        );
        assert_eq!(structured(&calls[15])["counts"]["queued"], 2);
        assert_eq!(
            structured(&calls[15])["batch"]["id"],
            structured(&calls[8])["batch_id"]
        );
        assert_eq!(structured(&calls[16])["status"], "cancelled");
        assert_eq!(structured(&calls[17])["total"], 2);
        assert_eq!(structured(&calls[17])["items"].as_array().unwrap().len(), 2);

        // Server state: exactly restart (1) + fan-out (2) + config push (1), all as ops via mcp.
        let all = commands(&server).await;
        assert_eq!(all.len(), before + 4, "{transport}");
        let new = &all[..4];
        assert!(new
            .iter()
            .all(|c| c["channel"] == "mcp" && c["actor"] == "ops"));
        let mut kinds: Vec<&str> = new.iter().map(|c| c["kind"].as_str().unwrap()).collect();
        kinds.sort();
        assert_eq!(
            kinds,
            ["force_resync", "force_resync", "remote_config", "restart"]
        );
        let (_, got) = server
            .rest()
            .get(&format!("/api/v1/commands/{restart}"))
            .await;
        assert_eq!(got["agent_uid"], f.web1.to_string());
        assert_eq!(got["status"], "cancelled", "{transport}: {got}");
        let cancels = audit(&server, "channel=mcp&operation=command.cancel").await;
        assert!(
            cancels.iter().any(|r| r["targets"][1] == json!(restart)),
            "{transport}: {cancels:?}"
        );
    }
    let recs = audit(&server, "channel=mcp&operation=command.queue").await;
    assert_eq!(recs.len(), 4, "two restarts and two config pushes");
    server.stop().await;
}

// ---- dry runs, target-bound confirmations, session ownership, older revisions ----------

#[tokio::test]
async fn a_confirmation_is_bound_to_the_previewed_targets() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    let c = operator(&server, Revision::Session).await;
    let fan = json!({"query": "host:web-*", "kind": "force_resync"});
    let v = ok(&call(&c, "command_queue", fan.clone()).await);
    assert_eq!(v["status"], "confirmation_required", "{v}");
    assert_eq!(v["preview"]["target"]["total_targets"], 2);
    // Another agent comes to match before the user's yes arrives: the confirmed call must not
    // reach an agent the user never saw.
    register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "web-9")],
        ALL_CAPS,
        &[],
    )
    .await;
    let mut with = fan.clone();
    with["confirmation_token"] = v["confirmation_token"].clone();
    let (code, msg) = fail(&call(&c, "command_queue", with.clone()).await);
    assert_eq!(code, "targets_changed", "{msg}");
    assert!(msg.contains("2 agents then, 3 now"), "{msg}");
    assert!(commands(&server).await.is_empty());
    assert!(audit(&server, "operation=batch.queue").await.is_empty());
    // The token is spent; a fresh preview names all three, and confirming it queues three.
    assert_eq!(
        fail(&call(&c, "command_queue", with).await).0,
        "confirmation_invalid"
    );
    let v = ok(&call(&c, "command_queue", fan.clone()).await);
    assert_eq!(v["preview"]["target"]["total_targets"], 3);
    let mut with = fan;
    with["confirmation_token"] = v["confirmation_token"].clone();
    assert_eq!(ok(&call(&c, "command_queue", with).await)["queued"], 3);
    assert_eq!(commands(&server).await.len(), 3);

    // Same count, other agents: REST refuses a stale expect_targets too (409, nothing queued).
    let rest = server.rest();
    let (s, _) = rest
        .put(
            &format!("/api/v1/agents/{}/labels/wave", f.web1),
            json!({"value": "1"}),
        )
        .await;
    assert_eq!(s, 200);
    let body = json!({"query": "label:wave=1", "kind": "force_resync"});
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let (s, plan) = rest.post("/api/v1/commands", dry).await;
    assert_eq!((s, plan["target_count"].as_u64()), (200, Some(1)), "{plan}");
    rest.delete(&format!("/api/v1/agents/{}/labels/wave", f.web1))
        .await;
    rest.put(
        &format!("/api/v1/agents/{}/labels/wave", f.web3),
        json!({"value": "1"}),
    )
    .await;
    let mut real = body.clone();
    real["expect_targets"] = plan["expect_targets"].clone();
    let (s, e) = rest.post("/api/v1/commands", real.clone()).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("targets_changed")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not the same agents"),
        "{e}"
    );
    assert_eq!(commands(&server).await.len(), 3);
    // With a current expectation it queues.
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let (_, plan) = rest.post("/api/v1/commands", dry).await;
    real["expect_targets"] = plan["expect_targets"].clone();
    let (s, v) = rest.post("/api/v1/commands", real).await;
    assert_eq!((s, v["queued"].as_u64()), (202, Some(1)), "{v}");
    c.cancel().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn dry_runs_and_previews_apply_every_check_of_the_real_call() {
    let server = TestServer::start_with(|c| c.commands.max_fanout = 3).await;
    let f = fleet(&server).await;
    let rest = server.rest();
    // restart over the three fluent-bit agents: the two "dup" ones cannot restart.
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "name:fluent-bit", "kind": "restart", "dry_run": true}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["matched"].as_u64(),
            v["target_count"].as_u64(),
            v["skipped_count"].as_u64()
        ),
        (Some(3), Some(1), Some(2)),
        "{v}"
    );
    assert_eq!(v["targets"][0]["uid"], f.web1.to_string());
    assert_eq!(
        (v["destructive"].as_bool(), v["dry_run"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(v["expect_targets"]["count"], 1);
    let (s, v) = rest
        .post(
            &format!("/api/v1/agents/{}/commands", f.web1),
            json!({"kind": "chatops", "params": {"tag": "rotate"}, "dry_run": true}),
        )
        .await;
    assert_eq!(
        (s, v["target"]["agent"].as_str()),
        (200, Some(f.web1.to_string().as_str())),
        "{v}"
    );
    // The same refusals as the real call, with the same codes.
    for (path, body, status, code) in [
        (
            "/api/v1/commands".to_string(),
            json!({"query": "", "kind": "force_resync"}),
            422,
            "too_many_targets",
        ),
        (
            "/api/v1/commands".to_string(),
            json!({"query": "host:none", "kind": "force_resync"}),
            422,
            "no_targets",
        ),
        (
            "/api/v1/commands".to_string(),
            json!({"agent": f.web1, "kind": "chatops", "params": {}}),
            400,
            "invalid_params",
        ),
        (
            format!("/api/v1/agents/{}/commands", f.dup[0]),
            json!({"kind": "restart"}),
            422,
            "capability_missing",
        ),
    ] {
        let mut dry = body.clone();
        dry["dry_run"] = json!(true);
        let (s, e) = rest.post(&path, dry).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{path} {body}: {e}"
        );
        let (s, e) = rest.post(&path, body.clone()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "real {path} {body}: {e}"
        );
    }
    let (s, e) = server
        .rest_as(Some(VIEWER_TOKEN))
        .post(
            "/api/v1/commands",
            json!({"agent": f.web1, "kind": "force_resync", "dry_run": true}),
        )
        .await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    assert!(commands(&server).await.is_empty());
    assert!(
        audit(&server, "").await.is_empty(),
        "a dry run is not audited"
    );

    // MCP's dry run and preview are that plan; bad input fails before any token exists.
    let c = operator(&server, Revision::Modern).await;
    let v = ok(&call(
        &c,
        "command_queue",
        json!({"query": "name:fluent-bit", "kind": "restart", "dry_run": true}),
    )
    .await);
    assert_eq!(
        (
            v["status"].as_str(),
            v["total_targets"].as_u64(),
            v["skipped_count"].as_u64()
        ),
        (Some("dry_run"), Some(1), Some(2)),
        "{v}"
    );
    let v = ok(&call(
        &c,
        "command_queue",
        json!({"query": "name:fluent-bit", "kind": "restart"}),
    )
    .await);
    assert_eq!(v["preview"]["target"]["total_targets"], 1, "{v}");
    assert_eq!(v["preview"]["target"]["skipped_count"], 2, "{v}");
    for (tool, args, code) in [
        (
            "command_queue",
            json!({"query": "", "kind": "force_resync"}),
            "too_many_targets",
        ),
        (
            "command_queue",
            json!({"agent": "web-1", "kind": "chatops", "params": {}}),
            "invalid_params",
        ),
        (
            "command_queue",
            json!({"agent": "web-1", "kind": "restart", "params": {"ttl_seconds": 0}}),
            "invalid_params",
        ),
        (
            "command_queue",
            json!({"agent": "dup", "kind": "restart"}),
            "ambiguous_agent",
        ),
        (
            "command_queue",
            json!({"agent": f.dup[0].to_string(), "kind": "restart"}),
            "capability_missing",
        ),
        (
            "remote_config_push",
            json!({"agent": "web-1", "files": {"a.conf": 5}}),
            "invalid_params",
        ),
    ] {
        let r = call(&c, tool, args.clone()).await;
        assert_eq!(fail(&r).0, code, "{tool} {args}");
    }
    assert!(commands(&server).await.is_empty());
    c.cancel().await.unwrap();
    server.stop().await;
}

#[test]
fn confirmation_follows_the_catalogs_destructive_kinds() {
    use flotilla_server::model::CommandKind;
    let from_catalog: Vec<&str> = CommandKind::ALL
        .iter()
        .filter(|k| flotilla_server::commands::catalog_entry(**k)["destructive"] == json!(true))
        .map(|k| k.as_str())
        .collect();
    let mut named = flotilla_mcp::tools::DESTRUCTIVE_KINDS.to_vec();
    let mut want = from_catalog.clone();
    named.sort();
    want.sort();
    assert_eq!(
        named, want,
        "tool descriptions name other kinds than the catalog"
    );
}

#[tokio::test]
async fn remote_config_get_by_query_gives_compact_rows() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    // web-1 reports its running config.
    let mut msg = crate::support::agent_status(
        f.web1,
        1,
        &[
            ("service.name", "fluent-bit"),
            ("service.version", "5.1.1"),
            ("host.name", "web-1"),
        ],
        ALL_CAPS,
        &[CAP_CHATOPS],
    );
    let mut files = std::collections::HashMap::new();
    files.insert(
        "fluent-bit.conf".to_string(),
        flotilla_proto::AgentConfigFile {
            body: b"[SERVICE]\n    flush 1\n".to_vec(),
            content_type: "text/plain".into(),
        },
    );
    msg.effective_config = Some(flotilla_proto::EffectiveConfig {
        config_map: Some(flotilla_proto::AgentConfigMap { config_map: files }),
    });
    crate::support::opamp_post(&server, &msg).await;
    let c = operator(&server, Revision::Modern).await;
    let v = ok(&call(
        &c,
        "remote_config_get",
        json!({"query": "host:web-*", "limit": 1}),
    )
    .await);
    assert_eq!(
        (v["total"].as_u64(), v["items"].as_array().unwrap().len()),
        (Some(2), 1),
        "{v}"
    );
    let row = &v["items"][0];
    assert_eq!(row["uid"], f.web1.to_string());
    assert!(
        row.get("effective_config").is_none(),
        "rows carry no config bodies"
    );
    // The effective hash is the server's config hash of the reported files.
    let (_, agent) = server
        .rest()
        .get(&format!("/api/v1/agents/{}", f.web1))
        .await;
    let reported: flotilla_server::model::ConfigFiles =
        serde_json::from_value(agent["effective_config"].clone()).unwrap();
    assert_eq!(
        row["effective_config_hash"],
        flotilla_server::commands::config_hash(&reported)
    );
    let next = v["next_cursor"].as_str().unwrap();
    let v = ok(&call(
        &c,
        "remote_config_get",
        json!({"query": "host:web-*", "limit": 1, "cursor": next}),
    )
    .await);
    assert_eq!(v["items"][0]["uid"], f.web3.to_string());
    assert!(v["items"][0]["effective_config_hash"].is_null());
    let one = ok(&call(&c, "remote_config_get", json!({"agent": "web-1"})).await);
    assert_eq!(one["effective_config_hash"], row["effective_config_hash"]);
    let (code, _) = fail(
        &call(
            &c,
            "remote_config_get",
            json!({"agent": "web-1", "query": "x"}),
        )
        .await,
    );
    assert_eq!(code, "invalid_arguments");
    let (code, _) = fail(&call(&c, "remote_config_get", json!({"query": "", "limit": 51})).await);
    assert_eq!(code, "invalid_arguments");
    c.cancel().await.unwrap();
    server.stop().await;
}

/// The JSON-RPC message answering `id` in a streamable HTTP response (JSON or SSE body).
async fn rpc_answer(resp: reqwest::Response, id: u64) -> Value {
    let text = resp.text().await.unwrap();
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return v;
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no answer to {id} in {text}"))
}

fn rpc(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn initialize(version: &str) -> Value {
    rpc(
        1,
        "initialize",
        json!({"protocolVersion": version, "capabilities": {},
               "clientInfo": {"name": "raw", "version": "0"}}),
    )
}

/// Opens a session-based `/mcp` session with raw HTTP as `token`; its id.
async fn open_session(server: &TestServer, token: &str, version: &str) -> String {
    let http = reqwest::Client::new();
    let resp = http
        .post(server.api_url("/mcp"))
        .bearer_auth(token)
        .header("Accept", "application/json, text/event-stream")
        .json(&initialize(version))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .expect("a session id")
        .to_str()
        .unwrap()
        .to_string();
    let init = rpc_answer(resp, 1).await;
    assert_eq!(init["result"]["protocolVersion"], version, "{init}");
    let resp = http
        .post(server.api_url("/mcp"))
        .bearer_auth(token)
        .header("Accept", "application/json, text/event-stream")
        .header("Mcp-Session-Id", &sid)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    sid
}

/// POSTs one JSON-RPC message on an open `/mcp` session as the operator, with `version` as
/// its MCP-Protocol-Version header (2025-03-26 clients send none).
async fn session_post(
    server: &TestServer,
    sid: &str,
    version: Option<&str>,
    body: Value,
) -> reqwest::Result<reqwest::Response> {
    let mut req = reqwest::Client::new()
        .post(server.api_url("/mcp"))
        .bearer_auth(OPERATOR_TOKEN)
        .header("Accept", "application/json, text/event-stream")
        .header("Mcp-Session-Id", sid);
    if let Some(v) = version {
        req = req.header("MCP-Protocol-Version", v);
    }
    req.json(&body).send().await
}

#[tokio::test]
async fn session_based_revision_2025_03_26_over_raw_http() {
    let server = TestServer::start().await;
    fleet(&server).await;
    let sid = open_session(&server, OPERATOR_TOKEN, "2025-03-26").await;
    // 2025-03-26 clients send the session id and no MCP-Protocol-Version header.
    let post = |body: Value| session_post(&server, &sid, None, body);
    let list = rpc_answer(post(rpc(2, "tools/list", json!({}))).await.unwrap(), 2).await;
    assert_eq!(
        list["result"]["tools"].as_array().unwrap().len(),
        11,
        "{list}"
    );
    let r = rpc_answer(
        post(rpc(
            3,
            "tools/call",
            json!({"name": "fleet_summary", "arguments": {}}),
        ))
        .await
        .unwrap(),
        3,
    )
    .await;
    assert_eq!(r["result"]["structuredContent"]["total"], 4, "{r}");
    server.stop().await;
}

#[tokio::test]
async fn a_streamable_http_session_belongs_to_its_caller() {
    let server = TestServer::start().await;
    let f = fleet(&server).await;
    let sid = open_session(&server, OPERATOR_TOKEN, "2025-06-18").await;
    let http = reqwest::Client::new();
    let req = |method: reqwest::Method, token: &str| {
        http.request(method, server.api_url("/mcp"))
            .bearer_auth(token)
            .header("Accept", "application/json, text/event-stream")
            .header("Mcp-Session-Id", &sid)
            .header("MCP-Protocol-Version", "2025-06-18")
    };
    let queue = rpc(
        2,
        "tools/call",
        json!({"name": "command_queue", "arguments": {"agent": f.web1.to_string(), "kind": "force_resync"}}),
    );
    // Another valid token that knows the session id can neither call, listen, answer an
    // elicitation nor close it.
    let answer = json!({"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {"confirm": true}}});
    for (method, body) in [
        (reqwest::Method::POST, Some(queue.clone())),
        (reqwest::Method::POST, Some(answer)),
        (reqwest::Method::GET, None),
        (reqwest::Method::DELETE, None),
    ] {
        let mut r = req(method.clone(), ADMIN_TOKEN);
        if let Some(b) = &body {
            r = r.json(b);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{method}");
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("another caller"),
            "{v}"
        );
    }
    assert!(commands(&server).await.is_empty());
    // Its owner still uses it, and closing it forgets the binding.
    let r = rpc_answer(
        req(reqwest::Method::POST, OPERATOR_TOKEN)
            .json(&queue)
            .send()
            .await
            .unwrap(),
        2,
    )
    .await;
    assert_eq!(r["result"]["structuredContent"]["status"], "queued", "{r}");
    let all = commands(&server).await;
    assert_eq!((all.len(), all[0]["actor"].as_str()), (1, Some("ops")));
    let resp = req(reqwest::Method::DELETE, OPERATOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    server.stop().await;
}

/// A legacy SSE session opened with raw HTTP: the event stream and the endpoint it names.
struct RawSse {
    resp: reqwest::Response,
    buf: String,
    endpoint: String,
}

impl RawSse {
    async fn open(server: &TestServer, token: &str) -> RawSse {
        let resp = reqwest::Client::new()
            .get(server.api_url("/sse"))
            .bearer_auth(token)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut s = RawSse {
            resp,
            buf: String::new(),
            endpoint: String::new(),
        };
        let (event, data) = s.next_event().await;
        assert_eq!(event, "endpoint");
        s.endpoint = data;
        s
    }

    async fn next_event(&mut self) -> (String, String) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim());
                    }
                }
                if !event.is_empty() || !data.is_empty() {
                    return (event, data);
                }
                continue;
            }
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("an SSE event")
                .unwrap()
                .expect("the SSE stream ended");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The message answering `id`.
    async fn answer(&mut self, id: u64) -> Value {
        loop {
            let (event, data) = self.next_event().await;
            if event == "message" {
                let v: Value = serde_json::from_str(&data).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
        }
    }
}

async fn post_message(
    server: &TestServer,
    endpoint: &str,
    token: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> u16 {
    let mut req = reqwest::Client::new()
        .post(server.api_url(endpoint))
        .bearer_auth(token)
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn legacy_sse_2024_11_05_over_raw_http_and_its_checks() {
    let server = TestServer::start().await;
    fleet(&server).await;
    let mut sse = RawSse::open(&server, OPERATOR_TOKEN).await;
    let ep = sse.endpoint.clone();
    assert!(ep.starts_with("/messages?sessionId="), "{ep}");
    assert_eq!(
        post_message(&server, &ep, OPERATOR_TOKEN, &initialize("2024-11-05"), &[]).await,
        202
    );
    let init = sse.answer(1).await;
    assert_eq!(init["result"]["protocolVersion"], "2024-11-05", "{init}");
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(
        post_message(&server, &ep, OPERATOR_TOKEN, &note, &[]).await,
        202
    );
    let list = rpc(2, "tools/list", json!({}));
    assert_eq!(
        post_message(&server, &ep, OPERATOR_TOKEN, &list, &[]).await,
        202
    );
    assert_eq!(
        sse.answer(2).await["result"]["tools"]
            .as_array()
            .unwrap()
            .len(),
        11
    );
    let summary = rpc(
        3,
        "tools/call",
        json!({"name": "fleet_summary", "arguments": {}}),
    );
    assert_eq!(
        post_message(&server, &ep, OPERATOR_TOKEN, &summary, &[]).await,
        202
    );
    assert_eq!(
        sse.answer(3).await["result"]["structuredContent"]["total"],
        4
    );

    // Another caller's message, a rebinding Host or a foreign Origin: refused, not delivered.
    let queue = rpc(
        4,
        "tools/call",
        json!({"name": "command_queue",
        "arguments": {"agent": "web-1", "kind": "force_resync"}}),
    );
    assert_eq!(
        post_message(&server, &ep, ADMIN_TOKEN, &queue, &[]).await,
        403
    );
    assert_eq!(
        post_message(
            &server,
            &ep,
            OPERATOR_TOKEN,
            &queue,
            &[("Host", "evil.example")]
        )
        .await,
        403
    );
    assert_eq!(
        post_message(
            &server,
            &ep,
            OPERATOR_TOKEN,
            &queue,
            &[("Origin", "http://evil.example")]
        )
        .await,
        403
    );
    assert!(commands(&server).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn one_caller_cannot_take_every_sse_session() {
    let server = TestServer::start().await;
    let mut open = Vec::new();
    for _ in 0..flotilla_mcp::http::MAX_SSE_SESSIONS_PER_CALLER {
        open.push(RawSse::open(&server, VIEWER_TOKEN).await);
    }
    let resp = reqwest::Client::new()
        .get(server.api_url("/sse"))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    // Everyone else still gets a session.
    let other = RawSse::open(&server, OPERATOR_TOKEN).await;
    assert!(other.endpoint.starts_with("/messages"));
    drop(open);
    server.stop().await;
}

#[tokio::test]
async fn read_only_mode_hides_prompts_that_change_the_fleet() {
    let server = TestServer::start_with(|c| c.mcp.read_only = true).await;
    let c = operator(&server, Revision::Session).await;
    let names: Vec<String> = c
        .list_all_prompts()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.iter().any(|n| n == "roll_out_config_safely"));
    let err = c
        .get_prompt(
            rmcp::model::GetPromptRequestParams::new("roll_out_config_safely").with_arguments(
                json!({"query": "type:fluentbit", "change": "x"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("read-only"), "{err}");
    c.cancel().await.unwrap();
    server.stop().await;
}

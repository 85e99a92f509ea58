//! MCP over the operator listener, driven by real MCP clients: rmcp's client on streamable
//! HTTP (the 2026-07-28 stateless revision and the session-based revision) and the official
//! Python SDK (`tests/peers/python/mcp_client.py`) on streamable HTTP and legacy SSE. Every
//! assertion about an effect is made on the server's state (commands, audit), read back
//! through REST, not on the MCP reply alone.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flotilla_proto::AgentCapabilities as Cap;
use flotilla_server::commands::CAP_CHATOPS;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ElicitRequestParams,
    ElicitResult, ElicitationAction, ElicitationCapability, FormElicitationCapability,
    Implementation, ProtocolVersion,
};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ErrorData as McpError, RoleClient, ServiceExt};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{
    register_agent, register_agent_with_health, TestServer, OPERATOR_TOKEN, VIEWER_TOKEN,
};

const STATUS: u64 = Cap::ReportsStatus as u64;
const ALL_CAPS: u64 = STATUS | Cap::AcceptsRestartCommand as u64 | Cap::AcceptsRemoteConfig as u64;

/// An MCP client; with `elicit`, it declares form elicitation and answers every request
/// with that choice (counting them).
#[derive(Clone, Default)]
struct TestClient {
    elicit: Option<bool>,
    asked: Arc<AtomicUsize>,
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        let mut caps = ClientCapabilities::default();
        if self.elicit.is_some() {
            caps.elicitation =
                Some(ElicitationCapability::default().with_form(FormElicitationCapability::new()));
        }
        ClientConfig::new(caps, Implementation::new("flotilla-it", "0"))
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let ElicitRequestParams::FormElicitationParams { message, .. } = request else {
            return Ok(ElicitResult::new(ElicitationAction::Decline));
        };
        assert!(message.contains("restart"), "{message}");
        Ok(match self.elicit {
            Some(true) => {
                ElicitResult::new(ElicitationAction::Accept).with_content(json!({"confirm": true}))
            }
            _ => ElicitResult::new(ElicitationAction::Decline),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Revision {
    /// 2026-07-28: `server/discover`, stateless requests, MRTR for elicitation.
    Modern,
    /// `initialize` + `Mcp-Session-Id` (2025-11-25 and older).
    Session,
}

type Client = RunningService<RoleClient, TestClient>;

async fn connect(server: &TestServer, token: &str, rev: Revision, handler: TestClient) -> Client {
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

async fn call(c: &Client, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(m) = args else {
        panic!("args must be an object")
    };
    c.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(m))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// The structured answer of a successful call.
fn ok(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool error: {:?}", r.content);
    r.structured_content.clone().expect("structured content")
}

/// The error code of a failed call.
fn fail(r: &CallToolResult) -> (String, String) {
    assert_eq!(
        r.is_error,
        Some(true),
        "expected a tool error: {:?}",
        r.structured_content
    );
    let e = &r.structured_content.as_ref().expect("structured error")["error"];
    (
        e["code"].as_str().unwrap().to_string(),
        e["message"].as_str().unwrap().to_string(),
    )
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
        let c = connect(&server, OPERATOR_TOKEN, rev, TestClient::default()).await;
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
    let c = connect(
        &server,
        OPERATOR_TOKEN,
        Revision::Modern,
        TestClient::default(),
    )
    .await;
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
        TestClient::default(),
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
        let c = connect(&server, OPERATOR_TOKEN, rev, TestClient::default()).await;
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
            let handler = TestClient {
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

// ---- the official Python SDK ------------------------------------------------------------

fn peers_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("FLOTILLA_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".peers"));
    let py = dir.join("venv/bin/python");
    assert!(
        py.is_file(),
        "the MCP Python SDK is not installed: {} is missing. Run `bash tests/peers/install.sh` first.",
        py.display()
    );
    py
}

async fn python_client(transport: &str, url: &str, plan: &Value) -> Value {
    use tokio::io::AsyncWriteExt;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/python/mcp_client.py");
    let mut child = tokio::process::Command::new(peers_python())
        .arg(script)
        .args([
            "--transport",
            transport,
            "--url",
            url,
            "--token",
            OPERATOR_TOKEN,
        ])
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
    assert!(
        out.status.success(),
        "Python MCP client ({transport}) failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output {e}: {}", String::from_utf8_lossy(&out.stdout)))
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
        assert_eq!(
            calls[12]["result"]["structuredContent"]["error"]["code"],
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
    }
    let recs = audit(&server, "channel=mcp&operation=command.queue").await;
    assert_eq!(recs.len(), 4, "two restarts and two config pushes");
    server.stop().await;
}

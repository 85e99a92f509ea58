//! REST API tests against a real server: auth and roles, search, agents and labels, every
//! command kind, fan-out batches, cancel, listings, catalog, audit, OpenAPI completeness, and
//! the operational endpoints. Agents are created through the real OpAMP HTTP endpoint.

use std::collections::BTreeSet;

use flotilla_proto::AgentCapabilities as Cap;
use flotilla_server::commands::{CAP_CHATOPS, CAP_SHUTDOWN};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::{
    agent_status, opamp_post, peers_python_in, register_agent, register_agent_with_health,
    repo_root, Rest, TestServer, ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN,
};

const STATUS: u64 = Cap::ReportsStatus as u64;
const RESTART: u64 = STATUS | Cap::AcceptsRestartCommand as u64;
const REMOTE_CONFIG: u64 = STATUS | Cap::AcceptsRemoteConfig as u64;
const ALL_CAPS: u64 = RESTART | REMOTE_CONFIG;
const CUSTOM: &str = "com.example.ping";

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

fn uids(v: &Value) -> BTreeSet<String> {
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["uid"].as_str().unwrap().to_string())
        .collect()
}

fn set(u: &[Uuid]) -> BTreeSet<String> {
    u.iter().map(Uuid::to_string).collect()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

/// A raw request, for headers and bodies the JSON client does not send.
async fn raw(
    server: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().request(method, server.api_url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    req.send().await.expect("request")
}

async fn audit(rest: &Rest, query: &str) -> Vec<Value> {
    let (s, v) = rest.get(&format!("/api/v1/audit?{query}")).await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn auth_is_required_and_roles_are_enforced() {
    let server = TestServer::start().await;
    let agent = register_agent(&server, &[("service.name", "fluent-bit")], RESTART, &[]).await;

    // No token, unknown token, wrong scheme: 401 with a Bearer challenge.
    for (token, header, invalid) in [
        (None, None, false),
        (Some("not-a-real-token-at-all"), None, true),
        (None, Some(format!("Basic {ADMIN_TOKEN}")), false),
    ] {
        let mut req = reqwest::Client::new().get(server.api_url("/api/v1/agents"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(h) = &header {
            req = req.header("Authorization", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        let challenge = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert_eq!(challenge.contains("invalid_token"), invalid, "{challenge}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(code(&v), "unauthorized");
    }
    // Every /api/v1 route is guarded, writes included; only the API's description is public
    // (a client generator fetches it before it has a token).
    let anon = server.rest_as(None);
    assert_eq!(anon.get("/api/v1/openapi.json").await.0, 200);
    assert_eq!(anon.get("/api/v1/catalog").await.0, 401);
    let (s, v) = anon
        .post(
            &format!("/api/v1/agents/{agent}/commands"),
            json!({"kind": "restart"}),
        )
        .await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));

    // Viewers read but may not change anything: 403 forbidden.
    let viewer = server.rest_as(Some(VIEWER_TOKEN));
    assert_eq!(viewer.get("/api/v1/agents").await.0, 200);
    assert_eq!(viewer.get(&format!("/api/v1/agents/{agent}")).await.0, 200);
    let (s, v) = viewer
        .post(
            &format!("/api/v1/agents/{agent}/commands"),
            json!({"kind": "restart"}),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    // Roles are named as the tokens file spells them.
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("watcher (viewer) may not queue"),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("it needs the operator role"),
        "{v}"
    );
    let (s, v) = viewer
        .post("/api/v1/commands", json!({"query": "", "kind": "restart"}))
        .await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    let (s, v) = viewer
        .put(
            &format!("/api/v1/agents/{agent}/labels/env"),
            json!({"value": "x"}),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "forbidden"));

    // Operators may; the actor recorded is the token's name.
    let ops = server.rest_as(Some(OPERATOR_TOKEN));
    let (s, v) = ops
        .post(
            &format!("/api/v1/agents/{agent}/commands"),
            json!({"kind": "restart"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["command"]["actor"], "ops");
    assert_eq!(v["command"]["channel"], "rest");
    let (s, v) = viewer
        .delete(&format!(
            "/api/v1/commands/{}",
            v["command_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!((s, code(&v)), (403, "forbidden"));

    // Refused attempts change nothing and append nothing; the allowed one is audited.
    let records = audit(&server.rest(), "channel=rest").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["operation"], "command.queue");
    assert_eq!(records[0]["actor"], "ops");

    // The operational endpoints need no token.
    let resp = raw(&server, Method::GET, "/healthz", None, None, None).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    server.stop().await;
}

#[tokio::test]
async fn generated_admin_token_when_no_tokens_file() {
    // Our own directory: it must outlive the first server for the restart below.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let server = TestServer::start_in(dir.clone(), |c| c.api.tokens_file = None).await;
    // The router (which writes the file) is built when the server task runs: once a request
    // has been answered, it exists.
    assert_eq!(
        raw(&server, Method::GET, "/healthz", None, None, None)
            .await
            .status()
            .as_u16(),
        200
    );
    let path = server.data_dir.join("admin.token");
    let token = std::fs::read_to_string(&path)
        .expect("admin.token")
        .trim()
        .to_string();
    assert_eq!(token.len(), 43, "32 bytes base64url");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(
        server.rest().get("/api/v1/agents").await.0,
        401,
        "file tokens are not in use"
    );
    let admin = server.rest_as(Some(&token));
    let agent = register_agent(&server, &[("service.name", "fluentd")], STATUS, &[]).await;
    let (s, v) = admin
        .put(
            &format!("/api/v1/agents/{agent}/labels/env"),
            json!({"value": "prod"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let records = audit(&admin, "operation=agent.label.set").await;
    assert_eq!(records[0]["actor"], "admin");
    // The same token is reused after a restart.
    server.stop().await;
    let again = TestServer::start_in(dir, |c| c.api.tokens_file = None).await;
    assert_eq!(
        again.rest_as(Some(&token)).get("/api/v1/agents").await.0,
        200
    );
    again.stop().await;
}

#[tokio::test]
async fn search_with_every_query_key_and_pagination() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let a1 = register_agent_with_health(
        &server,
        &[
            ("service.name", "fluent-bit"),
            ("service.version", "3.1.0"),
            ("host.name", "web-1"),
        ],
        RESTART,
        &[CAP_CHATOPS],
        true,
    )
    .await;
    let a2 = register_agent_with_health(
        &server,
        &[
            ("service.name", "fluentd"),
            ("service.version", "1.18.0"),
            ("host.name", "db-1"),
        ],
        REMOTE_CONFIG,
        &[],
        false,
    )
    .await;
    let a3 = register_agent(
        &server,
        &[
            ("service.name", "otelcol-contrib"),
            ("service.version", "0.100.0"),
            ("host.name", "web-2"),
            ("deployment.environment", "staging area"),
        ],
        STATUS,
        &[&format!("request:{CAP_SHUTDOWN}")],
    )
    .await;
    // a4 says goodbye: offline.
    let a4 = register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "gone-1")],
        STATUS,
        &[],
    )
    .await;
    let mut bye = agent_status(a4, 1, &[], 0, &[]);
    bye.agent_description = None;
    bye.agent_disconnect = Some(flotilla_proto::AgentDisconnect {});
    opamp_post(&server, &bye).await;
    let (s, _) = rest
        .put(
            &format!("/api/v1/agents/{a2}/labels/env"),
            json!({"value": "prod"}),
        )
        .await;
    assert_eq!(s, 200);

    // UUIDv7s made in the same millisecond share their first 18 characters; 30 reach into the
    // random bits.
    let prefix = &a2.to_string()[..30];
    let cases: Vec<(String, Vec<Uuid>)> = vec![
        ("".into(), vec![a1, a2, a3, a4]),
        ("type:fluentbit".into(), vec![a1, a4]),
        ("type:fluent*".into(), vec![a1, a2, a4]),
        ("type:otelcol".into(), vec![a3]),
        ("health:healthy".into(), vec![a1]),
        ("health:unhealthy".into(), vec![a2]),
        ("health:unknown".into(), vec![a3, a4]),
        ("state:healthy".into(), vec![a1, a2, a3]),
        ("state:online".into(), vec![a1, a2, a3]),
        ("state:offline".into(), vec![a4]),
        ("state:late".into(), vec![]),
        ("version:3.1.*".into(), vec![a1]),
        ("name:fluentd".into(), vec![a2]),
        ("host:web-*".into(), vec![a1, a3]),
        ("label:env=prod".into(), vec![a2]),
        ("label:env".into(), vec![a2]),
        ("label:env=dev".into(), vec![]),
        ("capability:chatops".into(), vec![a1]),
        ("capability:restart".into(), vec![a1]),
        ("capability:AcceptsRestartCommand".into(), vec![a1]),
        ("capability:remote_config".into(), vec![a2]),
        ("capability:shutdown".into(), vec![a3]),
        (format!("uid:{prefix}"), vec![a2]),
        ("transport:http".into(), vec![a1, a2, a3, a4]),
        ("transport:websocket".into(), vec![]),
        ("deployment.environment:staging*".into(), vec![a3]),
        ("\"staging area\"".into(), vec![a3]),
        ("db-1".into(), vec![a2]),
        ("-host:web-* -state:offline".into(), vec![a2]),
        ("type:fluentbit host:web-*".into(), vec![a1]),
    ];
    for (q, want) in cases {
        let path = format!("/api/v1/agents?q={}", urlencode(&q));
        let (s, v) = rest.get(&path).await;
        assert_eq!(s, 200, "{q}: {v}");
        assert_eq!(uids(&v), set(&want), "query {q:?}");
    }
    // Rows are compact and typed.
    let (_, v) = rest.get(&format!("/api/v1/agents?q=uid:{a1}")).await;
    let row = &v["items"][0];
    assert_eq!(row["type"], "fluentbit");
    assert_eq!(row["host"], "web-1");
    assert_eq!(row["version"], "3.1.0");
    assert_eq!(row["healthy"], true);
    assert!(is_rfc3339(&row["last_seen"]), "{row}");

    // Bad input: 400 with a stable code.
    for (path, want) in [
        ("/api/v1/agents?q=bogus:1", "invalid_query"),
        ("/api/v1/agents?q=%22open", "invalid_query"),
        ("/api/v1/agents?limit=0", "bad_request"),
        ("/api/v1/agents?limit=1001", "bad_request"),
        ("/api/v1/agents?limit=ten", "bad_request"),
        ("/api/v1/agents?cursor=nope", "bad_request"),
        ("/api/v1/agents?total=maybe", "bad_request"),
        ("/api/v1/agents?state=healthy", "bad_request"),
    ] {
        let (s, v) = rest.get(path).await;
        assert_eq!((s, code(&v)), (400, want), "{path}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    // Pagination: 11 agents in pages of 3, each seen once, in uid order.
    let mut all = vec![a1, a2, a3, a4];
    for i in 0..7 {
        all.push(
            register_agent(&server, &[("host.name", &format!("page-{i}"))], STATUS, &[]).await,
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/agents?limit=3&total=true&cursor={c}"),
            None => "/api/v1/agents?limit=3&total=true".into(),
        };
        let (s, v) = rest.get(&path).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["total"], 11);
        pages += 1;
        seen.extend(
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["uid"].as_str().unwrap().to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "uid order");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), set(&all));
    assert_eq!(seen.len(), 11);
    // Without total=true there is no total.
    let (_, v) = rest.get("/api/v1/agents?limit=1").await;
    assert!(v.get("total").is_none(), "{v}");

    // Fleet summary counts the same fleet.
    let (s, v) = rest.get("/api/v1/fleet/summary").await;
    assert_eq!(s, 200);
    assert_eq!(v["total"], 11);
    assert_eq!(v["by_state"]["offline"], 1);
    assert_eq!(v["by_health"]["healthy"], 1);
    server.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn get_agent_and_labels() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let a = register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "web-1")],
        RESTART,
        &[CAP_CHATOPS],
    )
    .await;
    let b = register_agent(&server, &[("service.name", "fluentd")], STATUS, &[]).await;

    let (s, v) = rest.get(&format!("/api/v1/agents/{a}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["uid"], a.to_string());
    assert_eq!(v["type"], "fluentbit");
    assert_eq!(v["identifying_attributes"]["service.name"], "fluent-bit");
    assert_eq!(v["non_identifying_attributes"]["host.name"], "web-1");
    assert!(v["capabilities"]["names"]
        .as_array()
        .unwrap()
        .contains(&json!("AcceptsRestartCommand")));
    assert_eq!(v["custom_capabilities"], json!([CAP_CHATOPS]));
    assert_eq!(v["transport"], "http");
    assert_eq!(v["recent_commands"], json!([]));
    assert!(is_rfc3339(&v["first_seen"]));

    let (s, v) = rest.get("/api/v1/agents/not-a-uid").await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = rest
        .get(&format!("/api/v1/agents/{}", Uuid::now_v7()))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));

    // Set, overwrite, a key with a slash, then search by label.
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/env"),
            json!({"value": "dev"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/env"),
            json!({"value": "prod"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({"uid": a.to_string(), "labels": {"env": "prod"}}));
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/team%2Fowner"),
            json!({"value": "obs"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["labels"]["team/owner"], "obs");
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{b}/labels/env"),
            json!({"value": "staging"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = rest.get("/api/v1/agents?q=label:env=prod").await;
    assert_eq!(uids(&v), set(&[a]));
    let (_, v) = rest.get(&format!("/api/v1/agents/{a}")).await;
    assert_eq!(v["labels"], json!({"env": "prod", "team/owner": "obs"}));

    // Bad labels and bodies.
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/bad%20key"),
            json!({"value": "x"}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "bad_request"), "{v}");
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/env"),
            json!({"value": 5}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "malformed_json"), "{v}");
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{a}/labels/env"),
            json!({"val": "x"}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "malformed_json"), "{v}");
    let (s, v) = rest
        .put(
            &format!("/api/v1/agents/{}/labels/env", Uuid::now_v7()),
            json!({"value": "x"}),
        )
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));

    // Remove: 204, idempotent; unknown agent 404.
    let (s, _) = rest.delete(&format!("/api/v1/agents/{a}/labels/env")).await;
    assert_eq!(s, 204);
    let (s, _) = rest.delete(&format!("/api/v1/agents/{a}/labels/env")).await;
    assert_eq!(s, 204);
    let (s, v) = rest
        .delete(&format!("/api/v1/agents/{}/labels/env", Uuid::now_v7()))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (_, v) = rest.get("/api/v1/agents?q=label:env=prod").await;
    assert_eq!(uids(&v), BTreeSet::new());

    // Every change was audited, attributed and targeted.
    let sets = audit(&rest, &format!("operation=agent.label.set&agent={a}")).await;
    assert_eq!(sets.len(), 3);
    assert!(sets
        .iter()
        .all(|r| r["actor"] == "admin" && r["channel"] == "rest"));
    assert_eq!(
        sets[0]["params"],
        json!({"key": "team/owner", "value": "obs"})
    );
    let removes = audit(&rest, &format!("operation=agent.label.remove&agent={a}")).await;
    assert_eq!(removes.len(), 2);
    assert_eq!(
        audit(&rest, &format!("agent={b}&channel=rest")).await.len(),
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn queue_every_command_kind_and_refusals() {
    let server = TestServer::start_with(|c| c.api.max_body_bytes = 4096).await;
    let rest = server.rest();
    let a = register_agent(
        &server,
        &[("service.name", "fluent-bit")],
        ALL_CAPS,
        &[CAP_CHATOPS, CAP_SHUTDOWN, CUSTOM],
    )
    .await;
    let plain = register_agent(&server, &[("service.name", "fluentd")], STATUS, &[]).await;
    let new_uid = Uuid::now_v7().to_string();
    let cases = [
        ("restart", json!({}), json!({})),
        (
            "force_resync",
            json!({"ttl_seconds": 60}),
            json!({"ttl_seconds": 60}),
        ),
        (
            "new_instance_uid",
            json!({"new_uid": new_uid}),
            json!({"new_uid": new_uid}),
        ),
        (
            "chatops",
            json!({"tag": "flush", "attributes": {"a": 1}}),
            json!({"tag": "flush", "attributes": {"a": 1}}),
        ),
        ("shutdown", json!({}), json!({})),
        (
            "custom",
            json!({"capability": CUSTOM, "type": "ping", "data": {"x": 1}}),
            json!({"capability": CUSTOM, "type": "ping", "data": {"x": 1}}),
        ),
    ];
    let mut ids = Vec::new();
    for (kind, params, stored) in &cases {
        let (s, v) = rest
            .post(
                &format!("/api/v1/agents/{a}/commands"),
                json!({"kind": kind, "params": params}),
            )
            .await;
        assert_eq!(s, 202, "{kind}: {v}");
        let id = v["command_id"].as_str().unwrap().to_string();
        assert_eq!(v["command"]["id"], id);
        assert_eq!(v["command"]["kind"], *kind);
        assert_eq!(v["command"]["status"], "queued");
        assert_eq!(&v["command"]["params"], stored, "{kind}");
        let (s, got) = rest.get(&format!("/api/v1/commands/{id}")).await;
        assert_eq!(s, 200);
        assert_eq!(&got["params"], stored, "{kind} as stored");
        assert_eq!(got["agent_uid"], a.to_string());
        assert!(
            is_rfc3339(&got["created_at"]) && is_rfc3339(&got["expires_at"]),
            "{got}"
        );
        assert_eq!(got["sent_at"], Value::Null);
        assert!(got["audit_id"].is_string(), "{got}");
        ids.push(id);
    }
    // remote_config: stored with its computed hash; accepted through POST /commands by agent.
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"agent": a, "kind": "remote_config",
                   "params": {"files": {"fluent-bit.conf": "[SERVICE]\n"}}}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let p = &v["command"]["params"];
    assert_eq!(p["files"]["fluent-bit.conf"]["body"], "[SERVICE]\n");
    assert_eq!(p["hash"].as_str().unwrap().len(), 64);
    ids.push(v["command_id"].as_str().unwrap().to_string());
    // ttl_seconds moves expiry.
    let (_, c) = rest.get(&format!("/api/v1/commands/{}", ids[1])).await;
    let t = |f: &str| {
        time::OffsetDateTime::parse(
            c[f].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert_eq!((t("expires_at") - t("created_at")).whole_seconds(), 60);

    // The Location header names the new command.
    let resp = raw(
        &server,
        Method::POST,
        &format!("/api/v1/agents/{a}/commands"),
        Some(ADMIN_TOKEN),
        Some("application/json"),
        Some(br#"{"kind":"force_resync"}"#.to_vec()),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        location,
        format!("/api/v1/commands/{}", v["command_id"].as_str().unwrap())
    );
    ids.push(v["command_id"].as_str().unwrap().to_string());

    // Refusals.
    let on = |u: Uuid| format!("/api/v1/agents/{u}/commands");
    let (s, v) = rest.post(&on(a), json!({"kind": "reboot"})).await;
    assert_eq!((s, code(&v)), (400, "invalid_params"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("restart"),
        "{v}"
    );
    let (s, v) = rest
        .post(&on(a), json!({"kind": "chatops", "params": {}}))
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    let (s, v) = rest
        .post(
            &on(a),
            json!({"kind": "restart", "params": {"force": true}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"));
    let (s, v) = rest
        .post(&on(a), json!({"kind": "restart", "params": [1]}))
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"));
    let (s, v) = rest.post(&on(a), json!({"params": {}})).await;
    assert_eq!((s, code(&v)), (400, "malformed_json"), "{v}");
    let (s, v) = rest
        .post(&on(a), json!({"kind": "restart", "extra": 1}))
        .await;
    assert_eq!((s, code(&v)), (400, "malformed_json"));
    // A chosen new uid that already names an agent would overwrite its record on adoption;
    // one chosen uid for a whole batch would make every member the same agent.
    let (s, v) = rest
        .post(
            &on(a),
            json!({"kind": "new_instance_uid", "params": {"new_uid": plain}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already belongs"),
        "{v}"
    );
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "service.name:fluent*", "kind": "new_instance_uid",
                   "params": {"new_uid": Uuid::now_v7()}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    // …and one already on its way to another agent (queued above for `a`).
    let (s, v) = rest
        .post(
            &on(plain),
            json!({"kind": "new_instance_uid", "params": {"new_uid": new_uid}}),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "invalid_params"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already being given"),
        "{v}"
    );
    let (s, v) = rest.post(&on(plain), json!({"kind": "restart"})).await;
    assert_eq!((s, code(&v)), (422, "capability_missing"), "{v}");
    let (s, v) = rest
        .post(
            &on(plain),
            json!({"kind": "chatops", "params": {"tag": "x"}}),
        )
        .await;
    assert_eq!((s, code(&v)), (422, "capability_missing"));
    let (s, v) = rest
        .post(&on(Uuid::now_v7()), json!({"kind": "restart"}))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = rest
        .post("/api/v1/agents/xyz/commands", json!({"kind": "restart"}))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));

    // Body problems: syntax, content type, size.
    let body_case = |ct: Option<&'static str>, body: Vec<u8>| {
        let path = on(a);
        let server = &server;
        async move {
            let resp = raw(
                server,
                Method::POST,
                &path,
                Some(ADMIN_TOKEN),
                ct,
                Some(body),
            )
            .await;
            let s = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (s, v)
        }
    };
    let (s, v) = body_case(Some("application/json"), b"{\"kind\": ".to_vec()).await;
    assert_eq!((s, code(&v)), (400, "malformed_json"));
    let (s, v) = body_case(Some("text/plain"), br#"{"kind":"restart"}"#.to_vec()).await;
    assert_eq!((s, code(&v)), (415, "unsupported_media_type"));
    let (s, v) = body_case(None, br#"{"kind":"restart"}"#.to_vec()).await;
    assert_eq!((s, code(&v)), (415, "unsupported_media_type"));
    let big = format!(
        r#"{{"kind":"chatops","params":{{"tag":"t","attributes":{{"x":"{}"}}}}}}"#,
        "y".repeat(8000)
    );
    let (s, v) = body_case(Some("application/json"), big.into_bytes()).await;
    assert_eq!((s, code(&v)), (413, "body_too_large"));

    // Exactly the accepted ones were queued and audited; the agent view shows them.
    let queued = audit(&rest, &format!("operation=command.queue&agent={a}")).await;
    assert_eq!(queued.len(), ids.len());
    for r in &queued {
        assert!(
            ids.contains(&r["targets"][1].as_str().unwrap().to_string()),
            "{r}"
        );
        assert_eq!(r["outcome"], "queued");
    }
    assert!(audit(&rest, &format!("agent={plain}&channel=rest"))
        .await
        .is_empty());
    let (_, v) = rest.get(&format!("/api/v1/agents/{a}")).await;
    assert_eq!(v["recent_commands"].as_array().unwrap().len(), ids.len());
    assert_eq!(
        v["recent_commands"][0]["id"],
        ids[ids.len() - 1],
        "newest first"
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_queued_then_conflict() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let a = register_agent(&server, &[("service.name", "fluent-bit")], RESTART, &[]).await;
    let (_, v) = rest
        .post(
            &format!("/api/v1/agents/{a}/commands"),
            json!({"kind": "restart"}),
        )
        .await;
    let id = v["command_id"].as_str().unwrap().to_string();
    let (s, v) = rest.delete(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    assert!(is_rfc3339(&v["finished_at"]));
    let (s, v) = rest.delete(&format!("/api/v1/commands/{id}")).await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");

    // Once the agent polls, the command is sent and can no longer be cancelled.
    let (_, v) = rest
        .post(
            &format!("/api/v1/agents/{a}/commands"),
            json!({"kind": "force_resync"}),
        )
        .await;
    let sent = v["command_id"].as_str().unwrap().to_string();
    let mut poll = agent_status(a, 1, &[], 0, &[]);
    poll.agent_description = None;
    opamp_post(&server, &poll).await;
    let (_, v) = rest.get(&format!("/api/v1/commands/{sent}")).await;
    assert_eq!(v["status"], "sent", "{v}");
    assert!(is_rfc3339(&v["sent_at"]));
    let (s, v) = rest.delete(&format!("/api/v1/commands/{sent}")).await;
    assert_eq!((s, code(&v)), (409, "conflict"));

    let (s, v) = rest
        .delete(&format!("/api/v1/commands/{}", Uuid::now_v7()))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = rest.delete("/api/v1/commands/zzz").await;
    assert_eq!((s, code(&v)), (400, "bad_request"));

    // One cancel record, referring to the record that queued the command.
    let cancels = audit(&rest, "operation=command.cancel").await;
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0]["targets"], json!([a.to_string(), id]));
    let (_, c) = rest.get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(cancels[0]["ref_id"], c["audit_id"]);
    server.stop().await;
}

#[tokio::test]
async fn command_listing_filters_and_pages() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let a = register_agent(&server, &[("host.name", "l-a")], RESTART, &[]).await;
    let b = register_agent(&server, &[("host.name", "l-b")], RESTART, &[]).await;
    let mut a_ids = Vec::new();
    for kind in [
        "restart",
        "force_resync",
        "restart",
        "force_resync",
        "restart",
    ] {
        let (s, v) = rest
            .post(
                &format!("/api/v1/agents/{a}/commands"),
                json!({"kind": kind}),
            )
            .await;
        assert_eq!(s, 202);
        a_ids.push(v["command_id"].as_str().unwrap().to_string());
    }
    let (_, v) = rest
        .post(
            &format!("/api/v1/agents/{b}/commands"),
            json!({"kind": "restart"}),
        )
        .await;
    let b_id = v["command_id"].as_str().unwrap().to_string();
    assert_eq!(
        rest.delete(&format!("/api/v1/commands/{}", a_ids[0]))
            .await
            .0,
        200
    );
    let (_, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "host:l-*", "kind": "force_resync"}),
        )
        .await;
    let batch = v["batch_id"].as_str().unwrap().to_string();

    let ids_of = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    };
    let count = |v: &Value| v["items"].as_array().unwrap().len();
    let (_, v) = rest.get("/api/v1/commands").await;
    assert_eq!(count(&v), 8);
    assert_eq!(v["next_cursor"], Value::Null);
    let (_, v) = rest.get(&format!("/api/v1/commands?agent={a}")).await;
    assert_eq!(count(&v), 6);
    let (_, v) = rest
        .get(&format!("/api/v1/commands?agent={b}&kind=restart"))
        .await;
    assert_eq!(ids_of(&v), vec![b_id]);
    let (_, v) = rest.get("/api/v1/commands?status=cancelled").await;
    assert_eq!(ids_of(&v), vec![a_ids[0].clone()]);
    let (_, v) = rest
        .get(&format!(
            "/api/v1/commands?kind=restart&status=queued&agent={a}"
        ))
        .await;
    assert_eq!(ids_of(&v), vec![a_ids[4].clone(), a_ids[2].clone()]);
    let (_, v) = rest.get(&format!("/api/v1/commands?batch={batch}")).await;
    assert_eq!(count(&v), 2);
    assert!(v["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["batch_id"] == batch));

    // Pages of 3 over a's 6 commands, newest first, no overlap.
    let mut seen = Vec::new();
    let mut path = format!("/api/v1/commands?agent={a}&limit=3");
    loop {
        let (s, v) = rest.get(&path).await;
        assert_eq!(s, 200, "{v}");
        seen.extend(ids_of(&v));
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/commands?agent={a}&limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first");

    for (path, want) in [
        ("/api/v1/commands?status=done", "bad_request"),
        ("/api/v1/commands?kind=reboot", "bad_request"),
        ("/api/v1/commands?limit=0", "bad_request"),
        ("/api/v1/commands?cursor=x", "bad_request"),
        ("/api/v1/commands?colour=red", "bad_request"),
    ] {
        let (s, v) = rest.get(path).await;
        assert_eq!((s, code(&v)), (400, want), "{path}");
    }
    // An agent is named by uid or name; a name no agent has is not found.
    let (s, v) = rest.get("/api/v1/commands?agent=x").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    let (s, v) = rest
        .get(&format!("/api/v1/commands/{}", Uuid::now_v7()))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    server.stop().await;
}

#[tokio::test]
async fn fan_out_batch_with_skipped_agents() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let f1 = register_agent(&server, &[("host.name", "fan-1")], RESTART, &[]).await;
    let f2 = register_agent(&server, &[("host.name", "fan-2")], RESTART, &[]).await;
    let f3 = register_agent(&server, &[("host.name", "fan-3")], STATUS, &[]).await;
    let other = register_agent(&server, &[("host.name", "other")], RESTART, &[]).await;

    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "host:fan-*", "kind": "restart"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["queued"], 2);
    let batch = v["batch_id"].as_str().unwrap().to_string();
    let targets: BTreeSet<String> = v["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["command_id"].is_string());
            c["agent_uid"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(targets, set(&[f1, f2]));
    assert_eq!(v["skipped"].as_array().unwrap().len(), 1);
    assert_eq!(v["skipped"][0]["agent_uid"], f3.to_string());
    assert!(v["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("AcceptsRestartCommand"));

    // Progress: one command on f1 cancelled, one queued, one skipped.
    let f1_cmd = v["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["agent_uid"] == f1.to_string())
        .unwrap()["command_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        rest.delete(&format!("/api/v1/commands/{f1_cmd}")).await.0,
        200
    );
    let (s, p) = rest.get(&format!("/api/v1/batches/{batch}")).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["batch"]["id"], batch);
    assert_eq!(p["batch"]["query"], "host:fan-*");
    assert_eq!(p["batch"]["kind"], "restart");
    assert_eq!(p["batch"]["actor"], "admin");
    assert!(is_rfc3339(&p["batch"]["created_at"]));
    assert_eq!(
        p["counts"],
        json!({"queued": 1, "cancelled": 1, "skipped": 1})
    );
    assert_eq!(p["commands"].as_array().unwrap().len(), 2);
    let (s, v) = rest
        .get(&format!("/api/v1/batches/{}", Uuid::now_v7()))
        .await;
    assert_eq!((s, code(&v)), (404, "not_found"));

    // Refusals: nothing matches, nothing capable, ambiguous target, bad query, bad params.
    for (body, status, want) in [
        (
            json!({"query": "host:nowhere-*", "kind": "restart"}),
            422,
            "no_targets",
        ),
        (
            json!({"query": "host:fan-3", "kind": "restart"}),
            422,
            "capability_missing",
        ),
        (
            json!({"query": "host:fan-*", "agent": f1, "kind": "restart"}),
            400,
            "bad_request",
        ),
        (json!({"kind": "restart"}), 400, "bad_request"),
        (
            json!({"query": "bogus:x", "kind": "restart"}),
            400,
            "invalid_query",
        ),
        (
            json!({"query": "host:fan-*", "kind": "chatops", "params": {"tag": "../x"}}),
            400,
            "invalid_params",
        ),
        (
            json!({"agent": "nope", "kind": "restart"}),
            404,
            "not_found",
        ),
    ] {
        let (s, v) = rest.post("/api/v1/commands", body.clone()).await;
        assert_eq!((s, code(&v)), (status, want), "{body}: {v}");
    }
    // Viewer cannot fan out either.
    let (s, _) = server
        .rest_as(Some(VIEWER_TOKEN))
        .post(
            "/api/v1/commands",
            json!({"query": "host:fan-*", "kind": "restart"}),
        )
        .await;
    assert_eq!(s, 403);

    // One batch.queue record naming the batch and the queued agents, none for refusals.
    let recs = audit(&rest, "operation=batch.queue").await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["targets"][0], batch);
    assert_eq!(recs[0]["params"]["queued"], 2);
    assert_eq!(recs[0]["params"]["skipped"], 1);
    assert_eq!(audit(&rest, &format!("agent={batch}")).await.len(), 1);
    assert_eq!(
        audit(&rest, &format!("agent={f2}&channel=rest"))
            .await
            .len(),
        1
    );
    assert!(audit(&rest, &format!("agent={other}&channel=rest"))
        .await
        .is_empty());

    // A new uid for a whole batch: a fresh one per agent, never one shared by all.
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"query": "host:fan-*", "kind": "new_instance_uid"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let mut uids = BTreeSet::new();
    for c in v["commands"].as_array().unwrap() {
        let (_, cmd) = rest
            .get(&format!(
                "/api/v1/commands/{}",
                c["command_id"].as_str().unwrap()
            ))
            .await;
        uids.insert(cmd["params"]["new_uid"].as_str().unwrap().to_string());
    }
    assert_eq!(uids.len(), 3, "one distinct new uid per agent: {uids:?}");
    server.stop().await;
}

#[tokio::test]
async fn catalog_counts_capable_agents() {
    let server = TestServer::start().await;
    register_agent(&server, &[("host.name", "c-1")], RESTART, &[CAP_CHATOPS]).await;
    register_agent(&server, &[("host.name", "c-2")], RESTART, &[]).await;
    register_agent(&server, &[("host.name", "c-3")], REMOTE_CONFIG, &[CUSTOM]).await;
    let (s, v) = server
        .rest_as(Some(VIEWER_TOKEN))
        .get("/api/v1/catalog")
        .await;
    assert_eq!(s, 200, "{v}");
    let kinds = v["kinds"].as_array().unwrap();
    assert_eq!(kinds.len(), 7);
    let capable = |k: &str| {
        kinds
            .iter()
            .find(|e| e["kind"] == k)
            .unwrap_or_else(|| panic!("{k} missing"))["capable_agents"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(capable("restart"), 2);
    assert_eq!(capable("chatops"), 1);
    assert_eq!(capable("remote_config"), 1);
    assert_eq!(capable("shutdown"), 0);
    assert_eq!(capable("force_resync"), 3);
    assert_eq!(capable("custom"), 2);
    for k in kinds {
        assert!(
            k["params_schema"].is_object()
                && k["description"].is_string()
                && k["outcome"].as_str().is_some_and(|o| !o.is_empty()),
            "{k}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn audit_queries_by_actor_channel_agent_operation_and_time() {
    let server = TestServer::start().await;
    let admin = server.rest();
    let ops = server.rest_as(Some(OPERATOR_TOKEN));
    let start = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let a = register_agent(&server, &[("host.name", "au-1")], RESTART, &[]).await;
    let b = register_agent(&server, &[("host.name", "au-2")], RESTART, &[]).await;
    assert_eq!(
        admin
            .put(
                &format!("/api/v1/agents/{a}/labels/env"),
                json!({"value": "x"})
            )
            .await
            .0,
        200
    );
    assert_eq!(
        ops.post(
            &format!("/api/v1/agents/{b}/commands"),
            json!({"kind": "restart"})
        )
        .await
        .0,
        202
    );
    assert_eq!(
        ops.delete(&format!("/api/v1/agents/{a}/labels/env"))
            .await
            .0,
        204
    );

    let all = audit(&admin, "channel=rest").await;
    assert_eq!(all.len(), 3);
    for r in &all {
        assert!(
            r["id"].is_string() && is_rfc3339(&r["ts"]) && r["hash"].as_str().unwrap().len() == 64,
            "{r}"
        );
    }
    assert_eq!(all[0]["prev_hash"], all[1]["hash"], "newest first, chained");
    let ops_of = |v: &[Value]| {
        v.iter()
            .map(|r| r["operation"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ops_of(&audit(&admin, "actor=ops").await),
        vec!["agent.label.remove", "command.queue"]
    );
    assert_eq!(
        ops_of(&audit(&admin, "actor=admin").await),
        vec!["agent.label.set"]
    );
    assert_eq!(audit(&admin, "channel=rest").await.len(), 3);
    assert_eq!(audit(&admin, "channel=REST").await.len(), 3);
    assert!(audit(&admin, "channel=mcp").await.is_empty());
    assert_eq!(
        audit(&admin, &format!("agent={a}&channel=rest"))
            .await
            .len(),
        2
    );
    assert_eq!(
        ops_of(&audit(&admin, &format!("agent={b}&channel=rest")).await),
        vec!["command.queue"]
    );
    assert_eq!(
        audit(&admin, "operation=agent.label.set&actor=admin")
            .await
            .len(),
        1
    );

    let fmt = |t: time::OffsetDateTime| {
        urlencode(
            &t.format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
        )
    };
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert_eq!(
        audit(&admin, &format!("channel=rest&since={}", fmt(start)))
            .await
            .len(),
        3
    );
    assert!(audit(&admin, &format!("since={}", fmt(later)))
        .await
        .is_empty());
    assert_eq!(
        audit(&admin, &format!("channel=rest&until={}", fmt(later)))
            .await
            .len(),
        3
    );
    assert!(audit(&admin, "until=0").await.is_empty());
    let ms = (start.unix_timestamp_nanos() / 1_000_000) as i64;
    assert_eq!(
        audit(
            &admin,
            &format!("channel=rest&since={ms}&until={}", ms + 3_600_000)
        )
        .await
        .len(),
        3
    );
    // A "+01:00" offset that arrives decoded as a space is still understood.
    let plus = (start + time::Duration::hours(1))
        .to_offset(time::UtcOffset::from_hms(1, 0, 0).unwrap())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(plus.contains('+'));
    assert_eq!(
        audit(&admin, &format!("since={}", plus.replace(':', "%3A")))
            .await
            .len(),
        0
    );

    // Paging by cursor.
    let (_, p1) = admin.get("/api/v1/audit?channel=rest&limit=2").await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = admin
        .get(&format!("/api/v1/audit?channel=rest&limit=2&cursor={c}"))
        .await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 1);
    assert_eq!(p2["next_cursor"], Value::Null);
    assert_eq!(p2["items"][0]["id"], all[2]["id"]);

    for q in [
        "since=yesterday",
        "until=2025-13-01T00:00:00Z",
        "channel=pigeon",
        "cursor=abc",
        "limit=5000",
        "since=2000&until=1000",
        "who=me",
    ] {
        let (s, v) = admin.get(&format!("/api/v1/audit?{q}")).await;
        assert_eq!((s, code(&v)), (400, "bad_request"), "{q}: {v}");
    }
    let (s, v) = admin.get("/api/v1/audit?agent=x").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    // Viewers may read the trail.
    assert_eq!(
        server
            .rest_as(Some(VIEWER_TOKEN))
            .get("/api/v1/audit")
            .await
            .0,
        200
    );
    server.stop().await;
}

#[tokio::test]
async fn an_agent_is_named_by_uid_host_name_or_service_name() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let web1 = register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "web-1")],
        RESTART,
        &[],
    )
    .await;
    let mut twins = Vec::new();
    for _ in 0..2 {
        twins.push(
            register_agent(
                &server,
                &[("service.name", "fluentd"), ("host.name", "twin")],
                RESTART,
                &[],
            )
            .await,
        );
    }
    // Every route that takes an agent takes its host name, service name or uid alike.
    for name in ["web-1", "fluent-bit", web1.to_string().as_str()] {
        let (s, v) = rest.get(&format!("/api/v1/agents/{name}")).await;
        assert_eq!(
            (s, v["uid"].as_str()),
            (200, Some(web1.to_string().as_str())),
            "{name}: {v}"
        );
    }
    let (s, v) = rest
        .put("/api/v1/agents/web-1/labels/env", json!({"value": "prod"}))
        .await;
    assert_eq!((s, &v["labels"]["env"]), (200, &json!("prod")), "{v}");
    let (s, v) = rest
        .post("/api/v1/agents/web-1/commands", json!({"kind": "restart"}))
        .await;
    assert_eq!(
        (s, v["command"]["agent_uid"].as_str()),
        (202, Some(web1.to_string().as_str())),
        "{v}"
    );
    let (s, v) = rest
        .post(
            "/api/v1/commands",
            json!({"agent": "web-1", "kind": "force_resync"}),
        )
        .await;
    assert_eq!(
        (s, v["command"]["agent_uid"].as_str()),
        (202, Some(web1.to_string().as_str())),
        "{v}"
    );
    let (s, v) = rest.get("/api/v1/commands?agent=web-1").await;
    assert_eq!(
        (s, v["items"].as_array().map(Vec::len)),
        (200, Some(2)),
        "{v}"
    );
    let records = audit(&rest, "agent=web-1&operation=command.queue").await;
    assert_eq!(records.len(), 2);
    let (s, _) = rest.delete("/api/v1/agents/web-1/labels/env").await;
    assert_eq!(s, 204);

    // A name several agents share is refused, listing them; nothing is queued.
    for (method, path, body) in [
        (Method::GET, "/api/v1/agents/twin".to_string(), None),
        (
            Method::POST,
            "/api/v1/agents/twin/commands".to_string(),
            Some(json!({"kind": "restart"})),
        ),
        (
            Method::POST,
            "/api/v1/commands".to_string(),
            Some(json!({"agent": "twin", "kind": "restart"})),
        ),
        (Method::GET, "/api/v1/commands?agent=twin".to_string(), None),
    ] {
        let (s, v) = rest.call(method.clone(), &path, body).await;
        assert_eq!(
            (s, code(&v)),
            (409, "ambiguous_agent"),
            "{method} {path}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        for t in &twins {
            assert!(msg.contains(&t.to_string()), "{msg}");
        }
    }
    // An unknown name says how to find the agent.
    let (s, v) = rest.get("/api/v1/agents/web-404").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"web-404\"") && msg.contains("GET /api/v1/agents?q="),
        "{msg}"
    );
    let (_, all) = rest.get("/api/v1/commands").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_bad_body_is_explained_in_the_clients_terms() {
    let server = TestServer::start().await;
    let agent = register_agent(&server, &[("host.name", "web-1")], RESTART, &[]).await;
    let send = |path: String, ct: Option<&'static str>, body: &'static str| {
        let server = &server;
        async move {
            let resp = raw(
                server,
                Method::PUT,
                &path,
                Some(ADMIN_TOKEN),
                ct,
                Some(body.as_bytes().to_vec()),
            )
            .await;
            let s = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (
                s,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
                v["error"]["message"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let label = format!("/api/v1/agents/{agent}/labels/env");
    for (body, wants) in [
        // The shape is wrong: the field is named, the server's types are not.
        (
            r#"[]"#,
            &["request body must be a JSON object, not an array"][..],
        ),
        (
            r#""x""#,
            &["request body must be a JSON object, not a string"][..],
        ),
        (
            r#"{"value": {"a": 1}}"#,
            &["field `value`", "invalid type: object, expected a string"][..],
        ),
        (
            r#"{"value": 1}"#,
            &["field `value`", "expected a string", "line 1 column 11"][..],
        ),
        (
            r#"{"valu": "x"}"#,
            &["unknown field `valu`, expected `value`"][..],
        ),
        (r#"{}"#, &["missing field `value`"][..]),
        // Not JSON at all: where it breaks.
        (
            r#"{"value": "x",}"#,
            &["request body is not valid JSON: trailing comma at line 1 column 15"][..],
        ),
        (
            r#"{"value": "x"} trailing"#,
            &["request body is not valid JSON: trailing characters"][..],
        ),
    ] {
        let (s, code, msg) = send(label.clone(), Some("application/json"), body).await;
        assert_eq!((s, code.as_str()), (400, "malformed_json"), "{body}: {msg}");
        for w in wants {
            assert!(msg.contains(w), "{body}: {msg:?} lacks {w:?}");
        }
        assert!(
            !msg.contains("struct") && !msg.contains("Body"),
            "{body}: {msg}"
        );
    }
    let resp = raw(
        &server,
        Method::POST,
        "/api/v1/commands",
        Some(ADMIN_TOKEN),
        Some("application/json"),
        Some(br#"{"query": "", "kind": "restart", "expect_targets": {"count": "two"}}"#.to_vec()),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(code(&v), "malformed_json", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("field `expect_targets.count`") && !msg.contains("struct"),
        "{msg}"
    );
    // A JSON API named by its media type, with parameters, is JSON.
    let (s, _, msg) = send(
        label.clone(),
        Some("application/json; charset=utf-8"),
        r#"{"value": "x"}"#,
    )
    .await;
    assert_eq!(s, 200, "{msg}");
    // The wrong media type is named in the refusal.
    let (s, code, msg) = send(label.clone(), Some("text/plain"), r#"{"value": "x"}"#).await;
    assert_eq!((s, code.as_str()), (415, "unsupported_media_type"));
    assert!(
        msg.contains("Content-Type: application/json") && msg.contains("\"text/plain\""),
        "{msg}"
    );

    // An agent POSTing OpAMP with the wrong media type is told what OpAMP expects (it was
    // told "Request method must be `GET`").
    for ct in [Some("application/json"), None] {
        let mut req = reqwest::Client::new()
            .post(server.opamp_http_url())
            .body("x");
        if let Some(ct) = ct {
            req = req.header("Content-Type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 415);
        let text = resp.text().await.unwrap();
        assert!(text.contains("application/x-protobuf"), "{text}");
        assert!(!text.contains("GET"), "{text}");
        match ct {
            Some(ct) => assert!(text.contains(ct), "{text}"),
            None => assert!(text.contains("no Content-Type"), "{text}"),
        }
    }
    server.stop().await;
}

/// Generates a Python client from the served document with openapi-python-client (as a user
/// of the API would) and queues commands with it against this server.
#[tokio::test]
async fn a_client_generated_from_the_openapi_document_queues_commands() {
    let server = TestServer::start().await;
    let agent = register_agent(
        &server,
        &[("service.name", "fluent-bit"), ("host.name", "gen-1")],
        RESTART,
        &[],
    )
    .await;
    // Fetched without a token, as a generator does.
    let (s, doc) = server.rest_as(None).get("/api/v1/openapi.json").await;
    assert_eq!(s, 200);
    let base_url = doc["servers"][0]["url"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("openapi.json"), doc.to_string()).unwrap();

    let python = peers_python_in("openapi-python-client");
    let bin = python.parent().unwrap().to_path_buf();
    let generator = bin.join("openapi-python-client");
    assert!(
        generator.is_file(),
        "openapi-python-client is not installed: {} is missing. Run `bash tests/peers/install.sh` first.",
        generator.display()
    );
    // Its post-generation hooks run ruff, installed beside it.
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let gen = tokio::process::Command::new(&generator)
        .args(["generate", "--path", "openapi.json", "--output-path"])
        .arg("flotilla_client")
        .args(["--meta", "none"])
        .current_dir(dir.path())
        .env("PATH", &path)
        .output()
        .await
        .expect("run openapi-python-client");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&gen.stdout),
        String::from_utf8_lossy(&gen.stderr)
    );
    assert!(gen.status.success(), "openapi-python-client failed:\n{log}");
    for bad in ["Unable to process schema", "duplicate", "Unable to parse"] {
        assert!(
            !log.contains(bad),
            "the generator dropped part of the API ({bad}):\n{log}"
        );
    }
    assert!(
        dir.path()
            .join("flotilla_client/api/commands/queue_command.py")
            .is_file(),
        "{log}"
    );

    let out = tokio::process::Command::new(&python)
        .arg(repo_root().join("tests/peers/python/generated_client.py"))
        .arg("--package-dir")
        .arg(dir.path())
        .args(["--package", "flotilla_client", "--base-url", &base_url])
        .args(["--token", OPERATOR_TOKEN, "--agent", &agent.to_string()])
        .args(["--query", "host:gen-*"])
        .env("PATH", &path)
        .output()
        .await
        .expect("run the generated client");
    assert!(
        out.status.success(),
        "the generated client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queue"]["status"], 202, "{v}");
    assert_eq!(v["queue"]["type"], "QueuedCommand", "{v}");
    assert_eq!(v["get"]["type"], "Command", "{v}");
    assert_eq!(
        (
            v["get"]["command_status"].as_str(),
            v["get"]["kind"].as_str()
        ),
        (Some("queued"), Some("restart")),
        "{v}"
    );
    assert_eq!(v["dry_run"]["status"], 200, "{v}");
    assert_eq!(v["dry_run"]["type"], "Plan", "{v}");
    assert_eq!(v["dry_run"]["target_count"], 1, "{v}");
    // The server agrees: queued by the operator over REST, for that agent, with its params.
    let id = v["queue"]["command_id"].as_str().unwrap();
    let (s, c) = server.rest().get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["agent_uid"], agent.to_string());
    assert_eq!(c["status"], "queued");
    assert_eq!(c["params"]["ttl_seconds"], 120);
    assert_eq!(
        (c["actor"].as_str(), c["channel"].as_str()),
        (Some("ops"), Some("rest"))
    );
    let (_, all) = server.rest().get("/api/v1/commands").await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        1,
        "the dry run queued nothing"
    );
    server.stop().await;
}

#[tokio::test]
async fn openapi_document_is_complete() {
    let server = TestServer::start().await;
    let rest = server.rest();
    let (s, doc) = rest.get("/api/v1/openapi.json").await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = flotilla_server::rest::routes();
    let served: BTreeSet<(String, String)> = routes
        .iter()
        .map(|(m, p)| (m.to_ascii_lowercase(), p.to_string()))
        .collect();
    let mut documented = BTreeSet::new();
    let mut op_ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((method.clone(), path.clone()));
            assert!(
                op_ids.insert(op["operationId"].as_str().unwrap().to_string()),
                "duplicate operationId"
            );
            assert!(
                !op["responses"].as_object().unwrap().is_empty(),
                "{method} {path}"
            );
            // Every {param} of the path is declared as a path parameter.
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            assert_eq!(declared, in_path, "{method} {path}");
            if let Some(body) = op.get("requestBody") {
                assert!(
                    body["content"]["application/json"]["schema"].is_object(),
                    "{method} {path}"
                );
            }
            if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
                assert!(
                    op["responses"]["401"].is_object(),
                    "{method} {path} documents 401"
                );
            }
        }
    }
    assert_eq!(served, documented);
    // Every $ref resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }
    // Every listed route is really served for its method (never no_route/method_not_allowed).
    for (method, path) in &routes {
        let concrete = path
            .replace("{uid}", &Uuid::now_v7().to_string())
            .replace("{id}", &Uuid::now_v7().to_string())
            .replace("{key}", "k");
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let body = matches!(*method, "POST" | "PUT").then(|| b"{}".to_vec());
        let resp = raw(
            &server,
            m,
            &concrete,
            Some(ADMIN_TOKEN),
            Some("application/json"),
            body,
        )
        .await;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status != 405 && !(status == 404 && code(&v) == "no_route"),
            "{method} {path}: {status} {v}"
        );
    }
    // Each kind's parameter schema is defined once, as a component both queue requests
    // reference; inlined twice, generators built the same model twice.
    let kinds = doc["components"]["schemas"]["CommandKind"]["enum"]
        .as_array()
        .unwrap();
    // Every kind takes ttl_seconds: defined once per kind means no schema is inlined again.
    assert_eq!(
        text.matches(r#""ttl_seconds":{"#).count(),
        kinds.len(),
        "a params schema is inlined somewhere"
    );
    for kind in kinds {
        let camel: String = kind
            .as_str()
            .unwrap()
            .split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        let params = &doc["components"]["schemas"][format!("{camel}Params")];
        assert_eq!(params["type"], "object", "{kind}");
        for variant in [format!("{camel}Request"), format!("{camel}FanoutRequest")] {
            let v = &doc["components"]["schemas"][&variant];
            assert_eq!(
                v["properties"]["params"]["$ref"],
                format!("#/components/schemas/{camel}Params"),
                "{variant}"
            );
        }
    }
    assert_eq!(
        doc["servers"][0]["url"],
        format!("http://{}", server.api),
        "servers names the server that answered"
    );
    let (s, v) = rest.get("/api/v1/nothing-here").await;
    assert_eq!((s, code(&v)), (404, "no_route"));
    let (s, v) = rest.call(Method::PATCH, "/api/v1/agents", None).await;
    assert_eq!((s, code(&v)), (405, "method_not_allowed"));
    server.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start().await;
    let resp = raw(&server, Method::GET, "/readyz", None, None, None).await;
    assert_eq!(resp.status().as_u16(), 200);
    let a = register_agent(&server, &[("host.name", "m-1")], RESTART, &[]).await;
    let (s, _) = server
        .rest()
        .post(
            &format!("/api/v1/agents/{a}/commands"),
            json!({"kind": "restart"}),
        )
        .await;
    assert_eq!(s, 202);
    let resp = raw(&server, Method::GET, "/metrics", None, None, None).await;
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    for needle in [
        "flotilla_agents",
        "flotilla_commands",
        "flotilla_opamp_messages",
        "flotilla_command_delivery_latency_seconds",
        "flotilla_agents{state=\"healthy\"} 1",
        "flotilla_agents{state=\"offline\"} 0",
        "flotilla_commands{status=\"queued\"} 1",
        "flotilla_commands{status=\"sent\"} 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn relays_may_declare_their_channel_but_not_system() {
    let server = TestServer::start().await;
    let a = register_agent(&server, &[("host.name", "ch-1")], RESTART, &[]).await;
    let client = reqwest::Client::new();
    let put = |channel: &'static str| {
        client
            .put(server.api_url(&format!("/api/v1/agents/{a}/labels/team")))
            .bearer_auth(OPERATOR_TOKEN)
            .header("X-Flotilla-Channel", channel)
            .json(&json!({"value": channel}))
            .send()
    };
    assert_eq!(put("mcp").await.unwrap().status().as_u16(), 200);
    let refused = put("system").await.unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    let (s, audit) = server
        .rest()
        .get(&format!(
            "/api/v1/audit?agent={a}&operation=agent.label.set"
        ))
        .await;
    assert_eq!(s, 200);
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "only the accepted call is audited: {audit}");
    assert_eq!(items[0]["channel"], "mcp");
    assert_eq!(items[0]["actor"], "ops");
    server.stop().await;
}

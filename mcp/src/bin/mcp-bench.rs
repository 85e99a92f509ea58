//! `mcp-bench`: what the MCP tools cost a model on a large fleet. Starts `flotilla serve`
//! (next to this binary, or `$FLOTILLA_BIN`), registers N simulated agents over OpAMP HTTP,
//! then calls the tools through rmcp's streamable HTTP client and reports, per call, the
//! response size (the whole `tools/call` result as JSON), an estimated token count (bytes / 4)
//! and the latency (median and p95 over repeated calls).
//!
//!   cargo run --release -p flotilla-mcp --features bench --bin mcp-bench -- [AGENTS] [REPEATS]
//!
//! Results are recorded in docs/benchmark-mcp.md.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_proto::{
    kv_str, AgentCapabilities, AgentDescription, AgentToServer, ComponentHealth, Message,
};
use futures_util::stream::{self, StreamExt};
use rmcp::model::CallToolRequestParams;
use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use serde_json::{json, Value};

const TOKEN: &str = "bench-admin-token-0123456789";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn flotilla_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("flotilla");
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build it first (cargo build --release -p flotilla-server --bin flotilla) or set FLOTILLA_BIN",
            p.display()
        )
    }
}

/// One simulated agent's full status: a Fluent Bit or Fluentd with a health tree; every
/// tenth agent (half of them Fluentd) is unhealthy with a failing output.
fn status(i: usize) -> AgentToServer {
    let fluentd = i % 5 < 2;
    let (name, version) = if fluentd {
        ("fluentd", ["1.16.5", "1.17.0"][i % 2])
    } else {
        ("fluent-bit", ["3.2.4", "4.0.1", "5.1.1"][i % 3])
    };
    let healthy = !matches!(i % 20, 6 | 13);
    let mut components = std::collections::HashMap::new();
    for c in ["input.tail", "filter.kubernetes", "output.es"] {
        let bad = !healthy && c == "output.es";
        components.insert(
            c.to_string(),
            ComponentHealth {
                healthy: !bad,
                start_time_unix_nano: 1,
                last_error: if bad {
                    "retry limit reached: 1204 records dropped (connection refused)".into()
                } else {
                    String::new()
                },
                status: if bad { "degraded" } else { "ok" }.into(),
                ..Default::default()
            },
        );
    }
    AgentToServer {
        instance_uid: uuid::Uuid::now_v7().as_bytes().to_vec(),
        sequence_num: 0,
        capabilities: AgentCapabilities::ReportsStatus as u64
            | AgentCapabilities::AcceptsRestartCommand as u64
            | AgentCapabilities::ReportsHealth as u64
            | AgentCapabilities::AcceptsRemoteConfig as u64,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv_str("service.name", name),
                kv_str("service.version", version),
            ],
            non_identifying_attributes: vec![
                kv_str("host.name", &format!("web-{i}")),
                kv_str("os.type", "linux"),
                kv_str("k8s.namespace.name", ["logging", "ingest", "edge"][i % 3]),
            ],
        }),
        health: Some(ComponentHealth {
            healthy,
            start_time_unix_nano: 1,
            status: if healthy { "running" } else { "degraded" }.into(),
            last_error: if healthy {
                String::new()
            } else {
                "output.es unhealthy".into()
            },
            component_health_map: components,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agents: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let repeats: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);

    let dir = std::env::temp_dir().join(format!(
        "flotilla-mcp-bench-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("bench admin {TOKEN}\n"))?;
    let (op, api) = (free_port()?, free_port()?);
    let mut child = tokio::process::Command::new(flotilla_bin()?)
        .args([
            "serve",
            "--opamp-listen",
            &format!("127.0.0.1:{op}"),
            "--api-listen",
            &format!("127.0.0.1:{api}"),
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("FLOTILLA_API_TOKENS_FILE", &tokens)
        .env("FLOTILLA_HEARTBEAT_INTERVAL_S", "3600")
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn flotilla serve")?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api}");
    let started = Instant::now();
    loop {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("flotilla serve did not come up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let t = Instant::now();
    let opamp = format!("http://127.0.0.1:{op}/v1/opamp");
    let results: Vec<anyhow::Result<()>> = stream::iter(0..agents)
        .map(|i| {
            let http = http.clone();
            let opamp = opamp.clone();
            async move {
                let r = http
                    .post(&opamp)
                    .header("Content-Type", "application/x-protobuf")
                    .body(status(i).encode_to_vec())
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("OpAMP registration answered {}", r.status());
                }
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!(
        "registered {agents} agents in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp")).auth_header(TOKEN),
    );
    let client = ()
        .serve_with_lifecycle(
            transport,
            ClientLifecycleMode::Discover {
                preferred_versions: vec![rmcp::model::ProtocolVersion::V_2026_07_28],
            },
        )
        .await?;
    let tools = client.list_all_tools().await?;
    let tools_bytes = serde_json::to_vec(&tools)?.len();

    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "agents_search \"unhealthy Fluentd agents\"",
            "agents_search",
            json!({"query": "type:fluentd health:unhealthy"}),
        ),
        (
            "agents_search (whole fleet, limit 20)",
            "agents_search",
            json!({}),
        ),
        ("fleet_summary", "fleet_summary", json!({})),
        (
            "agent_get by host (default detail)",
            "agent_get",
            json!({"agent": "web-6"}),
        ),
        (
            "agent_get by host, full health tree",
            "agent_get",
            json!({"agent": "web-6", "include": ["health"]}),
        ),
        ("commands_catalog", "commands_catalog", json!({})),
        (
            "command_queue dry_run fan-out (fluentd unhealthy)",
            "command_queue",
            json!({"query": "type:fluentd health:unhealthy", "kind": "restart", "dry_run": true}),
        ),
    ];
    println!("| call | response bytes | est. tokens (bytes/4) | structured bytes | p50 ms | p95 ms | note |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    println!(
        "| tools/list (11 tools, schemas) | {tools_bytes} | {} | – | – | – | once per session |",
        tools_bytes / 4
    );
    for (label, tool, args) in cases {
        let mut lat = Vec::with_capacity(repeats);
        let mut bytes = 0;
        let mut sbytes = 0;
        let mut note = String::new();
        for _ in 0..repeats {
            let params = CallToolRequestParams::new(tool.to_string())
                .with_arguments(args.as_object().cloned().unwrap_or_default());
            let t = Instant::now();
            let r = client.call_tool(params).await?;
            lat.push(t.elapsed());
            if r.is_error == Some(true) {
                bail!("{tool} failed: {:?}", r.content);
            }
            bytes = serde_json::to_vec(&r)?.len();
            let s = r.structured_content.clone().unwrap_or(Value::Null);
            sbytes = serde_json::to_vec(&s)?.len();
            note = match (s.get("total"), s.get("total_targets")) {
                (Some(t), _) => format!("total={t}"),
                (None, Some(t)) => format!("targets={t}"),
                _ => String::new(),
            };
        }
        lat.sort();
        println!(
            "| {label} | {bytes} | {} | {sbytes} | {:.1} | {:.1} | {note} |",
            bytes / 4,
            percentile(&lat, 0.5).as_secs_f64() * 1000.0,
            percentile(&lat, 0.95).as_secs_f64() * 1000.0,
        );
    }
    client.cancel().await?;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

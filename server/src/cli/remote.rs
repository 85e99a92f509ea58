//! The operator commands: thin clients of the REST API (so roles, confirmation of fan-outs and
//! the audit trail are the server's, exactly as for any REST caller). Agents are named by host
//! name or uid; `queue` previews with a dry run, asks, and queues with the preview's
//! `expect_targets`, so what is queued is what was confirmed.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{Api, ClientArgs};
use super::output::{cell, pairs, print_data, print_fields, print_table, Format};
use super::{Exit, Failure};

/// `-o/--output` of the operator commands.
#[derive(Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Output format: table (for people), json or yaml (the REST API's shapes, for scripts)
    /// [client config: output; default table].
    #[arg(short, long, value_enum, env = "FLOTILLA_OUTPUT")]
    pub output: Option<Format>,
}

/// A connected client and the chosen format.
struct Ctx {
    api: Api,
    format: Format,
}

impl Ctx {
    fn new(client: &ClientArgs, out: &OutputArgs) -> Result<Ctx, Failure> {
        let s = client.resolve()?;
        let format = out.output.or(s.output).unwrap_or(Format::Table);
        Ok(Ctx {
            api: Api::new(&s)?,
            format,
        })
    }
}

type Res = anyhow::Result<Exit>;

#[derive(Args, Debug)]
pub struct AgentsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Search terms, ANDed: free text, key:value (type:fluentbit, host:web-*, state:online,
    /// label:env=prod, health:unhealthy, …), -term negates (put `--` before a query that
    /// starts with one: `flotilla agents -- -state:offline`).
    #[arg(value_name = "QUERY")]
    query: Vec<String>,
    /// At most this many agents.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Wait up to this many seconds until at least one agent matches (exit 3 if none does).
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Keep asking for up to this many seconds until the server is ready.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Host name or uid (or a unique uid prefix).
    #[arg(value_name = "HOST|UID")]
    agent: String,
}

#[derive(Args, Debug)]
pub struct QueueArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Command kind: restart, force_resync, new_instance_uid, chatops, shutdown, custom,
    /// remote_config (`GET /api/v1/catalog` describes each).
    kind: String,
    /// One agent (host name or uid) or a search query for a fan-out, e.g. 'type:fluentbit
    /// label:env=prod'. Anything with a ':', a '*' or a space is a query.
    #[arg(value_name = "HOST|UID|QUERY")]
    target: String,
    /// Treat TARGET as a search query even if it looks like a host name.
    #[arg(long)]
    query: bool,
    /// A parameter: KEY=VALUE (VALUE is JSON if it parses, else a string; KEY=@FILE reads
    /// the file as a string; a dotted KEY nests: attributes.reason=test).
    #[arg(short, long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// All parameters as one JSON object (or @FILE holding it); --param entries are added.
    #[arg(long = "params", value_name = "JSON|@FILE")]
    params_json: Option<String>,
    /// Show what would be queued (the targets, the parameters as they would be sent) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Queue without asking (the preview is still printed to stderr).
    #[arg(short, long)]
    yes: bool,
    /// Wait until the command (every command of a fan-out) has finished.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit 7).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    timeout: u64,
}

#[derive(Args, Debug)]
pub struct CommandsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Only this agent's commands (host name or uid).
    #[arg(long, value_name = "HOST|UID")]
    agent: Option<String>,
    /// Only commands in this status (queued, sent, succeeded, failed, expired, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// Only commands of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// Only the commands of this fan-out batch.
    #[arg(long, value_name = "BATCH_ID")]
    batch: Option<String>,
    /// At most this many commands.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args, Debug)]
pub struct CommandArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Command id.
    id: String,
    /// Wait until it has finished; exit 6 unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit 7).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    timeout: u64,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Command id.
    id: String,
}

#[derive(Args, Debug, Default)]
pub struct AuditArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Only records by this actor (token name).
    #[arg(long)]
    actor: Option<String>,
    /// Only records from this channel (rest, mcp, cli, slack, discord, teams, console, system).
    #[arg(long)]
    channel: Option<String>,
    /// Only records about this agent (host name or uid).
    #[arg(long, value_name = "HOST|UID")]
    agent: Option<String>,
    /// Only this operation (e.g. command.queue, label.set, command.result).
    #[arg(long)]
    operation: Option<String>,
    /// Only records at or after this time (RFC 3339 or unix milliseconds).
    #[arg(long)]
    since: Option<String>,
    /// Only records at or before this time.
    #[arg(long)]
    until: Option<String>,
    /// At most this many records.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args, Debug)]
pub struct LabelsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Search terms (as for `agents`); all agents without.
    #[arg(value_name = "QUERY")]
    query: Vec<String>,
    /// At most this many agents.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Args, Debug)]
pub struct LabelArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    out: OutputArgs,
    /// Host name or uid.
    #[arg(value_name = "HOST|UID")]
    agent: String,
    /// KEY=VALUE sets a label, KEY- removes it.
    #[arg(value_name = "KEY=VALUE|KEY-", required = true)]
    changes: Vec<String>,
}

/// Every item of a paged listing, following `next_cursor` until `limit` items.
async fn fetch_items(
    api: &Api,
    path: &str,
    query: &[(&str, String)],
    limit: usize,
) -> Result<Vec<Value>, Failure> {
    if limit == 0 {
        return Err(Failure::new(Exit::Usage, "--limit must be at least 1"));
    }
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = query.to_vec();
        q.push(("limit", (limit - items.len()).min(1000).to_string()));
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page = api.get(path, &q).await?;
        if let Some(a) = page["items"].as_array() {
            items.extend(a.iter().cloned());
        }
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() || items.len() >= limit {
            items.truncate(limit);
            return Ok(items);
        }
    }
}

fn is_query(s: &str) -> bool {
    s.is_empty() || s.contains(|c: char| c.is_whitespace() || matches!(c, ':' | '*' | '"'))
}

/// The path of one agent named by uid, host name, service name or a query matching one agent:
/// the server resolves it (one resolution for REST, MCP and this CLI), refusing an ambiguous
/// name with the candidates listed.
fn agent_path(name: &str) -> Result<String, Failure> {
    if name.trim().is_empty() {
        return Err(Failure::new(Exit::Usage, "an agent must be named"));
    }
    Ok(format!("/api/v1/agents/{}", url_segment(name.trim())))
}

/// An agent's uid, as the server resolves `name`.
async fn resolve_agent(api: &Api, name: &str) -> Result<String, Failure> {
    let v = api.get(&agent_path(name)?, &[]).await?;
    Ok(v["uid"].as_str().unwrap_or_default().to_string())
}

fn agent_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|a| {
            vec![
                cell(&a["uid"]),
                cell(if a["host"].is_null() {
                    &a["name"]
                } else {
                    &a["host"]
                }),
                cell(&a["type"]),
                cell(&a["version"]),
                cell(&a["state"]),
                match a["healthy"].as_bool() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                pairs(&a["labels"]),
                cell(&a["last_seen"]),
            ]
        })
        .collect()
}

const AGENT_COLUMNS: &[&str] = &[
    "UID",
    "HOST",
    "TYPE",
    "VERSION",
    "STATE",
    "HEALTHY",
    "LABELS",
    "LAST SEEN",
];

/// `flotilla agents [QUERY] [--wait S]`.
pub async fn agents(a: AgentsArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let query = [("q", a.query.join(" "))];
    let deadline = a
        .wait
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let items = loop {
        let items = fetch_items(&ctx.api, "/api/v1/agents", &query, a.limit).await?;
        match deadline {
            Some(d) if items.is_empty() => {
                if tokio::time::Instant::now() >= d {
                    return Err(Failure::new(
                        Exit::NotFound,
                        format!("no agent matched within {} s", a.wait.unwrap_or(0)),
                    )
                    .into());
                }
                tokio::time::sleep(POLL).await;
            }
            _ => break items,
        }
    };
    match ctx.format {
        Format::Table => print_table(AGENT_COLUMNS, &agent_rows(&items))?,
        f => print_data(f, &Value::Array(items))?,
    }
    Ok(Exit::Ok)
}

/// `flotilla health [--wait S]`: 0 when the server's `/readyz` answers 200 (its store answers).
pub async fn health(a: HealthArgs) -> Res {
    let api = Api::new(&a.client.resolve_server()?)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.wait.unwrap_or(0));
    loop {
        let err = match api.ready().await {
            Ok(()) => {
                println!("ready");
                return Ok(Exit::Ok);
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(err.into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `flotilla agent HOST|UID`.
pub async fn agent(a: AgentArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let v = ctx.api.get(&agent_path(&a.agent)?, &[]).await?;
    if ctx.format != Format::Table {
        print_data(ctx.format, &v)?;
        return Ok(Exit::Ok);
    }
    let attr = |k: &str| cell(&v["non_identifying_attributes"][k]);
    let ident = |k: &str| cell(&v["identifying_attributes"][k]);
    let host = {
        let h = attr("host.name");
        if h == "-" {
            attr("hostname")
        } else {
            h
        }
    };
    let health = match v["health"]["healthy"].as_bool() {
        Some(true) => "healthy".to_string(),
        Some(false) => format!("unhealthy: {}", cell(&v["health"]["last_error"])),
        None => "-".into(),
    };
    let caps: Vec<String> = v["capabilities"]["names"]
        .as_array()
        .map(|a| a.iter().map(cell).collect())
        .unwrap_or_default();
    print_fields(&[
        ("UID", cell(&v["uid"])),
        ("Type", cell(&v["type"])),
        ("Name", ident("service.name")),
        ("Version", ident("service.version")),
        ("Host", host),
        ("State", cell(&v["state"])),
        ("Connected", cell(&v["connected"])),
        ("Transport", cell(&v["transport"])),
        ("Health", health),
        ("Labels", pairs(&v["labels"])),
        ("Capabilities", caps.join(",")),
        ("First seen", cell(&v["first_seen"])),
        ("Last seen", cell(&v["last_seen"])),
    ])?;
    let recent = v["recent_commands"].as_array().cloned().unwrap_or_default();
    if !recent.is_empty() {
        println!("\nRecent commands:");
        print_table(COMMAND_COLUMNS, &command_rows(&recent))?;
    }
    Ok(Exit::Ok)
}

/// Builds the parameters object from --params and --param.
fn build_params(json_arg: Option<&str>, pairs: &[String]) -> Result<Value, Failure> {
    let usage = |m: String| Failure::new(Exit::Usage, m);
    let read = |spec: &str| -> Result<String, Failure> {
        match spec.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(PathBuf::from(path))
                .map_err(|e| usage(format!("cannot read {path}: {e}"))),
            None => Ok(spec.to_string()),
        }
    };
    let mut params = match json_arg {
        None => Map::new(),
        Some(spec) => match serde_json::from_str::<Value>(&read(spec)?) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(usage("--params must be a JSON object".into())),
            Err(e) => return Err(usage(format!("--params is not JSON: {e}"))),
        },
    };
    for p in pairs {
        let Some((key, raw)) = p.split_once('=') else {
            return Err(usage(format!("--param {p:?} is not KEY=VALUE")));
        };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(usage(format!("--param {p:?} has an empty key")));
        }
        let value = if raw.starts_with('@') {
            Value::String(read(raw)?)
        } else {
            serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        let mut obj = &mut params;
        for part in parts {
            let slot = obj
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            obj = match slot {
                Value::Object(m) => m,
                _ => return Err(usage(format!("--param {p:?}: {part} is not an object"))),
            };
        }
        obj.insert(last.to_string(), value);
    }
    Ok(Value::Object(params))
}

/// The preview of a plan, for stderr.
fn describe_plan(plan: &Value, target: &str) -> String {
    let n = plan["target_count"].as_u64().unwrap_or(0);
    let kind = cell(&plan["kind"]);
    let mut s = if plan["target"]["query"].is_string() {
        format!(
            "{kind} for {n} agent{} matching {:?} ({} matched, {} skipped)\n",
            if n == 1 { "" } else { "s" },
            target,
            plan["matched"],
            plan["skipped_count"]
        )
    } else {
        format!("{kind} for agent {target}\n")
    };
    let targets = plan["targets"].as_array().cloned().unwrap_or_default();
    for t in &targets {
        let who = if t["host"].is_null() {
            &t["name"]
        } else {
            &t["host"]
        };
        s.push_str(&format!(
            "  {}  {}  {}  {}\n",
            cell(&t["uid"]),
            cell(who),
            cell(&t["type"]),
            cell(&t["state"])
        ));
    }
    if (targets.len() as u64) < n {
        s.push_str(&format!("  … and {} more\n", n - targets.len() as u64));
    }
    for sk in plan["skipped"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "  skipped {}: {}\n",
            cell(&sk["agent_uid"]),
            cell(&sk["reason"])
        ));
    }
    s.push_str(&format!("  parameters: {}\n", plan["params"]));
    if plan["destructive"].as_bool() == Some(true) {
        s.push_str("  this command is destructive\n");
    }
    s
}

/// Asks on stderr, reads one line from stdin. End of input or anything but y/yes declines.
fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => {
            eprintln!();
            false
        }
        Ok(_) => matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes"),
    }
}

/// `flotilla queue KIND TARGET`.
pub async fn queue(a: QueueArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let params = build_params(a.params_json.as_deref(), &a.params)?;
    let mut body = json!({"kind": a.kind, "params": params});
    if a.query || is_query(&a.target) {
        body["query"] = json!(a.target);
    } else {
        // The server resolves the name; the dry run shows which agent it is.
        body["agent"] = json!(a.target);
    }
    let mut dry = body.clone();
    dry["dry_run"] = json!(true);
    let plan = ctx.api.post("/api/v1/commands", &dry).await?;
    if a.dry_run {
        match ctx.format {
            Format::Table => print!("{}", describe_plan(&plan, &a.target)),
            f => print_data(f, &plan)?,
        }
        return Ok(Exit::Ok);
    }
    eprint!("{}", describe_plan(&plan, &a.target));
    if !a.yes && !confirm("Queue it?") {
        return Err(Failure::new(
            Exit::NotConfirmed,
            "not confirmed; nothing was queued (answer y, or pass --yes)",
        )
        .into());
    }
    body["expect_targets"] = plan["expect_targets"].clone();
    let queued = ctx.api.post("/api/v1/commands", &body).await?;
    let mut exit = Exit::Ok;
    let result = if a.wait {
        let (v, e) = match queued["batch_id"].as_str() {
            Some(batch) => wait_batch(&ctx.api, batch, a.timeout).await?,
            None => {
                let id = queued["command_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                wait_command(&ctx.api, &id, a.timeout).await?
            }
        };
        exit = e;
        v
    } else {
        queued
    };
    match ctx.format {
        Format::Table => print_outcome(&result)?,
        f => print_data(f, &result)?,
    }
    Ok(exit)
}

/// A queue answer, a command or a batch's progress, for people.
fn print_outcome(v: &Value) -> std::io::Result<()> {
    if let Some(c) = v.get("command").filter(|c| c.is_object()) {
        return print_table(COMMAND_COLUMNS, &command_rows(std::slice::from_ref(c)));
    }
    if v["id"].is_string() && v["status"].is_string() {
        return print_table(COMMAND_COLUMNS, &command_rows(std::slice::from_ref(v)));
    }
    if let Some(batch) = v["batch_id"].as_str() {
        println!(
            "batch {batch}: {} queued, {} skipped",
            v["queued"],
            v["skipped"].as_array().map_or(0, Vec::len)
        );
        let rows: Vec<Vec<String>> = v["commands"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| vec![cell(&c["command_id"]), cell(&c["agent_uid"])])
            .collect();
        return print_table(&["COMMAND", "AGENT"], &rows);
    }
    if v["batch"].is_object() {
        println!("batch {}: {}", cell(&v["batch"]["id"]), pairs(&v["counts"]));
        let rows: Vec<Vec<String>> = v["commands"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                vec![
                    cell(&c["command_id"]),
                    cell(&c["agent_uid"]),
                    cell(&c["status"]),
                    cell(&c["error"]),
                ]
            })
            .collect();
        return print_table(&["COMMAND", "AGENT", "STATUS", "ERROR"], &rows);
    }
    serde_json::to_writer_pretty(std::io::stdout().lock(), v)?;
    println!();
    Ok(())
}

const COMMAND_COLUMNS: &[&str] = &["ID", "KIND", "STATUS", "AGENT", "CREATED", "BY", "ERROR"];

fn command_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|c| {
            vec![
                cell(&c["id"]),
                cell(&c["kind"]),
                cell(&c["status"]),
                cell(&c["agent_uid"]),
                cell(&c["created_at"]),
                format!("{}/{}", cell(&c["actor"]), cell(&c["channel"])),
                cell(&c["error"]),
            ]
        })
        .collect()
}

fn is_final(status: &str) -> bool {
    !matches!(status, "queued" | "sent")
}

const POLL: Duration = Duration::from_millis(250);

/// Polls a command until it is final: (its view, exit code).
async fn wait_command(api: &Api, id: &str, timeout_s: u64) -> Result<(Value, Exit), Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let c = api.get(&format!("/api/v1/commands/{id}"), &[]).await?;
        let status = c["status"].as_str().unwrap_or_default();
        if is_final(status) {
            let exit = if status == "succeeded" {
                Exit::Ok
            } else {
                Exit::CommandFailed
            };
            return Ok((c, exit));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::new(
                Exit::WaitTimedOut,
                format!("command {id} is still {status} after {timeout_s} s"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls a fan-out until every command is final: (its progress, exit code).
async fn wait_batch(api: &Api, id: &str, timeout_s: u64) -> Result<(Value, Exit), Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let b = api.get(&format!("/api/v1/batches/{id}"), &[]).await?;
        let counts: BTreeMap<String, u64> = b["counts"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let open: u64 = ["queued", "sent"]
            .iter()
            .map(|s| counts.get(*s).copied().unwrap_or(0))
            .sum();
        if open == 0 {
            let total: u64 = counts.values().sum();
            let ok = counts.get("succeeded").copied().unwrap_or(0);
            let exit = if ok == total {
                Exit::Ok
            } else {
                Exit::CommandFailed
            };
            return Ok((b, exit));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::new(
                Exit::WaitTimedOut,
                format!("batch {id}: {open} command(s) still queued or sent after {timeout_s} s"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `flotilla commands`.
pub async fn commands(a: CommandsArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(agent) = &a.agent {
        q.push(("agent", agent.clone()));
    }
    for (k, v) in [
        ("status", &a.status),
        ("kind", &a.kind),
        ("batch", &a.batch),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    let items = fetch_items(&ctx.api, "/api/v1/commands", &q, a.limit).await?;
    match ctx.format {
        Format::Table => print_table(COMMAND_COLUMNS, &command_rows(&items))?,
        f => print_data(f, &Value::Array(items))?,
    }
    Ok(Exit::Ok)
}

/// `flotilla command ID [--wait]`.
pub async fn command(a: CommandArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let id = uuid::Uuid::parse_str(&a.id)
        .map_err(|_| Failure::new(Exit::Usage, format!("{:?} is not a command id", a.id)))?;
    let (v, exit) = if a.wait {
        wait_command(&ctx.api, &id.to_string(), a.timeout).await?
    } else {
        (
            ctx.api.get(&format!("/api/v1/commands/{id}"), &[]).await?,
            Exit::Ok,
        )
    };
    match ctx.format {
        Format::Table => {
            print_table(COMMAND_COLUMNS, &command_rows(std::slice::from_ref(&v)))?;
            if !v["result"].is_null() {
                println!("\nResult: {}", v["result"]);
            }
        }
        f => print_data(f, &v)?,
    }
    Ok(exit)
}

/// `flotilla cancel ID`.
pub async fn cancel(a: CancelArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let id = uuid::Uuid::parse_str(&a.id)
        .map_err(|_| Failure::new(Exit::Usage, format!("{:?} is not a command id", a.id)))?;
    let v = ctx
        .api
        .call(Method::DELETE, &format!("/api/v1/commands/{id}"), &[], None)
        .await?;
    match ctx.format {
        Format::Table => print_outcome(&v)?,
        f => print_data(f, &v)?,
    }
    Ok(Exit::Ok)
}

/// `flotilla audit` (the listing; `audit verify` is server-side).
pub async fn audit(a: AuditArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(agent) = &a.agent {
        q.push(("agent", agent.clone()));
    }
    for (k, v) in [
        ("actor", &a.actor),
        ("channel", &a.channel),
        ("operation", &a.operation),
        ("since", &a.since),
        ("until", &a.until),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    let items = fetch_items(&ctx.api, "/api/v1/audit", &q, a.limit).await?;
    match ctx.format {
        Format::Table => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|r| {
                    let targets = r["targets"]
                        .as_array()
                        .map(|t| t.iter().map(cell).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    vec![
                        cell(&r["id"]),
                        cell(&r["ts"]),
                        cell(&r["actor"]),
                        cell(&r["channel"]),
                        cell(&r["operation"]),
                        if targets.is_empty() {
                            "-".into()
                        } else {
                            targets
                        },
                        cell(&r["outcome"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID",
                    "TIME",
                    "ACTOR",
                    "CHANNEL",
                    "OPERATION",
                    "TARGETS",
                    "OUTCOME",
                ],
                &rows,
            )?
        }
        f => print_data(f, &Value::Array(items))?,
    }
    Ok(Exit::Ok)
}

/// `flotilla labels [QUERY]`.
pub async fn labels(a: LabelsArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    let items = fetch_items(
        &ctx.api,
        "/api/v1/agents",
        &[("q", a.query.join(" "))],
        a.limit,
    )
    .await?;
    match ctx.format {
        Format::Table => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|a| {
                    vec![
                        cell(&a["uid"]),
                        cell(if a["host"].is_null() {
                            &a["name"]
                        } else {
                            &a["host"]
                        }),
                        pairs(&a["labels"]),
                    ]
                })
                .collect();
            print_table(&["UID", "HOST", "LABELS"], &rows)?
        }
        f => {
            let v: Vec<Value> = items
                .iter()
                .map(|a| {
                    json!({"uid": a["uid"], "host": a["host"],
                           "labels": if a["labels"].is_null() { json!({}) } else { a["labels"].clone() }})
                })
                .collect();
            print_data(f, &Value::Array(v))?
        }
    }
    Ok(Exit::Ok)
}

/// `flotilla label HOST|UID KEY=VALUE… KEY-…`.
pub async fn label(a: LabelArgs) -> Res {
    let ctx = Ctx::new(&a.client, &a.out)?;
    // Every change is checked before any is made.
    let mut changes = Vec::new();
    for c in &a.changes {
        let change = match (c.split_once('='), c.strip_suffix('-')) {
            (Some((k, v)), _) if !k.is_empty() => (k.to_string(), Some(v.to_string())),
            (None, Some(k)) if !k.is_empty() => (k.to_string(), None),
            _ => {
                return Err(Failure::new(
                    Exit::Usage,
                    format!("{c:?} is neither KEY=VALUE (set) nor KEY- (remove)"),
                )
                .into())
            }
        };
        changes.push(change);
    }
    let uid = resolve_agent(&ctx.api, &a.agent).await?;
    for (key, value) in &changes {
        let path = format!("/api/v1/agents/{uid}/labels/{}", url_segment(key));
        match value {
            Some(v) => {
                ctx.api
                    .call(Method::PUT, &path, &[], Some(&json!({"value": v})))
                    .await?
            }
            None => ctx.api.call(Method::DELETE, &path, &[], None).await?,
        };
    }
    let v = ctx.api.get(&format!("/api/v1/agents/{uid}"), &[]).await?;
    let out = json!({"uid": uid, "labels": v["labels"]});
    match ctx.format {
        Format::Table => print_table(
            &["UID", "LABELS"],
            &[vec![uid.clone(), pairs(&v["labels"])]],
        )?,
        f => print_data(f, &out)?,
    }
    Ok(Exit::Ok)
}

/// Percent-encodes a path segment (label keys may hold dots, slashes, …).
fn url_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("conf");
        std::fs::write(&f, "[INPUT]\n").unwrap();
        let p = build_params(
            Some(r#"{"ttl_seconds": 60}"#),
            &[
                "tag=flush".into(),
                "attributes.reason=test run".into(),
                "attributes.n=3".into(),
                format!("body=@{}", f.display()),
            ],
        )
        .unwrap();
        assert_eq!(
            p,
            json!({"ttl_seconds": 60, "tag": "flush",
                   "attributes": {"reason": "test run", "n": 3}, "body": "[INPUT]\n"})
        );
        for bad in ["novalue", "=x", "a..b=1"] {
            let e = build_params(None, &[bad.into()]).unwrap_err();
            assert_eq!(e.exit, Exit::Usage, "{bad}");
        }
        assert_eq!(
            build_params(Some("[1]"), &[]).unwrap_err().exit,
            Exit::Usage
        );
        let e = build_params(None, &["a=1".into(), "a.b=2".into()]).unwrap_err();
        assert!(e.message.contains("not an object"), "{}", e.message);
    }

    #[test]
    fn targets_with_query_syntax_are_queries() {
        for q in ["type:fluentbit", "host:web-*", "web-*", "a b", ""] {
            assert!(is_query(q), "{q}");
        }
        for h in ["web-1", "web-1.example.com", "0190a1b2"] {
            assert!(!is_query(h), "{h}");
        }
        assert_eq!(url_segment("team/a b"), "team%2Fa%20b");
    }
}

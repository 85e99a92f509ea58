//! [`FlotillaMcp`]: the rmcp server handler. Tools, prompts and resources over a
//! [`FleetBackend`]; the same handler serves stdio, streamable HTTP and legacy SSE.
//!
//! The handler adds only what the MCP channel needs on top of the backend: argument parsing,
//! compact views for model context, read-only mode, and the confirmation gate of destructive
//! tools (elicitation, MRTR, or a two-step token). Every fleet operation, resolving an agent
//! named by host or service name included, is one backend call, so the rules (and
//! authorisation and audit) stay in the service layer and REST and MCP agree.

use futures_util::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ElicitRequest,
    ElicitRequestParams, GetPromptRequestParams, GetPromptResponse, GetPromptResult,
    Implementation, InputRequest, InputRequests, InputRequiredResult, InputResponses,
    ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, PromptMessage, ProtocolVersion, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, Resource, ResourceContents, ResourceTemplate, Role,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::backend::{
    AuditFilter, BackendError, BackendHandle, CommandsFilter, ExpectedTargets, FleetBackend,
    QueueTarget,
};
use crate::confirm::ConfirmStore;
use crate::prompts;
use crate::tools::{self, Detail, ToolDef, SEARCH_DEFAULT_LIMIT, SEARCH_MAX_LIMIT};

/// URI prefix of agent resources.
pub const AGENT_URI_PREFIX: &str = "flotilla://agents/";
/// URI of the fleet summary resource.
pub const SUMMARY_URI: &str = "flotilla://fleet/summary";
/// How long a legacy-protocol elicitation may wait for the user.
const ELICIT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default page of `commands_list` and `audit_query` (REST's default is larger; model context
/// is dearer than an HTTP response).
const LIST_DEFAULT_LIMIT: usize = 20;
/// Agents per page of `resources/list`.
const RESOURCE_PAGE: usize = 100;

const INSTRUCTIONS: &str = "Flotilla manages a fleet of Fluent Bit / Fluentd agents over OpAMP. \
Start broad and cheap: fleet_summary for counts, agents_search (compact rows + total) to find \
agents, agent_get for one agent. Commands are queued, not run synchronously: command_queue \
then command_status. Use dry_run to preview targets. Destructive commands and fan-outs need the \
user's confirmation (elicitation, or a confirmation_token returned by the first call: show the \
preview to the user and repeat the call with the token only if they agree). Every call is \
authorised and audited as the connected user.";

/// A failure reported to the model as a tool error (`isError: true`) with a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFail {
    pub code: String,
    pub message: String,
}

impl ToolFail {
    fn new(code: &str, message: impl Into<String>) -> ToolFail {
        ToolFail {
            code: code.into(),
            message: message.into(),
        }
    }
    fn args(message: impl Into<String>) -> ToolFail {
        ToolFail::new("invalid_arguments", message)
    }
    /// A tool error carries text only: structured content must match the tool's output
    /// schema, which describes successes. The text starts with the stable code in brackets.
    fn into_result(self) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(format!(
            "error ({}): {}",
            self.code, self.message
        ))])
    }
}

impl From<BackendError> for ToolFail {
    fn from(e: BackendError) -> ToolFail {
        ToolFail {
            code: e.code,
            message: e.message,
        }
    }
}

type ToolResult<T> = Result<T, ToolFail>;

/// What a tool produced: a result, or (2026-07-28 protocol) a request for user input first.
enum Outcome {
    Done(Value),
    InputRequired(InputRequiredResult),
}

/// Whether a destructive call may run.
enum Gate {
    Proceed,
    Stop(Outcome),
}

/// What the confirmation gate needs from the request.
struct CallCtx {
    request_state: Option<String>,
    input_responses: Option<InputResponses>,
    /// The client can show a form elicitation.
    elicitation: bool,
    /// The request runs under protocol 2026-07-28 or later (no server-to-client requests:
    /// elicitation goes through MRTR).
    modern: bool,
    peer: rmcp::Peer<RoleServer>,
}

/// The MCP server. Cheap to clone: one per session or stateless request, all sharing the
/// confirmation store.
#[derive(Clone)]
pub struct FlotillaMcp {
    default_backend: Option<Arc<dyn FleetBackend>>,
    read_only: bool,
    confirm: Arc<ConfirmStore>,
    tools: Arc<Vec<ToolDef>>,
}

impl FlotillaMcp {
    /// `default_backend` serves requests that carry no [`BackendHandle`] (stdio); HTTP
    /// requests bring their own, set by the server's authentication. `read_only` hides and
    /// refuses every state-changing tool.
    pub fn new(
        default_backend: Option<Arc<dyn FleetBackend>>,
        read_only: bool,
        confirm: Arc<ConfirmStore>,
    ) -> FlotillaMcp {
        FlotillaMcp {
            default_backend,
            read_only,
            confirm,
            tools: Arc::new(tools::all()),
        }
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Tools offered in this mode.
    pub fn visible_tools(&self) -> Vec<Tool> {
        self.tools
            .iter()
            .filter(|d| !(self.read_only && d.mutating))
            .map(|d| d.tool.clone())
            .collect()
    }

    fn backend(&self, ctx: &RequestContext<RoleServer>) -> Result<Arc<dyn FleetBackend>, McpError> {
        let from_http = ctx
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.extensions.get::<BackendHandle>())
            .or_else(|| ctx.extensions.get::<BackendHandle>())
            .map(|h| h.0.clone());
        from_http
            .or_else(|| self.default_backend.clone())
            .ok_or_else(|| {
                // Only reachable through a routing mistake (HTTP without authentication).
                McpError::invalid_request(
                    "not authenticated: no fleet backend for this request",
                    None,
                )
            })
    }

    async fn run_tool(
        &self,
        b: &dyn FleetBackend,
        name: &str,
        args: Map<String, Value>,
        cc: &CallCtx,
    ) -> ToolResult<Outcome> {
        let done = |v: Value| Ok(Outcome::Done(v));
        match name {
            "agents_search" => {
                let a: tools::AgentsSearchArgs = parse(name, &args)?;
                let limit = a.limit.unwrap_or(SEARCH_DEFAULT_LIMIT);
                if !(1..=SEARCH_MAX_LIMIT).contains(&limit) {
                    return Err(ToolFail::args(format!(
                        "limit {limit} must be between 1 and {SEARCH_MAX_LIMIT}"
                    )));
                }
                done(
                    b.search(
                        a.query.as_deref().unwrap_or(""),
                        Some(limit),
                        a.cursor.as_deref(),
                        true,
                    )
                    .await?,
                )
            }
            "agent_get" => {
                let a: tools::AgentGetArgs = parse(name, &args)?;
                let uid = b.resolve_agent(&a.agent).await?;
                let view = b.agent(&uid).await?;
                done(agent_overview(&view, &a.include))
            }
            "fleet_summary" => {
                let _: tools::NoArgs = parse(name, &args)?;
                done(b.summary().await?)
            }
            "commands_catalog" => {
                let _: tools::NoArgs = parse(name, &args)?;
                done(compact_catalog(b.catalog().await?))
            }
            "command_queue" => {
                let a: tools::CommandQueueArgs = parse(name, &args)?;
                if a.kind.trim().is_empty() {
                    return Err(ToolFail::args(
                        "kind must not be empty (see commands_catalog)",
                    ));
                }
                let params = a.params.clone().unwrap_or(Value::Null);
                self.queue_flow(
                    b, name, &args, cc, a.agent, a.query, &a.kind, params, a.dry_run,
                )
                .await
            }
            "command_status" => {
                let a: tools::CommandStatusArgs = parse(name, &args)?;
                match (a.command_id, a.batch_id) {
                    (Some(c), None) => done(b.command(&c).await?),
                    (None, Some(bid)) => done(b.batch(&bid).await?),
                    _ => Err(ToolFail::args(
                        "give exactly one of command_id and batch_id",
                    )),
                }
            }
            "commands_list" => {
                let a: tools::CommandsListArgs = parse(name, &args)?;
                let agent = match a.agent {
                    Some(r) => Some(b.resolve_agent(&r).await?),
                    None => None,
                };
                done(
                    b.commands(&CommandsFilter {
                        agent,
                        status: a.status,
                        kind: a.kind,
                        batch: a.batch,
                        limit: Some(a.limit.unwrap_or(LIST_DEFAULT_LIMIT)),
                        cursor: a.cursor,
                    })
                    .await?,
                )
            }
            "command_cancel" => {
                let a: tools::CommandCancelArgs = parse(name, &args)?;
                done(b.cancel(&a.command_id).await?)
            }
            "audit_query" => {
                let a: tools::AuditQueryArgs = parse(name, &args)?;
                let agent = match a.agent {
                    Some(r) => Some(b.resolve_agent(&r).await?),
                    None => None,
                };
                done(
                    b.audit(&AuditFilter {
                        actor: a.actor,
                        channel: a.channel,
                        agent,
                        operation: a.operation,
                        since: a.since,
                        until: a.until,
                        limit: Some(a.limit.unwrap_or(LIST_DEFAULT_LIMIT)),
                        cursor: a.cursor,
                    })
                    .await?,
                )
            }
            "remote_config_get" => {
                let a: tools::RemoteConfigGetArgs = parse(name, &args)?;
                match (a.agent, a.query) {
                    (Some(r), None) => {
                        if a.limit.is_some() || a.cursor.is_some() {
                            return Err(ToolFail::args(
                                "limit and cursor page a query; one agent has no pages",
                            ));
                        }
                        let uid = b.resolve_agent(&r).await?;
                        let v = b.agent(&uid).await?;
                        done(json!({
                            "uid": v["uid"],
                            "host": attr(&v, &["host.name", "hostname"]),
                            "effective_config": v["effective_config"],
                            "effective_config_hash": v["effective_config_hash"],
                            "desired_config": v["desired_config"],
                            "remote_config_status": v["remote_config_status"],
                        }))
                    }
                    (None, Some(q)) => {
                        let limit = a.limit.unwrap_or(SEARCH_DEFAULT_LIMIT);
                        if !(1..=tools::CONFIG_ROWS_MAX_LIMIT).contains(&limit) {
                            return Err(ToolFail::args(format!(
                                "limit {limit} must be between 1 and {}",
                                tools::CONFIG_ROWS_MAX_LIMIT
                            )));
                        }
                        let page = b.search(&q, Some(limit), a.cursor.as_deref(), true).await?;
                        // A few lookups at a time: over REST each is a round trip, and a page
                        // of 50 one after another could outlast the client's call timeout.
                        let uids: Vec<String> = page["items"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|row| row["uid"].as_str().unwrap_or_default().to_string())
                            .collect();
                        let rows: Vec<Value> = futures_util::stream::iter(uids)
                            .map(|uid| async move { b.agent(&uid).await.map(|v| config_row(&v)) })
                            .buffered(8)
                            .try_collect()
                            .await?;
                        done(json!({"items": rows, "next_cursor": page["next_cursor"],
                                    "total": page["total"]}))
                    }
                    _ => Err(ToolFail::args(
                        "give exactly one of agent (one agent's config) and query (a row per matching agent)",
                    )),
                }
            }
            "remote_config_push" => {
                let a: tools::RemoteConfigPushArgs = parse(name, &args)?;
                if a.files.is_empty() {
                    return Err(ToolFail::args("files must contain at least one file"));
                }
                let mut params = json!({"files": a.files});
                if let Some(t) = a.ttl_seconds {
                    params["ttl_seconds"] = json!(t);
                }
                self.queue_flow(
                    b,
                    name,
                    &args,
                    cc,
                    a.agent,
                    a.query,
                    "remote_config",
                    params,
                    a.dry_run,
                )
                .await
            }
            // Listed tools and this match are kept in step by a unit test.
            other => Err(ToolFail::new(
                "internal",
                format!("tool {other} has no implementation"),
            )),
        }
    }

    /// command_queue and remote_config_push: resolve the target; dry-run, confirm or queue.
    ///
    /// Dry runs and previews are the service's own plan (`FleetBackend::plan`), so they apply
    /// every check of the real call — a bad parameter fails here, before any token exists —
    /// and a confirmed call queues only if its targets are still the ones the user was shown.
    #[allow(clippy::too_many_arguments)]
    async fn queue_flow(
        &self,
        b: &dyn FleetBackend,
        tool: &str,
        args: &Map<String, Value>,
        cc: &CallCtx,
        agent: Option<String>,
        query: Option<String>,
        kind: &str,
        params: Value,
        dry_run: bool,
    ) -> ToolResult<Outcome> {
        let target = match (agent, query) {
            (Some(a), None) => QueueTarget::Agent(b.resolve_agent(&a).await?),
            (None, Some(q)) => QueueTarget::Query(q),
            _ => return Err(ToolFail::args(
                "give exactly one of agent (one agent) and query (fan-out over matching agents)",
            )),
        };
        // Bind a confirmation to the resolved agent too, so a host name that comes to mean
        // another agent between the two calls cannot reuse it.
        let mut bound = args.clone();
        bound.insert("__resolved_target".into(), json!(target));
        let identity = b.identity();
        if !dry_run {
            let spend = |token: &str| {
                self.confirm
                    .redeem(token, &identity, tool, &bound)
                    .map_err(|e| ToolFail::new("confirmation_invalid", e.to_string()))
            };
            if let Some(token) = bound.get("confirmation_token").and_then(Value::as_str) {
                let confirmed = spend(token)?;
                return queue_confirmed(b, &target, kind, &params, &confirmed).await;
            }
            if let Some(state) = &cc.request_state {
                // MRTR retry: requestState is our pending token; the answer is in
                // inputResponses.
                let confirmed = spend(state)?;
                let answer = cc
                    .input_responses
                    .as_ref()
                    .and_then(|r| r.get("confirm"))
                    .cloned()
                    .unwrap_or(Value::Null);
                return if elicit_accepted(&answer) {
                    queue_confirmed(b, &target, kind, &params, &confirmed).await
                } else {
                    Ok(declined(confirmed["preview"].clone()))
                };
            }
        }
        let plan = b.plan(&target, kind, &params).await?;
        if dry_run {
            return Ok(Outcome::Done(dry_run_view(&plan)));
        }
        // Destructive kinds come from the service's catalog (the plan says). A plan that does
        // not say `false` (a server of another version over REST) is treated as destructive,
        // and so is every kind this adapter knows to be: confirmation fails closed.
        let needs_confirmation = plan["destructive"] != json!(false)
            || tools::DESTRUCTIVE_KINDS.contains(&kind)
            || matches!(target, QueueTarget::Query(_));
        if !needs_confirmation {
            return queued(b.queue(&target, kind, &params, None).await?);
        }
        let (preview, summary) = preview(tool, &target, &plan);
        let confirmed = json!({"preview": preview, "expect_targets": plan["expect_targets"]});
        match self
            .gate(&identity, tool, &bound, cc, confirmed.clone(), &summary)
            .await?
        {
            Gate::Proceed => queue_confirmed(b, &target, kind, &params, &confirmed).await,
            Gate::Stop(o) => Ok(o),
        }
    }

    /// Asks for the user's confirmation of a fresh destructive call (see [`crate::confirm`]):
    /// by elicitation when the client can show a form, else with a two-step token. `confirmed`
    /// is what the user is shown and agrees to; it travels with the token.
    async fn gate(
        &self,
        identity: &str,
        tool: &str,
        bound: &Map<String, Value>,
        cc: &CallCtx,
        confirmed: Value,
        summary: &str,
    ) -> ToolResult<Gate> {
        let message = format!("Flotilla: confirm {summary}?");
        if cc.elicitation {
            if cc.modern {
                let token = self.confirm.issue(identity, tool, bound, confirmed);
                let mut reqs = InputRequests::new();
                reqs.insert(
                    "confirm".into(),
                    InputRequest::Elicitation(ElicitRequest::new(elicit_params(&message))),
                );
                return Ok(Gate::Stop(Outcome::InputRequired(
                    InputRequiredResult::new(Some(reqs), Some(token)),
                )));
            }
            match cc
                .peer
                .create_elicitation_with_timeout(elicit_params(&message), Some(ELICIT_TIMEOUT))
                .await
            {
                Ok(r) => {
                    let v = serde_json::to_value(&r).unwrap_or(Value::Null);
                    return Ok(if elicit_accepted(&v) {
                        Gate::Proceed
                    } else {
                        Gate::Stop(declined(confirmed["preview"].clone()))
                    });
                }
                // A client that declared elicitation but cannot answer falls back to tokens.
                Err(e) => {
                    tracing::warn!(error = %e, "elicitation failed; using a confirmation token")
                }
            }
        }
        let preview = confirmed["preview"].clone();
        let token = self.confirm.issue(identity, tool, bound, confirmed);
        Ok(Gate::Stop(Outcome::Done(json!({
            "status": "confirmation_required",
            "preview": preview,
            "message": format!("Nothing was queued. Show the user this preview; if they confirm {summary}, call {tool} again with exactly the same arguments plus confirmation_token."),
            "confirmation_token": token,
            "expires_in_seconds": self.confirm.ttl().as_secs(),
        }))))
    }
}

/// Rows shown in a dry run or preview (the counts cover every target).
const PREVIEW_ROWS: usize = 10;

fn first_rows(v: &Value) -> Vec<Value> {
    v.as_array()
        .map(|a| a.iter().take(PREVIEW_ROWS).cloned().collect())
        .unwrap_or_default()
}

/// The answer of `dry_run: true`, from the service's plan.
fn dry_run_view(plan: &Value) -> Value {
    json!({
        "status": "dry_run",
        "kind": plan["kind"],
        "sends": sends(plan["kind"].as_str().unwrap_or("?"), &plan["params"]),
        "params": redact(&plan["params"]),
        "destructive": plan["destructive"],
        "matched": plan["matched"],
        "total_targets": plan["target_count"],
        "targets": first_rows(&plan["targets"]),
        "skipped_count": plan["skipped_count"],
        "skipped": first_rows(&plan["skipped"]),
        "note": "nothing was queued; the role, parameters, capabilities and max_fanout were checked as the real call will check them",
    })
}

/// What the user confirms, and a one-line summary for the elicitation message.
fn preview(tool: &str, target: &QueueTarget, plan: &Value) -> (Value, String) {
    let kind = plan["kind"].as_str().unwrap_or("?");
    let total = plan["target_count"].as_u64().unwrap_or(0);
    let skipped = plan["skipped_count"].as_u64().unwrap_or(0);
    let sends = sends(kind, &plan["params"]);
    let (what, summary) = match target {
        QueueTarget::Agent(uid) => {
            let row = plan["targets"][0].clone();
            let who = if row.is_object() {
                row_label(&row)
            } else {
                uid.clone()
            };
            (json!({"agent": row}), format!("{sends} on agent {who}"))
        }
        QueueTarget::Query(q) => (
            json!({"query": q, "total_targets": total, "sample": first_rows(&plan["targets"]),
                   "skipped_count": skipped, "skipped": first_rows(&plan["skipped"])}),
            format!(
                "{sends} on {} matching {q:?} (fan-out{})",
                if total == 1 {
                    "the 1 agent".to_string()
                } else {
                    format!("all {total} agents")
                },
                if skipped > 0 {
                    format!("; {skipped} more match but cannot run it")
                } else {
                    String::new()
                }
            ),
        ),
    };
    (
        json!({"tool": tool, "kind": kind, "sends": sends, "params": redact(&plan["params"]),
               "target": what}),
        summary,
    )
}

/// Longest rendering of a value (ChatOps attributes, custom data) in a confirmation.
const SHOWN_CHARS: usize = 300;

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= SHOWN_CHARS {
        s
    } else {
        let cut: String = s.chars().take(SHOWN_CHARS).collect();
        format!("{cut}… ({} bytes)", s.len())
    }
}

/// What the agent will be sent, in one line the user can confirm: the kind with its
/// validated parameters (the plan's), config files by name and size with the config hash.
fn sends(kind: &str, params: &Value) -> String {
    let mut parts = Vec::new();
    match kind {
        "chatops" => {
            parts.push(format!("tag {}", shown(&params["tag"])));
            parts.push(format!("attributes {}", shown(&params["attributes"])));
        }
        "custom" => {
            parts.push(format!("capability {}", shown(&params["capability"])));
            parts.push(format!("type {}", shown(&params["type"])));
            parts.push(format!("data {}", shown(&params["data"])));
        }
        "new_instance_uid" => parts.push(match params["new_uid"].as_str() {
            Some(u) => format!("new uid {u}"),
            None => "a fresh uid".into(),
        }),
        "remote_config" => {
            let files = params["files"].as_object().cloned().unwrap_or_default();
            let sizes: Vec<(String, usize)> = files
                .iter()
                .map(|(name, f)| {
                    let body = f.as_str().or_else(|| f["body"].as_str()).unwrap_or("");
                    (name.clone(), body.len())
                })
                .collect();
            let total: usize = sizes.iter().map(|(_, n)| n).sum();
            let listed: Vec<String> = sizes
                .iter()
                .map(|(name, n)| format!("{name} ({n} bytes)"))
                .collect();
            parts.push(format!(
                "{} file{}, {total} bytes: {}",
                sizes.len(),
                if sizes.len() == 1 { "" } else { "s" },
                listed.join(", ")
            ));
            if let Some(h) = params["hash"].as_str() {
                parts.push(format!("config hash {h}"));
            }
        }
        _ => {}
    }
    if let Some(t) = params["ttl_seconds"].as_u64() {
        parts.push(format!("expires after {t} s in the queue"));
    }
    if parts.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({})", parts.join("; "))
    }
}

/// `commands_catalog`'s answer: the backend's catalog with what every kind shares said once
/// (the parameters each takes alike, e.g. `ttl_seconds`; an outcome rule several kinds
/// follow; JSON Schema boilerplate), so the model reads each fact once. Nothing is dropped:
/// `every_kind_takes` holds the shared parameters, `params_refuse_unknown_keys` what each
/// schema's `additionalProperties: false` said.
pub fn compact_catalog(catalog: Value) -> Value {
    let kinds = catalog["kinds"].as_array().cloned().unwrap_or_default();
    let props_of = |k: &Value| {
        k["params_schema"]["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    };
    let mut common = kinds.first().map(props_of).unwrap_or_default();
    for k in &kinds {
        let p = props_of(k);
        common.retain(|name, schema| p.get(name) == Some(schema));
    }
    let mut first_with_outcome: Vec<(Value, String)> = Vec::new();
    let out: Vec<Value> = kinds
        .iter()
        .map(|k| {
            let name = k["kind"].as_str().unwrap_or("?").to_string();
            let mut params = k["params_schema"].as_object().cloned().unwrap_or_default();
            if params.get("type") == Some(&json!("object")) {
                params.remove("type");
            }
            if params.get("additionalProperties") == Some(&json!(false)) {
                params.remove("additionalProperties");
            }
            if let Some(Value::Object(p)) = params.get_mut("properties") {
                p.retain(|n, _| !common.contains_key(n));
                if p.is_empty() {
                    params.remove("properties");
                }
            }
            let outcome = match first_with_outcome.iter().find(|(o, _)| *o == k["outcome"]) {
                Some((_, first)) => json!(format!("as for {first}")),
                None => {
                    first_with_outcome.push((k["outcome"].clone(), name.clone()));
                    k["outcome"].clone()
                }
            };
            let mut e = Map::new();
            for key in ["kind", "description", "requires", "destructive"] {
                e.insert(key.into(), k[key].clone());
            }
            e.insert("outcome".into(), outcome);
            e.insert("params".into(), Value::Object(params));
            e.insert("capable_agents".into(), k["capable_agents"].clone());
            Value::Object(e)
        })
        .collect();
    json!({"every_kind_takes": common, "params_refuse_unknown_keys": true, "kinds": out})
}

/// Queues a confirmed call, refused by the service if the targets are no longer the ones in
/// the confirmation.
async fn queue_confirmed(
    b: &dyn FleetBackend,
    target: &QueueTarget,
    kind: &str,
    params: &Value,
    confirmed: &Value,
) -> ToolResult<Outcome> {
    let expect: ExpectedTargets = serde_json::from_value(confirmed["expect_targets"].clone())
        .map_err(|e| ToolFail::new("internal", format!("confirmation without targets: {e}")))?;
    match b.queue(target, kind, params, Some(&expect)).await {
        Ok(v) => queued(v),
        Err(e) if e.code == "targets_changed" => Err(ToolFail::new(
            "targets_changed",
            format!(
                "{}. The confirmation is spent; call again without confirmation_token to see \
                 the new targets and ask the user again.",
                e.message
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

fn queued(mut out: Value) -> ToolResult<Outcome> {
    if let Value::Object(m) = &mut out {
        m.insert("status".into(), json!("queued"));
    }
    Ok(Outcome::Done(out))
}

fn elicit_params(message: &str) -> ElicitRequestParams {
    // Built from JSON: the wire shape is the stable contract, the Rust enum is non-exhaustive.
    serde_json::from_value(json!({
        "mode": "form",
        "message": message,
        "requestedSchema": {
            "type": "object",
            "properties": {"confirm": {"type": "boolean", "title": "Go ahead",
                                       "description": "Tick to run it; leave unticked or decline to cancel"}},
            "required": ["confirm"]
        }
    }))
    .expect("a valid form elicitation")
}

fn elicit_accepted(answer: &Value) -> bool {
    answer["action"] == "accept" && answer["content"]["confirm"] == json!(true)
}

fn declined(preview: Value) -> Outcome {
    Outcome::Done(json!({
        "status": "declined",
        "preview": preview,
        "message": "The user did not confirm; nothing was queued.",
    }))
}

/// Config bodies are summarised in previews (they can be long and hold secrets).
fn redact(params: &Value) -> Value {
    let mut p = params.clone();
    if let Some(files) = p.get_mut("files").and_then(Value::as_object_mut) {
        for f in files.values_mut() {
            let len = f
                .as_str()
                .or_else(|| f.get("body").and_then(Value::as_str))
                .map(str::len)
                .unwrap_or(0);
            *f = json!(format!("<{len} bytes>"));
        }
    }
    p
}

fn parse<T: DeserializeOwned>(tool: &str, args: &Map<String, Value>) -> ToolResult<T> {
    serde_path_to_error::deserialize(Value::Object(args.clone())).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ToolFail::args(format!("invalid arguments for {tool}: {inner}"))
        } else {
            ToolFail::args(format!("invalid arguments for {tool}: {path}: {inner}"))
        }
    })
}

fn attr(view: &Value, keys: &[&str]) -> Value {
    for section in ["identifying_attributes", "non_identifying_attributes"] {
        for k in keys {
            if let Some(v) = view[section].get(*k) {
                return v.clone();
            }
        }
    }
    Value::Null
}

fn row_label(row: &Value) -> String {
    let uid = row["uid"].as_str().unwrap_or("?");
    match (row["host"].as_str(), row["name"].as_str()) {
        (Some(h), Some(n)) => format!("{h} ({n}, {uid})"),
        (Some(h), None) => format!("{h} ({uid})"),
        (None, Some(n)) => format!("{n} ({uid})"),
        (None, None) => uid.to_string(),
    }
}

/// One compact row of `remote_config_get` with a query, from the REST agent view.
fn config_row(v: &Value) -> Value {
    let rcs = &v["remote_config_status"];
    json!({
        "uid": v["uid"],
        "host": attr(v, &["host.name", "hostname"]),
        "desired_hash": v["desired_config"]["hash"],
        "remote_config_status": rcs["status"],
        "remote_config_hash": rcs["hash"],
        "remote_config_error": rcs.get("error").cloned().unwrap_or(Value::Null),
        "effective_config_hash": v["effective_config_hash"],
    })
}

/// Paths of unhealthy components in a health tree, e.g. `pipeline/output.es`.
fn unhealthy_components(h: &Value, prefix: &str, out: &mut Vec<Value>) {
    if let Some(cs) = h["components"].as_object() {
        for (name, c) in cs {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if c["healthy"] == json!(false) {
                let mut e = json!({"component": path});
                for k in ["status", "last_error"] {
                    if let Some(v) = c.get(k) {
                        e[k] = v.clone();
                    }
                }
                out.push(e);
            }
            unhealthy_components(c, &path, out);
        }
    }
}

/// The compact agent view of `agent_get`, from the REST agent view.
pub fn agent_overview(view: &Value, include: &[Detail]) -> Value {
    let mut o = Map::new();
    for k in ["uid", "type", "state", "connected"] {
        o.insert(k.into(), view[k].clone());
    }
    o.insert("host".into(), attr(view, &["host.name", "hostname"]));
    o.insert("name".into(), attr(view, &["service.name"]));
    o.insert("version".into(), attr(view, &["service.version"]));
    o.insert(
        "identifying_attributes".into(),
        view["identifying_attributes"].clone(),
    );
    if include.contains(&Detail::Attributes) {
        o.insert(
            "non_identifying_attributes".into(),
            view["non_identifying_attributes"].clone(),
        );
    }
    o.insert("capabilities".into(), view["capabilities"]["names"].clone());
    o.insert(
        "custom_capabilities".into(),
        view["custom_capabilities"].clone(),
    );
    o.insert("labels".into(), view["labels"].clone());
    let h = &view["health"];
    let health = if h.is_null() || include.contains(&Detail::Health) {
        h.clone()
    } else {
        let mut bad = Vec::new();
        unhealthy_components(h, "", &mut bad);
        let mut s = json!({"healthy": h["healthy"]});
        for k in ["status", "last_error"] {
            if let Some(v) = h.get(k) {
                s[k] = v.clone();
            }
        }
        s["components"] = json!(h["components"].as_object().map(|c| c.len()).unwrap_or(0));
        s["unhealthy_components"] = Value::Array(bad);
        s
    };
    o.insert("health".into(), health);
    o.insert(
        "remote_config_status".into(),
        view["remote_config_status"].clone(),
    );
    o.insert("desired_config".into(), view["desired_config"].clone());
    if include.contains(&Detail::EffectiveConfig) {
        o.insert("effective_config".into(), view["effective_config"].clone());
    }
    if include.contains(&Detail::RecentCommands) {
        let cmds: Vec<Value> = view["recent_commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        json!({"id": c["id"], "kind": c["kind"], "status": c["status"],
                               "created_at": c["created_at"], "finished_at": c["finished_at"],
                               "error": c["error"], "actor": c["actor"], "channel": c["channel"]})
                    })
                    .collect()
            })
            .unwrap_or_default();
        o.insert("recent_commands".into(), Value::Array(cmds));
    }
    for k in [
        "transport",
        "remote_addr",
        "first_seen",
        "last_seen",
        "previous_uid",
        // mTLS: the agent's client certificate (identity, SANs, SHA-256), null without one.
        "client_certificate",
    ] {
        o.insert(k.into(), view[k].clone());
    }
    Value::Object(o)
}

fn to_text_result(v: Value) -> CallToolResult {
    // Compact JSON in the text block (older clients read only that); the same value as
    // structured content for clients that use the output schema.
    let mut r = CallToolResult::success(vec![ContentBlock::text(v.to_string())]);
    r.structured_content = Some(v);
    r
}

fn supports_form_elicitation(ctx: &RequestContext<RoleServer>) -> bool {
    ctx.client_capabilities()
        .and_then(|c| c.elicitation)
        .map(|e| e.form.is_some() || e.url.is_none())
        .unwrap_or(false)
}

impl ServerHandler for FlotillaMcp {
    fn get_info(&self) -> ServerConfig {
        let caps = ServerCapabilities::builder()
            .enable_tools()
            .enable_prompts()
            .enable_resources()
            .build();
        let mut info = Implementation::new("flotilla", env!("CARGO_PKG_VERSION"));
        info.title = Some("Flotilla fleet control plane".into());
        let mut instructions = INSTRUCTIONS.to_string();
        if self.read_only {
            instructions.push_str(" This server is read-only: no tool changes the fleet.");
        }
        ServerConfig::new(caps)
            .with_server_info(info)
            .with_instructions(instructions)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.visible_tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools
            .iter()
            .find(|d| d.name == name && !(self.read_only && d.mutating))
            .map(|d| d.tool.clone())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let name = request.name.to_string();
        let Some(def) = self.tools.iter().find(|d| d.name == name) else {
            let names: Vec<&str> = self
                .tools
                .iter()
                .filter(|d| !(self.read_only && d.mutating))
                .map(|d| d.name)
                .collect();
            return Err(McpError::invalid_params(
                format!(
                    "unknown tool {name:?}; available tools: {}",
                    names.join(", ")
                ),
                None,
            ));
        };
        if self.read_only && def.mutating {
            return Err(McpError::invalid_params(
                format!(
                    "tool {name:?} changes the fleet and this Flotilla MCP server is read-only; \
                     it is refused"
                ),
                None,
            ));
        }
        let backend = self.backend(&context)?;
        let modern = context
            .protocol_version()
            .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
        let cc = CallCtx {
            request_state: request.request_state.clone(),
            input_responses: request.input_responses.clone(),
            elicitation: supports_form_elicitation(&context),
            modern,
            peer: context.peer.clone(),
        };
        let args = request.arguments.clone().unwrap_or_default();
        let started = std::time::Instant::now();
        let outcome = self.run_tool(backend.as_ref(), &name, args, &cc).await;
        tracing::debug!(tool = %name, ms = started.elapsed().as_millis() as u64,
                        ok = outcome.is_ok(), "MCP tool call");
        Ok(match outcome {
            Ok(Outcome::Done(v)) => to_text_result(v).into(),
            Ok(Outcome::InputRequired(ir)) => ir.into(),
            Err(fail) => fail.into_result().into(),
        })
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        Ok(ListPromptsResult::with_all_items(prompts::list(
            self.read_only,
        )))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        let mut args = BTreeMap::new();
        for (k, v) in request.arguments.unwrap_or_default() {
            let s = match v {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            args.insert(k, s);
        }
        let (description, text) = prompts::render(&request.name, &args, self.read_only)
            .map_err(|e| McpError::invalid_params(e.to_string(), None))?;
        Ok(
            GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)])
                .with_description(description)
                .into(),
        )
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let b = self.backend(&context)?;
        let cursor = request.and_then(|r| r.cursor);
        let page = b
            .search("", Some(RESOURCE_PAGE), cursor.as_deref(), false)
            .await
            .map_err(|e| McpError::invalid_params(e.message, None))?;
        let mut resources = Vec::new();
        if cursor.is_none() {
            resources.push(
                Resource::new(SUMMARY_URI, "fleet summary")
                    .with_description("Counts of the fleet by type, version, health and state")
                    .with_mime_type("application/json"),
            );
        }
        for row in page["items"].as_array().into_iter().flatten() {
            let Some(uid) = row["uid"].as_str() else {
                continue;
            };
            resources.push(
                Resource::new(format!("{AGENT_URI_PREFIX}{uid}"), row_label(row))
                    .with_description(format!(
                        "{} agent, state {}, healthy {}",
                        row["type"].as_str().unwrap_or("?"),
                        row["state"].as_str().unwrap_or("?"),
                        row["healthy"]
                    ))
                    .with_mime_type("application/json"),
            );
        }
        let mut out = ListResourcesResult::with_all_items(resources);
        out.next_cursor = page["next_cursor"].as_str().map(str::to_string);
        Ok(out)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new(format!("{AGENT_URI_PREFIX}{{uid}}"), "agent")
                .with_title("A Flotilla agent")
                .with_description(
                    "One agent's full record (the REST agent view), by uid or unique host name",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let b = self.backend(&context)?;
        let uri = request.uri.clone();
        let value = if uri == SUMMARY_URI {
            b.summary()
                .await
                .map_err(|e| McpError::internal_error(e.message, None))?
        } else if let Some(r) = uri.strip_prefix(AGENT_URI_PREFIX) {
            let uid = b
                .resolve_agent(r)
                .await
                .map_err(|e| McpError::resource_not_found(format!("{uri}: {}", e.message), None))?;
            b.agent(&uid)
                .await
                .map_err(|e| McpError::resource_not_found(format!("{uri}: {}", e.message), None))?
        } else {
            return Err(McpError::resource_not_found(
                format!("unknown resource {uri:?} (flotilla://agents/{{uid}} or {SUMMARY_URI})"),
                None,
            ));
        };
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(text, uri).with_mime_type("application/json")
        ])
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overview_summarises_health() {
        let view = json!({
            "uid": "u", "type": "fluentbit", "state": "healthy", "connected": true,
            "identifying_attributes": {"service.name": "fluent-bit"},
            "non_identifying_attributes": {"host.name": "web-3", "os.type": "linux"},
            "capabilities": {"bits": 1, "names": ["ReportsStatus"]},
            "custom_capabilities": [], "labels": {},
            "health": {"healthy": false, "last_error": "output down", "components": {
                "pipeline": {"healthy": false, "components": {
                    "output.es": {"healthy": false, "last_error": "connection refused"}}}}},
            "effective_config": {"f": {"body": "x"}},
            "recent_commands": [{"id": "c", "kind": "restart", "status": "queued", "params": {}}]
        });
        let o = agent_overview(&view, &[]);
        assert_eq!(o["host"], "web-3");
        assert_eq!(o["name"], "fluent-bit");
        assert!(o.get("effective_config").is_none());
        assert!(o.get("non_identifying_attributes").is_none());
        let bad = o["health"]["unhealthy_components"].as_array().unwrap();
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[1]["component"], "pipeline/output.es");
        assert_eq!(bad[1]["last_error"], "connection refused");
        let o = agent_overview(
            &view,
            &[
                Detail::Health,
                Detail::EffectiveConfig,
                Detail::RecentCommands,
            ],
        );
        assert_eq!(o["health"], view["health"]);
        assert_eq!(o["effective_config"], view["effective_config"]);
        assert_eq!(o["recent_commands"][0]["kind"], "restart");
    }

    #[test]
    fn redacts_config_bodies() {
        let p =
            json!({"files": {"a.conf": "12345", "b.conf": {"body": "xy", "content_type": "t"}}});
        assert_eq!(
            redact(&p),
            json!({"files": {"a.conf": "<5 bytes>", "b.conf": "<2 bytes>"}})
        );
    }

    #[test]
    fn every_listed_tool_is_implemented() {
        // run_tool's fallback arm names an unimplemented tool; listing must not reach it.
        let names: Vec<&str> = tools::all().iter().map(|d| d.name).collect();
        let src = include_str!("server.rs");
        for n in names {
            assert!(src.contains(&format!("\"{n}\" =>")), "{n} has no match arm");
        }
    }
}

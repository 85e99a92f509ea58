//! The optional LLM planner: a chat message the rule planner could not place goes to any
//! OpenAI-compatible chat-completions endpoint with tool calling (OpenAI, Azure OpenAI,
//! Ollama, vLLM), given the MCP tools' own names, descriptions and input schemas
//! (`flotilla_mcp::tools::all`) and the system prompt `prompts/chat-planner.md`.
//!
//! Read-only tools the model calls run at once through the chat user's `FleetBackend` (the
//! same [`tools::run`] the rule planner's plans use) and their results go back to the model;
//! a state-changing call is never run here: it ends the turn as a [`Plan`] the core previews
//! with Confirm/Cancel exactly as it would the rule planner's. Bounded by rounds, tokens, a
//! per-request timeout and a deadline for the whole turn; any failure is an [`LlmError`] the
//! core answers by falling back to the rule planner.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use flotilla_mcp::tools::{CommandQueueArgs, RemoteConfigPushArgs};
use flotilla_mcp::{BackendError, FleetBackend};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Plan, ThreadContext, MUTATING_TOOLS};
use crate::core::tools;
use crate::core::types::{Block, Reply};

/// MCP tools not offered to the model. `command_cancel` runs without a preview in chat, so a
/// model that misread a message could cancel someone's command: cancelling stays a typed
/// `cancel <id>`.
pub const NOT_OFFERED: &[&str] = &["command_cancel"];
/// Characters of one tool result sent back to the model (every one is paid in tokens).
const RESULT_CHARS: usize = 8_000;
/// Characters of an endpoint's error body kept in the error (and the log line).
const ERROR_CHARS: usize = 200;

/// How the endpoint wants its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// `Authorization: Bearer <key>`, `POST {base_url}/chat/completions`: OpenAI, Ollama,
    /// vLLM, and Azure OpenAI's v1 endpoint (`https://<resource>.openai.azure.com/openai/v1`).
    #[default]
    Openai,
    /// Azure OpenAI's deployment endpoints: `api-key: <key>` and `?api-version=` on
    /// `{base_url}/chat/completions`, base_url `https://<resource>.openai.azure.com/openai/deployments/<deployment>`.
    Azure,
}

/// The planner's settings (filled from `[chat.llm]`).
#[derive(Clone)]
pub struct LlmConfig {
    /// Up to and without `/chat/completions`, e.g. `https://api.openai.com/v1` or
    /// `http://localhost:11434/v1` (Ollama).
    pub base_url: String,
    pub model: String,
    /// Bearer key (or Azure `api-key`); local servers may need none.
    pub api_key: Option<String>,
    pub flavor: Flavor,
    /// `api-version` query parameter (Azure flavor).
    pub api_version: Option<String>,
    /// Rounds of tool calls before the model must answer.
    pub max_steps: u32,
    /// `max_tokens` of each completion.
    pub max_tokens: u32,
    /// Per request to the endpoint.
    pub timeout: Duration,
    /// For the whole turn, tool calls included.
    pub deadline: Duration,
}

impl LlmConfig {
    /// Defaults for everything but the endpoint: 4 rounds, 1024 tokens, 20 s per request,
    /// 45 s per turn.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> LlmConfig {
        LlmConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            flavor: Flavor::Openai,
            api_version: None,
            max_steps: 4,
            max_tokens: 1024,
            timeout: Duration::from_secs(20),
            deadline: Duration::from_secs(45),
        }
    }
}

impl fmt::Debug for LlmConfig {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("flavor", &self.flavor)
            .field("api_version", &self.api_version)
            .field("max_steps", &self.max_steps)
            .field("max_tokens", &self.max_tokens)
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Why the planner gave up (the core then answers with the rule planner). The texts never
/// hold the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmError {
    #[error("LLM planner misconfigured: {0}")]
    Config(String),
    #[error("the model endpoint could not be reached ({0})")]
    Unreachable(String),
    #[error("the model endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the model did not finish within the {0:?} deadline")]
    Deadline(Duration),
    #[error("the model endpoint answered HTTP {0}: {1}")]
    Status(u16, String),
    #[error("the model endpoint's answer was not a chat completion ({0})")]
    Garbage(String),
    #[error("the model's answer was cut at max_tokens ({0})")]
    Length(u32),
}

/// One read-only tool the model had run, and what it returned.
#[derive(Debug, Clone)]
pub struct ToolRun {
    pub tool: String,
    pub args: Value,
    pub result: Result<Value, BackendError>,
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The model's final text, after the tool results it asked for.
    Answer(String),
    /// A state-changing call, for the core to preview and confirm: a [`Plan::Tool`].
    Change(Plan),
    /// The model still wanted tools after `max_steps` rounds.
    Stopped { rounds: u32 },
}

/// A turn's outcome: the reads it ran, the tool names it was refused, and how it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub runs: Vec<ToolRun>,
    pub refused: Vec<String>,
    pub end: End,
}

/// The planner: an HTTP client, the tool list and the settings.
pub struct LlmPlanner {
    cfg: LlmConfig,
    http: reqwest::Client,
    url: String,
    tools: Vec<Value>,
}

impl fmt::Debug for LlmPlanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmPlanner")
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// The MCP tools as chat-completions `tools`: each one's own name, description and input
/// schema, less [`NOT_OFFERED`].
pub fn offered_tools() -> Vec<Value> {
    flotilla_mcp::tools::all()
        .into_iter()
        .filter(|d| !NOT_OFFERED.contains(&d.name))
        .map(|d| {
            json!({"type": "function", "function": {
                "name": d.name,
                "description": d.tool.description.as_deref().unwrap_or(""),
                "parameters": Value::Object((*d.tool.input_schema).clone()),
            }})
        })
        .collect()
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct ToolCall {
    id: String,
    function: FunctionCall,
}

#[derive(Deserialize)]
struct FunctionCall {
    name: String,
    /// A JSON text per the API; some servers send the object itself.
    #[serde(default)]
    arguments: Value,
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

impl LlmPlanner {
    pub fn new(cfg: LlmConfig) -> Result<LlmPlanner, LlmError> {
        let base = cfg.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(LlmError::Config(format!(
                "base_url {base:?} must be an http(s):// URL"
            )));
        }
        if cfg.model.trim().is_empty() {
            return Err(LlmError::Config("model is empty".into()));
        }
        if cfg.max_steps == 0 || cfg.max_tokens == 0 {
            return Err(LlmError::Config(
                "max_steps and max_tokens must be at least 1".into(),
            ));
        }
        let mut url = format!("{base}/chat/completions");
        if let (Flavor::Azure, Some(v)) = (cfg.flavor, &cfg.api_version) {
            url = format!("{url}?api-version={v}");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .build()
            .map_err(|e| LlmError::Config(e.to_string()))?;
        Ok(LlmPlanner {
            cfg,
            http,
            url,
            tools: offered_tools(),
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// Plans one message: at most `max_steps` rounds of read-only tool calls, then the model's
    /// answer, or the first state-changing call it asks for.
    pub async fn plan(
        &self,
        text: &str,
        platform: &str,
        ctx: &ThreadContext,
        backend: &dyn FleetBackend,
    ) -> Result<Outcome, LlmError> {
        tokio::time::timeout(self.cfg.deadline, self.turn(text, platform, ctx, backend))
            .await
            .map_err(|_| LlmError::Deadline(self.cfg.deadline))?
    }

    fn system_prompt(&self, platform: &str) -> Result<String, LlmError> {
        let mut args = BTreeMap::new();
        let mut p = platform.to_string();
        if let Some(c) = p.get_mut(0..1) {
            c.make_ascii_uppercase();
        }
        args.insert("platform".to_string(), p);
        args.insert("max_steps".to_string(), self.cfg.max_steps.to_string());
        flotilla_mcp::prompts::system("chat_planner", &args)
            .map_err(|e| LlmError::Config(e.to_string()))
    }

    async fn turn(
        &self,
        text: &str,
        platform: &str,
        ctx: &ThreadContext,
        backend: &dyn FleetBackend,
    ) -> Result<Outcome, LlmError> {
        let mut messages =
            vec![json!({"role": "system", "content": self.system_prompt(platform)?})];
        if let Some(c) = context_note(ctx) {
            messages.push(json!({"role": "system", "content": c}));
        }
        messages.push(json!({"role": "user", "content": text}));
        let mut out = Outcome {
            runs: Vec::new(),
            refused: Vec::new(),
            end: End::Stopped { rounds: 0 },
        };
        for round in 0..=self.cfg.max_steps {
            // The last request lets the model only answer.
            let last = round == self.cfg.max_steps;
            let msg = self.complete(&messages, last).await?;
            let calls = msg.tool_calls.unwrap_or_default();
            if calls.is_empty() {
                let text = msg.content.unwrap_or_default();
                if text.trim().is_empty() {
                    return Err(LlmError::Garbage("neither content nor tool calls".into()));
                }
                out.end = End::Answer(text.trim().to_string());
                return Ok(out);
            }
            if last {
                out.end = End::Stopped { rounds: round };
                tracing::info!(
                    rounds = round,
                    "chat llm: still calling tools at the step limit; stopped"
                );
                return Ok(out);
            }
            messages.push(json!({
                "role": "assistant",
                "content": msg.content,
                "tool_calls": calls.iter().map(|c| json!({
                    "id": c.id, "type": "function",
                    "function": {"name": c.function.name, "arguments": match &c.function.arguments {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }},
                })).collect::<Vec<_>>(),
            }));
            for c in calls {
                let answer = match self.call(&c, backend, &mut out).await {
                    Some(answer) => answer,
                    None => return Ok(out),
                };
                messages.push(json!({"role": "tool", "tool_call_id": c.id, "content": answer}));
            }
        }
        unreachable!("the last round returns")
    }

    /// One tool call of the model: its answer for the model, or `None` when it ended the turn
    /// (a state-changing call, now in `out.end`).
    async fn call(
        &self,
        c: &ToolCall,
        backend: &dyn FleetBackend,
        out: &mut Outcome,
    ) -> Option<String> {
        let name = c.function.name.as_str();
        let offered = self
            .tools
            .iter()
            .any(|t| t["function"]["name"].as_str() == Some(name));
        if !offered {
            tracing::warn!(tool = %cut(name, 64), "chat llm: the model called a tool it was not offered; refused");
            out.refused.push(cut(name, 64));
            return Some(error_text(
                "unknown_tool",
                &format!("{name} is not one of your tools; nothing was run"),
            ));
        }
        let args = match &c.function.arguments {
            Value::String(s) if s.trim().is_empty() => json!({}),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(v) => v,
                Err(e) => {
                    return Some(error_text(
                        "invalid_arguments",
                        &format!("arguments are not JSON: {e}"),
                    ))
                }
            },
            Value::Null => json!({}),
            v => v.clone(),
        };
        if MUTATING_TOOLS.contains(&name) {
            return match change(name, args) {
                Ok(plan) => {
                    tracing::info!(
                        tool = name,
                        "chat llm: a state-changing call; previewed for confirmation"
                    );
                    out.end = End::Change(plan);
                    None
                }
                Err(why) => Some(error_text("invalid_arguments", &why)),
            };
        }
        tracing::info!(tool = name, "chat llm: running a read-only tool");
        let result = tools::run(backend, name, &args).await;
        let text = match &result {
            Ok(v) => cut(&v.to_string(), RESULT_CHARS),
            Err(e) => error_text(&e.code, &e.message),
        };
        out.runs.push(ToolRun {
            tool: name.to_string(),
            args,
            result,
        });
        Some(text)
    }

    async fn complete(&self, messages: &[Value], last: bool) -> Result<Message, LlmError> {
        let body = json!({
            "model": self.cfg.model,
            "messages": messages,
            "tools": self.tools,
            "tool_choice": if last { "none" } else { "auto" },
            "max_tokens": self.cfg.max_tokens,
        });
        let mut req = self
            .http
            .post(&self.url)
            .timeout(self.cfg.timeout)
            .json(&body);
        if let Some(k) = &self.cfg.api_key {
            req = match self.cfg.flavor {
                Flavor::Openai => req.bearer_auth(k),
                Flavor::Azure => req.header("api-key", k),
            };
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        if !status.is_success() {
            // OpenAI's error shape `{"error": {"message": …}}`, else the body's start.
            let text = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).to_string());
            return Err(LlmError::Status(status.as_u16(), cut(&text, ERROR_CHARS)));
        }
        let c: Completion = serde_json::from_slice(&bytes)
            .map_err(|e| LlmError::Garbage(cut(&e.to_string(), ERROR_CHARS)))?;
        let choice = c
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| LlmError::Garbage("no choices".into()))?;
        if choice.finish_reason.as_deref() == Some("length") {
            return Err(LlmError::Length(self.cfg.max_tokens));
        }
        Ok(choice.message)
    }

    fn transport(&self, e: reqwest::Error) -> LlmError {
        if e.is_timeout() {
            LlmError::Timeout(self.cfg.timeout)
        } else {
            // Without the URL: it is in the config, and a key could sit in a query string.
            LlmError::Unreachable(cut(&e.without_url().to_string(), ERROR_CHARS))
        }
    }
}

fn error_text(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message}}).to_string()
}

/// What the thread remembers, for follow-ups ("restart them").
fn context_note(ctx: &ThreadContext) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(q) = &ctx.last_query {
        parts.push(format!(
            "the last search in this thread was the query `{q}`"
        ));
    }
    if !ctx.last_agents.is_empty() {
        let shown: Vec<&str> = ctx
            .last_agents
            .iter()
            .take(10)
            .map(String::as_str)
            .collect();
        parts.push(format!("it showed the agents (uids) {}", shown.join(", ")));
    }
    if let Some(c) = &ctx.last_command {
        parts.push(format!("the last command queued here is {c}"));
    }
    if let Some(b) = &ctx.last_batch {
        parts.push(format!("the last fan-out (batch) queued here is {b}"));
    }
    (!parts.is_empty()).then(|| format!("Thread context: {}.", parts.join("; ")))
}

/// A state-changing call checked as the MCP tool would parse it, with exactly one target that
/// names agents (an empty query would be the whole fleet), and without the MCP confirmation
/// fields (chat confirms with its own buttons).
fn change(tool: &str, mut args: Value) -> Result<Plan, String> {
    let (agent, query) = match tool {
        "command_queue" => {
            let a: CommandQueueArgs =
                serde_json::from_value(args.clone()).map_err(|e| format!("{tool}: {e}"))?;
            (a.agent, a.query)
        }
        "remote_config_push" => {
            let a: RemoteConfigPushArgs =
                serde_json::from_value(args.clone()).map_err(|e| format!("{tool}: {e}"))?;
            (a.agent, a.query)
        }
        _ => {
            return Err(format!(
                "{tool} is not available in chat; the user can type `cancel <command id>`"
            ))
        }
    };
    match (agent.as_deref(), query.as_deref()) {
        (Some(a), None) if !a.trim().is_empty() => {}
        (None, Some(q)) if !q.trim().is_empty() => {}
        _ => {
            return Err("give exactly one of agent and a non-empty query naming the agents".into())
        }
    }
    if let Some(m) = args.as_object_mut() {
        m.remove("dry_run");
        m.remove("confirmation_token");
    }
    Ok(Plan::Tool {
        tool: tool.to_string(),
        args,
    })
}

/// The chat reply of a turn that did not end in a change: the model's answer with the last
/// successful tool result rendered under it (so the user sees the data it stood on), or a
/// clear stop at the step limit. An answer no tool result backs says so.
pub fn reply(out: &Outcome, model: &str, render: impl Fn(&str, &Value) -> Reply) -> Reply {
    let last_ok = out
        .runs
        .iter()
        .rev()
        .find_map(|r| r.result.as_ref().ok().map(|v| (r.tool.as_str(), v)));
    let mut r = match &out.end {
        End::Answer(text) => Reply::text(text.clone()),
        End::Stopped { rounds } => Reply::text(format!(
            "I stopped after {rounds} rounds of lookups without a final answer (the limit). \
             Nothing was changed. {}",
            if last_ok.is_some() {
                "Here is the last thing I looked up:"
            } else {
                "Try a command: `agents <query>` or `help`."
            }
        )),
        End::Change(_) => Reply::text("A change was previewed."),
    };
    if let Some((tool, v)) = last_ok {
        r.blocks.extend(render(tool, v).blocks);
    }
    let used: Vec<&str> = out.runs.iter().map(|r| r.tool.as_str()).collect();
    let mut note = if used.is_empty() {
        format!("Answered by {model} without looking at the fleet (it called no tool): not checked against Flotilla.")
    } else {
        format!("Answered by {model} from {}.", used.join(", "))
    };
    if !out.refused.is_empty() {
        note.push_str(&format!(
            " Refused tool call{}: {} (not a Flotilla tool).",
            if out.refused.len() == 1 { "" } else { "s" },
            out.refused.join(", ")
        ));
    }
    r.push(Block::Context(note))
}

//! Runs a read-only MCP tool by name with its JSON arguments over a `FleetBackend`, parsing
//! the arguments with the MCP tool layer's own types, so chat accepts exactly what an MCP
//! client may send and answers from the same backend calls.

use flotilla_mcp::server::{agent_overview, compact_catalog};
use flotilla_mcp::tools::{
    AgentGetArgs, AgentsSearchArgs, AuditQueryArgs, CommandCancelArgs, CommandStatusArgs,
    CommandsListArgs, NoArgs, RemoteConfigGetArgs, SEARCH_DEFAULT_LIMIT,
};
use flotilla_mcp::{AuditFilter, BackendError, CommandsFilter, FleetBackend};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// Rows a chat answer lists (the totals cover all).
pub const LIST_LIMIT: usize = 10;

fn parse<T: DeserializeOwned>(tool: &str, args: &Value) -> Result<T, BackendError> {
    serde_json::from_value(args.clone())
        .map_err(|e| BackendError::new("invalid_arguments", format!("{tool}: {e}")))
}

/// Runs a tool that needs no confirmation (reads, and `command_cancel`).
pub async fn run(b: &dyn FleetBackend, tool: &str, args: &Value) -> Result<Value, BackendError> {
    match tool {
        "agents_search" => {
            let a: AgentsSearchArgs = parse(tool, args)?;
            let limit = a.limit.unwrap_or(LIST_LIMIT.min(SEARCH_DEFAULT_LIMIT));
            b.search(
                a.query.as_deref().unwrap_or(""),
                Some(limit),
                a.cursor.as_deref(),
                true,
            )
            .await
        }
        "agent_get" => {
            let a: AgentGetArgs = parse(tool, args)?;
            let uid = b.resolve_agent(&a.agent).await?;
            Ok(agent_overview(&b.agent(&uid).await?, &a.include))
        }
        "fleet_summary" => {
            let _: NoArgs = parse(tool, args)?;
            b.summary().await
        }
        "commands_catalog" => {
            let _: NoArgs = parse(tool, args)?;
            Ok(compact_catalog(b.catalog().await?))
        }
        "command_status" => {
            let a: CommandStatusArgs = parse(tool, args)?;
            match (a.command_id, a.batch_id) {
                (Some(c), None) => b.command(&c).await,
                (None, Some(id)) => b.batch(&id).await,
                _ => Err(BackendError::new(
                    "invalid_arguments",
                    "give exactly one of command_id and batch_id",
                )),
            }
        }
        "commands_list" => {
            let a: CommandsListArgs = parse(tool, args)?;
            let agent = match a.agent {
                Some(r) => Some(b.resolve_agent(&r).await?),
                None => None,
            };
            b.commands(&CommandsFilter {
                agent,
                status: a.status,
                kind: a.kind,
                batch: a.batch,
                limit: Some(a.limit.unwrap_or(LIST_LIMIT)),
                cursor: a.cursor,
            })
            .await
        }
        "audit_query" => {
            let a: AuditQueryArgs = parse(tool, args)?;
            let agent = match a.agent {
                Some(r) => Some(b.resolve_agent(&r).await?),
                None => None,
            };
            b.audit(&AuditFilter {
                actor: a.actor,
                channel: a.channel,
                agent,
                operation: a.operation,
                since: a.since,
                until: a.until,
                limit: Some(a.limit.unwrap_or(LIST_LIMIT)),
                cursor: a.cursor,
            })
            .await
        }
        "remote_config_get" => {
            let a: RemoteConfigGetArgs = parse(tool, args)?;
            match (a.agent, a.query) {
                (Some(r), None) => {
                    let uid = b.resolve_agent(&r).await?;
                    let v = b.agent(&uid).await?;
                    Ok(
                        json!({"uid": v["uid"], "effective_config": v["effective_config"],
                              "desired_config": v["desired_config"],
                              "remote_config_status": v["remote_config_status"]}),
                    )
                }
                (None, Some(q)) => {
                    b.search(&q, Some(LIST_LIMIT), a.cursor.as_deref(), true)
                        .await
                }
                _ => Err(BackendError::new(
                    "invalid_arguments",
                    "give exactly one of agent and query",
                )),
            }
        }
        "command_cancel" => {
            let a: CommandCancelArgs = parse(tool, args)?;
            b.cancel(&a.command_id).await
        }
        other => Err(BackendError::new(
            "internal",
            format!("{other} is not run without a confirmation"),
        )),
    }
}

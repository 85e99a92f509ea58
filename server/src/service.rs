//! The fleet service: the one API that owns every fleet operation (search, get, label, queue,
//! cancel, status, catalog, audit). REST, MCP, chat and the console are thin adapters over it.
//!
//! Invariant: every state-changing operation checks the caller's role and appends an audit
//! record in the same store transaction as the change itself; adapters cannot skip either.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use tokio::sync::broadcast;

use crate::commands::{self, CommandError};
use crate::events::{Event, Events};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{
    now_ms, rfc3339, Agent, AuditFilter, AuditRecord, Batch, Caller, Channel, Command,
    CommandFilter, CommandKind, CommandStatus, Liveness, Millis, NewAudit, Role, SkippedTarget,
};
use crate::query::Query;
use crate::registry::Registry;
use crate::store::indexed::IndexedStore;
use crate::store::{Finish, Store, StoreError, Wakeup};

/// Why an operation was refused or failed. Each variant has a stable [`FleetError::code`].
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{actor} ({role}) may not {operation}: it needs the {needed} role")]
    Forbidden {
        actor: String,
        role: Role,
        needed: Role,
        operation: std::borrow::Cow<'static, str>,
    },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid query: {0}")]
    BadQuery(String),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("no agent matches {0:?}")]
    NoTargets(String),
    #[error("{count} agents match; a fan-out may target at most {max} (narrow the query)")]
    TooManyTargets { count: usize, max: usize },
    #[error("{0}")]
    Conflict(String),
    /// An agent named by host or service name (or a query) that matches several agents.
    #[error("{0}")]
    AmbiguousAgent(String),
    /// An agent named by something no agent has.
    #[error("{0}")]
    UnknownAgent(String),
    /// A queue request carried `expect_targets` from a preview that no longer holds.
    #[error("{0}")]
    TargetsChanged(String),
    #[error("storage unavailable: {0}")]
    Store(#[from] StoreError),
}

impl FleetError {
    /// A stable machine-readable code (part of the API contract).
    pub fn code(&self) -> &'static str {
        match self {
            FleetError::Forbidden { .. } => "forbidden",
            FleetError::NotFound { .. } => "not_found",
            FleetError::BadRequest(_) => "bad_request",
            FleetError::BadQuery(_) => "invalid_query",
            FleetError::Command(CommandError::InvalidParams { .. }) => "invalid_params",
            FleetError::Command(CommandError::NotCapable { .. }) => "capability_missing",
            FleetError::NoTargets(_) => "no_targets",
            FleetError::TooManyTargets { .. } => "too_many_targets",
            FleetError::Conflict(_) => "conflict",
            FleetError::AmbiguousAgent(_) => "ambiguous_agent",
            FleetError::UnknownAgent(_) => "not_found",
            FleetError::TargetsChanged(_) => "targets_changed",
            FleetError::Store(_) => "storage_unavailable",
        }
    }
}

pub type FleetResult<T> = Result<T, FleetError>;

/// Settings the service needs from the configuration.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub queue_ttl_s: u64,
    pub result_timeout_s: u64,
    pub max_fanout: usize,
    pub heartbeat_interval_s: u64,
    /// A `shutdown` fan-out reaching more agents than this needs the admin role.
    pub admin_shutdown_above: usize,
    /// This process among the replicas sharing the store (`store.replica_id`).
    pub replica_id: String,
    /// How often it writes its heartbeat; silent for 3 intervals is dead.
    pub replica_heartbeat_s: u64,
}

impl FleetSettings {
    /// Heartbeats older than this (ms before now) are a dead replica's.
    pub fn replica_stale_ms(&self) -> Millis {
        3 * (self.replica_heartbeat_s.max(1) as Millis) * 1000
    }
}

/// What needs the admin role rather than operator. The one list: REST, MCP, chat and the
/// console call [`Fleet`], which checks it, so no adapter can grant or forget one (the README's
/// role table says the same). Everything else needs viewer (reads) or operator (changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOnly {
    /// A `shutdown` fan-out to more agents than `commands.admin_shutdown_above`: it takes a
    /// fleet down, and an operator token (or a chat user) should not be able to do that alone.
    /// A shutdown of one agent, or of a small batch, stays operator.
    ShutdownFanout,
    /// Taking the whole trail out in chain order with its hashes ([`Fleet::export_audit`]).
    /// Reading records (filtered, a page at a time) and checking the chain stay viewer.
    AuditExport,
    /// Creating, listing and revoking API tokens and their roles.
    ManageTokens,
    /// The agent approval policy (not built yet; its code calls [`Fleet::require_admin`]).
    ApprovalPolicy,
    /// Subscribing a chat channel to another channel's events (not built yet; likewise).
    SubscribeOtherChannels,
}

impl AdminOnly {
    /// What the refusal says the caller may not do.
    pub fn operation(self) -> &'static str {
        match self {
            AdminOnly::ShutdownFanout => "shut down this many agents at once",
            AdminOnly::AuditExport => "export the audit trail",
            AdminOnly::ManageTokens => "manage API tokens",
            AdminOnly::ApprovalPolicy => "change the agent approval policy",
            AdminOnly::SubscribeOtherChannels => "subscribe other chat channels",
        }
    }
}

/// One page of results with an opaque cursor for the next.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
    /// Matches in the whole fleet, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<usize>,
}

/// A compact search row: enough to pick an agent, small enough for a 10k-agent answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentRow {
    pub uid: Uuid,
    #[serde(rename = "type")]
    pub agent_type: String,
    pub name: Option<String>,
    pub host: Option<String>,
    pub version: Option<String>,
    pub state: Liveness,
    pub healthy: Option<bool>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub last_seen: String,
}

impl AgentRow {
    /// How a person recognises the agent: `host (service, uid)`.
    pub fn label(&self) -> String {
        match (&self.host, &self.name) {
            (Some(h), Some(n)) => format!("{h} ({n}, {})", self.uid),
            (Some(h), None) => format!("{h} ({})", self.uid),
            (None, Some(n)) => format!("{n} ({})", self.uid),
            (None, None) => self.uid.to_string(),
        }
    }

    pub fn of(a: &Agent, now: Millis) -> AgentRow {
        AgentRow {
            uid: a.uid,
            agent_type: a.agent_type(),
            name: a.attr("service.name").map(str::to_string),
            host: a.host().map(str::to_string),
            version: a.attr("service.version").map(str::to_string),
            state: a.liveness(now),
            healthy: a.health.as_ref().map(|h| h.healthy),
            labels: a.labels.clone(),
            last_seen: rfc3339(a.last_seen),
        }
    }
}

/// The full view of one agent.
pub fn agent_view(a: &Agent, now: Millis) -> Value {
    let attrs = |v: &Vec<(String, String)>| {
        Value::Object(
            v.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    };
    json!({
        "uid": a.uid,
        "type": a.agent_type(),
        "state": a.liveness(now),
        "connected": a.connected,
        "identifying_attributes": attrs(&a.identifying),
        "non_identifying_attributes": attrs(&a.non_identifying),
        "capabilities": {
            "bits": a.capabilities,
            "names": flotilla_proto::caps::agent_capability_names(a.capabilities),
        },
        "custom_capabilities": a.custom_capabilities,
        "health": a.health,
        "effective_config": a.effective_config,
        // Equal to `desired_config.hash` when the agent runs exactly the pushed files.
        "effective_config_hash": a.effective_config.as_ref().map(crate::commands::config_hash),
        "remote_config_status": a.remote_config_status,
        "desired_config": a.desired_config.as_ref().map(|d| json!({"hash": d.hash, "command_id": d.command_id})),
        "labels": a.labels,
        "transport": a.transport,
        "remote_addr": a.remote_addr,
        "first_seen": rfc3339(a.first_seen),
        "last_seen": rfc3339(a.last_seen),
        "sequence_num": a.sequence_num,
        "heartbeat_interval_seconds": a.heartbeat_interval_s,
        "previous_uid": a.previous_uid,
        "replaces": a.replaces,
        "replaced_by": a.replaced_by,
        // mTLS: subject CN, subject alternative names and SHA-256 of the agent's certificate.
        "client_certificate": a.client_cert,
        // The replica holding its connection (the last one that did, when disconnected).
        "replica": a.replica,
    })
}

/// What to send a command to.
#[derive(Debug, Clone)]
pub enum Target {
    Agent(Uuid),
    /// Every agent matching a search query at queue time (fan-out).
    Query(String),
}

/// The result of queueing.
#[derive(Debug, Clone)]
pub enum Queued {
    One(Command),
    Batch(Batch, Vec<Command>),
}

/// What a queue request would do ([`Fleet::plan`]): the agents it would reach and those it
/// would skip. Nothing is queued or audited to compute it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub kind: CommandKind,
    /// Validated, normalised parameters, as they would be queued.
    pub params: Value,
    /// The search query of a fan-out; `None` for one agent.
    pub query: Option<String>,
    /// Agents the target matched.
    pub matched: usize,
    /// Agents the command would be queued for, in uid order.
    pub targets: Vec<AgentRow>,
    /// Matching agents that cannot run it, with the reason.
    pub skipped: Vec<SkippedTarget>,
}

impl Plan {
    /// The target set in the form [`Fleet::queue_expecting`] checks.
    pub fn expected(&self) -> ExpectedTargets {
        ExpectedTargets::of(self.targets.iter().map(|t| t.uid))
    }
}

/// A target set as it was previewed: how many agents and a SHA-256 digest of their uids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ExpectedTargets {
    pub count: usize,
    pub digest: String,
}

impl ExpectedTargets {
    /// `uids` in uid order (the order plans list them in).
    pub fn of(uids: impl IntoIterator<Item = Uuid>) -> ExpectedTargets {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut count = 0;
        for u in uids {
            count += 1;
            h.update(u.as_bytes());
        }
        ExpectedTargets {
            count,
            digest: hex::encode(h.finalize()),
        }
    }
}

/// A fan-out's per-agent progress.
#[derive(Debug, Clone, Serialize)]
pub struct BatchProgress {
    pub batch: Batch,
    /// Commands by status (non-zero ones), plus `skipped` agents.
    pub counts: BTreeMap<&'static str, usize>,
    /// Commands in the batch.
    pub total: usize,
    /// Commands in a final status.
    pub done: usize,
    /// The newest [`BATCH_ITEMS`] commands at most; `counts` and `total` cover all.
    pub commands: Vec<BatchItem>,
}

/// Commands listed per agent in a batch's progress.
pub const BATCH_ITEMS: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct BatchItem {
    pub agent_uid: Uuid,
    pub command_id: Uuid,
    pub status: CommandStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The fleet service. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    /// The store wrapped in [`crate::store::indexed::IndexedStore`], which keeps `registry` in
    /// step with every agent write.
    store: Arc<dyn Store>,
    /// The in-memory index answering search, summary and catalog (see [`crate::registry`]).
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    settings: FleetSettings,
    /// The event bus (see [`crate::events`]).
    events: Arc<Events>,
    /// Rung after each audited change, so the audit tail runs at once.
    audit_wake: Arc<tokio::sync::Notify>,
    /// The last audit record sent on the bus (`None`: the tail has not started).
    audit_sent: Arc<tokio::sync::Mutex<Option<i64>>>,
    deliveries: Arc<Deliveries>,
}

/// Candidates listed when an agent name is ambiguous.
const RESOLVE_CANDIDATES: usize = 10;

impl Fleet {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        settings: FleetSettings,
    ) -> Fleet {
        let registry = Arc::new(Registry::default());
        let store: Arc<dyn Store> = Arc::new(IndexedStore::new(store, registry.clone()));
        Fleet {
            store,
            registry,
            hub,
            metrics,
            settings,
            events: Arc::new(Events::default()),
            audit_wake: Arc::new(tokio::sync::Notify::new()),
            audit_sent: Arc::new(tokio::sync::Mutex::new(None)),
            deliveries: Arc::default(),
        }
    }

    /// A receiver of every fleet event from now on (see [`crate::events`] and
    /// docs/ARCHITECTURE.md for the types and their fields).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// Resolves when an audited change was made since the last call (for the audit tail).
    pub async fn audit_appended(&self) {
        self.audit_wake.notified().await
    }

    fn audited(&self) {
        self.audit_wake.notify_one();
    }

    /// Sends an `audit` event for every record appended since the last call, whichever path
    /// appended it (the service, a protocol session, another helper's code): the trail is read
    /// by id, so none is missed and none is sent twice. The first call only takes the head.
    pub async fn tail_audit(&self) {
        let mut sent = self.audit_sent.lock().await;
        let Some(last) = *sent else {
            let head = self
                .store
                .query_audit(&AuditFilter {
                    limit: 1,
                    ..Default::default()
                })
                .await;
            match head {
                Ok(r) => *sent = Some(r.first().map_or(0, |r| r.id)),
                Err(e) => tracing::warn!(error = %e, "event bus: could not read the audit head"),
            }
            return;
        };
        let mut last = last;
        loop {
            let recs = match self.store.audit_chain(last, 1000).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "event bus: could not read new audit records");
                    break;
                }
            };
            for r in &recs {
                last = r.id;
                self.events.emit(
                    "audit",
                    r.ts,
                    json!({"id": r.id, "actor": r.actor, "channel": r.channel.as_str(),
                           "operation": r.operation, "targets": r.targets,
                           "outcome": r.outcome, "ref_id": r.ref_id}),
                );
            }
            if recs.len() < 1000 {
                break;
            }
        }
        *sent = Some(last);
    }

    /// Announces a two-person confirmation request or its decision on the bus (for the
    /// approvals flow of the guard-rails issue; the console's approvals page and the chat
    /// gateways listen). `status`: `pending`, `approved`, `rejected` or `expired`.
    pub fn confirmation_event(&self, id: &str, operation: &str, requested_by: &str, status: &str) {
        self.events.emit(
            "confirmation",
            now_ms(),
            json!({"id": id, "operation": operation, "requested_by": requested_by, "status": status}),
        );
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    pub fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    fn require(
        caller: &Caller,
        needed: Role,
        operation: impl Into<std::borrow::Cow<'static, str>>,
    ) -> FleetResult<()> {
        if caller.role >= needed {
            return Ok(());
        }
        let operation = operation.into();
        // Refusals are not audited (nothing changed), but they are worth a line: a token
        // trying what its role does not allow is either a mistake or a probe.
        tracing::warn!(actor = %caller.actor, channel = caller.channel.as_str(), role = %caller.role,
            %needed, %operation, "refused: the caller's role does not allow it");
        Err(FleetError::Forbidden {
            actor: caller.actor.clone(),
            role: caller.role,
            needed,
            operation,
        })
    }

    /// Refuses `caller` unless it has the admin role ([`AdminOnly`] lists what needs it).
    pub fn require_admin(caller: &Caller, what: AdminOnly) -> FleetResult<()> {
        Self::require(caller, Role::Admin, what.operation())
    }

    /// The registry index, read from the store on first use ([`Fleet::load_registry`] does it
    /// at start, before anything is served).
    async fn registry(&self) -> FleetResult<&Registry> {
        self.load_registry().await?;
        Ok(&self.registry)
    }

    /// Reads the registry into the in-memory index (once; later calls return at once).
    pub async fn load_registry(&self) -> FleetResult<()> {
        let inner = self.store.as_ref();
        self.registry.ensure_loaded(inner).await?;
        Ok(())
    }

    fn parse_query(q: &str) -> FleetResult<Query> {
        Query::parse(q).map_err(|e| FleetError::BadQuery(e.to_string()))
    }

    /// Agents matching `q`, compact rows, `limit` per page (1..=1000, default 50).
    pub async fn search(
        &self,
        caller: &Caller,
        q: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
        with_total: bool,
    ) -> FleetResult<Page<AgentRow>> {
        Self::require(caller, Role::Viewer, "search agents")?;
        let query = Self::parse_query(q)?;
        let limit = limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(FleetError::BadRequest(format!(
                "limit {limit} must be between 1 and 1000"
            )));
        }
        let after = match cursor {
            None | Some("") => None,
            Some(c) => Some(
                Uuid::parse_str(c)
                    .map_err(|_| FleetError::BadRequest(format!("cursor {c:?} is not valid")))?,
            ),
        };
        let found = self
            .registry()
            .await?
            .search(&query, after, limit, with_total);
        let items: Vec<AgentRow> = found
            .items
            .iter()
            .map(|a| AgentRow::of(a, found.now))
            .collect();
        let next_cursor = if found.more {
            items.last().map(|r| r.uid.to_string())
        } else {
            None
        };
        Ok(Page {
            items,
            next_cursor,
            total: found.total,
        })
    }

    /// One agent, whole.
    pub async fn get_agent(&self, caller: &Caller, uid: Uuid) -> FleetResult<Agent> {
        Self::require(caller, Role::Viewer, "read agents")?;
        self.store
            .get_agent(uid)
            .await?
            .ok_or_else(|| FleetError::NotFound {
                what: "agent",
                id: uid.to_string(),
            })
    }

    /// The uid of an agent as a person names it: its uid, a unique host name (any host
    /// attribute the `host:` search term covers), a unique service name, or a query (anything
    /// with a `:`) that matches exactly one agent. Every adapter that takes an agent resolves
    /// it here, so "web-1" means the same agent over REST, MCP and chat. A uid is returned as
    /// is (the operation that follows says whether it exists); several matches are refused
    /// with the candidates listed, never guessed between.
    pub async fn resolve_agent(&self, caller: &Caller, reference: &str) -> FleetResult<Uuid> {
        Self::require(caller, Role::Viewer, "look agents up")?;
        let r = reference.trim();
        if r.is_empty() {
            return Err(FleetError::BadRequest(
                "an agent must be named: its uid, host name or service name".into(),
            ));
        }
        if let Ok(u) = Uuid::parse_str(r) {
            return Ok(u);
        }
        // Quotes would end the quoted term early and let the reference add query terms.
        let clean: String = r.chars().filter(|c| *c != '"').collect();
        let queries = if clean.contains(':') {
            vec![clean]
        } else {
            vec![format!("host:\"{clean}\""), format!("name:\"{clean}\"")]
        };
        for q in &queries {
            // No total: a unique match is one row and no next page.
            let page = self
                .search(caller, q, Some(RESOLVE_CANDIDATES), None, false)
                .await?;
            match page.items.as_slice() {
                [] => continue,
                [row] if page.next_cursor.is_none() => return Ok(row.uid),
                rows => {
                    let more = page.next_cursor.is_some();
                    let listed: Vec<String> = rows.iter().map(AgentRow::label).collect();
                    return Err(FleetError::AmbiguousAgent(format!(
                        "agent {r:?} is ambiguous: {}{} agents match `{q}`: {}{}; name one by uid",
                        if more { "more than " } else { "" },
                        rows.len(),
                        listed.join(", "),
                        if more { ", ..." } else { "" }
                    )));
                }
            }
        }
        Err(FleetError::UnknownAgent(format!(
            "no agent has uid, host name or service name {r:?}; search the fleet to find it \
             (GET /api/v1/agents?q=..., or the agents_search tool)"
        )))
    }

    /// Counts by type, version, health and state.
    pub async fn summary(&self, caller: &Caller) -> FleetResult<Value> {
        Self::require(caller, Role::Viewer, "read the fleet summary")?;
        let c = self.registry().await?.summary();
        Ok(
            json!({"total": c.total, "by_type": c.by_type, "by_version": c.by_version,
                  "by_health": c.by_health, "by_state": c.by_state}),
        )
    }

    fn check_label(key: &str, value: Option<&str>) -> FleetResult<()> {
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(FleetError::BadRequest(format!(
                "label key {key:?} must be 1-63 characters of A-Z a-z 0-9 . _ - /"
            )));
        }
        if let Some(v) = value {
            if v.len() > 256 || v.chars().any(char::is_control) {
                return Err(FleetError::BadRequest(
                    "label value must be at most 256 printable characters".into(),
                ));
            }
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) a server-side label.
    pub async fn set_label(
        &self,
        caller: &Caller,
        uid: Uuid,
        key: &str,
        value: Option<&str>,
    ) -> FleetResult<AuditRecord> {
        Self::require(caller, Role::Operator, "change labels")?;
        Self::check_label(key, value)?;
        let op = if value.is_some() {
            "agent.label.set"
        } else {
            "agent.label.remove"
        };
        let mut audit = NewAudit::new(caller, op);
        audit.targets = vec![uid.to_string()];
        audit.params = json!({"key": key, "value": value});
        let rec = self
            .store
            .set_label(uid, key, value, audit)
            .await?
            .ok_or_else(|| FleetError::NotFound {
                what: "agent",
                id: uid.to_string(),
            })?;
        self.events
            .label_changed(uid, key, value, &caller.actor, rec.ts);
        self.audited();
        Ok(rec)
    }

    /// The command kinds, their parameter schemas and how many known agents can run each.
    pub async fn catalog(&self, caller: &Caller) -> FleetResult<Vec<Value>> {
        Self::require(caller, Role::Viewer, "read the catalog")?;
        let capable: BTreeMap<&'static str, usize> = self
            .registry()
            .await?
            .capable()
            .into_iter()
            .map(|(k, n)| (k.as_str(), n))
            .collect();
        Ok(CommandKind::ALL
            .iter()
            .map(|k| {
                let mut e = commands::catalog_entry(*k);
                e["capable_agents"] = json!(capable.get(k.as_str()).copied().unwrap_or(0));
                e
            })
            .collect())
    }

    /// An operator-chosen `new_uid` must name nobody yet (adopting it would overwrite that
    /// agent's record) and can go to one agent only (a batch gets a fresh uid per agent).
    async fn check_chosen_uid(
        &self,
        target: &Target,
        kind: CommandKind,
        params: &Value,
    ) -> FleetResult<()> {
        if kind != CommandKind::NewInstanceUid {
            return Ok(());
        }
        let Some(chosen) = params.get("new_uid").and_then(Value::as_str) else {
            return Ok(());
        };
        let bad = |reason: String| {
            FleetError::Command(CommandError::InvalidParams {
                kind: kind.as_str(),
                message: reason,
            })
        };
        if matches!(target, Target::Query(_)) {
            return Err(bad(
                "new_uid can be chosen for one agent only; leave it out and every agent of the \
                 batch gets a fresh UUIDv7"
                    .into(),
            ));
        }
        if let Ok(uid) = Uuid::parse_str(chosen) {
            if self.store.get_agent(uid).await?.is_some() {
                return Err(bad(format!(
                    "new_uid {uid} already belongs to an agent in the registry"
                )));
            }
            for status in [CommandStatus::Queued, CommandStatus::Sent] {
                let pending = self
                    .store
                    .list_commands(&CommandFilter {
                        status: Some(status),
                        kind: Some(CommandKind::NewInstanceUid),
                        limit: 10_000,
                        ..Default::default()
                    })
                    .await?;
                if let Some(c) = pending
                    .iter()
                    .find(|c| c.params.get("new_uid").and_then(Value::as_str) == Some(chosen))
                {
                    return Err(bad(format!(
                        "new_uid {uid} is already being given to agent {} (command {})",
                        c.agent_uid, c.id
                    )));
                }
            }
        }
        Ok(())
    }

    fn new_command(
        &self,
        caller: &Caller,
        agent: Uuid,
        kind: CommandKind,
        params: &Value,
        batch: Option<Uuid>,
        now: Millis,
    ) -> Command {
        let ttl = params
            .get("ttl_seconds")
            .and_then(Value::as_u64)
            .unwrap_or(self.settings.queue_ttl_s);
        let mut params = params.clone();
        if kind == CommandKind::NewInstanceUid && params.get("new_uid").is_none() {
            // Chosen here, per command: every agent of a batch needs its own.
            params["new_uid"] = json!(Uuid::now_v7().to_string());
        }
        Command {
            id: Uuid::now_v7(),
            agent_uid: agent,
            batch_id: batch,
            kind,
            params,
            status: CommandStatus::Queued,
            created_at: now,
            sent_at: None,
            finished_at: None,
            expires_at: now + (ttl as i64) * 1000,
            result: None,
            error: None,
            actor: caller.actor.clone(),
            channel: caller.channel,
            audit_id: None,
        }
    }

    /// Queues `kind` for one agent or, for a query, for every matching agent that can run it
    /// (a batch; agents that cannot are listed as skipped). Nothing is queued on any error.
    pub async fn queue(
        &self,
        caller: &Caller,
        target: Target,
        kind: CommandKind,
        params: &Value,
    ) -> FleetResult<Queued> {
        self.queue_expecting(caller, target, kind, params, None)
            .await
    }

    /// What [`Fleet::queue`] would do, without queuing or auditing anything: the same role
    /// check, parameter validation, target resolution, `max_fanout` and capability checks (it
    /// is the first half of `queue` itself, so a dry run and the real call cannot disagree).
    /// Fails exactly where `queue` would fail.
    pub async fn plan(
        &self,
        caller: &Caller,
        target: Target,
        kind: CommandKind,
        params: &Value,
    ) -> FleetResult<Plan> {
        Self::require(caller, Role::Operator, "queue commands")?;
        self.check_chosen_uid(&target, kind, params).await?;
        let params = commands::validate_params(kind, params)?;
        let now = now_ms();
        match target {
            Target::Agent(uid) => {
                let agent = self.get_agent(caller, uid).await?;
                commands::check_capable(&agent, kind, &params)?;
                Ok(Plan {
                    kind,
                    params,
                    query: None,
                    matched: 1,
                    targets: vec![AgentRow::of(&agent, now)],
                    skipped: Vec::new(),
                })
            }
            Target::Query(q) => {
                let query = Self::parse_query(&q)?;
                // Past max_fanout the request fails anyway: one more match is enough to know.
                let found = self.registry().await?.search(
                    &query,
                    None,
                    self.settings.max_fanout.saturating_add(1),
                    true,
                );
                let matched = found.total.unwrap_or(found.items.len());
                let first = found.items.first().map(|a| a.uid);
                let mut targets = Vec::new();
                let mut skipped = Vec::new();
                for a in found.items.iter().take(self.settings.max_fanout) {
                    match commands::check_capable(a, kind, &params) {
                        Ok(()) => targets.push(AgentRow::of(a, found.now)),
                        Err(e) => skipped.push(SkippedTarget {
                            agent_uid: a.uid,
                            reason: e.to_string(),
                        }),
                    }
                }
                let Some(first) = first else {
                    return Err(FleetError::NoTargets(q));
                };
                if matched > self.settings.max_fanout {
                    return Err(FleetError::TooManyTargets {
                        count: matched,
                        max: self.settings.max_fanout,
                    });
                }
                if targets.is_empty() {
                    return Err(FleetError::Command(CommandError::NotCapable {
                        agent: first,
                        kind: kind.as_str(),
                        reason: format!(
                            "none of the {matched} matching agents can run it ({})",
                            skipped[0].reason
                        ),
                    }));
                }
                let most = self.settings.admin_shutdown_above;
                if kind == CommandKind::Shutdown && targets.len() > most {
                    Self::require(
                        caller,
                        Role::Admin,
                        format!(
                            "shut down {} agents at once (more than commands.admin_shutdown_above \
                             = {most}; an operator may shut down up to {most} per request)",
                            targets.len()
                        ),
                    )?;
                }
                Ok(Plan {
                    kind,
                    params,
                    query: Some(q),
                    matched,
                    targets,
                    skipped,
                })
            }
        }
    }

    /// [`Fleet::queue`], refusing with a conflict (nothing queued) when `expect` is given and
    /// the resolved target set is no longer the one previewed, so a confirmation of "restart 5
    /// agents" can never restart 500.
    pub async fn queue_expecting(
        &self,
        caller: &Caller,
        target: Target,
        kind: CommandKind,
        params: &Value,
        expect: Option<&ExpectedTargets>,
    ) -> FleetResult<Queued> {
        let plan = self.plan(caller, target, kind, params).await?;
        if let Some(e) = expect {
            let now = plan.expected();
            if now != *e {
                return Err(FleetError::TargetsChanged(format!(
                    "the target set changed since it was previewed ({} agents then, {} now{}); \
                     nothing was queued: preview the command again",
                    e.count,
                    now.count,
                    if e.count == now.count {
                        ", but not the same agents"
                    } else {
                        ""
                    }
                )));
            }
        }
        let Plan {
            kind,
            params,
            query,
            targets,
            skipped,
            ..
        } = plan;
        let now = now_ms();
        match query {
            None => {
                let uid = targets[0].uid;
                let mut cmd = self.new_command(caller, uid, kind, &params, None, now);
                let mut audit = NewAudit::new(caller, "command.queue");
                audit.targets = vec![uid.to_string(), cmd.id.to_string()];
                // The command's own params: they hold what was filled in at queue time.
                audit.params = json!({"kind": kind.as_str(), "params": redact(&cmd.params),
                                      crate::audit::DIGEST_KEY: crate::audit::queued_digest(&cmd)});
                audit.outcome = "queued".into();
                let rec = self
                    .store
                    .enqueue(None, std::slice::from_ref(&cmd), audit)
                    .await?;
                cmd.audit_id = Some(rec.id);
                self.hub.notify(uid);
                self.events.command(&cmd, None, now);
                self.audited();
                Ok(Queued::One(cmd))
            }
            Some(q) => {
                let batch_id = Uuid::now_v7();
                let mut cmds: Vec<Command> = targets
                    .iter()
                    .map(|t| self.new_command(caller, t.uid, kind, &params, Some(batch_id), now))
                    .collect();
                let batch = Batch {
                    id: batch_id,
                    query: q.clone(),
                    kind,
                    params: params.clone(),
                    created_at: now,
                    actor: caller.actor.clone(),
                    channel: caller.channel,
                    skipped,
                };
                let mut audit = NewAudit::new(caller, "batch.queue");
                audit.targets = std::iter::once(batch_id.to_string())
                    .chain(cmds.iter().map(|c| c.agent_uid.to_string()))
                    .collect();
                // One digest covers every command of the batch (they differ only in their
                // agent, which the targets name): see `audit::queued_digest`.
                audit.params = json!({"kind": kind.as_str(), "query": q, "params": redact(&params),
                                      "queued": cmds.len(), "skipped": batch.skipped.len(),
                                      crate::audit::DIGEST_KEY: crate::audit::queued_digest(&cmds[0])});
                audit.outcome = "queued".into();
                let rec = self.store.enqueue(Some(&batch), &cmds, audit).await?;
                for c in &mut cmds {
                    c.audit_id = Some(rec.id);
                    self.hub.notify(c.agent_uid);
                }
                self.events.emit(
                    "batch.queued",
                    now,
                    json!({"batch_id": batch.id, "kind": kind.as_str(), "query": batch.query,
                           "queued": cmds.len(), "skipped": batch.skipped.len(),
                           "actor": caller.actor, "channel": caller.channel.as_str()}),
                );
                for c in &cmds {
                    self.events.command(c, None, now);
                }
                self.audited();
                Ok(Queued::Batch(batch, cmds))
            }
        }
    }

    /// Cancels a command that is still queued.
    pub async fn cancel(&self, caller: &Caller, id: Uuid) -> FleetResult<Command> {
        Self::require(caller, Role::Operator, "cancel commands")?;
        let cmd = self.command(caller, id).await?;
        let mut audit = NewAudit::new(caller, "command.cancel");
        audit.targets = vec![cmd.agent_uid.to_string(), id.to_string()];
        audit.ref_id = cmd.audit_id;
        audit.outcome = "cancelled".into();
        let finish = Finish {
            to: CommandStatus::Cancelled,
            result: None,
            error: Some(format!("cancelled by {}", caller.actor)),
            at: now_ms(),
        };
        let at = finish.at;
        match self
            .store
            .finish_command(id, &[CommandStatus::Queued], finish, Some(audit))
            .await?
        {
            Some(c) => {
                self.events.command(&c, Some(CommandStatus::Queued), at);
                self.audited();
                Ok(c)
            }
            None => {
                let now = self.command(caller, id).await?;
                Err(FleetError::Conflict(format!(
                    "command {id} is {} and can no longer be cancelled",
                    now.status.as_str()
                )))
            }
        }
    }

    pub async fn command(&self, caller: &Caller, id: Uuid) -> FleetResult<Command> {
        Self::require(caller, Role::Viewer, "read commands")?;
        self.store
            .get_command(id)
            .await?
            .ok_or_else(|| FleetError::NotFound {
                what: "command",
                id: id.to_string(),
            })
    }

    pub async fn commands(
        &self,
        caller: &Caller,
        filter: &CommandFilter,
    ) -> FleetResult<Vec<Command>> {
        Self::require(caller, Role::Viewer, "read commands")?;
        let mut f = filter.clone();
        if f.limit == 0 || f.limit > 1000 {
            f.limit = 100;
        }
        Ok(self.store.list_commands(&f).await?)
    }

    pub async fn batch(&self, caller: &Caller, id: Uuid) -> FleetResult<BatchProgress> {
        Self::require(caller, Role::Viewer, "read commands")?;
        let batch = self
            .store
            .get_batch(id)
            .await?
            .ok_or_else(|| FleetError::NotFound {
                what: "batch",
                id: id.to_string(),
            })?;
        // Counted by the store and one page of rows: a 10k-agent batch polled every second
        // must not read 10k commands each time.
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        let (mut total, mut done) = (0, 0);
        for (status, n) in self.store.batch_counts(id).await? {
            let n = n as usize;
            total += n;
            if status.is_final() {
                done += n;
            }
            if n > 0 {
                counts.insert(status.as_str(), n);
            }
        }
        counts.insert("skipped", batch.skipped.len());
        let commands = self
            .store
            .list_commands(&CommandFilter {
                batch: Some(id),
                limit: BATCH_ITEMS,
                ..Default::default()
            })
            .await?
            .into_iter()
            .map(|c| BatchItem {
                agent_uid: c.agent_uid,
                command_id: c.id,
                status: c.status,
                error: c.error,
            })
            .collect();
        Ok(BatchProgress {
            batch,
            counts,
            total,
            done,
            commands,
        })
    }

    /// Audits an agent refused at connect by the protocol layer (a client certificate that
    /// is not the one pinned to its uid): who it claimed to be, from where, and why.
    pub async fn audit_agent_refused(&self, uid: Uuid, params: Value) -> FleetResult<()> {
        let audit = NewAudit {
            actor: "flotilla".into(),
            channel: Channel::System,
            operation: "agent.refused".into(),
            targets: vec![uid.to_string()],
            params,
            outcome: "refused".into(),
            ref_id: None,
        };
        self.store.append_audit(audit).await?;
        self.audited();
        Ok(())
    }

    pub async fn audit(
        &self,
        caller: &Caller,
        filter: &AuditFilter,
    ) -> FleetResult<Vec<AuditRecord>> {
        Self::require(caller, Role::Viewer, "read the audit trail")?;
        let mut f = filter.clone();
        if f.limit == 0 || f.limit > 1000 {
            f.limit = 100;
        }
        Ok(self.store.query_audit(&f).await?)
    }

    /// The trail in chain order (oldest first), every record with its `prev_hash` and `hash`,
    /// from just after record `after`, at most `limit` (1..=1000): what an archive or an
    /// offline verifier needs. Admin only ([`AdminOnly::AuditExport`]).
    pub async fn export_audit(
        &self,
        caller: &Caller,
        after: i64,
        limit: usize,
    ) -> FleetResult<Vec<AuditRecord>> {
        Self::require_admin(caller, AdminOnly::AuditExport)?;
        if !(1..=1000).contains(&limit) {
            return Err(FleetError::BadRequest(format!(
                "limit {limit} must be between 1 and 1000"
            )));
        }
        Ok(self.store.audit_chain(after.max(0), limit).await?)
    }

    /// Checks the whole audit hash chain ([`crate::audit::verify`]): how many records hold and
    /// the head, or the first record that does not. Reads only.
    pub async fn verify_audit(
        &self,
        caller: &Caller,
    ) -> FleetResult<Result<crate::audit::Verified, crate::audit::ChainBreak>> {
        Self::require(caller, Role::Viewer, "verify the audit trail")?;
        match crate::audit::verify(self.store.as_ref(), None).await {
            Ok(v) => Ok(Ok(v)),
            Err(crate::audit::VerifyError::Broken(b)) => Ok(Err(b)),
            Err(crate::audit::VerifyError::Store(e)) => Err(e.into()),
        }
    }

    // ---- used by the OpAMP side and the sweeper, not by operator adapters ----

    /// Claims the agent's due commands for delivery, in queue order, at most `limit`: first
    /// those already claimed but not yet written ([`Fleet::park`]), otherwise queued ones
    /// (`queued → sent`, each exactly once). Concurrent claims of many agents share one store
    /// transaction ([`Deliveries`]), so a 10k fan-out is a few transactions, not 10k.
    ///
    /// Cancel-safe: if the caller stops waiting (a timeout, a dropped request), whatever the
    /// claim took is parked for the agent and its session woken, never lost and never guessed
    /// back into the queue.
    pub async fn claim_due(&self, agent: Uuid, limit: usize) -> FleetResult<Vec<Command>> {
        let parked = self.deliveries.parked.take_parked(agent, limit);
        if !parked.is_empty() {
            return Ok(parked);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let req = ClaimRequest {
            agent,
            limit,
            reply,
        };
        self.deliveries.claimer(self).send(req).map_err(|_| {
            FleetError::Store(StoreError::Io(std::io::Error::other("claimer stopped")))
        })?;
        // No await between receiving and disarming: the commands are either ours or parked.
        Ok(rx
            .await
            .map_err(|_| {
                FleetError::Store(StoreError::Io(std::io::Error::other("claimer stopped")))
            })??
            .into_commands())
    }

    /// Keeps claimed commands that were not written to their agent (the write failed, the reply
    /// had no room, the store failed half-way) first in line for its next delivery: its next
    /// message, wake-up or poll, on any connection. Never fails and never waits, so it is safe
    /// in `Drop` and after a timeout; what is not picked up within [`PARK_TTL`] goes back to the
    /// queue ([`Fleet::redeliver`]). It wakes no one: the caller knows whether a retry is due.
    pub fn park(&self, cmds: Vec<Command>) {
        self.deliveries.parked.park(cmds);
    }

    /// True if commands claimed for `agent` wait to be written ([`Fleet::park`]).
    pub fn has_parked(&self, agent: Uuid) -> bool {
        self.deliveries.parked.has_parked(agent)
    }

    /// The agent's next due command without claiming it: a parked one, else the oldest queued.
    pub async fn peek_due(&self, agent: Uuid) -> FleetResult<Option<Command>> {
        if let Some(c) = self.deliveries.parked.peek_parked(agent) {
            return Ok(Some(c));
        }
        Ok(self.store.queued_for(agent, 1).await?.pop())
    }

    /// Records a command's outcome (from the agent, or the sweeper) with an audit record that
    /// refers to the one that queued it. Returns `None` if it was no longer in `from`.
    pub async fn settle(
        &self,
        cmd: &Command,
        from: &[CommandStatus],
        finish: Finish,
    ) -> FleetResult<Option<Command>> {
        let actor = match finish.to {
            CommandStatus::Expired => "flotilla".to_string(),
            _ => format!("agent:{}", cmd.agent_uid),
        };
        let audit = NewAudit {
            actor,
            channel: Channel::System,
            operation: "command.result".into(),
            targets: vec![cmd.agent_uid.to_string(), cmd.id.to_string()],
            params: json!({"kind": cmd.kind.as_str(), "error": finish.error}),
            outcome: finish.to.as_str().into(),
            ref_id: cmd.audit_id,
        };
        let at = finish.at;
        let done = self
            .store
            .finish_command(cmd.id, from, finish, Some(audit))
            .await?;
        if let Some(c) = &done {
            self.events.command(c, Some(cmd.status), at);
            self.audited();
        }
        Ok(done)
    }

    /// Delivery upkeep, run with [`Fleet::sweep`]: parked commands nobody picked up within
    /// [`PARK_TTL`] go back to the queue (one transaction; kept parked if it fails), and the
    /// connected agents of commands still queued after [`REDELIVER_AFTER_MS`] are woken again
    /// (a wake-up lost to a busy store or a full channel must not strand them). Returns how many
    /// commands were requeued and how many sessions woken.
    pub async fn redeliver(&self, now: Millis) -> FleetResult<(u64, usize)> {
        let stale = self.deliveries.parked.take_stale(PARK_TTL);
        let mut requeued = 0;
        if !stale.is_empty() {
            let claims: Vec<(Uuid, Millis)> = stale
                .iter()
                .filter_map(|c| c.sent_at.map(|at| (c.id, at)))
                .collect();
            match self.store.unclaim(&claims).await {
                Ok(moved) => {
                    requeued = moved.len() as u64;
                    for mut c in stale.into_iter().filter(|c| moved.contains(&c.id)) {
                        c.status = CommandStatus::Queued;
                        c.sent_at = None;
                        self.events.command(&c, Some(CommandStatus::Sent), now);
                    }
                }
                Err(e) => {
                    self.deliveries.parked.park(stale);
                    return Err(e.into());
                }
            }
        }
        let mut woken = 0;
        for a in self
            .store
            .agents_with_queued(now, now - REDELIVER_AFTER_MS, REDELIVER_MAX_AGENTS)
            .await?
        {
            if self.hub.notify(a) {
                woken += 1;
            }
        }
        Ok((requeued, woken))
    }

    /// Writes this replica's heartbeat and releases the agents of replicas that died (see
    /// [`Store::replica_heartbeat`]); how many were released.
    pub async fn replica_heartbeat(&self, now: Millis) -> FleetResult<usize> {
        let (ws, http) = self.hub.counts();
        let stale = self.settings.replica_stale_ms();
        // A dead replica stays visible (up 0) for a while before it is forgotten.
        let forget = stale.max(600_000);
        let released = self
            .store
            .replica_heartbeat((ws + http) as u64, now, now - stale, now - forget)
            .await?;
        for uid in &released {
            self.events.disconnected_by_replica(*uid, now);
        }
        Ok(released.len())
    }

    /// The replicas sharing the store, as `/metrics` shows them.
    pub async fn replicas(&self) -> FleetResult<Vec<crate::metrics::ReplicaGauges>> {
        let now = now_ms();
        let stale = self.settings.replica_stale_ms();
        Ok(self
            .store
            .replicas()
            .await?
            .into_iter()
            .map(|r| crate::metrics::ReplicaGauges {
                up: r.heartbeat_at >= now - stale,
                heartbeat_age_s: (now - r.heartbeat_at).max(0) as f64 / 1000.0,
                connections: r.connections,
                id: r.id,
            })
            .collect())
    }

    /// Follows the wake-ups of other processes sharing the store ([`Store::wake_feed`]) until
    /// the feed ends: the agents named are woken if connected here; after the feed was cut,
    /// every connected agent with a queued command is (wake-ups sent meanwhile were lost).
    pub async fn follow_wakes(self, mut feed: tokio::sync::mpsc::Receiver<Wakeup>) {
        while let Some(w) = feed.recv().await {
            match w {
                Wakeup::Agents(uids) => {
                    for u in uids {
                        if self.hub.notify(u) {
                            self.metrics.remote_wake();
                        }
                    }
                }
                Wakeup::Resumed => {
                    let now = now_ms();
                    match self
                        .store
                        .agents_with_queued(now, now, REDELIVER_MAX_AGENTS)
                        .await
                    {
                        Ok(agents) => {
                            let woken = agents.into_iter().filter(|a| self.hub.notify(*a)).count();
                            tracing::info!(
                                woken,
                                "wake feed resumed: agents with queued commands woken"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e,
                            "wake feed resumed but the queues could not be read; the delivery sweep will catch up"),
                    }
                }
            }
        }
    }

    /// Expires queued commands past their TTL and sent commands with no result in time.
    pub async fn sweep(&self, now: Millis) -> FleetResult<usize> {
        let sent_before = now - (self.settings.result_timeout_s as i64) * 1000;
        let due = self.store.due_for_expiry(now, sent_before).await?;
        let mut n = 0;
        for c in due {
            let error = match c.status {
                CommandStatus::Queued => {
                    "not delivered before it expired (agent not connected?)".to_string()
                }
                _ => {
                    let agent = self.store.get_agent(c.agent_uid).await?;
                    commands::no_result_reason(&c, agent.as_ref())
                }
            };
            let finish = Finish {
                to: CommandStatus::Expired,
                result: None,
                error: Some(error),
                at: now,
            };
            if self.settle(&c, &[c.status], finish).await?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Claimed commands not written within this long go back to the queue.
pub const PARK_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// A command still queued this long after it was created gets its agent woken again.
pub const REDELIVER_AFTER_MS: Millis = 2000;
/// Agents woken per sweep at most (the rest on the next one).
const REDELIVER_MAX_AGENTS: usize = 20_000;
/// Claim requests answered by one store transaction at most.
const CLAIM_GROUP: usize = 1000;

struct ClaimRequest {
    agent: Uuid,
    limit: usize,
    reply: tokio::sync::oneshot::Sender<FleetResult<Claimed>>,
}

/// Commands a claim took, on their way to the caller. Dropped undelivered (the caller stopped
/// waiting, or went away before reading the answer), they are parked and the agent woken.
struct Claimed {
    cmds: Vec<Command>,
    undo: Option<(Arc<Parked>, Arc<Hub>)>,
}

impl Claimed {
    fn into_commands(mut self) -> Vec<Command> {
        self.undo = None;
        std::mem::take(&mut self.cmds)
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let Some((parked, hub)) = self.undo.take() else {
            return;
        };
        let Some(agent) = self.cmds.first().map(|c| c.agent_uid) else {
            return;
        };
        tracing::debug!(%agent, n = self.cmds.len(),
            "claim answered after its caller left; parked for the next delivery");
        parked.park(std::mem::take(&mut self.cmds));
        hub.notify(agent);
    }
}

/// Delivery state shared by every clone of a [`Fleet`]: the claimer task that groups concurrent
/// claims into one transaction, and the commands parked between their claim and their write.
#[derive(Default)]
struct Deliveries {
    claimer: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<ClaimRequest>>,
    parked: Arc<Parked>,
}

impl Deliveries {
    /// The claimer's queue, started on first use (a runtime is running by then).
    fn claimer(&self, fleet: &Fleet) -> &tokio::sync::mpsc::UnboundedSender<ClaimRequest> {
        self.claimer.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // The task holds no sender, so it ends with the last Fleet clone.
            let parts = Claimer {
                store: fleet.store.clone(),
                hub: fleet.hub.clone(),
                metrics: fleet.metrics.clone(),
                events: fleet.events.clone(),
                parked: self.parked.clone(),
                audit_wake: fleet.audit_wake.clone(),
                max_wait_ms: longest_wait_ms(&fleet.settings),
            };
            tokio::spawn(run_claimer(parts, rx));
            tx
        })
    }
}

/// Claimed (`sent`) but unwritten commands, by agent, oldest first, with when they were parked.
#[derive(Default)]
struct Parked {
    map: std::sync::Mutex<std::collections::HashMap<Uuid, Vec<(Command, std::time::Instant)>>>,
}

impl Parked {
    fn lock_parked(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<Uuid, Vec<(Command, std::time::Instant)>>,
    > {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn park(&self, cmds: Vec<Command>) {
        if cmds.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut map = self.lock_parked();
        for c in cmds {
            let v = map.entry(c.agent_uid).or_default();
            v.push((c, now));
            v.sort_by_key(|(c, _)| c.id);
        }
    }

    fn take_parked(&self, agent: Uuid, limit: usize) -> Vec<Command> {
        let mut map = self.lock_parked();
        let Some(v) = map.get_mut(&agent) else {
            return Vec::new();
        };
        let n = limit.min(v.len());
        let out: Vec<Command> = v.drain(..n).map(|(c, _)| c).collect();
        if v.is_empty() {
            map.remove(&agent);
        }
        out
    }

    fn has_parked(&self, agent: Uuid) -> bool {
        self.lock_parked().contains_key(&agent)
    }

    fn peek_parked(&self, agent: Uuid) -> Option<Command> {
        self.lock_parked()
            .get(&agent)
            .and_then(|v| v.first())
            .map(|(c, _)| c.clone())
    }

    fn take_stale(&self, ttl: std::time::Duration) -> Vec<Command> {
        let mut out = Vec::new();
        let mut map = self.lock_parked();
        map.retain(|_, v| {
            v.retain(|(c, at)| {
                let stale = at.elapsed() >= ttl;
                if stale {
                    out.push(c.clone());
                }
                !stale
            });
            !v.is_empty()
        });
        out
    }
}

/// Answers claim requests, as many as are waiting (up to [`CLAIM_GROUP`]) per store
/// transaction. An answer nobody waits for any more is parked and the agent's session woken.
/// What the claimer task needs of a [`Fleet`] (not the Fleet itself, whose claimer sender would
/// keep the task alive forever).
struct Claimer {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
    parked: Arc<Parked>,
    audit_wake: Arc<tokio::sync::Notify>,
    /// How long a command can legitimately wait in the queue (the longest TTL).
    max_wait_ms: Millis,
}

/// The longest a queued command can wait: the default TTL or the largest per-command one.
fn longest_wait_ms(s: &FleetSettings) -> Millis {
    (s.queue_ttl_s.max(commands::MAX_TTL_S) as Millis) * 1000
}

impl Claimer {
    /// Keeps the claimed commands that are what their queuing audit record queued; fails the
    /// others (`failed`, with an audit record and an ERROR line) so that nothing edited in the
    /// commands table after it was audited reaches an agent. Commands queued before digests
    /// existed are delivered while they could legitimately still be waiting.
    async fn only_audited(&self, cmds: Vec<Command>, now: Millis) -> Vec<Command> {
        if cmds.is_empty() {
            return cmds;
        }
        let checked = match crate::audit::check_commands(self.store.as_ref(), &cmds).await {
            Ok(c) => c,
            Err(e) => {
                // Unchecked commands are never delivered: back to the queue (compare-and-set),
                // or, if that fails too, left `sent` for the sweeper to expire.
                tracing::error!(error = %e, n = cmds.len(),
                    "could not read the audit records of claimed commands; not delivered now");
                let claims: Vec<(Uuid, Millis)> = cmds
                    .iter()
                    .filter_map(|c| c.sent_at.map(|at| (c.id, at)))
                    .collect();
                if let Err(e) = self.store.unclaim(&claims).await {
                    tracing::error!(error = %e, "could not requeue them either; they will expire");
                }
                return Vec::new();
            }
        };
        let mut ok = Vec::with_capacity(cmds.len());
        for (c, p) in cmds.into_iter().zip(checked) {
            let why = match p {
                crate::audit::Provenance::Verified => {
                    ok.push(c);
                    continue;
                }
                crate::audit::Provenance::Legacy
                    if crate::audit::legacy_still_deliverable(
                        c.created_at,
                        now,
                        self.max_wait_ms,
                    ) =>
                {
                    tracing::debug!(command = %c.id, "delivered unverified: queued before parameter digests");
                    ok.push(c);
                    continue;
                }
                crate::audit::Provenance::Legacy => format!(
                    "{}: its queuing record has no digest and is older than any command may wait",
                    crate::audit::MISMATCH
                ),
                crate::audit::Provenance::Mismatch(w) => w,
                crate::audit::Provenance::OtherAgent => crate::audit::MISMATCH.to_string(),
            };
            self.refuse(&c, why, now).await;
        }
        ok
    }

    async fn refuse(&self, c: &Command, why: String, now: Millis) {
        tracing::error!(command = %c.id, agent = %c.agent_uid, kind = c.kind.as_str(),
            audit_id = ?c.audit_id, reason = %why, "command not delivered: it is not what was audited");
        let audit = NewAudit {
            actor: "flotilla".into(),
            channel: Channel::System,
            operation: "command.refused".into(),
            targets: vec![c.agent_uid.to_string(), c.id.to_string()],
            params: json!({"kind": c.kind.as_str(), "error": why}),
            outcome: CommandStatus::Failed.as_str().into(),
            ref_id: c.audit_id,
        };
        let finish = Finish {
            to: CommandStatus::Failed,
            result: None,
            error: Some(why),
            at: now,
        };
        match self
            .store
            .finish_command(c.id, &[CommandStatus::Sent], finish, Some(audit))
            .await
        {
            Ok(Some(done)) => {
                self.events.command(&done, Some(CommandStatus::Sent), now);
                self.audit_wake.notify_one();
            }
            Ok(None) => {}
            // Still `sent` and never written: the sweeper expires it.
            Err(e) => {
                tracing::error!(error = %e, command = %c.id, "could not mark the refused command failed")
            }
        }
    }
}

async fn run_claimer(parts: Claimer, mut rx: tokio::sync::mpsc::UnboundedReceiver<ClaimRequest>) {
    let Claimer {
        store,
        hub,
        metrics,
        events,
        parked,
        ..
    } = &parts;
    while let Some(first) = rx.recv().await {
        let mut reqs = vec![first];
        while reqs.len() < CLAIM_GROUP {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let mut by_limit: BTreeMap<usize, Vec<ClaimRequest>> = BTreeMap::new();
        for r in reqs {
            by_limit.entry(r.limit).or_default().push(r);
        }
        for (limit, group) in by_limit {
            let agents: Vec<Uuid> = group.iter().map(|r| r.agent).collect();
            let now = now_ms();
            match store.claim_queued(&agents, limit, now).await {
                Ok(cmds) => {
                    for c in &cmds {
                        metrics
                            .delivery_latency
                            .observe(((now - c.created_at).max(0) as f64) / 1000.0);
                        events.command(c, Some(CommandStatus::Queued), now);
                    }
                    let mut by_agent: std::collections::HashMap<Uuid, Vec<Command>> =
                        std::collections::HashMap::new();
                    for c in parts.only_audited(cmds, now).await {
                        by_agent.entry(c.agent_uid).or_default().push(c);
                    }
                    for r in group {
                        let claimed = Claimed {
                            cmds: by_agent.remove(&r.agent).unwrap_or_default(),
                            undo: Some((parked.clone(), hub.clone())),
                        };
                        // A caller that left drops the answer, which parks it.
                        let _ = r.reply.send(Ok(claimed));
                    }
                }
                Err(e) => {
                    // The transaction did not commit: nothing was claimed.
                    let why = e.to_string();
                    for r in group {
                        let _ = r.reply.send(Err(FleetError::Store(StoreError::Io(
                            std::io::Error::other(why.clone()),
                        ))));
                    }
                }
            }
        }
    }
}

/// Parameters as recorded in the audit trail: config bodies are replaced by their size, so the
/// trail stays small and never copies secrets that configs may hold.
fn redact(params: &Value) -> Value {
    let mut p = params.clone();
    if let Some(files) = p.get_mut("files").and_then(Value::as_object_mut) {
        for f in files.values_mut() {
            if let Some(body) = f.get("body").and_then(Value::as_str) {
                let len = body.len();
                f["body"] = json!(format!("<{len} bytes>"));
            }
        }
    }
    p
}

//! [`Core`]: one incoming chat message or button → identity and allow-list → plan → a read
//! answered at once, or a state-changing call previewed from the service's own dry-run plan
//! with Confirm/Cancel; a confirm queues with the plan's expected targets (a changed set is
//! refused, not widened) and follows the command or batch to a final summary through
//! [`Outbox::update`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_mcp::{BackendError, ExpectedTargets, FleetBackend, QueueTarget};
use rand::RngCore;
use serde_json::{json, Value};

use super::alerts;
use super::identity::{role_needed, IdentityConfig};
use super::planner::llm::{self, End, LlmPlanner};
use super::planner::{rules, Local, Plan, ThreadContext};
use super::state::{ChatState, PendingConfirmation};
use super::tools;
use super::types::{
    actor, BackendFor, Block, Button, ChatUser, ConversationRef, Incoming, IncomingKind,
    MessageRef, Outbox, Reply, Role, Style,
};

/// Button action ids (the value is the confirmation id).
pub const ACTION_CONFIRM: &str = "flotilla_confirm";
pub const ACTION_CANCEL: &str = "flotilla_cancel";

/// Default life of a confirmation.
pub const DEFAULT_CONFIRM_TTL: Duration = Duration::from_secs(300);
/// Hosts named in a preview.
const PREVIEW_HOSTS: usize = 5;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub confirm_ttl: Duration,
    /// How often live progress re-reads the command or batch.
    pub progress_every: Duration,
    /// When live progress stops following (the final summary says so).
    pub progress_for: Duration,
    /// A thread unused this long is forgotten, with a polite sign-off.
    pub idle_after: Duration,
    /// The optional LLM planner, asked only when the rule planner asks back.
    pub llm: Option<Arc<LlmPlanner>>,
    /// Whether fleet events reach an alert engine. Off in a standalone `flotilla chat`, which
    /// has no event feed over REST: `subscribe` then says so instead of storing a
    /// subscription that would never fire.
    pub alerts: bool,
    /// The gateway token's name when tool calls reach a server as that token acting for the
    /// chat user (a standalone `flotilla chat`): the server audits them as `<name> for
    /// <chat identity>`, so "my last command" must look for that actor, not the bare identity.
    pub acting_as: Option<String>,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            confirm_ttl: DEFAULT_CONFIRM_TTL,
            progress_every: Duration::from_secs(2),
            progress_for: Duration::from_secs(600),
            idle_after: Duration::from_secs(30 * 60),
            llm: None,
            alerts: true,
            acting_as: None,
        }
    }
}

/// What handles a conversation turn for a platform adapter: the [`Core`] in the server, a
/// recorder in tests. Returns the immediate replies; follow-ups go through `outbox`.
#[async_trait::async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, incoming: Incoming, outbox: Arc<dyn Outbox>) -> Vec<Reply>;
}

/// The conversation core is what the server's gateways run.
#[async_trait::async_trait]
impl Handler for Core {
    async fn handle(&self, incoming: Incoming, outbox: Arc<dyn Outbox>) -> Vec<Reply> {
        Core::handle(self, incoming, outbox).await
    }
}

/// The conversation core shared by every platform adapter.
pub struct Core {
    identity: IdentityConfig,
    backend_for: BackendFor,
    state: Arc<dyn ChatState>,
    options: CoreOptions,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The key of a thread's state.
pub fn thread_key(c: &ConversationRef) -> String {
    format!(
        "{}/{}/{}/{}",
        c.platform,
        c.workspace,
        c.channel,
        c.thread.as_deref().unwrap_or("-")
    )
}

fn private(text: impl Into<String>) -> Vec<Reply> {
    vec![Reply::text(text).private()]
}

impl Core {
    pub fn new(
        identity: IdentityConfig,
        backend_for: BackendFor,
        state: Arc<dyn ChatState>,
        options: CoreOptions,
    ) -> Core {
        Core {
            identity,
            backend_for,
            state,
            options,
        }
    }

    /// Answers one delivery. The replies are for the adapter to send now; live progress
    /// follows through `outbox`.
    pub async fn handle(&self, incoming: Incoming, outbox: Arc<dyn Outbox>) -> Vec<Reply> {
        let Incoming {
            conversation,
            user,
            kind,
            delivery_id,
        } = incoming;
        if let Some(id) = &delivery_id {
            match self.state.first_delivery(id, now_ms()).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(delivery = %id, "chat: a platform retry of a handled delivery; ignored");
                    return Vec::new();
                }
                Err(e) => return private(format!("Flotilla could not record this request: {e}")),
            }
        }
        let role = match self.identity.role_of(&user, &conversation) {
            Ok(r) => r,
            Err(denied) => {
                tracing::info!(user = %user.id, channel = %conversation.channel, reason = %denied, "chat: refused");
                return private(denied.to_string());
            }
        };
        match kind {
            IncomingKind::Command { text }
            | IncomingKind::Mention { text }
            | IncomingKind::Direct { text } => {
                self.message(&conversation, &user, role, &text).await
            }
            IncomingKind::Action {
                action_id,
                value,
                message,
            } => {
                self.action(
                    &conversation,
                    &user,
                    role,
                    &action_id,
                    &value,
                    message,
                    outbox,
                )
                .await
            }
        }
    }

    /// Housekeeping, run periodically by the embedder: drops expired confirmations, and
    /// forgets threads idle for [`CoreOptions::idle_after`] with a sign-off in each. Returns
    /// how many threads were signed off.
    pub async fn sweep(&self, outbox: &dyn Outbox) -> usize {
        let now = now_ms();
        if let Err(e) = self.state.expire_confirmations(now).await {
            tracing::warn!(error = %e, "chat: expiring confirmations failed");
        }
        let before = now - self.options.idle_after.as_millis() as i64;
        let idle = match self.state.take_idle_threads(before).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "chat: idle threads not read");
                return 0;
            }
        };
        let bye = Reply::text(
            "I'm signing off this thread after a quiet spell; \"them\" and \"it\" start afresh. \
             Mention me or use /flotilla to pick up again.",
        );
        let mut n = 0;
        for (_, t) in idle {
            if let Some(c) = t.conversation {
                if outbox.post(&c, &bye).await.is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Tells every remembered thread the gateway is going away (on server shutdown); the
    /// threads' state and pending confirmations stay in the store for after the restart.
    pub async fn shutdown_notice(&self, outbox: &dyn Outbox) -> usize {
        // Every thread was used before the end of time: take them all, then put them back.
        let threads = match self.state.take_idle_threads(i64::MAX).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "chat: threads not read at shutdown");
                return 0;
            }
        };
        let note = Reply::text(
            "Flotilla is going to bed (server shutdown). Pending confirmations are kept; \
             anything queued keeps running on the agents.",
        );
        let mut n = 0;
        for (key, t) in threads {
            if let Some(c) = &t.conversation {
                if outbox.post(c, &note).await.is_ok() {
                    n += 1;
                }
            }
            if let Err(e) = self.state.put_thread(&key, &t).await {
                tracing::warn!(error = %e, "chat: thread state not kept at shutdown");
            }
        }
        n
    }

    fn backend(
        &self,
        user: &ChatUser,
        conv: &ConversationRef,
        role: Role,
    ) -> Arc<dyn FleetBackend> {
        (self.backend_for)(user, conv, role)
    }

    async fn context(&self, conv: &ConversationRef) -> ThreadContext {
        match self.state.get_thread(&thread_key(conv)).await {
            Ok(Some(s)) => s.context,
            _ => ThreadContext::default(),
        }
    }

    async fn remember(&self, conv: &ConversationRef, update: impl FnOnce(&mut ThreadContext)) {
        let key = thread_key(conv);
        let mut s = self
            .state
            .get_thread(&key)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        update(&mut s.context);
        s.last_used_ms = now_ms();
        s.conversation = Some(conv.clone());
        if let Err(e) = self.state.put_thread(&key, &s).await {
            tracing::warn!(error = %e, "chat: thread state not saved");
        }
    }

    async fn message(
        &self,
        conv: &ConversationRef,
        user: &ChatUser,
        role: Role,
        text: &str,
    ) -> Vec<Reply> {
        let ctx = self.context(conv).await;
        let me = match &self.options.acting_as {
            Some(token) => format!("{token} for {}", actor(user, conv)),
            None => actor(user, conv),
        };
        let mut plan = rules::plan(text, &ctx, &me);
        // Rules first; the model only for what they ask back about.
        let mut fell_back = None;
        if let (Plan::AskBack { .. }, Some(llm)) = (&plan, self.options.llm.clone()) {
            match self.ask_llm(&llm, conv, user, role, text, &ctx).await {
                Ok(Ok(replies)) => return replies,
                Ok(Err(change)) => plan = change,
                Err(note) => fell_back = Some(note),
            }
        }
        let mut replies = match plan {
            Plan::AskBack {
                understood,
                suggestions,
            } => vec![suggest(
                &format!("I understood {understood}."),
                &suggestions,
            )],
            Plan::Refuse {
                reason,
                suggestions,
            } => vec![suggest(
                &format!("I won't do that: {reason}."),
                &suggestions,
            )],
            Plan::Local(Local::Help) => vec![help()],
            Plan::Local(Local::Subscribe { .. }) if !self.options.alerts => {
                return private(
                    "Alerts are not available from this gateway: it runs as its own process \
                     (`flotilla chat`) and receives no fleet events over the REST API. \
                     Subscribe through a gateway run inside `flotilla serve`.",
                );
            }
            Plan::Local(Local::Subscribe { query, events }) => {
                let b = self.backend(user, conv, role);
                alerts::subscribe(&*self.state, &*b, conv, user, role, &query, &events).await
            }
            Plan::Local(Local::Subscriptions) => alerts::list(&*self.state, conv).await,
            Plan::Local(Local::Unsubscribe { id }) => {
                alerts::unsubscribe(&*self.state, conv, user, role, &id).await
            }
            Plan::Tool { tool, args } => {
                let needed = role_needed(&tool);
                if role < needed {
                    return private(format!(
                        "That needs the *{needed}* role; you have *{role}*. Nothing was done."
                    ));
                }
                let b = self.backend(user, conv, role);
                if matches!(tool.as_str(), "command_queue" | "remote_config_push") {
                    return self.preview(conv, user, &*b, &tool, args).await;
                }
                match tools::run(&*b, &tool, &args).await {
                    Ok(v) => {
                        self.remember_result(conv, &tool, &args, &v).await;
                        vec![render(&tool, &v)]
                    }
                    Err(e) => vec![failure(&e)],
                }
            }
        };
        if let (Some(note), Some(first)) = (fell_back, replies.first_mut()) {
            first.blocks.push(Block::Context(note));
        }
        replies
    }

    /// The LLM planner's turn: its answer (`Ok(Ok)`), a state-changing plan for the same
    /// preview and confirmation as the rule planner's (`Ok(Err)`), or why it failed, for a
    /// note under the rule planner's answer (`Err`).
    #[allow(clippy::type_complexity)]
    async fn ask_llm(
        &self,
        llm: &LlmPlanner,
        conv: &ConversationRef,
        user: &ChatUser,
        role: Role,
        text: &str,
        ctx: &ThreadContext,
    ) -> Result<Result<Vec<Reply>, Plan>, String> {
        let b = self.backend(user, conv, role);
        let out = match llm.plan(text, conv.platform.as_str(), ctx, &*b).await {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(reason = %e, "chat: LLM planner failed; the rule planner answers");
                return Err(format!(
                    "The language model could not help ({e}); this is the rule planner's answer."
                ));
            }
        };
        for r in &out.runs {
            if let Ok(v) = &r.result {
                self.remember_result(conv, &r.tool, &r.args, v).await;
            }
        }
        match out.end {
            End::Change(plan) => Ok(Err(plan)),
            _ => Ok(Ok(vec![llm::reply(&out, &llm.config().model, render)])),
        }
    }

    /// What "them" and "it" mean next: the agents a search or lookup showed.
    async fn remember_result(&self, conv: &ConversationRef, tool: &str, args: &Value, v: &Value) {
        match tool {
            "agents_search" => {
                let uids: Vec<String> = v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["uid"].as_str().map(str::to_string))
                    .collect();
                let q = args["query"].as_str().unwrap_or("").to_string();
                self.remember(conv, |c| {
                    c.last_query = Some(q);
                    c.last_agents = uids;
                })
                .await
            }
            "agent_get" => {
                if let Some(uid) = v["uid"].as_str() {
                    let uid = uid.to_string();
                    self.remember(conv, |c| {
                        c.last_query = Some(format!("uid:{uid}"));
                        c.last_agents = vec![uid];
                    })
                    .await
                }
            }
            _ => self.remember(conv, |_| {}).await,
        }
    }

    /// The service's dry-run plan of a state-changing call, shown with Confirm/Cancel.
    async fn preview(
        &self,
        conv: &ConversationRef,
        user: &ChatUser,
        b: &dyn FleetBackend,
        tool: &str,
        mut args: Value,
    ) -> Vec<Reply> {
        let (kind, params) = match tool {
            "remote_config_push" => (
                "remote_config".to_string(),
                json!({"files": args["files"].clone()}),
            ),
            _ => (
                args["kind"].as_str().unwrap_or("").to_string(),
                args.get("params").cloned().unwrap_or(Value::Null),
            ),
        };
        let target = match (args["agent"].as_str(), args["query"].as_str()) {
            (Some(a), None) => match b.resolve_agent(a).await {
                // Bound to the uid, so a host name that comes to mean another agent cannot
                // redirect the confirmed call.
                Ok(uid) => {
                    args["agent"] = json!(uid);
                    QueueTarget::Agent(uid)
                }
                Err(e) => return vec![failure(&e)],
            },
            (None, Some(q)) => QueueTarget::Query(q.to_string()),
            _ => {
                return vec![Reply::text(
                    "A command needs exactly one agent or one query.",
                )]
            }
        };
        let plan = match b.plan(&target, &kind, &params).await {
            Ok(p) => p,
            Err(e) => return vec![failure(&e)],
        };
        let count = plan["target_count"].as_u64().unwrap_or(0);
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let pending = PendingConfirmation {
            id: hex::encode(id),
            requester: user.clone(),
            conversation: conv.clone(),
            tool: tool.to_string(),
            args,
            expect_targets: plan["expect_targets"].clone(),
            target_count: count,
            expires_at_ms: now_ms() + self.options.confirm_ttl.as_millis() as i64,
        };
        if let Err(e) = self.state.put_confirmation(&pending).await {
            return private(format!("Flotilla could not keep the confirmation: {e}"));
        }
        let hosts: Vec<String> = plan["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .take(PREVIEW_HOSTS)
            .map(label)
            .collect();
        let skipped: Vec<String> = plan["skipped"]
            .as_array()
            .into_iter()
            .flatten()
            .take(PREVIEW_HOSTS)
            .map(|s| {
                format!(
                    "{} ({})",
                    label(s),
                    s["reason"].as_str().unwrap_or("cannot run it")
                )
            })
            .collect();
        let mut fields = vec![
            ("Command".to_string(), format!("`{kind}`")),
            ("Agents".to_string(), count.to_string()),
        ];
        if let QueueTarget::Query(q) = &target {
            fields.push(("Query".into(), format!("`{q}`")));
        }
        let more = count.saturating_sub(hosts.len() as u64);
        fields.push((
            "First hosts".into(),
            if more > 0 {
                format!("{} and {more} more", hosts.join(", "))
            } else {
                hosts.join(", ")
            },
        ));
        let skipped_count = plan["skipped_count"].as_u64().unwrap_or(0);
        if skipped_count > 0 {
            fields.push((
                "Skipped".into(),
                format!("{skipped_count}: {}", skipped.join(", ")),
            ));
        }
        let mut reply = Reply::text(format!(
            "*Confirm `{kind}` on {count} agent{}?* Nothing is queued until you confirm.",
            if count == 1 { "" } else { "s" }
        ))
        .push(Block::Fields(fields))
        .push(Block::Buttons(vec![
            Button {
                action_id: ACTION_CONFIRM.into(),
                label: "Confirm".into(),
                value: pending.id.clone(),
                style: Style::Danger,
            },
            Button {
                action_id: ACTION_CANCEL.into(),
                label: "Cancel".into(),
                value: pending.id.clone(),
                style: Style::Default,
            },
        ]));
        let expires = expires_in(self.options.confirm_ttl);
        let mut note = format!("Expires in {expires}; only {} can confirm", user.name);
        if let Some(n) = self.identity.two_person_above(conv).filter(|n| count > *n) {
            note = format!(
                "Expires in {expires}; fan-outs above {n} agents here need another operator to confirm"
            );
        }
        reply = reply.push(Block::Context(note));
        vec![reply]
    }

    #[allow(clippy::too_many_arguments)]
    async fn action(
        &self,
        conv: &ConversationRef,
        user: &ChatUser,
        role: Role,
        action_id: &str,
        value: &str,
        message: Option<MessageRef>,
        outbox: Arc<dyn Outbox>,
    ) -> Vec<Reply> {
        match action_id {
            ACTION_CONFIRM | ACTION_CANCEL => {}
            alerts::ACTION_RESTART => {
                if role < Role::Operator {
                    return private(format!(
                        "Restarting needs the *operator* role; you have *{role}*. Nothing was done."
                    ));
                }
                // Through the usual preview and confirmation, never at once.
                let b = self.backend(user, conv, role);
                let args = json!({"agent": value, "kind": "restart"});
                return self.preview(conv, user, &*b, "command_queue", args).await;
            }
            alerts::ACTION_HEALTH => {
                return alerts::show_health(&*self.backend(user, conv, role), value).await
            }
            alerts::ACTION_MUTE => {
                let mute_for = alerts::AlertOptions::default().mute_for;
                return alerts::mute(&*self.state, user, role, value, mute_for).await;
            }
            _ => return private(format!("Unknown button {action_id:?}.")),
        }
        let pending = match self.state.take_confirmation(value).await {
            Ok(Some(p)) => p,
            Ok(None) => return private(
                "This confirmation was already used, cancelled or has expired. Nothing was queued.",
            ),
            Err(e) => return private(format!("Flotilla could not read the confirmation: {e}")),
        };
        if pending.expires_at_ms <= now_ms() {
            return private(
                "This confirmation has expired. Nothing was queued; ask again for a fresh preview.",
            );
        }
        let two_person = self
            .identity
            .two_person_above(&pending.conversation)
            .filter(|n| pending.target_count > *n);
        let is_requester = user.id == pending.requester.id;
        let refusal = if action_id == ACTION_CANCEL {
            (!is_requester && role < Role::Operator)
                .then(|| "Only the requester or an operator can cancel this.".to_string())
        } else if let Some(n) = two_person {
            if is_requester {
                Some(format!("A fan-out above {n} agents in this channel needs a different operator to confirm."))
            } else if role < Role::Operator {
                Some(format!(
                    "Confirming needs the *operator* role; you have *{role}*."
                ))
            } else {
                None
            }
        } else if !is_requester {
            Some(format!("Only {} can confirm this.", pending.requester.name))
        } else {
            None
        };
        if let Some(r) = refusal {
            // Not spent by someone who may not use it: the requester can still confirm.
            if let Err(e) = self.state.put_confirmation(&pending).await {
                tracing::warn!(error = %e, "chat: confirmation not restored");
            }
            return private(r);
        }
        if action_id == ACTION_CANCEL {
            let r = Reply::text(format!("Cancelled by {}. Nothing was queued.", user.name));
            return vec![match message {
                Some(m) => r.replacing(m),
                None => r,
            }];
        }
        let b = self.backend(user, conv, role);
        match queue_confirmed(&*b, &pending).await {
            Ok(out) => {
                let command = out["command_id"].as_str().map(str::to_string);
                let batch = out["batch_id"].as_str().map(str::to_string);
                let (c2, b2) = (command.clone(), batch.clone());
                self.remember(&pending.conversation, |c| {
                    c.last_command = c2;
                    c.last_batch = b2;
                })
                .await;
                let first = Reply::text(format!(
                    "Queued by {} for {} agent{}.",
                    user.name,
                    pending.target_count,
                    if pending.target_count == 1 { "" } else { "s" }
                ))
                .push(Block::Progress {
                    total: pending.target_count,
                    queued: pending.target_count,
                    sent: 0,
                    succeeded: 0,
                    failed: 0,
                    done: false,
                });
                // Progress lands on the preview message when the platform said which it was,
                // else on a message of its own.
                let target_msg = match message {
                    Some(m) => Some(m),
                    None => outbox.post(conv, &first).await.ok(),
                };
                if let Some(m) = target_msg.clone() {
                    let opts = self.options.clone();
                    let name = user.name.clone();
                    tokio::spawn(follow(b, command, batch, m, outbox, opts, name));
                }
                vec![match target_msg {
                    Some(m) => first.replacing(m),
                    None => first,
                }]
            }
            Err(e) => vec![failure(&e)],
        }
    }
}

/// A confirmation's life as the preview states it: minutes, or seconds when shorter.
fn expires_in(ttl: Duration) -> String {
    match ttl.as_secs() {
        s if s < 60 => format!("{s} s"),
        s => format!("{} min", s.div_ceil(60)),
    }
}

async fn queue_confirmed(
    b: &dyn FleetBackend,
    p: &PendingConfirmation,
) -> Result<Value, BackendError> {
    let expect: ExpectedTargets = serde_json::from_value(p.expect_targets.clone())
        .map_err(|e| BackendError::new("internal", format!("confirmation without targets: {e}")))?;
    let target = match (p.args["agent"].as_str(), p.args["query"].as_str()) {
        (Some(a), _) => QueueTarget::Agent(a.to_string()),
        (None, Some(q)) => QueueTarget::Query(q.to_string()),
        _ => {
            return Err(BackendError::new(
                "internal",
                "confirmation without a target",
            ))
        }
    };
    let (kind, params) = if p.tool == "remote_config_push" {
        ("remote_config", json!({"files": p.args["files"].clone()}))
    } else {
        (
            p.args["kind"].as_str().unwrap_or(""),
            p.args.get("params").cloned().unwrap_or(Value::Null),
        )
    };
    b.queue(&target, kind, &params, Some(&expect)).await
}

/// Terminal command states.
fn is_final(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "expired" | "cancelled")
}

/// Follows a queued command or batch, updating `msg` until every command is final.
async fn follow(
    b: Arc<dyn FleetBackend>,
    command: Option<String>,
    batch: Option<String>,
    msg: MessageRef,
    outbox: Arc<dyn Outbox>,
    opts: CoreOptions,
    who: String,
) {
    let deadline = tokio::time::Instant::now() + opts.progress_for;
    let mut last: Option<Reply> = None;
    loop {
        tokio::time::sleep(opts.progress_every).await;
        let reply = match (&command, &batch) {
            (Some(id), _) => b.command(id).await.map(|c| command_reply(&c, &who)),
            (None, Some(id)) => b.batch(id).await.map(|v| batch_reply(&v, &who)),
            _ => return,
        };
        let Ok((reply, done)) = reply else { continue };
        let reply = reply.replacing(msg.clone());
        if last.as_ref() != Some(&reply) {
            if let Err(e) = outbox.update(&msg, &reply).await {
                tracing::warn!(error = %e, "chat: progress update failed");
            }
            last = Some(reply);
        }
        if done {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = outbox
                .update(
                    &msg,
                    &Reply::text(
                        "Stopped following this command; ask `status last` for its state.",
                    ),
                )
                .await;
            return;
        }
    }
}

fn count_of(counts: &Value, k: &str) -> u64 {
    counts[k].as_u64().unwrap_or(0)
}

fn command_reply(c: &Value, who: &str) -> (Reply, bool) {
    let status = c["status"].as_str().unwrap_or("?");
    let done = is_final(status);
    let n = |s: &str| u64::from(status == s);
    let mut r = Reply::text(format!(
        "`{}` queued by {who}: *{status}*",
        c["kind"].as_str().unwrap_or("command")
    ))
    .push(Block::Progress {
        total: 1,
        queued: n("queued"),
        sent: n("sent"),
        succeeded: n("succeeded"),
        failed: u64::from(matches!(status, "failed" | "expired" | "cancelled")),
        done,
    });
    if let Some(e) = c["error"].as_str() {
        r = r.push(Block::Context(format!("error: {e}")));
    }
    (r, done)
}

fn batch_reply(v: &Value, who: &str) -> (Reply, bool) {
    let counts = &v["counts"];
    let commands = v["commands"].as_array().cloned().unwrap_or_default();
    let total = commands.len() as u64;
    let failed =
        count_of(counts, "failed") + count_of(counts, "expired") + count_of(counts, "cancelled");
    let succeeded = count_of(counts, "succeeded");
    let done = total > 0 && succeeded + failed >= total;
    let mut r = Reply::text(format!(
        "`{}` on {total} agents, queued by {who}{}",
        v["batch"]["kind"].as_str().unwrap_or("command"),
        if done { ": finished" } else { "" }
    ))
    .push(Block::Progress {
        total,
        queued: count_of(counts, "queued"),
        sent: count_of(counts, "sent"),
        succeeded,
        failed,
        done,
    });
    if done && failed > 0 {
        let rows: Vec<Vec<String>> = commands
            .iter()
            .filter(|c| c["status"].as_str().is_some_and(|s| s != "succeeded"))
            .map(|c| {
                vec![
                    c["agent_uid"].as_str().unwrap_or("?").to_string(),
                    c["status"].as_str().unwrap_or("?").to_string(),
                    c["error"].as_str().unwrap_or("").to_string(),
                ]
            })
            .collect();
        let more = rows.len().saturating_sub(tools::LIST_LIMIT);
        r = r.push(Block::Table {
            columns: vec!["agent".into(), "status".into(), "error".into()],
            rows: rows.into_iter().take(tools::LIST_LIMIT).collect(),
            more,
        });
    }
    (r, done)
}

/// A row's best name: host, service name, uid.
fn label(row: &Value) -> String {
    for k in ["host", "host.name", "name", "service.name", "uid"] {
        if let Some(s) = row[k].as_str().filter(|s| !s.is_empty()) {
            return s.to_string();
        }
    }
    row["uid"].to_string()
}

fn suggest(text: &str, suggestions: &[String]) -> Reply {
    Reply::text(text.to_string()).push(Block::Context(format!(
        "Try: {}",
        suggestions
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

fn failure(e: &BackendError) -> Reply {
    Reply::text(format!(
        "Flotilla refused: {} (`{}`). Nothing was changed.",
        e.message, e.code
    ))
    .private()
}

fn help() -> Reply {
    Reply::text("*Flotilla* — ask in words or use a command:").push(Block::Fields(vec![
        (
            "agents <query>".into(),
            "find agents (`type:fluentd health:unhealthy label:env=prod`)".into(),
        ),
        ("summary".into(), "fleet counts".into()),
        ("agent <host|uid>".into(), "one agent".into()),
        (
            "restart|shutdown|resync <query|host>".into(),
            "previewed, then confirmed".into(),
        ),
        (
            "chatops <query> tag=… k=v".into(),
            "a ChatOps command".into(),
        ),
        ("config <host>".into(), "an agent's config".into()),
        (
            "status <command>|last".into(),
            "a command's progress".into(),
        ),
        ("audit [agent] [actor=…]".into(), "the audit trail".into()),
        (
            "subscribe <query> [events]".into(),
            "fleet alerts in this channel (unhealthy, offline, recovered, command_failed, config_failed)".into(),
        ),
        (
            "subscriptions · unsubscribe <id>".into(),
            "this channel's alert subscriptions".into(),
        ),
    ]))
}

/// A tool's answer as a chat reply.
fn render(tool: &str, v: &Value) -> Reply {
    match tool {
        "agents_search" => {
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        label(r),
                        r["type"].as_str().unwrap_or("").to_string(),
                        r["state"].as_str().unwrap_or("").to_string(),
                        r["health"]
                            .as_str()
                            .map(str::to_string)
                            .or_else(|| {
                                r["healthy"]
                                    .as_bool()
                                    .map(|h| if h { "healthy" } else { "unhealthy" }.to_string())
                            })
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            let total = v["total"].as_u64().unwrap_or(rows.len() as u64);
            Reply::text(format!(
                "*{total}* agent{} found",
                if total == 1 { "" } else { "s" }
            ))
            .push(Block::Table {
                columns: vec![
                    "agent".into(),
                    "type".into(),
                    "state".into(),
                    "health".into(),
                ],
                more: (total as usize).saturating_sub(rows.len()),
                rows,
            })
        }
        "fleet_summary" => {
            let mut fields = vec![("Total".to_string(), v["total"].to_string())];
            for k in ["by_state", "by_health", "by_type"] {
                if let Some(m) = v[k].as_object() {
                    let s: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
                    fields.push((k.trim_start_matches("by_").to_string(), s.join(", ")));
                }
            }
            Reply::text("*Fleet summary*").push(Block::Fields(fields))
        }
        "command_status" if v.get("counts").is_some() => batch_reply(v, "").0,
        "command_status" => command_reply(v, "").0,
        _ => {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            let cut: String = text.chars().take(2500).collect();
            Reply::text(format!("```{cut}```"))
        }
    }
}

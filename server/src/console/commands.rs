//! Commands: queue any catalog kind for one agent or a query — the service's plan is the
//! preview (targets, skipped and why) and an explicit confirm queues exactly that target set —
//! the command list, one command with its result, batches with live progress, and cancel
//! while queued.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::layout::{self, Nav};
use super::{csrf, error_page, fleet_error, markup_response, pretty, status_of, urlencode, Op, S};
use crate::model::{now_ms, Command, CommandFilter, CommandKind, CommandStatus};
use crate::service::{ExpectedTargets, FleetError, Plan, Queued, Target};

/// Rows of the command list per page.
const LIST: usize = 50;
/// Agents of a batch listed with their status (the counts cover all).
const BATCH_ROWS: usize = 200;
/// Agents of a remote-config batch whose apply status is read from the registry.
const APPLY_ROWS: usize = 50;

/// The first 8 hex digits of an id, for dense tables (the full id is in the link and title).
pub fn short(id: &Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

/// A table of commands. `with_agent` adds the agent column (the agent page leaves it out).
pub fn table(op: &Op, cmds: &[Command], now: i64, with_agent: bool) -> Markup {
    html! {
        div.tablewrap {
            table.commands {
                caption.sr-only { "Commands, newest first" }
                thead { tr {
                    th scope="col" { "Queued" }
                    th scope="col" { "Kind" }
                    @if with_agent { th scope="col" { "Agent" } }
                    th scope="col" { "Status" }
                    th scope="col" { "By" }
                    th scope="col" { "Result" }
                    @if op.can_change() { th scope="col" { span.sr-only { "Actions" } } }
                } }
                tbody {
                    @for c in cmds {
                        tr data-command=(c.id) {
                            td { a href={"/ui/commands/" (c.id)} { (layout::ago(c.created_at, now)) } }
                            td { code { (c.kind.as_str()) } @if let Some(b) = c.batch_id { " " a.muted href={"/ui/batches/" (b)} title="Batch" { "batch" } } }
                            @if with_agent { td { a href={"/ui/agents/" (c.agent_uid)} title=(c.agent_uid) { code { (short(&c.agent_uid)) } } } }
                            td { (layout::status_badge(c.status)) }
                            td { (c.actor) " " span.muted { "(" (c.channel.as_str()) ")" } }
                            td.result { (outcome(c)) }
                            @if op.can_change() {
                                td { @if c.status == CommandStatus::Queued { (cancel_form(op, c.id)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn outcome(c: &Command) -> Markup {
    html! {
        @if let Some(e) = &c.error { span.error { (e) } }
        @else if let Some(r) = &c.result { code.small { (truncate(&r.to_string(), 160)) } }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

fn cancel_form(op: &Op, id: Uuid) -> Markup {
    html! {
        form.inline method="post" action={"/ui/commands/" (id) "/cancel"} {
            (layout::csrf_field(op))
            button.link type="submit" aria-label={"Cancel command " (id)} { "Cancel" }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    agent: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    before: Option<String>,
}

/// What the queue form holds (also the hidden fields of the confirm form).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct QueueForm {
    pub(super) csrf: Option<String>,
    /// `agent` or `query`.
    #[serde(default)]
    pub(super) target: String,
    #[serde(default)]
    pub(super) agent: String,
    #[serde(default)]
    pub(super) query: String,
    #[serde(default)]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) params: String,
    pub(super) expect_count: Option<usize>,
    pub(super) expect_digest: Option<String>,
}

/// `GET /ui/commands`: the queue form (operators) and the command list.
pub async fn page(State(st): State<S>, op: Op, Query(lq): Query<ListQuery>) -> Response {
    let form = QueueForm {
        target: if lq.agent.is_some() { "agent" } else { "query" }.into(),
        agent: lq.agent.clone().unwrap_or_default(),
        params: "{}".into(),
        kind: "restart".into(),
        ..Default::default()
    };
    list_page(&st, &op, &lq, &form, None, StatusCode::OK).await
}

async fn list_page(
    st: &S,
    op: &Op,
    lq: &ListQuery,
    form: &QueueForm,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let bad = |m: String| error_page(Some(op), StatusCode::BAD_REQUEST, "Bad filter", &m);
    let agent = match lq.agent.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(a) => match st.fleet.resolve_agent(op.caller(), a).await {
            Ok(u) => Some(u),
            Err(e) => return fleet_error(op, &e),
        },
    };
    let status_f = match lq.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match CommandStatus::parse(s) {
            Some(s) => Some(s),
            None => return bad(format!("unknown status {s:?}")),
        },
    };
    let kind_f = match lq.kind.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(k) => match CommandKind::parse(k) {
            Some(k) => Some(k),
            None => return bad(format!("unknown command kind {k:?}")),
        },
    };
    let before = match lq.before.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => match Uuid::parse_str(b) {
            Ok(u) => Some(u),
            Err(_) => return bad(format!("cursor {b:?} is not valid")),
        },
    };
    let cmds = match st
        .fleet
        .commands(
            op.caller(),
            &CommandFilter {
                agent,
                status: status_f,
                kind: kind_f,
                before,
                limit: LIST + 1,
                ..Default::default()
            },
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return fleet_error(op, &e),
    };
    let more = cmds.len() > LIST;
    let cmds = &cmds[..cmds.len().min(LIST)];
    let catalog = st.fleet.catalog(op.caller()).await.unwrap_or_default();
    let now = now_ms();
    let older = cmds.last().filter(|_| more).map(|c| {
        format!(
            "/ui/commands?agent={}&status={}&kind={}&before={}",
            urlencode(lq.agent.as_deref().unwrap_or("")),
            urlencode(lq.status.as_deref().unwrap_or("")),
            urlencode(lq.kind.as_deref().unwrap_or("")),
            c.id
        )
    });
    let body = html! {
        h1 { "Commands" }
        @if op.can_change() { (queue_form(op, form, &catalog, error.as_deref())) }
        section aria-labelledby="list-h" {
            h2 #list-h { "Recent commands" }
            form.row role="search" method="get" action="/ui/commands" {
                label for="f-agent" { "Agent" }
                input #f-agent name="agent" value=(lq.agent.as_deref().unwrap_or("")) placeholder="uid or host";
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "any" }
                    @for s in CommandStatus::ALL { option value=(s.as_str()) selected[status_f == Some(s)] { (s.as_str()) } }
                }
                label for="f-kind" { "Kind" }
                select #f-kind name="kind" {
                    option value="" { "any" }
                    @for k in CommandKind::ALL { option value=(k.as_str()) selected[kind_f == Some(k)] { (k.as_str()) } }
                }
                button type="submit" { "Filter" }
            }
            @let list = html! {
                @if cmds.is_empty() { p.muted { "No commands." } }
                @else { (table(op, cmds, now, true)) }
                @if let Some(href) = &older { nav.pager aria-label="Pages" { a rel="next" href=(href) { "Older →" } } }
            };
            (layout::live("command-list", "commands", list))
        }
    };
    markup_response(
        status,
        layout::page("Commands", Nav::Commands, Some(op), body),
    )
}

fn queue_form(op: &Op, f: &QueueForm, catalog: &[Value], error: Option<&str>) -> Markup {
    let is_agent = f.target == "agent";
    html! {
        section aria-labelledby="queue-h" {
            h2 #queue-h { "Queue a command" }
            @if let Some(e) = error { p.error #queue-error role="alert" { (e) } }
            form.stack method="post" action="/ui/commands/preview" {
                (layout::csrf_field(op))
                fieldset {
                    legend { "Target" }
                    div.row {
                        input #t-agent type="radio" name="target" value="agent" checked[is_agent];
                        label for="t-agent" { "One agent" }
                        input #t-query type="radio" name="target" value="query" checked[!is_agent];
                        label for="t-query" { "Every agent matching a query" }
                    }
                    label for="q-agent" { "Agent (uid, host or service name)" }
                    input #q-agent name="agent" value=(f.agent) autocomplete="off";
                    label for="q-query" { "Query" }
                    input #q-query name="query" value=(f.query) autocomplete="off" placeholder="type:fluentbit label:env=prod";
                }
                label for="kind" { "Kind" }
                select #kind name="kind" aria-describedby="kind-help" {
                    @for e in catalog {
                        @let k = e["kind"].as_str().unwrap_or("");
                        option value=(k) selected[k == f.kind] {
                            (k) " — " (e["capable_agents"].as_u64().unwrap_or(0)) " capable"
                        }
                    }
                }
                p #kind-help .muted { "Every kind of the catalog; the preview says which agents can run it." }
                label for="params" { "Parameters (JSON object)" }
                textarea #params name="params" rows="4" spellcheck="false" { (f.params) }
                button type="submit" { "Preview" }
            }
        }
    }
}

/// The target and parameters of a queue form, resolved through the service.
async fn parse(st: &S, op: &Op, f: &QueueForm) -> Result<(Target, CommandKind, Value), FleetError> {
    let kind = CommandKind::parse(f.kind.trim()).ok_or_else(|| {
        FleetError::BadRequest(
            crate::views::parse_kind(f.kind.trim(), "the kind list")
                .err()
                .unwrap_or_default(),
        )
    })?;
    let params: Value = if f.params.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&f.params)
            .map_err(|e| FleetError::BadRequest(format!("parameters are not valid JSON: {e}")))?
    };
    let target = match f.target.as_str() {
        "agent" => Target::Agent(st.fleet.resolve_agent(op.caller(), &f.agent).await?),
        "query" => {
            if f.query.trim().is_empty() {
                return Err(FleetError::BadRequest(
                    "a fan-out needs a query (an empty query would target the whole fleet; \
                     use `*` style terms to mean it)"
                        .into(),
                ));
            }
            Target::Query(f.query.trim().to_string())
        }
        other => {
            return Err(FleetError::BadRequest(format!(
                "target {other:?} must be \"agent\" or \"query\""
            )))
        }
    };
    Ok((target, kind, params))
}

/// `POST /ui/commands/preview`: the service's plan, and a form to confirm it.
pub async fn preview(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Form(f): Form<QueueForm>,
) -> Response {
    if let Some(r) = csrf(&op, f.csrf.as_deref(), &headers, "preview") {
        return r;
    }
    let planned = match parse(&st, &op, &f).await {
        Ok((target, kind, params)) => st.fleet.plan(op.caller(), target, kind, &params).await,
        Err(e) => Err(e),
    };
    match planned {
        Ok(plan) => {
            let confirm = confirm_form(&op, &f, &plan, "/ui/commands/queue", "Queue");
            let body = html! {
                h1 { "Confirm " code { (plan.kind.as_str()) } }
                (plan_view(&plan))
                (confirm)
            };
            markup_response(
                StatusCode::OK,
                layout::page("Confirm", Nav::Commands, Some(&op), body),
            )
        }
        Err(e) => {
            let status = status_of(&e);
            list_page(
                &st,
                &op,
                &ListQuery::default(),
                &f,
                Some(e.to_string()),
                status,
            )
            .await
        }
    }
}

/// The plan as the operator sees it before confirming.
pub fn plan_view(plan: &Plan) -> Markup {
    let destructive = crate::commands::catalog_entry(plan.kind)["destructive"]
        .as_bool()
        .unwrap_or(true);
    let n = plan.targets.len();
    let shown = &plan.targets[..n.min(crate::views::PLAN_SAMPLE)];
    let skipped = &plan.skipped[..plan.skipped.len().min(crate::views::PLAN_SAMPLE)];
    html! {
        div.plan #plan {
            p.summary {
                @if let Some(q) = &plan.query { "Query " code { (q) } " matches " (plan.matched) " agent" @if plan.matched != 1 { "s" } ". " }
                strong #target-count data-count=(n) { (n) " agent" @if n != 1 { "s" } } " will get it"
                @if !plan.skipped.is_empty() { "; " (plan.skipped.len()) " skipped" } "."
            }
            @if destructive { p.warn role="note" { "This command changes what the agents run." } }
            h2 { "Parameters" }
            pre.code { code { (pretty(&plan.params)) } }
            h2 { "Targets" }
            div.tablewrap {
                table {
                    caption.sr-only { "Agents that will get the command" }
                    thead { tr { th scope="col" { "Host" } th scope="col" { "Type" } th scope="col" { "Version" } th scope="col" { "State" } } }
                    tbody {
                        @for t in shown {
                            tr {
                                td { a href={"/ui/agents/" (t.uid)} { (t.host.clone().or_else(|| t.name.clone()).unwrap_or_else(|| t.uid.to_string())) } }
                                td { (t.agent_type) }
                                td { (t.version.as_deref().unwrap_or("")) }
                                td { (layout::state_badge(t.state)) }
                            }
                        }
                    }
                }
            }
            @if n > shown.len() { p.muted { "… and " (n - shown.len()) " more." } }
            @if !skipped.is_empty() {
                h2 { "Skipped" }
                ul.skipped {
                    @for s in skipped { li { a href={"/ui/agents/" (s.agent_uid)} { code { (short(&s.agent_uid)) } } ": " (s.reason) } }
                }
            }
        }
    }
}

/// The confirm form: the same request again, bound to the previewed target set.
pub fn confirm_form(op: &Op, f: &QueueForm, plan: &Plan, action: &str, verb: &str) -> Markup {
    let e = plan.expected();
    let agent = match (&plan.query, plan.targets.first()) {
        (None, Some(t)) => t.uid.to_string(),
        _ => f.agent.clone(),
    };
    html! {
        form.confirm method="post" action=(action) {
            (layout::csrf_field(op))
            input type="hidden" name="target" value=(f.target);
            input type="hidden" name="agent" value=(agent);
            input type="hidden" name="query" value=(f.query);
            input type="hidden" name="kind" value=(plan.kind.as_str());
            input type="hidden" name="params" value=(f.params);
            input type="hidden" name="expect_count" value=(e.count);
            input type="hidden" name="expect_digest" value=(e.digest);
            div.row {
                button #confirm type="submit" { (verb) " " (plan.kind.as_str()) " for " (e.count) " agent" @if e.count != 1 { "s" } }
                a href="/ui/commands" { "Cancel" }
            }
        }
    }
}

/// `POST /ui/commands/queue`: queues exactly the previewed target set.
pub async fn queue(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Form(f): Form<QueueForm>,
) -> Response {
    if let Some(r) = csrf(&op, f.csrf.as_deref(), &headers, "queue") {
        return r;
    }
    queue_confirmed(&st, &op, &f).await
}

/// Queues a confirmed form; redirects to the command or batch.
pub async fn queue_confirmed(st: &S, op: &Op, f: &QueueForm) -> Response {
    let expect = match (f.expect_count, &f.expect_digest) {
        (Some(count), Some(digest)) => ExpectedTargets {
            count,
            digest: digest.clone(),
        },
        _ => {
            return error_page(
                Some(op),
                StatusCode::BAD_REQUEST,
                "Not queued",
                "A command is queued only from its preview: preview it first.",
            )
        }
    };
    let queued = match parse(st, op, f).await {
        Ok((target, kind, params)) => {
            st.fleet
                .queue_expecting(op.caller(), target, kind, &params, Some(&expect))
                .await
        }
        Err(e) => Err(e),
    };
    match queued {
        Ok(Queued::One(c)) => Redirect::to(&format!("/ui/commands/{}", c.id)).into_response(),
        Ok(Queued::Batch(b, _)) => Redirect::to(&format!("/ui/batches/{}", b.id)).into_response(),
        Err(e) => fleet_error(op, &e),
    }
}

/// `GET /ui/commands/{id}`.
pub async fn command_page(State(st): State<S>, op: Op, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error_page(
            Some(&op),
            StatusCode::NOT_FOUND,
            "Not found",
            "No such command.",
        );
    };
    let c = match st.fleet.command(op.caller(), id).await {
        Ok(c) => c,
        Err(e) => return fleet_error(&op, &e),
    };
    let now = now_ms();
    let detail = html! {
        dl.facts {
            div { dt { "Status" } dd #command-status { (layout::status_badge(c.status)) } }
            div { dt { "Kind" } dd { code { (c.kind.as_str()) } } }
            div { dt { "Agent" } dd { a href={"/ui/agents/" (c.agent_uid)} { code { (c.agent_uid) } } } }
            div { dt { "Queued" } dd { (layout::at(c.created_at)) " (" (layout::ago(c.created_at, now)) ")" } }
            @if let Some(t) = c.sent_at { div { dt { "Sent" } dd { (layout::at(t)) } } }
            @if let Some(t) = c.finished_at { div { dt { "Finished" } dd { (layout::at(t)) } } }
            @if !c.status.is_final() { div { dt { "Expires" } dd { (layout::at(c.expires_at)) } } }
            div { dt { "By" } dd { (c.actor) " via " (c.channel.as_str()) } }
            @if let Some(b) = c.batch_id { div { dt { "Batch" } dd { a href={"/ui/batches/" (b)} { code { (b) } } } } }
            @if let Some(a) = c.audit_id { div { dt { "Audit record" } dd { a href={"/ui/audit?agent=" (c.agent_uid)} { (a) } } } }
        }
        @if let Some(e) = &c.error { p.error role="alert" { (e) } }
        @if let Some(r) = &c.result { h2 { "Result" } pre.code { code { (pretty(r)) } } }
        @if c.status == CommandStatus::Queued && op.can_change() { (cancel_form(&op, c.id)) }
    };
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/commands" { "Commands" } " / " code { (short(&c.id)) } }
        h1 { "Command " code { (c.kind.as_str()) } }
        (layout::live("command-detail", "commands", detail))
        h2 { "Parameters" }
        pre.code { code { (pretty(&c.params)) } }
    };
    markup_response(
        StatusCode::OK,
        layout::page("Command", Nav::Commands, Some(&op), body),
    )
}

#[derive(Deserialize)]
pub struct CancelForm {
    csrf: Option<String>,
}

/// `POST /ui/commands/{id}/cancel`.
pub async fn cancel(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CancelForm>,
) -> Response {
    if let Some(r) = csrf(&op, f.csrf.as_deref(), &headers, "cancel") {
        return r;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return error_page(
            Some(&op),
            StatusCode::NOT_FOUND,
            "Not found",
            "No such command.",
        );
    };
    match st.fleet.cancel(op.caller(), id).await {
        Ok(_) => Redirect::to(&format!("/ui/commands/{id}")).into_response(),
        Err(e) => fleet_error(&op, &e),
    }
}

/// `GET /ui/batches/{id}`: progress of a fan-out, per agent; for remote config also each
/// agent's apply status.
pub async fn batch_page(State(st): State<S>, op: Op, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error_page(
            Some(&op),
            StatusCode::NOT_FOUND,
            "Not found",
            "No such batch.",
        );
    };
    let p = match st.fleet.batch(op.caller(), id).await {
        Ok(p) => p,
        Err(e) => return fleet_error(&op, &e),
    };
    let (total, done) = (p.total, p.done);
    let is_config = p.batch.kind == CommandKind::RemoteConfig;
    let want_hash = p.batch.params["hash"].as_str().unwrap_or("").to_string();
    let mut apply = std::collections::HashMap::new();
    if is_config {
        for c in p.commands.iter().take(APPLY_ROWS) {
            if let Ok(a) = st.fleet.get_agent(op.caller(), c.agent_uid).await {
                apply.insert(c.agent_uid, a);
            }
        }
    }
    let progress = html! {
        p.summary {
            strong #batch-done data-done=(done) data-total=(total) { (done) " of " (total) } " finished"
        }
        progress #batch-progress max=(total.max(1)) value=(done) aria-label="Batch progress" { (done) "/" (total) }
        ul.counts-inline {
            @for (k, n) in &p.counts { li { span class={"badge cmd-" (k)} { (k) } " " (n) } }
        }
        div.tablewrap {
            table {
                caption.sr-only { "Commands of the batch, per agent" }
                thead { tr {
                    th scope="col" { "Agent" } th scope="col" { "Command" } th scope="col" { "Status" }
                    @if is_config { th scope="col" { "Apply status" } }
                    th scope="col" { "Error" }
                } }
                tbody {
                    @for c in p.commands.iter().take(BATCH_ROWS) {
                        tr {
                            td { a href={"/ui/agents/" (c.agent_uid)} { code { (short(&c.agent_uid)) } } }
                            td { a href={"/ui/commands/" (c.command_id)} { code { (short(&c.command_id)) } } }
                            td { (layout::status_badge(c.status)) }
                            @if is_config {
                                td { (apply_status(apply.get(&c.agent_uid), &want_hash)) }
                            }
                            td { @if let Some(e) = &c.error { span.error { (e) } } }
                        }
                    }
                }
            }
        }
        @if total > BATCH_ROWS { p.muted { "First " (BATCH_ROWS) " of " (total) " agents listed." } }
    };
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/commands" { "Commands" } " / batch " code { (short(&id)) } }
        h1 { "Batch " code { (p.batch.kind.as_str()) } }
        p { "Query " code { (p.batch.query) } " · by " (p.batch.actor) " via " (p.batch.channel.as_str()) " · " (layout::at(p.batch.created_at)) }
        (layout::live("batch-progress-region", "commands agents", progress))
        @if !p.batch.skipped.is_empty() {
            h2 { "Skipped" }
            ul.skipped { @for s in &p.batch.skipped { li { a href={"/ui/agents/" (s.agent_uid)} { code { (short(&s.agent_uid)) } } ": " (s.reason) } } }
        }
    };
    markup_response(
        StatusCode::OK,
        layout::page("Batch", Nav::Commands, Some(&op), body),
    )
}

/// Whether an agent runs the pushed config: its remote-config status for that hash, or whether
/// its effective config hashes to it.
pub fn apply_status(a: Option<&crate::model::Agent>, want: &str) -> Markup {
    let Some(a) = a else {
        return html! { span.muted { "—" } };
    };
    let eff = a
        .effective_config
        .as_ref()
        .map(crate::commands::config_hash);
    let rc = a.remote_config_status.as_ref();
    html! {
        @if eff.as_deref() == Some(want) { span.badge.rc-applied { "running it" } }
        @else if let Some(r) = rc.filter(|r| r.hash == want) {
            span class={"badge rc-" (r.status)} { (r.status) }
            @if !r.error.is_empty() { " " span.error { (r.error) } }
        }
        @else { span.muted { "not yet" } }
    }
}

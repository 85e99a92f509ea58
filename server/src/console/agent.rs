//! The agent page: attributes, capabilities, the health tree with its components, the
//! effective config (highlighted) with its remote-config status and hash, labels (editable by
//! operators), connection state and history, commands with their results, and a form to queue
//! a command for this agent.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use super::layout::{self, Nav};
use super::{csrf, error_page, fleet_error, highlight, markup_response, Op, S};
use crate::commands::config_hash;
use crate::model::{now_ms, Agent, AuditFilter, CommandFilter, CommandKind, Health};

/// Commands and history records shown on the page (the rest are a link away).
const RECENT: usize = 20;

async fn resolve(st: &S, op: &Op, reference: &str) -> Result<Uuid, crate::service::FleetError> {
    st.fleet.resolve_agent(op.caller(), reference).await
}

/// `GET /ui/agents/{uid}` (a unique host or service name works too).
pub async fn page(State(st): State<S>, op: Op, Path(reference): Path<String>) -> Response {
    let uid = match resolve(&st, &op, &reference).await {
        Ok(u) => u,
        Err(e) => return fleet_error(&op, &e),
    };
    let agent = match st.fleet.get_agent(op.caller(), uid).await {
        Ok(a) => a,
        Err(e) => return fleet_error(&op, &e),
    };
    let cmds = st
        .fleet
        .commands(
            op.caller(),
            &CommandFilter {
                agent: Some(uid),
                limit: RECENT,
                ..Default::default()
            },
        )
        .await;
    let history = st
        .fleet
        .audit(
            op.caller(),
            &AuditFilter {
                agent: Some(uid.to_string()),
                limit: RECENT,
                ..Default::default()
            },
        )
        .await;
    let (cmds, history) = match (cmds, history) {
        (Ok(c), Ok(h)) => (c, h),
        (Err(e), _) | (_, Err(e)) => return fleet_error(&op, &e),
    };
    let now = now_ms();
    let name = agent
        .host()
        .map(str::to_string)
        .or_else(|| agent.attr("service.name").map(str::to_string))
        .unwrap_or_else(|| uid.to_string());
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/fleet" { "Fleet" } " / " span { (name) } }
        (layout::live_for("agent-head", "agents", agent.uid, head(&agent, &name, now)))
        div.grid {
            section aria-labelledby="attrs-h" {
                h2 #attrs-h { "Attributes" }
                (attributes("Identifying", &agent.identifying))
                (attributes("Non-identifying", &agent.non_identifying))
            }
            section aria-labelledby="caps-h" {
                h2 #caps-h { "Capabilities" }
                ul.caps {
                    @for c in flotilla_proto::caps::agent_capability_names(agent.capabilities) { li { code { (c) } } }
                }
                @if !agent.custom_capabilities.is_empty() {
                    h3 { "Custom" }
                    ul.caps { @for c in &agent.custom_capabilities { li { code { (c) } } } }
                }
            }
        }
        (layout::live_for("agent-health", "agents", agent.uid, health_section(&agent)))
        (layout::live_for("agent-config", "agents", agent.uid, config_section(&agent)))
        (labels_section(&op, &agent))
        (layout::live_for("agent-commands", "commands", agent.uid, commands_section(&op, &agent, &cmds, now)))
        @if op.can_change() { (queue_form(&op, &agent)) }
        (layout::live_for("agent-history", "agents audit", agent.uid, history_section(&agent, &history, now)))
    };
    markup_response(
        StatusCode::OK,
        layout::page(&name, Nav::Fleet, Some(&op), body),
    )
}

fn head(a: &Agent, name: &str, now: i64) -> Markup {
    html! {
        h1 { (name) }
        dl.facts {
            div { dt { "State" } dd { (layout::state_badge(a.liveness(now))) } }
            div { dt { "Health" } dd { (layout::health_badge(a.health.as_ref().map(|h| h.healthy))) } }
            div { dt { "Type" } dd { (a.agent_type()) } }
            div { dt { "Version" } dd { (a.attr("service.version").unwrap_or("")) } }
            div { dt { "Connected" } dd { @if a.connected { "yes" } @else { "no" } } }
            div { dt { "Transport" } dd { (a.transport.map(|t| t.as_str()).unwrap_or("")) } }
            div { dt { "Remote address" } dd { (a.remote_addr.as_deref().unwrap_or("")) } }
            div { dt { "Last seen" } dd { (layout::ago(a.last_seen, now)) } }
            div { dt { "First seen" } dd { (layout::at(a.first_seen)) } }
            div { dt { "Heartbeat" } dd { (a.heartbeat_interval_s) " s" } }
            div { dt { "Sequence" } dd { (a.sequence_num) } }
            div { dt { "UID" } dd { code { (a.uid) } } }
        }
    }
}

fn attributes(title: &str, attrs: &[(String, String)]) -> Markup {
    html! {
        h3 { (title) }
        @if attrs.is_empty() { p.muted { "None reported." } }
        @else {
            table.kv {
                caption.sr-only { (title) " attributes" }
                thead { tr { th scope="col" { "Key" } th scope="col" { "Value" } } }
                tbody { @for (k, v) in attrs { tr { th scope="row" { code { (k) } } td { (v) } } } }
            }
        }
    }
}

fn health_node(name: &str, h: &Health) -> Markup {
    let healthy = Some(h.healthy);
    html! {
        li data-component=(name) {
            span.node { code { (name) } " " (layout::health_badge(healthy))
                @if !h.status.is_empty() { " " span.muted { (h.status) } } }
            @if !h.last_error.is_empty() { div.error { (h.last_error) } }
            @if !h.components.is_empty() {
                ul { @for (n, c) in &h.components { (health_node(n, c)) } }
            }
        }
    }
}

fn health_section(a: &Agent) -> Markup {
    html! {
        section aria-labelledby="health-h" {
            h2 #health-h { "Health" }
            @match &a.health {
                None => p.muted { "The agent has not reported health." },
                Some(h) => {
                    @if h.start_time_unix_nano > 0 {
                        p.muted { "Started " (layout::at((h.start_time_unix_nano / 1_000_000) as i64)) }
                    }
                    ul.tree { (health_node("agent", h)) }
                }
            }
        }
    }
}

fn config_section(a: &Agent) -> Markup {
    let eff_hash = a.effective_config.as_ref().map(config_hash);
    let desired = a.desired_config.as_ref();
    let in_sync = match (desired, &eff_hash) {
        (Some(d), Some(h)) => Some(d.hash == *h),
        _ => None,
    };
    html! {
        section #config aria-labelledby="config-h" {
            h2 #config-h { "Effective config" }
            dl.facts {
                div { dt { "Effective hash" } dd { code.hash { (eff_hash.as_deref().unwrap_or("none reported")) } } }
                @if let Some(d) = desired {
                    div { dt { "Pushed hash" } dd { code.hash { (d.hash) } } }
                    div { dt { "In sync" } dd { @match in_sync { Some(true) => "yes", Some(false) => "no", None => "unknown" } } }
                }
                @if let Some(r) = &a.remote_config_status {
                    div { dt { "Remote config" } dd { span class={"badge rc-" (r.status)} { (r.status) } } }
                    @if !r.hash.is_empty() { div { dt { "Last remote hash" } dd { code.hash { (r.hash) } } } }
                    @if !r.error.is_empty() { div { dt { "Error" } dd.error { (r.error) } } }
                }
            }
            @match &a.effective_config {
                None => p.muted { "The agent has not reported its effective config." },
                Some(files) => {
                    @for (name, f) in files {
                        figure.file {
                            figcaption { code { (name) } @if !f.content_type.is_empty() { " " span.muted { (f.content_type) } } }
                            @if f.encoding.as_deref() == Some("base64") {
                                p.muted { "Binary content (" (f.body.len()) " base64 characters)." }
                            } @else {
                                pre.code tabindex="0" aria-label={"Contents of " (name)} { code { (highlight::config(name, &f.body)) } }
                            }
                        }
                    }
                }
            }
            p { a href={"/ui/config?agent=" (a.uid)} { "Edit and push a config to this agent →" } }
        }
    }
}

fn labels_section(op: &Op, a: &Agent) -> Markup {
    html! {
        section #labels aria-labelledby="labels-h" {
            h2 #labels-h { "Labels" }
            (layout::live_for("agent-labels", "agents", a.uid, label_list(op, a)))
            @if op.can_change() {
                form.row method="post" action={"/ui/agents/" (a.uid) "/labels"} {
                    (layout::csrf_field(op))
                    label for="label-key" { "Key" }
                    input #label-key name="key" required maxlength="63" pattern="[A-Za-z0-9._/-]+";
                    label for="label-value" { "Value" }
                    input #label-value name="value" maxlength="256";
                    button type="submit" { "Set label" }
                }
            }
        }
    }
}

/// The labels themselves: a live region (a label set elsewhere appears), apart from the form
/// so a re-render never clears what the operator is typing.
fn label_list(op: &Op, a: &Agent) -> Markup {
    html! {
            @if a.labels.is_empty() { p.muted { "No labels." } }
            @else {
                table.kv {
                    caption.sr-only { "Labels set by operators" }
                    thead { tr { th scope="col" { "Key" } th scope="col" { "Value" } @if op.can_change() { th scope="col" { span.sr-only { "Actions" } } } } }
                    tbody {
                        @for (k, v) in &a.labels {
                            tr {
                                th scope="row" { code { (k) } } td { (v) }
                                @if op.can_change() {
                                    td {
                                        form.inline method="post" action={"/ui/agents/" (a.uid) "/labels/delete"} {
                                            (layout::csrf_field(op))
                                            input type="hidden" name="key" value=(k);
                                            button.link type="submit" aria-label={"Remove label " (k)} { "Remove" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
    }
}

fn commands_section(op: &Op, a: &Agent, cmds: &[crate::model::Command], now: i64) -> Markup {
    html! {
        section #commands aria-labelledby="cmds-h" {
            h2 #cmds-h { "Commands" }
            @if cmds.is_empty() { p.muted { "No commands yet." } }
            @else {
                (super::commands::table(op, cmds, now, false))
                p { a href={"/ui/commands?agent=" (a.uid)} { "All commands of this agent →" } }
            }
        }
    }
}

fn queue_form(op: &Op, a: &Agent) -> Markup {
    html! {
        section aria-labelledby="queue-h" {
            h2 #queue-h { "Queue a command" }
            form.stack method="post" action="/ui/commands/preview" {
                (layout::csrf_field(op))
                input type="hidden" name="target" value="agent";
                input type="hidden" name="agent" value=(a.uid);
                label for="kind" { "Kind" }
                select #kind name="kind" {
                    @for k in CommandKind::ALL {
                        @if k != CommandKind::RemoteConfig { option value=(k.as_str()) { (k.as_str()) } }
                    }
                }
                label for="params" { "Parameters (JSON object)" }
                textarea #params name="params" rows="3" spellcheck="false" aria-describedby="params-help" { "{}" }
                p #params-help .muted { "E.g. " code { r#"{"tag": "flush", "attributes": {"reason": "test"}}"# } " for chatops. Remote config has its own page." }
                button type="submit" { "Preview" }
            }
        }
    }
}

fn history_section(a: &Agent, recs: &[crate::model::AuditRecord], now: i64) -> Markup {
    html! {
        section aria-labelledby="hist-h" {
            h2 #hist-h { "Connection and history" }
            dl.facts {
                div { dt { "First seen" } dd { (layout::at(a.first_seen)) } }
                div { dt { "Last seen" } dd { (layout::ago(a.last_seen, now)) } }
                @if let Some(p) = a.previous_uid { div { dt { "Previous uid" } dd { code { (p) } } } }
                @if let Some(p) = a.replaces { div { dt { "Replaces" } dd { a href={"/ui/agents/" (p)} { code { (p) } } } } }
                @if let Some(p) = a.replaced_by { div { dt { "Replaced by" } dd { a href={"/ui/agents/" (p)} { code { (p) } } } } }
            }
            @if recs.is_empty() { p.muted { "Nothing recorded about this agent yet." } }
            @else {
                (super::audit::table(recs))
                p { a href={"/ui/audit?agent=" (a.uid)} { "Whole trail of this agent →" } }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct LabelForm {
    csrf: Option<String>,
    key: String,
    #[serde(default)]
    value: String,
}

/// `POST /ui/agents/{uid}/labels`: sets a label.
pub async fn set_label(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Path(reference): Path<String>,
    Form(f): Form<LabelForm>,
) -> Response {
    label_change(st, op, headers, reference, f, true).await
}

/// `POST /ui/agents/{uid}/labels/delete`: removes a label.
pub async fn delete_label(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Path(reference): Path<String>,
    Form(f): Form<LabelForm>,
) -> Response {
    label_change(st, op, headers, reference, f, false).await
}

async fn label_change(
    st: S,
    op: Op,
    headers: HeaderMap,
    reference: String,
    f: LabelForm,
    set: bool,
) -> Response {
    if let Some(r) = csrf(&op, f.csrf.as_deref(), &headers, "label") {
        return r;
    }
    let uid = match resolve(&st, &op, &reference).await {
        Ok(u) => u,
        Err(e) => return fleet_error(&op, &e),
    };
    let value = set.then_some(f.value.as_str());
    match st
        .fleet
        .set_label(op.caller(), uid, f.key.trim(), value)
        .await
    {
        Ok(_) => Redirect::to(&format!("/ui/agents/{uid}#labels")).into_response(),
        Err(e) => {
            let status = super::status_of(&e);
            error_page(Some(&op), status, "Label not changed", &e.to_string())
        }
    }
}

//! Remote config: edit config files and push them to one agent or a query, previewed as the
//! service's plan plus a diff against each distinct effective config among the targets; the
//! push is a `remote_config` command like any other, and its page shows the apply status per
//! agent.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{json, Value};

use super::commands::{self, QueueForm};
use super::layout::{self, Nav};
use super::{csrf, fleet_error, highlight, markup_response, Op, S};
use crate::commands::config_hash;
use crate::model::{Agent, CommandKind, ConfigFiles};
use crate::service::{FleetError, Target};

/// Targets whose effective config is read to build the diffs.
const DIFF_AGENTS: usize = 20;
/// Distinct effective configs diffed against (the most common first).
const DIFF_GROUPS: usize = 5;
/// File rows offered by the editor beyond those prefilled.
const SPARE_ROWS: usize = 1;

#[derive(Debug, Default, Deserialize)]
pub struct ConfigQuery {
    agent: Option<String>,
    query: Option<String>,
}

/// One file row of the editor.
#[derive(Debug, Clone, Default)]
struct FileRow {
    name: String,
    body: String,
}

/// The editor's fields.
#[derive(Debug, Default)]
struct Editor {
    target: String,
    agent: String,
    query: String,
    files: Vec<FileRow>,
}

/// `GET /ui/config?agent=|query=`: the editor, prefilled with the agent's effective config.
pub async fn page(State(st): State<S>, op: Op, Query(cq): Query<ConfigQuery>) -> Response {
    let mut ed = Editor {
        target: if cq.query.is_some() { "query" } else { "agent" }.into(),
        agent: cq.agent.clone().unwrap_or_default(),
        query: cq.query.clone().unwrap_or_default(),
        files: Vec::new(),
    };
    if let Some(a) = cq.agent.as_deref().filter(|a| !a.is_empty()) {
        let agent = match st.fleet.resolve_agent(op.caller(), a).await {
            Ok(uid) => st.fleet.get_agent(op.caller(), uid).await,
            Err(e) => Err(e),
        };
        match agent {
            Ok(agent) => {
                ed.agent = agent.uid.to_string();
                for (name, f) in agent.effective_config.iter().flatten() {
                    if f.encoding.is_none() {
                        ed.files.push(FileRow {
                            name: name.clone(),
                            body: f.body.clone(),
                        });
                    }
                }
            }
            Err(e) => return fleet_error(&op, &e),
        }
    }
    editor_page(&op, &ed, None, StatusCode::OK)
}

fn editor_page(op: &Op, ed: &Editor, error: Option<&str>, status: StatusCode) -> Response {
    let is_agent = ed.target != "query";
    let mut rows = ed.files.clone();
    rows.extend(std::iter::repeat_n(FileRow::default(), SPARE_ROWS));
    let body = html! {
        h1 { "Remote config" }
        @if !op.can_change() {
            p.muted { "Viewers can read configs on each agent's page; pushing one needs the operator role." }
        } @else {
            @if let Some(e) = error { p.error #config-error role="alert" { (e) } }
            form.stack method="post" action="/ui/config/preview" {
                (layout::csrf_field(op))
                fieldset {
                    legend { "Target" }
                    div.row {
                        input #t-agent type="radio" name="target" value="agent" checked[is_agent];
                        label for="t-agent" { "One agent" }
                        input #t-query type="radio" name="target" value="query" checked[!is_agent];
                        label for="t-query" { "Every agent matching a query" }
                    }
                    label for="c-agent" { "Agent (uid, host or service name)" }
                    input #c-agent name="agent" value=(ed.agent) autocomplete="off";
                    label for="c-query" { "Query" }
                    input #c-query name="query" value=(ed.query) autocomplete="off";
                }
                @for (i, f) in rows.iter().enumerate() {
                    fieldset.file {
                        legend { "File " (i + 1) }
                        label for={"name_" (i)} { "File name" }
                        input id={"name_" (i)} name={"name_" (i)} value=(f.name) autocomplete="off" placeholder="fluent-bit.conf";
                        label for={"body_" (i)} { "Contents" }
                        textarea.code id={"body_" (i)} name={"body_" (i)} rows="12" spellcheck="false" { (f.body) }
                    }
                }
                p.muted { "Files left without a name are not sent. The pushed set replaces the agent's remote config as a whole." }
                button type="submit" { "Preview push" }
            }
        }
    };
    markup_response(
        status,
        layout::page("Remote config", Nav::Config, Some(op), body),
    )
}

fn parse_editor(fields: &[(String, String)]) -> (Option<String>, Editor) {
    let mut ed = Editor::default();
    let mut csrf = None;
    let mut rows: BTreeMap<usize, FileRow> = BTreeMap::new();
    for (k, v) in fields {
        match k.as_str() {
            "csrf" => csrf = Some(v.clone()),
            "target" => ed.target = v.clone(),
            "agent" => ed.agent = v.clone(),
            "query" => ed.query = v.clone(),
            _ => {
                if let Some(i) = k.strip_prefix("name_").and_then(|i| i.parse().ok()) {
                    rows.entry(i).or_default().name = v.trim().to_string();
                } else if let Some(i) = k.strip_prefix("body_").and_then(|i| i.parse().ok()) {
                    // Browsers send textarea line breaks as CRLF.
                    rows.entry(i).or_default().body = v.replace("\r\n", "\n");
                }
            }
        }
    }
    ed.files = rows
        .into_values()
        .filter(|r| !(r.name.is_empty() && r.body.trim().is_empty()))
        .collect();
    (csrf, ed)
}

fn params_of(ed: &Editor) -> Result<Value, FleetError> {
    if let Some(r) = ed.files.iter().find(|r| r.name.is_empty()) {
        let _ = r;
        return Err(FleetError::BadRequest(
            "every file with contents needs a file name".into(),
        ));
    }
    let mut files = serde_json::Map::new();
    for r in &ed.files {
        if files
            .insert(r.name.clone(), json!({"body": r.body}))
            .is_some()
        {
            return Err(FleetError::BadRequest(format!(
                "file name {:?} is used twice",
                r.name
            )));
        }
    }
    Ok(json!({"files": files}))
}

fn queue_form(ed: &Editor, params: &Value) -> QueueForm {
    QueueForm {
        csrf: None,
        target: if ed.target == "query" {
            "query"
        } else {
            "agent"
        }
        .into(),
        agent: ed.agent.clone(),
        query: ed.query.clone(),
        kind: CommandKind::RemoteConfig.as_str().into(),
        params: params.to_string(),
        expect_count: None,
        expect_digest: None,
    }
}

/// `POST /ui/config/preview`: the plan and the diffs, and a form to confirm the push.
pub async fn preview(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let (sent, ed) = parse_editor(&fields);
    if let Some(r) = csrf(&op, sent.as_deref(), &headers, "config preview") {
        return r;
    }
    let planned = async {
        let params = params_of(&ed)?;
        let target = if ed.target == "query" {
            Target::Query(ed.query.trim().to_string())
        } else {
            Target::Agent(st.fleet.resolve_agent(op.caller(), &ed.agent).await?)
        };
        let plan = st
            .fleet
            .plan(op.caller(), target, CommandKind::RemoteConfig, &params)
            .await?;
        Ok::<_, FleetError>((params, plan))
    }
    .await;
    let (params, plan) = match planned {
        Ok(p) => p,
        Err(e) => {
            let status = super::status_of(&e);
            return editor_page(&op, &ed, Some(&e.to_string()), status);
        }
    };
    let mut groups: BTreeMap<String, (usize, Option<ConfigFiles>)> = BTreeMap::new();
    for t in plan.targets.iter().take(DIFF_AGENTS) {
        let a: Agent = match st.fleet.get_agent(op.caller(), t.uid).await {
            Ok(a) => a,
            Err(e) => return fleet_error(&op, &e),
        };
        let key = a
            .effective_config
            .as_ref()
            .map(config_hash)
            .unwrap_or_default();
        let g = groups.entry(key).or_insert((0, a.effective_config.clone()));
        g.0 += 1;
    }
    let mut groups: Vec<(String, usize, Option<ConfigFiles>)> =
        groups.into_iter().map(|(k, (n, c))| (k, n, c)).collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    let new_hash = plan.params["hash"].as_str().unwrap_or("").to_string();
    let new_files: BTreeMap<String, String> = ed
        .files
        .iter()
        .map(|r| (r.name.clone(), r.body.clone()))
        .collect();
    let f = queue_form(&ed, &params);
    let body = html! {
        h1 { "Confirm remote config" }
        p { "New config hash " code.hash #new-hash { (new_hash) } }
        (commands::plan_view(&plan))
        h2 { "Changes" }
        @if plan.targets.len() > DIFF_AGENTS { p.muted { "Diffs against the effective configs of the first " (DIFF_AGENTS) " targets." } }
        @for (hash, n, eff) in groups.iter().take(DIFF_GROUPS) {
            section.diffgroup {
                h3 {
                    (n) " agent" @if *n != 1 { "s" } " running "
                    @if hash.is_empty() { "no reported config" } @else { code.hash { (&hash[..hash.len().min(12)]) } }
                }
                (diffs(eff.as_ref(), &new_files))
            }
        }
        (commands::confirm_form(&op, &f, &plan, "/ui/config/push", "Push"))
    };
    markup_response(
        StatusCode::OK,
        layout::page("Confirm config", Nav::Config, Some(&op), body),
    )
}

fn diffs(eff: Option<&ConfigFiles>, new: &BTreeMap<String, String>) -> Markup {
    let empty = ConfigFiles::new();
    let eff = eff.unwrap_or(&empty);
    let names: std::collections::BTreeSet<&String> = eff.keys().chain(new.keys()).collect();
    html! {
        @for name in names {
            @let old = eff.get(name).map(|f| f.body.as_str());
            @let newb = new.get(name).map(String::as_str);
            figure.file {
                figcaption {
                    code { (name) }
                    @match (old, newb) {
                        (None, Some(_)) => { " " span.badge.rc-applying { "new file" } }
                        (Some(_), None) => { " " span.badge.rc-failed { "removed" } }
                        _ => {}
                    }
                }
                @match highlight::diff(old.unwrap_or(""), newb.unwrap_or("")) {
                    Some(d) => pre.code.diff tabindex="0" aria-label={"Changes to " (name)} { code { (d) } },
                    None => p.muted { "Unchanged." },
                }
            }
        }
    }
}

/// `POST /ui/config/push`: queues the previewed config for exactly the previewed targets.
pub async fn push(
    State(st): State<S>,
    op: Op,
    headers: HeaderMap,
    Form(f): Form<QueueForm>,
) -> Response {
    if let Some(r) = csrf(&op, f.csrf.as_deref(), &headers, "config push") {
        return r;
    }
    if f.kind != CommandKind::RemoteConfig.as_str() {
        return super::error_page(
            Some(&op),
            StatusCode::BAD_REQUEST,
            "Not pushed",
            "this form pushes remote configs only",
        );
    }
    commands::queue_confirmed(&st, &op, &f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_rows_become_files() {
        let fields: Vec<(String, String)> = [
            ("csrf", "c"),
            ("target", "agent"),
            ("agent", "web-1"),
            ("name_0", "fluent-bit.conf"),
            ("body_0", "[SERVICE]\r\n    Flush 1\r\n"),
            ("name_1", ""),
            ("body_1", "  "),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let (csrf, ed) = parse_editor(&fields);
        assert_eq!(csrf.as_deref(), Some("c"));
        assert_eq!(ed.files.len(), 1, "the empty spare row is dropped");
        let p = params_of(&ed).unwrap();
        assert_eq!(
            p["files"]["fluent-bit.conf"]["body"],
            "[SERVICE]\n    Flush 1\n"
        );
        let mut ed2 = ed;
        ed2.files.push(FileRow {
            name: String::new(),
            body: "x".into(),
        });
        assert!(params_of(&ed2).is_err());
    }
}

//! The fleet page: counts by state, health, type and version as filters, the search box (the
//! service's query language, errors inline) and a server-side paged table sortable by column.

use std::cmp::Ordering;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{self, Nav};
use super::{fleet_error, markup_response, urlencode, Op, S};
use crate::model::{now_ms, Liveness};
use crate::service::{AgentRow, FleetError};

/// Rows per page.
pub const PAGE_SIZE: usize = 50;
/// Rows asked of the service per call while collecting a sorted listing.
const FETCH: usize = 1000;

#[derive(Debug, Default, Deserialize)]
pub struct FleetQuery {
    #[serde(default)]
    q: String,
    sort: Option<String>,
    dir: Option<String>,
    page: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Host,
    Type,
    Version,
    Health,
    State,
    LastSeen,
}

const COLS: [(Col, &str, &str); 6] = [
    (Col::Host, "host", "Host"),
    (Col::Type, "type", "Type"),
    (Col::Version, "version", "Version"),
    (Col::Health, "health", "Health"),
    (Col::State, "state", "State"),
    (Col::LastSeen, "last_seen", "Last seen"),
];

fn col(s: Option<&str>) -> Col {
    COLS.iter()
        .find(|(_, k, _)| Some(*k) == s)
        .map(|(c, _, _)| *c)
        .unwrap_or(Col::Host)
}

fn col_key(c: Col) -> &'static str {
    COLS.iter()
        .find(|(x, _, _)| *x == c)
        .map(|(_, k, _)| *k)
        .unwrap_or("host")
}

/// Problems first when ascending: offline, late, healthy.
fn state_rank(l: Liveness) -> u8 {
    match l {
        Liveness::Offline => 0,
        Liveness::Late => 1,
        Liveness::Healthy => 2,
    }
}

fn health_rank(h: Option<bool>) -> u8 {
    match h {
        Some(false) => 0,
        None => 1,
        Some(true) => 2,
    }
}

fn display_name(r: &AgentRow) -> String {
    r.host
        .clone()
        .or_else(|| r.name.clone())
        .unwrap_or_else(|| r.uid.to_string())
}

fn compare(c: Col, a: &AgentRow, b: &AgentRow) -> Ordering {
    let lower = |s: &Option<String>| s.as_deref().unwrap_or("").to_ascii_lowercase();
    let o = match c {
        Col::Host => display_name(a)
            .to_ascii_lowercase()
            .cmp(&display_name(b).to_ascii_lowercase()),
        Col::Type => a.agent_type.cmp(&b.agent_type),
        Col::Version => lower(&a.version).cmp(&lower(&b.version)),
        Col::Health => health_rank(a.healthy).cmp(&health_rank(b.healthy)),
        Col::State => state_rank(a.state).cmp(&state_rank(b.state)),
        Col::LastSeen => a.last_seen.cmp(&b.last_seen),
    };
    o.then_with(|| a.uid.cmp(&b.uid))
}

/// Every agent matching `q`, through the service's own search (role-checked), page by page.
async fn collect(st: &S, op: &Op, q: &str) -> Result<Vec<AgentRow>, FleetError> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = st
            .fleet
            .search(op.caller(), q, Some(FETCH), cursor.as_deref(), false)
            .await?;
        rows.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(rows),
        }
    }
}

/// `GET /ui/fleet?q=&sort=&dir=&page=`.
pub async fn page(State(st): State<S>, op: Op, Query(fq): Query<FleetQuery>) -> Response {
    let q = fq.q.trim().to_string();
    let sort = col(fq.sort.as_deref());
    let desc = fq.dir.as_deref() == Some("desc");
    let (summary, rows) = tokio::join!(st.fleet.summary(op.caller()), collect(&st, &op, &q));
    let summary = match summary {
        Ok(s) => s,
        Err(e) => return fleet_error(&op, &e),
    };
    let (status, results) = match rows {
        Ok(mut rows) => {
            rows.sort_by(|a, b| {
                let o = compare(sort, a, b);
                if desc {
                    o.reverse()
                } else {
                    o
                }
            });
            (
                StatusCode::OK,
                results(&q, sort, desc, fq.page.unwrap_or(1), &rows),
            )
        }
        Err(e @ (FleetError::BadQuery(_) | FleetError::BadRequest(_))) => (
            StatusCode::BAD_REQUEST,
            html! {
                p.error #q-error role="alert" { (e.to_string()) }
                p.muted { "Nothing was searched. Fix the query, or clear it to list every agent." }
            },
        ),
        Err(e) => return fleet_error(&op, &e),
    };
    let body = html! {
        h1 { "Fleet" }
        (layout::live("counts", "agents", counts(&summary, &q)))
        form #search role="search" method="get" action="/ui/fleet" {
            label for="q" { "Search agents" }
            div.searchrow {
                input #q type="search" name="q" value=(q) autocomplete="off" spellcheck="false"
                    placeholder="type:fluentd health:unhealthy label:env=prod"
                    aria-describedby="q-help";
                @if sort != Col::Host { input type="hidden" name="sort" value=(col_key(sort)); }
                @if desc { input type="hidden" name="dir" value="desc"; }
                button type="submit" { "Search" }
            }
            p #q-help .muted {
                "Terms are ANDed; " code { "-" } " negates. Keys: " code { "type:" } " "
                code { "health:" } " " code { "state:" } " " code { "version:" } " "
                code { "host:" } " " code { "label:k=v" } " " code { "capability:" } " "
                code { "transport:" } ", or any attribute by its dotted name."
            }
        }
        (layout::live("results", "agents", results))
    };
    markup_response(status, layout::page("Fleet", Nav::Fleet, Some(&op), body))
}

/// The query with `term` added, or removed when it is already there.
fn toggle(q: &str, term: &str) -> (String, bool) {
    let terms: Vec<&str> = q.split_whitespace().collect();
    if terms.contains(&term) {
        (
            terms
                .into_iter()
                .filter(|t| *t != term)
                .collect::<Vec<_>>()
                .join(" "),
            true,
        )
    } else if q.is_empty() {
        (term.to_string(), false)
    } else {
        (format!("{q} {term}"), false)
    }
}

fn quoted(v: &str) -> String {
    if v.chars().any(|c| c.is_whitespace() || c == ':') {
        format!("\"{}\"", v.replace('"', ""))
    } else {
        v.to_string()
    }
}

fn facet(q: &str, group: &str, label: &str, term: Option<String>, n: u64) -> Markup {
    html! {
        @match term {
            Some(term) => {
                @let (next, on) = toggle(q, &term);
                a.chip.on[on] href={"/ui/fleet?q=" (urlencode(&next))}
                    data-facet=(group) data-value=(label) aria-current=[on.then_some("true")]
                    title=(if on { format!("Remove {term} from the search") } else { format!("Search {term}") }) {
                    span.k { (label) } span.count { (n) }
                }
            }
            None => {
                span.chip data-facet=(group) data-value=(label) {
                    span.k { (label) } span.count { (n) }
                }
            }
        }
    }
}

fn counts(summary: &Value, q: &str) -> Markup {
    let n = |group: &str, k: &str| summary[group][k].as_u64().unwrap_or(0);
    let mut types: Vec<(String, u64)> = summary["by_type"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    types.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut versions: Vec<(String, u64)> = summary["by_version"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let more_versions = versions.len().saturating_sub(8);
    versions.truncate(8);
    html! {
        section.counts aria-label="Fleet counts" {
            div.total { span.count #total { (summary["total"].as_u64().unwrap_or(0)) } " agents" }
            div.group role="group" aria-label="By state" {
                span.gl { "State" }
                @for s in ["healthy", "late", "offline"] {
                    (facet(q, "state", s, Some(format!("state:{s}")), n("by_state", s)))
                }
            }
            div.group role="group" aria-label="By health" {
                span.gl { "Health" }
                @for h in ["healthy", "unhealthy", "unknown"] {
                    (facet(q, "health", h, Some(format!("health:{h}")), n("by_health", h)))
                }
            }
            div.group role="group" aria-label="By type" {
                span.gl { "Type" }
                @for (t, c) in &types {
                    @if t.is_empty() {
                        (facet(q, "type", "(none)", None, *c))
                    } @else {
                        (facet(q, "type", t, Some(format!("type:{}", quoted(t))), *c))
                    }
                }
            }
            div.group role="group" aria-label="By version" {
                span.gl { "Version" }
                @for (v, c) in &versions {
                    @if v == "unknown" {
                        (facet(q, "version", v, Some("-version:*".to_string()), *c))
                    } @else {
                        (facet(q, "version", v, Some(format!("version:{}", quoted(v))), *c))
                    }
                }
                @if more_versions > 0 { span.muted { "+" (more_versions) " more" } }
            }
        }
    }
}

fn sort_link(q: &str, c: Col, key: &str, label: &str, sort: Col, desc: bool) -> Markup {
    let current = c == sort;
    let next_desc = current && !desc;
    let href = format!(
        "/ui/fleet?q={}&sort={key}{}",
        urlencode(q),
        if next_desc { "&dir=desc" } else { "" }
    );
    let aria = if current {
        if desc {
            "descending"
        } else {
            "ascending"
        }
    } else {
        "none"
    };
    html! {
        th scope="col" aria-sort=(aria) {
            a href=(href) {
                (label)
                @if current { span.arrow aria-hidden="true" { @if desc { " ▼" } @else { " ▲" } } }
            }
        }
    }
}

fn results(q: &str, sort: Col, desc: bool, page: usize, rows: &[AgentRow]) -> Markup {
    let now = now_ms();
    let total = rows.len();
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let page = page.clamp(1, pages);
    let start = (page - 1) * PAGE_SIZE;
    let shown = &rows[start.min(total)..(start + PAGE_SIZE).min(total)];
    let base = format!(
        "/ui/fleet?q={}&sort={}{}",
        urlencode(q),
        col_key(sort),
        if desc { "&dir=desc" } else { "" }
    );
    html! {
        p.matches #matches data-total=(total) {
            @if total == 0 { "No agent matches." }
            @else { "Agents " (start + 1) "–" (start + shown.len()) " of " (total) }
        }
        @if total > 0 {
            div.tablewrap {
                table.agents {
                    caption.sr-only { "Agents matching the search, sortable by column" }
                    thead { tr {
                        @for (c, key, label) in COLS { (sort_link(q, c, key, label, sort, desc)) }
                        th scope="col" { "Labels" }
                    } }
                    tbody {
                        @for r in shown {
                            tr data-uid=(r.uid) {
                                td { a href={"/ui/agents/" (r.uid)} { (display_name(r)) } }
                                td { (r.agent_type) }
                                td { (r.version.as_deref().unwrap_or("")) }
                                td { (layout::health_badge(r.healthy)) }
                                td { (layout::state_badge(r.state)) }
                                td { (last_seen(&r.last_seen, now)) }
                                td.labels { @for (k, v) in &r.labels { span.label { (k) "=" (v) } " " } }
                            }
                        }
                    }
                }
            }
            @if pages > 1 {
                nav.pager aria-label="Pages" {
                    @if page > 1 { a rel="prev" href={(base) "&page=" (page - 1)} { "← Previous" } }
                    span { "Page " (page) " of " (pages) }
                    @if page < pages { a rel="next" href={(base) "&page=" (page + 1)} { "Next →" } }
                }
            }
        }
    }
}

fn last_seen(rfc: &str, now: i64) -> Markup {
    match crate::views::parse_time("last_seen", rfc) {
        Ok(ms) => layout::ago(ms, now),
        Err(_) => html! { (rfc) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facets_toggle_terms() {
        assert_eq!(toggle("", "state:late"), ("state:late".into(), false));
        assert_eq!(
            toggle("type:fluentd", "state:late"),
            ("type:fluentd state:late".into(), false)
        );
        assert_eq!(
            toggle("type:fluentd state:late", "state:late"),
            ("type:fluentd".into(), true)
        );
        assert_eq!(quoted("Fluent Bit - 5.1.1"), "\"Fluent Bit - 5.1.1\"");
        assert_eq!(quoted("5.1.1"), "5.1.1");
    }
}

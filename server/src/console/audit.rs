//! The audit page: the trail filtered by actor, channel, agent, operation and time, newest
//! first, with the hash chain's verification state.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{self, Nav};
use super::{fleet_error, markup_response, urlencode, Op, S};
use crate::audit::{ChainBreak, Verified};
use crate::model::{now_ms, AuditFilter, AuditRecord, Channel, Millis};

/// Records per page.
const PAGE: usize = 50;
/// A verification is reused for this long (it walks the whole chain); "Verify now" forces one.
const CHECK_TTL_MS: Millis = 30_000;

/// One verification of the chain and when it ran.
pub struct Check {
    at: Millis,
    result: Result<Verified, ChainBreak>,
}

#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    actor: Option<String>,
    channel: Option<String>,
    agent: Option<String>,
    operation: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
    verify: Option<String>,
}

const CHANNELS: [Channel; 8] = [
    Channel::Rest,
    Channel::Mcp,
    Channel::Console,
    Channel::Cli,
    Channel::Slack,
    Channel::Discord,
    Channel::Teams,
    Channel::System,
];

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A time bound: RFC 3339, unix milliseconds, or a browser's `datetime-local` (UTC).
fn time_bound(name: &str, s: &str) -> Result<Millis, String> {
    let s = s.trim();
    let full = if s.len() == 16 && s.as_bytes().get(10) == Some(&b'T') {
        format!("{s}:00Z")
    } else if s.len() == 19 && s.as_bytes().get(10) == Some(&b'T') {
        format!("{s}Z")
    } else {
        s.to_string()
    };
    crate::views::parse_time(name, &full)
}

/// `GET /ui/audit`.
pub async fn page(State(st): State<S>, op: Op, Query(aq): Query<AuditQuery>) -> Response {
    let mut filter = AuditFilter {
        actor: nonempty(&aq.actor).map(str::to_string),
        operation: nonempty(&aq.operation).map(str::to_string),
        limit: PAGE + 1,
        ..Default::default()
    };
    let mut error = None;
    if let Some(c) = nonempty(&aq.channel) {
        match Channel::parse(c) {
            Some(c) => filter.channel = Some(c),
            None => error = Some(format!("unknown channel {c:?}")),
        }
    }
    if let Some(a) = nonempty(&aq.agent) {
        // A uid, command or batch id is taken as is (records name those as targets too).
        filter.agent = Some(match uuid::Uuid::parse_str(a) {
            Ok(u) => u.to_string(),
            Err(_) => match st.fleet.resolve_agent(op.caller(), a).await {
                Ok(u) => u.to_string(),
                Err(e) => return fleet_error(&op, &e),
            },
        });
    }
    for (name, v, slot) in [
        ("since", &aq.since, &mut filter.since),
        ("until", &aq.until, &mut filter.until),
    ] {
        if let Some(s) = nonempty(v) {
            match time_bound(name, s) {
                Ok(t) => *slot = Some(t),
                Err(e) => error = Some(e),
            }
        }
    }
    if let Some(b) = nonempty(&aq.before) {
        match b.parse() {
            Ok(id) => filter.before_id = Some(id),
            Err(_) => error = Some(format!("cursor {b:?} is not a record id")),
        }
    }
    let recs = if error.is_some() {
        Vec::new()
    } else {
        match st.fleet.audit(op.caller(), &filter).await {
            Ok(r) => r,
            Err(e) => return fleet_error(&op, &e),
        }
    };
    let check = match chain_state(&st, &op, aq.verify.is_some()).await {
        Ok(c) => c,
        Err(e) => return fleet_error(&op, &e),
    };
    let more = recs.len() > PAGE;
    let recs = &recs[..recs.len().min(PAGE)];
    let older = recs.last().filter(|_| more).map(|r| {
        let v = |o: &Option<String>| urlencode(o.as_deref().unwrap_or(""));
        format!(
            "/ui/audit?actor={}&channel={}&agent={}&operation={}&since={}&until={}&before={}",
            v(&aq.actor),
            v(&aq.channel),
            v(&aq.agent),
            v(&aq.operation),
            v(&aq.since),
            v(&aq.until),
            r.id
        )
    });
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let val = |o: &Option<String>| o.clone().unwrap_or_default();
    let body = html! {
        h1 { "Audit trail" }
        (layout::live("chain", "audit", check))
        form.row role="search" method="get" action="/ui/audit" {
            label for="a-actor" { "Actor" }
            input #a-actor name="actor" value=(val(&aq.actor));
            label for="a-channel" { "Channel" }
            select #a-channel name="channel" {
                option value="" { "any" }
                @for c in CHANNELS { option value=(c.as_str()) selected[filter.channel == Some(c)] { (c.as_str()) } }
            }
            label for="a-agent" { "Agent or id" }
            input #a-agent name="agent" value=(val(&aq.agent));
            label for="a-op" { "Operation" }
            input #a-op name="operation" value=(val(&aq.operation)) placeholder="command.queue";
            label for="a-since" { "Since (UTC)" }
            input #a-since type="datetime-local" step="1" name="since" value=(val(&aq.since));
            label for="a-until" { "Until (UTC)" }
            input #a-until type="datetime-local" step="1" name="until" value=(val(&aq.until));
            button type="submit" { "Filter" }
        }
        @if let Some(e) = &error { p.error role="alert" { (e) } }
        @let list = html! {
            @if recs.is_empty() { p.muted { "No records." } } @else { (table(recs)) }
            @if let Some(h) = &older { nav.pager aria-label="Pages" { a rel="next" href=(h) { "Older →" } } }
        };
        (layout::live("audit-list", "audit", list))
    };
    markup_response(status, layout::page("Audit", Nav::Audit, Some(&op), body))
}

/// The chain's verification state, from a recent check or a fresh one.
async fn chain_state(st: &S, op: &Op, force: bool) -> Result<Markup, crate::service::FleetError> {
    let now = now_ms();
    let cached = {
        let c = st.audit_check.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .filter(|c| !force && now - c.at < CHECK_TTL_MS)
            .map(|c| render_check(c, now))
    };
    if let Some(m) = cached {
        return Ok(m);
    }
    let result = st.fleet.verify_audit(op.caller()).await?;
    if let Err(b) = &result {
        tracing::error!(record = b.id, reason = %b.reason, "audit chain broken (seen by the console)");
    }
    let check = Check { at: now, result };
    let m = render_check(&check, now);
    *st.audit_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(check);
    Ok(m)
}

fn render_check(c: &Check, now: Millis) -> Markup {
    html! {
        div.chain #chain-state data-intact=(c.result.is_ok()) {
            @match &c.result {
                Ok(v) => {
                    span.badge.health-healthy { "chain intact" }
                    " " (v.count) " records verified"
                    @if let Some(h) = &v.head { "; head " code.hash title=(h.to_string()) { (h.id) ":" (&h.hash[..12]) "…" } }
                }
                Err(b) => {
                    span.badge.health-unhealthy { "chain broken" }
                    " at record " (b.id) ": " (b.reason)
                }
            }
            " · checked " (layout::ago(c.at, now)) " "
            a href="/ui/audit?verify=1" { "Verify now" }
        }
    }
}

fn target(t: &str) -> Markup {
    html! {
        @match uuid::Uuid::parse_str(t) {
            Ok(u) => a href={"/ui/audit?agent=" (u)} title=(u) { code { (super::commands::short(&u)) } },
            Err(_) => code { (t) },
        }
    }
}

/// A table of audit records.
pub fn table(recs: &[AuditRecord]) -> Markup {
    html! {
        div.tablewrap {
            table.audit {
                caption.sr-only { "Audit records, newest first" }
                thead { tr {
                    th scope="col" { "#" } th scope="col" { "Time" } th scope="col" { "Actor" }
                    th scope="col" { "Channel" } th scope="col" { "Operation" } th scope="col" { "Targets" }
                    th scope="col" { "Outcome" } th scope="col" { "Details" }
                } }
                tbody {
                    @for r in recs {
                        tr data-operation=(r.operation) data-channel=(r.channel.as_str()) {
                            td { (r.id) }
                            td { (layout::at(r.ts)) }
                            td { (r.actor) }
                            td { span.channel { (r.channel.as_str()) } }
                            td { code { (r.operation) } }
                            td.targets {
                                @for t in r.targets.iter().take(3) { (target(t)) " " }
                                @if r.targets.len() > 3 { span.muted { "+" (r.targets.len() - 3) } }
                            }
                            td { (r.outcome) }
                            td.result { @if !r.params.is_null() { code.small { (truncate(&r.params.to_string())) } } }
                        }
                    }
                }
            }
        }
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= 120 {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(120).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_time_inputs_are_utc() {
        assert_eq!(time_bound("since", "1970-01-01T00:01").unwrap(), 60_000);
        assert_eq!(time_bound("since", "1970-01-01T00:00:02").unwrap(), 2_000);
        assert_eq!(time_bound("since", "5").unwrap(), 5);
        assert!(time_bound("since", "yesterday").is_err());
    }
}

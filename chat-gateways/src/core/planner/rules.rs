//! The rule planner: the slash grammar (`agents <query>`, `restart <query|host>`, ...) and the
//! everyday phrasings an on-call engineer types ("which fluentd agents are unhealthy in
//! prod?", "restart them"), deterministic and offline.
//!
//! Words map to terms of the search language (`type:fluentd`, `health:unhealthy`,
//! `label:env=prod`, `host:web-3`); a word it does not know is free text in a search, but in a
//! state-changing request it makes the planner ask back: a restart is never aimed at a guess.

use serde_json::{json, Map, Value};

use super::{Local, Plan, ThreadContext};

/// Fleet events a subscription can name (`subscribe <query> offline,recovered`).
pub const EVENTS: &[&str] = &[
    "unhealthy",
    "offline",
    "recovered",
    "command_failed",
    "config_failed",
];

/// Plans one message. `me` is the asker's audit actor, for "my last command".
pub fn plan(text: &str, ctx: &ThreadContext, me: &str) -> Plan {
    let (body, code) = split_code_block(text);
    let body = strip_address(body.trim());
    let words: Vec<&str> = body.split_whitespace().collect();
    let Some(first) = words.first() else {
        return Plan::Local(Local::Help);
    };
    let rest = &words[1..];
    match first.to_ascii_lowercase().as_str() {
        "help" | "?" | "commands?" if rest.is_empty() => Plan::Local(Local::Help),
        "summary" if rest.is_empty() => Plan::tool("fleet_summary", json!({})),
        "catalog" if rest.is_empty() => Plan::tool("commands_catalog", json!({})),
        "agents" if rest.iter().all(|w| is_query_term(w)) => {
            Plan::tool("agents_search", query_args(&rest.join(" ")))
        }
        "agent" if rest.len() == 1 => Plan::tool("agent_get", json!({"agent": clean(rest[0])})),
        "config" if rest.len() == 1 && is_query_term(rest[0]) && rest[0].contains(':') => {
            Plan::tool("remote_config_get", json!({"query": rest[0]}))
        }
        "config" if rest.len() == 1 => {
            Plan::tool("remote_config_get", json!({"agent": clean(rest[0])}))
        }
        "push-config" | "push_config" => push_config(rest, code),
        "chatops" => chatops(rest),
        "status" if rest.len() == 1 || (rest.len() == 2 && rest[0] == "batch") => status(rest, ctx),
        "cancel" if rest.len() == 1 && looks_like_id(rest[0]) => {
            Plan::tool("command_cancel", json!({"command_id": rest[0]}))
        }
        "audit" if rest.iter().all(|w| w.contains('=') || !w.contains(':')) => audit(rest),
        "subscribe" => subscribe(rest),
        "subscriptions" if rest.is_empty() => Plan::Local(Local::Subscriptions),
        "unsubscribe" if rest.len() == 1 => Plan::Local(Local::Unsubscribe {
            id: rest[0].to_string(),
        }),
        _ => natural(body, ctx, me),
    }
}

/// Text before a fenced ``` block, and the block's body (a config file to push).
fn split_code_block(text: &str) -> (&str, Option<String>) {
    match text.find("```") {
        Some(i) => {
            let after = &text[i + 3..];
            let end = after.find("```").unwrap_or(after.len());
            let mut body = &after[..end];
            // A language tag on the opening fence line (```ini) is not part of the file.
            if let Some(nl) = body.find('\n') {
                if !body[..nl].trim().contains(' ') {
                    body = &body[nl + 1..];
                }
            }
            (&text[..i], Some(body.to_string()))
        }
        None => (text, None),
    }
}

/// Drops a leading `/flotilla`, `@flotilla` or `flotilla,` the platform left in.
fn strip_address(text: &str) -> &str {
    let lower = text.to_ascii_lowercase();
    for p in [
        "/flotilla",
        "@flotilla",
        "flotilla,",
        "flotilla:",
        "hey flotilla,",
    ] {
        if lower.starts_with(p) {
            return text[p.len()..].trim_start();
        }
    }
    text
}

/// A word without surrounding punctuation or a possessive `'s`.
fn clean(w: &str) -> String {
    let w =
        w.trim_matches(|c: char| matches!(c, '?' | '!' | ',' | '.' | '"' | '\'' | '`' | '(' | ')'));
    let w = w
        .strip_suffix("'s")
        .or_else(|| w.strip_suffix("’s"))
        .unwrap_or(w);
    w.to_string()
}

/// A term of the search language as typed: `key:value`, `-term`, a glob.
fn is_query_term(w: &str) -> bool {
    w.contains(':')
        || w.starts_with('-')
        || w.contains('*')
        || w.contains('=')
        || looks_like_host(w)
}

/// web-3, db01.prod.example.com, ip-10-0-0-7: letters and digits joined by `-` or `.`, with a
/// digit or a dot in it (so "fluent-bit" and "td-agent" are not hosts).
fn looks_like_host(w: &str) -> bool {
    let w = w.to_ascii_lowercase();
    if w.is_empty() || !w.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    if !w
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return false;
    }
    if looks_like_version(&w) || KNOWN_COMPOUNDS.contains(&w.as_str()) {
        return false;
    }
    let has_sep = w.contains('-') || w.contains('.');
    let has_digit = w.chars().any(|c| c.is_ascii_digit());
    let has_alpha = w.chars().any(|c| c.is_ascii_alphabetic());
    has_alpha && ((has_sep && has_digit) || w.matches('.').count() >= 2)
}

/// gw-web-host, logs.eu: letters and digits joined by `-`, `.` or `_`, at least one joint and
/// one letter; an agent's name when it is the only target word of a restart, shutdown or
/// resync.
fn looks_like_name(w: &str) -> bool {
    w.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && w.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && w.contains(['-', '.', '_'])
        && w.chars().any(|c| c.is_ascii_alphabetic())
        && !KNOWN_COMPOUNDS.contains(&w)
}

const KNOWN_COMPOUNDS: &[&str] = &["fluent-bit", "td-agent", "push-config", "force-resync"];

/// 3.1.4, v5.1, 2.0.
fn looks_like_version(w: &str) -> bool {
    let v = w.strip_prefix('v').unwrap_or(w);
    v.contains('.')
        && v.split('.').count() <= 4
        && v.split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// A command or batch id (a UUID) or an agent uid (hex, 26+ characters).
fn looks_like_id(w: &str) -> bool {
    w.len() >= 16 && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

fn query_args(q: &str) -> Value {
    if q.trim().is_empty() {
        json!({})
    } else {
        json!({"query": q.trim()})
    }
}

/// `<target>` of a command in the grammar: one agent (a single reference) or a query.
fn grammar_target(rest: &[&str]) -> Option<(&'static str, String)> {
    match rest {
        [] => None,
        [one] if !one.contains(':') && !one.contains('*') && !one.starts_with('-') => {
            Some(("agent", clean(one)))
        }
        _ if rest.iter().all(|w| is_query_term(w)) => Some(("query", rest.join(" "))),
        _ => None,
    }
}

fn push_config(rest: &[&str], code: Option<String>) -> Plan {
    let suggestions = vec![
        "push-config web-3 fluent-bit.conf ```<file body>```".to_string(),
        "config web-3".to_string(),
    ];
    let (file, target) = match rest.split_last() {
        Some((f, t)) if !t.is_empty() => (clean(f), grammar_target(t)),
        _ => {
            return Plan::AskBack {
                understood: "a config push, without a target and a file name".into(),
                suggestions,
            }
        }
    };
    let (Some((key, target)), Some(body)) = (target, code) else {
        return Plan::AskBack {
            understood: format!("a config push of {file}, but not to which agents or with what body (put it in a ``` block)"),
            suggestions,
        };
    };
    let mut files = Map::new();
    files.insert(file, Value::String(body));
    Plan::tool("remote_config_push", json!({key: target, "files": files}))
}

fn chatops(rest: &[&str]) -> Plan {
    let (kv, target): (Vec<&str>, Vec<&str>) = rest
        .iter()
        .partition(|w| w.contains('=') && !w.starts_with("label:") && !w.contains(':'));
    let mut tag = None;
    let mut attributes = Map::new();
    for w in kv {
        let (k, v) = w.split_once('=').unwrap_or((w, ""));
        if k == "tag" {
            tag = Some(v.to_string());
        } else {
            attributes.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
    let suggestions = vec![
        "chatops web-3 tag=reload".to_string(),
        "chatops type:fluentbit label:env=prod tag=flush level=debug".to_string(),
    ];
    match (grammar_target(&target), tag) {
        (Some((key, t)), Some(tag)) if !tag.is_empty() => {
            let mut params = json!({"tag": tag});
            if !attributes.is_empty() {
                params["attributes"] = Value::Object(attributes);
            }
            Plan::tool(
                "command_queue",
                json!({key: t, "kind": "chatops", "params": params}),
            )
        }
        (None, _) => Plan::AskBack {
            understood: "a ChatOps command, but not for which agents".into(),
            suggestions,
        },
        (Some(_), _) => Plan::AskBack {
            understood: "a ChatOps command without its tag=… (the route it posts to)".into(),
            suggestions,
        },
    }
}

fn status(rest: &[&str], ctx: &ThreadContext) -> Plan {
    let (batch, id) = match rest {
        ["batch", id] => (true, *id),
        [id] => (false, *id),
        _ => unreachable!("matched by the caller"),
    };
    if matches!(id, "last" | "it" | "that") {
        return last_command(ctx, None);
    }
    if !looks_like_id(id) {
        return Plan::AskBack {
            understood: format!("the status of {id:?}, which is not a command id"),
            suggestions: vec!["status last".into(), format!("agent {id}")],
        };
    }
    let key = if batch { "batch_id" } else { "command_id" };
    Plan::tool("command_status", json!({key: id}))
}

/// "what happened to my last command?": the thread's last command or batch, else the asker's
/// latest queued commands from the audit trail.
fn last_command(ctx: &ThreadContext, me: Option<&str>) -> Plan {
    if let Some(b) = &ctx.last_batch {
        return Plan::tool("command_status", json!({"batch_id": b}));
    }
    if let Some(c) = &ctx.last_command {
        return Plan::tool("command_status", json!({"command_id": c}));
    }
    match me {
        Some(me) => Plan::tool(
            "audit_query",
            json!({"actor": me, "operation": "command.queue", "limit": 5}),
        ),
        None => Plan::AskBack {
            understood: "the status of the last command, but none was queued in this thread".into(),
            suggestions: vec!["status <command id>".into(), "audit".into()],
        },
    }
}

fn audit(rest: &[&str]) -> Plan {
    let mut args = Map::new();
    for w in rest {
        match w.split_once('=') {
            Some((k, v))
                if matches!(
                    k,
                    "actor" | "channel" | "agent" | "operation" | "since" | "until"
                ) =>
            {
                args.insert(k.to_string(), json!(v));
            }
            Some((k, _)) => {
                return Plan::AskBack {
                    understood: format!("an audit query with an unknown filter {k:?}"),
                    suggestions: vec!["audit web-3".into(), "audit channel=slack".into()],
                }
            }
            None => {
                args.insert("agent".into(), json!(clean(w)));
            }
        }
    }
    Plan::tool("audit_query", Value::Object(args))
}

fn subscribe(rest: &[&str]) -> Plan {
    let mut events = Vec::new();
    let mut query = Vec::new();
    for w in rest {
        let parts: Vec<&str> = w.split(',').filter(|p| !p.is_empty()).collect();
        let w2 = w.strip_prefix("events=").unwrap_or(w);
        let parts2: Vec<&str> = w2.split(',').filter(|p| !p.is_empty()).collect();
        if !parts2.is_empty() && parts2.iter().all(|p| EVENTS.contains(p)) {
            events.extend(parts2.iter().map(|p| p.to_string()));
        } else if !parts.is_empty() {
            query.push(*w);
        }
    }
    if query.is_empty() && events.is_empty() {
        return Plan::AskBack {
            understood: "a subscription, but to what".into(),
            suggestions: vec![
                "subscribe health:unhealthy type:fluentd".into(),
                "subscribe label:env=prod offline,recovered".into(),
            ],
        };
    }
    Plan::Local(Local::Subscribe {
        query: query.join(" "),
        events,
    })
}

/// What the words of a request said about its targets.
#[derive(Default, Debug)]
struct Targets {
    terms: Vec<String>,
    hosts: Vec<String>,
    /// Words it did not know.
    unknown: Vec<String>,
    /// "them", "those", "it": the thread's last agents.
    them: bool,
    /// "all", "every", "everything": the whole fleet.
    all: bool,
}

impl Targets {
    fn query(&self) -> String {
        let mut t: Vec<String> = self.hosts.iter().map(|h| format!("host:{h}")).collect();
        t.extend(self.terms.iter().cloned());
        t.join(" ")
    }
    fn is_empty(&self) -> bool {
        self.terms.is_empty() && self.hosts.is_empty()
    }
}

/// Words that carry no target: question words, articles, fillers, nouns for agents.
const FILLER: &[&str] = &[
    "which",
    "what",
    "whats",
    "what's",
    "are",
    "is",
    "the",
    "a",
    "an",
    "agents",
    "agent",
    "nodes",
    "node",
    "instances",
    "instance",
    "show",
    "me",
    "list",
    "find",
    "get",
    "please",
    "of",
    "in",
    "on",
    "with",
    "that",
    "there",
    "any",
    "my",
    "our",
    "running",
    "currently",
    "do",
    "we",
    "have",
    "us",
    "for",
    "to",
    "fleet",
    "servers",
    "server",
    "machines",
    "machine",
    "hosts",
    "host",
    "can",
    "you",
    "could",
    "would",
    "give",
    "tell",
    "about",
    "now",
    "right",
    "pls",
    "kindly",
    "ones",
    "one",
    "whose",
    "where",
    "at",
    "from",
    "by",
    "how",
    "many",
    "much",
    "count",
    "number",
    "display",
    "see",
    "look",
    "up",
    "lookup",
    "just",
    "only",
    "some",
    "currently",
    "being",
    "been",
    "be",
    "and",
    "or",
    "go",
    "ahead",
    "i",
    "want",
    "need",
    "let's",
    "lets",
    "quickly",
    "again",
    "hey",
    "hi",
    "shippers",
    "shipper",
    "pipelines",
    "pipeline",
    "daemons",
    "run",
    "runs",
    "anything",
    "ok",
    "okay",
    "ask",
    "did",
    "done",
    "doing",
    "ones?",
    "right now",
    "today",
    "here",
    "instance?",
    "processes",
    "process",
    "hostname",
    "named",
    "called",
];

/// One or two words → a search term.
fn term_of(w: &str, next: Option<&str>) -> Option<(String, usize)> {
    let pair = next.map(|n| format!("{w} {n}"));
    if let Some(p) = pair.as_deref() {
        let t = match p {
            "fluent bit" => Some("type:fluentbit"),
            "open telemetry" => Some("type:otelcol"),
            "not healthy" => Some("health:unhealthy"),
            "not connected" | "not reporting" => Some("state:offline"),
            _ => None,
        };
        if let Some(t) = t {
            return Some((t.to_string(), 2));
        }
    }
    let t = match w {
        "fluentbit" | "fluent-bit" | "fluentbits" | "fb" | "bit" => "type:fluentbit",
        "fluentd" | "fluentds" | "td-agent" | "td-agents" => "type:fluentd",
        "otel" | "otelcol" | "opentelemetry" | "collector" | "collectors" => "type:otelcol",
        "unhealthy" | "failing" | "broken" | "sick" | "erroring" | "degraded" | "dropping"
        | "errors" | "error" | "red" => "health:unhealthy",
        "healthy" | "green" => "health:healthy",
        "offline" | "down" | "dead" | "disconnected" | "unreachable" | "missing" | "silent" => {
            "state:offline"
        }
        "online" | "connected" | "alive" | "reporting" => "state:online",
        "late" | "lagging" | "stale" | "slow" => "state:late",
        "prod" | "production" => "label:env=prod",
        "staging" | "stage" => "label:env=staging",
        "dev" | "development" => "label:env=dev",
        "websocket" | "websockets" | "ws" => "transport:websocket",
        "polling" => "transport:http",
        _ => return None,
    };
    Some((t.to_string(), 1))
}

/// Reads the target words of a request (everything but its verb).
fn targets(words: &[String]) -> Targets {
    let mut t = Targets::default();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let next = words.get(i + 1).map(String::as_str);
        if w.is_empty() {
            i += 1;
            continue;
        }
        if let Some((term, n)) = term_of(w, next) {
            if !t.terms.contains(&term) {
                t.terms.push(term);
            }
            i += n;
            continue;
        }
        match w {
            "them" | "those" | "these" | "they" | "it" | "its" | "that" => t.them = true,
            "all" | "every" | "everything" | "entire" | "whole" | "each" | "everyone" => {
                t.all = true
            }
            "version" | "v" => {
                if let Some(v) = next.filter(|n| looks_like_version(n) || n.parse::<u32>().is_ok())
                {
                    t.terms
                        .push(format!("version:{}", v.trim_start_matches('v')));
                    i += 1;
                }
            }
            "label" | "labelled" | "labeled" | "tagged" => {
                if let Some(l) = next {
                    t.terms.push(format!("label:{l}"));
                    i += 1;
                }
            }
            "uid" => {
                if let Some(u) = next {
                    t.terms.push(format!("uid:{u}"));
                    i += 1;
                }
            }
            "host" | "hostname" | "node" | "server" | "machine" | "named" | "called"
                if next.is_some_and(|n| !FILLER.contains(&n) && term_of(n, None).is_none()) =>
            {
                t.hosts.push(next.unwrap_or_default().to_string());
                i += 1;
            }
            _ if w.contains(':') => t.terms.push(w.to_string()),
            _ if looks_like_version(w) => t
                .terms
                .push(format!("version:{}", w.trim_start_matches('v'))),
            _ if looks_like_host(w) => t.hosts.push(w.to_string()),
            _ if w.contains('=') => t.terms.push(format!("label:{w}")),
            _ if FILLER.contains(&w) => {}
            _ => t.unknown.push(w.to_string()),
        }
        i += 1;
    }
    t
}

fn words_of(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| clean(w).to_ascii_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

fn has(words: &[String], any: &[&str]) -> bool {
    words.iter().any(|w| any.contains(&w.as_str()))
}

fn has_phrase(text: &str, any: &[&str]) -> bool {
    any.iter().any(|p| text.contains(p))
}

/// Everyday phrasings.
fn natural(text: &str, ctx: &ThreadContext, me: &str) -> Plan {
    let lower = text.to_ascii_lowercase().replace('’', "'");
    let words = words_of(&lower);
    if words.is_empty() {
        return Plan::Local(Local::Help);
    }

    // What Flotilla cannot do: said plainly, never approximated by something it can.
    const UNSUPPORTED: &[&str] = &[
        "delete",
        "remove",
        "drop",
        "wipe",
        "destroy",
        "uninstall",
        "install",
        "upgrade",
        "downgrade",
        "deploy",
        "rollback",
        "format",
        "purge",
        "erase",
        "reimage",
    ];
    let negated = has(&words, &["don't", "dont", "never", "not"])
        && has_phrase(&lower, &["don't ", "dont ", "do not ", "never "]);
    let verb = mutating_verb(&words, &lower);
    if negated && verb.is_some() {
        return Plan::Refuse {
            reason: "that reads as an instruction not to act, so nothing will be queued".into(),
            suggestions: vec!["agents health:unhealthy".into(), "help".into()],
        };
    }
    if let Some(w) = words.iter().find(|w| UNSUPPORTED.contains(&w.as_str())) {
        return Plan::Refuse {
            reason: format!(
                "Flotilla cannot {w} anything; it can restart, shut down, resync, send ChatOps \
                 commands and push configuration"
            ),
            suggestions: vec!["help".into(), "catalog".into()],
        };
    }
    if has(&words, &["help"])
        || has_phrase(
            &lower,
            &["what can you do", "how do i use", "how does this work"],
        )
    {
        return Plan::Local(Local::Help);
    }
    if lower.starts_with("yes")
        || lower == "ok"
        || lower == "confirm"
        || lower.starts_with("go ahead")
        || lower.starts_with("do it")
    {
        return Plan::AskBack {
            understood: "a confirmation in words; confirmations are given with the Confirm button of a preview, so a typo can never start an action".into(),
            suggestions: vec!["status last".into(), "help".into()],
        };
    }

    if let Some(kind) = verb {
        return mutating(kind, &words, ctx);
    }
    if has(&words, &["cancel", "abort"]) {
        return match &ctx.last_command {
            Some(c) => Plan::tool("command_cancel", json!({"command_id": c})),
            None => Plan::AskBack {
                understood: "cancelling a command, but none was queued in this thread".into(),
                suggestions: vec![
                    "cancel <command id>".into(),
                    "commands status=queued".into(),
                ],
            },
        };
    }
    if has_phrase(
        &lower,
        &["subscriptions", "what am i subscribed", "which alerts"],
    ) {
        return Plan::Local(Local::Subscriptions);
    }
    if has_phrase(
        &lower,
        &[
            "alert me",
            "notify me",
            "tell me when",
            "let me know when",
            "ping me when",
            "subscribe",
        ],
    ) {
        let rest: Vec<String> = words
            .iter()
            .filter(|w| {
                !matches!(
                    w.as_str(),
                    "alert"
                        | "notify"
                        | "let"
                        | "know"
                        | "when"
                        | "if"
                        | "ping"
                        | "subscribe"
                        | "goes"
                        | "go"
                        | "become"
                        | "becomes"
                        | "get"
                        | "gets"
                        | "anything"
                        | "something"
                )
            })
            .cloned()
            .collect();
        let t = targets(&rest);
        let mut events = Vec::new();
        let mut terms = Vec::new();
        for term in &t.terms {
            match term.as_str() {
                "state:offline" => events.push("offline".to_string()),
                "health:unhealthy" => events.push("unhealthy".to_string()),
                _ => terms.push(term.clone()),
            }
        }
        if has(&words, &["recover", "recovers", "recovered", "back"]) {
            events.push("recovered".into());
        }
        if has(&words, &["fail", "fails", "failed"]) && has(&words, &["command", "commands"]) {
            events.push("command_failed".into());
        }
        let mut q: Vec<String> = t.hosts.iter().map(|h| format!("host:{h}")).collect();
        q.extend(terms);
        return Plan::Local(Local::Subscribe {
            query: q.join(" "),
            events,
        });
    }
    if has_phrase(
        &lower,
        &[
            "last command",
            "my command",
            "what happened",
            "did it work",
            "did that work",
            "is it done",
            "has it finished",
            "how did it go",
            "how is it going",
            "progress",
        ],
    ) {
        return last_command(ctx, Some(me));
    }
    if has(&words, &["audit", "who", "history", "trail"]) {
        let t = targets(&words);
        let mut args = Map::new();
        if let Some(h) = t.hosts.first() {
            args.insert("agent".into(), json!(h));
        }
        if has(&words, &["slack"]) {
            args.insert("channel".into(), json!("slack"));
        }
        if has(&words, &["restarted", "restart", "queued"]) {
            args.insert("operation".into(), json!("command.queue"));
        }
        if has(&words, &["me", "i", "my"]) && !has(&words, &["show", "tell", "give"]) {
            args.insert("actor".into(), json!(me));
        }
        return Plan::tool("audit_query", Value::Object(args));
    }
    if has_phrase(
        &lower,
        &[
            "what commands can",
            "which commands can",
            "what can i run",
            "what commands are there",
            "command kinds",
            "catalog",
        ],
    ) {
        return Plan::tool("commands_catalog", json!({}));
    }
    if has(
        &words,
        &["config", "configuration", "conf", "configs", "pipeline"],
    ) {
        let rest: Vec<String> = words
            .iter()
            .filter(|w| {
                !matches!(
                    w.as_str(),
                    "config"
                        | "configuration"
                        | "conf"
                        | "configs"
                        | "pipeline"
                        | "effective"
                        | "current"
                )
            })
            .cloned()
            .collect();
        let t = targets(&rest);
        return match (t.hosts.as_slice(), t.terms.is_empty()) {
            ([h], true) => Plan::tool("remote_config_get", json!({"agent": h})),
            ([], true) if t.them && ctx.last_agents.len() == 1 => {
                Plan::tool("remote_config_get", json!({"agent": ctx.last_agents[0]}))
            }
            (_, _) if !t.is_empty() => Plan::tool("remote_config_get", json!({"query": t.query()})),
            _ => Plan::AskBack {
                understood: "a look at configuration, but not of which agent".into(),
                suggestions: vec!["config web-3".into(), "config type:fluentbit".into()],
            },
        };
    }
    if has(&words, &["commands", "queue", "queued", "pending"])
        && !has(&words, &["agents", "agent"])
    {
        let mut args = Map::new();
        for s in [
            "queued",
            "sent",
            "succeeded",
            "failed",
            "expired",
            "cancelled",
        ] {
            if has(&words, &[s]) {
                args.insert("status".into(), json!(s));
            }
        }
        if has(&words, &["pending"]) {
            args.insert("status".into(), json!("queued"));
        }
        let t = targets(
            &words
                .iter()
                .filter(|w| {
                    !matches!(
                        w.as_str(),
                        "commands"
                            | "queue"
                            | "queued"
                            | "pending"
                            | "failed"
                            | "sent"
                            | "succeeded"
                            | "expired"
                            | "cancelled"
                    )
                })
                .cloned()
                .collect::<Vec<_>>(),
        );
        if let Some(h) = t.hosts.first() {
            args.insert("agent".into(), json!(h));
        }
        return Plan::tool("commands_list", Value::Object(args));
    }
    let fleet_words = has_phrase(
        &lower,
        &[
            "summary",
            "overview",
            "the fleet",
            "fleet status",
            "fleet health",
            "whole fleet",
            "big picture",
            "how are we doing",
            "how's everything",
            "how is everything",
        ],
    );
    let t = targets(&words);
    if fleet_words && t.is_empty() {
        return Plan::tool("fleet_summary", json!({}));
    }
    let count = has_phrase(&lower, &["how many", "number of", "count "]);
    if count && t.is_empty() && !t.them {
        return Plan::tool("fleet_summary", json!({}));
    }
    // One agent named, nothing else: tell about it.
    if let ([h], true) = (t.hosts.as_slice(), t.terms.is_empty()) {
        if !count && !has(&words, &["agents", "which", "list", "search", "find"]) {
            return Plan::tool("agent_get", json!({"agent": h}));
        }
    }
    if t.them && t.is_empty() && !t.all {
        if let [one] = ctx.last_agents.as_slice() {
            return Plan::tool("agent_get", json!({"agent": one}));
        }
        if let Some(q) = &ctx.last_query {
            return Plan::tool("agents_search", json!({"query": q}));
        }
    }
    let searchy = has(
        &words,
        &[
            "which", "list", "show", "find", "search", "agents", "nodes", "any", "what", "whats",
            "what's", "are",
        ],
    ) || count;
    if !t.is_empty() && (searchy || t.unknown.is_empty()) {
        let mut q = t.query();
        // Unknown words narrow a search as free text: a read costs nothing if it is wrong.
        if !t.unknown.is_empty() && searchy {
            q = format!("{q} {}", t.unknown.join(" "));
        }
        return Plan::tool("agents_search", json!({"query": q}));
    }
    if searchy
        && t.unknown.is_empty()
        && t.is_empty()
        && (has(&words, &["agents", "nodes"]) || t.all)
    {
        return Plan::tool("agents_search", json!({}));
    }
    Plan::AskBack {
        understood: if t.unknown.is_empty() {
            "no request I know".to_string()
        } else {
            format!("words I do not know: {}", t.unknown.join(", "))
        },
        suggestions: vec!["agents health:unhealthy".into(), "help".into()],
    }
}

/// The command kind a request asks for, if it asks for one.
fn mutating_verb(words: &[String], lower: &str) -> Option<&'static str> {
    let shut_down = has(words, &["shut"]) && has(words, &["down"]);
    if shut_down
        || has_phrase(lower, &["shutdown", "power off", "turn off"])
        || has(words, &["stop", "kill", "halt"])
    {
        return Some("shutdown");
    }
    if has_phrase(
        lower,
        &[
            "resync",
            "re-sync",
            "full state",
            "force sync",
            "force-resync",
            "resend",
        ],
    ) {
        return Some("force_resync");
    }
    if has(
        words,
        &["restart", "reboot", "bounce", "kick", "cycle", "restarting"],
    ) {
        return Some("restart");
    }
    None
}

/// A restart, shutdown or resync in words: aimed only at what the words or the thread name.
fn mutating(kind: &'static str, words: &[String], ctx: &ThreadContext) -> Plan {
    let verbs = [
        "restart",
        "reboot",
        "bounce",
        "kick",
        "cycle",
        "restarting",
        "shut",
        "shutdown",
        "down",
        "stop",
        "kill",
        "halt",
        "resync",
        "re-sync",
        "force",
        "full",
        "state",
        "sync",
        "force-resync",
        "resend",
        "power",
        "off",
        "turn",
    ];
    let rest: Vec<String> = words
        .iter()
        .filter(|w| !verbs.contains(&w.as_str()))
        .cloned()
        .collect();
    let t = targets(&rest);
    let example = match kind {
        "force_resync" => "resync",
        k => k,
    };
    let ask = |understood: String| Plan::AskBack {
        understood,
        suggestions: vec![
            format!("{example} web-3"),
            format!("{example} type:fluentbit health:unhealthy label:env=prod"),
        ],
    };
    // A lone word shaped like a name (`gw-web-host`, `logs.eu`) names one agent even without
    // the digit `looks_like_host` wants: the server resolves it exactly (a unique host or
    // service name, `not_found` otherwise) and the preview shows that agent before anything
    // runs, so nothing is widened to a query on a guess. Only when nothing else was said
    // ("the flaky-ish ones" describes agents, it does not name one).
    if let ([name], true, false, false) = (t.unknown.as_slice(), t.is_empty(), t.them, t.all) {
        let alone = rest
            .iter()
            .all(|w| w == name || matches!(w.as_str(), "the" | "please" | "now"));
        if alone && looks_like_name(name) {
            return Plan::tool("command_queue", json!({"agent": name, "kind": kind}));
        }
    }
    if !t.unknown.is_empty() {
        return ask(format!(
            "a {kind}, but not which agents \"{}\" means",
            t.unknown.join(" ")
        ));
    }
    let args = |key: &str, v: &str| json!({key: v, "kind": kind});
    if t.is_empty() {
        if t.them {
            if let [one] = ctx.last_agents.as_slice() {
                return Plan::tool("command_queue", args("agent", one));
            }
            if let Some(q) = ctx.last_query.as_deref().filter(|q| !q.is_empty()) {
                return Plan::tool("command_queue", args("query", q));
            }
            return ask(format!(
                "a {kind} of \"them\", but this thread has no earlier search"
            ));
        }
        if t.all {
            return ask(format!(
                "a {kind} of the whole fleet, which is too broad to plan from words; name the agents with a query"
            ));
        }
        return ask(format!("a {kind}, but not of which agents"));
    }
    match (t.hosts.as_slice(), t.terms.is_empty()) {
        ([h], true) => Plan::tool("command_queue", args("agent", h)),
        _ => Plan::tool("command_queue", args("query", &t.query())),
    }
}

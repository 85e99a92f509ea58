//! The agent search language shared by REST, MCP, chat and fan-out.
//!
//! A query is whitespace-separated terms, all of which must match (AND). A term is free text
//! (case-insensitive substring of the uid, any attribute value or label) or `key:value`; a
//! leading `-` negates it; `"double quotes"` keep spaces. Values of attribute-like keys are
//! case-insensitive globs (`*`, `?`). Keys:
//! `type`, `health` (healthy|unhealthy|unknown), `state` (healthy|late|offline|online, from
//! when the agent was last heard against its heartbeat interval), `version` (the version
//! number inside `service.version`, e.g. `5.1.1` in `Fluent Bit - 5.1.1 (Community)`, or the
//! whole string), `name` (service.name), `host` = `host.name` = `hostname` (any host
//! attribute: `host.name`, `hostname`, `host.hostname`), `label` (`k=v` or `k`), `capability`
//! (a standard capability name, `chatops`/`shutdown`/`restart`/`remote_config`, or a custom
//! capability), `uid` (prefix), `transport` (http|websocket), `replaced` (yes|no: earlier
//! records of agents that re-registered under a new uid), and any other attribute key
//! containing a dot, e.g. `service.namespace:prod-*`.

use flotilla_proto::caps::{agent_capability_by_name, agent_has};
use flotilla_proto::AgentCapabilities;
use wildmatch::WildMatch;

use crate::commands::{has_custom, CAP_CHATOPS, CAP_SHUTDOWN};
use crate::model::{Agent, Liveness, Millis, Transport, HOST_ATTRIBUTES};

/// Why a query did not parse; names the offending term.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("unterminated quote in {0:?}")]
    Unterminated(String),
    #[error("term {term:?}: {message}")]
    BadTerm { term: String, message: String },
}

#[derive(Debug, Clone)]
enum Term {
    Text(String),
    Type(WildMatch),
    Health(&'static str),
    State(&'static str),
    Attr(String, WildMatch),
    /// Any host attribute ([`HOST_ATTRIBUTES`]); with the lowercased value when it has no
    /// wildcard, so an index answers it with one lookup.
    Host(WildMatch, Option<String>),
    /// The version number in `service.version`, or the whole string.
    Version(WildMatch),
    Label(String, Option<WildMatch>),
    Capability(String),
    UidPrefix(String),
    Transport(Transport),
    /// `replaced:yes` — earlier records of agents that re-registered under a new uid.
    Replaced(bool),
}

/// A parsed query. The empty query matches every agent.
#[derive(Debug, Clone, Default)]
pub struct Query {
    terms: Vec<(bool, Term)>,
}

fn glob(v: &str) -> WildMatch {
    WildMatch::new_case_insensitive(v)
}

fn split(q: &str) -> Result<Vec<String>, QueryError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in q.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err(QueryError::Unterminated(q.to_string()));
    }
    if any {
        out.push(cur);
    }
    Ok(out)
}

impl Query {
    pub fn parse(q: &str) -> Result<Query, QueryError> {
        let mut terms = Vec::new();
        for raw in split(q)? {
            let (neg, t) = match raw.strip_prefix('-') {
                Some(rest) if !rest.is_empty() => (true, rest),
                _ => (false, raw.as_str()),
            };
            let bad = |message: &str| QueryError::BadTerm {
                term: raw.clone(),
                message: message.into(),
            };
            let term = match t.split_once(':') {
                None => Term::Text(t.to_lowercase()),
                Some((k, v)) => {
                    if v.is_empty() {
                        return Err(bad("empty value after ':'"));
                    }
                    match k.to_ascii_lowercase().as_str() {
                        "type" => Term::Type(glob(v)),
                        "health" => Term::Health(match v.to_ascii_lowercase().as_str() {
                            "healthy" | "ok" | "true" => "healthy",
                            "unhealthy" | "false" => "unhealthy",
                            "unknown" => "unknown",
                            _ => return Err(bad("health is healthy, unhealthy or unknown")),
                        }),
                        "state" => Term::State(match v.to_ascii_lowercase().as_str() {
                            "healthy" => "healthy",
                            "late" => "late",
                            "offline" | "disconnected" => "offline",
                            "online" | "connected" => "online",
                            _ => return Err(bad("state is healthy, late, offline or online")),
                        }),
                        "version" => Term::Version(glob(v)),
                        "name" => Term::Attr("service.name".into(), glob(v)),
                        // Agents name the host differently (fluent-opamp: `hostname`); the
                        // README's `host.name:web-*` must find them all.
                        k if k == "host" || HOST_ATTRIBUTES.contains(&k) => Term::Host(
                            glob(v),
                            (!v.contains(['*', '?'])).then(|| v.to_lowercase()),
                        ),
                        "label" => match v.split_once('=') {
                            Some((lk, lv)) => Term::Label(lk.to_string(), Some(glob(lv))),
                            None => Term::Label(v.to_string(), None),
                        },
                        "capability" | "cap" => Term::Capability(v.to_string()),
                        "uid" | "id" => Term::UidPrefix(v.to_ascii_lowercase()),
                        "transport" => Term::Transport(match v.to_ascii_lowercase().as_str() {
                            "http" => Transport::Http,
                            "websocket" | "ws" => Transport::Websocket,
                            _ => return Err(bad("transport is http or websocket")),
                        }),
                        "replaced" => Term::Replaced(match v.to_ascii_lowercase().as_str() {
                            "yes" | "true" => true,
                            "no" | "false" => false,
                            _ => return Err(bad("replaced is yes or no")),
                        }),
                        _ if k.contains('.') => Term::Attr(k.to_string(), glob(v)),
                        _ => return Err(bad(
                            "unknown key (use type, health, state, version, name, host, label, \
                                 capability, uid, transport, replaced, or an attribute name with a dot)",
                        )),
                    }
                }
            };
            terms.push((neg, term));
        }
        Ok(Query { terms })
    }

    /// The terms an index can answer (not negated, on an indexed key): every agent matching
    /// the query is in the candidates of each. [`Query::matches`] still decides.
    pub fn indexed(&self) -> impl Iterator<Item = Indexed<'_>> {
        self.terms
            .iter()
            .filter(|(neg, _)| !neg)
            .filter_map(|(_, t)| {
                Some(match t {
                    Term::Type(g) => Indexed::Type(g),
                    Term::Health(h) => Indexed::Health(h),
                    Term::State(s) => Indexed::State(s),
                    Term::Version(g) => Indexed::Version(g),
                    Term::Host(g, exact) => Indexed::Host(g, exact.as_deref()),
                    Term::Label(k, _) => Indexed::Label(k),
                    Term::Capability(c) => Indexed::Capability(capability_term(c)),
                    _ => return None,
                })
            })
    }

    /// True if `agent` matches every term at time `now`.
    pub fn matches(&self, agent: &Agent, now: Millis) -> bool {
        self.terms
            .iter()
            .all(|(neg, t)| term_matches(t, agent, now) != *neg)
    }
}

fn term_matches(t: &Term, a: &Agent, now: Millis) -> bool {
    match t {
        Term::Text(s) => {
            a.uid.to_string().contains(s.as_str())
                || a.identifying
                    .iter()
                    .chain(a.non_identifying.iter())
                    .any(|(_, v)| v.to_lowercase().contains(s.as_str()))
                || a.labels.iter().any(|(k, v)| {
                    k.to_lowercase().contains(s.as_str()) || v.to_lowercase().contains(s.as_str())
                })
        }
        Term::Type(g) => g.matches(&a.agent_type()),
        Term::Health(h) => {
            let got = match a.health.as_ref().map(|h| h.healthy) {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "unknown",
            };
            got == *h
        }
        Term::State(s) => {
            let l = a.liveness(now);
            match *s {
                "online" => l != Liveness::Offline,
                "healthy" => l == Liveness::Healthy,
                "late" => l == Liveness::Late,
                _ => l == Liveness::Offline,
            }
        }
        Term::Attr(k, g) => a.attr(k).is_some_and(|v| g.matches(v)),
        Term::Host(g, _) => a.hosts().any(|h| g.matches(h)),
        Term::Version(g) => {
            a.version_number().is_some_and(|v| g.matches(v))
                || a.attr("service.version").is_some_and(|v| g.matches(v))
        }
        Term::Label(k, g) => match (a.labels.get(k), g) {
            (Some(v), Some(g)) => g.matches(v),
            (Some(_), None) => true,
            (None, _) => false,
        },
        Term::Capability(c) => capability_matches(a, c),
        Term::UidPrefix(p) => {
            a.uid.to_string().starts_with(p.as_str())
                || a.uid.simple().to_string().starts_with(p.as_str())
        }
        Term::Transport(t) => a.transport == Some(*t),
        Term::Replaced(yes) => a.replaced_by.is_some() == *yes,
    }
}

/// A term an index can answer: see [`Query::indexed`].
pub enum Indexed<'a> {
    Type(&'a WildMatch),
    Health(&'static str),
    State(&'static str),
    Version(&'a WildMatch),
    /// The pattern, and the lowercased value when it has no wildcard.
    Host(&'a WildMatch, Option<&'a str>),
    /// A label key (the agent has the label; its value is checked by the query).
    Label(&'a str),
    Capability(CapTerm),
}

/// What a `capability:` value asks for.
pub enum CapTerm {
    /// This custom capability, declared as is or as `request:<it>`.
    Custom(&'static str),
    /// A standard capability bit.
    Bit(AgentCapabilities),
    /// A glob over custom capabilities (with or without their `request:` prefix).
    Glob(WildMatch),
}

impl CapTerm {
    /// True if a declared custom capability `x` satisfies this term (never for [`CapTerm::Bit`]).
    pub fn custom_matches(&self, x: &str) -> bool {
        match self {
            CapTerm::Custom(c) => x == *c || x.strip_prefix("request:") == Some(*c),
            CapTerm::Bit(_) => false,
            CapTerm::Glob(g) => {
                g.matches(x) || x.strip_prefix("request:").is_some_and(|x| g.matches(x))
            }
        }
    }
}

pub fn capability_term(c: &str) -> CapTerm {
    match c.to_ascii_lowercase().as_str() {
        "chatops" => CapTerm::Custom(CAP_CHATOPS),
        "shutdown" => CapTerm::Custom(CAP_SHUTDOWN),
        "restart" => CapTerm::Bit(AgentCapabilities::AcceptsRestartCommand),
        "remote_config" | "remoteconfig" => CapTerm::Bit(AgentCapabilities::AcceptsRemoteConfig),
        "health" => CapTerm::Bit(AgentCapabilities::ReportsHealth),
        _ => match agent_capability_by_name(c) {
            Some(cap) => CapTerm::Bit(cap),
            None => CapTerm::Glob(glob(c)),
        },
    }
}

fn capability_matches(a: &Agent, c: &str) -> bool {
    match capability_term(c) {
        CapTerm::Custom(cap) => has_custom(a, cap),
        CapTerm::Bit(cap) => agent_has(a.capabilities, cap),
        t => a.custom_capabilities.iter().any(|x| t.custom_matches(x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Health;

    fn agent(host: &str, ty: &str, version: &str) -> Agent {
        let mut a = Agent::new(uuid::Uuid::now_v7(), 1_000, 30);
        a.identifying = vec![
            ("service.name".into(), ty.into()),
            ("service.version".into(), version.into()),
        ];
        a.non_identifying = vec![("host.name".into(), host.into())];
        a.connected = true;
        a.last_seen = 1_000;
        a
    }

    #[test]
    fn terms_and_globs() {
        let mut a = agent("web-3", "Fluent Bit", "5.1.1");
        a.labels.insert("env".into(), "prod".into());
        a.health = Some(Health {
            healthy: false,
            ..Default::default()
        });
        a.custom_capabilities = vec![format!("request:{CAP_CHATOPS}")];
        a.capabilities = 0x401;
        let m = |q: &str| Query::parse(q).unwrap().matches(&a, 2_000);
        assert!(m(""));
        assert!(m("host.name:web-*"));
        assert!(m("host.name:WEB-3"));
        assert!(!m("host.name:db-*"));
        assert!(m("type:fluentbit version:5.1.*"));
        assert!(!m("type:fluentd"));
        assert!(m("health:unhealthy"));
        assert!(m("state:healthy"));
        assert!(m("state:online"));
        assert!(!m("state:offline"));
        assert!(m("label:env=prod label:env"));
        assert!(!m("label:env=dev"));
        assert!(m(
            "capability:chatops capability:restart capability:AcceptsRestartCommand"
        ));
        assert!(!m("capability:remote_config"));
        assert!(m("web"));
        assert!(m("-type:fluentd"));
        assert!(!m("-web"));
        assert!(m("\"web-3\""));
        assert!(Query::parse("bogus:1").is_err());
        assert!(Query::parse("state:sleepy").is_err());
        assert!(Query::parse("\"open").is_err());
        assert!(Query::parse("host.name:").is_err());
    }

    /// fluent-opamp agents: `hostname` instead of `host.name`, the version inside a sentence.
    #[test]
    fn host_and_version_cover_how_agents_spell_them() {
        let mut a = agent("ignored", "Fluent Bit", "Fluent Bit - 5.1.1 (Community)");
        a.non_identifying = vec![("hostname".into(), "web-7".into())];
        let on = |a: &Agent, q: &str| Query::parse(q).unwrap().matches(a, 2_000);
        let m = |q: &str| on(&a, q);
        for q in [
            "host.name:web-*",
            "host:web-7",
            "hostname:WEB-?",
            "host.hostname:web-*",
            "version:5.1.*",
            "version:5.1.1",
            "version:\"Fluent Bit - 5.1.1 (Community)\"",
            "version:*community*",
            "-version:5.2.*",
            "-host.name:db-*",
        ] {
            assert!(m(q), "{q}");
        }
        for q in [
            "host.name:db-*",
            "version:5.2.*",
            "version:1.*",
            "service.version:5.1.*",
        ] {
            assert!(!m(q), "{q}");
        }
        a.non_identifying = vec![("host.hostname".into(), "db-2".into())];
        assert!(on(&a, "host.name:db-2") && !on(&a, "host:web-*"));
        a.non_identifying.clear();
        assert!(!on(&a, "host:*"), "no host attribute, nothing to match");
    }

    #[test]
    fn liveness_terms_follow_time() {
        let a = agent("h", "fluentd", "1.18.0");
        let q = Query::parse("state:late").unwrap();
        assert!(!q.matches(&a, 1_000 + 30_000));
        assert!(q.matches(&a, 1_000 + 60_000));
        assert!(Query::parse("state:offline")
            .unwrap()
            .matches(&a, 1_000 + 100_000));
    }
}

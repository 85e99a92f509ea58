//! The `/flotilla` application command: its sub-commands and options as Discord registers them
//! (`flotilla chat discord register` sends [`definition`]), and how an invocation becomes the
//! text the rule planner reads — one table for both, so what is registered is what is parsed.

use serde_json::{json, Value};

/// The command's name: `/flotilla`.
pub const NAME: &str = "flotilla";

/// Discord's application command option types (the ones used here).
const SUB_COMMAND: u64 = 1;
const STRING: u64 = 3;

/// One sub-command: its name (also the planner's first word, except `ask`), description, and
/// string options in the order the planner reads them.
pub struct Sub {
    pub name: &'static str,
    pub description: &'static str,
    /// (name, description, required)
    pub options: &'static [(&'static str, &'static str, bool)],
    /// Planner text when the only optional option is left out (`status` → `status last`).
    pub default: Option<&'static str>,
}

/// Every sub-command of `/flotilla`.
pub const SUBS: &[Sub] = &[
    Sub {
        name: "ask",
        description: "Ask in words, e.g. \"restart the unhealthy fluentd agents\"",
        options: &[("text", "What you want", true)],
        default: None,
    },
    Sub {
        name: "agents",
        description: "Find agents",
        options: &[(
            "query",
            "e.g. type:fluentd health:unhealthy label:env=prod",
            false,
        )],
        default: None,
    },
    Sub {
        name: "agent",
        description: "One agent",
        options: &[("agent", "host, service name or uid", true)],
        default: None,
    },
    Sub {
        name: "summary",
        description: "Fleet counts",
        options: &[],
        default: None,
    },
    Sub {
        name: "restart",
        description: "Restart agents (previewed, then confirmed)",
        options: &[("target", "a host, uid or query", true)],
        default: None,
    },
    Sub {
        name: "shutdown",
        description: "Shut agents down (previewed, then confirmed)",
        options: &[("target", "a host, uid or query", true)],
        default: None,
    },
    Sub {
        name: "config",
        description: "An agent's configuration",
        options: &[("agent", "host, service name or uid", true)],
        default: None,
    },
    Sub {
        name: "status",
        description: "A command's progress",
        options: &[("command", "command or batch id (default: the last)", false)],
        default: Some("status last"),
    },
    Sub {
        name: "audit",
        description: "The audit trail",
        options: &[("filter", "an agent, or actor=…", false)],
        default: None,
    },
    Sub {
        name: "subscribe",
        description: "Fleet alerts in this channel",
        options: &[
            ("query", "which agents, e.g. type:fluentbit", true),
            (
                "events",
                "unhealthy offline recovered command_failed config_failed",
                false,
            ),
        ],
        default: None,
    },
    Sub {
        name: "subscriptions",
        description: "This channel's alert subscriptions",
        options: &[],
        default: None,
    },
    Sub {
        name: "unsubscribe",
        description: "Remove an alert subscription",
        options: &[("id", "the subscription id (s-…)", true)],
        default: None,
    },
    Sub {
        name: "help",
        description: "What Flotilla understands",
        options: &[],
        default: None,
    },
];

/// The `/flotilla` command as registered (a bulk overwrite takes a list of these).
pub fn definition() -> Value {
    let subs: Vec<Value> = SUBS
        .iter()
        .map(|s| {
            let options: Vec<Value> = s
                .options
                .iter()
                .map(|(name, description, required)| {
                    json!({"type": STRING, "name": name, "description": description,
                        "required": required})
                })
                .collect();
            json!({"type": SUB_COMMAND, "name": s.name, "description": s.description,
                "options": options})
        })
        .collect();
    json!({
        "name": NAME,
        "type": 1,
        "description": "Flotilla: your Fluent Bit / Fluentd fleet",
        "options": subs,
    })
}

/// Why an invocation could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInvocation {
    #[error("not the /{NAME} command: {0:?}")]
    Command(String),
    #[error("no sub-command")]
    NoSub,
    #[error("unknown sub-command {0:?}")]
    Sub(String),
    #[error("option {0:?} is unknown or not a string")]
    Option(String),
    #[error("option {0:?} is required")]
    Missing(&'static str),
}

/// The planner text of an invocation's `data` (name and options as Discord sends them).
pub fn planner_text(data: &Value) -> Result<String, BadInvocation> {
    let name = data["name"].as_str().unwrap_or_default();
    if name != NAME {
        return Err(BadInvocation::Command(name.chars().take(40).collect()));
    }
    let sub = data["options"]
        .as_array()
        .and_then(|o| o.first())
        .filter(|o| o["type"].as_u64() == Some(SUB_COMMAND))
        .ok_or(BadInvocation::NoSub)?;
    let sub_name = sub["name"].as_str().unwrap_or_default();
    let def = SUBS
        .iter()
        .find(|s| s.name == sub_name)
        .ok_or_else(|| BadInvocation::Sub(sub_name.chars().take(40).collect()))?;
    let given = sub["options"].as_array().cloned().unwrap_or_default();
    for g in &given {
        let known = def
            .options
            .iter()
            .any(|(n, _, _)| Some(*n) == g["name"].as_str());
        if !known || !g["value"].is_string() {
            let n = g["name"].as_str().unwrap_or("?");
            return Err(BadInvocation::Option(n.chars().take(40).collect()));
        }
    }
    let mut words: Vec<String> = Vec::new();
    if def.name != "ask" {
        words.push(def.name.to_string());
    }
    for (opt, _, required) in def.options {
        match given
            .iter()
            .find(|g| g["name"].as_str() == Some(*opt))
            .and_then(|g| g["value"].as_str())
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            Some(v) => words.push(v.to_string()),
            None if *required => return Err(BadInvocation::Missing(opt)),
            None => {}
        }
    }
    if words.len() == 1 {
        if let Some(d) = def.default {
            return Ok(d.to_string());
        }
    }
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invoke(sub: &str, opts: Value) -> Value {
        json!({"name": "flotilla", "type": 1,
            "options": [{"name": sub, "type": 1, "options": opts}]})
    }

    #[test]
    fn sub_commands_become_the_planners_words() {
        let t = |sub, opts| planner_text(&invoke(sub, opts)).unwrap();
        assert_eq!(
            t(
                "restart",
                json!([{"name": "target", "type": 3, "value": "web-1"}])
            ),
            "restart web-1"
        );
        assert_eq!(
            t(
                "ask",
                json!([{"name": "text", "type": 3, "value": "which agents are unhealthy?"}])
            ),
            "which agents are unhealthy?"
        );
        assert_eq!(t("status", json!([])), "status last");
        assert_eq!(t("summary", json!(null)), "summary");
        // Options in the planner's order, whatever order Discord sent them in.
        assert_eq!(
            t(
                "subscribe",
                json!([{"name": "events", "type": 3, "value": "offline"},
                       {"name": "query", "type": 3, "value": "type:fluentbit"}])
            ),
            "subscribe type:fluentbit offline"
        );
    }

    #[test]
    fn malformed_invocations_are_named() {
        let e = |v: Value| planner_text(&v).unwrap_err();
        assert!(matches!(
            e(json!({"name": "other"})),
            BadInvocation::Command(_)
        ));
        assert_eq!(e(json!({"name": "flotilla"})), BadInvocation::NoSub);
        assert!(matches!(e(invoke("rm", json!([]))), BadInvocation::Sub(_)));
        assert_eq!(
            e(invoke("restart", json!([]))),
            BadInvocation::Missing("target")
        );
        assert!(matches!(
            e(invoke(
                "restart",
                json!([{"name": "target", "type": 4, "value": 3}])
            )),
            BadInvocation::Option(_)
        ));
    }

    #[test]
    fn the_definition_fits_discords_limits() {
        let d = definition();
        let subs = d["options"].as_array().unwrap();
        assert!(subs.len() <= 25);
        for s in subs {
            let name = s["name"].as_str().unwrap();
            assert!(name.len() <= 32 && name == name.to_lowercase());
            assert!(s["description"].as_str().unwrap().chars().count() <= 100);
            for o in s["options"].as_array().unwrap() {
                assert!(o["description"].as_str().unwrap().chars().count() <= 100);
            }
        }
    }
}

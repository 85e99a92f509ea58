//! MCP prompts from the templates in the repository's top-level `prompts/` folder (format in
//! `prompts/README.md`). They are embedded at compile time so `flotilla mcp`, launched by a
//! desktop client from any directory, serves them without files next to it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use rmcp::model::{Prompt, PromptArgument};

/// Every template file, embedded, and whether it walks the model through changing the fleet
/// (hidden and refused in read-only mode, where its tools are gone). A template marked false
/// must say it is read-only (checked by a unit test).
const TEMPLATES: &[(&str, &str, bool)] = &[
    (
        "triage-unhealthy-agents.md",
        include_str!("../../prompts/triage-unhealthy-agents.md"),
        false,
    ),
    (
        "investigate-dropped-records.md",
        include_str!("../../prompts/investigate-dropped-records.md"),
        false,
    ),
    (
        "roll-out-config-safely.md",
        include_str!("../../prompts/roll-out-config-safely.md"),
        true,
    ),
];

/// System prompts of Flotilla's own model-driven parts, in the same folder and format but not
/// served as MCP prompts (their text is written for that part, not for an MCP client): the
/// chat gateway's LLM planner. One folder, one parser, so every prompt Flotilla gives a model
/// is reviewed in one place.
const SYSTEM_TEMPLATES: &[(&str, &str)] = &[(
    "chat-planner.md",
    include_str!("../../prompts/chat-planner.md"),
)];

/// One argument of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgSpec {
    pub name: String,
    pub description: String,
    pub required: bool,
    pub default: Option<String>,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub title: String,
    pub description: String,
    pub args: Vec<ArgSpec>,
    pub body: String,
    /// Walks the model through state-changing tools (see [`TEMPLATES`]).
    pub changes_fleet: bool,
}

/// Why a template did not parse, or a prompt could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("prompt template {file}: {message}")]
    Template { file: String, message: String },
    #[error("unknown prompt {0:?}")]
    Unknown(String),
    #[error("prompt {prompt}: missing required argument {arg:?}")]
    Missing { prompt: String, arg: String },
    #[error("prompt {prompt}: unknown argument {arg:?}")]
    UnknownArg { prompt: String, arg: String },
    #[error("prompt {0:?} changes the fleet and this Flotilla MCP server is read-only; it is not offered")]
    ReadOnly(String),
}

/// Parses one template file.
pub fn parse(file: &str, text: &str) -> Result<Template, PromptError> {
    let bad = |message: &str| PromptError::Template {
        file: file.to_string(),
        message: message.to_string(),
    };
    let rest = text
        .strip_prefix("---\n")
        .ok_or_else(|| bad("must start with a --- header line"))?;
    let (header, body) = rest
        .split_once("\n---\n")
        .ok_or_else(|| bad("header is not closed by a --- line"))?;
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    let mut args = Vec::new();
    let mut in_args = false;
    for line in header.lines() {
        if let Some(item) = line.strip_prefix("- ") {
            if !in_args {
                return Err(bad("argument line outside `arguments:`"));
            }
            // ": " (not ':') ends the spec: defaults may hold query terms like `type:*`.
            let (spec, description) = item.split_once(": ").ok_or_else(|| {
                bad("argument lines are `- name [required]: text` or `- name = default: text`")
            })?;
            let spec = spec.trim();
            let (name, required, default) = if let Some(n) = spec.strip_suffix("[required]") {
                (n.trim(), true, None)
            } else if let Some((n, d)) = spec.split_once('=') {
                (n.trim(), false, Some(d.trim().to_string()))
            } else {
                (spec, false, Some(String::new()))
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(bad("argument names are letters, digits and _"));
            }
            args.push(ArgSpec {
                name: name.to_string(),
                description: description.trim().to_string(),
                required,
                default,
            });
            continue;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad("header lines are `key: value`"))?;
        in_args = k.trim() == "arguments";
        if !in_args {
            fields.insert(k.trim(), v.trim().to_string());
        }
    }
    let field = |k: &str| {
        fields
            .get(k)
            .cloned()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| bad(&format!("header needs `{k}:`")))
    };
    let t = Template {
        name: field("name")?,
        title: field("title")?,
        description: field("description")?,
        args,
        body: body.trim().to_string(),
        changes_fleet: false,
    };
    for a in &t.args {
        if !t.body.contains(&format!("{{{{{}}}}}", a.name)) {
            return Err(bad(&format!(
                "argument {} is never used in the body",
                a.name
            )));
        }
    }
    Ok(t)
}

/// All templates, parsed once. A broken template is a build-time mistake caught by the unit
/// test; at run time it is skipped with an error log rather than taking the server down.
pub fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        TEMPLATES
            .iter()
            .filter_map(|(f, text, changes_fleet)| match parse(f, text) {
                Ok(t) => Some(Template {
                    changes_fleet: *changes_fleet,
                    ..t
                }),
                Err(e) => {
                    tracing::error!(error = %e, "skipping a broken prompt template");
                    None
                }
            })
            .collect()
    })
}

/// The MCP prompt list; in read-only mode without the prompts that change the fleet.
pub fn list(read_only: bool) -> Vec<Prompt> {
    templates()
        .iter()
        .filter(|t| !(read_only && t.changes_fleet))
        .map(|t| {
            let args = t
                .args
                .iter()
                .map(|a| {
                    PromptArgument::new(a.name.clone())
                        .with_description(match &a.default {
                            Some(d) if !d.is_empty() => {
                                format!("{} (default: {d})", a.description)
                            }
                            _ => a.description.clone(),
                        })
                        .with_required(a.required)
                })
                .collect();
            let mut p = Prompt::new(t.name.clone(), Some(t.description.clone()), Some(args));
            p.title = Some(t.title.clone());
            p
        })
        .collect()
}

/// Renders system prompt `name` (a file of [`SYSTEM_TEMPLATES`], by its header name) with
/// `args`, unset arguments taking their defaults.
pub fn system(name: &str, args: &BTreeMap<String, String>) -> Result<String, PromptError> {
    let t = SYSTEM_TEMPLATES
        .iter()
        .map(|(f, text)| parse(f, text))
        .find(|t| t.as_ref().map_or(true, |t| t.name == name))
        .ok_or_else(|| PromptError::Unknown(name.to_string()))??;
    fill(&t, args)
}

/// Renders prompt `name` with `args`: `(description, text)`. In read-only mode a prompt that
/// changes the fleet is refused.
pub fn render(
    name: &str,
    args: &BTreeMap<String, String>,
    read_only: bool,
) -> Result<(String, String), PromptError> {
    let t = templates()
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| PromptError::Unknown(name.to_string()))?;
    if read_only && t.changes_fleet {
        return Err(PromptError::ReadOnly(name.to_string()));
    }
    Ok((t.description.clone(), fill(t, args)?))
}

/// A template's body with `args` (and the defaults of the others) put in.
fn fill(t: &Template, args: &BTreeMap<String, String>) -> Result<String, PromptError> {
    let name = &t.name;
    if let Some(k) = args.keys().find(|k| !t.args.iter().any(|a| &a.name == *k)) {
        return Err(PromptError::UnknownArg {
            prompt: name.into(),
            arg: k.clone(),
        });
    }
    let mut body = t.body.clone();
    for a in &t.args {
        let v = match (
            args.get(&a.name).filter(|v| !v.trim().is_empty()),
            &a.default,
        ) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(PromptError::Missing {
                    prompt: name.into(),
                    arg: a.name.clone(),
                })
            }
        };
        body = body.replace(&format!("{{{{{}}}}}", a.name), &v);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        for (f, text, changes_fleet) in TEMPLATES {
            let t = parse(f, text).unwrap();
            // A prompt offered in read-only mode must itself say it only reads.
            assert!(
                *changes_fleet || format!("{} {}", t.description, t.body).contains("read-only"),
                "{f} is offered in read-only mode but does not say it is read-only"
            );
        }
        assert_eq!(templates().len(), TEMPLATES.len());
        // The folder holds no template the binary forgot to embed.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            if name.ends_with(".md") && name != "README.md" {
                assert!(
                    TEMPLATES.iter().any(|(f, _, _)| *f == name)
                        || SYSTEM_TEMPLATES.iter().any(|(f, _)| *f == name),
                    "{name} is not embedded"
                );
            }
        }
    }

    #[test]
    fn system_prompts_parse_and_are_not_mcp_prompts() {
        for (f, text) in SYSTEM_TEMPLATES {
            let t = parse(f, text).unwrap();
            assert!(list(false).iter().all(|p| p.name != t.name), "{f}");
        }
        let text = system("chat_planner", &BTreeMap::new()).unwrap();
        assert!(
            text.contains("at most 4 rounds") && !text.contains("{{"),
            "{text}"
        );
        let mut a = BTreeMap::new();
        a.insert("platform".to_string(), "Slack".to_string());
        assert!(system("chat_planner", &a)
            .unwrap()
            .contains("assistant in Slack"));
        assert!(matches!(system("nope", &a), Err(PromptError::Unknown(_))));
    }

    #[test]
    fn renders_with_defaults_and_refuses_bad_args() {
        let (_, text) = render("triage_unhealthy_agents", &BTreeMap::new(), true).unwrap();
        assert!(text.contains("health:unhealthy type:*"), "{text}");
        assert!(!text.contains("{{"));
        let mut a = BTreeMap::new();
        a.insert("query".to_string(), "type:fluentbit".to_string());
        assert!(matches!(
            render("roll_out_config_safely", &a, false),
            Err(PromptError::Missing { .. })
        ));
        a.insert("change".to_string(), "raise Retry_Limit".to_string());
        let (_, text) = render("roll_out_config_safely", &a, false).unwrap();
        assert!(text.contains("raise Retry_Limit") && text.contains("`type:fluentbit`"));
        a.insert("nope".to_string(), "x".to_string());
        assert!(matches!(
            render("roll_out_config_safely", &a, false),
            Err(PromptError::UnknownArg { .. })
        ));
        assert!(matches!(
            render("x", &BTreeMap::new(), false),
            Err(PromptError::Unknown(_))
        ));
    }

    #[test]
    fn read_only_mode_hides_prompts_that_change_the_fleet() {
        let names = |ro| -> Vec<String> { list(ro).into_iter().map(|p| p.name).collect() };
        assert!(names(false).contains(&"roll_out_config_safely".to_string()));
        assert!(!names(true).contains(&"roll_out_config_safely".to_string()));
        assert_eq!(names(true).len(), 2);
        let mut a = BTreeMap::new();
        a.insert("query".to_string(), "type:fluentbit".to_string());
        a.insert("change".to_string(), "x".to_string());
        assert!(matches!(
            render("roll_out_config_safely", &a, true),
            Err(PromptError::ReadOnly(_))
        ));
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert!(parse("f", "no header").is_err());
        assert!(parse("f", "---\nname: a\n").is_err());
        assert!(parse("f", "---\nname: a\ntitle: t\n---\nbody").is_err());
        assert!(parse(
            "f",
            "---\nname: a\ntitle: t\ndescription: d\narguments:\n- x [required]: y\n---\nno use"
        )
        .is_err());
    }
}

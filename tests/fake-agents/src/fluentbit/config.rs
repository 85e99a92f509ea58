//! Fluent Bit configuration as the fake understands it: the classic `.conf` format, a
//! YAML subset (chosen by extension, like the real one), command-line pipelines
//! (`-i/-o/-F/-p/-m/-t`), the plugin registry and the property check behind `-D`.
//! Error texts are the recorded ones (C_start_*.txt, C_dryrun_*.txt, B-conf.log).

use std::path::Path;
use std::sync::OnceLock;

/// `fluent-bit -J` as recorded: the JSON schema of the plugins compiled into the
/// recorded build. It is both what `-J` prints and the source of allowed properties.
pub const HELP_JSON_RECORDING: &str =
    include_str!("../../fixtures/fluent-bit-5.1.1/responses/C_help_json.txt");

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Input,
    Filter,
    Output,
}

impl Kind {
    pub fn word(self) -> &'static str {
        match self {
            Kind::Input => "input",
            Kind::Filter => "filter",
            Kind::Output => "output",
        }
    }

    fn cli_flag(self) -> &'static str {
        match self {
            Kind::Input => "-i",
            Kind::Filter => "-F",
            Kind::Output => "-o",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Plugin {
    pub kind: Kind,
    /// Plugin name, lower case (`dummy`, `forward`, ...).
    pub name: String,
    /// Properties other than `name`, keys lower case, in file order.
    pub props: Vec<(String, String)>,
    /// `Alias`, or `name.N` with N the index among plugins of the same kind
    /// (B_v1_metrics.json: `fluentbit_metrics.1`, `prometheus_exporter.2`).
    pub instance: String,
}

impl Plugin {
    pub fn prop(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The tag records of an input carry: `Tag`, or the instance name by default.
    pub fn tag(&self) -> String {
        self.prop("tag")
            .map(str::to_string)
            .unwrap_or_else(|| self.instance.clone())
    }
}

#[derive(Clone, Debug, Default)]
pub struct Config {
    pub service: Vec<(String, String)>,
    pub plugins: Vec<Plugin>,
}

impl Config {
    pub fn service(&self, key: &str) -> Option<&str> {
        self.service
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    pub fn service_bool(&self, key: &str, default: bool) -> bool {
        self.service(key).map(truthy).unwrap_or(default)
    }

    pub fn service_num(&self, key: &str, default: i64) -> i64 {
        self.service(key)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    }

    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter().filter(move |p| p.kind == kind)
    }
}

pub fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "on" | "true" | "yes" | "1"
    )
}

/// A plugin given on the command line (`-i dummy -p rate=5 -t tag`), A-cli.log.
#[derive(Clone, Debug)]
pub struct CliPlugin {
    pub kind: Kind,
    pub name: String,
    pub props: Vec<(String, String)>,
}

/// Why a configuration could not be loaded. Each variant knows the log lines it produces.
#[derive(Debug)]
pub enum LoadError {
    /// C_start_missing_file.txt: `could not open configuration file, aborting.`
    Open,
    /// Syntax errors: `[config] error in FILE:LINE: MSG` (C_start_bad_syntax.txt) or the
    /// YAML pair of lines (C_start_bad_yaml.txt). Stored without the `[error] ` prefix.
    Format(Vec<String>),
    /// C_start_bad_plugin.txt: `[config] section 'X' tried to instance a plugin name that doesn't exist`.
    UnknownPlugin(String),
}

impl LoadError {
    pub fn config_lines(&self) -> Vec<String> {
        match self {
            LoadError::Open => vec![],
            LoadError::Format(lines) => lines.clone(),
            LoadError::UnknownPlugin(name) => vec![format!(
                "[config] section '{name}' tried to instance a plugin name that doesn't exist"
            )],
        }
    }
}

/// An unknown property (C_dryrun_bad_prop.txt, C_start_bad_prop.txt, B-conf.log).
#[derive(Debug)]
pub struct PropError {
    pub kind: Kind,
    pub plugin: String,
    pub instance: String,
    pub prop: String,
    pub allowed: Vec<String>,
}

impl PropError {
    /// `[config] dummy: unknown configuration property 'bogus_key'. The following properties are allowed: a, b, and c.`
    pub fn message(&self) -> String {
        let list = match self.allowed.len() {
            0 => String::new(),
            1 => self.allowed[0].clone(),
            n => format!(
                "{}, and {}",
                self.allowed[..n - 1].join(", "),
                self.allowed[n - 1]
            ),
        };
        format!(
            "[config] {}: unknown configuration property '{}'. The following properties are allowed: {}.",
            self.plugin, self.prop, list
        )
    }

    /// `[ help] try the command: /opt/fluent-bit/bin/fluent-bit -i dummy -h` (C_start_bad_prop.txt).
    pub fn help(&self, argv0: &str) -> String {
        format!(
            "try the command: {argv0} {} {} -h",
            self.kind.cli_flag(),
            self.plugin
        )
    }
}

/// Loads `-c` (if any) plus the command-line pipeline, instantiating every plugin.
pub fn load(path: Option<&str>, cli: &[CliPlugin]) -> Result<Config, LoadError> {
    let mut sections: Vec<(Kind, Vec<(String, String)>)> = Vec::new();
    let mut service = Vec::new();
    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|_| LoadError::Open)?;
        let lower = path.to_ascii_lowercase();
        // The format follows the extension only (fluent-agents.md §2.1; C_dryrun_yaml_with_txt_ext.txt).
        if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            parse_yaml(path, &text, &mut service, &mut sections)?;
        } else {
            parse_classic(path, &text, &mut service, &mut sections)?;
        }
    }
    for c in cli {
        let mut props = vec![("name".to_string(), c.name.clone())];
        props.extend(c.props.iter().cloned());
        // Outputs given with -o and no -m match everything (A-cli.log routes dummy to null).
        if c.kind == Kind::Output && !c.props.iter().any(|(k, _)| k == "match") {
            props.push(("match".into(), "*".into()));
        }
        sections.push((c.kind, props));
    }
    let mut cfg = Config {
        service,
        plugins: Vec::new(),
    };
    let mut counts = [0usize; 3];
    for (kind, props) in sections {
        let name = props
            .iter()
            .find(|(k, _)| k == "name")
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_default();
        if !plugin_exists(kind, &name) {
            return Err(LoadError::UnknownPlugin(name));
        }
        let idx = &mut counts[kind as usize];
        let alias = props
            .iter()
            .rev()
            .find(|(k, _)| k == "alias")
            .map(|(_, v)| v.clone());
        let instance = alias.unwrap_or_else(|| format!("{name}.{idx}"));
        *idx += 1;
        cfg.plugins.push(Plugin {
            kind,
            name,
            props: props.into_iter().filter(|(k, _)| k != "name").collect(),
            instance,
        });
    }
    Ok(cfg)
}

fn section_kind(header: &str) -> Option<Option<Kind>> {
    match header.to_ascii_uppercase().as_str() {
        "SERVICE" => Some(None),
        "INPUT" => Some(Some(Kind::Input)),
        "FILTER" => Some(Some(Kind::Filter)),
        "OUTPUT" => Some(Some(Kind::Output)),
        _ => None,
    }
}

/// Expands `${VAR}` from `@SET` variables, then the environment, as the real parser does.
fn expand(v: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                let name = &rest[start + 2..start + end];
                let val = vars
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .or_else(|| std::env::var(name).ok())
                    .unwrap_or_default();
                out.push_str(&val);
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Classic format. Errors as recorded: `bad header definition` (C_start_bad_syntax.txt,
/// B-conf.log `live.conf:47`) and `undefined value - check config is in valid classic
/// format` (C_dryrun_yaml_with_txt_ext.txt). The file is named as given on the command line.
fn parse_classic(
    path: &str,
    text: &str,
    service: &mut Vec<(String, String)>,
    sections: &mut Vec<(Kind, Vec<(String, String)>)>,
) -> Result<(), LoadError> {
    let mut vars: Vec<(String, String)> = Vec::new();
    // None = outside any section or in one the fake ignores ([PARSER], ...).
    let mut current: Option<Option<Kind>> = None;
    let err = |line: usize, msg: &str| {
        LoadError::Format(vec![format!("[config] error in {path}:{line}: {msg}")])
    };
    for (i, raw) in text.lines().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("@SET") {
            if let Some((k, v)) = rest.trim().split_once('=') {
                vars.push((k.trim().to_string(), v.trim().to_string()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("@INCLUDE") {
            let inc = rest.trim();
            let inc_path = Path::new(path)
                .parent()
                .map(|d| d.join(inc))
                .unwrap_or_else(|| inc.into());
            let inc_text = std::fs::read_to_string(&inc_path).map_err(|_| LoadError::Open)?;
            parse_classic(&inc_path.to_string_lossy(), &inc_text, service, sections)?;
            continue;
        }
        if line.starts_with('[') {
            if !line.ends_with(']') || line.len() < 3 {
                return Err(err(no, "bad header definition"));
            }
            current = section_kind(line[1..line.len() - 1].trim());
            if let Some(Some(kind)) = current {
                sections.push((kind, Vec::new()));
            }
            continue;
        }
        let mut kv = line.splitn(2, char::is_whitespace);
        let key = kv.next().unwrap_or("");
        let value = kv.next().map(str::trim).unwrap_or("");
        if value.is_empty() {
            return Err(err(
                no,
                "undefined value - check config is in valid classic format",
            ));
        }
        if !raw.starts_with(char::is_whitespace) || current.is_none() {
            return Err(err(no, "invalid indentation level"));
        }
        let entry = (key.to_ascii_lowercase(), expand(value, &vars));
        match current {
            Some(None) => service.push(entry),
            Some(Some(_)) => sections.last_mut().expect("section pushed").1.push(entry),
            None => {}
        }
    }
    Ok(())
}

/// Minimal YAML tree: enough for `service:` and `pipeline: {inputs, filters, outputs}`.
#[derive(Debug, Clone)]
enum Yaml {
    Map(Vec<(String, Yaml)>),
    Seq(Vec<Yaml>),
    Scalar(String),
}

struct YLine {
    no: usize,
    indent: usize,
    text: String,
}

struct YErr {
    line: usize,
    col: usize,
    msg: &'static str,
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2
        && ((v.starts_with('\'') && v.ends_with('\'')) || (v.starts_with('"') && v.ends_with('"')))
    {
        v[1..v.len() - 1].to_string()
    } else {
        // Drop a trailing comment on unquoted scalars.
        v.split(" #").next().unwrap_or("").trim().to_string()
    }
}

fn yaml_block(lines: &mut [YLine], i: &mut usize, indent: usize) -> Result<Yaml, YErr> {
    if lines[*i].text == "-" || lines[*i].text.starts_with("- ") {
        let mut items = Vec::new();
        while *i < lines.len()
            && lines[*i].indent == indent
            && (lines[*i].text == "-" || lines[*i].text.starts_with("- "))
        {
            let rest = lines[*i].text[1..].to_string();
            let trimmed = rest.trim_start();
            if trimmed.is_empty() {
                *i += 1;
                if *i < lines.len() && lines[*i].indent > indent {
                    let child = lines[*i].indent;
                    items.push(yaml_block(lines, i, child)?);
                } else {
                    items.push(Yaml::Scalar(String::new()));
                }
            } else {
                // The item's content becomes a line of its own at its column, so a map
                // started on the dash line continues on the following lines.
                let col = indent + 1 + (rest.len() - trimmed.len());
                lines[*i].indent = col;
                lines[*i].text = trimmed.to_string();
                if trimmed.contains(": ") || trimmed.ends_with(':') {
                    items.push(yaml_block(lines, i, col)?);
                } else {
                    items.push(Yaml::Scalar(unquote(trimmed)));
                    *i += 1;
                }
            }
        }
        return Ok(Yaml::Seq(items));
    }
    let mut map = Vec::new();
    while *i < lines.len() && lines[*i].indent == indent {
        let l = &lines[*i];
        if l.text.starts_with("- ") {
            break;
        }
        let (key, value) = if let Some((k, v)) = l.text.split_once(": ") {
            (k.trim().to_string(), v.trim().to_string())
        } else if let Some(k) = l.text.strip_suffix(':') {
            (k.trim().to_string(), String::new())
        } else {
            return Err(YErr {
                line: l.no,
                col: l.indent + 1,
                msg: "could not find expected ':'",
            });
        };
        *i += 1;
        if !value.is_empty() {
            map.push((unquote(&key), Yaml::Scalar(unquote(&value))));
            if *i < lines.len() && lines[*i].indent > indent {
                return Err(YErr {
                    line: lines[*i].no,
                    col: lines[*i].indent + 1,
                    msg: "mapping values are not allowed in this context",
                });
            }
        } else if *i < lines.len()
            && (lines[*i].indent > indent
                || (lines[*i].indent == indent && lines[*i].text.starts_with("- ")))
        {
            let child = lines[*i].indent;
            map.push((unquote(&key), yaml_block(lines, i, child)?));
        } else {
            map.push((unquote(&key), Yaml::Scalar(String::new())));
        }
        // A line indented between this level and the block just closed matches nothing:
        // libyaml's "did not find expected key" (C_start_bad_yaml.txt: line 4, column 4).
        if *i < lines.len() && lines[*i].indent > indent {
            return Err(YErr {
                line: lines[*i].no,
                col: lines[*i].indent + 1,
                msg: "did not find expected key",
            });
        }
    }
    Ok(Yaml::Map(map))
}

fn parse_yaml(
    path: &str,
    text: &str,
    service: &mut Vec<(String, String)>,
    sections: &mut Vec<(Kind, Vec<(String, String)>)>,
) -> Result<(), LoadError> {
    let mut lines: Vec<YLine> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---"
        })
        .map(|(n, l)| YLine {
            no: n + 1,
            indent: l.len() - l.trim_start().len(),
            text: l.trim().to_string(),
        })
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut i = 0;
    let base = lines[0].indent;
    let tree = yaml_block(&mut lines, &mut i, base).and_then(|t| {
        if i < lines.len() {
            Err(YErr {
                line: lines[i].no,
                col: lines[i].indent + 1,
                msg: "did not find expected key",
            })
        } else {
            Ok(t)
        }
    });
    let tree = tree.map_err(|e| {
        let file = Path::new(path)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.to_string());
        LoadError::Format(vec![
            format!(
                "[config] invalid YAML in file {file} at line {}, column {}: {}",
                e.line, e.col, e.msg
            ),
            format!(
                "[config] hint: check line {} (above) for missing ':' or incorrect indentation",
                e.line.saturating_sub(1)
            ),
        ])
    })?;
    let Yaml::Map(top) = tree else {
        return Ok(());
    };
    for (k, v) in top {
        match (k.as_str(), v) {
            ("service", Yaml::Map(m)) => {
                for (sk, sv) in m {
                    if let Yaml::Scalar(s) = sv {
                        service.push((sk.to_ascii_lowercase(), expand(&s, &[])));
                    }
                }
            }
            ("pipeline", Yaml::Map(m)) => {
                for (pk, pv) in m {
                    let kind = match pk.as_str() {
                        "inputs" => Kind::Input,
                        "filters" => Kind::Filter,
                        "outputs" => Kind::Output,
                        _ => continue,
                    };
                    let Yaml::Seq(items) = pv else { continue };
                    for item in items {
                        let Yaml::Map(props) = item else { continue };
                        let props = props
                            .into_iter()
                            .filter_map(|(k, v)| match v {
                                Yaml::Scalar(s) => Some((k.to_ascii_lowercase(), expand(&s, &[]))),
                                _ => None, // processors and other nested blocks
                            })
                            .collect();
                        sections.push((kind, props));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

struct Schema {
    /// (kind, plugin, every accepted property, the list printed in the error message)
    plugins: Vec<(Kind, String, Vec<String>, Vec<String>)>,
}

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let (json, _) = crate::common::recorded_streams(HELP_JSON_RECORDING);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_default();
        let mut plugins = Vec::new();
        for (key, kind) in [
            ("inputs", Kind::Input),
            ("filters", Kind::Filter),
            ("outputs", Kind::Output),
        ] {
            for p in v[key].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap_or_default().to_string();
                let props = &p["properties"];
                let names = |k: &str| -> Vec<String> {
                    props[k]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o["name"].as_str().map(str::to_ascii_lowercase))
                        .collect()
                };
                let options = names("options");
                let mut all = options.clone();
                for k in ["global_options", "networking", "network_tls"] {
                    all.extend(names(k));
                }
                // The message lists the plugin's own options except the networking ones
                // handled by the instance (B-conf.log's forward list omits host, port, tls.*).
                let listed = options
                    .into_iter()
                    .filter(|o| o != "host" && o != "port" && o != "tls" && !o.starts_with("tls."))
                    .collect();
                plugins.push((kind, name, all, listed));
            }
        }
        Schema { plugins }
    })
}

/// Plugins outside the recorded build (its set was minimal: see `-J`) that the fake still
/// accepts so supervisor tests can use them, e.g. the `http` input for ChatOps. Their
/// properties are not checked because no recording lists them.
const EXTRA_INPUTS: &[&str] = &[
    "http",
    "cpu",
    "mem",
    "disk",
    "netif",
    "tcp",
    "udp",
    "syslog",
    "systemd",
    "exec",
    "random",
    "health",
    "kmsg",
    "proc",
    "thermal",
    "stdin",
    "node_exporter_metrics",
    "prometheus_scrape",
    "opentelemetry",
    "head",
    "mqtt",
    "docker",
    "docker_events",
    "statsd",
    "collectd",
    "kubernetes_events",
    "process_exporter_metrics",
    "storage_backlog",
    "event_type",
];
const EXTRA_FILTERS: &[&str] = &[
    "grep",
    "modify",
    "record_modifier",
    "lua",
    "parser",
    "kubernetes",
    "nest",
    "rewrite_tag",
    "throttle",
    "stdout",
    "multiline",
    "expect",
    "sysinfo",
    "type_converter",
    "alter_size",
    "log_to_metrics",
    "aws",
    "ecs",
];
const EXTRA_OUTPUTS: &[&str] = &[
    "http",
    "file",
    "counter",
    "es",
    "loki",
    "kafka",
    "s3",
    "cloudwatch_logs",
    "splunk",
    "syslog",
    "tcp",
    "opentelemetry",
    "prometheus_remote_write",
    "datadog",
    "influxdb",
    "gelf",
    "websocket",
    "exit",
    "flowcounter",
    "nats",
    "stackdriver",
    "bigquery",
    "kinesis_firehose",
    "kinesis_streams",
    "azure",
    "azure_blob",
    "logdna",
    "new_relic",
    "slack",
    "td",
];

pub fn plugin_exists(kind: Kind, name: &str) -> bool {
    if schema()
        .plugins
        .iter()
        .any(|(k, n, _, _)| *k == kind && n == name)
    {
        return true;
    }
    let extra = match kind {
        Kind::Input => EXTRA_INPUTS,
        Kind::Filter => EXTRA_FILTERS,
        Kind::Output => EXTRA_OUTPUTS,
    };
    extra.contains(&name)
}

/// Properties any instance takes regardless of the plugin's own config map.
fn instance_property(kind: Kind, key: &str) -> bool {
    let common = [
        "alias",
        "log_level",
        "log_suppress_interval",
        "host",
        "port",
        "listen",
        "ipv6",
        "processors",
    ];
    if common.contains(&key) || key.starts_with("net.") || key == "tls" || key.starts_with("tls.") {
        return true;
    }
    match kind {
        Kind::Input => {
            ["tag", "mem_buf_limit", "threaded", "routable"].contains(&key)
                || key.starts_with("storage.")
        }
        Kind::Filter => ["match", "match_regex"].contains(&key),
        Kind::Output => {
            ["match", "match_regex", "retry_limit", "workers", "upstream"].contains(&key)
                || key.starts_with("storage.")
        }
    }
}

/// The property check `-D` and start-up run (C_dryrun_bad_prop.txt): inputs, then
/// filters, then outputs; the first unknown property wins.
pub fn check_properties(cfg: &Config) -> Result<(), PropError> {
    for kind in [Kind::Input, Kind::Filter, Kind::Output] {
        for p in cfg.of(kind) {
            check_plugin(p)?;
        }
    }
    Ok(())
}

pub fn check_plugin(p: &Plugin) -> Result<(), PropError> {
    let Some((_, _, all, listed)) = schema()
        .plugins
        .iter()
        .find(|(k, n, _, _)| *k == p.kind && *n == p.name)
    else {
        return Ok(());
    };
    for (key, _) in &p.props {
        if !all.contains(key) && !instance_property(p.kind, key) {
            return Err(PropError {
                kind: p.kind,
                plugin: p.name.clone(),
                instance: p.instance.clone(),
                prop: key.clone(),
                allowed: listed.clone(),
            });
        }
    }
    Ok(())
}

/// Fluent Bit's `Match` wildcard: `*` matches any run of characters.
pub fn tag_match(pattern: &str, tag: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| rec(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && rec(rest, &t[1..]),
        }
    }
    rec(pattern.as_bytes(), tag.as_bytes())
}

//! Fluentd's v1 configuration format as the fake needs it: `<directive arg>` blocks and
//! `key value` parameters, the parse errors Fluentd reports (startup-bad-syntax.log,
//! fluentd.log), the plugin list monitor_agent shows, the unknown-plugin check
//! (startup-bad-plugin.log) and the `<ROOT>` dump (rpc_config.getDump.json).

#[derive(Clone, Debug, Default)]
pub struct Element {
    pub name: String,
    pub arg: String,
    pub params: Vec<(String, String)>,
    pub children: Vec<Element>,
}

impl Element {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
}

/// A `Fluent::ConfigParseError`. `detail()` is the message as Ruby prints it, e.g.
/// `expected '>' at live.conf line 31,11` followed by two context lines and a caret.
#[derive(Debug)]
pub struct ParseError {
    pub msg: String,
    pub fname: String,
    pub line: usize,
    pub col: usize,
    pub context: String,
}

impl ParseError {
    pub fn headline(&self) -> String {
        format!(
            "{} at {} line {},{}",
            self.msg, self.fname, self.line, self.col
        )
    }

    /// Context block (fluentd.log, startup-bad-syntax.log):
    /// ` 30: \n 31: <match foo\n\n     -----------^`
    pub fn context(&self) -> &str {
        &self.context
    }
}

fn perr(msg: String, fname: &str, lines: &[&str], line: usize, col: usize) -> ParseError {
    let mut ctx = String::new();
    if line >= 2 {
        ctx.push_str(&format!("{:>3}: {}\n", line - 1, lines[line - 2]));
    }
    ctx.push_str(&format!("{:>3}: {}\n\n", line, lines[line - 1]));
    ctx.push_str(&format!("     {}^", "-".repeat(col)));
    ParseError {
        msg,
        fname: fname.to_string(),
        line,
        col,
        context: ctx,
    }
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        v[1..v.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\n", "\n")
            .replace("\\\\", "\\")
    } else if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

/// Parses a whole file. `fname` is the base name Fluentd uses in parse errors
/// ("at live.conf line 31,11" for /etc/fluent/live.conf, fluentd.log).
pub fn parse(text: &str, fname: &str) -> Result<Element, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut stack = vec![Element {
        name: "ROOT".into(),
        ..Element::default()
    }];
    let mut last_content = 0usize;
    for (i, raw) in lines.iter().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        last_content = no;
        let end_col = raw.trim_end().len() + 1;
        if let Some(rest) = line.strip_prefix("</") {
            let Some(name) = rest.strip_suffix('>') else {
                return Err(perr("expected '>'".into(), fname, &lines, no, end_col));
            };
            let open = stack.last().map(|e| e.name.clone()).unwrap_or_default();
            if stack.len() < 2 || name.trim() != open {
                return Err(perr("unmatched end tag".into(), fname, &lines, no, end_col));
            }
            let done = stack.pop().expect("checked depth");
            stack.last_mut().expect("root").children.push(done);
        } else if let Some(rest) = line.strip_prefix('<') {
            let Some(inner) = rest.strip_suffix('>') else {
                // fluentd.log: "expected '>' at live.conf line 31,11" for `<match foo`.
                return Err(perr("expected '>'".into(), fname, &lines, no, end_col));
            };
            let inner = inner.trim();
            let (name, arg) = inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
            stack.push(Element {
                name: name.to_string(),
                arg: arg.trim().to_string(),
                ..Element::default()
            });
        } else {
            let (k, v) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            stack
                .last_mut()
                .expect("root")
                .params
                .push((k.to_string(), unquote(v)));
        }
    }
    if stack.len() > 1 {
        // startup-bad-syntax.log: "expected end tag '</source>' but got end of file at
        // bad-syntax.conf line 3,8" (the end of the last line with content).
        let open = stack.last().map(|e| e.name.clone()).unwrap_or_default();
        let line = last_content.max(1);
        let col = lines.get(line - 1).map_or(0, |l| l.trim_end().len()) + 1;
        return Err(perr(
            format!("expected end tag '</{open}>' but got end of file"),
            fname,
            &lines,
            line,
            col,
        ));
    }
    Ok(stack.pop().expect("root"))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Category {
    Input,
    Output,
    Filter,
}

impl Category {
    pub fn word(self) -> &'static str {
        match self {
            Category::Input => "input",
            Category::Output => "output",
            Category::Filter => "filter",
        }
    }
}

/// One configured plugin instance.
#[derive(Clone, Debug)]
pub struct Plugin {
    pub category: Category,
    pub type_: String,
    /// `@id`, or `object:XXX` like Ruby's object id when none is given (fluent-agents.md §3.3).
    pub plugin_id: String,
    pub has_id: bool,
    /// The `<match>`/`<filter>` pattern.
    pub pattern: String,
    pub element: Element,
}

impl Plugin {
    /// The `[fwd_out] ` log prefix plugins with an `@id` get (sig-SIGTERM.log).
    pub fn log_prefix(&self) -> String {
        if self.has_id {
            format!("[{}] ", self.plugin_id)
        } else {
            String::new()
        }
    }

    pub fn buffered(&self) -> bool {
        self.element.child("buffer").is_some()
            || matches!(
                self.type_.as_str(),
                "forward" | "file" | "http" | "secondary_file" | "buffer"
            )
    }
}

const INPUTS: &[&str] = &[
    "forward",
    "http",
    "tail",
    "syslog",
    "tcp",
    "udp",
    "unix",
    "exec",
    "sample",
    "dummy",
    "monitor_agent",
    "object_space",
    "debug_agent",
];
const OUTPUTS: &[&str] = &[
    "null",
    "stdout",
    "forward",
    "file",
    "copy",
    "relabel",
    "roundrobin",
    "exec",
    "exec_filter",
    "secondary_file",
    "http",
    "buffer",
];
const FILTERS: &[&str] = &["grep", "parser", "record_transformer", "stdout"];

/// Every plugin: inputs, outputs, filters — the order monitor_agent lists them in
/// (plugins.json: monitor, sample_in, fwd_out). `<label>` contents are included.
pub fn plugins(root: &Element) -> Vec<Plugin> {
    let mut sources = Vec::new();
    let mut outputs = Vec::new();
    let mut filters = Vec::new();
    fn walk(e: &Element, s: &mut Vec<Element>, o: &mut Vec<Element>, f: &mut Vec<Element>) {
        for c in &e.children {
            match c.name.as_str() {
                "source" => s.push(c.clone()),
                "match" => o.push(c.clone()),
                "filter" => f.push(c.clone()),
                "label" => walk(c, s, o, f),
                _ => {}
            }
        }
    }
    walk(root, &mut sources, &mut outputs, &mut filters);
    let mut out = Vec::new();
    let mut anon = 0x5c8;
    for (cat, list) in [
        (Category::Input, sources),
        (Category::Output, outputs),
        (Category::Filter, filters),
    ] {
        for e in list {
            let id = e.param("@id").map(str::to_string);
            let plugin_id = id.clone().unwrap_or_else(|| {
                anon += 0x14;
                format!("object:{anon:x}")
            });
            out.push(Plugin {
                category: cat,
                type_: e
                    .param("@type")
                    .or(e.param("type"))
                    .unwrap_or_default()
                    .to_string(),
                plugin_id,
                has_id: id.is_some(),
                pattern: e.arg.clone(),
                element: e,
            });
        }
    }
    out
}

/// The check that turns an unknown type into `Fluent::NotFoundPluginError`
/// (startup-bad-plugin.log, fluentd.log). Fluentd configures `<label>`s, then filters and
/// matches, then sources, so that is the order the first error is found in.
pub fn validate(root: &Element) -> Result<(), (String, String)> {
    let all = plugins(root);
    let order = [Category::Output, Category::Filter, Category::Input];
    for cat in order {
        for p in all.iter().filter(|p| p.category == cat) {
            let directive = match cat {
                Category::Input => "source",
                Category::Output => "match",
                Category::Filter => "filter",
            };
            if p.type_.is_empty() {
                return Err((
                    "Fluent::ConfigError".into(),
                    format!("Missing '@type' parameter on <{directive}> directive"),
                ));
            }
            let known = match cat {
                Category::Input => INPUTS,
                Category::Output => OUTPUTS,
                Category::Filter => FILTERS,
            };
            if !known.contains(&p.type_.as_str()) {
                return Err((
                    "Fluent::NotFoundPluginError".into(),
                    format!(
                        "Unknown {} plugin '{}'. Run 'gem search -rd fluent-plugin' to find plugins",
                        cat.word(),
                        p.type_
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Values Fluentd's dump prints bare: numbers, booleans, sizes/durations (`1s`), `@`-keys.
fn bare(key: &str, v: &str) -> bool {
    if key.starts_with('@') || v == "true" || v == "false" || v.parse::<f64>().is_ok() {
        return true;
    }
    let digits = v.trim_end_matches(|c: char| "smhdkgt".contains(c.to_ascii_lowercase()));
    digits != v && !digits.is_empty() && digits.parse::<f64>().is_ok()
}

/// The `<ROOT>` dump (rpc_config.getDump.json, "using configuration file" in fluentd.log).
pub fn dump(root: &Element) -> String {
    fn rec(e: &Element, depth: usize, out: &mut String) {
        let pad = "  ".repeat(depth);
        for (k, v) in &e.params {
            if bare(k, v) {
                out.push_str(&format!("{pad}{k} {v}\n"));
            } else {
                out.push_str(&format!("{pad}{k} {}\n", crate::json::quote(v)));
            }
        }
        for c in &e.children {
            if c.arg.is_empty() {
                out.push_str(&format!("{pad}<{}>\n", c.name));
            } else {
                out.push_str(&format!("{pad}<{} {}>\n", c.name, c.arg));
            }
            rec(c, depth + 1, out);
            out.push_str(&format!("{pad}</{}>\n", c.name));
        }
    }
    let mut out = String::from("<ROOT>\n");
    rec(root, 1, &mut out);
    out.push_str("</ROOT>\n");
    out
}

/// Fluentd tag patterns: `*` one part, `**` zero or more parts, `{a,b}` alternatives,
/// several patterns separated by spaces.
pub fn tag_match(patterns: &str, tag: &str) -> bool {
    fn expand(p: &str) -> Vec<String> {
        if let (Some(a), Some(b)) = (p.find('{'), p.find('}')) {
            if a < b {
                return p[a + 1..b]
                    .split(',')
                    .flat_map(|alt| expand(&format!("{}{}{}", &p[..a], alt, &p[b + 1..])))
                    .collect();
            }
        }
        vec![p.to_string()]
    }
    fn parts(p: &[&str], t: &[&str]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((&"**", rest)) => (0..=t.len()).any(|i| parts(rest, &t[i..])),
            Some((seg, rest)) => {
                !t.is_empty()
                    && crate::fluentbit::config::tag_match(seg, t[0])
                    && parts(rest, &t[1..])
            }
        }
    }
    let t: Vec<&str> = tag.split('.').collect();
    patterns.split_whitespace().flat_map(expand).any(|p| {
        // `a.**` also matches `a` itself.
        let segs: Vec<&str> = p.split('.').collect();
        parts(&segs, &t)
    })
}

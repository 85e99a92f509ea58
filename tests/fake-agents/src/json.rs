//! Order-preserving JSON building. The agents' bodies have a fixed key order (the
//! recordings show it), and serde_json's default map sorts keys, so bodies are built as
//! text with serde_json doing only the string escaping.

/// A JSON object under construction; values are raw JSON text.
#[derive(Default)]
pub struct Obj(Vec<(String, String)>);

impl Obj {
    pub fn new() -> Self {
        Obj(Vec::new())
    }

    pub fn raw(mut self, k: &str, raw: impl Into<String>) -> Self {
        self.0.push((k.to_string(), raw.into()));
        self
    }

    pub fn str(self, k: &str, v: &str) -> Self {
        self.raw(k, quote(v))
    }

    pub fn num(self, k: &str, v: impl std::fmt::Display) -> Self {
        self.raw(k, v.to_string())
    }

    pub fn push(&mut self, k: &str, raw: impl Into<String>) {
        self.0.push((k.to_string(), raw.into()));
    }

    pub fn remove(&mut self, k: &str) {
        self.0.retain(|(key, _)| key != k);
    }

    pub fn entries(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn build(&self) -> String {
        let inner: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}:{}", quote(k), v))
            .collect();
        format!("{{{}}}", inner.join(","))
    }
}

pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

pub fn array(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

/// Re-indents compact JSON text with two spaces, keeping key order (Ruby's
/// `JSON.pretty_generate` layout, as in plugins_debug.json).
pub fn pretty(compact: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let chars: Vec<char> = compact.chars().collect();
    let nl = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push(c);
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                if chars.get(i + 1) == Some(&close) {
                    out.push(c);
                    out.push(close);
                    i += 2;
                    continue;
                }
                out.push(c);
                depth += 1;
                nl(&mut out, depth);
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                nl(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                nl(&mut out, depth);
            }
            ':' => out.push_str(": "),
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

//! Server-side rendering of agent configs: line-based syntax highlighting for Fluent Bit's
//! classic format, Fluentd's directives and YAML (comments, sections, keys, values), and
//! unified diffs of a config about to be pushed against the effective one.
//!
//! Everything is escaped here before it is wrapped in spans, so the result is safe HTML.

use maud::{Markup, PreEscaped};
use similar::{ChangeTag, TextDiff};

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn span(class: &str, text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("<span class=\"{class}\">{}</span>", esc(text))
    }
}

/// One highlighted line (without its newline).
fn line(l: &str) -> String {
    let body = l.trim_start();
    let indent = &l[..l.len() - body.len()];
    let mut out = esc(indent);
    if body.starts_with('#') {
        out.push_str(&span("c-comment", body));
    } else if (body.starts_with('[') && body.trim_end().ends_with(']')) || body.starts_with('<') {
        out.push_str(&span("c-section", body));
    } else if let Some((k, v)) = yaml_pair(body) {
        out.push_str(&span("c-key", k));
        out.push_str(&value(v));
    } else {
        match body.find(char::is_whitespace) {
            Some(i) => {
                out.push_str(&span("c-key", &body[..i]));
                out.push_str(&value(&body[i..]));
            }
            None => out.push_str(&span("c-key", body)),
        }
    }
    out
}

/// `key: value` or `- key: value` (YAML), split after the colon.
fn yaml_pair(body: &str) -> Option<(&str, &str)> {
    let start = if body.starts_with("- ") { 2 } else { 0 };
    let rest = &body[start..];
    let colon = rest.find(':')?;
    let key = &rest[..colon];
    let after = &rest[colon + 1..];
    let keyish = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | '$'));
    if keyish && (after.is_empty() || after.starts_with(' ')) {
        Some((&body[..start + colon + 1], after))
    } else {
        None
    }
}

/// A value, with a trailing comment set apart.
fn value(v: &str) -> String {
    match v.find(" #") {
        Some(i) => format!("{}{}", span("c-value", &v[..i]), span("c-comment", &v[i..])),
        None => {
            let t = v.trim_start();
            let lead = &v[..v.len() - t.len()];
            format!("{}{}", esc(lead), span("c-value", t))
        }
    }
}

/// A highlighted config body (`name` may later choose a grammar; the rules above cover the
/// classic, Fluentd and YAML formats together).
pub fn config(_name: &str, body: &str) -> Markup {
    let mut out = String::with_capacity(body.len() * 2);
    for (i, l) in body.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&line(l.trim_end_matches('\r')));
    }
    PreEscaped(out)
}

/// A unified diff of `old` → `new` with three lines of context, or `None` when they are equal.
pub fn diff(old: &str, new: &str) -> Option<Markup> {
    if old == new {
        return None;
    }
    let d = TextDiff::from_lines(old, new);
    let mut out = String::new();
    for group in d.grouped_ops(3) {
        let (first, last) = (group.first()?, group.last()?);
        let (o, n) = (first.old_range().start, first.new_range().start);
        let (ol, nl) = (last.old_range().end - o, last.new_range().end - n);
        out.push_str(&format!(
            "<span class=\"d-hunk\">@@ -{},{} +{},{} @@</span>\n",
            o + 1,
            ol,
            n + 1,
            nl
        ));
        for op in &group {
            for change in d.iter_changes(op) {
                let (class, sign) = match change.tag() {
                    ChangeTag::Delete => ("d-del", '-'),
                    ChangeTag::Insert => ("d-add", '+'),
                    ChangeTag::Equal => ("d-ctx", ' '),
                };
                let text = change.value().trim_end_matches('\n');
                out.push_str(&format!(
                    "<span class=\"{class}\">{sign}{}</span>\n",
                    esc(text)
                ));
            }
        }
    }
    Some(PreEscaped(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlights_classic_fluentd_and_yaml_and_escapes() {
        let h = config("f.conf", "[SERVICE]\n    Flush 1 # seconds\n# c\n<source>\n  @type forward\n</source>\nservice:\n  flush: 1\nx <script>").into_string();
        assert!(
            h.contains("<span class=\"c-section\">[SERVICE]</span>"),
            "{h}"
        );
        assert!(h.contains("    <span class=\"c-key\">Flush</span><span class=\"c-value\"> 1</span><span class=\"c-comment\"> # seconds</span>"), "{h}");
        assert!(h.contains("<span class=\"c-comment\"># c</span>"), "{h}");
        assert!(
            h.contains("<span class=\"c-section\">&lt;source&gt;</span>"),
            "{h}"
        );
        assert!(h.contains("<span class=\"c-key\">@type</span>"), "{h}");
        assert!(h.contains("<span class=\"c-key\">flush:</span>"), "{h}");
        assert!(
            h.contains("&lt;script&gt;") && !h.contains("<script>"),
            "{h}"
        );
    }

    #[test]
    fn diffs_show_changed_lines_with_context() {
        assert!(diff("a\n", "a\n").is_none());
        let d = diff("a\nb\nc\n", "a\nB\nc\n<x>\n").unwrap().into_string();
        assert!(d.contains("<span class=\"d-del\">-b</span>"), "{d}");
        assert!(d.contains("<span class=\"d-add\">+B</span>"), "{d}");
        assert!(d.contains("<span class=\"d-add\">+&lt;x&gt;</span>"), "{d}");
        assert!(d.contains("<span class=\"d-ctx\"> a</span>"), "{d}");
        assert!(
            d.starts_with("<span class=\"d-hunk\">@@ -1,3 +1,4 @@</span>"),
            "{d}"
        );
    }
}

//! The core's [`Reply`] in Discord's idiom: one embed (text, tables as code blocks, progress
//! bars, fields, the context as its footer) and buttons in action rows, with `custom_id`
//! `action:value`. Discord's limits (Channel → Embed limits, Message Components) are kept by
//! cutting, never by being refused: description 4096, field name 256 / value 1024, 25 fields,
//! footer 2048, 5 buttons a row and 5 rows, `custom_id` 100, label 80.
//!
//! Every body carries `components` (empty when there are no buttons) so an edit removes the
//! buttons of the message it replaces, and `allowed_mentions: {parse: []}` so no text an agent
//! reported can ping anyone.

use serde_json::{json, Value};

use crate::core::text::{bar, clip};
use crate::core::types::{Block, Button, Reply, Style};

/// Message flag: only the user who invoked the interaction sees it.
pub const EPHEMERAL: u64 = 1 << 6;
/// Longest `custom_id` Discord accepts.
pub const MAX_CUSTOM_ID: usize = 100;

const MAX_DESCRIPTION: usize = 4096;
const MAX_FIELDS: usize = 25;

/// A button's `custom_id`, if it fits.
pub fn custom_id(b: &Button) -> Option<String> {
    let id = format!("{}:{}", b.action_id, b.value);
    (id.len() <= MAX_CUSTOM_ID).then_some(id)
}

/// Slack-style `*bold*` (what the core writes) as Discord's `**bold**`; code spans kept.
pub fn markdown(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut in_code = false;
    for ch in s.chars() {
        match ch {
            '`' => {
                in_code = !in_code;
                out.push(ch);
            }
            '*' if !in_code => out.push_str("**"),
            _ => out.push(ch),
        }
    }
    out
}

fn button(b: &Button) -> Option<Value> {
    let Some(id) = custom_id(b) else {
        tracing::warn!(action = %b.action_id, "a button's custom_id is over 100 characters; left out");
        return None;
    };
    let style = match b.style {
        Style::Primary => 1,
        Style::Default => 2,
        Style::Danger => 4,
    };
    Some(json!({"type": 2, "style": style, "label": clip(&b.label, 80), "custom_id": id}))
}

/// The message body of a reply: for `POST /channels/{id}/messages`, an interaction response's
/// `data`, or a webhook edit / follow-up.
pub fn render(reply: &Reply) -> Value {
    let mut description: Vec<String> = Vec::new();
    let mut fields: Vec<Value> = Vec::new();
    let mut footer: Vec<String> = Vec::new();
    let mut buttons: Vec<Value> = Vec::new();
    for b in &reply.blocks {
        match b {
            Block::Text(t) => description.push(markdown(t)),
            Block::Context(t) => footer.push(t.replace('`', "")),
            Block::Fields(fs) => fields.extend(fs.iter().map(|(k, v)| {
                json!({"name": clip(&markdown(k), 256), "value": clip(&markdown(v), 1024),
                    "inline": true})
            })),
            Block::Table {
                columns,
                rows,
                more,
            } => {
                let mut lines = vec![columns.join(" | ")];
                lines.extend(rows.iter().map(|r| r.join(" | ")));
                let mut t = format!("```\n{}\n```", lines.join("\n"));
                if *more > 0 {
                    t.push_str(&format!("… and {more} more"));
                }
                description.push(t);
            }
            Block::Progress {
                total,
                queued,
                sent,
                succeeded,
                failed,
                done,
            } => description.push(format!(
                "{} {}/{total} succeeded · {failed} failed · {sent} sent · {queued} queued{}",
                bar(succeeded + failed, *total),
                succeeded,
                if *done { " — **done**" } else { "" }
            )),
            Block::Buttons(bs) => buttons.extend(bs.iter().filter_map(button)),
        }
    }
    let mut embed = json!({"description": clip(&description.join("\n\n"), MAX_DESCRIPTION)});
    if !fields.is_empty() {
        fields.truncate(MAX_FIELDS);
        embed["fields"] = Value::Array(fields);
    }
    if !footer.is_empty() {
        embed["footer"] = json!({"text": clip(&footer.join(" · "), 2048)});
    }
    let rows: Vec<Value> = buttons
        .chunks(5)
        .take(5)
        .map(|c| json!({"type": 1, "components": c}))
        .collect();
    let mut body = json!({
        "content": "",
        "embeds": [embed],
        "components": rows,
        "allowed_mentions": {"parse": []},
    });
    if reply.ephemeral {
        body["flags"] = json!(EPHEMERAL);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_renders_an_embed_with_buttons() {
        let r = Reply::text("*Confirm `restart` on 1 agent?*")
            .push(Block::Fields(vec![("Agents".into(), "1".into())]))
            .push(Block::Buttons(vec![
                Button {
                    action_id: "flotilla_confirm".into(),
                    label: "Confirm".into(),
                    value: "ab".repeat(16),
                    style: Style::Danger,
                },
                Button {
                    action_id: "x".into(),
                    label: "Too long".into(),
                    value: "v".repeat(100),
                    style: Style::Default,
                },
            ]))
            .push(Block::Context("Expires in 5 min".into()));
        let b = render(&r);
        assert_eq!(
            b["embeds"][0]["description"],
            "**Confirm `restart` on 1 agent?**"
        );
        assert_eq!(b["embeds"][0]["fields"][0]["name"], "Agents");
        assert_eq!(b["embeds"][0]["footer"]["text"], "Expires in 5 min");
        let row = &b["components"][0]["components"];
        assert_eq!(
            row.as_array().unwrap().len(),
            1,
            "the over-long id is left out"
        );
        assert_eq!(row[0]["style"], 4);
        assert_eq!(
            row[0]["custom_id"],
            format!("flotilla_confirm:{}", "ab".repeat(16))
        );
        assert!(b.get("flags").is_none());
        assert_eq!(b["allowed_mentions"]["parse"], json!([]));
    }

    #[test]
    fn private_replies_are_ephemeral_and_edits_clear_buttons() {
        let b = render(&Reply::text("no").private());
        assert_eq!(b["flags"], EPHEMERAL);
        assert_eq!(b["components"], json!([]));
    }

    #[test]
    fn long_text_is_cut_to_the_limit() {
        let b = render(&Reply::text("x".repeat(5000)));
        assert_eq!(
            b["embeds"][0]["description"]
                .as_str()
                .unwrap()
                .chars()
                .count(),
            MAX_DESCRIPTION
        );
    }

    #[test]
    fn progress_is_a_bar() {
        let b = render(&Reply::default().push(Block::Progress {
            total: 4,
            queued: 0,
            sent: 1,
            succeeded: 2,
            failed: 1,
            done: false,
        }));
        assert_eq!(
            b["embeds"][0]["description"],
            "███████░░░ 2/4 succeeded · 1 failed · 1 sent · 0 queued"
        );
    }
}

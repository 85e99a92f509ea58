//! The core's [`Reply`] as a Bot Framework message activity: plain text (Teams markdown) when
//! the reply is only words, else an Adaptive Card (schema 1.5, which Teams renders): text as
//! wrapped `TextBlock`s, fields as a `FactSet`, tables as a `Table`, progress as a bar with a
//! `FactSet` of counts, footnotes as subtle small text, buttons as `Action.Submit` whose `data`
//! carries the core's action id and value (see [`super::parse::ACTION_KEY`]).
//!
//! Teams' limits ("Format cards in Microsoft Teams", "Adaptive Cards in bots"): a message is
//! at most about 28 KB, so long texts are clipped; the core's `*bold*` is Teams' `**bold**`.

use serde_json::{json, Value};

use super::parse::{ACTION_KEY, VALUE_KEY};
use crate::core::text::{bar, clip, progress_head};
use crate::core::types::{Block, Button, Reply, Style};

/// The Adaptive Card attachment content type.
pub const CARD_CONTENT_TYPE: &str = "application/vnd.microsoft.card.adaptive";
/// Longest text block kept.
const MAX_TEXT: usize = 4000;
/// Most table rows shown.
const MAX_ROWS: usize = 25;

/// Renders `reply` as the body of a Connector API message activity.
pub fn render(reply: &Reply) -> Value {
    let words_only = reply
        .blocks
        .iter()
        .all(|b| matches!(b, Block::Text(_) | Block::Context(_)));
    if words_only {
        let text: Vec<String> = reply
            .blocks
            .iter()
            .map(|b| match b {
                Block::Text(t) => markdown(t),
                Block::Context(t) => format!("_{}_", markdown(t)),
                _ => String::new(),
            })
            .collect();
        return json!({
            "type": "message",
            "textFormat": "markdown",
            "text": clip(&text.join("\n\n"), MAX_TEXT),
        });
    }
    let mut body = Vec::new();
    let mut actions = Vec::new();
    for b in &reply.blocks {
        block(b, &mut body, &mut actions);
    }
    let mut card = json!({
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.5",
        "msteams": {"width": "Full"},
        "body": body,
    });
    if !actions.is_empty() {
        card["actions"] = Value::Array(actions);
    }
    json!({
        "type": "message",
        // What notifications and the activity feed show.
        "summary": clip(&reply.fallback_text(), 200),
        "attachments": [{"contentType": CARD_CONTENT_TYPE, "content": card}],
    })
}

fn block(b: &Block, body: &mut Vec<Value>, actions: &mut Vec<Value>) {
    match b {
        Block::Text(t) => body.push(text_block(&markdown(t))),
        Block::Context(t) => body.push(json!({
            "type": "TextBlock", "text": clip(&markdown(t), MAX_TEXT),
            "wrap": true, "isSubtle": true, "size": "Small",
        })),
        Block::Fields(fs) => body.push(json!({
            "type": "FactSet",
            "facts": fs.iter().map(|(k, v)| json!({"title": k, "value": clip(v, 500)})).collect::<Vec<_>>(),
        })),
        Block::Table {
            columns,
            rows,
            more,
        } => {
            let cell = |s: &str| {
                json!({"type": "TableCell", "items": [{"type": "TextBlock", "text": clip(s, 200), "wrap": true}]})
            };
            let mut trs = vec![json!({
                "type": "TableRow", "style": "accent",
                "cells": columns.iter().map(|c| cell(c)).collect::<Vec<_>>(),
            })];
            trs.extend(rows.iter().take(MAX_ROWS).map(|r| {
                json!({"type": "TableRow", "cells": (0..columns.len()).map(|i| cell(r.get(i).map(String::as_str).unwrap_or(""))).collect::<Vec<_>>()})
            }));
            body.push(json!({
                "type": "Table",
                "firstRowAsHeader": true,
                "columns": columns.iter().map(|_| json!({"width": 1})).collect::<Vec<_>>(),
                "rows": trs,
            }));
            let hidden = more + rows.len().saturating_sub(MAX_ROWS);
            if hidden > 0 {
                body.push(json!({"type": "TextBlock", "text": format!("… and {hidden} more"), "isSubtle": true, "size": "Small"}));
            }
        }
        Block::Buttons(bs) => actions.extend(bs.iter().map(button)),
        Block::Progress {
            total,
            queued,
            sent,
            succeeded,
            failed,
            done,
        } => {
            let finished = succeeded + failed;
            let head = progress_head(*done, *failed);
            body.push(text_block(&format!(
                "**{head}**: {finished}/{total} done {}",
                bar(finished, *total)
            )));
            body.push(json!({
                "type": "FactSet",
                "facts": [
                    {"title": "queued", "value": queued.to_string()},
                    {"title": "sent", "value": sent.to_string()},
                    {"title": "succeeded", "value": succeeded.to_string()},
                    {"title": "failed", "value": failed.to_string()},
                ],
            }));
        }
    }
}

fn button(b: &Button) -> Value {
    let mut v = json!({
        "type": "Action.Submit",
        "title": clip(&b.label, 60),
        "data": {ACTION_KEY: b.action_id, VALUE_KEY: b.value},
    });
    match b.style {
        Style::Default => {}
        Style::Primary => v["style"] = json!("positive"),
        Style::Danger => v["style"] = json!("destructive"),
    }
    v
}

fn text_block(t: &str) -> Value {
    json!({"type": "TextBlock", "text": clip(t, MAX_TEXT), "wrap": true})
}

/// The core's Slack-flavoured `*bold*` as Teams markdown `**bold**`; code spans are kept.
pub fn markdown(t: &str) -> String {
    let mut out = String::with_capacity(t.len() + 8);
    let mut in_code = false;
    for c in t.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c)
            }
            '*' if !in_code => out.push_str("**"),
            _ => out.push(c),
        }
    }
    out
}

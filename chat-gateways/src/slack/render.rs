//! Block Kit rendering of the core's [`Reply`]: sections in `mrkdwn`, fields, a compact table
//! as a code block, buttons in an `actions` block, progress as a bar with counts, and context
//! footnotes; plus the plain-text `text` Slack shows in notifications.
//!
//! Slack's Block Kit limits ("Block Kit reference": blocks and elements pages) are kept so a
//! message is never refused for its size: at most 50 blocks, 3000 characters per section
//! text, 10 fields of 2000 characters per section, 25 elements per actions block, button
//! labels of 75 characters and values of 2000, `action_id`s of 255. Text is escaped as the
//! "Formatting text for app surfaces" page requires (`&`, `<`, `>`).

use serde_json::{json, Value};

use crate::core::text::{bar, clip, progress_head};
use crate::core::types::{Block, Button, Reply, Style};

/// Most blocks in one message.
pub const MAX_BLOCKS: usize = 50;
/// Longest text of a section or context element.
pub const MAX_TEXT: usize = 3000;
const MAX_FIELDS: usize = 10;
const MAX_FIELD_TEXT: usize = 2000;
const MAX_ACTIONS: usize = 25;
const MAX_BUTTON_LABEL: usize = 75;
const MAX_BUTTON_VALUE: usize = 2000;
const MAX_ACTION_ID: usize = 255;

/// A reply as Slack takes it: `text` (notifications, screen readers, old clients) and `blocks`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub blocks: Vec<Value>,
}

/// Renders `reply` within Slack's limits.
pub fn render(reply: &Reply) -> Rendered {
    let mut blocks = Vec::new();
    for b in &reply.blocks {
        block(b, &mut blocks);
    }
    if blocks.len() > MAX_BLOCKS {
        let dropped = blocks.len() - (MAX_BLOCKS - 1);
        blocks.truncate(MAX_BLOCKS - 1);
        blocks.push(context(&format!(
            "… {dropped} more block(s) not shown (Slack shows at most {MAX_BLOCKS})"
        )));
    }
    Rendered {
        text: clip(&reply.fallback_text(), MAX_TEXT),
        blocks,
    }
}

fn block(b: &Block, out: &mut Vec<Value>) {
    match b {
        Block::Text(t) => {
            for chunk in chunks(&escape(t), MAX_TEXT) {
                out.push(section(&chunk));
            }
        }
        Block::Fields(fields) => {
            for group in fields.chunks(MAX_FIELDS) {
                let fs: Vec<Value> = group
                    .iter()
                    .map(|(k, v)| {
                        mrkdwn(&clip(
                            &format!("*{}*\n{}", escape(k), escape(v)),
                            MAX_FIELD_TEXT,
                        ))
                    })
                    .collect();
                out.push(json!({"type": "section", "fields": fs}));
            }
        }
        Block::Table {
            columns,
            rows,
            more,
        } => table(columns, rows, *more, out),
        Block::Buttons(buttons) => {
            for group in buttons.chunks(MAX_ACTIONS) {
                let els: Vec<Value> = group.iter().map(button).collect();
                out.push(json!({"type": "actions", "elements": els}));
            }
        }
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
            let text = format!(
                "*{head}*: {finished}/{total} done `{}`\nqueued {queued} · sent {sent} · succeeded {succeeded} · failed {failed}",
                bar(finished, *total)
            );
            out.push(section(&text));
        }
        Block::Context(t) => out.push(context(&escape(t))),
    }
}

/// Columns padded to their widest cell in a code block, rows cut to fit one section.
fn table(columns: &[String], rows: &[Vec<String>], more: usize, out: &mut Vec<Value>) {
    let n = columns
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let cell = |r: &[String], i: usize| -> String {
        // Backticks would end the code block; cells are kept to one line.
        r.get(i)
            .map(|c| c.replace("```", "'''").replace('\n', " "))
            .unwrap_or_default()
    };
    let mut widths = vec![0usize; n];
    for r in std::iter::once(columns).chain(rows.iter().map(Vec::as_slice)) {
        for (i, w) in widths.iter_mut().enumerate() {
            *w = (*w).max(cell(r, i).chars().count().min(40));
        }
    }
    let line = |r: &[String]| -> String {
        let cells: Vec<String> = (0..n)
            .map(|i| {
                let c = clip(&cell(r, i), 40);
                format!("{c:<w$}", w = widths[i])
            })
            .collect();
        escape(cells.join("  ").trim_end())
    };
    // Room for the fences and a possible "… N more" line.
    let budget = MAX_TEXT - 8;
    let mut body = line(columns);
    let mut shown = 0;
    for r in rows {
        let l = line(r);
        if body.chars().count() + 1 + l.chars().count() > budget {
            break;
        }
        body.push('\n');
        body.push_str(&l);
        shown += 1;
    }
    out.push(section(&format!("```{body}```")));
    let hidden = more + (rows.len() - shown);
    if hidden > 0 {
        out.push(context(&format!("… and {hidden} more")));
    }
}

fn button(b: &Button) -> Value {
    let mut v = json!({
        "type": "button",
        "action_id": clip(&b.action_id, MAX_ACTION_ID),
        "text": {"type": "plain_text", "text": clip(&b.label, MAX_BUTTON_LABEL), "emoji": true},
        "value": clip(&b.value, MAX_BUTTON_VALUE),
    });
    match b.style {
        Style::Default => {}
        Style::Primary => v["style"] = json!("primary"),
        Style::Danger => v["style"] = json!("danger"),
    }
    v
}

fn section(text: &str) -> Value {
    json!({"type": "section", "text": mrkdwn(text)})
}

fn context(text: &str) -> Value {
    json!({"type": "context", "elements": [mrkdwn(&clip(text, MAX_TEXT))]})
}

fn mrkdwn(text: &str) -> Value {
    json!({"type": "mrkdwn", "text": text})
}

/// Escapes the three characters Slack's mrkdwn treats as control characters.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Splits into pieces of at most `max` characters, preferring line breaks.
fn chunks(s: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0;
    for line in s.split_inclusive('\n') {
        let len = line.chars().count();
        if cur_len + len > max && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            cur_len = 0;
        }
        if len > max {
            // One line longer than a section: cut it hard.
            let chars: Vec<char> = line.chars().collect();
            for piece in chars.chunks(max) {
                out.push(piece.iter().collect());
            }
            continue;
        }
        cur.push_str(line);
        cur_len += len;
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(blocks: Vec<Block>) -> Reply {
        Reply {
            blocks,
            ephemeral: false,
            replace: None,
        }
    }

    fn text_len(v: &Value) -> usize {
        v["text"]["text"].as_str().unwrap().chars().count()
    }

    #[test]
    fn each_block_kind_renders_as_block_kit() {
        let r = render(&reply(vec![
            Block::Text("Restart *3 agents*: web-1 & <web-2>".into()),
            Block::Fields(vec![
                ("Kind".into(), "restart".into()),
                ("Agents".into(), "3".into()),
            ]),
            Block::Table {
                columns: vec!["host".into(), "health".into()],
                rows: vec![
                    vec!["web-1".into(), "unhealthy".into()],
                    vec!["web-22".into(), "ok".into()],
                ],
                more: 4,
            },
            Block::Buttons(vec![
                Button {
                    action_id: "flotilla.confirm".into(),
                    label: "Confirm".into(),
                    value: "c-1".into(),
                    style: Style::Danger,
                },
                Button {
                    action_id: "flotilla.cancel".into(),
                    label: "Cancel".into(),
                    value: "c-1".into(),
                    style: Style::Default,
                },
            ]),
            Block::Progress {
                total: 10,
                queued: 2,
                sent: 3,
                succeeded: 4,
                failed: 1,
                done: false,
            },
            Block::Context("expires in 5 minutes".into()),
        ]));
        let b = &r.blocks;
        assert_eq!(b[0]["text"]["type"], "mrkdwn");
        assert_eq!(
            b[0]["text"]["text"],
            "Restart *3 agents*: web-1 &amp; &lt;web-2&gt;"
        );
        assert_eq!(b[1]["fields"][0]["text"], "*Kind*\nrestart");
        assert_eq!(
            b[2]["text"]["text"],
            "```host    health\nweb-1   unhealthy\nweb-22  ok```"
        );
        assert_eq!(b[3]["elements"][0]["text"], "… and 4 more");
        assert_eq!(b[4]["type"], "actions");
        assert_eq!(b[4]["elements"][0]["style"], "danger");
        assert_eq!(b[4]["elements"][0]["action_id"], "flotilla.confirm");
        assert_eq!(b[4]["elements"][0]["value"], "c-1");
        assert!(b[4]["elements"][1].get("style").is_none());
        let p = b[5]["text"]["text"].as_str().unwrap();
        assert!(
            p.starts_with("*In progress*: 5/10 done `█████░░░░░`"),
            "{p}"
        );
        assert!(
            p.contains("queued 2 · sent 3 · succeeded 4 · failed 1"),
            "{p}"
        );
        assert_eq!(b[6]["type"], "context");
        assert!(!r.text.is_empty());
    }

    #[test]
    fn slacks_size_limits_are_kept() {
        // 60 text blocks → 49 + a note; a 7000-character text → three sections.
        let r = render(&reply(
            (0..60).map(|i| Block::Text(format!("line {i}"))).collect(),
        ));
        assert_eq!(r.blocks.len(), MAX_BLOCKS);
        assert!(r.blocks[49]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("11 more block"));
        let long = "x".repeat(2000) + "\n" + &"y".repeat(2000) + "\n" + &"z".repeat(3000);
        let r = render(&reply(vec![Block::Text(long)]));
        assert_eq!(r.blocks.len(), 3);
        assert!(r.blocks.iter().all(|b| text_len(b) <= MAX_TEXT));
        assert!(r.text.chars().count() <= MAX_TEXT);
        // A table of 1,000 rows fits one section and says how many it left out.
        let rows: Vec<Vec<String>> = (0..1000)
            .map(|i| vec![format!("host-{i}"), "ok".into()])
            .collect();
        let r = render(&reply(vec![Block::Table {
            columns: vec!["host".into(), "health".into()],
            rows,
            more: 0,
        }]));
        assert!(text_len(&r.blocks[0]) <= MAX_TEXT);
        let note = r.blocks[1]["elements"][0]["text"].as_str().unwrap();
        assert!(
            note.starts_with("… and ") && note.ends_with(" more"),
            "{note}"
        );
        // 12 fields → two sections; 30 buttons → two actions blocks; long labels clipped.
        let r = render(&reply(vec![
            Block::Fields((0..12).map(|i| (format!("k{i}"), "v".into())).collect()),
            Block::Buttons(
                (0..30)
                    .map(|i| Button {
                        action_id: format!("a{i}"),
                        label: "L".repeat(100),
                        value: "v".into(),
                        style: Style::Primary,
                    })
                    .collect(),
            ),
        ]));
        assert_eq!(r.blocks[0]["fields"].as_array().unwrap().len(), 10);
        assert_eq!(r.blocks[1]["fields"].as_array().unwrap().len(), 2);
        assert_eq!(r.blocks[2]["elements"].as_array().unwrap().len(), 25);
        assert_eq!(r.blocks[3]["elements"].as_array().unwrap().len(), 5);
        assert_eq!(
            r.blocks[2]["elements"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .chars()
                .count(),
            75
        );
    }

    #[test]
    fn a_finished_fan_out_says_so() {
        let r = render(&reply(vec![Block::Progress {
            total: 4,
            queued: 0,
            sent: 0,
            succeeded: 3,
            failed: 1,
            done: true,
        }]));
        let t = r.blocks[0]["text"]["text"].as_str().unwrap();
        assert!(
            t.starts_with("*Finished with failures*: 4/4 done `██████████`"),
            "{t}"
        );
    }
}

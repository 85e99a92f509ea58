//! The shared types as adapters use them: actors, platform names, plain-text fallbacks.

use flotilla_chat::{actor, Block, Button, ChatUser, ConversationRef, Platform, Reply, Style};

#[test]
fn actor_and_fallback_text() {
    let user = ChatUser {
        id: "U1".into(),
        name: "Ada".into(),
        groups: vec![],
    };
    let conv = ConversationRef {
        platform: Platform::Slack,
        workspace: "T9".into(),
        channel: "C1".into(),
        thread: None,
    };
    assert_eq!(actor(&user, &conv), "slack:T9/U1 (Ada)");
    assert_eq!(Platform::Teams.to_string(), "teams");

    let r = Reply::text("*3* agents")
        .push(Block::Table {
            columns: vec!["host".into(), "state".into()],
            rows: vec![vec!["web-1".into(), "online".into()]],
            more: 2,
        })
        .push(Block::Buttons(vec![Button {
            action_id: "confirm".into(),
            label: "Confirm".into(),
            value: "x".into(),
            style: Style::Danger,
        }]))
        .private();
    assert!(r.ephemeral);
    assert_eq!(
        r.fallback_text(),
        "*3* agents\nhost | state\nweb-1 | online\n… and 2 more\n[Confirm]"
    );
}

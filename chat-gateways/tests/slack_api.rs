//! The Slack Web API client against a fake Slack on loopback: what each method sends, the
//! bot token on every call, Slack's `ok: false` errors surfaced, and HTTP 429 `Retry-After`
//! honoured (the call is retried after the advertised time, not before, and only its channel
//! waits), and posts paced per channel (a burst, then about one a second).

use std::time::Duration;

use flotilla_chat::core::types::{Block, Button, Reply, Style};
use flotilla_chat::slack::client::{ApiError, BotToken, SlackApi};
use flotilla_chat::slack::render::render;
use flotilla_e2e::fake_slack::{FakeSlack, Script};

const TOKEN: &str = "xoxb-test-token";

fn preview() -> Reply {
    Reply {
        blocks: vec![
            Block::Text("Restart *2 agents*?".into()),
            Block::Buttons(vec![Button {
                action_id: "flotilla.confirm".into(),
                label: "Confirm".into(),
                value: "c-1".into(),
                style: Style::Danger,
            }]),
        ],
        ephemeral: false,
        replace: None,
    }
}

#[tokio::test]
async fn posts_updates_and_ephemerals_reach_slack_with_the_bot_token() {
    let fake = FakeSlack::start(TOKEN).await;
    let api = SlackApi::new(&fake.api_url(), BotToken::new(TOKEN).unwrap()).unwrap();
    let r = render(&preview());
    let ts = api.post("C1", Some("1700.000100"), &r).await.unwrap();
    assert!(!ts.is_empty());
    api.update("C1", &ts, &r).await.unwrap();
    api.ephemeral("C1", "U1", None, &r).await.unwrap();
    api.respond(&fake.response_url("t1"), &r, true)
        .await
        .unwrap();

    let calls = fake.calls();
    let methods: Vec<&str> = calls.iter().map(|c| c.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "chat.postMessage",
            "chat.update",
            "chat.postEphemeral",
            "response_url"
        ]
    );
    let post = &calls[0].body;
    assert_eq!(post["channel"], "C1");
    assert_eq!(post["thread_ts"], "1700.000100");
    assert_eq!(post["text"], "Restart *2 agents*?\n[Confirm]");
    assert_eq!(
        post["blocks"][1]["elements"][0]["action_id"],
        "flotilla.confirm"
    );
    assert_eq!(post["blocks"][1]["elements"][0]["style"], "danger");
    assert_eq!(calls[1].body["ts"], ts.as_str());
    assert_eq!(calls[2].body["user"], "U1");
    assert_eq!(calls[3].target.as_deref(), Some("t1"));
    assert_eq!(calls[3].body["replace_original"], true);
    for c in &calls[..3] {
        assert_eq!(c.authorization.as_deref(), Some("Bearer xoxb-test-token"));
    }
    // The response_url is authorised by itself: the bot token is not sent to it.
    assert_eq!(calls[3].authorization, None);
}

#[tokio::test]
async fn slack_errors_are_reported_by_method_and_code() {
    let fake = FakeSlack::start(TOKEN).await;
    let api = SlackApi::new(&fake.api_url(), BotToken::new(TOKEN).unwrap()).unwrap();
    fake.script(
        "chat.postMessage",
        Script::Error("channel_not_found".into()),
    );
    let e = api
        .post("C404", None, &render(&preview()))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        ApiError::Slack {
            method: "chat.postMessage",
            error: "channel_not_found".into()
        }
    );
    let bad = SlackApi::new(&fake.api_url(), BotToken::new("xoxb-wrong").unwrap()).unwrap();
    let e = bad.post("C1", None, &render(&preview())).await.unwrap_err();
    assert!(e.to_string().contains("invalid_auth"), "{e}");
    assert!(SlackApi::new("slack.com/api", BotToken::new(TOKEN).unwrap()).is_err());
    assert!(BotToken::new("  \n").is_err());
    assert!(!format!("{:?}", BotToken::new(TOKEN).unwrap()).contains("xoxb"));
}

#[tokio::test]
async fn rate_limits_are_waited_out_and_retried() {
    let fake = FakeSlack::start(TOKEN).await;
    let api = SlackApi::new(&fake.api_url(), BotToken::new(TOKEN).unwrap()).unwrap();
    fake.script("chat.postMessage", Script::RateLimited { retry_after_s: 1 });
    let ts = api.post("C1", None, &render(&preview())).await.unwrap();
    assert!(!ts.is_empty());
    let calls = fake.calls_of("chat.postMessage");
    assert_eq!(calls.len(), 2, "one 429, then the retry");
    let waited = calls[1].at.duration_since(calls[0].at);
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}, before Retry-After: 1"
    );
    // Still limited after every retry: reported, not looped forever.
    for _ in 0..4 {
        fake.script("chat.update", Script::RateLimited { retry_after_s: 0 });
    }
    let e = api
        .update("C1", &ts, &render(&preview()))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        ApiError::RateLimited {
            method: "chat.update"
        }
    );
}

#[tokio::test]
async fn a_429_holds_its_channel_only_and_the_message_is_delivered_after_the_wait() {
    let fake = FakeSlack::start(TOKEN).await;
    let api = SlackApi::new(&fake.api_url(), BotToken::new(TOKEN).unwrap()).unwrap();
    fake.script("chat.postMessage", Script::RateLimited { retry_after_s: 2 });
    let held = {
        let api = api.clone();
        tokio::spawn(async move { api.post("C1", None, &render(&preview())).await })
    };
    fake.wait_for(Duration::from_secs(10), "C1's first try", |c| c.len() == 1)
        .await;
    // Another channel is not behind C1's hold.
    api.post("C2", None, &render(&preview())).await.unwrap();
    let ts = held.await.unwrap().unwrap();
    assert!(!ts.is_empty(), "the held message is delivered, not lost");
    let calls = fake.calls_of("chat.postMessage");
    let channels: Vec<&str> = calls
        .iter()
        .map(|c| c.body["channel"].as_str().unwrap())
        .collect();
    assert_eq!(
        channels,
        ["C1", "C2", "C1"],
        "429, C2 meanwhile, C1's retry"
    );
    let waited = calls[2].at.duration_since(calls[0].at);
    assert!(
        waited >= Duration::from_millis(1950),
        "C1 retried after {waited:?}, before Retry-After: 2"
    );
}

#[tokio::test]
async fn posts_in_one_channel_are_paced_after_a_burst_and_other_channels_are_not() {
    let fake = FakeSlack::start(TOKEN).await;
    let api = SlackApi::new(&fake.api_url(), BotToken::new(TOKEN).unwrap()).unwrap();
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.post("C1", None, &render(&preview())).await })
        })
        .collect();
    fake.wait_for(Duration::from_secs(10), "C1's burst", |c| c.len() == 3)
        .await;
    api.post("C2", None, &render(&preview())).await.unwrap();
    for b in burst {
        b.await.unwrap().unwrap();
    }
    let calls = fake.calls_of("chat.postMessage");
    let channels: Vec<&str> = calls
        .iter()
        .map(|c| c.body["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["C1", "C1", "C1", "C2", "C1"]);
    let paced = calls[4].at.duration_since(calls[0].at);
    assert!(
        paced >= Duration::from_millis(950),
        "C1's fourth post {paced:?} after its first, inside Slack's one a second"
    );
}

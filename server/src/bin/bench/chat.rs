//! `flotilla-bench --chat N`: the Slack gateway under a connected fleet. A fake Slack Web API on
//! loopback takes the gateway's posts; slash commands signed as Slack signs them (`v0` HMAC)
//! are timed to the HTTP ack and to the answer reaching "Slack", and restarts of single agents
//! are timed from the slash command, through the preview and a Confirm click, to the command
//! reaching the WebSocket agent.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use flotilla_chat::slack::verify::SigningSecret;
use serde_json::{json, Value};

use super::{host_name, ms_stats, Shared};

/// The user every benchmark request comes from (mapped to the operator role).
pub const USER: &str = "UBENCH";
const FORM: &str = "application/x-www-form-urlencoded";
const WAIT: Duration = Duration::from_secs(60);

/// The fake Slack: records every `chat.postMessage` with the `ts` it answered.
#[derive(Clone, Default)]
pub struct FakeSlack {
    posts: Arc<Mutex<Vec<(Value, String)>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl FakeSlack {
    /// Serves on a loopback port; returns the Web API base URL to configure.
    pub async fn start() -> anyhow::Result<(FakeSlack, String)> {
        let fake = FakeSlack::default();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let app = Router::new()
            .route("/api/{method}", post(api))
            .route(
                "/response/{id}",
                post(|| async { Json(json!({"ok": true})) }),
            )
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Ok((fake, format!("http://{addr}")))
    }

    fn posts(&self) -> usize {
        self.posts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits for post number `n` (0-based) and returns it.
    async fn post(&self, n: usize) -> anyhow::Result<(Value, String)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            if let Some(p) = self.posts.lock().unwrap_or_else(|e| e.into_inner()).get(n) {
                return Ok(p.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("the gateway posted no answer within {WAIT:?}");
            }
        }
    }
}

async fn api(
    State(fake): State<FakeSlack>,
    Path(method): Path<String>,
    body: axum::body::Bytes,
) -> Json<Value> {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if method != "chat.postMessage" {
        return Json(
            json!({"ok": true, "channel": v["channel"], "ts": v["ts"], "text": v["text"],
            "message": {"text": v["text"], "blocks": v["blocks"]}}),
        );
    }
    let ts = {
        let mut g = fake.posts.lock().unwrap_or_else(|e| e.into_inner());
        let ts = format!("1700000000.{:06}", g.len() + 1);
        g.push((v.clone(), ts.clone()));
        ts
    };
    fake.notify.notify_waiters();
    // As Slack answers (the client reads `message` back).
    Json(json!({"ok": true, "channel": v["channel"], "ts": ts,
        "message": {"type": "message", "text": v["text"], "ts": ts, "blocks": v["blocks"]}}))
}

/// The `[chat]` part of the started server's configuration.
pub fn config_toml(dir: &std::path::Path, port: u16, api_url: &str, secret: &str) -> String {
    let secret_file = dir.join("slack-signing-secret");
    let token_file = dir.join("slack-bot-token");
    let _ = super::private(&secret_file, secret);
    let _ = super::private(&token_file, "xoxb-bench-token");
    format!(
        "\n[chat]\nlisten = \"127.0.0.1:{port}\"\n\n[chat.slack]\nenabled = true\n\
         signing_secret_file = {secret_file:?}\nbot_token_file = {token_file:?}\n\
         api_url = \"{api_url}/api\"\n\n[chat.slack.access.users]\n{USER} = \"operator\"\n"
    )
}

struct Signer {
    secret: SigningSecret,
    base: String,
    http: reqwest::Client,
    fake_url: String,
}

impl Signer {
    fn new(secret: &str, chat_addr: &str, fake_url: &str) -> anyhow::Result<Signer> {
        Ok(Signer {
            secret: SigningSecret::new(secret).context("signing secret")?,
            base: format!("http://{chat_addr}"),
            http: reqwest::Client::new(),
            fake_url: fake_url.to_string(),
        })
    }

    /// POSTs a signed form body; returns the time to Slack's 200.
    async fn send(&self, path: &str, body: String) -> anyhow::Result<Duration> {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            .to_string();
        let sig = self.secret.sign(&ts, body.as_bytes());
        let t0 = Instant::now();
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", FORM)
            .header("x-slack-request-timestamp", ts)
            .header("x-slack-signature", sig)
            .body(body)
            .send()
            .await?;
        let took = t0.elapsed();
        if !r.status().is_success() {
            bail!("{path}: HTTP {}: {}", r.status(), r.text().await?);
        }
        Ok(took)
    }

    async fn slash(&self, text: &str, trigger: &str) -> anyhow::Result<Duration> {
        let response_url = format!("{}/response/{trigger}", self.fake_url);
        let body = form(&[
            ("team_id", "TBENCH"),
            ("channel_id", "CBENCH"),
            ("user_id", USER),
            ("user_name", "bench"),
            ("command", "/flotilla"),
            ("text", text),
            ("response_url", &response_url),
            ("trigger_id", trigger),
        ]);
        self.send("/chat/slack/commands", body).await
    }

    async fn confirm(&self, id: &str, ts: &str, trigger: &str) -> anyhow::Result<Duration> {
        let payload = json!({
            "type": "block_actions",
            "team": {"id": "TBENCH"},
            "user": {"id": USER, "username": "bench", "team_id": "TBENCH"},
            "channel": {"id": "CBENCH"},
            "container": {"type": "message", "message_ts": ts, "channel_id": "CBENCH"},
            "message": {"ts": ts},
            "trigger_id": trigger,
            "response_url": format!("{}/response/{trigger}", self.fake_url),
            "actions": [{"action_id": "flotilla_confirm", "value": id, "type": "button"}],
        });
        let body = form(&[("payload", &payload.to_string())]);
        self.send("/chat/slack/interactions", body).await
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut u = reqwest::Url::parse("http://x/").expect("a valid URL");
    u.query_pairs_mut().extend_pairs(pairs);
    u.query().unwrap_or("").to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `requests` timed slash commands, then `restarts` slash → Confirm → agent round trips
/// on agents counted down from the last (so they do not meet the window's or the fan-out's).
pub async fn run(
    sh: &Arc<Shared>,
    fake: &FakeSlack,
    fake_url: &str,
    chat_addr: &str,
    secret: &str,
    requests: usize,
    restarts: usize,
) -> anyhow::Result<Value> {
    let s = Signer::new(secret, chat_addr, fake_url)?;
    let n = sh.uids.len();
    // Reads, one at a time: the ack, then the answer reaching Slack.
    let (mut ack, mut answer) = (Vec::new(), Vec::new());
    for k in 0..requests {
        let before = fake.posts();
        let t0 = Instant::now();
        let i = (k * 7919) % n;
        ack.push(ms(s
            .slash(&format!("agent {}", host_name(sh, i)), &format!("read-{k}"))
            .await?));
        fake.post(before).await?;
        answer.push(ms(t0.elapsed()));
    }
    // Restarts: slash → preview → Confirm → the command at the agent.
    let (mut preview, mut to_agent, mut confirm_to_agent) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..restarts {
        let i = n - 1 - k;
        if i < sh.fanout || sh.cmd_recv_ns[i].load(Ordering::Relaxed) != 0 {
            bail!("agent {i} already had a command; use fewer --chat-restarts");
        }
        let before = fake.posts();
        let t0 = Instant::now();
        s.slash(
            &format!("restart {}", host_name(sh, i)),
            &format!("restart-{k}"),
        )
        .await?;
        let (p, ts) = fake.post(before).await?;
        preview.push(ms(t0.elapsed()));
        let id = p["blocks"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["type"] == "actions"))
            .and_then(|a| a["elements"][0]["value"].as_str())
            .with_context(|| format!("no Confirm button in the answer: {p}"))?
            .to_string();
        let t1 = Instant::now();
        s.confirm(&id, &ts, &format!("confirm-{k}")).await?;
        let deadline = Instant::now() + WAIT;
        while sh.cmd_recv_ns[i].load(Ordering::Relaxed) == 0 {
            if Instant::now() > deadline {
                bail!("the confirmed restart of agent {i} did not reach it within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        to_agent.push(ms(t0.elapsed()));
        confirm_to_agent.push(ms(t1.elapsed()));
    }
    Ok(json!({
        "slash_ack": ms_stats(ack),
        "slash_answer_posted": ms_stats(answer),
        "restart_preview_posted": ms_stats(preview),
        "restart_slash_to_agent": ms_stats(to_agent),
        "restart_confirm_to_agent": ms_stats(confirm_to_agent),
    }))
}

/// How long the gateway must post nothing more before the storm counts as over: longer than the
/// alert engine's longest grouping window (5 s), so a late summary is not missed.
const STORM_QUIET: Duration = Duration::from_secs(15);

/// The alert storm: a channel subscribes to `state:offline`, then every agent says goodbye at
/// once (`cancel` makes each bench agent send `agent_disconnect` and close). Reports how many
/// messages the channel got, the agent count they name, and the time from the goodbyes to the
/// last message.
pub async fn alert_storm(
    sh: &Arc<Shared>,
    fake: &FakeSlack,
    fake_url: &str,
    chat_addr: &str,
    secret: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Value> {
    let s = Signer::new(secret, chat_addr, fake_url)?;
    let before = fake.posts();
    s.slash("subscribe state:offline", "storm-subscribe")
        .await?;
    let (answer, _) = fake.post(before).await?;
    let text = answer["text"].as_str().unwrap_or_default();
    if !text.to_lowercase().contains("subscri") {
        bail!("the subscribe command was not confirmed: {answer}");
    }
    let first_alert = fake.posts();
    let agents = sh.uids.len();
    let t0 = Instant::now();
    cancel.cancel();
    let mut last_post = t0;
    let mut seen = first_alert;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fake.posts();
        if now > seen {
            seen = now;
            last_post = Instant::now();
        }
        if last_post.elapsed() >= STORM_QUIET && (seen > first_alert || t0.elapsed() > WAIT) {
            break;
        }
    }
    let posts: Vec<Value> = fake.posts.lock().unwrap_or_else(|e| e.into_inner())[first_alert..]
        .iter()
        .map(|(v, _)| v["text"].clone())
        .collect();
    if posts.is_empty() {
        bail!("{agents} agents went offline and the subscribed channel got no message");
    }
    Ok(json!({
        "agents_offline": agents,
        "messages": posts.len(),
        "goodbyes_to_last_message_ms": (ms(last_post - t0) * 10.0).round() / 10.0,
        "texts": posts,
    }))
}
